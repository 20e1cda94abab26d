// The class activation map J[n, h, w] = sum_c alpha[n, c] * x[n, c, h, w] (float32 out), for
// the cam op (alpha given) and as CamDrop's first plan kernel (plans/camdrop.cu), which
// computes alpha from the classifier's weights on the way: one kernel, cam_kernel, for both
// (as Triton's class_activation._cam_kernel with FROM_W).
//
// Bit for bit the reference (reference.cam, layers.camdrop):
// - alpha = weight[target] averaged over the C_fc / C columns of each channel: each weight
//   rounded to float32 (the reference's .to(float32)), the group summed in float64 and
//   divided by C_fc / C, then rounded (the reference's float64 mean: the same value in any
//   order of summation for the weights of a classifier); the cam op's alpha is float32
//   already, read as a group of one, unchanged;
// - J: float32 * float32 products are exact in float64, and summed in float64 (the
//   reference's einsum on float64), rounded once to float32: mathematically equal J (the
//   same channel terms in another order) are exactly equal, and J's top-k decides the
//   candidates.
// weight (any float dtype and strides) and target (any integer dtype and stride) are read by
// value with a runtime type tag: no conversion launch, one instantiation per x dtype.
#include "common.cuh"
#include "launchers.h"

namespace guidedrop {
namespace {

constexpr int kAlphaChunk = 1024;   // alpha values staged in shared memory per step (4 KiB)
constexpr int kWarpPositions = 4;   // positions per warp when the channels are inner

// target[n] of any integer dtype (an index, never a mask) at any stride. An unsigned 64-bit
// index past INT64_MAX becomes INT64_MAX: out of range all the same. kSample: no tensor,
// target[n] = n (the cam op: "weight" is alpha itself, a row per sample).
struct Targets {
  enum Type : int { kLong, kInt, kShort, kChar, kByte, kUInt16, kUInt32, kUInt64, kSample };
  const void* p;
  int64_t stride;
  int type;
  __device__ __forceinline__ int64_t operator()(int64_t n) const {
    const int64_t o = n * stride;
    switch (type) {
      case kSample: return n;
      case kInt: return static_cast<const int32_t*>(p)[o];
      case kShort: return static_cast<const int16_t*>(p)[o];
      case kChar: return static_cast<const int8_t*>(p)[o];
      case kByte: return static_cast<const uint8_t*>(p)[o];
      case kUInt16: return static_cast<const uint16_t*>(p)[o];
      case kUInt32: return static_cast<const uint32_t*>(p)[o];
      case kUInt64: {
        const uint64_t v = static_cast<const uint64_t*>(p)[o];
        return v > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(v);
      }
      default: return static_cast<const int64_t*>(p)[o];
    }
  }
};

Targets targets(const at::TensorBase& t) {
  Targets out{t.data_ptr(), t.stride(0), Targets::kLong};
  switch (t.scalar_type()) {
    case at::kInt: out.type = Targets::kInt; break;
    case at::kShort: out.type = Targets::kShort; break;
    case at::kChar: out.type = Targets::kChar; break;
    case at::kByte: out.type = Targets::kByte; break;
    case at::kUInt16: out.type = Targets::kUInt16; break;
    case at::kUInt32: out.type = Targets::kUInt32; break;
    case at::kUInt64: out.type = Targets::kUInt64; break;
    default: break;
  }
  return out;
}

// Grid (position tiles, samples). Each block computes alpha[n, :] chunk by chunk into shared memory
// (the blocks of x == 0 also write it out where alpha is not null), then adds the chunk's channels
// to the J of its positions. kChannelInner (channels_last-like x, stride(C) < stride(W)): a warp
// takes kWarpPositions positions, its lanes stride over the channels (coalesced), then a butterfly
// sum; `vec` (x dense channels_last and aligned, C % V == 0, V = 16 / sizeof(T)): V channels a
// lane, one 16-byte load. NCHW `vec` (x dense and aligned, N*C*H*W % V == 0): a warp takes V
// positions, one 16-byte vector a channel (realigned where the map does not start on 16 bytes:
// common.cuh load_unaligned), its lanes stride over the channels, then a butterfly sum. Not a
// thread per V positions walking every channel: a (128, 1024, 14, 14) x had 25 such threads a
// sample, 3,200 in all, each looping over 1,024 channels (on an H200, CamDrop took 0.74 ms there
// against DropBlock's 0.33). Else (NCHW not dense) a thread takes one position and walks the
// channels, c ascending (coalesced across threads). weight(k, j): weight[k, j] rounded to float32
// (common.cuh's strided reader of any float dtype).
template <typename scalar_t, bool kChannelInner>
__global__ void cam_kernel(const scalar_t* __restrict__ x, const Strides4 s, const int64_t N,
                           const int64_t C, const int64_t H, const int64_t W,
                           const Uniforms weight, const int64_t K, const int64_t G,
                           const Targets target, const bool vec, float* __restrict__ alpha,
                           float* __restrict__ J) {
  constexpr int V = 16 / sizeof(scalar_t);
  // positions per warp (kChannelInner, NCHW vec) or thread (the other NCHW: 1; the
  // accumulators past it unused)
  constexpr int P = kChannelInner ? kWarpPositions : V;
  __shared__ float a[kAlphaChunk];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t HW = H * W;
  // lanes over the channels, a butterfly sum at the end (uniform in the block)
  const bool per_warp = kChannelInner || vec;
  // the first position: the warp's, or the thread's
  const int64_t pos0 = per_warp ? (static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) +
                                   warp) * P
                                : static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int np = per_warp ? P : 1;  // positions of this warp / thread
  int64_t poff[P];  // their offsets in a map (strided paths): divided once, not per chunk
#pragma unroll
  for (int j = 0; j < P; ++j) {
    const int64_t pos = pos0 + j;
    poff[j] = j < np && pos < HW ? (pos / W) * s.h + (pos % W) * s.w : 0;
  }
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // uniform in the block
    int64_t y = target(n);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      CUDA_KERNEL_ASSERT_MSG(y >= 0 && y < K,
                             "guidedrop camdrop: target must hold class indices in [0, K)");
    }
    y = y < 0 ? 0 : (y >= K ? K - 1 : y);  // after a failed assertion: no out-of-bounds read
    double acc[P] = {};
    const scalar_t* xn = x + n * s.n;
    for (int64_t c0 = 0; c0 < C; c0 += kAlphaChunk) {
      const int cn = static_cast<int>(std::min<int64_t>(kAlphaChunk, C - c0));
      __syncthreads();  // the previous chunk of `a` is consumed
      for (int i = threadIdx.x; i < cn; i += blockDim.x) {
        const int64_t col = (c0 + i) * G;
        double sum = 0.0;
        // not unrolled: x's loop below is the kernel's streaming loop (the static check)
#pragma unroll 1
        for (int64_t t = 0; t < G; ++t) sum += static_cast<double>(weight(y, col + t));
        const float v = static_cast<float>(sum / static_cast<double>(G));
        a[i] = v;
        if (blockIdx.x == 0 && alpha != nullptr) alpha[n * C + c0 + i] = v;
      }
      __syncthreads();
      if (pos0 >= HW) continue;  // (after the barriers) uniform in the warp when per_warp
      if (!kChannelInner && vec) {
        const uint64_t e = (n * C + c0) * HW + pos0;
        for (int i = lane; i < cn; i += 32) {
          float f[V];
          load_unaligned(x, e + i * HW, N * C * HW, f);
          const double ai = static_cast<double>(a[i]);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += ai * f[j];
        }
        continue;
      }
#pragma unroll
      for (int j = 0; j < P; ++j) {  // a constant bound: acc stays in registers
        const int64_t pos = pos0 + j;
        if (j >= np || pos >= HW) break;
        const scalar_t* p = xn + poff[j] + c0 * s.c;
        if (kChannelInner && vec) {  // s.c = 1, every vector aligned (C % V == 0)
          for (int i = lane * V; i < cn; i += 32 * V) {
            const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(p + i);
            float f[V];
            unpack(in, f);
#pragma unroll
            for (int k = 0; k < V; ++k) acc[j] += static_cast<double>(a[i + k]) * f[k];
          }
          continue;
        }
        // the fallbacks, not unrolled, so that the static check (tests/test_static_perf.py)
        // takes the vector loops, the steady state, for the streaming loop
#pragma unroll 1
        for (int i = kChannelInner ? lane : 0; i < cn; i += kChannelInner ? 32 : 1)
          acc[j] += static_cast<double>(a[i]) * static_cast<double>(to_float(p[i * s.c]));
      }
    }
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (j >= np || pos0 + j >= HW) break;  // uniform in the warp when per_warp
      const double v = per_warp ? warp_reduce(acc[j], SumOp()) : acc[j];
      if (!per_warp || lane == 0) J[n * HW + pos0 + j] = static_cast<float>(v);
    }
  }
}

