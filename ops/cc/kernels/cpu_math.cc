#include "ops/cc/kernels/cpu_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "ops/cc/kernels/simd.h"

namespace bsattn {
namespace {

// The starting value of C[i][j] for the products below: 0 (overwrite), C[i][j] * row_scale[i], or
// C[i][j] (row_scale null).
inline __attribute__((always_inline)) float StartValue(const float* c, const float* row_scale,
                                                       bool overwrite, int i, int ldc, int j) {
  if (overwrite) return 0.0f;
  return row_scale == nullptr ? c[i * ldc + j] : c[i * ldc + j] * row_scale[i];
}

// C[i:i+kRows, j:j+kVecs*N] = start + A[i:i+kRows, :] * B[:, j:j+kVecs*N]: kRows x kVecs
// accumulators stay in registers; start as in StartValue. kTransposeA: A is stored as [k][m]
// (element (i, p) at a[p * lda + i]).
template <int N, int kRows, int kVecs, bool kTransposeA>
inline __attribute__((always_inline)) void MatMulStrip(const float* __restrict a, int lda,
                                                      const float* __restrict b, int ldb,
                                                      float* __restrict c, int ldc, int i, int j,
                                                      int k, const float* __restrict row_scale,
                                                      bool overwrite) {
  using Vec = typename Lanes<N>::F;
  Vec acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    const float f = row_scale == nullptr ? 1.0f : row_scale[i + r];
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = overwrite ? Vec{} : Load<N>(c + (i + r) * ldc + j + N * v);
      if (row_scale != nullptr) acc[r][v] *= f;
    }
  }
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

// Register-blocked C = start + op(A) * B (start as in StartValue): 4-row strips of 4, 2 or 1
// vectors of N lanes, then scalar columns and rows. With N = 16 (AVX-512) a 4 x 64 strip holds 16
// zmm accumulators.
template <int N, bool kTransposeA>
inline __attribute__((always_inline)) void MatMulBody(const float* __restrict a, int lda,
                                                     const float* __restrict b, int ldb,
                                                     float* __restrict c, int ldc, int m, int k, int n,
                                                     const float* __restrict row_scale, bool overwrite) {
  auto at = [a, lda](int i, int p) { return kTransposeA ? a[p * lda + i] : a[i * lda + p]; };
  constexpr int kRows = 4;
  int i = 0;
  for (; i + kRows <= m; i += kRows) {
    int j = 0;
    for (; j + 4 * N <= n; j += 4 * N)
      MatMulStrip<N, kRows, 4, kTransposeA>(a, lda, b, ldb, c, ldc, i, j, k, row_scale, overwrite);
    for (; j + 2 * N <= n; j += 2 * N)
      MatMulStrip<N, kRows, 2, kTransposeA>(a, lda, b, ldb, c, ldc, i, j, k, row_scale, overwrite);
    for (; j + N <= n; j += N)
      MatMulStrip<N, kRows, 1, kTransposeA>(a, lda, b, ldb, c, ldc, i, j, k, row_scale, overwrite);
    for (; j < n; ++j) {
      for (int r = 0; r < kRows; ++r) {
        float s = StartValue(c, row_scale, overwrite, i + r, ldc, j);
        for (int p = 0; p < k; ++p) s += at(i + r, p) * b[p * ldb + j];
        c[(i + r) * ldc + j] = s;
      }
    }
  }
  for (; i < m; ++i) {
    for (int j = 0; j < n; ++j) c[i * ldc + j] = StartValue(c, row_scale, overwrite, i, ldc, j);
    for (int p = 0; p < k; ++p) {
      const float av = at(i, p);
      for (int j = 0; j < n; ++j) c[i * ldc + j] += av * b[p * ldb + j];
    }
  }
}


template <int N>
inline __attribute__((always_inline)) void ExpBody(float* x, int n) {
  int i = 0;
  for (; i + N <= n; i += N) Store<N>(x + i, ExpVec<N>(Load<N>(x + i)));
  for (; i < n; ++i) x[i] = ExpScalar(x[i]);
}

// x[r][c] = exp(x[r][c] - v[c]) and sums[c] += x[r][c], r in order: one pass over the tile.
template <int N>
inline __attribute__((always_inline)) void ExpMinusColumnsSumBody(float* __restrict x, int rows,
                                                                  int cols, const float* __restrict v,
                                                                  float* __restrict sums) {
  int c = 0;
  for (; c + N <= cols; c += N) {
    const auto shift = Load<N>(v + c);
    auto sum = Load<N>(sums + c);
    for (int r = 0; r < rows; ++r) {
      const auto e = ExpVec<N>(Load<N>(x + r * cols + c) - shift);
      Store<N>(x + r * cols + c, e);
      sum += e;
    }
    Store<N>(sums + c, sum);
  }
  for (; c < cols; ++c) {
    for (int r = 0; r < rows; ++r) {
      x[r * cols + c] = ExpScalar(x[r * cols + c] - v[c]);
      sums[c] += x[r * cols + c];
    }
  }
}

using MatMulFn = void (*)(const float*, int, const float*, int, float*, int, int, int, int,
                         const float*, bool);
using ExpFn = void (*)(float*, int);
using ExpSumFn = void (*)(float*, int, int, const float*, float*);

struct IsaKernels {
  MatMulFn matmul;
  MatMulFn matmul_transposed_a;
  ExpFn exp;
  ExpSumFn exp_minus_columns_sum;
};

// One instance of every kernel per ISA level: AVX-512 (16 lanes), AVX2 + FMA and the x86-64
// baseline (8 lanes; SSE2 pairs there).
#define BSATTN_ISA_KERNELS(name, target, lanes)                                                 \
  target void MatMul##name(const float* a, int lda, const float* b, int ldb, float* c, int ldc, \
                           int m, int k, int n, const float* row_scale, bool overwrite) {       \
    MatMulBody<lanes, false>(a, lda, b, ldb, c, ldc, m, k, n, row_scale, overwrite);            \
  }                                                                                             \
  target void MatMulTransposedA##name(const float* a, int lda, const float* b, int ldb,         \
                                      float* c, int ldc, int m, int k, int n,                   \
                                      const float* row_scale, bool overwrite) {                 \
    MatMulBody<lanes, true>(a, lda, b, ldb, c, ldc, m, k, n, row_scale, overwrite);             \
  }                                                                                             \
  target void Exp##name(float* x, int n) { ExpBody<lanes>(x, n); }                              \
  target void ExpMinusColumnsSum##name(float* x, int rows, int cols, const float* v,            \
                                       float* sums) {                                           \
    ExpMinusColumnsSumBody<lanes>(x, rows, cols, v, sums);                                      \
  }                                                                                             \
  constexpr IsaKernels k##name = {MatMul##name, MatMulTransposedA##name, Exp##name,             \
                                  ExpMinusColumnsSum##name};

