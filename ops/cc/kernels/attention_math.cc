#include "ops/cc/kernels/attention_math.h"

#include <limits>

#include "ops/cc/kernels/cpu_math.h"

// Each body is a plain loop nest written for the auto-vectoriser and always inlined: the float32
// entry points instantiate it once per ISA clone, the float64 ones once for the baseline.
#define BSATTN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define BSATTN_INLINE inline __attribute__((always_inline))

namespace bsattn {
namespace {

template <typename F>
BSATTN_INLINE void OnlineSoftmaxStepBody(F* __restrict st, int nk, int nq, F* __restrict m,
                                         F* __restrict l, F* __restrict alpha) {
  constexpr F kNegInf = -std::numeric_limits<F>::infinity();
  F shift[kMaxTileSide];  // the finite max subtracted before exp (0 while a row is fully masked)
  for (int i = 0; i < nq; ++i) alpha[i] = kNegInf;
  for (int j = 0; j < nk; ++j) {
    const F* row = st + j * nq;
    for (int i = 0; i < nq; ++i) alpha[i] = row[i] > alpha[i] ? row[i] : alpha[i];
  }
  for (int i = 0; i < nq; ++i) {
    const F m_new = alpha[i] > m[i] ? alpha[i] : m[i];
    shift[i] = m_new == kNegInf ? F(0) : m_new;
    alpha[i] = m[i] - shift[i];  // -inf (-> 0) while the row had no kept score
    m[i] = m_new;
  }
  ExpInPlace(alpha, nq);
  for (int i = 0; i < nq; ++i) l[i] *= alpha[i];
  ExpMinusColumnsSum(st, nk, nq, shift, l);
}

template <typename F>
BSATTN_INLINE void ExpMinusVectorBody(F* __restrict x, int rows, int cols, const F* __restrict v,
                                      bool per_column) {
  for (int r = 0; r < rows; ++r) {
    F* row = x + r * cols;
    if (per_column) {
      for (int c = 0; c < cols; ++c) row[c] -= v[c];
    } else {
      const F s = v[r];
      for (int c = 0; c < cols; ++c) row[c] -= s;
    }
  }
  ExpInPlace(x, rows * cols);
}

template <typename F>
BSATTN_INLINE void SoftmaxGradBody(const F* __restrict p, F* __restrict dp, const F* __restrict z,
                                   int rows, int cols, const F* __restrict delta, bool per_column) {
  for (int r = 0; r < rows; ++r) {
    const F* pr = p + r * cols;
    F* dr = dp + r * cols;
    const F* zr = z == nullptr ? nullptr : z + r * cols;
    if (per_column && zr != nullptr) {
      for (int c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] * zr[c] - delta[c]);
    } else if (per_column) {
      for (int c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - delta[c]);
    } else if (zr != nullptr) {
      const F d = delta[r];
      for (int c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] * zr[c] - d);
    } else {
      const F d = delta[r];
      for (int c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - d);
    }
  }
}

template <typename F>
BSATTN_INLINE void ScaleRowsBody(F* __restrict x, int rows, int cols, int ld, const F* __restrict s) {
  for (int r = 0; r < rows; ++r) {
    const F f = s[r];
    F* row = x + r * ld;
    for (int c = 0; c < cols; ++c) row[c] *= f;
  }
}

template <typename F>
BSATTN_INLINE void MultiplyBody(const F* a, const F* __restrict b, F* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

template <typename F>
BSATTN_INLINE void ApplyKeepBitsBody(F* __restrict x, int rows, int cols, const uint32_t* __restrict bits,
                                     int words) {
  constexpr F kNegInf = -std::numeric_limits<F>::infinity();
  for (int r = 0; r < rows; ++r) {
    F* row = x + r * cols;
    for (int w = 0; w < words; ++w) {
      const uint32_t mask = bits[r * words + w];
      const int n = cols - 32 * w < 32 ? cols - 32 * w : 32;
      F* part = row + 32 * w;
      for (int k = 0; k < n; ++k) part[k] = (mask >> k) & 1u ? part[k] : kNegInf;
    }
  }
}

template <typename F>
BSATTN_INLINE void TransposeScaledBody(const F* __restrict src, int64_t stride, int rows, int cols, F scale,
                                       F* __restrict dst) {
  constexpr int kTile = 16;  // a 16 x 16 tile's source and destination lines stay in L1
  for (int r0 = 0; r0 < rows; r0 += kTile) {
    const int r1 = r0 + kTile < rows ? r0 + kTile : rows;
    for (int c0 = 0; c0 < cols; c0 += kTile) {
      const int c1 = c0 + kTile < cols ? c0 + kTile : cols;
      for (int c = c0; c < c1; ++c)
        for (int r = r0; r < r1; ++r) dst[c * rows + r] = scale * src[r * stride + c];
    }
  }
}

template <typename F>
BSATTN_INLINE void DropoutTileBody(F* __restrict z, int rows, int cols, uint64_t key, uint64_t base,
                                   uint64_t row_step, uint64_t col_step, uint32_t threshold,
                                   F scale) {
  for (int r = 0; r < rows; ++r) {
    const uint64_t row_base = base + static_cast<uint64_t>(r) * row_step;
    F* out = z + r * cols;
    for (int c = 0; c < cols; ++c) {
      const uint64_t counter = row_base + static_cast<uint64_t>(c) * col_step;
      out[c] = DropoutKeep(key, counter, threshold) ? scale : F(0);
    }
  }
}

}  // namespace

