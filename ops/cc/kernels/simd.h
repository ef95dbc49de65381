// float32 SIMD helpers of the CPU kernels (GCC vector extensions), shared by cpu_math.cc and
// coor_descent_math.cc: vectors of N lanes, unaligned loads/stores, a lane sum and a vectorised exp.
// The helpers are always inlined into the callers' ISA-specific functions (target attributes), so
// they live in an unnamed namespace: each translation unit keeps its own copies, never merged
// across ISA levels by the linker.
#ifndef BSATTN_OPS_CC_KERNELS_SIMD_H_
#define BSATTN_OPS_CC_KERNELS_SIMD_H_

#include <cmath>
#include <cstdint>
#include <cstring>

// The vector types are passed by value only inside always-inlined helpers; the psABI note about
// AVX vector arguments does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace bsattn {
namespace {

// float32 and int32 vectors of N lanes (GCC vector extensions: the compiler maps them to the
// registers of the function's target ISA).
template <int N>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * N)));
  typedef int32_t I __attribute__((vector_size(4 * N)));
};

template <int N>
inline __attribute__((always_inline)) typename Lanes<N>::F Load(const float* p) {
  typename Lanes<N>::F v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <int N>
inline __attribute__((always_inline)) void Store(float* p, typename Lanes<N>::F v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int N>
inline __attribute__((always_inline)) float Sum(typename Lanes<N>::F v) {
  float s = 0.0f;
  for (int i = 0; i < N; ++i) s += v[i];
  return s;
}

// exp(x) = 2^k * exp(r) with k = round(x / ln 2) and |r| <= ln(2) / 2; exp(r) by a degree-7
// Taylor-like polynomial (Horner), ln 2 split in two parts so that r is exact enough. k is rounded
// by adding 1.5 * 2^23 (its low mantissa bits then hold k), which also gives the bits of 2^k without
// a float -> int conversion. Inputs below -87 (and -inf) give 0.
template <int N>
inline __attribute__((always_inline)) typename Lanes<N>::F ExpVec(typename Lanes<N>::F v) {
  using Vec = typename Lanes<N>::F;
  using IVec = typename Lanes<N>::I;
  const Vec zero = {}, one = zero + 1.0f, high = zero + 88.0f, low = zero - 87.0f;
  const Vec log2e = zero + 1.44269504088896341f, shifter = zero + 12582912.0f;  // 1.5 * 2^23
  const Vec ln2_hi = zero + 0.693359375f, ln2_lo = zero - 2.12194440e-4f;
  const IVec underflow = v < low;
  Vec t = v > high ? high : v;
  t = t < low ? low : t;
  const Vec shifted = t * log2e + shifter;
  const Vec kf = shifted - shifter;
  const Vec r = t - kf * ln2_hi - kf * ln2_lo;
  Vec p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + one;
  IVec bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits + 127) << 23;  // 2^k: the shifter's own bits leave through the top
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const Vec result = p * scale;
  IVec result_bits;
  std::memcpy(&result_bits, &result, sizeof(result_bits));
  result_bits &= ~underflow;  // exp(x < -87) -> 0
  Vec out;
  std::memcpy(&out, &result_bits, sizeof(out));
  return out;
}

inline float ExpScalar(float x) { return x < -87.0f ? 0.0f : std::exp(x); }
inline double ExpScalar(double x) { return std::exp(x); }

}  // namespace
}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_SIMD_H_
