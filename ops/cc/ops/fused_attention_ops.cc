// Registrations and shape functions of the fused (flash-style) block-sparse attention.
//
// Tensors:
//   q                  [B, Tq, H*D]      head h owns channels [h*D, (h+1)*D); Tq = nQb * bs
//   k, v               [B, Tk, KVH*D]    Tk = nKb * bs; KVH = kv_heads (0 = H) divides H, query
//                                        head h reads K/V head h / (H / KVH) (grouped-query /
//                                        multi-query attention, no copy of K/V)
//   out                [B, Tq, H*D]
//   head_major=true:   q, out [B, H, Tq, D] and k, v [B, KVH, Tk, D] instead (each head's rows contiguous,
//                      the [batch, heads, n, dim_head] layout of memory-efficient attention; no transposes)
//   lse                [B, H, Tq]        log-sum-exp of each query row's scores; -inf for a row with
//                                        no kept key (its output is 0), NaN for a row with an
//                                        attended NaN score (its output is NaN)
// Masked entries (layout, in-block mask, key padding, a -inf bias) are never read: NaN/Inf in q,
// k, v or bias there reaches no output or gradient. B, Tq and Tk may be 0.
// Tables (bsattn/fused_tables.py; per-head CSR, block counts may differ between heads):
//   row_ptr            [L, nQb + 1]      global offsets into row_entries, L = 1 (shared) or H
//   row_entries        [E, 2]            (Kb, mask id), Kb strictly increasing along a row
//   col_ptr            [L, nKb + 1]      the transposed table, for dK/dV
//   col_entries        [E, 2]            (Qb, mask id), Qb strictly increasing along a column
//   masks              [P, bs, W] int32  keep bits of the partial blocks, W = ceil(bs/32): bit j%32 of
//                                        word j/32 of row i keeps key j for query i; mask id -1 = full
// Optional inputs, empty when their has_* attr is false:
//   key_padding_mask   [B, Tk] bool      true = a real key, false = padding (never attended)
//   bias               [Bb, Hb, Tq, Tk]  added to the scaled scores, broadcast over the batch
//                                        (Bb = 1) and/or the heads (Hb = 1), else Bb = B, Hb = H;
//                                        read only at active blocks
//   q_segment_ids      [B, Tq] int32     packed sequences (has_segment_ids, both or neither): query
//   k_segment_ids      [B, Tk] int32     i attends key j only if their ids are equal; blocks whose
//                                        [min, max] id ranges do not overlap are skipped per batch
//                                        entry, other-segment entries of computed blocks are masked
//   q_offset           scalar int32      (forward) 0 unless decode; with decode (KV-cache decoding) the
//                                        absolute position p of q's row 0 (see the op's doc)
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Activation input `index` (q, k, v, out, dout; named `name`): rank 3 [B, T, heads * D], or rank 4
// [B, heads, T, D] when head_major.
absl::Status WithActivationRank(InferenceContext* c, int index, const char* name, bool head_major, ShapeHandle* x) {
  const int rank = head_major ? 4 : 3;
  if (!c->WithRank(c->input(index), rank, x).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must have rank ", rank,
                                                   head_major ? " [batch, heads, length, head_dim] (head_major)"
                                                              : " [batch, length, heads * head_dim]",
                                                   ", got shape ", c->DebugString(c->input(index))));
  }
  return absl::OkStatus();
}

// bias (input `index`) must be rank 4 [B|1, H|1, Tq, Tk] when has_bias.
absl::Status CheckBiasRank(InferenceContext* c, int index) {
  bool has_bias;
  TF_RETURN_IF_ERROR(c->GetAttr("has_bias", &has_bias));
  const ShapeHandle bias = c->input(index);
  if (has_bias && c->RankKnown(bias) && c->Rank(bias) != 4) {
    return absl::InvalidArgumentError(absl::StrCat("bias must have rank 4 [batch or 1, heads or 1, Tq, Tk], got shape ",
                                                   c->DebugString(bias)));
  }
  return absl::OkStatus();
}

