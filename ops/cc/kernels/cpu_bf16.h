// bfloat16 products of the fused CPU attention (float32 accumulation), on packed bfloat16 operands.
//
// Levels, chosen once at the first call (Bf16Level): 1 = AVX512-BF16 (vdpbf16ps: 16 float32 lanes, each
// the sum of two bfloat16 products), 0 = none (the callers keep their float32 products). $BSATTN_CPU_ISA
// caps it: avx512bf16 (the default: the best the CPU has) uses vdpbf16ps; avx512, avx2 and baseline turn
// the bfloat16 products off (bfloat16 inputs then take the float32 path at that level, as before).
//
// Packed operands. A product C[m][n] = A[m][k] B[k][n] reads both operands as pairs of bfloat16 along k
// (one 32-bit word each): B is always "pairs of rows" (PackPairs: word (p, c) = B[2p][c], B[2p+1][c]);
// A is either "rows" (PackRows of A itself: word (i, p) = A[i][2p], A[i][2p+1]) or, for a product with a
// transposed operand A = X^T (X stored [k][m]), PackPairs of X (word (p, i) = X[2p][i], X[2p+1][i]):
// no transpose is ever made. k is padded to even with a zero row or column.
#ifndef BSATTN_OPS_CC_KERNELS_CPU_BF16_H_
#define BSATTN_OPS_CC_KERNELS_CPU_BF16_H_

#include <cstdint>
#include <type_traits>

namespace bsattn {

// The level in use (see above) and its name: "avx512bf16" or "none".
int Bf16Level();
const char* Bf16Isa();

// Whether the bfloat16 products serve tiles of block size bs and head dim d: a level > 0 and both
// multiples of 16 (every product's n is one of them).
bool Bf16Serves(int64_t bs, int64_t d);

// bfloat16 values (uint16_t words) a packed rows x cols float32 matrix takes: rows (PackRows) or
// rows rounded up to even (PackPairs) times cols, cols rounded up to even for PackRows.
int64_t PackedRowsSize(int rows, int cols);
int64_t PackedPairsSize(int rows, int cols);

// out = bfloat16(x) (round to nearest even) of the rows x cols matrix x (row stride ld), as "rows":
// word (r, p) = x[r][2p], x[r][2p+1]; an odd cols gets a zero last value.
void PackRows(const float* x, int ld, int rows, int cols, uint16_t* out);

// The same as "pairs of rows": word (p, c) = x[2p][c], x[2p+1][c]; an odd rows gets a zero last row.
void PackPairs(const float* x, int ld, int rows, int cols, uint16_t* out);

// The A operand of a product: packed words (i, p) at a[i * row_step + p * pair_step] (32-bit words).
struct Bf16Operand {
  const uint16_t* a;
  int64_t row_step, pair_step;
};

// A of PackRows(A, m x k): row_step = ceil(k / 2), pair_step = 1.
inline Bf16Operand RowsOperand(const uint16_t* packed, int k) { return {packed, (k + 1) / 2, 1}; }
// A = X^T of PackPairs(X, k x m): row_step = 1, pair_step = m.
inline Bf16Operand TransposedOperand(const uint16_t* packed, int m) { return {packed, 1, m}; }

// C[m][n] = scale * A B (overwrite: C is not read) or C[m][n] = row_scale[i] * C[m][n] + A B
// (row_scale null: 1), C float32 with row stride ldc, b = PackPairs(B, k x n). n must be a multiple of 16
// (Bf16Serves); called only when Bf16Level() > 0.
void Bf16MatMul(Bf16Operand a, const uint16_t* b, float* c, int ldc, int m, int k, int n, bool overwrite,
                float scale, const float* row_scale);

// The same for callers templated on the accumulator type Acc: the calls above for float32, nothing for
// float64 (whose callers never take the bfloat16 path; the overloads let their code compile unchanged).
template <typename Acc>
void PackRowsOf(const Acc* x, int ld, int rows, int cols, uint16_t* out) {
  if constexpr (std::is_same_v<Acc, float>) PackRows(x, ld, rows, cols, out);
}
template <typename Acc>
void PackPairsOf(const Acc* x, int ld, int rows, int cols, uint16_t* out) {
  if constexpr (std::is_same_v<Acc, float>) PackPairs(x, ld, rows, cols, out);
}
template <typename Acc>
void Bf16MatMulOf(Bf16Operand a, const uint16_t* b, Acc* c, int ldc, int m, int k, int n, bool overwrite,
                  std::common_type_t<Acc> scale, const std::common_type_t<Acc>* row_scale) {
  if constexpr (std::is_same_v<Acc, float>) Bf16MatMul(a, b, c, ldc, m, k, n, overwrite, scale, row_scale);
}

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_CPU_BF16_H_
