// GPU kernels of BsattnFusedAttention and BsattnFusedAttentionGrad: thin wrappers around
// bsattn_fused_forward / bsattn_fused_backward_ex (ops/cuda/bsattn_cuda.h). The tables (row and
// column lists, masks), the seed and q_offset (decoding) arrive in host memory and pass the CPU kernels' checks
// (fused_checks); the kernel keeps device copies of the tables (DeviceTableCache: uploaded once
// per distinct table, found again by content), so a call copies nothing and never waits for the
// GPU. Key padding mask, bias and segment ids stay on the device (their contents need no check).
// The gradient is deterministic (bit-identical runs) under
// tf.config.experimental.enable_op_determinism() or BSATTN_DETERMINISTIC=1, else dQ is accumulated
// with float32 atomics on the tensor-core path. float64 stays CPU-only.
#if GOOGLE_CUDA

#include "ops/cc/kernels/fused_checks.h"
#include "ops/cc/kernels/gpu_launch.h"
#include "ops/cuda/bsattn_cuda.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/util/determinism.h"

namespace bsattn {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// The launchers' arguments for validated inputs, with the device copies of the row table and the
// masks (and the column table for the gradient) from `cache`, held in `tables` for the launch.
template <typename T>
absl::Status MakeArgs(OpKernelContext* ctx, const FusedAttrs& a, const FusedDims& d, bool gradient,
                      DeviceTableCache* cache, Tensor tables[5], bsattn_fused_args* args) {
  const char* names[5] = {"row_ptr", "row_entries", "masks", "col_ptr", "col_entries"};
  const int32_t* device[5] = {};
  for (int i = 0; i < (gradient ? 5 : 3); ++i) {
    TF_RETURN_IF_ERROR(cache->Get(ctx, FusedInput(ctx, names[i]), &tables[i], &device[i]));
  }
  *args = bsattn_fused_args{};
  args->dtype = DtypeCode<T>();
  args->batch = d.batch;
  args->heads = d.heads;
  args->head_dim = d.head_dim;
  args->tq = d.tq;
  args->tk = d.tk;
  args->block_size = d.block_size;
  args->q = FusedInput(ctx, "q").data();
  args->k = FusedInput(ctx, "k").data();
  args->v = FusedInput(ctx, "v").data();
  args->layout_heads = d.layout_heads;
  args->row_ptr = device[0];
  args->row_entries = device[1];
  args->masks = device[2];
  args->col_ptr = device[3];
  args->col_entries = device[4];
  if (a.has_key_padding_mask) {
    args->key_padding_mask = reinterpret_cast<const uint8_t*>(FusedInput(ctx, "key_padding_mask").flat<bool>().data());
  }
  if (a.has_bias) {
    args->bias = FusedInput(ctx, "bias").data();
    args->bias_batch = d.bias_batch;
    args->bias_heads = d.bias_heads;
  }
  args->kv_heads = d.kv_heads;
  if (a.has_segment_ids) {
    args->q_segment_ids = FusedInput(ctx, "q_segment_ids").flat<int32_t>().data();
    args->k_segment_ids = FusedInput(ctx, "k_segment_ids").flat<int32_t>().data();
  }
  args->scale = a.scale;
  args->dropout_rate = a.dropout_rate;
  args->seed = d.seed;
  args->decode = a.decode;
  args->q_offset = d.q_offset;
  args->t_max = a.decode ? d.n_q_blocks * d.block_size : 0;
  args->strided_period = a.strided_period;  // checked by CheckStridedPeriod and ParseFusedAttrs
  args->head_major = a.head_major;
  return absl::OkStatus();
}

template <typename T>
class FusedAttentionGpuOp : public OpKernel {
 public:
  explicit FusedAttentionGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseFusedAttrs(ctx, false, &attrs_));
  }

  void Compute(OpKernelContext* ctx) override {
    FusedDims d;
    OP_REQUIRES_OK(ctx, CheckFusedInputs(ctx, attrs_, &d));
    Tensor tables[5];
    bsattn_fused_args args;
    OP_REQUIRES_OK(ctx, MakeArgs<T>(ctx, attrs_, d, false, &tables_, tables, &args));
    Tensor *out = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({d.batch, d.heads, d.tq}), &lse));
    OP_REQUIRES_OK(ctx, LaunchStatus(bsattn_fused_forward(&args, out->data(), lse->flat<float>().data(), Stream(ctx)),
                                     "BsattnFusedAttention"));
  }

 private:
  FusedAttrs attrs_;
  DeviceTableCache tables_;
};

