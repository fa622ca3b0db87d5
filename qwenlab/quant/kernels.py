"""AVX2 + FMA CPU kernels for weight-only int8 / int4 products in decode, compiled on first use.

Same pattern as ``qwenlab.engine.kernels`` (torch's ``load_inline``, cached in ~/.cache/torch_extensions),
and the same thread pool: ``load()`` hands this module the engine module's work pool, so a quantized model
runs every kernel of a decode step on one pool (two pools' spinning helpers would fight over the cores).

Decode is a matrix-vector product bound by the bytes of weights read, so each weight byte is read once
per step. The activation row is first rounded to int16 in blocks (int8 weights: 128 values; int4: one
block per weight group) with a float scale per block: the error is at most 2^-16 of the block's largest
value, well below bf16's rounding. The products then run on the integer multiply-add unit (``vpmaddwd``:
16 products and 8 pair sums per instruction, exact in int32), one float FMA per block applies the scales.
That is about twice the weights per cycle of widening weights to float, enough to keep up with memory on
two cores.

* ``linear(x, [qweight, scales(, mins)], bias)``: y = x @ dequant(W).T for a few rows, in x's dtype;
* ``attention_inputs(x, wq, wk, wv, bq, bk, bv, q_norm, k_norm, cos, sin, eps, heads, kv_heads, D)``: the
  q/k/v projections in one parallel region, Qwen3's q/k RMSNorm, RoPE (transformers' roundings for bf16),
  returning q [1, H, T, D], k, v [1, Hkv, T, D] like the engine's bf16 ``attention_inputs``;
* ``mlp(x, w_gate, w_up, w_down)``: SwiGLU, gate and up in one parallel region;
* ``linear_prefill_int4(x, [qweight, scales, mins], bias)``: int4 products for many rows (prefill) on int8
  activation blocks (``vpmaddubsw``, see its comment: the one place where activations are rounded coarser
  than bf16); ``dequantize_rows`` feeds int8 prefill to the stock sgemm; ``swiglu(gate, up, bf16)``: the
  prefill MLP's activation over those float products, in place.

Weights: int8 ``qweight`` [N, K] + float32 ``scales`` [N]; int4 ``qweight`` uint8 [N, K/2] (codes 0..15,
runs of 32 values: byte j holds value j low, j + 16 high) + float16 ``scales`` and ``mins`` [N, K/G],
w = scale * code + min.
"""

from __future__ import annotations

import hashlib
import logging
import os

logger = logging.getLogger("qwenlab.quant")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

namespace {
@SIMD@

// ---- threads: the engine's work pool when it is loaded (one pool per process), else ATen's ----
using PoolRun = void (*)(int64_t, void (*)(void*, int64_t), void*);
PoolRun pool_run = nullptr;
// Paged decode attention: the engine's kernel (qwenlab.engine.kernels, qwenlab_paged_decode), set by address
// at load like the pool; q [M, H, D] float -> out [M, H, D] float over bf16 or float32 caches.
using PagedDecode = void (*)(const float*, const void*, const void*, int32_t, const int32_t*, const int32_t*, float*,
                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float);
PagedDecode paged_decode = nullptr;

int64_t prefetch_bytes = 1024;  // how far ahead of the weight stream to prefetch (tuning hook)

template <typename F>
void tramp(void* ctx, int64_t i) { (*static_cast<const F*>(ctx))(i); }

// f(i0, i1) over [0, n) in chunks of at least grain items, about 4 chunks per thread.
template <typename F>
void parallel_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), (n + 4 * threads - 1) / (4 * threads));
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (chunks == 1 || threads == 1) { f(int64_t(0), n); return; }
  auto body = [&](int64_t i) { f(i * chunk, std::min(n, (i + 1) * chunk)); };
  if (pool_run != nullptr) pool_run(chunks, &tramp<decltype(body)>, const_cast<void*>(static_cast<const void*>(&body)));
  else at::parallel_for(0, chunks, 1, [&](int64_t a, int64_t b) { for (int64_t i = a; i < b; i++) body(i); });
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float bf16_to_f(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t f_to_bf16(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float rnd(float v, bool bf16) { return bf16 ? bf16_to_f(f_to_bf16(v)) : v; }
// float16 -> float with the F16C instruction (at::Half's conversion is a software routine).
inline float half_f(const at::Half& h) { return _cvtsh_ss(h.x); }

// ---- activations as int16 blocks: x[m, k] ~= xs[m, b] * xi[m, k] (b = k / B), |xi| <= 32767 ----
// The weight-only product runs on the integer multiply-add units (vpmaddwd: 16 products per instruction);
// the rounding error of x is at most 2^-16 of its block's largest value, below bf16's own rounding.
struct XQ {
  int64_t M = 0, K = 0, B = 0, nb = 0, ld = 0;
  std::vector<int16_t> xi;  // [M, ld]
  std::vector<float> xs, xsum;  // [M, nb]: block scale, block sum of the float x
};

// Size q for M rows of K values in blocks of B (contents undefined until quantize_blocks fills them).
void xq_prepare(int64_t M, int64_t K, int64_t B, XQ& q) {
  q.M = M; q.K = K; q.B = B; q.nb = (K + B - 1) / B; q.ld = (K + 15) / 16 * 16;
  q.xi.resize(M * q.ld);
  q.xs.resize(M * q.nb); q.xsum.resize(M * q.nb);
}

// Largest |x[k]| and the sum of x[k] over k in [k0, k1) (activation blocks of decode and of int4 prefill).
inline void block_stats(const float* x, int64_t k0, int64_t k1, float& amax, float& sum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps(), sm = _mm256_setzero_ps();
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
    sm = _mm256_add_ps(sm, v);
  }
  amax = 0.f;
  sum = hsum(sm);
  float t[8];
  _mm256_storeu_ps(t, mx);
  for (int i = 0; i < 8; i++) amax = std::max(amax, t[i]);
  for (; k < k1; k++) { amax = std::max(amax, std::fabs(x[k])); sum += x[k]; }
}

// Blocks [b0, b1) of every row of x ([M, ldx] float, values k < q.K) into q (sized by xq_prepare).
void quantize_blocks(const float* x, int64_t ldx, int64_t b0, int64_t b1, XQ& q) {
  const int64_t K = q.K, B = q.B;
  for (int64_t m = 0; m < q.M; m++)
    for (int64_t b = b0; b < b1; b++) {
      const int64_t k0 = b * B, k1 = std::min(K, k0 + B);
      const float* xr = x + m * ldx;
      float amax, sum;
      block_stats(xr, k0, k1, amax, sum);
      const float scale = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
      q.xs[m * q.nb + b] = scale;
      q.xsum[m * q.nb + b] = sum;
      int16_t* dst = q.xi.data() + m * q.ld;
      const __m256 iv = _mm256_set1_ps(inv);
      int64_t k = k0;
      for (; k + 16 <= k1; k += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), iv));
        __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), iv));
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), p);
      }
      for (; k < k1; k++) dst[k] = int16_t(std::max(-32767.f, std::min(32767.f, std::nearbyint(xr[k] * inv))));
      if (k1 == K) for (k = K; k < q.ld; k++) dst[k] = 0;  // padding
    }
}

void quantize_rows(const float* x, int64_t M, int64_t K, int64_t B, XQ& q) {
  xq_prepare(M, K, B, q);
  quantize_blocks(x, K, 0, q.nb, q);
}

