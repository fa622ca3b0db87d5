"""Rebuild qwenlab's embedded default model (qwenlab/assets/default) from scratch, offline.

    .venv/bin/python scripts/build_default_model.py            # every step; each is skipped if already done
    .venv/bin/python scripts/build_default_model.py --force    # redo every step

Steps (outputs under build/default unless --work says otherwise):

1. corpora     scripts/default_corpora.py: Python docs prose, standard-library code, whole modules (long)
2. sft data    scripts/make_synthetic_sft.py: synthetic chats (train seed 0, held-out seed 1)
3. tokenizer   scripts/train_tokenizer.py: 8,192-token byte-level BPE with Qwen's regex, specials, template
4. shards      prose and code training text tokenized once (`qwenlab data prepare`): used by the
               pretraining stages and, with a small weight, mixed into SFT; and the SFT shards: each assistant turn becomes one example: the conversation before it (rendered by the chat
               template, with the record's enable_thinking) is context, the turn itself is the target, so
               the model learns exactly what it sees at inference (Qwen3's template drops earlier turns'
               reasoning and, with thinking off, puts an empty <think></think> in the prompt)
5. train       `qwenlab train recipes/default.toml` (3 short pretraining stages, then two SFT stages, the
               second with the copying corpus of scripts/make_copy_corpus.py mixed in)
6. export      the final stage in bfloat16 plus the tokenizer files -> qwenlab/assets/default
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
ASSET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def turn_examples(tokenizer, record: dict):
    """(ids, mask) per assistant turn: everything before the turn is context, the turn is the target."""
    import numpy as np

    messages, tools = record["messages"], record.get("tools")
    think = record.get("enable_thinking", True)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True,
                                               enable_thinking=think)
        full = tokenizer.apply_chat_template(messages[:i + 1], tools=tools, add_generation_prompt=False,
                                             enable_thinking=think)
        if not full.startswith(prompt):
            raise RuntimeError(f"template not prefix-stable at turn {i}: {record}")
        end = full.index("<|im_end|>", len(prompt)) + len("<|im_end|>")
        encoding = tokenizer.backend.encode(full[:end], add_special_tokens=False)
        starts = np.array([a for a, _ in encoding.offsets], dtype=np.int64)
        yield (np.asarray(encoding.ids, dtype=np.uint32),
               (starts >= len(prompt)).astype(np.uint8))


def prepare_sft(jsonl: Path, tokenizer_dir: Path, out: Path) -> None:
    """A prepared chat data directory (the layout `qwenlab data prepare` writes) from synthetic records."""
    from qwenlab.tokenizer import Tokenizer
    from qwenlab.train.data import DEFAULT_SHARD_TOKENS, META_FILE, ShardWriter

    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, DEFAULT_SHARD_TOKENS)
    with open(jsonl, encoding="utf-8") as handle:
        for line in handle:
            for ids, mask in turn_examples(tokenizer, json.loads(line)):
                writer.add(ids, mask)
    writer.flush()
    eos = tokenizer.token_to_id("<|endoftext|>")
    meta = {"format": "chat", "tokenizer": str(tokenizer_dir), "vocab_size": len(tokenizer), "eos_id": eos,
            "num_tokens": writer.total_tokens, "num_docs": writer.total_docs, "shards": writer.shards,
            "input_bytes": jsonl.stat().st_size}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{jsonl} -> {out}: {writer.total_docs} examples, {writer.total_tokens:,} tokens", file=sys.stderr)


def export(stage_dir: Path, tokenizer_dir: Path, target: Path) -> None:
    """Copy the final stage's HF checkpoint (already bfloat16) and the tokenizer files (generation_config.json
    included: the tokenizer's eos ids) into the package."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        source = tokenizer_dir / name if (tokenizer_dir / name).is_file() else stage_dir / name
        shutil.copy2(source, target / name)
    # The preset's special-token ids are Qwen's (151643...); point them at this tokenizer's.
    generation = json.loads((tokenizer_dir / "generation_config.json").read_text())
    config = json.loads((target / "config.json").read_text())
    config.update(bos_token_id=generation["bos_token_id"], eos_token_id=generation["eos_token_id"][0],
                  pad_token_id=generation["pad_token_id"])
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"exported {stage_dir} -> {target}", file=sys.stderr)


