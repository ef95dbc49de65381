// Tensor-core backward of the fused block-sparse attention, float16/bfloat16 (mma.sync m16n8k16,
// float32 accumulation), flash-attention-2 style: one pass over key-block columns.
//
//   GradColumnMma  a CTA per key block (BS keys, BS/16 warps of 16 keys) of one KV head walks the
//                  column table of every query head of the head's group (GQA: dK, dV summed in
//                  registers over the group, one writer, no atomics), kStep queries at a time, in
//                  the transposed orientation: S^T = K Q^T, dP^T = V dO^T, P from the saved lse,
//                  dS = P (dP Z - delta), dV += (P Z)^T dO, dK += dS^T Q, dbias += dS (one writer
//                  per entry: with dbias a CTA walks every head that adds into its dbias slices),
//                  and, with kDq, dQ += dS K through shared memory, added into a float32 buffer with
//                  atomics (FA2's scheme: 5 products per block instead of the two-pass split's 7).
//   GradQMma       (deterministic mode) a CTA per query block walks the row table and writes dQ
//                  itself: S, P, dP, dS again, dQ = dS K (one writer: the same inputs, the same bits).
//                  The column kernel then runs without dQ.
// Operands stream through shared memory kStep rows at a time (double buffered with cp.async);
// fragments are re-read from shared memory with ldmatrix so that the float32 accumulators fit.
//
// The rules of fused_common.cuh: masked entries (in-block mask, key padding, a -inf bias, another
// segment) are never read into a result: their P and dS are 0 by select, in a NaN row too (as the
// CPU kernel, the SIMT kernels and the float64 reference); a row with lse = -inf (no kept key) adds
// nothing even where its q, dout or delta are NaN (dS = 0 by select, and the exact paths skip it); a streamed Q
// or dO tile or a resident K tile holding a non-finite value (a CTA-uniform flag) takes the exact
// path: the product runs on the tile with those values zeroed and the kept entries' products of
// them are added one by one (AddNonFiniteTerms), or, for dQ with a non-finite K, dQ is summed
// element by element over the kept keys. Segment ids: a (Qb, Kb) block whose segment-id ranges
// (per batch entry, seg_ranges) do not overlap is skipped without loads.
// strided_period (FusedParams::row_step): a block's rows are the tokens Token(p0) + r * row_step, so every
// tile (resident K/V or Q/dO, streamed Q/dO or K/V), the lse/delta/segment-id rows, the exact paths' rows,
// the float32 dQ rows and the stores take a block's first token and a row stride of row_step rows; the
// per-entry rules use the tokens, the tables, masks, dropout and dbias the positions.
// head_major: the tiles' first rows come from QueryIndex / KeyIndex and their row strides from the layout's
// pitch (FusedParams::q_row_stride, kv_row_stride): [B, H, T, D] rows are D elements apart.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/bsattn_cuda.h"
#include "ops/cuda/cuda_common.cuh"
#include "ops/cuda/fused_common.cuh"
#include "ops/cuda/mma_tiles.cuh"

