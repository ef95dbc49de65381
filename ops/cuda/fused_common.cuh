// What every fused-attention kernel reads (FusedParams, built once per launch from the C ABI's
// bsattn_fused_args) and the per-entry rules they share: masking, bias, dropout.
//
// The masking rule (as in the CPU kernels): masked entries are never read into a result. Their
// scores are -inf by select (ScaledScore), their dP is taken as 0, and no product reads a K or V
// value of a masked entry: the SIMT kernels skip masked keys, the tensor-core kernels run the
// product with the non-finite values of a streamed tile zeroed (a per-step flag; full tiles pay only
// the check) and add the kept entries' products of those values one by one. An attended NaN score
// makes its row NaN (lse too), as dense attention does.
#ifndef BSATTN_OPS_CUDA_FUSED_COMMON_CUH_
#define BSATTN_OPS_CUDA_FUSED_COMMON_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/bsattn_cuda.h"
#include "ops/cuda/cuda_common.cuh"
#include "ops/cuda/dropout_hash.h"

namespace bsattn_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Where the rows of an activation tensor are (bsattn_fused_args.head_major): token t of head `head` of batch
// entry b starts at element b * batch_stride + head * head_stride + t * pitch (ActivationIndex). For
// [B, T, heads * D] (token-major, the default) the strides are (T * heads * D, D, heads * D); for
// [B, heads, T, D] (head-major) (heads * T * D, T * D, D). Queries (q, out, dout, dq and the float32 dQ
// accumulator) use T = Tq and the H query heads, keys (k, v, dk, dv) Tk and the KVH K/V heads.
struct ActivationLayout {
  int64_t batch_stride = 0, head_stride = 0, pitch = 0;
};

__host__ __device__ __forceinline__ int64_t ActivationIndex(const ActivationLayout& l, int64_t b, int64_t head,
                                                            int64_t t) {
  return b * l.batch_stride + head * l.head_stride + t * l.pitch;
}

struct FusedParams {
  int dtype = 0;
  int64_t batch = 0, heads = 0, head_dim = 0, width = 0, tq = 0, tk = 0;
  int64_t kv_heads = 0, kv_width = 0, group = 1;  // K/V heads, their channels KVH*D, H / KVH
  int64_t bs = 0, n_qb = 0, n_kb = 0;
  const void* q = nullptr;  // [B, Tq, H*D] or head-major [B, H, Tq, D] (q_layout)
  const void* k = nullptr;  // [B, Tk, KVH*D] or [B, KVH, Tk, D] (kv_layout): query head h reads K/V head h / group
  const void* v = nullptr;  // as k
  ActivationLayout q_layout, kv_layout;  // q, out, dout, dq (and dq_acc); k, v, dk, dv
  bool shared_layout = true;  // one layout (L = 1) serves every head
  const int32_t* row_ptr = nullptr;
  const int32_t* row_entries = nullptr;
  const int32_t* col_ptr = nullptr;
  const int32_t* col_entries = nullptr;
  const uint32_t* masks = nullptr;  // [P, bs, mask_words]
  int mask_words = 1;
  const uint8_t* key_padding_mask = nullptr;  // [B, Tk], nonzero = real key; null = none
  const void* bias = nullptr;                 // [bias_batch, bias_heads, Tq, Tk]; null = none
  int64_t bias_batch = 0, bias_heads = 0;     // 1 (broadcast) or B, 1 or H
  const int32_t* q_segment_ids = nullptr;     // [B, Tq] or null (then k_segment_ids is null too)
  const int32_t* k_segment_ids = nullptr;     // [B, Tk]
  float scale = 1.0f;
  bool dropout = false;
  uint64_t dropout_key = 0;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.0f;  // 1 / (1 - rate)
  // Decoding (bsattn_fused_args.decode): q, out, lse, the bias rows and q_segment_ids have tq rows, the
  // queries at absolute rows [q_offset, q_offset + tq); the tables have n_qb = T_max / bs rows, of which
  // the forward's CTAs cover [row0, row0 + n_rows); keys >= key_end = q_offset + tq are never read.
  // Without decoding: q_offset 0, row0 0, n_rows n_qb, key_end tk, hash_tq tq.
  bool decode = false;
  int64_t q_offset = 0, row0 = 0, n_rows = 0, key_end = 0;
  int64_t hash_tq = 0;  // the dropout counter's query length: the full op's (T_max when decoding)
  // Decoding on tensor cores, split over the keys (FlashDecoding): n_split CTAs per table row take
  // consecutive parts of its entries and write unnormalised partial rows, merged by their (m, l):
  // split_out [n_split, B*H*tq, D] and split_ml [n_split, B*H*tq, 2] float32 (m in log2 units).
  int n_split = 1;
  float* split_out = nullptr;
  float* split_ml = nullptr;
  // Strided (bsattn_fused_args.strided_period = L > 0): the tables address permuted positions p, whose
  // token (row of q, k, v, out, lse, delta, dq, dk, dv, key padding, segment ids) is Token(p). A block's
  // positions p0..p0+bs-1 lie in one residue class (class_len % bs == 0): its rows are Token(p0) + r * row_step.
  // Positions still index the tables, the in-block masks and the dropout hash. Without: row_step 1 (Token is
  // the identity; every row stride below is multiplied by 1).
  int64_t row_step = 1;   // L, or 1
  int64_t class_len = 0;  // T / L (tokens per residue class); unused when row_step is 1
  // Elements between a block's consecutive rows: q_layout.pitch * row_step in q, out, dout, dq;
  // kv_layout.pitch * row_step in k, v, dk, dv (fields, not kernel locals: read from the parameter bank,
  // they hold no registers).
  int64_t q_row_stride = 0, kv_row_stride = 0;
};

