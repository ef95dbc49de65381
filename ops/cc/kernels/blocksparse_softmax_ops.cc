// CPU kernels of the block-sparse masked softmax and its gradient.
//
// A query row spans every block of its query-block row (from nn_lut), so the softmax normalises
// across blocks. Work is split over (batch, head, query block row); each unit walks its row's
// blocks once per in-block row, in float32 (float64 for double).
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cc/kernels/cpu_math.h"
#include "ops/cc/kernels/blocksparse_checks.h"
#include "ops/cc/kernels/tile_io.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace bsattn {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;

// y = softmax(scale * x) over the kept entries of each query row; masked entries are 0, a row with
// no kept entry (or only -inf scores) is all 0, and a row with a NaN or +inf kept score is NaN at its
// kept entries.
template <typename T>
class MaskedSoftmaxOp : public OpKernel {
 public:
  explicit MaskedSoftmaxOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("autoregressive", &autoregressive_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& lut = ctx->input(2);
    SoftmaxDims dims;
    OP_REQUIRES_OK(ctx, CheckSoftmaxInputs(x, ctx->input(1), lut, &ctx->input(3), &ctx->input(4),
                                           autoregressive_, &dims));
    const int64_t batch = dims.batch, heads = dims.heads, nnz = dims.nnz, bs = dims.block_size;
    const int64_t words = (bs + 31) / 32, n_rows = dims.n_rows, key = dims.key;
    const float scale = dims.scale;
    const Tensor& mask = ctx->input(3);

    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    const T* x_ptr = x.flat<T>().data();
    T* y_ptr = y->flat<T>().data();
    const int32_t* lut_ptr = lut.flat<int32_t>().data();
    const uint32_t* mask_ptr = reinterpret_cast<const uint32_t*>(mask.flat<int32_t>().data());
    const int64_t lut_len = dims.lut_len;
    const bool shared_lut = dims.lut_heads == 1, shared_mask = dims.mask_heads == 1;
    const bool autoregressive = autoregressive_;
    using Acc = typename AccumulatorOf<T>::type;
    constexpr Acc kMasked = -std::numeric_limits<Acc>::infinity();

    auto work = [&](int64_t begin, int64_t end) {
      std::vector<Acc> row;  // one query row across all blocks of its block row, scaled
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t qb = unit % n_rows, h = (unit / n_rows) % heads, n = unit / (n_rows * heads);
        const int32_t* table = lut_ptr + (shared_lut ? 0 : h) * lut_len * 2;
        const int32_t offset = table[2 * qb], count = table[2 * qb + 1];
        row.resize(count * bs);
        const int64_t block_base = (n * heads + h) * nnz;
        const uint32_t* mask_head = mask_ptr + (shared_mask ? 0 : h) * nnz * bs * words;
        for (int64_t i = 0; i < bs; ++i) {
          const int64_t query = qb * bs + i;
          Acc row_max = kMasked;
          bool poisoned = false;  // a kept score is NaN or +inf
          for (int32_t e = 0; e < count; ++e) {
            const int64_t blk = table[2 * (offset + e)], kb = table[2 * (offset + e) + 1];
            const T* xs = x_ptr + ((block_base + blk) * bs + i) * bs;
            const uint32_t* bits = mask_head + (blk * bs + i) * words;
            Acc* out = row.data() + e * bs;
            for (int64_t j = 0; j < bs; ++j) {
              const int64_t k = kb * bs + j;
              bool keep = (bits[j >> 5] >> (j & 31)) & 1u;
              if (autoregressive) keep = keep && (k < key || k <= query);
              out[j] = keep ? scale * static_cast<Acc>(xs[j]) : kMasked;
              // !(v <= max) is true for NaN; a kept -inf equals kMasked and counts as masked.
              if (!(out[j] <= row_max)) {
                poisoned = poisoned || std::isnan(out[j]) || out[j] == -kMasked;
                if (!std::isnan(out[j])) row_max = out[j];
              }
            }
          }
          // A NaN / +inf kept score makes the row's kept entries NaN (as a dense softmax does); masked
          // entries stay 0. A row without a finite kept score is all 0.
          Acc sum = 0;
          if (!poisoned && row_max != kMasked) {
            for (Acc& v : row) v -= row_max;
            ExpInPlace(row.data(), static_cast<int>(row.size()));  // masked: exp(-inf) = 0
            for (const Acc v : row) sum += v;
          }
          const Acc inv_sum = sum > 0 ? 1 / sum : 0;
          constexpr Acc kNaN = std::numeric_limits<Acc>::quiet_NaN();
          for (int32_t e = 0; e < count; ++e) {
            const int64_t blk = table[2 * (offset + e)];
            T* ys = y_ptr + ((block_base + blk) * bs + i) * bs;
            const Acc* in = row.data() + e * bs;
            for (int64_t j = 0; j < bs; ++j) {
              const Acc value = sum > 0 ? in[j] * inv_sum : Acc(0);  // in[] is still -inf if not exp'd
              ys[j] = static_cast<T>(poisoned ? (in[j] == kMasked ? Acc(0) : kNaN) : value);
            }
          }
        }
      }
    };
    ParallelFor(ctx, batch * heads * n_rows, 20 * bs * bs * std::max<int64_t>(1, nnz / n_rows), work);
  }

 private:
  bool autoregressive_;
};

