"""``qwenlab train``, ``qwenlab data prepare``, ``qwenlab lora merge``, ``qwenlab eval perplexity``, ``qwenlab plot``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli import register


# ---- train ---------------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML (see recipes/ and docs/training.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. optim.lr=1e-3, stages.0.steps=20, stages.*.seq_len=128")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="stop after this many optimizer steps in total (a later --resume continues)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_run(args: argparse.Namespace) -> int:
    from ..train.distributed import world_size_from_env
    from ..train.recipes import load_recipe
    from ..train.trainer import train

    overrides = list(args.set) + (["run.progress=false"] if args.no_progress else [])
    config = load_recipe(args.recipe, overrides, world_size=world_size_from_env())
    summary = train(config, resume=args.resume, stop_after=args.stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        _report(summary)
    if world_size_from_env() > 1:
        # A torchrun rank leaves without Python's finalization: FSDP2's device mesh keeps the gloo process group
        # alive past destroy_process_group, and a gloo worker thread that touches a tensor while the interpreter
        # is being torn down cannot take the GIL and aborts the process ("terminate called without an active
        # exception", SIGABRT, seen in CI after a run had finished and written everything). Checkpoints are
        # already fsynced and renamed; only the standard streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _report(summary: dict) -> None:
    for stage in summary["stages"]:
        extra = f", held-out loss {stage['eval_loss']:.4f}" if stage.get("eval_loss") is not None else ""
        final = stage.get("final_loss")
        state = " (stopped; continue with --resume)" if stage.get("stopped") else ""
        print(f"stage {stage['name']}: last loss {final:.4f}{extra}{state}" if final is not None else
              f"stage {stage['name']}: no steps run")
    if summary.get("plot"):
        print(f"loss curves: {summary['plot']}")


register("train", "train a model: pretraining stages, long-context extension, SFT, LoRA (torchrun for FSDP2)",
         _train_args, _train_run)


# ---- data prepare -------------------------------------------------------------------------------------------
def _data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text / JSONL / chat JSONL into uint32 shards")
    prep.add_argument("inputs", nargs="+", help="files, directories or globs (.txt = one document per file, "
                                                ".jsonl with a text field, or chat .jsonl with messages)")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--tokenizer", required=True, help="checkpoint directory with tokenizer.json, or 'byte'")
    prep.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "chat"])
    prep.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    prep.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPUs, at most 8)")
    prep.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 64M)")
    prep.add_argument("--no-thinking-loss", action="store_true",
                      help="chat: the <think> block is context only (no loss on it)")
    prep.add_argument("--enable-thinking", choices=["true", "false"], default=None,
                      help="chat: enable_thinking passed to the template")
    prep.add_argument("--no-progress", action="store_true")


def _data_run(args: argparse.Namespace) -> int:
    from ..train.data import DEFAULT_SHARD_TOKENS, ChatOptions, describe, prepare

    enable = None if args.enable_thinking is None else args.enable_thinking == "true"
    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, fmt=args.format, workers=args.workers,
                   shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, text_field=args.text_field,
                   chat=ChatOptions(train_on_thinking=not args.no_thinking_loss, enable_thinking=enable),
                   progress=not args.no_progress)
    print(f"{args.out}: {describe(meta)}")
    return 0


register("data", "training data: `qwenlab data prepare` tokenizes corpora into shards", _data_args, _data_run)


# ---- lora merge ---------------------------------------------------------------------------------------------
def _lora_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", required=True)
    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base: a full HF checkpoint")
    merge.add_argument("--model", required=True, help="base checkpoint directory")
    merge.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + safetensors)")
    merge.add_argument("--out", required=True, help="directory for the merged checkpoint")
    merge.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the base's)")


def _lora_run(args: argparse.Namespace) -> int:
    from ..train.lora import merge_to_checkpoint

    out = merge_to_checkpoint(args.model, args.adapter, args.out, dtype=args.dtype)
    print(f"merged {args.adapter} into {args.model}: {out}")
    return 0


register("lora", "LoRA adapters: `qwenlab lora merge`", _lora_args, _lora_run)


# ---- eval perplexity -----------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True)
    ppl = sub.add_parser("perplexity", help="held-out perplexity of a checkpoint on a text / JSONL / prepared set")
    ppl.add_argument("--model", required=True, help="checkpoint directory")
    ppl.add_argument("--data", required=True, help="prepared directory, or raw .txt / .jsonl (tokenized on the fly)")
    ppl.add_argument("--adapter", default=None, help="LoRA adapter to apply first")
    ppl.add_argument("--seq-len", type=int, default=1024)
    ppl.add_argument("--batch", type=int, default=4, help="rows per forward")
    ppl.add_argument("--max-rows", type=int, default=None, help="stop after this many rows")
    ppl.add_argument("--dtype", default="float32")
    ppl.add_argument("--quantization", default=None, choices=["int8", "int4"], help="quantize weights on load")
    ppl.add_argument("--json", action="store_true")


def _eval_run(args: argparse.Namespace) -> int:
    from ..train.evaluate import perplexity

    result = perplexity(args.model, args.data, seq_len=args.seq_len, batch=args.batch, max_rows=args.max_rows,
                        dtype=args.dtype, adapter=args.adapter, quantization=args.quantization)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f} nats/token over "
              f"{result['tokens']:,} tokens)")
    return 0


register("eval", "evaluate a checkpoint: `qwenlab eval perplexity`", _eval_args, _eval_run)


# ---- plot ---------------------------------------------------------------------------------------------------
def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="training run directory (holds log.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")


def _plot_run(args: argparse.Namespace) -> int:
    from ..train.plot import plot_run

    print(plot_run(args.run_dir, args.out), file=sys.stdout)
    return 0


register("plot", "plot the loss curves of a training run to PNG", _plot_args, _plot_run)
