// diffusekit: AVX-512 maths shared by the CPU kernels (cpu_attention.cpp, cpu_group_norm.cpp, cpu_int8_geglu.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace diffusekit_simd {

// 2^x, relative error ~1e-7 (degree-6 polynomial of the fraction); 0 below -126, x clamped at 126 above
inline __m512 exp2_accurate(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.f)), _mm512_set1_ps(126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.540353e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333356e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550411e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// e^x, same accuracy
inline __m512 exp_accurate(__m512 x) {
  return exp2_accurate(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)));
}

// acc + the dot products of a's uint8 and b's int8 quads (vpdpbusd), as _mm512_dpbusd_epi32 / _mm256_dpbusd_epi32;
// in asm so that the accumulator may live in any of the 32 registers: GCC 12 moves it through zmm0-15 (and spills)
// for the intrinsic, which cost the attention kernel's p . v a third of its speed
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
inline __m256i dpbusd(__m256i acc, __m256i a, __m256i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// the first `left` of 16 lanes (all 16 when left >= 16)
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

// uint8 = clamp(round_half_even(y / scale) + zero_point, 0, 255), as torch's quantize_per_tensor (inv = 1 / scale)
inline __m128i quantize_u8(__m512 y, __m512 inv, __m512i zero_point) {
  __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(y, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_max_epi32(_mm512_add_epi32(q, zero_point), _mm512_setzero_si512());
  return _mm512_cvtusepi32_epi8(q);  // unsigned saturation: <= 255
}

}  // namespace diffusekit_simd
