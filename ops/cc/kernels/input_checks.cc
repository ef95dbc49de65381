#include "ops/cc/kernels/input_checks.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace bsattn {
namespace {

using tensorflow::Tensor;

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

// L must be 1 (one layout shared by all heads) or heads (one layout per head).
absl::Status CheckLutShape(const Tensor& lut, const char* name, int64_t heads) {
  if (lut.dims() != 3 || lut.dim_size(2) != 2) {
    return Invalid(absl::StrCat(name, " must have shape [L, n, 2], got ", lut.shape().DebugString()));
  }
  const int64_t lut_heads = lut.dim_size(0);
  if (lut_heads != 1 && lut_heads != heads) {
    return Invalid(absl::StrCat(name, " has ", lut_heads, " layouts; expected 1 (shared) or heads = ",
                                heads));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckBlockSize(int64_t block_size, const char* name) {
  if (block_size != 8 && block_size != 16 && block_size != 32 && block_size != 64 &&
      block_size != 128) {
    return Invalid(absl::StrCat(name, " = ", block_size, " is not a supported block size (8, 16, 32, 64, 128)"));
  }
  return absl::OkStatus();
}

absl::Status CheckDense(const Tensor& t, const char* name, int64_t block_size, int64_t heads) {
  if (t.dims() != 3) {
    return Invalid(absl::StrCat(name, " must be [batch, time, heads*head_dim], got shape ",
                                t.shape().DebugString()));
  }
  if (t.dim_size(1) % block_size != 0) {
    return Invalid(absl::StrCat(name, " length ", t.dim_size(1), " is not a multiple of block_size ",
                                block_size));
  }
  if (t.dim_size(2) % heads != 0) {
    return Invalid(absl::StrCat(name, " width ", t.dim_size(2), " is not divisible by heads ", heads));
  }
  return absl::OkStatus();
}

absl::Status CheckBlocks(const Tensor& w, const char* name) {
  if (w.dims() != 5 || w.dim_size(3) != w.dim_size(4)) {
    return Invalid(absl::StrCat(name, " must be [batch, heads, blocks, bs, bs], got shape ",
                                w.shape().DebugString()));
  }
  if (w.dim_size(1) < 1 || w.dim_size(2) < 1) {
    return Invalid(absl::StrCat(name, " needs at least one head and one block, got shape ",
                                w.shape().DebugString()));
  }
  return CheckBlockSize(w.dim_size(3), name);
}

absl::Status CheckNtLut(const Tensor& lut, int64_t heads, int64_t nnz, int64_t n_q_blocks,
                        int64_t n_k_blocks) {
  TF_RETURN_IF_ERROR(CheckLutShape(lut, "nt_lut", heads));
  if (nnz < 1) return Invalid("nt_lut is empty: the layout has no active block");
  if (lut.dim_size(1) != nnz) {
    return Invalid(absl::StrCat("nt_lut has ", lut.dim_size(1), " blocks; expected ", nnz));
  }
  const auto v = lut.tensor<int32_t, 3>();
  for (int64_t l = 0; l < lut.dim_size(0); ++l) {
    for (int64_t b = 0; b < nnz; ++b) {
      const int32_t qb = v(l, b, 0), kb = v(l, b, 1);
      if (qb < 0 || qb >= n_q_blocks || kb < 0 || kb >= n_k_blocks) {
        return Invalid(absl::StrCat("nt_lut[", l, ", ", b, "] = (", qb, ", ", kb,
                                    ") is outside the block grid [", n_q_blocks, ", ", n_k_blocks, "]"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckRowLut(const Tensor& lut, const char* name, int64_t heads, int64_t nnz,
                         int64_t n_partner_blocks, int64_t* n_out_blocks) {
  TF_RETURN_IF_ERROR(CheckLutShape(lut, name, heads));
  const int64_t length = lut.dim_size(1);
  const int64_t n_out = length - nnz;
  if (n_out < 1) {
    return Invalid(absl::StrCat(name, " has ", length, " entries; expected a header of at least one "
                                "block row plus ", nnz, " blocks"));
  }
  const auto v = lut.tensor<int32_t, 3>();
  for (int64_t l = 0; l < lut.dim_size(0); ++l) {
    for (int64_t r = 0; r < n_out; ++r) {
      const int64_t offset = v(l, r, 0), count = v(l, r, 1);
      if (offset < n_out || count < 0 || offset + count > length) {
        return Invalid(absl::StrCat(name, "[", l, ", ", r, "] = (", offset, ", ", count,
                                    ") is not a valid (offset, count) range of [", n_out, ", ", length,
                                    ")"));
      }
    }
    // Every block must sit in exactly one row: each output tile then has one writer, and no
    // block is left unwritten.
    std::vector<char> seen(nnz, 0);
    for (int64_t r = 0; r < n_out; ++r) {
      for (int64_t e = v(l, r, 0); e < v(l, r, 0) + v(l, r, 1); ++e) {
        const int32_t block = v(l, e, 0), partner = v(l, e, 1);
        if (block < 0 || block >= nnz || partner < 0 || partner >= n_partner_blocks) {
          return Invalid(absl::StrCat(name, "[", l, ", ", e, "] = (", block, ", ", partner,
                                      ") is out of range: block ids < ", nnz, ", partner blocks < ",
                                      n_partner_blocks));
        }
        if (seen[block]++) {
          return Invalid(absl::StrCat(name, " lists block ", block, " of layout ", l, " twice"));
        }
      }
    }
    for (int64_t block = 0; block < nnz; ++block) {
      if (!seen[block]) {
        return Invalid(absl::StrCat(name, " never lists block ", block, " of layout ", l));
      }
    }
  }
  *n_out_blocks = n_out;
  return absl::OkStatus();
}

}  // namespace bsattn
