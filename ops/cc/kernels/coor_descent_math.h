// Per-row math of the fused coordinate descent (BsattnCoorDescent, CPU): the forward iteration and
// its exact reverse pass on one row held in a dense Acc buffer (float32; float64 for double).
//
// The iteration (CoLT5-attention's coor_descent, peers.md §3.1), for one row x[n] whose masked
// entries are -inf (they then drop out of every sum, and y = 0 there), eps_1..eps_{T+1} the
// schedule (eps_1 = max(eps_init, eps), eps_{t+1} = max(eps_t * eps_decay, eps)):
//   b_0 = -x,  a_t = eps_t * (log k - lse_t),  lse_t = logsumexp_j z_tj,  z_tj = (x_j + b_{t-1,j}) / eps_t
//   b_t = -relu(x + a_t)                     (t = 1..T)
//   y_j = exp((x_j + a_T + b_Tj) / eps_{T+1}) = exp(min(x_j + a_T, 0) / eps_{T+1})
// Since x + b_0 = 0, lse_1 = log(n_unmasked) and a_1 does not depend on x. For t >= 2,
// z_tj = (x_j - relu(x_j + a_{t-1})) / eps_t depends on x and on the scalar a_{t-1} only: the state
// carried from one iteration to the next is ONE scalar per row. The forward stores lse_1..lse_T
// (n_iters values per row); a_t = eps_t * (log k - lse_t) is recomputed bit for bit from them.
//
// Since x - relu(x + a) = min(x, -a), z_tj = min(x_j, theta_{t-1}) / eps_t with theta = -a: the
// entries above the threshold all have z = theta / eps_t, the others x_j / eps_t.
//
// Reverse mode (g = dL/dy; [.] is 1 if true else 0; relu'(0) = 0 as in autograd):
//   dx_j = g_j y_j / eps_{T+1} [x_j <= theta_T],  da_T = sum_j dx_j
//   for t = T .. 2, with p_j = exp(z_tj - lse_t) (softmax of z_t):
//     dx_j    -= da_t p_j [x_j <= theta_{t-1}]    (da_t/dx_j     = -p_j [x_j <= theta_{t-1}])
//     dlogk   += da_t eps_t                       (da_t/dlog k   = eps_t)
//     da_{t-1} = da_t S_t                         (da_t/da_{t-1} = S_t = sum_j p_j [x_j > theta_{t-1}])
//   dlogk += da_1 eps_1;  dk = dlogk / k  (0 where k < 1e-20: log clamps k there, as the original)
// S_t = count_t exp(theta_{t-1} / eps_t - lse_t), count_t = #{j: x_j > theta_{t-1}}: the chain of da needs
// only the counts. So the backward counts in one pass (with dx's first term), runs the chain on scalars,
// and adds every iteration's term to dx in ONE more pass, recomputing z from x and the stored lse (one
// exponential per entry and distinct eps: iterations with equal eps share it, coor_descent_math.cc).
// Memory: the row and its gradient (O(n)) plus the lse (O(n_iters)), never O(n_iters * n).
#ifndef BSATTN_OPS_CC_KERNELS_COOR_DESCENT_MATH_H_
#define BSATTN_OPS_CC_KERNELS_COOR_DESCENT_MATH_H_

#include <cstdint>

namespace bsattn {

// log k as the original takes it: log(max(k, 1e-20)).
template <typename Acc>
Acc CoorLogK(Acc k);

// One row forward: x [n] (-inf = masked), n_unmasked >= 1 of its entries finite, eps [n_iters + 1]
// (the schedule, eps[t-1] = eps_t); writes lse [n_iters] and y [n] (y may alias nothing else; it is
// also the forward's scratch).
template <typename Acc>
void CoorDescentRowForward(const Acc* x, int64_t n, int64_t n_unmasked, Acc log_k, const Acc* eps,
                           int n_iters, Acc* lse, Acc* y);

// One row backward: x [n] as in the forward, g [n] = dL/dy (read only where x is finite), lse from
// the forward; writes dx [n] (0 where masked) and returns dL/dlog k.
template <typename Acc>
Acc CoorDescentRowBackward(const Acc* x, const Acc* g, int64_t n, Acc log_k, const Acc* eps,
                           int n_iters, const Acc* lse, Acc* dx);

}  // namespace bsattn

#endif  // BSATTN_OPS_CC_KERNELS_COOR_DESCENT_MATH_H_
