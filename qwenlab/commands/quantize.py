"""``qwenlab quantize``: write an int8 / int4 weight-only checkpoint that loads directly (docs/quantization.md)."""

from __future__ import annotations

import argparse

from ..cli import register


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, Hugging Face name, or .gguf file")
    p.add_argument("--out", required=True, help="directory to write the quantized checkpoint to")
    p.add_argument("--method", required=True, choices=["int8", "int4"],
                   help="int8: per output channel; int4: grouped (see --group-size)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size, a multiple of 32 (default 64)")
    p.add_argument("--dtype", default=None, help="activation dtype stored with it (default: the checkpoint's)")


def _quantize_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import load_model
    from ..quant import quantized_bytes, save_quantized

    model = load_model(args.model, dtype=args.dtype, quantization=args.method, group_size=args.group_size)
    source = Path(args.model) if Path(args.model).is_dir() else None
    path = save_quantized(model, args.out, source=source)
    group = f", group size {model.quantization['group_size']}" if args.method == "int4" else ""
    print(f"wrote {args.method}{group} checkpoint ({quantized_bytes(model) / 2**20:.1f} MiB of weights) to {path}")
    return 0


register("quantize", "write an int8 / int4 weight-only quantized checkpoint", _quantize_args, _quantize_run)
