"""Training data: tokenized shards on disk, document-aware packing, weighted mixing, SFT loss masks.

On disk (``qwenlab data prepare``) a data set is a directory::

    meta.json             format, tokenizer, eos id, totals, shard names
    tokens-00000.npy      uint32 [tokens]    documents back to back (each ends with the eos token)
    docs-00000.npy        int64  [docs + 1]  document boundaries into tokens-00000.npy
    mask-00000.npy        uint8  [tokens]    chat data only: 1 where the token is a training target

Shards are plain ``.npy`` files read as memory maps, so a corpus larger than memory costs nothing to open.

Training reads rows of ``seq_len`` tokens. Documents are packed back to back; every row carries the
document id of each token, positions restart at 0 in every document, and :class:`DocumentAttention`
masks attention so no token sees another document. A label is the next token *of the same document*
(the last token of a document predicts nothing). Pretraining splits a document that does not fit and
continues it in the next row; SFT never splits a conversation (it starts a new row and pads, and
truncates a conversation longer than a row).

Order is a pure function of (seed, row index, loader state): each row draws its source by weight from
an RNG seeded with (seed, row), and each source walks its documents in a permutation seeded with
(seed, source, epoch). :meth:`PackedLoader.state_dict` is a few integers, so resuming is exact.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TrainingError

IGNORE_INDEX = -100
META_FILE = "meta.json"
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens = 256 MB per shard
CHUNK_DOCS = 256  # documents per unit of parallel work


# ---- tokenizers -----------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus Qwen's three chat/document specials: for toy models and tests."""

    name = "byte"
    specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    vocab_size = 259
    eos_id = 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class CheckpointTokenizer:
    """The checkpoint's own tokenizer (``qwenlab.tokenizer.Tokenizer``); documents end with <|endoftext|>."""

    def __init__(self, directory: str | Path):
        from ..tokenizer import Tokenizer

        self.name = str(Path(directory).resolve())
        self.tokenizer = Tokenizer.from_pretrained(directory)
        self.vocab_size = self.tokenizer.vocab_size
        eos = self.tokenizer.token_to_id("<|endoftext|>")
        self.eos_id = eos if eos is not None else self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise TrainingError(f"{directory}: tokenizer has no <|endoftext|> or eos token to end documents with")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))


