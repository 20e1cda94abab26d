// Per-channel max |x| and mean (SelectScale family, FocusedDropout) and the per-channel
// apply t * w[n, c] (flat 16-byte chunks where x is dense and aligned, maps of at least V
// elements in NCHW, C a multiple of V in channels_last; else common.cuh's apply_kernel).
//
// channel_stats has two kernels, both correct for any strides:
// - map per warp (NCHW-like inputs: the map's units are close in memory): the 32 lanes of
//   a warp stride over one (n, c) map, then a butterfly reduction. A contiguous map is
//   read as scalars up to its first 16-byte boundary, 16-byte vectors, and a scalar tail;
// - channels per lane (channels_last-like inputs, stride(C) < stride(W)): a block of
//   bx x (256 / bx) threads takes bx consecutive channel groups of one sample (coalesced
//   across lanes), the rows of threads split the H*W positions, and shared memory combines
//   them in a fixed order. A group is V = 16 / sizeof(T) channels read as one 16-byte
//   vector per position when the channels are dense and every vector aligned, else one
//   channel; bx is the groups' count rounded up to a power of 2, at most 32, so that few
//   channels (C = 64 in bfloat16: 8 groups) do not leave most lanes idle.
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

// max |v| and the float64 sum, folded one element at a time.
struct Stats {
  float mx = 0.f;
  double sum = 0.0;
  __device__ __forceinline__ void add(float v) {
    mx = max_nan(mx, fabsf(v));
    sum += static_cast<double>(v);
  }
};

template <typename scalar_t>
using Vec16 = Vec<scalar_t, 16 / sizeof(scalar_t)>;  // one 16-byte load

template <typename scalar_t>
__global__ void channel_stats_warp_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                          const int64_t N, const int64_t C, const int64_t H,
                                          const int64_t W, const bool* __restrict__ applied,
                                          float* __restrict__ amax,
                                          float* __restrict__ mean) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x >> 5;
  const int64_t maps = N * C, HW = H * W;
  const int64_t L = read_x(applied) ? HW : 0;  // positions read: none when not applied
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); m < maps;
       m += static_cast<int64_t>(gridDim.x) * warps) {  // uniform within the warp
    const int64_t n = m / C, c = m % C;
    const scalar_t* base = x + n * s.n + c * s.c;
    Stats st;
    if (s.w == 1 && s.h == W) {
      // The map is one run: scalars up to the first 16-byte boundary (a map's start is
      // only element-aligned, e.g. 7 x 7 maps), 16-byte vectors, then the last < V.
      const int64_t head =
          min(L, static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(base) % 16) % 16 /
                                      sizeof(scalar_t)));
      if (lane < head) st.add(to_float(base[lane]));
      const Vec16<scalar_t>* body = reinterpret_cast<const Vec16<scalar_t>*>(base + head);
      const int64_t nv = (L - head) / V;
      // One vector per iteration (unroll 1), as in apply_kernel: the body is the steady
      // state, unrolled copies and their remainder would only grow the code.
#pragma unroll 1
      for (int64_t v = lane; v < nv; v += 32) {
        const Vec16<scalar_t> in = body[v];
#pragma unroll
        for (int j = 0; j < V; ++j) st.add(to_float(in.v[j]));
      }
      const int64_t t = head + nv * V + lane;  // the tail: fewer than V < 32 elements
      if (t < L) st.add(to_float(base[t]));
    } else if (s.h == W * s.w) {  // not unrolled either: not the streaming path
#pragma unroll 1
      for (int64_t i = lane; i < L; i += 32) st.add(to_float(base[i * s.w]));
    } else {  // other strides
#pragma unroll 1
      for (int64_t i = lane; i < L; i += 32)
        st.add(to_float(base[(i / W) * s.h + (i % W) * s.w]));
    }
    const float mx = warp_reduce(st.mx, MaxOp());
    const double sum = warp_reduce(st.sum, SumOp());
    if (lane == 0) {
      amax[m] = mx;
      mean[m] = static_cast<float>(sum / static_cast<double>(HW));
    }
  }
}

// Threads of a channel_stats_lane_kernel block: 512, not 256. A block takes a sample's
// channels (all of them at C <= 32 V), so at N = 128 there was one block of 8 warps an SM,
// each thread with one 16-byte load in flight: far from the memory's bandwidth (1024
// threads, 64 registers each, spilled).
constexpr int kLaneThreads = 512;