namespace bsattn_cuda {
namespace {

template <typename T, int BS, int D>
struct GradMmaShape {
  static constexpr int kStep = BS < 32 ? BS : 32;  // streamed rows per step
  static constexpr int kSteps = BS / kStep;        // steps per block
  static constexpr int kWarps = BS / 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = D + 8;
  static constexpr int kDsLd = BS + 8;  // dS tile [kStep][BS] for dQ (column kernel)
  // dQ tile [kStep][D] over the warps: m-tile w % kMq, kNq n-tiles of 8 columns from (w / kMq) * 8 kNq.
  static constexpr int kMq = kStep / 16;
  static constexpr int kNq = (kMq * D / 8) / kWarps < 2 ? 2 : (kMq * D / 8) / kWarps;
  // Two resident tiles (Q, dO or K, V) of BS rows and two double-buffered streamed tiles.
  static constexpr size_t kTileBytes = sizeof(T) * (2 * BS + 4 * kStep) * kLd;
  static constexpr size_t kDsBytes = sizeof(T) * kStep * kDsLd;
  // + lse, delta, q segment ids x 2 buffers, kept bits [kStep][BS / 32] (non-finite K only).
  static constexpr size_t kSmallBytes = sizeof(float) * 6 * kStep + sizeof(uint32_t) * kStep * ((BS + 31) / 32);
  static constexpr size_t kQSharedBytes = kTileBytes + sizeof(float) * 4 * kStep;
  static constexpr size_t kColumnSharedBytes = kTileBytes + kDsBytes + kSmallBytes;
};

// The CTA groups of the column kernel over (b, KV head). Without dbias a group is one (b, kvh);
// with dbias a group holds every (b, kvh) whose query heads add into a shared dbias slice (bias
// broadcast over the batch and/or the heads), walked in turn by one CTA: each dbias entry has one
// writer. A group of gb x gk groups holds ub x uk units (b, kvh).
struct ColumnGroups {
  int64_t gb, gk, ub, uk;
  __host__ __device__ int64_t count() const { return gb * gk; }
  __host__ __device__ int64_t units() const { return ub * uk; }
};

__host__ __device__ __forceinline__ ColumnGroups MakeColumnGroups(const FusedParams& p, bool with_dbias) {
  ColumnGroups g;
  g.gb = with_dbias && p.bias_batch == 1 ? 1 : p.batch;
  g.gk = with_dbias && p.bias_heads == 1 ? 1 : p.kv_heads;
  g.ub = p.batch / g.gb;
  g.uk = p.kv_heads / g.gk;
  return g;
}

// Whether the segment-id ranges [min, max] of query block qb and key block kb of batch entry b meet
// (always, without segment ids). ranges: [B, nQb] then [B, nKb] int2 (x = min, y = max).
__device__ __forceinline__ bool SegmentsMeet(const FusedParams& p, const int2* ranges, int64_t b, int64_t qb,
                                             int64_t kb) {
  if (ranges == nullptr) return true;
  const int2 q = ranges[b * p.n_qb + qb], k = ranges[p.batch * p.n_qb + b * p.n_kb + kb];
  return q.x <= k.y && k.x <= q.y;
}

// S (or S^T) = X Y^T and dP (or dP^T) = dX Z^T over head dim for one warp's 16 rows: X, dX are the
// resident tiles (rows row0..), Y, Z the streamed ones (kStep rows).
template <typename T, int D, int kNTiles>
__device__ __forceinline__ void TwoProducts(float (&s)[kNTiles][4], float (&dp)[kNTiles][4], const T* x,
                                            const T* dx, const T* y, const T* z, int ld, int row0, int lane) {
  Zero(s);
  Zero(dp);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4], da[4];
    LoadA(a, x, ld, row0, kk * 16, lane);
    LoadA(da, dx, ld, row0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4], db[4];
      LoadBTransposed(b, y, ld, np * 16, kk * 16, lane);
      LoadBTransposed(db, z, ld, np * 16, kk * 16, lane);
      Mma<T>(s[2 * np], a, b[0], b[1]);
      Mma<T>(s[2 * np + 1], a, b[2], b[3]);
      Mma<T>(dp[2 * np], da, db[0], db[1]);
      Mma<T>(dp[2 * np + 1], da, db[2], db[3]);
    }
  }
}

// acc += A W with A = the packed accumulators `w` (16 x kSteps keys) and W the streamed tile
// [kStep][D] (ldmatrix.trans).
template <typename T, int D, int kNTiles>
__device__ __forceinline__ void AccumulateProduct(float (&acc)[D / 8][4], const float (&w)[kNTiles][4],
                                                  const T* tile, int ld, int lane) {
#pragma unroll
  for (int kt = 0; kt < kNTiles / 2; ++kt) {
    uint32_t a[4];
    AccumulatorsAsA<T>(a, w, kt);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      LoadB(b, tile, ld, kt * 16, dp * 16, lane);
      Mma<T>(acc[2 * dp], a, b[0], b[1]);
      Mma<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Stores scale * acc (this warp's 16 rows, row_stride elements apart from `first`, the warp's first row) as T pairs.
template <typename T, int D>
__device__ __forceinline__ void StoreRows(const float (&acc)[D / 8][4], float scale, T* first, int64_t row_stride,
                                          int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    T* row = first + (lane / 4 + 8 * half) * row_stride + (lane % 4) * 2;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      *reinterpret_cast<uint32_t*>(row + t * 8) = Pack<T>(acc[t][2 * half] * scale, acc[t][2 * half + 1] * scale);
    }
  }
}

