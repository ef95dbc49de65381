#include "ops/cc/kernels/blocksparse_checks.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "ops/cc/kernels/input_checks.h"

namespace bsattn {

using tensorflow::Tensor;

namespace {

// The layout's length of a dense input: name's length must be blocks * block_size.
absl::Status CheckLayoutLength(const Tensor& t, const char* name, int64_t blocks, int64_t block_size,
                               const char* blocks_attr) {
  if (t.dim_size(1) != blocks * block_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has length ", t.dim_size(1), " but the layout covers ", blocks * block_size,
                     " tokens (", blocks_attr, " = ", blocks, " blocks of ", block_size, ")"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckNtInputs(const Tensor& a, const Tensor& b, const Tensor& lut, int64_t heads,
                           int64_t block_size, int64_t q_blocks, int64_t k_blocks, NtDims* dims) {
  TF_RETURN_IF_ERROR(CheckBlockSize(block_size, "block_size"));
  TF_RETURN_IF_ERROR(CheckDense(a, "a", block_size, heads));
  TF_RETURN_IF_ERROR(CheckDense(b, "b", block_size, heads));
  TF_RETURN_IF_ERROR(CheckLayoutLength(a, "a", q_blocks, block_size, "q_blocks"));
  TF_RETURN_IF_ERROR(CheckLayoutLength(b, "b", k_blocks, block_size, "k_blocks"));
  if (a.dim_size(0) != b.dim_size(0) || a.dim_size(2) != b.dim_size(2)) {
    return absl::InvalidArgumentError(absl::StrCat("a and b must have the same batch and width, got ",
                                                   a.shape().DebugString(), " and ",
                                                   b.shape().DebugString()));
  }
  if (lut.dims() != 3) {
    return absl::InvalidArgumentError("nt_lut must have shape [L, blocks, 2], got " +
                                      lut.shape().DebugString());
  }
  const int64_t nnz = lut.dim_size(1);
  TF_RETURN_IF_ERROR(CheckNtLut(lut, heads, nnz, a.dim_size(1) / block_size, b.dim_size(1) / block_size));
  *dims = {a.dim_size(0), heads, nnz, block_size, a.dim_size(1), b.dim_size(1), a.dim_size(2),
           lut.dim_size(0)};
  return absl::OkStatus();
}

absl::Status CheckDsdInputs(const Tensor& w, const Tensor& b, const Tensor& lut, const char* lut_name,
                            int64_t partner_blocks, const char* partner_attr, DsdDims* dims) {
  TF_RETURN_IF_ERROR(CheckBlocks(w, "w"));
  const int64_t batch = w.dim_size(0), heads = w.dim_size(1), nnz = w.dim_size(2);
  const int64_t bs = w.dim_size(3);
  TF_RETURN_IF_ERROR(CheckDense(b, "b", bs, heads));
  if (b.dim_size(0) != batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("b batch ", b.dim_size(0), " does not match w batch ", batch));
  }
  TF_RETURN_IF_ERROR(CheckLayoutLength(b, "b", partner_blocks, bs, partner_attr));
  int64_t n_out = 0;
  TF_RETURN_IF_ERROR(CheckRowLut(lut, lut_name, heads, nnz, b.dim_size(1) / bs, &n_out));
  *dims = {batch, heads, nnz, bs, b.dim_size(1), b.dim_size(2), lut.dim_size(0), lut.dim_size(1), n_out};
  return absl::OkStatus();
}

absl::Status CheckSoftmaxInputs(const Tensor& x, const Tensor& scale, const Tensor& lut,
                                const Tensor* mask, const Tensor* key, bool autoregressive,
                                SoftmaxDims* dims) {
  if (scale.dims() != 0) {
    return absl::InvalidArgumentError("scale must be a scalar, got shape " + scale.shape().DebugString());
  }
  const float scale_value = scale.scalar<float>()();
  if (!std::isfinite(scale_value)) return absl::InvalidArgumentError("scale must be finite");
  TF_RETURN_IF_ERROR(CheckBlocks(x, mask ? "x" : "y"));
  const int64_t heads = x.dim_size(1), nnz = x.dim_size(2), bs = x.dim_size(3);
  int64_t n_rows = 0;
  // Key blocks are not bounded by the row table alone; the int32 range is the only limit here.
  TF_RETURN_IF_ERROR(CheckRowLut(lut, "nn_lut", heads, nnz, std::numeric_limits<int32_t>::max(), &n_rows));
  int64_t mask_heads = 0, key_value = 0;
  if (mask != nullptr) {
    const int64_t words = (bs + 31) / 32;
    if (mask->dims() != 4 || (mask->dim_size(0) != 1 && mask->dim_size(0) != heads) ||
        mask->dim_size(1) != nnz || mask->dim_size(2) != bs || mask->dim_size(3) != words) {
      return absl::InvalidArgumentError(absl::StrCat("mask must have shape [1 or ", heads, ", ", nnz,
                                                     ", ", bs, ", ", words, "], got ",
                                                     mask->shape().DebugString()));
    }
    mask_heads = mask->dim_size(0);
  }
  if (key != nullptr) {
    if (key->dims() != 0) {
      return absl::InvalidArgumentError("autoregress_at_key must be a scalar, got shape " +
                                        key->shape().DebugString());
    }
    key_value = key->scalar<int32_t>()();
    if (autoregressive && key_value < 0) {
      return absl::InvalidArgumentError(absl::StrCat("autoregress_at_key must be >= 0, got ", key_value));
    }
  }
  *dims = {x.dim_size(0), heads, nnz, bs, lut.dim_size(0), lut.dim_size(1), n_rows, mask_heads,
           key_value, scale_value};
  return absl::OkStatus();
}

}  // namespace bsattn
