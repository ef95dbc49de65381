#include "ops/cc/kernels/cpu_math.h"

#include <cmath>
#include <cstdint>
#include <cstring>

// The 8-float vector type below is passed by value only inside always-inlined helpers; the
// psABI note about AVX vector arguments does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace bsattn {
namespace {

typedef float Vec8 __attribute__((vector_size(32)));
typedef int32_t Vec8i __attribute__((vector_size(32)));

inline __attribute__((always_inline)) Vec8 Load8(const float* p) {
  Vec8 v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

inline __attribute__((always_inline)) void Store8(float* p, Vec8 v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace

// One clone per ISA level; the loader's ifunc resolver picks the best one for the running CPU.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void MatMulAccumulate(const float* __restrict a, int lda, const float* __restrict b, int ldb,
                      float* __restrict c, int ldc, int m, int k, int n) {
  constexpr int kRows = 4;
  constexpr int kVecs = 4;  // 4 x 8 = 32 columns: 16 accumulators stay in registers
  int i = 0;
  for (; i + kRows <= m; i += kRows) {
    int j = 0;
    for (; j + 8 * kVecs <= n; j += 8 * kVecs) {
      Vec8 acc[kRows][kVecs];
      for (int r = 0; r < kRows; ++r)
        for (int v = 0; v < kVecs; ++v) acc[r][v] = Load8(c + (i + r) * ldc + j + 8 * v);
      for (int p = 0; p < k; ++p) {
        Vec8 bv[kVecs];
        for (int v = 0; v < kVecs; ++v) bv[v] = Load8(b + p * ldb + j + 8 * v);
        for (int r = 0; r < kRows; ++r) {
          const float av = a[(i + r) * lda + p];
          for (int v = 0; v < kVecs; ++v) acc[r][v] += av * bv[v];
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int v = 0; v < kVecs; ++v) Store8(c + (i + r) * ldc + j + 8 * v, acc[r][v]);
    }
    for (; j + 8 <= n; j += 8) {
      Vec8 acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = Load8(c + (i + r) * ldc + j);
      for (int p = 0; p < k; ++p) {
        const Vec8 bv = Load8(b + p * ldb + j);
        for (int r = 0; r < kRows; ++r) acc[r] += a[(i + r) * lda + p] * bv;
      }
      for (int r = 0; r < kRows; ++r) Store8(c + (i + r) * ldc + j, acc[r]);
    }
    for (; j < n; ++j) {
      for (int r = 0; r < kRows; ++r) {
        float s = c[(i + r) * ldc + j];
        for (int p = 0; p < k; ++p) s += a[(i + r) * lda + p] * b[p * ldb + j];
        c[(i + r) * ldc + j] = s;
      }
    }
  }
  for (; i < m; ++i) {
    for (int p = 0; p < k; ++p) {
      const float av = a[i * lda + p];
      for (int j = 0; j < n; ++j) c[i * ldc + j] += av * b[p * ldb + j];
    }
  }
}

// exp(x) = 2^k * exp(r) with k = round(x / ln 2) and |r| <= ln(2) / 2; exp(r) by a degree-7
// Taylor-like polynomial (Horner), ln 2 split in two parts so that r is exact enough.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void ExpInPlace(float* x, int n) {
  const Vec8 zero = {}, half = zero + 0.5f, one = zero + 1.0f, high = zero + 88.0f;
  const Vec8 low = zero - 87.0f, log2e = zero + 1.44269504088896341f;
  const Vec8 ln2_hi = zero + 0.693359375f, ln2_lo = zero - 2.12194440e-4f;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const Vec8 v = Load8(x + i);
    const Vec8i underflow = v < low;
    Vec8 t = v > high ? high : v;
    t = t < low ? low : t;
    Vec8 kf = __builtin_convertvector(__builtin_convertvector(t * log2e + half, Vec8i), Vec8);
    kf = kf > t * log2e + half ? kf - one : kf;  // truncation -> floor for negative values
    const Vec8 r = t - kf * ln2_hi - kf * ln2_lo;
    Vec8 p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + one;
    const Vec8i bits = (__builtin_convertvector(kf, Vec8i) + 127) << 23;  // 2^k
    Vec8 scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const Vec8 result = p * scale;
    Vec8i result_bits;
    std::memcpy(&result_bits, &result, sizeof(result_bits));
    result_bits &= ~underflow;  // exp(x < -87) -> 0
    std::memcpy(x + i, &result_bits, sizeof(result_bits));
  }
  for (; i < n; ++i) x[i] = x[i] < -87.0f ? 0.0f : std::exp(x[i]);
}

void ExpInPlace(double* x, int n) {
  for (int i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

void MatMulAccumulate(const double* a, int lda, const double* b, int ldb, double* c, int ldc,
                      int m, int k, int n) {
  for (int i = 0; i < m; ++i) {
    for (int p = 0; p < k; ++p) {
      const double av = a[i * lda + p];
      for (int j = 0; j < n; ++j) c[i * ldc + j] += av * b[p * ldb + j];
    }
  }
}

}  // namespace bsattn
