"""``qwenlab generate`` (one prompt, streamed) and ``qwenlab chat`` (interactive, multi-turn).

    qwenlab generate --model DIR --prompt "Once upon a time" --max-tokens 64 --temperature 0.7
    qwenlab generate --model DIR --prompt "Why is the sky blue?" --chat --no-think
    qwenlab chat --model DIR            # /think, /no_think, /reset, /exit

Unset sampling flags take the checkpoint's generation_config.json values.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..cli import register

DIM, RESET = "\x1b[2m", "\x1b[0m"


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (or a Hugging Face name when online); "
                   "default: the embedded default model (docs/default-model.md)")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, "
                   "bounded by the KV cache)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache budget, e.g. 2GiB (default: automatic)")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="weight-only quantization applied on load (docs/quantization.md)")


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: generation_config.json)")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--thinking-budget", type=int, default=None, help="close <think> after this many tokens")


def _params(args: argparse.Namespace, default_max_tokens: int | None = None):
    from ..engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens if args.max_tokens is not None else default_max_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop, min_tokens=args.min_tokens,
        ignore_eos=args.ignore_eos, thinking_budget=args.thinking_budget)


def _llm(args: argparse.Namespace):
    from ..assets import default_model_dir
    from ..engine import LLM

    if args.model is None:
        args.model = str(default_model_dir())
    return LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
               kv_cache_memory=args.kv_cache_memory, quantization=args.quantization)


# ---- generate ----------------------------------------------------------------------------------------
def generate_arguments(p: argparse.ArgumentParser) -> None:
    _engine_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids (checkpoints without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="enable_thinking", action="store_const", const=True, default=None)
    think.add_argument("--no-think", dest="enable_thinking", action="store_const", const=False)
    _sampling_arguments(p)


def generate_run(args: argparse.Namespace) -> int:
    from ..errors import RequestError

    if args.prompt_ids is not None:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise RequestError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        prompt = args.prompt
    llm = _llm(args)
    params = _params(args, default_max_tokens=None if args.max_tokens else 256)
    if args.chat:
        if not isinstance(prompt, str):
            raise RequestError("--chat needs --prompt text")
        stream = llm.stream(messages=[{"role": "user", "content": prompt}], params=params,
                            enable_thinking=args.enable_thinking)
    else:
        stream = llm.stream(prompt, params)
    start, tokens, reason, ids_only = time.perf_counter(), 0, None, llm.tokenizer is None
    for delta in stream:
        tokens += len(delta.token_ids)
        if ids_only:
            print(" ".join(map(str, delta.token_ids)), end=" ", flush=True)
        else:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        reason = delta.finish_reason or reason
    elapsed = time.perf_counter() - start
    print()
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / max(elapsed, 1e-9):.1f} tok/s, finish_reason={reason}]",
          file=sys.stderr)
    return 0


# ---- chat ------------------------------------------------------------------------------------------------
def chat_arguments(p: argparse.ArgumentParser) -> None:
    _engine_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-think", action="store_true", help="start with thinking off (/think turns it on)")
    _sampling_arguments(p)


def chat_run(args: argparse.Namespace) -> int:
    from ..errors import QwenlabError

    llm = _llm(args)
    if llm.tokenizer is None:
        from ..errors import RequestError

        raise RequestError("chat needs a checkpoint with a tokenizer (tokenizer.json)")
    session = ChatSession(llm, args)
    tty = sys.stdout.isatty()
    print("qwenlab chat: type a message; /think, /no_think, /reset, /exit", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if session.command(line):
            continue
        try:
            session.turn(line, tty)
        except QwenlabError as exc:
            print(f"error: {exc}", file=sys.stderr)
    return 0


class ChatSession:
    """History, thinking switch and context trimming of ``qwenlab chat``."""

    def __init__(self, llm, args: argparse.Namespace):
        self.llm, self.args = llm, args
        self.enable_thinking = not args.no_think
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict] = []

    def command(self, line: str) -> bool:
        if line == "/think":
            self.enable_thinking = True
        elif line == "/no_think":
            self.enable_thinking = False
        elif line == "/reset":
            self.history = []
        else:
            return False
        print(f"[{line[1:]}]", file=sys.stderr)
        return True

    def turn(self, text: str, tty: bool) -> None:
        max_tokens = self.args.max_tokens or min(2048, self.llm.engine.max_model_len // 2)
        params = _params(self.args, max_tokens)
        messages = self._fit(self.history + [{"role": "user", "content": text}], max_tokens)
        reasoning, content, in_reasoning = [], [], False
        for delta in self.llm.stream(messages=messages, params=params, enable_thinking=self.enable_thinking):
            for piece in delta.parsed:
                if piece.reasoning_content is not None:
                    if not in_reasoning:
                        in_reasoning = True
                        sys.stdout.write(DIM if tty else "[thinking] ")
                    sys.stdout.write(piece.reasoning_content)
                    reasoning.append(piece.reasoning_content)
                elif piece.content is not None or piece.tool_call is not None:
                    if in_reasoning:
                        in_reasoning = False
                        sys.stdout.write(RESET + "\n" if tty else "\n[answer] ")
                    text_piece = piece.content if piece.content is not None else str(piece.tool_call)
                    sys.stdout.write(text_piece)
                    content.append(text_piece)
            sys.stdout.flush()
        if in_reasoning and tty:
            sys.stdout.write(RESET)
        print()
        self.history = messages[len(self.system):] + [
            {"role": "assistant", "content": "".join(content), "reasoning_content": "".join(reasoning)}]

    def _fit(self, turns: list[dict], max_tokens: int) -> list[dict]:
        """Drop the oldest turns until the prompt and the answer fit in the context."""
        from ..errors import RequestError

        tokenizer, limit = self.llm.tokenizer, self.llm.engine.max_model_len
        while True:
            messages = self.system + turns
            length = len(tokenizer.encode_chat(messages, enable_thinking=self.enable_thinking))
            if length + max_tokens <= limit:
                return messages
            if len(turns) <= 1:
                raise RequestError(f"message too long: {length} prompt tokens + {max_tokens} max_tokens exceed the "
                                   f"context ({limit} tokens)")
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            print("[oldest turn dropped to fit the context]", file=sys.stderr)


register("generate", "generate text from a prompt, streamed to the terminal", generate_arguments, generate_run)
register("chat", "interactive multi-turn chat (/think, /no_think, /reset, /exit)", chat_arguments, chat_run)
