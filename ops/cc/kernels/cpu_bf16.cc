#include "ops/cc/kernels/cpu_bf16.h"

#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "ops/cc/kernels/cpu_math.h"

namespace bsattn {
namespace {

// The functions below use AVX512-BF16 instructions: compiled for it whatever the library's flags, run
// only when Bf16Level() says the CPU has it.
#define BSATTN_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define BSATTN_INLINE inline __attribute__((always_inline))

typedef uint32_t Word __attribute__((may_alias));  // a pair of bfloat16 values

// Rows of 16 float32 values -> 16 bfloat16 (round to nearest even); lanes past `count` read as 0.
BSATTN_BF16_TARGET BSATTN_INLINE __m256i Convert16(const float* x, int count) {
  const __mmask16 keep = count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(keep, x));
}

BSATTN_BF16_TARGET void PackRowsAvx512Bf16(const float* x, int ld, int rows, int cols, uint16_t* out) {
  const int width = cols + (cols & 1);  // bfloat16 values per packed row
  for (int r = 0; r < rows; ++r) {
    const float* src = x + static_cast<int64_t>(r) * ld;
    uint16_t* dst = out + static_cast<int64_t>(r) * width;
    for (int c = 0; c < width; c += 16) {
      const int n = width - c < 16 ? width - c : 16;
      _mm256_mask_storeu_epi16(dst + c, __mmask16((1u << n) - 1), Convert16(src + c, cols - c));
    }
  }
}

BSATTN_BF16_TARGET void PackPairsAvx512Bf16(const float* x, int ld, int rows, int cols, uint16_t* out) {
  // Halves [r0 c0..c15 | r1 c0..c15] -> [r0 c0, r1 c0, r0 c1, r1 c1, ...].
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int p = 0; 2 * p < rows; ++p) {
    const float* r0 = x + static_cast<int64_t>(2 * p) * ld;
    const float* r1 = r0 + ld;
    const bool has_r1 = 2 * p + 1 < rows;
    Word* dst = reinterpret_cast<Word*>(out) + static_cast<int64_t>(p) * cols;
    for (int c = 0; c < cols; c += 16) {
      const int n = cols - c < 16 ? cols - c : 16;
      const __m256i lo = Convert16(r0 + c, n);
      const __m256i hi = has_r1 ? Convert16(r1 + c, n) : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      _mm512_mask_storeu_epi32(dst + c, __mmask16((1u << n) - 1), _mm512_permutexvar_epi16(interleave, both));
    }
  }
}

// C[i:i+kRows, j:j+16*kVecs] of Bf16MatMul: kRows x kVecs accumulators in registers; each step adds the
// products of one pair p of k (one vdpbf16ps per accumulator).
template <int kRows, int kVecs>
BSATTN_BF16_TARGET BSATTN_INLINE void Strip(const Word* a, int64_t row_step, int64_t pair_step, const Word* b,
                                            int n, float* c, int ldc, int i, int j, int pairs, bool overwrite,
                                            float scale, const float* row_scale) {
  __m512 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      if (overwrite) {
        acc[r][v] = _mm512_setzero_ps();
      } else {
        const __m512 x = _mm512_loadu_ps(c + static_cast<int64_t>(i + r) * ldc + j + 16 * v);
        acc[r][v] = row_scale == nullptr ? x : _mm512_mul_ps(x, _mm512_set1_ps(row_scale[i + r]));
      }
    }
  }
  const Word* arow = a + i * row_step;
  for (int p = 0; p < pairs; ++p) {
    __m512bh bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + static_cast<int64_t>(p) * n + j + 16 * v);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(arow[r * row_step + p * pair_step]));
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      const __m512 x = overwrite ? _mm512_mul_ps(acc[r][v], s) : acc[r][v];
      _mm512_storeu_ps(c + static_cast<int64_t>(i + r) * ldc + j + 16 * v, x);
    }
  }
}

// Strips of kRows rows across the n columns: 4, 2, then 1 vectors (n is a multiple of 16).
template <int kRows>
BSATTN_BF16_TARGET BSATTN_INLINE void StripRow(const Word* a, int64_t row_step, int64_t pair_step, const Word* b,
                                               int n, float* c, int ldc, int i, int pairs, bool overwrite,
                                               float scale, const float* row_scale) {
  int j = 0;
  for (; j + 64 <= n; j += 64)
    Strip<kRows, 4>(a, row_step, pair_step, b, n, c, ldc, i, j, pairs, overwrite, scale, row_scale);
  for (; j + 32 <= n; j += 32)
    Strip<kRows, 2>(a, row_step, pair_step, b, n, c, ldc, i, j, pairs, overwrite, scale, row_scale);
  for (; j < n; j += 16)
    Strip<kRows, 1>(a, row_step, pair_step, b, n, c, ldc, i, j, pairs, overwrite, scale, row_scale);
}

BSATTN_BF16_TARGET void MatMulAvx512Bf16(Bf16Operand a, const uint16_t* b, float* c, int ldc, int m, int k, int n,
                                         bool overwrite, float scale, const float* row_scale) {
  const Word* aw = reinterpret_cast<const Word*>(a.a);
  const Word* bw = reinterpret_cast<const Word*>(b);
  const int pairs = (k + 1) / 2;
  int i = 0;
  for (; i + 4 <= m; i += 4)
    StripRow<4>(aw, a.row_step, a.pair_step, bw, n, c, ldc, i, pairs, overwrite, scale, row_scale);
  for (; i < m; ++i)
    StripRow<1>(aw, a.row_step, a.pair_step, bw, n, c, ldc, i, pairs, overwrite, scale, row_scale);
}

int ChooseLevel() {
  __builtin_cpu_init();
  int level = CpuIsaLevel() == 2 && __builtin_cpu_supports("avx512bf16") ? 1 : 0;
  if (const char* env = std::getenv("BSATTN_CPU_ISA")) {
    const std::string isa(env);
    if (isa != "avx512bf16") level = 0;  // avx512, avx2, baseline: the float32 products
  }
  return level;
}

}  // namespace

int Bf16Level() {
  static const int level = ChooseLevel();
  return level;
}

const char* Bf16Isa() { return Bf16Level() == 1 ? "avx512bf16" : "none"; }

bool Bf16Serves(int64_t bs, int64_t d) { return Bf16Level() > 0 && bs % 16 == 0 && d % 16 == 0; }

int64_t PackedRowsSize(int rows, int cols) { return static_cast<int64_t>(rows) * (cols + (cols & 1)); }

int64_t PackedPairsSize(int rows, int cols) { return static_cast<int64_t>(rows + (rows & 1)) * cols; }

void PackRows(const float* x, int ld, int rows, int cols, uint16_t* out) { PackRowsAvx512Bf16(x, ld, rows, cols, out); }

void PackPairs(const float* x, int ld, int rows, int cols, uint16_t* out) {
  PackPairsAvx512Bf16(x, ld, rows, cols, out);
}

void Bf16MatMul(Bf16Operand a, const uint16_t* b, float* c, int ldc, int m, int k, int n, bool overwrite,
                float scale, const float* row_scale) {
  MatMulAvx512Bf16(a, b, c, ldc, m, k, n, overwrite, scale, row_scale);
}

}  // namespace bsattn
