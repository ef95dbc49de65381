// The CPU fused block-sparse attention: one parameter struct and the two entry points (forward,
// gradient). Validation, allocation and dtype conversion are the op's (fused_attention_ops.cc).
#ifndef BSATTN_OPS_CC_KERNELS_FUSED_ATTENTION_KERNELS_H_
#define BSATTN_OPS_CC_KERNELS_FUSED_ATTENTION_KERNELS_H_

#include <cstdint>

#include "ops/cc/kernels/cpu_math.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace bsattn {

// Everything a work unit reads. Activations are rows of `width` = H*D values (q, out) or `kv_width`
// = KVH*D values (k, v: query head h reads K/V head h / group, group = H / KVH), in the
// accumulation type Acc (float32, float64 for double): float32 and float64 inputs are used in
// place, float16 and bfloat16 ones are converted once per op call.
template <typename T>
struct FusedAttentionParams {
  using Acc = typename AccumulatorOf<T>::type;

  int64_t batch = 0, heads = 0, head_dim = 0, width = 0;
  int64_t kv_heads = 0, kv_width = 0, group = 1;  // KVH, KVH*D, H / KVH
  int64_t tq = 0, tk = 0, block_size = 0, n_q_blocks = 0, n_k_blocks = 0;
  // L > 0 (the op's strided_period; tq == tk == T, (T / L) % block_size == 0, no bias, not decode): the
  // tables, the dropout hash and the gradient's delta / lse_shift scratch address strided-permuted
  // positions p, which hold token (p % (T / L)) * L + p / (T / L) of q, k, v, out, lse, dq, dk, dv,
  // key_padding_mask and the segment ids (all in token order). The block_size positions of a block
  // are one residue class: tokens token(p0) + r * L (StridedToken). 0: positions are tokens.
  int64_t strided_period = 0;
  // The op's head_major: q, out, dout, dq are [B, H, Tq, D] and k, v, dk, dv (k_store, v_store) [B, KVH, Tk, D]
  // instead of the shapes below; HeadView addresses both.
  bool head_major = false;
  const Acc* q = nullptr;  // [B, Tq, H*D]
  const Acc* k = nullptr;  // [B, Tk, KVH*D]
  const Acc* v = nullptr;  // [B, Tk, KVH*D]

  // Tables (validated by the op). ptr rows are per layout head; layout 0 serves every head when
  // shared_layout.
  bool shared_layout = true;
  const int32_t* row_ptr = nullptr;      // [L, nQb + 1]
  const int32_t* row_entries = nullptr;  // [E, 2] (Kb, mask id)
  const int32_t* col_ptr = nullptr;      // [L, nKb + 1] (gradient only)
  const int32_t* col_entries = nullptr;  // [E, 2] (Qb, mask id)
  const uint32_t* masks = nullptr;       // [P, bs, words]
  int64_t n_masks = 0;
  int64_t mask_words = 1;

  const bool* key_padding_mask = nullptr;  // [B, Tk], true = kept; null = none
  const T* bias = nullptr;  // [bias_batch, bias_heads, Tq, Tk] (1 or B, 1 or H); null = none
  int64_t bias_batch = 0, bias_heads = 0;
  // Packed sequences (both or neither): query i attends key j only if their ids are equal. The
  // [min, max] id range of every block (SegmentRanges) lets whole blocks be skipped.
  const int32_t* q_segment_ids = nullptr;     // [B, Tq]; null = none
  const int32_t* k_segment_ids = nullptr;     // [B, Tk]
  const int32_t* q_block_segments = nullptr;  // [B, nQb, 2] (min, max)
  const int32_t* k_block_segments = nullptr;  // [B, nKb, 2]

  // Decoding (FusedDecodeForward): q's tq rows are the absolute positions [q_offset, q_offset + tq)
  // of tables with n_q_blocks rows; keys >= q_offset + tq are never read. The cache is read in its
  // storage dtype, tile by tile (k, v above stay null: no per-call conversion of the whole cache).
  int64_t q_offset = 0;
  const T* k_store = nullptr;  // [B, Tk, KVH*D]
  const T* v_store = nullptr;  // [B, Tk, KVH*D]

  Acc scale = 1;
  bool dropout = false;
  uint64_t dropout_key = 0;
  uint32_t dropout_threshold = 0;
  Acc dropout_scale = 1;  // 1 / (1 - rate): kept probabilities are scaled up
};

// The token of position t of a sequence of len tokens under strided_period (0: t itself); see
// FusedAttentionParams::strided_period.
inline int64_t StridedToken(int64_t t, int64_t len, int64_t period) {
  if (period == 0) return t;
  const int64_t block_tokens = len / period;  // tokens per residue class
  return (t % block_tokens) * period + t / block_tokens;
}

// The position of token t (the inverse of StridedToken): (t % L) * (len / L) + t / L.
inline int64_t StridedPosition(int64_t t, int64_t len, int64_t period) {
  if (period == 0) return t;
  return (t % period) * (len / period) + t / period;
}

