// Shared device helpers of the guidedrop CUDA kernels.
//
// - GD_DISPATCH_FLOAT_TYPES: float / half / bfloat16 (float64 is reference-only, and the
//   C++ checks refuse it before any launch, so it is not instantiated: less compile time).
// - Strides4 / off4: a strided 4-D accessor by logical (n, c, h, w), so contiguous,
//   channels_last and sliced inputs all work with the same kernel.
// - apply_kernel: the one elementwise "out = t * w(n, c, h, w)" kernel of every layer,
//   walking the output in its memory order (NCHW or NHWC), with 16-byte vector loads and
//   stores when t and out are dense in that order and aligned.
// - float_key / key_float: the order-preserving uint32 key of a float32 (torch.topk's).
// - block_select_kth_largest: exact k-th largest of a block's keys by 8-bit radix select.
// - warp / block reductions with a fixed order (deterministic), NaN-propagating min/max.
//
// Arithmetic mirrors python/guidedrop/reference.py: statistics and the multiplier w in
// float32, then float(t) * w rounded once to t's dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace guidedrop {

#define GD_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `work` items with `threads` threads per block. The
// cap keeps grid.x far below its limit; the loops cover whatever the grid does not.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = ceil_div(std::max<int64_t>(work, 1), threads);
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t(1) << 18));
}

inline bool aligned16(const at::TensorBase& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// ------------------------------------------------------------------------ strided access

struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides4(const at::TensorBase& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Coord4 {
  int64_t n, c, h, w;
};

__device__ __forceinline__ int64_t off4(const Strides4& s, int64_t n, int64_t c, int64_t h,
                                        int64_t w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

__device__ __forceinline__ int64_t off4(const Strides4& s, const Coord4& p) {
  return off4(s, p.n, p.c, p.h, p.w);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// ------------------------------------------------------------------------ apply kernel

// Geometry of "out = t * w(n, c, h, w)". The flat index i walks out's memory order:
// NCHW (cl = false) or NHWC (cl = true). When vec is set, t and out are both dense in
// that order and 16-byte aligned, so the element at flat index i sits at offset i in
// both; otherwise every offset comes from the strides.
struct ApplyGeom {
  int64_t N, C, H, W, numel;
  Strides4 t, o;
  bool cl, vec;
};

inline bool dense_in_order(const at::TensorBase& t, bool cl) {
  return cl ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous();
}

// out: allocated by the caller with at::empty_like(t) (t's memory format when t is dense,
// else the suggested one), exactly like the reference's torch.empty_like.
inline ApplyGeom make_apply_geom(const at::TensorBase& t, const at::TensorBase& out) {
  ApplyGeom g;
  g.N = t.size(0);
  g.C = t.size(1);
  g.H = t.size(2);
  g.W = t.size(3);
  g.numel = t.numel();
  g.t = strides4(t);
  g.o = strides4(out);
  g.cl = !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  g.vec = dense_in_order(t, g.cl) && dense_in_order(out, g.cl) && aligned16(t) &&
          aligned16(out);
  return g;
}

__device__ __forceinline__ Coord4 decompose(int64_t i, const ApplyGeom& g) {
  Coord4 p;
  if (!g.cl) {
    p.w = i % g.W;
    i /= g.W;
    p.h = i % g.H;
    i /= g.H;
    p.c = i % g.C;
    p.n = i / g.C;
  } else {
    p.c = i % g.C;
    i /= g.C;
    p.w = i % g.W;
    i /= g.W;
    p.h = i % g.H;
    p.n = i / g.H;
  }
  return p;
}

// The coordinates of flat index i + 1 from those of i (no division).
__device__ __forceinline__ void advance(Coord4& p, const ApplyGeom& g) {
  if (!g.cl) {
    if (++p.w == g.W) {
      p.w = 0;
      if (++p.h == g.H) {
        p.h = 0;
        if (++p.c == g.C) {
          p.c = 0;
          ++p.n;
        }
      }
    }
  } else {
    if (++p.c == g.C) {
      p.c = 0;
      if (++p.w == g.W) {
        p.w = 0;
        if (++p.h == g.H) {
          p.h = 0;
          ++p.n;
        }
      }
    }
  }
}

template <typename T, int V>
struct alignas(16) Vec {
  T v[V];
};

// Each thread handles chunks of V = 16 / sizeof(scalar_t) consecutive elements (in out's
// memory order): one division-based decomposition per chunk, then carries. WFn is a
// functor `float operator()(const Coord4&) const` returning the float32 multiplier.
template <typename scalar_t, typename WFn>
__global__ void apply_kernel(const scalar_t* __restrict__ t, scalar_t* __restrict__ out,
                             const ApplyGeom g, const WFn wfn) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t chunks = (g.numel + V - 1) / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       chunk < chunks; chunk += stride) {
    const int64_t i0 = chunk * V;
    Coord4 p = decompose(i0, g);
    if (g.vec && i0 + V <= g.numel) {
      const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i0);
      Vec<scalar_t, V> res;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        res.v[j] = static_cast<scalar_t>(to_float(in.v[j]) * wfn(p));
        advance(p, g);
      }
      *reinterpret_cast<Vec<scalar_t, V>*>(out + i0) = res;
    } else {
      for (int j = 0; j < V && i0 + j < g.numel; ++j) {
        out[off4(g.o, p)] = static_cast<scalar_t>(to_float(t[off4(g.t, p)]) * wfn(p));
        advance(p, g);
      }
    }
  }
}

