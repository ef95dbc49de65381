// CUDA kernels of the unfused block-sparse ops: nt (SDD), nn/tn (DSD) and the masked softmax.
//
// The matmuls have two bodies: tensor-core WMMA (16x16x16 fragments, float32 accumulation) for
// float16/bfloat16 with block sizes >= 16 and head_dim % 16 == 0, and plain SIMT FMA through
// shared-memory tiles for everything else (float32, block size 8, odd head dims).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "ops/cuda/bsattn_cuda.h"
#include "ops/cuda/cuda_common.cuh"

// In bsattn_cuda (as every bsattn kernel): the project's kernels are told apart from library ones by that
// name, e.g. by compute-sanitizer's --kernel-name kns=bsattn_cuda (tests/device/run.sh).
namespace bsattn_cuda {
namespace {

constexpr int kThreads = 256;

// One CTA per output block (blk, h, n). The bs x bs tile is accumulated over head_dim in chunks
// of kChunk columns staged in shared memory (rows padded by one float: no bank conflicts).
template <typename T, int BS>
__global__ void __launch_bounds__(kThreads)
    NtKernel(const T* a, const T* b, const int32_t* lut, T* c, int64_t heads, int64_t a_len,
             int64_t b_len, int64_t width, int64_t head_dim, bool shared_lut, int64_t nnz) {
  constexpr int kChunk = 32;
  constexpr int kPerThread = (BS * BS + kThreads - 1) / kThreads;
  __shared__ float a_s[BS][kChunk + 1];
  __shared__ float b_s[BS][kChunk + 1];
  const int64_t blk = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const int32_t* entry = lut + ((shared_lut ? 0 : h) * nnz + blk) * 2;
  const T* a_tile = a + (n * a_len + int64_t(entry[0]) * BS) * width + h * head_dim;
  const T* b_tile = b + (n * b_len + int64_t(entry[1]) * BS) * width + h * head_dim;
  float acc[kPerThread] = {};
  for (int64_t d0 = 0; d0 < head_dim; d0 += kChunk) {
    for (int idx = threadIdx.x; idx < BS * kChunk; idx += kThreads) {
      const int r = idx / kChunk, d = idx % kChunk;
      const bool inside = d0 + d < head_dim;
      a_s[r][d] = inside ? ToFloat(a_tile[r * width + d0 + d]) : 0.0f;
      b_s[r][d] = inside ? ToFloat(b_tile[r * width + d0 + d]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int idx = threadIdx.x + k * kThreads;
      if (idx < BS * BS) {
        const int i = idx / BS, j = idx % BS;
        float s = 0.0f;
#pragma unroll 8
        for (int d = 0; d < kChunk; ++d) s += a_s[i][d] * b_s[j][d];
        acc[k] += s;
      }
    }
    __syncthreads();
  }
  T* c_tile = c + ((n * heads + h) * nnz + blk) * BS * BS;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int idx = threadIdx.x + k * kThreads;
    if (idx < BS * BS) c_tile[idx] = FromFloat<T>(acc[k]);
  }
}

// One CTA per (output block row r, 64-wide slice of head_dim, h, n). For each entry (blk, p) of
// the row, op(w[blk]) (bs x bs) times the partner rows x[p] (bs x 64) is accumulated, staged
// through shared memory kInner columns of w at a time. w may have its own dtype TW (converted to
// float on load like x). A zero weight is a structural zero (masked key, fully masked query): its
// product with a NaN/Inf in x is 0 (both DSD bodies).
template <typename TW, typename T, int BS, bool kTransposeW>
__global__ void __launch_bounds__(kThreads)
    DsdKernel(const TW* w, const T* x, const int32_t* lut, T* c, int64_t heads, int64_t nnz,
              int64_t x_len, int64_t width, int64_t head_dim, bool shared_lut, int64_t lut_len,
              int64_t n_out, int64_t c_len) {
  constexpr int kSlice = 64;
  constexpr int kInner = BS < 32 ? BS : 32;
  constexpr int kPerThread = (BS * kSlice + kThreads - 1) / kThreads;
  __shared__ float w_s[BS][kInner + 1];
  __shared__ float x_s[kInner][kSlice + 1];
  const int64_t r = blockIdx.x % n_out, d_base = (blockIdx.x / n_out) * kSlice;
  const int64_t h = blockIdx.y, n = blockIdx.z;
  const int32_t* table = lut + (shared_lut ? 0 : h) * lut_len * 2;
  const int32_t offset = table[2 * r], count = table[2 * r + 1];
  float acc[kPerThread] = {};
  for (int32_t e = offset; e < offset + count; ++e) {
    const int64_t blk = table[2 * e], partner = table[2 * e + 1];
    const TW* w_block = w + ((n * heads + h) * nnz + blk) * BS * BS;
    const T* x_rows = x + (n * x_len + partner * BS) * width + h * head_dim + d_base;
    for (int j0 = 0; j0 < BS; j0 += kInner) {
      for (int idx = threadIdx.x; idx < BS * kInner; idx += kThreads) {
        const int i = idx / kInner, jj = idx % kInner;
        w_s[i][jj] = ToFloat(kTransposeW ? w_block[(j0 + jj) * BS + i] : w_block[i * BS + j0 + jj]);
      }
      bool non_finite = false;
      for (int idx = threadIdx.x; idx < kInner * kSlice; idx += kThreads) {
        const int jj = idx / kSlice, d = idx % kSlice;
        x_s[jj][d] = d_base + d < head_dim ? ToFloat(x_rows[(j0 + jj) * width + d]) : 0.0f;
        non_finite = non_finite || !isfinite(x_s[jj][d]);
      }
      // The barrier that publishes the tiles also tells every thread whether x holds a NaN/Inf.
      const bool skip_zeros = __syncthreads_or(non_finite);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int idx = threadIdx.x + k * kThreads;
        if (idx < BS * kSlice) {
          const int i = idx / kSlice, d = idx % kSlice;
          float s = 0.0f;
          if (skip_zeros) {  // rare: a zero weight is a structural zero, 0 * NaN must stay 0
            for (int jj = 0; jj < kInner; ++jj) s += w_s[i][jj] != 0.0f ? w_s[i][jj] * x_s[jj][d] : 0.0f;
          } else {
#pragma unroll 8
            for (int jj = 0; jj < kInner; ++jj) s += w_s[i][jj] * x_s[jj][d];
          }
          acc[k] += s;
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int idx = threadIdx.x + k * kThreads;
    const int i = idx / kSlice, d = idx % kSlice;
    if (idx < BS * kSlice && d_base + d < head_dim) {
      c[(n * c_len + r * BS + i) * width + h * head_dim + d_base + d] = FromFloat<T>(acc[k]);
    }
  }
}


// ---- tensor-core bodies (float16 / bfloat16) -------------------------------------------------

constexpr int kWarps = kThreads / 32;
constexpr int kFrag = 16;  // WMMA m16n16k16

// Writes a float accumulator fragment as T into dst (row stride ld), through a per-warp staging
// tile in shared memory (fragment element order is opaque).
template <typename T, typename Fragment>
__device__ __forceinline__ void StoreFragment(const Fragment& acc, float* staging, T* dst, int64_t ld) {
  nvcuda::wmma::store_matrix_sync(staging, acc, kFrag, nvcuda::wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x % 32; e < kFrag * kFrag; e += 32) {
    dst[(e / kFrag) * ld + e % kFrag] = FromFloat<T>(staging[e]);
  }
  __syncwarp();
}

// nt on tensor cores: the bs x bs output is (bs/16)^2 fragments spread over the CTA's warps;
// fragments of Q (row-major) and K (read column-major, i.e. K^T) load straight from global memory.
template <typename T, int BS>
__global__ void __launch_bounds__(kThreads)
    NtWmmaKernel(const T* a, const T* b, const int32_t* lut, T* c, int64_t heads, int64_t a_len,
                 int64_t b_len, int64_t width, int64_t head_dim, bool shared_lut, int64_t nnz) {
  using namespace nvcuda;
  constexpr int kTiles = BS / kFrag, kPerWarp = (kTiles * kTiles + kWarps - 1) / kWarps;
  __shared__ float staging[kWarps][kFrag * kFrag];
  const int64_t blk = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int32_t* entry = lut + ((shared_lut ? 0 : h) * nnz + blk) * 2;
  const T* a_tile = a + (n * a_len + int64_t(entry[0]) * BS) * width + h * head_dim;
  const T* b_tile = b + (n * b_len + int64_t(entry[1]) * BS) * width + h * head_dim;
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kPerWarp];
#pragma unroll
  for (int f = 0; f < kPerWarp; ++f) wmma::fill_fragment(acc[f], 0.0f);
  for (int64_t k0 = 0; k0 < head_dim; k0 += kFrag) {
#pragma unroll
    for (int f = 0; f < kPerWarp; ++f) {
      const int tile = warp + f * kWarps, ti = tile / kTiles, tj = tile % kTiles;
      if (tile < kTiles * kTiles) {
        wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, a_tile + ti * kFrag * width + k0, width);
        wmma::load_matrix_sync(fb, b_tile + tj * kFrag * width + k0, width);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }
  T* c_tile = c + ((n * heads + h) * nnz + blk) * BS * BS;
#pragma unroll
  for (int f = 0; f < kPerWarp; ++f) {
    const int tile = warp + f * kWarps, ti = tile / kTiles, tj = tile % kTiles;
    if (tile < kTiles * kTiles) StoreFragment(acc[f], staging[warp], c_tile + ti * kFrag * BS + tj * kFrag, BS);
  }
}

// acc += op(w)[ti rows, k0..k0+16) * x[k0..k0+16, tj cols) with zero weights skipped, in float32 by
// the warp's lanes: acc goes through the warp's staging tile (fragment element order is opaque).
template <typename T, int BS, bool kTransposeW, typename Fragment>
__device__ void AddSkippingZeros(Fragment& acc, float* staging, const T* w_block, const T* x_rows,
                                 int64_t width, int ti, int tj, int k0) {
  nvcuda::wmma::store_matrix_sync(staging, acc, kFrag, nvcuda::wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x % 32; e < kFrag * kFrag; e += 32) {
    const int i = ti * kFrag + e / kFrag, d = tj * kFrag + e % kFrag;
    float s = staging[e];
    for (int jj = 0; jj < kFrag; ++jj) {
      const int j = k0 + jj;
      const float wv = ToFloat(kTransposeW ? w_block[j * BS + i] : w_block[i * BS + j]);
      if (wv != 0.0f) s += wv * ToFloat(x_rows[j * width + d]);
    }
    staging[e] = s;
  }
  __syncwarp();
  nvcuda::wmma::load_matrix_sync(acc, staging, kFrag, nvcuda::wmma::mem_row_major);
  __syncwarp();
}

// nn / tn on tensor cores: one CTA per (output block row, 64-wide slice of head_dim); the
// (bs/16) x 4 output fragments are spread over the warps. w fragments load row-major (nn) or
// column-major (tn: w^T) from the block, x fragments row-major from the partner rows.
template <typename T, int BS, bool kTransposeW>
__global__ void __launch_bounds__(kThreads)
    DsdWmmaKernel(const T* w, const T* x, const int32_t* lut, T* c, int64_t heads, int64_t nnz,
                  int64_t x_len, int64_t width, int64_t head_dim, bool shared_lut, int64_t lut_len,
                  int64_t n_out, int64_t c_len) {
  using namespace nvcuda;
  using ALayout = std::conditional_t<kTransposeW, wmma::col_major, wmma::row_major>;
  constexpr int kSlice = 64, kRowTiles = BS / kFrag, kColTiles = kSlice / kFrag;
  constexpr int kPerWarp = (kRowTiles * kColTiles + kWarps - 1) / kWarps;
  __shared__ float staging[kWarps][kFrag * kFrag];
  const int64_t r = blockIdx.x % n_out, d_base = (blockIdx.x / n_out) * kSlice;
  const int64_t h = blockIdx.y, n = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int32_t* table = lut + (shared_lut ? 0 : h) * lut_len * 2;
  const int32_t offset = table[2 * r], count = table[2 * r + 1];
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[kPerWarp];
#pragma unroll
  for (int f = 0; f < kPerWarp; ++f) wmma::fill_fragment(acc[f], 0.0f);
  for (int32_t e = offset; e < offset + count; ++e) {
    const int64_t blk = table[2 * e], partner = table[2 * e + 1];
    const T* w_block = w + ((n * heads + h) * nnz + blk) * BS * BS;
    const T* x_rows = x + (n * x_len + partner * BS) * width + h * head_dim + d_base;
    for (int k0 = 0; k0 < BS; k0 += kFrag) {
#pragma unroll
      for (int f = 0; f < kPerWarp; ++f) {
        const int tile = warp + f * kWarps, ti = tile / kColTiles, tj = tile % kColTiles;
        if (tile < kRowTiles * kColTiles && d_base + tj * kFrag < head_dim) {
          wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, ALayout> fa;
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, x_rows + k0 * width + tj * kFrag, width);
          bool non_finite = false;
#pragma unroll
          for (int t = 0; t < fb.num_elements; ++t) non_finite = non_finite || !isfinite(ToFloat(fb.x[t]));
          if (__any_sync(0xffffffffu, non_finite)) {
            // Rare: x holds a NaN/Inf. Add this 16x16x16 step through the staging tile with zero
            // weights skipped (tensor cores would give 0 * NaN = NaN).
            AddSkippingZeros<T, BS, kTransposeW>(acc[f], staging[warp], w_block, x_rows, width, ti, tj, k0);
          } else {
            wmma::load_matrix_sync(fa, kTransposeW ? w_block + k0 * BS + ti * kFrag : w_block + ti * kFrag * BS + k0, BS);
            wmma::mma_sync(acc[f], fa, fb, acc[f]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int f = 0; f < kPerWarp; ++f) {
    const int tile = warp + f * kWarps, ti = tile / kColTiles, tj = tile % kColTiles;
    if (tile < kRowTiles * kColTiles && d_base + tj * kFrag < head_dim) {
      StoreFragment(acc[f], staging[warp],
                    c + (n * c_len + r * BS + ti * kFrag) * width + h * head_dim + d_base + tj * kFrag, width);
    }
  }
}

// Tensor cores take 16-bit inputs in 16x16x16 fragments whose rows start 32-byte aligned.
template <typename T, int BS>
constexpr bool kWmmaType = !std::is_same<T, float>::value && BS >= kFrag;

bool WmmaShapes(int64_t head_dim) { return head_dim % kFrag == 0; }

// ---- masked softmax -------------------------------------------------------------------------
//
// One warp per query row. The row (all blocks of its block row) is read in 16-byte vectors: a
// first pass keeps an online (max, sum) per lane, merged across the warp; a second pass writes
// exp(x - max) / sum. Two reads and one write per element, each a 16-byte access.

constexpr int kRowsPerCta = 4;

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The query row of this warp: its row-table entries and where its elements live.
struct QueryRow {
  const int32_t* table;  // this head's row table
  int32_t offset, count;
  int64_t block_base;  // (n * heads + h) * nnz
  int64_t qb, i, query;

  __device__ QueryRow(const int32_t* lut, bool shared_lut, int64_t lut_len, int64_t heads,
                      int64_t nnz, int bs) {
    const int64_t h = blockIdx.y, n = blockIdx.z;
    query = int64_t(blockIdx.x) * kRowsPerCta + threadIdx.x / 32;
    table = lut + (shared_lut ? 0 : h) * lut_len * 2;
    qb = query / bs;
    i = query % bs;
    offset = table[2 * qb];
    count = table[2 * qb + 1];
    block_base = (n * heads + h) * nnz;
  }
  __device__ int64_t Block(int e) const { return table[2 * (offset + e)]; }
  __device__ int64_t KeyBlock(int e) const { return table[2 * (offset + e) + 1]; }
  // Element offset of (entry e, column j) in a [B, H, nnz, bs, bs] tensor.
  __device__ int64_t At(int e, int j, int bs) const { return ((block_base + Block(e)) * bs + i) * bs + j; }
};

// kVec consecutive elements as one 16-byte access.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
  __device__ static Vec Load(const T* p) {
    Vec out;
    *reinterpret_cast<uint4*>(out.v) = *reinterpret_cast<const uint4*>(p);
    return out;
  }
  __device__ void Store(T* p) const { *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v); }
};

template <typename T>
__global__ void __launch_bounds__(32 * kRowsPerCta)
    MaskedSoftmaxKernel(const T* x, T* y, float scale, const int32_t* lut, const int32_t* mask,
                        bool autoregressive, int64_t key, int64_t heads, int64_t nnz, int bs,
                        bool shared_lut, bool shared_mask, int64_t lut_len) {
  constexpr int kV = Vec<T>::kSize;
  const QueryRow row(lut, shared_lut, lut_len, heads, nnz, bs);
  const int lane = threadIdx.x % 32, words = (bs + 31) / 32, vecs_per_block = bs / kV;
  const uint32_t* mask_head =
      reinterpret_cast<const uint32_t*>(mask) + (shared_mask ? 0 : blockIdx.y) * nnz * bs * words;
  const int n_vecs = row.count * vecs_per_block;
  // Scaled logits of vector t (masked -> -inf) and its offset.
  auto logits = [&](int t, float* out) {
    const int e = t / vecs_per_block, j0 = (t % vecs_per_block) * kV;
    const int64_t at = row.At(e, j0, bs);
    const Vec<T> in = Vec<T>::Load(x + at);
    const uint32_t bits = mask_head[(row.Block(e) * bs + row.i) * words + (j0 >> 5)] >> (j0 & 31);
    const int64_t k0 = row.KeyBlock(e) * bs + j0;
#pragma unroll
    for (int u = 0; u < kV; ++u) {
      bool keep = (bits >> u) & 1u;
      if (autoregressive) keep = keep && (k0 + u < key || k0 + u <= row.query);
      out[u] = keep ? scale * ToFloat(in.v[u]) : -INFINITY;
    }
    return at;
  };
  float m = -INFINITY, l = 0.0f;  // this lane's running max and sum of exp(. - m)
  bool poisoned = false;          // a kept score of this lane is NaN or +inf
  for (int t = lane; t < n_vecs; t += 32) {
    float v[kV];
    logits(t, v);
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kV; ++u) {
      poisoned = poisoned || isnan(v[u]) || v[u] == INFINITY;
      m_new = fmaxf(m_new, v[u]);  // fmaxf ignores NaN
    }
    if (m_new == -INFINITY) continue;
    l *= __expf(m - m_new);
#pragma unroll
    for (int u = 0; u < kV; ++u) l += __expf(v[u] - m_new);
    m = m_new;
  }
  const float row_max = WarpMax(m);
  const float sum = WarpSum(m == -INFINITY ? 0.0f : l * __expf(m - row_max));
  const float inv_sum = sum > 0.0f ? 1.0f / sum : 0.0f;  // a fully masked row gives zeros
  // A NaN / +inf kept score makes the row NaN at its kept entries (as a dense softmax); masked stay 0.
  const bool row_poisoned = __any_sync(0xffffffffu, poisoned);
  for (int t = lane; t < n_vecs; t += 32) {
    float v[kV];
    const int64_t at = logits(t, v);
    Vec<T> out;
#pragma unroll
    for (int u = 0; u < kV; ++u) {
      const float p = sum > 0.0f ? __expf(v[u] - row_max) * inv_sum : 0.0f;
      out.v[u] = FromFloat<T>(row_poisoned ? (v[u] == -INFINITY ? 0.0f : NAN) : p);
    }
    out.Store(y + at);
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kRowsPerCta)
    MaskedSoftmaxGradKernel(const T* dy, const T* y, T* dx, float scale, const int32_t* lut,
                            int64_t heads, int64_t nnz, int bs, bool shared_lut, int64_t lut_len) {
  constexpr int kV = Vec<T>::kSize;
  const QueryRow row(lut, shared_lut, lut_len, heads, nnz, bs);
  const int lane = threadIdx.x % 32, vecs_per_block = bs / kV, n_vecs = row.count * vecs_per_block;
  auto at = [&](int t) { return row.At(t / vecs_per_block, (t % vecs_per_block) * kV, bs); };
  float dot = 0.0f;
  for (int t = lane; t < n_vecs; t += 32) {
    const Vec<T> g = Vec<T>::Load(dy + at(t)), p = Vec<T>::Load(y + at(t));
#pragma unroll
    for (int u = 0; u < kV; ++u) dot += ToFloat(p.v[u]) != 0.0f ? ToFloat(g.v[u]) * ToFloat(p.v[u]) : 0.0f;
  }
  dot = WarpSum(dot);
  for (int t = lane; t < n_vecs; t += 32) {
    const Vec<T> g = Vec<T>::Load(dy + at(t)), p = Vec<T>::Load(y + at(t));
    Vec<T> out;
#pragma unroll
    for (int u = 0; u < kV; ++u) {
      // y = 0 (masked) entries contribute nothing and get 0: a NaN dy there must not leak.
      const float yv = ToFloat(p.v[u]);
      out.v[u] = FromFloat<T>(yv != 0.0f ? scale * yv * (ToFloat(g.v[u]) - dot) : 0.0f);
    }
    out.Store(dx + at(t));
  }
}

// ---- dispatch ------------------------------------------------------------------------------

bool GridFits(int64_t x, int64_t y, int64_t z) {
  return x > 0 && y > 0 && z > 0 && x < (int64_t(1) << 31) && y < 65536 && z < 65536;
}

template <typename T, int BS>
void LaunchNt(const void* a, const void* b, const int32_t* lut, void* c, int64_t batch, int64_t heads,
              int64_t a_len, int64_t b_len, int64_t width, int64_t lut_heads, int64_t nnz,
              cudaStream_t stream) {
  const int64_t head_dim = width / heads;
  auto kernel = NtKernel<T, BS>;
  if constexpr (kWmmaType<T, BS>) {
    if (WmmaShapes(head_dim)) kernel = NtWmmaKernel<T, BS>;
  }
  kernel<<<dim3(nnz, heads, batch), kThreads, 0, stream>>>(
      static_cast<const T*>(a), static_cast<const T*>(b), lut, static_cast<T*>(c), heads, a_len,
      b_len, width, head_dim, lut_heads == 1, nnz);
}

template <typename T, int BS>
void LaunchDsd(bool transpose_w, const void* w, const void* x, const int32_t* lut, void* c,
               int64_t batch, int64_t heads, int64_t nnz, int64_t x_len, int64_t width,
               int64_t lut_heads, int64_t lut_len, int64_t n_out, cudaStream_t stream) {
  const int64_t head_dim = width / heads, slices = (head_dim + 63) / 64;
  const dim3 grid(n_out * slices, heads, batch);
  auto kernel = transpose_w ? DsdKernel<T, T, BS, true> : DsdKernel<T, T, BS, false>;
  if constexpr (kWmmaType<T, BS>) {
    if (WmmaShapes(head_dim)) kernel = transpose_w ? DsdWmmaKernel<T, BS, true> : DsdWmmaKernel<T, BS, false>;
  }
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(w), static_cast<const T*>(x), lut,
                                        static_cast<T*>(c), heads, nnz, x_len, width, head_dim,
                                        lut_heads == 1, lut_len, n_out, n_out * BS);
}

// Float32 x and c, weights of dtype TW: the SIMT body only (the WMMA one needs one 16-bit dtype).
template <typename TW, int BS>
void LaunchDsdMixedWeights(bool transpose_w, const void* w, const void* x, const int32_t* lut,
                           void* c, int64_t batch, int64_t heads, int64_t nnz, int64_t x_len,
                           int64_t width, int64_t lut_heads, int64_t lut_len, int64_t n_out,
                           cudaStream_t stream) {
  const int64_t head_dim = width / heads, slices = (head_dim + 63) / 64;
  const dim3 grid(n_out * slices, heads, batch);
  auto kernel = transpose_w ? DsdKernel<TW, float, BS, true> : DsdKernel<TW, float, BS, false>;
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<const TW*>(w), static_cast<const float*>(x), lut,
                                        static_cast<float*>(c), heads, nnz, x_len, width, head_dim,
                                        lut_heads == 1, lut_len, n_out, n_out * BS);
}

// Calls F<T, BS>::Run(args...) for the runtime dtype and block size.
template <template <typename, int> class F, typename... Args>
int Dispatch(int dtype, int64_t block_size, Args... args) {
  auto by_size = [&](auto tag) -> int {
    using T = decltype(tag);
    switch (block_size) {
      case 8: F<T, 8>::Run(args...); return 0;
      case 16: F<T, 16>::Run(args...); return 0;
      case 32: F<T, 32>::Run(args...); return 0;
      case 64: F<T, 64>::Run(args...); return 0;
      case 128: F<T, 128>::Run(args...); return 0;
      default: return BSATTN_ERROR_BLOCK_SIZE;
    }
  };
  switch (dtype) {
    case BSATTN_FLOAT32: return by_size(float());
    case BSATTN_FLOAT16: return by_size(__half());
    case BSATTN_BFLOAT16: return by_size(__nv_bfloat16());
    default: return BSATTN_ERROR_DTYPE;
  }
}

template <typename T, int BS>
struct NtRunner {
  template <typename... Args>
  static void Run(Args... args) { LaunchNt<T, BS>(args...); }
};

template <typename T, int BS>
struct DsdRunner {
  template <typename... Args>
  static void Run(Args... args) { LaunchDsd<T, BS>(args...); }
};

template <typename TW, int BS>
struct DsdMixedWeightsRunner {
  template <typename... Args>
  static void Run(Args... args) { LaunchDsdMixedWeights<TW, BS>(args...); }
};

bool IsBlockSize(int64_t bs) { return bs == 8 || bs == 16 || bs == 32 || bs == 64 || bs == 128; }

}  // namespace
}  // namespace bsattn_cuda

using bsattn_cuda::Dispatch;
using bsattn_cuda::DsdMixedWeightsRunner;
using bsattn_cuda::DsdRunner;
using bsattn_cuda::GridFits;
using bsattn_cuda::IsBlockSize;
using bsattn_cuda::kRowsPerCta;
using bsattn_cuda::LastError;
using bsattn_cuda::MaskedSoftmaxGradKernel;
using bsattn_cuda::MaskedSoftmaxKernel;
using bsattn_cuda::NtRunner;

extern "C" {

const char* bsattn_cuda_error_string(int code) {
  switch (code) {
    case BSATTN_ERROR_DTYPE: return "bsattn: unsupported dtype (expected float32, float16 or bfloat16)";
    case BSATTN_ERROR_BLOCK_SIZE: return "bsattn: unsupported block size (expected 8, 16, 32, 64 or 128)";
    case BSATTN_ERROR_SHAPE: return "bsattn: empty or too large launch grid";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

int bsattn_nt(int dtype, const void* a, const void* b, const int32_t* nt_lut, void* c, int64_t batch,
              int64_t heads, int64_t a_len, int64_t b_len, int64_t width, int64_t lut_heads,
              int64_t nnz, int64_t block_size, bsattn_stream_t stream) {
  if (!GridFits(nnz, heads, batch)) return BSATTN_ERROR_SHAPE;
  const int status = Dispatch<NtRunner>(dtype, block_size, a, b, nt_lut, c, batch, heads, a_len,
                                        b_len, width, lut_heads, nnz, cudaStream_t(stream));
  return status ? status : LastError();
}

int bsattn_dsd(int dtype, int transpose_w, const void* w, const void* x, const int32_t* lut, void* c,
               int64_t batch, int64_t heads, int64_t nnz, int64_t block_size, int64_t x_len,
               int64_t width, int64_t lut_heads, int64_t lut_len, int64_t n_out,
               bsattn_stream_t stream) {
  if (!GridFits(n_out * ((width / heads + 63) / 64), heads, batch)) return BSATTN_ERROR_SHAPE;
  const int status = Dispatch<DsdRunner>(dtype, block_size, transpose_w != 0, w, x, lut, c, batch,
                                         heads, nnz, x_len, width, lut_heads, lut_len, n_out,
                                         cudaStream_t(stream));
  return status ? status : LastError();
}

int bsattn_dsd_mixed_weights(int w_dtype, int transpose_w, const void* w, const void* x,
                             const int32_t* lut, void* c, int64_t batch, int64_t heads, int64_t nnz,
                             int64_t block_size, int64_t x_len, int64_t width, int64_t lut_heads,
                             int64_t lut_len, int64_t n_out, bsattn_stream_t stream) {
  if (w_dtype != BSATTN_FLOAT16 && w_dtype != BSATTN_BFLOAT16) return BSATTN_ERROR_DTYPE;
  if (!GridFits(n_out * ((width / heads + 63) / 64), heads, batch)) return BSATTN_ERROR_SHAPE;
  const int status = Dispatch<DsdMixedWeightsRunner>(w_dtype, block_size, transpose_w != 0, w, x, lut,
                                                     c, batch, heads, nnz, x_len, width, lut_heads,
                                                     lut_len, n_out, cudaStream_t(stream));
  return status ? status : LastError();
}

int bsattn_masked_softmax(int dtype, const void* x, void* y, float scale, const int32_t* nn_lut,
                          const int32_t* mask, int autoregressive, int64_t key, int64_t batch,
                          int64_t heads, int64_t nnz, int64_t block_size, int64_t lut_heads,
                          int64_t mask_heads, int64_t lut_len, int64_t n_rows,
                          bsattn_stream_t stream) {
  if (!IsBlockSize(block_size)) return BSATTN_ERROR_BLOCK_SIZE;
  const dim3 grid(n_rows * block_size / kRowsPerCta, heads, batch);
  if (!GridFits(grid.x, heads, batch)) return BSATTN_ERROR_SHAPE;
  const int bs = static_cast<int>(block_size);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    MaskedSoftmaxKernel<T><<<grid, 32 * kRowsPerCta, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(x), static_cast<T*>(y), scale, nn_lut, mask, autoregressive != 0, key,
        heads, nnz, bs, lut_heads == 1, mask_heads == 1, lut_len);
  };
  switch (dtype) {
    case BSATTN_FLOAT32: launch(float()); break;
    case BSATTN_FLOAT16: launch(__half()); break;
    case BSATTN_BFLOAT16: launch(__nv_bfloat16()); break;
    default: return BSATTN_ERROR_DTYPE;
  }
  return LastError();
}

int bsattn_masked_softmax_grad(int dtype, const void* dy, const void* y, void* dx, float scale,
                               const int32_t* nn_lut, int64_t batch, int64_t heads, int64_t nnz,
                               int64_t block_size, int64_t lut_heads, int64_t lut_len,
                               int64_t n_rows, bsattn_stream_t stream) {
  if (!IsBlockSize(block_size)) return BSATTN_ERROR_BLOCK_SIZE;
  const dim3 grid(n_rows * block_size / kRowsPerCta, heads, batch);
  if (!GridFits(grid.x, heads, batch)) return BSATTN_ERROR_SHAPE;
  const int bs = static_cast<int>(block_size);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    MaskedSoftmaxGradKernel<T><<<grid, 32 * kRowsPerCta, 0, cudaStream_t(stream)>>>(
        static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<T*>(dx), scale, nn_lut,
        heads, nnz, bs, lut_heads == 1, lut_len);
  };
  switch (dtype) {
    case BSATTN_FLOAT32: launch(float()); break;
    case BSATTN_FLOAT16: launch(__half()); break;
    case BSATTN_BFLOAT16: launch(__nv_bfloat16()); break;
    default: return BSATTN_ERROR_DTYPE;
  }
  return LastError();
}

}  // extern "C"
