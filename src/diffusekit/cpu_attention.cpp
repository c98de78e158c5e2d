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
// or, with products = int8, int8 dot products with int32 accumulation (vpdpbusd: 64 per instruction; attention_impl),
// or, with products = float32, float32 FMAs (16 per instruction) and an exponential accurate to float32: the exact
// path's attention, within float32 rounding of SDPA.
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

constexpr int64_t QB = 32;   // query rows per block (a multiple of 16)
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

// 2^x for x <= 0 (0 below -126): 2^floor(x) (vscalefps floors its exponent) times a degree-3 polynomial of
// f = x - floor(x) in [0, 1) (vreduceps), fitted for relative error: 7.5e-5 at most, below bf16's rounding of p and
// a fiftieth of one uint8 step of 255
inline __m512 exp2_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_set1_ps(7.802334e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.260664e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.958351e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999249e-1f));
  return _mm512_scalef_ps(p, x);
}

// The element kinds of the bf16 and float32 products (the tiles below are written once for both): a group is K
// values of the reduced dimension (channels for q . k, keys for p . v) in one 32-bit lane: a pair of bf16 values
// (vdpbf16ps) or one float (FMA)
struct Bf16Pairs {
  using T = uint16_t;
  static constexpr int64_t K = 2;
  static __m512bh load(const T* x) { return (__m512bh)_mm512_loadu_si512(x); }
  static __m256bh load_half(const T* x) { return (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }
  static int32_t scalar(const T* x) { return load_pair(x); }
  static __m512 madd(__m512 acc, int32_t a, __m512bh b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(a), b);
  }
  static __m256 madd_half(__m256 acc, int32_t a, __m256bh b) {
    return _mm256_dpbf16_ps(acc, (__m256bh)_mm256_set1_epi32(a), b);
  }
};
struct Float32s {
  using T = float;
  static constexpr int64_t K = 1;
  static __m512 load(const T* x) { return _mm512_loadu_ps(x); }
  static __m256 load_half(const T* x) { return _mm256_loadu_ps(x); }
  static float scalar(const T* x) { return *x; }
  static __m512 madd(__m512 acc, float a, __m512 b) { return _mm512_fmadd_ps(_mm512_set1_ps(a), b, acc); }
  static __m256 madd_half(__m256 acc, float a, __m256 b) { return _mm256_fmadd_ps(_mm256_set1_ps(a), b, acc); }
};

