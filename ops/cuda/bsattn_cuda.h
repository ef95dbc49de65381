/* C launchers of bsattn's CUDA kernels: framework-free (no TensorFlow, no torch).
 *
 * Every pointer is device memory; tensors use the layouts of the TF ops (ops/cc/ops/):
 *   dense        [batch, len, heads*head_dim]       head h owns channels [h*D, (h+1)*D)
 *   blocks       [batch, heads, nnz, bs, bs]
 *   nt_lut       [lut_heads, nnz, 2]                 (Qb, Kb)
 *   row tables   [lut_heads, n_out + nnz, 2]         header (offset, count) then (block id, partner)
 *   mask         [mask_heads, nnz, bs, ceil(bs/32)]  keep bits, bit j%32 of word j/32 = key column j
 * lut_heads and mask_heads are 1 (shared by all heads) or heads. Tables are trusted: callers
 * validate them (the TF wrappers do, on the host).
 *
 * Each launcher enqueues its work on `stream` and returns 0 or a cudaError_t / bsattn error code;
 * bsattn_cuda_error_string() explains a code.
 */
#ifndef BSATTN_OPS_CUDA_BSATTN_CUDA_H_
#define BSATTN_OPS_CUDA_BSATTN_CUDA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* bsattn_stream_t; /* == cudaStream_t */

enum bsattn_dtype { BSATTN_FLOAT32 = 0, BSATTN_FLOAT16 = 1, BSATTN_BFLOAT16 = 2 };

enum bsattn_error {
  BSATTN_ERROR_DTYPE = 10001,      /* dtype not one of bsattn_dtype */
  BSATTN_ERROR_BLOCK_SIZE = 10002, /* block size not 8, 16, 32, 64 or 128 */
  BSATTN_ERROR_SHAPE = 10003,      /* a size is negative, zero (heads, head_dim) or too large for the grid */
  BSATTN_ERROR_HEAD_DIM = 10004,   /* fused attention: head_dim over 256 */
  BSATTN_ERROR_WORKSPACE = 10005,  /* fused backward: workspace missing or too small */
};

const char* bsattn_cuda_error_string(int code);

/* c[n, h, b] = a[n, Qb rows, h] . b[n, Kb rows, h]^T for (Qb, Kb) = nt_lut[lh, b]. */
int bsattn_nt(int dtype, const void* a, const void* b, const int32_t* nt_lut, void* c, int64_t batch,
              int64_t heads, int64_t a_len, int64_t b_len, int64_t width, int64_t lut_heads,
              int64_t nnz, int64_t block_size, bsattn_stream_t stream);

/* transpose_w = 0 (nn): c[n, r rows, h] = sum over row r's entries (b, p) of w[n, h, b] . x[n, p rows, h].
 * transpose_w = 1 (tn): the same with w[n, h, b]^T and a column table. c has n_out*bs rows;
 * a row without entries is 0. */
int bsattn_dsd(int dtype, int transpose_w, const void* w, const void* x, const int32_t* lut, void* c,
               int64_t batch, int64_t heads, int64_t nnz, int64_t block_size, int64_t x_len,
               int64_t width, int64_t lut_heads, int64_t lut_len, int64_t n_out,
               bsattn_stream_t stream);

/* bsattn_dsd with weights w of dtype w_dtype (BSATTN_FLOAT16 or BSATTN_BFLOAT16) and float32 x and c
 * (blocksparse's mixed precision), on the SIMT body. */
int bsattn_dsd_mixed_weights(int w_dtype, int transpose_w, const void* w, const void* x,
                             const int32_t* lut, void* c, int64_t batch, int64_t heads, int64_t nnz,
                             int64_t block_size, int64_t x_len, int64_t width, int64_t lut_heads,
                             int64_t lut_len, int64_t n_out, bsattn_stream_t stream);

/* y = softmax(scale * x) over the kept entries of each query row (all blocks of the row, from
 * nn_lut); masked entries are 0, a row with no kept entry is 0. With autoregressive != 0, key j
 * of query i is also dropped unless j < key or j <= i. */
int bsattn_masked_softmax(int dtype, const void* x, void* y, float scale, const int32_t* nn_lut,
                          const int32_t* mask, int autoregressive, int64_t key, int64_t batch,
                          int64_t heads, int64_t nnz, int64_t block_size, int64_t lut_heads,
                          int64_t mask_heads, int64_t lut_len, int64_t n_rows,
                          bsattn_stream_t stream);

/* dx = scale * y * (dy - rowsum(dy * y)), rows as in the forward. */
int bsattn_masked_softmax_grad(int dtype, const void* dy, const void* y, void* dx, float scale,
                               const int32_t* nn_lut, int64_t batch, int64_t heads, int64_t nnz,
                               int64_t block_size, int64_t lut_heads, int64_t lut_len,
                               int64_t n_rows, bsattn_stream_t stream);

