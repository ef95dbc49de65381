// The fused coordinate descent of CoLT5 routing on the GPU (bsattn_coor_descent_* in bsattn_cuda.h):
// one row per CTA, the row converted to float32 once (masked entries -inf, so they drop out of every
// sum with no branch) and kept in shared memory (in a global workspace when it does not fit) for
// all the iterations. The math and its reverse mode: ops/cc/kernels/coor_descent_math.h; this file
// follows the CPU passes line for line (float32 throughout).
#include <cstdint>

#include "ops/cuda/bsattn_cuda.h"
#include "ops/cuda/cuda_common.cuh"

namespace bsattn_cuda {
namespace {

constexpr int kThreads = 512;  // per CTA; a row of n needs ceil(n / 512) values per thread

// The sum over the CTA of each thread's v, returned to every thread. scratch: 32 floats.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by the previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float BlockMax(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? scratch[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct CoorArgs {
  const void* s;
  const uint8_t* mask;  // [rows, n] or null
  const float* k;       // [rows] (k_per_row) or [1]
  int k_per_row;
  const float* eps;     // [n_iters + 1]
  int n_iters;
  int64_t rows, n;
  float* workspace;     // [rows, buffers * n] when the row does not fit in shared memory, else null
};

// x[j] = s[j] (float), -inf where masked, for this thread's j; returns the CTA's (unmasked count, max x).
template <typename T>
__device__ __forceinline__ void LoadRow(const CoorArgs& p, int64_t row, float* x, float* scratch, float* count,
                                        float* x_max) {
  const T* s = static_cast<const T*>(p.s) + row * p.n;
  const uint8_t* mask = p.mask ? p.mask + row * p.n : nullptr;
  float c = 0.0f, m = -INFINITY;
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const bool keep = mask == nullptr || mask[j] != 0;
    const float v = keep ? ToFloat(s[j]) : -INFINITY;
    x[j] = v;
    c += keep ? 1.0f : 0.0f;
    m = fmaxf(m, v);
  }
  *count = BlockSum(c, scratch);
  *x_max = BlockMax(m, scratch);
}

__device__ __forceinline__ float LogK(float k) { return logf(fmaxf(k, 1e-20f)); }

template <typename T>
__global__ void __launch_bounds__(kThreads) CoorForwardKernel(CoorArgs p, T* y, float* lse, int buffers) {
  extern __shared__ float dynamic_smem[];
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  float* x = p.workspace ? p.workspace + row * buffers * p.n : dynamic_smem;
  float count, x_max;
  LoadRow<T>(p, row, x, scratch, &count, &x_max);
  T* y_row = y + row * p.n;
  float* lse_row = lse + row * p.n_iters;
  if (count == 0.0f) {  // a fully masked row: y = 0, lse = -inf
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) y_row[j] = FromFloat<T>(0.0f);
    for (int t = threadIdx.x; t < p.n_iters; t += blockDim.x) lse_row[t] = -INFINITY;
    return;
  }
  const float log_k = LogK(p.k[p.k_per_row ? row : 0]);
  float l = logf(count);  // z_1 = 0 on every unmasked entry
  if (threadIdx.x == 0) lse_row[0] = l;
  float a = p.eps[0] * (log_k - l);
  for (int t = 1; t < p.n_iters; ++t) {
    const float inv = 1.0f / p.eps[t];
    const float shift = fminf(x_max, -a) * inv;
    float sum = 0.0f;
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
      const float u = x[j] + a;
      sum += expf((x[j] - (u > 0.0f ? u : 0.0f)) * inv - shift);
    }
    l = shift + logf(BlockSum(sum, scratch));
    if (threadIdx.x == 0) lse_row[t] = l;
    a = p.eps[t] * (log_k - l);
  }
  const float inv = 1.0f / p.eps[p.n_iters];
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const float u = x[j] + a;
    y_row[j] = FromFloat<T>(expf((u < 0.0f ? u : 0.0f) * inv));
  }
}

