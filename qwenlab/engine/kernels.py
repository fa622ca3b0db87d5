"""CPU kernels for bf16 decode on x86 (AVX2 + FMA), compiled on first use with torch's C++ extension tools.

Why: on CPUs without native bf16 arithmetic (AVX2-only chips, e.g. this project's 2-core AMD EPYC),
stock PyTorch's bf16 matrix-vector products run far below memory bandwidth, and decode is nothing but
matrix-vector products. These kernels keep the weights in bf16 (half the bytes of fp32), widen each
8-value chunk to fp32 in registers (a shift: bf16 is the top half of an fp32) and accumulate with FMA,
so a weight byte is read from memory exactly once per step:

* ``linear_bf16(x, w, bias)``: y = x @ w.T for a few rows (decode batches), tiled 3 rows x 4 weight
  rows in registers, threads split the output features;
* ``paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)``: one query per
  sequence attends to its blocks in place (no gather copy), float or bf16 cache;
* ``moe_experts_bf16(x, expert_ids, weights, gate_up, down)``: SwiGLU experts for a few tokens, reading
  only the experts they route to;
* ``rms_norm(x, weight, eps)``: transformers' RMSNorm (and its roundings) in one call instead of seven ops.

Beyond decode, the same module holds the compute-bound CPU pieces that stock PyTorch runs slowly here:

* ``prefill_attention(q, k, v, scale, offset)``: causal prefill attention (GQA, a cached prefix) as flash
  attention on the BLAS sgemm, ~2x torch's SDPA at 512 tokens; ``attention_forward`` / ``_backward``: the
  same for training in float32 (documents as a first visible key per token; backward from the saved
  log-sum-exp, or the saved probabilities for rows of up to 256 tokens);
* training passes in float32, one vector pass each: ``softmax_xent_rows`` (LM head softmax - onehot),
  ``swiglu_train_forward`` / ``_backward`` (MoE experts), ``rms_norm_train_forward`` / ``_backward``,
  ``rope_train``; used by ``qwenlab.model.fused`` where ``fused.cpu_kernels()`` finds this module.

``SIMD_SOURCE`` (``exp8``, bf16 rounding of float lanes, the SwiGLU range) is shared with
``qwenlab.quant.kernels``.

``load()`` compiles (about a minute, once; cached by torch in ~/.cache/torch_extensions) and returns None
when the CPU lacks AVX2/FMA, no compiler works, or ``QWENLAB_KERNELS=0``: the engine then runs stock
PyTorch. ``use_bf16_kernels(model)`` routes a bf16 model's Linear layers and experts through them.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from torch import nn

from ..model.layers import MLP, Attention, RMSNorm
from ..model.moe import Experts

logger = logging.getLogger("qwenlab.engine")

# Vector helpers shared by both compiled extensions (this one and qwenlab.quant.kernels): each embeds the
# text in its own anonymous namespace.
SIMD_SOURCE = r"""
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// e^x on 8 lanes (Cephes expf polynomial, relative error ~2e-7); ~1e-38 below -87.3 and +inf from 88.38 on
// (2^128: the exponent field all ones), like expf's overflow, so silu(-100) is -0 as in torch
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(89.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
// float lanes rounded to the nearest bf16 value (ties to even; NaN stays NaN), when bf16 is set
inline __m256 round_bf16_8(__m256 x, bool bf16) {
  if (!bf16) return x;
  __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  u = _mm256_and_si256(u, _mm256_set1_epi32(int(0xffff0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(u), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
// g[i] = silu(g[i]) * u[i] for i in [i0, i1), with transformers' bf16 roundings when bf16 is set:
// rnd(rnd(silu(rnd(g))) * rnd(u)). The scalar tail does the same with round_one.
template <typename RoundOne>
inline void swiglu_range(float* g, const float* u, int64_t i0, int64_t i1, bool bf16, const RoundOne& round_one) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 gate = round_bf16_8(_mm256_loadu_ps(g + i), bf16);
    const __m256 silu = round_bf16_8(_mm256_div_ps(gate, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gate)))), bf16);
    _mm256_storeu_ps(g + i, round_bf16_8(_mm256_mul_ps(silu, round_bf16_8(_mm256_loadu_ps(u + i), bf16)), bf16));
  }
  for (; i < i1; i++) {
    const float gate = round_one(g[i]);
    g[i] = round_one(round_one(gate / (1.f + std::exp(-gate))) * round_one(u[i]));
  }
}
"""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <type_traits>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <unistd.h>
#include <dlfcn.h>
#include <algorithm>

namespace {
@SIMD@

// ---- a small work-sharing pool -----------------------------------------------------------------------
// OpenMP's fork/join waits at every region's end for all its threads; on a shared, oversubscribed
// machine one descheduled thread stalls every small kernel for a whole scheduler slice. Here the caller
// claims chunks itself and only waits for chunks a helper has actually started: a helper that is not
// running simply takes nothing. Helpers spin briefly between calls (decode issues them back to back),
// then sleep on a condition variable.
class WorkPool {
 public:
  static WorkPool& get() {
    static std::mutex creation;
    static WorkPool* pool = nullptr;
    static int owner = 0;
    std::lock_guard<std::mutex> lock(creation);
    if (pool == nullptr || owner != getpid()) {  // first use, or a forked child: helpers do not survive fork
      const int cores = std::max<int>(1, std::thread::hardware_concurrency());
      pool = new WorkPool(std::min(63, std::max(cores, at::get_num_threads()) - 1));  // never destroyed
      owner = getpid();
    }
    return *pool;
  }

  // Runs fn(i) for i in [0, n) on the caller and the helpers; returns when all are done.
  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    const int threads = std::min<int>(at::get_num_threads(), int(helpers_) + 1);
    if (n <= 1 || threads <= 1 || inside_ || n >= (1 << 20)) {
      for (int64_t i = 0; i < n; i++) fn(i);
      return;
    }
    fn_ = &fn;
    active_helpers_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 40) + 1;
    state_.store(((gen & 0xffffff) << 40) | (uint64_t(n) << 20), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    inside_ = true;
    work(gen & 0xffffff);
    inside_ = false;
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; spins++) {
      if (spins < 100000) _mm_pause();
      else std::this_thread::yield();
    }
  }

 private:
  explicit WorkPool(int helpers) : helpers_(helpers) {
    for (int i = 0; i < helpers; i++) std::thread([this, i] { helper(i); }).detach();
  }

  // Claim and run chunks of generation gen until none is left.
  void work(uint64_t gen) {
    while (true) {
      uint64_t s = state_.load(std::memory_order_acquire);
      const uint64_t g = s >> 40, n = (s >> 20) & 0xfffff, next = s & 0xfffff;
      if (g != gen || next >= n) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      (*fn_)(int64_t(next));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void helper(int index) {
    inside_ = true;
    uint64_t seen = 0;
    auto idle_since = std::chrono::steady_clock::now();
    int spins = 0;
    while (true) {
      const uint64_t gen = state_.load(std::memory_order_acquire) >> 40;
      if (gen != seen) {
        seen = gen;
        if (index < active_helpers_.load(std::memory_order_relaxed)) work(gen);
        idle_since = std::chrono::steady_clock::now();
        continue;
      }
      // Stay awake a while: a decode step issues its kernels tens of microseconds apart.
      if ((++spins & 255) != 0 || std::chrono::steady_clock::now() - idle_since < std::chrono::microseconds(SPIN_US)) {
        _mm_pause();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      wake_.wait(lock, [&] { return (state_.load(std::memory_order_seq_cst) >> 40) != seen; });
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      spins = 0;
    }
  }

  static constexpr int SPIN_US = 300;
  const int helpers_;
  std::atomic<uint64_t> state_{0};  // generation (24 bits) | chunk count (20) | next chunk (20)
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> active_helpers_{0};
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::mutex mutex_;
  std::condition_variable wake_;
  static thread_local bool inside_;
};
thread_local bool WorkPool::inside_ = false;

int64_t chunks_per_thread = 4;

// parallel_for over [begin, end) in about chunks_per_thread chunks per thread (at least grain items each).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t total = end - begin;
  if (total <= 0) return;
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t per = chunks_per_thread;
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), (total + per * threads - 1) / (per * threads));
  const int64_t chunks = (total + chunk - 1) / chunk;
  const std::function<void(int64_t)> body = [&](int64_t i) {
    f(begin + i * chunk, std::min(end, begin + (i + 1) * chunk));
  };
  WorkPool::get().run(chunks, body);
}

inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 float
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline float to_f(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline float to_f(float f) { return f; }
inline uint16_t to_bf16(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Softmax pieces over float rows, 8 lanes at a time (decode and prefill/training attention, the LM-head loss):
// the largest of p[lo, hi); p[i] = exp(p[i] - m) over [lo, hi), returning their sum; p[0, n) *= s.
inline float max_range(const float* p, int64_t lo, int64_t hi) {
  __m256 vm = _mm256_set1_ps(-INFINITY);
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(p + i));
  float m = hmax8(vm);
  for (; i < hi; i++) m = std::max(m, p[i]);
  return m;
}
inline float exp_range(float* p, int64_t lo, int64_t hi, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), vm));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; i < hi; i++) { p[i] = std::exp(p[i] - m); sum += p[i]; }
  return sum;
}
inline void scale_range(float* p, int64_t n, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, _mm256_mul_ps(vs, _mm256_loadu_ps(p + i)));
  for (; i < n; i++) p[i] *= s;
}

// acc[i][j] = x[i, :] . w[j, :] for an MT x NT tile; x float rows (stride ldx), w bf16 rows (stride ldw).
template <int MT, int NT, typename WT>
inline void dot_tile(const float* x, int64_t ldx, const WT* w, int64_t ldw, int64_t K, float* out,
                     int64_t ldo) {
  __m256 acc[MT][NT];
  for (int i = 0; i < MT; i++)
    for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MT];
    for (int i = 0; i < MT; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
    for (int j = 0; j < NT; j++) {
      __m256 wv = load8(w + j * ldw + k);
      for (int i = 0; i < MT; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MT; i++)
    for (int j = 0; j < NT; j++) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; kk++) s += x[i * ldx + kk] * to_f(w[j * ldw + kk]);
      out[i * ldo + j] = s;
    }
}

inline void store(float* dst, float v) { *dst = v; }
inline void store(uint16_t* dst, float v) { *dst = to_bf16(v); }

// out[m, n0:n1] (row stride N) = x[m, :] . w[n, :] (+ bias[n]) for every m < M; OutT float or bf16.
template <int MT, int NT, typename OutT>
void rows_range(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, OutT* out,
                int64_t N, const float* bias) {
  float tile[MT * NT];
  auto emit = [&](int64_t m, int64_t n, int mt, int nt) {
    for (int i = 0; i < mt; i++)
      for (int j = 0; j < nt; j++) store(out + (m + i) * N + n + j, tile[i * nt + j] + (bias ? bias[n + j] : 0.f));
  };
  int64_t n = n0;
  for (; n + NT <= n1; n += NT) {
    int64_t m = 0;
    for (; m + MT <= M; m += MT) {
      dot_tile<MT, NT>(x + m * K, K, w + n * K, K, K, tile, NT);
      emit(m, n, MT, NT);
    }
    for (; m < M; m++) {
      dot_tile<1, NT>(x + m * K, K, w + n * K, K, K, tile, NT);
      emit(m, n, 1, NT);
    }
  }
  for (; n < n1; n++)
    for (int64_t m = 0; m < M; m++) {
      dot_tile<1, 1>(x + m * K, K, w + n * K, K, K, tile, 1);
      emit(m, n, 1, 1);
    }
}

// Many rows (prefill, batched decode): the classic outer-product GEMM micro-kernel. A block of 16 weight
// rows is widened to float and packed k-major (wp[k][16], in L1/L2), then each tile of 6 rows of x
// accumulates a 6 x 16 output block in 12 registers: per k, two weight loads, six broadcasts, 12 FMAs.
template <int MR>
inline void tile_6x16(const float* x, int64_t K, const float* wp, float* tile) {
  __m256 c[MR][2];
  for (int i = 0; i < MR; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const __m256 w0 = _mm256_loadu_ps(wp + k * 16), w1 = _mm256_loadu_ps(wp + k * 16 + 8);
    for (int i = 0; i < MR; i++) {
      const __m256 b = _mm256_broadcast_ss(x + i * K + k);
      c[i][0] = _mm256_fmadd_ps(b, w0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(b, w1, c[i][1]);
    }
  }
  for (int i = 0; i < MR; i++) {
    _mm256_storeu_ps(tile + i * 16, c[i][0]);
    _mm256_storeu_ps(tile + i * 16 + 8, c[i][1]);
  }
}

// Widen 8 rows x 8 columns of bf16 weights and transpose them into wp[k][16] (columns j0..j0+7).
inline void pack_8x8(const uint16_t* w, int64_t K, int64_t rows, int64_t k, float* dst) {
  __m256 r[8];
  for (int i = 0; i < 8; i++) r[i] = i < rows ? load8(w + i * K + k) : _mm256_setzero_ps();
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; i++) {
    _mm256_storeu_ps(dst + i * 16, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * 16, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}

// wp[k][j] = w[n + j][k] as float for j < 16 (zero beyond nr rows).
inline void pack_block(const uint16_t* w, int64_t K, int64_t nr, float* wp) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    pack_8x8(w, K, std::min<int64_t>(8, nr), k, wp + k * 16);
    pack_8x8(w + 8 * K, K, std::max<int64_t>(0, nr - 8), k, wp + k * 16 + 8);
  }
  for (; k < K; k++)
    for (int64_t j = 0; j < 16; j++) wp[k * 16 + j] = j < nr ? to_f(w[j * K + k]) : 0.f;
}

template <typename OutT>
void rows_range_packed(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                       OutT* out, int64_t N, const float* bias) {
  constexpr int NR = 16, MR = 6;
  std::vector<float> wp(K * NR);
  float tile[MR * NR];
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = std::min<int64_t>(NR, n1 - n);
    pack_block(w + n * K, K, nr, wp.data());
    for (int64_t m = 0; m < M; m += MR) {
      const int64_t mr = std::min<int64_t>(MR, M - m);
      switch (mr) {
        case 6: tile_6x16<6>(x + m * K, K, wp.data(), tile); break;
        case 5: tile_6x16<5>(x + m * K, K, wp.data(), tile); break;
        case 4: tile_6x16<4>(x + m * K, K, wp.data(), tile); break;
        case 3: tile_6x16<3>(x + m * K, K, wp.data(), tile); break;
        case 2: tile_6x16<2>(x + m * K, K, wp.data(), tile); break;
        default: tile_6x16<1>(x + m * K, K, wp.data(), tile); break;
      }
      for (int64_t i = 0; i < mr; i++)
        for (int64_t j = 0; j < nr; j++)
          store(out + (m + i) * N + n + j, tile[i * NR + j] + (bias ? bias[n + j] : 0.f));
    }
  }
}

// One row of x (batch-1 decode): pure bandwidth. Each thread streams its weight rows strictly in
// order (one long sequential read the hardware prefetcher follows) with four accumulators, and asks
// for the data gemv_prefetch bytes (1 KiB) ahead.
int64_t gemv_prefetch = 1024;
template <typename OutT>
void gemv_rows(const float* x, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, OutT* out, const float* bias) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* row = w + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k < K32; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row + k) + gemv_prefetch, _MM_HINT_T0);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(row + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(row + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8(row + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8(row + k + 24), a3);
    }
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) sum += x[k] * to_f(row[k]);
    store(out + n, sum + (bias ? bias[n] : 0.f));
  }
}

// Prefill-sized products (>= 128 rows) are compute-bound: widen ~2 MiB of weights at a time to float and
// call the BLAS sgemm, about 15% faster than the register tiles on an idle machine (slower on an
// oversubscribed one, where its OpenMP threads wait for each other). 0 turns it off.
int64_t blas_min_rows = 128;
// From this many rows on, the packed outer-product kernel; below, register tiles over bf16 rows directly.
int64_t packed_min_rows = 0;  // 0 = never: on AVX2 the direct 3x4 tiles measured faster (bench notes)

template <typename OutT>
void gemm_blas(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, OutT* out, const float* bias) {
  auto xt = torch::from_blob(const_cast<float*>(x), {M, K}, torch::kFloat);
  auto wt = torch::from_blob(const_cast<uint16_t*>(w), {N, K}, torch::kBFloat16);
  // about 1,024 weight rows a block in equal blocks (no small rest), at most 16M values: the sgemm held
  // 155-180 GFLOP/s on every 512 x K x N shape of Qwen2.5-0.5B / Qwen3-0.6B, where 2 MiB blocks
  // (108 rows of K = 4,864) fell to about 140 (same rule as qwenlab.quant's prefill blocks)
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(1024, (int64_t(1) << 24) / K));
  const int64_t blocks = (N + rows - 1) / rows, chunk = (N + blocks - 1) / blocks;
  auto wf = torch::empty({chunk, K}, torch::kFloat);  // one float block, reused
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t c = std::min(chunk, N - n0);
    auto wc = wf.narrow(0, 0, c);
    wc.copy_(wt.narrow(0, n0, c));
    // everything here runs on ATen's (OpenMP) threads, as the sgemm does: the work pool's helpers would
    // spin beside OpenMP's between the calls
    if constexpr (std::is_same<OutT, float>::value) {  // the sgemm writes the output columns in place
      auto ov = torch::from_blob(out + n0, {M, c}, {N, 1}, torch::kFloat);
      at::mm_out(ov, xt, wc.t());
      if (bias) ov.add_(torch::from_blob(const_cast<float*>(bias + n0), {c}, torch::kFloat));
    } else {
      auto y = at::mm(xt, wc.t());
      const float* yp = y.data_ptr<float>();
      at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; m++)
          for (int64_t j = 0; j < c; j++) store(out + m * N + n0 + j, yp[m * c + j] + (bias ? bias[n0 + j] : 0.f));
      });
    }
  }
}

// Whether M rows take the BLAS route (prefill): then the work around the sgemm runs on ATen's threads too.
inline bool blas_rows(int64_t M) { return blas_min_rows > 0 && M >= blas_min_rows; }

template <typename OutT>
void gemm_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, OutT* out,
               const float* bias = nullptr) {
  constexpr int64_t BLOCK = 16;
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  if (blas_rows(M)) {
    gemm_blas(x, M, K, w, N, out, bias);
    return;
  }
  if (packed_min_rows > 0 && M >= packed_min_rows) {  // each weight block is widened once and serves every row of x
    parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      rows_range_packed(x, M, K, w, b0 * BLOCK, std::min(N, b1 * BLOCK), out, N, bias);
    });
    return;
  }
  parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    int64_t n0 = b0 * BLOCK, n1 = std::min(N, b1 * BLOCK);
    if (M == 1) gemv_rows(x, K, w, n0, n1, out, bias);
    else if (M == 2) rows_range<2, 6>(x, M, K, w, n0, n1, out, N, bias);
    else rows_range<3, 4>(x, M, K, w, n0, n1, out, N, bias);
  });
}

// A float copy of x ([M, K], float or bf16, contiguous), or x itself when already float.
const float* as_float(const torch::Tensor& x, std::vector<float>& buffer) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "expected float32 or bfloat16 activations");
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  buffer.resize(x.numel());
  for (int64_t i = 0; i < x.numel(); i++) buffer[i] = to_f(src[i]);
  return buffer.data();
}

}  // namespace

// y = x @ w.T (+ bias): w bf16 [N, K]; x [..., K] float or bf16; y in x's dtype, accumulated in float.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2, "w: contiguous bf16 [N, K]");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K, "x and w disagree on K");
  auto sizes = x.sizes().vec();
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<float> xbuf, bbuf;
  const float* xp = as_float(x2, xbuf);
  const float* bp = nullptr;
  torch::Tensor bias_f;
  if (bias.has_value()) {
    bias_f = bias->to(at::kFloat).contiguous();
    bp = bias_f.data_ptr<float>();
  }
  sizes.back() = N;
  auto out = torch::empty(sizes, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  if (x.scalar_type() == at::kBFloat16)
    gemm_bf16(xp, M, K, wp, N, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), bp);
  else
    gemm_bf16(xp, M, K, wp, N, out.data_ptr<float>(), bp);
  return out;
}

// Read bandwidth probe for the benchmarks: sums a float buffer with all threads (AVX2 loads, prefetch).
double read_sum(torch::Tensor buffer) {
  const float* p = buffer.data_ptr<float>();
  const int64_t n = buffer.numel() / 64 * 64;
  const int64_t chunk = 1 << 20, chunks = (n + chunk - 1) / chunk;
  std::vector<double> partial(chunks, 0.0);
  parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = c0 * chunk; i < std::min(n, c1 * chunk); i += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + 2048, _MM_HINT_T0);
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    partial[c0] += hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

// The work pool for other extensions (qwenlab.quant.kernels): fn(ctx, i) for i in [0, n) on this module's
// pool, so one pool serves the process (two pools' spinning helpers would fight over the cores).
extern "C" void qwenlab_pool_run(int64_t n, void (*fn)(void*, int64_t), void* ctx) {
  const std::function<void(int64_t)> body = [&](int64_t i) { fn(ctx, i); };
  WorkPool::get().run(n, body);
}
int64_t pool_run_address() { return reinterpret_cast<int64_t>(&qwenlab_pool_run); }

// Tuning hook: rows from which gemm_bf16 hands the arithmetic to the BLAS (0 = never).
void set_blas_min_rows(int64_t rows) { blas_min_rows = rows; }
void set_packed_min_rows(int64_t rows) { packed_min_rows = rows; }
void set_chunks_per_thread(int64_t chunks) { chunks_per_thread = std::max<int64_t>(1, chunks); }

// transformers' RMSNorm: statistics in float, normalised value rounded to x's dtype, then times weight
// (rounded again when bf16). x [..., D] float or bf16 contiguous; weight [D] of x's dtype.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  auto xc = x.contiguous();
  const int64_t D = xc.size(-1), rows = xc.numel() / D;
  auto out = torch::empty_like(xc);
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || xc.scalar_type() == at::kFloat, "rms_norm: float32 or bfloat16");
  TORCH_CHECK(weight.scalar_type() == xc.scalar_type() && weight.is_contiguous(), "rms_norm: weight dtype");
  parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float sum = 0.f;
      if (bf16) {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) + r * D;
        const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
        uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + r * D;
        for (int64_t d = 0; d < D; d++) { const float v = to_f(src[d]); sum += v * v; }
        const float scale = 1.f / std::sqrt(sum / D + float(eps));
        for (int64_t d = 0; d < D; d++) dst[d] = to_bf16(to_f(w[d]) * to_f(to_bf16(to_f(src[d]) * scale)));
      } else {
        const float* src = xc.data_ptr<float>() + r * D;
        const float* w = weight.data_ptr<float>();
        float* dst = out.data_ptr<float>() + r * D;
        for (int64_t d = 0; d < D; d++) sum += src[d] * src[d];
        const float scale = 1.f / std::sqrt(sum / D + float(eps));
        for (int64_t d = 0; d < D; d++) dst[d] = w[d] * (src[d] * scale);
      }
    }
  });
  return out;
}

// Decode attention over a paged cache, one query token per sequence.
// q [B, H, D]; caches [blocks, block_size, KVH, D] (float or bf16); block_tables [B, max_blocks] int32;
// context_lens [B] int32. Returns [B, H, D] in q's dtype.
// Keys/values of one KV head sit KVH * D apart in the cache (2 KiB for 8 bf16 heads of 128): two rows a
// 4 KiB page, where the hardware's stride prefetch stops, so each row would wait on memory. The loops fetch
// the row decode_prefetch_keys ahead themselves: batch 4 x 4,096 context (16 heads / 8 KV heads of 128,
// bf16) 6.0-6.4 ms vs 11.3-17.0 without, 512 context 0.6-0.8 vs 0.8-1.0 (4, 8 and 16 keys ahead alike).
int64_t decode_prefetch_keys = 8;
template <typename T>
inline void prefetch_row(const T* cache, const int32_t* table, int64_t t, int64_t bs, int64_t KVH, int64_t h, int64_t D) {
  const char* p = reinterpret_cast<const char*>(cache + ((int64_t(table[t / bs]) * bs + t % bs) * KVH + h) * D);
  for (int64_t off = 0; off < D * int64_t(sizeof(T)); off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

template <typename T>
void paged_decode_impl(const float* q, const T* kc, const T* vc, const int32_t* tables, const int32_t* lens,
                       float* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t bs, int64_t max_blocks,
                       float scale) {
  const int64_t G = H / KVH;
  parallel_for(0, B * KVH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    std::vector<float> acc(G * D);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / KVH, h = i % KVH, len = lens[b];
      const int32_t* table = tables + b * max_blocks;
      scores.resize(G * len);
      const float* qg = q + (b * H + h * G) * D;
      for (int64_t t = 0; t < len; t++) {
        const T* k = kc + ((int64_t(table[t / bs]) * bs + t % bs) * KVH + h) * D;
        if (t + decode_prefetch_keys < len) prefetch_row(kc, table, t + decode_prefetch_keys, bs, KVH, h, D);
        for (int64_t g = 0; g < G; g++) {
          __m256 s = _mm256_setzero_ps();
          int64_t d = 0;
          for (; d + 8 <= D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(qg + g * D + d), load8(k + d), s);
          float v = hsum(s);
          for (; d < D; d++) v += qg[g * D + d] * to_f(k[d]);
          scores[g * len + t] = v * scale;
        }
      }
      for (int64_t g = 0; g < G; g++) {  // softmax over the context
        float* s = scores.data() + g * len;
        scale_range(s, len, 1.f / exp_range(s, 0, len, max_range(s, 0, len)));
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; t++) {
        const T* v = vc + ((int64_t(table[t / bs]) * bs + t % bs) * KVH + h) * D;
        if (t + decode_prefetch_keys < len) prefetch_row(vc, table, t + decode_prefetch_keys, bs, KVH, h, D);
        for (int64_t g = 0; g < G; g++) {
          const __m256 p = _mm256_set1_ps(scores[g * len + t]);
          float* a = acc.data() + g * D;
          int64_t d = 0;
          for (; d + 8 <= D; d += 8) _mm256_storeu_ps(a + d, _mm256_fmadd_ps(p, load8(v + d), _mm256_loadu_ps(a + d)));
          for (; d < D; d++) a[d] += scores[g * len + t] * to_f(v[d]);
        }
      }
      std::memcpy(out + (b * H + h * G) * D, acc.data(), sizeof(float) * G * D);
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto qf = q.to(at::kFloat).contiguous();
  auto tables = block_tables.to(at::kInt).contiguous();
  auto lens = context_lens.to(at::kInt).contiguous();
  const int64_t B = qf.size(0), H = qf.size(1), D = qf.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  auto out = torch::empty_like(qf);
  if (k_cache.scalar_type() == at::kBFloat16) {
    paged_decode_impl(qf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>()),
                      reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>()), tables.data_ptr<int32_t>(),
                      lens.data_ptr<int32_t>(), out.data_ptr<float>(), B, H, KVH, D, bs, tables.size(1), float(scale));
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "cache must be float32 or bfloat16");
    paged_decode_impl(qf.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                      tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), out.data_ptr<float>(), B, H, KVH, D, bs,
                      tables.size(1), float(scale));
  }
  return out.to(q.scalar_type());
}

// ---- causal attention on MKL's sgemm: prefill (engine) and training (forward + backward) ---------------
// Flash-attention order (online softmax over key blocks) with every product on the BLAS: each task is one
// (batch row, KV head) and a block of query rows of all its G query heads stacked (~128 rows, so the sgemm
// sees [128 x D] . [D x 256] and [128 x 256] . [256 x D]); tasks go heaviest first to whichever thread is
// free. Query i (of n, after `offset` earlier keys) sees keys [lo_i, offset + i], lo_i its document's first
// position (0 without documents). At 512 tokens this is about 2x torch's CPU flash attention on
// Qwen3-0.6B / Qwen2.5-0.5B heads, 1.2-1.3x at 2K. The sgemm is looked up at run time (torch's MKL exports
// the Fortran symbol): without one, Python keeps SDPA / the blocked attention.
namespace {
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                          const int*, const float*, const int*, const float*, float*, const int*);
sgemm_fn find_sgemm() {  // torch's own (MKL, 32-bit integers) first, then whatever the process has
  void* f = nullptr;
  if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) f = dlsym(lib, "sgemm_");
  if (!f) f = dlsym(RTLD_DEFAULT, "sgemm_");
  return reinterpret_cast<sgemm_fn>(f);
}
const sgemm_fn sgemm_ = find_sgemm();

constexpr int64_t BK = 256;  // keys per block

// row-major C[M, N] = alpha A[M, K] . B[N, K]^T + beta C
inline void gemm_nt(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
                    float* C, int ldc) {
  sgemm_("T", "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
// row-major C[M, N] = alpha A[M, K] . B[K, N] + beta C
inline void gemm_nn(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
                    float* C, int ldc) {
  sgemm_("N", "N", &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
// row-major C[M, N] = A[K, M]^T . B[K, N] + beta C
inline void gemm_tn(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float beta, float* C,
                    int ldc) {
  const float one = 1.f;
  sgemm_("N", "T", &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

struct AttnShape {
  int64_t B, H, KVH, n, D, offset;
  int64_t qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst;  // strides of q [B, H, n, D], k/v [B, KVH, ctx, D]
  int64_t osb, osh, ost;  // strides of the output [B, H, n, D] (training: the [B, n, H, D] memory o_proj reads)
  const int32_t* lo = nullptr;  // [B, n] first visible key of each query (documents), or null: 0
  int64_t rows = 128;  // query rows per task, all heads of a group (prefill 128; training 64, measured)
  int64_t G() const { return H / KVH; }
  int64_t rows_per_head() const { return std::max<int64_t>(8, std::min<int64_t>(n, rows / G())); }
  int64_t first_key(int64_t b, int64_t i) const { return lo ? lo[b * n + i] : 0; }
};

// rows [r0, r1) of a block: visible columns [c_lo, c_hi) of the key block starting at c0 (length bk)
inline void visible(const AttnShape& s, int64_t b, int64_t i, int64_t c0, int64_t bk, int64_t& c_lo, int64_t& c_hi) {
  c_lo = std::min(bk, std::max<int64_t>(0, s.first_key(b, i) - c0));
  c_hi = std::min(bk, std::max<int64_t>(0, s.offset + i + 1 - c0));
  if (c_hi < c_lo) c_hi = c_lo;
}

// ordered task list: (batch row, KV head, query block), heaviest first
std::vector<int64_t> attention_tasks(const AttnShape& s, int64_t bq, int64_t qblocks) {
  std::vector<int64_t> tasks(s.B * s.KVH * qblocks);
  for (int64_t t = 0; t < int64_t(tasks.size()); t++) tasks[t] = t;
  auto cost = [&](int64_t t) {
    const int64_t qb = t % qblocks, b = t / (s.KVH * qblocks);
    const int64_t i0 = qb * bq, i1 = std::min(s.n, i0 + bq);
    return s.offset + i1 - s.first_key(b, i0);
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](int64_t a, int64_t c) { return cost(a) > cost(c); });
  return tasks;
}

// Forward: out [B, H, n, D] (T, strides s.osb/osh/ost), lse [B, H, n] (log-sum-exp of the scaled scores) if not
// null.
template <typename T>
// probs (training, rows of at most BK keys): the normalised probabilities of each task, [task][R][BK]
// (task = (b * KVH + h) * qblocks + qb), zeros outside the visible keys; null: not kept.
void attention_forward_impl(const AttnShape& s, const T* q, const T* k, const T* v, T* out, float* lse, float scale,
                            float* probs = nullptr) {
  const int64_t G = s.G(), D = s.D, n = s.n, bq = s.rows_per_head();
  const int64_t qblocks = (n + bq - 1) / bq;
  const std::vector<int64_t> tasks = attention_tasks(s, bq, qblocks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t R = G * bq;
    std::vector<float> Q(R * D), O(R * D), S(R * BK), m(R), l(R), Kb, Vb;
    if (!std::is_same<T, float>::value) { Kb.resize(BK * D); Vb.resize(BK * D); }
    for (int64_t ti; (ti = next.fetch_add(1)) < int64_t(tasks.size());) {
      const int64_t t = tasks[ti], qb = t % qblocks, h = (t / qblocks) % s.KVH, b = t / (s.KVH * qblocks);
      const int64_t i0 = qb * bq, i1 = std::min(n, i0 + bq), rows = i1 - i0, Rr = G * rows;
      for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < rows; i++) {
          const T* src = q + b * s.qsb + (h * G + g) * s.qsh + (i0 + i) * s.qst;
          float* dst = Q.data() + (g * rows + i) * D;
          for (int64_t d = 0; d < D; d++) dst[d] = to_f(src[d]) * scale;
        }
      std::fill(m.begin(), m.begin() + Rr, -INFINITY);
      std::fill(l.begin(), l.begin() + Rr, 0.f);
      const T* kh = k + b * s.ksb + h * s.ksh;
      const T* vh = v + b * s.vsb + h * s.vsh;
      const int64_t kbegin = s.first_key(b, i0), kend = s.offset + i1;
      for (int64_t c0 = kbegin; c0 < kend; c0 += BK) {
        const bool first = c0 == kbegin;
        const int64_t bk = std::min(BK, kend - c0);
        const float *kp, *vp;
        int64_t ldk, ldv;
        if constexpr (std::is_same<T, float>::value) {
          kp = kh + c0 * s.kst; ldk = s.kst; vp = vh + c0 * s.vst; ldv = s.vst;
        } else {
          for (int64_t c = 0; c < bk; c++) {
            const T* ks = kh + (c0 + c) * s.kst;
            const T* vs = vh + (c0 + c) * s.vst;
            for (int64_t d = 0; d < D; d++) { Kb[c * D + d] = to_f(ks[d]); Vb[c * D + d] = to_f(vs[d]); }
          }
          kp = Kb.data(); vp = Vb.data(); ldk = ldv = D;
        }
        gemm_nt(Rr, bk, D, 1.f, Q.data(), D, kp, ldk, 0.f, S.data(), BK);
        for (int64_t r = 0; r < Rr; r++) {
          int64_t lo, hi;
          visible(s, b, i0 + r % rows, c0, bk, lo, hi);
          float* sr = S.data() + r * BK;
          if (lo == hi) {  // nothing visible in this block: the row adds nothing
            std::fill(sr, sr + (probs ? BK : bk), 0.f);
            if (first) std::fill(O.data() + r * D, O.data() + (r + 1) * D, 0.f);
            continue;
          }
          const float mnew = std::max(m[r], max_range(sr, lo, hi));
          const float sum = exp_range(sr, lo, hi, mnew);
          std::fill(sr, sr + lo, 0.f);
          std::fill(sr + hi, sr + (probs ? BK : bk), 0.f);
          const float alpha = std::exp(m[r] - mnew);  // 0 while the row had nothing (m = -inf)
          l[r] = l[r] * alpha + sum;
          if (!first && alpha != 1.f) scale_range(O.data() + r * D, D, alpha);
          m[r] = mnew;
        }
        gemm_nn(Rr, D, bk, 1.f, S.data(), BK, vp, ldv, first ? 0.f : 1.f, O.data(), D);
      }
      for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < rows; i++) {
          const int64_t r = g * rows + i, row = (b * s.H + h * G + g) * n + i0 + i;
          const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
          T* dst = out + b * s.osb + (h * G + g) * s.osh + (i0 + i) * s.ost;
          const float* o = O.data() + r * D;
          for (int64_t d = 0; d < D; d++) store(dst + d, o[d] * inv);
          if (lse) lse[row] = m[r] + std::log(l[r]);
        }
      if (probs) {  // one key block (kend - kbegin <= BK): S holds this task's p, to be divided by l
        for (int64_t r = 0; r < Rr; r++) scale_range(S.data() + r * BK, BK, l[r] > 0.f ? 1.f / l[r] : 0.f);
        std::memcpy(probs + t * R * BK, S.data(), sizeof(float) * Rr * BK);
      }
    }
  });
}

// Backward of the float32 forward from its output and log-sum-exp (nothing else saved): per (batch row,
// KV head) task, for each query block and key block, P = exp(S - lse) recomputed, dP = dO . V^T,
// dS = P * (dP - rowsum(dO * O)), dQ += dS . K, dK += dS^T . (scale Q), dV += P^T . dO.
// With the forward's saved probabilities (one key block a task) the QK^T product and the exp are skipped.
// out and dq have the strides s.osb/osh/ost; dout its own (gs), dk and dv theirs (ks, [B, KVH, ctx, D]).
void attention_backward_impl(const AttnShape& s, const float* q, const float* k, const float* v, const float* out,
                             const float* lse, const float* dout, const int64_t* gs, float* dq, float* dk, float* dv,
                             const int64_t* ks, float scale, const float* probs = nullptr) {
  const int64_t G = s.G(), D = s.D, n = s.n, bq = s.rows_per_head(), ctx = s.offset + n;
  const int64_t qblocks = (n + bq - 1) / bq;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t R = G * bq;
    std::vector<float> Q(R * D), dO(R * D), dQ(R * D), S(R * BK), dP(R * BK), L(R), Dr(R), dK(ctx * D), dV(ctx * D);
    for (int64_t t; (t = next.fetch_add(1)) < s.B * s.KVH;) {
      const int64_t b = t / s.KVH, h = t % s.KVH;
      const float* kh = k + b * s.ksb + h * s.ksh;
      const float* vh = v + b * s.vsb + h * s.vsh;
      std::fill(dK.begin(), dK.end(), 0.f);
      std::fill(dV.begin(), dV.end(), 0.f);
      for (int64_t qb = 0; qb < qblocks; qb++) {
        const int64_t i0 = qb * bq, i1 = std::min(n, i0 + bq), rows = i1 - i0, Rr = G * rows;
        for (int64_t g = 0; g < G; g++)
          for (int64_t i = 0; i < rows; i++) {
            const int64_t r = g * rows + i, row = (b * s.H + h * G + g) * n + i0 + i;
            const float* qs = q + b * s.qsb + (h * G + g) * s.qsh + (i0 + i) * s.qst;
            const float* os = out + b * s.osb + (h * G + g) * s.osh + (i0 + i) * s.ost;
            const float* go = dout + b * gs[0] + (h * G + g) * gs[1] + (i0 + i) * gs[2];
            float dot = 0.f;
            for (int64_t d = 0; d < D; d++) {
              Q[r * D + d] = qs[d] * scale;
              dO[r * D + d] = go[d];
              dot += go[d] * os[d];
            }
            Dr[r] = dot;
            L[r] = lse[row];
          }
        const int64_t kbegin = s.first_key(b, i0), kend = s.offset + i1;
        for (int64_t c0 = kbegin; c0 < kend; c0 += BK) {
          const bool first = c0 == kbegin;
          const int64_t bk = std::min(BK, kend - c0);
          const float* P = S.data();
          gemm_nt(Rr, bk, D, 1.f, dO.data(), D, vh + c0 * s.vst, s.vst, 0.f, dP.data(), BK);
          if (probs) {  // saved: dS = P * (dP - D), zeros where P is
            P = probs + ((b * s.KVH + h) * qblocks + qb) * R * BK;
            for (int64_t r = 0; r < Rr; r++) {
              const float* pp = P + r * BK;
              float* pr = dP.data() + r * BK;
              const __m256 vd = _mm256_set1_ps(Dr[r]);
              int64_t c = 0;
              for (; c + 8 <= bk; c += 8)
                _mm256_storeu_ps(pr + c, _mm256_mul_ps(_mm256_loadu_ps(pp + c), _mm256_sub_ps(_mm256_loadu_ps(pr + c), vd)));
              for (; c < bk; c++) pr[c] = pp[c] * (pr[c] - Dr[r]);
            }
          } else {
            gemm_nt(Rr, bk, D, 1.f, Q.data(), D, kh + c0 * s.kst, s.kst, 0.f, S.data(), BK);
            for (int64_t r = 0; r < Rr; r++) {
              int64_t lo, hi;
              visible(s, b, i0 + r % rows, c0, bk, lo, hi);
              float* sr = S.data() + r * BK;
              float* pr = dP.data() + r * BK;
              const __m256 vl = _mm256_set1_ps(L[r]), vd = _mm256_set1_ps(Dr[r]);
              int64_t c = lo;
              for (; c + 8 <= hi; c += 8) {
                const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + c), vl));
                _mm256_storeu_ps(sr + c, p);
                _mm256_storeu_ps(pr + c, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(pr + c), vd)));
              }
              for (; c < hi; c++) { sr[c] = std::exp(sr[c] - L[r]); pr[c] = sr[c] * (pr[c] - Dr[r]); }
              std::fill(sr, sr + lo, 0.f); std::fill(sr + hi, sr + bk, 0.f);
              std::fill(pr, pr + lo, 0.f); std::fill(pr + hi, pr + bk, 0.f);
            }
          }
          // dV[c0:] += P^T dO, dK[c0:] += dS^T (scale Q), dQ += dS K
          gemm_tn(bk, D, Rr, P, BK, dO.data(), D, 1.f, dV.data() + c0 * D, D);
          gemm_tn(bk, D, Rr, dP.data(), BK, Q.data(), D, 1.f, dK.data() + c0 * D, D);
          gemm_nn(Rr, D, bk, scale, dP.data(), BK, kh + c0 * s.kst, s.kst, first ? 0.f : 1.f, dQ.data(), D);
        }
        for (int64_t g = 0; g < G; g++)
          for (int64_t i = 0; i < rows; i++) {
            const int64_t r = g * rows + i;
            std::memcpy(dq + b * s.osb + (h * G + g) * s.osh + (i0 + i) * s.ost, dQ.data() + r * D, sizeof(float) * D);
          }
      }
      for (int64_t c = 0; c < ctx; c++) {
        std::memcpy(dk + b * ks[0] + h * ks[1] + c * ks[2], dK.data() + c * D, sizeof(float) * D);
        std::memcpy(dv + b * ks[0] + h * ks[1] + c * ks[2], dV.data() + c * D, sizeof(float) * D);
      }
    }
  });
}

AttnShape attention_shape(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t offset,
                          const char* what) {
  TORCH_CHECK(sgemm_ != nullptr, what, ": no sgemm in this torch build");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, what, ": expected [batch, heads, tokens, head_dim]");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, what, ": head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), what, ": q, k, v dtypes differ");
  AttnShape s;
  s.B = q.size(0); s.H = q.size(1); s.n = q.size(2); s.D = q.size(3); s.KVH = k.size(1); s.offset = offset;
  const int64_t ctx = k.size(2);
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B && s.H % s.KVH == 0 && v.size(1) == s.KVH && v.size(2) == ctx &&
              k.size(3) == s.D && v.size(3) == s.D && ctx == offset + s.n,
              what, ": bad shapes (heads must be a multiple of KV heads, keys = offset + queries)");
  s.qsb = q.stride(0); s.qsh = q.stride(1); s.qst = q.stride(2);
  s.ksb = k.stride(0); s.ksh = k.stride(1); s.kst = k.stride(2);
  s.vsb = v.stride(0); s.vsh = v.stride(1); s.vst = v.stride(2);
  s.ost = s.D; s.osh = s.n * s.D; s.osb = s.H * s.n * s.D;  // contiguous [B, H, n, D] unless a caller changes it
  return s;
}
}  // namespace

bool has_sgemm() { return sgemm_ != nullptr; }

constexpr int64_t TRAIN_ROWS = 64;  // query rows per training task (32, 96, 128 measured 3-5% slower at S = 256)

// Engine prefill: q [1, H, n, D], k/v [1, KVH, offset + n, D] (float32 or bf16, any strides but head_dim's).
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale, int64_t offset) {
  AttnShape s = attention_shape(q, k, v, offset, "prefill_attention");
  TORCH_CHECK(s.B == 1, "prefill_attention: one sequence at a time");
  auto out = torch::empty({1, s.H, s.n, s.D}, q.options());
  if (q.scalar_type() == at::kFloat) {
    attention_forward_impl<float>(s, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                                  out.data_ptr<float>(), nullptr, float(scale));
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "prefill_attention: float32 or bfloat16 only");
    auto P = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
    attention_forward_impl<uint16_t>(s, P(q), P(k), P(v), reinterpret_cast<uint16_t*>(out.data_ptr()), nullptr,
                                     float(scale));
  }
  return out;
}

// Training, float32: q [B, H, S, D], k/v [B, KVH, S, D]; first_key [B, S] int32 (each token's document start)
// or an empty tensor (plain causal). Returns out [B, H, S, D], lse [B, H, S] and, with keep_probs and S <= 256,
// the probabilities for the backward (else an empty tensor).
std::vector<torch::Tensor> attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                                             torch::Tensor first_key, bool keep_probs) {
  AttnShape s = attention_shape(q, k, v, 0, "attention_forward");
  s.rows = TRAIN_ROWS;
  TORCH_CHECK(q.scalar_type() == at::kFloat, "attention_forward: float32 only");
  auto lo = first_key.numel() ? first_key.to(at::kInt).contiguous() : first_key;
  TORCH_CHECK(!lo.numel() || (lo.dim() == 2 && lo.size(0) == s.B && lo.size(1) == s.n), "attention_forward: first_key must be [B, S]");
  if (lo.numel()) s.lo = lo.data_ptr<int32_t>();
  // out [B, H, S, D] as a view of [B, S, H, D] memory: the layout o_proj reads (out.transpose(1, 2) is then
  // contiguous, no copy), and that the gradient of out comes back in
  auto out = torch::empty({s.B, s.n, s.H, s.D}, q.options()).transpose(1, 2);
  s.osb = out.stride(0); s.osh = out.stride(1); s.ost = out.stride(2);
  auto lse = torch::empty({s.B, s.H, s.n}, q.options());
  // rows of at most BK keys: keep the probabilities (B * KVH * qblocks * R * BK floats, ~4 MB a layer at
  // B 4, S 256) so the backward skips the QK^T product and the exp; longer rows recompute them
  torch::Tensor probs = q.new_empty({0});
  if (keep_probs && s.n <= BK) {
    const int64_t bq = s.rows_per_head(), qblocks = (s.n + bq - 1) / bq;
    probs = torch::empty({s.B * s.KVH * qblocks, s.G() * bq, BK}, q.options());
  }
  attention_forward_impl<float>(s, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                                lse.data_ptr<float>(), float(scale), probs.numel() ? probs.data_ptr<float>() : nullptr);
  return {out, lse, probs};
}

std::vector<torch::Tensor> attention_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                                              torch::Tensor lse, torch::Tensor grad_out, double scale,
                                              torch::Tensor first_key, torch::Tensor probs) {
  AttnShape s = attention_shape(q, k, v, 0, "attention_backward");
  s.rows = TRAIN_ROWS;
  TORCH_CHECK(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && lse.is_contiguous() &&
              out.dim() == 4 && out.size(0) == s.B && out.size(1) == s.H && out.size(2) == s.n && out.size(3) == s.D,
              "attention_backward: float32, saved out [B, H, S, D] and lse");
  auto o = out.stride(3) == 1 && out.is_non_overlapping_and_dense() ? out : out.contiguous();
  s.osb = o.stride(0); s.osh = o.stride(1); s.ost = o.stride(2);
  auto lo = first_key.numel() ? first_key.to(at::kInt).contiguous() : first_key;
  if (lo.numel()) s.lo = lo.data_ptr<int32_t>();
  auto g = grad_out.to(at::kFloat);
  if (g.stride(3) != 1) g = g.contiguous();
  const int64_t gs[3] = {g.stride(0), g.stride(1), g.stride(2)};
  // the gradients in the layouts of the projections that made q, k, v ([B, S, heads, D] memory): their
  // transposes back are then contiguous
  auto dq = torch::empty_strided(o.sizes(), o.strides(), q.options());
  auto dk = torch::empty({s.B, s.n, s.KVH, s.D}, q.options()).transpose(1, 2);
  auto dv = torch::empty({s.B, s.n, s.KVH, s.D}, q.options()).transpose(1, 2);
  const int64_t ks[3] = {dk.stride(0), dk.stride(1), dk.stride(2)};
  attention_backward_impl(s, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), o.data_ptr<float>(),
                          lse.data_ptr<float>(), g.data_ptr<float>(), gs, dq.data_ptr<float>(), dk.data_ptr<float>(),
                          dv.data_ptr<float>(), ks, float(scale), probs.numel() ? probs.data_ptr<float>() : nullptr);
  return {dq, dk, dv};
}

// ---- training element-wise passes (float32, CPU) ----------------------------------------------------------
// LM head + cross-entropy: each row of logits z [n, V] becomes softmax(z) - onehot(target) (the gradient of
// the row's loss) in one vectorised pass per row; returns the rows' log-sum-exp.
torch::Tensor softmax_xent_rows(torch::Tensor z, torch::Tensor targets) {
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.dim() == 2 && z.is_contiguous(), "softmax_xent_rows: contiguous float32 [n, V]");
  auto t = targets.to(at::kLong).contiguous();
  const int64_t n = z.size(0), V = z.size(1);
  TORCH_CHECK(t.numel() == n, "softmax_xent_rows: one target per row");
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; r++) TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "softmax_xent_rows: target ", tp[r], " out of range");
  auto lse = torch::empty({n}, z.options());
  float* zp = z.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* row = zp + r * V;
      const float mx = max_range(row, 0, V);
      const float sum = exp_range(row, 0, V, mx);
      scale_range(row, V, 1.f / sum);
      row[tp[r]] -= 1.f;
      lp[r] = std::log(sum) + mx;
    }
  });
  return lse;
}

// MoE experts (training): gu [slots, 2I] = (gate | up) products, w [slots] routing weights ->
// out [slots, I] = silu(gate) * up * w, in one pass. Only gu and out are kept for the backward, which
// recomputes silu (the exp it needs for silu' anyway): 4 bytes a slot and channel written and read instead
// of 12.
void swiglu_train_forward(torch::Tensor gu, torch::Tensor w, torch::Tensor out) {
  TORCH_CHECK(gu.scalar_type() == at::kFloat && gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0 &&
              w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == gu.size(0),
              "swiglu_train_forward: contiguous float32 [slots, 2I] and [slots]");
  const int64_t S = gu.size(0), I = gu.size(1) / 2;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == S * I,
              "swiglu_train_forward: out must be contiguous float32 [slots, I]");
  const float *g = gu.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, S, 16, [&](int64_t r0, int64_t r1) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; r++) {
      const float* gr = g + r * 2 * I;
      const float* ur = gr + I;
      const __m256 vw = _mm256_set1_ps(wp[r]);
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 x = _mm256_loadu_ps(gr + i);
        const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x))));
        _mm256_storeu_ps(op + r * I + i, _mm256_mul_ps(_mm256_mul_ps(s, _mm256_loadu_ps(ur + i)), vw));
      }
      for (; i < I; i++) op[r * I + i] = gr[i] / (1.f + std::exp(-gr[i])) * ur[i] * wp[r];
    }
  });
}

// Its backward: grad_act [slots, I] (gradient of the forward's output before the routing weight, i.e. times
// the down projection), with gu and w -> grad_gu [slots, 2I] (gate | up, written into the given tensor) and,
// returned, grad_w [slots] = rowsum(grad_act * silu(gate) * up). silu is recomputed as in the forward.
torch::Tensor swiglu_train_backward(torch::Tensor grad_act, torch::Tensor gu, torch::Tensor w, torch::Tensor grad_gu) {
  for (const auto& t : {grad_act, gu, w, grad_gu})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "swiglu_train_backward: contiguous float32 tensors");
  const int64_t S = gu.size(0), I = gu.size(1) / 2;
  TORCH_CHECK(grad_act.numel() == S * I && w.numel() == S && grad_gu.numel() == 2 * S * I,
              "swiglu_train_backward: shapes");
  auto grad_w = torch::empty({S}, gu.options());
  const float *ga = grad_act.data_ptr<float>(), *g = gu.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *out = grad_gu.data_ptr<float>(), *gw = grad_w.data_ptr<float>();
  at::parallel_for(0, S, 16, [&](int64_t r0, int64_t r1) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; r++) {
      const float* gar = ga + r * I;
      const float* gr = g + r * 2 * I;
      const float* ur = gr + I;
      float* og = out + r * 2 * I;
      float* ou = og + I;
      const __m256 vw = _mm256_set1_ps(wp[r]);
      __m256 dot = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 d = _mm256_loadu_ps(gar + i);
        const __m256 x = _mm256_loadu_ps(gr + i), u = _mm256_loadu_ps(ur + i);
        const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x)));
        const __m256 s = _mm256_div_ps(x, den), sig = _mm256_div_ps(one, den);
        dot = _mm256_fmadd_ps(d, _mm256_mul_ps(s, u), dot);
        const __m256 dw = _mm256_mul_ps(d, vw);
        // silu'(x) = sig * (1 + x * (1 - sig))
        const __m256 dsilu = _mm256_mul_ps(sig, _mm256_fmadd_ps(x, _mm256_sub_ps(one, sig), one));
        _mm256_storeu_ps(ou + i, _mm256_mul_ps(dw, s));
        _mm256_storeu_ps(og + i, _mm256_mul_ps(_mm256_mul_ps(dw, u), dsilu));
      }
      float dsum = hsum(dot);
      for (; i < I; i++) {
        const float x = gr[i], den = 1.f + std::exp(-x), s = x / den, sig = 1.f / den, dw = gar[i] * wp[r];
        dsum += gar[i] * (s * ur[i]);
        ou[i] = dw * s;
        og[i] = dw * ur[i] * (sig * (1.f + x * (1.f - sig)));
      }
      gw[r] = dsum;
    }
  });
  return grad_w;
}

// MoE experts (training, float32) on the sgemm: rows of `a` grouped by expert, `counts` rows each in order.
// One call instead of a Python loop of slices and matmuls (grouped_mm has no out= form); experts spread over
// the threads (each sgemm then single-threaded).

// First row of each expert's slice (E + 1 entries), checking the counts against the rows.
std::vector<int64_t> expert_starts(const std::vector<int64_t>& counts, int64_t rows, const char* what) {
  std::vector<int64_t> start(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); e++) {
    TORCH_CHECK(counts[e] >= 0, what, ": negative count");
    start[e + 1] = start[e] + counts[e];
  }
  TORCH_CHECK(start.back() == rows, what, ": counts must add up to the rows");
  return start;
}

// grouped_mm_rows: out[rows_e] = a[rows_e] . b[e], a [S, K] and out [S, N] row-contiguous, b [E, K, N] with
// unit stride in either of its last two dimensions.
void grouped_mm_rows(torch::Tensor a, torch::Tensor b, std::vector<int64_t> counts, torch::Tensor out) {
  TORCH_CHECK(sgemm_ != nullptr, "grouped_mm_rows: no sgemm in this torch build");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
              a.dim() == 2 && b.dim() == 3 && out.dim() == 2 && a.stride(1) == 1 && out.stride(1) == 1 &&
              (b.stride(2) == 1 || b.stride(1) == 1), "grouped_mm_rows: float32 a [S, K], b [E, K, N], out [S, N]");
  const int64_t E = b.size(0), K = b.size(1), N = b.size(2);
  TORCH_CHECK(a.size(1) == K && out.size(1) == N && out.size(0) == a.size(0) && (int64_t)counts.size() == E,
              "grouped_mm_rows: shapes");
  const std::vector<int64_t> start = expert_starts(counts, a.size(0), "grouped_mm_rows");
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int lda = a.stride(0), ldo = out.stride(0);
  const bool b_rows = b.stride(2) == 1;  // b[e] row-major [K, N]; else b[e]^T is, [N, K]
  const int ldb = b_rows ? b.stride(1) : b.stride(2);
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; e++) {
      const int M = counts[e];
      if (!M) continue;
      const float* A = ap + start[e] * lda;
      const float* B = bp + e * b.stride(0);
      float* C = op + start[e] * ldo;
      if (b_rows) gemm_nn(M, N, K, 1.f, A, lda, B, ldb, 0.f, C, ldo);
      else gemm_nt(M, N, K, 1.f, A, lda, B, ldb, 0.f, C, ldo);
    }
  });
}

// grouped_mm_weights: out[e] = a[rows_e]^T . c[rows_e] (a [S, M], c [S, N] row-contiguous, out [E, M, N]
// contiguous; zeros for an expert without rows): the experts' weight gradients.
void grouped_mm_weights(torch::Tensor a, torch::Tensor c, std::vector<int64_t> counts, torch::Tensor out) {
  TORCH_CHECK(sgemm_ != nullptr, "grouped_mm_weights: no sgemm in this torch build");
  TORCH_CHECK(a.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
              a.dim() == 2 && c.dim() == 2 && out.dim() == 3 && a.stride(1) == 1 && c.stride(1) == 1 &&
              out.is_contiguous(), "grouped_mm_weights: float32 a [S, M], c [S, N], contiguous out [E, M, N]");
  const int64_t E = out.size(0), M = out.size(1), N = out.size(2);
  TORCH_CHECK(a.size(1) == M && c.size(1) == N && a.size(0) == c.size(0) && (int64_t)counts.size() == E,
              "grouped_mm_weights: shapes");
  const std::vector<int64_t> start = expert_starts(counts, a.size(0), "grouped_mm_weights");
  const float* ap = a.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int lda = a.stride(0), ldc = c.stride(0);
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; e++) {
      float* C = op + e * M * N;
      if (!counts[e]) {
        std::fill(C, C + M * N, 0.f);
        continue;
      }
      gemm_tn(M, N, counts[e], ap + start[e] * lda, lda, cp + start[e] * ldc, ldc, 0.f, C, N);
    }
  });
}

// RMSNorm (training, float32): out = w * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), one pass a row.
std::vector<torch::Tensor> rms_norm_train_forward(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.is_contiguous() &&
              weight.is_contiguous() && x.size(-1) == weight.numel(), "rms_norm_train_forward: contiguous float32");
  const int64_t D = weight.numel(), N = x.numel() / D;
  auto out = torch::empty_like(x);
  auto rstd = torch::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float *op = out.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* xr = xp + r * D;
      float* orow = op + r * D;
      __m256 acc = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) { const __m256 v = _mm256_loadu_ps(xr + d); acc = _mm256_fmadd_ps(v, v, acc); }
      float ss = hsum(acc);
      for (; d < D; d++) ss += xr[d] * xr[d];
      const float s = 1.f / std::sqrt(ss / D + float(eps));
      rp[r] = s;
      const __m256 vs = _mm256_set1_ps(s);
      for (d = 0; d + 8 <= D; d += 8)
        _mm256_storeu_ps(orow + d, _mm256_mul_ps(_mm256_loadu_ps(w + d), _mm256_mul_ps(_mm256_loadu_ps(xr + d), vs)));
      for (; d < D; d++) orow[d] = w[d] * (xr[d] * s);
    }
  });
  return {out, rstd};
}

// Its backward: grad_x = rstd * (g*w - xhat * mean(g*w * xhat)), grad_w = sum over rows of g * xhat.
std::vector<torch::Tensor> rms_norm_train_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor weight,
                                                   torch::Tensor rstd) {
  auto g = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && rstd.is_contiguous() && g.numel() == x.numel(),
              "rms_norm_train_backward: contiguous float32");
  const int64_t D = weight.numel(), N = x.numel() / D;
  auto grad_x = torch::empty_like(x);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, (N + 15) / 16));
  auto partial = torch::zeros({chunks, D}, x.options());  // grad_w per chunk of rows, summed at the end
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>(),
              *rp = rstd.data_ptr<float>();
  float *gx = grad_x.data_ptr<float>(), *pp = partial.data_ptr<float>();
  const int64_t per = (N + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c++) {
      float* gw = pp + c * D;
      for (int64_t r = c * per; r < std::min(N, (c + 1) * per); r++) {
        const float *gr = gp + r * D, *xr = xp + r * D;
        const float s = rp[r];
        const __m256 vs = _mm256_set1_ps(s);
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
          const __m256 gv = _mm256_loadu_ps(gr + d), xh = _mm256_mul_ps(_mm256_loadu_ps(xr + d), vs);
          _mm256_storeu_ps(gw + d, _mm256_fmadd_ps(gv, xh, _mm256_loadu_ps(gw + d)));
          acc = _mm256_fmadd_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(w + d)), xh, acc);
        }
        float dot = hsum(acc);
        for (; d < D; d++) { const float xh = xr[d] * s; gw[d] += gr[d] * xh; dot += gr[d] * w[d] * xh; }
        const float mean = dot / D;
        const __m256 vm = _mm256_set1_ps(mean);
        float* out = gx + r * D;
        for (d = 0; d + 8 <= D; d += 8) {
          const __m256 xh = _mm256_mul_ps(_mm256_loadu_ps(xr + d), vs);
          const __m256 gxh = _mm256_mul_ps(_mm256_loadu_ps(gr + d), _mm256_loadu_ps(w + d));
          _mm256_storeu_ps(out + d, _mm256_mul_ps(vs, _mm256_fnmadd_ps(xh, vm, gxh)));
        }
        for (; d < D; d++) out[d] = s * (gr[d] * w[d] - xr[d] * s * mean);
      }
    }
  });
  return {grad_x, partial.sum(0)};
}

// RoPE (training, float32): x [B, H, S, D] (head_dim contiguous, any other strides), cos/sin [B, S, D]
// (any strides but the last) -> out in x's layout. Forward: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (the
// halves of D); backward (the transposed rotation): out1 = x1 c1 + x2 s2, out2 = x2 c2 - x1 s1.
torch::Tensor rope_train(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, bool backward) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              x.dim() == 4 && cos.dim() == 3 && sin.dim() == 3 && x.stride(3) == 1 && cos.stride(2) == 1 &&
              sin.stride(2) == 1 && x.size(3) % 2 == 0, "rope_train: float32 x [B, H, S, D], cos/sin [B, S, D]");
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(cos.size(1) == S && cos.size(2) == D && sin.sizes() == cos.sizes() && (cos.size(0) == B || cos.size(0) == 1),
              "rope_train: cos/sin shape");
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xb = x.stride(0), xh = x.stride(1), xs = x.stride(2);
  const int64_t ob = out.stride(0), oh = out.stride(1), os = out.stride(2);
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), cs = cos.stride(1);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), ss = sin.stride(1);
  const float sign = backward ? -1.f : 1.f;
  at::parallel_for(0, B * H * S, 64, [&](int64_t r0, int64_t r1) {
    const __m256 vsign = _mm256_set1_ps(sign);
    for (int64_t r = r0; r < r1; r++) {
      const int64_t b = r / (H * S), h = (r / S) % H, s = r % S;
      const float* xr = xp + b * xb + h * xh + s * xs;
      const float* c = cp + b * cb + s * cs;
      const float* sn = sp + b * sb + s * ss;
      float* o = op + b * ob + h * oh + s * os;
      int64_t i = 0;
      for (; i + 8 <= half; i += 8) {
        const __m256 x1 = _mm256_loadu_ps(xr + i), x2 = _mm256_loadu_ps(xr + half + i);
        // forward: sin of the own half; backward: the other half's, sign flipped
        const __m256 s1 = _mm256_loadu_ps(sn + (backward ? half : 0) + i);
        const __m256 s2 = _mm256_loadu_ps(sn + (backward ? 0 : half) + i);
        _mm256_storeu_ps(o + i, _mm256_fnmadd_ps(_mm256_mul_ps(vsign, x2), s1, _mm256_mul_ps(x1, _mm256_loadu_ps(c + i))));
        _mm256_storeu_ps(o + half + i, _mm256_fmadd_ps(_mm256_mul_ps(vsign, x1), s2, _mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i))));
      }
      for (; i < half; i++) {
        const float x1 = xr[i], x2 = xr[half + i];
        const float s1 = sn[(backward ? half : 0) + i], s2 = sn[(backward ? 0 : half) + i];
        o[i] = x1 * c[i] - sign * x2 * s1;
        o[half + i] = x2 * c[half + i] + sign * x1 * s2;
      }
    }
  });
  return out;
}

// The same paged decode attention for other extensions (qwenlab.quant.kernels' one-call decode step), by
// address like qwenlab_pool_run: caches bf16 (bf16 != 0) or float32, q and out float [B, H, D].
extern "C" void qwenlab_paged_decode(const float* q, const void* kc, const void* vc, int32_t bf16,
                                     const int32_t* tables, const int32_t* lens, float* out, int64_t B, int64_t H,
                                     int64_t KVH, int64_t D, int64_t bs, int64_t max_blocks, float scale) {
  if (bf16)
    paged_decode_impl(q, static_cast<const uint16_t*>(kc), static_cast<const uint16_t*>(vc), tables, lens, out, B, H,
                      KVH, D, bs, max_blocks, scale);
  else
    paged_decode_impl(q, static_cast<const float*>(kc), static_cast<const float*>(vc), tables, lens, out, B, H, KVH,
                      D, bs, max_blocks, scale);
}
int64_t paged_decode_address() { return reinterpret_cast<int64_t>(&qwenlab_paged_decode); }

// ---- fused decoder pieces (bf16 weights; activations float or bf16, rounded as transformers rounds) ----
namespace {

// Round to the activation dtype: transformers keeps every intermediate in bf16 for a bf16 model.
inline float rnd(float v, bool bf16) { return bf16 ? to_f(to_bf16(v)) : v; }

const float* opt_float(const c10::optional<torch::Tensor>& t, torch::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

// rows [T, heads * D] (float) -> optional per-head RMSNorm and RoPE -> out[0, head, t, :] in out's dtype.
void norm_rope_store(float* rows, int64_t T, int64_t heads, int64_t D, const float* norm_w, float eps,
                     const float* cos, const float* sin, bool bf16, torch::Tensor& out) {
  const int64_t half = D / 2;
  parallel_for(0, T * heads, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> y(D);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t t = i / heads, h = i % heads;
      float* x = rows + t * heads * D + h * D;
      for (int64_t d = 0; d < D; d++) y[d] = x[d];
      if (norm_w) {
        float sum = 0.f;
        for (int64_t d = 0; d < D; d++) sum += y[d] * y[d];
        const float scale = 1.f / std::sqrt(sum / D + eps);
        for (int64_t d = 0; d < D; d++) y[d] = rnd(norm_w[d] * rnd(y[d] * scale, bf16), bf16);
      }
      const float* c = cos + t * D;
      const float* s = sin + t * D;
      const int64_t offset = (h * T + t) * D;
      for (int64_t d = 0; d < D; d++) {
        const float rotated = d < half ? -y[d + half] : y[d - half];
        const float v = rnd(rnd(y[d] * c[d], bf16) + rnd(rotated * s[d], bf16), bf16);
        if (bf16) reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>())[offset + d] = to_bf16(v);
        else out.data_ptr<float>()[offset + d] = v;
      }
    }
  });
}

}  // namespace

// Attention inputs of one layer for x [1, T, hidden]: q/k/v projections (+ biases), Qwen3's per-head
// q/k RMSNorm when weights are given, RoPE with cos/sin [T, D]. Returns q [1, Hq, T, D], k and v
// [1, Hkv, T, D], contiguous, in x's dtype.
std::vector<torch::Tensor> attention_inputs(torch::Tensor x, torch::Tensor wq, torch::Tensor wk, torch::Tensor wv,
                                            c10::optional<torch::Tensor> bq, c10::optional<torch::Tensor> bk,
                                            c10::optional<torch::Tensor> bv, c10::optional<torch::Tensor> q_norm,
                                            c10::optional<torch::Tensor> k_norm, torch::Tensor cos, torch::Tensor sin,
                                            double eps, int64_t heads, int64_t kv_heads, int64_t D) {
  const int64_t K = x.size(-1), T = x.numel() / K;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto x2 = x.reshape({T, K}).contiguous();
  std::vector<float> xbuf;
  const float* xp = as_float(x2, xbuf);
  torch::Tensor kb_q, kb_k, kb_v, kn_q, kn_k;
  const float *pbq = opt_float(bq, kb_q), *pbk = opt_float(bk, kb_k), *pbv = opt_float(bv, kb_v);
  const float *pnq = opt_float(q_norm, kn_q), *pnk = opt_float(k_norm, kn_k);
  auto cf = cos.reshape({T, D}).to(at::kFloat).contiguous(), sf = sin.reshape({T, D}).to(at::kFloat).contiguous();
  auto w = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  std::vector<float> qr(T * heads * D), kr(T * kv_heads * D);
  gemm_bf16(xp, T, K, w(wq), heads * D, qr.data(), pbq);
  gemm_bf16(xp, T, K, w(wk), kv_heads * D, kr.data(), pbk);
  if (bf16) {
    for (auto& v : qr) v = rnd(v, true);
    for (auto& v : kr) v = rnd(v, true);
  }
  auto q = torch::empty({1, heads, T, D}, x.options());
  auto k = torch::empty({1, kv_heads, T, D}, x.options());
  norm_rope_store(qr.data(), T, heads, D, pnq, float(eps), cf.data_ptr<float>(), sf.data_ptr<float>(), bf16, q);
  norm_rope_store(kr.data(), T, kv_heads, D, pnk, float(eps), cf.data_ptr<float>(), sf.data_ptr<float>(), bf16, k);
  // v: projection only, laid out [1, Hkv, T, D]
  auto v_rows = torch::empty({T, kv_heads * D}, x.options());
  if (bf16) gemm_bf16(xp, T, K, w(wv), kv_heads * D, reinterpret_cast<uint16_t*>(v_rows.data_ptr<at::BFloat16>()), pbv);
  else gemm_bf16(xp, T, K, w(wv), kv_heads * D, v_rows.data_ptr<float>(), pbv);
  auto v = v_rows.view({1, T, kv_heads, D}).transpose(1, 2).contiguous();
  return {q, k, v};
}

// SwiGLU MLP: down(silu(gate(x)) * up(x)) with bf16 weights, intermediates rounded like transformers.
torch::Tensor mlp_bf16(torch::Tensor x, torch::Tensor w_gate, torch::Tensor w_up, torch::Tensor w_down) {
  const int64_t K = x.size(-1), T = x.numel() / K, I = w_gate.size(0), N = w_down.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto x2 = x.reshape({T, K}).contiguous();
  std::vector<float> xbuf;
  const float* xp = as_float(x2, xbuf);
  auto w = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
  std::vector<float> g(T * I), u(T * I);
  gemm_bf16(xp, T, K, w(w_gate), I, g.data());
  gemm_bf16(xp, T, K, w(w_up), I, u.data());
  auto act = [&](int64_t i0, int64_t i1) {
    swiglu_range(g.data(), u.data(), i0, i1, bf16, [bf16](float v) { return rnd(v, bf16); });
  };
  if (blas_rows(T)) at::parallel_for(0, T * I, 4096, act);  // prefill: OpenMP, as the sgemm
  else act(0, T * I);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = torch::empty(sizes, x.options());
  if (bf16) gemm_bf16(g.data(), T, I, w(w_down), N, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  else gemm_bf16(g.data(), T, I, w(w_down), N, out.data_ptr<float>());
  return out;
}

// Paged KV write: k/v [1, Hkv, T, D] (any strides) into caches [blocks, block_size, Hkv, D] at slots [T].
void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v, torch::Tensor slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(), "dtype");
  auto slot = slots.to(at::kLong).contiguous();
  const int64_t H = k.size(1), T = k.size(2), D = k.size(3);
  const int64_t es = k_cache.element_size(), n_slots = k_cache.numel() / (H * D);
  const int64_t* sp = slot.data_ptr<int64_t>();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k/v rows must be contiguous");
  for (int64_t t = 0; t < T; t++) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < n_slots, "slot out of range");
    for (int64_t h = 0; h < H; h++) {
      std::memcpy(kc + ((sp[t] * H + h) * D) * es, kp + (h * k.stride(1) + t * k.stride(2)) * es, D * es);
      std::memcpy(vc + ((sp[t] * H + h) * D) * es, vp + (h * v.stride(1) + t * v.stride(2)) * es, D * es);
    }
  }
}

// Mixture-of-experts SwiGLU experts for a few tokens: only the experts the tokens route to are read.
// x [N, Hd]; expert_ids [N, k] int64; weights [N, k]; gate_up [E, 2I, Hd] bf16 (gate rows first);
// down [E, Hd, I] bf16. Returns sum_j weights[:, j] * expert_{ids[:, j]}(x), in x's dtype.
torch::Tensor moe_experts_bf16(torch::Tensor x, torch::Tensor expert_ids, torch::Tensor weights,
                               torch::Tensor gate_up, torch::Tensor down) {
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && down.scalar_type() == at::kBFloat16, "bf16 experts");
  TORCH_CHECK(gate_up.is_contiguous() && down.is_contiguous(), "contiguous experts");
  auto xf = x.to(at::kFloat).contiguous();
  auto ids = expert_ids.to(at::kLong).contiguous();
  auto wts = weights.to(at::kFloat).contiguous();
  const int64_t N = xf.size(0), Hd = xf.size(1), k = ids.size(1), E = gate_up.size(0), I = down.size(2);
  auto out = torch::zeros({N, Hd}, xf.options());
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  std::vector<std::vector<int64_t>> slots(E);  // slot = token * k + j, grouped by expert
  for (int64_t s = 0; s < N * k; s++) {
    TORCH_CHECK(idp[s] >= 0 && idp[s] < E, "expert id out of range");
    slots[idp[s]].push_back(s);
  }
  const uint16_t* gu = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>());
  const uint16_t* dn = reinterpret_cast<const uint16_t*>(down.data_ptr<at::BFloat16>());
  std::vector<float> xs, h, act, y;
  float* op = out.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  for (int64_t e = 0; e < E; e++) {
    const int64_t n = slots[e].size();
    if (!n) continue;
    xs.resize(n * Hd); h.resize(n * 2 * I); act.resize(n * I); y.resize(n * Hd);
    for (int64_t r = 0; r < n; r++) std::memcpy(&xs[r * Hd], xp + (slots[e][r] / k) * Hd, sizeof(float) * Hd);
    gemm_bf16(xs.data(), n, Hd, gu + e * 2 * I * Hd, 2 * I, h.data());
    for (int64_t r = 0; r < n; r++)
      for (int64_t i = 0; i < I; i++) {
        const float g = h[r * 2 * I + i], u = h[r * 2 * I + I + i];
        act[r * I + i] = g / (1.f + std::exp(-g)) * u;
      }
    gemm_bf16(act.data(), n, I, dn + e * Hd * I, Hd, y.data());
    for (int64_t r = 0; r < n; r++) {
      const float w = wp[slots[e][r]];
      float* dst = op + (slots[e][r] / k) * Hd;
      for (int64_t d = 0; d < Hd; d++) dst[d] += w * y[r * Hd + d];
    }
  }
  return out.to(x.scalar_type());
}

// ---- decode in one call: a whole dense bf16 model forward for a few single-token rows ------------------
// A plan holds one model's weights (pointers, float copies of the small vectors) and KV caches; each decode
// step is then one call: embedding, every layer (norm -> q/k/v -> q/k norm + RoPE -> KV write -> paged
// attention -> o_proj + residual -> norm -> gate/up + SwiGLU -> down + residual), final norm, LM head.
// The arithmetic and roundings are exactly those of the per-module kernels above (same GEMV routines, same
// expressions), so the logits are bit-identical to the module-by-module route; what goes away is Python,
// tensor allocation and dtype conversion between the pieces, and half the thread-pool round trips (q/k/v in
// one parallel region, gate/up in one with SwiGLU applied per chunk, residual adds inside the chunks).
namespace {

struct PlanLayer {
  const uint16_t *wq, *wk, *wv, *wo, *wg, *wu, *wd;
  std::vector<float> in_norm, post_norm, q_norm, k_norm, bq, bk, bv, bo;  // empty = absent
  torch::Tensor k_cache, v_cache;
};

struct DecodePlan {
  std::vector<torch::Tensor> keep;  // every weight and cache stays alive while the plan exists
  std::vector<PlanLayer> layers;
  const uint16_t *embed = nullptr, *lm_head = nullptr;
  std::vector<float> final_norm;
  int64_t hidden = 0, heads = 0, kv_heads = 0, D = 0, inter = 0, vocab = 0;
  float eps = 0.f, qk_eps = 0.f, scale = 1.f;
  std::vector<float> h, xn, q, k, v, att, g;  // scratch, sized per call
};

std::vector<std::unique_ptr<DecodePlan>>& decode_plans() {
  static std::vector<std::unique_ptr<DecodePlan>> plans;
  return plans;
}

std::vector<float> float_vector(const torch::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return {};
  auto f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

const uint16_t* bf16_matrix(DecodePlan& plan, const torch::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows &&
              t.size(1) == cols, "decode plan: expected a contiguous bf16 [", rows, ", ", cols, "] matrix, got ",
              t.sizes());
  plan.keep.push_back(t);
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// Whether gemm_bf16 would hand M rows to the BLAS or the packed kernel (then the plan calls it as is).
inline bool gemm_route(int64_t M) {
  return blas_rows(M) || (packed_min_rows > 0 && M >= packed_min_rows);
}

// Output rows [n0, n1) of out[M, N] = x[M, K] @ w.T (+ bias), by the same routine gemm_bf16 picks for M.
template <typename OutT>
inline void gemm_part(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, OutT* out,
                      int64_t N, const float* bias) {
  if (M == 1) gemv_rows(x, K, w, n0, n1, out, bias);
  else if (M == 2) rows_range<2, 6>(x, M, K, w, n0, n1, out, N, bias);
  else rows_range<3, 4>(x, M, K, w, n0, n1, out, N, bias);
}

struct Part { int64_t mat, n0, n1; };

// How a region's rows are cut into the parts the threads claim: guided (decode_guided, the default): the
// first parts are large (remaining / (2 x threads)) and shrink to decode_min_rows, so each thread streams
// long runs and the threads finish within a small part of each other; else about chunks_per_thread x
// threads equal parts. Parts never straddle two matrices.
bool decode_guided = true;
int64_t decode_min_rows = 32;

// Split matrices of the given row counts and widths (the same width in one region when guided) into parts
// of a multiple of align rows (align divides every row count or is 16).
std::vector<Part> split_parts(const std::vector<std::pair<int64_t, int64_t>>& shapes, int64_t align = 16) {
  if (decode_guided) {
    const int64_t T = std::max(1, at::get_num_threads());
    int64_t remaining = 0;
    for (auto& s : shapes) remaining += s.first;
    std::vector<Part> parts;
    int64_t mat = 0, offset = 0;
    while (remaining > 0) {
      int64_t size = std::max(decode_min_rows, (remaining + 2 * T - 1) / (2 * T));
      size = std::min(remaining, (size + align - 1) / align * align);
      remaining -= size;
      while (size > 0) {
        while (offset == shapes[mat].first) { mat++; offset = 0; }
        const int64_t take = std::min(size, shapes[mat].first - offset);
        parts.push_back({mat, offset, offset + take});
        offset += take;
        size -= take;
      }
    }
    return parts;
  }
  const int64_t want = chunks_per_thread * std::max(1, at::get_num_threads());
  double total = 0;
  for (auto& s : shapes) total += double(s.first) * s.second;
  std::vector<Part> parts;
  for (int64_t i = 0; i < int64_t(shapes.size()); i++) {
    const int64_t N = shapes[i].first;
    const int64_t pieces = std::max<int64_t>(1, std::llround(want * double(N) * shapes[i].second / total));
    const int64_t step = std::max<int64_t>(align, (N + pieces - 1) / pieces + align - 1) / align * align;
    for (int64_t n = 0; n < N; n += step) parts.push_back({i, n, std::min(N, n + step)});
  }
  return parts;
}

void run_parts(const std::vector<Part>& parts, const std::function<void(const Part&)>& fn) {
  const std::function<void(int64_t)> body = [&](int64_t i) { fn(parts[i]); };
  WorkPool::get().run(int64_t(parts.size()), body);
}

// transformers' bf16 RMSNorm of M rows (the arithmetic of rms_norm): out holds bf16 values as float.
void norm_rows(const float* x, int64_t M, int64_t D, const float* w, double eps, float* out) {
  for (int64_t r = 0; r < M; r++) {
    const float* src = x + r * D;
    float* dst = out + r * D;
    float sum = 0.f;
    for (int64_t d = 0; d < D; d++) { const float v = src[d]; sum += v * v; }
    const float scale = 1.f / std::sqrt(sum / D + float(eps));
    for (int64_t d = 0; d < D; d++) dst[d] = to_f(to_bf16(w[d] * to_f(to_bf16(src[d] * scale))));
  }
}

// One head's row (bf16 values as float) -> optional RMSNorm, RoPE (the arithmetic of norm_rope_store).
void norm_rope_head(const float* x, int64_t D, const float* norm_w, float eps, const float* c, const float* s,
                    float* y, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; d++) y[d] = x[d];
  if (norm_w) {
    float sum = 0.f;
    for (int64_t d = 0; d < D; d++) sum += y[d] * y[d];
    const float scale = 1.f / std::sqrt(sum / D + eps);
    for (int64_t d = 0; d < D; d++) y[d] = rnd(norm_w[d] * rnd(y[d] * scale, true), true);
  }
  for (int64_t d = 0; d < D; d++) {
    const float rotated = d < half ? -y[d + half] : y[d - half];
    out[d] = rnd(rnd(y[d] * c[d], true) + rnd(rotated * s[d], true), true);
  }
}

inline const float* opt_ptr(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

}  // namespace

// Builds a plan; returns its id for decode_plan_run. Per layer, 17 tensors in this order: input norm,
// q, k, v weights, q, k, v biases, q norm, k norm, o weight, o bias, post-attention norm, gate, up, down
// weights, then the layer's k and v caches; an absent bias or norm is an empty tensor. dims: hidden, heads,
// kv_heads, head_dim, intermediate, vocab.
int64_t decode_plan_create(std::vector<torch::Tensor> layers, torch::Tensor embed, torch::Tensor final_norm,
                           torch::Tensor lm_head, std::vector<int64_t> dims, double eps, double qk_eps, double scale) {
  TORCH_CHECK(dims.size() == 6 && layers.size() % 17 == 0, "decode plan: bad arguments");
  auto plan = std::make_unique<DecodePlan>();
  DecodePlan& p = *plan;
  p.hidden = dims[0]; p.heads = dims[1]; p.kv_heads = dims[2]; p.D = dims[3]; p.inter = dims[4]; p.vocab = dims[5];
  p.eps = float(eps); p.qk_eps = float(qk_eps); p.scale = float(scale);
  const int64_t H = p.hidden, qd = p.heads * p.D, kvd = p.kv_heads * p.D, I = p.inter;
  TORCH_CHECK(p.D % 2 == 0 && p.heads % p.kv_heads == 0, "decode plan: head layout");
  p.embed = bf16_matrix(p, embed, p.vocab, H);
  p.lm_head = bf16_matrix(p, lm_head, p.vocab, H);
  p.final_norm = float_vector(final_norm);
  TORCH_CHECK(int64_t(p.final_norm.size()) == H, "decode plan: final norm");
  for (size_t i = 0; i < layers.size(); i += 17) {
    const torch::Tensor* t = layers.data() + i;
    PlanLayer L;
    L.in_norm = float_vector(t[0]);
    L.wq = bf16_matrix(p, t[1], qd, H); L.wk = bf16_matrix(p, t[2], kvd, H); L.wv = bf16_matrix(p, t[3], kvd, H);
    L.bq = float_vector(t[4]); L.bk = float_vector(t[5]); L.bv = float_vector(t[6]);
    L.q_norm = float_vector(t[7]); L.k_norm = float_vector(t[8]);
    L.wo = bf16_matrix(p, t[9], H, qd); L.bo = float_vector(t[10]);
    L.post_norm = float_vector(t[11]);
    L.wg = bf16_matrix(p, t[12], I, H); L.wu = bf16_matrix(p, t[13], I, H); L.wd = bf16_matrix(p, t[14], H, I);
    L.k_cache = t[15]; L.v_cache = t[16];
    TORCH_CHECK(int64_t(L.in_norm.size()) == H && int64_t(L.post_norm.size()) == H, "decode plan: norms");
    TORCH_CHECK(L.bq.empty() == L.bk.empty() && L.bk.empty() == L.bv.empty(), "decode plan: biases");
    TORCH_CHECK(L.q_norm.empty() == L.k_norm.empty(), "decode plan: q/k norms");
    for (const auto& c : {L.k_cache, L.v_cache})
      TORCH_CHECK(c.scalar_type() == at::kBFloat16 && c.is_contiguous() && c.dim() == 4 && c.size(2) == p.kv_heads &&
                  c.size(3) == p.D, "decode plan: caches must be contiguous bf16 [blocks, block_size, kv_heads, head_dim]");
    p.keep.push_back(L.k_cache);
    p.keep.push_back(L.v_cache);
    plan->layers.push_back(std::move(L));
  }
  decode_plans().push_back(std::move(plan));
  return int64_t(decode_plans().size()) - 1;
}

// Tuning hooks of the decode route: prefetch distance of the one-row GEMV (bytes), guided parts (0/1), the
// smallest guided part (rows).
void set_decode_tuning(int64_t prefetch_bytes, int64_t guided, int64_t min_rows) {
  gemv_prefetch = std::max<int64_t>(0, prefetch_bytes);
  decode_guided = guided != 0;
  decode_min_rows = std::max<int64_t>(16, min_rows);
}

// Drops a plan's references (its weights and caches may then be freed).
void decode_plan_free(int64_t id) {
  auto& plans = decode_plans();
  if (id >= 0 && id < int64_t(plans.size())) plans[id].reset();
}

// One decode step of M single-token rows: ids [M] (int64), cos/sin [M, head_dim] (bf16, the model's rotary
// tables), slots [M] (int64 cache slots), block_tables [M, max_blocks] int32, context_lens [M] int32.
// Returns the logits [M, vocab] in bf16.
torch::Tensor decode_plan_run(int64_t id, torch::Tensor ids, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                              torch::Tensor block_tables, torch::Tensor context_lens) {
  auto& plans = decode_plans();
  TORCH_CHECK(id >= 0 && id < int64_t(plans.size()) && plans[id], "decode plan: unknown id");
  DecodePlan& p = *plans[id];
  const int64_t H = p.hidden, D = p.D, heads = p.heads, kvh = p.kv_heads, I = p.inter, V = p.vocab;
  const int64_t qd = heads * D, kvd = kvh * D;
  auto idc = ids.to(at::kLong).contiguous();
  auto slot = slots.to(at::kLong).contiguous();
  auto tables = block_tables.to(at::kInt).contiguous();
  auto lens = context_lens.to(at::kInt).contiguous();
  auto cf = cos.to(at::kFloat).contiguous(), sf = sin.to(at::kFloat).contiguous();
  const int64_t M = idc.numel();
  TORCH_CHECK(M >= 1 && cf.numel() == M * D && sf.numel() == M * D && slot.numel() == M && lens.numel() == M &&
              tables.dim() == 2 && tables.size(0) == M, "decode plan: inputs disagree on the row count");
  const int64_t* idp = idc.data_ptr<int64_t>();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; m++) {
    TORCH_CHECK(idp[m] >= 0 && idp[m] < V, "token id ", idp[m], " is outside the vocabulary (0..", V - 1, ")");
    TORCH_CHECK(lp[m] >= 1 && lp[m] <= tables.size(1) * p.layers[0].k_cache.size(1), "decode plan: context length");
  }
  p.h.resize(M * H); p.xn.resize(M * std::max(H, qd)); p.q.resize(M * qd); p.k.resize(M * kvd);
  p.v.resize(M * kvd); p.att.resize(M * qd); p.g.resize(M * 2 * I);
  float *h = p.h.data(), *xn = p.xn.data(), *q = p.q.data(), *k = p.k.data(), *v = p.v.data(), *att = p.att.data();
  float *gate = p.g.data(), *up = p.g.data() + M * I;
  for (int64_t m = 0; m < M; m++)
    for (int64_t d = 0; d < H; d++) h[m * H + d] = to_f(p.embed[idp[m] * H + d]);
  const bool big = gemm_route(M);
  const auto qkv_parts = split_parts({{qd, H}, {kvd, H}, {kvd, H}}, D);  // whole heads: norm + RoPE per part
  const auto o_parts = split_parts({{H, qd}});
  const auto mlp_parts = split_parts({{I, 2 * H}});
  const auto down_parts = split_parts({{H, I}});
  std::vector<float> y(D);
  for (auto& L : p.layers) {
    const int64_t bs = L.k_cache.size(1), n_slots = L.k_cache.numel() / kvd;
    // attention block
    norm_rows(h, M, H, L.in_norm.data(), p.eps, xn);
    const float* bias[3] = {opt_ptr(L.bq), opt_ptr(L.bk), opt_ptr(L.bv)};
    const uint16_t* wts[3] = {L.wq, L.wk, L.wv};
    float* outs[3] = {q, k, v};
    const int64_t widths[3] = {qd, kvd, kvd};
    uint16_t* kc = reinterpret_cast<uint16_t*>(L.k_cache.data_ptr<at::BFloat16>());
    uint16_t* vc = reinterpret_cast<uint16_t*>(L.v_cache.data_ptr<at::BFloat16>());
    for (int64_t m = 0; m < M; m++) TORCH_CHECK(sp[m] >= 0 && sp[m] < n_slots, "slot out of range");
    // Heads [n0, n1) / D of matrix mat (0 q, 1 k, 2 v): bf16 rounding, q/k norm + RoPE, k/v into the cache.
    auto heads_epilogue = [&](int64_t mat, int64_t n0, int64_t n1, float* y) {
      const int64_t width = widths[mat];
      for (int64_t m = 0; m < M; m++) {
        const float *c = cf.data_ptr<float>() + m * D, *s = sf.data_ptr<float>() + m * D;
        float* rows = outs[mat] + m * width;
        if (mat < 2) {
          for (int64_t i = n0; i < n1; i++) rows[i] = rnd(rows[i], true);
          for (int64_t i = n0; i < n1; i += D)
            norm_rope_head(rows + i, D, opt_ptr(mat == 0 ? L.q_norm : L.k_norm), p.qk_eps, c, s, y, rows + i);
        }
        if (mat > 0) {
          uint16_t* dst = (mat == 1 ? kc : vc) + sp[m] * kvd;
          for (int64_t i = n0; i < n1; i++) dst[i] = to_bf16(rows[i]);
        }
      }
    };
    if (big) {
      for (int i = 0; i < 3; i++) gemm_bf16(xn, M, H, wts[i], widths[i], outs[i], bias[i]);
      for (int i = 0; i < 3; i++) heads_epilogue(i, 0, widths[i], y.data());
    } else {
      run_parts(qkv_parts, [&](const Part& part) {
        gemm_part(xn, M, H, wts[part.mat], part.n0, part.n1, outs[part.mat], widths[part.mat], bias[part.mat]);
        float yb[512];
        std::vector<float> yv(D > 512 ? D : 0);
        heads_epilogue(part.mat, part.n0, part.n1, D > 512 ? yv.data() : yb);
      });
    }
    paged_decode_impl(q, const_cast<const uint16_t*>(kc), const_cast<const uint16_t*>(vc), tables.data_ptr<int32_t>(),
                      lp, att, M, heads, kvh, D, bs, tables.size(1), p.scale);
    for (int64_t i = 0; i < M * qd; i++) att[i] = rnd(att[i], true);
    // o_proj + residual: h = bf16(h + bf16(att @ wo.T + bo))
    const float* bo = opt_ptr(L.bo);
    auto residual = [&](const float* out, int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) h[m * H + n] = rnd(h[m * H + n] + rnd(out[m * H + n], true), true);
    };
    float* o = xn;  // xn is free again: the o_proj output
    if (big) {
      gemm_bf16(att, M, qd, L.wo, H, o, bo);
      residual(o, 0, H);
    } else {
      run_parts(o_parts, [&](const Part& part) {
        gemm_part(att, M, qd, L.wo, part.n0, part.n1, o, H, bo);
        residual(o, part.n0, part.n1);
      });
    }
    // MLP block: gate/up with SwiGLU per part, then down + residual
    norm_rows(h, M, H, L.post_norm.data(), p.eps, xn);
    auto swiglu = [&](int64_t i0, int64_t i1) {
      for (int64_t m = 0; m < M; m++)
        for (int64_t i = i0; i < i1; i++) {
          const float gv = rnd(gate[m * I + i], true);
          gate[m * I + i] = rnd(rnd(gv / (1.f + std::exp(-gv)), true) * rnd(up[m * I + i], true), true);
        }
    };
    if (big) {
      gemm_bf16(xn, M, H, L.wg, I, gate);
      gemm_bf16(xn, M, H, L.wu, I, up);
      swiglu(0, I);
    } else {
      run_parts(mlp_parts, [&](const Part& part) {
        gemm_part(xn, M, H, L.wg, part.n0, part.n1, gate, I, nullptr);
        gemm_part(xn, M, H, L.wu, part.n0, part.n1, up, I, nullptr);
        swiglu(part.n0, part.n1);
      });
    }
    float* dn = xn;
    if (big) {
      gemm_bf16(gate, M, I, L.wd, H, dn);
      residual(dn, 0, H);
    } else {
      run_parts(down_parts, [&](const Part& part) {
        gemm_part(gate, M, I, L.wd, part.n0, part.n1, dn, H, nullptr);
        residual(dn, part.n0, part.n1);
      });
    }
  }
  norm_rows(h, M, H, p.final_norm.data(), p.eps, xn);
  auto logits = torch::empty({M, V}, torch::kBFloat16);
  uint16_t* lg = reinterpret_cast<uint16_t*>(logits.data_ptr<at::BFloat16>());
  if (big) {
    gemm_bf16(xn, M, H, p.lm_head, V, lg);
  } else {
    run_parts(split_parts({{V, H}}), [&](const Part& part) { gemm_part(xn, M, H, p.lm_head, part.n0, part.n1, lg, V, nullptr); });
  }
  return logits;
}

// Row-wise argmax of bf16 logits [M, V] as torch.argmax: the first maximum, a NaN counting as the maximum.
torch::Tensor argmax_bf16(torch::Tensor logits) {
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 && logits.dim() == 2, "argmax_bf16: bf16 [M, V]");
  auto x = logits.contiguous();
  const int64_t M = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "argmax_bf16: empty rows");
  auto out = torch::empty({M}, torch::kLong);
  const uint16_t* base = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; m++) {
    const uint16_t* row = base + m * V;
    // pass 1: the maximum (8 lanes), and whether there is a NaN
    __m256 best = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
      const __m256 v = load8(row + i);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      best = _mm256_max_ps(best, v);
    }
    float top = -INFINITY;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, best);
    for (float l : lanes) top = std::max(top, l);
    bool has_nan = _mm256_movemask_ps(nan) != 0;
    for (int64_t j = i; j < V; j++) {
      const float f = to_f(row[j]);
      if (std::isnan(f)) has_nan = true;
      else top = std::max(top, f);
    }
    // pass 2: the first index holding it
    int64_t index = 0;
    for (int64_t j = 0; j < V; j++) {
      const float f = to_f(row[j]);
      if (has_nan ? std::isnan(f) : f == top) { index = j; break; }
    }
    out.data_ptr<int64_t>()[m] = index;
  }
  return out;
}
"""

