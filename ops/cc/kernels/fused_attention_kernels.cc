// CPU kernels of the fused block-sparse attention (flash style: the weights are never stored).
//
// Layout choice. A work unit keeps a group of up to kMaxGroup consecutive tiles fixed (query blocks
// in the forward, key blocks in the gradient) and walks the blocks of their rows or columns merged
// in increasing order, so that each streamed tile is loaded once for every fixed tile that uses it
// (K and V of a long sequence come from L3 or memory, and per-block copies cost as much as the
// softmax). The fixed tiles are transposed once per unit; the streamed tile of each block is copied
// into a dense scratch tile (rows H*D apart would fall into a few L1 sets) and feeds the products
// directly:
//   forward:   S^T = K (scale Q)^T      [key j][query i]   MatMul
//              O = alpha O + P V = (P^T)^T V                MatMulAccumulateTransposedA (row scale)
//   gradient:  S = Q (scale K)^T,  dP = dO V^T   [query i][key j]   MatMul
//              dV += P^T dO,  dK += dS^T Q                  MatMulAccumulateTransposedA
//              dQ += dS K                                   MatMulAccumulate (into a partial buffer)
// In the forward's transposed layout the softmax statistics (max, sum) are vectors along the
// contiguous axis, so the online softmax is plain vector code (attention_math); in the gradient
// lse and delta are per-row scalars.
//
// Masked entries are never read into a result (NaN/Inf at an ignored key stays out; an attended
// NaN score makes its row NaN, as dense attention does). Scores of masked entries are set to -inf
// by select, never by adding; K and V rows of padded keys are staged as zeros; a streamed V tile
// (forward) or K tile (dQ) that still holds a non-finite value takes the exact path: the product
// runs with those values zeroed and their kept products are added one by one
// (AddNonFiniteProducts); in the gradient, dP = dO V^T of masked entries is zeroed when the
// column's V is not finite (it is NaN there; P = 0 makes dS 0). A finiteness scan per staged tile
// is all that full tiles pay.
//
// strided_period L (sparse_attention's 'strided' without transposes): the tables' positions are
// permuted tokens, and a block of positions is one residue class, tokens t0 + r * L: every tile
// load and store takes the block's first token and a row stride of L rows (HeadView), per-token
// arrays (key padding, segment ids, lse) the same step (BlockTokens). Work order, scratch and
// summation order are those of the op on permuted inputs, so the results equal it bit for bit.
//
// Per-thread scratch is kept across units and calls; each output tile (and dbias entry) has exactly
// one writer and sums in a fixed order, so two runs give the same bits.
#include "ops/cc/kernels/fused_attention_kernels.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/cc/kernels/attention_math.h"
#include "ops/cc/kernels/cpu_bf16.h"
#include "ops/cc/kernels/fused_tiles.h"
#include "ops/cc/kernels/tile_io.h"

namespace bsattn {
namespace {

std::atomic<int64_t> computed_blocks[2];  // forward, gradient (FusedComputedBlocks)

// The values of a per-token array x [B, len] (key padding, segment ids) at the block of positions
// t0.. of batch entry b: at(j) = x[b][token of position t0 + j].
template <typename U>
struct BlockTokens {
  const U* first;
  int64_t step;
  U operator[](int64_t j) const { return first[j * step]; }
};

template <typename T, typename U>
BlockTokens<U> TokensOf(const FusedAttentionParams<T>& p, const U* x, int64_t len, int64_t b, int64_t t0) {
  const int64_t period = p.strided_period;
  return {x + b * len + StridedToken(t0, len, period), period == 0 ? 1 : period};
}

// Whether block (Qb, Kb) of batch entry b can hold a pair of equal segment ids (always without
// segment ids): the blocks' [min, max] ranges overlap. A block that cannot is skipped: no loads,
// no products.
template <typename T>
bool SegmentsMeet(const FusedAttentionParams<T>& p, int64_t b, int64_t qb, int64_t kb) {
  if (p.q_segment_ids == nullptr) return true;
  const int32_t* qr = p.q_block_segments + 2 * (b * p.n_q_blocks + qb);
  const int32_t* kr = p.k_block_segments + 2 * (b * p.n_k_blocks + kb);
  return qr[0] <= kr[1] && kr[0] <= qr[1];
}

// Whether some entry of block (Qb, Kb) of batch entry b has different segment ids.
template <typename T>
bool SegmentsDiffer(const FusedAttentionParams<T>& p, int64_t b, int64_t qb, int64_t kb) {
  if (p.q_segment_ids == nullptr) return false;
  const int32_t* qr = p.q_block_segments + 2 * (b * p.n_q_blocks + qb);
  const int32_t* kr = p.k_block_segments + 2 * (b * p.n_k_blocks + kb);
  return !(qr[0] == qr[1] && kr[0] == kr[1] && qr[0] == kr[0]);
}

// The masks with rows and columns swapped (bit i of row j keeps query i for key j): the forward's
// transposed tiles apply them row by row too.
template <typename T>
std::vector<uint32_t> TransposedMasks(tensorflow::OpKernelContext* ctx, const FusedAttentionParams<T>& p) {
  const int64_t bs = p.block_size, words = p.mask_words, size = bs * words;
  std::vector<uint32_t> out(p.n_masks * size, 0);
  ParallelFor(ctx, p.n_masks, 4 * bs * bs, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const uint32_t* src = p.masks + m * size;
      uint32_t* dst = out.data() + m * size;
      for (int64_t i = 0; i < bs; ++i)
        for (int64_t j = 0; j < bs; ++j)
          if ((src[i * words + (j >> 5)] >> (j & 31)) & 1u) dst[j * words + (i >> 5)] |= 1u << (i & 31);
    }
  });
  return out;
}

// The offset of the bias's [Tq, Tk] slice that head (b, h) reads (and its dbias slice).
template <typename T>
int64_t BiasSlice(const FusedAttentionParams<T>& p, int64_t b, int64_t h) {
  const int64_t bb = p.bias_batch == 1 ? 0 : b, hb = p.bias_heads == 1 ? 0 : h;
  return (bb * p.bias_heads + hb) * p.tq * p.tk;
}