// kv_heads must divide heads; k's width (when known) must be q's width / (heads / kv_heads); the
// segment ids (input `index` and the next), when has_segment_ids, must be [B, Tq] and [B, Tk].
absl::Status CheckGroupsAndSegments(InferenceContext* c, int index) {
  int64_t heads, kv_heads;
  TF_RETURN_IF_ERROR(c->GetAttr("heads", &heads));
  TF_RETURN_IF_ERROR(c->GetAttr("kv_heads", &kv_heads));
  if (kv_heads < 0 || (kv_heads > 0 && heads % kv_heads != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("kv_heads must divide heads (", heads, "), got ", kv_heads));
  }
  if (kv_heads == 0) kv_heads = heads;
  bool head_major;
  TF_RETURN_IF_ERROR(c->GetAttr("head_major", &head_major));
  ShapeHandle q, k;
  TF_RETURN_IF_ERROR(WithActivationRank(c, 0, "q", head_major, &q));
  TF_RETURN_IF_ERROR(WithActivationRank(c, 1, "k", head_major, &k));
  if (head_major) {
    const ShapeHandle xs[2] = {q, k};
    const int64_t expected[2] = {heads, kv_heads};
    const char* names[2] = {"q", "k"};
    const char* attrs[2] = {"heads", "kv_heads"};
    for (int i = 0; i < 2; ++i) {
      const DimensionHandle h = c->Dim(xs[i], 1);
      if (c->ValueKnown(h) && c->Value(h) != expected[i]) {
        return absl::InvalidArgumentError(absl::StrCat(names[i], " dimension 1 must be ", attrs[i], " = ", expected[i],
                                                       " (head_major), got shape ", c->DebugString(xs[i])));
      }
    }
  } else {
    const DimensionHandle qw = c->Dim(q, 2), kw = c->Dim(k, 2);
    if (c->ValueKnown(qw) && c->ValueKnown(kw) && c->Value(qw) % heads == 0 &&
        c->Value(kw) != c->Value(qw) / heads * kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("k width must be kv_heads * head_dim = ", kv_heads, " * ",
                                                     c->Value(qw) / heads, ", got k shape ", c->DebugString(k)));
    }
  }
  bool has_segment_ids;
  TF_RETURN_IF_ERROR(c->GetAttr("has_segment_ids", &has_segment_ids));
  if (!has_segment_ids) return absl::OkStatus();
  const char* names[2] = {"q_segment_ids", "k_segment_ids"};
  const ShapeHandle xs[2] = {q, k};
  for (int i = 0; i < 2; ++i) {
    ShapeHandle ids;
    if (!c->WithRank(c->input(index + i), 2, &ids).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(names[i], " must have rank 2 [batch, length], got shape ",
                                                     c->DebugString(c->input(index + i))));
    }
    DimensionHandle unused;
    if (!c->Merge(c->Dim(ids, 0), c->Dim(xs[i], 0), &unused).ok() ||
        !c->Merge(c->Dim(ids, 1), c->Dim(xs[i], head_major ? 2 : 1), &unused).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(names[i], " must have shape [batch, ", i == 0 ? "Tq" : "Tk",
                                                     "] = ", c->DebugString(c->input(index + i)), " vs ",
                                                     i == 0 ? "q " : "k ", c->DebugString(xs[i])));
    }
  }
  return absl::OkStatus();
}