// The token of permuted position pos: (pos % (T / L)) * L + pos / (T / L), or pos without strided_period.
// For pos = p0 + r inside a block starting at p0, Token(pos) = Token(p0) + r * row_step. 32-bit division
// (T < 2^31: MakeParams): a 64-bit one is a called subroutine, whose calling convention costs the tight
// tensor-core kernels registers even on the unstrided path.
__host__ __device__ __forceinline__ int64_t Token(const FusedParams& p, int64_t pos) {
  if (p.row_step == 1) return pos;
  const uint32_t x = static_cast<uint32_t>(pos), n = static_cast<uint32_t>(p.class_len);
  return int64_t{x % n} * p.row_step + x / n;
}

// The absolute query rows [x, y) of table row qb that q holds: the whole block, or when decoding its
// part inside [q_offset, q_offset + tq).
__host__ __device__ __forceinline__ int2 QueryRows(const FusedParams& p, int64_t qb) {
  const int64_t lo = qb * p.bs, hi = lo + p.bs, end = p.q_offset + p.tq;
  return make_int2(static_cast<int>(lo > p.q_offset ? lo : p.q_offset), static_cast<int>(hi < end ? hi : end));
}

// The number of keys of key block kb that may be read: bs, or when decoding those before key_end.
__host__ __device__ __forceinline__ int64_t BlockKeys(const FusedParams& p, int64_t kb) {
  const int64_t n = p.key_end - kb * p.bs;
  return n < p.bs ? (n > 0 ? n : 0) : p.bs;
}

// The row (or column) range of head h in a per-head CSR table with n rows.
__device__ __forceinline__ int2 TableRange(const int32_t* ptr, bool shared, int64_t h, int64_t n,
                                           int64_t index) {
  const int32_t* row = ptr + (shared ? 0 : h) * (n + 1);
  return make_int2(row[index], row[index + 1]);
}

// The keep-bit words of query row `bi` of partial block mask `mask_id` (null for a full block).
__device__ __forceinline__ const uint32_t* MaskRow(const FusedParams& p, int32_t mask_id, int64_t bi) {
  return mask_id < 0 ? nullptr : p.masks + (int64_t{mask_id} * p.bs + bi) * p.mask_words;
}

// The index of bias (and dbias) entry (i, j) of head (b, h).
__device__ __forceinline__ int64_t BiasIndex(const FusedParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t bb = p.bias_batch == 1 ? 0 : b, hb = p.bias_heads == 1 ? 0 : h;
  return ((bb * p.bias_heads + hb) * p.tq + i) * p.tk + j;
}

