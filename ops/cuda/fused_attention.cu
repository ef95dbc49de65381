// The fused block-sparse attention on the GPU: the launchers of bsattn_cuda.h and the SIMT
// kernels that serve every dtype, block size (8..128) and head dim (<= 256). float16/bfloat16
// cases with tensor-core shapes go to fused_attention_mma.cu (forward) and
// fused_attention_mma_grad.cu (backward) instead.
//
// Decoding (args->decode, forward only): the forward's CTAs cover the table rows of q's queries
// [q_offset, q_offset + tq) only, rows outside q are neither read nor written, and keys >= q_offset + tq
// are never read (FusedParams).
//
// SIMT layout: a CTA holds `rows` = min(bs, 16) rows of one block (one warp per row) and streams
// the blocks of the row's table entry by entry, 32 keys (or queries) at a time through shared
// memory, in float32:
//   forward   a lane scores one key of the chunk; online softmax across the warp; each lane
//             accumulates the output at head dims lane, lane + 32, ...
//   dQ        rows are query rows (row table): dS of the chunk's keys, dQ += dS K
//   dK, dV    rows are key rows (column table): dS of the chunk's queries, dV += (P*Z)^T dO,
//             dK += dS^T Q; dbias entries are added by the one lane that owns them.
// Every output element has exactly one writer: no atomics, the same bits on every run.
// Grouped-query attention: K/V rows are KVH*D wide and query head h reads K/V head h / group; a
// dK/dV CTA walks every query head of its K/V head (and dbias slice) in turn, summing in registers.
// Segment ids: every warp computes the [min, max] ids of the query and key blocks (the same
// values, so the decision is CTA-uniform) and skips a block whose ranges do not overlap.
// strided_period (FusedParams::row_step): a block's rows are the tokens Token(p0) + r * row_step; the
// chunk loads, the row loads and stores, lse/delta and the per-entry rules (ScoreOffset) use those
// tokens, the tables, in-block masks and the dropout hash the positions.
// head_major: every q/out/dout/dq and k/v/dk/dv address comes from QueryIndex / KeyIndex (FusedParams'
// ActivationLayout), so [B, H, T, D] activations only change addresses, never the order of a sum.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "ops/cuda/bsattn_cuda.h"
#include "ops/cuda/cuda_common.cuh"
#include "ops/cuda/dropout_hash.h"
#include "ops/cuda/fused_common.cuh"