BSATTN_ISA_CLONES void OnlineSoftmaxStep(float* st, int nk, int nq, float* m, float* l,
                                         float* alpha) {
  OnlineSoftmaxStepBody(st, nk, nq, m, l, alpha);
}
void OnlineSoftmaxStep(double* st, int nk, int nq, double* m, double* l, double* alpha) {
  OnlineSoftmaxStepBody(st, nk, nq, m, l, alpha);
}

BSATTN_ISA_CLONES void ExpMinusColumnVector(float* x, int rows, int cols, const float* v) {
  ExpMinusVectorBody(x, rows, cols, v, true);
}
void ExpMinusColumnVector(double* x, int rows, int cols, const double* v) {
  ExpMinusVectorBody(x, rows, cols, v, true);
}

BSATTN_ISA_CLONES void ExpMinusRowVector(float* x, int rows, int cols, const float* v) {
  ExpMinusVectorBody(x, rows, cols, v, false);
}
void ExpMinusRowVector(double* x, int rows, int cols, const double* v) {
  ExpMinusVectorBody(x, rows, cols, v, false);
}

BSATTN_ISA_CLONES void SoftmaxGrad(const float* p, float* dp, const float* z, int rows, int cols,
                                   const float* delta, bool delta_per_column) {
  SoftmaxGradBody(p, dp, z, rows, cols, delta, delta_per_column);
}
void SoftmaxGrad(const double* p, double* dp, const double* z, int rows, int cols,
                 const double* delta, bool delta_per_column) {
  SoftmaxGradBody(p, dp, z, rows, cols, delta, delta_per_column);
}

BSATTN_ISA_CLONES void ScaleRows(float* x, int rows, int cols, int ld, const float* s) {
  ScaleRowsBody(x, rows, cols, ld, s);
}
void ScaleRows(double* x, int rows, int cols, int ld, const double* s) {
  ScaleRowsBody(x, rows, cols, ld, s);
}

BSATTN_ISA_CLONES void Multiply(const float* a, const float* b, float* out, int n) {
  MultiplyBody(a, b, out, n);
}
void Multiply(const double* a, const double* b, double* out, int n) { MultiplyBody(a, b, out, n); }

BSATTN_ISA_CLONES void ApplyKeepBits(float* x, int rows, int cols, const uint32_t* bits, int words) {
  ApplyKeepBitsBody(x, rows, cols, bits, words);
}
void ApplyKeepBits(double* x, int rows, int cols, const uint32_t* bits, int words) {
  ApplyKeepBitsBody(x, rows, cols, bits, words);
}

BSATTN_ISA_CLONES void TransposeScaled(const float* src, int64_t src_stride, int rows, int cols, float scale,
                                       float* dst) {
  TransposeScaledBody(src, src_stride, rows, cols, scale, dst);
}
void TransposeScaled(const double* src, int64_t src_stride, int rows, int cols, double scale, double* dst) {
  TransposeScaledBody(src, src_stride, rows, cols, scale, dst);
}

BSATTN_ISA_CLONES void DropoutTile(float* z, int rows, int cols, uint64_t key, uint64_t base,
                                   uint64_t row_step, uint64_t col_step, uint32_t threshold,
                                   float scale) {
  DropoutTileBody(z, rows, cols, key, base, row_step, col_step, threshold, scale);
}
void DropoutTile(double* z, int rows, int cols, uint64_t key, uint64_t base, uint64_t row_step,
                 uint64_t col_step, uint32_t threshold, double scale) {
  DropoutTileBody(z, rows, cols, key, base, row_step, col_step, threshold, scale);
}

}  // namespace bsattn
