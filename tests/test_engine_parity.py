"""Engine logits equal a full transformers forward (float32, every family), in every scheduling situation."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import hf_checkpoint
from tests.test_engine_helpers import LogitsRecorder, single_thread, assert_logits_match, greedy, make_engine, random_prompts, run_all

FAMILIES = ["qwen2", "qwen3", "qwen3_moe", "qwen2_moe"]
_threads = pytest.fixture(autouse=True)(single_thread)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=1)


def check_all(hf, requests, finished, recorder):
    for rid, (prompt, _params) in requests.items():
        out = finished[rid]
        for completion in out.outputs:
            assert_logits_match(hf, prompt, completion.token_ids, recorder.rows[(rid, completion.index)])


def test_alone_greedy_matches_transformers_generate(checkpoint):
    directory, hf = checkpoint
    engine = make_engine(directory)
    recorder = LogitsRecorder(engine)
    [prompt] = random_prompts([11])
    requests = {"a": (prompt, greedy(32))}
    finished = run_all(engine, requests)
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert finished["a"].outputs[0].token_ids == expected[0, len(prompt):].tolist()
    assert finished["a"].outputs[0].finish_reason == "length"
    check_all(hf, requests, finished, recorder)


def test_batched_different_lengths_joining_midway(checkpoint):
    directory, hf = checkpoint
    engine = make_engine(directory)
    recorder = LogitsRecorder(engine)
    prompts = random_prompts([3, 9, 17, 30, 6], seed=2)
    requests = {f"r{i}": (p, greedy(8 + i)) for i, p in enumerate(prompts[:3])}
    late = {f"r{i}": (p, greedy(10)) for i, p in enumerate(prompts[3:], start=3)}
    finished = run_all(engine, requests, late)
    check_all(hf, {**requests, **late}, finished, recorder)
    assert engine.stats()["kv_blocks_used"] == 0


def test_prefix_cache_hit(checkpoint):
    directory, hf = checkpoint
    engine = make_engine(directory)
    recorder = LogitsRecorder(engine)
    shared, tail_a, tail_b = random_prompts([21, 3, 5], seed=3)
    first = {"a": (shared + tail_a, greedy(6))}
    finished = run_all(engine, first)
    second = {"b": (shared + tail_b, greedy(10)), "c": (shared + tail_a, greedy(9))}
    finished.update(run_all(engine, second))
    stats = engine.stats()
    assert finished["b"].num_cached_tokens == 20 and finished["c"].num_cached_tokens == 20  # 5 full blocks of 4
    assert stats["prefix_cache_hits"] == 40 and stats["prefix_cache_queries"] == 24 + 26 + 24
    check_all(hf, {**first, **second}, finished, recorder)


def test_chunked_prefill_mixed_with_decodes(checkpoint):
    directory, hf = checkpoint
    engine = make_engine(directory, max_num_batched_tokens=7)
    recorder = LogitsRecorder(engine)
    prompts = random_prompts([40, 4, 23], seed=4)
    requests = {f"r{i}": (p, greedy(9)) for i, p in enumerate(prompts)}
    finished = run_all(engine, requests)
    assert engine.stats()["max_step_tokens"] <= 7
    check_all(hf, requests, finished, recorder)


def test_after_preemption(checkpoint):
    directory, hf = checkpoint
    # 12 blocks of 4 tokens: three sequences growing to 27-29 tokens each cannot all stay resident.
    engine = make_engine(directory, kv_cache_memory=12 * engine_block_bytes(directory), max_model_len=48)
    recorder = LogitsRecorder(engine)
    prompts = random_prompts([9, 10, 11], seed=5)
    requests = {f"r{i}": (p, greedy(18)) for i, p in enumerate(prompts)}
    finished = run_all(engine, requests)
    assert engine.stats()["preemptions"] > 0
    check_all(hf, requests, finished, recorder)


def engine_block_bytes(directory, block_size: int = 4) -> int:
    from qwenlab.config import ModelConfig
    from qwenlab.engine.runner import kv_bytes_per_token

    return kv_bytes_per_token(ModelConfig.from_json_file(directory / "config.json"), torch.float32) * block_size


def test_cuda_graph_decode_inputs_give_the_same_logits(checkpoint):
    """The padded static inputs a CUDA graph replays (scratch block, bucketed sizes), run eagerly here."""
    from qwenlab.engine.cuda_graphs import DecodeGraphs

    directory, _ = checkpoint
    engine = make_engine(directory)
    for i, p in enumerate(random_prompts([5, 13, 9], seed=11)):
        engine.add_request(f"r{i}", p, greedy(20))
    for _ in range(4):
        engine.step()
    batch = engine.scheduler.schedule()
    assert batch.num_new_tokens == [1, 1, 1]
    graphs = DecodeGraphs(engine.runner, max_num_seqs=8, max_model_len=engine.max_model_len)
    key = graphs._key(3, max(len(s.block_table) for s in batch.seqs))
    assert key == (4, 8)
    graphs._fill(batch.seqs, key)
    with torch.inference_mode():
        padded = graphs._forward(*key)
    eager, _ = engine.runner.execute(batch)
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
