// diffusekit: the int8 GEGLU projection of a transformer feed-forward, fused, for x86 CPUs with AVX-512 VNNI (built
// at run time with cpu_attention.cpp into one library, see diffusekit/cpu_attention.py).
//
//   [a, g] = (x - x_zp) w^T * scale + bias   (an int8 linear layer; a: its first N outputs, g: its last N)
//   out    = quantize_u8(a * gelu(g))          (the uint8 input of the feed-forward's second linear layer)
//
// Why: as separate kernels, the linear layer writes [M, 2N] float32 (84 MB per call in the SD 1.5 UNet's first
// stage) and an elementwise pass reads it back, which took the projection to about half of the int8 peak. Here the
// products stay in registers until they are one uint8 per output.
// x: uint8 [M, K] (per-tensor scale and zero point); w: int8 per output channel (scale w_scale), packed by
// diffusekit.cpu_int8_geglu.pack as [N / 16][K / 4][2][16][4] (per block of 16 outputs and 4 input channels: the
// a-columns, then the g-columns, each a 64-byte vpdpbusd operand), with colsum[c] = sum_k w[c, k] (int32) for the
// zero point. The products are exact int32 sums (vpdpbusd: u8 x s8, 4 per lane);
// gelu is the erf form, erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7); the output rounds
// half to even like torch's quantize_per_tensor.
#include <immintrin.h>

#include "cpu_simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

using diffusekit_simd::exp_accurate;
using diffusekit_simd::quantize_u8;

constexpr int64_t kRows = 6;        // rows per register tile (6 x 4 accumulators)
constexpr int64_t kTaskRows = 96;   // rows per task (a multiple of kRows)
constexpr int64_t kTaskCols = 256;  // outputs per task (a multiple of 32): its packed weight stays in L2

// gelu(g) = g / 2 * (1 + erf(g / sqrt 2)), with 1 + erf(z) = erfc(-z) taken as t poly(t) exp(-z^2) for z < 0 (so
// the small values of the negative side keep their relative precision) and 2 minus that for z >= 0
inline __m512 gelu_erf(__m512 g) {
  const __m512 z = _mm512_mul_ps(g, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  const __m512 d = _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f));
  __m512 t = _mm512_rcp14_ps(d);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.f)));  // one Newton step: ~1e-8
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp_accurate(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az));  // exp(-z^2)
  const __m512 tail = _mm512_mul_ps(p, e);  // erfc(|z|)
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus_erf = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(2.f), tail), tail);
  return _mm512_mul_ps(_mm512_mul_ps(g, _mm512_set1_ps(0.5f)), one_plus_erf);
}

struct Epilogue {
  const int32_t* colsum;  // [2N] sums of each weight row
  const float* w_scale;   // [2N]
  const float* bias;      // [2N]
  int64_t N;              // outputs (a and g have N columns each)
  float x_scale;
  int32_t x_zero_point;
  float inv_scale;  // 1 / the output's scale
  int32_t zero_point;
};

// acc[r][c] = the int32 dot products of R rows of x ([R][K] uint8) with 4 NB packed weight vectors (c: block j's a,
// then g; block stride K * 32 bytes). Named accumulators, not an array: GCC keeps an array of 24 vectors in memory.
// Not inlined: inlined into the epilogue, GCC's register allocation of this loop halved its speed (measured).
template <int R, int NB>
__attribute__((noinline)) void dot_tile(const uint8_t* x, int64_t K, const int8_t* w, __m512i (*acc)[4]) {
  static_assert(R >= 1 && R <= 6 && (NB == 1 || NB == 2));
  __m512i c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, c40, c41, c42, c43, c50,
      c51, c52, c53;
  c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = c40 = c41 = c42 =
      c43 = c50 = c51 = c52 = c53 = _mm512_setzero_si512();
  const int8_t* w1 = w + K * 32;
  for (int64_t k = 0; k < K; k += 4) {
    const __m512i b0 = _mm512_loadu_si512(w + k * 32), b1 = _mm512_loadu_si512(w + k * 32 + 64);
    __m512i b2 = b0, b3 = b1;
    if constexpr (NB == 2) {
      b2 = _mm512_loadu_si512(w1 + k * 32);
      b3 = _mm512_loadu_si512(w1 + k * 32 + 64);
    }
#define DK_ROW(i)                                                   \
  if constexpr (R > i) {                                            \
    int32_t quad;                                                   \
    std::memcpy(&quad, x + i * K + k, 4);                           \
    const __m512i a = _mm512_set1_epi32(quad);                      \
    c##i##0 = _mm512_dpbusd_epi32(c##i##0, a, b0);                  \
    c##i##1 = _mm512_dpbusd_epi32(c##i##1, a, b1);                  \
    if constexpr (NB == 2) {                                        \
      c##i##2 = _mm512_dpbusd_epi32(c##i##2, a, b2);                \
      c##i##3 = _mm512_dpbusd_epi32(c##i##3, a, b3);                \
    }                                                               \
  }
    DK_ROW(0) DK_ROW(1) DK_ROW(2) DK_ROW(3) DK_ROW(4) DK_ROW(5)
#undef DK_ROW
  }
  const __m512i all[6][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23},
                             {c30, c31, c32, c33}, {c40, c41, c42, c43}, {c50, c51, c52, c53}};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = all[r][c];
}