// Activation block of int8 weights' products: the int32 sums of one block are scaled once (a block of
// I8B values costs I8B / 16 multiply-adds and one conversion + FMA). |sum| <= I8B * 127 * 32767 < 2^31.
constexpr int64_t I8B = 128;

// ---- a quantized weight ----
// kind 8: int8 [N, K] codes, float32 scale per row. kind 4: uint8 [N, K/2] packed codes q in [0, 15]
// (runs of 32 values: byte j holds value j low, value j + 16 high), w = scale[g] * q + min[g] per group
// of G (float16 scales and mins [N, K/G]).
struct QW {
  int kind = 0;
  int64_t N = 0, K = 0, G = 0;
  const int8_t* q8 = nullptr;
  const uint8_t* q4 = nullptr;
  const float* s8 = nullptr;
  const at::Half* s4 = nullptr;
  const at::Half* m4 = nullptr;
  int64_t block() const { return kind == 8 ? I8B : G; }
};

QW make_qw(const std::vector<torch::Tensor>& t) {
  TORCH_CHECK(t.size() == 2 || t.size() == 3, "a quantized weight is [qweight, scales] or [qweight, scales, mins]");
  const auto& q = t[0];
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && t[1].is_contiguous(), "qweight/scales must be contiguous");
  QW w;
  w.N = q.size(0);
  if (q.scalar_type() == at::kChar) {
    TORCH_CHECK(t.size() == 2 && t[1].scalar_type() == at::kFloat && t[1].numel() == w.N, "int8: float32 scales [N]");
    w.kind = 8; w.K = q.size(1); w.q8 = q.data_ptr<int8_t>(); w.s8 = t[1].data_ptr<float>();
  } else {
    TORCH_CHECK(q.scalar_type() == at::kByte && t.size() == 3, "int4: uint8 qweight, scales and mins");
    TORCH_CHECK(t[1].scalar_type() == at::kHalf && t[2].scalar_type() == at::kHalf && t[2].is_contiguous() &&
                t[1].dim() == 2 && t[1].size(0) == w.N && t[2].sizes() == t[1].sizes(), "int4: float16 scales/mins [N, K/G]");
    w.kind = 4; w.K = q.size(1) * 2; w.q4 = q.data_ptr<uint8_t>();
    w.s4 = t[1].data_ptr<at::Half>(); w.m4 = t[2].data_ptr<at::Half>();
    TORCH_CHECK(w.K % t[1].size(1) == 0, "int4: groups must divide K");
    w.G = w.K / t[1].size(1);
    TORCH_CHECK(w.G % 32 == 0 && w.G <= 8192, "int4: group size must be a multiple of 32, at most 8192");
  }
  return w;
}

// out[i] = x[m0 + i, :] . dequant(w[n, :]) for i < MT (before bias).
template <int MT>
inline void dot_i8(const XQ& x, int64_t m0, const QW& w, int64_t n, float* out) {
  const int64_t K = w.K, nb = x.nb;
  const int8_t* row = w.q8 + n * K;
  const int16_t* xi[MT];
  const float* xs[MT];
  for (int i = 0; i < MT; i++) { xi[i] = x.xi.data() + (m0 + i) * x.ld; xs[i] = x.xs.data() + (m0 + i) * nb; }
  __m256 acc[MT];
  float tail[MT];
  for (int i = 0; i < MT; i++) { acc[i] = _mm256_setzero_ps(); tail[i] = 0.f; }
  const int64_t full = K / I8B;
  for (int64_t b = 0; b < full; b++) {
    const int8_t* wp = row + b * I8B;
    __m256i s[MT];
    for (int i = 0; i < MT; i++) s[i] = _mm256_setzero_si256();
    for (int c = 0; c < I8B / 16; c++) {
      if ((c & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wp + 16 * c) + prefetch_bytes, _MM_HINT_T0);  // per line
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + 16 * c)));
      for (int i = 0; i < MT; i++)
        s[i] = _mm256_add_epi32(s[i], _mm256_madd_epi16(wv, _mm256_loadu_si256(
                                                             reinterpret_cast<const __m256i*>(xi[i] + b * I8B + 16 * c))));
    }
    for (int i = 0; i < MT; i++) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i]), _mm256_set1_ps(xs[i][b]), acc[i]);
  }
  if (full * I8B < K) {  // the last, partial block
    int32_t part[MT];
    for (int i = 0; i < MT; i++) part[i] = 0;
    for (int64_t k = full * I8B; k < K; k++)
      for (int i = 0; i < MT; i++) part[i] += int32_t(row[k]) * int32_t(xi[i][k]);
    for (int i = 0; i < MT; i++) tail[i] = float(part[i]) * xs[i][full];
  }
  const float sc = w.s8[n];
  for (int i = 0; i < MT; i++) out[i] = (hsum(acc[i]) + tail[i]) * sc;
}

template <int MT>
inline void dot_i4(const XQ& x, int64_t m0, const QW& w, int64_t n, float* out) {
  const int64_t K = w.K, G = w.G, ng = K / G;
  const uint8_t* row = w.q4 + n * (K / 2);
  const at::Half* sc = w.s4 + n * ng;
  const at::Half* mn = w.m4 + n * ng;
  const int16_t* xi[MT];
  const float *xs[MT], *xsum[MT];
  for (int i = 0; i < MT; i++) {
    xi[i] = x.xi.data() + (m0 + i) * x.ld;
    xs[i] = x.xs.data() + (m0 + i) * x.nb;
    xsum[i] = x.xsum.data() + (m0 + i) * x.nb;
  }
  __m256 acc[MT];
  float corr[MT];
  for (int i = 0; i < MT; i++) { acc[i] = _mm256_setzero_ps(); corr[i] = 0.f; }
  const __m256i low = _mm256_set1_epi16(0x0F);
  for (int64_t g = 0; g < ng; g++) {
    __m256i s[MT];
    for (int i = 0; i < MT; i++) s[i] = _mm256_setzero_si256();
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + k / 2) + prefetch_bytes, _MM_HINT_T0);  // per line
      const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
      const __m256i w0 = _mm256_and_si256(v, low), w1 = _mm256_srli_epi16(v, 4);
      for (int i = 0; i < MT; i++) {
        const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi[i] + k)));
        const __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi[i] + k + 16)));
        s[i] = _mm256_add_epi32(s[i], _mm256_add_epi32(p0, p1));
      }
    }
    const float scale = half_f(sc[g]), minv = half_f(mn[g]);
    for (int i = 0; i < MT; i++) {
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i]), _mm256_set1_ps(scale * xs[i][g]), acc[i]);
      corr[i] += minv * xsum[i][g];
    }
  }
  for (int i = 0; i < MT; i++) out[i] = hsum(acc[i]) + corr[i];
}

// One product of a fused call: rows [0, w.N) of y = x @ dequant(w).T (+ bias) into out (float or bf16
// with row stride ldo), optionally rounded to bf16 first (kept float: round_bf16).
struct Job {
  QW w;
  const XQ* x = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  bool out_bf16 = false;
  int64_t ldo = 0;
};

inline void emit(const Job& j, int64_t m, int64_t n, float v) {
  if (j.bias) v += j.bias[n];
  if (j.out_bf16) static_cast<uint16_t*>(j.out)[m * j.ldo + n] = f_to_bf16(v);
  else static_cast<float*>(j.out)[m * j.ldo + n] = v;
}