// S[r, 16t + i] = q[r] . k[16t + i] for R rows x T tiles of 16 keys; rmax[r] = max(rmax[r], S[r, :]) lane-wise.
// q: [R][ldq] (groups of E::K channels); kp: T tiles of [G][16 keys][E::K channels].
template <typename E, int R, int T>
inline void qk_tile(const typename E::T* q, int64_t ldq, const typename E::T* kp, int64_t G, float* S, int64_t ldS,
                    __m512* rmax) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t g = 0; g < G; ++g) {
    decltype(E::load(kp)) b[T];
    for (int t = 0; t < T; ++t) b[t] = E::load(kp + (t * G + g) * 16 * E::K);
    for (int r = 0; r < R; ++r) {
      const auto a = E::scalar(q + r * ldq + E::K * g);
      for (int t = 0; t < T; ++t) acc[r][t] = E::madd(acc[r][t], a, b[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      _mm512_storeu_ps(S + r * ldS + 16 * t, acc[r][t]);
      rmax[r] = _mm512_max_ps(rmax[r], acc[r][t]);
    }
}

// The same product in int8 (vpdpbusd: 64 multiply-adds per instruction, twice vdpbf16ps): k as uint8 (its int8
// value + 128), q int8; each accumulator starts at qoff[r] = -128 * sum(q[r]), which takes the offset out exactly.
// q: [R][ldq] int8 (groups of 4 channels); kp: T tiles of [G][16 keys][4 channels] uint8; S as float (unscaled).
template <int R, int T>
inline void qk_tile_i8(const int8_t* q, int64_t ldq, const uint8_t* kp, int64_t G, const int32_t* qoff, float* S,
                       int64_t ldS, __m512* rmax) {
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_set1_epi32(qoff[r]);
#pragma GCC unroll 2
  for (int64_t g = 0; g < G; ++g) {
    __m512i b[T];
    for (int t = 0; t < T; ++t) b[t] = _mm512_loadu_si512(kp + (t * G + g) * 64);
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, q + r * ldq + 4 * g, 4);
      const __m512i a = _mm512_set1_epi32(quad);
      for (int t = 0; t < T; ++t) acc[r][t] = diffusekit_simd::dpbusd(acc[r][t], b[t], a);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      const __m512 s = _mm512_cvtepi32_ps(acc[r][t]);
      _mm512_storeu_ps(S + r * ldS + 16 * t, s);
      rmax[r] = _mm512_max_ps(rmax[r], s);
    }
}

// O[r, 16j..] = O[r, 16j..] * alpha[r] + sum over G groups of E::K keys of p[r, key] v[key, 16j..]  (R rows x NV
// vectors of 16 channels, then with HALF one of 8: a 256-bit product, half the cost of padding the head to 16
// channels). P: [R][ldP]; vp: [G][Dv][E::K keys], already offset to this chunk's first channel.
template <typename E, int R, int NV, bool HALF>
inline void pv_tile(const typename E::T* P, int64_t ldP, const typename E::T* vp, int64_t Dv, int64_t G,
                    const float* alpha, float* O, int64_t ldO) {
  constexpr int NA = NV > 0 ? NV : 1;
  __m512 acc[R][NA];
  __m256 acch[R];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
    if constexpr (HALF) acch[r] = _mm256_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t g = 0; g < G; ++g) {
    decltype(E::load(vp)) b[NA];
    for (int j = 0; j < NV; ++j) b[j] = E::load(vp + (g * Dv + 16 * j) * E::K);
    decltype(E::load_half(vp)) bh;
    if constexpr (HALF) bh = E::load_half(vp + (g * Dv + 16 * NV) * E::K);
    for (int r = 0; r < R; ++r) {
      const auto a = E::scalar(P + r * ldP + E::K * g);
      for (int j = 0; j < NV; ++j) acc[r][j] = E::madd(acc[r][j], a, b[j]);
      if constexpr (HALF) acch[r] = E::madd_half(acch[r], a, bh);
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
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_loadu_ps(o), _mm512_castps512_ps256(al), acch[r]));
    }
  }
}

// The same in int8 (vpdpbusd): p uint8 [R][ldP] (groups of 4 keys), v int8 [G][Dv][4 keys], G groups of 4 keys;
// O[r] = O[r] * alpha[r] + c[r] * (p . v) (c: the block's scale of p against the running maximum).
template <int R, int NV, bool HALF>
inline void pv_tile_i8(const uint8_t* P, int64_t ldP, const int8_t* vp, int64_t Dv, int64_t G, const float* alpha,
                       const float* c, float* O, int64_t ldO) {
  constexpr int NA = NV > 0 ? NV : 1;
  __m512i acc[R][NA];
  __m256i acch[R];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_si512();
    if constexpr (HALF) acch[r] = _mm256_setzero_si256();
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512i b[NA];
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_si512(vp + (g * Dv + 16 * j) * 4);
    __m256i bh;
    if constexpr (HALF) bh = _mm256_loadu_si256((const __m256i*)(vp + (g * Dv + 16 * NV) * 4));
    for (int r = 0; r < R; ++r) {
      // one broadcast from memory for both widths
      const __m512i a = _mm512_broadcastd_epi32(_mm_loadu_si32(P + r * ldP + 4 * g));
      for (int j = 0; j < NV; ++j) acc[r][j] = diffusekit_simd::dpbusd(acc[r][j], a, b[j]);
      if constexpr (HALF) acch[r] = diffusekit_simd::dpbusd(acch[r], _mm512_castsi512_si256(a), bh);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]), cv = _mm512_set1_ps(c[r]);
    for (int j = 0; j < NV; ++j) {
      float* o = O + r * ldO + 16 * j;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), al, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][j]), cv)));
    }
    if constexpr (HALF) {
      float* o = O + r * ldO + 16 * NV;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_loadu_ps(o), _mm512_castps512_ps256(al),
                                          _mm256_mul_ps(_mm256_cvtepi32_ps(acch[r]), _mm512_castps512_ps256(cv))));
    }
  }
}

