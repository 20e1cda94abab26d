// CamDrop's class activation map J[n, h, w] = sum_c alpha[n, c] * x[n, c, h, w]: float32
// output, the products and sums in float64, so that mathematically equal J (the same
// channel terms in another order) are exactly equal: J's top-k decides the candidates.
//
// Two kernels, both correct for any strides:
// - NCHW-like inputs: dense, aligned x with N*C*H*W % V == 0 (V = 16 / sizeof(T)): a warp
//   takes V positions, its lanes stride over the channels, one 16-byte vector per channel
//   where H*W % V == 0; else (a map of 14 x 14 or 7 x 7 bfloat16 units does not start on
//   16 bytes) the two aligned 16-byte vectors that cover the V units, shifted in registers
//   (common.cuh's `load_unaligned`); then a butterfly sum. A thread per V positions had too
//   few threads for small maps of many channels (plans/camdrop.cu). Otherwise a thread per
//   position, consecutive threads on consecutive (h, w) of a sample, so each step over c
//   is a coalesced row read, c ascending, one element per access;
// - position per warp (channels_last-like inputs, stride(C) < stride(W)): the lanes of a
//   warp stride over the channels of one position (coalesced), then a butterfly sum.
//   Dense, aligned x with C % V == 0: V channels per lane, one 16-byte vector, alpha
//   from shared memory; else one channel per lane.
// The summation order differs from torch.einsum's (a batched GEMM): float64 rounding only.
#include "common.cuh"
#include "launchers.h"

namespace guidedrop {
namespace {

template <typename scalar_t>
using Vec16 = Vec<scalar_t, 16 / sizeof(scalar_t)>;  // one 16-byte load

// `vec`: x dense NCHW, aligned, N*C*H*W % V == 0 (V = 16 / sizeof(T)): a warp takes V
// consecutive positions hw0 ... hw0 + V - 1 of a map (hw0 % V == 0; those past H*W, in
// the last vector of a map whose H*W % V != 0, are computed and not stored), lane l the
// channels c = l, l + 32, ... Channel c's V units start at element e = (n*C + c)*H*W + hw0
// of x: the aligned vector at e - e % V, and where e % V != 0 the one after it (never past
// x's end, a multiple of V), realigned (load_unaligned); where H*W % V == 0, e % V = 0.
template <typename scalar_t>
__global__ void cam_thread_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                  const float* __restrict__ alpha, const int64_t N,
                                  const int64_t C, const int64_t H, const int64_t W,
                                  const bool vec, float* __restrict__ J) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t HW = H * W;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (vec) {
    const int lane = threadIdx.x & 31;
    const int64_t per = (HW + V - 1) / V;  // vectors of positions per map
    const uint64_t total = N * C * HW;
    // a warp per vector of positions (uniform in the warp)
    for (int64_t i = first >> 5; i < N * per; i += stride >> 5) {
      const int64_t n = i / per, hw = (i % per) * V;
      const float* a = alpha + n * C;
      double acc[V] = {};
      const uint64_t e = n * C * HW + hw;
      for (int64_t c = lane; c < C; c += 32) {
        float f[V];
        load_unaligned(x, e + c * HW, total, f);
        const double ac = static_cast<double>(a[c]);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += ac * f[j];
      }
      const int64_t valid = HW - hw < V ? HW - hw : V;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const double v = warp_reduce(acc[j], SumOp());
        if (lane == 0 && j < valid) J[n * HW + hw + j] = static_cast<float>(v);
      }
    }
    return;
  }
  for (int64_t i = first; i < N * HW; i += stride) {
    const int64_t n = i / HW, hw = i % HW;
    const scalar_t* p = x + n * s.n + (hw / W) * s.h + (hw % W) * s.w;
    const float* a = alpha + n * C;
    double acc = 0.0;
    // The fallback: not unrolled, so that the static check (tests/test_static_perf.py)
    // takes the vector loop, the steady state, for the streaming loop.
#pragma unroll 1
    for (int64_t c = 0; c < C; ++c) acc += static_cast<double>(a[c]) * to_float(p[c * s.c]);
    J[i] = static_cast<float>(acc);
  }
}