void run_rows(const Job& j, int64_t n0, int64_t n1) {
  const int64_t M = j.x->M;
  float t[4];
  for (int64_t n = n0; n < n1; n++) {
    int64_t m = 0;
    if (j.w.kind == 8) {
      for (; m + 4 <= M; m += 4) { dot_i8<4>(*j.x, m, j.w, n, t); for (int i = 0; i < 4; i++) emit(j, m + i, n, t[i]); }
      for (; m + 2 <= M; m += 2) { dot_i8<2>(*j.x, m, j.w, n, t); for (int i = 0; i < 2; i++) emit(j, m + i, n, t[i]); }
      for (; m < M; m++) { dot_i8<1>(*j.x, m, j.w, n, t); emit(j, m, n, t[0]); }
    } else {
      for (; m + 4 <= M; m += 4) { dot_i4<4>(*j.x, m, j.w, n, t); for (int i = 0; i < 4; i++) emit(j, m + i, n, t[i]); }
      for (; m + 2 <= M; m += 2) { dot_i4<2>(*j.x, m, j.w, n, t); for (int i = 0; i < 2; i++) emit(j, m + i, n, t[i]); }
      for (; m < M; m++) { dot_i4<1>(*j.x, m, j.w, n, t); emit(j, m, n, t[0]); }
    }
  }
}

// All jobs' rows in one parallel region (blocks of 16 weight rows), so a fused call costs one dispatch.
void run_jobs(const std::vector<Job>& jobs) {
  constexpr int64_t BLOCK = 16;
  std::vector<int64_t> start(jobs.size() + 1, 0);
  for (size_t i = 0; i < jobs.size(); i++) start[i + 1] = start[i] + (jobs[i].w.N + BLOCK - 1) / BLOCK;
  parallel_for(start.back(), 1, [&](int64_t b0, int64_t b1) {
    for (size_t i = 0; i < jobs.size(); i++) {
      const int64_t lo = std::max(b0, start[i]), hi = std::min(b1, start[i + 1]);
      if (lo >= hi) continue;
      run_rows(jobs[i], (lo - start[i]) * BLOCK, std::min(jobs[i].w.N, (hi - start[i]) * BLOCK));
    }
  });
}

// float rows of x ([M, K] float or bf16).
const float* as_float(const torch::Tensor& x, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "activations must be float32 or bfloat16");
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  buf.resize(x.numel());
  for (int64_t i = 0; i < x.numel(); i++) buf[i] = bf16_to_f(src[i]);
  return buf.data();
}

const float* opt_float(const c10::optional<torch::Tensor>& t, torch::Tensor& keep) {
  if (!t.has_value()) return nullptr;
  keep = t->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

Job job(const QW& w, const XQ* x, const float* bias, float* out) {
  Job j; j.w = w; j.x = x; j.bias = bias; j.out = out; j.ldo = w.N; return j;
}

// One head's row x (float) in place: rounding to the activation dtype, optional RMSNorm, RoPE (the
// arithmetic of norm_rope_store); y: D floats of scratch.
void norm_rope_head(float* x, int64_t D, const float* nw, float eps, const float* c, const float* s, bool bf16, float* y) {
  for (int64_t d = 0; d < D; d++) y[d] = rnd(x[d], bf16);
  if (nw) {
    float sum = 0.f;
    for (int64_t d = 0; d < D; d++) sum += y[d] * y[d];
    const float sc = 1.f / std::sqrt(sum / D + eps);
    for (int64_t d = 0; d < D; d++) y[d] = rnd(nw[d] * rnd(y[d] * sc, bf16), bf16);
  }
  for (int64_t d = 0; d < D; d++) {
    const float rotated = d < D / 2 ? -y[d + D / 2] : y[d - D / 2];
    x[d] = rnd(rnd(y[d] * c[d], bf16) + rnd(rotated * s[d], bf16), bf16);
  }
}

// rows [T, heads * D] -> optional per-head RMSNorm and RoPE -> out[0, head, t, :] (transformers' roundings)
void norm_rope_store(const float* rows, int64_t T, int64_t heads, int64_t D, const float* norm_w, float eps,
                     const float* cos, const float* sin, bool bf16, torch::Tensor& out) {
  std::vector<float> x(D), y(D);
  for (int64_t i = 0; i < T * heads; i++) {
    const int64_t t = i / heads, h = i % heads;
    std::copy(rows + i * D, rows + (i + 1) * D, x.begin());
    norm_rope_head(x.data(), D, norm_w, eps, cos + t * D, sin + t * D, bf16, y.data());
    const int64_t offset = (h * T + t) * D;
    for (int64_t d = 0; d < D; d++) {
      if (bf16) reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>())[offset + d] = f_to_bf16(x[d]);
      else out.data_ptr<float>()[offset + d] = x[d];
    }
  }
}

}  // namespace

void set_pool(int64_t address) { pool_run = reinterpret_cast<PoolRun>(address); }
void set_paged_decode(int64_t address) { paged_decode = reinterpret_cast<PagedDecode>(address); }
void set_prefetch(int64_t bytes) { prefetch_bytes = bytes; }

// y = x @ dequant(w).T (+ bias); x [..., K] float or bf16, few rows (decode); y in x's dtype.
torch::Tensor linear(torch::Tensor x, std::vector<torch::Tensor> weight, c10::optional<torch::Tensor> bias) {
  const QW w = make_qw(weight);
  TORCH_CHECK(x.size(-1) == w.K, "x and the weight disagree on K");
  auto x2 = x.reshape({-1, w.K}).contiguous();
  std::vector<float> xb;
  XQ xq;
  quantize_rows(as_float(x2, xb), x2.size(0), w.K, w.block(), xq);
  torch::Tensor bk;
  auto sizes = x.sizes().vec();
  sizes.back() = w.N;
  auto out = torch::empty(sizes, x.options());
  Job j = job(w, &xq, opt_float(bias, bk), nullptr);
  j.out_bf16 = x.scalar_type() == at::kBFloat16;
  j.out = out.data_ptr();
  run_jobs({j});
  return out;
}

// Attention inputs for x [1, T, hidden]: q/k/v projections (one parallel region), Qwen3's per-head q/k
// RMSNorm when given, RoPE with cos/sin [T, D]. Returns q [1, Hq, T, D], k, v [1, Hkv, T, D] in x's dtype.
std::vector<torch::Tensor> attention_inputs(torch::Tensor x, std::vector<torch::Tensor> wq, std::vector<torch::Tensor> wk,
                                            std::vector<torch::Tensor> wv, c10::optional<torch::Tensor> bq,
                                            c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bv,
                                            c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                                            torch::Tensor cos, torch::Tensor sin, double eps, int64_t heads,
                                            int64_t kv_heads, int64_t D) {
  const QW q = make_qw(wq), k = make_qw(wk), v = make_qw(wv);
  const int64_t K = x.size(-1), T = x.numel() / K;
  TORCH_CHECK(q.K == K && k.K == K && v.K == K && q.N == heads * D && k.N == kv_heads * D && v.N == kv_heads * D,
              "attention_inputs: weight shapes");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto x2 = x.reshape({T, K}).contiguous();
  std::vector<float> xb;
  const float* xp = as_float(x2, xb);
  XQ xq, xq2;
  quantize_rows(xp, T, K, q.block(), xq);
  const XQ* xk = &xq;
  if (k.block() != q.block() || v.block() != q.block()) { quantize_rows(xp, T, K, k.block(), xq2); xk = &xq2; }
  torch::Tensor kb_q, kb_k, kb_v, kn_q, kn_k;
  const float *pbq = opt_float(bq, kb_q), *pbk = opt_float(bk, kb_k), *pbv = opt_float(bv, kb_v);
  const float *pnq = opt_float(q_norm, kn_q), *pnk = opt_float(k_norm, kn_k);
  auto cf = cos.reshape({T, D}).to(at::kFloat).contiguous(), sf = sin.reshape({T, D}).to(at::kFloat).contiguous();
  std::vector<float> qr(T * q.N), kr(T * k.N);
  auto v_rows = torch::empty({T, v.N}, x.options());
  Job jv = job(v, xk, pbv, nullptr);
  jv.out = v_rows.data_ptr();
  jv.out_bf16 = bf16;
  run_jobs({job(q, &xq, pbq, qr.data()), job(k, xk, pbk, kr.data()), jv});
  auto qo = torch::empty({1, heads, T, D}, x.options());
  auto ko = torch::empty({1, kv_heads, T, D}, x.options());
  norm_rope_store(qr.data(), T, heads, D, pnq, float(eps), cf.data_ptr<float>(), sf.data_ptr<float>(), bf16, qo);
  norm_rope_store(kr.data(), T, kv_heads, D, pnk, float(eps), cf.data_ptr<float>(), sf.data_ptr<float>(), bf16, ko);
  auto vo = T == 1 ? v_rows.view({1, kv_heads, 1, D}) : v_rows.view({1, T, kv_heads, D}).transpose(1, 2).contiguous();
  return {qo, ko, vo};
}