// Adds the bias, then sets the scores of masked entries (in-block mask, key padding) to -inf, on a
// bs x bs tile of block (q0, k0) stored transposed ([j][i], kTransposed: masks are the transposed
// ones) or not ([i][j]).
template <bool kTransposed, typename T, typename Acc>
void ApplyBiasAndMasks(const FusedAttentionParams<T>& p, const uint32_t* masks, int64_t b, int64_t h,
                       int64_t q0, int64_t k0, int32_t mask_id, Acc* tile) {
  const int64_t bs = p.block_size;
  auto at = [bs](int64_t i, int64_t j) { return kTransposed ? j * bs + i : i * bs + j; };
  constexpr Acc kMasked = -std::numeric_limits<Acc>::infinity();
  if (p.bias != nullptr) {  // a -inf bias masks by select: a NaN score there stays out
    const T* bias = p.bias + BiasSlice(p, b, h) + q0 * p.tk + k0;
    for (int64_t i = 0; i < bs; ++i)
      for (int64_t j = 0; j < bs; ++j) {
        const Acc add = static_cast<Acc>(bias[i * p.tk + j]);
        tile[at(i, j)] = add == kMasked ? kMasked : tile[at(i, j)] + add;
      }
  }
  if (mask_id >= 0) {  // a partial block; full blocks (mask id -1) skip this
    ApplyKeepBits(tile, bs, bs, masks + mask_id * bs * p.mask_words, p.mask_words);
  }
  if (p.key_padding_mask != nullptr) {
    const BlockTokens<bool> keep = TokensOf(p, p.key_padding_mask, p.tk, b, k0);
    for (int64_t j = 0; j < bs; ++j) {
      if (keep[j]) continue;
      for (int64_t i = 0; i < bs; ++i) tile[at(i, j)] = kMasked;
    }
  }
  if (SegmentsDiffer(p, b, q0 / bs, k0 / bs)) {  // entries of different segments, like mask bits
    const BlockTokens<int32_t> qs = TokensOf(p, p.q_segment_ids, p.tq, b, q0);
    const BlockTokens<int32_t> ks = TokensOf(p, p.k_segment_ids, p.tk, b, k0);
    for (int64_t i = 0; i < bs; ++i)
      for (int64_t j = 0; j < bs; ++j)
        if (qs[i] != ks[j]) tile[at(i, j)] = kMasked;
  }
}

// Whether entry (q0 + i, k0 + j) of head (b, h) is attended: kept by the block's mask (mask_id, -1 =
// full; masks not transposed), the key padding, the segment ids and a bias other than -inf.
template <typename T>
bool Kept(const FusedAttentionParams<T>& p, int64_t b, int64_t h, int64_t q0, int64_t k0, int32_t mask_id,
          int64_t i, int64_t j) {
  using Acc = typename AccumulatorOf<T>::type;
  if (mask_id >= 0) {
    const uint32_t word = p.masks[(mask_id * p.block_size + i) * p.mask_words + (j >> 5)];
    if (!((word >> (j & 31)) & 1u)) return false;
  }
  if (p.key_padding_mask != nullptr && !TokensOf(p, p.key_padding_mask, p.tk, b, k0)[j]) return false;
  if (p.q_segment_ids != nullptr &&
      TokensOf(p, p.q_segment_ids, p.tq, b, q0)[i] != TokensOf(p, p.k_segment_ids, p.tk, b, k0)[j]) {
    return false;
  }
  return p.bias == nullptr ||
         static_cast<Acc>(p.bias[BiasSlice(p, b, h) + (q0 + i) * p.tk + k0 + j]) !=
             -std::numeric_limits<Acc>::infinity();
}

// Whether none of the n values at x is NaN.
template <typename Acc>
bool NoNaN(const Acc* x, int64_t n) {
  bool none = true;
  for (int64_t i = 0; i < n; ++i) none &= x[i] == x[i];
  return none;
}

// Zeroes the rows (kTransposed: columns) of the padded keys [k0, k0 + bs) of batch entry b in a
// staged bs x D tile (D x bs), so that garbage at padded keys is never read.
template <bool kTransposed, typename T, typename Acc>
void ZeroPaddedKeys(const FusedAttentionParams<T>& p, int64_t b, int64_t k0, Acc* tile) {
  if (p.key_padding_mask == nullptr) return;
  const BlockTokens<bool> keep = TokensOf(p, p.key_padding_mask, p.tk, b, k0);
  const int64_t bs = p.block_size, d = p.head_dim;
  for (int64_t j = 0; j < bs; ++j) {
    if (keep[j]) continue;
    if (kTransposed) {
      for (int64_t c = 0; c < d; ++c) tile[c * bs + j] = 0;
    } else {
      std::fill_n(tile + j * d, d, Acc(0));
    }
  }
}

// The exact path of a product out (+)= W X whose staged X (bs x D, rows = keys k0..) had its
// non-finite values zeroed: adds w(i, j) x[j][c] for each non-finite x[j][c] (read from src, rows
// `stride` apart) and each attended entry (q0 + i, k0 + j), w(i, j) = w[i * wi + j * wj]. Masked
// entries' values are never read; out rows are ld apart.
template <typename T, typename Acc>
void AddNonFiniteProducts(const FusedAttentionParams<T>& p, const Acc* src, int64_t stride, int64_t b, int64_t h,
                          int64_t q0, int64_t k0, int32_t mask_id, const Acc* w, int64_t wi, int64_t wj, Acc* out,
                          int64_t ld) {
  const int64_t bs = p.block_size, d = p.head_dim;
  for (int64_t j = 0; j < bs; ++j) {
    const Acc* x = src + j * stride;
    if (AllFinite(x, d)) continue;
    for (int64_t i = 0; i < bs; ++i) {
      if (!Kept(p, b, h, q0, k0, mask_id, i, j)) continue;
      for (int64_t c = 0; c < d; ++c) {
        if ((x[c] - x[c]) != Acc(0)) out[i * ld + c] += w[i * wi + j * wj] * x[c];
      }
    }
  }
}

// The same with the roles swapped (the gradient's dV += P^T dO and dK += dS^T Q): X's rows are the
// queries q0.., out's rows the keys: adds w(i, j) x[i][c] into out[j][c] for each non-finite x[i][c]
// and each attended entry (q0 + i, k0 + j), w(i, j) = w[i * bs + j].
template <typename T, typename Acc>
void AddNonFiniteProductsT(const FusedAttentionParams<T>& p, const Acc* src, int64_t stride, int64_t b, int64_t h,
                           int64_t q0, int64_t k0, int32_t mask_id, const Acc* w, Acc* out, int64_t ld) {
  const int64_t bs = p.block_size, d = p.head_dim;
  for (int64_t i = 0; i < bs; ++i) {
    const Acc* x = src + i * stride;
    if (AllFinite(x, d)) continue;
    for (int64_t j = 0; j < bs; ++j) {
      if (!Kept(p, b, h, q0, k0, mask_id, i, j)) continue;
      for (int64_t c = 0; c < d; ++c) {
        if ((x[c] - x[c]) != Acc(0)) out[j * ld + c] += w[i * bs + j] * x[c];
      }
    }
  }
}

