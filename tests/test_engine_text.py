"""Text paths with the real Qwen3 tokenizer: stop strings, thinking budget, chat parsing, streaming, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwenlab.engine import LLM, SamplingParams
from qwenlab.engine.engine import THINKING_BUDGET_CLOSE
from qwenlab.parsing import collect
from tests.test_engine_helpers import ScriptedSampler, single_thread, tokenizer_checkpoint

_threads = pytest.fixture(autouse=True)(single_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tokenizer_checkpoint(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def shared_llm(checkpoint):
    return LLM(checkpoint, dtype="float32", kv_cache_memory=2**24, log_stats=False, seed=0)


@pytest.fixture
def llm(shared_llm):
    sampler = shared_llm.engine.sampler
    yield shared_llm
    shared_llm.engine.sampler = sampler  # tests script it


def script(llm, rid_texts: dict[str, str]) -> ScriptedSampler:
    return ScriptedSampler(llm.engine, {rid: llm.tokenizer.encode(t) for rid, t in rid_texts.items()})


def next_ids(llm, count: int) -> list[str]:
    """The request ids LLM will give its next ``count`` requests."""
    import copy

    counter = copy.copy(llm._ids)
    return [f"llm-{next(counter)}" for _ in range(count)]


def test_stop_strings_across_token_boundaries_are_never_emitted(llm):
    text = "Hello world, this is a test of stop strings. END of it"
    rid, rid2 = next_ids(llm, 2)
    script(llm, {rid: text, rid2: text})
    tok = llm.tokenizer
    assert len(tok.encode("Hello world")) == 2  # "o wor" spans the two tokens
    deltas = list(llm.stream("Say it", SamplingParams(max_tokens=40, stop=["test of", "o wor"])))
    streamed = "".join(d.text for d in deltas)
    assert streamed == "Hell" and deltas[-1].finish_reason == "stop"
    [out] = llm.generate("Say it", SamplingParams(max_tokens=40, stop=["strings. E", "is a t"]))
    c = out.outputs[0]
    assert c.text == "Hello world, this " and c.finish_reason == "stop" and c.stop_reason == "is a t"
    assert all(s not in "".join(d.text for d in deltas) for s in ("o wor", "test of"))


def test_streamed_text_equals_the_final_text_and_the_tokenizer_decode(llm):
    params = SamplingParams(max_tokens=24, seed=5, temperature=1.0, top_k=0, top_p=1.0, stop=["zzzz"])
    deltas = list(llm.stream([9707, 1879], params))  # a real random model: arbitrary byte-level tokens
    ids = [t for d in deltas for t in d.token_ids]
    assert len(ids) == 24 and deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) == llm.tokenizer.decode(ids, skip_special_tokens=True)
    [again] = llm.generate([9707, 1879], params)
    assert again.outputs[0].token_ids == ids


def test_thinking_budget_closes_the_thought_and_the_answer_follows(llm):
    tok = llm.tokenizer
    [rid] = next_ids(llm, 1)
    thought = tok.encode("<think>\nstep one, step two, step three, step four, step five")
    answer = tok.encode("The answer is 42.")
    sampler = ScriptedSampler(llm.engine, {rid: thought})
    close = tok.encode(THINKING_BUDGET_CLOSE)
    budget = 6
    # after the close, the script continues with the answer
    sampler.scripts[rid] = thought[: 1 + budget] + close + answer
    steps = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda batch: steps.append(list(batch.num_new_tokens)) or execute(batch)
    try:
        [out] = llm.chat([{"role": "user", "content": "What is 6 x 7?"}],
                         SamplingParams(max_tokens=60, thinking_budget=budget))
    finally:
        llm.engine.runner.execute = execute
    c = out.outputs[0]
    assert c.token_ids[: 1 + budget] == thought[: 1 + budget]
    assert c.token_ids[1 + budget: 1 + budget + len(close)] == close  # inserted by the engine
    assert c.logprobs is None
    assert [1 + len(close)] in steps  # the model computed the inserted tokens in one step
    assert c.reasoning_content.endswith("I have to give the solution based on the thinking directly now.")
    assert c.content == "The answer is 42." and c.finish_reason == "stop"


def test_thinking_budget_counts_from_a_prompt_that_opened_the_thought(llm):
    tok = llm.tokenizer
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    [rid, rid2] = next_ids(llm, 2)
    ScriptedSampler(llm.engine, {rid: tok.encode("a b c d e f g h"), rid2: tok.encode("</think>\n\nok then")})
    [out] = llm.generate(prompt, SamplingParams(max_tokens=40, thinking_budget=3, logprobs=1))
    close = tok.encode(THINKING_BUDGET_CLOSE)
    ids = out.outputs[0].token_ids
    assert ids[3: 3 + len(close)] == close
    assert out.outputs[0].logprobs[3:3 + len(close)] == [None] * len(close)
    [free] = llm.generate(prompt, SamplingParams(max_tokens=40, thinking_budget=30))  # closes on its own
    assert free.outputs[0].text == "</think>\n\nok then"


def test_chat_parses_reasoning_and_tool_calls_and_stream_agrees(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = ('<think>\nLet me check.\n</think>\n\nSure.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>')
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    rid, rid2 = next_ids(llm, 2)
    script(llm, {rid: text, rid2: text})
    [out] = llm.chat(messages, SamplingParams(max_tokens=80), tools=tools)
    c = out.outputs[0]
    assert c.reasoning_content == "Let me check." and c.content == "Sure."
    assert [(t.name, json.loads(t.arguments)) for t in c.tool_calls] == [("get_weather", {"city": "Paris"})]
    deltas = list(llm.stream(messages=messages, params=SamplingParams(max_tokens=80), tools=tools))
    parsed = collect(p for d in deltas for p in d.parsed)
    assert parsed.reasoning_content == c.reasoning_content and parsed.content == c.content
    assert [(t.name, t.arguments) for t in parsed.tool_calls] == [(t.name, t.arguments) for t in c.tool_calls]
    assert "".join(d.text for d in deltas) == c.text


def test_chat_takes_a_list_of_conversations_and_thinking_off(llm):
    conversations = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]]
    rid, rid2 = next_ids(llm, 2)
    script(llm, {rid: "Hello!", rid2: "See you."})
    outs = llm.chat(conversations, SamplingParams(max_tokens=10), enable_thinking=False)
    assert [o.outputs[0].content for o in outs] == ["Hello!", "See you."]
    assert all(o.outputs[0].reasoning_content is None for o in outs)
    prompt = llm.tokenizer.decode(outs[0].prompt_token_ids)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_text_prompt_and_generation_defaults(llm):
    [out] = llm.generate("Hello", SamplingParams(max_tokens=2))
    assert out.prompt == "Hello" and out.prompt_token_ids == llm.tokenizer.encode("Hello")
    llm.engine.add_request("defaults", [1, 2], SamplingParams(max_tokens=1))
    params = llm.engine.requests["defaults"].seqs[0].params
    llm.engine.abort("defaults")
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)  # Qwen3 generation_config
    assert llm.engine.end_token_ids == (151645, 151643)


def run_qwenlab(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwenlab", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_cli_generate_and_chat(checkpoint):
    common = ["--model", str(checkpoint), "--dtype", "float32", "--kv-cache-memory", "16MiB"]
    proc = run_qwenlab("generate", *common, "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "5 tokens in" in proc.stderr and "finish_reason=length" in proc.stderr and proc.stdout.strip()
    bad = run_qwenlab("generate", *common, "--prompt", "Hello", "--temperature", "-1")
    assert bad.returncode == 2 and "temperature must be >= 0" in bad.stderr and "Traceback" not in bad.stderr
    chat = run_qwenlab("chat", *common, "--max-tokens", "4", "--seed", "1",
                       stdin="hello\n/no_think\nhow are you\n/reset\n/think\nbye\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert "[no_think]" in chat.stderr and "[reset]" in chat.stderr and "[think]" in chat.stderr
    assert chat.stdout.count("\n") >= 3  # three answers
