// Tensor-core backward of the fused block-sparse attention, float16/bfloat16 (mma.sync m16n8k16,
// float32 accumulation). Two kernels, no atomics (each output element has one writer):
//
//   GradQMma   a CTA per query block (BS rows, BS/16 warps of 16 rows) walks the row table:
//              S = Q K^T, P = exp(S - lse), dP = dO V^T, dS = P (dP Z - delta), dQ += dS K.
//   GradKVMma  a CTA per key block (BS keys, BS/16 warps of 16 keys) walks the column table, in
//              the transposed orientation: S^T = K Q^T, dP^T = V dO^T, dV += (P Z)^T dO,
//              dK += dS^T Q, and adds dS into the float32 dbias accumulator (one writer per entry:
//              with dbias a CTA walks every head that reads its dbias slice).
// Operands stream through shared memory kKeys rows at a time (double buffered with cp.async);
// fragments are re-read from shared memory with ldmatrix rather than held in registers, so that
// the float32 accumulators (S, dP, and dQ or dK + dV) fit without spilling at D = 128.
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
  // Two resident tiles (Q, dO or K, V) of BS rows and two double-buffered streamed tiles.
  static constexpr size_t kTileBytes = sizeof(T) * (2 * BS + 4 * kStep) * kLd;
  static constexpr size_t kSharedBytes = kTileBytes + sizeof(float) * 4 * kStep;  // + lse, delta x 2
};

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

// Stores scale * acc (this warp's rows row0.. of a [B, len, H*D] tensor) as T pairs.
template <typename T, int D>
__device__ __forceinline__ void StoreRows(const float (&acc)[D / 8][4], float scale, T* y, const FusedParams& p,
                                          int64_t len, int64_t b, int64_t h, int64_t row0, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    T* row = y + (b * len + row0 + lane / 4 + 8 * half) * p.width + h * D + (lane % 4) * 2;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      *reinterpret_cast<uint32_t*>(row + t * 8) = Pack<T>(acc[t][2 * half] * scale, acc[t][2 * half + 1] * scale);
    }
  }
}

