// diffusekit: fused attention for x86 CPUs with AVX-512 BF16 (built at run time by diffusekit/cpu_attention.py).
//
//   out = softmax(scale * q k^T) v
//
// Flash-style: one block of QB queries at a time streams blocks of KB keys, with an online softmax in float32.
// Both products are bfloat16 dot products with float32 accumulation (vdpbf16ps: 32 multiply-adds per instruction,
// twice a float32 FMA):
//   q . k : q and k rounded to bf16 (k first has its mean over the keys subtracted: softmax is invariant to it
//           and it shrinks the values the rounding is relative to);
//   p . v : p = exp(s - running max) rounded to bf16, v rounded to bf16; the row sums are taken in float32.
// Inputs: q [B, H, Nq, D], k and v [B, H, Nk, D], float32, any strides.
// Output: [B, H, Nq, D] whose memory is laid out as [B, Nq, H, D] (what the output projection reads next);
// cpu_attention_quantize: uint8 [B, Nq, H, D], quantized for an int8 output projection.
#include <immintrin.h>

#include "cpu_simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

namespace {

constexpr int64_t QB = 32;   // query rows per block (a multiple of 8)
constexpr int64_t KB = 256;  // keys per block (a multiple of 64)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
std::unique_ptr<T[]> buffer(int64_t n) {  // uninitialised
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
}

inline uint16_t to_bf16(float x) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline int32_t load_pair(const uint16_t* p) {  // two bf16 values as one 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// 2^x for x <= 0 (0 below -126): 2^round(x) times a degree-3 polynomial of the fraction (relative error ~1e-4,
// below bf16's rounding of p)
inline __m512 exp2_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(5.550411e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// S[r, 16t + i] = q[r] . k[16t + i] for R rows x T tiles of 16 keys; rmax[r] = max(rmax[r], S[r, :]) lane-wise.
// q: [R][ldq] bf16 (pairs of channels); kp: T tiles of [G][16 keys][2 channels] bf16.
template <int R, int T>
inline void qk_tile(const uint16_t* q, int64_t ldq, const uint16_t* kp, int64_t G, float* S, int64_t ldS,
                    __m512* rmax) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t g = 0; g < G; ++g) {
    __m512bh b[T];
    for (int t = 0; t < T; ++t) b[t] = (__m512bh)_mm512_loadu_si512(kp + (t * G + g) * 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(load_pair(q + r * ldq + 2 * g));
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, b[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      _mm512_storeu_ps(S + r * ldS + 16 * t, acc[r][t]);
      rmax[r] = _mm512_max_ps(rmax[r], acc[r][t]);
    }
}

// O[r, 16j..] = O[r, 16j..] * alpha[r] + sum over G pairs of keys of p[r, key] v[key, 16j..]  (R rows x NV vectors
// of 16 channels, then with HALF one of 8: a 256-bit product, half the cost of padding the head to 16 channels)
// P: [R][ldP] bf16; vp: [G][Dv][2 keys] bf16, already offset to this chunk's first channel.
template <int R, int NV, bool HALF>
inline void pv_tile(const uint16_t* P, int64_t ldP, const uint16_t* vp, int64_t Dv, int64_t G, const float* alpha,
                    float* O, int64_t ldO) {
  constexpr int NA = NV > 0 ? NV : 1;
  __m512 acc[R][NA];
  __m256 acch[R];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
    if constexpr (HALF) acch[r] = _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t g = 0; g < G; ++g) {
    __m512bh b[NA];
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(vp + (g * Dv + 16 * j) * 2);
    __m256bh bh;
    if constexpr (HALF) bh = (__m256bh)_mm256_loadu_si256((const __m256i*)(vp + (g * Dv + 16 * NV) * 2));
    for (int r = 0; r < R; ++r) {
      const int32_t pair = load_pair(P + r * ldP + 2 * g);
      if constexpr (NV > 0) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
      }
      if constexpr (HALF) acch[r] = _mm256_dpbf16_ps(acch[r], (__m256bh)_mm256_set1_epi32(pair), bh);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
    for (int j = 0; j < NV; ++j) {
      float* o = O + r * ldO + 16 * j;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), al, acc[r][j]));
    }
    if constexpr (HALF) {
      float* o = O + r * ldO + 16 * NV;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_loadu_ps(o), _mm256_set1_ps(alpha[r]), acch[r]));
    }
  }
}

template <int R, int NV, bool HALF = false>
void pv_chunk(const uint16_t* P, const uint16_t* vp, int64_t Dv, int64_t G, const float* alpha, float* O,
              int64_t j) {  // all QB rows, channel vectors j .. j + NV - 1 (and the half vector after them)
  for (int64_t r = 0; r < QB; r += R)
    pv_tile<R, NV, HALF>(P + r * KB, KB, vp + 32 * j, Dv, G, alpha + r, O + r * Dv + 16 * j, Dv);
}