template <typename scalar_t, typename WFn>
void launch_apply(const at::TensorBase& t, const at::TensorBase& out, const WFn& wfn) {
  const ApplyGeom g = make_apply_geom(t, out);
  if (g.numel == 0) return;
  constexpr int V = 16 / sizeof(scalar_t);
  apply_kernel<scalar_t, WFn><<<grid_for(ceil_div(g.numel, V), kThreads), kThreads, 0,
                                current_stream()>>>(
      t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, wfn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------ reductions

// NaN-propagating max / min (torch.amax / amin semantics).
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ float min_nan(float a, float b) { return (a != a || a < b) ? a : b; }

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return max_nan(a, b); }
};
struct MinOp {
  __device__ float operator()(float a, float b) const { return min_nan(a, b); }
};

// Butterfly reduction over the 32 lanes of a warp (all lanes must call it); every lane
// gets the result. Fixed order, so deterministic.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// Reduction over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread of
// the block must call it and gets the result. scratch: 32 elements of shared memory.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T r = scratch[0];
    for (int i = 1; i < warps; ++i) r = op(r, scratch[i]);
    scratch[0] = r;
  }
  __syncthreads();
  return scratch[0];
}

// ------------------------------------------------------------------------ selection

// Order-preserving key of a float32: a > b <=> key(a) > key(b); -0 < +0; every NaN maps to
// the largest key (torch.topk counts NaN as larger than everything).
__device__ __forceinline__ uint32_t float_key(float v) {
  if (v != v) return 0xffffffffu;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Shared memory of block_select_kth_largest.
struct SelectSmem {
  uint32_t hist[256];
  uint32_t digit, rank;
};

// The k-th largest (1 <= k <= L) of the L keys get(0..L-1), counting duplicates (so the
// top k are exactly the keys >= the result: SPEC §1 ties kept). Four passes of an 8-bit
// radix select, from the top digit: histogram the keys that match the digits found so
// far, then find the digit holding the rank. Every thread of the block (blockDim.x a
// multiple of 32) must call it; every thread gets the result.
template <typename Get>
__device__ uint32_t block_select_kth_largest(const Get& get, int64_t L, uint32_t k,
                                             SelectSmem& sm) {
  uint32_t prefix = 0, mask = 0, rank = k;  // rank among the keys matching prefix, from the top
  const int lane = threadIdx.x & 31;
#pragma unroll 1
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sm.hist[i] = 0;
    __syncthreads();
    // Uniform trip count for the whole block, so every lane reaches __match_any_sync.
    for (int64_t base = 0; base < L; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      int bin = 256;  // 256: no bin (past the end, or not matching the prefix)
      if (i < L) {
        const uint32_t key = get(i);
        if ((key & mask) == prefix) bin = static_cast<int>((key >> shift) & 0xffu);
      }
      // Aggregate equal bins within the warp: many equal values (e.g. ReLU zeros) would
      // otherwise serialise on one shared-memory atomic.
      const unsigned peers = __match_any_sync(kFullMask, bin);
      if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&sm.hist[bin], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l owns bins 255 - 8l - j, j = 0..7 (scanned from the top).
      uint32_t local[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        local[j] = sm.hist[255 - 8 * lane - j];
        sum += local[j];
      }
      uint32_t incl = sum;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const uint32_t o = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += o;
      }
      const unsigned hit = __ballot_sync(kFullMask, incl >= rank);
      // hit == 0 cannot happen (the matching keys number at least rank); be defensive.
      const int sel = hit ? __ffs(hit) - 1 : 0;
      if (lane == sel) {
        uint32_t cum = incl - sum, digit = 255 - 8 * lane - 7, new_rank = 1;
        bool found = false;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (!found && cum + local[j] >= rank) {
            digit = 255 - 8 * lane - j;
            new_rank = rank - cum;
            found = true;
          }
          cum += local[j];
        }
        sm.digit = digit;
        sm.rank = new_rank;
      }
    }
    __syncthreads();
    prefix |= sm.digit << shift;
    mask |= 0xffu << shift;
    rank = sm.rank;
    __syncthreads();  // everyone has read digit / rank before the next pass rewrites them
  }
  return prefix;
}

// ------------------------------------------------------------------------ AttentionDrop

// The soft mask S of SPEC §4 step 3 at one unit, exactly as reference._soft_mask.
__device__ __forceinline__ float soft_mask(float x, float thr, float mn, float mx, int mode) {
  if (mode == 0) return x < thr ? 1.f : 0.f;  // "am"
  // f̂ = 0 wherever it is not a number in [0, 1] (max = min, ±Inf in the map, max − min
  // overflowing): every S is finite and in [0, 1] (SPEC §1, §4).
  const float q = (x - mn) / (mx - mn);
  const float fhat = (q >= 0.f && q <= 1.f) ? q : 0.f;
  if (mode == 1) return 1.f - fhat;  // "sm"
  return 1.f - fhat * (x >= thr ? 1.f : 0.f);  // "ad" (fhat * 0/1 is exact: no FMA issue)
}

}  // namespace guidedrop
