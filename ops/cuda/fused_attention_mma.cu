// Tensor-core forward of the fused block-sparse attention, float16/bfloat16 (mma.sync m16n8k16,
// float32 accumulation), flash-attention-2 style.
//
// A CTA owns one query block (BS rows) of one head: warps of 16 query rows (32 at D = 128). The
// row's key blocks stream through shared memory 32 or 64 keys at a time (a 128-key block is two or
// four steps), double buffered with cp.async: step t+1 loads while step t computes
//   S = Q K^T (mma, B fragments by ldmatrix), scale/bias/masks in float32, online softmax,
//   O += P V (P from S's accumulator registers, V fragments by ldmatrix.trans).
// Shared rows are padded by 16 bytes (D + 8 elements) so that ldmatrix's 8 row addresses fall in
// distinct banks. CTAs take query blocks from the last one down: in causal-like layouts the long
// rows start first.
// Grouped-query attention: K/V rows are KVH*D wide, query head h reads K/V head h / group.
// Decoding (FusedParams::decode): a CTA covers a table row of q's queries, or a part of that row's
// entries when the rows are too few for the GPU (split over the keys: DecodeSplits, MergeSplits);
// its rows outside q are staged as zeros, masked, computed by no warp and never stored, the row's
// entries end at the first block at or past key_end (binary search), and the steps of its last
// block stop at key_end, the keys past it zero-filled and masked: nothing outside q, out, lse or
// the written cache is read or written.
// Segment ids: the row's entries are taken in windows of kWindow; the CTA first lists, in shared
// memory, the window's key blocks whose [min, max] ids meet the query block's (one thread per
// entry), marking those where both blocks hold one and the same id (no per-entry rule needed), and
// the pipeline streams only the listed blocks.
// strided_period (FusedParams::row_step): a block's rows are the tokens Token(p0) + r * row_step, so every
// tile (Q, a K/V step, the exact path's V rows) is a strided row set: its first token and a row stride of
// row_step rows; the per-entry rules and the stores use the tokens, the tables, masks and dropout the positions.
// head_major: the tiles' first rows come from QueryIndex / KeyIndex and their row strides from the layout's
// pitch (FusedParams::q_row_stride, kv_row_stride): [B, H, T, D] rows are D elements apart.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "ops/cuda/bsattn_cuda.h"
#include "ops/cuda/cuda_common.cuh"
#include "ops/cuda/fused_common.cuh"
#include "ops/cuda/mma_tiles.cuh"

