"""``qwenlab tokenize``: show the ids, the tokens and the rendered chat prompt of a checkpoint's tokenizer.

    qwenlab tokenize --model DIR "some text"
    qwenlab tokenize --model DIR --chat messages.json [--tools tools.json] [--no-thinking] [--json]

``messages.json`` holds a list of messages, or an OpenAI request body with "messages" (and "tools").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import register
from ..errors import RequestError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (tokenizer.json, tokenizer_config.json)")
    parser.add_argument("text", nargs="?", help="text to tokenize")
    parser.add_argument("--chat", metavar="MESSAGES_JSON", help="render and tokenize a conversation instead")
    parser.add_argument("--tools", metavar="TOOLS_JSON", help="tool schemas for --chat (a JSON list)")
    parser.add_argument("--no-thinking", action="store_true", help="render with enable_thinking=False (Qwen3)")
    parser.add_argument("--no-generation-prompt", action="store_true", help="do not open the assistant turn")
    parser.add_argument("--json", action="store_true", help="print JSON: prompt, ids, tokens")


def run(args: argparse.Namespace) -> int:
    from ..tokenizer import Tokenizer

    if (args.text is None) == (args.chat is None):
        raise RequestError("give either a text or --chat MESSAGES_JSON")
    if args.tools and not args.chat:
        raise RequestError("--tools needs --chat")
    tokenizer = Tokenizer.from_pretrained(args.model)
    prompt = args.text if args.chat is None else _render(tokenizer, args)
    ids = tokenizer.encode(prompt)
    if args.json:
        print(json.dumps({"prompt": prompt, "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)},
                         ensure_ascii=False))
    else:
        print(_report(tokenizer, prompt, ids, chat=args.chat is not None))
    return 0


def _render(tokenizer, args: argparse.Namespace) -> str:
    messages = _load_json(args.chat, "messages")
    tools = None
    if isinstance(messages, dict):  # an OpenAI request body
        tools = messages.get("tools")
        messages = messages.get("messages")
    if args.tools:
        tools = _load_json(args.tools, "tools")
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=not args.no_generation_prompt,
                                         enable_thinking=False if args.no_thinking else None)


def _load_json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RequestError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise RequestError(f"{what} file {path} is not JSON: {exc}") from exc


def _report(tokenizer, prompt: str, ids: list[int], chat: bool) -> str:
    lines = []
    if chat:
        lines += [f"template: {tokenizer.template_source}", "prompt:", prompt, ""]
    lines.append(f"{len(ids)} tokens, {len(prompt.encode('utf-8'))} bytes")
    lines.append(f"{'id':>8}  {'token':<24} text")
    for token_id in ids:
        token = tokenizer.id_to_token(token_id)
        mark = " *" if tokenizer.is_special(token_id) else (" +" if token_id in tokenizer.added_ids else "")
        text = tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")
        lines.append(f"{token_id:>8}  {token:<24} {text!r}{mark}")
    lines.append("(* special token, + added token that skip_special_tokens keeps)")
    lines.append(f"ids: {ids}")
    return "\n".join(lines)


register("tokenize", "show the token ids, tokens and chat prompt of a checkpoint's tokenizer", add_arguments, run)
