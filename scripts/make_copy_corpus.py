"""A copying corpus for the default model's induction stage (JSONL, one ``text`` per line).

Every skill the synthetic SFT tasks test needs copying from the context: the numbers of a sum into the
column-by-column reasoning, list items into a count, a city or an amount into a tool call's arguments, a
tool result into the answer. Small transformers learn that (induction heads: find the earlier occurrence of
the current token, predict what followed it) abruptly and late on ordinary text; on text where half the
tokens can only be predicted by copying, they learn it early. Each document here is a run of lines
``<random span> | <the same span>`` whose spans mix the vocabulary of the SFT tasks: numbers of 1-6 digits,
words, city names, currency codes, ticker symbols, units and punctuation.

    .venv/bin/python scripts/make_copy_corpus.py --docs 20000 --out build/default/corpora/copy-train.jsonl

``--style symbols`` writes spans of random upper-case symbols (2-5 letters, like the tickers of the tool
tasks) mixed with numbers and words: a symbol the model has never seen splits into unfamiliar BPE pieces,
and copying it piece by piece is the one skill the tool-call failures of stage 10 lacked.

    .venv/bin/python scripts/make_copy_corpus.py --style symbols --seed 1 --docs 20000 \
        --out build/default/corpora/symbols-train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_synthetic_sft as synth  # noqa: E402

UNIT_NAMES = [u for unit in synth.UNITS for u in unit if isinstance(u, str)]
TICKERS = ["".join(chr(65 + (i * 7 + j * 11) % 26) for j in range(2 + i % 3)) for i in range(60)]
SEPARATORS = (" | ", " -> ", "\nAgain: ", " = ")


def item(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return str(rng.randint(0, 10 ** rng.randint(1, 6) - 1))
    pool = rng.choice((synth.ITEMS, synth.CITIES, synth.CURRENCIES, synth.CONDITIONS, UNIT_NAMES, TICKERS))
    return rng.choice(pool)


def symbol(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(2, 5)))


def symbol_item(rng: random.Random) -> str:
    return symbol(rng) if rng.random() < 0.6 else item(rng)


def document(rng: random.Random, lines: int, style: str = "mixed") -> str:
    pick = symbol_item if style == "symbols" else item
    out = []
    for _ in range(lines):
        joiner = rng.choice((", ", " ", " + ", " - ", ", "))
        span = joiner.join(pick(rng) for _ in range(rng.randint(1 if style == "symbols" else 2, 8)))
        out.append(span + rng.choice(SEPARATORS) + span)
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--lines", type=int, default=6, help="copy pairs per document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=("mixed", "symbols"), default="mixed",
                   help="mixed: the SFT tasks' vocabulary; symbols: mostly random upper-case symbols")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rng = random.Random(args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for _ in range(args.docs):
            handle.write(json.dumps({"text": document(rng, args.lines, args.style)}) + "\n")
    print(f"wrote {args.docs} documents to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