// out = q's shape, lse = [B, heads, Tq]; q_offset (input 11) is a scalar.
absl::Status FusedForwardShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckBiasRank(c, 7));
  TF_RETURN_IF_ERROR(CheckGroupsAndSegments(c, 8));
  ShapeHandle unused;
  if (!c->WithRank(c->input(11), 0, &unused).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("q_offset must be a scalar, got shape ", c->DebugString(c->input(11))));
  }
  bool head_major;
  TF_RETURN_IF_ERROR(c->GetAttr("head_major", &head_major));
  ShapeHandle q, k, v;
  TF_RETURN_IF_ERROR(WithActivationRank(c, 0, "q", head_major, &q));
  TF_RETURN_IF_ERROR(WithActivationRank(c, 1, "k", head_major, &k));
  TF_RETURN_IF_ERROR(WithActivationRank(c, 2, "v", head_major, &v));
  TF_RETURN_IF_ERROR(c->Merge(k, v, &k));
  int64_t heads;
  TF_RETURN_IF_ERROR(c->GetAttr("heads", &heads));
  DimensionHandle batch;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 0), c->Dim(k, 0), &batch));
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->ReplaceDim(q, 0, batch, &out));
  c->set_output(0, out);
  c->set_output(1, c->MakeShape({batch, c->MakeDim(heads), c->Dim(q, head_major ? 2 : 1)}));
  return absl::OkStatus();
}

// dq, dk, dv = the shapes of q, k, v; dbias = bias's shape (empty without a bias).
absl::Status FusedGradShape(InferenceContext* c) {
  bool head_major;
  TF_RETURN_IF_ERROR(c->GetAttr("head_major", &head_major));
  const char* names[3] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    ShapeHandle x;
    TF_RETURN_IF_ERROR(WithActivationRank(c, i, names[i], head_major, &x));
    c->set_output(i, x);
  }
  TF_RETURN_IF_ERROR(CheckBiasRank(c, 13));
  TF_RETURN_IF_ERROR(CheckGroupsAndSegments(c, 14));
  bool has_bias;
  TF_RETURN_IF_ERROR(c->GetAttr("has_bias", &has_bias));
  c->set_output(3, has_bias ? c->input(13) : c->MakeShape({0}));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("BsattnFusedAttention")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .Input("row_ptr: int32")
    .Input("row_entries: int32")
    .Input("masks: int32")
    .Input("key_padding_mask: bool")
    .Input("bias: T")
    .Input("q_segment_ids: int32")
    .Input("k_segment_ids: int32")
    .Input("seed: int64")
    .Input("q_offset: int32")
    .Output("out: T")
    .Output("lse: Tlse")
    .Attr("T: {float, half, bfloat16, double}")
    .Attr("Tlse: {float, double} = DT_FLOAT")
    .Attr("heads: int >= 1")
    .Attr("kv_heads: int >= 0 = 0")
    .Attr("block_size: int")
    .Attr("scale: float")
    .Attr("dropout_rate: float = 0.0")
    .Attr("has_key_padding_mask: bool = false")
    .Attr("has_bias: bool = false")
    .Attr("has_segment_ids: bool = false")
    .Attr("decode: bool = false")
    .Attr("strided_period: int >= 0 = 0")
    .Attr("head_major: bool = false")
    .SetShapeFn(FusedForwardShape)
    .Doc(R"doc(
Fused block-sparse attention: out = softmax(scale * q k^T + bias, masked) v per head, over the
active blocks of each query-block row, with an online softmax (the weights are never stored).
bias (has_bias) is [B or 1, heads or 1, Tq, Tk]. k and v are [B, Tk, kv_heads * D] (kv_heads 0 =
heads): query head h reads K/V head h / (heads / kv_heads). With has_segment_ids, query i attends
key j only if q_segment_ids[b, i] == k_segment_ids[b, j] (blocks whose segments cannot meet are
skipped).
Dropout (dropout_rate > 0) zeroes probabilities by a counter-based hash of (seed, b, h, i, j) and
scales the kept ones by 1 / (1 - dropout_rate). Tlse is float64 for float64 inputs, else float32.
q_offset must be 0 unless decode.
decode (KV-cache decoding; forward only): q [B, Tq, H*D] holds the queries at absolute positions
[p, p + Tq), p = q_offset, any Tq >= 0; the tables are those of the whole (pattern, T_max), T_max =
nQb * bs, and k, v [B, Tk, kv_heads * D] are the cache; 0 <= p, p + Tq <= T_max and p + Tq <= Tk.
Only the table rows covering [p, p + Tq) are visited, in-block masks apply at the absolute rows,
and keys j >= p + Tq (the part of the cache not yet written) are never read, whatever the pattern.
bias [B or 1, heads or 1, Tq, Tk] and q_segment_ids [B, Tq] are those of the new rows; the dropout
hash uses the absolute row: a step equals the same rows of the full op (up to summation order).
strided_period L > 0 (sparse_attention's 'strided' without transposes; self-attention, Tq == Tk ==
T, T % L == 0, (T / L) % block_size == 0, no bias, not with decode): the tables address the
strided-permuted positions p, which hold token perm(p) = (p % (T/L)) * L + p / (T/L); q, k, v, out,
lse, key_padding_mask and the segment ids stay in token order. The result equals, bit for bit,
un-permuting the op's output on permuted q, k, v (and masks, ids); the dropout hash uses p.
head_major: q and out are [B, heads, Tq, D], k and v [B, kv_heads, Tk, D] (lse, bias, masks, ids as
above); with decode the cache is [B, kv_heads, Tk, D]. Bit for bit the result of the default
layout on the transposed tensors, transposed back.
)doc");

