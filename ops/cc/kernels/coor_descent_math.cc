// The row passes of the fused coordinate descent (see coor_descent_math.h for the math). The whole row
// forward and row backward are compiled once per ISA level for float32 (AVX-512 with 16 lanes, AVX2 and
// the baseline with 8; chosen once, like cpu_math.cc), the bulk of every pass on vectors and its tail
// on scalars; float64 runs the same code on scalars (float64 is for exact gradient checks, not speed).
//
// Two reuses keep the exponentials down to one per element and DISTINCT eps (coor_descent_math.h):
//  - z_tj = min(x_j, theta_{t-1}) / eps_t, so with E_j = exp((x_j - c) / eps) for a fixed c, every
//    iteration with that eps sums min(E_j, exp((theta - c) / eps)): the forward stores E (in y) when
//    the next iteration has the same eps and then needs no exponential until eps changes (after the
//    schedule reaches its floor, and for a constant schedule, all the remaining iterations);
//  - the backward's chain da_{t-1} = da_t S_t needs only the COUNT of the entries above theta_{t-1}
//    (S_t = count_t exp(theta_{t-1} / eps_t - lse_t)), so after one pass that counts (and starts dx)
//    the chain is scalar, and ONE pass adds every iteration's term to dx, iterations with equal eps
//    sharing their exponential again.
#include "ops/cc/kernels/coor_descent_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cc/kernels/cpu_math.h"
#include "ops/cc/kernels/simd.h"

#define BSATTN_AI inline __attribute__((always_inline))

