#include "ops/cc/kernels/cpu_gemm.h"

#include <cstring>

// The 8-float vector type below is passed by value only inside always-inlined helpers; the
// psABI note about AVX vector arguments does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace bsattn {
namespace {

typedef float Vec8 __attribute__((vector_size(32)));

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
