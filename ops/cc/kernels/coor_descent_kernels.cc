// OpKernels of BsattnCoorDescent and BsattnCoorDescentGrad (CPU). One row per work item, as a dense Acc
// row with masked entries -inf (coor_descent_math.h has the math and the reverse-mode derivation). float32
// and float64 rows without a mask are read, and their outputs written, in place; the others go through
// per-thread Acc buffers.
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/cc/kernels/coor_descent_checks.h"
#include "ops/cc/kernels/coor_descent_math.h"
#include "ops/cc/kernels/cpu_math.h"
#include "ops/cc/kernels/tile_io.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"

namespace bsattn {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// x[j] = s[j] (as Acc), -inf where masked; returns the unmasked count.
template <typename T, typename Acc>
int64_t LoadRow(const T* s, const bool* mask, int64_t n, Acc* x) {
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = mask == nullptr || mask[j];
    x[j] = keep ? static_cast<Acc>(s[j]) : -std::numeric_limits<Acc>::infinity();
    count += keep;
  }
  return count;
}

// The row as Acc, -inf where masked, and its unmasked count: s itself where T is Acc and nothing is
// masked, else a copy in *buf.
template <typename T, typename Acc>
const Acc* RowView(const T* s, const bool* mask, int64_t n, std::vector<Acc>* buf, int64_t* unmasked) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (mask == nullptr) {
      *unmasked = n;
      return s;
    }
  }
  buf->resize(n);
  *unmasked = LoadRow(s, mask, n, buf->data());
  return buf->data();
}

// Where a row's Acc result goes: the output row itself where T is Acc, else *buf (converted after).
template <typename T, typename Acc>
Acc* ResultRow(T* out, int64_t n, std::vector<Acc>* buf) {
  if constexpr (std::is_same_v<T, Acc>) {
    return out;
  } else {
    buf->resize(n);
    return buf->data();
  }
}

template <typename T, typename Acc>
void StoreRow(const Acc* result, int64_t n, T* out) {
  if constexpr (!std::is_same_v<T, Acc>) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(result[j]);
  }
}

// Rough cycles per row, for the thread pool's shards.
int64_t RowCost(const CoorDims& d) { return std::max<int64_t>(1, d.n) * (d.n_iters + 2) * 8; }

template <typename T>
class CoorDescentOp : public OpKernel {
 public:
  using Acc = typename AccumulatorOf<T>::type;
  explicit CoorDescentOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseCoorAttrs(ctx, &n_iters_, &has_mask_));
  }

  void Compute(OpKernelContext* ctx) override {
    CoorDims d;
    OP_REQUIRES_OK(ctx, CheckCoorInputs(ctx, n_iters_, has_mask_, false, &d));
    const Tensor& s = ctx->input(0);
    TensorShape lse_shape = s.shape();
    lse_shape.set_dim(s.dims() - 1, n_iters_);
    Tensor *y_out, *lse_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, s.shape(), &y_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, lse_shape, &lse_out));
    const T* s_ptr = s.flat<T>().data();
    const bool* mask = has_mask_ ? ctx->input(3).flat<bool>().data() : nullptr;
    const Acc* k = ctx->input(1).flat<Acc>().data();
    const Acc* eps = ctx->input(2).flat<Acc>().data();
    T* y = y_out->flat<T>().data();
    Acc* lse = lse_out->flat<Acc>().data();
    const int64_t n = d.n;
    ParallelForBalanced(ctx, d.rows, RowCost(d), [&](int64_t begin, int64_t end) {
      std::vector<Acc> x_buf, y_buf;
      for (int64_t r = begin; r < end; ++r) {
        int64_t unmasked;
        const Acc* x = RowView(s_ptr + r * n, mask ? mask + r * n : nullptr, n, &x_buf, &unmasked);
        const Acc k_r = k[d.scalar_k ? 0 : r];
        Acc* lse_r = lse + r * n_iters_;
        T* y_r = y + r * n;
        if (unmasked == 0) {  // a fully masked row: y = 0 (lse -inf: nothing was summed)
          std::fill(y_r, y_r + n, T(0));
          std::fill(lse_r, lse_r + n_iters_, -std::numeric_limits<Acc>::infinity());
          continue;
        }
        Acc* yr = ResultRow(y_r, n, &y_buf);  // also the forward's scratch
        CoorDescentRowForward(x, n, unmasked, CoorLogK(k_r), eps, n_iters_, lse_r, yr);
        StoreRow(yr, n, y_r);  // yr is 0 where masked
      }
    });
  }

 private:
  int n_iters_ = 0;
  bool has_mask_ = false;
};

