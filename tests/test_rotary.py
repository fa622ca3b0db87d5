"""RoPE cos/sin on CPU come from a per-position table: exactly the values computed for the positions at hand."""

from __future__ import annotations

import torch

from qwenlab.config import preset
from qwenlab.model.layers import RotaryEmbedding


def _direct(rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype):
    inv_freq, factor = rotary._inv_freq(positions)
    cos, sin = rotary._compute(positions, inv_freq, factor)
    return cos.to(dtype), sin.to(dtype)


def test_table_values_equal_direct_computation_bit_for_bit():
    for config in (preset("qwen3-0.6b"), preset("qwen2.5-0.5b", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                             "original_max_position_embeddings": 32768})):
        rotary = RotaryEmbedding(config)
        cases = [torch.tensor([0]), torch.tensor([[5, 6, 7]]), torch.arange(300).reshape(3, 100),
                 torch.tensor([9000, 17, 4095])]  # the last grows the table past its first 4,096 rows
        for positions in cases:
            for dtype in (torch.float32, torch.bfloat16):
                got, want = rotary(positions, dtype), _direct(rotary, positions, dtype)
                assert got[0].shape == (*positions.shape, config.head_dim) and got[0].dtype == dtype
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert rotary._table[1].shape[0] == 16384  # grown by doubling to cover position 9000


def test_positions_beyond_the_table_and_dynamic_rescaling_are_computed():
    rotary = RotaryEmbedding(preset("qwen3-0.6b"))
    far = torch.tensor([RotaryEmbedding.TABLE_MAX + 5])
    got = rotary(far, torch.float32)
    assert rotary._table is None  # not tabulated
    assert torch.equal(got[0], _direct(rotary, far, torch.float32)[0])
    dynamic = RotaryEmbedding(preset("qwen3-0.6b", max_position_embeddings=64,
                                     rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    long = torch.arange(100)
    got = dynamic(long, torch.float32)  # past max_position_embeddings: a rescaled inv_freq, computed per call
    assert torch.equal(got[0], _direct(dynamic, long, torch.float32)[0])
    short = torch.arange(10)
    assert torch.equal(dynamic(short, torch.float32)[1], _direct(dynamic, short, torch.float32)[1])