namespace bsattn_cuda {
namespace {

template <typename T, int BS, int D>
struct ForwardMmaShape {
  // Measured on H100 (tests/device/fused_harness.py, T = 16384, bs = 128, bf16): 32 rows per warp
  // (two m-tiles: each K/V fragment read from shared memory feeds two products) with 32-key steps
  // is 5-8% faster at D = 128; at D = 64 the same change was 2-20% slower (254 registers, half the
  // warps per CTA), so D <= 64 keeps 16 rows per warp and 64-key steps. Q's fragments stay in
  // registers except at 32 rows x D = 128, where the output accumulators need the room.
  static constexpr int kMTiles = BS >= 64 && D > 64 ? 2 : 1;
  static constexpr int kWarps = BS / (16 * kMTiles);
  static constexpr int kThreads = 32 * kWarps;
  static constexpr bool kQInRegisters = kMTiles == 1;
  static constexpr int kKeys = kMTiles == 2 ? 32 : (BS < 64 ? BS : 64);  // keys per step
  static constexpr int kSteps = BS / kKeys;  // steps per key block
  static constexpr int kLd = D + 8;          // shared row stride (elements)
  static constexpr size_t kSharedBytes = sizeof(T) * (BS + 4 * kKeys) * kLd;  // Q, 2 x (K, V)
};

constexpr int kWindow = 256;               // entries listed per window (segment ids)
constexpr int kOneSegment = 1 << 30;       // list flag: both blocks hold one id, the same

// The [min, max] of the n ids at x[0], x[stride], ... (one thread, serially).
__device__ __forceinline__ int2 IdRange(const int32_t* x, int64_t n, int64_t stride) {
  int2 r = make_int2(x[0], x[0]);
  for (int64_t i = 1; i < n; ++i) {
    r.x = min(r.x, x[i * stride]);
    r.y = max(r.y, x[i * stride]);
  }
  return r;
}

// Lists, in order, the entries e of [first, first + n) (n <= kWindow) of query block qb's row whose
// key blocks' ids can meet the query block's q_ids, into list (flagged with kOneSegment where both
// blocks hold one id, the same); returns the count to every thread. warp_counts: NT / 32 ints.
template <int NT>
__device__ int ListLiveEntries(const FusedParams& p, int64_t b, int2 q_ids, int first, int n, int* list,
                               int* warp_counts) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int total = 0;
  for (int base = 0; base < n; base += NT) {
    const int idx = base + threadIdx.x;
    bool live = false;
    int flag = 0;
    if (idx < n) {
      const int64_t kb = p.row_entries[2 * (first + idx)];
      const int2 k_ids = IdRange(p.k_segment_ids + b * p.tk + Token(p, kb * p.bs), BlockKeys(p, kb), p.row_step);
      live = RangesMeet(q_ids, k_ids);
      flag = q_ids.x == q_ids.y && k_ids.x == k_ids.y && q_ids.x == k_ids.x ? kOneSegment : 0;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, live);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = total, round = 0;
    for (int w = 0; w < NT / 32; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      round += warp_counts[w];
    }
    if (live) list[before + __popc(ballot & ((1u << lane) - 1u))] = (first + idx) | flag;
    total += round;
    __syncthreads();  // warp_counts is rewritten by the next round
  }
  return total;
}

template <typename T, int BS, int D>
__global__ void __launch_bounds__(ForwardMmaShape<T, BS, D>::kThreads)
    ForwardMma(FusedParams p, T* out, float* lse) {
  using Shape = ForwardMmaShape<T, BS, D>;
  constexpr int kKeys = Shape::kKeys, kSteps = Shape::kSteps, kNT = Shape::kThreads, kLd = Shape::kLd;
  constexpr int kMT = Shape::kMTiles;
  constexpr int kDSteps = D / 16;     // k-steps of Q K^T
  constexpr int kSTiles = kKeys / 8;  // n-tiles of S
  constexpr int kOTiles = D / 8;      // n-tiles of O
  constexpr int kQFrags = Shape::kQInRegisters ? kDSteps : 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* k_s = q_s + BS * kLd;            // [2][kKeys][kLd]
  T* v_s = k_s + 2 * kKeys * kLd;     // [2][kKeys][kLd]

  __shared__ int live_s[kWindow];              // the window's listed entries (segment ids)
  __shared__ int warp_counts_s[kNT / 32];

  const int split = static_cast<int>(blockIdx.x % p.n_split);
  const int64_t qb = p.row0 + p.n_rows - 1 - blockIdx.x / p.n_split, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int2 range = TableRange(p.row_ptr, p.shared_layout, h, p.n_qb, qb);
  if (p.decode) {  // the row's entries with Kb * BS < key_end (sorted by Kb)
    int lo = range.x, hi = range.y;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (int64_t{p.row_entries[2 * mid]} * BS < p.key_end) lo = mid + 1; else hi = mid;
    }
    range.y = lo;
  }
  if (p.n_split > 1) {  // this split's part of the entries (possibly none)
    const int per = (range.y - range.x + p.n_split - 1) / p.n_split;
    range.x = min(range.y, range.x + split * per);
    range.y = min(range.y, range.x + per);
  }
  const bool segments = p.q_segment_ids != nullptr;
  const int2 q_ids = segments ? QueryBlockIds(p, b, qb, lane) : make_int2(0, 0);
  const int2 q_rows = QueryRows(p, qb);  // absolute rows of the block that q holds
  const int q_lo = q_rows.x - static_cast<int>(qb * BS), q_hi = q_rows.y - static_cast<int>(qb * BS);
  // Row q_lo (its token), the tile's rows q_row_stride elements apart; K/V token 0 of the head, tokens
  // kv_layout.pitch apart.
  const T* q_g = static_cast<const T*>(p.q) + QueryIndex(p, b, h, Token(p, q_rows.x) - p.q_offset);
  const T* k_g = static_cast<const T*>(p.k) + KeyIndex(p, b, h / p.group, 0);
  const T* v_g = static_cast<const T*>(p.v) + KeyIndex(p, b, h / p.group, 0);
  int window = range.x;  // the first entry of the current window
  auto entry_at = [&](int step) {  // the row entry of a step of the window, and whether it is one-segment
    const int listed = segments ? live_s[step / kSteps] : window + step / kSteps;
    return make_int2(listed & (kOneSegment - 1), listed & kOneSegment);
  };
  auto first_key = [&](int step) {  // absolute key index (position) of a step's first key
    return int64_t{p.row_entries[2 * entry_at(step).x]} * BS + (step % kSteps) * kKeys;
  };
  auto load_step = [&](int step) {
    const int buf = step & 1;
    const int64_t k0 = first_key(step), k_row = Token(p, k0) * p.kv_layout.pitch;
    const int n = static_cast<int>(min(int64_t{kKeys}, p.key_end - k0));  // keys that may be read
    if (n == kKeys) {
      LoadTileAsync<T, D, kNT>(k_s + buf * kKeys * kLd, k_g + k_row, p.kv_row_stride, kKeys);
      LoadTileAsync<T, D, kNT>(v_s + buf * kKeys * kLd, v_g + k_row, p.kv_row_stride, kKeys);
    } else {
      LoadTileRowsAsync<T, D, kNT>(k_s + buf * kKeys * kLd, k_g + k_row, p.kv_row_stride, kKeys, 0, n);
      LoadTileRowsAsync<T, D, kNT>(v_s + buf * kKeys * kLd, v_g + k_row, p.kv_row_stride, kKeys, 0, n);
    }
  };
  auto start_window = [&]() {  // lists the window's entries; loads step 0; returns the step count
    const int n = min(kWindow, range.y - window);
    const int listed = segments ? ListLiveEntries<kNT>(p, b, q_ids, window, n, live_s, warp_counts_s) : n;
    int steps = listed * kSteps;
    if (steps > 0) {  // decoding: the last block's steps at or past key_end are not run
      const int64_t k_last = int64_t{p.row_entries[2 * entry_at(steps - 1).x]} * BS;
      if (k_last + BS > p.key_end) steps -= kSteps - static_cast<int>((p.key_end - k_last + kKeys - 1) / kKeys);
    }
    if (steps > 0) load_step(0);
    CpAsyncCommit();
    return steps;
  };