REGISTER_OP("BsattnFusedAttentionGrad")
    .Input("q: T")
    .Input("k: T")
    .Input("v: T")
    .Input("out: T")
    .Input("lse: Tlse")
    .Input("dout: T")
    .Input("dlse: Tlse")
    .Input("row_ptr: int32")
    .Input("row_entries: int32")
    .Input("col_ptr: int32")
    .Input("col_entries: int32")
    .Input("masks: int32")
    .Input("key_padding_mask: bool")
    .Input("bias: T")
    .Input("q_segment_ids: int32")
    .Input("k_segment_ids: int32")
    .Input("seed: int64")
    .Output("dq: T")
    .Output("dk: T")
    .Output("dv: T")
    .Output("dbias: T")
    .Attr("T: {float, half, bfloat16, double}")
    .Attr("Tlse: {float, double} = DT_FLOAT")
    .Attr("heads: int >= 1")
    .Attr("kv_heads: int >= 0 = 0")
    .Attr("block_size: int")
    .Attr("scale: float")
    .Attr("dropout_rate: float = 0.0")
    .Attr("has_key_padding_mask: bool = false")
    .Attr("has_bias: bool = false")
    .Attr("has_segment_ids: bool = false")
    .Attr("has_dlse: bool = false")
    .Attr("strided_period: int >= 0 = 0")
    .Attr("head_major: bool = false")
    .SetShapeFn(FusedGradShape)
    .Doc(R"doc(
Gradient of BsattnFusedAttention from (q, k, v, out, lse, dout): P is recomputed as
exp(S - lse), delta = rowsum(dout * out) (minus dlse when has_dlse), dS = P * (dP - delta).
One pass over key-block columns (col_ptr/col_entries) writes dk and dv and adds dS k into
per-chunk partial dq buffers summed in a fixed order (no atomics; deterministic). dbias
[Bb, Hb, Tq, Tk] (has_bias; the bias's shape) is summed over the batch when Bb = 1 and over the
heads when Hb = 1, and is 0 outside the active blocks. dk and dv [B, Tk, kv_heads * D] sum over each
K/V head's group of query heads. row_ptr/row_entries are checked against the column table.
head_major: q, out, dout, dq [B, heads, Tq, D] and k, v, dk, dv [B, kv_heads, Tk, D].
)doc");

REGISTER_OP("BsattnFusedComputedBlocks")
    .Output("counts: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(2));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Debug counters of the CPU fused kernels: the (b, h, Qb, Kb) blocks the forward (counts[0]) and the
gradient (counts[1]) have computed since the library was loaded. What the tests of segment-id block
skipping count (a skipped block is never computed).
)doc");

}  // namespace tensorflow