namespace bsattn_cuda {
namespace {

constexpr int kChunk = 32;      // keys (forward, dQ) or queries (dK/dV) staged per step
constexpr int kMaxRows = 16;    // warps per CTA
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float WarpMax(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

__device__ __forceinline__ float Dot(const float* a, const float* b, int n) {
  float s = 0.0f;
#pragma unroll 8
  for (int d = 0; d < n; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

// Where one head's rows are: token t of the head at element base + t * pitch (fused_common.cuh's
// ActivationLayout). Queries (q, out, dout, dq): query head h; keys (k, v, dk, dv): K/V head h / group.
struct HeadView {
  int64_t base, pitch;
};
__device__ __forceinline__ HeadView QueryView(const FusedParams& p, int64_t b, int64_t h) {
  return {QueryIndex(p, b, h, 0), p.q_layout.pitch};
}
__device__ __forceinline__ HeadView KeyView(const FusedParams& p, int64_t b, int64_t h) {
  return {KeyIndex(p, b, h / p.group, 0), p.kv_layout.pitch};
}

// Row t of head view `at` of x as float into dst[0, D).
template <typename T>
__device__ __forceinline__ void LoadRow(const FusedParams& p, const void* x, HeadView at, int64_t t, float* dst,
                                        int lane) {
  const T* src = static_cast<const T*>(x) + at.base + t * at.pitch;
  for (int d = lane; d < p.head_dim; d += 32) dst[d] = ToFloat(src[d]);
}

// Rows t0, t0 + row_step, ... (n rows: the tokens of n consecutive positions of one block) of head view
// `at` of x (and of y when not null) into dst rows `ld` floats apart.
template <typename T>
__device__ __forceinline__ void LoadChunk(const FusedParams& p, const void* x, const void* y, HeadView at,
                                          int64_t t0, int n, float* x_dst, float* y_dst, int ld) {
  const int D = static_cast<int>(p.head_dim);
  for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t at_ = at.base + (t0 + r * p.row_step) * at.pitch + d;
    x_dst[r * ld + d] = ToFloat(static_cast<const T*>(x)[at_]);
    if (y != nullptr) y_dst[r * ld + d] = ToFloat(static_cast<const T*>(y)[at_]);
  }
}

template <typename T, int DC>
__device__ __forceinline__ void StoreRow(const FusedParams& p, const float (&acc)[DC], float scale, void* y,
                                         HeadView at, int64_t t, int lane) {
  T* dst = static_cast<T*>(y) + at.base + t * at.pitch;
#pragma unroll
  for (int c = 0; c < DC; ++c) {
    const int d = lane + 32 * c;
    if (d < p.head_dim) dst[d] = FromFloat<T>(acc[c] * scale);
  }
}

// acc[c] += sum over chunk entries jj < n that bit jj of `kept` keeps of w_jj * rows[jj][lane + 32c],
// with w_jj held by lane jj (the rows of masked entries are never read).
template <int DC>
__device__ __forceinline__ void AccumulateRows(float (&acc)[DC], float w, const float* rows, int ld,
                                               int n, int D, int lane, unsigned kept = kFull) {
  for (int jj = 0; jj < n; ++jj) {
    const float wj = __shfl_sync(kFull, w, jj);
    if (!((kept >> jj) & 1u)) continue;  // uniform across the warp
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + 32 * c;
      if (d < D) acc[c] = fmaf(wj, rows[jj * ld + d], acc[c]);
    }
  }
}

// Grid (n_rows * bs / rows, H, B), rows warps; CTA x covers table row row0 + x / (bs / rows).
// Shared: q [rows][D], k [32][D+1], v [32][D]. Decoding: a warp whose row is outside q computes
// nothing (it joins the barriers), a row's walk stops at the first block at or past key_end and
// only the keys before key_end are staged.
template <typename T, int DC>
__global__ void __launch_bounds__(32 * kMaxRows) ForwardSimt(FusedParams p, T* out, float* lse) {
  extern __shared__ float smem[];
  const int rows = blockDim.x / 32, D = static_cast<int>(p.head_dim), kc = p.bs < kChunk ? static_cast<int>(p.bs) : kChunk;
  float* qs = smem;
  float* ks = qs + rows * D;
  float* vs = ks + kChunk * (D + 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t groups = p.bs / rows, qb = p.row0 + blockIdx.x / groups, h = blockIdx.y, b = blockIdx.z;
  const int bi = static_cast<int>((blockIdx.x % groups) * rows) + warp;
  const int64_t qi = qb * p.bs + bi;  // absolute row (position)
  const int64_t t = Token(p, qb * p.bs) + bi * p.row_step - p.q_offset;  // q's row (token)
  const bool valid = t >= 0 && t < p.tq;  // always without decoding
  const HeadView qv = QueryView(p, b, h), kv = KeyView(p, b, h);
  if (valid) LoadRow<T>(p, p.q, qv, t, qs + warp * D, lane);

  float m = -INFINITY, l = 0.0f, acc[DC] = {};
  const int2 range = TableRange(p.row_ptr, p.shared_layout, h, p.n_qb, qb);
  const int2 q_ids = p.q_segment_ids != nullptr ? QueryBlockIds(p, b, qb, lane) : make_int2(0, 0);
  for (int e = range.x; e < range.y; ++e) {
    const int64_t kb = p.row_entries[2 * e], k0 = kb * p.bs;
    if (k0 >= p.key_end) break;  // sorted by Kb: the rest of the row is not written yet (decoding)
    if (p.q_segment_ids != nullptr && !RangesMeet(q_ids, KeyBlockIds(p, b, kb, lane))) continue;
    const uint32_t* mask_row = MaskRow(p, p.row_entries[2 * e + 1], bi);
    const int n_keys = static_cast<int>(BlockKeys(p, kb));
    for (int c0 = 0; c0 < n_keys; c0 += kc) {
      const int n = min(kc, n_keys - c0);  // keys of the chunk that may be read
      __syncthreads();  // the previous chunk is consumed (and q is loaded, on the first)
      LoadChunk<T>(p, p.k, nullptr, kv, Token(p, k0 + c0), n, ks, nullptr, D + 1);  // the chunk's keys (tokens)
      LoadChunk<T>(p, p.v, nullptr, kv, Token(p, k0 + c0), n, vs, nullptr, D);
      __syncthreads();
      float x = -INFINITY;  // score in log2 units
      if (valid && lane < n) {
        const float s = Dot(qs + warp * D, ks + lane * (D + 1), D);
        // The key's token from its position (no token kept live across the loop: registers).
        const int64_t key = Token(p, k0 + c0 + lane);
        x = ScaledScore(s, p.scale, ScoreOffset<T>(p, b, h, t, key, mask_row, c0 + lane)) * kLog2e;
      }
      const unsigned kept = __ballot_sync(kFull, x != -INFINITY);
      const float m_new = fmaxf(m, WarpMax(x));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row masked so far stays at 0
      const float alpha = exp2f(m - m_use), prob = exp2f(x - m_use);
      l = l * alpha + WarpSum(prob);  // l sums the undropped probabilities
      m = m_new;
      const float weight = p.dropout && lane < n ? prob * DropoutFactor(p, b, h, qi, k0 + c0 + lane) : prob;
#pragma unroll
      for (int c = 0; c < DC; ++c) acc[c] *= alpha;
      AccumulateRows(acc, weight, vs, D, n, D, lane, kept);
    }
  }
  if (!valid) return;
  const bool empty = l == 0.0f;  // no kept key: output 0, lse -inf (a NaN sum: an attended NaN score)
  StoreRow<T>(p, acc, empty ? 0.0f : 1.0f / l, out, qv, t, lane);
  if (lane == 0) lse[(b * p.heads + h) * p.tq + t] = empty ? -INFINITY : (m + log2f(l)) * kLn2;
}

// delta[b, h, i] = rowsum(dout * out) - dlse, one warp per (b, i, h) row (of either layout: QueryIndex).
template <typename T>
__global__ void DeltaKernel(FusedParams p, const T* out, const T* dout, const float* dlse, float* delta) {
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.tq * p.heads) return;
  const int64_t h = row % p.heads, bt = row / p.heads, b = bt / p.tq, t = bt % p.tq;
  const int64_t at = QueryIndex(p, b, h, t);
  float s = 0.0f;
  for (int d = lane; d < p.head_dim; d += 32) s = fmaf(ToFloat(dout[at + d]), ToFloat(out[at + d]), s);
  s = WarpSum(s);
  if (lane == 0) {
    const int64_t stat = (b * p.heads + h) * p.tq + t;
    delta[stat] = s - (dlse != nullptr ? dlse[stat] : 0.0f);
  }
}

// The probability (undropped), the dropped-out one, dS, and whether the entry is attended, from its
// raw score s = q.k and dp = dout.v (not read at a masked entry). (i, j): the entry's positions (dropout
// hash, dbias), (ti, tj) its tokens (ScoreOffset); the same without strided_period.
struct EntryGrad {
  float prob, kept, ds;
  bool attended;
};

template <typename T>
__device__ __forceinline__ EntryGrad GradAt(const FusedParams& p, int64_t b, int64_t h, int64_t i,
                                            int64_t j, int64_t ti, int64_t tj, const uint32_t* mask_row, int bj,
                                            float s, float dp, float lse, float delta) {
  EntryGrad g;
  const float offset = ScoreOffset<T>(p, b, h, ti, tj, mask_row, bj);
  g.attended = offset != -INFINITY;
  if (!g.attended) {  // 0 by select, whatever NaN the row (lse, delta, dp) holds
    g.prob = g.kept = g.ds = 0.0f;
    return g;
  }
  g.prob = lse == -INFINITY ? 0.0f : exp2f((ScaledScore(s, p.scale, offset) - lse) * kLog2e);
  const float z = p.dropout ? DropoutFactor(p, b, h, i, j) : 1.0f;
  g.kept = g.prob * z;
  g.ds = g.prob * (dp * z - delta);
  return g;
}

// dQ over query rows. Grid and warps as ForwardSimt. Shared: q, dout [rows][D]; k, v [32][D+1].
template <typename T, int DC>
__global__ void __launch_bounds__(32 * kMaxRows)
    GradQSimt(FusedParams p, const T* dout, const float* lse, const float* delta, T* dq) {
  extern __shared__ float smem[];
  const int rows = blockDim.x / 32, D = static_cast<int>(p.head_dim), kc = p.bs < kChunk ? static_cast<int>(p.bs) : kChunk;
  float* qs = smem;
  float* dos = qs + rows * D;
  float* ks = dos + rows * D;
  float* vs = ks + kChunk * (D + 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t groups = p.bs / rows, qb = blockIdx.x / groups, h = blockIdx.y, b = blockIdx.z;
  const int bi = static_cast<int>((blockIdx.x % groups) * rows) + warp;
  const int64_t qi = qb * p.bs + bi, ti = Token(p, qb * p.bs) + bi * p.row_step;  // position, token
  const int64_t stat = (b * p.heads + h) * p.tq + ti;
  const HeadView qv = QueryView(p, b, h), kv = KeyView(p, b, h);
  LoadRow<T>(p, p.q, qv, ti, qs + warp * D, lane);
  LoadRow<T>(p, dout, qv, ti, dos + warp * D, lane);
  const float row_lse = lse[stat], row_delta = delta[stat];

  float acc[DC] = {};
  const int2 range = TableRange(p.row_ptr, p.shared_layout, h, p.n_qb, qb);
  const int2 q_ids = p.q_segment_ids != nullptr ? QueryBlockIds(p, b, qb, lane) : make_int2(0, 0);
  for (int e = range.x; e < range.y; ++e) {
    const int64_t kb = p.row_entries[2 * e], k0 = kb * p.bs, k0_token = Token(p, k0);
    if (p.q_segment_ids != nullptr && !RangesMeet(q_ids, KeyBlockIds(p, b, kb, lane))) continue;
    const uint32_t* mask_row = MaskRow(p, p.row_entries[2 * e + 1], bi);
    for (int c0 = 0; c0 < p.bs; c0 += kc) {
      __syncthreads();
      const int64_t c_token = k0_token + c0 * p.row_step;  // the chunk's first key (token)
      LoadChunk<T>(p, p.k, p.v, kv, c_token, kc, ks, vs, D + 1);
      __syncthreads();
      EntryGrad g = {0.0f, 0.0f, 0.0f, false};
      if (lane < kc) {
        const float s = Dot(qs + warp * D, ks + lane * (D + 1), D);
        const float dp = Dot(dos + warp * D, vs + lane * (D + 1), D);
        g = GradAt<T>(p, b, h, qi, k0 + c0 + lane, ti, c_token + lane * p.row_step, mask_row, c0 + lane, s, dp,
                      row_lse, row_delta);
      }
      AccumulateRows(acc, g.ds, ks, D + 1, kc, D, lane, __ballot_sync(kFull, g.attended));
    }
  }
  StoreRow<T>(p, acc, p.scale, dq, qv, ti, lane);
}

// dK, dV (and dbias) over key rows. Grid (n_kb * bs / rows, groups), rows warps; a CTA walks the
// `members` heads (b, h) of its group (GroupMember): the query heads of one K/V head, and with
// dbias every head adding into the same dbias slices, so that each dK/dV/dbias entry has one
// writer; dK and dV sum over the run of members that read one K/V head. Shared: k, v [rows][D]; q, dout [32][D+1];
// lse, delta [32].
template <typename T, int DC>
__global__ void __launch_bounds__(32 * kMaxRows)
    GradKVSimt(FusedParams p, const T* dout, const float* lse, const float* delta, T* dk, T* dv,
               float* dbias, int64_t members) {
  extern __shared__ float smem[];
  const int rows = blockDim.x / 32, D = static_cast<int>(p.head_dim), kc = p.bs < kChunk ? static_cast<int>(p.bs) : kChunk;
  float* ks = smem;
  float* vs = ks + rows * D;
  float* qs = vs + rows * D;
  float* dos = qs + kChunk * (D + 1);
  float* lse_s = dos + kChunk * (D + 1);
  float* delta_s = lse_s + kChunk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t groups = p.bs / rows, kb = blockIdx.x / groups, group = blockIdx.y;
  const int bj = static_cast<int>((blockIdx.x % groups) * rows) + warp;
  const int64_t kj = kb * p.bs + bj, tj = Token(p, kb * p.bs) + bj * p.row_step;  // position, token
  const bool with_dbias = dbias != nullptr;
  float dk_acc[DC] = {}, dv_acc[DC] = {};
  for (int64_t member = 0; member < members; ++member) {
    const int64_t bh = GroupMember(p, with_dbias, group, member);
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const HeadView qv = QueryView(p, b, h), kv = KeyView(p, b, h);
    const int64_t kv_head = MemberKvHead(p, with_dbias, group, member);
    const bool run_start = member == 0 || MemberKvHead(p, with_dbias, group, member - 1) != kv_head;
    const bool run_end = member + 1 == members || MemberKvHead(p, with_dbias, group, member + 1) != kv_head;
    __syncthreads();  // the previous member's rows are consumed
    if (run_start) {
      LoadRow<T>(p, p.k, kv, tj, ks + warp * D, lane);
      LoadRow<T>(p, p.v, kv, tj, vs + warp * D, lane);
#pragma unroll
      for (int c = 0; c < DC; ++c) dk_acc[c] = dv_acc[c] = 0.0f;
    }
    const int2 range = TableRange(p.col_ptr, p.shared_layout, h, p.n_kb, kb);
    const int2 k_ids = p.q_segment_ids != nullptr ? KeyBlockIds(p, b, kb, lane) : make_int2(0, 0);
    for (int e = range.x; e < range.y; ++e) {
      const int64_t qb = p.col_entries[2 * e], q0 = qb * p.bs;
      if (p.q_segment_ids != nullptr && !RangesMeet(QueryBlockIds(p, b, qb, lane), k_ids)) continue;
      const int32_t mask_id = p.col_entries[2 * e + 1];
      for (int c0 = 0; c0 < p.bs; c0 += kc) {
        __syncthreads();
        LoadChunk<T>(p, p.q, dout, qv, Token(p, q0 + c0), kc, qs, dos, D + 1);  // the chunk's queries (tokens)
        if (threadIdx.x < kc) {
          const int64_t stat = (b * p.heads + h) * p.tq + Token(p, q0 + c0 + threadIdx.x);
          lse_s[threadIdx.x] = lse[stat];
          delta_s[threadIdx.x] = delta[stat];
        }
        __syncthreads();
        EntryGrad g = {0.0f, 0.0f, 0.0f, false};
        if (lane < kc) {
          const int64_t qi = q0 + c0 + lane;
          const float s = Dot(qs + lane * (D + 1), ks + warp * D, D);
          const float dp = Dot(dos + lane * (D + 1), vs + warp * D, D);
          g = GradAt<T>(p, b, h, qi, kj, Token(p, qi), tj, MaskRow(p, mask_id, c0 + lane), bj, s, dp, lse_s[lane],
                        delta_s[lane]);
          if (dbias != nullptr) dbias[BiasIndex(p, b, h, qi, kj)] += g.ds;
        }
        // Only attended queries' rows are read: NaN q or dout of a masked query (one with no kept
        // key, or of another segment) reaches nothing.
        const unsigned attended = __ballot_sync(kFull, g.attended);
        AccumulateRows(dv_acc, g.kept, dos, D + 1, kc, D, lane, attended);
        AccumulateRows(dk_acc, g.ds, qs, D + 1, kc, D, lane, attended);
      }
    }
    if (run_end) {
      StoreRow<T>(p, dk_acc, p.scale, dk, kv, tj, lane);
      StoreRow<T>(p, dv_acc, 1.0f, dv, kv, tj, lane);
    }
  }
}

__global__ void FillKernel(float* dst, float value, int64_t n) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = value;
}

unsigned GridFor(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65536)); }

// A case with a zero size (batch, Tq or Tk) launches no kernel.
bool Empty(const FusedParams& p) { return p.batch == 0 || p.tq == 0 || p.tk == 0; }

int64_t DtypeBytes(const FusedParams& p) { return p.dtype == BSATTN_FLOAT32 ? 4 : 2; }

template <typename T>
__global__ void FloatToKernel(const float* src, T* dst, int64_t n) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = FromFloat<T>(src[i]);
}

