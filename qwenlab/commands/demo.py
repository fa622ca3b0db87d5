"""`qwenlab demo`: the README's first command. Runs qwenlab's main job with nothing to download.

It loads the embedded default model (qwenlab/assets/default, see docs/default-model.md: a small Qwen3 that
qwenlab trained itself) through the engine and plays a short scripted chat: a question with thinking on
(the reasoning is parsed out of <think>), one with thinking off, and a tool call that the demo answers
with a made-up weather tool, fed back for the model's final answer.
"""

from __future__ import annotations

import argparse
import json
import time

from ..cli import register

DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}


def fake_weather(city: str) -> dict:
    """A stand-in weather service: deterministic per city."""
    code = sum(map(ord, city))
    return {"city": city, "temperature_c": code % 30, "condition": ("sunny", "cloudy", "rainy", "windy")[code % 4]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"],
                   help="weight-only quantization applied on load (docs/quantization.md)")


def run(args: argparse.Namespace) -> int:
    from ..assets import default_model_dir
    from ..engine import LLM, SamplingParams

    model = args.model or str(default_model_dir())
    started = time.perf_counter()
    llm = LLM(model, dtype=args.dtype, quantization=args.quantization)
    size = f", {llm.engine.model_config.param_counts()['total'] / 1e6:.1f}M parameters"
    if args.quantization:
        size += f", {args.quantization} weights"
    print(f"{BOLD}qwenlab demo{RESET}: {model}{size}, loaded in {time.perf_counter() - started:.1f}s\n")
    greedy = SamplingParams(temperature=0.0, max_tokens=400)

    def turn(messages, thinking=None, tools=None):
        started = time.perf_counter()
        out = llm.chat(messages, greedy, tools=tools, enable_thinking=thinking)[0].outputs[0]
        took = time.perf_counter() - started
        if out.reasoning_content:
            print(f"{DIM}<think>\n{out.reasoning_content.strip()}\n</think>{RESET}")
        for call in out.tool_calls or []:
            print(f"tool call -> {call.name}({call.arguments})")
        if out.content:
            print(f"assistant: {out.content.strip()}")
        print(f"{DIM}({len(out.token_ids)} tokens in {took:.1f}s){RESET}\n")
        return out

    print(f"{BOLD}1. thinking on{RESET}\nuser: What is 347 + 586?")
    turn([{"role": "user", "content": "What is 347 + 586?"}])

    print(f"{BOLD}2. thinking off (enable_thinking=False){RESET}\nuser: Convert 7 km to m.")
    turn([{"role": "user", "content": "Convert 7 km to m."}], thinking=False)

    print(f"{BOLD}3. tool call{RESET} (tools: get_weather)\nuser: What's the weather in Paris?")
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    out = turn(messages, tools=[WEATHER_TOOL])
    if out.tool_calls:
        messages.append({"role": "assistant", "content": out.content or "", "reasoning_content": out.reasoning_content,
                         "tool_calls": [call.to_openai() for call in out.tool_calls]})
        for call in out.tool_calls:
            try:
                result = fake_weather(json.loads(call.arguments).get("city", "?"))
            except (ValueError, AttributeError):
                result = {"error": "bad arguments"}
            print(f"tool result <- {json.dumps(result)}")
            messages.append({"role": "tool", "content": json.dumps(result)})
        turn(messages, tools=[WEATHER_TOOL])
    print("Next: qwenlab chat (interactive), qwenlab serve (OpenAI API); both use this model unless --model.")
    return 0


register("demo", "chat with the embedded default model: thinking on/off and a tool call (no download)",
         add_arguments, run)