/* ---- fused (flash-style) block-sparse attention --------------------------------------------
 * The interface of the CPU op BsattnFusedAttention (ops/cc/ops/fused_attention_ops.cc):
 *   q [B, Tq, H*D], k and v [B, Tk, H*D] (dtype), Tq = n_q_blocks * bs, Tk = n_k_blocks * bs
 *   row_ptr [L, nQb + 1], row_entries [E, 2] (Kb, mask id); col_ptr [L, nKb + 1], col_entries
 *   [E, 2] (Qb, mask id) (backward only); L = layout_heads = 1 or H; masks [P, bs, ceil(bs/32)]
 *   keep bits (mask id -1 = full block); key_padding_mask [B, Tk] bytes (nonzero = real key) or
 *   NULL; bias [bias_batch, bias_heads, Tq, Tk] (dtype) or NULL, added to the scaled scores, with
 *   bias_batch = 1 (one slice for every batch entry) or B and bias_heads = 1 or H; dropout of the
 *   probabilities with the counter hash of ops/cuda/dropout_hash.h (rate 0 = none).
 * batch, Tq and Tk may be 0 (no kernel runs: outputs of Tk = 0 are 0 with lse -inf, gradients 0).
 * Masked entries (in-block mask, key padding, a -inf bias) are never read into a result: NaN/Inf
 * in q, k, v or bias there reaches no output; an attended NaN score makes its row and lse NaN.
 * Grouped heads (kv_heads, appended last): k, v (and dk, dv) are [B, Tk, kv_heads*D]; query head h reads
 * K/V head h / (heads / kv_heads). Segment ids (appended last): query i attends key j of batch entry b only if
 * q_segment_ids[b, i] == k_segment_ids[b, j] (entries of other segments are masked like in-block mask bits).
 * Block sizes 8..128 (powers of two); head_dim up to 256. float16/bfloat16 with bs >= 16,
 * head_dim 32, 64 or 128 and 16-byte aligned q/k/v/out run on tensor cores (mma.sync); every
 * other case runs a SIMT kernel with float32 arithmetic. */
typedef struct bsattn_fused_args {
  int dtype;
  int64_t batch, heads, head_dim, tq, tk, block_size;
  const void* q;
  const void* k;
  const void* v;
  int64_t layout_heads;
  const int32_t* row_ptr;
  const int32_t* row_entries;
  const int32_t* col_ptr;
  const int32_t* col_entries;
  const int32_t* masks;
  const uint8_t* key_padding_mask;
  const void* bias;
  int64_t bias_batch; /* 1 or batch: bias entry (b, h, i, j) is at ((b' * bias_heads + h') * Tq + i) * Tk + j */
  int64_t bias_heads; /* 1 or heads; b' = b or 0, h' = h or 0 */
  float scale;
  float dropout_rate;
  int64_t seed;
  /* appended in session 4 (grouped-query attention, packed sequences): */
  int64_t kv_heads;             /* 0 or heads = no grouping; else divides heads: k, v (dk, dv) are
                                   [B, Tk, kv_heads*D], query head h reads K/V head h / (heads / kv_heads) */
  const int32_t* q_segment_ids; /* [B, Tq] or NULL (then k_segment_ids is NULL too) */
  const int32_t* k_segment_ids; /* [B, Tk] or NULL: query i attends key j only if the ids are equal */
  /* appended in session 5 (KV-cache decoding; forward only): */
  int64_t q_offset; /* decode: absolute position of q row 0 */
  int decode;       /* nonzero: q (and out, lse, bias rows, q_segment_ids) has tq rows, any tq >= 0, the
                       queries at positions [q_offset, q_offset + tq); the tables are those of the whole
                       (pattern, T_max) (t_max below: row_ptr has t_max / block_size rows), in-block masks
                       apply at the absolute rows, the dropout hash uses the absolute row of a T_max-row op;
                       keys >= q_offset + tq are never read (0 <= q_offset, q_offset + tq <= min(T_max, tk):
                       the caller checks). The backward launchers return BSATTN_ERROR_SHAPE. On tensor cores a
                       step with too few rows for the GPU is split over the keys: its partial rows go to a
                       stream-ordered temporary (cudaMallocAsync / cudaFreeAsync on `stream`; without memory it
                       runs unsplit); $BSATTN_DECODE_SPLITS = N fixes the split count (1 = none). */
  int64_t t_max; /* decode: the tables' query length T_max (a multiple of block_size); unused otherwise.
                    Not in the agreed interface: a launcher cannot read it from the device tables. */
  /* appended in session 6 (sparse_attention's 'strided' without transposes; forward and backward): */
  int64_t strided_period; /* 0 = none; L > 0 (tq == tk == T, T % L == 0, (T / L) % block_size == 0, no bias,
                             not decode, else the launchers return BSATTN_ERROR_SHAPE, as for L < 0): the
                             tables address permuted positions p, which hold token (p % (T / L)) * L + p / (T / L)
                             of q, k, v, out, lse, dq, dk, dv, key_padding_mask and the segment ids (all in token
                             order); the dropout hash uses p. Equals the op on permuted inputs, un-permuted, bit
                             for bit. */
  /* appended in session 7 (the [batch, heads, n, dim_head] layout of memory-efficient attention): */
  int head_major; /* nonzero: q, out, dout, dq are [B, heads, Tq, D] and k, v, dk, dv [B, kv_heads, Tk, D]
                     (each head's rows contiguous, D apart) instead of [B, T, heads * D]; lse, bias, masks,
                     segment ids unchanged; with decode the cache too. Equals the default layout on the
                     transposed tensors, transposed back, bit for bit. */
} bsattn_fused_args;