// Zeroes the entries of a bs x bs tile ([i][j], block (q0, k0) of head (b, h)) that are not
// attended: P and dS of masked entries are 0 by select, whatever NaN their row holds.
template <typename T, typename Acc>
void ZeroUnattended(const FusedAttentionParams<T>& p, int64_t b, int64_t h, int64_t q0, int64_t k0,
                    int32_t mask_id, Acc* tile) {
  const int64_t bs = p.block_size;
  for (int64_t i = 0; i < bs; ++i)
    for (int64_t j = 0; j < bs; ++j)
      if (!Kept(p, b, h, q0, k0, mask_id, i, j)) tile[i * bs + j] = 0;
}

// The first entry (block counter) of block (q0, k0) of head (b, h): entry (i, j) is base + i*Tk + j.
template <typename T>
uint64_t DropoutBase(const FusedAttentionParams<T>& p, int64_t b, int64_t h, int64_t q0, int64_t k0) {
  return static_cast<uint64_t>(((b * p.heads + h) * p.tq + q0) * p.tk + k0);
}

// The (scaled) transpose of the bs x D tile at rows [t0, t0 + bs) of head view `at` of x.
template <typename T, typename Acc>
void LoadScaledTranspose(const FusedAttentionParams<T>& p, const Acc* x, HeadView at, int64_t b, int64_t t0,
                         Acc scale, Acc* dst) {
  const int64_t bs = p.block_size, d = p.head_dim;
  TransposeScaled(x + at.Offset(b, t0), at.Stride(), bs, d, scale, dst);
}

// Rows [t0, t0 + bs) of head view `at` of x (rows at.Stride() apart).
template <typename Acc>
const Acc* Rows(const Acc* x, HeadView at, int64_t b, int64_t t0) {
  return x + at.Offset(b, t0);
}

// Copies rows [t0, t0 + bs) of head view `at` of x into a dense bs x D tile. The products read
// their streamed operand from this copy: rows H*D apart (a multiple of 4 KB for common widths)
// would fall into a few L1 sets and evict each other.
template <typename T, typename Acc>
const Acc* CopyRows(const FusedAttentionParams<T>& p, const Acc* x, HeadView at, int64_t b, int64_t t0, Acc* dst) {
  const Acc* src = Rows(x, at, b, t0);
  for (int64_t r = 0; r < p.block_size; ++r) {
    std::memcpy(dst + r * p.head_dim, src + r * at.Stride(), p.head_dim * sizeof(Acc));
  }
  return dst;
}

// Prefetches rows [t0, t0 + bs) of head view `at` of x into L2: the next block's tile, requested
// while the current block computes (tiles of long sequences come from L3 or memory).
template <typename T, typename Acc>
void PrefetchRows(const FusedAttentionParams<T>& p, const Acc* x, HeadView at, int64_t b, int64_t t0) {
  const char* src = reinterpret_cast<const char*>(Rows(x, at, b, t0));
  const int64_t bytes = p.head_dim * sizeof(Acc), stride = at.Stride() * sizeof(Acc);
  for (int64_t r = 0; r < p.block_size; ++r)
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(src + r * stride + off, 0, 2);
}

// Stores scale * tile ([bs, D]) into rows [t0, t0 + bs) of head view `at` of y.
template <typename T, typename Acc>
void StoreScaled(const FusedAttentionParams<T>& p, Acc* tile, Acc scale, HeadView at, int64_t b, int64_t t0, T* y) {
  const int64_t n = p.block_size * p.head_dim;
  if (scale != Acc(1)) {
    for (int64_t i = 0; i < n; ++i) tile[i] *= scale;
  }
  StoreTile(tile, p.block_size, p.head_dim, y + at.Offset(b, t0), at.Stride());
}

// Blocks over all heads (for the cost estimate only).
template <typename T>
int64_t TotalEntries(const FusedAttentionParams<T>& p) {
  const int64_t layouts = p.shared_layout ? 1 : p.heads;
  int64_t total = 0;
  for (int64_t l = 0; l < layouts; ++l) {
    const int32_t* ptr = p.row_ptr + l * (p.n_q_blocks + 1);
    total += ptr[p.n_q_blocks] - ptr[0];
  }
  return total * (p.heads / layouts);
}

// Whether the products run in bfloat16 (cpu_bf16.h): bfloat16 inputs on a CPU level that has them, for
// tile shapes it serves; otherwise (and for every other dtype) the float32 / float64 products.
template <typename T>
bool Bf16Products(const FusedAttentionParams<T>& p) {
  return std::is_same_v<T, Eigen::bfloat16> && Bf16Serves(p.block_size, p.head_dim);
}

// Rough cycles of a unit of a pass doing `matmuls` bs x bs x D products per block.
template <typename T>
int64_t UnitCost(const FusedAttentionParams<T>& p, int64_t entries, int64_t units, int matmuls) {
  const int64_t per_block = matmuls * 2 * p.block_size * p.block_size * p.head_dim / 16;
  return std::max<int64_t>(1, entries / std::max<int64_t>(1, units)) * per_block + 1000;
}

// The most fixed tiles a work unit takes (see the top of the file).
constexpr int kMaxGroup = 4;

// How many consecutive fixed tiles a unit groups: kMaxGroup, halved while that would leave fewer
// than 8 units per thread (units of causal rows differ in cost and are balanced dynamically).
int64_t GroupSize(tensorflow::OpKernelContext* ctx, int64_t heads, int64_t n_blocks) {
  const int64_t threads = ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
  int64_t g = kMaxGroup;
  while (g > 1 && heads * ((n_blocks + g - 1) / g) < 8 * threads) g /= 2;
  return g;
}

// The entries of `count` (<= kMaxGroup) consecutive rows [first, first + count) of one layout
// head's CSR table (ptr points at that head's pointers), visited by increasing block: Block() is
// the smallest block not yet visited (-1 when done), Entry(g) the entry of row first + g at that
// block (-1 if the row lacks it), Advance() moves past it.
class MergedRows {
 public:
  MergedRows(const int32_t* ptr, const int32_t* entries, int64_t first, int64_t count)
      : entries_(entries), count_(count) {
    for (int64_t g = 0; g < count; ++g) {
      at_[g] = ptr[first + g];
      end_[g] = ptr[first + g + 1];
    }
    block_ = Smallest(-1);
  }
  int32_t Block() const { return block_; }
  int32_t Entry(int64_t g) const {
    return at_[g] < end_[g] && entries_[2 * at_[g]] == block_ ? at_[g] : -1;
  }
  // The block that follows Block() (-1 if none): the one to prefetch.
  int32_t NextBlock() const { return Smallest(block_); }
  void Advance() {
    for (int64_t g = 0; g < count_; ++g) at_[g] += Entry(g) >= 0;
    block_ = Smallest(-1);
  }

