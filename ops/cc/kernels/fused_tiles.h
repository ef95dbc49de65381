// Small helpers shared by the CPU fused attention kernels (fused_attention_kernels.cc, the
// decoding step in fused_decode_kernels.cc): finiteness scans, per-thread scratch, CSR rows.
#ifndef BSATTN_OPS_CC_KERNELS_FUSED_TILES_H_
#define BSATTN_OPS_CC_KERNELS_FUSED_TILES_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace bsattn {

// Whether all n values at x are finite (x - x is 0 exactly for finite x).
template <typename Acc>
inline bool AllFinite(const Acc* x, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= (x[i] - x[i]) == Acc(0);
  return finite;
}

// Zeroes the non-finite values of the n values at x.
template <typename Acc>
inline void ZeroNonFinite(Acc* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - x[i]) == Acc(0) ? x[i] : Acc(0);
}

// Consecutive scratch arrays of the given sizes from a per-thread buffer that is kept across calls,
// so that no work unit allocates (a thread runs one unit at a time; the arrays are not zeroed).
template <typename Acc, size_t N>
std::array<Acc*, N> ThreadScratch(const std::array<int64_t, N>& sizes) {
  thread_local std::vector<Acc> buffer;
  int64_t total = 0;
  for (const int64_t size : sizes) total += size;
  if (static_cast<int64_t>(buffer.size()) < total) buffer.resize(total);
  std::array<Acc*, N> out;
  Acc* at = buffer.data();
  for (size_t i = 0; i < N; ++i) {
    out[i] = at;
    at += sizes[i];
  }
  return out;
}

// The pointers of layout head h in a per-head CSR table with n rows.
inline const int32_t* HeadPointers(const int32_t* ptr, bool shared, int64_t h, int64_t n) {
  return ptr + (shared ? 0 : h) * (n + 1);
}

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_FUSED_TILES_H_
