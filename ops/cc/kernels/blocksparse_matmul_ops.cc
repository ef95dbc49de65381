// CPU kernels of the block-sparse matmuls: BsattnNt (SDD), BsattnNn (DSD) and BsattnTn (DSD^T).
// Tiles are converted to float32 scratch (float64 for double), multiplied with MatMulAccumulate, and stored back in the
// input dtype. Work is split over (batch, head, block) for Nt and (batch, head, output block row)
// for Nn/Tn, so every output tile has one writer and no atomics are needed.
#include <cmath>
#include <vector>

#include "ops/cc/kernels/cpu_math.h"
#include "ops/cc/kernels/blocksparse_checks.h"
#include "ops/cc/kernels/input_checks.h"
#include "ops/cc/kernels/tile_io.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace bsattn {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// c[n, h, blk] = a[n, Qb rows, head h] * b[n, Kb rows, head h]^T for (Qb, Kb) = nt_lut[lh, blk].
template <typename T>
class NtOp : public OpKernel {
 public:
  explicit NtOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("heads", &heads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("q_blocks", &q_blocks_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("k_blocks", &k_blocks_));
    OP_REQUIRES_OK(ctx, CheckBlockSize(block_size_, "block_size"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(1);
    const Tensor& lut = ctx->input(2);
    NtDims dims;
    OP_REQUIRES_OK(ctx, CheckNtInputs(a, b, lut, heads_, block_size_, q_blocks_, k_blocks_, &dims));
    const int64_t bs = dims.block_size, batch = dims.batch, width = dims.width, nnz = dims.nnz;
    const int64_t head_dim = width / heads_;

    Tensor* c = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, heads_, nnz, bs, bs}), &c));
    const T* a_ptr = a.flat<T>().data();
    const T* b_ptr = b.flat<T>().data();
    T* c_ptr = c->flat<T>().data();
    const int32_t* lut_ptr = lut.flat<int32_t>().data();
    const bool shared_layout = dims.lut_heads == 1;
    const int64_t a_len = dims.a_len, b_len = dims.b_len, heads = heads_;

    auto work = [&](int64_t begin, int64_t end) {
      using Acc = typename AccumulatorOf<T>::type;
      std::vector<Acc> a_tile(bs * head_dim), bt_tile(head_dim * bs), c_tile(bs * bs);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t blk = unit % nnz, h = (unit / nnz) % heads, n = unit / (nnz * heads);
        const int32_t* entry = lut_ptr + ((shared_layout ? 0 : h) * nnz + blk) * 2;
        LoadTile(a_ptr + (n * a_len + entry[0] * bs) * width + h * head_dim, width, bs, head_dim,
                 a_tile.data());
        LoadTileTransposed(b_ptr + (n * b_len + entry[1] * bs) * width + h * head_dim, width, bs,
                           head_dim, bt_tile.data());
        std::fill(c_tile.begin(), c_tile.end(), Acc(0));
        MatMulAccumulate(a_tile.data(), head_dim, bt_tile.data(), bs, c_tile.data(), bs, bs,
                         head_dim, bs);
        StoreTile(c_tile.data(), bs, bs, c_ptr + unit * bs * bs, bs);
      }
    };
    ParallelFor(ctx, batch * heads * nnz, 2 * bs * bs * head_dim, work);
  }

 private:
  int64_t heads_, block_size_, q_blocks_, k_blocks_;
};

// c[i][:] += sum over p with w[i][p] != 0 of w[i][p] * b[p][:] (w: m x k, b: k x n, row-major): the
// product with a zero weight skipped, so that a non-finite b row meets only the nonzero weights.
template <typename Acc>
void MatMulAccumulateSkipZeros(const Acc* w, const Acc* b, Acc* c, int64_t m, int64_t k, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      const Acc wv = w[i * k + p];
      if (wv == 0) continue;
      for (int64_t j = 0; j < n; ++j) c[i * n + j] += wv * b[p * n + j];
    }
  }
}

template <typename Acc>
bool AllFinite(const std::vector<Acc>& values) {
  for (const Acc v : values) {
    if (!std::isfinite(v)) return false;
  }
  return true;
}