/* out [B, Tq, H*D] or, head_major, [B, H, Tq, D] (dtype) and lse [B, H, Tq] float32 (-inf for a row
 * without kept keys, whose output is 0; NaN for a row with an attended NaN score). */
int bsattn_fused_forward(const bsattn_fused_args* args, void* out, float* lse, bsattn_stream_t stream);

/* Bytes of device workspace bsattn_fused_backward needs (delta rows; for 16-bit dtypes a float32
 * dq accumulator and, with dbias, a float32 dbias accumulator; per-block segment-id ranges). */
int64_t bsattn_fused_backward_workspace(const bsattn_fused_args* args, int with_dbias);

/* dq, dk, dv (shapes of q, k, v; dk and dv summed over each K/V head's group) from dout (out's shape), the forward's out and lse, and dlse
 * [B, H, Tq] float32 or NULL. With dbias (NULL = not wanted; needs a bias) [bias_batch,
 * bias_heads, Tq, Tk] (dtype): the gradient of the bias summed over the batch when bias_batch = 1
 * and over the heads when bias_heads = 1, 0 outside the active blocks. dk, dv, dbias have one
 * writer per element (no atomics). dq: on the tensor-core path (float16/bfloat16) one pass over
 * key-block columns computes dk, dv and dq, dq summed into a float32 workspace buffer with atomic
 * adds (the order of the sums varies: dq may differ in the last bits between runs); with
 * BSATTN_BACKWARD_DETERMINISTIC (or the environment variable BSATTN_DETERMINISTIC=1) dq comes
 * from a second pass over query-block rows instead (one writer: the same inputs give the same
 * bits). The SIMT path is always deterministic. bsattn_fused_backward = bsattn_fused_backward_ex
 * with flags 0. */
enum bsattn_backward_flags { BSATTN_BACKWARD_DETERMINISTIC = 1 };
int bsattn_fused_backward_ex(const bsattn_fused_args* args, const void* out, const float* lse,
                             const void* dout, const float* dlse, void* dq, void* dk, void* dv,
                             void* dbias, void* workspace, int64_t workspace_bytes, int flags,
                             bsattn_stream_t stream);
int bsattn_fused_backward(const bsattn_fused_args* args, const void* out, const float* lse,
                          const void* dout, const float* dlse, void* dq, void* dk, void* dv,
                          void* dbias, void* workspace, int64_t workspace_bytes,
                          bsattn_stream_t stream);

/* ---- fused coordinate descent (CoLT5 routing; the CPU op BsattnCoorDescent) -----------------
 * One row per CTA: s [rows, n] (dtype), mask [rows, n] bytes (nonzero = a real entry) or NULL,
 * k [rows] float32 (k_per_row != 0) or [1] (one k for every row), eps [n_iters + 1] float32 (the
 * schedule: eps[t] is used by iteration t + 1, eps[n_iters] by the output), all device memory.
 * The forward writes y [rows, n] (dtype; 0 where masked and on fully masked rows) and lse
 * [rows, n_iters] float32, all the backward needs besides s. Callers check k > 0 and
 * k <= n; a row whose k exceeds its unmasked count runs as is (no check on the device).
 * workspace: bsattn_coor_descent_workspace bytes (0 when a row, and in the backward its gradient,
 * fit in shared memory; then workspace may be NULL). */
int64_t bsattn_coor_descent_workspace(int64_t rows, int64_t n, int backward, int k_per_row);

int bsattn_coor_descent_forward(int dtype, const void* s, const uint8_t* mask, const float* k, int k_per_row,
                                const float* eps, int n_iters, int64_t rows, int64_t n, void* y, float* lse,
                                void* workspace, int64_t workspace_bytes, bsattn_stream_t stream);

/* The exact gradient (the iterations replayed in reverse): ds [rows, n] (dtype, 0 where masked)
 * from dy [rows, n] (dtype) and the forward's lse; dk [rows] float32 (k_per_row) or [1] (the sum
 * over the rows, in row order). */
int bsattn_coor_descent_backward(int dtype, const void* s, const uint8_t* mask, const float* k, int k_per_row,
                                 const float* eps, int n_iters, int64_t rows, int64_t n, const float* lse,
                                 const void* dy, void* ds, float* dk, void* workspace, int64_t workspace_bytes,
                                 bsattn_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* BSATTN_OPS_CUDA_BSATTN_CUDA_H_ */
