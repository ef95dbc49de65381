#include "ops/cc/kernels/cpu_math.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

// The vector types below are passed by value only inside always-inlined helpers; the psABI note
// about AVX vector arguments does not apply.
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

// C[i:i+kRows, j:j+kVecs*N] += A[i:i+kRows, :] * B[:, j:j+kVecs*N]: kRows x kVecs accumulators stay
// in registers. kTransposeA: A is stored as [k][m] (element (i, p) at a[p * lda + i]).
template <int N, int kRows, int kVecs, bool kTransposeA>
inline __attribute__((always_inline)) void MatMulStrip(const float* __restrict a, int lda,
                                                      const float* __restrict b, int ldb,
                                                      float* __restrict c, int ldc, int i, int j,
                                                      int k) {
  using Vec = typename Lanes<N>::F;
  Vec acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = Load<N>(c + (i + r) * ldc + j + N * v);
  for (int p = 0; p < k; ++p) {
    Vec bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = Load<N>(b + p * ldb + j + N * v);
    for (int r = 0; r < kRows; ++r) {
      const float av = kTransposeA ? a[p * lda + i + r] : a[(i + r) * lda + p];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) Store<N>(c + (i + r) * ldc + j + N * v, acc[r][v]);
}

// Register-blocked C += op(A) * B: 4-row strips of 4, 2 or 1 vectors of N lanes, then scalar
// columns and rows. With N = 16 (AVX-512) a 4 x 64 strip holds 16 zmm accumulators.
template <int N, bool kTransposeA>
inline __attribute__((always_inline)) void MatMulBody(const float* __restrict a, int lda,
                                                     const float* __restrict b, int ldb,
                                                     float* __restrict c, int ldc, int m, int k, int n) {
  auto at = [a, lda](int i, int p) { return kTransposeA ? a[p * lda + i] : a[i * lda + p]; };
  constexpr int kRows = 4;
  int i = 0;
  for (; i + kRows <= m; i += kRows) {
    int j = 0;
    for (; j + 4 * N <= n; j += 4 * N) MatMulStrip<N, kRows, 4, kTransposeA>(a, lda, b, ldb, c, ldc, i, j, k);
    for (; j + 2 * N <= n; j += 2 * N) MatMulStrip<N, kRows, 2, kTransposeA>(a, lda, b, ldb, c, ldc, i, j, k);
    for (; j + N <= n; j += N) MatMulStrip<N, kRows, 1, kTransposeA>(a, lda, b, ldb, c, ldc, i, j, k);
    for (; j < n; ++j) {
      for (int r = 0; r < kRows; ++r) {
        float s = c[(i + r) * ldc + j];
        for (int p = 0; p < k; ++p) s += at(i + r, p) * b[p * ldb + j];
        c[(i + r) * ldc + j] = s;
      }
    }
  }
  for (; i < m; ++i) {
    for (int p = 0; p < k; ++p) {
      const float av = at(i, p);
      for (int j = 0; j < n; ++j) c[i * ldc + j] += av * b[p * ldb + j];
    }
  }
}

// exp(x) = 2^k * exp(r) with k = round(x / ln 2) and |r| <= ln(2) / 2; exp(r) by a degree-7
// Taylor-like polynomial (Horner), ln 2 split in two parts so that r is exact enough.
template <int N>
inline __attribute__((always_inline)) void ExpBody(float* x, int n) {
  using Vec = typename Lanes<N>::F;
  using IVec = typename Lanes<N>::I;
  const Vec zero = {}, half = zero + 0.5f, one = zero + 1.0f, high = zero + 88.0f;
  const Vec low = zero - 87.0f, log2e = zero + 1.44269504088896341f;
  const Vec ln2_hi = zero + 0.693359375f, ln2_lo = zero - 2.12194440e-4f;
  int i = 0;
  for (; i + N <= n; i += N) {
    const Vec v = Load<N>(x + i);
    const IVec underflow = v < low;
    Vec t = v > high ? high : v;
    t = t < low ? low : t;
    Vec kf = __builtin_convertvector(__builtin_convertvector(t * log2e + half, IVec), Vec);
    kf = kf > t * log2e + half ? kf - one : kf;  // truncation -> floor for negative values
    const Vec r = t - kf * ln2_hi - kf * ln2_lo;
    Vec p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + one;
    const IVec bits = (__builtin_convertvector(kf, IVec) + 127) << 23;  // 2^k
    Vec scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const Vec result = p * scale;
    IVec result_bits;
    std::memcpy(&result_bits, &result, sizeof(result_bits));
    result_bits &= ~underflow;  // exp(x < -87) -> 0
    std::memcpy(x + i, &result_bits, sizeof(result_bits));
  }
  for (; i < n; ++i) x[i] = x[i] < -87.0f ? 0.0f : std::exp(x[i]);
}

using MatMulFn = void (*)(const float*, int, const float*, int, float*, int, int, int, int);
using ExpFn = void (*)(float*, int);

struct IsaKernels {
  MatMulFn matmul;
  MatMulFn matmul_transposed_a;
  ExpFn exp;
};

// One instance of every kernel per ISA level: AVX-512 (16 lanes), AVX2 + FMA and the x86-64
// baseline (8 lanes; SSE2 pairs there).
#define BSATTN_ISA_KERNELS(name, target, lanes)                                                 \
  target void MatMul##name(const float* a, int lda, const float* b, int ldb, float* c, int ldc, \
                           int m, int k, int n) {                                               \
    MatMulBody<lanes, false>(a, lda, b, ldb, c, ldc, m, k, n);                                  \
  }                                                                                             \
  target void MatMulTransposedA##name(const float* a, int lda, const float* b, int ldb,         \
                                      float* c, int ldc, int m, int k, int n) {                 \
    MatMulBody<lanes, true>(a, lda, b, ldb, c, ldc, m, k, n);                                   \
  }                                                                                             \
  target void Exp##name(float* x, int n) { ExpBody<lanes>(x, n); }                              \
  constexpr IsaKernels k##name = {MatMul##name, MatMulTransposedA##name, Exp##name};

