// What the GPU wrappers share (GOOGLE_CUDA builds only): the dtype code of the C launchers, the
// op's stream, device-resident copies of host tables and launcher error codes as statuses.
#ifndef BSATTN_OPS_CC_KERNELS_GPU_LAUNCH_H_
#define BSATTN_OPS_CC_KERNELS_GPU_LAUNCH_H_

#if GOOGLE_CUDA

#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>

#include "ops/cuda/bsattn_cuda.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/platform/mutex.h"
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

// A device copy of a (validated) host tensor, enqueued on the op's stream. From pageable memory
// the driver may wait for the stream first: used once per table by DeviceTableCache, never per call.
inline absl::Status HostToDevice(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& host,
                                 tensorflow::Tensor* device) {
  TF_RETURN_IF_ERROR(ctx->allocate_temp(host.dtype(), host.shape(), device));
  if (host.TotalBytes() == 0) return absl::OkStatus();
  stream_executor::DeviceAddressBase destination(device->data(), device->TotalBytes());
  return ctx->op_device_context()->stream()->Memcpy(&destination, host.data(), host.TotalBytes());
}

// Device-resident copies of an op kernel's host tables (index tables, masks: small, reused call
// after call), so that a call does no copy and never waits for the stream. An entry is found by
// the table's bytes, compared in full with the entry's host copy (a memcmp, cheaper than the
// validation that reads the table anyway): a hit is exact whatever the tensor's identity, lifetime
// or device, so a changed table can never meet a stale copy. At most kEntries per kernel (least
// recently used evicted; an evicted copy may still be read by enqueued kernels: TF's allocator
// reuses its memory only for work enqueued later on the same stream). The kernel object is per
// device, so is its cache. BSATTN_GPU_TABLE_CACHE=0 copies on every call instead (the old path,
// kept for timing comparisons).
class DeviceTableCache {
 public:
  // The device address of `host`'s contents (null for an empty table); `holder` keeps that memory
  // alive until the caller's launch is enqueued (an entry evicted meanwhile by another call frees nothing).
  absl::Status Get(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& host, tensorflow::Tensor* holder,
                   const int32_t** device) {
    if (!Enabled()) {
      TF_RETURN_IF_ERROR(HostToDevice(ctx, host, holder));
      *device = holder->NumElements() ? holder->flat<int32_t>().data() : nullptr;
      return absl::OkStatus();
    }
    const char* bytes = static_cast<const char*>(host.data());
    const size_t size = host.TotalBytes();
    tensorflow::mutex_lock lock(mu_);
    ++clock_;
    Entry* victim = nullptr;
    for (Entry& e : entries_) {
      if (e.host.size() == size && (size == 0 || std::memcmp(e.host.data(), bytes, size) == 0)) {
        e.last_use = clock_;
        *holder = e.device;
        *device = size ? e.device.flat<int32_t>().data() : nullptr;
        return absl::OkStatus();
      }
      if (victim == nullptr || e.last_use < victim->last_use) victim = &e;
    }
    if (entries_.size() < kEntries) {
      entries_.emplace_back();
      victim = &entries_.back();
    }
    victim->host.assign(bytes, size);
    victim->last_use = clock_;
    const absl::Status copied = HostToDevice(ctx, host, &victim->device);
    if (!copied.ok()) {
      victim->host.clear();
      victim->last_use = 0;
      return copied;
    }
    *holder = victim->device;
    *device = size ? victim->device.flat<int32_t>().data() : nullptr;
    return absl::OkStatus();
  }

 private:
  static constexpr size_t kEntries = 32;
  static bool Enabled() {
    static const bool enabled = [] {
      const char* v = std::getenv("BSATTN_GPU_TABLE_CACHE");
      return v == nullptr || std::string(v) != "0";
    }();
    return enabled;
  }
  struct Entry {
    std::string host;
    tensorflow::Tensor device;
    uint64_t last_use = 0;
  };
  tensorflow::mutex mu_;
  std::deque<Entry> entries_;  // deque: growing keeps the addresses of existing entries
  uint64_t clock_ = 0;
};

inline absl::Status LaunchStatus(int code, const char* op) {
  if (code == 0) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(op, ": ", bsattn_cuda_error_string(code)));
}

}  // namespace bsattn

#endif  // GOOGLE_CUDA

#endif  // BSATTN_OPS_CC_KERNELS_GPU_LAUNCH_H_