// pv_tile_i8<8, 2, true> for heads of 40 channels (SD 1.5's first stage, the largest attention), in 512-bit products
// only: channels 0-15 and 16-31 of each row in their own accumulators, channels 32-39 of rows 2k and 2k + 1 sharing
// one (lanes 0-7 and 8-15: v's last 8 channels twice, p's quads of the two rows blended); 4 % off the whole call
// against the generic tile's 256-bit halves.
inline void pv_tile_i8_40(const uint8_t* P, int64_t ldP, const int8_t* vp, int64_t Dv, int64_t G, const float* alpha,
                          const float* c, float* O, int64_t ldO) {
#define DK_PAIRS(X) X(0, 1, 0) X(2, 3, 1) X(4, 5, 2) X(6, 7, 3)
#define DK_INIT(r0, r1, k)                                                                                           \
  __m512i x##r0 = _mm512_setzero_si512(), y##r0 = x##r0, x##r1 = x##r0, y##r1 = x##r0, w##k = x##r0;
  DK_PAIRS(DK_INIT)
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* vg = vp + g * Dv * 4;
    const __m512i b0 = _mm512_loadu_si512(vg), b1 = _mm512_loadu_si512(vg + 64);
    const __m512i bw = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vg + 128)));
    const uint8_t* pg = P + 4 * g;
#define DK_STEP(r0, r1, k)                                                                                           \
  {                                                                                                                  \
    const __m512i a0 = _mm512_broadcastd_epi32(_mm_loadu_si32(pg + r0 * ldP));                                      \
    const __m512i a1 = _mm512_broadcastd_epi32(_mm_loadu_si32(pg + r1 * ldP));                                      \
    x##r0 = diffusekit_simd::dpbusd(x##r0, a0, b0);                                                                  \
    y##r0 = diffusekit_simd::dpbusd(y##r0, a0, b1);                                                                  \
    x##r1 = diffusekit_simd::dpbusd(x##r1, a1, b0);                                                                  \
    y##r1 = diffusekit_simd::dpbusd(y##r1, a1, b1);                                                                  \
    w##k = diffusekit_simd::dpbusd(w##k, _mm512_mask_blend_epi32(0xff00, a0, a1), bw);                              \
  }
    DK_PAIRS(DK_STEP)
  }
