"""`qwenlab demo`: the README's first command. Runs qwenlab's main job with nothing to download.

Until the embedded default model ships, it creates a small random Qwen3 checkpoint on the spot (in
~/.cache/qwenlab/demo-qwen3 or --dir), loads it, shows its deployment plan and runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import register

DEMO_OVERRIDES = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=4096)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=str(Path.home() / ".cache" / "qwenlab" / "demo-qwen3"),
                   help="where the demo checkpoint is created (reused if present)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import init_checkpoint, load_model
    from ..config import preset
    from ..plan import format_plan, make_plan

    directory = Path(args.dir)
    if not (directory / "config.json").is_file():
        print(f"creating a random Qwen3-architecture checkpoint in {directory} ...")
        init_checkpoint(preset("qwen3-0.6b", **DEMO_OVERRIDES), directory, seed=0, dtype="bfloat16")
    model = load_model(directory, dtype=torch.float32)
    print(format_plan(make_plan(model.config, context=4096, name=str(directory))))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        for _ in range(8):  # a few greedy steps, full forward each time
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    print(f"greedy continuation of [1, 2, 3, 4, 5]: {ids[0, 5:].tolist()}")
    return 0


register("demo", "run qwenlab end to end on a model it creates on the spot (no download)", add_arguments, run)