 private:
  // The smallest block > after among the rows' next two entries (-1 if none).
  int32_t Smallest(int32_t after) const {
    int32_t best = -1;
    for (int64_t g = 0; g < count_; ++g) {
      for (int32_t e = at_[g]; e < end_[g] && e < at_[g] + 2; ++e) {
        const int32_t block = entries_[2 * e];
        if (block > after) {
          if (best < 0 || block < best) best = block;
          break;
        }
      }
    }
    return best;
  }

  const int32_t* entries_;
  int64_t count_;
  int32_t block_;
  std::array<int32_t, kMaxGroup> at_{}, end_{};
};

}  // namespace

template <typename T>
void FusedAttentionForward(tensorflow::OpKernelContext* ctx, const FusedAttentionParams<T>& p,
                           T* out, typename AccumulatorOf<T>::type* lse) {
  using Acc = typename AccumulatorOf<T>::type;
  const int64_t bs = p.block_size, d = p.head_dim, n_qb = p.n_q_blocks;
  const std::vector<uint32_t> masks_t = TransposedMasks(ctx, p);
  const int64_t group = GroupSize(ctx, p.batch * p.heads, n_qb);
  const int64_t n_groups = (n_qb + group - 1) / group;
  const bool bf16 = Bf16Products(p);  // S^T and P V as bfloat16 products (cpu_bf16.h)
  auto work = [&](int64_t begin, int64_t end) {
    const int64_t tile = bs * d, square = bs * bs, g_tile = group * tile, g_row = group * bs;
    // Per query block of the group: qt, acc, m, l, alpha; shared: st, z, k_tile, v_tile; with bf16, the
    // packed bfloat16 operands (two per float): qt's per query block, K, V and P's shared.
    const int64_t packed = bf16 ? (g_tile + 2 * tile + square + 1) / 2 : 0;
    const auto [qt, acc, m, l, alpha, st, z, k_tile, v_tile, packed_scratch] = ThreadScratch<Acc, 10>(
        {g_tile, g_tile, g_row, g_row, g_row, square, p.dropout ? square : 0, tile, tile, packed});
    uint16_t* const qt_b = reinterpret_cast<uint16_t*>(packed_scratch);
    uint16_t *const k_b = qt_b + g_tile, *const v_b = k_b + tile, *const p_b = v_b + tile;
    int64_t computed = 0;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t qb0 = (unit % n_groups) * group, h = (unit / n_groups) % p.heads;
      const int64_t b = unit / (n_groups * p.heads), count = std::min(group, n_qb - qb0);
      const HeadView qv = QueryView(p, h), kv = KeyView(p, h);
      for (int64_t g = 0; g < count; ++g) {  // bf16: the scale is applied to S^T in float32
        LoadScaledTranspose(p, p.q, qv, b, (qb0 + g) * bs, bf16 ? Acc(1) : p.scale, qt + g * tile);
        if (bf16) PackPairsOf(qt + g * tile, bs, d, bs, qt_b + g * tile);
      }
      std::fill_n(m, count * bs, -std::numeric_limits<Acc>::infinity());
      std::fill_n(l, count * bs, Acc(0));
      std::fill_n(acc, count * tile, Acc(0));  // alpha = 0 at a row's first block: acc must be finite
      MergedRows walk(HeadPointers(p.row_ptr, p.shared_layout, h, n_qb), p.row_entries, qb0, count);
      for (; walk.Block() >= 0; walk.Advance()) {
        const int64_t kb = walk.Block(), k0 = kb * bs;
        std::array<bool, kMaxGroup> live{};  // the group's blocks at kb that segments let meet
        bool any = false;
        for (int64_t g = 0; g < count; ++g) any |= live[g] = walk.Entry(g) >= 0 && SegmentsMeet(p, b, qb0 + g, kb);
        if (!any) continue;
        if (const int32_t next = walk.NextBlock(); next >= 0) {
          PrefetchRows(p, p.k, kv, b, int64_t{next} * bs);
          PrefetchRows(p, p.v, kv, b, int64_t{next} * bs);
        }
        CopyRows(p, p.k, kv, b, k0, k_tile);
        CopyRows(p, p.v, kv, b, k0, v_tile);
        ZeroPaddedKeys<false>(p, b, k0, k_tile);
        ZeroPaddedKeys<false>(p, b, k0, v_tile);
        const bool v_finite = AllFinite(v_tile, tile);
        if (!v_finite) ZeroNonFinite(v_tile, tile);  // their products are added exactly below
        if (bf16) {
          PackRowsOf(k_tile, d, bs, d, k_b);
          PackPairsOf(v_tile, d, bs, d, v_b);
        }
        for (int64_t g = 0; g < count; ++g) {
          if (!live[g]) continue;
          const int32_t e = walk.Entry(g);
          const int64_t q0 = (qb0 + g) * bs;
          ++computed;
          Acc *m_g = m + g * bs, *l_g = l + g * bs, *alpha_g = alpha + g * bs;
          if (bf16) {
            Bf16MatMulOf(RowsOperand(k_b, d), qt_b + g * tile, st, bs, bs, d, bs, true, p.scale, nullptr);
          } else {
            MatMul(k_tile, d, qt + g * tile, bs, st, bs, bs, d, bs);
          }
          const int32_t mask_id = p.row_entries[2 * e + 1];
          ApplyBiasAndMasks<true>(p, masks_t.data(), b, h, q0, k0, mask_id, st);
          OnlineSoftmaxStep(st, bs, bs, m_g, l_g, alpha_g);
          if (p.dropout) {  // l keeps the undropped sum; only the product with V sees the mask
            DropoutTile(z, bs, bs, p.dropout_key, DropoutBase(p, b, h, q0, k0), 1, p.tk,
                        p.dropout_threshold, p.dropout_scale);
            Multiply(st, z, st, bs * bs);
          }
          // acc = alpha acc + P V: the online softmax's rescaling folded into the product.
          if (bf16) {  // P rounded to bfloat16 (st = P^T: the transposed operand of its pairs)
            PackPairsOf(st, bs, bs, bs, p_b);
            Bf16MatMulOf(TransposedOperand(p_b, bs), v_b, acc + g * tile, d, bs, bs, d, false, Acc(1), alpha_g);
          } else {
            MatMulAccumulateTransposedA(st, bs, v_tile, d, acc + g * tile, d, bs, bs, d, alpha_g);
          }
          if (!v_finite) {  // st is P^T: w(i, j) = st[j * bs + i]
            AddNonFiniteProducts(p, Rows(p.v, kv, b, k0), kv.Stride(), b, h, q0, k0, mask_id, st, 1, bs, acc + g * tile,
                                 d);
          }
        }
      }
      for (int64_t g = 0; g < count; ++g) {
        const int64_t q0 = (qb0 + g) * bs;
        const Acc *m_g = m + g * bs, *l_g = l + g * bs;
        Acc* alpha_g = alpha + g * bs;
        // lse is in token order: the block's rows are the tokens of its positions (step 1 or L).
        const int64_t lse_step = p.strided_period == 0 ? 1 : p.strided_period;
        Acc* lse_row = lse + (b * p.heads + h) * p.tq + StridedToken(q0, p.tq, p.strided_period);
        for (int64_t i = 0; i < bs; ++i) {
          // No kept key: output 0, lse -inf. A NaN sum (an attended NaN score) gives NaN for both.
          const bool empty = l_g[i] == 0;
          lse_row[i * lse_step] = empty ? -std::numeric_limits<Acc>::infinity() : m_g[i] + std::log(l_g[i]);
          alpha_g[i] = empty ? Acc(0) : 1 / l_g[i];
        }
        ScaleRows(acc + g * tile, bs, d, d, alpha_g);
        StoreScaled(p, acc + g * tile, Acc(1), qv, b, q0, out);
      }
    }
    computed_blocks[0].fetch_add(computed, std::memory_order_relaxed);
  };
  const int64_t units = p.batch * p.heads * n_groups;
  ParallelForBalanced(ctx, units, UnitCost(p, TotalEntries(p), p.heads * n_groups, 2), work);
}