  if (q_lo == 0 && q_hi == BS) {
    LoadTileAsync<T, D, kNT>(q_s, q_g, p.q_row_stride, BS);
  } else {
    LoadTileRowsAsync<T, D, kNT>(q_s, q_g, p.q_row_stride, BS, q_lo, q_hi);
  }
  int n_steps = start_window();
  CpAsyncWait<0>();
  __syncthreads();
  const int row_base = warp * 16 * kMT;  // this warp's first row; m-tile mt holds rows + 16 mt
  const bool warp_live = row_base < q_hi && row_base + 16 * kMT > q_lo;  // always without decoding
  uint32_t q_frag[kMT][kQFrags][4];
  if constexpr (Shape::kQInRegisters) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk) LoadA(q_frag[mt][kk], q_s, kLd, row_base + 16 * mt, kk * 16, lane);
  }

  // This thread's rows (local to the block): row_base + 16 mt + lane/4 (+ 8 for the second half); their
  // positions qi_base + 16 mt + 8 half, q's rows (tokens) q_row(mt, half) (recomputed where used: no live register).
  const int64_t qi_base = qb * BS + row_base + lane / 4;
  auto q_row = [&](int mt, int half) {
    return Token(p, qb * BS) + (row_base + lane / 4 + 16 * mt + 8 * half) * p.row_step - p.q_offset;
  };
  float m[kMT][2], l[kMT][2];
  float o[kMT][kOTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
    Zero(o[mt]);
  }
  const bool plain = p.bias == nullptr && p.key_padding_mask == nullptr;  // only full blocks skip all rules
  uint32_t kept_bits[kMT][2] = {};  // the exact path's per-step bits (see AddNonFiniteTerms)
  const float scale_log2 = p.scale * kLog2e;

  for (;;) {
  for (int step = 0; step < n_steps; ++step) {
    const int buf = step & 1;
    const T* ks = k_s + buf * kKeys * kLd;
    T* vs = v_s + buf * kKeys * kLd;
    // A V tile with a non-finite value (rare: CTA-uniform) takes the exact path: P V runs with those
    // values zeroed and the kept entries' products of them are added after (AddNonFiniteTerms).
    const bool v_bad = AwaitStepNonFinite<T, D, kNT>(step, n_steps, load_step, vs, kKeys);
    if (v_bad) {
      ZeroOwnNonFinite<T, D, kNT>(vs, kKeys);
      __syncthreads();
    }

    // Decoding: a warp whose rows are all outside q computes nothing (it still loads and synchronises).
    if (warp_live) {
      float s[kMT][kSTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) Zero(s[mt]);
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk) {
        uint32_t qa[kMT][4];
        if constexpr (!Shape::kQInRegisters) {
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) LoadA(qa[mt], q_s, kLd, row_base + 16 * mt, kk * 16, lane);
        }
#pragma unroll
        for (int np = 0; np < kSTiles / 2; ++np) {
          uint32_t bk[4];
          LoadBTransposed(bk, ks, kLd, np * 16, kk * 16, lane);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            const uint32_t(&a)[4] = Shape::kQInRegisters ? q_frag[mt][kk % kQFrags] : qa[mt];
            Mma<T>(s[mt][2 * np], a, bk[0], bk[1]);
            Mma<T>(s[mt][2 * np + 1], a, bk[2], bk[3]);
          }
        }
      }

      // Scores in log2 units, with the bias and the masks.
      const int2 entry = entry_at(step);
      const int32_t mask_id = p.row_entries[2 * entry.x + 1];
      // Segment ids need the per-entry rule unless both blocks hold one id, the same.
      const int64_t k0 = first_key(step);
      // Keys past key_end (decoding) need the per-entry rule too (rows outside q may take the plain
      // path: their results are never stored).
      const bool plain_step = plain && (!segments || entry.y != 0) && k0 + kKeys <= p.key_end;
      const int bj0 = (step % kSteps) * kKeys;  // first key of the step within its block
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        if (plain_step && mask_id < 0) {
#pragma unroll
          for (int t = 0; t < kSTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][t][e] *= scale_log2;
        } else {
          const int r0 = row_base + 16 * mt + lane / 4;
          const uint32_t* mask_rows[2] = {MaskRow(p, mask_id, r0), MaskRow(p, mask_id, r0 + 8)};
#pragma unroll
          for (int t = 0; t < kSTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int half = e / 2, col = t * 8 + (lane % 4) * 2 + (e & 1);
              const float offset = ScoreOffset<T>(p, b, h, q_row(mt, half), Token(p, k0) + col * p.row_step,
                                                  mask_rows[half], bj0 + col);
              s[mt][t][e] = ScaledScore(s[mt][t][e], p.scale, offset) * kLog2e;
            }
        }

        if (v_bad) {  // kept entries (slot 2t + (e & 1) of rows `half`)
#pragma unroll
          for (int t = 0; t < kSTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (s[mt][t][e] != -INFINITY) kept_bits[mt][e / 2] |= 1u << (2 * t + (e & 1));
        }

        // Online softmax over the step's keys, rows r0 (e = 0, 1) and r0 + 8 (e = 2, 3).
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float mx = -INFINITY;
#pragma unroll
          for (int t = 0; t < kSTiles; ++t) mx = fmaxf(mx, fmaxf(s[mt][t][2 * half], s[mt][t][2 * half + 1]));
          const float m_new = fmaxf(m[mt][half], QuadMax(mx));
          const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row masked so far stays at 0
          const float alpha = exp2f(m[mt][half] - m_use);
          float sum = 0.0f;
#pragma unroll
          for (int t = 0; t < kSTiles; ++t) {
            s[mt][t][2 * half] = exp2f(s[mt][t][2 * half] - m_use);
            s[mt][t][2 * half + 1] = exp2f(s[mt][t][2 * half + 1] - m_use);
            sum += s[mt][t][2 * half] + s[mt][t][2 * half + 1];
          }
          l[mt][half] = l[mt][half] * alpha + sum;  // this thread's columns; summed over the quad at the end
          m[mt][half] = m_new;
#pragma unroll
          for (int t = 0; t < kOTiles; ++t) {
            o[mt][t][2 * half] *= alpha;
            o[mt][t][2 * half + 1] *= alpha;
          }
        }
        if (p.dropout) {  // l keeps the undropped sum; only the product with V sees the mask
#pragma unroll
          for (int t = 0; t < kSTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = t * 8 + (lane % 4) * 2 + (e & 1);
              s[mt][t][e] *= DropoutFactor(p, b, h, qi_base + 16 * mt + 8 * (e / 2), k0 + col);
            }
        }
      }

      if (v_bad) {  // nonzero (dropped-out or underflowed) probabilities of the kept entries
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int t = 0; t < kSTiles; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (s[mt][t][e] != 0.0f) kept_bits[mt][e / 2] |= 1u << (16 + 2 * t + (e & 1));
      }

      // O += P V: the S accumulators of n-tiles 2kt and 2kt+1 are the A fragment of key step kt.
