// Whole-input validation of the unfused block-sparse ops, shared by their CPU kernels and GPU
// wrappers. Each function checks every input (shapes, tables, scalars) and returns the sizes the
// kernels need; failures are InvalidArgument statuses naming the argument.
#ifndef BSATTN_OPS_CC_KERNELS_BLOCKSPARSE_CHECKS_H_
#define BSATTN_OPS_CC_KERNELS_BLOCKSPARSE_CHECKS_H_

#include <cstdint>

#include "tensorflow/core/framework/tensor.h"

namespace bsattn {

// BsattnNt: a [B, Tq, H*D], b [B, Tk, H*D], nt_lut [L, nnz, 2]; Tq must be q_blocks * bs and Tk
// k_blocks * bs (the layout's lengths: a longer input is an error, never silently cut).
struct NtDims {
  int64_t batch, heads, nnz, block_size, a_len, b_len, width, lut_heads;
};
absl::Status CheckNtInputs(const tensorflow::Tensor& a, const tensorflow::Tensor& b,
                           const tensorflow::Tensor& lut, int64_t heads, int64_t block_size,
                           int64_t q_blocks, int64_t k_blocks, NtDims* dims);

// BsattnNn / BsattnTn: w [B, H, nnz, bs, bs], b [B, nP*bs, H*D], row table [L, n_out + nnz, 2];
// nP = partner_blocks (the attr partner_attr: k_blocks for Nn, q_blocks for Tn).
struct DsdDims {
  int64_t batch, heads, nnz, block_size, b_len, width, lut_heads, lut_len, n_out;
};
absl::Status CheckDsdInputs(const tensorflow::Tensor& w, const tensorflow::Tensor& b,
                            const tensorflow::Tensor& lut, const char* lut_name,
                            int64_t partner_blocks, const char* partner_attr, DsdDims* dims);

// BsattnMaskedSoftmax (mask and key given) and BsattnMaskedSoftmaxGrad (mask == key == nullptr):
// x or y [B, H, nnz, bs, bs], scale scalar, nn_lut [L, nQb + nnz, 2], mask [L, nnz, bs, W].
struct SoftmaxDims {
  int64_t batch, heads, nnz, block_size, lut_heads, lut_len, n_rows, mask_heads, key;
  float scale;
};
absl::Status CheckSoftmaxInputs(const tensorflow::Tensor& x, const tensorflow::Tensor& scale,
                                const tensorflow::Tensor& lut, const tensorflow::Tensor* mask,
                                const tensorflow::Tensor* key, bool autoregressive,
                                SoftmaxDims* dims);

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_BLOCKSPARSE_CHECKS_H_