template <typename T>
class CoorDescentGradOp : public OpKernel {
 public:
  using Acc = typename AccumulatorOf<T>::type;
  explicit CoorDescentGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseCoorAttrs(ctx, &n_iters_, &has_mask_));
  }

  void Compute(OpKernelContext* ctx) override {
    CoorDims d;
    OP_REQUIRES_OK(ctx, CheckCoorInputs(ctx, n_iters_, has_mask_, true, &d));
    const Tensor& s = ctx->input(0);
    Tensor *ds_out, *dk_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, s.shape(), &ds_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &dk_out));
    Tensor dk_rows_t;  // per-row dk before a scalar k's sum (rows summed in order: deterministic)
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<Acc>::value, TensorShape({d.rows}),
                                           &dk_rows_t));
    const T* s_ptr = s.flat<T>().data();
    const bool* mask = has_mask_ ? ctx->input(3).flat<bool>().data() : nullptr;
    const Acc* k = ctx->input(1).flat<Acc>().data();
    const Acc* eps = ctx->input(2).flat<Acc>().data();
    const Acc* lse = ctx->input(4).flat<Acc>().data();
    const T* dy = ctx->input(5).flat<T>().data();
    T* ds = ds_out->flat<T>().data();
    Acc* dk_rows = dk_rows_t.flat<Acc>().data();
    const int64_t n = d.n;
    ParallelForBalanced(ctx, d.rows, RowCost(d) * 2, [&](int64_t begin, int64_t end) {
      std::vector<Acc> x_buf, g_buf, dx_buf;
      for (int64_t r = begin; r < end; ++r) {
        int64_t unmasked;
        const Acc* x = RowView(s_ptr + r * n, mask ? mask + r * n : nullptr, n, &x_buf, &unmasked);
        const Acc k_r = k[d.scalar_k ? 0 : r];
        T* ds_r = ds + r * n;
        dk_rows[r] = 0;
        if (unmasked == 0) {
          std::fill(ds_r, ds_r + n, T(0));
          continue;
        }
        // g is read only where x is finite: the row of dy as it is (no mask applied).
        int64_t all;
        const Acc* g = RowView(dy + r * n, static_cast<const bool*>(nullptr), n, &g_buf, &all);
        Acc* dx = ResultRow(ds_r, n, &dx_buf);
        const Acc dlog_k = CoorDescentRowBackward(x, g, n, CoorLogK(k_r), eps, n_iters_, lse + r * n_iters_, dx);
        dk_rows[r] = k_r >= Acc(1e-20) ? dlog_k / k_r : Acc(0);
        StoreRow(dx, n, ds_r);
      }
    });
    Acc* dk = dk_out->flat<Acc>().data();
    if (d.scalar_k) {
      Acc total = 0;
      for (int64_t r = 0; r < d.rows; ++r) total += dk_rows[r];
      dk[0] = total;
    } else {
      std::copy(dk_rows, dk_rows + d.rows, dk);
    }
  }

 private:
  int n_iters_ = 0;
  bool has_mask_ = false;
};

}  // namespace

#define BSATTN_REGISTER_COOR(T, TK)                                                                          \
  REGISTER_KERNEL_BUILDER(                                                                                   \
      Name("BsattnCoorDescent").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T").TypeConstraint<TK>("Tk"), \
      CoorDescentOp<T>);                                                                                     \
  REGISTER_KERNEL_BUILDER(Name("BsattnCoorDescentGrad")                                                      \
                              .Device(tensorflow::DEVICE_CPU)                                                \
                              .TypeConstraint<T>("T")                                                        \
                              .TypeConstraint<TK>("Tk"),                                                     \
                          CoorDescentGradOp<T>);

BSATTN_REGISTER_COOR(float, float);
BSATTN_REGISTER_COOR(Eigen::half, float);
BSATTN_REGISTER_COOR(Eigen::bfloat16, float);
BSATTN_REGISTER_COOR(double, double);
#undef BSATTN_REGISTER_COOR

}  // namespace bsattn
