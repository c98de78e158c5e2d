// diffusekit: GroupNorm for float32 CPU tensors in either memory layout, for x86 CPUs with AVX-512 (built at run
// time with cpu_attention.cpp into one library, see diffusekit/cpu_attention.py).
//
//   y[n, c, ...] = (x[n, c, ...] - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c],  g = c / (C / G)
//
// Why: an int8 model's convolutions hand their outputs over channels-last ([N, H, W, C] in memory). inductor's
// GroupNorm reduces each group over strided runs of C / G channels there (4 in the SD VAE's last stage) and ran
// 4.4x slower than on the same tensor laid out [N, C, H, W]. Here the channels-last statistics are per-channel sums
// over pixels, vectorised across the channels, combined into groups afterwards.
// Statistics: per channel, sums of (x - pivot) and (x - pivot)^2 (pivot: the channel's first value, so the sums do
// not cancel when the mean is large against the spread), in float over short runs and double across them; the
// groups combine the channels' means and centred second moments exactly (Chan et al.).
// Output: the input's layout (channels-last in, channels-last out; anything else: contiguous).
//
// group_norm_quantize: the same norm of x + shift[n, c] (shift: optional, e.g. a ResNet block's time embedding),
// then optionally SiLU, written as uint8 (a following int8 convolution's input: round half to even, like
// quantize_per_tensor). One pass instead of an add, the norm and a SiLU + quantize pass over float32 tensors.
#include <immintrin.h>

#include "cpu_simd.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kRun = 1024;    // values summed in float before they go to the double sums ([N, C, H, W])
constexpr int64_t kPixels = 256;  // pixels per float partial sum ([N, H, W, C])

using diffusekit_simd::tail_mask;

// sums of (x - pivot) and (x - pivot)^2 over n contiguous values
void row_sums(const float* x, int64_t n, float pivot, double& s1, double& s2) {
  const __m512 pv = _mm512_set1_ps(pivot);
  double d1 = 0, d2 = 0;
  for (int64_t start = 0; start < n; start += kRun) {
    const int64_t end = std::min(n, start + kRun);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps();
    int64_t i = start;
    for (; i + 32 <= end; i += 32) {
      const __m512 v0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), pv);
      const __m512 v1 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16), pv);
      a1 = _mm512_add_ps(a1, v0);
      a2 = _mm512_fmadd_ps(v0, v0, a2);
      b1 = _mm512_add_ps(b1, v1);
      b2 = _mm512_fmadd_ps(v1, v1, b2);
    }
    for (; i < end; i += 16) {
      const __mmask16 m = tail_mask(end - i);
      const __m512 v = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + i), pv);
      a1 = _mm512_add_ps(a1, v);
      a2 = _mm512_fmadd_ps(v, v, a2);
    }
    d1 += _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
    d2 += _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
  }
  s1 = d1;
  s2 = d2;
}

// what happens to y = x * a + b before it is stored: SiLU, and/or uint8 quantization
struct Finish {
  bool silu = false;
  float inv_scale = 1.f;  // 1 / the output scale (uint8 output only)
  int32_t zero_point = 0;
};

inline __m512 activate(__m512 y, const Finish& f) {
  if (!f.silu) return y;
  const __m512 e = diffusekit_simd::exp_accurate(_mm512_sub_ps(_mm512_setzero_ps(), y));
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.f), e));  // y / (1 + exp(-y))
}

inline void store(float* y, __mmask16 m, __m512 v, const Finish&) { _mm512_mask_storeu_ps(y, m, v); }

inline void store(uint8_t* y, __mmask16 m, __m512 v, const Finish& f) {
  const __m128i q = diffusekit_simd::quantize_u8(v, _mm512_set1_ps(f.inv_scale), _mm512_set1_epi32(f.zero_point));
  _mm_mask_storeu_epi8(y, m, q);
}