template <typename T>
class FusedAttentionGradGpuOp : public OpKernel {
 public:
  explicit FusedAttentionGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseFusedAttrs(ctx, true, &attrs_));
  }

  void Compute(OpKernelContext* ctx) override {
    FusedDims d;
    OP_REQUIRES_OK(ctx, CheckFusedInputs(ctx, attrs_, &d));
    OP_REQUIRES_OK(ctx, CheckFusedGradInputs(ctx, attrs_, d));
    Tensor tables[5];
    bsattn_fused_args args;
    OP_REQUIRES_OK(ctx, MakeArgs<T>(ctx, attrs_, d, true, &tables_, tables, &args));
    const Tensor& bias = FusedInput(ctx, "bias");
    Tensor *dq, *dk, *dv, *dbias;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(), &dv));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, attrs_.has_bias ? bias.shape() : TensorShape({0}), &dbias));
    const int64_t workspace_bytes = bsattn_fused_backward_workspace(&args, attrs_.has_bias);
    Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT8, TensorShape({workspace_bytes}), &workspace));
    const int flags = tensorflow::OpDeterminismRequired() ? BSATTN_BACKWARD_DETERMINISTIC : 0;
    OP_REQUIRES_OK(ctx, LaunchStatus(bsattn_fused_backward_ex(
                                         &args, FusedInput(ctx, "out").data(), FusedInput(ctx, "lse").flat<float>().data(),
                                         FusedInput(ctx, "dout").data(),
                                         attrs_.has_dlse ? FusedInput(ctx, "dlse").flat<float>().data() : nullptr,
                                         dq->data(), dk->data(), dv->data(), attrs_.has_bias ? dbias->data() : nullptr,
                                         workspace.data(), workspace_bytes, flags, Stream(ctx)),
                                     "BsattnFusedAttentionGrad"));
  }

 private:
  FusedAttrs attrs_;
  DeviceTableCache tables_;
};

}  // namespace

#define BSATTN_REGISTER_FUSED_GPU(T)                           \
  REGISTER_KERNEL_BUILDER(Name("BsattnFusedAttention")         \
                              .Device(tensorflow::DEVICE_GPU)  \
                              .TypeConstraint<T>("T")          \
                              .TypeConstraint<float>("Tlse")   \
                              .HostMemory("row_ptr")           \
                              .HostMemory("row_entries")       \
                              .HostMemory("masks")             \
                              .HostMemory("seed")              \
                              .HostMemory("q_offset"),         \
                          FusedAttentionGpuOp<T>);             \
  REGISTER_KERNEL_BUILDER(Name("BsattnFusedAttentionGrad")     \
                              .Device(tensorflow::DEVICE_GPU)  \
                              .TypeConstraint<T>("T")          \
                              .TypeConstraint<float>("Tlse")   \
                              .HostMemory("row_ptr")           \
                              .HostMemory("row_entries")       \
                              .HostMemory("col_ptr")           \
                              .HostMemory("col_entries")       \
                              .HostMemory("masks")             \
                              .HostMemory("seed"),             \
                          FusedAttentionGradGpuOp<T>);

BSATTN_REGISTER_FUSED_GPU(float);
BSATTN_REGISTER_FUSED_GPU(Eigen::half);
BSATTN_REGISTER_FUSED_GPU(Eigen::bfloat16);
#undef BSATTN_REGISTER_FUSED_GPU

}  // namespace bsattn

#endif  // GOOGLE_CUDA