// SwiGLU MLP down(silu(gate(x)) * up(x)): gate and up in one parallel region, intermediates rounded like
// transformers when x is bf16.
torch::Tensor mlp(torch::Tensor x, std::vector<torch::Tensor> wg, std::vector<torch::Tensor> wu,
                  std::vector<torch::Tensor> wd) {
  const QW g = make_qw(wg), u = make_qw(wu), d = make_qw(wd);
  const int64_t K = x.size(-1), T = x.numel() / K, I = g.N;
  TORCH_CHECK(g.K == K && u.K == K && u.N == I && d.K == I, "mlp: weight shapes");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  auto x2 = x.reshape({T, K}).contiguous();
  std::vector<float> xb;
  const float* xp = as_float(x2, xb);
  XQ xq, xq2;
  quantize_rows(xp, T, K, g.block(), xq);
  const XQ* xu = &xq;
  if (u.block() != g.block()) { quantize_rows(xp, T, K, u.block(), xq2); xu = &xq2; }
  std::vector<float> gr(T * I), ur(T * I);
  run_jobs({job(g, &xq, nullptr, gr.data()), job(u, xu, nullptr, ur.data())});
  for (int64_t i = 0; i < T * I; i++) {
    const float gate = rnd(gr[i], bf16);
    gr[i] = rnd(rnd(gate / (1.f + std::exp(-gate)), bf16) * rnd(ur[i], bf16), bf16);
  }
  XQ hq;
  quantize_rows(gr.data(), T, I, d.block(), hq);
  auto sizes = x.sizes().vec();
  sizes.back() = d.N;
  auto out = torch::empty(sizes, x.options());
  Job jd = job(d, &hq, nullptr, nullptr);
  jd.out = out.data_ptr();
  jd.out_bf16 = bf16;
  run_jobs({jd});
  return out;
}

// Rows [n0, n1) of dequant(w) as float32 [n1 - n0, K] (prefill: the caller hands the block to the sgemm).
// One pass over the weight bytes, vectorised: the stock-op route (cast, then scale; int4:
// unpack, cast, scale, add the min) makes 3-6 passes over a float block the size of the weights x 4.
torch::Tensor dequantize_rows(std::vector<torch::Tensor> weight, int64_t n0, int64_t n1) {
  const QW w = make_qw(weight);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= w.N, "dequantize_rows: row range");
  const int64_t K = w.K;
  auto out = torch::empty({n1 - n0, K}, torch::kFloat);
  float* op = out.data_ptr<float>();
  // ATen's (OpenMP) threads, as the sgemm that follows: the work pool's helpers would spin beside them
  at::parallel_for(0, n1 - n0, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const int64_t n = n0 + r;
      float* dst = op + r * K;
      if (w.kind == 8) {
        const int8_t* row = w.q8 + n * K;
        const __m256 sc = _mm256_set1_ps(w.s8[n]);
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
          const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
          _mm256_storeu_ps(dst + k, _mm256_mul_ps(_mm256_cvtepi32_ps(v), sc));
        }
        for (; k < K; k++) dst[k] = float(row[k]) * w.s8[n];
      } else {
        const int64_t ng = K / w.G;
        const uint8_t* row = w.q4 + n * (K / 2);
        for (int64_t g = 0; g < ng; g++) {
          const __m256 sc = _mm256_set1_ps(half_f(w.s4[n * ng + g])), mn = _mm256_set1_ps(half_f(w.m4[n * ng + g]));
          for (int64_t k = g * w.G; k < (g + 1) * w.G; k += 32) {  // a run of 32: byte j = value j (low), j + 16 (high)
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
            const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F)), hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int i = 0; i < 4; i++) {
              const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
              _mm256_storeu_ps(dst + k + 8 * i, _mm256_fmadd_ps(v, sc, mn));
            }
          }
        }
      }
    }
  });
  return out;
}

// ---- int4 prefill: products on int8 activations ----
// Prefill is compute-bound, and on AVX2 without VNNI a float FMA does 8 products. vpmaddubsw does 32 (bytes x
// bytes, pairs summed into int16): the int4 codes (0..15, unsigned) times activations rounded to int8 per weight
// group (like llama.cpp's Q8 activation blocks; about 0.4% of the group's largest value per element, the
// measured logit drift is in docs/quantization.md). Products are exact: a pair is at most 2 * 15 * 127, so 8
// steps sum in int16 before vpmaddwd widens them; one float FMA per 32 values applies scale(w) * scale(x).
// Each block of 16 output channels is first repacked (its codes as [K/4][16][4] bytes: four consecutive codes
// of one channel in one 32-bit lane) and then serves every row of x: lanes are output channels, the 4 codes of
// a lane meet a broadcast of the same 4 activations.
namespace {
struct XQ8 {
  int64_t M = 0, K = 0, G = 0, ng = 0;
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> s, sum;  // [M, ng]: block scale, block sum of the float x (the min term)
};

void quantize8(const float* x, int64_t M, int64_t K, int64_t G, XQ8& o) {
  o.M = M; o.K = K; o.G = G; o.ng = K / G;
  o.q.resize(M * K); o.s.resize(M * o.ng); o.sum.resize(M * o.ng);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++)
      for (int64_t g = 0; g < o.ng; g++) {
        const float* xr = x + m * K + g * G;
        float amax, sum;
        block_stats(xr, 0, G, amax, sum);
        o.s[m * o.ng + g] = amax / 127.f;
        o.sum[m * o.ng + g] = sum;
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        for (int64_t k = 0; k < G; k += 32) {
          __m256i v[4];
          for (int i = 0; i < 4; i++) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * i), inv));
          const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.q.data() + m * K + g * G + k),
                              _mm256_permutevar8x32_epi32(p, order));
        }
      }
  });
}

constexpr int64_t P4 = 16;  // output channels per repacked block

