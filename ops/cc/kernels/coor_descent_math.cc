// The row passes of the fused coordinate descent (see coor_descent_math.h for the math). float32
// passes are vectorised once per ISA level (AVX-512, AVX2, baseline; chosen once, like cpu_math.cc);
// float64 passes are plain loops (float64 is for exact gradient checks, not for speed).
#include "ops/cc/kernels/coor_descent_math.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/cc/kernels/cpu_math.h"
#include "ops/cc/kernels/simd.h"

namespace bsattn {
namespace {

// ---- the four passes, scalar (float64, and the float32 tails) ---------------------------------
// z = (x - relu(x + a)) * inv: the original's (s + b) / eps with b = -relu(s + a).

template <typename Acc>
inline Acc SumExpScalar(const Acc* x, int64_t begin, int64_t n, Acc a, Acc inv, Acc shift) {
  Acc sum = 0;
  for (int64_t j = begin; j < n; ++j) {
    const Acc u = x[j] + a;
    sum += ExpScalar((x[j] - (u > 0 ? u : Acc(0))) * inv - shift);
  }
  return sum;
}

// y = exp(min(x + a, 0) * inv) (x + a + b with b = -relu(x + a) is min(x + a, 0) exactly).
template <typename Acc>
inline void OutputScalar(const Acc* x, int64_t begin, int64_t n, Acc a, Acc inv, Acc* y) {
  for (int64_t j = begin; j < n; ++j) {
    const Acc u = x[j] + a;
    y[j] = ExpScalar((u < 0 ? u : Acc(0)) * inv);
  }
}

// dx = g y inv [x + a <= 0]; returns sum(dx). Masked entries (x = -inf) give y = 0, dx = 0.
template <typename Acc>
inline Acc BackwardInitScalar(const Acc* x, const Acc* g, int64_t begin, int64_t n, Acc a, Acc inv,
                              Acc* dx) {
  Acc sum = 0;
  for (int64_t j = begin; j < n; ++j) {
    const Acc u = x[j] + a;
    const Acc y = ExpScalar((u < 0 ? u : Acc(0)) * inv);
    const Acc d = (u <= 0 && y > 0) ? g[j] * y * inv : Acc(0);
    dx[j] = d;
    sum += d;
  }
  return sum;
}

// p = exp(z - lse); dx -= da p [u <= 0]; returns sum(p [u > 0]).
template <typename Acc>
inline Acc BackwardStepScalar(const Acc* x, int64_t begin, int64_t n, Acc a_prev, Acc inv, Acc lse,
                              Acc da, Acc* dx) {
  Acc sum = 0;
  for (int64_t j = begin; j < n; ++j) {
    const Acc u = x[j] + a_prev;
    const bool pos = u > 0;
    const Acc p = ExpScalar((x[j] - (pos ? u : Acc(0))) * inv - lse);
    if (pos) {
      sum += p;
    } else {
      dx[j] -= da * p;
    }
  }
  return sum;
}

// ---- the same passes on N-lane float32 vectors ------------------------------------------------

template <int N>
inline __attribute__((always_inline)) float SumExpBody(const float* x, int64_t n, float a, float inv,
                                                      float shift) {
  using Vec = typename Lanes<N>::F;
  const Vec zero = {};
  Vec acc0 = zero, acc1 = zero;
  int64_t j = 0;
  for (; j + 2 * N <= n; j += 2 * N) {
    const Vec x0 = Load<N>(x + j), x1 = Load<N>(x + j + N);
    const Vec u0 = x0 + a, u1 = x1 + a;
    acc0 += ExpVec<N>((x0 - (u0 > zero ? u0 : zero)) * inv - shift);
    acc1 += ExpVec<N>((x1 - (u1 > zero ? u1 : zero)) * inv - shift);
  }
  for (; j + N <= n; j += N) {
    const Vec x0 = Load<N>(x + j);
    const Vec u0 = x0 + a;
    acc0 += ExpVec<N>((x0 - (u0 > zero ? u0 : zero)) * inv - shift);
  }
  return Sum<N>(acc0 + acc1) + SumExpScalar(x, j, n, a, inv, shift);
}

template <int N>
inline __attribute__((always_inline)) void OutputBody(const float* x, int64_t n, float a, float inv,
                                                     float* y) {
  using Vec = typename Lanes<N>::F;
  const Vec zero = {};
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    const Vec u = Load<N>(x + j) + a;
    Store<N>(y + j, ExpVec<N>((u < zero ? u : zero) * inv));
  }
  OutputScalar(x, j, n, a, inv, y);
}

template <int N>
inline __attribute__((always_inline)) float BackwardInitBody(const float* x, const float* g, int64_t n,
                                                            float a, float inv, float* dx) {
  using Vec = typename Lanes<N>::F;
  const Vec zero = {};
  Vec acc = zero;
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    const Vec u = Load<N>(x + j) + a;
    const Vec y = ExpVec<N>((u < zero ? u : zero) * inv);
    // y > 0 keeps masked entries (y = 0) from reading g (which may be anything there).
    const Vec d = (u <= zero) & (y > zero) ? Load<N>(g + j) * y * inv : zero;
    Store<N>(dx + j, d);
    acc += d;
  }
  return Sum<N>(acc) + BackwardInitScalar(x, g, j, n, a, inv, dx);
}