// ---- launch ------------------------------------------------------------------------------------

bool IsBlockSize(int64_t bs) { return bs == 8 || bs == 16 || bs == 32 || bs == 64 || bs == 128; }

// Checks what the kernels rely on and derives the launch constants (tables are trusted).
int MakeParams(const bsattn_fused_args* a, FusedParams* p) {
  if (a->dtype != BSATTN_FLOAT32 && a->dtype != BSATTN_FLOAT16 && a->dtype != BSATTN_BFLOAT16)
    return BSATTN_ERROR_DTYPE;
  if (!IsBlockSize(a->block_size)) return BSATTN_ERROR_BLOCK_SIZE;
  if (a->head_dim > 256) return BSATTN_ERROR_HEAD_DIM;
  const bool decode = a->decode != 0;
  if (decode && (a->t_max <= 0 || a->t_max % a->block_size != 0 || a->q_offset < 0 ||
                 a->q_offset + a->tq > a->t_max || a->q_offset + a->tq > a->tk))
    return BSATTN_ERROR_SHAPE;
  if (a->batch < 0 || a->heads <= 0 || a->head_dim <= 0 || a->tq < 0 || a->tk < 0 ||
      (!decode && a->tq % a->block_size != 0) || a->tk % a->block_size != 0 ||
      (a->layout_heads != 1 && a->layout_heads != a->heads) || a->kv_heads < 0 ||
      (a->kv_heads > 0 && a->heads % a->kv_heads != 0) ||
      // An empty side may come without its ids pointer (TF hands out NULL for empty tensors).
      (a->batch > 0 && a->tq > 0 && a->tk > 0 && ((a->q_segment_ids == nullptr) != (a->k_segment_ids == nullptr))) ||
      (a->bias != nullptr && ((a->bias_heads != 1 && a->bias_heads != a->heads) ||
                              (a->bias_batch != 1 && a->bias_batch != a->batch))))
    return BSATTN_ERROR_SHAPE;
  // strided_period L: self-attention, T / L tokens per residue class, whole blocks of them; no bias, no decoding.
  const int64_t period = a->strided_period;
  if (period < 0 || (period > 0 && (a->tq != a->tk || a->tq % period != 0 || (a->tq / period) % a->block_size != 0 ||
                                    a->bias != nullptr || decode)))
    return BSATTN_ERROR_SHAPE;
  p->dtype = a->dtype;
  p->batch = a->batch;
  p->heads = a->heads;
  p->head_dim = a->head_dim;
  p->width = a->heads * a->head_dim;
  p->kv_heads = a->kv_heads > 0 ? a->kv_heads : a->heads;
  p->kv_width = p->kv_heads * a->head_dim;
  p->group = a->heads / p->kv_heads;
  const bool segments = a->q_segment_ids != nullptr && a->k_segment_ids != nullptr;
  p->q_segment_ids = segments ? a->q_segment_ids : nullptr;
  p->k_segment_ids = segments ? a->k_segment_ids : nullptr;
  p->tq = a->tq;
  p->tk = a->tk;
  p->bs = a->block_size;
  p->n_qb = (decode ? a->t_max : a->tq) / a->block_size;
  p->n_kb = a->tk / a->block_size;
  p->decode = decode;
  p->q_offset = decode ? a->q_offset : 0;
  p->key_end = decode ? a->q_offset + a->tq : a->tk;
  p->hash_tq = decode ? a->t_max : a->tq;
  p->row0 = p->q_offset / a->block_size;
  // L = 1 is the identity permutation: row_step 1 takes the unpermuted path.
  p->row_step = period > 1 ? period : 1;
  p->class_len = period > 1 ? a->tq / period : 0;
  // Token-major [B, T, heads * D] or head-major [B, heads, T, D] (decoding: T = tq rows of q, out; Tk of the cache).
  const int64_t D = a->head_dim;
  p->q_layout = a->head_major ? ActivationLayout{p->heads * a->tq * D, a->tq * D, D}
                              : ActivationLayout{a->tq * p->width, D, p->width};
  p->kv_layout = a->head_major ? ActivationLayout{p->kv_heads * a->tk * D, a->tk * D, D}
                               : ActivationLayout{a->tk * p->kv_width, D, p->kv_width};
  p->q_row_stride = p->q_layout.pitch * p->row_step;
  p->kv_row_stride = p->kv_layout.pitch * p->row_step;
  p->n_rows = !decode ? p->n_qb : a->tq == 0 ? 0 : (p->key_end - 1) / a->block_size - p->row0 + 1;
  if (p->n_qb * (a->block_size / std::min<int64_t>(a->block_size, kMaxRows)) > 0x7fffffff ||
      p->n_kb * a->block_size > 0x7fffffff || a->heads > 65535 || a->batch > 65535)
    return BSATTN_ERROR_SHAPE;
  p->q = a->q;
  p->k = a->k;
  p->v = a->v;
  p->shared_layout = a->layout_heads == 1;
  p->row_ptr = a->row_ptr;
  p->row_entries = a->row_entries;
  p->col_ptr = a->col_ptr;
  p->col_entries = a->col_entries;
  p->masks = reinterpret_cast<const uint32_t*>(a->masks);
  p->mask_words = static_cast<int>((a->block_size + 31) / 32);
  p->key_padding_mask = a->key_padding_mask;
  p->bias = a->bias;
  p->bias_batch = a->bias_batch;
  p->bias_heads = a->bias_heads;
  p->scale = a->scale;
  p->dropout = a->dropout_rate > 0.0f;
  if (p->dropout) {
    p->dropout_key = bsattn::DropoutKey(a->seed);
    p->dropout_threshold = bsattn::DropoutThreshold(a->dropout_rate);
    p->dropout_scale = 1.0f / (1.0f - a->dropout_rate);
  }
  return 0;
}