#pragma unroll
      for (int kt = 0; kt < kKeys / 16; ++kt) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) AccumulatorsAsA<T>(a[mt], s[mt], kt);
#pragma unroll
        for (int dp = 0; dp < kOTiles / 2; ++dp) {
          uint32_t bv[4];
          LoadB(bv, vs, kLd, kt * 16, dp * 16, lane);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            Mma<T>(o[mt][2 * dp], a[mt], bv[0], bv[1]);
            Mma<T>(o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
          }
        }
      }
      if (v_bad) {  // key j of the step is held by lane 4 * (lane / 4) + (j % 8) / 2 in slot 2 (j / 8) + j % 2
        const T* v_rows = v_g + Token(p, first_key(step)) * p.kv_layout.pitch;
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            AddNonFiniteTerms<T, kOTiles>(
                o[mt], half, kept_bits[mt][half], 0u, v_rows, p.kv_row_stride, kKeys, lane,
                [lane](int j) { return (lane & ~3) | ((j % 8) / 2); }, [](int j) { return 2 * (j / 8) + (j % 2); });
            kept_bits[mt][half] = 0;
          }
      }
    }
    __syncthreads();  // every warp is done with this buffer before step + 2 loads into it
  }
  window += kWindow;  // the next window, if any (its list overwrites this one's: all steps are done)
  if (window >= range.y) break;
  n_steps = start_window();
  CpAsyncWait<0>();
  __syncthreads();
  }

  // out = O / l (0 for a row without kept keys), lse = m + log2(l) in natural units.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float total = QuadSum(l[mt][half]);
      const bool empty = total == 0.0f;  // no kept key (a NaN sum: an attended NaN score, NaN row)
      const float inv = empty ? 0.0f : 1.0f / total;
      const int64_t qi = q_row(mt, half);  // q's row (token)
      if (qi < 0 || qi >= p.tq) continue;  // decoding: a row outside q (uniform over its quad)
      if (p.n_split > 1) {  // the unnormalised partial row and its (m, l), merged by MergeSplits
        const int64_t row = split * p.batch * p.heads * p.tq + (b * p.heads + h) * p.tq + qi;
        float* part = p.split_out + row * D;
#pragma unroll
        for (int t = 0; t < kOTiles; ++t) {
          *reinterpret_cast<float2*>(part + t * 8 + (lane % 4) * 2) =
              make_float2(o[mt][t][2 * half], o[mt][t][2 * half + 1]);
        }
        if (lane % 4 == 0) *reinterpret_cast<float2*>(p.split_ml + 2 * row) = make_float2(m[mt][half], total);
        continue;
      }
      T* out_row = out + QueryIndex(p, b, h, qi);
