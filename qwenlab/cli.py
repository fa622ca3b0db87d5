"""The ``qwenlab`` command.

Each subcommand is a ``(name, add_arguments, run)`` triple registered in ``COMMANDS``; ``run(args)``
returns an exit code. A ``QwenlabError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .errors import QwenlabError

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = []


def register(name: str, help: str, add_arguments, run) -> None:
    """Add a subcommand; modules in ``qwenlab/commands/`` call this at import."""
    COMMANDS.append((name, help, add_arguments, run))


def _dtype_arg(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--dtype", default=default, help="float32, bfloat16 or float16")


# ---- init ---------------------------------------------------------------------------------------
def _init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="official size, e.g. qwen3-0.6b (see `qwenlab plan --list`)")
    p.add_argument("--out", required=True, help="directory to write the checkpoint to")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--seed", type=int, default=0)
    _dtype_arg(p, "bfloat16")
    p.add_argument("--max-shard-size", default="2GB", help="shard above this size (e.g. 500MB, 2GB)")


def _init_run(args: argparse.Namespace) -> int:
    from .checkpoint import init_checkpoint
    from .config import parse_override, preset

    overrides = dict(parse_override(s) for s in args.set)
    config = preset(args.preset, **overrides)
    path = init_checkpoint(config, args.out, seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size)
    counts = config.param_counts()
    print(f"wrote {config.model_type} checkpoint ({counts['total'] / 1e6:.2f}M parameters, {args.dtype}) to {path}")
    return 0


COMMANDS.append(("init", "write a random-initialised checkpoint in Hugging Face layout", _init_args, _init_run))


# ---- plan ---------------------------------------------------------------------------------------
def _plan_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="official size, e.g. qwen3-30b-a3b")
    src.add_argument("--model", help="checkpoint directory")
    src.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: max_position_embeddings)")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences")
    _dtype_arg(p, "bfloat16")
    p.add_argument("--kv-dtype", default=None, help="KV-cache dtype (default: --dtype)")
    p.add_argument("--memory", default=None, help="memory available, e.g. 80GiB")
    p.add_argument("--json", action="store_true", help="print JSON")


def _plan_run(args: argparse.Namespace) -> int:
    from .config import PRESETS, ModelConfig, preset
    from .plan import format_plan, make_plan

    if args.list:
        for name in PRESETS:
            counts = preset(name).param_counts()
            print(f"{name:20s} {counts['total'] / 1e9:8.3f}B total {counts['active'] / 1e9:8.3f}B active")
        return 0
    if args.preset:
        config, name = preset(args.preset), args.preset
    else:
        from .checkpoint import resolve_model_dir

        directory = resolve_model_dir(args.model)
        config, name = ModelConfig.from_json_file(directory / "config.json"), str(directory)
    plan = make_plan(config, context=args.context, batch=args.batch, dtype=args.dtype,
                     kv_dtype=args.kv_dtype, memory=args.memory, name=name)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


COMMANDS.append(("plan", "parameters, memory, KV cache and FLOPs of a model deployment", _plan_args, _plan_run))


# ---- inspect ------------------------------------------------------------------------------------
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt-ids", default="1,2,3", help="comma-separated token ids to run a forward on")


def _inspect_run(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model

    model = load_model(args.model, dtype=torch.float32)
    ids = torch.tensor([[int(x) for x in args.prompt_ids.split(",")]])
    with torch.inference_mode():
        logits = model(ids)
    counts = model.config.param_counts()
    print(f"{model.config.model_type}: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"{counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active)")
    print(f"forward on {ids.tolist()[0]}: logits {tuple(logits.shape)}, argmax per position "
          f"{logits.argmax(-1).tolist()[0]}")
    return 0


COMMANDS.append(("inspect", "load a checkpoint, print its shape and run one forward", _inspect_args, _inspect_run))

# Further subcommands (tokenize, generate, chat, serve, train, ...) live in qwenlab/commands/, one module
# per group, each calling register(...) at import.


def _load_command_modules() -> None:
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlab", description="Qwen models: load, run, serve, train, scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help, add_args, _run in COMMANDS:
        add_args(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    _load_command_modules()

    parser = build_parser()
    args = parser.parse_args(argv)
    runner = next(run for name, _h, _a, run in COMMANDS if name == args.command)
    try:
        return runner(args)
    except QwenlabError as exc:
        print(f"qwenlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