// weight: (K, G * C) of any float dtype, read as weight(target[n], c * G + t); alpha: null
// (not written) or (N, C) float32 out.
void launch_cam_kernel(const at::TensorBase& x, const Uniforms& wt, int64_t K, int64_t G,
                       const Targets& tg, float* alpha, const at::TensorBase& J) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (N * H * W == 0) return;  // C = 0: J = 0
  const Strides4 s = strides4(x);
  const bool channel_inner = C > 1 && x.stride(1) < x.stride(3);
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::cam", [&] {
    constexpr int64_t V = 16 / sizeof(scalar_t);
    const bool vec = aligned16(x) && (channel_inner
        ? x.is_contiguous(at::MemoryFormat::ChannelsLast) && C % V == 0
        : x.is_contiguous() && (N * C * H * W) % V == 0);
    const int64_t per_block = channel_inner ? (kThreads / 32) * kWarpPositions
                                            : (vec ? (kThreads / 32) * V : kThreads);
    const dim3 grid(static_cast<unsigned>(ceil_div(H * W, per_block)),
                    static_cast<unsigned>(std::min<int64_t>(N, 65535)));
    auto kernel = channel_inner ? cam_kernel<scalar_t, true> : cam_kernel<scalar_t, false>;
    kernel<<<grid, kThreads, 0, current_stream()>>>(x.data_ptr<scalar_t>(), s, N, C, H, W, wt,
                                                     K, G, tg, vec, alpha, J.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void launch_cam(const at::TensorBase& x, const at::TensorBase& alpha, const at::TensorBase& J) {
  launch_cam_kernel(x, uniforms(alpha), x.size(0), 1, Targets{nullptr, 0, Targets::kSample},
                    nullptr, J);
}

void launch_camdrop_cam(const at::TensorBase& x, const at::TensorBase& weight,
                        const at::TensorBase& target, const at::TensorBase& alpha,
                        const at::TensorBase& J) {
  const int64_t C = x.size(1);
  if (C == 0) return;
  launch_cam_kernel(x, uniforms(weight), weight.size(0), weight.size(1) / C, targets(target),
                    alpha.data_ptr<float>(), J);
}

}  // namespace guidedrop
