// Validation of the block-sparse ops' inputs. Every failure is an InvalidArgument status whose
// message names the argument and the expected value.
#ifndef BSATTN_OPS_CC_KERNELS_INPUT_CHECKS_H_
#define BSATTN_OPS_CC_KERNELS_INPUT_CHECKS_H_

#include <cstdint>

#include "tensorflow/core/framework/tensor.h"

namespace bsattn {

// Block sizes the CPU kernels support: 8, 16, 32, 64, 128.
absl::Status CheckBlockSize(int64_t block_size, const char* name);

// A dense activation [B, T, H*D] with T a multiple of block_size and H*D a multiple of heads.
absl::Status CheckDense(const tensorflow::Tensor& t, const char* name, int64_t block_size,
                        int64_t heads);

// A block-sparse tensor [B, H, nnz, bs, bs] with a supported bs.
absl::Status CheckBlocks(const tensorflow::Tensor& w, const char* name);

// nt_lut [L, nnz, 2] with L in {1, heads} and every (Qb, Kb) inside [0, nQb) x [0, nKb).
absl::Status CheckNtLut(const tensorflow::Tensor& lut, int64_t heads, int64_t nnz, int64_t n_q_blocks,
                        int64_t n_k_blocks);

// A row table (nn_lut) or column table (tn_lut) [L, n_out + nnz, 2]: a header of n_out
// (offset, count) pairs then nnz (block id, partner block) pairs. Checks every header range and
// entry; on success *n_out_blocks = n_out.
absl::Status CheckRowLut(const tensorflow::Tensor& lut, const char* name, int64_t heads, int64_t nnz,
                         int64_t n_partner_blocks, int64_t* n_out_blocks);

// The fused op's packed in-block masks [P, bs, ceil(bs/32)] (P may be 0).
absl::Status CheckFusedMasks(const tensorflow::Tensor& masks, int64_t block_size);

// One of the fused op's per-head CSR tables: ptr [L, n_rows + 1] (L in {1, heads}; global offsets
// into entries) and entries [E, 2] = (partner block, mask id). Every pointer must be non-decreasing
// and within [0, E]; every partner in [0, n_partners) and strictly increasing along a row (sorted, no
// block twice); every mask id in [-1, n_masks) (-1 = a full block).
absl::Status CheckFusedTable(const tensorflow::Tensor& ptr, const tensorflow::Tensor& entries,
                             const char* ptr_name, const char* entries_name, int64_t heads,
                             int64_t n_rows, int64_t n_partners, int64_t n_masks);

// The same for the rows [row_begin, row_end) only (the shapes are checked in full): pointers
// row_begin..row_end and the entries of those rows. What a decoding step reads of a long table.
absl::Status CheckFusedTableRows(const tensorflow::Tensor& ptr, const tensorflow::Tensor& entries,
                                 const char* ptr_name, const char* entries_name, int64_t heads,
                                 int64_t n_rows, int64_t n_partners, int64_t n_masks, int64_t row_begin,
                                 int64_t row_end);

// The column table (col_ptr, col_entries) must list exactly the blocks of the row table, with the
// same mask ids, for every layout head. Both tables must have passed CheckFusedTable.
absl::Status CheckFusedTransposed(const tensorflow::Tensor& row_ptr,
                                  const tensorflow::Tensor& row_entries,
                                  const tensorflow::Tensor& col_ptr,
                                  const tensorflow::Tensor& col_entries);

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_INPUT_CHECKS_H_