template <typename T, int BS, int D>
__global__ void __launch_bounds__(GradMmaShape<T, BS, D>::kThreads)
    GradQMma(FusedParams p, const T* dout, const float* lse, const float* delta, T* dq) {
  using Shape = GradMmaShape<T, BS, D>;
  constexpr int kStep = Shape::kStep, kSteps = Shape::kSteps, kNT = Shape::kThreads, kLd = Shape::kLd;
  constexpr int kNTiles = kStep / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* do_s = q_s + BS * kLd;
  T* k_s = do_s + BS * kLd;           // [2][kStep][kLd]
  T* v_s = k_s + 2 * kStep * kLd;     // [2][kStep][kLd]

  const int64_t qb = p.n_qb - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int2 range = TableRange(p.row_ptr, p.shared_layout, h, p.n_qb, qb);
  const int n_steps = (range.y - range.x) * kSteps;
  const int64_t q0 = qb * BS;
  const T* k_g = static_cast<const T*>(p.k) + b * p.tk * p.width + h * D;
  const T* v_g = static_cast<const T*>(p.v) + b * p.tk * p.width + h * D;
  auto first_key = [&](int step) {
    return int64_t{p.row_entries[2 * (range.x + step / kSteps)]} * BS + (step % kSteps) * kStep;
  };
  auto load_step = [&](int step) {
    const int buf = step & 1;
    const int64_t k0 = first_key(step);
    LoadTileAsync<T, D, kNT>(k_s + buf * kStep * kLd, k_g + k0 * p.width, p.width, kStep);
    LoadTileAsync<T, D, kNT>(v_s + buf * kStep * kLd, v_g + k0 * p.width, p.width, kStep);
  };
  LoadTileAsync<T, D, kNT>(q_s, static_cast<const T*>(p.q) + (b * p.tq + q0) * p.width + h * D, p.width, BS);
  LoadTileAsync<T, D, kNT>(do_s, dout + (b * p.tq + q0) * p.width + h * D, p.width, BS);
  if (n_steps > 0) load_step(0);
  CpAsyncCommit();

  const int r0 = warp * 16 + lane / 4;  // this thread's rows r0, r0 + 8 (within the block)
  float lse2[2], row_delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t stat = (b * p.heads + h) * p.tq + q0 + r0 + 8 * half;
    // exp2(x - lse2) = 0 for every score of an empty row (lse = -inf): use +inf there.
    lse2[half] = lse[stat] == -INFINITY ? INFINITY : lse[stat] * kLog2e;
    row_delta[half] = delta[stat];
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
    float s[kNTiles][4], dp[kNTiles][4];
    TwoProducts<T, D, kNTiles>(s, dp, q_s, do_s, ks, vs, kLd, warp * 16, lane);
    if (k_bad) {
      __syncthreads();  // every warp has read K for S
      ZeroOwnNonFinite<T, D, kNT>(ks, kStep);
      __syncthreads();
    }

    const int entry = range.x + step / kSteps;
    const int32_t mask_id = p.row_entries[2 * entry + 1];
    const int64_t k0 = first_key(step);
    const int bj0 = (step % kSteps) * kStep;
    const uint32_t* mask_rows[2] = {MaskRow(p, mask_id, r0), MaskRow(p, mask_id, r0 + 8)};
#pragma unroll
    for (int t = 0; t < kNTiles; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2, col = t * 8 + (lane % 4) * 2 + (e & 1);
        const int64_t qi = q0 + r0 + 8 * half, kj = k0 + col;
        const float offset = ScoreOffset<T>(p, b, h, qi, kj, mask_rows[half], bj0 + col);
        const float prob = exp2f(ScaledScore(s[t][e], p.scale, offset) * kLog2e - lse2[half]);
        const float z = p.dropout ? DropoutFactor(p, b, h, qi, kj) : 1.0f;
        const bool kept = offset != -INFINITY;
        s[t][e] = prob * ((kept ? dp[t][e] : 0.0f) * z - row_delta[half]);  // dS; V is not read at masked entries
        if (k_bad && kept) {  // slot 2t + (e & 1) of rows `half`: kept, nonzero, negative
          const uint32_t bit = 1u << (2 * t + (e & 1));
          ds_bits[half] |= bit | (s[t][e] != 0.0f ? bit << 16 : 0u);
          ds_negative[half] |= s[t][e] < 0.0f ? bit : 0u;
        }
      }
    AccumulateProduct<T, D, kNTiles>(acc, s, ks, kLd, lane);  // dQ += dS K
    if (k_bad) {
      const T* k_rows = static_cast<const T*>(p.k) + (b * p.tk + k0) * p.width + h * D;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        AddNonFiniteTerms<T, D / 8>(
            acc, half, ds_bits[half], ds_negative[half], k_rows, p.width, kStep, lane,
            [lane](int j) { return (lane & ~3) | ((j % 8) / 2); }, [](int j) { return 2 * (j / 8) + (j % 2); });
        ds_bits[half] = ds_negative[half] = 0;
      }
    }
    __syncthreads();
  }
  CpAsyncWait<0>();  // a row without blocks still committed its Q / dO loads
  StoreRows<T, D>(acc, p.scale, dq, p, p.tq, b, h, q0 + warp * 16, lane);
}