// Whether the vectors this thread copied into `tile` (rows x D, by LoadTileAsync<T, D, NT>) are finite.
template <typename T, int D, int NT>
__device__ __forceinline__ bool OwnCopiesFinite(const T* tile, int rows) {
  constexpr int kVec = 8, kPerRow = D / kVec;
  bool finite = true;
  for (int idx = threadIdx.x; idx < rows * kPerRow; idx += NT) {
    finite &= Finite8<T>(*reinterpret_cast<const uint4*>(tile + (idx / kPerRow) * (D + 8) + (idx % kPerRow) * kVec));
  }
  return finite;
}

// Key j of a 32-wide step held by lane (lane & ~3) | (j % 8) / 2 in slot 2 (j / 8) + j % 2 (the
// accumulator layout; AddNonFiniteTerms).
__device__ __forceinline__ int OwnerOf(int lane, int j) { return (lane & ~3) | ((j % 8) / 2); }
__device__ __forceinline__ int SlotOf(int j) { return 2 * (j / 8) + (j % 2); }

template <typename T, int BS, int D, bool kDq>
__global__ void __launch_bounds__(GradMmaShape<T, BS, D>::kThreads)
    GradColumnMma(FusedParams p, GradMmaBuffers g, ColumnGroups groups) {
  using Shape = GradMmaShape<T, BS, D>;
  constexpr int kStep = Shape::kStep, kSteps = Shape::kSteps, kNT = Shape::kThreads, kLd = Shape::kLd;
  constexpr int kNTiles = kStep / 8, kDsLd = Shape::kDsLd, kMaskWords = (BS + 31) / 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + BS * kLd;
  T* q_s = v_s + BS * kLd;             // [2][kStep][kLd]
  T* do_s = q_s + 2 * kStep * kLd;     // [2][kStep][kLd]
  T* ds_s = reinterpret_cast<T*>(smem_raw + Shape::kTileBytes);  // [kStep][kDsLd]: dS, query-major
  float* lse_s = reinterpret_cast<float*>(smem_raw + Shape::kTileBytes + Shape::kDsBytes);  // [2][kStep], log2
  float* delta_s = lse_s + 2 * kStep;                                                       // [2][kStep]
  int32_t* qseg_s = reinterpret_cast<int32_t*>(delta_s + 2 * kStep);                        // [2][kStep]
  uint32_t* kept_s = reinterpret_cast<uint32_t*>(qseg_s + 2 * kStep);                       // [kStep][kMaskWords]

  const T* dout = static_cast<const T*>(g.dout);
  const int64_t kb = p.n_kb - 1 - blockIdx.x, group = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k0 = kb * BS;  // the block's first key (position; Token(p, k0) its token, recomputed where used)
  const int r0 = warp * 16 + lane / 4;  // this thread's keys r0, r0 + 8 (within the block)
  const int64_t group_size = p.heads / p.kv_heads;
  const bool has_seg = p.q_segment_ids != nullptr;
  const int64_t g_b = group / groups.gk, g_k = group % groups.gk;

  for (int64_t unit = 0; unit < groups.units(); ++unit) {
    const int64_t b = g_b * groups.ub + unit / groups.uk, kvh = g_k * groups.uk + unit % groups.uk;
    __syncthreads();  // the previous unit is done with every shared tile
    const T* k_g = static_cast<const T*>(p.k) + KeyIndex(p, b, kvh, Token(p, k0));
    const T* v_g = static_cast<const T*>(p.v) + KeyIndex(p, b, kvh, Token(p, k0));
    LoadTileAsync<T, D, kNT>(k_s, k_g, p.kv_row_stride, BS);
    LoadTileAsync<T, D, kNT>(v_s, v_g, p.kv_row_stride, BS);
    CpAsyncCommit();
    CpAsyncWait<0>();
    // A K tile with a non-finite value: dQ is summed element by element (kDq only; S reads K as is).
    const bool k_bad = kDq && __syncthreads_or(!OwnCopiesFinite<T, D, kNT>(k_s, BS));
    int32_t kseg[2] = {0, 0};
    if (has_seg) {
      kseg[0] = p.k_segment_ids[b * p.tk + Token(p, k0 + r0)];
      kseg[1] = p.k_segment_ids[b * p.tk + Token(p, k0 + r0 + 8)];
    }
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    Zero(dk_acc);
    Zero(dv_acc);

    for (int64_t member = 0; member < group_size; ++member) {
      const int64_t h = kvh * group_size + member;
      const int2 range = TableRange(p.col_ptr, p.shared_layout, h, p.n_kb, kb);
      const T* q_g = static_cast<const T*>(p.q) + QueryIndex(p, b, h, 0);  // token 0; tokens q_layout.pitch apart
      const T* do_g = dout + QueryIndex(p, b, h, 0);
      auto next_entry = [&](int e) {  // the first entry from e whose segments can meet this block's
        while (e < range.y && !SegmentsMeet(p, g.seg_ranges, b, p.col_entries[2 * e], kb)) ++e;
        return e;
      };
      auto load = [&](int e, int sub, int buf) {
        const int64_t qt0 = Token(p, int64_t{p.col_entries[2 * e]} * BS + sub * kStep);  // the step's first query
        LoadTileAsync<T, D, kNT>(q_s + buf * kStep * kLd, q_g + qt0 * p.q_layout.pitch, p.q_row_stride, kStep);
        LoadTileAsync<T, D, kNT>(do_s + buf * kStep * kLd, do_g + qt0 * p.q_layout.pitch, p.q_row_stride, kStep);
        for (int i = threadIdx.x; i < kStep; i += kNT) {
          const int64_t stat = (b * p.heads + h) * p.tq + qt0 + i * p.row_step;
          lse_s[buf * kStep + i] = g.lse[stat] == -INFINITY ? INFINITY : g.lse[stat] * kLog2e;
          delta_s[buf * kStep + i] = g.delta[stat];
          if (has_seg) qseg_s[buf * kStep + i] = p.q_segment_ids[b * p.tq + qt0 + i * p.row_step];
        }
      };
      int e = next_entry(range.x), sub = 0, buf = 0;
      if (e < range.y) load(e, 0, 0);
      CpAsyncCommit();
      while (e < range.y) {
        int next_e = e, next_sub = sub + 1;
        if (next_sub == kSteps) {
          next_sub = 0;
          next_e = next_entry(e + 1);
        }
        if (next_e < range.y) {
          load(next_e, next_sub, buf ^ 1);
          CpAsyncCommit();
          CpAsyncWait<1>();
        } else {
          CpAsyncWait<0>();
        }
        T* qs = q_s + buf * kStep * kLd;
        T* dos = do_s + buf * kStep * kLd;
        if (k_bad) {
          for (int i = threadIdx.x; i < kStep * kMaskWords; i += kNT) kept_s[i] = 0;
        }
        // Non-finite Q or dO values (CTA-uniform flags; the barrier also publishes the step's tiles).
        const bool q_fin = OwnCopiesFinite<T, D, kNT>(qs, kStep), do_fin = OwnCopiesFinite<T, D, kNT>(dos, kStep);
        bool q_bad = false, do_bad = false;
        if (__syncthreads_or(!(q_fin && do_fin))) {
          q_bad = __syncthreads_or(!q_fin);
          do_bad = __syncthreads_or(!do_fin);
        }
        float s[kNTiles][4], dp[kNTiles][4];  // transposed: [key][query]
        TwoProducts<T, D, kNTiles>(s, dp, k_s, v_s, qs, dos, kLd, warp * 16, lane);

        const int32_t mask_id = p.col_entries[2 * e + 1];
        const int64_t qs0 = int64_t{p.col_entries[2 * e]} * BS + sub * kStep;  // position
        const int bi0 = sub * kStep;  // first query of the step within its block
        const float* lse_b = lse_s + buf * kStep;
        const float* delta_b = delta_s + buf * kStep;
        uint32_t dk_bits[2] = {}, dk_neg[2] = {}, dv_bits[2] = {};  // exact-path bits (q_bad, do_bad)
#pragma unroll
        for (int t = 0; t < kNTiles; ++t)
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int half = x / 2, bj = r0 + 8 * half, col = t * 8 + (lane % 4) * 2 + (x & 1);
            const int64_t qi = qs0 + col, kj = k0 + bj;
            const bool other_segment = has_seg && qseg_s[buf * kStep + col] != kseg[half];
            // The entry's tokens from its positions (no token kept live across the loop: registers).
            const float offset = other_segment ? -INFINITY
                                               : ScoreOffset<T>(p, b, h, Token(p, qi), Token(p, kj),
                                                                MaskRow(p, mask_id, bi0 + col), bj);
            const bool kept = offset != -INFINITY;
            // P and dS are 0 by select at masked entries (their score may be NaN: a NaN k there, or the NaN
            // lse of a NaN row) and in a row without kept keys (lse = -inf: its delta may be NaN).
            const float prob = kept ? exp2f(ScaledScore(s[t][x], p.scale, offset) * kLog2e - lse_b[col]) : 0.0f;
            const float z = p.dropout ? DropoutFactor(p, b, h, qi, kj) : 1.0f;
            const float ds = lse_b[col] == INFINITY || !kept ? 0.0f : prob * (dp[t][x] * z - delta_b[col]);
            const float pz = prob * z;
            if (g.dbias != nullptr) g.dbias[BiasIndex(p, b, h, qi, kj)] += ds;
            s[t][x] = pz;  // P Z, for dV
            dp[t][x] = ds;  // dS, for dK and dQ
            if (kept && (q_bad || do_bad)) {
              const uint32_t bit = 1u << (2 * t + (x & 1));
              dk_bits[half] |= bit | (ds != 0.0f ? bit << 16 : 0u);
              dk_neg[half] |= ds < 0.0f ? bit : 0u;
              dv_bits[half] |= bit | (pz != 0.0f ? bit << 16 : 0u);
            }
            if constexpr (kDq) {
              ds_s[col * kDsLd + bj] = FromFloat<T>(ds);
              if (k_bad && kept) atomicOr(&kept_s[col * kMaskWords + bj / 32], 1u << (bj % 32));
            }
          }
        if (q_bad || do_bad) {
          __syncthreads();  // every warp has read Q and dO for S and dP
          if (q_bad) ZeroOwnNonFinite<T, D, kNT>(qs, kStep);
          if (do_bad) ZeroOwnNonFinite<T, D, kNT>(dos, kStep);
        }
        if constexpr (kDq) __syncthreads();  // dS complete in shared memory (and the zeroed tiles)
        else if (q_bad || do_bad) __syncthreads();
        AccumulateProduct<T, D, kNTiles>(dv_acc, s, dos, kLd, lane);  // dV += (P Z)^T dO
        AccumulateProduct<T, D, kNTiles>(dk_acc, dp, qs, kLd, lane);  // dK += dS^T Q
        if (q_bad || do_bad) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            if (q_bad) {
              AddNonFiniteTerms<T, D / 8>(dk_acc, half, dk_bits[half], dk_neg[half],
                                          q_g + Token(p, qs0) * p.q_layout.pitch, p.q_row_stride, kStep, lane,
                                          [lane](int j) { return OwnerOf(lane, j); }, SlotOf);
            }
            if (do_bad) {
              AddNonFiniteTerms<T, D / 8>(dv_acc, half, dv_bits[half], 0u, do_g + Token(p, qs0) * p.q_layout.pitch,
                                          p.q_row_stride, kStep, lane, [lane](int j) { return OwnerOf(lane, j); },
                                          SlotOf);
            }
          }
        }
        if constexpr (kDq) {  // dQ[step rows] += dS K, into the float32 buffer
          // The step's rows, q_row_stride apart (dq_acc has q's layout).
          float* dq_rows = g.dq_acc + QueryIndex(p, b, h, Token(p, qs0));
          if (!k_bad) {
            constexpr int kMq = Shape::kMq, kNq = Shape::kNq;
            const int mq = warp % kMq, n0 = (warp / kMq) * kNq * 8;
            if (n0 < D) {
              float acc[kNq][4];
              Zero(acc);
#pragma unroll
              for (int kk = 0; kk < BS / 16; ++kk) {
                uint32_t a[4];
                LoadA(a, ds_s, kDsLd, mq * 16, kk * 16, lane);
#pragma unroll
                for (int np = 0; np < kNq / 2; ++np) {
                  uint32_t bk[4];
                  LoadB(bk, k_s, kLd, kk * 16, n0 + np * 16, lane);
                  Mma<T>(acc[2 * np], a, bk[0], bk[1]);
                  Mma<T>(acc[2 * np + 1], a, bk[2], bk[3]);
                }
              }
#pragma unroll
              for (int half = 0; half < 2; ++half) {
                float* row = dq_rows + (mq * 16 + lane / 4 + 8 * half) * p.q_row_stride + n0 + (lane % 4) * 2;
#pragma unroll
                for (int t = 0; t < kNq; ++t) {
                  atomicAdd(row + t * 8, acc[t][2 * half]);
                  atomicAdd(row + t * 8 + 1, acc[t][2 * half + 1]);
                }
              }
            }
          } else {  // exact: sum over the kept keys only, K as loaded
            for (int idx = threadIdx.x; idx < kStep * D; idx += kNT) {
              const int i = idx / D, d = idx % D;
              float sum = 0.0f;
              for (int j = 0; j < BS; ++j) {
                if ((kept_s[i * kMaskWords + j / 32] >> (j % 32)) & 1u) {
                  sum = fmaf(ToFloat(ds_s[i * kDsLd + j]), ToFloat(k_s[j * kLd + d]), sum);
                }
              }
              atomicAdd(dq_rows + int64_t{i} * p.q_row_stride + d, sum);
            }
          }
        }
        __syncthreads();  // every warp is done with this buffer (and dS) before the next loads
        e = next_e;
        sub = next_sub;
        buf ^= 1;
      }
      CpAsyncWait<0>();
    }
    const int64_t warp_row = Token(p, k0 + warp * 16);  // this warp's first key (token)
    StoreRows<T, D>(dk_acc, p.scale, static_cast<T*>(g.dk) + KeyIndex(p, b, kvh, warp_row), p.kv_row_stride, lane);
    StoreRows<T, D>(dv_acc, 1.0f, static_cast<T*>(g.dv) + KeyIndex(p, b, kvh, warp_row), p.kv_row_stride, lane);
  }
}