// all QB rows and Dv channels (a multiple of 8), in chunks that keep the accumulators in registers
void pv_block(const uint16_t* P, const uint16_t* vp, int64_t Dv, int64_t G, const float* alpha, float* O) {
  const int64_t nvec = Dv / 16;
  int64_t j = 0;
  for (; j + 5 <= nvec; j += 5) pv_chunk<4, 5>(P, vp, Dv, G, alpha, O, j);
  if (Dv % 16 == 0) {
    switch (nvec - j) {
      case 4: pv_chunk<4, 4>(P, vp, Dv, G, alpha, O, j); break;
      case 3: pv_chunk<8, 3>(P, vp, Dv, G, alpha, O, j); break;
      case 2: pv_chunk<8, 2>(P, vp, Dv, G, alpha, O, j); break;
      case 1: pv_chunk<8, 1>(P, vp, Dv, G, alpha, O, j); break;
      default: break;
    }
    return;
  }
  switch (nvec - j) {  // and the last 8 channels
    case 4: pv_chunk<4, 4, true>(P, vp, Dv, G, alpha, O, j); break;
    case 3: pv_chunk<4, 3, true>(P, vp, Dv, G, alpha, O, j); break;
    case 2: pv_chunk<8, 2, true>(P, vp, Dv, G, alpha, O, j); break;  // head size 40: SD 1.5's first stage
    case 1: pv_chunk<8, 1, true>(P, vp, Dv, G, alpha, O, j); break;
    default: pv_chunk<8, 0, true>(P, vp, Dv, G, alpha, O, j); break;
  }
}