template <int N>
inline __attribute__((always_inline)) float BackwardStepBody(const float* x, int64_t n, float a_prev,
                                                            float inv, float lse, float da, float* dx) {
  using Vec = typename Lanes<N>::F;
  const Vec zero = {};
  Vec acc0 = zero, acc1 = zero;
  // Two vectors per step, as in SumExpBody: two independent exp chains in flight.
  auto step = [&](int64_t at, Vec& acc) __attribute__((always_inline)) {
    const Vec xv = Load<N>(x + at);
    const Vec u = xv + a_prev;
    const auto pos = u > zero;
    const Vec p = ExpVec<N>((xv - (pos ? u : zero)) * inv - lse);
    acc += pos ? p : zero;
    Store<N>(dx + at, Load<N>(dx + at) - (pos ? zero : da * p));
  };
  int64_t j = 0;
  for (; j + 2 * N <= n; j += 2 * N) {
    step(j, acc0);
    step(j + N, acc1);
  }
  for (; j + N <= n; j += N) step(j, acc0);
  return Sum<N>(acc0 + acc1) + BackwardStepScalar(x, j, n, a_prev, inv, lse, da, dx);
}

using SumExpFn = float (*)(const float*, int64_t, float, float, float);
using OutputFn = void (*)(const float*, int64_t, float, float, float*);
using BackwardInitFn = float (*)(const float*, const float*, int64_t, float, float, float*);
using BackwardStepFn = float (*)(const float*, int64_t, float, float, float, float, float*);

struct RowKernels {
  SumExpFn sum_exp;
  OutputFn output;
  BackwardInitFn backward_init;
  BackwardStepFn backward_step;
};

#define BSATTN_COOR_KERNELS(name, target, lanes)                                                        \
  target float SumExp##name(const float* x, int64_t n, float a, float inv, float shift) {               \
    return SumExpBody<lanes>(x, n, a, inv, shift);                                                      \
  }                                                                                                     \
  target void Output##name(const float* x, int64_t n, float a, float inv, float* y) {                   \
    OutputBody<lanes>(x, n, a, inv, y);                                                                 \
  }                                                                                                     \
  target float BackwardInit##name(const float* x, const float* g, int64_t n, float a, float inv,        \
                                  float* dx) {                                                          \
    return BackwardInitBody<lanes>(x, g, n, a, inv, dx);                                                \
  }                                                                                                     \
  target float BackwardStep##name(const float* x, int64_t n, float a_prev, float inv, float lse,        \
                                  float da, float* dx) {                                                \
    return BackwardStepBody<lanes>(x, n, a_prev, inv, lse, da, dx);                                     \
  }                                                                                                     \
  constexpr RowKernels k##name = {SumExp##name, Output##name, BackwardInit##name, BackwardStep##name};

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