// Channels per thread in channel_stats_lane_kernel: V = 16 / sizeof(scalar_t) (one 16-byte
// load per position) when the channels are dense and every vector is aligned (`vec`), else 1.
template <typename scalar_t>
__global__ void __launch_bounds__(kLaneThreads, 1)
    channel_stats_lane_kernel(const scalar_t* __restrict__ x, const Strides4 s, const int64_t N,
                              const int64_t C, const int64_t H, const int64_t W, const bool vec,
                              const bool* __restrict__ applied, float* __restrict__ amax,
                              float* __restrict__ mean) {
  constexpr int V = 16 / sizeof(scalar_t);
  __shared__ float smax[kLaneThreads];
  __shared__ double ssum[kLaneThreads];
  const int G = vec ? V : 1;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int tid = ty * bx + tx;
  const int64_t span = static_cast<int64_t>(bx) * G;  // channels per block
  const int64_t tiles = (C + span - 1) / span;
  const int64_t HW = H * W;
  const int64_t L = read_x(applied) ? HW : 0;  // positions read: none when not applied
  for (int64_t b = blockIdx.x; b < N * tiles; b += gridDim.x) {  // uniform in the block
    const int64_t n = b / tiles;
    const int64_t c = (b % tiles) * span + static_cast<int64_t>(tx) * G;  // first channel
    Stats st[V];
    if (c < C) {  // with vec, C % V == 0: the thread's V channels all exist
      const scalar_t* base = x + n * s.n + c * s.c;
      if (vec) {
#pragma unroll 1
        for (int64_t i = ty; i < L; i += by) {
          const Vec16<scalar_t> in = *reinterpret_cast<const Vec16<scalar_t>*>(base + i * s.w);
#pragma unroll
          for (int j = 0; j < V; ++j) st[j].add(to_float(in.v[j]));
        }
      } else if (s.h == W * s.w) {  // scalar paths: not unrolled, not the streaming path
#pragma unroll 1
        for (int64_t i = ty; i < L; i += by) st[0].add(to_float(base[i * s.w]));
      } else {  // other strides
#pragma unroll 1
        for (int64_t i = ty; i < L; i += by)
          st[0].add(to_float(base[(i / W) * s.h + (i % W) * s.w]));
      }
    }
    // Rows of threads combined in a fixed order, one of the thread's channels at a time.
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < G) {  // uniform in the block
        smax[tid] = st[j].mx;
        ssum[tid] = st[j].sum;
        __syncthreads();
        if (ty == 0 && c + j < C) {
          float mx = st[j].mx;
          double sum = st[j].sum;
          for (int r = 1; r < by; ++r) {
            mx = max_nan(mx, smax[r * bx + tx]);
            sum += ssum[r * bx + tx];
          }
          amax[n * C + c + j] = mx;
          mean[n * C + c + j] = static_cast<float>(sum / static_cast<double>(HW));
        }
        __syncthreads();  // before smax / ssum are overwritten
      }
    }
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