// Calls F<T, DC>::Run(args...) with the dtype's T and DC = ceil(head_dim / 32) rounded up to a
// power of two (the per-lane accumulator length).
template <template <typename, int> class F, typename... Args>
void DispatchSimt(const FusedParams& p, Args... args) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    if (p.head_dim <= 32) F<T, 1>::Run(p, args...);
    else if (p.head_dim <= 64) F<T, 2>::Run(p, args...);
    else if (p.head_dim <= 128) F<T, 4>::Run(p, args...);
    else F<T, 8>::Run(p, args...);
  };
  switch (p.dtype) {
    case BSATTN_FLOAT32: by_dim(float()); break;
    case BSATTN_FLOAT16: by_dim(__half()); break;
    default: by_dim(__nv_bfloat16()); break;
  }
}

int RowsPerCta(const FusedParams& p) { return static_cast<int>(std::min<int64_t>(p.bs, kMaxRows)); }

// Raises a kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <typename Kernel>
void AllowSharedMemory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int DC>
struct ForwardRunner {
  static void Run(const FusedParams& p, void* out, float* lse, cudaStream_t stream) {
    const int rows = RowsPerCta(p), D = static_cast<int>(p.head_dim);
    const size_t smem = sizeof(float) * (rows * D + kChunk * (D + 1) + kChunk * D);
    AllowSharedMemory(ForwardSimt<T, DC>, smem);
    const dim3 grid(static_cast<unsigned>(p.n_rows * (p.bs / rows)), p.heads, p.batch);
    ForwardSimt<T, DC><<<grid, 32 * rows, smem, stream>>>(p, static_cast<T*>(out), lse);
  }
};