#define DK_ROW(r, w_half)                                                                                            \
  {                                                                                                                  \
    const __m512 al = _mm512_set1_ps(alpha[r]), cv = _mm512_set1_ps(c[r]);                                         \
    float* o = O + r * ldO;                                                                                          \
    _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), al, _mm512_mul_ps(_mm512_cvtepi32_ps(x##r), cv)));       \
    _mm512_storeu_ps(o + 16,                                                                                         \
                     _mm512_fmadd_ps(_mm512_loadu_ps(o + 16), al, _mm512_mul_ps(_mm512_cvtepi32_ps(y##r), cv)));     \
    _mm256_storeu_ps(o + 32, _mm256_fmadd_ps(_mm256_loadu_ps(o + 32), _mm512_castps512_ps256(al),                    \
                                             _mm256_mul_ps(_mm256_cvtepi32_ps(w_half), _mm512_castps512_ps256(cv)))); \
  }
#define DK_STORE(r0, r1, k)                                                                                          \
  DK_ROW(r0, _mm512_castsi512_si256(w##k)) DK_ROW(r1, _mm512_extracti64x4_epi64(w##k, 1))
  DK_PAIRS(DK_STORE)
#undef DK_STORE
#undef DK_ROW
#undef DK_STEP
#undef DK_INIT
#undef DK_PAIRS
}

// the kinds of the two products: bf16 dot products, int8 dot products, float32 FMAs
enum Products : int64_t { kBf16 = 0, kInt8 = 1, kFloat32 = 2 };

// all QB rows, channel vectors j .. j + NV - 1 (and the half vector after them), with the tile of PR
template <Products PR, int R, int NV, bool HALF = false>
void pv_chunk(const void* P, const void* vp, int64_t Dv, int64_t G, const float* alpha, const float* c, float* O,
              int64_t j) {
  constexpr bool I8 = PR == kInt8;
  for (int64_t r = 0; r < QB; r += R) {
    if constexpr (PR == kFloat32)
      pv_tile<Float32s, R, NV, HALF>(static_cast<const float*>(P) + r * KB, KB, static_cast<const float*>(vp) + 16 * j,
                                     Dv, G, alpha + r, O + r * Dv + 16 * j, Dv);
    else if constexpr (I8 && R == 8 && NV == 2 && HALF)
      pv_tile_i8_40(static_cast<const uint8_t*>(P) + r * KB, KB, static_cast<const int8_t*>(vp) + 64 * j, Dv, G,
                    alpha + r, c + r, O + r * Dv + 16 * j, Dv);
    else if constexpr (I8)
      pv_tile_i8<R, NV, HALF>(static_cast<const uint8_t*>(P) + r * KB, KB, static_cast<const int8_t*>(vp) + 64 * j,
                              Dv, G, alpha + r, c + r, O + r * Dv + 16 * j, Dv);
    else
      pv_tile<Bf16Pairs, R, NV, HALF>(static_cast<const uint16_t*>(P) + r * KB, KB,
                                      static_cast<const uint16_t*>(vp) + 32 * j, Dv, G, alpha + r, O + r * Dv + 16 * j,
                                      Dv);
  }
}

// all QB rows and Dv channels (a multiple of 8), in chunks that keep the accumulators in registers
template <Products PR>
void pv_block(const void* P, const void* vp, int64_t Dv, int64_t G, const float* alpha, const float* c, float* O) {
  const int64_t nvec = Dv / 16;
  int64_t j = 0;
  for (; j + 5 <= nvec; j += 5) pv_chunk<PR, 4, 5>(P, vp, Dv, G, alpha, c, O, j);
  if (Dv % 16 == 0) {
    switch (nvec - j) {
      case 4: pv_chunk<PR, 4, 4>(P, vp, Dv, G, alpha, c, O, j); break;
      case 3: pv_chunk<PR, 8, 3>(P, vp, Dv, G, alpha, c, O, j); break;
      case 2: pv_chunk<PR, 8, 2>(P, vp, Dv, G, alpha, c, O, j); break;
      case 1: pv_chunk<PR, 8, 1>(P, vp, Dv, G, alpha, c, O, j); break;
      default: break;
    }
    return;
  }
  switch (nvec - j) {  // and the last 8 channels
    case 4: pv_chunk<PR, 4, 4, true>(P, vp, Dv, G, alpha, c, O, j); break;
    case 3: pv_chunk<PR, 4, 3, true>(P, vp, Dv, G, alpha, c, O, j); break;
    case 2: pv_chunk<PR, 8, 2, true>(P, vp, Dv, G, alpha, c, O, j); break;  // head size 40: SD 1.5's first stage
    case 1: pv_chunk<PR, 8, 1, true>(P, vp, Dv, G, alpha, c, O, j); break;
    default: pv_chunk<PR, 8, 0, true>(P, vp, Dv, G, alpha, c, O, j); break;
  }
}

// The packs (vpackusdw, vpackuswb) that turn 4 vectors of 16 int32 p into 64 bytes interleave them by 128-bit lane:
// of each 64 keys, quad 4j + i (keys 16j + 4i ..) lands in place 4i + j. v's quads are stored in the same order.
inline int64_t packed_quad(int64_t n) {
  const int64_t quad = n / 4, in64 = quad % 16;
  return quad - in64 + (in64 % 4) * 4 + in64 / 4;
}

// out[d] = round((x[d] - mean[d]) * inv[d] * step_inv) as int8, saturated at +-127 (mean: per channel, or nullptr
// for none; inv: per channel; step_inv: one factor); returns the sum of the int8 values
inline int32_t quantize_row_s8(const float* x, const float* mean, const float* inv, float step_inv, int64_t n,
                               int8_t* out) {
  __m512i sum = _mm512_setzero_si512();
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 mk = diffusekit_simd::tail_mask(n - d);
    __m512 x_d = _mm512_maskz_loadu_ps(mk, x + d);
    if (mean != nullptr) x_d = _mm512_sub_ps(x_d, _mm512_maskz_loadu_ps(mk, mean + d));
    const __m512 y = _mm512_mul_ps(_mm512_mul_ps(x_d, _mm512_maskz_loadu_ps(mk, inv + d)), _mm512_set1_ps(step_inv));
    __m512i iv = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    iv = _mm512_min_epi32(_mm512_max_epi32(iv, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    sum = _mm512_add_epi32(sum, iv);
    _mm_mask_storeu_epi8(out + d, mk, _mm512_cvtepi32_epi8(iv));
  }
  return _mm512_reduce_add_epi32(sum);
}

// per channel d of the n rows x[i * stride + d]: mean[d] and, where step is given, the int8 step of x - mean (its
// largest magnitude / 127; 1 for a constant channel)
void channel_stats(const float* x, int64_t stride, int64_t n, int64_t D, float* mean, float* step) {
  std::fill(mean, mean + D, 0.f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) mean[d] += x[i * stride + d];
  for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<float>(n);
  if (step == nullptr) return;
  std::fill(step, step + D, 0.f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) step[d] = std::max(step[d], std::abs(x[i * stride + d] - mean[d]));
  for (int64_t d = 0; d < D; ++d) step[d] = step[d] > 0.f ? step[d] / 127.f : 1.f;
}

// Out = float: the attention; Out = uint8_t: quantized with (inv_scale, zero_point) for an int8 output projection.
// I8: both products in int8 (vpdpbusd, twice the rate of vdpbf16ps):
//   q . k : k has its mean over the keys subtracted, then one scale per channel (folded into q) and an offset of 128
//           (uint8); q one scale per query row;
//   p . v : p = exp(s - the block's row maximum) as uint8 (255 = that maximum; the block's scale against the running
//           maximum is applied to the int32 sums); v has its mean over the keys subtracted (added back at the end:
//           the weights sum to 1) and one scale per channel.
template <typename Out, Products PR>
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

  constexpr bool I8 = PR == kInt8, F32 = PR == kFloat32;
  // channels per q . k group and keys per p . v group: bf16 pairs, int8 quads, single floats
  constexpr int64_t CG = I8 ? 4 : F32 ? 1 : 2;
  using KT = std::conditional_t<I8, uint8_t, std::conditional_t<F32, float, uint16_t>>;  // packed k
  using QT = std::conditional_t<I8, int8_t, std::conditional_t<F32, float, uint16_t>>;   // packed q
  using PT = KT;                                                                        // p
  using VT = QT;                                                                        // packed v
  const int64_t Dq = round_up(D, CG), G = Dq / CG, Dv = round_up(D, 8);
  const int64_t Nkp = round_up(Nk, KB), nkb = Nkp / KB, BH = B * H;
  const float qk_scale = static_cast<float>(scale) * kLog2e;  // softmax in base 2
  auto kp_all = buffer<KT>(BH * Nkp * Dq);  // per head: [Nkp / 16][G][16 keys][CG channels]
  auto vp_all = buffer<VT>(BH * Nkp * Dv);  // per head: [Nkp / CG][Dv][CG keys]
  // per head and channel: what q is multiplied with before its rounding (I8: k's scales), and v's scale and mean
  auto qmul_all = buffer<float>(BH * D), vscale_all = buffer<float>(BH * D), vmean_all = buffer<float>(BH * D);
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  Out* od = out.mutable_data_ptr<Out>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);

  // k and v of every head in the layouts the tiles read
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    auto kmean = buffer<float>(D), inv = buffer<float>(D);
    auto row = buffer<int8_t>(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* kb = kd + b * ks0 + h * ks1;
      const float* vb = vd + b * vs0 + h * vs1;
      KT* kp = kp_all.get() + bh * Nkp * Dq;
      VT* vp = vp_all.get() + bh * Nkp * Dv;
      float *qmul = qmul_all.get() + bh * D, *vscale = vscale_all.get() + bh * D, *vmean = vmean_all.get() + bh * D;
      // k's mean (and I8: k's steps, what q is multiplied with)
      channel_stats(kb, ks2, Nk, D, kmean.get(), I8 ? qmul : nullptr);
      std::memset(kp, 0, sizeof(KT) * Nkp * Dq);
      std::memset(vp, 0, sizeof(VT) * Nkp * Dv);
      if constexpr (!I8) {  // q, v unscaled, v not centred
        std::fill(qmul, qmul + D, 1.f);
        std::fill(vscale, vscale + D, 1.f);
        std::fill(vmean, vmean + D, 0.f);
      }
      if constexpr (I8) {
        channel_stats(vb, vs2, Nk, D, vmean, vscale);
        for (int64_t d = 0; d < D; ++d) inv[d] = 1.f / qmul[d];
        for (int64_t n = 0; n < Nk; ++n) {  // k: [n / 16][d / 4][n % 16][d % 4], + 128
          quantize_row_s8(kb + n * ks2, kmean.get(), inv.get(), 1.f, D, row.get());
          uint8_t* tile = kp + (n / 16) * 16 * Dq + (n % 16) * 4;
          for (int64_t d = 0; d < D; ++d) tile[(d / 4) * 64 + d % 4] = static_cast<uint8_t>(row[d] + 128);
        }
        for (int64_t d = 0; d < D; ++d) inv[d] = 1.f / vscale[d];
        for (int64_t n = 0; n < Nk; ++n) {  // v: [n / 4][d][n % 4]
          quantize_row_s8(vb + n * vs2, vmean, inv.get(), 1.f, D, row.get());
          int8_t* dst = vp + packed_quad(n) * Dv * 4 + n % 4;
          for (int64_t d = 0; d < D; ++d) dst[d * 4] = row[d];
        }
      } else if constexpr (F32) {
        for (int64_t n = 0; n < Nk; ++n) {  // k - its mean: [n / 16][d][n % 16]
          float* tile = kp + (n / 16) * 16 * Dq + n % 16;
          for (int64_t d = 0; d < D; ++d) tile[d * 16] = kb[n * ks2 + d] - kmean[d];
        }
        for (int64_t n = 0; n < Nk; ++n) std::memcpy(vp + n * Dv, vb + n * vs2, sizeof(float) * D);  // v: [n][d]
      } else {
        for (int64_t n = 0; n < Nk; ++n) {  // k - its mean: [n / 16][d / 2][n % 16][d % 2]
          uint16_t* tile = kp + (n / 16) * 16 * Dq + (n % 16) * 2;
          for (int64_t d = 0; d < D; ++d) tile[(d / 2) * 32 + d % 2] = to_bf16(kb[n * ks2 + d] - kmean[d]);
        }
        for (int64_t n = 0; n < Nk; ++n) {  // v: [n / 2][d][n % 2]
          uint16_t* dst = vp + (n / 2) * Dv * 2 + n % 2;
          for (int64_t d = 0; d < D; ++d) dst[d * 2] = to_bf16(vb[n * vs2 + d]);
        }
      }
    }
  });

  const int64_t nqb = (Nq + QB - 1) / QB;
  at::parallel_for(0, BH * nqb, 1, [&](int64_t begin, int64_t end) {
    auto qbuf = buffer<QT>(QB * Dq);
    auto P = buffer<PT>(QB * KB);
    auto S = buffer<float>(QB * KB);
    auto O = buffer<float>(QB * Dv);
    float m[QB], l[QB], alpha[QB], fv_row[QB], cblk[QB], top[QB];
    int32_t qoff[QB];
    __m512 rmax[QB];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nqb, qb = item % nqb, b = bh / H, h = bh % H;
      const int64_t r0 = qb * QB, rows = std::min(QB, Nq - r0);
      const float* qbase = qd + b * qs0 + h * qs1 + r0 * qs2;
      std::fill(qbuf.get(), qbuf.get() + QB * Dq, QT(0));
      std::fill(fv_row, fv_row + QB, qk_scale);
      if constexpr (I8) {  // q times k's steps, then one step per row
        const float* qmul = qmul_all.get() + bh * D;
        std::fill(qoff, qoff + QB, 0);
        for (int64_t r = 0; r < rows; ++r) {
          const float* x = qbase + r * qs2;
          __m512 amax = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 mk = diffusekit_simd::tail_mask(D - d);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + d),
                                                                   _mm512_maskz_loadu_ps(mk, qmul + d))));
          }
          const float top = _mm512_reduce_max_ps(amax), step = top > 0.f ? top / 127.f : 1.f;
          qoff[r] = -128 * quantize_row_s8(x, nullptr, qmul, 1.f / step, D, qbuf.get() + r * Dq);
          fv_row[r] = qk_scale * step;
        }
      } else if constexpr (F32) {
        for (int64_t r = 0; r < rows; ++r) std::memcpy(qbuf.get() + r * Dq, qbase + r * qs2, sizeof(float) * D);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < D; ++d) qbuf[r * Dq + d] = to_bf16(qbase[r * qs2 + d]);
      }
      std::fill(O.get(), O.get() + QB * Dv, 0.f);
      std::fill(m, m + QB, kNegInf);
      std::fill(l, l + QB, 0.f);
      for (int64_t blk = 0; blk < nkb; ++blk) {
        const int64_t n0 = blk * KB, valid = std::min(KB, Nk - n0), nk = round_up(valid, 64);
        const KT* kp = kp_all.get() + bh * Nkp * Dq + n0 * Dq;
        for (int64_t r = 0; r < QB; ++r) rmax[r] = _mm512_set1_ps(kNegInf);
        for (int64_t r = 0; r < QB; r += 4)
          for (int64_t t = 0; t < nk / 16; t += 4) {
            if constexpr (I8)
              qk_tile_i8<4, 4>(qbuf.get() + r * Dq, Dq, kp + t * 16 * Dq, G, qoff + r, S.get() + r * KB + 16 * t, KB,
                               rmax + r);
            else
              qk_tile<std::conditional_t<F32, Float32s, Bf16Pairs>, 4, 4>(qbuf.get() + r * Dq, Dq, kp + t * 16 * Dq, G,
                                                                          S.get() + r * KB + 16 * t, KB, rmax + r);
          }
        if (valid < nk) {  // padding keys: out of the maximum and the softmax
          for (int64_t r = 0; r < QB; ++r) {
            float* s = S.get() + r * KB;
            std::fill(s + valid, s + nk, kNegInf);
            rmax[r] = _mm512_set1_ps(*std::max_element(s, s + valid));
          }
        }
        // each row's maximum over this block (base 2), the running maximum, and the factors of the sums so far
        // (alpha; 2^-126 on the first block, where they are 0) and of this block's (cblk, I8): 16 rows at a time
        for (int64_t r = 0; r < QB; ++r) top[r] = fv_row[r] * _mm512_reduce_max_ps(rmax[r]);
        for (int64_t r = 0; r < QB; r += 16) {
          const __m512 old = _mm512_loadu_ps(m + r), tv = _mm512_loadu_ps(top + r), mn = _mm512_max_ps(old, tv);
          _mm512_storeu_ps(alpha + r, diffusekit_simd::exp2_accurate(_mm512_sub_ps(old, mn)));
          _mm512_storeu_ps(cblk + r, diffusekit_simd::exp2_accurate(_mm512_sub_ps(tv, mn)));
          _mm512_storeu_ps(m + r, mn);
        }
        for (int64_t r = 0; r < QB; ++r) {
          const __m512 fv = _mm512_set1_ps(fv_row[r]);
          const float* s = S.get() + r * KB;
          PT* p = P.get() + r * KB;
          if constexpr (I8) {  // p = 255 * 2^(s - top), rounded; this block's weights are 2^(top - m) / 255 * p
            const __m512 mv = _mm512_set1_ps(top[r] - 7.994353436858858f);  // 2^7.99435... = 255
            __m512i sum = _mm512_setzero_si512();
            for (int64_t c = 0; c < nk; c += 64) {  // 64 keys as bytes, in the quad order of packed_quad
              __m512i e[4];
              for (int i = 0; i < 4; ++i)
                e[i] = _mm512_cvt_roundps_epi32(exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + c + 16 * i), fv, mv)),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
              const __m512i bytes =
                  _mm512_packus_epi16(_mm512_packus_epi32(e[0], e[1]), _mm512_packus_epi32(e[2], e[3]));
              sum = _mm512_add_epi64(sum, _mm512_sad_epu8(bytes, _mm512_setzero_si512()));
              _mm512_storeu_si512(p + c, bytes);
            }
            l[r] = l[r] * alpha[r] + cblk[r] * static_cast<float>(_mm512_reduce_add_epi64(sum));
          } else if constexpr (F32) {  // p = 2^(s - m), accurate to float32 rounding
            const __m512 mv = _mm512_set1_ps(m[r]);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t c = 0; c < nk; c += 16) {
              const __m512 e = diffusekit_simd::exp2_accurate(_mm512_fmsub_ps(_mm512_loadu_ps(s + c), fv, mv));
              sum = _mm512_add_ps(sum, e);
              _mm512_storeu_ps(p + c, e);
            }
            l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
          } else {
            const __m512 mv = _mm512_set1_ps(m[r]);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t c = 0; c < nk; c += 32) {
              const __m512 e0 = exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + c), fv, mv));
              const __m512 e1 = exp2_nonpos(_mm512_fmsub_ps(_mm512_loadu_ps(s + c + 16), fv, mv));
              sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
              _mm512_storeu_si512(p + c, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
          }
        }
        pv_block<PR>(P.get(), vp_all.get() + bh * Nkp * Dv + n0 * Dv, Dv, nk / CG, alpha, cblk, O.get());
      }
      const float *vscale = vscale_all.get() + bh * D, *vmean = vmean_all.get() + bh * D;
      for (int64_t r = 0; r < rows; ++r) {  // out = O / l * v's scale + v's mean
        Out* o = od + ((b * Nq + r0 + r) * H + h) * D;
        const __m512 sv = _mm512_set1_ps(1.f / l[r]);
        for (int64_t d = 0; d < D; d += 16) {
          const __mmask16 mk = diffusekit_simd::tail_mask(D - d);
          const __m512 x = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, O.get() + r * Dv + d), sv),
                                           _mm512_maskz_loadu_ps(mk, vscale + d), _mm512_maskz_loadu_ps(mk, vmean + d));
          if constexpr (std::is_same_v<Out, float>) {
            _mm512_mask_storeu_ps(o + d, mk, x);
          } else {  // as quantize_per_tensor
            _mm_mask_storeu_epi8(o + d, mk, diffusekit_simd::quantize_u8(x, _mm512_set1_ps(inv_scale),
                                                                         _mm512_set1_epi32(zero_point)));
          }
        }
      }
    }
  });
  return out;
}