// y = finish(x * a + b) over n contiguous values
template <typename Out>
void row_affine(const float* x, Out* y, int64_t n, float a, float b, const Finish& f) {
  const __m512 av = _mm512_set1_ps(a), bv = _mm512_set1_ps(b);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    store(y + i, m, activate(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), av, bv), f), f);
  }
}

template <typename Out>
at::Tensor group_norm_impl(const at::Tensor& x_in, int64_t groups, const std::optional<at::Tensor>& weight_in,
                           const std::optional<at::Tensor>& bias_in, double eps,
                           const std::optional<at::Tensor>& shift_in, const Finish& finish) {
  TORCH_CHECK(x_in.dim() >= 2, "diffusekit::group_norm: the input must be [N, C, ...], got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "diffusekit::group_norm: a float32 CPU tensor expected");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "diffusekit::group_norm: ", C, " channels do not split into ", groups,
              " groups");
  const bool nhwc = x_in.dim() == 4 && !x_in.is_contiguous() &&
                    x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  const auto options = x.options().dtype(std::is_same_v<Out, float> ? at::kFloat : at::kByte);
  at::Tensor out = nhwc ? at::empty(x.sizes(), options.memory_format(at::MemoryFormat::ChannelsLast))
                        : at::empty(x.sizes(), options);
  const int64_t HW = N * C == 0 ? 0 : x.numel() / (N * C), Cg = C / groups;
  if (x.numel() == 0) return out;
  std::vector<float> weight(C, 1.f), bias(C, 0.f);
  for (const auto& [given, values] : {std::pair{&weight_in, &weight}, std::pair{&bias_in, &bias}}) {
    if (!given->has_value() || !given->value().defined()) continue;
    const at::Tensor t = given->value().contiguous().to(at::kFloat);
    TORCH_CHECK(t.numel() == C, "diffusekit::group_norm: ", C, " channels, but an affine tensor of ", t.numel());
    std::copy(t.const_data_ptr<float>(), t.const_data_ptr<float>() + C, values->begin());
  }
  std::vector<float> shift(N * C, 0.f);
  if (shift_in.has_value() && shift_in->defined()) {
    const at::Tensor t = shift_in->contiguous().to(at::kFloat);
    TORCH_CHECK(t.numel() == N * C, "diffusekit::group_norm: the shift must have one value per (sample, channel): ",
                N * C, ", got ", t.numel());
    std::copy(t.const_data_ptr<float>(), t.const_data_ptr<float>() + N * C, shift.begin());
  }
  const float* xd = x.const_data_ptr<float>();
  Out* yd = out.mutable_data_ptr<Out>();

  // per (n, c): the channel's mean and centred second moment
  std::vector<double> mean_c(N * C), m2_c(N * C);
  if (!nhwc) {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const float* row = xd + nc * HW;
        double s1, s2;
        row_sums(row, HW, row[0], s1, s2);
        mean_c[nc] = row[0] + s1 / HW;
        m2_c[nc] = std::max(0.0, s2 - s1 * s1 / HW);
      }
    });
  } else {
    const int64_t chunks = (HW + kPixels - 1) / kPixels;
    std::vector<double> part1(N * chunks * C), part2(N * chunks * C);
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> a1(C), a2(C);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, p0 = (item % chunks) * kPixels, p1 = std::min(HW, p0 + kPixels);
        const float* pivot = xd + n * HW * C;  // the image's first pixel
        std::fill(a1.begin(), a1.end(), 0.f);
        std::fill(a2.begin(), a2.end(), 0.f);
        for (int64_t c = 0; c < C; c += 16) {
          const __mmask16 m = tail_mask(C - c);
          const __m512 pv = _mm512_maskz_loadu_ps(m, pivot + c);
          __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
          for (int64_t p = p0; p < p1; ++p) {
            const __m512 v = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xd + (n * HW + p) * C + c), pv);
            s1 = _mm512_add_ps(s1, v);
            s2 = _mm512_fmadd_ps(v, v, s2);
          }
          _mm512_mask_storeu_ps(a1.data() + c, m, s1);
          _mm512_mask_storeu_ps(a2.data() + c, m, s2);
        }
        for (int64_t c = 0; c < C; ++c) {
          part1[item * C + c] = a1[c];
          part2[item * C + c] = a2[c];
        }
      }
    });
    at::parallel_for(0, N * C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        double s1 = 0, s2 = 0;
        for (int64_t k = 0; k < chunks; ++k) {
          s1 += part1[(n * chunks + k) * C + c];
          s2 += part2[(n * chunks + k) * C + c];
        }
        const double pivot = xd[n * HW * C + c];
        mean_c[nc] = pivot + s1 / HW;
        m2_c[nc] = std::max(0.0, s2 - s1 * s1 / HW);
      }
    });
  }

  // per (n, c): y = x * a + b, from the group's statistics
  std::vector<float> a(N * C), b(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = n * C + g * Cg;
      double mean = 0;
      for (int64_t c = 0; c < Cg; ++c) mean_c[first + c] += shift[first + c];  // the channel means of x + shift
      for (int64_t c = 0; c < Cg; ++c) mean += mean_c[first + c];
      mean /= Cg;
      double m2 = 0;
      for (int64_t c = 0; c < Cg; ++c) {
        const double d = mean_c[first + c] - mean;
        m2 += m2_c[first + c] + HW * d * d;
      }
      const double rstd = 1.0 / std::sqrt(m2 / (HW * Cg) + eps);
      for (int64_t c = 0; c < Cg; ++c) {
        const int64_t ch = g * Cg + c;
        const double scale = weight[ch] * rstd;
        a[first + c] = static_cast<float>(scale);  // (x + shift) * scale + bias - mean * scale
        b[first + c] = static_cast<float>(bias[ch] + (shift[first + c] - mean) * scale);
      }
    }

  if (!nhwc) {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) row_affine(xd + nc * HW, yd + nc * HW, HW, a[nc], b[nc], finish);
    });
  } else {
    at::parallel_for(0, N * HW, kPixels, [&](int64_t begin, int64_t end) {
      for (int64_t np = begin; np < end; ++np) {
        const int64_t n = np / HW;
        const float* xp = xd + np * C;
        Out* yp = yd + np * C;
        for (int64_t c = 0; c < C; c += 16) {
          const __mmask16 m = tail_mask(C - c);
          const __m512 v = _mm512_maskz_loadu_ps(m, xp + c);
          const __m512 y = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, a.data() + n * C + c),
                                           _mm512_maskz_loadu_ps(m, b.data() + n * C + c));
          store(yp + c, m, activate(y, finish), finish);
        }
      }
    });
  }
  return out;
}

