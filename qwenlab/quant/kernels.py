"""AVX2 + FMA CPU kernels for weight-only int8 / int4 matrix products, compiled on first use.

Same pattern as ``qwenlab.engine.kernels`` (torch's ``load_inline``, cached in ~/.cache/torch_extensions).
Decode is a matrix-vector product bound by the bytes of weights read, so each weight byte is read once
per step and widened in registers: int8 with ``vpmovsxbd`` + ``vcvtdq2ps`` and FMA into float
accumulators (activations stay float: weight-only, no activation quantization); int4 nibbles are split
with a mask and a shift, widened the same way, and each group's sum is scaled once. The offset of 8 of
the int4 code is folded out: sum((q - 8) * x) = sum(q * x) - 8 * sum(x), with sum(x) per group computed
once per call.

* ``int8_linear(x [M, K] float|bf16, q int8 [N, K], scales f32 [N], bias?)`` -> [M, N] in x's dtype
* ``int4_linear(x, packed uint8 [N, K/2], scales f16 [N, K/G], G, bias?)`` -> [M, N]; packed layout: in
  each run of 32 values, byte j holds value j in its low nibble and value j + 16 in its high nibble,
  codes are q + 8 with q in [-8, 7].

Meant for few rows (decode, small batches); the caller dequantizes blocks for large M (prefill).
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
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

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
inline __m256 i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ---- int8: acc[i][j] = x[i, :] . q[j, :] ----
template <int MT, int NT>
inline void dot_i8(const float* x, int64_t K, const int8_t* w, float* out) {
  __m256 acc[MT][NT];
  for (int i = 0; i < MT; i++) for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MT];
    for (int i = 0; i < MT; i++) xv[i] = _mm256_loadu_ps(x + i * K + k);
    for (int j = 0; j < NT; j++) {
      __m256 wv = i8x8(w + j * K + k);
      for (int i = 0; i < MT; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MT; i++)
    for (int j = 0; j < NT; j++) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; kk++) s += x[i * K + kk] * float(w[j * K + kk]);
      out[i * NT + j] = s;
    }
}

// ---- int4: K multiple of 32, G multiple of 32 ----
template <int MT, int NT>
inline void dot_i4(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w,
                   const at::Half* scales, float* out) {
  const int64_t ngroups = K / G;
  __m256 acc[MT][NT];
  float corr[MT][NT];
  for (int i = 0; i < MT; i++) for (int j = 0; j < NT; j++) { acc[i][j] = _mm256_setzero_ps(); corr[i][j] = 0.f; }
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < ngroups; g++) {
    __m256 gacc[MT][NT];
    for (int i = 0; i < MT; i++) for (int j = 0; j < NT; j++) gacc[i][j] = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      __m256 xv[MT][4];
      for (int i = 0; i < MT; i++)
        for (int c = 0; c < 4; c++) xv[i][c] = _mm256_loadu_ps(x + i * K + k + 8 * c);
      for (int j = 0; j < NT; j++) {
        __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * (K / 2) + k / 2));
        __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int i = 0; i < MT; i++) {
          __m256 a = _mm256_fmadd_ps(xv[i][0], w0, gacc[i][j]);
          a = _mm256_fmadd_ps(xv[i][1], w1, a);
          a = _mm256_fmadd_ps(xv[i][2], w2, a);
          gacc[i][j] = _mm256_fmadd_ps(xv[i][3], w3, a);
        }
      }
    }
    for (int j = 0; j < NT; j++) {
      const float s = float(scales[j * ngroups + g]);
      const __m256 sv = _mm256_set1_ps(s);
      for (int i = 0; i < MT; i++) {
        acc[i][j] = _mm256_fmadd_ps(gacc[i][j], sv, acc[i][j]);
        corr[i][j] += s * xsum[i * ngroups + g];
      }
    }
  }
  for (int i = 0; i < MT; i++)
    for (int j = 0; j < NT; j++) out[i * NT + j] = hsum(acc[i][j]) - 8.f * corr[i][j];
}

inline void store(float* d, float v) { *d = v; }
inline void store(uint16_t* d, float v) { *d = f_to_bf16(v); }

template <typename OutT, typename Tile1, typename Tile2, typename Tile3>
void run_tiles(int64_t M, int64_t N, OutT* out, const float* wscale, const float* bias, Tile1 t1, Tile2 t2,
               Tile3 t3) {
  constexpr int64_t BLOCK = 16;
  at::parallel_for(0, (N + BLOCK - 1) / BLOCK, 1, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * BLOCK, n1 = std::min(N, b1 * BLOCK);
    float tile[3 * 4];
    auto emit = [&](int64_t m, int64_t n, int mt, int nt) {
      for (int i = 0; i < mt; i++)
        for (int j = 0; j < nt; j++) {
          float v = tile[i * nt + j] * (wscale ? wscale[n + j] : 1.f) + (bias ? bias[n + j] : 0.f);
          store(out + (m + i) * N + n + j, v);
        }
    };
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) { t3(m, n, tile); emit(m, n, 3, 4); }
      for (; m < M; m++) { t1(m, n, tile); emit(m, n, 1, 4); }
    }
    for (; n < n1; n++)
      for (int64_t m = 0; m < M; m++) { t2(m, n, tile); emit(m, n, 1, 1); }
  });
}

std::vector<float> float_rows(const torch::Tensor& x) {
  std::vector<float> buf(x.numel());
  if (x.scalar_type() == at::kFloat) {
    std::memcpy(buf.data(), x.data_ptr<float>(), sizeof(float) * x.numel());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "activations must be float32 or bfloat16");
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < x.numel(); i++) buf[i] = bf16_to_f(src[i]);
  }
  return buf;
}

template <typename F>
torch::Tensor dispatch_out(const torch::Tensor& x, int64_t M, int64_t N, F body) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = torch::empty(sizes, x.options());
  if (x.scalar_type() == at::kBFloat16) body(reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  else body(out.data_ptr<float>());
  return out;
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "q: contiguous int8 [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales: float32 [N]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(x.size(-1) == K, "x and q disagree on K");
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto xf = float_rows(x2);
  torch::Tensor bias_f;
  const float* bp = nullptr;
  if (bias.has_value()) { bias_f = bias->to(at::kFloat).contiguous(); bp = bias_f.data_ptr<float>(); }
  const float* xp = xf.data();
  const int8_t* wp = q.data_ptr<int8_t>();
  return dispatch_out(x, M, N, [&](auto* out) {
    run_tiles(M, N, out, scales.data_ptr<float>(), bp,
              [&](int64_t m, int64_t n, float* t) { dot_i8<1, 4>(xp + m * K, K, wp + n * K, t); },
              [&](int64_t m, int64_t n, float* t) { dot_i8<1, 1>(xp + m * K, K, wp + n * K, t); },
              [&](int64_t m, int64_t n, float* t) { dot_i8<3, 4>(xp + m * K, K, wp + n * K, t); });
  });
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, int64_t G,
                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(), "packed: uint8 [N, K/2]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales: float16 [N, K/G]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(G % 32 == 0 && K % G == 0 && scales.size(1) == K / G, "group size must divide K, multiple of 32");
  TORCH_CHECK(x.size(-1) == K, "x and weight disagree on K");
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0), ngroups = K / G;
  auto xf = float_rows(x2);
  std::vector<float> xsum(M * ngroups);
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < ngroups; g++) {
      float s = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; k++) s += xf[m * K + k];
      xsum[m * ngroups + g] = s;
    }
  torch::Tensor bias_f;
  const float* bp = nullptr;
  if (bias.has_value()) { bias_f = bias->to(at::kFloat).contiguous(); bp = bias_f.data_ptr<float>(); }
  const float* xp = xf.data();
  const float* sp = xsum.data();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const at::Half* scp = scales.data_ptr<at::Half>();
  return dispatch_out(x, M, N, [&](auto* out) {
    run_tiles(M, N, out, nullptr, bp,
              [&](int64_t m, int64_t n, float* t) {
                dot_i4<1, 4>(xp + m * K, sp + m * ngroups, K, G, wp + n * (K / 2), scp + n * ngroups, t); },
              [&](int64_t m, int64_t n, float* t) {
                dot_i4<1, 1>(xp + m * K, sp + m * ngroups, K, G, wp + n * (K / 2), scp + n * ngroups, t); },
              [&](int64_t m, int64_t n, float* t) {
                dot_i4<3, 4>(xp + m * K, sp + m * ngroups, K, G, wp + n * (K / 2), scp + n * ngroups, t); });
  });
}
"""

_FUNCTIONS = ["int8_linear", "int4_linear"]
_module = None
_failed = False


def load():
    """The compiled module, or None (no AVX2/FMA, no compiler, or ``QWENLAB_KERNELS=0``)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    from ..engine.kernels import cpu_supported

    reason = None
    if os.environ.get("QWENLAB_KERNELS", "1") == "0":
        reason = "QWENLAB_KERNELS=0"
    elif not cpu_supported():
        reason = "this CPU lacks AVX2/FMA"
    else:
        try:
            from torch.utils.cpp_extension import load_inline

            digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:10]
            _module = load_inline(f"qwenlab_quant_kernels_{digest}", cpp_sources=_SOURCE, functions=_FUNCTIONS,
                                  extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], verbose=False)
        except Exception as exc:  # no compiler, no headers, ...
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if _module is None:
        _failed = True
        logger.warning("qwenlab int8/int4 CPU kernels unavailable (%s); using stock PyTorch", reason)
    return _module