namespace bsattn {
namespace {

// Iterations share exponentials only while their thresholds stay within kWindow * eps of the
// reference c: the scale factors exp(+-(theta - c) / eps) then stay within e^30 (no overflow, and
// exponentials that underflow in float32 are below e^-57 of the largest term).
constexpr double kWindow = 30.0;
// The backward's passes go over blocks of the row (4 KB per float32 array: they stay in L1 while
// every threshold or iteration group goes over them); a multiple of every lane count.
constexpr int64_t kBlock = 1024;
// Thresholds counted per sweep over a block (their accumulators stay in registers).
constexpr int kCountChunk = 8;

// ---- lane operations: N float32 lanes, or one value (float64, and the float32 tails) -----------

template <int N>
struct VecOps {
  using S = float;
  using V = typename Lanes<N>::F;
  static constexpr int kLanes = N;
  static BSATTN_AI V Load(const float* p) { return bsattn::Load<N>(p); }
  static BSATTN_AI void Store(float* p, V v) { bsattn::Store<N>(p, v); }
  static BSATTN_AI V Splat(float s) { return V{} + s; }
  static BSATTN_AI V Exp(V v) { return ExpVec<N>(v); }
  static BSATTN_AI float Sum(V v) { return bsattn::Sum<N>(v); }
  static BSATTN_AI float Max(V v) {
    float m = v[0];
    for (int i = 1; i < N; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
};

template <typename Acc>
struct ScalarOps {
  using S = Acc;
  using V = Acc;
  static constexpr int kLanes = 1;
  static BSATTN_AI V Load(const Acc* p) { return *p; }
  static BSATTN_AI void Store(Acc* p, V v) { *p = v; }
  static BSATTN_AI V Splat(Acc s) { return s; }
  static BSATTN_AI V Exp(V v) { return ExpScalar(v); }
  static BSATTN_AI Acc Sum(V v) { return v; }
  static BSATTN_AI Acc Max(V v) { return v; }
};

template <class O>
BSATTN_AI typename O::V Min(typename O::V a, typename O::V b) {
  return a < b ? a : b;
}

// ---- the passes, over [begin, end) (a multiple of the lanes) --------------------------------------
// Masked entries are x = -inf: exp gives 0 there, they are never above a threshold.

template <class O>
BSATTN_AI typename O::S MaxPass(const typename O::S* x, int64_t begin, int64_t end) {
  typename O::V m = O::Splat(-std::numeric_limits<typename O::S>::infinity());
  for (int64_t j = begin; j < end; j += O::kLanes) {
    const auto v = O::Load(x + j);
    m = v > m ? v : m;
  }
  return O::Max(m);
}

// sum_j min(exp((x_j - c) * inv), cap); kStore also writes E_j = exp((x_j - c) * inv).
template <class O, bool kStore>
BSATTN_AI typename O::S ExpSumPass(const typename O::S* x, int64_t begin, int64_t end, typename O::S c,
                                   typename O::S inv, typename O::S cap, typename O::S* e_out) {
  using V = typename O::V;
  V acc0 = O::Splat(0), acc1 = O::Splat(0);
  auto step = [&](int64_t at, V& acc) __attribute__((always_inline)) {
    const V e = O::Exp((O::Load(x + at) - c) * inv);
    if (kStore) O::Store(e_out + at, e);
    acc += Min<O>(e, O::Splat(cap));
  };
  int64_t j = begin;
  for (; j + 2 * O::kLanes <= end; j += 2 * O::kLanes) {  // two independent exp chains in flight
    step(j, acc0);
    step(j + O::kLanes, acc1);
  }
  for (; j < end; j += O::kLanes) step(j, acc0);
  return O::Sum(acc0 + acc1);
}

// sum_j min(E_j, cap): an iteration that reuses the stored exponentials.
template <class O>
BSATTN_AI typename O::S SumMinPass(const typename O::S* e, int64_t begin, int64_t end, typename O::S cap) {
  using V = typename O::V;
  V acc0 = O::Splat(0), acc1 = O::Splat(0);
  const V capv = O::Splat(cap);
  int64_t j = begin;
  for (; j + 2 * O::kLanes <= end; j += 2 * O::kLanes) {
    acc0 += Min<O>(O::Load(e + j), capv);
    acc1 += Min<O>(O::Load(e + j + O::kLanes), capv);
  }
  for (; j < end; j += O::kLanes) acc0 += Min<O>(O::Load(e + j), capv);
  return O::Sum(acc0 + acc1);
}

// y = exp((min(x, theta) - theta) * inv).
template <class O>
BSATTN_AI void OutputPass(const typename O::S* x, int64_t begin, int64_t end, typename O::S theta,
                          typename O::S inv, typename O::S* y) {
  for (int64_t j = begin; j < end; j += O::kLanes)
    O::Store(y + j, O::Exp((Min<O>(O::Load(x + j), O::Splat(theta)) - theta) * inv));
}

// y = min(E r, 1) in place: the output from the stored exponentials, r = exp((c - theta) / eps).
template <class O>
BSATTN_AI void ScaleMinPass(typename O::S* y, int64_t begin, int64_t end, typename O::S r) {
  for (int64_t j = begin; j < end; j += O::kLanes) O::Store(y + j, Min<O>(O::Load(y + j) * r, O::Splat(1)));
}

// dx = g y inv [x <= theta] with y = exp((min(x, theta) - theta) * inv); returns sum(dx). y > 0 keeps
// masked entries (y = 0) from reading g, which may be anything there.
template <class O>
BSATTN_AI typename O::S BackwardInitPass(const typename O::S* x, const typename O::S* g, int64_t begin,
                                         int64_t end, typename O::S theta, typename O::S inv,
                                         typename O::S* dx) {
  using V = typename O::V;
  const V zero = O::Splat(0);
  V acc = zero;
  for (int64_t j = begin; j < end; j += O::kLanes) {
    const V xv = O::Load(x + j);
    const V y = O::Exp((Min<O>(xv, O::Splat(theta)) - theta) * inv);
    // Two selects, not one on (a & b): GCC lowers the AND of two AVX-512 comparisons lane by lane.
    const V gy = y > zero ? O::Load(g + j) * y : zero;
    const V d = xv <= O::Splat(theta) ? gy * inv : zero;
    O::Store(dx + j, d);
    acc += d;
  }
  return O::Sum(acc);
}

// counts[i] += #{j: x_j > th[i]} for i < kCountChunk (unused thresholds are +inf).
template <class O>
BSATTN_AI void CountPass(const typename O::S* x, int64_t begin, int64_t end, const typename O::S* th,
                         int64_t* counts) {
  using V = typename O::V;
  const V zero = O::Splat(0), one = O::Splat(1);
  V acc[kCountChunk];
  for (int i = 0; i < kCountChunk; ++i) acc[i] = zero;
  for (int64_t j = begin; j < end; j += O::kLanes) {
    const V xv = O::Load(x + j);
    for (int i = 0; i < kCountChunk; ++i) acc[i] += xv > O::Splat(th[i]) ? one : zero;
  }
  // Per lane at most kBlock / lanes: exact in float32.
  for (int i = 0; i < kCountChunk; ++i) counts[i] += static_cast<int64_t>(O::Sum(acc[i]));
}

// acc += E * sum_m [x <= th[m]] f[m] with E = exp((min(x, c) - c) * inv): the terms of one group of
// iterations with equal eps (RowBackwardImpl: f_t = D_t exp(c / eps - lse_t), so E_j f_t = D_t p_tj).
template <class O>
BSATTN_AI void GroupPass(const typename O::S* x, int64_t begin, int64_t end, typename O::S c, typename O::S inv,
                         const typename O::S* th, const typename O::S* f, int members, typename O::S* acc) {
  using V = typename O::V;
  const V zero = O::Splat(0);
  for (int64_t j = begin; j < end; j += O::kLanes) {
    const V xv = O::Load(x + j);
    const V e = O::Exp((Min<O>(xv, O::Splat(c)) - c) * inv);
    V w = zero;
    for (int m = 0; m < members; ++m) w += xv <= O::Splat(th[m]) ? O::Splat(f[m]) : zero;
    O::Store(acc + j, O::Load(acc + j) + e * w);
  }
}

// dx -= da * acc.
template <class O>
BSATTN_AI void FinishPass(typename O::S* dx, const typename O::S* acc, int64_t begin, int64_t end,
                          typename O::S da) {
  for (int64_t j = begin; j < end; j += O::kLanes) O::Store(dx + j, O::Load(dx + j) - da * O::Load(acc + j));
}

// ---- whole rows: O for the bulk, Tail (scalars) for the tail ----------------------------------------

// a_t from lse_t, exactly as the forward computed it (the backward recomputes it bit for bit).
template <typename Acc>
BSATTN_AI Acc AFromLse(Acc eps_t, Acc log_k, Acc lse_t) {
  return eps_t * (log_k - lse_t);
}

template <class O, class Tail>
BSATTN_AI void RowForwardImpl(const typename O::S* x, int64_t n, int64_t n_unmasked, typename O::S log_k,
                              const typename O::S* eps, int n_iters, typename O::S* lse, typename O::S* y) {
  using S = typename O::S;
  const int64_t bulk = n - n % O::kLanes;
  const S x_max = std::max(MaxPass<O>(x, 0, bulk), MaxPass<Tail>(x, bulk, n));
  lse[0] = std::log(static_cast<S>(n_unmasked));  // z_1 = (x - x) / eps_1 = 0 on every unmasked entry
  S a = AFromLse(eps[0], log_k, lse[0]);
  bool stored = false;  // y holds E_j = exp((x_j - c) / stored_eps)
  S stored_eps = 0, c = 0;
  for (int t = 1; t < n_iters; ++t) {
    const S e = eps[t], inv = S(1) / e, theta = -a;
    // The largest z_tj is min(x_max, theta) / eps_t: the shift of the logsumexp.
    const S m = std::min(x_max, theta);
    S sum;
    if (stored && e == stored_eps && std::abs(static_cast<double>(m - c) * inv) <= kWindow) {
      const S cap = ExpScalar((m - c) * inv);
      sum = SumMinPass<O>(y, 0, bulk, cap) + SumMinPass<Tail>(y, bulk, n, cap);
    } else {
      stored = eps[t + 1] == e;  // the next iteration (or the output) has this eps: keep E
      stored_eps = e;
      c = m;
      // cap 1: c = min(x_max, theta) is the largest min(x_j, theta), so exp((min(x_j, theta) - c) / eps)
      // is min(E_j, 1).
      if (stored) {
        sum = ExpSumPass<O, true>(x, 0, bulk, c, inv, S(1), y) + ExpSumPass<Tail, true>(x, bulk, n, c, inv, S(1), y);
      } else {
        sum = ExpSumPass<O, false>(x, 0, bulk, c, inv, S(1), y) +
              ExpSumPass<Tail, false>(x, bulk, n, c, inv, S(1), y);
      }
    }
    // In float64: c / eps is large (~|x| / eps), its float32 rounding would be a relative error of every p.
    lse[t] = static_cast<S>(static_cast<double>(c) / e + std::log(static_cast<double>(sum)));
    a = AFromLse(e, log_k, lse[t]);
  }
  const S e = eps[n_iters], inv = S(1) / e, theta = -a;
  if (stored && e == stored_eps && std::abs(static_cast<double>(theta - c) * inv) <= kWindow) {
    const S r = ExpScalar((c - theta) * inv);  // y = min(E_j, exp((theta - c) / eps)) / exp((theta - c) / eps)
    ScaleMinPass<O>(y, 0, bulk, r);
    ScaleMinPass<Tail>(y, bulk, n, r);
  } else {
    OutputPass<O>(x, 0, bulk, theta, inv, y);
    OutputPass<Tail>(x, bulk, n, theta, inv, y);
  }
}

// One group of the backward's iterations: equal eps, thresholds within kWindow * eps.
struct Group {
  double eps, lo, hi;      // hi = c, the largest min(x_max, theta_{t-1}) of the members
  std::vector<int> iters;  // t (header numbering) of the members
};

template <class O, class Tail>
BSATTN_AI typename O::S RowBackwardImpl(const typename O::S* x, const typename O::S* g, int64_t n,
                                        typename O::S log_k, const typename O::S* eps, int n_iters,
                                        const typename O::S* lse, typename O::S* dx) {
  using S = typename O::S;
  const int iters = n_iters;
  // theta[t] = -a_t, t = 1..T (index 0 unused).
  std::vector<S> theta(iters + 1);
  for (int t = 1; t <= iters; ++t) theta[t] = -AFromLse(eps[t - 1], log_k, lse[t - 1]);
  const int64_t bulk_n = n - n % O::kLanes;
  const S x_max = std::max(MaxPass<O>(x, 0, bulk_n), MaxPass<Tail>(x, bulk_n, n));

  // Pass A: dx = the output's term, da_T = its sum, and count_t = #{x_j > theta_t}, t < T (only the
  // thresholds below x_max: nothing is above the others).
  std::vector<int64_t> count(iters + 1, 0);
  std::vector<int> counted;
  for (int t = 1; t < iters; ++t)
    if (theta[t] < x_max) counted.push_back(t);
  const int chunks = (static_cast<int>(counted.size()) + kCountChunk - 1) / kCountChunk;
  std::vector<S> th(static_cast<size_t>(chunks) * kCountChunk, std::numeric_limits<S>::infinity());
  for (size_t i = 0; i < counted.size(); ++i) th[i] = theta[counted[i]];
  std::vector<int64_t> chunk_counts(th.size(), 0);
  const S inv_out = S(1) / eps[iters];
  S da = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock), bulk = end - (end - b) % O::kLanes;
    da += BackwardInitPass<O>(x, g, b, bulk, theta[iters], inv_out, dx) +
          BackwardInitPass<Tail>(x, g, bulk, end, theta[iters], inv_out, dx);
    for (int ch = 0; ch < chunks; ++ch) {
      CountPass<O>(x, b, bulk, th.data() + ch * kCountChunk, chunk_counts.data() + ch * kCountChunk);
      CountPass<Tail>(x, bulk, end, th.data() + ch * kCountChunk, chunk_counts.data() + ch * kCountChunk);
    }
  }
  for (size_t i = 0; i < counted.size(); ++i) count[counted[i]] = chunk_counts[i];