_SOURCE = _SOURCE.replace("@SIMD@", SIMD_SOURCE)
_FUNCTIONS = ["linear_bf16", "rms_norm", "paged_decode_attention", "prefill_attention", "has_sgemm", "attention_forward",
              "attention_backward", "softmax_xent_rows", "swiglu_train_forward", "swiglu_train_backward", "grouped_mm_rows",
              "grouped_mm_weights", "rms_norm_train_forward",
              "rms_norm_train_backward", "rope_train", "moe_experts_bf16", "attention_inputs",
              "mlp_bf16", "write_kv", "set_blas_min_rows", "set_packed_min_rows", "read_sum", "set_chunks_per_thread",
              "pool_run_address", "paged_decode_address"]
_FUNCTIONS += ["decode_plan_create", "decode_plan_run", "decode_plan_free", "argmax_bf16", "set_decode_tuning"]  # fused_decode.py
_module = None
_failed = False


def cpu_supported() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        return " fma" in flags and " avx2" in flags
    except OSError:
        return True


def load(required: bool = False):
    """The compiled kernels module, or None where they cannot be used (then stock PyTorch runs)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    reason = None
    if os.environ.get("QWENLAB_KERNELS", "1") == "0":
        reason = "QWENLAB_KERNELS=0"
    elif not cpu_supported():
        reason = "this CPU lacks AVX2/FMA"
    else:
        try:
            from torch.utils.cpp_extension import load_inline

            digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:10]
            _module = load_inline(f"qwenlab_cpu_kernels_{digest}", cpp_sources=_SOURCE, functions=_FUNCTIONS,
                                  extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], verbose=False)
        except Exception as exc:  # no compiler, no headers, ...
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if _module is None:
        _failed = True
        if required:
            raise RuntimeError(f"qwenlab CPU kernels unavailable ({reason})")
        logger.warning("qwenlab CPU kernels unavailable (%s); using stock PyTorch", reason)
    return _module


class KernelLinear(nn.Linear):
    """nn.Linear whose bf16 forward runs ``linear_bf16`` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        return _module.linear_bf16(x, self.weight, self.bias)