def export_checkpoint(model_dir: Path, tokenizer_dir: Path, target: Path) -> None:
    """An intermediate run checkpoint (RUN/checkpoints/step-N/model, float32) as a bfloat16 package asset."""
    import tempfile

    from qwenlab.checkpoint import load_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(load_model(model_dir, dtype="float32"), tmp, dtype="bfloat16")
        export(Path(tmp), tokenizer_dir, target)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="build/default", help="working directory for data and the tokenizer")
    p.add_argument("--recipe", default="recipes/default.toml")
    p.add_argument("--run", default="runs/default", help="training run directory (the recipe's run.out)")
    p.add_argument("--records", type=int, default=60000, help="synthetic SFT conversations")
    p.add_argument("--out", default="qwenlab/assets/default")
    p.add_argument("--force", action="store_true", help="redo every step")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    p.add_argument("--set", action="append", default=[], help="recipe override passed to qwenlab train")
    p.add_argument("--from-checkpoint", default=None,
                   help="only export this run checkpoint's model/ directory (an intermediate model)")
    args = p.parse_args(argv)
    work = ROOT / args.work
    if args.from_checkpoint:
        export_checkpoint(Path(args.from_checkpoint), work / "tokenizer", ROOT / args.out)
        return 0
    python = sys.executable
    if args.force:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ROOT / args.run, ignore_errors=True)
    corpora, sft, tok = work / "corpora", work / "sft", work / "tokenizer"
    if not (corpora / "long-heldout.jsonl").is_file():
        run([python, "scripts/default_corpora.py", "--out", str(corpora)])
    if not (sft / "heldout.jsonl").is_file():
        run([python, "scripts/make_synthetic_sft.py", "--records", str(args.records), "--seed", "0",
             "--out", str(sft / "train.jsonl")])
        run([python, "scripts/make_synthetic_sft.py", "--records", "600", "--seed", "1",
             "--out", str(sft / "heldout.jsonl")])
    if not (sft / "places-heldout.jsonl").is_file():  # the later stages' add/sub reasoning (see the recipe)
        run([python, "scripts/make_synthetic_sft.py", "--records", str(args.records), "--seed", "2",
             "--style", "places", "--out", str(sft / "places-train.jsonl")])
        run([python, "scripts/make_synthetic_sft.py", "--records", "600", "--seed", "3", "--style", "places",
             "--out", str(sft / "places-heldout.jsonl")])
    if not (sft / "tools-train.jsonl").is_file():  # tool calls are the weakest skill: a tool-heavy set
        run([python, "scripts/make_synthetic_sft.py", "--records", "20000", "--seed", "4", "--style", "places",
             "--tool-fraction", "0.9", "--out", str(sft / "tools-train.jsonl")])
    if not (tok / "generation_config.json").is_file():
        run([python, "scripts/train_tokenizer.py", "--corpora", str(corpora), "--sft", str(sft / "train.jsonl"),
             "--vocab-size", "8192", "--out", str(tok)])
    if not (corpora / "copy-train.jsonl").is_file():
        run([python, "scripts/make_copy_corpus.py", "--docs", "20000", "--out", str(corpora / "copy-train.jsonl")])
    if not (corpora / "symbols-train.jsonl").is_file():  # random ticker-like symbols to copy (stage 11)
        run([python, "scripts/make_copy_corpus.py", "--style", "symbols", "--seed", "1", "--docs", "20000",
             "--out", str(corpora / "symbols-train.jsonl")])
    for corpus in ("prose-train", "code-train", "copy-train", "symbols-train"):
        if not (work / "prepared" / corpus / "meta.json").is_file():
            run([str(Path(python).with_name("qwenlab")), "data", "prepare", str(corpora / f"{corpus}.jsonl"),
                 "--out", str(work / "prepared" / corpus), "--tokenizer", str(tok), "--format", "jsonl"])
    for split in ("train", "heldout", "places-train", "places-heldout", "tools-train"):
        if not (sft / f"prepared-{split}" / "meta.json").is_file():
            prepare_sft(sft / f"{split}.jsonl", tok, sft / f"prepared-{split}")
    final = sorted((ROOT / args.run / "stages").glob("*-sft*"))
    if len(final) < 2 or args.resume:
        cmd = [str(Path(python).with_name("qwenlab")), "train", args.recipe]
        cmd += (["--resume"] if args.resume else []) + [f"--set={s}" for s in args.set]
        run(cmd)
        final = sorted((ROOT / args.run / "stages").glob("*-sft*"))
    export(final[-1], tok, ROOT / args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
