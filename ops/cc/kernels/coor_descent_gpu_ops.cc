// GPU kernels of BsattnCoorDescent and BsattnCoorDescentGrad: thin wrappers around
// bsattn_coor_descent_forward / _backward (ops/cuda/bsattn_cuda.h). k and the eps schedule arrive in
// host memory, pass the CPU kernels' checks (coor_descent_checks) and are copied to the device on
// the op's stream; s, mask, lse and dy stay on the device. float64 stays CPU-only.
#if GOOGLE_CUDA

#include "ops/cc/kernels/coor_descent_checks.h"
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

// Validates the inputs and copies k and eps to the device (kept alive in k_dev, eps_dev).
absl::Status Prepare(OpKernelContext* ctx, int n_iters, bool has_mask, bool gradient, CoorDims* d, Tensor* k_dev,
                     Tensor* eps_dev) {
  TF_RETURN_IF_ERROR(CheckCoorInputs(ctx, n_iters, has_mask, gradient, d));
  TF_RETURN_IF_ERROR(HostToDevice(ctx, ctx->input(1), k_dev));
  return HostToDevice(ctx, ctx->input(2), eps_dev);
}

const uint8_t* MaskPtr(OpKernelContext* ctx, bool has_mask) {
  return has_mask ? reinterpret_cast<const uint8_t*>(ctx->input(3).flat<bool>().data()) : nullptr;
}

template <typename T>
class CoorDescentGpuOp : public OpKernel {
 public:
  explicit CoorDescentGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseCoorAttrs(ctx, &n_iters_, &has_mask_));
  }

  void Compute(OpKernelContext* ctx) override {
    CoorDims d;
    Tensor k_dev, eps_dev;
    OP_REQUIRES_OK(ctx, Prepare(ctx, n_iters_, has_mask_, false, &d, &k_dev, &eps_dev));
    const Tensor& s = ctx->input(0);
    TensorShape lse_shape = s.shape();
    lse_shape.set_dim(s.dims() - 1, n_iters_);
    Tensor *y, *lse;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, s.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, lse_shape, &lse));
    const int k_per_row = d.scalar_k ? 0 : 1;
    const int64_t workspace_bytes = bsattn_coor_descent_workspace(d.rows, d.n, 0, k_per_row);
    Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT8, TensorShape({workspace_bytes}), &workspace));
    OP_REQUIRES_OK(ctx, LaunchStatus(bsattn_coor_descent_forward(
                                         DtypeCode<T>(), s.data(), MaskPtr(ctx, has_mask_), k_dev.flat<float>().data(),
                                         k_per_row, eps_dev.flat<float>().data(), n_iters_, d.rows, d.n, y->data(),
                                         lse->flat<float>().data(), workspace.data(), workspace_bytes, Stream(ctx)),
                                     "BsattnCoorDescent"));
  }

 private:
  int n_iters_ = 0;
  bool has_mask_ = false;
};

template <typename T>
class CoorDescentGradGpuOp : public OpKernel {
 public:
  explicit CoorDescentGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseCoorAttrs(ctx, &n_iters_, &has_mask_));
  }

  void Compute(OpKernelContext* ctx) override {
    CoorDims d;
    Tensor k_dev, eps_dev;
    OP_REQUIRES_OK(ctx, Prepare(ctx, n_iters_, has_mask_, true, &d, &k_dev, &eps_dev));
    const Tensor& s = ctx->input(0);
    Tensor *ds, *dk;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, s.shape(), &ds));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &dk));
    const int k_per_row = d.scalar_k ? 0 : 1;
    const int64_t workspace_bytes = bsattn_coor_descent_workspace(d.rows, d.n, 1, k_per_row);
    Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT8, TensorShape({workspace_bytes}), &workspace));
    OP_REQUIRES_OK(ctx, LaunchStatus(bsattn_coor_descent_backward(
                                         DtypeCode<T>(), s.data(), MaskPtr(ctx, has_mask_), k_dev.flat<float>().data(),
                                         k_per_row, eps_dev.flat<float>().data(), n_iters_, d.rows, d.n,
                                         ctx->input(4).flat<float>().data(), ctx->input(5).data(), ds->data(),
                                         dk->flat<float>().data(), workspace.data(), workspace_bytes, Stream(ctx)),
                                     "BsattnCoorDescentGrad"));
  }

 private:
  int n_iters_ = 0;
  bool has_mask_ = false;
};

}  // namespace

#define BSATTN_REGISTER_COOR_GPU(T)                          \
  REGISTER_KERNEL_BUILDER(Name("BsattnCoorDescent")          \
                              .Device(tensorflow::DEVICE_GPU) \
                              .TypeConstraint<T>("T")        \
                              .TypeConstraint<float>("Tk")   \
                              .HostMemory("k")               \
                              .HostMemory("eps"),            \
                          CoorDescentGpuOp<T>);              \
  REGISTER_KERNEL_BUILDER(Name("BsattnCoorDescentGrad")      \
                              .Device(tensorflow::DEVICE_GPU) \
                              .TypeConstraint<T>("T")        \
                              .TypeConstraint<float>("Tk")   \
                              .HostMemory("k")               \
                              .HostMemory("eps"),            \
                          CoorDescentGradGpuOp<T>);

BSATTN_REGISTER_COOR_GPU(float);
BSATTN_REGISTER_COOR_GPU(Eigen::half);
BSATTN_REGISTER_COOR_GPU(Eigen::bfloat16);
#undef BSATTN_REGISTER_COOR_GPU

}  // namespace bsattn

#endif  // GOOGLE_CUDA
