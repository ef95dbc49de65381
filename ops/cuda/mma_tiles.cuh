// Warp-level tensor-core building blocks of the fused attention kernels (sm_80+): cp.async tile
// loads, ldmatrix, mma.sync m16n8k16 with float32 accumulators, and quad reductions over the four
// threads that share an accumulator row.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, 16-bit A/B): lane l holds rows l/4 and l/4 + 8 and
// columns 2(l%4), 2(l%4)+1 of each 8-column accumulator tile; an A fragment (16x16) is four such
// register pairs: (rows l/4, cols 0-7), (rows l/4+8, cols 0-7), (l/4, 8-15), (l/4+8, 8-15). So the
// accumulators of two adjacent n-tiles, packed to 16 bits, are the A fragment of the next product.
#ifndef BSATTN_OPS_CUDA_MMA_TILES_CUH_
#define BSATTN_OPS_CUDA_MMA_TILES_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ops/cuda/cuda_common.cuh"

namespace bsattn_cuda {
namespace {

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(SharedAddress(smem)), "l"(gmem));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void Ldmatrix4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(smem)));
}
__device__ __forceinline__ void Ldmatrix4Trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SharedAddress(smem)));
}

// c += a (16x16, row) * b (16x8, col), float32 accumulators.
template <typename T>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void Mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void Mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two T (lo in the low half: the lower column).
template <typename T>
__device__ __forceinline__ uint32_t Pack(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t Pack<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t Pack<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// cp.async of `rows` rows of D elements (row stride `stride` elements in global memory) into
// shared rows D + 8 apart, by all NT threads.
template <typename T, int D, int NT>
__device__ __forceinline__ void LoadTileAsync(T* dst, const T* src, int64_t stride, int rows) {
  constexpr int kVec = 8, kPerRow = D / kVec;  // 16-byte vectors per row
  for (int idx = threadIdx.x; idx < rows * kPerRow; idx += NT) {
    const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
    CpAsync16(dst + r * (D + 8) + c, src + r * stride + c);
  }
}

// LoadTileAsync of tile rows [lo, hi) only (src points at row lo), the other rows of the `rows`-row
// tile zero-filled: what decoding stages when a tile's rows (queries outside q, keys not yet written)
// must not be read.
template <typename T, int D, int NT>
__device__ __forceinline__ void LoadTileRowsAsync(T* dst, const T* src, int64_t stride, int rows, int lo, int hi) {
  constexpr int kVec = 8, kPerRow = D / kVec;
  for (int idx = threadIdx.x; idx < rows * kPerRow; idx += NT) {
    const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
    if (r >= lo && r < hi) {
      CpAsync16(dst + r * (D + 8) + c, src + (r - lo) * stride + c);
    } else {
      *reinterpret_cast<uint4*>(dst + r * (D + 8) + c) = make_uint4(0, 0, 0, 0);
    }
  }
}

// Starts loading step + 1 (into the other buffer) and waits until this thread's copies of step's
// tiles have landed (visible to this thread only).
template <typename Load>
__device__ __forceinline__ void AwaitOwnCopies(int step, int n_steps, Load load_step) {
  if (step + 1 < n_steps) {
    load_step(step + 1);
    CpAsyncCommit();
    CpAsyncWait<1>();
  } else {
    CpAsyncWait<0>();
  }
}

// The double-buffered pipeline's step boundary: starts loading step + 1 (into the other buffer)
// and waits, with the whole CTA, until step's tiles have landed. The caller must end each step
// with __syncthreads() so that no warp still reads the buffer step + 2 will load into.
template <typename Load>
__device__ __forceinline__ void AwaitStep(int step, int n_steps, Load load_step) {
  AwaitOwnCopies(step, n_steps, load_step);
  __syncthreads();
}

// Whether the 8 16-bit values of a 16-byte vector are all finite (exponent bits not all ones).
template <typename T>
__device__ __forceinline__ bool Finite8(uint4 w) {
  constexpr uint32_t kExp = std::is_same_v<T, __half> ? 0x7c00u : 0x7f80u;
  bool finite = true;
  for (const uint32_t x : {w.x, w.y, w.z, w.w}) finite &= (x & kExp) != kExp && ((x >> 16) & kExp) != kExp;
  return finite;
}

// AwaitStep that also returns, to every thread, whether `tile` (rows x D, loaded for step by
// LoadTileAsync<T, D, NT>) holds a non-finite value: each thread checks the vectors it copied.
// -DBSATTN_NO_NONFINITE_CHECKS (timing builds only: masked NaN/Inf then leak) skips the check.
template <typename T, int D, int NT, typename Load>
__device__ __forceinline__ bool AwaitStepNonFinite(int step, int n_steps, Load load_step, const T* tile, int rows) {
#ifdef BSATTN_NO_NONFINITE_CHECKS
  AwaitStep(step, n_steps, load_step);
  return false;
#endif
  AwaitOwnCopies(step, n_steps, load_step);
  constexpr int kVec = 8, kPerRow = D / kVec;
  bool finite = true;
  for (int idx = threadIdx.x; idx < rows * kPerRow; idx += NT) {
    finite &= Finite8<T>(*reinterpret_cast<const uint4*>(tile + (idx / kPerRow) * (D + 8) + (idx % kPerRow) * kVec));
  }
  return __syncthreads_or(!finite);
}

// Zeroes the non-finite values of the vectors this thread copied into `tile` (as above); the
// caller synchronises before the tile is read.
template <typename T, int D, int NT>
__device__ __forceinline__ void ZeroOwnNonFinite(T* tile, int rows) {
  constexpr int kVec = 8, kPerRow = D / kVec;
  for (int idx = threadIdx.x; idx < rows * kPerRow; idx += NT) {
    T* x = tile + (idx / kPerRow) * (D + 8) + (idx % kPerRow) * kVec;
    for (int i = 0; i < kVec; ++i) {
      if (!isfinite(ToFloat(x[i]))) x[i] = FromFloat<T>(0.0f);
    }
  }
}

// The exact path of acc (+)= W X for a product that ran with the non-finite values of X zeroed:
// adds w * x for each non-finite x = X[j][col] (X in global memory, rows ld apart, j < n) of each
// entry (row, j) that W keeps, for this thread's accumulator columns col = 8t + 2(lane % 4) + c of
// accumulator rows `half` (acc[t][2 half + c]). Only the signs and zeroness of the weights matter
// (the non-finite term decides the sum), so W arrives as bits: the lane owner_of(j) holds entry
// (row, j) in slot slot_of(j) of `bits` (kept: bit slot, nonzero: bit 16 + slot) and `negative`
// (bit slot). Every lane of the warp must call (the bits are shuffled).
template <typename T, int kTiles, typename OwnerOf, typename SlotOf>
__device__ __forceinline__ void AddNonFiniteTerms(float (&acc)[kTiles][4], int half, uint32_t bits, uint32_t negative,
                                                  const T* x, int64_t ld, int n, int lane, OwnerOf owner_of,
                                                  SlotOf slot_of) {
  for (int j = 0; j < n; ++j) {
    const uint32_t kept = __shfl_sync(0xffffffffu, bits, owner_of(j));
    const uint32_t neg = __shfl_sync(0xffffffffu, negative, owner_of(j));
    const int slot = slot_of(j);
    if (!((kept >> slot) & 1u)) continue;
    const float w = (kept >> (16 + slot)) & 1u ? ((neg >> slot) & 1u ? -1.0f : 1.0f) : 0.0f;
#pragma unroll
    for (int t = 0; t < kTiles; ++t)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float v = ToFloat(x[j * ld + t * 8 + (lane % 4) * 2 + c]);
        if (!isfinite(v)) acc[t][2 * half + c] += w * v;
      }
  }
}