// Out = float: the attention; Out = uint8_t: quantized with (inv_scale, zero_point) for an int8 output projection
template <typename Out>
at::Tensor attention_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                          float inv_scale, int32_t zero_point) {
  // any strides; the last dimension is made contiguous where it is not
  const at::Tensor q = q_in.dim() == 4 && q_in.stride(3) != 1 ? q_in.contiguous() : q_in;
  const at::Tensor k = k_in.dim() == 4 && k_in.stride(3) != 1 ? k_in.contiguous() : k_in;
  const at::Tensor v = v_in.dim() == 4 && v_in.stride(3) != 1 ? v_in.contiguous() : v_in;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "diffusekit::cpu_attention: q, k, v must be 4-d "
              "[batch, heads, tokens, channels]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "diffusekit::cpu_attention: CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "diffusekit::cpu_attention: float32 inputs expected");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && k.size(3) == D &&
                  v.size(3) == D && v.size(2) == Nk,
              "diffusekit::cpu_attention: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " do not match");
  TORCH_CHECK(Nk > 0 || Nq == 0, "diffusekit::cpu_attention: no keys");
  TORCH_CHECK(scale > 0, "diffusekit::cpu_attention: the scale must be positive, got ", scale);
  const auto dtype = std::is_same_v<Out, float> ? at::kFloat : at::kByte;
  at::Tensor out = at::empty({B, Nq, H, D}, q.options().dtype(dtype));
  if (B == 0 || H == 0 || Nq == 0 || D == 0) return out;

  const int64_t Dq = round_up(D, 2), G = Dq / 2, Dv = round_up(D, 8);
  const int64_t Nkp = round_up(Nk, KB), nkb = Nkp / KB, BH = B * H;
  const float qk_scale = static_cast<float>(scale) * kLog2e;  // softmax in base 2
  auto kp_all = buffer<uint16_t>(BH * Nkp * Dq);  // per head: [Nkp / 16][G][16][2]
  auto vp_all = buffer<uint16_t>(BH * Nkp * Dv);  // per head: [Nkp / 2][Dv][2]
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  Out* od = out.mutable_data_ptr<Out>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);

  // k and v of every head to bf16, in the layouts the tiles read
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    auto mean = buffer<float>(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* kb = kd + b * ks0 + h * ks1;
      const float* vb = vd + b * vs0 + h * vs1;
      uint16_t* kp = kp_all.get() + bh * Nkp * Dq;
      uint16_t* vp = vp_all.get() + bh * Nkp * Dv;
      std::fill(mean.get(), mean.get() + D, 0.f);
      for (int64_t n = 0; n < Nk; ++n)
        for (int64_t d = 0; d < D; ++d) mean[d] += kb[n * ks2 + d];
      for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<float>(Nk);
      std::memset(kp, 0, sizeof(uint16_t) * Nkp * Dq);
      for (int64_t n = 0; n < Nk; ++n) {
        uint16_t* tile = kp + (n / 16) * 16 * Dq + (n % 16) * 2;
        for (int64_t d = 0; d < D; ++d) tile[(d / 2) * 32 + d % 2] = to_bf16(kb[n * ks2 + d] - mean[d]);
      }
      std::memset(vp, 0, sizeof(uint16_t) * Nkp * Dv);
      for (int64_t n = 0; n < Nk; ++n) {
        uint16_t* row = vp + (n / 2) * Dv * 2 + n % 2;
        for (int64_t d = 0; d < D; ++d) row[d * 2] = to_bf16(vb[n * vs2 + d]);
      }
    }
  });

  const int64_t nqb = (Nq + QB - 1) / QB;
  at::parallel_for(0, BH * nqb, 1, [&](int64_t begin, int64_t end) {
    auto qbuf = buffer<uint16_t>(QB * Dq);
    auto P = buffer<uint16_t>(QB * KB);
    auto S = buffer<float>(QB * KB);
    auto O = buffer<float>(QB * Dv);
    float m[QB], l[QB], alpha[QB];
    __m512 rmax[QB];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nqb, qb = item % nqb, b = bh / H, h = bh % H;
      const int64_t r0 = qb * QB, rows = std::min(QB, Nq - r0);
      const float* qbase = qd + b * qs0 + h * qs1 + r0 * qs2;
      std::fill(qbuf.get(), qbuf.get() + QB * Dq, uint16_t(0));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d) qbuf[r * Dq + d] = to_bf16(qbase[r * qs2 + d]);
      std::fill(O.get(), O.get() + QB * Dv, 0.f);
      std::fill(m, m + QB, kNegInf);
      std::fill(l, l + QB, 0.f);
      for (int64_t blk = 0; blk < nkb; ++blk) {
        const int64_t n0 = blk * KB, valid = std::min(KB, Nk - n0), nk = round_up(valid, 64);
        const uint16_t* kp = kp_all.get() + bh * Nkp * Dq + n0 * Dq;
        for (int64_t r = 0; r < QB; ++r) rmax[r] = _mm512_set1_ps(kNegInf);
        for (int64_t r = 0; r < QB; r += 4)
          for (int64_t t = 0; t < nk / 16; t += 4)
            qk_tile<4, 4>(qbuf.get() + r * Dq, Dq, kp + t * 16 * Dq, G, S.get() + r * KB + 16 * t, KB, rmax + r);
        if (valid < nk) {  // padding keys: out of the maximum and the softmax
          for (int64_t r = 0; r < QB; ++r) {
            float* s = S.get() + r * KB;
            std::fill(s + valid, s + nk, kNegInf);
            rmax[r] = _mm512_set1_ps(*std::max_element(s, s + valid));
          }
        }
        for (int64_t r = 0; r < QB; ++r) {
          const float mn = std::max(m[r], qk_scale * _mm512_reduce_max_ps(rmax[r]));
          alpha[r] = std::exp2(m[r] - mn);  // 0 on the first block (m = -inf)
          m[r] = mn;
          const __m512 mv = _mm512_set1_ps(mn), fv = _mm512_set1_ps(qk_scale);
          const float* s = S.get() + r * KB;
          uint16_t* p = P.get() + r * KB;
          __m512 sum = _mm512_setzero_ps();
          for (int64_t c = 0; c < nk; c += 32) {
            const __m512 e0 = exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + c), fv, mv));
            const __m512 e1 = exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + c + 16), fv, mv));
            sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
            _mm512_storeu_si512(p + c, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
          }
          l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
        }
        pv_block(P.get(), vp_all.get() + bh * Nkp * Dv + n0 * Dv, Dv, nk / 2, alpha, O.get());
      }
      for (int64_t r = 0; r < rows; ++r) {
        Out* o = od + ((b * Nq + r0 + r) * H + h) * D;
        const float inv = 1.f / l[r];
        if constexpr (std::is_same_v<Out, float>) {
          for (int64_t d = 0; d < D; ++d) o[d] = O[r * Dv + d] * inv;
        } else {  // as quantize_per_tensor
          const __m512 sv = _mm512_set1_ps(inv), iv = _mm512_set1_ps(inv_scale);
          const __m512i zv = _mm512_set1_epi32(zero_point);
          for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = diffusekit_simd::tail_mask(D - d);
            const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, O.get() + r * Dv + d), sv);
            _mm_mask_storeu_epi8(o + d, m, diffusekit_simd::quantize_u8(x, iv, zv));
          }
        }
      }
    }
  });
  return out;
}

at::Tensor cpu_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  return attention_impl<float>(q, k, v, scale, 1.f, 0).transpose(1, 2);
}

at::Tensor cpu_attention_quantize(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                  double out_scale, int64_t out_zero_point) {
  TORCH_CHECK(out_scale > 0 && 0 <= out_zero_point && out_zero_point <= 255,
              "diffusekit::cpu_attention_quantize: the output scale must be positive and its zero point in [0, 255]");
  return attention_impl<uint8_t>(q, k, v, scale, static_cast<float>(1.0 / out_scale),
                                 static_cast<int32_t>(out_zero_point));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffusekit, m) {
  m.def("cpu_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  // the same, written as uint8 [B, Nq, H, D] for an int8 output projection
  m.def("cpu_attention_quantize(Tensor q, Tensor k, Tensor v, float scale, float out_scale, int out_zero_point) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(diffusekit, CPU, m) {
  m.impl("cpu_attention", &cpu_attention);
  m.impl("cpu_attention_quantize", &cpu_attention_quantize);
}
