// Registrations and shape functions of the unfused block-sparse ops.
//
// Tensor conventions (blocksparse's):
//   dense activations  [B, T, H*D]            head h owns channels [h*D, (h+1)*D)
//   block-sparse       [B, H, nnz, bs, bs]    block b = (Qb, Kb) of the row-major table
//   nt_lut             [L, nnz, 2]            (Qb, Kb) per block, L = 1 (shared) or H
//   nn_lut             [L, nQb + nnz, 2]      header (offset, count) per query-block row, then (block id, Kb)
//   tn_lut             [L, nKb + nnz, 2]      header (offset, count) per key-block column, then (block id, Qb)
//   mask               [L, nnz, bs, W] int32  W = ceil(bs/32); bit j%32 of word j/32 keeps key column j
#include "ops/cc/ops/shape_checks.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

constexpr char kDense[] = "[batch, time, heads*head_dim]";
constexpr char kBlocks[] = "[batch, heads, blocks, bs, bs]";
constexpr char kLut[] = "[L, n, 2]";

// Output of BsattnNt: [B, heads, nnz, bs, bs].
absl::Status NtShape(InferenceContext* c) {
  ShapeHandle a, b, lut;
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 0, 3, "a", kDense, &a));
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 1, 3, "b", kDense, &b));
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 2, 3, "nt_lut", kLut, &lut));
  int64_t heads, block_size, q_blocks, k_blocks;
  TF_RETURN_IF_ERROR(c->GetAttr("heads", &heads));
  TF_RETURN_IF_ERROR(c->GetAttr("block_size", &block_size));
  TF_RETURN_IF_ERROR(c->GetAttr("q_blocks", &q_blocks));
  TF_RETURN_IF_ERROR(c->GetAttr("k_blocks", &k_blocks));
  TF_RETURN_IF_ERROR(bsattn::NamedDimEquals(c, c->Dim(a, 1), q_blocks * block_size, "a", "length",
                                            "the layout's q_blocks * block_size"));
  TF_RETURN_IF_ERROR(bsattn::NamedDimEquals(c, c->Dim(b, 1), k_blocks * block_size, "b", "length",
                                            "the layout's k_blocks * block_size"));
  DimensionHandle batch;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(a, 0), c->Dim(b, 0), &batch));
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(a, 2), c->Dim(b, 2), &unused));
  c->set_output(0, c->MakeShape({batch, c->MakeDim(heads), c->Dim(lut, 1),
                                 c->MakeDim(block_size), c->MakeDim(block_size)}));
  return absl::OkStatus();
}

// Output of BsattnNn / BsattnTn: [B, n_out_blocks * bs, C], n_out_blocks = lut rows - nnz; b's
// length is the attr partner_attr (k_blocks / q_blocks) times bs.
template <const char* kLutName, const char* kPartnerAttr>
absl::Status DsdShape(InferenceContext* c) {
  ShapeHandle w, b, lut;
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 0, 5, "w", kBlocks, &w));
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 1, 3, "b", kDense, &b));
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 2, 3, kLutName, kLut, &lut));
  int64_t partner_blocks;
  TF_RETURN_IF_ERROR(c->GetAttr(kPartnerAttr, &partner_blocks));
  if (c->ValueKnown(c->Dim(w, 3))) {
    TF_RETURN_IF_ERROR(bsattn::NamedDimEquals(c, c->Dim(b, 1), partner_blocks * c->Value(c->Dim(w, 3)),
                                              "b", "length",
                                              absl::StrCat("the layout's ", kPartnerAttr, " * bs").c_str()));
  }
  DimensionHandle batch;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(w, 0), c->Dim(b, 0), &batch));
  DimensionHandle out_blocks, rows;
  TF_RETURN_IF_ERROR(c->Subtract(c->Dim(lut, 1), c->Dim(w, 2), &out_blocks));
  TF_RETURN_IF_ERROR(c->Multiply(out_blocks, c->Dim(w, 3), &rows));
  c->set_output(0, c->MakeShape({batch, rows, c->Dim(b, 2)}));
  return absl::OkStatus();
}

constexpr char kNnLut[] = "nn_lut";
constexpr char kTnLut[] = "tn_lut";
constexpr char kQBlocks[] = "q_blocks";
constexpr char kKBlocks[] = "k_blocks";

// Softmax: x (or dy, y) [B, H, blocks, bs, bs]; output = x's shape.
absl::Status SoftmaxShape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 0, 5, "x", kBlocks, &x));
  c->set_output(0, x);
  return absl::OkStatus();
}