#pragma unroll
      for (int t = 0; t < kOTiles; ++t) {
        const uint32_t packed = Pack<T>(o[mt][t][2 * half] * inv, o[mt][t][2 * half + 1] * inv);
        *reinterpret_cast<uint32_t*>(out_row + t * 8 + (lane % 4) * 2) = packed;
      }
      if (lane % 4 == 0) {
        lse[(b * p.heads + h) * p.tq + qi] = empty ? -INFINITY : (m[mt][half] + log2f(total)) * kLn2;
      }
    }
}

// out and lse of each decoded row from the n_split partial rows: M = max m_s, w_s = 2^(m_s - M),
// out = sum w_s o_s / sum w_s l_s, lse = (M + log2 sum w_s l_s) ln 2; one warp per (b, h, row).
template <typename T>
__global__ void MergeSplits(FusedParams p, T* out, float* lse) {
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32, rows = p.batch * p.heads * p.tq;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float m_max = -INFINITY;
  for (int s = 0; s < p.n_split; ++s) m_max = fmaxf(m_max, p.split_ml[2 * (s * rows + row)]);
  float total = 0.0f;
  for (int s = 0; s < p.n_split; ++s) {
    const float2 ml = *reinterpret_cast<const float2*>(p.split_ml + 2 * (s * rows + row));
    // A split without kept keys adds nothing; one whose only attended scores are NaN (m -inf, l NaN)
    // makes the row NaN, as in one CTA.
    if (ml.x != -INFINITY) {
      total += exp2f(ml.x - m_max) * ml.y;
    } else if (ml.y != 0.0f) {
      total = NAN;
    }
  }
  const bool empty = total == 0.0f;
  const int64_t b = row / (p.heads * p.tq), h = (row / p.tq) % p.heads, t = row % p.tq;
  T* dst = out + QueryIndex(p, b, h, t);
  for (int64_t d = lane; d < p.head_dim; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < p.n_split; ++s) {
      const float m_s = p.split_ml[2 * (s * rows + row)];
      if (m_s != -INFINITY) acc += exp2f(m_s - m_max) * p.split_out[(s * rows + row) * p.head_dim + d];
    }
    dst[d] = FromFloat<T>(empty ? 0.0f : acc / total);
  }
  if (lane == 0) lse[(b * p.heads + h) * p.tq + t] = empty ? -INFINITY : (m_max + log2f(total)) * kLn2;
}