// Channels [n0, n0 + nc) of w (nc <= 16; missing channels get code 0, scale 0, min 0) into panel
// [K/4][16] uint32 (4 codes each), scales and mins [ng][16] float.
void pack_i4(const QW& w, int64_t n0, int64_t nc, std::vector<uint8_t>& codes, std::vector<uint32_t>& panel,
             std::vector<float>& sc, std::vector<float>& mn) {
  const int64_t K = w.K, ng = K / w.G;
  codes.assign(P4 * K, 0);
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t c = 0; c < nc; c++) {
    const uint8_t* row = w.q4 + (n0 + c) * (K / 2);
    uint8_t* dst = codes.data() + c * K;
    for (int64_t k = 0; k < K; k += 32) {  // a run of 32: byte t = code t (low nibble), t + 16 (high)
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm_and_si128(b, low));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k + 16), _mm_and_si128(_mm_srli_epi16(b, 4), low));
    }
  }
  panel.resize(K / 4 * P4);
  for (int64_t q = 0; q < K / 4; q++)
    for (int64_t c = 0; c < P4; c++) std::memcpy(&panel[q * P4 + c], codes.data() + c * K + 4 * q, 4);
  sc.assign(ng * P4, 0.f); mn.assign(ng * P4, 0.f);
  for (int64_t c = 0; c < nc; c++)
    for (int64_t g = 0; g < ng; g++) {
      sc[g * P4 + c] = half_f(w.s4[(n0 + c) * ng + g]);
      mn[g * P4 + c] = half_f(w.m4[(n0 + c) * ng + g]);
    }
}

// acc[i * 16 + c] += the groups [g0, g1) of x[m + i] . dequant(w[n0 + c]) for i < MR.
template <int MR>
inline void i4_tile(const XQ8& x, int64_t m, int64_t g0, int64_t g1, const uint32_t* panel, const float* sc,
                    const float* mn, float* acc) {
  const int64_t K = x.K, G = x.G, ng = x.ng;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[MR][2];
  for (int i = 0; i < MR; i++) {
    f[i][0] = _mm256_loadu_ps(acc + i * P4);
    f[i][1] = _mm256_loadu_ps(acc + i * P4 + 8);
  }
  const int8_t* xr[MR];
  for (int i = 0; i < MR; i++) xr[i] = x.q.data() + (m + i) * K;
  for (int64_t g = g0; g < g1; g++) {
    const __m256 s0 = _mm256_loadu_ps(sc + g * P4), s1 = _mm256_loadu_ps(sc + g * P4 + 8);
    for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += 32) {  // 8 steps of 4 codes, then widen
      __m256i a[MR][2];
      for (int i = 0; i < MR; i++) a[i][0] = a[i][1] = _mm256_setzero_si256();
      for (int64_t k = k0; k < k0 + 32; k += 4) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (k / 4) * P4));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + (k / 4) * P4 + 8));
        for (int i = 0; i < MR; i++) {
          int32_t quad;
          std::memcpy(&quad, xr[i] + k, 4);
          const __m256i xb = _mm256_set1_epi32(quad);
          a[i][0] = _mm256_add_epi16(a[i][0], _mm256_maddubs_epi16(w0, xb));
          a[i][1] = _mm256_add_epi16(a[i][1], _mm256_maddubs_epi16(w1, xb));
        }
      }
      for (int i = 0; i < MR; i++) {
        const __m256 sx = _mm256_set1_ps(x.s[(m + i) * ng + g]);
        f[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a[i][0], ones)), _mm256_mul_ps(s0, sx), f[i][0]);
        f[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a[i][1], ones)), _mm256_mul_ps(s1, sx), f[i][1]);
      }
    }
    const __m256 m0 = _mm256_loadu_ps(mn + g * P4), m1 = _mm256_loadu_ps(mn + g * P4 + 8);
    for (int i = 0; i < MR; i++) {
      const __m256 xs = _mm256_set1_ps(x.sum[(m + i) * ng + g]);
      f[i][0] = _mm256_fmadd_ps(m0, xs, f[i][0]);
      f[i][1] = _mm256_fmadd_ps(m1, xs, f[i][1]);
    }
  }
  for (int i = 0; i < MR; i++) {
    _mm256_storeu_ps(acc + i * P4, f[i][0]);
    _mm256_storeu_ps(acc + i * P4 + 8, f[i][1]);
  }
}
}  // namespace

// y = x @ dequant(w).T (+ bias) for an int4 weight and many rows (prefill), on int8 activation blocks
// (one per weight group); y in x's dtype.
torch::Tensor linear_prefill_int4(torch::Tensor x, std::vector<torch::Tensor> weight, c10::optional<torch::Tensor> bias) {
  const QW w = make_qw(weight);
  TORCH_CHECK(w.kind == 4, "linear_prefill_int4: an int4 weight");
  const int64_t K = w.K, N = w.N;
  TORCH_CHECK(x.size(-1) == K, "x and the weight disagree on K");
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<float> xb;
  XQ8 xq;
  quantize8(as_float(x2, xb), M, K, w.G, xq);
  torch::Tensor bk;
  const float* bp = opt_float(bias, bk);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = torch::empty(sizes, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  void* op = out.data_ptr();
  at::parallel_for(0, (N + P4 - 1) / P4, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> codes;
    std::vector<uint32_t> panel;
    std::vector<float> sc, mn, acc(M * P4);
    // K in chunks of about 1,024 codes, so that a chunk of the panel (16 KiB) stays in L1 while every row
    // passes: with the whole panel of K = 3,072 in L2 the products ran at 0.6x the K = 1,024 rate
    const int64_t ng = K / w.G, chunk = std::max<int64_t>(1, 1024 / w.G);
    for (int64_t b = b0; b < b1; b++) {
      const int64_t n0 = b * P4, nc = std::min(P4, N - n0);
      pack_i4(w, n0, nc, codes, panel, sc, mn);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g0 = 0; g0 < ng; g0 += chunk) {
        const int64_t g1 = std::min(ng, g0 + chunk);
        int64_t m = 0;
        for (; m + 3 <= M; m += 3) i4_tile<3>(xq, m, g0, g1, panel.data(), sc.data(), mn.data(), acc.data() + m * P4);
        for (; m < M; m++) i4_tile<1>(xq, m, g0, g1, panel.data(), sc.data(), mn.data(), acc.data() + m * P4);
      }
      for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < nc; c++) {
          const float v = acc[m * P4 + c] + (bp ? bp[n0 + c] : 0.f);
          if (bf16) static_cast<uint16_t*>(op)[m * N + n0 + c] = f_to_bf16(v);
          else static_cast<float*>(op)[m * N + n0 + c] = v;
        }
    }
  });
  return out;
}

// ---- int4 scale search (quantization time) ----
namespace {
inline float half_round(float v) { return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)); }

// Squared error of a group of G (multiple of 8) values coded with scale s and min m (codes 0..15).
inline float group_error(const float* x, int64_t G, float s, float m) {
  const __m256 inv = _mm256_set1_ps(1.f / s), sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(m);
  const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(15.f);
  __m256 e = _mm256_setzero_ps();
  for (int64_t k = 0; k < G; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, mv), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(q, zero), top);
    const __m256 d = _mm256_sub_ps(_mm256_fmadd_ps(q, sv, mv), v);
    e = _mm256_fmadd_ps(d, d, e);
  }
  return hsum(e);
}
}  // namespace