// The element of token t of query head h of batch entry b in q, out, dout, dq (and the float32 dQ accumulator).
__host__ __device__ __forceinline__ int64_t QueryIndex(const FusedParams& p, int64_t b, int64_t h, int64_t t) {
  return ActivationIndex(p.q_layout, b, h, t);
}

// The element of token t of K/V head kvh of batch entry b in k, v, dk, dv (query head h reads kvh = h / group).
__host__ __device__ __forceinline__ int64_t KeyIndex(const FusedParams& p, int64_t b, int64_t kvh, int64_t t) {
  return ActivationIndex(p.kv_layout, b, kvh, t);
}

// The gradient's CTA groups over (b, h): the smallest sets of heads closed under "writes the same
// dK/dV" (one K/V head (b, h / group)) and, with dbias, "writes the same dbias slice"; a CTA walks
// the members of its group in turn so that every dK/dV/dbias entry has one writer. Groups are
// n_batch x n_heads: n_batch = 1 when the dbias broadcasts over the batch, else B; n_heads = 1
// when it broadcasts over the heads, else KVH. Without grouping (KVH = H) a group is one head, or
// one dbias slice (bb, hb) and the heads that read it.
__host__ __device__ __forceinline__ int64_t GradGroupBatches(const FusedParams& p, bool with_dbias) {
  return with_dbias && p.bias_batch == 1 ? 1 : p.batch;
}
__host__ __device__ __forceinline__ int64_t GradGroupHeads(const FusedParams& p, bool with_dbias) {
  return with_dbias && p.bias_heads == 1 ? 1 : p.kv_heads;
}
__host__ __device__ __forceinline__ int64_t GradGroups(const FusedParams& p, bool with_dbias) {
  return GradGroupBatches(p, with_dbias) * GradGroupHeads(p, with_dbias);
}

// The head b * H + h of member `member` (of batch * heads / GradGroups) of group `group`: batch-major,
// the members of one K/V head consecutive.
__host__ __device__ __forceinline__ int64_t GroupMember(const FusedParams& p, bool with_dbias, int64_t group,
                                                        int64_t member) {
  const int64_t n_batch = GradGroupBatches(p, with_dbias), n_heads = GradGroupHeads(p, with_dbias);
  const int64_t heads_per_batch = p.heads / n_heads;
  const int64_t b = n_batch == 1 ? member / heads_per_batch : group / n_heads;
  const int64_t h = (n_heads == 1 ? 0 : (group % n_heads) * p.group) + member % heads_per_batch;
  return b * p.heads + h;
}

// The K/V head (b * KVH + h / group) that member `member` of group `group` reads.
__host__ __device__ __forceinline__ int64_t MemberKvHead(const FusedParams& p, bool with_dbias, int64_t group,
                                                         int64_t member) {
  const int64_t bh = GroupMember(p, with_dbias, group, member);
  return (bh / p.heads) * p.kv_heads + (bh % p.heads) / p.group;
}

