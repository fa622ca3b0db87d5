"""Sampling: seeded reproducibility whatever the batch, n, logprobs, penalties, stop ids, min_tokens."""

from __future__ import annotations

import math

import pytest
import torch

from qwenlab.engine import SamplingParams
from qwenlab.engine.sampler import Sampler
from qwenlab.engine.sequence import Sequence
from tests.conftest import hf_checkpoint
from tests.test_engine_helpers import greedy, make_engine, random_prompts, run_all, single_thread

_threads = pytest.fixture(autouse=True)(single_thread)

SEEDED = [
    dict(temperature=0.8, top_k=20, seed=7),
    dict(temperature=1.0, top_p=0.9, seed=8),
    dict(temperature=1.3, seed=9),
    dict(temperature=0.9, min_p=0.3, seed=10),
    dict(temperature=0.7, top_k=50, top_p=0.8, min_p=0.01, presence_penalty=0.5, frequency_penalty=0.3, seed=11),
    dict(temperature=1.0, top_k=5, repetition_penalty=1.2, seed=12),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # std 1 logits scale: sharper distributions than transformers' default init, so truncation matters
    return hf_checkpoint("qwen3", tmp_path_factory.mktemp("sampling"), seed=3, initializer_range=0.2)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(checkpoint):
    directory, _ = checkpoint
    prompts = random_prompts([5, 12, 7, 20, 9, 3], seed=1)
    alone = {}
    for i, kwargs in enumerate(SEEDED):
        engine = make_engine(directory, seed=i)
        out = run_all(engine, {"x": (prompts[i], SamplingParams(max_tokens=16, ignore_eos=True, **kwargs))})
        alone[i] = out["x"].outputs[0].token_ids
    engine = make_engine(directory, seed=123, max_num_batched_tokens=16)  # chunked, mixed with decodes
    requests = {f"s{i}": (prompts[i], SamplingParams(max_tokens=16, ignore_eos=True, **kw)) for i, kw in enumerate(SEEDED)}
    fillers = {f"f{i}": (p, SamplingParams(max_tokens=10 + i, temperature=1.0, top_p=0.7, ignore_eos=True))
               for i, p in enumerate(random_prompts([4, 30, 11], seed=9))}
    late = {f"g{i}": (p, greedy(5)) for i, p in enumerate(random_prompts([6, 2], seed=10))}
    finished = run_all(engine, {**fillers, **requests}, late, late_step=2)
    for i in range(len(SEEDED)):
        assert finished[f"s{i}"].outputs[0].token_ids == alone[i], SEEDED[i]
    assert len(set(map(tuple, alone.values()))) == len(SEEDED)


def test_unseeded_sampling_varies_and_truncation_is_respected(checkpoint):
    directory, hf = checkpoint
    engine = make_engine(directory, seed=None)
    [prompt] = random_prompts([8], seed=4)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1]
    top3 = set(logits.topk(3).indices.tolist())
    outs = run_all(engine, {f"r{i}": (prompt, SamplingParams(max_tokens=1, top_k=3, temperature=5.0))
                            for i in range(40)})
    firsts = [o.outputs[0].token_ids[0] for o in outs.values()]
    assert set(firsts) <= top3 and len(set(firsts)) > 1


def test_n_completions_share_the_prompt_blocks(checkpoint):
    directory, _ = checkpoint
    engine = make_engine(directory)
    [prompt] = random_prompts([9], seed=5)
    out = run_all(engine, {"r": (prompt, SamplingParams(n=3, max_tokens=12, seed=1, ignore_eos=True))})["r"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    assert out.num_completion_tokens == 36 and out.num_prompt_tokens == 9
    assert engine.stats()["prefix_cache_hits"] == 2 * 8  # siblings reuse the two full prompt blocks
    again = run_all(engine, {"q": (prompt, SamplingParams(n=3, max_tokens=12, seed=1, ignore_eos=True))})["q"]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_logprobs_match_transformers(checkpoint):
    directory, hf = checkpoint
    engine = make_engine(directory)
    [prompt] = random_prompts([6], seed=6)
    params = {"g": greedy(6, logprobs=5), "s": SamplingParams(max_tokens=6, seed=3, logprobs=0, ignore_eos=True)}
    finished = run_all(engine, {rid: (prompt, p) for rid, p in params.items()})
    for rid, top in (("g", 5), ("s", 0)):
        completion = finished[rid].outputs[0]
        with torch.no_grad():
            reference = torch.log_softmax(hf(torch.tensor([prompt + completion.token_ids])).logits[0].float(), -1)
        assert len(completion.logprobs) == 6
        for i, (token, lp) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = reference[len(prompt) - 1 + i]
            assert lp.token_id == token and math.isclose(lp.logprob, row[token].item(), abs_tol=1e-4)
            assert len(lp.top_logprobs) == top
            if top:
                assert [t for t, _ in lp.top_logprobs] == row.topk(top).indices.tolist()
                assert lp.top_logprobs[0][0] == token  # greedy picks the most likely


def test_repetition_penalty_matches_transformers(checkpoint):
    directory, hf = checkpoint
    engine = make_engine(directory)
    [prompt] = random_prompts([10], seed=7)
    out = run_all(engine, {"r": (prompt, greedy(24, repetition_penalty=1.8))})["r"]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                           repetition_penalty=1.8)[0, len(prompt):].tolist()
    assert out.outputs[0].token_ids == expected


def test_presence_and_frequency_penalties_follow_openai():
    params = SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.5).resolve()
    seq = Sequence("r", 0, [4, 4, 4], params)  # prompt tokens are not penalised
    for t in (1, 1, 2):
        seq.append_token(t)
    logits = torch.zeros(1, 6)
    out = Sampler._apply_penalties(logits, [seq], ())
    assert out[0].tolist() == [0.0, -(1.5 + 2 * 0.5), -(1.5 + 0.5), 0.0, 0.0, 0.0]


def test_stop_token_ids_and_min_tokens(checkpoint):
    directory, _ = checkpoint
    engine = make_engine(directory)
    [prompt] = random_prompts([7], seed=8)
    base = run_all(engine, {"b": (prompt, greedy(12))})["b"].outputs[0].token_ids
    k = next(i for i in range(2, 12) if base[i] not in base[:i])
    stopped = run_all(engine, {"s": (prompt, greedy(12, stop_token_ids=[base[k]]))})["s"].outputs[0]
    assert stopped.token_ids == base[: k + 1] and stopped.finish_reason == "stop" and stopped.stop_reason == base[k]
    held = run_all(engine, {"m": (prompt, greedy(12, stop_token_ids=[base[k]], min_tokens=k + 3))})["m"].outputs[0]
    assert base[k] not in held.token_ids[: k + 3] and len(held.token_ids) >= k + 3
    eos = SamplingParams(max_tokens=12, temperature=0)
    engine.end_token_ids = (base[k],)  # as if that token were the checkpoint's EOS
    ended = run_all(engine, {"e": (prompt, eos)})["e"].outputs[0]
    assert ended.token_ids == base[: k + 1] and ended.finish_reason == "stop" and ended.stop_reason is None
