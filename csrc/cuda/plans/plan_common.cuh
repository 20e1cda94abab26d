// Shared helpers of the plan kernels (csrc/cuda/plans/*.cu): the layer arithmetic between the
// statistics and the apply kernel, fused into one launch per layer (issue 12).
#pragma once

#include "../common.cuh"

#include <c10/core/ScalarType.h>

#include <cmath>

namespace guidedrop {

// The uniforms u of a layer read from `noise` of any floating dtype and any strides (up to
// 3-D), rounded to float32 in the kernel (SPEC §1: u in the compute dtype), so the caller
// launches no `.to(float32)`. The dtype is a runtime tag, not a template parameter: one
// kernel instantiation serves every noise dtype.
struct Uniforms {
  enum Type : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };
  const void* p;
  int64_t s0, s1, s2;
  int type;

  __device__ __forceinline__ float operator()(int64_t i0, int64_t i1 = 0, int64_t i2 = 0) const {
    const int64_t o = i0 * s0 + i1 * s1 + i2 * s2;
    switch (type) {
      case kDouble: return static_cast<float>(static_cast<const double*>(p)[o]);
      case kHalf: return static_cast<float>(static_cast<const c10::Half*>(p)[o]);
      case kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[o]);
      default: return static_cast<const float*>(p)[o];
    }
  }
};

// noise: float32 / float64 / float16 / bfloat16 (checked by the caller), 1- to 3-D.
inline Uniforms uniforms(const at::TensorBase& noise) {
  Uniforms u{noise.data_ptr(), 0, 0, 0, Uniforms::kFloat};
  const int64_t d = noise.dim();
  u.s0 = d > 0 ? noise.stride(0) : 0;
  u.s1 = d > 1 ? noise.stride(1) : 0;
  u.s2 = d > 2 ? noise.stride(2) : 0;
  switch (noise.scalar_type()) {
    case at::kDouble: u.type = Uniforms::kDouble; break;
    case at::kHalf: u.type = Uniforms::kHalf; break;
    case at::kBFloat16: u.type = Uniforms::kBFloat16; break;
    default: u.type = Uniforms::kFloat; break;
  }
  return u;
}

// Threads per block of a one-block-per-sample plan kernel over `work` items per sample:
// whole warps, at most kThreads (small layers waste no idle warps).
inline int plan_threads(int64_t work) {
  const int64_t warps = std::max<int64_t>(1, ceil_div(work, 32));
  return static_cast<int>(std::min<int64_t>(kThreads, 32 * warps));
}

}  // namespace guidedrop
