"""Requests: refusal of invalid and impossible ones (with the numbers), abort, defaults, engine set-up."""

from __future__ import annotations

import json
import math

import pytest

from qwenlab.engine import LLM, LLMEngine, SamplingParams
from qwenlab.errors import CheckpointError, ConfigError, RequestError
from tests.conftest import hf_checkpoint
from tests.test_engine_helpers import greedy, make_engine, random_prompts, run_all, single_thread

_threads = pytest.fixture(autouse=True)(single_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return hf_checkpoint("qwen2", tmp_path_factory.mktemp("requests"), seed=4)


BAD_PARAMS = [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_p=-1), "top_p must be in (0, 1]"),
    (dict(top_k=-2), "top_k must be >= -1"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(presence_penalty=3), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=math.nan), "frequency_penalty must be a finite number"),
    (dict(repetition_penalty=0), "repetition_penalty must be in (0, 10]"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(max_tokens=True), "max_tokens must be an integer"),
    (dict(n=0), "n must be between 1 and 64"),
    (dict(n=1000), "n must be between 1 and 64"),
    (dict(logprobs=21), "logprobs must be between 0 and 20"),
    (dict(min_tokens=5, max_tokens=3), "min_tokens (5) must not exceed max_tokens (3)"),
    (dict(stop_token_ids=[384]), "stop_token_ids: token id 384 is outside the vocabulary (0..383)"),
    (dict(stop_token_ids=[-1]), "stop_token_ids: token id -1 is outside the vocabulary"),
    (dict(stop=[""]), "stop must be a non-empty string"),
    (dict(stop=["x"]), "stop strings need a tokenizer"),
    (dict(thinking_budget=-1), "thinking_budget must be >= 0"),
    (dict(thinking_budget=10), "thinking_budget needs a tokenizer"),
    (dict(seed=2**70), "seed must be between"),
    (dict(ignore_eos="yes"), "ignore_eos must be true or false"),
]


@pytest.mark.parametrize("kwargs,message", BAD_PARAMS, ids=[m[:24] for _, m in BAD_PARAMS])
def test_invalid_sampling_values_are_refused(checkpoint, kwargs, message):
    engine = make_engine(checkpoint[0])
    with pytest.raises(RequestError) as info:
        engine.add_request("bad", [1, 2, 3], SamplingParams(**kwargs))
    assert message in str(info.value)
    assert not engine.has_unfinished_requests()