  // The chain, in float64: da_t = da_T D_t with D_T = 1, D_{t-1} = D_t S_t, S_t = sum_j p_tj [x_j > theta_{t-1}]
  // = count_{t-1} exp(theta_{t-1} / eps_t - lse_t) (every such entry has z_tj = theta_{t-1} / eps_t).
  std::vector<double> d_chain(iters + 1, 0.0);
  d_chain[iters] = 1.0;
  for (int t = iters; t >= 2; --t) {
    const double s_t = count[t - 1] == 0 ? 0.0
                                         : static_cast<double>(count[t - 1]) *
                                               std::exp(static_cast<double>(theta[t - 1]) / eps[t - 1] - lse[t - 1]);
    d_chain[t - 1] = d_chain[t] * s_t;
  }
  double dlog_k = 0;  // da_t / dlog k = eps_t
  for (int t = 1; t <= iters; ++t) dlog_k += d_chain[t] * eps[t - 1];

  // dx_j -= da_T sum_{t=2..T} D_t p_tj [x_j <= theta_{t-1}], p_tj = exp(x_j / eps_t - lse_t) there. The
  // iterations with equal eps form groups: with c the group's largest min(x_max, theta_{t-1}) (every
  // contributing x_j is <= c), p_tj = E_j exp(c / eps - lse_t), E_j = exp((x_j - c) / eps) <= 1.
  std::vector<Group> groups;
  for (int t = iters; t >= 2; --t) {
    if (d_chain[t] == 0) continue;
    const double e = eps[t - 1], m = std::min(x_max, theta[t - 1]);
    Group* into = nullptr;
    for (Group& grp : groups) {
      if (grp.eps == e && (std::max(grp.hi, m) - std::min(grp.lo, m)) / e <= kWindow) {
        into = &grp;
        break;
      }
    }
    if (into == nullptr) {
      groups.push_back({e, m, m, {}});
      into = &groups.back();
    }
    into->lo = std::min(into->lo, m);
    into->hi = std::max(into->hi, m);
    into->iters.push_back(t);
  }
  std::vector<S> member_th, member_f;
  std::vector<int> first = {0};
  for (const Group& grp : groups) {
    for (int t : grp.iters) {
      member_th.push_back(theta[t - 1]);
      member_f.push_back(static_cast<S>(d_chain[t] * std::exp(grp.hi / grp.eps - lse[t - 1])));
    }
    first.push_back(static_cast<int>(member_th.size()));
  }
  if (!groups.empty()) {
    S acc[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t end = std::min(n, b + kBlock), bulk = end - (end - b) % O::kLanes;
      const int64_t len = end - b, bulk_len = bulk - b;  // the block as [0, len) of x + b, dx + b, acc
      std::fill(acc, acc + len, S(0));
      for (size_t i = 0; i < groups.size(); ++i) {
        const S c = static_cast<S>(groups[i].hi), inv = S(1) / static_cast<S>(groups[i].eps);
        const S* gth = member_th.data() + first[i];
        const S* gf = member_f.data() + first[i];
        const int members = first[i + 1] - first[i];
        GroupPass<O>(x + b, 0, bulk_len, c, inv, gth, gf, members, acc);
        GroupPass<Tail>(x + b, bulk_len, len, c, inv, gth, gf, members, acc);
      }
      FinishPass<O>(dx + b, acc, 0, bulk_len, da);
      FinishPass<Tail>(dx + b, acc, bulk_len, len, da);
    }
  }
  return static_cast<S>(dlog_k * da);
}

using ForwardFn = void (*)(const float*, int64_t, int64_t, float, const float*, int, float*, float*);
using BackwardFn = float (*)(const float*, const float*, int64_t, float, const float*, int, const float*, float*);

struct RowKernels {
  ForwardFn forward;
  BackwardFn backward;
};

#define BSATTN_COOR_KERNELS(name, target, lanes)                                                              \
  target void Forward##name(const float* x, int64_t n, int64_t n_unmasked, float log_k, const float* eps,     \
                            int n_iters, float* lse, float* y) {                                              \
    RowForwardImpl<VecOps<lanes>, ScalarOps<float>>(x, n, n_unmasked, log_k, eps, n_iters, lse, y);           \
  }                                                                                                           \
  target float Backward##name(const float* x, const float* g, int64_t n, float log_k, const float* eps,       \
                              int n_iters, const float* lse, float* dx) {                                     \
    return RowBackwardImpl<VecOps<lanes>, ScalarOps<float>>(x, g, n, log_k, eps, n_iters, lse, dx);           \
  }                                                                                                           \
  constexpr RowKernels k##name = {Forward##name, Backward##name};

