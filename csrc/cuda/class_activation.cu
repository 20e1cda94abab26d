// CamDrop's class activation map J[n, h, w] = sum_c alpha[n, c] * x[n, c, h, w]: float32
// output, the products and sums in float64, so that mathematically equal J (the same
// channel terms in another order) are exactly equal: J's top-k decides the candidates.
//
// Two kernels, both correct for any strides:
// - position per thread (NCHW-like inputs): consecutive threads take consecutive (h, w)
//   of a sample, so each step over c is a coalesced row read; c ascending;
// - position per warp (channels_last-like inputs, stride(C) < stride(W)): the lanes of a
//   warp stride over the channels of one position (coalesced), then a butterfly sum.
// The summation order differs from torch.einsum's (a batched GEMM): float64 rounding only.
#include "common.cuh"
#include "launchers.h"

namespace guidedrop {
namespace {

template <typename scalar_t>
__global__ void cam_thread_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                  const float* __restrict__ alpha, const int64_t N,
                                  const int64_t C, const int64_t H, const int64_t W,
                                  float* __restrict__ J) {
  const int64_t HW = H * W, total = N * HW;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / HW, hw = i % HW;
    const scalar_t* p = x + n * s.n + (hw / W) * s.h + (hw % W) * s.w;
    const float* a = alpha + n * C;
    double acc = 0.0;
    for (int64_t c = 0; c < C; ++c) acc += static_cast<double>(a[c]) * to_float(p[c * s.c]);
    J[i] = static_cast<float>(acc);
  }
}

template <typename scalar_t>
__global__ void cam_warp_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                const float* __restrict__ alpha, const int64_t N,
                                const int64_t C, const int64_t H, const int64_t W,
                                float* __restrict__ J) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x >> 5;
  const int64_t HW = H * W, total = N * HW;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); i < total;
       i += static_cast<int64_t>(gridDim.x) * warps) {  // uniform within the warp
    const int64_t n = i / HW, hw = i % HW;
    const scalar_t* p = x + n * s.n + (hw / W) * s.h + (hw % W) * s.w;
    const float* a = alpha + n * C;
    double acc = 0.0;
    for (int64_t c = lane; c < C; c += 32) acc += static_cast<double>(a[c]) * to_float(p[c * s.c]);
    acc = warp_reduce(acc, SumOp());
    if (lane == 0) J[i] = static_cast<float>(acc);
  }
}

}  // namespace

void launch_cam(const at::TensorBase& x, const at::TensorBase& alpha, const at::TensorBase& J) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (N * H * W == 0) return;
  const Strides4 s = strides4(x);
  const bool channel_inner = C > 1 && x.stride(1) < x.stride(3);
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::cam", [&] {
    if (channel_inner) {
      cam_warp_kernel<scalar_t><<<grid_for(N * H * W, kThreads / 32), kThreads, 0,
                                  current_stream()>>>(x.data_ptr<scalar_t>(), s,
                                                      alpha.data_ptr<float>(), N, C, H, W,
                                                      J.data_ptr<float>());
    } else {
      cam_thread_kernel<scalar_t><<<grid_for(N * H * W, kThreads), kThreads, 0,
                                    current_stream()>>>(x.data_ptr<scalar_t>(), s,
                                                        alpha.data_ptr<float>(), N, C, H, W,
                                                        J.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace guidedrop