// Where the rows of one head of an activation are: [B, len, heads*D] (channels [head*D, head*D + D) of each
// row), or [B, heads, len, D] with head_major. q, out, dq, dout: QueryView; k, v, dk, dv: KeyView, the K/V
// head that serves query head h. With strided_period L the rows of a block of positions t0.. are the tokens
// StridedToken(t0) + r * L: a block is its first token's row and a row stride of L rows.
struct HeadView {
  int64_t len, pitch, batch_stride, head_offset, period;  // pitch: elements between consecutive tokens' rows
  // The element offset of channel 0 of token `token` in batch entry b.
  int64_t TokenOffset(int64_t b, int64_t token) const { return b * batch_stride + head_offset + token * pitch; }
  // The element offset of channel 0 of position t0's token in batch entry b.
  int64_t Offset(int64_t b, int64_t t0) const { return TokenOffset(b, StridedToken(t0, len, period)); }
  // The elements between the rows of consecutive positions of a block.
  int64_t Stride() const { return period == 0 ? pitch : period * pitch; }
};

// Head `head` of `n_heads` of an activation of `len` tokens per batch entry.
template <typename T>
HeadView MakeHeadView(const FusedAttentionParams<T>& p, int64_t len, int64_t n_heads, int64_t head) {
  const int64_t d = p.head_dim;
  if (p.head_major) return {len, d, n_heads * len * d, head * len * d, p.strided_period};
  return {len, n_heads * d, len * n_heads * d, head * d, p.strided_period};
}

template <typename T>
HeadView QueryView(const FusedAttentionParams<T>& p, int64_t h) {
  return MakeHeadView(p, p.tq, p.heads, h);
}

template <typename T>
HeadView KeyView(const FusedAttentionParams<T>& p, int64_t h) {
  return MakeHeadView(p, p.tk, p.kv_heads, h / p.group);
}

// The [min, max] segment id of each block of positions of ids [B, len] (len = n_blocks * block_size;
// tokens of the positions as StridedToken(., len, period) says) into ranges [B, n_blocks, 2].
void SegmentRanges(tensorflow::OpKernelContext* ctx, const int32_t* ids, int64_t batch, int64_t n_blocks,
                   int64_t block_size, int64_t period, int32_t* ranges);

// Blocks (one (b, h, Qb, Kb) each) the forward [0] and the gradient [1] have computed since the
// library was loaded, counted per call: what the segment-id block skipping is tested with.
void FusedComputedBlocks(int64_t counts[2]);

// Adds `blocks` to the counter of pass 0 (forward) or 1 (gradient).
void CountComputedBlocks(int pass, int64_t blocks);

// out [B, Tq, H*D] and lse [B, H, Tq] from p. Work units are (batch, head, query-block row).
template <typename T>
void FusedAttentionForward(tensorflow::OpKernelContext* ctx, const FusedAttentionParams<T>& p,
                           T* out, typename AccumulatorOf<T>::type* lse);

// A decoding step: out [B, Tq, H*D] and lse [B, H, Tq] of the queries at [q_offset, q_offset + Tq)
// against the cache k_store, v_store. Work units are (batch, head, table row covering some of those
// queries); a unit computes only its rows' part of each active block whose keys start before
// q_offset + Tq, in its storage dtype tile by tile. Costs what the active blocks of those rows cost.
template <typename T>
void FusedDecodeForward(tensorflow::OpKernelContext* ctx, const FusedAttentionParams<T>& p, T* out,
                        typename AccumulatorOf<T>::type* lse);

// What the gradient reads besides the forward's inputs.
template <typename T>
struct FusedAttentionGradInputs {
  using Acc = typename AccumulatorOf<T>::type;
  const T* out = nullptr;   // [B, Tq, H*D], the forward's output
  const Acc* dout = nullptr;  // [B, Tq, H*D]
  const Acc* lse = nullptr;   // [B, H, Tq]
  const Acc* dlse = nullptr;  // [B, H, Tq] or null
};

// dq [B, Tq, H*D], dk, dv ([B, Tk, KVH*D], each summed over its group of query heads; fully written) and, when dbias is not null, dbias [bias_batch,
// bias_heads, Tq, Tk] accumulated into (the caller zeroes it). delta and lse_shift are [B, H, Tq] scratch
// (indexed by position: permuted with strided_period).
template <typename T>
void FusedAttentionGrad(tensorflow::OpKernelContext* ctx, const FusedAttentionParams<T>& p,
                        const FusedAttentionGradInputs<T>& in, typename AccumulatorOf<T>::type* delta,
                        typename AccumulatorOf<T>::type* lse_shift, T* dq, T* dk, T* dv,
                        typename AccumulatorOf<T>::type* dbias);

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_FUSED_ATTENTION_KERNELS_H_