namespace {

// delta = rowsum(dout * out) - dlse and lse_shift = lse (+inf where lse = -inf, so that
// exp(S - lse_shift) = 0 on empty rows), both [B, H, Tq] by position (the inputs are by token);
// units are (batch, token) rows, read in order.
template <typename T, typename Acc>
void DeltaRows(const FusedAttentionParams<T>& p, const FusedAttentionGradInputs<T>& in, Acc* delta,
               Acc* lse_shift, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / p.tq, token = row % p.tq, t = StridedPosition(token, p.tq, p.strided_period);
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t at = QueryView(p, h).TokenOffset(b, token), bh = (b * p.heads + h) * p.tq;
      const int64_t stat = bh + t, token_stat = bh + token;
      Acc sum = 0;
      for (int64_t c = 0; c < p.head_dim; ++c) sum += in.dout[at + c] * static_cast<Acc>(in.out[at + c]);
      delta[stat] = sum - (in.dlse != nullptr ? in.dlse[token_stat] : Acc(0));
      const Acc l = in.lse[token_stat];
      lse_shift[stat] = l == -std::numeric_limits<Acc>::infinity() ? std::numeric_limits<Acc>::infinity() : l;
    }
  }
}

// The column ranges [bounds[l * (chunks + 1) + c], bounds[l * (chunks + 1) + c + 1]) of layout head l
// that split its blocks into `chunks` runs of about equal size.
template <typename T>
std::vector<int64_t> ChunkBounds(const FusedAttentionParams<T>& p, int64_t chunks, bool one_split) {
  const int64_t layouts = p.shared_layout ? 1 : p.heads, n_kb = p.n_k_blocks;
  std::vector<int64_t> bounds(layouts * (chunks + 1));
  for (int64_t l = 0; l < layouts; ++l) {
    // With one_split every head takes layout 0's key-block ranges (balanced for that layout only).
    const int32_t* ptr = p.col_ptr + (one_split ? 0 : l) * (n_kb + 1);
    const int64_t total = ptr[n_kb] - ptr[0];
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t target = ptr[0] + c * total / chunks;
      bounds[l * (chunks + 1) + c] = std::lower_bound(ptr, ptr + n_kb, target) - ptr;
    }
    bounds[l * (chunks + 1) + chunks] = n_kb;
  }
  return bounds;
}

// The query rows [out[2c], out[2c + 1]) that the columns of chunk c (bounds of ChunkBounds) reach,
// over all layout heads; [0, 0) for a chunk without blocks.
template <typename T>
std::vector<int64_t> ChunkRows(const FusedAttentionParams<T>& p, const std::vector<int64_t>& bounds,
                               int64_t chunks) {
  const int64_t layouts = p.shared_layout ? 1 : p.heads, n_kb = p.n_k_blocks;
  std::vector<int64_t> out(2 * chunks, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t lo = p.n_q_blocks, hi = 0;
    for (int64_t l = 0; l < layouts; ++l) {
      const int32_t* ptr = p.col_ptr + l * (n_kb + 1);
      for (int64_t kb = bounds[l * (chunks + 1) + c]; kb < bounds[l * (chunks + 1) + c + 1]; ++kb) {
        if (ptr[kb] == ptr[kb + 1]) continue;
        // Column entries are sorted by query block: the first and last bound the column.
        lo = std::min<int64_t>(lo, p.col_entries[2 * ptr[kb]]);
        hi = std::max<int64_t>(hi, p.col_entries[2 * (ptr[kb + 1] - 1)] + 1);
      }
    }
    if (lo < hi) {
      out[2 * c] = lo * p.block_size;
      out[2 * c + 1] = hi * p.block_size;
    }
  }
  return out;
}

// The gradient's groups of heads (b, h): the smallest sets closed under "writes the same dK/dV"
// (one K/V head (b, h / group)) and "writes the same dbias slice" (with dbias), so that one unit
// per (group, chunk) is the only writer of everything it writes. Members are batch-major, and the
// members of one K/V head are consecutive (a run).
struct GradGroups {
  int64_t count = 0, members = 0;
  int64_t n_batch = 0, n_heads = 0;  // groups = n_batch x n_heads; 1 where the dbias broadcasts
  int64_t heads_per_batch = 0;       // members per batch entry
};

template <typename T>
GradGroups MakeGradGroups(const FusedAttentionParams<T>& p, bool by_bias) {
  GradGroups g;
  g.n_batch = by_bias && p.bias_batch == 1 ? 1 : p.batch;
  g.n_heads = by_bias && p.bias_heads == 1 ? 1 : p.kv_heads;
  g.count = g.n_batch * g.n_heads;
  g.heads_per_batch = p.heads / g.n_heads;
  g.members = (p.batch / g.n_batch) * g.heads_per_batch;
  return g;
}

// The head b * H + h of member `member` of group `group`.
template <typename T>
int64_t GroupMember(const FusedAttentionParams<T>& p, const GradGroups& g, int64_t group, int64_t member) {
  const int64_t b = g.n_batch == 1 ? member / g.heads_per_batch : group / g.n_heads;
  const int64_t h = (g.n_heads == 1 ? 0 : (group % g.n_heads) * p.group) + member % g.heads_per_batch;
  return b * p.heads + h;
}