// Asymmetric 4-bit codes for groups x [R, G] (float32): for each candidate scale of a small grid,
// (15 + d) / (max - min) for d in -1.0, -0.9, ..., 1.0, round, then refit scale and min by least squares
// to those codes; keep the pair (rounded to float16) whose codes give the least squared error.
// Returns codes uint8 [R, G] in 0..15, scales and mins float32 [R] (exactly representable in float16).
std::vector<torch::Tensor> int4_search(torch::Tensor groups) {
  TORCH_CHECK(groups.scalar_type() == at::kFloat && groups.dim() == 2 && groups.is_contiguous(), "float32 [R, G]");
  const int64_t R = groups.size(0), G = groups.size(1);
  TORCH_CHECK(G % 8 == 0 && G > 0, "group size must be a multiple of 8");
  auto codes = torch::empty({R, G}, torch::kByte);
  auto scales = torch::empty({R}, torch::kFloat), mins = torch::empty({R}, torch::kFloat);
  const float* xp = groups.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float *sp = scales.data_ptr<float>(), *mp = mins.data_ptr<float>();
  parallel_for(R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* x = xp + r * G;
      float lo = x[0], hi = x[0], sw = 0.f;
      for (int64_t k = 0; k < G; k++) { lo = std::min(lo, x[k]); hi = std::max(hi, x[k]); sw += x[k]; }
      float best_s = half_round((hi - lo) / 15.f), best_m = half_round(lo);
      if (!(best_s > 0.f)) {  // a constant group (or one below float16's range): every code 0
        sp[r] = 0.f; mp[r] = half_round(lo);
        std::memset(cp + r * G, 0, G);
        continue;
      }
      float best_e = group_error(x, G, best_s, best_m);
      const float range = hi - lo;
      for (int step = -10; step <= 10; step++) {
        const float iscale = (15.f + 0.1f * step) / range;
        const __m256 lov = _mm256_set1_ps(lo), isv = _mm256_set1_ps(iscale);
        const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(15.f);
        __m256 aq = _mm256_setzero_ps(), aqq = aq, aqw = aq;
        for (int64_t k = 0; k < G; k += 8) {
          const __m256 v = _mm256_loadu_ps(x + k);
          __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, lov), isv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q = _mm256_min_ps(_mm256_max_ps(q, zero), top);
          aq = _mm256_add_ps(aq, q);
          aqq = _mm256_fmadd_ps(q, q, aqq);
          aqw = _mm256_fmadd_ps(q, v, aqw);
        }
        const float sq = hsum(aq), sqq = hsum(aqq), sqw = hsum(aqw);
        const float det = float(G) * sqq - sq * sq;
        if (!(det > 0.f)) continue;
        const float s = half_round((float(G) * sqw - sq * sw) / det);
        const float m = half_round((sw - s * sq) / float(G));
        if (!(s > 0.f)) continue;
        const float e = group_error(x, G, s, m);
        if (e < best_e) { best_e = e; best_s = s; best_m = m; }
      }
      sp[r] = best_s; mp[r] = best_m;
      const float inv = 1.f / best_s;
      for (int64_t k = 0; k < G; k++)
        cp[r * G + k] = uint8_t(std::min(15.f, std::max(0.f, std::nearbyint((x[k] - best_m) * inv))));
    }
  });
  return {codes, scales, mins};
}

