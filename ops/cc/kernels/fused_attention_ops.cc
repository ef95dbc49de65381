// OpKernels of BsattnFusedAttention and BsattnFusedAttentionGrad (CPU): validation of every input
// and table entry, allocation, float16/bfloat16 -> float32 conversion; the math is in
// fused_attention_kernels.cc.
#include <algorithm>
#include <type_traits>

#include "ops/cc/kernels/attention_math.h"
#include "ops/cc/kernels/fused_checks.h"
#include "ops/cc/kernels/fused_attention_kernels.h"
#include "ops/cc/kernels/tile_io.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace bsattn {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

namespace {

// x as Acc values: the tensor's own buffer when T is Acc, else a converted temporary.
template <typename T>
absl::Status AsAccumulator(OpKernelContext* ctx, const Tensor& x, Tensor* temp,
                           const typename AccumulatorOf<T>::type** out) {
  using Acc = typename AccumulatorOf<T>::type;
  if constexpr (std::is_same_v<T, Acc>) {
    *out = x.flat<T>().data();
  } else {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DataTypeToEnum<Acc>::value, x.shape(), temp));
    const T* src = x.flat<T>().data();
    Acc* dst = temp->flat<Acc>().data();
    ParallelFor(ctx, x.NumElements(), 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<Acc>(src[i]);
    });
    *out = dst;
  }
  return absl::OkStatus();
}

}  // namespace

// The attributes, and the input checks and parameters shared by the forward and the gradient.
template <typename T>
class FusedAttentionBase : public OpKernel {
 public:
  using Acc = typename AccumulatorOf<T>::type;

  FusedAttentionBase(OpKernelConstruction* ctx, bool gradient) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseFusedAttrs(ctx, gradient, &attrs_));
  }

 protected:
  // Checks the forward's inputs (the gradient has them too) and fills d and p (converting q, k, v
  // to Acc where needed, into temps[0..3), the blocks' segment ranges into temps[3..5)).
  absl::Status Prepare(OpKernelContext* ctx, FusedDims* dims, FusedAttentionParams<T>* p, Tensor temps[5]) {
    Tensor* segment_ranges = temps + 3;
    TF_RETURN_IF_ERROR(CheckFusedInputs(ctx, attrs_, dims));
    const FusedDims& d = *dims;
    p->batch = d.batch;
    p->heads = d.heads;
    p->width = d.width;
    p->head_dim = d.head_dim;
    p->kv_heads = d.kv_heads;
    p->kv_width = d.kv_width;
    p->group = d.heads / d.kv_heads;
    p->tq = d.tq;
    p->tk = d.tk;
    p->block_size = d.block_size;
    p->n_q_blocks = d.n_q_blocks;
    p->n_k_blocks = d.n_k_blocks;
    p->strided_period = attrs_.strided_period;  // checked by CheckFusedInputs
    p->head_major = attrs_.head_major;
    p->shared_layout = d.layout_heads == 1;
    p->row_ptr = FusedInput(ctx, "row_ptr").flat<int32_t>().data();
    p->row_entries = FusedInput(ctx, "row_entries").flat<int32_t>().data();
    p->masks = reinterpret_cast<const uint32_t*>(FusedInput(ctx, "masks").flat<int32_t>().data());
    p->n_masks = d.n_masks;
    p->mask_words = d.mask_words;
    if (attrs_.has_key_padding_mask) p->key_padding_mask = FusedInput(ctx, "key_padding_mask").flat<bool>().data();
    if (attrs_.has_bias) {
      p->bias = FusedInput(ctx, "bias").flat<T>().data();
      p->bias_batch = d.bias_batch;
      p->bias_heads = d.bias_heads;
    }
    if (attrs_.has_segment_ids) {
      p->q_segment_ids = FusedInput(ctx, "q_segment_ids").flat<int32_t>().data();
      p->k_segment_ids = FusedInput(ctx, "k_segment_ids").flat<int32_t>().data();
    }
    if (attrs_.has_segment_ids && !attrs_.decode) {  // a decoding step takes the ranges of the blocks it visits
      const int64_t sizes[2] = {d.n_q_blocks, d.n_k_blocks};
      const int32_t* ids[2] = {p->q_segment_ids, p->k_segment_ids};
      for (int i = 0; i < 2; ++i) {
        TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT32, TensorShape({d.batch, sizes[i], 2}),
                                              &segment_ranges[i]));
        SegmentRanges(ctx, ids[i], d.batch, sizes[i], d.block_size, attrs_.strided_period,
                      segment_ranges[i].flat<int32_t>().data());
      }
      p->q_block_segments = segment_ranges[0].flat<int32_t>().data();
      p->k_block_segments = segment_ranges[1].flat<int32_t>().data();
    }
    p->scale = static_cast<Acc>(attrs_.scale);
    p->dropout = attrs_.dropout_rate > 0;
    p->dropout_key = DropoutKey(d.seed);
    p->dropout_threshold = DropoutThreshold(attrs_.dropout_rate);
    p->dropout_scale = static_cast<Acc>(1.0 / (1.0 - static_cast<double>(attrs_.dropout_rate)));

    TF_RETURN_IF_ERROR(AsAccumulator<T>(ctx, ctx->input(0), &temps[0], &p->q));
    if (attrs_.decode) {  // the cache is read tile by tile in its own dtype
      p->q_offset = d.q_offset;
      p->k_store = ctx->input(1).flat<T>().data();
      p->v_store = ctx->input(2).flat<T>().data();
      return absl::OkStatus();
    }
    TF_RETURN_IF_ERROR(AsAccumulator<T>(ctx, ctx->input(1), &temps[1], &p->k));
    TF_RETURN_IF_ERROR(AsAccumulator<T>(ctx, ctx->input(2), &temps[2], &p->v));
    return absl::OkStatus();
  }


  FusedAttrs attrs_;
};

