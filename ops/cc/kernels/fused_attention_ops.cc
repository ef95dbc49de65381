// OpKernels of BsattnFusedAttention and BsattnFusedAttentionGrad (CPU): validation of every input
// and table entry, allocation, float16/bfloat16 -> float32 conversion; the math is in
// fused_attention_kernels.cc.
#include <cmath>
#include <type_traits>

#include "ops/cc/kernels/attention_math.h"
#include "ops/cc/kernels/fused_attention_kernels.h"
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

namespace {

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

absl::Status CheckShape(const Tensor& t, const char* name, const TensorShape& expected) {
  if (t.shape() != expected) {
    return Invalid(absl::StrCat(name, " must have shape ", expected.DebugString(), ", got ",
                                t.shape().DebugString()));
  }
  return absl::OkStatus();
}

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

// The attributes and input checks shared by the forward and the gradient.
template <typename T>
class FusedAttentionBase : public OpKernel {
 public:
  using Acc = typename AccumulatorOf<T>::type;

  explicit FusedAttentionBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("heads", &heads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, CheckBlockSize(block_size_, "block_size"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
    OP_REQUIRES(ctx, std::isfinite(scale_),
                Invalid(absl::StrCat("scale must be finite, got ", scale_)));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dropout_rate", &dropout_rate_));
    OP_REQUIRES(ctx, dropout_rate_ >= 0.0f && dropout_rate_ < 1.0f,
                Invalid(absl::StrCat("dropout_rate must be in [0, 1), got ", dropout_rate_)));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_key_padding_mask", &has_key_padding_mask_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_bias", &has_bias_));
  }

 protected:
  // Checks q, k, v, the row table, masks, key padding mask, bias and seed; fills p (converting
  // q, k, v to Acc where needed, into temps).
  absl::Status Prepare(OpKernelContext* ctx, FusedAttentionParams<T>* p, Tensor temps[3]) {
    const Tensor *q, *k, *v, *row_ptr, *row_entries, *masks, *key_padding_mask, *bias, *seed;
    TF_RETURN_IF_ERROR(ctx->input("q", &q));
    TF_RETURN_IF_ERROR(ctx->input("k", &k));
    TF_RETURN_IF_ERROR(ctx->input("v", &v));
    TF_RETURN_IF_ERROR(ctx->input("row_ptr", &row_ptr));
    TF_RETURN_IF_ERROR(ctx->input("row_entries", &row_entries));
    TF_RETURN_IF_ERROR(ctx->input("masks", &masks));
    TF_RETURN_IF_ERROR(ctx->input("key_padding_mask", &key_padding_mask));
    TF_RETURN_IF_ERROR(ctx->input("bias", &bias));
    TF_RETURN_IF_ERROR(ctx->input("seed", &seed));
    const int64_t bs = block_size_;
    TF_RETURN_IF_ERROR(CheckDense(*q, "q", bs, heads_));
    TF_RETURN_IF_ERROR(CheckDense(*k, "k", bs, heads_));
    TF_RETURN_IF_ERROR(CheckShape(*v, "v", k->shape()));
    if (q->dim_size(0) != k->dim_size(0) || q->dim_size(2) != k->dim_size(2)) {
      return Invalid(absl::StrCat("q and k must have the same batch and width, got ",
                                  q->shape().DebugString(), " and ", k->shape().DebugString()));
    }
    if (q->dim_size(2) == 0) return Invalid("q width must be positive (heads * head_dim)");
    p->batch = q->dim_size(0);
    p->heads = heads_;
    p->width = q->dim_size(2);
    p->head_dim = p->width / heads_;
    p->tq = q->dim_size(1);
    p->tk = k->dim_size(1);
    p->block_size = bs;
    p->n_q_blocks = p->tq / bs;
    p->n_k_blocks = p->tk / bs;

    TF_RETURN_IF_ERROR(CheckFusedMasks(*masks, bs));
    TF_RETURN_IF_ERROR(CheckFusedTable(*row_ptr, *row_entries, "row_ptr", "row_entries", heads_,
                                       p->n_q_blocks, p->n_k_blocks, masks->dim_size(0)));
    p->shared_layout = row_ptr->dim_size(0) == 1;
    p->row_ptr = row_ptr->flat<int32_t>().data();
    p->row_entries = row_entries->flat<int32_t>().data();
    p->masks = reinterpret_cast<const uint32_t*>(masks->flat<int32_t>().data());
    p->n_masks = masks->dim_size(0);
    p->mask_words = masks->dim_size(2);

    if (has_key_padding_mask_) {
      TF_RETURN_IF_ERROR(CheckShape(*key_padding_mask, "key_padding_mask", TensorShape({p->batch, p->tk})));
      p->key_padding_mask = key_padding_mask->flat<bool>().data();
    }
    if (has_bias_) {
      if (bias->dims() != 3 || (bias->dim_size(0) != 1 && bias->dim_size(0) != heads_) ||
          bias->dim_size(1) != p->tq || bias->dim_size(2) != p->tk) {
        return Invalid(absl::StrCat("bias must have shape [1 or ", heads_, ", ", p->tq, ", ", p->tk,
                                    "], got ", bias->shape().DebugString()));
      }
      p->bias = bias->flat<T>().data();
      p->bias_heads = bias->dim_size(0);
    }
    if (seed->dims() != 0) {
      return Invalid("seed must be a scalar, got shape " + seed->shape().DebugString());
    }
    p->scale = static_cast<Acc>(scale_);
    p->dropout = dropout_rate_ > 0;
    p->dropout_key = DropoutKey(seed->scalar<int64_t>()());
    p->dropout_threshold = DropoutThreshold(dropout_rate_);
    p->dropout_scale = static_cast<Acc>(1.0 / (1.0 - static_cast<double>(dropout_rate_)));

    TF_RETURN_IF_ERROR(AsAccumulator<T>(ctx, *q, &temps[0], &p->q));
    TF_RETURN_IF_ERROR(AsAccumulator<T>(ctx, *k, &temps[1], &p->k));
    TF_RETURN_IF_ERROR(AsAccumulator<T>(ctx, *v, &temps[2], &p->v));
    return absl::OkStatus();
  }

