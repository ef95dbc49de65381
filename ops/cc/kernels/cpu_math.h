// Dense float32 math kernels (small matmuls, vectorised exp) used by the CPU block-sparse ops.
#ifndef BSATTN_OPS_CC_KERNELS_CPU_MATH_H_
#define BSATTN_OPS_CC_KERNELS_CPU_MATH_H_

namespace bsattn {

// The float32 kernels are compiled once per ISA level (AVX-512 with 16-lane vectors, AVX2+FMA and
// the x86-64 baseline with 8 lanes); the best level the CPU has is chosen once, at the first call.
// $BSATTN_CPU_ISA caps it (for tests and benchmarks of the lower levels), from the top:
//   avx512bf16  the default: AVX-512 float32 kernels, and bfloat16 products (vdpbf16ps) for bfloat16
//               inputs of the fused attention where the CPU has AVX512-BF16 (cpu_bf16.h)
//   avx512      AVX-512 float32 kernels; bfloat16 inputs widened to float32 (the float32 products)
//   avx2        AVX2 + FMA float32 kernels, bfloat16 widened
//   baseline    x86-64 baseline (SSE2) float32 kernels, bfloat16 widened
// Any other value means the default.

// The level in use: "avx512", "avx2" or "baseline"; CpuIsaLevel() is the same as 2, 1 or 0 (the one
// choice for every vectorised kernel of the library).
const char* CpuIsa();
int CpuIsaLevel();

// C[m][n] += A[m][k] * B[k][n], all row-major float32 with row strides lda, ldb, ldc.
// Register-blocked: 4 rows x up to 4 vectors (64 columns with AVX-512) of accumulators.
void MatMulAccumulate(const float* a, int lda, const float* b, int ldb, float* c, int ldc,
                      int m, int k, int n);

// The same in float64 (plain loops: float64 exists for exact gradient checks, not for speed).
void MatMulAccumulate(const double* a, int lda, const double* b, int ldb, double* c, int ldc,
                      int m, int k, int n);

// C[m][n] = A[m][k] * B[k][n] (C is overwritten, not read).
void MatMul(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int m, int k, int n);
void MatMul(const double* a, int lda, const double* b, int ldb, double* c, int ldc, int m, int k,
            int n);

// C[m][n] = s[m] * C[m][n] + A^T[m][k] * B[k][n] with A stored as [k][m] (row stride lda): the
// product of a tile that is held transposed (e.g. the probabilities P^T of the fused attention)
// without copying it. c_row_scale (s, m values) rescales the rows of C as they are loaded (the
// online softmax's correction); null means 1. Same register blocking and dispatch as
// MatMulAccumulate.
void MatMulAccumulateTransposedA(const float* a, int lda, const float* b, int ldb, float* c, int ldc,
                                 int m, int k, int n, const float* c_row_scale = nullptr);
void MatMulAccumulateTransposedA(const double* a, int lda, const double* b, int ldb, double* c,
                                 int ldc, int m, int k, int n, const double* c_row_scale = nullptr);

// x[i] = exp(x[i]) for i < n; inputs below -87 (and -inf) give 0. Vectorised, ~2 ulp.
void ExpInPlace(float* x, int n);
void ExpInPlace(double* x, int n);

// x[r][c] = exp(x[r][c] - v[c]) and sums[c] += x[r][c] (rows added in order), for a rows x cols
// dense tile: the exponent and the row sum of the online softmax in one pass.
void ExpMinusColumnsSum(float* x, int rows, int cols, const float* v, float* sums);
void ExpMinusColumnsSum(double* x, int rows, int cols, const double* v, double* sums);

// Accumulation type of a storage type: float64 for double, float32 for everything else.
template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_CPU_MATH_H_
