// Dense float32 math kernels (small matmuls, vectorised exp) used by the CPU block-sparse ops.
#ifndef BSATTN_OPS_CC_KERNELS_CPU_MATH_H_
#define BSATTN_OPS_CC_KERNELS_CPU_MATH_H_

namespace bsattn {

// C[m][n] += A[m][k] * B[k][n], all row-major float32 with row strides lda, ldb, ldc.
// Register-blocked (4 rows x 32 columns) with runtime dispatch to AVX-512 / AVX2+FMA / baseline.
void MatMulAccumulate(const float* a, int lda, const float* b, int ldb, float* c, int ldc,
                      int m, int k, int n);

// The same in float64 (plain loops: float64 exists for exact gradient checks, not for speed).
void MatMulAccumulate(const double* a, int lda, const double* b, int ldb, double* c, int ldc,
                      int m, int k, int n);

// x[i] = exp(x[i]) for i < n; inputs below -87 (and -inf) give 0. Vectorised, ~2 ulp.
void ExpInPlace(float* x, int n);
void ExpInPlace(double* x, int n);

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