template <typename T, int DC>
struct GradRunner {
  static void Run(const FusedParams& p, const void* out, const void* dout, const float* lse,
                  const float* dlse, float* delta, void* dq, void* dk, void* dv, float* dbias_acc,
                  const GradMmaBuffers& mma, cudaStream_t stream) {
    const int rows = RowsPerCta(p), D = static_cast<int>(p.head_dim);
    const int64_t delta_rows = p.batch * p.tq * p.heads;
    DeltaKernel<T><<<static_cast<unsigned>((delta_rows + 7) / 8), 256, 0, stream>>>(
        p, static_cast<const T*>(out), static_cast<const T*>(dout), dlse, delta);

    if (LaunchGradMma(p, mma, stream)) return;

    const size_t q_smem = sizeof(float) * (2 * rows * D + 2 * kChunk * (D + 1));
    AllowSharedMemory(GradQSimt<T, DC>, q_smem);
    const dim3 q_grid(static_cast<unsigned>(p.n_qb * (p.bs / rows)), p.heads, p.batch);
    GradQSimt<T, DC><<<q_grid, 32 * rows, q_smem, stream>>>(p, static_cast<const T*>(dout), lse, delta,
                                                            static_cast<T*>(dq));

    const int64_t groups = GradGroups(p, dbias_acc != nullptr);
    const size_t kv_smem = sizeof(float) * (2 * rows * D + 2 * kChunk * (D + 1) + 2 * kChunk);
    AllowSharedMemory(GradKVSimt<T, DC>, kv_smem);
    const dim3 kv_grid(static_cast<unsigned>(p.n_kb * (p.bs / rows)), static_cast<unsigned>(groups));
    GradKVSimt<T, DC><<<kv_grid, 32 * rows, kv_smem, stream>>>(
        p, static_cast<const T*>(dout), lse, delta, static_cast<T*>(dk), static_cast<T*>(dv),
        dbias_acc, p.batch * p.heads / groups);
  }
};