at::Tensor group_norm(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps) {
  return group_norm_impl<float>(x, groups, weight, bias, eps, std::nullopt, Finish{});
}

at::Tensor group_norm_quantize(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps,
                               const std::optional<at::Tensor>& shift, bool silu, double out_scale,
                               int64_t out_zero_point) {
  TORCH_CHECK(out_scale > 0 && 0 <= out_zero_point && out_zero_point <= 255,
              "diffusekit::group_norm_quantize: the output scale must be positive and its zero point in [0, 255]");
  return group_norm_impl<uint8_t>(x, groups, weight, bias, eps, shift,
                                  Finish{silu, static_cast<float>(1.0 / out_scale),
                                         static_cast<int32_t>(out_zero_point)});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffusekit, m) {
  // flexible_layout: inductor hands the input over in whatever layout it has (channels-last after an int8 conv)
  m.def("group_norm(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps) -> Tensor",
        {at::Tag::flexible_layout});
  m.def("group_norm_quantize(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps, Tensor? shift, "
        "bool silu, float out_scale, int out_zero_point) -> Tensor",
        {at::Tag::flexible_layout});
}

TORCH_LIBRARY_IMPL(diffusekit, CPU, m) {
  m.impl("group_norm", &group_norm);
  m.impl("group_norm_quantize", &group_norm_quantize);
}