// dk_rows[row] = dL/dk of the row (0 for a fully masked row).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    CoorBackwardKernel(CoorArgs p, const float* lse, const T* dy, T* ds, float* dk_rows) {
  extern __shared__ float dynamic_smem[];
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  float* x = p.workspace ? p.workspace + row * 2 * p.n : dynamic_smem;
  float* dx = x + p.n;
  float count, x_max;
  LoadRow<T>(p, row, x, scratch, &count, &x_max);
  T* ds_row = ds + row * p.n;
  if (count == 0.0f) {
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) ds_row[j] = FromFloat<T>(0.0f);
    if (threadIdx.x == 0) dk_rows[row] = 0.0f;
    return;
  }
  const float k = p.k[p.k_per_row ? row : 0];
  const float log_k = LogK(k);
  const float* lse_row = lse + row * p.n_iters;
  const T* dy_row = dy + row * p.n;
  const int last = p.n_iters - 1;
  float a = p.eps[last] * (log_k - lse_row[last]);
  float inv = 1.0f / p.eps[p.n_iters];
  float local = 0.0f;
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
    const float u = x[j] + a;
    const float y = expf((u < 0.0f ? u : 0.0f) * inv);
    const float d = (u <= 0.0f && y > 0.0f) ? ToFloat(dy_row[j]) * y * inv : 0.0f;
    dx[j] = d;
    local += d;
  }
  float da = BlockSum(local, scratch);
  float dlog_k = 0.0f;
  for (int t = last; t >= 1; --t) {
    const float a_prev = p.eps[t - 1] * (log_k - lse_row[t - 1]);
    const float l = lse_row[t];
    inv = 1.0f / p.eps[t];
    dlog_k += da * p.eps[t];
    local = 0.0f;
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) {
      const float u = x[j] + a_prev;
      const bool pos = u > 0.0f;
      const float prob = expf((x[j] - (pos ? u : 0.0f)) * inv - l);
      if (pos) {
        local += prob;
      } else {
        dx[j] -= da * prob;
      }
    }
    da *= BlockSum(local, scratch);
  }
  dlog_k += da * p.eps[0];
  for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) ds_row[j] = FromFloat<T>(dx[j]);
  if (threadIdx.x == 0) dk_rows[row] = k >= 1e-20f ? dlog_k / k : 0.0f;
}

// dk[0] = sum of dk_rows in row order (one thread: deterministic, and rows are few).
__global__ void SumRowsKernel(const float* dk_rows, int64_t rows, float* dk) {
  float total = 0.0f;
  for (int64_t r = 0; r < rows; ++r) total += dk_rows[r];
  *dk = total;
}

// Shared-memory bytes for `buffers` float rows of n, or -1 when they do not fit.
int64_t SmemBytes(int64_t n, int buffers) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return -1;
  }
  const int64_t bytes = static_cast<int64_t>(buffers) * n * sizeof(float);
  return bytes + 32 * sizeof(float) <= optin ? bytes : -1;
}

bool ShapeOk(int64_t rows, int64_t n, int n_iters) {
  return rows >= 0 && rows <= 0x7fffffff && n >= 0 && n_iters >= 1;
}

template <typename T>
int LaunchForward(const CoorArgs& p, void* y, float* lse, cudaStream_t stream) {
  const int64_t smem = p.workspace ? 0 : p.n * static_cast<int64_t>(sizeof(float));
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(CoorForwardKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  CoorForwardKernel<T><<<static_cast<unsigned>(p.rows), kThreads, smem, stream>>>(p, static_cast<T*>(y), lse, 1);
  return LastError();
}

template <typename T>
int LaunchBackward(const CoorArgs& p, const float* lse, const void* dy, void* ds, float* dk_rows,
                   cudaStream_t stream) {
  const int64_t smem = p.workspace ? 0 : 2 * p.n * static_cast<int64_t>(sizeof(float));
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(CoorBackwardKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  CoorBackwardKernel<T><<<static_cast<unsigned>(p.rows), kThreads, smem, stream>>>(
      p, lse, static_cast<const T*>(dy), static_cast<T*>(ds), dk_rows);
  return LastError();
}

}  // namespace
}  // namespace bsattn_cuda

using bsattn_cuda::CoorArgs;

