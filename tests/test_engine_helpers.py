"""Helpers shared by the engine tests: a logits recorder and a reference check against transformers."""

from __future__ import annotations

import torch

from qwenlab.engine import LLMEngine, SamplingParams


class LogitsRecorder:
    """Wraps the engine's sampler and keeps every logits row it samples from, per (request, index)."""

    def __init__(self, engine: LLMEngine):
        self.sampler = engine.sampler
        self.rows: dict[tuple[str, int], list[torch.Tensor]] = {}
        engine.sampler = self

    def __call__(self, logits, seqs, end_ids=()):
        for row, seq in zip(logits, seqs):
            self.rows.setdefault((seq.request_id, seq.index), []).append(row.float().clone())
        return self.sampler(logits, seqs, end_ids)


def make_engine(directory, **kwargs) -> LLMEngine:
    defaults = dict(dtype="float32", block_size=4, kv_cache_memory=2**21, log_stats=False, seed=0)
    return LLMEngine(directory, **{**defaults, **kwargs})


def run_all(engine: LLMEngine, requests: dict, late: dict | None = None, late_step: int = 3) -> dict:
    """Add ``requests`` (id -> (prompt ids, params)); ``late`` ones join after ``late_step`` steps."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finished, step = {}, 0
    while engine.has_unfinished_requests() or (late and step <= late_step):
        if late and step == late_step:
            for rid, (prompt, params) in late.items():
                engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
    return finished


def greedy(max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def assert_logits_match(hf_model, prompt: list[int], output_ids: list[int], rows: list[torch.Tensor],
                        rtol: float = 1e-4) -> None:
    """Each recorded row equals transformers' logits at that position of a full forward, within rtol."""
    tokens = prompt + output_ids
    with torch.no_grad():
        reference = hf_model(torch.tensor([tokens])).logits[0].float()
    assert len(rows) == len(output_ids), (len(rows), len(output_ids))
    for i, row in enumerate(rows):
        ref = reference[len(prompt) - 1 + i]
        err = (row - ref).abs().max().item() / ref.abs().max().item()
        assert err <= rtol, f"position {len(prompt) + i}: relative error {err:.2e}"


def random_prompts(lengths, vocab: int = 384, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def single_thread():
    """Tiny models run fastest on one thread, and two pytest workers then share the two cores cleanly."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ScriptedSampler:
    """Replaces the engine's sampler: each request 'samples' the tokens of its script, then ``end``.

    Lets tests drive the engine's text handling (stop strings, thinking budget, parsing) with exact
    token sequences while the model still runs every step.
    """

    def __init__(self, engine: LLMEngine, scripts: dict[str, list[int]] | None = None, end: int | None = None):
        self.scripts = scripts or {}
        self.default: list[int] = []
        self.end = end if end is not None else (engine.end_token_ids[0] if engine.end_token_ids else 0)
        engine.sampler = self

    def __call__(self, logits, seqs, end_ids=()):
        tokens = []
        for seq in seqs:
            script = self.scripts.get(seq.request_id, self.default)
            done = seq.num_output_tokens
            tokens.append(script[done] if done < len(script) else self.end)
        return tokens, [None] * len(seqs)


def tokenizer_checkpoint(directory, generation: dict | None = None, **overrides):
    """A tiny Qwen3 model with the real Qwen3 tokenizer (vocab 151936, hidden 32, tied embeddings)."""
    from tests.conftest import qwenlab_checkpoint
    from tests.tokenizer_fixtures import QWEN3_GENERATION, make_checkpoint

    shape = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, max_position_embeddings=2048)
    path = qwenlab_checkpoint(directory, preset="qwen3-0.6b", **{**shape, **overrides})
    return make_checkpoint(path, generation=QWEN3_GENERATION if generation is None else generation)