// dx = scale * y * (dy - sum_row(dy * y)) with rows as in the forward. An entry with y == 0 (masked,
// or underflowed) contributes exactly 0 and gets dx = 0, whatever dy holds there: a NaN dy at a
// masked key (e.g. from a NaN value vector) must not reach the row.
template <typename T>
class MaskedSoftmaxGradOp : public OpKernel {
 public:
  explicit MaskedSoftmaxGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& y = ctx->input(1);
    const Tensor& lut = ctx->input(3);
    SoftmaxDims dims;
    OP_REQUIRES_OK(ctx, CheckSoftmaxInputs(y, ctx->input(2), lut, nullptr, nullptr, false, &dims));
    OP_REQUIRES(ctx, dy.shape() == y.shape(),
                absl::InvalidArgumentError(absl::StrCat("dy shape ", dy.shape().DebugString(),
                                                        " does not match y shape ",
                                                        y.shape().DebugString())));
    const int64_t batch = dims.batch, heads = dims.heads, nnz = dims.nnz, bs = dims.block_size;
    const int64_t n_rows = dims.n_rows;
    const float scale = dims.scale;
    using Acc = typename AccumulatorOf<T>::type;

    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y.shape(), &dx));
    const T* dy_ptr = dy.flat<T>().data();
    const T* y_ptr = y.flat<T>().data();
    T* dx_ptr = dx->flat<T>().data();
    const int32_t* lut_ptr = lut.flat<int32_t>().data();
    const int64_t lut_len = dims.lut_len;
    const bool shared_lut = dims.lut_heads == 1;

    auto work = [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t qb = unit % n_rows, h = (unit / n_rows) % heads, n = unit / (n_rows * heads);
        const int32_t* table = lut_ptr + (shared_lut ? 0 : h) * lut_len * 2;
        const int32_t offset = table[2 * qb], count = table[2 * qb + 1];
        const int64_t block_base = (n * heads + h) * nnz;
        for (int64_t i = 0; i < bs; ++i) {
          Acc dot = 0;
          for (int32_t e = offset; e < offset + count; ++e) {
            const int64_t at = ((block_base + table[2 * e]) * bs + i) * bs;
            for (int64_t j = 0; j < bs; ++j) {
              const Acc yv = static_cast<Acc>(y_ptr[at + j]);
              if (yv != 0) dot += static_cast<Acc>(dy_ptr[at + j]) * yv;
            }
          }
          for (int32_t e = offset; e < offset + count; ++e) {
            const int64_t at = ((block_base + table[2 * e]) * bs + i) * bs;
            for (int64_t j = 0; j < bs; ++j) {
              const Acc yv = static_cast<Acc>(y_ptr[at + j]);
              dx_ptr[at + j] = static_cast<T>(yv == 0 ? Acc(0) : scale * yv * (static_cast<Acc>(dy_ptr[at + j]) - dot));
            }
          }
        }
      }
    };
    ParallelFor(ctx, batch * heads * n_rows, 6 * bs * bs * std::max<int64_t>(1, nnz / n_rows), work);
  }
};

#define BSATTN_REGISTER_SOFTMAX(T)                                                              \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("BsattnMaskedSoftmax").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),        \
      MaskedSoftmaxOp<T>);                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                      \
      Name("BsattnMaskedSoftmaxGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),    \
      MaskedSoftmaxGradOp<T>);

BSATTN_REGISTER_SOFTMAX(float);
BSATTN_REGISTER_SOFTMAX(Eigen::half);
BSATTN_REGISTER_SOFTMAX(Eigen::bfloat16);
BSATTN_REGISTER_SOFTMAX(double);
#undef BSATTN_REGISTER_SOFTMAX

}  // namespace bsattn
