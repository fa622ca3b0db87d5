"""End-to-end round trips on the embedded default model through the real ``openai`` client.

Unlike tests/test_serve.py (random weights, outputs forced by a test hook), here the model writes its own
<think> blocks and <tool_call>s: ``qwenlab serve`` starts with no --model (so it serves the default as
"qwenlab-default") and every answer below is the trained model's greedy output.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.test_serve_helpers import ServerProcess

MODEL = "qwenlab-default"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def server():
    root = Path(tempfile.mkdtemp(prefix="qwenlab-serve-default-"))
    proc = ServerProcess(["--dtype", "float32", "--max-model-len", "2048"], root / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def join(stream) -> dict:
    out = {"content": "", "reasoning": "", "calls": {}, "finish": None}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            out["content"] += delta.content or ""
            out["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                slot = out["calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function and call.function.name:
                    slot["name"] = call.function.name
                if call.function and call.function.arguments:
                    slot["arguments"] += call.function.arguments
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def test_serves_the_default_under_its_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


# The shipped model has learned the formats, counting and choosing the right tool, not yet arithmetic or
# copying digits and names exactly (see the model card), so these check what it really does: its own <think>
# blocks and <tool_call>s, parsed and streamed by the server.
def test_counts_with_thinking(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("Count the words: fish, bag, hat, tree, cup."),
                                       temperature=0, max_tokens=300)
    message = r.choices[0].message
    # the right count, reasoned in the trained template (the items it lists are not always the prompt's)
    assert "one by one" in message.reasoning_content and "5." in message.reasoning_content
    assert message.content.strip() == "There are 5 items."


def test_reasoning_is_split_from_the_answer(client):
    kwargs = dict(model=MODEL, messages=ask("What is 347 + 586?"), temperature=0, max_tokens=300)
    r = client.chat.completions.create(**kwargs)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert "column by column" in message.reasoning_content
    assert message.content.strip() and "<think>" not in message.content and "</think>" not in message.content
    streamed = join(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["reasoning"].strip() == message.reasoning_content.strip()
    assert streamed["content"] == message.content and streamed["finish"] == "stop"


def test_thinking_off(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("What is 347 + 586?"), temperature=0,
                                       max_tokens=100, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = r.choices[0].message
    assert not getattr(message, "reasoning_content", None) and message.content.strip()


def test_tool_call_not_streamed_and_streamed(client):
    kwargs = dict(model=MODEL, messages=ask("What's the weather in Paris?"), tools=[WEATHER], temperature=0,
                  max_tokens=200)
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "<tool_call>" not in (choice.message.content or "")
    streamed = join(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["finish"] == "tool_calls" and list(streamed["calls"]) == [0]
    assert streamed["calls"][0]["name"] == "get_weather" and streamed["calls"][0]["id"]
    assert json.loads(streamed["calls"][0]["arguments"]) == json.loads(call.function.arguments)


def test_multi_turn_tool_loop(client):
    messages = ask("What's the weather in Paris?")
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=200)
    call = r.choices[0].message.tool_calls[0]
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"city": "Paris", "temperature_c": 21, "condition": "sunny"})})
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.strip() == "It is 21°C and sunny in Paris."  # the tool's result, quoted
    # the conversation goes on: a follow-up question is answered after the whole tool exchange
    messages += [r.choices[0].message.model_dump(exclude_none=True), *ask("Thanks!")]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason in ("stop", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