// ---- a whole decode step in one call (quantized dense models) ----
// Like the engine's bf16 decode plan: a plan holds one quantized model's weights and KV caches; a step of
// M single-token rows is then one call: embedding rows, every layer (norm -> q/k/v in one parallel region
// -> q/k norm + RoPE -> KV write -> paged attention -> o_proj + residual -> norm -> gate/up in one region
// -> SwiGLU -> down + residual), final norm, LM head. Roundings follow the module route (transformers'
// for bf16 activations), so the plan agrees with it to the kernels' precision; no Python per layer.
namespace {

struct QLayer {
  QW wq, wk, wv, wo, wg, wu, wd;
  std::vector<float> in_norm, post_norm, q_norm, k_norm, bq, bk, bv, bo;  // empty = absent
  torch::Tensor k_cache, v_cache;
};

struct QPlan {
  std::vector<torch::Tensor> keep;
  std::vector<QLayer> layers;
  QW embed, lm_head;
  std::vector<float> final_norm;
  int64_t hidden = 0, heads = 0, kv_heads = 0, D = 0, inter = 0, vocab = 0;
  float eps = 0.f, qk_eps = 0.f, scale = 1.f;
  bool bf16 = true;  // activation dtype: bf16 (rounded like transformers) or float32
};

std::vector<std::unique_ptr<QPlan>>& qplans() {
  static std::vector<std::unique_ptr<QPlan>> plans;
  return plans;
}

std::vector<float> fvec(const torch::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return {};
  auto f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

QW plan_qw(QPlan& p, const torch::Tensor* t, int64_t N, int64_t K) {
  std::vector<torch::Tensor> parts = {t[0], t[1]};
  if (t[2].numel()) parts.push_back(t[2]);
  QW w = make_qw(parts);
  TORCH_CHECK(w.N == N && w.K == K, "quantized decode plan: weight is [", w.N, ", ", w.K, "], expected [", N, ", ", K, "]");
  for (auto& x : parts) p.keep.push_back(x);
  return w;
}

void plan_norm(const float* x, int64_t M, int64_t D, const float* w, float eps, bool bf16, float* out) {
  for (int64_t r = 0; r < M; r++) {
    const float* src = x + r * D;
    float* dst = out + r * D;
    float sum = 0.f;
    for (int64_t d = 0; d < D; d++) sum += src[d] * src[d];
    const float scale = 1.f / std::sqrt(sum / D + eps);
    for (int64_t d = 0; d < D; d++) dst[d] = rnd(w[d] * rnd(src[d] * scale, bf16), bf16);
  }
}

inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float tof(float v) { return v; }
inline float tof(uint16_t v) { return bf16_to_f(v); }

// Dequantized row r of a quantized embedding into dst (float).
void embed_row(const QW& w, int64_t r, float* dst) {
  if (w.kind == 8) {
    const float s = w.s8[r];
    for (int64_t k = 0; k < w.K; k++) dst[k] = float(w.q8[r * w.K + k]) * s;
  } else {
    const int64_t ng = w.K / w.G;
    const uint8_t* row = w.q4 + r * (w.K / 2);
    for (int64_t k = 0; k < w.K; k++) {
      const uint8_t byte = row[(k / 32) * 16 + (k % 16)];
      const int code = (k % 32) < 16 ? (byte & 0x0F) : (byte >> 4);
      const int64_t g = r * ng + k / w.G;
      dst[k] = float(code) * float(w.s4[g]) + float(w.m4[g]);
    }
  }
}

inline const float* opt(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

// A region's rows cut into the parts the threads claim (like the engine's bf16 decode plan): guided
// (plan_guided, the default): the first parts are large (remaining / (2 x threads)) and shrink to
// plan_min_rows, so each thread streams long runs and the threads finish close together; else about 4
// equal parts per thread. Parts never straddle two matrices; their sizes are multiples of align (align
// divides each matrix's rows, or the last part of a matrix is shorter).
struct Part { int64_t mat, n0, n1; };
bool plan_guided = true;
int64_t plan_min_rows = 32;

std::vector<Part> split_parts(const std::vector<int64_t>& rows, int64_t align) {
  const int64_t T = std::max(1, at::get_num_threads());
  int64_t remaining = 0;
  for (int64_t r : rows) remaining += r;
  std::vector<Part> parts;
  int64_t mat = 0, offset = 0;
  const int64_t equal = (remaining + 4 * T - 1) / (4 * T);
  while (remaining > 0) {
    int64_t size = plan_guided ? std::max(plan_min_rows, (remaining + 2 * T - 1) / (2 * T)) : equal;
    size = std::min(remaining, (size + align - 1) / align * align);
    remaining -= size;
    while (size > 0) {
      while (offset == rows[mat]) { mat++; offset = 0; }
      const int64_t take = std::min(size, rows[mat] - offset);
      parts.push_back({mat, offset, offset + take});
      offset += take;
      size -= take;
    }
  }
  return parts;
}

template <typename F>
void run_parts(const std::vector<Part>& parts, const F& fn) {
  auto body = [&](int64_t i) { fn(parts[i]); };
  const int64_t n = int64_t(parts.size());
  if (pool_run != nullptr && n > 1 && at::get_num_threads() > 1)
    pool_run(n, &tramp<decltype(body)>, const_cast<void*>(static_cast<const void*>(&body)));
  else
    for (int64_t i = 0; i < n; i++) body(i);
}


}  // namespace

// Per layer 31 tensors: input norm; q, k, v weights (3 each: qweight, scales, mins or empty); q, k, v
// biases; q norm; k norm; o weight (3); o bias; post-attention norm; gate, up, down weights (3 each); k and v
// caches. Absent biases/norms are empty tensors. embed and lm_head: 3 tensors each. dims: hidden, heads,
// kv_heads, head_dim, intermediate, vocab. Returns the plan's id.
int64_t plan_create(std::vector<torch::Tensor> layers, std::vector<torch::Tensor> embed, torch::Tensor final_norm,
                    std::vector<torch::Tensor> lm_head, std::vector<int64_t> dims, double eps, double qk_eps,
                    double scale, bool bf16) {
  TORCH_CHECK(dims.size() == 6 && layers.size() % 31 == 0 && embed.size() == 3 && lm_head.size() == 3,
              "quantized decode plan: bad arguments");
  auto plan = std::make_unique<QPlan>();
  QPlan& p = *plan;
  p.hidden = dims[0]; p.heads = dims[1]; p.kv_heads = dims[2]; p.D = dims[3]; p.inter = dims[4]; p.vocab = dims[5];
  p.eps = float(eps); p.qk_eps = float(qk_eps); p.scale = float(scale); p.bf16 = bf16;
  const int64_t H = p.hidden, qd = p.heads * p.D, kvd = p.kv_heads * p.D, I = p.inter;
  TORCH_CHECK(p.D % 2 == 0 && p.heads % p.kv_heads == 0, "quantized decode plan: head layout");
  p.embed = plan_qw(p, embed.data(), p.vocab, H);
  p.lm_head = plan_qw(p, lm_head.data(), p.vocab, H);
  p.final_norm = fvec(final_norm);
  TORCH_CHECK(int64_t(p.final_norm.size()) == H, "quantized decode plan: final norm");
  const auto cache_type = bf16 ? at::kBFloat16 : at::kFloat;
  for (size_t i = 0; i < layers.size(); i += 31) {
    const torch::Tensor* t = layers.data() + i;
    QLayer L;
    L.in_norm = fvec(t[0]);
    L.wq = plan_qw(p, t + 1, qd, H); L.wk = plan_qw(p, t + 4, kvd, H); L.wv = plan_qw(p, t + 7, kvd, H);
    L.bq = fvec(t[10]); L.bk = fvec(t[11]); L.bv = fvec(t[12]);
    L.q_norm = fvec(t[13]); L.k_norm = fvec(t[14]);
    L.wo = plan_qw(p, t + 15, H, qd); L.bo = fvec(t[18]);
    L.post_norm = fvec(t[19]);
    L.wg = plan_qw(p, t + 20, I, H); L.wu = plan_qw(p, t + 23, I, H); L.wd = plan_qw(p, t + 26, H, I);
    L.k_cache = t[29]; L.v_cache = t[30];
    TORCH_CHECK(int64_t(L.in_norm.size()) == H && int64_t(L.post_norm.size()) == H, "quantized decode plan: norms");
    for (const auto& c : {L.k_cache, L.v_cache})
      TORCH_CHECK(c.scalar_type() == cache_type && c.is_contiguous() && c.dim() == 4 && c.size(2) == p.kv_heads &&
                  c.size(3) == p.D, "quantized decode plan: caches must be contiguous [blocks, block_size, kv_heads, head_dim] "
                  "in the activation dtype");
    p.keep.push_back(L.k_cache);
    p.keep.push_back(L.v_cache);
    p.layers.push_back(std::move(L));
  }
  qplans().push_back(std::move(plan));
  return int64_t(qplans().size()) - 1;
}

void plan_free(int64_t id) {
  auto& plans = qplans();
  if (id >= 0 && id < int64_t(plans.size())) plans[id].reset();
}

// One decode step of M single-token rows: ids [M], cos/sin [M, head_dim], slots [M], block_tables
// [M, max_blocks] int32, context_lens [M] int32. Returns logits [M, vocab] in the activation dtype.
torch::Tensor plan_run(int64_t id, torch::Tensor ids, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                       torch::Tensor block_tables, torch::Tensor context_lens) {
  auto& plans = qplans();
  TORCH_CHECK(id >= 0 && id < int64_t(plans.size()) && plans[id], "quantized decode plan: unknown id");
  QPlan& p = *plans[id];
  const bool bf16 = p.bf16;
  const int64_t H = p.hidden, D = p.D, heads = p.heads, kvh = p.kv_heads, I = p.inter, V = p.vocab;
  const int64_t qd = heads * D, kvd = kvh * D;
  auto idc = ids.to(at::kLong).contiguous();
  auto slot = slots.to(at::kLong).contiguous();
  auto tables = block_tables.to(at::kInt).contiguous();
  auto lens = context_lens.to(at::kInt).contiguous();
  auto cf = cos.to(at::kFloat).contiguous(), sf = sin.to(at::kFloat).contiguous();
  const int64_t M = idc.numel();
  TORCH_CHECK(M >= 1 && cf.numel() == M * D && sf.numel() == M * D && slot.numel() == M && lens.numel() == M &&
              tables.dim() == 2 && tables.size(0) == M, "quantized decode plan: inputs disagree on the row count");
  const int64_t* idp = idc.data_ptr<int64_t>();
  const int64_t* sp = slot.data_ptr<int64_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t m = 0; m < M; m++) {
    TORCH_CHECK(idp[m] >= 0 && idp[m] < V, "token id ", idp[m], " is outside the vocabulary (0..", V - 1, ")");
    TORCH_CHECK(lp[m] >= 1 && lp[m] <= tables.size(1) * p.layers[0].k_cache.size(1), "quantized decode plan: context length");
  }
  std::vector<float> h(M * H), xn(M * std::max(H, qd)), q(M * qd), k(M * kvd), v(M * kvd), att(M * qd), o(M * H);
  std::vector<float> gate(M * I), up(M * I);
  for (int64_t m = 0; m < M; m++) {
    embed_row(p.embed, idp[m], h.data() + m * H);
    for (int64_t d = 0; d < H; d++) h[m * H + d] = rnd(h[m * H + d], bf16);
  }
  for (int64_t m = 0; m < M; m++) TORCH_CHECK(sp[m] >= 0 && sp[m] < p.layers[0].k_cache.numel() / kvd, "slot out of range");
  XQ xq, xq2, aq;
  for (auto& L : p.layers) {
    const int64_t bs = L.k_cache.size(1);
    // attention block: norm -> q/k/v in one region, with rounding, q/k norm + RoPE and the KV write per head
    plan_norm(h.data(), M, H, L.in_norm.data(), p.eps, bf16, xn.data());
    quantize_rows(xn.data(), M, H, L.wq.block(), xq);
    const XQ* xk = &xq;
    if (L.wk.block() != L.wq.block() || L.wv.block() != L.wq.block()) { quantize_rows(xn.data(), M, H, L.wk.block(), xq2); xk = &xq2; }
    const Job qkv[3] = {job(L.wq, &xq, opt(L.bq), q.data()), job(L.wk, xk, opt(L.bk), k.data()),
                        job(L.wv, xk, opt(L.bv), v.data())};
    const float* qk_norm[2] = {opt(L.q_norm), opt(L.k_norm)};
    float* outs[3] = {q.data(), k.data(), v.data()};
    const int64_t widths[3] = {qd, kvd, kvd};
    run_parts(split_parts({qd, kvd, kvd}, D), [&](const Part& part) {
      run_rows(qkv[part.mat], part.n0, part.n1);
      float yb[512];
      std::vector<float> yv(D > 512 ? D : 0);
      float* y = D > 512 ? yv.data() : yb;
      const int64_t width = widths[part.mat];
      for (int64_t m = 0; m < M; m++) {
        float* rows = outs[part.mat] + m * width;
        if (part.mat < 2) {
          const float *c = cf.data_ptr<float>() + m * D, *s = sf.data_ptr<float>() + m * D;
          for (int64_t i = part.n0; i < part.n1; i += D) norm_rope_head(rows + i, D, qk_norm[part.mat], p.qk_eps, c, s, bf16, y);
        }
        if (part.mat > 0) {
          at::Tensor& cache = part.mat == 1 ? L.k_cache : L.v_cache;
          if (bf16) {
            uint16_t* dst = reinterpret_cast<uint16_t*>(cache.data_ptr<at::BFloat16>()) + sp[m] * kvd;
            for (int64_t i = part.n0; i < part.n1; i++) dst[i] = f_to_bf16(rows[i]);
          } else {
            std::memcpy(cache.data_ptr<float>() + sp[m] * kvd + part.n0, rows + part.n0, sizeof(float) * (part.n1 - part.n0));
          }
        }
      }
    });
    TORCH_CHECK(paged_decode, "quantized decode plan: the engine's paged attention kernel is not loaded");
    paged_decode(q.data(), L.k_cache.data_ptr(), L.v_cache.data_ptr(), bf16, tables.data_ptr<int32_t>(), lp, att.data(),
                 M, heads, kvh, D, bs, tables.size(1), p.scale);
    if (bf16) for (auto& a : att) a = rnd(a, true);
    quantize_rows(att.data(), M, qd, L.wo.block(), aq);
    // o_proj with the residual add per part: h = rnd(h + rnd(o))
    auto residual = [&](int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) h[m * H + n] = rnd(h[m * H + n] + rnd(o[m * H + n], bf16), bf16);
    };
    const Job jo = job(L.wo, &aq, opt(L.bo), o.data());
    run_parts(split_parts({H}, 16), [&](const Part& part) { run_rows(jo, part.n0, part.n1); residual(part.n0, part.n1); });
    // MLP block: gate/up in one region with SwiGLU and the down projection's input quantization per part
    plan_norm(h.data(), M, H, L.post_norm.data(), p.eps, bf16, xn.data());
    quantize_rows(xn.data(), M, H, L.wg.block(), xq);
    const XQ* xu = &xq;
    if (L.wu.block() != L.wg.block()) { quantize_rows(xn.data(), M, H, L.wu.block(), xq2); xu = &xq2; }
    const Job jg = job(L.wg, &xq, nullptr, gate.data()), ju = job(L.wu, xu, nullptr, up.data());
    const int64_t Bd = L.wd.block();
    xq_prepare(M, I, Bd, aq);
    run_parts(split_parts({I}, Bd), [&](const Part& part) {
      run_rows(jg, part.n0, part.n1);
      run_rows(ju, part.n0, part.n1);
      for (int64_t m = 0; m < M; m++)
        for (int64_t i = part.n0; i < part.n1; i++) {
          const float g = rnd(gate[m * I + i], bf16);
          gate[m * I + i] = rnd(rnd(g / (1.f + std::exp(-g)), bf16) * rnd(up[m * I + i], bf16), bf16);
        }
      quantize_blocks(gate.data(), I, part.n0 / Bd, (part.n1 + Bd - 1) / Bd, aq);
    });
    const Job jd = job(L.wd, &aq, nullptr, o.data());
    run_parts(split_parts({H}, 16), [&](const Part& part) { run_rows(jd, part.n0, part.n1); residual(part.n0, part.n1); });
  }
  plan_norm(h.data(), M, H, p.final_norm.data(), p.eps, bf16, xn.data());
  quantize_rows(xn.data(), M, H, p.lm_head.block(), xq);
  auto logits = torch::empty({M, V}, bf16 ? at::kBFloat16 : at::kFloat);
  Job jl = job(p.lm_head, &xq, nullptr, nullptr);
  jl.out = logits.data_ptr();
  jl.out_bf16 = bf16;
  jl.ldo = V;
  run_parts(split_parts({V}, 16), [&](const Part& part) { run_rows(jl, part.n0, part.n1); });
  return logits;
}