// The passes by accumulator type: float32 vectorised, float64 scalar.
struct Passes {
  static float SumExp(const float* x, int64_t n, float a, float inv, float shift) {
    return Kernels().sum_exp(x, n, a, inv, shift);
  }
  static double SumExp(const double* x, int64_t n, double a, double inv, double shift) {
    return SumExpScalar(x, 0, n, a, inv, shift);
  }
  static void Output(const float* x, int64_t n, float a, float inv, float* y) { Kernels().output(x, n, a, inv, y); }
  static void Output(const double* x, int64_t n, double a, double inv, double* y) {
    OutputScalar(x, 0, n, a, inv, y);
  }
  static float BackwardInit(const float* x, const float* g, int64_t n, float a, float inv, float* dx) {
    return Kernels().backward_init(x, g, n, a, inv, dx);
  }
  static double BackwardInit(const double* x, const double* g, int64_t n, double a, double inv, double* dx) {
    return BackwardInitScalar(x, g, 0, n, a, inv, dx);
  }
  static float BackwardStep(const float* x, int64_t n, float a_prev, float inv, float lse, float da, float* dx) {
    return Kernels().backward_step(x, n, a_prev, inv, lse, da, dx);
  }
  static double BackwardStep(const double* x, int64_t n, double a_prev, double inv, double lse, double da,
                             double* dx) {
    return BackwardStepScalar(x, 0, n, a_prev, inv, lse, da, dx);
  }
};

// a_t from the stored lse_t, exactly as the forward computed it.
template <typename Acc>
inline Acc AFromLse(Acc eps_t, Acc log_k, Acc lse_t) {
  return eps_t * (log_k - lse_t);
}

}  // namespace

template <typename Acc>
Acc CoorLogK(Acc k) {
  return std::log(std::max(k, Acc(1e-20)));
}

template <typename Acc>
void CoorDescentRowForward(const Acc* x, int64_t n, int64_t n_unmasked, Acc log_k, const Acc* eps,
                           int n_iters, Acc* lse, Acc* y) {
  // The largest finite x bounds every z_t: z_tj <= min(x_max, -a_{t-1}) / eps_t. It is the shift
  // of each logsumexp (any shift near the maximum is exact; this one costs no extra pass).
  Acc x_max = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = 0; j < n; ++j) x_max = std::max(x_max, x[j]);
  lse[0] = std::log(static_cast<Acc>(n_unmasked));  // z_1 = (x - x) / eps_1 = 0 on every unmasked entry
  Acc a = AFromLse(eps[0], log_k, lse[0]);
  for (int t = 1; t < n_iters; ++t) {
    const Acc inv = Acc(1) / eps[t];
    const Acc shift = std::min(x_max, -a) * inv;
    lse[t] = shift + std::log(Passes::SumExp(x, n, a, inv, shift));
    a = AFromLse(eps[t], log_k, lse[t]);
  }
  Passes::Output(x, n, a, Acc(1) / eps[n_iters], y);
}

template <typename Acc>
Acc CoorDescentRowBackward(const Acc* x, const Acc* g, int64_t n, Acc log_k, const Acc* eps, int n_iters,
                           const Acc* lse, Acc* dx) {
  Acc a = AFromLse(eps[n_iters - 1], log_k, lse[n_iters - 1]);
  Acc da = Passes::BackwardInit(x, g, n, a, Acc(1) / eps[n_iters], dx);
  Acc dlog_k = 0;
  for (int t = n_iters - 1; t >= 1; --t) {  // iteration t + 1 of the header's numbering
    const Acc a_prev = AFromLse(eps[t - 1], log_k, lse[t - 1]);
    dlog_k += da * eps[t];
    da *= Passes::BackwardStep(x, n, a_prev, Acc(1) / eps[t], lse[t], da, dx);
  }
  return dlog_k + da * eps[0];
}

template float CoorLogK(float);
template double CoorLogK(double);
template void CoorDescentRowForward(const float*, int64_t, int64_t, float, const float*, int, float*, float*);
template void CoorDescentRowForward(const double*, int64_t, int64_t, double, const double*, int, double*,
                                    double*);
template float CoorDescentRowBackward(const float*, const float*, int64_t, float, const float*, int,
                                      const float*, float*);
template double CoorDescentRowBackward(const double*, const double*, int64_t, double, const double*, int,
                                       const double*, double*);

}  // namespace bsattn