template <typename T>
class FusedAttentionOp : public FusedAttentionBase<T> {
 public:
  using Acc = typename AccumulatorOf<T>::type;
  explicit FusedAttentionOp(OpKernelConstruction* ctx) : FusedAttentionBase<T>(ctx, false) {}

  void Compute(OpKernelContext* ctx) override {
    FusedDims d;
    FusedAttentionParams<T> p;
    Tensor temps[5];
    OP_REQUIRES_OK(ctx, this->Prepare(ctx, &d, &p, temps));
    Tensor *out = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({p.batch, p.heads, p.tq}), &lse));
    if (this->attrs_.decode) {
      FusedDecodeForward(ctx, p, out->flat<T>().data(), lse->flat<Acc>().data());
    } else {
      FusedAttentionForward(ctx, p, out->flat<T>().data(), lse->flat<Acc>().data());
    }
  }
};

template <typename T>
class FusedAttentionGradOp : public FusedAttentionBase<T> {
 public:
  using Acc = typename AccumulatorOf<T>::type;
  explicit FusedAttentionGradOp(OpKernelConstruction* ctx) : FusedAttentionBase<T>(ctx, true) {}

  void Compute(OpKernelContext* ctx) override {
    FusedDims d;
    FusedAttentionParams<T> p;
    Tensor temps[6];  // q, k, v, segment ranges x2, dout
    OP_REQUIRES_OK(ctx, this->Prepare(ctx, &d, &p, temps));
    OP_REQUIRES_OK(ctx, CheckFusedGradInputs(ctx, this->attrs_, d));
    const Tensor& out = ctx->input(3);
    const Tensor& lse = ctx->input(4);
    const Tensor& dout = ctx->input(5);
    const Tensor& dlse = ctx->input(6);
    const Tensor& bias = ctx->input(13);
    const TensorShape stats({p.batch, p.heads, p.tq});
    p.col_ptr = ctx->input(9).flat<int32_t>().data();
    p.col_entries = ctx->input(10).flat<int32_t>().data();

    FusedAttentionGradInputs<T> in;
    in.out = out.flat<T>().data();
    in.lse = lse.flat<Acc>().data();
    in.dlse = this->attrs_.has_dlse ? dlse.flat<Acc>().data() : nullptr;
    OP_REQUIRES_OK(ctx, AsAccumulator<T>(ctx, dout, &temps[5], &in.dout));

    Tensor *dq, *dk, *dv, *dbias;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(), &dv));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, this->attrs_.has_bias ? bias.shape() : TensorShape({0}), &dbias));
    Tensor delta, lse_shift, dbias_acc;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<Acc>::value, stats, &delta));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<Acc>::value, stats, &lse_shift));
    Acc* dbias_ptr = nullptr;
    if (this->attrs_.has_bias) {
      // dbias sums over the batch and/or the heads it broadcasts over: accumulate in Acc, then round once.
      if constexpr (std::is_same_v<T, Acc>) {
        dbias_ptr = dbias->flat<Acc>().data();
      } else {
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<Acc>::value, bias.shape(),
                                               &dbias_acc));
        dbias_ptr = dbias_acc.flat<Acc>().data();
      }
      std::fill(dbias_ptr, dbias_ptr + bias.NumElements(), Acc(0));
    }
    FusedAttentionGrad(ctx, p, in, delta.flat<Acc>().data(), lse_shift.flat<Acc>().data(),
                       dq->flat<T>().data(), dk->flat<T>().data(), dv->flat<T>().data(), dbias_ptr);
    if constexpr (!std::is_same_v<T, Acc>) {
      if (this->attrs_.has_bias) {
        T* dst = dbias->flat<T>().data();
        for (int64_t i = 0; i < bias.NumElements(); ++i) dst[i] = static_cast<T>(dbias_ptr[i]);
      }
    }
  }
};

class FusedComputedBlocksOp : public OpKernel {
 public:
  explicit FusedComputedBlocksOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    Tensor* counts = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({2}), &counts));
    FusedComputedBlocks(counts->flat<int64_t>().data());
  }
};
REGISTER_KERNEL_BUILDER(Name("BsattnFusedComputedBlocks").Device(tensorflow::DEVICE_CPU), FusedComputedBlocksOp);

#define BSATTN_REGISTER_FUSED(T, TLSE)                                                  \
  REGISTER_KERNEL_BUILDER(Name("BsattnFusedAttention")                                  \
                              .Device(tensorflow::DEVICE_CPU)                           \
                              .TypeConstraint<T>("T")                                   \
                              .TypeConstraint<TLSE>("Tlse"),                            \
                          FusedAttentionOp<T>);                                         \
  REGISTER_KERNEL_BUILDER(Name("BsattnFusedAttentionGrad")                              \
                              .Device(tensorflow::DEVICE_CPU)                           \
                              .TypeConstraint<T>("T")                                   \
                              .TypeConstraint<TLSE>("Tlse"),                            \
                          FusedAttentionGradOp<T>);

BSATTN_REGISTER_FUSED(float, float);
BSATTN_REGISTER_FUSED(Eigen::half, float);
BSATTN_REGISTER_FUSED(Eigen::bfloat16, float);
BSATTN_REGISTER_FUSED(double, double);
#undef BSATTN_REGISTER_FUSED

}  // namespace bsattn
