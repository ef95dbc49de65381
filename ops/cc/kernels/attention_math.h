// Vector helpers of the fused attention: the online-softmax step, the softmax gradient and the
// dropout mask, on small row-major tiles (row stride = cols unless an ld is given).
//
// float32 versions are compiled per ISA level (AVX-512 / AVX2 / baseline, as in cpu_math); the
// float64 overloads are plain loops (float64 exists for exact gradient checks, not for speed).
#ifndef BSATTN_OPS_CC_KERNELS_ATTENTION_MATH_H_
#define BSATTN_OPS_CC_KERNELS_ATTENTION_MATH_H_

#include <cmath>
#include <cstdint>

#include "ops/cuda/dropout_hash.h"

namespace bsattn {

// The largest tile side the helpers accept (the largest block size).
constexpr int kMaxTileSide = 128;

// One online-softmax step on a score tile held transposed, st[j][i] (key j, query i), nk x nq
// (nq <= kMaxTileSide). m[i] (running max) and l[i] (running sum of exp) are updated; st becomes
// P^T = exp(st - m_new) and alpha[i] = exp(m_old - m_new), the factor for the previous accumulator
// row i. A query whose scores are all -inf so far keeps m = -inf and l = 0, with P = alpha = 0.
void OnlineSoftmaxStep(float* st, int nk, int nq, float* m, float* l, float* alpha);
void OnlineSoftmaxStep(double* st, int nk, int nq, double* m, double* l, double* alpha);

// x[r][c] = exp(x[r][c] - v[c]) (v[c] = +inf gives 0).
void ExpMinusColumnVector(float* x, int rows, int cols, const float* v);
void ExpMinusColumnVector(double* x, int rows, int cols, const double* v);

// x[r][c] = exp(x[r][c] - v[r]) (v[r] = +inf gives 0).
void ExpMinusRowVector(float* x, int rows, int cols, const float* v);
void ExpMinusRowVector(double* x, int rows, int cols, const double* v);

// The softmax gradient dp[r][c] = p[r][c] * (dp[r][c] * z[r][c] - delta), with delta = delta[c]
// (kDeltaPerColumn, the transposed layout) or delta[r]. z (the dropout keep-scale tile) may be null.
void SoftmaxGrad(const float* p, float* dp, const float* z, int rows, int cols, const float* delta,
                 bool delta_per_column);
void SoftmaxGrad(const double* p, double* dp, const double* z, int rows, int cols,
                 const double* delta, bool delta_per_column);

// x[r][c] *= s[r] for r < rows, c < cols; x has row stride ld.
void ScaleRows(float* x, int rows, int cols, int ld, const float* s);
void ScaleRows(double* x, int rows, int cols, int ld, const double* s);

// out[i] = a[i] * b[i] (out may alias a).
void Multiply(const float* a, const float* b, float* out, int n);
void Multiply(const double* a, const double* b, double* out, int n);

// x[r][c] = -inf where bit c % 32 of word c / 32 of bits[r] (words per row) is 0: an in-block
// keep mask applied to a rows x cols tile.
void ApplyKeepBits(float* x, int rows, int cols, const uint32_t* bits, int words);
void ApplyKeepBits(double* x, int rows, int cols, const uint32_t* bits, int words);

// dst[c][r] = scale * src[r * src_stride + c] for r < rows, c < cols (dst dense, row stride rows),
// in cache-sized tiles.
void TransposeScaled(const float* src, int64_t src_stride, int rows, int cols, float scale, float* dst);
void TransposeScaled(const double* src, int64_t src_stride, int rows, int cols, double scale, double* dst);

// ---- dropout (the hash: ops/cuda/dropout_hash.h, shared with the CUDA kernels) -------------------

// z[r][c] = keep(base + r * row_step + c * col_step) ? scale : 0.
void DropoutTile(float* z, int rows, int cols, uint64_t key, uint64_t base, uint64_t row_step,
                 uint64_t col_step, uint32_t threshold, float scale);
void DropoutTile(double* z, int rows, int cols, uint64_t key, uint64_t base, uint64_t row_step,
                 uint64_t col_step, uint32_t threshold, double scale);

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_ATTENTION_MATH_H_