// Shared body of Nn and Tn. For each output block row r of head h, with entries (blk, p) of the
// row table: c[n, r rows, h] = sum over entries of op(w[n, h, blk]) * b[n, p rows, h], where op is
// the identity (Nn) or the transpose (Tn). A row without entries is written as zeros. The weights
// may have their own dtype TW (half/bfloat16 weights with float activations); tiles are converted
// to the accumulator type of the activations' dtype T, and c has dtype T. A zero weight is a
// structural zero (a masked key or a fully masked query): its product with a NaN/Inf partner row is
// 0, not NaN. Tiles without a non-finite partner value (the common case) take the fast path.
template <typename TW, typename T, bool kTransposeW>
class DsdOp : public OpKernel {
 public:
  explicit DsdOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr(kPartnerAttr, &partner_blocks_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& w = ctx->input(0);
    const Tensor& b = ctx->input(1);
    const Tensor& lut = ctx->input(2);
    DsdDims dims;
    OP_REQUIRES_OK(ctx, CheckDsdInputs(w, b, lut, kTransposeW ? "tn_lut" : "nn_lut", partner_blocks_,
                                        kPartnerAttr, &dims));
    const int64_t batch = dims.batch, heads = dims.heads, nnz = dims.nnz, bs = dims.block_size;
    const int64_t width = dims.width, head_dim = width / heads, b_len = dims.b_len;
    const int64_t n_out = dims.n_out, c_len = n_out * bs;
    Tensor* c = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, c_len, width}), &c));
    const TW* w_ptr = w.flat<TW>().data();
    const T* b_ptr = b.flat<T>().data();
    T* c_ptr = c->flat<T>().data();
    const int32_t* lut_ptr = lut.flat<int32_t>().data();
    const int64_t lut_len = dims.lut_len;
    const bool shared_layout = dims.lut_heads == 1;

    auto work = [&](int64_t begin, int64_t end) {
      using Acc = typename AccumulatorOf<T>::type;
      std::vector<Acc> w_tile(bs * bs), b_tile(bs * head_dim), c_tile(bs * head_dim);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t r = unit % n_out, h = (unit / n_out) % heads, n = unit / (n_out * heads);
        const int32_t* table = lut_ptr + (shared_layout ? 0 : h) * lut_len * 2;
        const int32_t offset = table[2 * r], count = table[2 * r + 1];
        std::fill(c_tile.begin(), c_tile.end(), Acc(0));
        for (int32_t e = offset; e < offset + count; ++e) {
          const int64_t blk = table[2 * e], partner = table[2 * e + 1];
          const TW* w_block = w_ptr + ((n * heads + h) * nnz + blk) * bs * bs;
          if (kTransposeW) {
            LoadTileTransposed(w_block, bs, bs, bs, w_tile.data());
          } else {
            LoadTile(w_block, bs, bs, bs, w_tile.data());
          }
          LoadTile(b_ptr + (n * b_len + partner * bs) * width + h * head_dim, width, bs, head_dim,
                   b_tile.data());
          if (AllFinite(b_tile)) {
            MatMulAccumulate(w_tile.data(), bs, b_tile.data(), head_dim, c_tile.data(), head_dim, bs,
                             bs, head_dim);
          } else {
            MatMulAccumulateSkipZeros(w_tile.data(), b_tile.data(), c_tile.data(), bs, bs, head_dim);
          }
        }
        StoreTile(c_tile.data(), bs, head_dim, c_ptr + (n * c_len + r * bs) * width + h * head_dim,
                  width);
      }
    };
    // Rows differ in length; the average row holds nnz / n_out blocks.
    const int64_t cost = 2 * bs * bs * head_dim * std::max<int64_t>(1, nnz / n_out);
    ParallelFor(ctx, batch * heads * n_out, cost, work);
  }

 private:
  // b's blocks: key blocks for Nn (w @ v), query blocks for Tn (w^T @ q).
  static constexpr const char* kPartnerAttr = kTransposeW ? "q_blocks" : "k_blocks";
  int64_t partner_blocks_;
};

#define BSATTN_REGISTER_DSD(TW, T)                                                        \
  REGISTER_KERNEL_BUILDER(Name("BsattnNn")                                                \
                              .Device(tensorflow::DEVICE_CPU)                             \
                              .TypeConstraint<TW>("TW")                                   \
                              .TypeConstraint<T>("T"),                                    \
                          DsdOp<TW, T, false>);                                           \
  REGISTER_KERNEL_BUILDER(Name("BsattnTn")                                                \
                              .Device(tensorflow::DEVICE_CPU)                             \
                              .TypeConstraint<TW>("TW")                                   \
                              .TypeConstraint<T>("T"),                                    \
                          DsdOp<TW, T, true>);
#define BSATTN_REGISTER_MATMULS(T)                                                      \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("BsattnNt").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), NtOp<T>); \
  BSATTN_REGISTER_DSD(T, T)

BSATTN_REGISTER_MATMULS(float);
BSATTN_REGISTER_MATMULS(Eigen::half);
BSATTN_REGISTER_MATMULS(Eigen::bfloat16);
BSATTN_REGISTER_MATMULS(double);
// blocksparse's mixed precision: reduced-precision weights, float32 activations.
BSATTN_REGISTER_DSD(Eigen::half, float);
BSATTN_REGISTER_DSD(Eigen::bfloat16, float);
#undef BSATTN_REGISTER_MATMULS
#undef BSATTN_REGISTER_DSD

}  // namespace bsattn