// apply_channel on dense, 16-byte aligned x: flat 16-byte chunks of V = 16 / sizeof(T)
// elements, whose weights come from a division of the flat index by a per-launch magic number
// (FastDiv) per chunk, not from the generic apply_kernel's line segments (whose two line
// states per chunk cost 15-26 SASS per element where a line is not a multiple of V).
//
// NCHW, maps of HW >= V elements: a chunk lies in map m0 or in m0 and m0 + 1. The 32
// consecutive chunks of a warp then span at most 32 maps (HW >= V), so each lane loads
// one weight, w[mb + lane] (mb: the warp's first map), and the chunk's two weights come
// from shuffles: one load of w per chunk, not one per element (float32: one 4-byte load
// per 16 bytes of x). The loop's trip count is uniform across the warp (the shuffles need
// every lane); lanes past the end only skip the load and store of x.
template <typename scalar_t>
__global__ void apply_channel_maps_kernel(const scalar_t* __restrict__ t,
                                          scalar_t* __restrict__ out,
                                          const float* __restrict__ w, const uint32_t numel,
                                          const uint32_t maps, const FastDiv hw) {
  constexpr uint32_t V = 16 / sizeof(scalar_t);
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const uint32_t step = (gridDim.x * blockDim.x) & ~31u;  // chunks per grid iteration
  const uint32_t full = numel / V;
  // numel < 2^31 and the grid is at most 2^26 threads: no index below wraps.
#pragma unroll 1
  for (uint32_t base = warp * 32; base < full; base += step) {
    const uint32_t mb = div_of(base * V, hw);
    const float wl = w[min(mb + lane, maps - 1)];
    const uint32_t chunk = base + lane, i0 = chunk * V;
    const uint32_t m0 = div_of(i0, hw);
    const uint32_t k0 = (m0 + 1) * hw.d - i0;  // the chunk's elements in map m0
    // & 31: lanes past the end (and the unused second weight) ask for any lane
    const float a = __shfl_sync(kFullMask, wl, (m0 - mb) & 31);
    const float b = __shfl_sync(kFullMask, wl, (m0 + 1 - mb) & 31);
    if (chunk < full) {
      const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i0);
      float tf[V];
      unpack(in, tf);
      Vec<scalar_t, V> res;
#pragma unroll
      for (uint32_t j = 0; j < V; ++j)
        res.v[j] = static_cast<scalar_t>(tf[j] * (j < k0 ? a : b));
      *reinterpret_cast<Vec<scalar_t, V>*>(out + i0) = res;
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {  // the last numel % V elements
#pragma unroll 1
    for (uint32_t i = full * V; i < numel; ++i)
      out[i] = static_cast<scalar_t>(to_float(t[i]) * w[div_of(i, hw)]);
  }
}

// NHWC with C % V == 0 (and w 16-byte aligned): a chunk is V channels of one pixel, their
// weights V consecutive floats of w, loaded as 16-byte vectors; the pixel and sample from
// two fast divisions per chunk.
template <typename scalar_t>
__global__ void apply_channel_pixels_kernel(const scalar_t* __restrict__ t,
                                            scalar_t* __restrict__ out,
                                            const float* __restrict__ w, const uint32_t numel,
                                            const FastDiv c, const FastDiv hw) {
  constexpr uint32_t V = 16 / sizeof(scalar_t);
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t stride = gridDim.x * blockDim.x;
  const uint32_t full = numel / V;  // numel % V == 0: C % V == 0
#pragma unroll 1
  for (uint32_t chunk = tid; chunk < full; chunk += stride) {
    const uint32_t i0 = chunk * V;
    const uint32_t pixel = div_of(i0, c), n = div_of(pixel, hw);
    const uint32_t wi = n * c.d + (i0 - pixel * c.d);  // w[n, c0]: a multiple of V
    const Vec<float, V> wv = *reinterpret_cast<const Vec<float, V>*>(w + wi);
    const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i0);
    float tf[V];
    unpack(in, tf);
    Vec<scalar_t, V> res;
#pragma unroll
    for (uint32_t j = 0; j < V; ++j) res.v[j] = static_cast<scalar_t>(tf[j] * wv.v[j]);
    *reinterpret_cast<Vec<scalar_t, V>*>(out + i0) = res;
  }
}

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
      // 16-byte vectors of V channels: dense channels, C, the pixel and sample strides
      // multiples of V and x aligned, so that every vector is aligned.
      constexpr int64_t V = 16 / sizeof(scalar_t);
      const bool vec = s.c == 1 && C % V == 0 && s.h == W * s.w && s.w % V == 0 &&
                       s.n % V == 0 && aligned16(x);
      // Threads along the channels: as many as the channel groups (a power of 2, <= 32),
      // the rest of the block's kLaneThreads split the positions.
      const int64_t groups = ceil_div(C, vec ? V : 1);
      int bx = 1;
      while (bx < 32 && bx < groups) bx *= 2;
      const dim3 block(bx, kLaneThreads / bx);
      channel_stats_lane_kernel<scalar_t>
          <<<grid_for(N * ceil_div(groups, bx), 1), block, 0, current_stream()>>>(
              x.data_ptr<scalar_t>(), s, N, C, H, W, vec, on, amax.data_ptr<float>(),
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
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3), per = C * HW;
  const bool cl = !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool dense = dense_in_order(t, cl) && dense_in_order(out, cl) && aligned16(t) &&
                     aligned16(out);
  GD_DISPATCH_FLOAT_TYPES(t.scalar_type(), "guidedrop::apply_channel", [&] {
    constexpr int64_t V = 16 / sizeof(scalar_t);
    const int64_t step = flat_samples_per_launch(N, per, V);
    const bool maps = !cl && HW >= V, pixels = cl && C % V == 0 && aligned16(w);
    if (t.numel() == 0) return;
    if (!dense || step == 0 || !(maps || pixels)) {
      // misaligned or strided x, channels_last with C % V != 0, NCHW maps under V elements
      launch_apply<scalar_t>(t, out, ChannelW{w.data_ptr<float>(), C});
      return;
    }
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += step) {
      const int64_t n = std::min(step, N - n0), numel = n * per;
      const unsigned grid = grid_for(ceil_div(numel, V), kThreads);
      if (maps)
        apply_channel_maps_kernel<scalar_t><<<grid, kThreads, 0, current_stream()>>>(
            tp + n0 * per, op + n0 * per, wp + n0 * C, static_cast<uint32_t>(numel),
            static_cast<uint32_t>(n * C), fast_div(HW));
      else
        apply_channel_pixels_kernel<scalar_t><<<grid, kThreads, 0, current_stream()>>>(
            tp + n0 * per, op + n0 * per, wp + n0 * C, static_cast<uint32_t>(numel),
            fast_div(C), fast_div(HW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace guidedrop
