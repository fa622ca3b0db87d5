"""How the server refuses, limits and survives: malformed requests, keys, sizes, queue, disconnects, failures.

After every refused request a normal generation must still succeed (the anchors' "the server still
answers"). Runs against the session's real server subprocess (tests/test_serve_helpers.py).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.test_serve_helpers import (  # noqa: F401 - fixtures
    API_KEY, MAX_BODY, MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_QUEUE, MODEL, client, http, metrics, server,
    sse_events, user, wait_idle,
)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
OK_CHAT = {"model": MODEL, "messages": user(), "max_tokens": 1}
OK_COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
VOCAB = 151936


def chat(**fields) -> dict:
    return {**OK_CHAT, **fields}


def completion(**fields) -> dict:
    return {**OK_COMPLETION, **fields}


def raw(body: dict, **replace: str) -> bytes:
    """A JSON body with some values written verbatim (NaN, Infinity, ...), which json.dumps would refuse."""
    text = json.dumps({**body, **{k: f"@@{k}@@" for k in replace}})
    for key, literal in replace.items():
        text = text.replace(f'"@@{key}@@"', literal)
    return text.encode()


BAD = [
    # ---- malformed messages (llama.cpp's matrix) ----
    ("messages null", CHAT, chat(messages=None), 400),
    ("messages a string", CHAT, chat(messages="hello"), 400),
    ("messages [123]", CHAT, chat(messages=[123]), 400),
    ("messages [{}]", CHAT, chat(messages=[{}]), 400),
    ("messages empty", CHAT, chat(messages=[]), 400),
    ("messages missing", CHAT, {"model": MODEL}, 400),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400),
    ("role not a string", CHAT, chat(messages=[{"role": 5, "content": "x"}]), 400),
    ("content missing", CHAT, chat(messages=[{"role": "user"}]), 400),
    ("content a number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400),
    ("image content part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]), 400),
    ("assistant says nothing", CHAT, chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant"}]), 400),
    ("tool call without function", CHAT, chat(messages=[{"role": "assistant", "content": None,
                                                         "tool_calls": [{"id": "a", "type": "function"}]}]), 400),
    # ---- sampling values ----
    ("temperature 999999", CHAT, chat(temperature=999999), 400),
    ("temperature -1", CHAT, chat(temperature=-1), 400),
    ("temperature NaN", CHAT, raw(OK_CHAT, temperature="NaN"), 400),
    ("temperature a string", CHAT, chat(temperature="hot"), 400),
    ("top_p -1", CHAT, chat(top_p=-1), 400),
    ("top_p 1.5", CHAT, chat(top_p=1.5), 400),
    ("top_p Infinity", CHAT, raw(OK_CHAT, top_p="Infinity"), 400),
    ("top_k -5", CHAT, chat(top_k=-5), 400),
    ("min_p 2", CHAT, chat(min_p=2), 400),
    ("repetition_penalty 0", CHAT, chat(repetition_penalty=0), 400),
    ("presence_penalty 5", CHAT, chat(presence_penalty=5), 400),
    ("frequency_penalty -Infinity", CHAT, raw(OK_CHAT, frequency_penalty="-Infinity"), 400),
    ("seed a string", CHAT, chat(seed="abc"), 400),
    ("seed 2**70", CHAT, chat(seed=2**70), 400),
    ("n 1000", CHAT, chat(n=1000), 400),
    ("n 0", CHAT, chat(n=0), 400),
    ("n over the server's capacity", CHAT, chat(n=MAX_NUM_SEQS + MAX_QUEUE + 1), 400),
    ("max_tokens 10**12", CHAT, chat(max_tokens=10**12), 400),
    ("max_tokens -5", CHAT, chat(max_tokens=-5), 400),
    ("max_tokens a string", CHAT, chat(max_tokens="10"), 400),
    ("max_tokens true", CHAT, chat(max_tokens=True), 400),
    ("top_logprobs 100", CHAT, chat(logprobs=True, top_logprobs=100), 400),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=3), 400),
    ("logprobs a string", CHAT, chat(logprobs="yes"), 400),
    ("thinking_budget -1", CHAT, chat(thinking_budget=-1), 400),
    ("stop empty string", CHAT, chat(stop=[""]), 400),
    ("stop a number", CHAT, chat(stop=5), 400),
    ("stop 100 strings", CHAT, chat(stop=[f"s{i}" for i in range(100)]), 400),
    # ---- token ids outside the vocabulary ----
    ("logit_bias id out of vocab", CHAT, chat(logit_bias={str(VOCAB + 5): 5}), 400),
    ("logit_bias negative id", CHAT, chat(logit_bias={"-1": 5}), 400),
    ("logit_bias not an id", CHAT, chat(logit_bias={"hello": 5}), 400),
    ("logit_bias value 1000", CHAT, chat(logit_bias={"100": 1000}), 400),
    ("stop_token_ids negative", CHAT, chat(stop_token_ids=[-1]), 400),
    ("stop_token_ids out of vocab", CHAT, chat(stop_token_ids=[10**9]), 400),
    # ---- streaming, tools, templates, unknown fields ----
    ("stream a string", CHAT, chat(stream="yes"), 400),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400),
    ("tool without function", CHAT, chat(tools=[{"type": "function"}]), 400),
    ("tool bad name", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b/c"}}]), 400),
    ("tool_choice required without tools", CHAT, chat(tool_choice="required"), 400),
    ("tool_choice unknown function", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                tool_choice={"type": "function", "function": {"name": "g"}}), 400),
    ("tool_choice a number", CHAT, chat(tool_choice=3), 400),
    ("request-supplied chat_template", CHAT, chat(chat_template="{{ 7 * 7 }}"), 400),
    ("chat_template via kwargs", CHAT, chat(chat_template_kwargs={"chat_template": "{{ 7 * 7 }}"}), 400),
    ("enable_thinking not a bool", CHAT, chat(chat_template_kwargs={"enable_thinking": "no"}), 400),
    ("response_format json_schema", CHAT, chat(response_format={"type": "json_schema"}), 400),
    ("test hook is a known field only", CHAT, chat(qwenlab_test={"unknown": 1}), 400),
    ("unknown field", CHAT, chat(foo=1), 400),
    ("unknown model", CHAT, chat(model="gpt-4"), 404),
    # ---- bodies ----
    ("body not JSON", CHAT, b"{not json", 400),
    ("body a JSON array", CHAT, b"[]", 400),
    ("body empty", CHAT, b"", 400),
    ("body invalid UTF-8", CHAT, b'{"model": "\xff\xfe"}', 400),
    ("body deeply nested", CHAT, b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400),
    # ---- completions ----
    ("prompt missing", COMPLETIONS, {"model": MODEL}, 400),
    ("prompt empty list", COMPLETIONS, completion(prompt=[]), 400),
    ("prompt empty string", COMPLETIONS, completion(prompt=""), 400),
    ("prompt negative token id", COMPLETIONS, completion(prompt=[-1]), 400),
    ("prompt token id out of vocab", COMPLETIONS, completion(prompt=[VOCAB]), 400),
    ("prompt mixed ids and strings", COMPLETIONS, completion(prompt=[1, "a"]), 400),
    ("prompt with an empty id list", COMPLETIONS, completion(prompt=[[1, 2], []]), 400),
    ("prompt an object", COMPLETIONS, completion(prompt={"a": 1}), 400),
    ("prompt over the context", COMPLETIONS, completion(prompt=[100] * (MAX_MODEL_LEN + 76)), 400),
    ("prompt + max_tokens over the context", COMPLETIONS, completion(max_tokens=MAX_MODEL_LEN), 400),
    ("completion logprobs 50", COMPLETIONS, completion(logprobs=50), 400),
    ("completion n 17", COMPLETIONS, completion(n=17), 400),
    ("suffix", COMPLETIONS, completion(suffix="x"), 400),
    ("best_of above n", COMPLETIONS, completion(best_of=3), 400),
    ("echo with logprobs", COMPLETIONS, completion(echo=True, logprobs=1), 400),
    ("prompts over the server's capacity", COMPLETIONS, completion(prompt=["a"] * 4, n=2), 400),
    # ---- tokenize / detokenize ----
    ("detokenize negative id", "/detokenize", {"tokens": [-1]}, 400),
    ("detokenize id out of vocab", "/detokenize", {"tokens": [10**10]}, 400),
    ("detokenize not a list", "/detokenize", {"tokens": "abc"}, 400),
    ("tokenize neither prompt nor messages", "/tokenize", {}, 400),
    ("tokenize both", "/tokenize", {"prompt": "a", "messages": user()}, 400),
    ("tokenize bad messages", "/tokenize", {"messages": [123]}, 400),
]


def assert_error_body(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


def assert_still_answers(http: httpx.Client) -> None:
    r = http.post(CHAT, json=OK_CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def test_bad_input_matrix_has_at_least_40_cases():
    assert len(BAD) >= 40 and len({name for name, *_ in BAD}) == len(BAD)


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[case[0] for case in BAD])
def test_bad_request_is_refused_and_server_still_answers(http, name, path, body, status):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert_error_body(response, status)
    assert_still_answers(http)


def test_errors_name_the_field(http):
    error = assert_error_body(http.post(CHAT, json=chat(temperature=999999)), 400)
    assert error["param"] == "temperature" and "999999" in error["message"]
    error = assert_error_body(http.post(CHAT, json=chat(messages=[{"role": "user", "content": 5}])), 400)
    assert error["param"] == "messages.0.content"
    error = assert_error_body(http.post(CHAT, json=chat(logit_bias={str(VOCAB): 1})), 400)
    assert error["param"] == "logit_bias" and str(VOCAB) in error["message"]


def test_prompt_over_context_names_both_numbers(client, http):
    long_text = "hello " * 1500
    count = http.post("/tokenize", json={"prompt": long_text}).json()["count"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_text, max_tokens=1)
    assert f"({count} tokens)" in info.value.message and f"({MAX_MODEL_LEN} tokens)" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user(long_text), max_tokens=1)
    assert str(MAX_MODEL_LEN) in info.value.message and "exceeds the available context size" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user(), max_tokens=MAX_MODEL_LEN)
    assert f"{MAX_MODEL_LEN} max_tokens" in info.value.message and f"({MAX_MODEL_LEN} tokens)" in info.value.message
    assert_still_answers(http)


def test_api_key(server, http):
    for path, method in (("/v1/models", "GET"), (CHAT, "POST"), (COMPLETIONS, "POST"), ("/tokenize", "POST")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, f"{server.url}{path}", json=OK_CHAT, headers=headers)
            error = assert_error_body(r, 401)
            assert error["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=user(), max_tokens=1)
    assert httpx.get(f"{server.url}/health").status_code == 200  # open: load balancers probe it
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert_still_answers(http)


def test_routes_and_methods(server, http):
    assert_error_body(http.get("/v1/nope"), 404)
    assert_error_body(http.post("/v1/models"), 405)
    assert_error_body(http.get(CHAT), 405)
    for path in ("/v1/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd", "/static/../../../etc/passwd"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code in (400, 404) and "root:" not in r.text
    assert_still_answers(http)


def test_body_over_the_cap_is_413_and_50kb_body_is_fine(http):
    big = json.dumps(chat(messages=user("x" * (MAX_BODY + 1000)))).encode()
    error = assert_error_body(http.post(CHAT, content=big, headers={"Content-Type": "application/json"}), 413)
    assert str(MAX_BODY) in error["message"]
    # a 50 KB prompt is within the body cap but over the context: a 400 naming the numbers, no crash
    error = assert_error_body(http.post(COMPLETIONS, json=completion(prompt="word " * 10_000)), 400)
    assert str(MAX_MODEL_LEN) in error["message"]
    # chunked upload without Content-Length, over the cap
    def chunks():
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'
    assert_error_body(http.post(COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert_still_answers(http)


# ---- load, disconnects, failures -------------------------------------------------------------------------
LONG = {"model": MODEL, "messages": user("Write a long story"), "max_tokens": 1000, "temperature": 0,
        "ignore_eos": True, "stream": True}


def test_queue_full_gives_429_with_retry_after(server, http):
    capacity = MAX_NUM_SEQS + MAX_QUEUE
    holders, readers = [], []
    try:
        for n in (MAX_NUM_SEQS, capacity - MAX_NUM_SEQS):  # fill the batch and the waiting queue
            cm = http.stream("POST", CHAT, json={**LONG, "n": n})
            response = cm.__enter__()
            holders.append(cm)
            assert response.status_code == 200
            readers.append(response.iter_lines())  # kept: a collected iterator closes the connection
            next(readers[-1])  # admitted: the first event came
        r = http.post(CHAT, json=OK_CHAT)
        error = assert_error_body(r, 429)
        assert error["type"] == "rate_limit_error" and int(r.headers["Retry-After"]) >= 1
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=user(), max_tokens=1)
        assert metrics(http)["qwenlab:request_rejected_queue_full_total"] >= 2
    finally:
        for cm in holders:
            cm.__exit__(None, None, None)
    m = wait_idle(http)
    assert m["qwenlab:kv_cache_blocks_used"] == 0 and m["qwenlab:num_requests_admitted"] == 0
    assert_still_answers(http)


def test_client_disconnect_mid_stream_frees_kv_blocks(http):
    before = wait_idle(http)
    with http.stream("POST", CHAT, json=LONG) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        during = metrics(http)
        assert during["qwenlab:kv_cache_blocks_used"] > 0 and during["qwenlab:num_requests_running"] == 1
    # the connection is closed here, long before 1000 tokens
    after = wait_idle(http, timeout=20)
    assert after["qwenlab:kv_cache_blocks_used"] == 0 and after["qwenlab:num_requests_running"] == 0
    assert after["qwenlab:request_aborted_disconnect_total"] == before["qwenlab:request_aborted_disconnect_total"] + 1
    assert after["qwenlab:generation_tokens_total"] - before["qwenlab:generation_tokens_total"] < 1000
    assert_still_answers(http)


def test_client_disconnect_non_streaming_aborts(http):
    before = wait_idle(http)
    with pytest.raises(httpx.ReadTimeout):
        http.post(CHAT, json={**LONG, "stream": False}, timeout=0.5)
    after = wait_idle(http, timeout=20)
    assert after["qwenlab:kv_cache_blocks_used"] == 0 and after["qwenlab:num_requests_admitted"] == 0
    assert after["qwenlab:request_aborted_disconnect_total"] == before["qwenlab:request_aborted_disconnect_total"] + 1
    assert after["qwenlab:generation_tokens_total"] - before["qwenlab:generation_tokens_total"] < 1000
    assert_still_answers(http)


def test_engine_failure_mid_stream_ends_with_error_event_and_done(http):
    fail = {"qwenlab_test": {"fail_after_tokens": 3}}
    with http.stream("POST", CHAT, json={**LONG, **fail}) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "internal_error" and "test hook" in events[-2]["error"]["message"]
    assert sum(1 for e in events[:-2] if e["choices"][0]["delta"].get("content")) <= 3
    r = http.post(CHAT, json={**LONG, "stream": False, **fail})
    assert "test hook" in assert_error_body(r, 500)["message"]
    m = wait_idle(http)
    assert m["qwenlab:kv_cache_blocks_used"] == 0
    assert_still_answers(http)
    with http.stream("POST", COMPLETIONS, json={**OK_COMPLETION, "max_tokens": 50, "stream": True, **fail}) as r:
        events = sse_events(r)
    assert "error" in events[-2] and events[-1] == "[DONE]"
    assert_still_answers(http)


def test_many_refusals_in_a_row_do_not_leak(http):
    for _ in range(20):
        assert_error_body(http.post(CHAT, json=chat(temperature=-1)), 400)
        assert_error_body(http.post(COMPLETIONS, json=completion(prompt=[VOCAB + 1])), 400)
    m = wait_idle(http)
    assert m["qwenlab:num_requests_admitted"] == 0 and m["qwenlab:kv_cache_blocks_used"] == 0
    assert_still_answers(http)