BSATTN_ISA_KERNELS(Avx512, __attribute__((target("arch=x86-64-v4"))), 16)
BSATTN_ISA_KERNELS(Avx2, __attribute__((target("arch=x86-64-v3"))), 8)
BSATTN_ISA_KERNELS(Baseline, , 8)
#undef BSATTN_ISA_KERNELS

// The best level the CPU supports, or $BSATTN_CPU_ISA (avx512, avx2, baseline) capped by it,
// so that tests can run the lower levels too. Chosen once.
IsaKernels SelectKernels() {
  __builtin_cpu_init();
  int level = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
  if (const char* env = std::getenv("BSATTN_CPU_ISA")) {
    const std::string isa(env);
    const int wanted = isa == "baseline" ? 0 : isa == "avx2" ? 1 : 2;
    level = wanted < level ? wanted : level;
  }
  return level == 2 ? kAvx512 : level == 1 ? kAvx2 : kBaseline;
}

const IsaKernels& Kernels() {
  static const IsaKernels kernels = SelectKernels();
  return kernels;
}

}  // namespace

const char* CpuIsa() {
  const IsaKernels& k = Kernels();
  return k.exp == kAvx512.exp ? "avx512" : k.exp == kAvx2.exp ? "avx2" : "baseline";
}

void MatMulAccumulate(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int m,
                      int k, int n) {
  Kernels().matmul(a, lda, b, ldb, c, ldc, m, k, n);
}

void MatMulAccumulateTransposedA(const float* a, int lda, const float* b, int ldb, float* c,
                                 int ldc, int m, int k, int n) {
  Kernels().matmul_transposed_a(a, lda, b, ldb, c, ldc, m, k, n);
}

void ExpInPlace(float* x, int n) { Kernels().exp(x, n); }

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

void MatMulAccumulateTransposedA(const double* a, int lda, const double* b, int ldb, double* c,
                                 int ldc, int m, int k, int n) {
  for (int p = 0; p < k; ++p) {
    for (int i = 0; i < m; ++i) {
      const double av = a[p * lda + i];
      for (int j = 0; j < n; ++j) c[i * ldc + j] += av * b[p * ldb + j];
    }
  }
}

}  // namespace bsattn