__device__ __forceinline__ float QuadMax(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float QuadSum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The A fragment (16 x 16, row-major) at rows [row0, row0 + 16), columns [col0, col0 + 16) of a
// shared tile with row stride ld.
template <typename T>
__device__ __forceinline__ void LoadA(uint32_t (&a)[4], const T* tile, int ld, int row0, int col0, int lane) {
  Ldmatrix4(a, tile + (row0 + lane % 16) * ld + col0 + (lane / 16) * 8);
}

// B fragments of two n-tiles for X Y^T, Y stored [n][k]: n rows [n0, n0 + 16), k columns
// [k0, k0 + 16). b[0], b[1] serve n-tile n0; b[2], b[3] n-tile n0 + 8.
template <typename T>
__device__ __forceinline__ void LoadBTransposed(uint32_t (&b)[4], const T* tile, int ld, int n0, int k0, int lane) {
  Ldmatrix4(b, tile + (n0 + (lane / 16) * 8 + lane % 8) * ld + k0 + ((lane / 8) % 2) * 8);
}

// B fragments of two n-tiles for X Y, Y stored [k][n]: k rows [k0, k0 + 16), n columns [n0, n0 + 16).
template <typename T>
__device__ __forceinline__ void LoadB(uint32_t (&b)[4], const T* tile, int ld, int k0, int n0, int lane) {
  Ldmatrix4Trans(b, tile + (k0 + ((lane / 8) % 2) * 8 + lane % 8) * ld + n0 + (lane / 16) * 8);
}

// The accumulators of n-tiles 2kt and 2kt + 1 as the A fragment of k-step kt.
template <typename T, int N>
__device__ __forceinline__ void AccumulatorsAsA(uint32_t (&a)[4], const float (&acc)[N][4], int kt) {
  a[0] = Pack<T>(acc[2 * kt][0], acc[2 * kt][1]);
  a[1] = Pack<T>(acc[2 * kt][2], acc[2 * kt][3]);
  a[2] = Pack<T>(acc[2 * kt + 1][0], acc[2 * kt + 1][1]);
  a[3] = Pack<T>(acc[2 * kt + 1][2], acc[2 * kt + 1][3]);
}

template <int N>
__device__ __forceinline__ void Zero(float (&acc)[N][4]) {
#pragma unroll
  for (int t = 0; t < N; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
}

}  // namespace
}  // namespace bsattn_cuda

#endif  // BSATTN_OPS_CUDA_MMA_TILES_CUH_
