"""RoPE cos/sin of a decode step run on one CPU thread (no OpenMP team forked between the engine's kernels),
with the same values, and the caller's thread count restored."""

from __future__ import annotations

import pytest
import torch

from qwenlab.config import preset
from qwenlab.model.layers import RotaryEmbedding, one_cpu_thread


@pytest.fixture(autouse=True)
def _restore_threads():
    """The tests set two intra-op threads; the worker's count is put back after each."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def _direct(rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype):
    inv_freq, factor = rotary._inv_freq(positions)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def test_small_position_sets_run_on_one_thread_with_unchanged_values(monkeypatch):
    torch.set_num_threads(2)
    seen = []
    cos = torch.Tensor.cos
    monkeypatch.setattr(torch.Tensor, "cos", lambda self: seen.append(torch.get_num_threads()) or cos(self))
    rotary = RotaryEmbedding(preset("qwen3-0.6b"))
    for positions, serial in ((torch.tensor([17]), True), (torch.arange(300).reshape(3, 100), True),
                              (torch.arange(RotaryEmbedding.SERIAL_POSITIONS + 1), False)):
        seen.clear()
        got = rotary(positions, torch.bfloat16)
        assert seen == [1 if serial else 2] and torch.get_num_threads() == 2
        want = _direct(rotary, positions, torch.bfloat16)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_one_cpu_thread_restores_the_count_even_on_error():
    torch.set_num_threads(2)
    try:
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            raise ValueError("boom")
    except ValueError:
        pass
    assert torch.get_num_threads() == 2
    with one_cpu_thread(torch.device("cpu"), enabled=False):
        assert torch.get_num_threads() == 2