int64_t DeltaBytes(const FusedParams& p) { return ((p.batch * p.heads * p.tq * 4 + 255) / 256) * 256; }

int64_t DbiasAccumulatorBytes(const FusedParams& p) {
  return p.dtype == BSATTN_FLOAT32 ? 0 : ((p.bias_batch * p.bias_heads * p.tq * p.tk * 4 + 255) / 256) * 256;
}

// The tensor-core backward's float32 dQ accumulator (16-bit dtypes).
int64_t DqAccumulatorBytes(const FusedParams& p) {
  return p.dtype == BSATTN_FLOAT32 ? 0 : ((p.batch * p.tq * p.width * 4 + 255) / 256) * 256;
}

// Per-block segment-id ranges (int2 min, max): [B, nQb] then [B, nKb].
int64_t SegmentRangeBytes(const FusedParams& p) {
  return p.q_segment_ids == nullptr ? 0 : p.batch * (p.n_qb + p.n_kb) * 8;
}

// ranges[b * n_blocks + blk] = (min, max) of the ids of block blk's tokens (ids[b, Token(blk * bs) + r * row_step],
// r < bs), one thread per block.
__global__ void SegmentRangesKernel(FusedParams p, const int32_t* ids, int64_t len, int2* ranges) {
  const int64_t bs = p.bs, n_blocks = len / bs;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < p.batch * n_blocks;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int32_t* row = ids + (i / n_blocks) * len + Token(p, (i % n_blocks) * bs);
    int lo = row[0], hi = row[0];
    for (int64_t j = 1; j < bs; ++j) {
      lo = min(lo, row[j * p.row_step]);
      hi = max(hi, row[j * p.row_step]);
    }
    ranges[i] = make_int2(lo, hi);
  }
}