// How many column chunks (each with its own partial dQ buffer) the gradient uses: enough units for
// about four per thread, at most 16 and nKb, and at most 256 MB of partial buffers.
template <typename T>
int64_t GradChunks(tensorflow::OpKernelContext* ctx, const FusedAttentionParams<T>& p, int64_t groups) {
  using Acc = typename AccumulatorOf<T>::type;
  const int64_t threads = ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
  const int64_t partial_bytes = p.batch * p.heads * p.tq * p.head_dim * int64_t{sizeof(Acc)};
  int64_t chunks = std::clamp<int64_t>((4 * threads + groups - 1) / groups, 1, std::max<int64_t>(1, std::min<int64_t>(16, p.n_k_blocks)));
  while (chunks > 1 && chunks * partial_bytes > (int64_t{256} << 20)) --chunks;
  return chunks;
}

}  // namespace

// One pass over key-block columns computes dK and dV of the column and adds dS K into dQ. dQ rows
// are shared by the columns, so each chunk of columns adds into its own partial buffer, summed in
// chunk order at the end: no atomics, and the same bits on every run. (Two passes, one over rows
// for dQ and one over columns for dK/dV, would recompute S and dP twice: 7 instead of 5 products.)
template <typename T>
void FusedAttentionGrad(tensorflow::OpKernelContext* ctx, const FusedAttentionParams<T>& p,
                        const FusedAttentionGradInputs<T>& in, typename AccumulatorOf<T>::type* delta,
                        typename AccumulatorOf<T>::type* lse_shift, T* dq, T* dk, T* dv,
                        typename AccumulatorOf<T>::type* dbias) {
  using Acc = typename AccumulatorOf<T>::type;
  const int64_t bs = p.block_size, d = p.head_dim, n_kb = p.n_k_blocks;

  ParallelFor(ctx, p.batch * p.tq, 4 * p.width, [&](int64_t begin, int64_t end) {
    DeltaRows(p, in, delta, lse_shift, begin, end);
  });

  if (p.batch == 0) return;  // nothing to compute (a broadcast dbias stays 0)
  // A unit is (group, chunk): a group (GradGroups) is one K/V head (b, h / group) and its query
  // heads; with dbias, every head adding into its dbias slices too.
  const bool by_bias = dbias != nullptr;
  const GradGroups gg = MakeGradGroups(p, by_bias);
  const int64_t groups = gg.count;
  const int64_t chunks = GradChunks(ctx, p, groups);
  // The members of a group with different heads (a K/V group, or a bias shared by the heads) add
  // into the same dK/dV or dbias columns: their columns must be split the same way, or two chunks
  // would write the same entries at once. Members that differ only in the batch entry share their
  // head's layout (and so its split).
  const bool one_split = !p.shared_layout && gg.heads_per_batch > 1;
  const std::vector<int64_t> bounds = ChunkBounds(p, chunks, one_split);
  // Chunk c adds into rows [row_lo[c], row_hi[c]) of dQ only (the query rows its columns reach):
  // its partial buffer [B, H, row_hi - row_lo, D] starts at offset[c].
  const std::vector<int64_t> rows = ChunkRows(p, bounds, chunks);
  std::vector<int64_t> offset(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    offset[c + 1] = offset[c] + p.batch * p.heads * (rows[2 * c + 1] - rows[2 * c]) * d;
  }
  // One chunk reaching every row of a head-major float32 (float64) dq has dq's own layout [B, H, Tq, D]:
  // it accumulates in dq itself (no buffer of dq's size: T = 64k, H = 8, D = 64 saves 134 MB).
  Acc* partial = nullptr;
  tensorflow::Tensor partial_tensor;
  const bool in_place = std::is_same_v<T, Acc> && p.head_major && p.strided_period == 0 && chunks == 1 &&
                        rows[0] == 0 && rows[1] == p.tq;
  if constexpr (std::is_same_v<T, Acc>) {
    if (in_place) partial = dq;
  }
  if (!in_place) {
    const absl::Status status = ctx->allocate_temp(tensorflow::DataTypeToEnum<Acc>::value,
                                                   tensorflow::TensorShape({offset[chunks]}), &partial_tensor);
    if (!status.ok()) {
      ctx->SetStatus(status);
      return;
    }
    partial = partial_tensor.flat<Acc>().data();
  }
  ParallelFor(ctx, offset[chunks], 1, [&](int64_t begin, int64_t end) {
    std::fill(partial + begin, partial + end, Acc(0));
  });

  const bool bf16 = Bf16Products(p);  // the five products in bfloat16 (cpu_bf16.h)
  auto work = [&](int64_t begin, int64_t end) {
    const int64_t tile = bs * d, square = bs * bs, dropout = p.dropout ? square : 0;
    const int64_t g_tile = kMaxGroup * tile;
    // Per key block of a group: kt, vt, k_tile, dk_acc, dv_acc; shared: the rest (q_z, do_z: the
    // query tiles with their non-finite values zeroed). With bf16 the packed bfloat16 operands (two per
    // float): kt's, vt's and k_tile's per key block; Q and dO as rows and as pairs, P^T, dS^T, dS shared.
    const int64_t packed = bf16 ? (3 * g_tile + 4 * tile + 3 * square + 1) / 2 : 0;
    const auto [kt, vt, k_tile, dk_acc, dv_acc, s, dp, pd, z, q_tile, do_tile, q_z, do_z, packed_scratch] =
        ThreadScratch<Acc, 14>({g_tile, g_tile, g_tile, g_tile, g_tile, square, square, dropout, dropout, tile, tile,
                                tile, tile, packed});
    uint16_t* const kt_b = reinterpret_cast<uint16_t*>(packed_scratch);
    uint16_t *const vt_b = kt_b + g_tile, *const k_b = vt_b + g_tile, *const q_rows_b = k_b + g_tile;
    uint16_t *const do_rows_b = q_rows_b + tile, *const q_b = do_rows_b + tile, *const do_b = q_b + tile;
    uint16_t *const pt_b = do_b + tile, *const dst_b = pt_b + square, *const ds_b = dst_b + square;
    int64_t computed = 0;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t chunk = unit % chunks, group = unit / chunks;
      // Every member has the same column range (one_split, or one head).
      const int64_t h_first = GroupMember(p, gg, group, 0) % p.heads;
      const int64_t* range = bounds.data() + (p.shared_layout ? 0 : h_first) * (chunks + 1) + chunk;
      const int64_t row_lo = rows[2 * chunk], chunk_rows = rows[2 * chunk + 1] - row_lo;
      for (int64_t kb0 = range[0]; kb0 < range[1]; kb0 += kMaxGroup) {
        const int64_t count = std::min<int64_t>(kMaxGroup, range[1] - kb0);
        std::array<bool, kMaxGroup> v_finite{}, k_finite{};  // per key block of the group
        for (int64_t member = 0; member < gg.members; ++member) {
          const int64_t bh = GroupMember(p, gg, group, member);
          const int64_t b = bh / p.heads, h = bh % p.heads;
          const HeadView qv = QueryView(p, h), kv = KeyView(p, h);
          // A run: the consecutive members that read (and write dK/dV of) one K/V head.
          const auto kv_head = [&](int64_t m) {
            const int64_t x = GroupMember(p, gg, group, m);
            return (x / p.heads) * p.kv_heads + (x % p.heads) / p.group;
          };
          const bool run_start = member == 0 || kv_head(member - 1) != kv_head(member);
          const bool run_end = member + 1 == gg.members || kv_head(member + 1) != kv_head(member);
          if (run_start) {
            for (int64_t g = 0; g < count; ++g) {
              const int64_t k0 = (kb0 + g) * bs;
              LoadScaledTranspose(p, p.k, kv, b, k0, bf16 ? Acc(1) : p.scale, kt + g * tile);  // bf16: S scaled
              LoadScaledTranspose(p, p.v, kv, b, k0, Acc(1), vt + g * tile);
              CopyRows(p, p.k, kv, b, k0, k_tile + g * tile);
              ZeroPaddedKeys<true>(p, b, k0, kt + g * tile);
              ZeroPaddedKeys<true>(p, b, k0, vt + g * tile);
              ZeroPaddedKeys<false>(p, b, k0, k_tile + g * tile);
              v_finite[g] = AllFinite(vt + g * tile, tile);
              k_finite[g] = AllFinite(k_tile + g * tile, tile);
              if (!k_finite[g]) ZeroNonFinite(k_tile + g * tile, tile);  // dQ's products added exactly
              if (bf16) {
                PackPairsOf(kt + g * tile, bs, d, bs, kt_b + g * tile);
                PackPairsOf(vt + g * tile, bs, d, bs, vt_b + g * tile);
                PackPairsOf(k_tile + g * tile, d, bs, d, k_b + g * tile);
              }
            }
            std::fill_n(dk_acc, count * tile, Acc(0));
            std::fill_n(dv_acc, count * tile, Acc(0));
          }
          Acc* dq_chunk = partial + offset[chunk] + bh * chunk_rows * d;  // its row row_lo first
          MergedRows walk(HeadPointers(p.col_ptr, p.shared_layout, h, n_kb), p.col_entries, kb0, count);
          for (; walk.Block() >= 0; walk.Advance()) {
            const int64_t qb = walk.Block(), q0 = qb * bs;
            std::array<bool, kMaxGroup> live{};  // the group's blocks at qb that segments let meet
            bool any = false;
            for (int64_t g = 0; g < count; ++g) {
              live[g] = walk.Entry(g) >= 0 && SegmentsMeet(p, b, qb, kb0 + g);
              any |= live[g];
            }
            if (!any) continue;
            if (const int32_t next = walk.NextBlock(); next >= 0) {
              PrefetchRows(p, p.q, qv, b, int64_t{next} * bs);
              PrefetchRows(p, in.dout, qv, b, int64_t{next} * bs);
            }
            const Acc* q_rows = CopyRows(p, p.q, qv, b, q0, q_tile);
            const Acc* do_rows = CopyRows(p, in.dout, qv, b, q0, do_tile);
            const int64_t stat = bh * p.tq + q0;
            // Non-finite query-side values (NaN q or dout of a query with no kept key, of another
            // segment, or an attended NaN row) must not reach masked entries: the products read
            // zeroed copies and the attended entries' products of those values are added exactly;
            // P and dS of masked entries are zeroed by select.
            const bool q_finite = AllFinite(q_tile, tile), do_finite = AllFinite(do_tile, tile);
            // A NaN lse or delta (a NaN row: an attended NaN score, or a NaN output from V) would turn
            // the masked entries' P or dS = P (dP - delta) into NaN too.
            const bool rows_finite = NoNaN(lse_shift + stat, bs) && AllFinite(delta + stat, bs);  // lse +inf: no key
            const Acc* q_use = q_rows;
            const Acc* do_use = do_rows;
            if (!q_finite) {
              std::copy_n(q_tile, tile, q_z);
              ZeroNonFinite(q_z, tile);
              q_use = q_z;
            }
            if (!do_finite) {
              std::copy_n(do_tile, tile, do_z);
              ZeroNonFinite(do_z, tile);
              do_use = do_z;
            }
            if (bf16) {
              PackRowsOf(q_rows, d, bs, d, q_rows_b);
              PackRowsOf(do_rows, d, bs, d, do_rows_b);
              PackPairsOf(q_use, d, bs, d, q_b);
              PackPairsOf(do_use, d, bs, d, do_b);
            }
            for (int64_t g = 0; g < count; ++g) {
              if (!live[g]) continue;
              ++computed;
              const int32_t e = walk.Entry(g);
              const int64_t k0 = (kb0 + g) * bs;
              const bool exact = !v_finite[g] || !q_finite || !do_finite || !rows_finite;
              if (bf16) {
                Bf16MatMulOf(RowsOperand(q_rows_b, d), kt_b + g * tile, s, bs, bs, d, bs, true, p.scale, nullptr);
              } else {
                MatMul(q_rows, d, kt + g * tile, bs, s, bs, bs, d, bs);  // S = Q (scale K)^T
              }
              const int32_t mask_id = p.col_entries[2 * e + 1];
              ApplyBiasAndMasks<false>(p, p.masks, b, h, q0, k0, mask_id, s);
              ExpMinusRowVector(s, bs, bs, lse_shift + stat);  // P
              if (exact) ZeroUnattended(p, b, h, q0, k0, mask_id, s);
              if (bf16) {
                Bf16MatMulOf(RowsOperand(do_rows_b, d), vt_b + g * tile, dp, bs, bs, d, bs, true, Acc(1), nullptr);
              } else {
                MatMul(do_rows, d, vt + g * tile, bs, dp, bs, bs, d, bs);  // dP = dO V^T
              }
              const Acc* p_used = s;  // the probabilities that multiplied V in the forward
              if (p.dropout) {
                DropoutTile(z, bs, bs, p.dropout_key, DropoutBase(p, b, h, q0, k0), p.tk, 1,
                            p.dropout_threshold, p.dropout_scale);
                Multiply(s, z, pd, bs * bs);
                p_used = pd;
              }
              if (bf16) {  // P rounded to bfloat16
                PackPairsOf(p_used, bs, bs, bs, pt_b);
                Bf16MatMulOf(TransposedOperand(pt_b, bs), do_b, dv_acc + g * tile, d, bs, bs, d, false, Acc(1), nullptr);
              } else {
                MatMulAccumulateTransposedA(p_used, bs, do_use, d, dv_acc + g * tile, d, bs, bs, d);  // dV += P^T dO
              }
              if (!do_finite) {
                AddNonFiniteProductsT(p, Rows(in.dout, qv, b, q0), qv.Stride(), b, h, q0, k0, mask_id, p_used,
                                      dv_acc + g * tile, d);
              }
              SoftmaxGrad(s, dp, p.dropout ? z : nullptr, bs, bs, delta + stat, false);  // dS
              if (exact) ZeroUnattended(p, b, h, q0, k0, mask_id, dp);  // dP there may be NaN
              if (bf16) {  // dS rounded to bfloat16, as rows (dQ) and as pairs (dK)
                PackPairsOf(dp, bs, bs, bs, dst_b);
                PackRowsOf(dp, bs, bs, bs, ds_b);
                Bf16MatMulOf(TransposedOperand(dst_b, bs), q_b, dk_acc + g * tile, d, bs, bs, d, false, Acc(1), nullptr);
              } else {
                MatMulAccumulateTransposedA(dp, bs, q_use, d, dk_acc + g * tile, d, bs, bs, d);  // dK += dS^T Q
              }
              if (!q_finite) {
                AddNonFiniteProductsT(p, Rows(p.q, qv, b, q0), qv.Stride(), b, h, q0, k0, mask_id, dp,
                                      dk_acc + g * tile, d);
              }
              if (bf16) {
                Bf16MatMulOf(RowsOperand(ds_b, bs), k_b + g * tile, dq_chunk + (q0 - row_lo) * d, d, bs, bs, d, false, Acc(1),
                           nullptr);
              } else {
                MatMulAccumulate(dp, bs, k_tile + g * tile, d, dq_chunk + (q0 - row_lo) * d, d, bs, bs, d);  // dQ += dS K
              }
              if (!k_finite[g]) {
                AddNonFiniteProducts(p, Rows(p.k, kv, b, k0), kv.Stride(), b, h, q0, k0, mask_id, dp, bs, 1,
                                     dq_chunk + (q0 - row_lo) * d, d);
              }
              if (dbias != nullptr) {
                Acc* db = dbias + BiasSlice(p, b, h) + q0 * p.tk + k0;
                for (int64_t i = 0; i < bs; ++i)
                  for (int64_t j = 0; j < bs; ++j) db[i * p.tk + j] += dp[i * bs + j];
              }
            }
          }
          if (run_end) {
            for (int64_t g = 0; g < count; ++g) {
              StoreScaled(p, dk_acc + g * tile, p.scale, kv, b, (kb0 + g) * bs, dk);
              StoreScaled(p, dv_acc + g * tile, Acc(1), kv, b, (kb0 + g) * bs, dv);
            }
          }
        }
      }
    }
    computed_blocks[1].fetch_add(computed, std::memory_order_relaxed);
  };
  const int64_t cost = UnitCost(p, p.batch * TotalEntries(p), groups * chunks, 5);
  ParallelForBalanced(ctx, groups * chunks, cost, work);

  // dq = scale * (sum of the partial buffers of the chunks that reach the row), in chunk order. Units
  // are dq's (batch, token) rows, written in order; the buffers' rows are positions t. In place: the
  // same sum of one buffer (0 + x: -0 becomes +0 as there).
  if (in_place) {
    ParallelFor(ctx, offset[1], 2, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) partial[i] = p.scale * (Acc(0) + partial[i]);
    });
    return;
  }
  ParallelFor(ctx, p.batch * p.tq, 2 * chunks * p.width, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.tq, t = StridedPosition(row % p.tq, p.tq, p.strided_period);
      for (int64_t h = 0; h < p.heads; ++h) {
        T* dst = dq + QueryView(p, h).TokenOffset(b, row % p.tq);
        std::array<const Acc*, 16> src;  // GradChunks keeps chunks <= 16
        int64_t n_src = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const int64_t lo = rows[2 * chunk], hi = rows[2 * chunk + 1];
          if (t < lo || t >= hi) continue;
          src[n_src++] = partial + offset[chunk] + ((b * p.heads + h) * (hi - lo) + t - lo) * d;
        }
        for (int64_t c = 0; c < d; ++c) {
          Acc sum = 0;
          for (int64_t i = 0; i < n_src; ++i) sum += src[i][c];
          dst[c] = static_cast<T>(p.scale * sum);
        }
      }
    }
  });
}