// Prefill SwiGLU in place: gate[i] = silu(gate[i]) * up[i] over float32 [T, I] products, with transformers'
// bf16 roundings when bf16 is set (the values a bf16 model's separate ops give); on ATen's threads, like the
// prefill sgemm around it.
torch::Tensor swiglu(torch::Tensor gate, torch::Tensor up, bool bf16) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat && gate.is_contiguous() &&
              up.is_contiguous() && gate.sizes() == up.sizes(), "swiglu: gate and up must be contiguous float32 of one shape");
  float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  at::parallel_for(0, gate.numel(), 4096, [&](int64_t i0, int64_t i1) {
    swiglu_range(g, u, i0, i1, bf16, [bf16](float v) { return rnd(v, bf16); });
  });
  return gate;
}
"""

_FUNCTIONS = ["linear", "attention_inputs", "mlp", "set_pool", "set_paged_decode", "set_prefetch", "int4_search", "dequantize_rows", "linear_prefill_int4", "plan_create", "plan_run",
              "plan_free", "swiglu"]
_module = None
_failed = False


def load():
    """The compiled module, or None (no AVX2/FMA, no compiler, or ``QWENLAB_KERNELS=0``)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    from ..engine import kernels as engine_kernels

    reason = None
    if os.environ.get("QWENLAB_KERNELS", "1") == "0":
        reason = "QWENLAB_KERNELS=0"
    elif not engine_kernels.cpu_supported():
        reason = "this CPU lacks AVX2/FMA"
    else:
        try:
            from torch.utils.cpp_extension import load_inline

            source = _SOURCE.replace("@SIMD@", engine_kernels.SIMD_SOURCE)
            digest = hashlib.sha256(source.encode()).hexdigest()[:10]
            module = load_inline(f"qwenlab_quant_kernels_{digest}", cpp_sources=source, functions=_FUNCTIONS,
                                 extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], verbose=False)
            engine = engine_kernels.load()
            if engine is not None and hasattr(engine, "pool_run_address"):
                module.set_pool(engine.pool_run_address())  # one pool for the whole decode step
            if engine is not None:
                module.set_paged_decode(engine.paged_decode_address())  # the engine's paged attention
            _module = module
        except Exception as exc:  # no compiler, no headers, ...
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if _module is None:
        _failed = True
        logger.warning("qwenlab int8/int4 CPU kernels unavailable (%s); using stock PyTorch", reason)
    return _module
