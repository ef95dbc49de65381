// Shape-function helpers shared by the op registrations: rank errors that name the argument.
#ifndef BSATTN_OPS_CC_OPS_SHAPE_CHECKS_H_
#define BSATTN_OPS_CC_OPS_SHAPE_CHECKS_H_

#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace bsattn {

// *out = input `index` with rank `rank`; an input of known other rank is an InvalidArgument naming
// the argument (`name`) and its expected layout (e.g. "[batch, time, heads*head_dim]").
inline absl::Status NamedRank(tensorflow::shape_inference::InferenceContext* c, int index, int rank,
                              const char* name, const char* layout,
                              tensorflow::shape_inference::ShapeHandle* out) {
  const tensorflow::shape_inference::ShapeHandle shape = c->input(index);
  if (c->RankKnown(shape) && c->Rank(shape) != rank) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be ", layout, " (rank ", rank,
                                                   "), got shape ", c->DebugString(shape)));
  }
  return c->WithRank(shape, rank, out);
}

// A known dimension `dim` of argument `name` must equal `expected` (what: e.g. "length").
inline absl::Status NamedDimEquals(tensorflow::shape_inference::InferenceContext* c,
                                   tensorflow::shape_inference::DimensionHandle dim, int64_t expected,
                                   const char* name, const char* what, const char* because) {
  if (c->ValueKnown(dim) && c->Value(dim) != expected) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has ", what, " ", c->Value(dim),
                                                   "; expected ", expected, " (", because, ")"));
  }
  return absl::OkStatus();
}

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_OPS_SHAPE_CHECKS_H_