  int64_t heads_;
  int64_t block_size_;
  float scale_;
  float dropout_rate_;
  bool has_key_padding_mask_;
  bool has_bias_;
};

template <typename T>
class FusedAttentionOp : public FusedAttentionBase<T> {
 public:
  using Acc = typename AccumulatorOf<T>::type;
  explicit FusedAttentionOp(OpKernelConstruction* ctx) : FusedAttentionBase<T>(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    FusedAttentionParams<T> p;
    Tensor temps[3];
    OP_REQUIRES_OK(ctx, this->Prepare(ctx, &p, temps));
    Tensor *out = nullptr, *lse = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({p.batch, p.heads, p.tq}), &lse));
    FusedAttentionForward(ctx, p, out->flat<T>().data(), lse->flat<Acc>().data());
  }
};

template <typename T>
class FusedAttentionGradOp : public FusedAttentionBase<T> {
 public:
  using Acc = typename AccumulatorOf<T>::type;
  explicit FusedAttentionGradOp(OpKernelConstruction* ctx) : FusedAttentionBase<T>(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_dlse", &has_dlse_));
  }

  void Compute(OpKernelContext* ctx) override {
    FusedAttentionParams<T> p;
    Tensor temps[4];
    OP_REQUIRES_OK(ctx, this->Prepare(ctx, &p, temps));
    const Tensor& out = ctx->input(3);
    const Tensor& lse = ctx->input(4);
    const Tensor& dout = ctx->input(5);
    const Tensor& dlse = ctx->input(6);
    const Tensor& row_ptr = ctx->input(7);
    const Tensor& row_entries = ctx->input(8);
    const Tensor& col_ptr = ctx->input(9);
    const Tensor& col_entries = ctx->input(10);
    const Tensor& masks = ctx->input(11);
    const Tensor& bias = ctx->input(13);
    const TensorShape stats({p.batch, p.heads, p.tq});
    OP_REQUIRES_OK(ctx, CheckShape(out, "out", ctx->input(0).shape()));
    OP_REQUIRES_OK(ctx, CheckShape(dout, "dout", ctx->input(0).shape()));
    OP_REQUIRES_OK(ctx, CheckShape(lse, "lse", stats));
    if (has_dlse_) OP_REQUIRES_OK(ctx, CheckShape(dlse, "dlse", stats));
    OP_REQUIRES_OK(ctx, CheckFusedTable(col_ptr, col_entries, "col_ptr", "col_entries", p.heads,
                                        p.n_k_blocks, p.n_q_blocks, masks.dim_size(0)));
    OP_REQUIRES_OK(ctx, CheckFusedTransposed(row_ptr, row_entries, col_ptr, col_entries));
    p.col_ptr = col_ptr.flat<int32_t>().data();
    p.col_entries = col_entries.flat<int32_t>().data();

    FusedAttentionGradInputs<T> in;
    in.out = out.flat<T>().data();
    in.lse = lse.flat<Acc>().data();
    in.dlse = has_dlse_ ? dlse.flat<Acc>().data() : nullptr;
    OP_REQUIRES_OK(ctx, AsAccumulator<T>(ctx, dout, &temps[3], &in.dout));

    Tensor *dq, *dk, *dv, *dbias;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &dq));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(), &dv));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, this->has_bias_ ? bias.shape() : TensorShape({0}), &dbias));
    Tensor delta, lse_shift, dbias_acc;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<Acc>::value, stats, &delta));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<Acc>::value, stats, &lse_shift));
    Acc* dbias_ptr = nullptr;
    if (this->has_bias_) {
      // dbias sums over the batch (and heads): accumulate in Acc, then round once.
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
      if (this->has_bias_) {
        T* dst = dbias->flat<T>().data();
        for (int64_t i = 0; i < bias.NumElements(); ++i) dst[i] = static_cast<T>(dbias_ptr[i]);
      }
    }
  }

 private:
  bool has_dlse_;
};

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
