// Registrations and shape functions of the fused coordinate descent (CoLT5's coor_descent,
// bsattn/colt5/coor_descent_op.py).
//
// Tensors (rows = the product of s's leading dimensions, one problem per row):
//   s      [..., n]           scores (T)
//   k      [] or [...]        how many entries each row keeps (Tk; one value for every row, or one
//                             per row); 0 < k <= the row's unmasked count
//   eps    [n_iters + 1]      the eps schedule (Tk): eps[t] is used by iteration t + 1 and eps[n_iters]
//                             by the output; the wrapper builds it as the original does
//                             (eps_1 = max(eps_init, eps), eps_{t+1} = max(eps_t * eps_decay, eps))
//   mask   s's shape (bool)   true = a real entry (has_mask; else an empty tensor)
//   y      [..., n]           exp((s + a + b) / eps_final) = min(1, exp((s + a) / eps_final)); 0 where
//                             masked and on a fully masked row
//   lse    [..., n_iters]     the checkpoint of the backward: the logsumexp of every iteration (Tk)
// T is float32, float16, bfloat16 (computed in float32, Tk = float32) or float64 (Tk = float64).
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Checks what the shapes say about n_iters, k, eps and mask; *lse = s.shape[:-1] + [n_iters].
absl::Status CheckCoorShapes(InferenceContext* c, ShapeHandle* lse) {
  int64_t n_iters;
  bool has_mask;
  TF_RETURN_IF_ERROR(c->GetAttr("n_iters", &n_iters));
  TF_RETURN_IF_ERROR(c->GetAttr("has_mask", &has_mask));
  if (n_iters <= 0) return absl::InvalidArgumentError(absl::StrCat("n_iters must be >= 1, got ", n_iters));
  ShapeHandle s = c->input(0), k = c->input(1), eps = c->input(2), mask = c->input(3);
  if (c->RankKnown(s) && c->Rank(s) == 0) {
    return absl::InvalidArgumentError("s must have rank >= 1 ([..., n]), got a scalar");
  }
  if (c->RankKnown(eps)) {
    if (c->Rank(eps) != 1) {
      return absl::InvalidArgumentError(absl::StrCat("eps (the schedule) must be [n_iters + 1], got shape ",
                                                     c->DebugString(eps)));
    }
    const DimensionHandle len = c->Dim(eps, 0);
    if (c->ValueKnown(len) && c->Value(len) != n_iters + 1) {
      return absl::InvalidArgumentError(absl::StrCat("eps (the schedule) must have n_iters + 1 = ", n_iters + 1,
                                                     " values, got ", c->Value(len)));
    }
  }
  if (c->RankKnown(s) && c->RankKnown(k) && c->Rank(k) != 0 && c->Rank(k) != c->Rank(s) - 1) {
    return absl::InvalidArgumentError(absl::StrCat("k must be a scalar or have shape s.shape[:-1]; s has shape ",
                                                   c->DebugString(s), ", k has shape ", c->DebugString(k)));
  }
  if (has_mask && c->RankKnown(s) && c->RankKnown(mask) && c->Rank(mask) != c->Rank(s)) {
    return absl::InvalidArgumentError(absl::StrCat("mask must have the shape of s ", c->DebugString(s), ", got ",
                                                   c->DebugString(mask)));
  }
  if (!c->RankKnown(s)) {
    *lse = c->UnknownShape();
    return absl::OkStatus();
  }
  ShapeHandle lead;
  TF_RETURN_IF_ERROR(c->Subshape(s, 0, -1, &lead));
  return c->Concatenate(lead, c->Vector(n_iters), lse);
}

absl::Status CoorForwardShape(InferenceContext* c) {
  ShapeHandle lse;
  TF_RETURN_IF_ERROR(CheckCoorShapes(c, &lse));
  c->set_output(0, c->input(0));
  c->set_output(1, lse);
  return absl::OkStatus();
}

absl::Status CoorGradShape(InferenceContext* c) {
  ShapeHandle lse;
  TF_RETURN_IF_ERROR(CheckCoorShapes(c, &lse));
  c->set_output(0, c->input(0));
  c->set_output(1, c->input(1));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("BsattnCoorDescent")
    .Input("s: T")
    .Input("k: Tk")
    .Input("eps: Tk")
    .Input("mask: bool")
    .Output("y: T")
    .Output("lse: Tk")
    .Attr("T: {float, half, bfloat16, double}")
    .Attr("Tk: {float, double} = DT_FLOAT")
    .Attr("n_iters: int")
    .Attr("has_mask: bool = false")
    .SetShapeFn(CoorForwardShape)
    .Doc(R"doc(
Entropy-regularised top-k of every row of s by dual coordinate ascent (CoLT5's coor_descent):
a = 0, b = -s; n_iters times: a = eps_t (log k - logsumexp((s + b) / eps_t)), b = -relu(s + a);
y = exp((s + a + b) / eps_final). Masked entries drop out of every sum and give y = 0; a fully
masked row gives 0. Each row is one work item; lse (one value per iteration and row) is all the
backward needs besides s.
)doc");

REGISTER_OP("BsattnCoorDescentGrad")
    .Input("s: T")
    .Input("k: Tk")
    .Input("eps: Tk")
    .Input("mask: bool")
    .Input("lse: Tk")
    .Input("dy: T")
    .Output("ds: T")
    .Output("dk: Tk")
    .Attr("T: {float, half, bfloat16, double}")
    .Attr("Tk: {float, double} = DT_FLOAT")
    .Attr("n_iters: int")
    .Attr("has_mask: bool = false")
    .SetShapeFn(CoorGradShape)
    .Doc(R"doc(
Exact gradient of BsattnCoorDescent (the reverse of the unrolled iteration): the iterations are
replayed backwards, each recomputing its softmax from s and the forward's lse. dk has k's shape
(summed over the rows when k is a scalar); ds is 0 where masked.
)doc");

}  // namespace tensorflow
