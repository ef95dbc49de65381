// Small dense float32 matrix kernels used by the CPU block-sparse ops.
#ifndef BSATTN_OPS_CC_KERNELS_CPU_GEMM_H_
#define BSATTN_OPS_CC_KERNELS_CPU_GEMM_H_

namespace bsattn {

// C[m][n] += A[m][k] * B[k][n], all row-major float32 with row strides lda, ldb, ldc.
// Register-blocked (4 rows x 32 columns) with runtime dispatch to AVX-512 / AVX2+FMA / baseline.
void MatMulAccumulate(const float* a, int lda, const float* b, int ldb, float* c, int ldc,
                      int m, int k, int n);

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_CPU_GEMM_H_
