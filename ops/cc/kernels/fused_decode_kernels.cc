// The CPU decoding step of the fused block-sparse attention (KV-cache decoding, attr decode).
//
// q holds Tq new queries at absolute positions [p, p + Tq) (p = q_offset); the tables are those of
// the whole (pattern, T_max) and k, v the cache [B, Tk, KVH*D], written up to p + Tq. A work unit is
// (batch, head, table row Qb) for the rows covering [p, p + Tq); it computes the tile of its rows
// [r_lo, r_hi) (at most bs, any count) against each active block of row Qb whose keys start
// before p + Tq, in the forward's transposed layout (S^T = K (scale Q)^T, [key j][query i]):
//   - blocks of a row are sorted by Kb, so the walk stops at the first block at or past p + Tq: no
//     work for the masked (unwritten) part of a row, whatever its length;
//   - only the written keys [k0, min(k0 + bs, p + Tq)) of the last block are staged: keys >= p + Tq
//     are never read, so garbage or NaN in the unwritten cache reaches no output;
//   - in-block masks apply at the absolute rows (mask row r_lo - Qb * bs + i), bias and q segment
//     ids at q's rows (the new rows), the dropout hash at the absolute row p + i of the full op;
//   - K and V tiles are converted from the storage dtype as they are staged: nothing scales with the
//     cache length but the blocks visited. (Staged even in float32: reading the rows in place, H*D
//     apart, measured 2x slower for a one-row step (L1 set conflicts), and prefetching the next
//     block's rows gained nothing; A/B on the 2-core machine, causal T = 8192, H = 8, D = 64.)
// Masked entries are never read into a result, as in the full forward (fused_attention_kernels.cc):
// scores masked by select, padded keys' K and V rows staged as zeros, a V tile with a non-finite
// value takes the exact path (zeroed, its attended products added one by one).
#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/cc/kernels/attention_math.h"
#include "ops/cc/kernels/fused_attention_kernels.h"
#include "ops/cc/kernels/fused_tiles.h"
#include "ops/cc/kernels/tile_io.h"

namespace bsattn {
namespace {

// One unit's tile: batch entry b, head h; queries at absolute rows [r_lo, r_lo + nq)
// = q's rows [t0, t0 + nq), mask rows [mask_row, mask_row + nq) of their table row.
struct DecodeTile {
  int64_t b, h, r_lo, nq, t0, mask_row;
};

// Whether entry (query i of the tile, key k0 + j) is attended: kept by the block's mask (mask_id, -1
// = full), the key padding, the segment ids and a bias other than -inf. (j < the written keys.)
template <typename T>
bool DecodeKept(const FusedAttentionParams<T>& p, const DecodeTile& t, int64_t k0, int32_t mask_id, int64_t i,
                int64_t j) {
  using Acc = typename AccumulatorOf<T>::type;
  if (mask_id >= 0) {
    const uint32_t word = p.masks[(mask_id * p.block_size + t.mask_row + i) * p.mask_words + (j >> 5)];
    if (!((word >> (j & 31)) & 1u)) return false;
  }
  if (p.key_padding_mask != nullptr && !p.key_padding_mask[t.b * p.tk + k0 + j]) return false;
  if (p.q_segment_ids != nullptr &&
      p.q_segment_ids[t.b * p.tq + t.t0 + i] != p.k_segment_ids[t.b * p.tk + k0 + j]) {
    return false;
  }
  if (p.bias == nullptr) return true;
  const int64_t bb = p.bias_batch == 1 ? 0 : t.b, hb = p.bias_heads == 1 ? 0 : t.h;
  const T* bias = p.bias + ((bb * p.bias_heads + hb) * p.tq + t.t0 + i) * p.tk + k0 + j;
  return static_cast<Acc>(*bias) != -std::numeric_limits<Acc>::infinity();
}

// Adds the bias and sets the masked scores to -inf by select on st [nk][nq] (keys k0 + j, the
// tile's queries i): in-block mask bits of the absolute rows, key padding, segment ids.
template <typename T, typename Acc>
void DecodeBiasAndMasks(const FusedAttentionParams<T>& p, const DecodeTile& t, int64_t k0, int32_t mask_id,
                        int64_t nk, bool segments_differ, Acc* st) {
  constexpr Acc kMasked = -std::numeric_limits<Acc>::infinity();
  const int64_t nq = t.nq;
  if (p.bias != nullptr) {  // a -inf bias masks by select: a NaN score there stays out
    const int64_t bb = p.bias_batch == 1 ? 0 : t.b, hb = p.bias_heads == 1 ? 0 : t.h;
    const T* bias = p.bias + ((bb * p.bias_heads + hb) * p.tq + t.t0) * p.tk + k0;
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < nk; ++j) {
        const Acc add = static_cast<Acc>(bias[i * p.tk + j]);
        st[j * nq + i] = add == kMasked ? kMasked : st[j * nq + i] + add;
      }
  }
  if (mask_id >= 0) {
    const uint32_t* bits = p.masks + (mask_id * p.block_size + t.mask_row) * p.mask_words;
    for (int64_t i = 0; i < nq; ++i) {
      const uint32_t* row = bits + i * p.mask_words;
      for (int64_t j = 0; j < nk; ++j)
        if (!((row[j >> 5] >> (j & 31)) & 1u)) st[j * nq + i] = kMasked;
    }
  }
  if (p.key_padding_mask != nullptr) {
    const bool* keep = p.key_padding_mask + t.b * p.tk + k0;
    for (int64_t j = 0; j < nk; ++j)
      if (!keep[j]) std::fill_n(st + j * nq, nq, kMasked);
  }
  if (segments_differ) {
    const int32_t* qs = p.q_segment_ids + t.b * p.tq + t.t0;
    const int32_t* ks = p.k_segment_ids + t.b * p.tk + k0;
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t i = 0; i < nq; ++i)
        if (qs[i] != ks[j]) st[j * nq + i] = kMasked;
  }
}

}  // namespace