void SegmentRanges(tensorflow::OpKernelContext* ctx, const int32_t* ids, int64_t batch, int64_t n_blocks,
                   int64_t block_size, int64_t period, int32_t* ranges) {
  const int64_t len = n_blocks * block_size, step = period == 0 ? 1 : period;
  ParallelFor(ctx, batch * n_blocks, 2 * block_size, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk / n_blocks, t0 = (blk % n_blocks) * block_size;
      const int32_t* x = ids + b * len + StridedToken(t0, len, period);  // the block's tokens are step apart
      int32_t lo = x[0], hi = x[0];
      for (int64_t r = 1; r < block_size; ++r) {
        lo = std::min(lo, x[r * step]);
        hi = std::max(hi, x[r * step]);
      }
      ranges[2 * blk] = lo;
      ranges[2 * blk + 1] = hi;
    }
  });
}

void CountComputedBlocks(int pass, int64_t blocks) {
  computed_blocks[pass].fetch_add(blocks, std::memory_order_relaxed);
}

void FusedComputedBlocks(int64_t counts[2]) {
  counts[0] = computed_blocks[0].load(std::memory_order_relaxed);
  counts[1] = computed_blocks[1].load(std::memory_order_relaxed);
}

#define BSATTN_INSTANTIATE_FUSED(T)                                                            \
  template void FusedAttentionForward<T>(tensorflow::OpKernelContext*,                         \
                                         const FusedAttentionParams<T>&, T*,                   \
                                         AccumulatorOf<T>::type*);                             \
  template void FusedAttentionGrad<T>(tensorflow::OpKernelContext*,                            \
                                      const FusedAttentionParams<T>&,                          \
                                      const FusedAttentionGradInputs<T>&,                      \
                                      AccumulatorOf<T>::type*, AccumulatorOf<T>::type*, T*, T*, \
                                      T*, AccumulatorOf<T>::type*);

BSATTN_INSTANTIATE_FUSED(float);
BSATTN_INSTANTIATE_FUSED(Eigen::half);
BSATTN_INSTANTIATE_FUSED(Eigen::bfloat16);
BSATTN_INSTANTIATE_FUSED(double);
#undef BSATTN_INSTANTIATE_FUSED

}  // namespace bsattn
