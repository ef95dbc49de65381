/* The attention-dropout decision, shared by the CPU kernels (C++) and the CUDA kernels (nvcc) so
 * that both drop exactly the same entries.
 *
 * The keep decision of attention entry (b, h, i, j) is a pure function of (seed, counter) with
 * counter = ((b * H + h) * Tq + i) * Tk + j, so the backward pass regenerates the forward's mask
 * without state. bsattn/reference.py's dropout_keep_mask is the NumPy twin of these lines.
 */
#ifndef BSATTN_OPS_CUDA_DROPOUT_HASH_H_
#define BSATTN_OPS_CUDA_DROPOUT_HASH_H_

#include <stdint.h>

#ifdef __CUDACC__
#define BSATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BSATTN_HOST_DEVICE inline
#endif

namespace bsattn {

/* murmur3's 64-bit finaliser: a bijection with full avalanche. */
BSATTN_HOST_DEVICE uint64_t Fmix64(uint64_t z) {
  z ^= z >> 33;
  z *= 0xff51afd7ed558ccdULL;
  z ^= z >> 33;
  z *= 0xc4ceb9fe1a85ec53ULL;
  z ^= z >> 33;
  return z;
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

BSATTN_HOST_DEVICE uint64_t DropoutKey(int64_t seed) { return Fmix64(static_cast<uint64_t>(seed) ^ kGolden); }

/* Entry `counter` is kept iff the high 32 bits of its hash are >= the threshold. */
BSATTN_HOST_DEVICE bool DropoutKeep(uint64_t key, uint64_t counter, uint32_t threshold) {
  return (Fmix64(key ^ (counter * kGolden)) >> 32) >= threshold;
}

/* floor(rate * 2^32), so that an entry is dropped with probability threshold / 2^32 ~= rate. */
inline uint32_t DropoutThreshold(double rate) {
  const double t = rate * 4294967296.0;
  if (t >= 4294967295.0) return 0xffffffffu;
  return t <= 0.0 ? 0u : static_cast<uint32_t>(t);  /* the cast truncates: floor for t >= 0 */
}

}  // namespace bsattn

#undef BSATTN_HOST_DEVICE

#endif  /* BSATTN_OPS_CUDA_DROPOUT_HASH_H_ */