// dQ over query-block rows (deterministic mode): one writer per element.
template <typename T, int BS, int D>
__global__ void __launch_bounds__(GradMmaShape<T, BS, D>::kThreads) GradQMma(FusedParams p, GradMmaBuffers g) {
  using Shape = GradMmaShape<T, BS, D>;
  constexpr int kStep = Shape::kStep, kSteps = Shape::kSteps, kNT = Shape::kThreads, kLd = Shape::kLd;
  constexpr int kNTiles = kStep / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* do_s = q_s + BS * kLd;
  T* k_s = do_s + BS * kLd;           // [2][kStep][kLd]
  T* v_s = k_s + 2 * kStep * kLd;     // [2][kStep][kLd]

  const T* dout = static_cast<const T*>(g.dout);
  const int64_t qb = p.n_qb - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int2 range = TableRange(p.row_ptr, p.shared_layout, h, p.n_qb, qb);
  const int n_steps = (range.y - range.x) * kSteps;
  const int64_t q0 = qb * BS;  // the block's first query (position; Token(p, q0) its token, recomputed where used)
  const T* k_g = static_cast<const T*>(p.k) + KeyIndex(p, b, kvh, 0);  // token 0; tokens kv_layout.pitch apart
  const T* v_g = static_cast<const T*>(p.v) + KeyIndex(p, b, kvh, 0);
  const bool has_seg = p.q_segment_ids != nullptr;
  auto first_key = [&](int step) {  // position of a step's first key
    return int64_t{p.row_entries[2 * (range.x + step / kSteps)]} * BS + (step % kSteps) * kStep;
  };
  auto load_step = [&](int step) {
    const int buf = step & 1;
    const int64_t k_row = Token(p, first_key(step)) * p.kv_layout.pitch;
    LoadTileAsync<T, D, kNT>(k_s + buf * kStep * kLd, k_g + k_row, p.kv_row_stride, kStep);
    LoadTileAsync<T, D, kNT>(v_s + buf * kStep * kLd, v_g + k_row, p.kv_row_stride, kStep);
  };
  LoadTileAsync<T, D, kNT>(q_s, static_cast<const T*>(p.q) + QueryIndex(p, b, h, Token(p, q0)), p.q_row_stride, BS);
  LoadTileAsync<T, D, kNT>(do_s, dout + QueryIndex(p, b, h, Token(p, q0)), p.q_row_stride, BS);
  if (n_steps > 0) load_step(0);
  CpAsyncCommit();

  const int r0 = warp * 16 + lane / 4;  // this thread's rows r0, r0 + 8 (within the block)
  float lse2[2], row_delta[2];
  int32_t qseg[2] = {0, 0};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = Token(p, q0 + r0 + 8 * half), stat = (b * p.heads + h) * p.tq + row;
    // exp2(x - lse2) = 0 for every score of an empty row (lse = -inf): use +inf there.
    lse2[half] = g.lse[stat] == -INFINITY ? INFINITY : g.lse[stat] * kLog2e;
    row_delta[half] = g.delta[stat];
    if (has_seg) qseg[half] = p.q_segment_ids[b * p.tq + row];
  }
  float acc[D / 8][4];
  Zero(acc);
  uint32_t ds_bits[2] = {}, ds_negative[2] = {};  // the exact path's per-step bits (AddNonFiniteTerms)

  for (int step = 0; step < n_steps; ++step) {
    const int buf = step & 1;
    T* ks = k_s + buf * kStep * kLd;
    const T* vs = v_s + buf * kStep * kLd;
    // A K tile with a non-finite value (CTA-uniform) takes the exact path for dQ += dS K: S reads K
    // as it is, then the product runs with those values zeroed and the kept entries' products of
    // them are added after (AddNonFiniteTerms).
    const bool k_bad = AwaitStepNonFinite<T, D, kNT>(step, n_steps, load_step, ks, kStep);
    const int entry = range.x + step / kSteps;
    if (!SegmentsMeet(p, g.seg_ranges, b, qb, p.row_entries[2 * entry])) {  // CTA-uniform: nothing to add
      __syncthreads();
      continue;
    }
    float s[kNTiles][4], dp[kNTiles][4];
    TwoProducts<T, D, kNTiles>(s, dp, q_s, do_s, ks, vs, kLd, warp * 16, lane);
    if (k_bad) {
      __syncthreads();  // every warp has read K for S
      ZeroOwnNonFinite<T, D, kNT>(ks, kStep);
      __syncthreads();
    }

    const int32_t mask_id = p.row_entries[2 * entry + 1];
    const int64_t k0 = first_key(step);
    const int bj0 = (step % kSteps) * kStep;
    const uint32_t* mask_rows[2] = {MaskRow(p, mask_id, r0), MaskRow(p, mask_id, r0 + 8)};
#pragma unroll
    for (int t = 0; t < kNTiles; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2, col = t * 8 + (lane % 4) * 2 + (e & 1);
        const int64_t qi = q0 + r0 + 8 * half, kj = k0 + col;  // positions
        const int64_t tj = Token(p, kj);  // the key's token (from its position: no token kept live)
        const bool other_segment = has_seg && p.k_segment_ids[b * p.tk + tj] != qseg[half];
        const float offset =
            other_segment ? -INFINITY : ScoreOffset<T>(p, b, h, Token(p, qi), tj, mask_rows[half], bj0 + col);
        const bool kept = offset != -INFINITY;
        const float prob = kept ? exp2f(ScaledScore(s[t][e], p.scale, offset) * kLog2e - lse2[half]) : 0.0f;
        const float z = p.dropout ? DropoutFactor(p, b, h, qi, kj) : 1.0f;
        // dS: 0 by select at masked entries and in a row without kept keys (lse = -inf, delta may be NaN there).
        s[t][e] = lse2[half] == INFINITY || !kept ? 0.0f : prob * (dp[t][e] * z - row_delta[half]);
        if (k_bad && kept) {  // slot 2t + (e & 1) of rows `half`: kept, nonzero, negative
          const uint32_t bit = 1u << (2 * t + (e & 1));
          ds_bits[half] |= bit | (s[t][e] != 0.0f ? bit << 16 : 0u);
          ds_negative[half] |= s[t][e] < 0.0f ? bit : 0u;
        }
      }
    AccumulateProduct<T, D, kNTiles>(acc, s, ks, kLd, lane);  // dQ += dS K
    if (k_bad) {
      const T* k_rows = static_cast<const T*>(p.k) + KeyIndex(p, b, kvh, Token(p, k0));
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        AddNonFiniteTerms<T, D / 8>(acc, half, ds_bits[half], ds_negative[half], k_rows, p.kv_row_stride, kStep, lane,
                                    [lane](int j) { return OwnerOf(lane, j); }, SlotOf);
        ds_bits[half] = ds_negative[half] = 0;
      }
    }
    __syncthreads();
  }
  CpAsyncWait<0>();  // a row without blocks still committed its Q / dO loads
  StoreRows<T, D>(acc, p.scale, static_cast<T*>(g.dq) + QueryIndex(p, b, h, Token(p, q0 + warp * 16)), p.q_row_stride,
                  lane);
}