int64_t bsattn_coor_descent_workspace(int64_t rows, int64_t n, int backward, int k_per_row) {
  const int buffers = backward ? 2 : 1;
  int64_t bytes = bsattn_cuda::SmemBytes(n, buffers) < 0 ? rows * buffers * n * static_cast<int64_t>(sizeof(float)) : 0;
  if (backward && !k_per_row) bytes += rows * static_cast<int64_t>(sizeof(float));  // per-row dk before the sum
  return bytes;
}

namespace {

// The launchers' common argument checks; fills p (workspace: rows after the dk rows, when needed).
int MakeArgs(int dtype, const void* s, const uint8_t* mask, const float* k, int k_per_row, const float* eps,
             int n_iters, int64_t rows, int64_t n, int backward, void* workspace, int64_t workspace_bytes,
             CoorArgs* p) {
  if (dtype != BSATTN_FLOAT32 && dtype != BSATTN_FLOAT16 && dtype != BSATTN_BFLOAT16) return BSATTN_ERROR_DTYPE;
  if (!bsattn_cuda::ShapeOk(rows, n, n_iters)) return BSATTN_ERROR_SHAPE;
  if (workspace_bytes < bsattn_coor_descent_workspace(rows, n, backward, k_per_row)) return BSATTN_ERROR_WORKSPACE;
  const int buffers = backward ? 2 : 1;
  *p = CoorArgs{s, mask, k, k_per_row, eps, n_iters, rows, n, nullptr};
  if (bsattn_cuda::SmemBytes(n, buffers) < 0) {
    p->workspace = static_cast<float*>(workspace) + (backward && !k_per_row ? rows : 0);
  }
  return 0;
}

}  // namespace

int bsattn_coor_descent_forward(int dtype, const void* s, const uint8_t* mask, const float* k, int k_per_row,
                                const float* eps, int n_iters, int64_t rows, int64_t n, void* y, float* lse,
                                void* workspace, int64_t workspace_bytes, bsattn_stream_t stream) {
  CoorArgs p;
  if (const int e = MakeArgs(dtype, s, mask, k, k_per_row, eps, n_iters, rows, n, 0, workspace, workspace_bytes, &p)) {
    return e;
  }
  if (rows == 0) return 0;
  const cudaStream_t st = cudaStream_t(stream);
  switch (dtype) {
    case BSATTN_FLOAT32: return bsattn_cuda::LaunchForward<float>(p, y, lse, st);
    case BSATTN_FLOAT16: return bsattn_cuda::LaunchForward<__half>(p, y, lse, st);
    default: return bsattn_cuda::LaunchForward<__nv_bfloat16>(p, y, lse, st);
  }
}

int bsattn_coor_descent_backward(int dtype, const void* s, const uint8_t* mask, const float* k, int k_per_row,
                                 const float* eps, int n_iters, int64_t rows, int64_t n, const float* lse,
                                 const void* dy, void* ds, float* dk, void* workspace, int64_t workspace_bytes,
                                 bsattn_stream_t stream) {
  CoorArgs p;
  if (const int e = MakeArgs(dtype, s, mask, k, k_per_row, eps, n_iters, rows, n, 1, workspace, workspace_bytes, &p)) {
    return e;
  }
  const cudaStream_t st = cudaStream_t(stream);
  float* dk_rows = k_per_row ? dk : static_cast<float*>(workspace);
  if (rows > 0) {
    int e;
    switch (dtype) {
      case BSATTN_FLOAT32: e = bsattn_cuda::LaunchBackward<float>(p, lse, dy, ds, dk_rows, st); break;
      case BSATTN_FLOAT16: e = bsattn_cuda::LaunchBackward<__half>(p, lse, dy, ds, dk_rows, st); break;
      default: e = bsattn_cuda::LaunchBackward<__nv_bfloat16>(p, lse, dy, ds, dk_rows, st); break;
    }
    if (e) return e;
  }
  if (!k_per_row) {
    bsattn_cuda::SumRowsKernel<<<1, 1, 0, st>>>(dk_rows, rows, dk);
    return bsattn_cuda::LastError();
  }
  return 0;
}
