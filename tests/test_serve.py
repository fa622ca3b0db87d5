"""The OpenAI-compatible server, driven by the official ``openai`` client and raw HTTP.

One real ``qwenlab serve`` subprocess serves the whole session (see tests/test_serve_helpers.py). Random
weights never write ``<think>`` or ``<tool_call>``; the reasoning and tool tests force the model's output
with the server's test hook (``qwenlab_test.text``): the engine samples exactly those tokens, and
everything after the sampler (detokenizer, stop checks, parsers, streaming, usage) is the real path.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.test_serve_helpers import (  # noqa: F401 - fixtures
    MAX_MODEL_LEN, MODEL, client, http, metrics, server, sse_events, user, wait_idle,
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def force(text: str) -> dict:
    return {"qwenlab_test": {"text": text}}


def tokenize_messages(http: httpx.Client, messages, **extra) -> int:
    r = http.post("/tokenize", json={"messages": messages, **extra})
    assert r.status_code == 200, r.text
    return r.json()["count"]


def joined_stream(stream) -> tuple[dict, list]:
    """Join a chat stream: per choice content, reasoning, tool calls and finish reason; plus the chunks."""
    chunks = list(stream)
    out: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            entry = out.setdefault(choice.index, {"content": "", "reasoning": "", "calls": {}, "finish": None,
                                                  "logprobs": []})
            delta = choice.delta
            entry["content"] += delta.content or ""
            entry["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                slot = entry["calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                if call.id:
                    slot["id"] = call.id
                if call.function and call.function.name:
                    slot["name"] = call.function.name
                if call.function and call.function.arguments:
                    slot["arguments"] += call.function.arguments
            if choice.logprobs is not None and choice.logprobs.content:
                entry["logprobs"] += choice.logprobs.content
            if choice.finish_reason is not None:
                entry["finish"] = choice.finish_reason
    return out, chunks


# ---- plain routes ----------------------------------------------------------------------------------------
def test_health_models_and_model_card(client, http, server):
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    card = http.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == MAX_MODEL_LEN


def test_tokenize_and_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == 2 and r["max_model_len"] == MAX_MODEL_LEN
    assert r["token_strs"] == ["Hello", "Ġworld"]
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    developer = http.post("/tokenize", json={"messages": [{"role": "developer", "content": "Be brief."}, *user("Hi")]})
    system = http.post("/tokenize", json={"messages": [{"role": "system", "content": "Be brief."}, *user("Hi")]})
    assert developer.json()["tokens"] == system.json()["tokens"]
    chat = http.post("/tokenize", json={"messages": user("Hi"), "chat_template_kwargs": {"enable_thinking": False}})
    text = http.post("/detokenize", json={"tokens": chat.json()["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


# ---- chat ----------------------------------------------------------------------------------------------------
def test_chat_exact_usage_and_finish(client, http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0, logprobs=True)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert r.usage.prompt_tokens == tokenize_messages(http, messages)
    assert r.usage.completion_tokens == len(choice.logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 7
    else:  # the random model may pick an end token
        assert choice.finish_reason == "stop" and r.usage.completion_tokens <= 7
    # max_completion_tokens is the newer spelling of max_tokens
    r2 = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens <= 3


def test_chat_stream_equals_non_stream_at_temperature_0(client):
    kwargs = dict(model=MODEL, messages=user("Tell me a story"), max_tokens=12, temperature=0, logprobs=True,
                  top_logprobs=2)
    full = client.chat.completions.create(**kwargs)
    joined, chunks = joined_stream(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert joined[0]["content"] == full.choices[0].message.content
    assert joined[0]["finish"] == full.choices[0].finish_reason
    assert [e.token for e in joined[0]["logprobs"]] == [e.token for e in full.choices[0].logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in joined[0]["logprobs"])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])  # include_usage: only the last chunk carries usage
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) \
        == full.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    # without include_usage there is no usage at all
    _, chunks = joined_stream(client.chat.completions.create(**kwargs, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_chat_stream_raw_sse_ends_with_done(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": user(), "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert {e["object"] for e in events[:-1]} == {"chat.completion.chunk"}


def test_chat_n_and_seed(client):
    kwargs = dict(model=MODEL, messages=user("Pick words"), max_tokens=4, temperature=1.0, top_p=1.0, n=2,
                  extra_body={"top_k": -1})
    a = client.chat.completions.create(**kwargs, seed=1234)
    b = client.chat.completions.create(**kwargs, seed=1234)
    c = client.chat.completions.create(**kwargs, seed=99)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # the n completions are not copies of each other
    assert 2 <= a.usage.completion_tokens <= 8


def test_chat_n_streaming_indexes(client):
    joined, _ = joined_stream(client.chat.completions.create(
        model=MODEL, messages=user(), max_tokens=4, temperature=1.0, n=2, seed=5, stream=True))
    full = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=4, temperature=1.0, n=2, seed=5)
    assert sorted(joined) == [0, 1]
    assert [joined[i]["content"] for i in (0, 1)] == [c.message.content for c in full.choices]


def test_chat_stop_strings_and_stop_token_ids(client, http):
    base = client.chat.completions.create(model=MODEL, messages=user("Count"), max_tokens=10, temperature=0)
    text = base.choices[0].message.content
    assert len(text) >= 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    r = client.chat.completions.create(model=MODEL, messages=user("Count"), max_tokens=10, temperature=0,
                                       stop=[stop, "never-appears"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]
    # stop_token_ids (vLLM's extra): ends on the second generated token, which is counted
    ids = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    r = client.chat.completions.create(model=MODEL, messages=user("Count"), max_tokens=10, temperature=0,
                                       extra_body={"stop_token_ids": [ids[1]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 2


def test_chat_logit_bias(client, http):
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=4, temperature=0,
                                       logit_bias={"9707": 100}, logprobs=True)
    assert [e.token for e in r.choices[0].logprobs.content] == ["Hello"] * 4
    base = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=1, temperature=0, logprobs=True)
    first = base.choices[0].logprobs.content[0]
    banned_id = http.post("/tokenize", json={"prompt": first.token}).json()["tokens"][0]
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=1, temperature=0, logprobs=True,
                                       logit_bias={str(banned_id): -100})
    assert r.choices[0].logprobs.content[0].token != first.token


def test_chat_logprobs_greedy_is_top1(client):
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=5)
    for entry in r.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token


# ---- reasoning ----------------------------------------------------------------------------------------------
THOUGHT = "<think>\nThe user greets me. I answer kindly.\n</think>\n\nHello! How can I help?"


def test_reasoning_split_thinking_on(client):
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=64, extra_body=force(THOUGHT))
    message = r.choices[0].message
    assert message.reasoning_content == "The user greets me. I answer kindly."
    assert message.content == "Hello! How can I help?"
    assert r.choices[0].finish_reason == "stop"
    joined, _ = joined_stream(client.chat.completions.create(model=MODEL, messages=user(), max_tokens=64,
                                                             stream=True, extra_body=force(THOUGHT)))
    assert joined[0]["reasoning"] == message.reasoning_content
    assert joined[0]["content"] == message.content and "<think>" not in joined[0]["content"]


def test_reasoning_truncated_thinking_never_leaks(client):
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=6, extra_body=force(THOUGHT))
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content is None and r.choices[0].message.reasoning_content.startswith("The user")
    joined, _ = joined_stream(client.chat.completions.create(model=MODEL, messages=user(), max_tokens=6, stream=True,
                                                             extra_body=force(THOUGHT)))
    assert joined[0]["content"] == "" and joined[0]["reasoning"] == r.choices[0].message.reasoning_content


def test_reasoning_off_with_chat_template_kwargs(client, http):
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    r = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=32,
                                       extra_body={**off, **force("Plain answer.")})
    assert r.choices[0].message.content == "Plain answer." and r.choices[0].message.reasoning_content is None
    assert r.usage.prompt_tokens == tokenize_messages(http, user(), **off)
    assert r.usage.prompt_tokens == tokenize_messages(http, user()) + 4  # the empty think block


# ---- tools -----------------------------------------------------------------------------------------------------
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tools_auto_returns_tool_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=user("Weather in Paris?"), tools=TOOLS, max_tokens=64,
                                       extra_body=force("<think>\nUse the tool.\n</think>\n\n" + CALL))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "Use the tool."
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    joined, chunks = joined_stream(client.chat.completions.create(
        model=MODEL, messages=user("Weather in Paris?"), tools=TOOLS, max_tokens=64, stream=True,
        extra_body=force("<think>\nUse the tool.\n</think>\n\n" + CALL)))
    [streamed] = joined[0]["calls"].values()
    assert streamed["name"] == "get_weather" and json.loads(streamed["arguments"]) == {"city": "Paris"}
    assert streamed["id"].startswith("call_") and joined[0]["finish"] == "tool_calls" and joined[0]["content"] == ""
    first_call_chunk = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert first_call_chunk.choices[0].delta.tool_calls[0].function.name == "get_weather"


def test_tools_two_calls_and_parallel_false(client):
    two = CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    r = client.chat.completions.create(model=MODEL, messages=user(), tools=TOOLS, max_tokens=80, extra_body=force(two))
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    r = client.chat.completions.create(model=MODEL, messages=user(), tools=TOOLS, max_tokens=80,
                                       parallel_tool_calls=False, extra_body=force(two))
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


def test_tool_choice_none_keeps_text_and_drops_tools_from_prompt(client, http):
    r = client.chat.completions.create(model=MODEL, messages=user(), tools=TOOLS, tool_choice="none", max_tokens=64,
                                       extra_body=force(CALL))
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == CALL
    assert r.usage.prompt_tokens == tokenize_messages(http, user())
    assert r.usage.prompt_tokens < tokenize_messages(http, user(), tools=TOOLS)


def test_tool_choice_required_and_named(client):
    # required: the prompt ends with the opening of a call up to the name; the model writes the rest
    r = client.chat.completions.create(model=MODEL, messages=user(), tools=TOOLS, tool_choice="required",
                                       max_tokens=64, extra_body=force('get_time", "arguments": {}}\n</tool_call>'))
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    assert r.choices[0].finish_reason == "tool_calls"
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=user(), tools=TOOLS, tool_choice=named, max_tokens=64,
                                       extra_body=force('{"city": "Oslo"}}\n</tool_call>'))
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    joined, _ = joined_stream(client.chat.completions.create(
        model=MODEL, messages=user(), tools=TOOLS, tool_choice=named, max_tokens=64, stream=True,
        extra_body=force('{"city": "Oslo"}}\n</tool_call>')))
    [streamed] = joined[0]["calls"].values()
    assert streamed["name"] == "get_weather" and json.loads(streamed["arguments"]) == {"city": "Oslo"}


def test_tool_round_trip_history_renders(client):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=16,
                                       extra_body=force("It is 18 C and sunny in Paris."))
    assert r.choices[0].message.content == "It is 18 C and sunny in Paris."


# ---- completions --------------------------------------------------------------------------------------------
def test_completions_prompt_forms_echo_and_usage(client, http):
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_text.object == "text_completion" and by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens <= 5
    many = client.completions.create(model=MODEL, prompt=["Once upon a time", "The end"], max_tokens=5, temperature=0,
                                     n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text
    end_ids = http.post("/tokenize", json={"prompt": "The end"}).json()["tokens"]
    assert many.usage.prompt_tokens == len(ids) + len(end_ids)
    lists = client.completions.create(model=MODEL, prompt=[ids, end_ids], max_tokens=5, temperature=0)
    assert [c.text for c in lists.choices] == [many.choices[0].text, many.choices[2].text]
    echo = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text == "Once upon a time" + by_text.choices[0].text
    echo_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert echo_ids.choices[0].text == echo.choices[0].text


def test_completions_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt="Hi", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_completions_logprobs_and_stream_equality(client):
    kwargs = dict(model=MODEL, prompt="The weather today", max_tokens=8, temperature=0, logprobs=3)
    full = client.completions.create(**kwargs)
    lp = full.choices[0].logprobs
    assert "".join(lp.tokens) == full.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == full.usage.completion_tokens
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                        lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_completions_seed_and_stop(client):
    kwargs = dict(model=MODEL, prompt="Random", max_tokens=8, temperature=1.0, top_p=1.0, extra_body={"top_k": -1})
    a = client.completions.create(**kwargs, seed=7, n=2)
    b = client.completions.create(**kwargs, seed=7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    text = a.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2] or text
    r = client.completions.create(**{**kwargs, "n": 1}, seed=7, stop=stop)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


# ---- concurrency and observability -------------------------------------------------------------------------
def test_concurrent_requests_all_answer(client, http):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        if i % 2:
            return client.chat.completions.create(model=MODEL, messages=user(f"Request {i}"), max_tokens=6,
                                                  temperature=0).usage.completion_tokens
        chunks = list(client.chat.completions.create(model=MODEL, messages=user(f"Request {i}"), max_tokens=6,
                                                     temperature=0, stream=True))
        return sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(r >= 1 for r in results)
    m = wait_idle(http)
    assert m["qwenlab:kv_cache_blocks_used"] == 0 and m["qwenlab:num_requests_admitted"] == 0


def test_metrics_prometheus_text(http, client, server):
    client.chat.completions.create(model=MODEL, messages=user(), max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text  # no key needed
    for name in ("qwenlab:num_requests_running", "qwenlab:num_requests_waiting", "qwenlab:prompt_tokens_total",
                 "qwenlab:generation_tokens_total", "qwenlab:kv_cache_blocks_used", "qwenlab:prefix_cache_hit_rate",
                 "qwenlab:time_to_first_token_seconds_bucket", "qwenlab:inter_token_latency_seconds_bucket"):
        assert f"\n{name}" in text, name
    m = metrics(http)
    assert m["qwenlab:generation_tokens_total"] >= 3 and m["qwenlab:kv_cache_blocks_total"] > 0
    assert m["qwenlab:time_to_first_token_seconds_count"] >= 1 and m["qwenlab:inter_token_latency_seconds_count"] >= 1
    assert m['qwenlab:http_responses_total{route="chat",status="200"}'] >= 1
