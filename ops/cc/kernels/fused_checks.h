// Whole-input validation of the fused attention ops, shared by the CPU kernels and the GPU
// wrappers: attributes, then every input (shapes, table contents, scalars). Failures are
// InvalidArgument statuses naming the argument. Tables and seed must be in host memory.
#ifndef BSATTN_OPS_CC_KERNELS_FUSED_CHECKS_H_
#define BSATTN_OPS_CC_KERNELS_FUSED_CHECKS_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace bsattn {

// The attributes of BsattnFusedAttention and BsattnFusedAttentionGrad (has_dlse: gradient only).
struct FusedAttrs {
  int64_t heads = 0;
  int64_t kv_heads = 0;  // the attr; 0 = heads
  bool has_segment_ids = false;
  int64_t block_size = 0;
  float scale = 1.0f;
  float dropout_rate = 0.0f;
  bool has_key_padding_mask = false;
  bool has_bias = false;
  bool has_dlse = false;
  bool gradient = false;  // BsattnFusedAttentionGrad (no decode attr, no q_offset input)
  bool decode = false;    // the forward's decode attr (KV-cache decoding)
  // L > 0: the tables address strided-permuted positions p; row p of the op is token
  // (p % (T / L)) * L + p / (T / L) of q, k, v, out, lse, key padding and segment ids.
  int64_t strided_period = 0;
  // q, out [B, H, Tq, D] and k, v [B, KVH, Tk, D] (their gradients too) instead of [B, T, heads * D].
  bool head_major = false;
};
absl::Status ParseFusedAttrs(tensorflow::OpKernelConstruction* ctx, bool gradient, FusedAttrs* attrs);

// What the inputs say: sizes, and which layout / bias heads there are.
struct FusedDims {
  int64_t batch = 0, heads = 0, head_dim = 0, width = 0, tq = 0, tk = 0;
  int64_t kv_heads = 0, kv_width = 0;  // K/V heads (dividing heads) and k's width kv_heads * head_dim
  int64_t block_size = 0, n_q_blocks = 0, n_k_blocks = 0;
  int64_t layout_heads = 1;  // 1 (one layout for every head) or heads
  int64_t n_masks = 0, mask_words = 1;
  int64_t bias_batch = 0, bias_heads = 0;  // bias [1 or B, 1 or H, Tq, Tk]; 0 without a bias
  int64_t seed = 0;
  // Decoding (attrs.decode): q's rows are the absolute positions [q_offset, q_offset + tq); the
  // table rows covering them are [decode_rows[0], decode_rows[1]) ([0, 0) when tq = 0).
  int64_t q_offset = 0;
  int64_t decode_rows[2] = {0, 0};
};

// The forward's inputs q, k, v, row_ptr, row_entries, masks, key_padding_mask, bias,
// q_segment_ids, k_segment_ids, seed (the gradient has them too, under the same names) and
// q_offset (forward only). With decode, q's length is any Tq, the number of table rows nQb comes
// from row_ptr, 0 <= q_offset, q_offset + Tq <= nQb * bs and <= Tk, and only the table rows
// covering [q_offset, q_offset + Tq) are checked (a step reads no other row).
absl::Status CheckFusedInputs(tensorflow::OpKernelContext* ctx, const FusedAttrs& attrs, FusedDims* dims);

// The gradient's further inputs: out, lse, dout, dlse (when has_dlse) and the column table, which
// must be the row table transposed.
absl::Status CheckFusedGradInputs(tensorflow::OpKernelContext* ctx, const FusedAttrs& attrs,
                                  const FusedDims& dims);

// The op's input `name`, once CheckFusedInputs / CheckFusedGradInputs have looked it up.
const tensorflow::Tensor& FusedInput(tensorflow::OpKernelContext* ctx, const char* name);

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_FUSED_CHECKS_H_
