"""Long context: a 32K-token prompt on a small YaRN-scaled model through chunked prefill, memory bounded."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import psutil
import pytest
import torch

from qwenlab.engine import SamplingParams
from tests.conftest import hf_checkpoint
from tests.test_engine_helpers import LogitsRecorder, make_engine, run_all, single_thread

_threads = pytest.fixture(autouse=True)(single_thread)

PROMPT_LEN = 32_000
CHUNK = 2048


class PeakRSS:
    """Highest resident set size seen while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _chunked_prefill(directory: str, prompt: list[int], budget: int):
    """Run in a fresh process: the engine's chunked prefill of ``prompt`` under a peak-RSS probe, after a short
    warm-up request (one-time loads stay out of the figure). Returns the sampled logits row, the engine's
    stats, the RSS growth and the tokens. Measured inside a pytest worker instead, the growth depended on
    what earlier tests had left in the allocator (~310 to ~520 MiB for the same run)."""
    torch.set_num_threads(1)
    warm = make_engine(directory, block_size=16, kv_cache_memory=budget, max_num_batched_tokens=CHUNK)
    run_all(warm, {"warm": (prompt[:64], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))})
    del warm  # libraries, compiled kernels and thread pools loaded once, outside the measurement
    with PeakRSS() as memory:
        engine = make_engine(directory, block_size=16, kv_cache_memory=budget, max_num_batched_tokens=CHUNK)
        recorder = LogitsRecorder(engine)
        out = run_all(engine, {"long": (prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))})
    [row] = recorder.rows[("long", 0)]
    return row, engine.stats(), memory.growth, out["long"].outputs[0].token_ids


def test_32k_prompt_yarn_chunked_prefill_matches_reference_with_bounded_memory(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    directory, hf = hf_checkpoint("qwen3", tmp_path / "long", seed=6, num_hidden_layers=1, hidden_size=32,
                                  intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=32768, rope_scaling=yarn)
    prompt = torch.randint(0, 384, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()
    budget = 32768 * 2 * 1 * 1 * 16 * 4  # exactly 32768 tokens of float32 KV (K and V, 1 layer, 1 head of 16)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        row, stats, growth, tokens = pool.submit(_chunked_prefill, str(directory), prompt, budget).result()
    assert stats["kv_tokens_total"] == 32768
    assert stats["max_step_tokens"] == CHUNK and stats["steps"] == -(-PROMPT_LEN // CHUNK)
    # KV budget (2 MiB), one chunk's activations and its [chunk, context] mask: far below the
    # 32K x 32K attention scores (4 GiB per head) an unchunked prefill would materialise.
    assert growth < 400 * 2**20, f"grew {growth / 2**20:.0f} MiB"
    with torch.no_grad():
        reference = hf(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1]
    assert (row - reference).abs().max().item() / reference.abs().max().item() <= 1e-4
    assert tokens == [int(reference.argmax())]
