// Validation of BsattnCoorDescent / BsattnCoorDescentGrad inputs, shared by the CPU kernels and the
// GPU wrappers: shapes, the eps schedule and the values of k (k and eps must be in host memory).
// Failures are InvalidArgument statuses naming the argument. k may exceed a row's unmasked count
// (a padded row of a router): the iteration then saturates every unmasked entry at 1, as the
// unrolled reference does.
#ifndef BSATTN_OPS_CC_KERNELS_COOR_DESCENT_CHECKS_H_
#define BSATTN_OPS_CC_KERNELS_COOR_DESCENT_CHECKS_H_

#include <cstdint>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"

namespace bsattn {

// s [..., n] seen as [rows, n]; k one value (scalar_k) or one per row.
struct CoorDims {
  int64_t rows = 0, n = 0;
  int n_iters = 0;
  bool scalar_k = true;
  bool has_mask = false;
};

// The attributes n_iters (>= 1) and has_mask.
absl::Status ParseCoorAttrs(tensorflow::OpKernelConstruction* ctx, int* n_iters, bool* has_mask);

// Inputs 0..3 (s, k, eps, mask) and, with `gradient`, 4..5 (lse, dy).
absl::Status CheckCoorInputs(tensorflow::OpKernelContext* ctx, int n_iters, bool has_mask, bool gradient,
                             CoorDims* dims);

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_COOR_DESCENT_CHECKS_H_