// `vec`: x dense channels_last, C % V == 0, aligned and C <= kMaxSharedC: a lane takes V
// consecutive channels (one aligned 16-byte vector) of its warp's position, with alpha
// [n, :] in shared memory (staged once per sample and block), so that the loop's global
// loads are x's. A block's 8 warps take 8 consecutive positions of one sample.
constexpr int64_t kMaxSharedC = 12288;  // alpha[n, :] in 48 KiB

template <typename scalar_t>
__global__ void cam_warp_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                const float* __restrict__ alpha, const int64_t N,
                                const int64_t C, const int64_t H, const int64_t W,
                                const bool vec, float* __restrict__ J) {
  constexpr int V = 16 / sizeof(scalar_t);
  extern __shared__ float sa[];  // alpha[n, :] (vec)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t warps = blockDim.x >> 5;
  const int64_t HW = H * W;
  if (vec) {
    const int64_t tiles = (HW + warps - 1) / warps;  // tiles of `warps` positions per map
    int64_t staged = -1;
    for (int64_t b = blockIdx.x; b < N * tiles; b += gridDim.x) {  // uniform in the block
      const int64_t n = b / tiles, hw = (b % tiles) * warps + warp;
      if (n != staged) {
        __syncthreads();  // every warp is done with the previous sample's alpha
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sa[c] = alpha[n * C + c];
        __syncthreads();
        staged = n;
      }
      double acc = 0.0;
      if (hw < HW) {  // uniform within the warp
        const scalar_t* p = x + (n * HW + hw) * C;
        for (int64_t c = lane * V; c < C; c += 32 * V) {
          const Vec16<scalar_t> in = *reinterpret_cast<const Vec16<scalar_t>*>(p + c);
#pragma unroll
          for (int j = 0; j < V; ++j) acc += static_cast<double>(sa[c + j]) * to_float(in.v[j]);
        }
      }
      acc = warp_reduce(acc, SumOp());
      if (lane == 0 && hw < HW) J[n * HW + hw] = static_cast<float>(acc);
    }
    return;
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps + warp; i < N * HW;
       i += static_cast<int64_t>(gridDim.x) * warps) {  // uniform within the warp
    const int64_t n = i / HW, hw = i % HW;
    const scalar_t* p = x + n * s.n + (hw / W) * s.h + (hw % W) * s.w;
    const float* a = alpha + n * C;
    double acc = 0.0;
#pragma unroll 1  // the fallback, not unrolled (see cam_thread_kernel)
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
    constexpr int64_t V = 16 / sizeof(scalar_t);
    if (channel_inner) {
      const bool vec = x.is_contiguous(at::MemoryFormat::ChannelsLast) && C % V == 0 &&
                       C <= kMaxSharedC && aligned16(x);
      const size_t smem = vec ? C * sizeof(float) : 0;
      cam_warp_kernel<scalar_t><<<grid_for(N * H * W, kThreads / 32), kThreads, smem,
                                  current_stream()>>>(x.data_ptr<scalar_t>(), s,
                                                      alpha.data_ptr<float>(), N, C, H, W,
                                                      vec, J.data_ptr<float>());
    } else {
      const bool vec = x.is_contiguous() && (N * C * H * W) % V == 0 && aligned16(x);
      cam_thread_kernel<scalar_t><<<grid_for(vec ? N * ceil_div(H * W, V) * 32 : N * H * W,
                                             kThreads),
                                    kThreads, 0, current_stream()>>>(
          x.data_ptr<scalar_t>(), s, alpha.data_ptr<float>(), N, C, H, W, vec,
          J.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace guidedrop
