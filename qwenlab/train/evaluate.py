"""Held-out perplexity of a checkpoint on a corpus, with the training data path (packing, document masks)."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import TrainingError
from .data import IGNORE_INDEX, DocumentAttention, PackedLoader, TokenDataset, ensure_prepared
from .losses import cross_entropy_sum


@torch.no_grad()
def perplexity(model_dir: str | Path, data: str | Path, seq_len: int = 1024, batch: int = 4,
               max_rows: int | None = None, dtype: str = "float32", adapter: str | None = None,
               progress: bool = True, quantization: str | None = None) -> dict:
    """exp(mean next-token loss) over every document of ``data`` (each document once, in order)."""
    from tqdm import tqdm

    from ..checkpoint import load_model, to_torch_dtype
    from .lora import load_adapter

    if quantization and adapter:
        raise TrainingError("--quantization with --adapter: merge the adapter first (qwenlab lora merge)")
    model = load_model(model_dir, dtype=to_torch_dtype(dtype), quantization=quantization)
    if adapter:
        load_adapter(model, adapter)
    model.eval()
    with tempfile.TemporaryDirectory() as cache:
        tokenizer = str(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else "byte"
        dataset = TokenDataset(ensure_prepared(str(data), Path(cache), tokenizer))
        if dataset.max_token() >= model.config.vocab_size:
            raise TrainingError(f"{data}: token ids exceed the model's vocabulary; prepared with another tokenizer?")
        loader = PackedLoader([(dataset, 1.0)], seq_len, shuffle=False)
        total_rows = -(-dataset.meta["num_tokens"] // seq_len)
        if max_rows:
            total_rows = min(total_rows, max_rows)
        loss_sum, count = 0.0, 0
        bar = tqdm(total=total_rows, desc="perplexity", unit="row", disable=not progress, file=sys.stderr)
        done = 0
        while done < total_rows:
            rows = loader.next_rows(min(batch, total_rows - done)).to_torch("cpu")
            labels = rows["labels"].reshape(-1)
            index = (labels != IGNORE_INDEX).nonzero().squeeze(1)
            logits = model(rows["input_ids"], positions=rows["positions"], context=DocumentAttention(rows["doc_ids"]),
                           logits_indices=index)
            loss_sum += float(cross_entropy_sum(logits, labels[index]))
            count += len(index)
            done += len(rows["input_ids"])
            bar.update(len(rows["input_ids"]))
            if loader.streams[0]["epoch"] > 0:
                break  # every document seen once
        bar.close()
    loss = loss_sum / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "rows": done}