template <typename T, int BS, int D>
__global__ void __launch_bounds__(GradMmaShape<T, BS, D>::kThreads)
    GradKVMma(FusedParams p, const T* dout, const float* lse, const float* delta, T* dk, T* dv, float* dbias,
              int64_t members) {
  using Shape = GradMmaShape<T, BS, D>;
  constexpr int kStep = Shape::kStep, kSteps = Shape::kSteps, kNT = Shape::kThreads, kLd = Shape::kLd;
  constexpr int kNTiles = kStep / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + BS * kLd;
  T* q_s = v_s + BS * kLd;             // [2][kStep][kLd]
  T* do_s = q_s + 2 * kStep * kLd;     // [2][kStep][kLd]
  float* lse_s = reinterpret_cast<float*>(smem_raw + Shape::kTileBytes);  // [2][kStep], log2 units
  float* delta_s = lse_s + 2 * kStep;                                     // [2][kStep]

  const int64_t kb = p.n_kb - 1 - blockIdx.x, group = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k0 = kb * BS;
  const int r0 = warp * 16 + lane / 4;  // this thread's keys r0, r0 + 8 (within the block)

  for (int64_t member = 0; member < members; ++member) {
    const int64_t bh = GroupMember(p, dbias != nullptr, group, member);
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const int2 range = TableRange(p.col_ptr, p.shared_layout, h, p.n_kb, kb);
    const int n_steps = (range.y - range.x) * kSteps;
    const T* q_g = static_cast<const T*>(p.q) + b * p.tq * p.width + h * D;
    const T* do_g = dout + b * p.tq * p.width + h * D;
    auto first_query = [&](int step) {
      return int64_t{p.col_entries[2 * (range.x + step / kSteps)]} * BS + (step % kSteps) * kStep;
    };
    auto load_step = [&](int step) {
      const int buf = step & 1;
      const int64_t qs0 = first_query(step);
      LoadTileAsync<T, D, kNT>(q_s + buf * kStep * kLd, q_g + qs0 * p.width, p.width, kStep);
      LoadTileAsync<T, D, kNT>(do_s + buf * kStep * kLd, do_g + qs0 * p.width, p.width, kStep);
      for (int i = threadIdx.x; i < kStep; i += kNT) {
        const int64_t stat = (b * p.heads + h) * p.tq + qs0 + i;
        lse_s[buf * kStep + i] = lse[stat] == -INFINITY ? INFINITY : lse[stat] * kLog2e;
        delta_s[buf * kStep + i] = delta[stat];
      }
    };
    __syncthreads();  // the previous member is done with every shared tile
    LoadTileAsync<T, D, kNT>(k_s, static_cast<const T*>(p.k) + (b * p.tk + k0) * p.width + h * D, p.width, BS);
    LoadTileAsync<T, D, kNT>(v_s, static_cast<const T*>(p.v) + (b * p.tk + k0) * p.width + h * D, p.width, BS);
    if (n_steps > 0) load_step(0);
    CpAsyncCommit();
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
    Zero(dk_acc);
    Zero(dv_acc);

    for (int step = 0; step < n_steps; ++step) {
      AwaitStep(step, n_steps, load_step);
      const int buf = step & 1;
      const T* qs = q_s + buf * kStep * kLd;
      const T* dos = do_s + buf * kStep * kLd;
      float s[kNTiles][4], dp[kNTiles][4];  // transposed: [key][query]
      TwoProducts<T, D, kNTiles>(s, dp, k_s, v_s, qs, dos, kLd, warp * 16, lane);

      const int entry = range.x + step / kSteps;
      const int32_t mask_id = p.col_entries[2 * entry + 1];
      const int64_t qs0 = first_query(step);
      const int bi0 = (step % kSteps) * kStep;  // first query of the step within its block
#pragma unroll
      for (int t = 0; t < kNTiles; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int bj = r0 + 8 * (e / 2), col = t * 8 + (lane % 4) * 2 + (e & 1);
          const int64_t qi = qs0 + col, kj = k0 + bj;
          const float offset = ScoreOffset<T>(p, b, h, qi, kj, MaskRow(p, mask_id, bi0 + col), bj);
          const float prob = exp2f(ScaledScore(s[t][e], p.scale, offset) * kLog2e - lse_s[buf * kStep + col]);
          const float z = p.dropout ? DropoutFactor(p, b, h, qi, kj) : 1.0f;
          const float dp_kept = offset == -INFINITY ? 0.0f : dp[t][e];  // V is not read at masked entries
          const float ds = prob * (dp_kept * z - delta_s[buf * kStep + col]);
          if (dbias != nullptr) dbias[BiasIndex(p, b, h, qi, kj)] += ds;
          s[t][e] = prob * z;  // P Z, for dV
          dp[t][e] = ds;       // dS, for dK
        }
      AccumulateProduct<T, D, kNTiles>(dv_acc, s, dos, kLd, lane);   // dV += (P Z)^T dO
      AccumulateProduct<T, D, kNTiles>(dk_acc, dp, qs, kLd, lane);   // dK += dS^T Q
      __syncthreads();
    }
    CpAsyncWait<0>();  // a column without blocks still committed its K / V loads
    StoreRows<T, D>(dk_acc, p.scale, dk, p, p.tk, b, h, k0 + warp * 16, lane);
    StoreRows<T, D>(dv_acc, 1.0f, dv, p, p.tk, b, h, k0 + warp * 16, lane);
  }
}