def use_bf16_kernels(model: nn.Module) -> int:
    """Route a CPU bf16 model's Linear layers and MoE experts through the kernels; returns how many."""
    if load() is None:
        return 0
    count = 0
    swaps = {nn.Linear: KernelLinear, RMSNorm: KernelRMSNorm, Attention: KernelAttention, MLP: KernelMLP,
             Experts: KernelExperts}
    quantized = getattr(model, "quantization", None) is not None  # qwenlab.quant: its own kernels
    for module in model.modules():
        kind = swaps.get(type(module))
        if quantized and kind in (KernelAttention, KernelMLP):
            continue
        weight = next(module.parameters(), None)
        if kind is None or weight is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.contiguous()
        module.__class__ = kind
        count += 1
    return count


class KernelRMSNorm(RMSNorm):
    """RMSNorm in one kernel call, with transformers' rounding (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return super().forward(x)
        return _module.rms_norm(x, self.weight, self.eps)


class KernelAttention(Attention):
    """Attention whose projections, q/k norms and RoPE run as one kernel call (same parameters)."""

    def forward(self, x, cos, sin, context):
        if torch.is_grad_enabled() or x.dtype != torch.bfloat16 or x.shape[0] != 1:
            return super().forward(x, cos, sin, context)
        B, S, _ = x.shape
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm is not None else (None, None, 1e-6)
        q, k, v = _module.attention_inputs(
            x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.q_proj.bias, self.k_proj.bias,
            self.v_proj.bias, norms[0], norms[1], cos, sin, norms[2], self.num_heads, self.num_kv_heads,
            self.head_dim)
        out = context.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class KernelMLP(MLP):
    """SwiGLU MLP in one kernel call (same parameters)."""

    def forward(self, x):
        if torch.is_grad_enabled() or x.dtype != torch.bfloat16:
            return super().forward(x)
        return _module.mlp_bf16(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class KernelExperts(Experts):
    """Experts whose inference forward runs ``moe_experts_bf16`` (same parameters)."""

    def forward(self, x, expert_ids, weights):
        if torch.is_grad_enabled():
            return super().forward(x, expert_ids, weights)
        return _module.moe_experts_bf16(x, expert_ids, weights, self.gate_up_proj, self.down_proj)