BSATTN_COOR_KERNELS(Avx512, __attribute__((target("arch=x86-64-v4"))), 16)
BSATTN_COOR_KERNELS(Avx2, __attribute__((target("arch=x86-64-v3"))), 8)
BSATTN_COOR_KERNELS(Baseline, , 8)
#undef BSATTN_COOR_KERNELS

// The level cpu_math.cc chose ($BSATTN_CPU_ISA caps it): the same for every kernel of the library.
RowKernels SelectKernels() {
  const int level = CpuIsaLevel();
  return level == 2 ? kAvx512 : level == 1 ? kAvx2 : kBaseline;
}

const RowKernels& Kernels() {
  static const RowKernels kernels = SelectKernels();
  return kernels;
}

// float32: the ISA level's kernels; float64: the same code on scalars.
void RowForward(const float* x, int64_t n, int64_t n_unmasked, float log_k, const float* eps, int n_iters,
                float* lse, float* y) {
  Kernels().forward(x, n, n_unmasked, log_k, eps, n_iters, lse, y);
}
void RowForward(const double* x, int64_t n, int64_t n_unmasked, double log_k, const double* eps, int n_iters,
                double* lse, double* y) {
  RowForwardImpl<ScalarOps<double>, ScalarOps<double>>(x, n, n_unmasked, log_k, eps, n_iters, lse, y);
}
float RowBackward(const float* x, const float* g, int64_t n, float log_k, const float* eps, int n_iters,
                  const float* lse, float* dx) {
  return Kernels().backward(x, g, n, log_k, eps, n_iters, lse, dx);
}
double RowBackward(const double* x, const double* g, int64_t n, double log_k, const double* eps, int n_iters,
                   const double* lse, double* dx) {
  return RowBackwardImpl<ScalarOps<double>, ScalarOps<double>>(x, g, n, log_k, eps, n_iters, lse, dx);
}

}  // namespace

template <typename Acc>
Acc CoorLogK(Acc k) {
  return std::log(std::max(k, Acc(1e-20)));
}

template <typename Acc>
void CoorDescentRowForward(const Acc* x, int64_t n, int64_t n_unmasked, Acc log_k, const Acc* eps, int n_iters,
                           Acc* lse, Acc* y) {
  RowForward(x, n, n_unmasked, log_k, eps, n_iters, lse, y);
}

template <typename Acc>
Acc CoorDescentRowBackward(const Acc* x, const Acc* g, int64_t n, Acc log_k, const Acc* eps, int n_iters,
                           const Acc* lse, Acc* dx) {
  return RowBackward(x, g, n, log_k, eps, n_iters, lse, dx);
}

template void CoorDescentRowForward(const float*, int64_t, int64_t, float, const float*, int, float*, float*);
template void CoorDescentRowForward(const double*, int64_t, int64_t, double, const double*, int, double*,
                                    double*);
template float CoorDescentRowBackward(const float*, const float*, int64_t, float, const float*, int,
                                      const float*, float*);
template double CoorDescentRowBackward(const double*, const double*, int64_t, double, const double*, int,
                                       const double*, double*);
template float CoorLogK(float);
template double CoorLogK(double);

}  // namespace bsattn
