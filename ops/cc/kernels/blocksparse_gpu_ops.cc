// GPU kernels of the unfused block-sparse ops: thin wrappers around the CUDA launchers of
// ops/cuda/bsattn_cuda.h. Tables (and the softmax's masks) arrive in host memory and are validated
// with the CPU kernels' checks; each kernel keeps device copies of them (DeviceTableCache: one
// upload per distinct table, no copy and no wait for the GPU on later calls); then the launcher
// runs on the op's stream and its error code becomes the op's status. No CUDA header is needed here.
#if GOOGLE_CUDA

#include <type_traits>

#include "ops/cc/kernels/blocksparse_checks.h"
#include "ops/cc/kernels/gpu_launch.h"
#include "ops/cuda/bsattn_cuda.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace bsattn {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

template <typename T>
class NtGpuOp : public OpKernel {
 public:
  explicit NtGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("heads", &heads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("q_blocks", &q_blocks_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("k_blocks", &k_blocks_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor &a = ctx->input(0), &b = ctx->input(1), &lut = ctx->input(2);
    NtDims d;
    OP_REQUIRES_OK(ctx, CheckNtInputs(a, b, lut, heads_, block_size_, q_blocks_, k_blocks_, &d));
    Tensor lut_holder, *c = nullptr;
    const int32_t* lut_device = nullptr;
    OP_REQUIRES_OK(ctx, tables_.Get(ctx, lut, &lut_holder, &lut_device));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({d.batch, d.heads, d.nnz, d.block_size, d.block_size}), &c));
    OP_REQUIRES_OK(ctx, LaunchStatus(bsattn_nt(DtypeCode<T>(), a.data(), b.data(),
                                               lut_device, c->data(), d.batch,
                                               d.heads, d.a_len, d.b_len, d.width, d.lut_heads, d.nnz,
                                               d.block_size, Stream(ctx)),
                                     "BsattnNt"));
  }

 private:
  int64_t heads_, block_size_, q_blocks_, k_blocks_;
  DeviceTableCache tables_;
};

// TW = T, or half/bfloat16 weights with float activations (bsattn_dsd_mixed_weights).
template <typename TW, typename T, bool kTransposeW>
class DsdGpuOp : public OpKernel {
 public:
  explicit DsdGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr(kPartnerAttr, &partner_blocks_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor &w = ctx->input(0), &b = ctx->input(1), &lut = ctx->input(2);
    DsdDims d;
    OP_REQUIRES_OK(ctx, CheckDsdInputs(w, b, lut, kTransposeW ? "tn_lut" : "nn_lut", partner_blocks_,
                                        kPartnerAttr, &d));
    Tensor lut_holder, *c = nullptr;
    const int32_t* lut_device = nullptr;
    OP_REQUIRES_OK(ctx, tables_.Get(ctx, lut, &lut_holder, &lut_device));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({d.batch, d.n_out * d.block_size, d.width}), &c));
        const int status =
        std::is_same_v<TW, T>
            ? bsattn_dsd(DtypeCode<T>(), kTransposeW, w.data(), b.data(), lut_device, c->data(), d.batch,
                         d.heads, d.nnz, d.block_size, d.b_len, d.width, d.lut_heads, d.lut_len,
                         d.n_out, Stream(ctx))
            : bsattn_dsd_mixed_weights(DtypeCode<TW>(), kTransposeW, w.data(), b.data(), lut_device,
                                       c->data(), d.batch, d.heads, d.nnz, d.block_size, d.b_len,
                                       d.width, d.lut_heads, d.lut_len, d.n_out, Stream(ctx));
    OP_REQUIRES_OK(ctx, LaunchStatus(status, kTransposeW ? "BsattnTn" : "BsattnNn"));
  }

 private:
  static constexpr const char* kPartnerAttr = kTransposeW ? "q_blocks" : "k_blocks";
  int64_t partner_blocks_;
  DeviceTableCache tables_;
};