// dq = scale * dq_acc (float32, dq's layout) as T, element by element.
template <typename T>
__global__ void DqFromAccumulator(const float* acc, T* dq, float scale, int64_t n) {
  for (int64_t i = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) * 4; i < n;
       i += int64_t{gridDim.x} * blockDim.x * 4) {
    if (i + 4 <= n) {
      const float4 v = *reinterpret_cast<const float4*>(acc + i);
      uint2 out;
      out.x = Pack<T>(v.x * scale, v.y * scale);
      out.y = Pack<T>(v.z * scale, v.w * scale);
      *reinterpret_cast<uint2*>(dq + i) = out;
    } else {
      for (int64_t j = i; j < n; ++j) dq[j] = FromFloat<T>(acc[j] * scale);
    }
  }
}

template <typename Kernel>
void AllowShared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int BS, int D>
void LaunchGrad(const FusedParams& p, const GradMmaBuffers& g, cudaStream_t stream) {
  using Shape = GradMmaShape<T, BS, D>;
  const ColumnGroups groups = MakeColumnGroups(p, g.dbias != nullptr);
  const dim3 kv_grid(static_cast<unsigned>(p.n_kb), static_cast<unsigned>(groups.count()));
  if (g.deterministic) {
    AllowShared(GradQMma<T, BS, D>, Shape::kQSharedBytes);
    const dim3 q_grid(static_cast<unsigned>(p.n_qb), static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
    GradQMma<T, BS, D><<<q_grid, Shape::kThreads, Shape::kQSharedBytes, stream>>>(p, g);
    AllowShared(GradColumnMma<T, BS, D, false>, Shape::kColumnSharedBytes);
    GradColumnMma<T, BS, D, false><<<kv_grid, Shape::kThreads, Shape::kColumnSharedBytes, stream>>>(p, g, groups);
    return;
  }
  const int64_t n = p.batch * p.tq * p.width;
  cudaMemsetAsync(g.dq_acc, 0, n * sizeof(float), stream);
  AllowShared(GradColumnMma<T, BS, D, true>, Shape::kColumnSharedBytes);
  GradColumnMma<T, BS, D, true><<<kv_grid, Shape::kThreads, Shape::kColumnSharedBytes, stream>>>(p, g, groups);
  const unsigned blocks = static_cast<unsigned>((n / 4 + 255) / 256 < 65536 ? (n / 4 + 255) / 256 + 1 : 65536);
  DqFromAccumulator<T><<<blocks, 256, 0, stream>>>(g.dq_acc, static_cast<T*>(g.dq), p.scale, n);
}

template <typename T, int BS>
bool GradByHeadDim(const FusedParams& p, const GradMmaBuffers& g, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: LaunchGrad<T, BS, 32>(p, g, stream); return true;
    case 64: LaunchGrad<T, BS, 64>(p, g, stream); return true;
    case 128: LaunchGrad<T, BS, 128>(p, g, stream); return true;
    default: return false;
  }
}

template <typename T>
bool GradByBlockSize(const FusedParams& p, const GradMmaBuffers& g, cudaStream_t stream) {
  switch (p.bs) {
    case 16: return GradByHeadDim<T, 16>(p, g, stream);
    case 32: return GradByHeadDim<T, 32>(p, g, stream);
    case 64: return GradByHeadDim<T, 64>(p, g, stream);
    case 128: return GradByHeadDim<T, 128>(p, g, stream);
    default: return false;
  }
}

}  // namespace

bool LaunchGradMma(const FusedParams& p, const GradMmaBuffers& g, cudaStream_t stream) {
  for (const void* ptr : {p.q, p.k, p.v, g.out, g.dout, static_cast<const void*>(g.dq), static_cast<const void*>(g.dk),
                          static_cast<const void*>(g.dv), static_cast<const void*>(g.dq_acc)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  if (p.dtype == BSATTN_FLOAT16) return GradByBlockSize<__half>(p, g, stream);
  if (p.dtype == BSATTN_BFLOAT16) return GradByBlockSize<__nv_bfloat16>(p, g, stream);
  return false;
}

}  // namespace bsattn_cuda
