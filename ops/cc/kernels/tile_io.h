// Conversion of tiles between the ops' storage dtypes (float, half, bfloat16, double) and
// accumulator scratch buffers (float32; float64 for double), plus the CPU thread-pool helper shared by the block-sparse kernels.
#ifndef BSATTN_OPS_CC_KERNELS_TILE_IO_H_
#define BSATTN_OPS_CC_KERNELS_TILE_IO_H_

#include <algorithm>
#include <cstdint>
#include <functional>

#include "tensorflow/core/framework/op_kernel.h"

namespace bsattn {

// dst[r][c] = float(src[r * src_stride + c]) for r < rows, c < cols; dst is dense (row stride cols).
template <typename T, typename Acc>
inline void LoadTile(const T* src, int64_t src_stride, int rows, int cols, Acc* dst) {
  for (int r = 0; r < rows; ++r) {
    const T* s = src + r * src_stride;
    Acc* d = dst + r * cols;
    for (int c = 0; c < cols; ++c) d[c] = static_cast<Acc>(s[c]);
  }
}

// dst[c][r] = float(src[r * src_stride + c]): the transposed tile, dense with row stride rows.
template <typename T, typename Acc>
inline void LoadTileTransposed(const T* src, int64_t src_stride, int rows, int cols, Acc* dst) {
  for (int r = 0; r < rows; ++r) {
    const T* s = src + r * src_stride;
    for (int c = 0; c < cols; ++c) dst[c * rows + r] = static_cast<Acc>(s[c]);
  }
}

// dst[r * dst_stride + c] = T(src[r][c]) (round to nearest for half and bfloat16).
template <typename T, typename Acc>
inline void StoreTile(const Acc* src, int rows, int cols, T* dst, int64_t dst_stride) {
  for (int r = 0; r < rows; ++r) {
    const Acc* s = src + r * cols;
    T* d = dst + r * dst_stride;
    for (int c = 0; c < cols; ++c) d[c] = static_cast<T>(s[c]);
  }
}

// Runs fn(begin, end) over [0, total) on TensorFlow's intra-op CPU thread pool.
// cost_per_unit is a rough cycle count per unit of work, used to size the shards.
inline void ParallelFor(tensorflow::OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
                        const std::function<void(int64_t, int64_t)>& fn) {
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(total, cost_per_unit, fn);
}

// Runs fn(begin, end) over [0, total) in blocks handed to the pool's threads as they become free,
// which balances units of uneven cost (e.g. the rows of a causal layout). cost_per_unit (rough
// cycles) sizes the blocks: about 200k cycles each, but at least 8 blocks per thread.
inline void ParallelForBalanced(tensorflow::OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
                                const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t most = std::max<int64_t>(1, total / (8 * std::max(1, pool->NumThreads())));
  const int64_t block = std::clamp<int64_t>(200000 / std::max<int64_t>(1, cost_per_unit), 1, most);
  pool->ParallelFor(total, tsl::thread::ThreadPool::SchedulingParams::Fixed(block), fn);
}

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_TILE_IO_H_
