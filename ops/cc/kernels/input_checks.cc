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

absl::Status CheckFusedMasks(const Tensor& masks, int64_t block_size) {
  const int64_t words = (block_size + 31) / 32;
  if (masks.dims() != 3 || masks.dim_size(1) != block_size || masks.dim_size(2) != words) {
    return Invalid(absl::StrCat("masks must have shape [P, ", block_size, ", ", words, "], got ",
                                masks.shape().DebugString()));
  }
  return absl::OkStatus();
}

absl::Status CheckFusedTable(const Tensor& ptr, const Tensor& entries, const char* ptr_name,
                             const char* entries_name, int64_t heads, int64_t n_rows,
                             int64_t n_partners, int64_t n_masks) {
  return CheckFusedTableRows(ptr, entries, ptr_name, entries_name, heads, n_rows, n_partners, n_masks, 0, n_rows);
}

absl::Status CheckFusedTableRows(const Tensor& ptr, const Tensor& entries, const char* ptr_name,
                                 const char* entries_name, int64_t heads, int64_t n_rows,
                                 int64_t n_partners, int64_t n_masks, int64_t row_begin, int64_t row_end) {
  if (ptr.dims() != 2 || ptr.dim_size(1) != n_rows + 1) {
    return Invalid(absl::StrCat(ptr_name, " must have shape [L, ", n_rows + 1, "], got ",
                                ptr.shape().DebugString()));
  }
  if (ptr.dim_size(0) != 1 && ptr.dim_size(0) != heads) {
    return Invalid(absl::StrCat(ptr_name, " has ", ptr.dim_size(0),
                                " layouts; expected 1 (shared) or heads = ", heads));
  }
  if (entries.dims() != 2 || entries.dim_size(1) != 2) {
    return Invalid(absl::StrCat(entries_name, " must have shape [E, 2], got ",
                                entries.shape().DebugString()));
  }
  const int64_t n_entries = entries.dim_size(0);
  const auto p = ptr.matrix<int32_t>();
  const auto e = entries.matrix<int32_t>();
  for (int64_t l = 0; l < ptr.dim_size(0); ++l) {
    for (int64_t r = row_begin; r <= row_end; ++r) {
      const int64_t at = p(l, r);
      if (at < 0 || at > n_entries || (r > row_begin && at < p(l, r - 1))) {
        return Invalid(absl::StrCat(ptr_name, "[", l, ", ", r, "] = ", at,
                                    " breaks the row pointers: they must be non-decreasing within [0, ",
                                    n_entries, "]"));
      }
    }
    for (int64_t r = row_begin; r < row_end; ++r) {
      for (int64_t i = p(l, r); i < p(l, r + 1); ++i) {
        const int32_t partner = e(i, 0), mask_id = e(i, 1);
        if (partner < 0 || partner >= n_partners || (i > p(l, r) && partner <= e(i - 1, 0))) {
          return Invalid(absl::StrCat(entries_name, "[", i, "] = (", partner, ", ", mask_id,
                                      ") in layout ", l, ", row ", r, ": blocks must be in [0, ",
                                      n_partners, ") and strictly increasing along a row"));
        }
        if (mask_id < -1 || mask_id >= n_masks) {
          return Invalid(absl::StrCat(entries_name, "[", i, "] = (", partner, ", ", mask_id,
                                      "): mask id must be -1 (full block) or in [0, ", n_masks, ")"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CheckFusedTransposed(const Tensor& row_ptr, const Tensor& row_entries,
                                  const Tensor& col_ptr, const Tensor& col_entries) {
  if (row_ptr.dim_size(0) != col_ptr.dim_size(0)) {
    return Invalid(absl::StrCat("col_ptr has ", col_ptr.dim_size(0), " layouts but row_ptr has ",
                                row_ptr.dim_size(0)));
  }
  const int64_t n_rows = row_ptr.dim_size(1) - 1, n_cols = col_ptr.dim_size(1) - 1;
  const auto rp = row_ptr.matrix<int32_t>();
  const auto re = row_entries.matrix<int32_t>();
  const auto cp = col_ptr.matrix<int32_t>();
  const auto ce = col_entries.matrix<int32_t>();
  std::vector<int64_t> cursor(n_cols);
  for (int64_t l = 0; l < row_ptr.dim_size(0); ++l) {
    // Rows are visited in increasing order and each column lists its rows in increasing order, so
    // the k-th block met in column c must be column c's k-th entry.
    for (int64_t c = 0; c < n_cols; ++c) cursor[c] = cp(l, c);
    for (int64_t r = 0; r < n_rows; ++r) {
      for (int64_t i = rp(l, r); i < rp(l, r + 1); ++i) {
        const int32_t c = re(i, 0);
        const int64_t at = cursor[c]++;
        if (at >= cp(l, c + 1) || ce(at, 0) != r || ce(at, 1) != re(i, 1)) {
          return Invalid(absl::StrCat("col_entries do not match row_entries: block (", r, ", ", c,
                                      ") with mask id ", re(i, 1), " of layout ", l,
                                      " is missing from column ", c));
        }
      }
    }
    for (int64_t c = 0; c < n_cols; ++c) {
      if (cursor[c] != cp(l, c + 1)) {
        return Invalid(absl::StrCat("col_entries do not match row_entries: column ", c, " of layout ",
                                    l, " lists ", cp(l, c + 1) - cp(l, c), " blocks, the rows ",
                                    cursor[c] - cp(l, c)));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace bsattn
