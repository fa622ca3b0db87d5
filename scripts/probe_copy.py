"""Teacher-forced copying probe of a checkpoint: how much of a span it copies from earlier in the context.

Every task of the default model copies from its prompt (the numbers of a sum, list items, tool arguments), so
this is the first thing to check when the answers are wrong. Lines ``<span> | <span>`` (the copying corpus'
form) are fed whole; the score is the share of the second span's tokens that the model predicts exactly.

    .venv/bin/python scripts/probe_copy.py runs/default/stages/06-sft-induction
"""

from __future__ import annotations

import argparse
import random

import torch

WORDS = "apple pear plum fig grape lemon mango peach cherry melon cat dog bird fish horse".split()
SPANS = {
    "words": lambda rng: ", ".join(rng.choice(WORDS) for _ in range(5)),
    "three 3-digit numbers": lambda rng: ", ".join(str(rng.randint(100, 999)) for _ in range(3)),
    "one 3-5-digit number": lambda rng: str(rng.randint(100, 99999)),
    "six spaced digits": lambda rng: " ".join(str(rng.randint(0, 9)) for _ in range(6)),
}


def copied(model, tokenizer, span: str) -> tuple[int, int]:
    prefix = "river, 12 | river, 12\n" + span + " | "
    ids = tokenizer.encode(prefix + span)
    start = len(tokenizer.encode(prefix))
    tokens = torch.tensor(ids)[None]
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1])[None])
    predicted = (logits[0] if logits.dim() == 3 else logits).argmax(-1)
    hits = [int(predicted[i] == ids[i + 1]) for i in range(start - 1, len(ids) - 1)]
    return sum(hits), len(hits)


def main(argv=None) -> int:
    from qwenlab.checkpoint import load_model
    from qwenlab.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="checkpoint directory (with its tokenizer files)")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.model, dtype="float32").eval()
    tokenizer = Tokenizer.from_pretrained(args.model)
    rng = random.Random(args.seed)
    for name, make in SPANS.items():
        hit = total = 0
        for _ in range(args.samples):
            h, n = copied(model, tokenizer, make(rng))
            hit, total = hit + h, total + n
        print(f"{name:24s} {hit / total:6.1%} of {total} tokens copied")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
