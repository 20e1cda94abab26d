// Per-channel max |x| and mean (SelectScale family, FocusedDropout) and the per-channel
// apply t * w[n, c].
//
// channel_stats has two kernels, both correct for any strides:
// - map per warp (NCHW-like inputs: the map's units are close in memory): the 32 lanes of
//   a warp stride over one (n, c) map, then a butterfly reduction;
// - channel per lane (channels_last-like inputs, stride(C) < stride(W)): a block of 32 x 8
//   threads takes 32 consecutive channels of one sample (coalesced across lanes), the 8
//   rows of threads split the H*W positions, and shared memory combines them in a fixed
//   order.
// Sums are float64, so that mathematically equal means (the same values in another order)
// are exactly equal (FocusedDropout's argmax, SPEC §1); mean = float(sum / (H*W)).
// Where a map's units are evenly spaced (stride(H) = W * stride(W): contiguous and
// channels_last inputs) unit i sits at i * stride(W): no division per element.
#include "common.cuh"
#include "launchers.h"

namespace guidedrop {
namespace {

// Whether to read x: FocusedDropout's participation (SPEC §5), a device flag so that a
// compiled or captured step that does not participate reads nothing here.
__device__ __forceinline__ bool read_x(const bool* applied) {
  return applied == nullptr || *applied;
}

template <typename scalar_t>
__global__ void channel_stats_warp_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                          const int64_t N, const int64_t C, const int64_t H,
                                          const int64_t W, const bool* __restrict__ applied,
                                          float* __restrict__ amax,
                                          float* __restrict__ mean) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x >> 5;
  const int64_t maps = N * C, HW = H * W;
  const int64_t L = read_x(applied) ? HW : 0;  // positions read: none when not applied
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); m < maps;
       m += static_cast<int64_t>(gridDim.x) * warps) {  // uniform within the warp
    const int64_t n = m / C, c = m % C;
    const scalar_t* base = x + n * s.n + c * s.c;
    float mx = 0.f;
    double sum = 0.0;
    auto add = [&](float v) {
      mx = max_nan(mx, fabsf(v));
      sum += static_cast<double>(v);
    };
    if (s.h == W * s.w) {
      for (int64_t i = lane; i < L; i += 32) add(to_float(base[i * s.w]));
    } else {  // other strides: not unrolled, it is not the streaming path
#pragma unroll 1
      for (int64_t i = lane; i < L; i += 32) add(to_float(base[(i / W) * s.h + (i % W) * s.w]));
    }
    mx = warp_reduce(mx, MaxOp());
    sum = warp_reduce(sum, SumOp());
    if (lane == 0) {
      amax[m] = mx;
      mean[m] = static_cast<float>(sum / static_cast<double>(HW));
    }
  }
}

constexpr int kLanesC = 32;  // channels per block (threadIdx.x)
constexpr int kRowsHW = 8;   // position slices per block (threadIdx.y)

template <typename scalar_t>
__global__ void channel_stats_lane_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                          const int64_t N, const int64_t C, const int64_t H,
                                          const int64_t W, const bool* __restrict__ applied,
                                          float* __restrict__ amax,
                                          float* __restrict__ mean) {
  __shared__ float smax[kRowsHW][kLanesC];
  __shared__ double ssum[kRowsHW][kLanesC];
  const int64_t tiles = (C + kLanesC - 1) / kLanesC;
  const int64_t HW = H * W;
  const int64_t L = read_x(applied) ? HW : 0;  // positions read: none when not applied
  for (int64_t b = blockIdx.x; b < N * tiles; b += gridDim.x) {  // uniform in the block
    const int64_t n = b / tiles;
    const int64_t c = (b % tiles) * kLanesC + threadIdx.x;
    float mx = 0.f;
    double sum = 0.0;
    if (c < C) {
      const scalar_t* base = x + n * s.n + c * s.c;
      auto add = [&](float v) {
        mx = max_nan(mx, fabsf(v));
        sum += static_cast<double>(v);
      };
      if (s.h == W * s.w) {
        for (int64_t i = threadIdx.y; i < L; i += kRowsHW) add(to_float(base[i * s.w]));
      } else {  // other strides: not unrolled, it is not the streaming path
#pragma unroll 1
        for (int64_t i = threadIdx.y; i < L; i += kRowsHW)
          add(to_float(base[(i / W) * s.h + (i % W) * s.w]));
      }
    }
    smax[threadIdx.y][threadIdx.x] = mx;
    ssum[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      for (int r = 1; r < kRowsHW; ++r) {
        mx = max_nan(mx, smax[r][threadIdx.x]);
        sum += ssum[r][threadIdx.x];
      }
      amax[n * C + c] = mx;
      mean[n * C + c] = static_cast<float>(sum / static_cast<double>(HW));
    }
    __syncthreads();  // before the next iteration overwrites smax / ssum
  }
}

// w[n, c]: one per line in NCHW; consecutive in NHWC (a pixel's channels).
struct ChannelW {
  const float* w;
  int64_t C;
  struct Row {
    const float* w;  // &w[n, c] of the segment's first element
  };
  template <bool CL>
  __device__ __forceinline__ Row row(const Coord4& p, int) const {
    return {w + p.n * C + p.c};
  }
  template <bool CL>
  __device__ __forceinline__ float at(const Row& r, int j) const {
    return r.w[CL ? j : 0];
  }
};

}  // namespace

void launch_channel_stats(const at::TensorBase& x, const at::TensorBase& applied,
                          const at::TensorBase& amax, const at::TensorBase& mean) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (N * C == 0 || H * W == 0) return;
  const Strides4 s = strides4(x);
  const bool channel_inner = C > 1 && x.stride(1) < x.stride(3);
  const bool* on = applied.defined() ? applied.data_ptr<bool>() : nullptr;
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::channel_stats", [&] {
    if (channel_inner) {
      const dim3 block(kLanesC, kRowsHW);
      channel_stats_lane_kernel<scalar_t>
          <<<grid_for(N * ceil_div(C, kLanesC), 1), block, 0, current_stream()>>>(
              x.data_ptr<scalar_t>(), s, N, C, H, W, on, amax.data_ptr<float>(),
              mean.data_ptr<float>());
    } else {
      constexpr int warps = kThreads / 32;
      channel_stats_warp_kernel<scalar_t>
          <<<grid_for(N * C, warps), kThreads, 0, current_stream()>>>(
              x.data_ptr<scalar_t>(), s, N, C, H, W, on, amax.data_ptr<float>(),
              mean.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_apply_channel(const at::TensorBase& t, const at::TensorBase& w,
                          const at::TensorBase& out) {
  const ChannelW wfn{w.data_ptr<float>(), t.size(1)};
  GD_DISPATCH_FLOAT_TYPES(t.scalar_type(), "guidedrop::apply_channel",
                          [&] { launch_apply<scalar_t>(t, out, wfn); });
}

}  // namespace guidedrop