// Whether the caller or the environment (BSATTN_DETERMINISTIC=1) asks for a deterministic dQ.
bool Deterministic(int flags) {
  static const bool from_env = [] {
    const char* v = std::getenv("BSATTN_DETERMINISTIC");
    return v != nullptr && v[0] != '\0' && !(v[0] == '0' && v[1] == '\0');
  }();
  return (flags & BSATTN_BACKWARD_DETERMINISTIC) != 0 || from_env;
}

}  // namespace
}  // namespace bsattn_cuda

using bsattn_cuda::FusedParams;

extern "C" {

int bsattn_fused_forward(const bsattn_fused_args* args, void* out, float* lse, bsattn_stream_t stream) {
  FusedParams p;
  if (const int status = bsattn_cuda::MakeParams(args, &p)) return status;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (bsattn_cuda::Empty(p)) {  // Tk = 0: every row has no kept key (output 0, lse -inf)
    const int64_t rows = p.batch * p.heads * p.tq;
    if (rows == 0) return 0;
    if (const cudaError_t e = cudaMemsetAsync(out, 0, p.batch * p.tq * p.width * bsattn_cuda::DtypeBytes(p), s)) return e;
    bsattn_cuda::FillKernel<<<bsattn_cuda::GridFor(rows), 256, 0, s>>>(lse, -INFINITY, rows);
    return bsattn_cuda::LastError();
  }
  if (!bsattn_cuda::LaunchForwardMma(p, out, lse, s)) {
    bsattn_cuda::DispatchSimt<bsattn_cuda::ForwardRunner>(p, out, lse, s);
  }
  return bsattn_cuda::LastError();
}

int64_t bsattn_fused_backward_workspace(const bsattn_fused_args* args, int with_dbias) {
  FusedParams p;
  if (bsattn_cuda::MakeParams(args, &p) != 0) return 0;
  return bsattn_cuda::DeltaBytes(p) + (with_dbias ? bsattn_cuda::DbiasAccumulatorBytes(p) : 0) +
         bsattn_cuda::DqAccumulatorBytes(p) + bsattn_cuda::SegmentRangeBytes(p);
}

int bsattn_fused_backward(const bsattn_fused_args* args, const void* out, const float* lse,
                          const void* dout, const float* dlse, void* dq, void* dk, void* dv,
                          void* dbias, void* workspace, int64_t workspace_bytes,
                          bsattn_stream_t stream) {
  return bsattn_fused_backward_ex(args, out, lse, dout, dlse, dq, dk, dv, dbias, workspace, workspace_bytes, 0,
                                  stream);
}

int bsattn_fused_backward_ex(const bsattn_fused_args* args, const void* out, const float* lse,
                             const void* dout, const float* dlse, void* dq, void* dk, void* dv,
                             void* dbias, void* workspace, int64_t workspace_bytes, int flags,
                             bsattn_stream_t stream) {
  if (args->decode != 0) return BSATTN_ERROR_SHAPE;  // decoding is forward-only
  FusedParams p;
  if (const int status = bsattn_cuda::MakeParams(args, &p)) return status;
  if (dbias != nullptr && p.bias == nullptr) return BSATTN_ERROR_SHAPE;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (bsattn_cuda::Empty(p)) {  // every gradient is 0 (or empty)
    const int64_t bytes = bsattn_cuda::DtypeBytes(p);
    for (const auto& [ptr, n] : {std::pair<void*, int64_t>{dq, p.batch * p.tq * p.width},
                                 {dk, p.batch * p.tk * p.kv_width}, {dv, p.batch * p.tk * p.kv_width},
                                 {dbias, dbias != nullptr ? p.bias_batch * p.bias_heads * p.tq * p.tk : 0}}) {
      if (n > 0) {
        if (const cudaError_t e = cudaMemsetAsync(ptr, 0, n * bytes, s)) return e;
      }
    }
    return 0;
  }
  const int64_t delta_bytes = bsattn_cuda::DeltaBytes(p);
  const int64_t acc_bytes = dbias != nullptr ? bsattn_cuda::DbiasAccumulatorBytes(p) : 0;
  const int64_t dq_bytes = bsattn_cuda::DqAccumulatorBytes(p), seg_bytes = bsattn_cuda::SegmentRangeBytes(p);
  if (workspace == nullptr || workspace_bytes < delta_bytes + acc_bytes + dq_bytes + seg_bytes)
    return BSATTN_ERROR_WORKSPACE;
  float* delta = static_cast<float*>(workspace);
  char* after_dbias = static_cast<char*>(workspace) + delta_bytes + acc_bytes;
  bsattn_cuda::GradMmaBuffers mma;
  mma.out = out;
  mma.dout = dout;
  mma.lse = lse;
  mma.delta = delta;
  mma.dq = dq;
  mma.dk = dk;
  mma.dv = dv;
  mma.dq_acc = dq_bytes ? reinterpret_cast<float*>(after_dbias) : nullptr;
  mma.deterministic = bsattn_cuda::Deterministic(flags);
  if (seg_bytes) {
    int2* ranges = reinterpret_cast<int2*>(after_dbias + dq_bytes);
    bsattn_cuda::SegmentRangesKernel<<<bsattn_cuda::GridFor(p.batch * p.n_qb), 256, 0, s>>>(
        p, p.q_segment_ids, p.tq, ranges);
    bsattn_cuda::SegmentRangesKernel<<<bsattn_cuda::GridFor(p.batch * p.n_kb), 256, 0, s>>>(
        p, p.k_segment_ids, p.tk, ranges + p.batch * p.n_qb);
    mma.seg_ranges = ranges;
  }
  // dbias sums into float32: dbias itself for float32, else the workspace after delta.
  float* dbias_acc = nullptr;
  const int64_t dbias_count = p.bias_batch * p.bias_heads * p.tq * p.tk;
  if (dbias != nullptr) {
    dbias_acc = p.dtype == BSATTN_FLOAT32 ? static_cast<float*>(dbias)
                                          : reinterpret_cast<float*>(static_cast<char*>(workspace) + delta_bytes);
    if (const cudaError_t e = cudaMemsetAsync(dbias_acc, 0, dbias_count * sizeof(float), s)) return e;
  }
  mma.dbias = dbias_acc;
  bsattn_cuda::DispatchSimt<bsattn_cuda::GradRunner>(p, out, dout, lse, dlse, delta, dq, dk, dv, dbias_acc, mma, s);
  if (dbias != nullptr && p.dtype != BSATTN_FLOAT32) {
    const unsigned blocks = bsattn_cuda::GridFor(dbias_count);
    if (p.dtype == BSATTN_FLOAT16)
      bsattn_cuda::FloatToKernel<__half><<<blocks, 256, 0, s>>>(dbias_acc, static_cast<__half*>(dbias), dbias_count);
    else
      bsattn_cuda::FloatToKernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(dbias_acc, static_cast<__nv_bfloat16*>(dbias), dbias_count);
  }
  return bsattn_cuda::LastError();
}

}  // extern "C"