def test_impossible_requests_are_refused_with_the_numbers_and_the_engine_keeps_working(checkpoint):
    engine = make_engine(checkpoint[0], max_model_len=64)
    cases = [
        (list(range(64)), SamplingParams(), "request (64 prompt tokens) exceeds the available context size (64 tokens"),
        (list(range(50)), SamplingParams(max_tokens=20), "request (50 prompt tokens + 20 max_tokens = 70 tokens) "
                                                       "exceeds the available context size (64 tokens)"),
        ([5, 384], SamplingParams(), "prompt: token id 384 is outside the vocabulary (0..383)"),
        ([5, -3], SamplingParams(), "prompt: token id -3 is outside the vocabulary"),
        ([], SamplingParams(), "prompt_token_ids must be a non-empty list"),
        ([1, 2.0], SamplingParams(), "prompt: token ids must be integers"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(RequestError) as info:
            engine.add_request("x", prompt, params)
        assert message in str(info.value)
    engine.add_request("dup", [1, 2], greedy(3))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("dup", [1, 2], greedy(3))
    out = run_all(engine, {"ok": ([1, 2, 3], greedy(4))})
    assert len(out["ok"].outputs[0].token_ids) == 4 and "dup" in out


def test_max_tokens_defaults_to_the_rest_of_the_context(checkpoint):
    engine = make_engine(checkpoint[0], max_model_len=20)
    out = run_all(engine, {"r": ([1, 2, 3, 4, 5], SamplingParams(temperature=0, ignore_eos=True))})["r"]
    assert len(out.outputs[0].token_ids) == 15 and out.outputs[0].finish_reason == "length"


def test_max_model_len_larger_than_the_cache_is_refused_with_the_numbers(checkpoint):
    with pytest.raises(ConfigError, match=r"max_model_len 200 tokens does not fit in the KV cache: .* holds 64 tokens"):
        make_engine(checkpoint[0], kv_cache_memory=16 * 4 * 3 * 2 * 2 * 16 * 4, max_model_len=200)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        make_engine(checkpoint[0], max_model_len=10**6)
    engine = make_engine(checkpoint[0], kv_cache_memory=16 * 4 * 3 * 2 * 2 * 16 * 4)  # 16 blocks x 4 tokens
    assert engine.max_model_len == 64 and engine.stats()["kv_tokens_total"] == 64


def test_abort_frees_blocks_at_once(checkpoint):
    engine = make_engine(checkpoint[0])
    prompts = random_prompts([30, 12], seed=3)
    engine.add_request("a", prompts[0], greedy(50))
    engine.add_request("b", prompts[1], greedy(6))
    for _ in range(3):
        engine.step()
    used = engine.stats()["kv_blocks_used"]
    assert used == 8 + 4  # 32 and 14 computed tokens (the newest token gets its slot next step)
    engine.abort("a")
    assert engine.stats()["kv_blocks_used"] == 4 and engine.stats()["running"] == 1
    engine.abort("a")  # again, and unknown ids: nothing happens
    engine.abort("nope")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert {o.request_id for o in outs} == {"b"} and outs[-1].finished
    assert engine.stats()["kv_blocks_used"] == 0
    engine.add_request("w", prompts[0], greedy(5))  # abort while still waiting
    engine.abort("w")
    assert not engine.has_unfinished_requests() and engine.stats()["waiting"] == 0


def test_defaults_come_from_generation_config(checkpoint, tmp_path):
    gen = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": [7, 9]}
    engine = make_engine(checkpoint[0], generation_config=gen)
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=2, top_p=0.5))
    params = engine.requests["r"].seqs[0].params
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.6, 20, 0.5, 0.0)
    assert engine.end_token_ids == (7, 9)
    greedy_default = make_engine(checkpoint[0], generation_config={"do_sample": False, "temperature": 0.7})
    greedy_default.add_request("r", [1, 2], SamplingParams(max_tokens=2))
    assert greedy_default.requests["r"].seqs[0].params.temperature == 0.0
    assert SamplingParams().resolve({}).temperature == 1.0


def test_llm_generate_refuses_a_bad_batch_before_running_anything(checkpoint):
    llm = LLM(checkpoint[0], dtype="float32", kv_cache_memory=2**20, log_stats=False)
    with pytest.raises(RequestError, match="temperature"):
        llm.generate([[1, 2], [3, 4]], [SamplingParams(max_tokens=2), SamplingParams(temperature=-1)])
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(RequestError, match="no tokenizer"):
        llm.generate("text prompt")
    outs = llm.generate([[1, 2], [3, 4, 5]], SamplingParams(max_tokens=3, temperature=0))
    assert [o.prompt_token_ids for o in outs] == [[1, 2], [3, 4, 5]]


def test_unknown_model_name_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Qwen/Qwen3-0.6B: not a local directory and could not be downloaded"):
        LLM("Qwen/Qwen3-0.6B")
    with pytest.raises(CheckpointError, match="not found"):
        LLMEngine("./no/such/dir")


def test_startup_prints_the_cache_numbers(checkpoint, capsys):
    make_engine(checkpoint[0], log_stats=True, kv_cache_memory=2**20)
    err = capsys.readouterr().err
    assert "KV cache" in err and "blocks x 4 tokens" in err and "sequences at full length" in err
    assert json.dumps(make_engine(checkpoint[0]).stats())  # plain data