template <typename Kernel>
void AllowShared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int BS, int D>
void LaunchGrad(const FusedParams& p, const void* dout, const float* lse, const float* delta, void* dq, void* dk,
                void* dv, float* dbias, cudaStream_t stream) {
  using Shape = GradMmaShape<T, BS, D>;
  AllowShared(GradQMma<T, BS, D>, Shape::kSharedBytes);
  AllowShared(GradKVMma<T, BS, D>, Shape::kSharedBytes);
  const dim3 q_grid(static_cast<unsigned>(p.n_qb), static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  GradQMma<T, BS, D><<<q_grid, Shape::kThreads, Shape::kSharedBytes, stream>>>(
      p, static_cast<const T*>(dout), lse, delta, static_cast<T*>(dq));
  const int64_t groups = GradGroups(p, dbias != nullptr);
  const dim3 kv_grid(static_cast<unsigned>(p.n_kb), static_cast<unsigned>(groups));
  GradKVMma<T, BS, D><<<kv_grid, Shape::kThreads, Shape::kSharedBytes, stream>>>(
      p, static_cast<const T*>(dout), lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), dbias,
      p.batch * p.heads / groups);
}

template <typename T, int BS>
bool GradByHeadDim(const FusedParams& p, const void* dout, const float* lse, const float* delta, void* dq,
                   void* dk, void* dv, float* dbias, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: LaunchGrad<T, BS, 32>(p, dout, lse, delta, dq, dk, dv, dbias, stream); return true;
    case 64: LaunchGrad<T, BS, 64>(p, dout, lse, delta, dq, dk, dv, dbias, stream); return true;
    case 128: LaunchGrad<T, BS, 128>(p, dout, lse, delta, dq, dk, dv, dbias, stream); return true;
    default: return false;
  }
}

template <typename T>
bool GradByBlockSize(const FusedParams& p, const void* dout, const float* lse, const float* delta, void* dq,
                     void* dk, void* dv, float* dbias, cudaStream_t stream) {
  switch (p.bs) {
    case 16: return GradByHeadDim<T, 16>(p, dout, lse, delta, dq, dk, dv, dbias, stream);
    case 32: return GradByHeadDim<T, 32>(p, dout, lse, delta, dq, dk, dv, dbias, stream);
    case 64: return GradByHeadDim<T, 64>(p, dout, lse, delta, dq, dk, dv, dbias, stream);
    case 128: return GradByHeadDim<T, 128>(p, dout, lse, delta, dq, dk, dv, dbias, stream);
    default: return false;
  }
}

}  // namespace

bool LaunchGradMma(const FusedParams& p, const void* out, const void* dout, const float* lse, const float* delta,
                   void* dq, void* dk, void* dv, float* dbias, cudaStream_t stream) {
  for (const void* ptr : {p.q, p.k, p.v, out, dout, static_cast<const void*>(dq), static_cast<const void*>(dk),
                          static_cast<const void*>(dv)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  if (p.dtype == BSATTN_FLOAT16) return GradByBlockSize<__half>(p, dout, lse, delta, dq, dk, dv, dbias, stream);
  if (p.dtype == BSATTN_BFLOAT16)
    return GradByBlockSize<__nv_bfloat16>(p, dout, lse, delta, dq, dk, dv, dbias, stream);
  return false;
}

}  // namespace bsattn_cuda
