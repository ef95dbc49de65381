#include "ops/cc/kernels/fused_checks.h"

#include <cmath>

#include "ops/cc/kernels/input_checks.h"

namespace bsattn {
namespace {

using tensorflow::Tensor;
using tensorflow::TensorShape;

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

absl::Status CheckShape(const Tensor& t, const char* name, const TensorShape& expected) {
  if (t.shape() != expected) {
    return Invalid(absl::StrCat(name, " must have shape ", expected.DebugString(), ", got ",
                                t.shape().DebugString()));
  }
  return absl::OkStatus();
}

// q_offset (the forward's; the gradient has none): 0 without decode; with decode the number of
// table rows comes from row_ptr and the rows [q_offset, q_offset + Tq) must lie inside the tables
// and the cache.
absl::Status CheckQueryOffset(tensorflow::OpKernelContext* ctx, const FusedAttrs& a, const Tensor& row_ptr,
                              FusedDims* d) {
  if (a.gradient) return absl::OkStatus();
  const Tensor* q_offset;
  TF_RETURN_IF_ERROR(ctx->input("q_offset", &q_offset));
  if (q_offset->dims() != 0) {
    return Invalid("q_offset must be a scalar, got shape " + q_offset->shape().DebugString());
  }
  const int64_t p = q_offset->scalar<int32_t>()();
  if (!a.decode) {
    if (p != 0) return Invalid(absl::StrCat("q_offset must be 0 unless decode=true, got ", p));
    return absl::OkStatus();
  }
  if (row_ptr.dims() != 2 || row_ptr.dim_size(1) < 1) {
    return Invalid("row_ptr must have shape [L, nQb + 1], got " + row_ptr.shape().DebugString());
  }
  const int64_t bs = a.block_size, t_max = (row_ptr.dim_size(1) - 1) * bs;
  if (p < 0) return Invalid(absl::StrCat("q_offset must be >= 0, got ", p));
  if (p + d->tq > t_max) {
    return Invalid(absl::StrCat("q_offset + Tq = ", p, " + ", d->tq, " must be <= the tables' query length T_max = ",
                                t_max, " (decode)"));
  }
  if (p + d->tq > d->tk) {
    return Invalid(absl::StrCat("q_offset + Tq = ", p, " + ", d->tq, " must be <= the cache length Tk = ", d->tk,
                                " (k's length; decode)"));
  }
  d->q_offset = p;
  d->n_q_blocks = t_max / bs;
  if (d->tq > 0) {
    d->decode_rows[0] = p / bs;
    d->decode_rows[1] = (p + d->tq - 1) / bs + 1;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseFusedAttrs(tensorflow::OpKernelConstruction* ctx, bool gradient, FusedAttrs* a) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("heads", &a->heads));
  TF_RETURN_IF_ERROR(ctx->GetAttr("kv_heads", &a->kv_heads));
  if (a->kv_heads < 0 || (a->kv_heads > 0 && a->heads % a->kv_heads != 0)) {
    return Invalid(absl::StrCat("kv_heads must divide heads (", a->heads, "), got ", a->kv_heads));
  }
  if (a->kv_heads == 0) a->kv_heads = a->heads;
  TF_RETURN_IF_ERROR(ctx->GetAttr("has_segment_ids", &a->has_segment_ids));
  TF_RETURN_IF_ERROR(ctx->GetAttr("block_size", &a->block_size));
  TF_RETURN_IF_ERROR(CheckBlockSize(a->block_size, "block_size"));
  TF_RETURN_IF_ERROR(ctx->GetAttr("scale", &a->scale));
  if (!std::isfinite(a->scale)) return Invalid(absl::StrCat("scale must be finite, got ", a->scale));
  TF_RETURN_IF_ERROR(ctx->GetAttr("dropout_rate", &a->dropout_rate));
  if (!(a->dropout_rate >= 0.0f && a->dropout_rate < 1.0f)) {
    return Invalid(absl::StrCat("dropout_rate must be in [0, 1), got ", a->dropout_rate));
  }
  TF_RETURN_IF_ERROR(ctx->GetAttr("has_key_padding_mask", &a->has_key_padding_mask));
  TF_RETURN_IF_ERROR(ctx->GetAttr("has_bias", &a->has_bias));
  a->gradient = gradient;
  if (gradient) {
    TF_RETURN_IF_ERROR(ctx->GetAttr("has_dlse", &a->has_dlse));
  } else {
    TF_RETURN_IF_ERROR(ctx->GetAttr("decode", &a->decode));
  }
  TF_RETURN_IF_ERROR(ctx->GetAttr("strided_period", &a->strided_period));
  TF_RETURN_IF_ERROR(ctx->GetAttr("head_major", &a->head_major));
  if (a->strided_period > 0 && a->decode) {
    return Invalid("strided_period must be 0 with decode (decode 'strided' by gathering the residue class)");
  }
  if (a->strided_period > 0 && a->has_bias) {
    return Invalid("strided_period must be 0 with has_bias (a bias is not supported by the strided mode)");
  }
  return absl::OkStatus();
}

// q or k of the head_major layout: [B, heads, T, D] with heads = the attr `heads_attr` and T a
// multiple of multiple.
absl::Status CheckHeadMajor(const Tensor& t, const char* name, int64_t multiple, int64_t heads, const char* heads_attr) {
  if (t.dims() != 4) {
    return Invalid(absl::StrCat(name, " must be [batch, heads, time, head_dim] (head_major), got shape ",
                                t.shape().DebugString()));
  }
  if (t.dim_size(1) != heads) {
    return Invalid(absl::StrCat(name, " dimension 1 must be ", heads_attr, " = ", heads, " (head_major), got shape ",
                                t.shape().DebugString()));
  }
  if (t.dim_size(2) % multiple != 0) {
    return Invalid(absl::StrCat(name, " length ", t.dim_size(2), " is not a multiple of block_size ", multiple));
  }
  return absl::OkStatus();
}

// strided_period L > 0: self-attention over T tokens split into L residue classes of T / L tokens each,
// whole blocks of the permuted order.
absl::Status CheckStridedPeriod(int64_t period, const FusedDims& d) {
  if (period == 0) return absl::OkStatus();
  if (d.tq != d.tk) {
    return Invalid(absl::StrCat("strided_period needs self-attention (Tq == Tk), got Tq = ", d.tq, ", Tk = ", d.tk));
  }
  if (d.tq % period != 0 || (d.tq / period) % d.block_size != 0) {
    return Invalid(absl::StrCat("strided_period = ", period, ": T = ", d.tq, " must be a multiple of it and T / ",
                                period, " a multiple of block_size = ", d.block_size));
  }
  return absl::OkStatus();
}

absl::Status CheckFusedInputs(tensorflow::OpKernelContext* ctx, const FusedAttrs& a, FusedDims* d) {
  const Tensor *q, *k, *v, *row_ptr, *row_entries, *masks, *key_padding_mask, *bias, *q_segment_ids,
      *k_segment_ids, *seed;
  TF_RETURN_IF_ERROR(ctx->input("q", &q));
  TF_RETURN_IF_ERROR(ctx->input("k", &k));
  TF_RETURN_IF_ERROR(ctx->input("v", &v));
  TF_RETURN_IF_ERROR(ctx->input("row_ptr", &row_ptr));
  TF_RETURN_IF_ERROR(ctx->input("row_entries", &row_entries));
  TF_RETURN_IF_ERROR(ctx->input("masks", &masks));
  TF_RETURN_IF_ERROR(ctx->input("key_padding_mask", &key_padding_mask));
  TF_RETURN_IF_ERROR(ctx->input("bias", &bias));
  TF_RETURN_IF_ERROR(ctx->input("q_segment_ids", &q_segment_ids));
  TF_RETURN_IF_ERROR(ctx->input("k_segment_ids", &k_segment_ids));
  TF_RETURN_IF_ERROR(ctx->input("seed", &seed));
  const int64_t bs = a.block_size;
  const int64_t q_multiple = a.decode ? 1 : bs;  // a decoding step's queries are any number of rows
  if (a.head_major) {
    TF_RETURN_IF_ERROR(CheckHeadMajor(*q, "q", q_multiple, a.heads, "heads"));
    TF_RETURN_IF_ERROR(CheckHeadMajor(*k, "k", bs, a.kv_heads, "kv_heads"));
  } else {
    TF_RETURN_IF_ERROR(CheckDense(*q, "q", q_multiple, a.heads));
    TF_RETURN_IF_ERROR(CheckDense(*k, "k", bs, a.kv_heads));
  }
  TF_RETURN_IF_ERROR(CheckShape(*v, "v", k->shape()));
  const int len_dim = a.head_major ? 2 : 1;  // the time dimension of q, k, v
  d->batch = q->dim_size(0);
  d->heads = a.heads;
  d->head_dim = a.head_major ? q->dim_size(3) : q->dim_size(2) / a.heads;
  d->width = a.heads * d->head_dim;
  if (d->head_dim == 0) return Invalid(absl::StrCat("q head_dim must be positive, got q ", q->shape().DebugString()));
  d->kv_heads = a.kv_heads;
  d->kv_width = a.kv_heads * d->head_dim;
  const int64_t k_head_dim = a.head_major ? k->dim_size(3) : k->dim_size(2) / a.kv_heads;
  if (q->dim_size(0) != k->dim_size(0) || k_head_dim != d->head_dim ||
      (!a.head_major && k->dim_size(2) != d->kv_width)) {
    return Invalid(absl::StrCat(a.head_major ? "q and k must have the same batch and head_dim"
                                             : "q and k must have the same batch and width, with k's width "
                                               "kv_heads * head_dim = ",
                                a.head_major ? "" : absl::StrCat(a.kv_heads, " * ", d->head_dim, " = ", d->kv_width),
                                ", got q ", q->shape().DebugString(), " and k ", k->shape().DebugString()));
  }
  d->tq = q->dim_size(len_dim);
  d->tk = k->dim_size(len_dim);
  d->block_size = bs;
  d->n_q_blocks = d->tq / bs;
  d->n_k_blocks = d->tk / bs;
  TF_RETURN_IF_ERROR(CheckQueryOffset(ctx, a, *row_ptr, d));
  TF_RETURN_IF_ERROR(CheckStridedPeriod(a.strided_period, *d));

  TF_RETURN_IF_ERROR(CheckFusedMasks(*masks, bs));
  TF_RETURN_IF_ERROR(CheckFusedTableRows(*row_ptr, *row_entries, "row_ptr", "row_entries", a.heads, d->n_q_blocks,
                                         d->n_k_blocks, masks->dim_size(0), a.decode ? d->decode_rows[0] : 0,
                                         a.decode ? d->decode_rows[1] : d->n_q_blocks));
  d->layout_heads = row_ptr->dim_size(0);
  d->n_masks = masks->dim_size(0);
  d->mask_words = masks->dim_size(2);

  if (a.has_key_padding_mask) {
    TF_RETURN_IF_ERROR(CheckShape(*key_padding_mask, "key_padding_mask", TensorShape({d->batch, d->tk})));
  }
  d->bias_batch = d->bias_heads = 0;
  if (a.has_bias) {
    if (bias->dims() != 4 || (bias->dim_size(0) != 1 && bias->dim_size(0) != d->batch) ||
        (bias->dim_size(1) != 1 && bias->dim_size(1) != a.heads) || bias->dim_size(2) != d->tq ||
        bias->dim_size(3) != d->tk) {
      return Invalid(absl::StrCat("bias must have shape [1 or ", d->batch, ", 1 or ", a.heads, ", ", d->tq,
                                  ", ", d->tk, "], got ", bias->shape().DebugString()));
    }
    d->bias_batch = bias->dim_size(0);
    d->bias_heads = bias->dim_size(1);
  }
  if (a.has_segment_ids) {
    if (q_segment_ids->dtype() != tensorflow::DT_INT32 || k_segment_ids->dtype() != tensorflow::DT_INT32) {
      return Invalid("q_segment_ids and k_segment_ids must be int32");
    }
    TF_RETURN_IF_ERROR(CheckShape(*q_segment_ids, "q_segment_ids", TensorShape({d->batch, d->tq})));
    TF_RETURN_IF_ERROR(CheckShape(*k_segment_ids, "k_segment_ids", TensorShape({d->batch, d->tk})));
  }
  if (seed->dims() != 0) return Invalid("seed must be a scalar, got shape " + seed->shape().DebugString());
  d->seed = seed->scalar<int64_t>()();
  return absl::OkStatus();
}

absl::Status CheckFusedGradInputs(tensorflow::OpKernelContext* ctx, const FusedAttrs& a,
                                  const FusedDims& d) {
  const Tensor *q, *out, *lse, *dout, *dlse, *row_ptr, *row_entries, *col_ptr, *col_entries;
  TF_RETURN_IF_ERROR(ctx->input("q", &q));
  TF_RETURN_IF_ERROR(ctx->input("out", &out));
  TF_RETURN_IF_ERROR(ctx->input("lse", &lse));
  TF_RETURN_IF_ERROR(ctx->input("dout", &dout));
  TF_RETURN_IF_ERROR(ctx->input("dlse", &dlse));
  TF_RETURN_IF_ERROR(ctx->input("row_ptr", &row_ptr));
  TF_RETURN_IF_ERROR(ctx->input("row_entries", &row_entries));
  TF_RETURN_IF_ERROR(ctx->input("col_ptr", &col_ptr));
  TF_RETURN_IF_ERROR(ctx->input("col_entries", &col_entries));
  const TensorShape stats({d.batch, d.heads, d.tq});
  TF_RETURN_IF_ERROR(CheckShape(*out, "out", q->shape()));
  TF_RETURN_IF_ERROR(CheckShape(*dout, "dout", q->shape()));
  TF_RETURN_IF_ERROR(CheckShape(*lse, "lse", stats));
  if (a.has_dlse) TF_RETURN_IF_ERROR(CheckShape(*dlse, "dlse", stats));
  TF_RETURN_IF_ERROR(CheckFusedTable(*col_ptr, *col_entries, "col_ptr", "col_entries", d.heads,
                                     d.n_k_blocks, d.n_q_blocks, d.n_masks));
  return CheckFusedTransposed(*row_ptr, *row_entries, *col_ptr, *col_entries);
}

const Tensor& FusedInput(tensorflow::OpKernelContext* ctx, const char* name) {
  const Tensor* t = nullptr;
  ctx->input(name, &t).IgnoreError();  // the checks have already looked every name up
  return *t;
}

}  // namespace bsattn