// out[r, n0 .. n0 + 16 NB) for R rows: x rows [R][K] uint8, w: NB packed blocks (block stride K * 32 bytes)
template <int R, int NB>
inline void tile(const uint8_t* x, int64_t K, const int8_t* w, const Epilogue& ep, int64_t n0, uint8_t* out) {
  alignas(64) __m512i acc[R][4];
  dot_tile<R, NB>(x, K, w, acc);
  const __m512 inv = _mm512_set1_ps(ep.inv_scale);
  const __m512i zp = _mm512_set1_epi32(ep.zero_point);
  for (int j = 0; j < NB; ++j) {
    const int64_t na = n0 + 16 * j, ng = na + ep.N;
    const __m512i xzp = _mm512_set1_epi32(ep.x_zero_point);  // sum_k (x - zp) w = sum_k x w - zp sum_k w
    const __m512i ca = _mm512_mullo_epi32(_mm512_loadu_si512(ep.colsum + na), xzp);
    const __m512i cg = _mm512_mullo_epi32(_mm512_loadu_si512(ep.colsum + ng), xzp);
    const __m512 xs = _mm512_set1_ps(ep.x_scale);
    const __m512 sa = _mm512_mul_ps(_mm512_loadu_ps(ep.w_scale + na), xs);
    const __m512 sg = _mm512_mul_ps(_mm512_loadu_ps(ep.w_scale + ng), xs);
    const __m512 ba = _mm512_loadu_ps(ep.bias + na), bg = _mm512_loadu_ps(ep.bias + ng);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][2 * j], ca)), sa, ba);
      const __m512 g = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][2 * j + 1], cg)), sg, bg);
      const __m512 h = _mm512_mul_ps(a, gelu_erf(g));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * ep.N + na), quantize_u8(h, inv, zp));
    }
  }
}

template <int NB>
void rows_tile(int64_t R, const uint8_t* x, int64_t K, const int8_t* w, const Epilogue& ep, int64_t n0,
               uint8_t* out) {
  switch (R) {
    case 6: tile<6, NB>(x, K, w, ep, n0, out); break;
    case 5: tile<5, NB>(x, K, w, ep, n0, out); break;
    case 4: tile<4, NB>(x, K, w, ep, n0, out); break;
    case 3: tile<3, NB>(x, K, w, ep, n0, out); break;
    case 2: tile<2, NB>(x, K, w, ep, n0, out); break;
    default: tile<1, NB>(x, K, w, ep, n0, out); break;
  }
}

at::Tensor int8_geglu(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& colsum,
                      const at::Tensor& w_scale, const std::optional<at::Tensor>& bias_in, double x_scale,
                      int64_t x_zero_point, double out_scale, int64_t out_zero_point) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kByte && x_in.dim() >= 1,
              "diffusekit::int8_geglu: x must be a uint8 CPU tensor [..., K]");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(K % 4 == 0, "diffusekit::int8_geglu: the input channels (", K, ") must be a multiple of 4");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 5 && w.size(1) * 4 == K && w.size(2) == 2 &&
                  w.size(3) == 16 && w.size(4) == 4 && w.is_contiguous(),
              "diffusekit::int8_geglu: the weight must be packed int8 [N / 16, K / 4, 2, 16, 4] for K = ", K,
              ", got ", w.sizes());
  const int64_t N = w.size(0) * 16;
  const at::Tensor bias = bias_in.has_value() && bias_in->defined() ? *bias_in : at::zeros({2 * N}, w_scale.options());
  for (const auto* t : {&colsum, &w_scale, &bias})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == 2 * N && t->is_contiguous(),
                "diffusekit::int8_geglu: colsum, w_scale and bias must be contiguous [", 2 * N, "]");
  TORCH_CHECK(colsum.scalar_type() == at::kInt && w_scale.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "diffusekit::int8_geglu: colsum int32, w_scale and bias float32 expected");
  TORCH_CHECK(x_scale > 0 && out_scale > 0 && 0 <= x_zero_point && x_zero_point <= 255 && 0 <= out_zero_point &&
                  out_zero_point <= 255,
              "diffusekit::int8_geglu: scales must be positive and zero points in [0, 255]");
  const at::Tensor x = x_in.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  if (M == 0 || N == 0) return out;
  const Epilogue ep{colsum.const_data_ptr<int32_t>(), w_scale.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                    N, static_cast<float>(x_scale), static_cast<int32_t>(x_zero_point),
                    static_cast<float>(1.0 / out_scale), static_cast<int32_t>(out_zero_point)};
  const uint8_t* xd = x.const_data_ptr<uint8_t>();
  const int8_t* wd = w.const_data_ptr<int8_t>();
  uint8_t* od = out.mutable_data_ptr<uint8_t>();
  // tasks: column tiles outside, row chunks inside, so each thread's tile of packed weight stays in its L2 while
  // the rows stream past it
  const int64_t row_tasks = (M + kTaskRows - 1) / kTaskRows, col_tasks = (N + kTaskCols - 1) / kTaskCols;
  at::parallel_for(0, row_tasks * col_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = (task / row_tasks) * kTaskCols, c1 = std::min(N, c0 + kTaskCols);
      const int64_t r0 = (task % row_tasks) * kTaskRows, r1 = std::min(M, r0 + kTaskRows);
      for (int64_t n = c0; n < c1; n += 32) {
        const int8_t* wb = wd + (n / 16) * K * 32;
        for (int64_t r = r0; r < r1; r += kRows) {
          const int64_t rows = std::min(kRows, r1 - r);
          if (n + 32 <= c1)
            rows_tile<2>(rows, xd + r * K, K, wb, ep, n, od + r * N);
          else
            rows_tile<1>(rows, xd + r * K, K, wb, ep, n, od + r * N);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffusekit, m) {
  m.def("int8_geglu(Tensor x, Tensor w, Tensor colsum, Tensor w_scale, Tensor? bias, float x_scale, "
        "int x_zero_point, float out_scale, int out_zero_point) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffusekit, CPU, m) { m.impl("int8_geglu", &int8_geglu); }