def load_tokenizer(spec: str | Path):
    """``"byte"`` or a checkpoint directory holding tokenizer.json."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not (path / "tokenizer.json").is_file():
        raise TrainingError(f"tokenizer {str(spec)!r}: expected 'byte' or a directory containing tokenizer.json")
    return CheckpointTokenizer(path)


# ---- SFT: assistant-only loss masks through the chat template -------------------------------------
@dataclass
class ChatOptions:
    train_on_thinking: bool = True  # False: the <think>...</think> block is context, not a target
    enable_thinking: bool | None = None  # passed to the template (Qwen3); None: the template's default
    end_of_turn: str = "<|im_end|>"


def chat_example(tokenizer: CheckpointTokenizer, record: dict, options: ChatOptions) -> tuple[list[int], list[int]]:
    """(token ids, target mask) of one conversation rendered with the checkpoint's chat template.

    Where each assistant turn starts is found by rendering the conversation up to it with the generation
    prompt (a prefix of the full rendering); it ends after the next end-of-turn token. Targets are the
    tokens whose first character lies inside those spans, so the end-of-turn token is learned too.
    """
    tok = tokenizer.tokenizer
    messages, tools = record["messages"], record.get("tools")
    kwargs = dict(tools=tools, enable_thinking=options.enable_thinking)
    text = tok.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], add_generation_prompt=True, **kwargs) if i else ""
        if not text.startswith(prefix):
            raise TrainingError(f"chat template is not prefix-stable at message {i}: cannot locate the assistant "
                                "turn (render of the earlier messages is not a prefix of the conversation)")
        start = len(prefix)
        end = text.find(options.end_of_turn, start)
        end = len(text) if end < 0 else end + len(options.end_of_turn)
        if not options.train_on_thinking:
            start = _skip_thinking(text, start, end)
        spans.append((start, end))
    encoding = tok.backend.encode(text, add_special_tokens=False)
    starts = np.array([a for a, _ in encoding.offsets], dtype=np.int64)
    mask = np.zeros(len(starts), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    return list(encoding.ids), mask.tolist()


def _skip_thinking(text: str, start: int, end: int) -> int:
    body = text[start:end]
    stripped = body.lstrip()
    if not stripped.startswith("<think>"):
        return start
    close = body.find("</think>")
    if close < 0:
        return end
    cursor = close + len("</think>")
    while cursor < len(body) and body[cursor] in "\n ":
        cursor += 1
    return start + cursor


# ---- reading raw inputs -------------------------------------------------------------------------------
def iter_documents(paths: list[Path], fmt: str, text_field: str = "text") -> Iterator[str | dict]:
    """Documents of text files (one per file), JSONL (``text_field``) or chat JSONL (records with ``messages``)."""
    for path in paths:
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "text":
            yield path.read_text(encoding="utf-8")
            continue
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainingError(f"{path}:{number}: not valid JSON ({exc})") from None
                if kind == "chat":
                    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                        raise TrainingError(f"{path}:{number}: chat records need a 'messages' list")
                    yield record
                else:
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise TrainingError(f"{path}:{number}: record has no string field {text_field!r}")
                    yield record[text_field]


def detect_format(path: Path) -> str:
    if path.suffix not in (".jsonl", ".json"):
        return "text"
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise TrainingError(f"{path}: first record is not valid JSON") from None
                return "chat" if isinstance(record, dict) and "messages" in record else "jsonl"
    return "jsonl"


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files, directories (their *.txt, *.md, *.jsonl, *.json, sorted) and glob patterns."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix in (".txt", ".md", ".jsonl", ".json"))
        elif item.is_file():
            paths.append(item)
        else:
            matches = sorted(Path().glob(str(item))) if any(c in str(item) for c in "*?[") else []
            if not matches:
                raise TrainingError(f"{item}: no such file or directory")
            paths += matches
    return paths


# ---- synthetic corpora (toy recipes, tests, benchmarks) -----------------------------------------------
_WORDS = ("the a one some every model token layer expert data stage long short small large river tree stone "
          "light night sea bird cat dog runs reads learns finds sees keeps moves sings writes builds quickly "
          "slowly under over near far with without and but or because then while red green blue old new").split()


def synthetic_documents(kind: str, docs: int, seed: int) -> list[str]:
    """Deterministic toy text: ``words`` (Zipf-ish sentences), ``arithmetic``, ``code``, ``long`` (recall)."""
    rng = random.Random(f"{kind}-{seed}")
    weights = [1.0 / (i + 1) for i in range(len(_WORDS))]
    out = []
    for _ in range(docs):
        if kind == "words":
            sentences = [" ".join(rng.choices(_WORDS, weights, k=rng.randint(4, 10))).capitalize() + "."
                         for _ in range(rng.randint(1, 4))]
            out.append(" ".join(sentences))
        elif kind == "arithmetic":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            op = rng.choice("+-*")
            out.append(f"{a}{op}{b}={eval(f'{a}{op}{b}')}")
        elif kind == "code":
            name, arg = rng.choice(("add", "mul", "sub")), rng.choice("xyz")
            k = rng.randint(1, 9)
            body = {"add": f"{arg} + {k}", "mul": f"{arg} * {k}", "sub": f"{arg} - {k}"}[name]
            out.append(f"def {name}_{k}({arg}):\n    return {body}\n")
        elif kind == "long":
            pairs = {f"k{rng.randint(0, 999)}": rng.randint(0, 999) for _ in range(rng.randint(8, 24))}
            filler = " ".join(rng.choices(_WORDS, weights, k=rng.randint(20, 80)))
            key = rng.choice(list(pairs))
            out.append(" ".join(f"{k}={v};" for k, v in pairs.items()) + f" {filler}. {key}? {pairs[key]}")
        else:
            raise TrainingError(f"unknown synthetic corpus {kind!r}; use words, arithmetic, code or long")
    return out


def parse_synthetic(spec: str) -> tuple[str, int, int]:
    """'synthetic:words?docs=2000&seed=1' -> ('words', 2000, 1)."""
    body = spec.split(":", 1)[1]
    kind, _, query = body.partition("?")
    params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    unknown = set(params) - {"docs", "seed"}
    if unknown:
        raise TrainingError(f"{spec}: unknown parameter(s) {sorted(unknown)}; use docs= and seed=")
    return kind, int(params.get("docs", 1000)), int(params.get("seed", 0))


# ---- prepare: tokenize in parallel, write shards ------------------------------------------------------
_worker: dict = {}


def _init_worker(tokenizer_spec: str, chat: ChatOptions, append_eos: bool) -> None:
    _worker.update(tokenizer=load_tokenizer(tokenizer_spec), chat=chat, append_eos=append_eos)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _encode_chunk(docs: list) -> list[tuple[np.ndarray, np.ndarray | None]]:
    tokenizer, append_eos = _worker["tokenizer"], _worker["append_eos"]
    out = []
    if docs and isinstance(docs[0], dict):
        if not isinstance(tokenizer, CheckpointTokenizer):
            raise TrainingError("chat data needs a checkpoint tokenizer with a chat template, not 'byte'")
        for record in docs:
            ids, mask = chat_example(tokenizer, record, _worker["chat"])
            out.append((np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8)))
        return out
    for ids in tokenizer.encode_batch(docs):
        if append_eos:
            ids = ids + [tokenizer.eos_id]
        out.append((np.asarray(ids, dtype=np.uint32), None))
    return out


class ShardWriter:
    def __init__(self, out: Path, shard_tokens: int):
        self.out, self.shard_tokens = out, shard_tokens
        self.tokens: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.pending = 0
        self.shards: list[dict] = []
        self.total_tokens = self.total_docs = 0
        self.has_mask: bool | None = None

    def add(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        if not len(tokens):
            return
        if self.has_mask is None:
            self.has_mask = mask is not None
        elif self.has_mask != (mask is not None):
            raise TrainingError("cannot mix chat records and plain text in one data set")
        self.tokens.append(tokens)
        if mask is not None:
            self.masks.append(mask)
        self.pending += len(tokens)
        if self.pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.tokens:
            return
        index = len(self.shards)
        lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        names = {"tokens": f"tokens-{index:05d}.npy", "docs": f"docs-{index:05d}.npy"}
        np.save(self.out / names["tokens"], np.concatenate(self.tokens))
        np.save(self.out / names["docs"], bounds)
        if self.masks:
            names["mask"] = f"mask-{index:05d}.npy"
            np.save(self.out / names["mask"], np.concatenate(self.masks))
        max_id = max(int(t.max()) for t in self.tokens)
        self.shards.append({**names, "num_tokens": int(bounds[-1]), "num_docs": len(lengths), "max_token_id": max_id})
        self.total_tokens += int(bounds[-1])
        self.total_docs += len(lengths)
        self.tokens, self.masks, self.pending = [], [], 0


def prepare(inputs: list[str | Path], out: str | Path, tokenizer: str = "byte", fmt: str = "auto",
            workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text",
            chat: ChatOptions | None = None, append_eos: bool = True, progress: bool = True,
            documents: Iterable | None = None) -> dict:
    """Tokenize ``inputs`` (or an iterable of ``documents``) into shards under ``out``; returns meta.json.

    Documents are tokenized by ``workers`` processes in chunks and written in input order, so the result
    does not depend on the number of workers. The directory is written under a temporary name and renamed.
    """
    from tqdm import tqdm

    out = Path(out)
    chat = chat or ChatOptions()
    if fmt not in ("auto", "text", "jsonl", "chat"):
        raise TrainingError(f"format must be auto, text, jsonl or chat, got {fmt!r}")
    tok = load_tokenizer(tokenizer)  # validate early, in this process
    if documents is None:
        paths = expand_inputs(inputs)
        if not paths:
            raise TrainingError("no input files")
        documents = iter_documents(paths, fmt, text_field)
        total_bytes = sum(p.stat().st_size for p in paths)
    else:
        total_bytes = None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardWriter(tmp, shard_tokens)
    workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    bar = tqdm(desc=f"tokenizing -> {out.name}", unit=" docs", disable=not progress, file=sys.stderr)
    chunks = _chunks(documents, CHUNK_DOCS)
    try:
        if workers == 1:
            _init_worker(str(tokenizer), chat, append_eos)
            results = map(_encode_chunk, chunks)
            pool = None
        else:
            pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
                workers, initializer=_init_worker, initargs=(str(tokenizer), chat, append_eos))
            results = pool.imap(_encode_chunk, chunks, chunksize=1)
        for chunk in results:
            for tokens, mask in chunk:
                writer.add(tokens, mask)
            bar.update(len(chunk))
            bar.set_postfix(tokens=f"{writer.total_tokens + writer.pending:,}")
        writer.flush()
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if workers > 1 and pool is not None:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if not writer.shards:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError("no documents found in the inputs")
    meta = {"format": "chat" if writer.has_mask else "text", "tokenizer": getattr(tok, "name", str(tokenizer)),
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "num_tokens": writer.total_tokens,
            "num_docs": writer.total_docs, "shards": writer.shards, "input_bytes": total_bytes}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return meta


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ensure_prepared(spec: str, cache_dir: Path, tokenizer: str | None, chat: ChatOptions | None = None,
                    progress: bool = False) -> Path:
    """A prepared directory for ``spec``: itself if it holds meta.json, else a cached tokenization of raw
    files or a ``synthetic:`` corpus under ``cache_dir`` (keyed by the spec, the tokenizer and mtimes)."""
    path = Path(spec)
    if (path / META_FILE).is_file():
        return path
    if tokenizer is None:
        raise TrainingError(f"{spec}: not a prepared data directory, and there is no tokenizer to prepare it with "
                            "(set [model] tokenizer, or run `qwenlab data prepare` first)")
    if spec.startswith("synthetic:"):
        key_parts = [spec, tokenizer]
        documents = synthetic_documents(*parse_synthetic(spec))
        inputs: list = []
    else:
        inputs = expand_inputs([spec])
        key_parts = [spec, tokenizer] + [f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in inputs]
        documents = None
    if chat is not None:
        key_parts.append(repr(chat))
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
    target = cache_dir / f"{Path(spec.split('?')[0].replace(':', '-')).name}-{key}"
    if (target / META_FILE).is_file():
        return target
    prepare(inputs, target, tokenizer=tokenizer, workers=1 if documents is not None else None, chat=chat,
            progress=progress, documents=documents)
    return target


# ---- reading shards -------------------------------------------------------------------------------------
class TokenDataset:
    """A prepared directory, memory-mapped: document ``i`` is ``tokens(i)`` (and ``mask(i)`` for chat data)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise TrainingError(f"{self.path}: not a prepared data directory (no {META_FILE}); "
                                "run `qwenlab data prepare` first")
        self.meta = json.loads(meta_file.read_text())
        self._tokens, self._masks, starts, ends, shard_ids = [], [], [], [], []
        for index, shard in enumerate(self.meta["shards"]):
            self._tokens.append(np.load(self.path / shard["tokens"], mmap_mode="r"))
            self._masks.append(np.load(self.path / shard["mask"], mmap_mode="r") if "mask" in shard else None)
            bounds = np.load(self.path / shard["docs"])
            starts.append(bounds[:-1])
            ends.append(bounds[1:])
            shard_ids.append(np.full(len(bounds) - 1, index, dtype=np.int32))
        self.starts, self.ends = np.concatenate(starts), np.concatenate(ends)
        self.shard_of = np.concatenate(shard_ids)
        self.num_docs = len(self.starts)
        self.has_mask = self._masks[0] is not None

    def __len__(self) -> int:
        return self.num_docs

    def length(self, doc: int) -> int:
        return int(self.ends[doc] - self.starts[doc])

    def tokens(self, doc: int) -> np.ndarray:
        return self._tokens[self.shard_of[doc]][self.starts[doc]:self.ends[doc]]

    def mask(self, doc: int) -> np.ndarray | None:
        masks = self._masks[self.shard_of[doc]]
        return None if masks is None else masks[self.starts[doc]:self.ends[doc]]

    def max_token(self) -> int:
        """Largest token id (from meta.json when recorded there, else by reading every shard)."""
        recorded = [shard.get("max_token_id") for shard in self.meta["shards"]]
        if all(r is not None for r in recorded):
            return max(recorded)
        return max(int(t.max()) for t in self._tokens if len(t))