BSATTN_ISA_KERNELS(Avx512, __attribute__((target("arch=x86-64-v4"))), 16)
BSATTN_ISA_KERNELS(Avx2, __attribute__((target("arch=x86-64-v3"))), 8)
BSATTN_ISA_KERNELS(Baseline, , 8)
#undef BSATTN_ISA_KERNELS

IsaKernels SelectKernels() {
  const int level = CpuIsaLevel();
  return level == 2 ? kAvx512 : level == 1 ? kAvx2 : kBaseline;
}

const IsaKernels& Kernels() {
  static const IsaKernels kernels = SelectKernels();
  return kernels;
}

}  // namespace

// The best level the CPU supports, or $BSATTN_CPU_ISA (cpu_math.h: avx512bf16 and avx512 are the AVX-512
// level here) capped by it, so that tests can run the lower levels too. Chosen once.
int CpuIsaLevel() {
  static const int level = [] {
    __builtin_cpu_init();
    int best = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
    if (const char* env = std::getenv("BSATTN_CPU_ISA")) {
      const std::string isa(env);
      const int wanted = isa == "baseline" ? 0 : isa == "avx2" ? 1 : 2;
      best = wanted < best ? wanted : best;
    }
    return best;
  }();
  return level;
}

const char* CpuIsa() {
  const IsaKernels& k = Kernels();
  return k.exp == kAvx512.exp ? "avx512" : k.exp == kAvx2.exp ? "avx2" : "baseline";
}

void MatMulAccumulate(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int m,
                      int k, int n) {
  Kernels().matmul(a, lda, b, ldb, c, ldc, m, k, n, nullptr, false);
}

void MatMul(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int m, int k,
            int n) {
  Kernels().matmul(a, lda, b, ldb, c, ldc, m, k, n, nullptr, true);
}

void MatMulAccumulateTransposedA(const float* a, int lda, const float* b, int ldb, float* c,
                                 int ldc, int m, int k, int n, const float* c_row_scale) {
  Kernels().matmul_transposed_a(a, lda, b, ldb, c, ldc, m, k, n, c_row_scale, false);
}

void ExpInPlace(float* x, int n) { Kernels().exp(x, n); }

void ExpInPlace(double* x, int n) {
  for (int i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

void ExpMinusColumnsSum(float* x, int rows, int cols, const float* v, float* sums) {
  Kernels().exp_minus_columns_sum(x, rows, cols, v, sums);
}

void ExpMinusColumnsSum(double* x, int rows, int cols, const double* v, double* sums) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      x[r * cols + c] = std::exp(x[r * cols + c] - v[c]);
      sums[c] += x[r * cols + c];
    }
  }
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

void MatMul(const double* a, int lda, const double* b, int ldb, double* c, int ldc, int m, int k,
            int n) {
  for (int i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, 0.0);
  MatMulAccumulate(a, lda, b, ldb, c, ldc, m, k, n);
}

void MatMulAccumulateTransposedA(const double* a, int lda, const double* b, int ldb, double* c,
                                 int ldc, int m, int k, int n, const double* c_row_scale) {
  if (c_row_scale != nullptr) {
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) c[i * ldc + j] *= c_row_scale[i];
  }
  for (int p = 0; p < k; ++p) {
    for (int i = 0; i < m; ++i) {
      const double av = a[p * lda + i];
      for (int j = 0; j < n; ++j) c[i * ldc + j] += av * b[p * ldb + j];
    }
  }
}

}  // namespace bsattn