template <typename T>
class MaskedSoftmaxGpuOp : public OpKernel {
 public:
  explicit MaskedSoftmaxGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("autoregressive", &autoregressive_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor &x = ctx->input(0), &lut = ctx->input(2), &mask = ctx->input(3);
    SoftmaxDims d;
    OP_REQUIRES_OK(ctx, CheckSoftmaxInputs(x, ctx->input(1), lut, &mask, &ctx->input(4),
                                           autoregressive_, &d));
    Tensor lut_holder, mask_holder, *y = nullptr;
    const int32_t *lut_device = nullptr, *mask_device = nullptr;
    OP_REQUIRES_OK(ctx, tables_.Get(ctx, lut, &lut_holder, &lut_device));
    OP_REQUIRES_OK(ctx, tables_.Get(ctx, mask, &mask_holder, &mask_device));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, LaunchStatus(bsattn_masked_softmax(
                                         DtypeCode<T>(), x.data(), y->data(), d.scale,
                                         lut_device, mask_device,
                                         autoregressive_, d.key, d.batch, d.heads, d.nnz, d.block_size,
                                         d.lut_heads, d.mask_heads, d.lut_len, d.n_rows, Stream(ctx)),
                                     "BsattnMaskedSoftmax"));
  }

 private:
  bool autoregressive_;
  DeviceTableCache tables_;
};

template <typename T>
class MaskedSoftmaxGradGpuOp : public OpKernel {
 public:
  explicit MaskedSoftmaxGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor &dy = ctx->input(0), &y = ctx->input(1), &lut = ctx->input(3);
    SoftmaxDims d;
    OP_REQUIRES_OK(ctx, CheckSoftmaxInputs(y, ctx->input(2), lut, nullptr, nullptr, false, &d));
    OP_REQUIRES(ctx, dy.shape() == y.shape(),
                absl::InvalidArgumentError(absl::StrCat("dy shape ", dy.shape().DebugString(),
                                                        " does not match y shape ",
                                                        y.shape().DebugString())));
    Tensor lut_holder, *dx = nullptr;
    const int32_t* lut_device = nullptr;
    OP_REQUIRES_OK(ctx, tables_.Get(ctx, lut, &lut_holder, &lut_device));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y.shape(), &dx));
    OP_REQUIRES_OK(ctx, LaunchStatus(bsattn_masked_softmax_grad(
                                         DtypeCode<T>(), dy.data(), y.data(), dx->data(), d.scale,
                                         lut_device, d.batch, d.heads, d.nnz,
                                         d.block_size, d.lut_heads, d.lut_len, d.n_rows, Stream(ctx)),
                                     "BsattnMaskedSoftmaxGrad"));
  }

 private:
  DeviceTableCache tables_;
};

}  // namespace

#define BSATTN_REGISTER_DSD_GPU(TW, T)                                                           \
  REGISTER_KERNEL_BUILDER(Name("BsattnNn")                                                       \
                              .Device(tensorflow::DEVICE_GPU)                                    \
                              .TypeConstraint<TW>("TW")                                          \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("nn_lut"),                                             \
                          DsdGpuOp<TW, T, false>);                                               \
  REGISTER_KERNEL_BUILDER(Name("BsattnTn")                                                       \
                              .Device(tensorflow::DEVICE_GPU)                                    \
                              .TypeConstraint<TW>("TW")                                          \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("tn_lut"),                                             \
                          DsdGpuOp<TW, T, true>);
#define BSATTN_REGISTER_GPU(T)                                                                   \
  REGISTER_KERNEL_BUILDER(Name("BsattnNt")                                                       \
                              .Device(tensorflow::DEVICE_GPU)                                    \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("nt_lut"),                                             \
                          NtGpuOp<T>);                                                           \
  BSATTN_REGISTER_DSD_GPU(T, T)                                                                  \
  REGISTER_KERNEL_BUILDER(Name("BsattnMaskedSoftmax")                                            \
                              .Device(tensorflow::DEVICE_GPU)                                    \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("scale")                                               \
                              .HostMemory("nn_lut")                                              \
                              .HostMemory("mask")                                                \
                              .HostMemory("autoregress_at_key"),                                 \
                          MaskedSoftmaxGpuOp<T>);                                                \
  REGISTER_KERNEL_BUILDER(Name("BsattnMaskedSoftmaxGrad")                                        \
                              .Device(tensorflow::DEVICE_GPU)                                    \
                              .TypeConstraint<T>("T")                                            \
                              .HostMemory("scale")                                               \
                              .HostMemory("nn_lut"),                                             \
                          MaskedSoftmaxGradGpuOp<T>);

BSATTN_REGISTER_GPU(float);
BSATTN_REGISTER_GPU(Eigen::half);
BSATTN_REGISTER_GPU(Eigen::bfloat16);
BSATTN_REGISTER_DSD_GPU(Eigen::half, float);
BSATTN_REGISTER_DSD_GPU(Eigen::bfloat16, float);
#undef BSATTN_REGISTER_GPU
#undef BSATTN_REGISTER_DSD_GPU

}  // namespace bsattn

#endif  // GOOGLE_CUDA