template <typename T>
void FusedDecodeForward(tensorflow::OpKernelContext* ctx, const FusedAttentionParams<T>& p, T* out,
                        typename AccumulatorOf<T>::type* lse) {
  using Acc = typename AccumulatorOf<T>::type;
  if (p.batch == 0 || p.tq == 0) return;
  const int64_t bs = p.block_size, d = p.head_dim, n_qb = p.n_q_blocks;
  const int64_t end = p.q_offset + p.tq;  // keys [0, end) are written
  const int64_t row0 = p.q_offset / bs, n_rows = (end - 1) / bs - row0 + 1;
  const int64_t t_max = n_qb * bs;  // the full op's query length (the dropout hash's row stride)
  auto work = [&](int64_t begin, int64_t unit_end) {
    const auto [qt, acc, m, l, alpha, st, z, k_tile, v_tile] = ThreadScratch<Acc, 9>(
        {bs * d, bs * d, bs, bs, bs, bs * bs, p.dropout ? bs * bs : 0, bs * d, bs * d});
    int64_t computed = 0;
    for (int64_t unit = begin; unit < unit_end; ++unit) {
      const int64_t qb = row0 + unit % n_rows, h = (unit / n_rows) % p.heads, b = unit / (n_rows * p.heads);
      DecodeTile t;
      t.b = b;
      t.h = h;
      t.r_lo = std::max(qb * bs, p.q_offset);
      t.nq = std::min(qb * bs + bs, end) - t.r_lo;
      t.t0 = t.r_lo - p.q_offset;
      t.mask_row = t.r_lo - qb * bs;
      const int64_t nq = t.nq;
      const HeadView qv = QueryView(p, h), kv = KeyView(p, h);  // q, out: tq rows; the cache: tk
      TransposeScaled(p.q + qv.TokenOffset(b, t.t0), qv.pitch, nq, d, p.scale, qt);
      std::fill_n(m, nq, -std::numeric_limits<Acc>::infinity());
      std::fill_n(l, nq, Acc(0));
      std::fill_n(acc, nq * d, Acc(0));  // alpha = 0 at a row's first block: acc must be finite
      int32_t q_lo = 0, q_hi = 0;        // the rows' segment id range
      if (p.q_segment_ids != nullptr) {
        const int32_t* ids = p.q_segment_ids + b * p.tq + t.t0;
        const auto [lo, hi] = std::minmax_element(ids, ids + nq);
        q_lo = *lo;
        q_hi = *hi;
      }
      const int32_t* ptr = HeadPointers(p.row_ptr, p.shared_layout, h, n_qb);
      for (int32_t e = ptr[qb]; e < ptr[qb + 1]; ++e) {
        const int64_t k0 = int64_t{p.row_entries[2 * e]} * bs;
        if (k0 >= end) break;  // sorted by Kb: the rest of the row is not written yet
        const int64_t nk = std::min(bs, end - k0);  // the written keys of the block
        bool segments_differ = false;
        if (p.q_segment_ids != nullptr) {
          const int32_t* ids = p.k_segment_ids + b * p.tk + k0;
          const auto [lo, hi] = std::minmax_element(ids, ids + nk);
          if (*hi < q_lo || q_hi < *lo) continue;  // no pair of equal ids: skipped
          segments_differ = !(q_lo == q_hi && *lo == *hi && q_lo == *lo);
        }
        ++computed;
        const int32_t mask_id = p.row_entries[2 * e + 1];
        const int64_t kv_at = kv.TokenOffset(b, k0);
        LoadTile(p.k_store + kv_at, kv.pitch, nk, d, k_tile);
        LoadTile(p.v_store + kv_at, kv.pitch, nk, d, v_tile);
        if (p.key_padding_mask != nullptr) {  // padded keys' rows are never read
          const bool* keep = p.key_padding_mask + b * p.tk + k0;
          for (int64_t j = 0; j < nk; ++j) {
            if (keep[j]) continue;
            std::fill_n(k_tile + j * d, d, Acc(0));
            std::fill_n(v_tile + j * d, d, Acc(0));
          }
        }
        const bool v_finite = AllFinite(v_tile, nk * d);
        if (!v_finite) ZeroNonFinite(v_tile, nk * d);  // their products are added exactly below
        MatMul(k_tile, d, qt, nq, st, nq, nk, d, nq);  // S^T = K (scale Q)^T
        DecodeBiasAndMasks(p, t, k0, mask_id, nk, segments_differ, st);
        OnlineSoftmaxStep(st, nk, nq, m, l, alpha);
        if (p.dropout) {  // the full op's counters: absolute query row r_lo + i, key k0 + j
          const uint64_t base = static_cast<uint64_t>(((b * p.heads + h) * t_max + t.r_lo) * p.tk + k0);
          DropoutTile(z, nk, nq, p.dropout_key, base, 1, p.tk, p.dropout_threshold, p.dropout_scale);
          Multiply(st, z, st, nk * nq);
        }
        MatMulAccumulateTransposedA(st, nq, v_tile, d, acc, d, nq, nk, d, alpha);
        if (!v_finite) {  // exact: P^T[j][i] * v[j][c] for the non-finite v of attended entries
          for (int64_t j = 0; j < nk; ++j) {
            const T* x = p.v_store + kv_at + j * kv.pitch;
            for (int64_t c = 0; c < d; ++c) {
              const Acc value = static_cast<Acc>(x[c]);
              if ((value - value) == Acc(0)) continue;
              for (int64_t i = 0; i < nq; ++i) {
                if (DecodeKept(p, t, k0, mask_id, i, j)) acc[i * d + c] += st[j * nq + i] * value;
              }
            }
          }
        }
      }
      Acc* lse_row = lse + (b * p.heads + h) * p.tq + t.t0;
      for (int64_t i = 0; i < nq; ++i) {
        // No kept key: output 0, lse -inf. A NaN sum (an attended NaN score) gives NaN for both.
        const bool empty = l[i] == 0;
        lse_row[i] = empty ? -std::numeric_limits<Acc>::infinity() : m[i] + std::log(l[i]);
        alpha[i] = empty ? Acc(0) : 1 / l[i];
      }
      ScaleRows(acc, nq, d, d, alpha);
      StoreTile(acc, nq, d, out + qv.TokenOffset(b, t.t0), qv.pitch);
    }
    CountComputedBlocks(0, computed);
  };
  // Cost: the blocks of the first row (layout 0), each an nk x nq x D product pair plus staging.
  const int64_t blocks = p.row_ptr[row0 + 1] - p.row_ptr[row0];
  const int64_t nq = std::min(bs, p.tq);
  const int64_t cost = std::max<int64_t>(1, blocks) * (4 * bs * nq * d / 16 + 4 * bs * d) + 1000;
  ParallelForBalanced(ctx, p.batch * p.heads * n_rows, cost, work);
}

#define BSATTN_INSTANTIATE_DECODE(T)                                                                     \
  template void FusedDecodeForward<T>(tensorflow::OpKernelContext*, const FusedAttentionParams<T>&, T*, \
                                      AccumulatorOf<T>::type*);

BSATTN_INSTANTIATE_DECODE(float);
BSATTN_INSTANTIATE_DECODE(Eigen::half);
BSATTN_INSTANTIATE_DECODE(Eigen::bfloat16);
BSATTN_INSTANTIATE_DECODE(double);
#undef BSATTN_INSTANTIATE_DECODE

}  // namespace bsattn