template <typename Out>
at::Tensor attention_products(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                              float inv_scale, int32_t zero_point, int64_t products) {
  switch (products) {
    case kBf16: return attention_impl<Out, kBf16>(q, k, v, scale, inv_scale, zero_point);
    case kInt8: return attention_impl<Out, kInt8>(q, k, v, scale, inv_scale, zero_point);
    case kFloat32: return attention_impl<Out, kFloat32>(q, k, v, scale, inv_scale, zero_point);
    default: TORCH_CHECK(false, "diffusekit::cpu_attention: products must be 0 (bf16), 1 (int8) or 2 (float32), got ",
                         products);
  }
}

at::Tensor cpu_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                         int64_t products) {
  return attention_products<float>(q, k, v, scale, 1.f, 0, products).transpose(1, 2);
}

at::Tensor cpu_attention_quantize(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                  double out_scale, int64_t out_zero_point, int64_t products) {
  TORCH_CHECK(out_scale > 0 && 0 <= out_zero_point && out_zero_point <= 255,
              "diffusekit::cpu_attention_quantize: the output scale must be positive and its zero point in [0, 255]");
  return attention_products<uint8_t>(q, k, v, scale, static_cast<float>(1.0 / out_scale),
                                     static_cast<int32_t>(out_zero_point), products);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffusekit, m) {
  // products: 0 bf16 dot products, 1 int8 ones (twice the rate of bf16, a few times its rounding error), 2 float32
  // FMAs (half the rate of bf16, float32 rounding); attention_impl
  m.def("cpu_attention(Tensor q, Tensor k, Tensor v, float scale, int products=0) -> Tensor");
  // the same, written as uint8 [B, Nq, H, D] for an int8 output projection
  m.def("cpu_attention_quantize(Tensor q, Tensor k, Tensor v, float scale, float out_scale, int out_zero_point, "
        "int products=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffusekit, CPU, m) {
  m.impl("cpu_attention", &cpu_attention);
  m.impl("cpu_attention_quantize", &cpu_attention_quantize);
}
