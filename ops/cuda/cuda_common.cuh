// Device helpers shared by the CUDA kernel files: float conversions of the three dtypes and the
// launchers' error reporting.
#ifndef BSATTN_OPS_CUDA_CUDA_COMMON_CUH_
#define BSATTN_OPS_CUDA_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace bsattn_cuda {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The error of the last launch (0 when it was accepted).
inline int LastError() { return static_cast<int>(cudaGetLastError()); }

}  // namespace bsattn_cuda

#endif  // BSATTN_OPS_CUDA_CUDA_COMMON_CUH_