// The [min, max] of the n segment ids at ids[0], ids[stride], ..., to every lane of the warp.
__device__ __forceinline__ int2 WarpIdRange(const int32_t* ids, int64_t n, int64_t stride, int lane) {
  int lo = 0x7fffffff, hi = -0x7fffffff - 1;
  for (int64_t i = lane; i < n; i += 32) {
    lo = min(lo, ids[i * stride]);
    hi = max(hi, ids[i * stride]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  return make_int2(lo, hi);
}

// The [min, max] segment id of query block qb (its rows in q: QueryRows) and of key block kb (its
// readable keys: BlockKeys) of batch entry b, to every lane (the blocks' tokens: strided, row_step apart).
__device__ __forceinline__ int2 QueryBlockIds(const FusedParams& p, int64_t b, int64_t qb, int lane) {
  const int2 rows = QueryRows(p, qb);
  return WarpIdRange(p.q_segment_ids + b * p.tq + Token(p, rows.x) - p.q_offset, rows.y - rows.x, p.row_step, lane);
}
__device__ __forceinline__ int2 KeyBlockIds(const FusedParams& p, int64_t b, int64_t kb, int lane) {
  return WarpIdRange(p.k_segment_ids + b * p.tk + Token(p, kb * p.bs), BlockKeys(p, kb), p.row_step, lane);
}

// Whether two blocks' id ranges overlap (their segments can meet); a block whose segments cannot
// meet is skipped: no loads, no products.
__host__ __device__ __forceinline__ bool RangesMeet(int2 a, int2 b) { return a.x <= b.y && b.x <= a.y; }

// What entry (query i, key j) of head (b, h) adds to its scaled score, in natural units: -inf
// when the in-block mask (mask_row, key bj of the block), the key padding or different segment ids
// drop it, else the bias (0 without one). i is q's row (when decoding: the absolute row - q_offset;
// a row outside q, or a key >= key_end, is -inf and reads nothing); i and j are tokens (Token: with
// strided_period not the positions, which only the mask row, bj and the dropout hash see; no bias then).
template <typename T>
__device__ __forceinline__ float ScoreOffset(const FusedParams& p, int64_t b, int64_t h, int64_t i,
                                             int64_t j, const uint32_t* mask_row, int bj) {
  if (p.decode && (j >= p.key_end || i < 0 || i >= p.tq)) return -INFINITY;
  if (mask_row != nullptr && !((mask_row[bj >> 5] >> (bj & 31)) & 1u)) return -INFINITY;
  if (p.key_padding_mask != nullptr && p.key_padding_mask[b * p.tk + j] == 0) return -INFINITY;
  if (p.q_segment_ids != nullptr && p.q_segment_ids[b * p.tq + i] != p.k_segment_ids[b * p.tk + j]) return -INFINITY;
  if (p.bias == nullptr) return 0.0f;
  return ToFloat(static_cast<const T*>(p.bias)[BiasIndex(p, b, h, i, j)]);
}

// The scaled score of an entry from its raw score s = q.k and ScoreOffset: -inf for a masked entry
// by select, so that a NaN score there (NaN/Inf in k at a padded or masked key) stays out.
__device__ __forceinline__ float ScaledScore(float s, float scale, float offset) {
  return offset == -INFINITY ? -INFINITY : s * scale + offset;
}

// The dropout factor of entry (i, j) of head (b, h): 1 / (1 - rate) if kept, else 0. i is the
// absolute query row (decoding: that of the full op, whose length is hash_tq); i and j are positions
// (strided_period: the permuted ones, so that the mask equals the transposed op's).
__device__ __forceinline__ float DropoutFactor(const FusedParams& p, int64_t b, int64_t h, int64_t i,
                                               int64_t j) {
  const uint64_t counter = static_cast<uint64_t>(((b * p.heads + h) * p.hash_tq + i) * p.tk + j);
  return bsattn::DropoutKeep(p.dropout_key, counter, p.dropout_threshold) ? p.dropout_scale : 0.0f;
}

// Tensor-core forward (fused_attention_mma.cu). Returns false, launching nothing, when the case
// is not one it handles (dtype, block size, head dim, alignment); the SIMT kernel runs instead.
bool LaunchForwardMma(const FusedParams& p, void* out, float* lse, cudaStream_t stream);

// The tensor-core backward's buffers: dbias (or null) is the float32 accumulator; dq_acc a float32
// buffer of dq's layout (q_layout) for the atomic dQ (unused when deterministic); seg_ranges the per-block
// segment-id ranges [B, nQb] then [B, nKb] (min, max), or null without segment ids.
struct GradMmaBuffers {
  const void* out = nullptr;
  const void* dout = nullptr;
  const float* lse = nullptr;
  const float* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dbias = nullptr;
  float* dq_acc = nullptr;
  const int2* seg_ranges = nullptr;
  bool deterministic = false;
};

// Tensor-core backward (fused_attention_mma_grad.cu), after delta = rowsum(dout * out) - dlse is
// in place. Returns false, launching nothing, when the case is not one it handles; the SIMT
// kernels run instead.
bool LaunchGradMma(const FusedParams& p, const GradMmaBuffers& g, cudaStream_t stream);

}  // namespace bsattn_cuda

#endif  // BSATTN_OPS_CUDA_FUSED_COMMON_CUH_
