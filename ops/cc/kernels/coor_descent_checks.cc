#include "ops/cc/kernels/coor_descent_checks.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace bsattn {
namespace {

using tensorflow::Tensor;
using tensorflow::TensorShape;

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

// Element i of a float32 or float64 host tensor.
double Value(const Tensor& t, int64_t i) {
  return t.dtype() == tensorflow::DT_DOUBLE ? t.flat<double>()(i) : static_cast<double>(t.flat<float>()(i));
}

}  // namespace

absl::Status ParseCoorAttrs(tensorflow::OpKernelConstruction* ctx, int* n_iters, bool* has_mask) {
  int64_t iters;
  TF_RETURN_IF_ERROR(ctx->GetAttr("n_iters", &iters));
  TF_RETURN_IF_ERROR(ctx->GetAttr("has_mask", has_mask));
  if (iters <= 0 || iters > (1 << 20)) return Invalid(absl::StrCat("n_iters must be in [1, 2^20], got ", iters));
  *n_iters = static_cast<int>(iters);
  return absl::OkStatus();
}

absl::Status CheckCoorInputs(tensorflow::OpKernelContext* ctx, int n_iters, bool has_mask, bool gradient,
                             CoorDims* d) {
  const Tensor& s = ctx->input(0);
  const Tensor& k = ctx->input(1);
  const Tensor& eps = ctx->input(2);
  const Tensor& mask = ctx->input(3);
  if (s.dims() < 1) return Invalid("s must have rank >= 1 ([..., n]), got a scalar");
  const bool want_double = s.dtype() == tensorflow::DT_DOUBLE;
  if ((k.dtype() == tensorflow::DT_DOUBLE) != want_double) {
    return Invalid(absl::StrCat("k and eps must be float64 for float64 s and float32 otherwise; s is ",
                                tensorflow::DataTypeString(s.dtype()), ", k is ",
                                tensorflow::DataTypeString(k.dtype())));
  }
  d->n_iters = n_iters;
  d->has_mask = has_mask;
  d->n = s.dim_size(s.dims() - 1);
  TensorShape lead = s.shape();
  lead.RemoveLastDims(1);
  d->rows = lead.num_elements();
  d->scalar_k = k.dims() == 0;
  if (!d->scalar_k && k.shape() != lead) {
    return Invalid(absl::StrCat("k must be a scalar or have shape s.shape[:-1] = ", lead.DebugString(), ", got ",
                                k.shape().DebugString()));
  }
  for (int64_t i = 0; i < k.NumElements(); ++i) {
    const double v = Value(k, i);
    if (!(v > 0) || !std::isfinite(v)) {
      return Invalid(absl::StrCat("k must be finite and > 0, got k", d->scalar_k ? "" : absl::StrCat("[", i, "]"),
                                  " = ", v));
    }
    if (d->n > 0 && v > static_cast<double>(d->n)) {
      return Invalid(absl::StrCat("k must be <= n = ", d->n, " (the last dimension of s), got k",
                                  d->scalar_k ? "" : absl::StrCat("[", i, "]"), " = ", v));
    }
  }
  if (eps.dims() != 1 || eps.dim_size(0) != n_iters + 1) {
    return Invalid(absl::StrCat("eps (the schedule) must be [n_iters + 1] = [", n_iters + 1, "], got ",
                                eps.shape().DebugString()));
  }
  for (int64_t i = 0; i < eps.NumElements(); ++i) {
    const double v = Value(eps, i);
    if (!(v > 0) || !std::isfinite(v)) {
      return Invalid(absl::StrCat("eps must be finite and > 0, got eps schedule[", i, "] = ", v));
    }
  }
  if (has_mask && mask.shape() != s.shape()) {
    return Invalid(absl::StrCat("mask must have the shape of s ", s.shape().DebugString(), ", got ",
                                mask.shape().DebugString()));
  }
  if (gradient) {
    TensorShape lse_shape = lead;
    lse_shape.AddDim(n_iters);
    if (ctx->input(4).shape() != lse_shape) {
      return Invalid(absl::StrCat("lse must be [..., n_iters] = ", lse_shape.DebugString(), ", got ",
                                  ctx->input(4).shape().DebugString()));
    }
    if (ctx->input(5).shape() != s.shape()) {
      return Invalid(absl::StrCat("dy must have the shape of s ", s.shape().DebugString(), ", got ",
                                  ctx->input(5).shape().DebugString()));
    }
  }
  return absl::OkStatus();
}

}  // namespace bsattn