// Key splits of a decoding step: enough CTAs for about two per SM, at most 64 and one per key block;
// $BSATTN_DECODE_SPLITS = N fixes the count (1 = no split). 1 without decoding.
int DecodeSplits(const FusedParams& p) {
  if (!p.decode) return 1;
  static const int fixed = [] {
    const char* v = std::getenv("BSATTN_DECODE_SPLITS");
    return v != nullptr ? std::atoi(v) : 0;
  }();
  int64_t want = fixed;
  if (want <= 0) {
    int device = 0, sms = 132;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const int64_t ctas = std::max<int64_t>(1, p.n_rows * p.heads * p.batch);
    want = (2 * sms + ctas - 1) / ctas;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, 64, p.n_kb})));
}

template <typename T, int BS, int D>
void LaunchForward(const FusedParams& p, void* out, float* lse, cudaStream_t stream) {
  using Shape = ForwardMmaShape<T, BS, D>;
  auto kernel = ForwardMma<T, BS, D>;
  if (Shape::kSharedBytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Shape::kSharedBytes));
  FusedParams q = p;
  q.n_split = DecodeSplits(p);
  const int64_t rows = p.batch * p.heads * p.tq;
  void* workspace = nullptr;  // stream-ordered: freed after the merge, no host wait
  if (q.n_split > 1 && cudaMallocAsync(&workspace, sizeof(float) * q.n_split * rows * (D + 2), stream) != cudaSuccess) {
    q.n_split = 1;  // no memory for the partial rows: one CTA per row
    workspace = nullptr;
  }
  if (workspace != nullptr) {
    q.split_out = static_cast<float*>(workspace);
    q.split_ml = q.split_out + q.n_split * rows * D;
  }
  const dim3 grid(static_cast<unsigned>(p.n_rows * q.n_split), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, Shape::kThreads, Shape::kSharedBytes, stream>>>(q, static_cast<T*>(out), lse);
  if (workspace != nullptr) {
    MergeSplits<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(q, static_cast<T*>(out), lse);
    cudaFreeAsync(workspace, stream);
  }
}

template <typename T, int BS>
bool ByHeadDim(const FusedParams& p, void* out, float* lse, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: LaunchForward<T, BS, 32>(p, out, lse, stream); return true;
    case 64: LaunchForward<T, BS, 64>(p, out, lse, stream); return true;
    case 128: LaunchForward<T, BS, 128>(p, out, lse, stream); return true;
    default: return false;
  }
}

template <typename T>
bool ByBlockSize(const FusedParams& p, void* out, float* lse, cudaStream_t stream) {
  switch (p.bs) {
    case 16: return ByHeadDim<T, 16>(p, out, lse, stream);
    case 32: return ByHeadDim<T, 32>(p, out, lse, stream);
    case 64: return ByHeadDim<T, 64>(p, out, lse, stream);
    case 128: return ByHeadDim<T, 128>(p, out, lse, stream);
    default: return false;
  }
}

bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

bool LaunchForwardMma(const FusedParams& p, void* out, float* lse, cudaStream_t stream) {
  // cp.async moves 16-byte vectors and the output is stored in 4-byte pairs.
  if (!Aligned16(p.q) || !Aligned16(p.k) || !Aligned16(p.v) || !Aligned16(out)) return false;
  if (p.dtype == BSATTN_FLOAT16) return ByBlockSize<__half>(p, out, lse, stream);
  if (p.dtype == BSATTN_BFLOAT16) return ByBlockSize<__nv_bfloat16>(p, out, lse, stream);
  return false;
}

}  // namespace bsattn_cuda