absl::Status SoftmaxGradShape(InferenceContext* c) {
  ShapeHandle dy, y;
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 0, 5, "dy", kBlocks, &dy));
  TF_RETURN_IF_ERROR(bsattn::NamedRank(c, 1, 5, "y", kBlocks, &y));
  TF_RETURN_IF_ERROR(c->Merge(dy, y, &y));
  c->set_output(0, y);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("BsattnNt")
    .Input("a: T")
    .Input("b: T")
    .Input("nt_lut: int32")
    .Output("c: T")
    .Attr("T: {float, half, bfloat16, double}")
    .Attr("heads: int >= 1")
    .Attr("block_size: int")
    .Attr("q_blocks: int >= 1")
    .Attr("k_blocks: int >= 1")
    .SetShapeFn(NtShape)
    .Doc(R"doc(
Block-sparse C = A * B^T (SDD). a: [B, Tq, H*D], b: [B, Tk, H*D], Tq = q_blocks * block_size and
Tk = k_blocks * block_size (the layout's lengths), nt_lut: [L, nnz, 2] (Qb, Kb).
c: [B, H, nnz, bs, bs], accumulated in float32.
)doc");

REGISTER_OP("BsattnNn")
    .Input("w: TW")
    .Input("b: T")
    .Input("nn_lut: int32")
    .Output("c: T")
    .Attr("T: {float, half, bfloat16, double}")
    .Attr("TW: {float, half, bfloat16, double}")
    .Attr("k_blocks: int >= 1")
    .SetShapeFn(DsdShape<kNnLut, kKBlocks>)
    .Doc(R"doc(
Dense C = W * B (DSD). w: [B, H, nnz, bs, bs], b: [B, nKb*bs, H*D] with nKb = k_blocks,
nn_lut: [L, nQb + nnz, 2]. c: [B, nQb*bs, H*D] in b's dtype; a query-block row without blocks is 0.
TW = T, or half/bfloat16 weights with float activations (blocksparse's mixed precision).
)doc");

REGISTER_OP("BsattnTn")
    .Input("w: TW")
    .Input("b: T")
    .Input("tn_lut: int32")
    .Output("c: T")
    .Attr("T: {float, half, bfloat16, double}")
    .Attr("TW: {float, half, bfloat16, double}")
    .Attr("q_blocks: int >= 1")
    .SetShapeFn(DsdShape<kTnLut, kQBlocks>)
    .Doc(R"doc(
Dense C = W^T * B (DSD transposed). w: [B, H, nnz, bs, bs], b: [B, nQb*bs, H*D] with nQb = q_blocks,
tn_lut: [L, nKb + nnz, 2]. c: [B, nKb*bs, H*D] in b's dtype; a key-block column without blocks is 0.
TW = T, or half/bfloat16 weights with float activations.
)doc");

REGISTER_OP("BsattnMaskedSoftmax")
    .Input("x: T")
    .Input("scale: float")
    .Input("nn_lut: int32")
    .Input("mask: int32")
    .Input("autoregress_at_key: int32")
    .Output("y: T")
    .Attr("T: {float, half, bfloat16, double}")
    .Attr("autoregressive: bool = false")
    .SetShapeFn(SoftmaxShape)
    .Doc(R"doc(
Softmax of scale*x over every kept entry of each query row (all blocks of the row).
x: [B, H, nnz, bs, bs]; mask: [L, nnz, bs, ceil(bs/32)] packed keep bits.
With autoregressive, key j of query i is also dropped unless j < autoregress_at_key or j <= i.
Masked entries are 0; a row with no kept entry (or only -inf scores) is all 0; a row with a NaN or
+inf kept score is NaN at its kept entries.
)doc");

REGISTER_OP("BsattnMaskedSoftmaxGrad")
    .Input("dy: T")
    .Input("y: T")
    .Input("scale: float")
    .Input("nn_lut: int32")
    .Output("dx: T")
    .Attr("T: {float, half, bfloat16, double}")
    .SetShapeFn(SoftmaxGradShape)
    .Doc(R"doc(
Gradient of BsattnMaskedSoftmax: dx = scale * y * (dy - rowsum(dy * y)), rows as in the forward;
entries with y = 0 contribute nothing and get dx = 0 (a NaN dy there does not leak).
)doc");

}  // namespace tensorflow
