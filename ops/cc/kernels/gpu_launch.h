// What the GPU wrappers share (GOOGLE_CUDA builds only): the dtype code of the C launchers, the
// op's stream, host-table copies to the device and launcher error codes as statuses.
#ifndef BSATTN_OPS_CC_KERNELS_GPU_LAUNCH_H_
#define BSATTN_OPS_CC_KERNELS_GPU_LAUNCH_H_

#if GOOGLE_CUDA

#include "ops/cuda/bsattn_cuda.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/platform/stream_executor.h"

namespace bsattn {

template <typename T>
constexpr int DtypeCode();
template <>
constexpr int DtypeCode<float>() { return BSATTN_FLOAT32; }
template <>
constexpr int DtypeCode<Eigen::half>() { return BSATTN_FLOAT16; }
template <>
constexpr int DtypeCode<Eigen::bfloat16>() { return BSATTN_BFLOAT16; }

inline bsattn_stream_t Stream(tensorflow::OpKernelContext* ctx) {
  return static_cast<bsattn_stream_t>(ctx->op_device_context()->stream()->platform_specific_handle().stream);
}

// A device copy of a (validated) host tensor, enqueued on the op's stream.
inline absl::Status HostToDevice(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& host,
                                 tensorflow::Tensor* device) {
  TF_RETURN_IF_ERROR(ctx->allocate_temp(host.dtype(), host.shape(), device));
  if (host.TotalBytes() == 0) return absl::OkStatus();
  stream_executor::DeviceAddressBase destination(device->data(), device->TotalBytes());
  return ctx->op_device_context()->stream()->Memcpy(&destination, host.data(), host.TotalBytes());
}

inline absl::Status LaunchStatus(int code, const char* op) {
  if (code == 0) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(op, ": ", bsattn_cuda_error_string(code)));
}

}  // namespace bsattn

#endif  // GOOGLE_CUDA

#endif  // BSATTN_OPS_CC_KERNELS_GPU_LAUNCH_H_