# ---- packing ----------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """A batch of packed rows, numpy [n, seq_len] each."""
    input_ids: np.ndarray
    labels: np.ndarray  # IGNORE_INDEX where nothing is predicted
    positions: np.ndarray  # restart at 0 in every document piece
    doc_ids: np.ndarray  # segment id per token inside its row; padding is one segment of its own
    valid: np.ndarray  # bool: a real token (not padding)

    def __len__(self) -> int:
        return len(self.input_ids)

    def slice(self, start: int, stop: int) -> "Rows":
        return Rows(*(a[start:stop] for a in (self.input_ids, self.labels, self.positions, self.doc_ids, self.valid)))

    def to_torch(self, device):
        import torch

        return {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name))).to(device)
                for name in ("input_ids", "labels", "positions", "doc_ids", "valid")}


class PackedLoader:
    """Rows of ``seq_len`` tokens packed from weighted sources, deterministic and resumable."""

    def __init__(self, sources: list[tuple[TokenDataset, float]], seq_len: int, seed: int = 0,
                 split_documents: bool = True, shuffle: bool = True, pad_id: int = 0):
        if not sources:
            raise TrainingError("a stage needs at least one data source")
        weights = np.array([w for _, w in sources], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise TrainingError(f"data weights must be non-negative with a positive sum, got {weights.tolist()}")
        for dataset, _ in sources:
            if dataset.num_docs == 0:
                raise TrainingError(f"{dataset.path}: no documents")
        self.datasets = [d for d, _ in sources]
        self.probs = weights / weights.sum()
        self.seq_len, self.seed = seq_len, seed
        self.split_documents, self.shuffle, self.pad_id = split_documents, shuffle, pad_id
        self.row = 0
        self.streams = [{"epoch": 0, "cursor": 0, "offset": 0} for _ in self.datasets]
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ---- state ----
    def state_dict(self) -> dict:
        return {"row": self.row, "streams": [dict(s) for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise TrainingError("data state does not match this stage's sources")
        self.row = int(state["row"])
        self.streams = [{k: int(v) for k, v in s.items()} for s in state["streams"]]

    # ---- order ----
    def _document(self, source: int) -> int:
        stream, dataset = self.streams[source], self.datasets[source]
        if stream["cursor"] >= dataset.num_docs:
            stream.update(epoch=stream["epoch"] + 1, cursor=0, offset=0)
        if not self.shuffle:
            return stream["cursor"]
        key = (source, stream["epoch"])
        if key not in self._perm_cache:
            if len(self._perm_cache) > 2 * len(self.datasets):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, source, stream["epoch"]])
            self._perm_cache[key] = rng.permutation(dataset.num_docs)
        return int(self._perm_cache[key][stream["cursor"]])

    def _source_for_row(self, row: int) -> int:
        if len(self.datasets) == 1:
            return 0
        return int(np.random.default_rng([self.seed, 1 << 20, row]).choice(len(self.datasets), p=self.probs))

    # ---- rows ----
    def next_rows(self, n: int) -> Rows:
        S = self.seq_len
        out = Rows(np.full((n, S), self.pad_id, np.int64), np.full((n, S), IGNORE_INDEX, np.int64),
                   np.zeros((n, S), np.int64), np.zeros((n, S), np.int64), np.zeros((n, S), bool))
        for r in range(n):
            self._fill_row(out, r, self._source_for_row(self.row))
            self.row += 1
        return out

    def _fill_row(self, out: Rows, r: int, source: int) -> None:
        S, filled, segment = self.seq_len, 0, 0
        dataset, stream = self.datasets[source], self.streams[source]
        while filled < S:
            doc = self._document(source)
            offset, length = stream["offset"], dataset.length(doc)
            remaining = length - offset
            space = S - filled
            if not self.split_documents:
                if remaining > space and filled > 0:
                    break  # start the conversation on a fresh row; the rest of this one is padding
                take = min(remaining, space)  # a conversation longer than a row is truncated
                stream.update(cursor=stream["cursor"] + 1, offset=0)
            elif remaining > space:
                take = space
                stream["offset"] = offset + take
            else:
                take = remaining
                stream.update(cursor=stream["cursor"] + 1, offset=0)
            tokens = dataset.tokens(doc)
            piece = slice(filled, filled + take)
            out.input_ids[r, piece] = tokens[offset:offset + take]
            target_end = min(offset + take + 1, length)
            targets = np.asarray(tokens[offset + 1:target_end], dtype=np.int64)
            mask = dataset.mask(doc)
            if mask is not None:
                targets = np.where(mask[offset + 1:target_end].astype(bool), targets, IGNORE_INDEX)
            out.labels[r, filled:filled + len(targets)] = targets
            out.positions[r, piece] = np.arange(take)
            out.doc_ids[r, piece] = segment
            out.valid[r, piece] = True
            filled += take
            segment += 1
        if filled < S:  # padding: one segment of its own, attends only to itself, predicts nothing
            out.doc_ids[r, filled:] = segment
            out.positions[r, filled:] = np.arange(S - filled)


def open_sources(specs: list[tuple[str, float]], cache_dir: Path, tokenizer: str | None, chat: ChatOptions | None = None,
                 progress: bool = False) -> list[tuple[TokenDataset, float]]:
    return [(TokenDataset(ensure_prepared(spec, cache_dir, tokenizer, chat, progress)), weight)
            for spec, weight in specs]


# ---- attention context for packed rows ------------------------------------------------------------------
class DocumentAttention:
    """Causal attention restricted to each token's own document, for a [B, S] batch of packed rows.

    The model calls ``attend(layer_idx, q, k, v, scale)`` (see ``qwenlab.model.layers``); one boolean mask
    [B, 1, S, S] is built per batch, when first needed, and shared by all layers. Rows holding a single
    document use the plain causal kernel instead.
    """

    def __init__(self, doc_ids):
        self.doc_ids = doc_ids
        self.single_document = bool((doc_ids == doc_ids[..., :1]).all())
        self._mask = None

    @property
    def mask(self):
        """The [B, 1, S, S] mask (None for single-document rows), built on first use: a route that takes
        the documents another way (the CPU kernels' first visible key) never pays for its S^2 bytes."""
        if self._mask is None and not self.single_document:
            import torch

            S = self.doc_ids.shape[-1]
            causal = torch.ones(S, S, dtype=torch.bool, device=self.doc_ids.device).tril()
            self._mask = ((self.doc_ids[:, :, None] == self.doc_ids[:, None, :]) & causal).unsqueeze(1)
        return self._mask

    def attend(self, layer_idx, q, k, v, scale):
        from ..model.layers import sdpa

        if self.single_document:
            return sdpa(q, k, v, scale=scale, is_causal=q.shape[2] > 1)
        return sdpa(q, k, v, scale=scale, attn_mask=self.mask)


def describe(meta: dict) -> str:
    avg = meta["num_tokens"] / max(1, meta["num_docs"])
    return (f"{meta['num_docs']:,} documents, {meta['num_tokens']:,} tokens ({avg:.1f} per document) in "
            f"{len(meta['shards'])} shard(s), {meta['format']} format, tokenizer {meta['tokenizer']}")


__all__ = ["ByteTokenizer", "CheckpointTokenizer", "ChatOptions", "DocumentAttention", "IGNORE_INDEX",
           "PackedLoader", "Rows", "TokenDataset", "chat_example", "describe", "ensure_prepared", "load_tokenizer",
           "open_sources", "prepare", "synthetic_documents"]
