// Shared device helpers of the guidedrop CUDA kernels.
//
// - GD_DISPATCH_FLOAT_TYPES: float / half / bfloat16 (float64 is reference-only, and the
//   C++ checks refuse it before any launch, so it is not instantiated: less compile time).
// - Strides4 / off4: a strided 4-D accessor by logical (n, c, h, w), so contiguous,
//   channels_last and sliced inputs all work with the same kernel; Uniforms: noise (or any
//   small float tensor) of any float dtype and strides read as float32.
// - apply_kernel: the one elementwise "out = t * w(n, c, h, w)" kernel of every layer,
//   walking the output in its memory order (NCHW or NHWC), with 16-byte vector loads and
//   stores when t and out are dense in that order and aligned, at any width, the
//   multiplier's state read once per line segment and no per-element division.
// - float_key / key_float: the order-preserving uint32 key of a float32 (torch.topk's).
// - block_select_kth_largest: exact k-th largest of a block's keys by 8-bit radix select;
//   warp_radix_digit, the digit of one pass from a 256-bin histogram, for a block
//   (radix_pick) or for the warps of a map whose keys sit in registers
//   (map_select_regs_kernel).
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
#include <cmath>
#include <cstdint>
#include <type_traits>

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

// The most blocks grid_for gives. On a GPU the grid-stride loops run a second pass only
// past 2^18 blocks of work: over 2^18 maps for the kernels of a block per map (a batch of
// 256 at 2048 channels), hundreds of millions of elements for the others. The CPU
// emulator's tests lower it (tests/cuda_emu/emu.h), so that every loop runs several passes
// on small inputs there.
constexpr int64_t kMaxGrid = int64_t(1) << 18;
#ifndef GUIDEDROP_MAX_GRID
#define GUIDEDROP_MAX_GRID kMaxGrid
#endif

// Blocks for a grid-stride loop over `work` items with `threads` threads per block. The
// cap keeps grid.x far below its limit; the loops cover whatever the grid does not.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = ceil_div(std::max<int64_t>(work, 1), threads);
  return static_cast<unsigned>(std::min<int64_t>(blocks, GUIDEDROP_MAX_GRID));
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

// ------------------------------------------------------------------------ fast division

// Division of a 32-bit n < 2^31 by a divisor d >= 1 fixed at launch, with the magic number
// computed on the host (Granlund & Montgomery; the scheme of ATen's IntDivider): a
// multiply-high and a shift, not the ~20-instruction division routine the compiler emits
// for a runtime divisor. q = (umulhi(n, m) + n) >> s is exact for n < 2^31.
struct FastDiv {
  uint32_t d, m, s;
};

inline FastDiv fast_div(int64_t d) {
  TORCH_CHECK(d >= 1 && d < (int64_t(1) << 31), "guidedrop: divisor out of range");
  uint32_t s = 0;
  while ((uint64_t(1) << s) < static_cast<uint64_t>(d)) ++s;
  const uint64_t m = ((uint64_t(1) << 32) * ((uint64_t(1) << s) - d)) / d + 1;
  return {static_cast<uint32_t>(d), static_cast<uint32_t>(m), s};
}

__device__ __forceinline__ uint32_t div_of(uint32_t n, const FastDiv& f) {
  return (__umulhi(n, f.m) + n) >> f.s;
}

// ------------------------------------------------------------------------ apply kernel

// Geometry of "out = t * w(n, c, h, w)" for the samples n0 .. n0 + N - 1 of one launch.
// The flat index i (from 0 at sample n0) walks out's memory order: NCHW (cl = false) or
// NHWC (cl = true); numel < 2^31, so the index math is 32-bit (launch_apply splits the
// batch). A line is the run of elements along the innermost dimension: a row (n, c, h, :)
// in NCHW, a pixel's channels (n, :, h, w) in NHWC. When vec is set, t and out are both
// dense in that order and 16-byte aligned, so element i sits at offset i in both;
// otherwise every offset comes from the strides. d0, d1, d2: fast divisions by the three
// inner sizes of that order (W, H, C for NCHW; C, W, H for NHWC).
struct ApplyGeom {
  int64_t n0, N, C, H, W, numel;
  Strides4 t, o;
  bool cl, vec;
  FastDiv d0, d1, d2;
};

inline bool dense_in_order(const at::TensorBase& t, bool cl) {
  return cl ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous();
}

// Samples per launch of a flat 16-byte apply kernel (V elements a vector, per elements a
// sample): under 2^31 elements (32-bit indices), and a multiple of V samples unless a
// sample is a whole number of vectors, so that every launch's x starts 16-byte aligned.
inline int64_t flat_samples_per_launch(int64_t N, int64_t per, int64_t V) {
  int64_t step = ((int64_t(1) << 31) - 1) / std::max<int64_t>(per, 1);
  if (per % V != 0 && step < N) step -= step % V;
  return step;
}

// Coordinates of flat index i < 2^31 of a launch: three multiply-high divisions.
template <bool CL>
__device__ __forceinline__ Coord4 decompose(int64_t i, const ApplyGeom& g) {
  const uint32_t u = static_cast<uint32_t>(i);
  const uint32_t q0 = div_of(u, g.d0), q1 = div_of(q0, g.d1), q2 = div_of(q1, g.d2);
  const int64_t a = u - q0 * g.d0.d, b = q0 - q1 * g.d1.d, c = q1 - q2 * g.d2.d;
  const int64_t n = g.n0 + q2;  // innermost first: a, b, c
  return CL ? Coord4{n, a, c, b} : Coord4{n, c, b, a};
}

// The first element of the line after p's.
template <bool CL>
__device__ __forceinline__ Coord4 next_line(Coord4 p, const ApplyGeom& g) {
  if (!CL) {
    p.w = 0;
    if (++p.h == g.H) {
      p.h = 0;
      if (++p.c == g.C) {
        p.c = 0;
        ++p.n;
      }
    }
  } else {
    p.c = 0;
    if (++p.w == g.W) {
      p.w = 0;
      if (++p.h == g.H) {
        p.h = 0;
        ++p.n;
      }
    }
  }
  return p;
}

template <typename T, int V>
struct alignas(16) Vec {
  T v[V];
};

// The V values of a 16-byte vector as floats. bfloat16 is float's high half, so a word's two
// elements are the word shifted left by 16 and the word with its low half cleared: one
// instruction each (c10's conversion of the high one moves it down, then shifts: two).
template <typename T, int V>
__device__ __forceinline__ void unpack(const Vec<T, V>& v, float (&f)[V]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(v.v);
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = to_float(v.v[j]);
  }
}

// The 16 bytes at byte offset b (0 <= b < 16) of the 32 bytes lo, hi (two aligned
// 16-byte vectors, consecutive in memory), b a runtime value: shifts by 8 and by 4 bytes
// select words, then a funnel shift moves the last 0 to 3 bytes; no local memory (a
// register array indexed by b would be).
__device__ __forceinline__ uint4 realign(const uint4& lo, const uint4& hi, uint32_t b) {
  uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int k = 0; k < 6; ++k) w[k] = (b & 8) ? w[k + 2] : w[k];  // w[k + 2] not yet moved
#pragma unroll
  for (int k = 0; k < 5; ++k) w[k] = (b & 4) ? w[k + 1] : w[k];
  const uint32_t bits = (b & 3) * 8;
  uint32_t o[4];
#pragma unroll
  for (int k = 0; k < 4; ++k)
    o[k] = static_cast<uint32_t>(((static_cast<uint64_t>(w[k + 1]) << 32) | w[k]) >> bits);
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// The V = 16 / sizeof(T) values x[e] ... x[e + V - 1] as floats, e any element index of x
// (16-byte aligned): the aligned 16-byte vector at e - e % V and, where e % V != 0 and it
// lies before x's end `total` (a multiple of V), the one after it, realigned in registers
// (a map of 14 x 14 or 7 x 7 bfloat16 units does not start on 16 bytes). Values past x's
// end read as 0.
template <typename T, int V>
__device__ __forceinline__ void load_unaligned(const T* x, uint64_t e, uint64_t total,
                                               float (&f)[V]) {
  const uint32_t sh = static_cast<uint32_t>(e % V);  // V a power of 2: a mask
  const uint64_t q = e / V;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const uint4 lo = xv[q];
  const uint4 hi = sh != 0 && (q + 1) * V < total ? xv[q + 1] : make_uint4(0, 0, 0, 0);
  Vec<T, V> in;
  *reinterpret_cast<uint4*>(&in) = realign(lo, hi, sh * sizeof(T));
  unpack(in, f);
}

// The multipliers come from a functor WFn with a per-line-segment state, so whatever a
// line shares (a channel's weight, a mask row, a row's seed coverage, a map's thresholds)
// is read once per segment, not per element:
//   struct Row { ... };  (default-constructible)
//   template <bool CL> Row row(const Coord4& p, int len) const;
//     the state of the `len` (1 <= len <= 16) elements of p's line from p on: units
//     (n, c, h, p.w + j) in NCHW, channels p.c + j of pixel (n, h, w) in NHWC;
//   template <bool CL> float at(const Row&, int j) const;
//     the float32 multiplier of element j (0 <= j < len) of that segment.
//
// Each thread handles chunks of V = 16 / sizeof(scalar_t) consecutive elements in memory
// order, with one 16-byte load and store when dense and aligned, and its coordinates from
// one decomposition (three 32-bit multiply-high divisions) per chunk. R: lines a chunk can
// span, fixed at launch from the line length L: 1 when L % V == 0 (NCHW at W = 56 or 32 in
// bf16), 2 when L >= V - 1 (W = 28, 14, 7; channels_last at any C >= V - 1), 0 for shorter
// lines (one state per element). The strided path (not dense) has one state per element.
template <typename scalar_t, typename WFn, bool CL, int R>
__global__ void apply_kernel(const scalar_t* __restrict__ t, scalar_t* __restrict__ out,
                             const ApplyGeom g, const WFn wfn) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t L = CL ? g.C : g.W;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t stride = gridDim.x * blockDim.x;
  auto one = [&](const Coord4& p) { return wfn.template at<CL>(wfn.template row<CL>(p, 1), 0); };
  // Loop indices are 32-bit: numel < 2^31 and the grid is at most 2^26 threads. One
  // iteration per chunk (unroll 1): the loop body is the steady state, nvcc's unrolled
  // copies would only grow the code.
  if (!g.vec) {
#pragma unroll 1
    for (uint32_t i = tid; i < g.numel; i += stride) {
      const Coord4 p = decompose<CL>(i, g);
      const Coord4 q{p.n - g.n0, p.c, p.h, p.w};  // t and out start at sample n0
      out[off4(g.o, q)] = static_cast<scalar_t>(to_float(t[off4(g.t, q)]) * one(p));
    }
    return;
  }
  const uint32_t full = static_cast<uint32_t>(g.numel) / V;
#pragma unroll 1
  for (uint32_t chunk = tid; chunk < full; chunk += stride) {
    const uint32_t i0 = chunk * V;
    const Coord4 p = decompose<CL>(i0, g);
    const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i0);
    float tf[V];
    unpack(in, tf);
    Vec<scalar_t, V> res;
    if constexpr (R == 1) {  // the chunk lies in one line
      const auto r0 = wfn.template row<CL>(p, V);
#pragma unroll
      for (int j = 0; j < V; ++j)
        res.v[j] = static_cast<scalar_t>(tf[j] * wfn.template at<CL>(r0, j));
    } else if constexpr (R == 2) {  // the chunk's first k0 elements on p's line, the rest on the next
      const int k0 = static_cast<int>(min(static_cast<int64_t>(V), L - (CL ? p.c : p.w)));
      const auto r0 = wfn.template row<CL>(p, k0);
      typename WFn::Row r1{};
      if (k0 < V) r1 = wfn.template row<CL>(next_line<CL>(p, g), V - k0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float w = j < k0 ? wfn.template at<CL>(r0, j) : wfn.template at<CL>(r1, j - k0);
        res.v[j] = static_cast<scalar_t>(tf[j] * w);
      }
    } else {  // lines shorter than V - 1
#pragma unroll
      for (int j = 0; j < V; ++j)
        res.v[j] = static_cast<scalar_t>(tf[j] * one(decompose<CL>(i0 + j, g)));
    }
    *reinterpret_cast<Vec<scalar_t, V>*>(out + i0) = res;
  }
  if (tid == 0) {  // the last numel % V elements
#pragma unroll 1
    for (uint32_t i = full * V; i < g.numel; ++i)
      out[i] = static_cast<scalar_t>(to_float(t[i]) * one(decompose<CL>(i, g)));
  }
}

template <typename scalar_t, typename WFn, bool CL>
void launch_apply_lines(const scalar_t* t, scalar_t* out, const ApplyGeom& g, const WFn& wfn) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t L = CL ? g.C : g.W;
  const unsigned grid = grid_for(g.vec ? ceil_div(g.numel, V) : g.numel, kThreads);
  const cudaStream_t stream = current_stream();
  if (L % V == 0)
    apply_kernel<scalar_t, WFn, CL, 1><<<grid, kThreads, 0, stream>>>(t, out, g, wfn);
  else if (L >= V - 1)
    apply_kernel<scalar_t, WFn, CL, 2><<<grid, kThreads, 0, stream>>>(t, out, g, wfn);
  else
    apply_kernel<scalar_t, WFn, CL, 0><<<grid, kThreads, 0, stream>>>(t, out, g, wfn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out: allocated by the caller with at::empty_like(t) (t's memory format when t is dense,
// else the suggested one), exactly like the reference's torch.empty_like. One launch per
// group of samples under 2^31 elements (one launch below 2^31 elements in all); a sample
// itself must be under 2^31 elements (RuntimeError otherwise).
template <typename scalar_t, typename WFn>
void launch_apply(const at::TensorBase& t, const at::TensorBase& out, const WFn& wfn) {
  if (t.numel() == 0) return;
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t per_sample = C * H * W;
  TORCH_CHECK(per_sample < (int64_t(1) << 31),
              "guidedrop: a sample of over 2^31 - 1 elements is not supported");
  const bool cl = !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool dense = dense_in_order(t, cl) && dense_in_order(out, cl);
  const int64_t step = ((int64_t(1) << 31) - 1) / per_sample;  // samples per launch
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    ApplyGeom g;
    g.n0 = n0;
    g.N = std::min(step, N - n0);
    g.C = C;
    g.H = H;
    g.W = W;
    g.numel = g.N * per_sample;
    g.t = strides4(t);
    g.o = strides4(out);
    g.cl = cl;
    const scalar_t* tp = t.data_ptr<scalar_t>() + n0 * g.t.n;
    scalar_t* op = out.data_ptr<scalar_t>() + n0 * g.o.n;
    g.vec = dense && reinterpret_cast<uintptr_t>(tp) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(op) % 16 == 0;
    g.d0 = fast_div(cl ? C : W);
    g.d1 = fast_div(cl ? W : H);
    g.d2 = fast_div(cl ? H : C);
    if (cl) launch_apply_lines<scalar_t, WFn, true>(tp, op, g, wfn);
    else launch_apply_lines<scalar_t, WFn, false>(tp, op, g, wfn);
  }
}

// ------------------------------------------------------------------------ reductions

// NaN-propagating max / min (torch.amax / amin semantics).
template <typename T>
__device__ __forceinline__ T max_nan(T a, T b) { return (a != a || a > b) ? a : b; }
template <typename T>
__device__ __forceinline__ T min_nan(T a, T b) { return (a != a || a < b) ? a : b; }

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return max_nan(a, b); }
};
struct MinOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return min_nan(a, b); }
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
// the largest key (torch.topk counts NaN as larger than everything). A negative value's bits
// flipped, a positive one's sign bit set: u ^ ((u >> 31 arithmetic) | sign), a shift and a
// LOP3 (a NaN made 0x7fffffff first: a compare and a select), not a test of the sign bit
// and two LOP3 under predicates.
__device__ __forceinline__ uint32_t float_key(float v) {
  const uint32_t u = v != v ? 0x7fffffffu : __float_as_uint(v);
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

// v is in the top k whose k-th largest is t (SPEC §1: ties kept), in the order the select
// ranks by: a NaN above every number (float_key), so also when t is NaN; -0 and +0 equal.
__device__ __forceinline__ bool in_top(float v, float t) { return v >= t || v != v; }

// The inverse: a key's top bit set (a positive value) clears it, else flips every bit.
__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float(k ^ (~static_cast<uint32_t>(static_cast<int32_t>(k) >> 31) | 0x80000000u));
}

// The key bits that can differ between the values of a dtype, from the top: the float32 of
// a bfloat16 has 16 zero low bits, of a float16 13 (float_key makes them ones where the
// value is negative, and all ones for a NaN). A select over such values need not look at
// them: the 8-bit radix passes stop at kLowestShift, and fill_low restores the bits below.
template <typename T>
constexpr int kKeyBits = 32;
template <>
constexpr int kKeyBits<c10::BFloat16> = 16;
template <>
constexpr int kKeyBits<c10::Half> = 19;
template <typename T>
constexpr int kLowestShift = 32 - 8 * ((kKeyBits<T> + 7) / 8);

// A key of such a dtype whose digits from the top down to bit `shift` are `prefix`: the bits
// below are ones where the value is negative (top bit clear), zeros elsewhere (a NaN's
// digits keep it a NaN).
__device__ __forceinline__ uint32_t fill_low(uint32_t prefix, int shift) {
  return (prefix >> 31) == 0 ? prefix | ((1u << shift) - 1u) : prefix;
}

// Shared memory of block_select_kth_largest (hist 16-byte aligned: warp_radix_digit).
struct alignas(16) SelectSmem {
  uint32_t hist[256];
  uint32_t digit, rank, count;
};

// The state of a radix select between passes: the digits found so far (prefix, on the
// bits of mask) and the rank sought among the keys that match them, from the top.
struct RadixState {
  uint32_t prefix, mask, rank;
};

// The pieces of one radix pass, for a kernel that counts the top digit while it reads its
// keys (map_select_kernel): radix_clear, then radix_count of its keys by each thread, then
// radix_pick. Every thread of the block (blockDim.x a multiple of 32) must call radix_clear
// and radix_pick (barriers).
__device__ __forceinline__ void radix_clear(SelectSmem& sm) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) sm.hist[i] = 0;
  __syncthreads();
}

// Counts one key whose digit is `bin` in the histogram `hist` (SelectSmem::hist, or a
// warp's). One shared-memory atomic, which nvcc makes a warp-aggregated increment
// (ATOMS.POPC.INC: the lanes with one address add their count at once), so that many equal
// values (e.g. ReLU zeros) do not serialise on one bin.
__device__ __forceinline__ void radix_count(uint32_t bin, uint32_t* hist) {
  atomicAdd(&hist[bin], 1u);
}

// The digit of the rank-th largest of the keys counted in hist (256 bins, 16-byte aligned),
// the rank sought among the keys of that digit and their count; every lane of the warp
// must call it and gets the result. Two steps, from the top: lane l sums bins
// 255 - 8l - j, j = 0..7 (two 16-byte loads), and a scan over the lanes finds the lane
// whose 8 bins hold the rank; then lanes 8g + j (every group g alike) read bin j of those
// 8, and a scan over the 8 finds the bin (not a loop over the 8 bins in every lane).
struct RadixDigit {
  uint32_t digit, rank, count;
};
__device__ __forceinline__ RadixDigit warp_radix_digit(const uint32_t* hist, uint32_t rank,
                                                       int lane) {
  const uint4* h4 = reinterpret_cast<const uint4*>(hist + 248 - 8 * lane);
  const uint4 lo = h4[0], hi = h4[1];  // bins 248 - 8l .. 251 - 8l, 252 - 8l .. 255 - 8l
  const uint32_t sum = lo.x + lo.y + lo.z + lo.w + hi.x + hi.y + hi.z + hi.w;
  uint32_t incl = sum;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t o = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += o;
  }
  // hit == 0 cannot happen (the matching keys number at least rank); be defensive.
  const unsigned hit = __ballot_sync(kFullMask, incl >= rank);
  const int sel = hit ? __ffs(hit) - 1 : 0;
  const uint32_t above = __shfl_sync(kFullMask, incl - sum, sel);  // keys in higher bins
  const int j = lane & 7;
  const uint32_t bin = 255 - 8 * sel - j, count = hist[bin];
  uint32_t c = count;
#pragma unroll
  for (int d = 1; d < 8; d <<= 1) {
    const uint32_t o = __shfl_up_sync(kFullMask, c, d);
    if (j >= d) c += o;
  }
  c += above;  // keys in bin and above
  const unsigned in = __ballot_sync(kFullMask, c >= rank) & 0xffu;
  const int at = in ? __ffs(in) - 1 : 7;
  return {__shfl_sync(kFullMask, bin, at), rank - __shfl_sync(kFullMask, c - count, at),
          __shfl_sync(kFullMask, count, at)};
}

// The digit at `shift` of the st.rank-th largest of the counted keys: st is updated to
// include it, and the count of keys matching the new prefix is returned; every thread gets
// the same result.
__device__ inline uint32_t radix_pick(int shift, RadixState& st, SelectSmem& sm) {
  __syncthreads();
  if (threadIdx.x < 32) {
    const RadixDigit d = warp_radix_digit(sm.hist, st.rank, threadIdx.x);
    if (threadIdx.x == 0) {
      sm.digit = d.digit;
      sm.rank = d.rank;
      sm.count = d.count;
    }
  }
  __syncthreads();
  st.prefix |= sm.digit << shift;
  st.mask |= 0xffu << shift;
  st.rank = sm.rank;
  const uint32_t count = sm.count;
  __syncthreads();  // everyone has read digit / rank / count before the next pass rewrites them
  return count;
}

// One pass of block_select_kth_largest: the digit at `shift` of the st.rank-th largest of
// the keys get(0..L-1) that match st.prefix on st.mask (radix_pick). Index: the type of the
// keys' indices (int where L < 2^31 - blockDim.x).
template <typename Index = int64_t, typename Get>
__device__ uint32_t block_radix_pass(const Get& get, Index L, int shift, RadixState& st,
                                     SelectSmem& sm) {
  const uint32_t prefix = st.prefix, mask = st.mask;
  radix_clear(sm);
  for (Index i = threadIdx.x; i < L; i += blockDim.x) {
    const uint32_t key = get(i);
    if ((key & mask) == prefix) radix_count((key >> shift) & 0xffu, sm.hist);
  }
  return radix_pick(shift, st, sm);
}

// The k-th largest (1 <= k <= L) of the L keys get(0..L-1), counting duplicates (so the
// top k are exactly the keys >= the result: SPEC §1 ties kept). Passes of an 8-bit radix
// select, from the top digit down to `lowest` (four; fewer for the keys of 16-bit values:
// kLowestShift): histogram the keys that match the digits found so far, then find the
// digit holding the rank. Every thread of the block (blockDim.x a multiple of 32) must
// call it; every thread gets the result.
template <typename Get>
__device__ uint32_t block_select_kth_largest(const Get& get, int64_t L, uint32_t k,
                                             SelectSmem& sm, int lowest = 0) {
  RadixState st{0, 0, k};
#pragma unroll 1
  for (int shift = 24; shift >= lowest; shift -= 8) block_radix_pass(get, L, shift, st, sm);
  return fill_low(st.prefix, lowest);
}

// ------------------------------------------------------------------------ AttentionDrop

// r = 1 / (mx − mn) rounded up, once per map (SPEC §4 step 2, reference.range_reciprocal):
// f̂ = min((x − mn)·r, 1) is then exactly 1 at the map's maximum, with no division per unit.
__device__ __forceinline__ float range_reciprocal(float mn, float mx) { return __frcp_ru(mx - mn); }

// The soft mask S of SPEC §4 step 3 at one unit, exactly as reference._soft_mask; r =
// range_reciprocal(mn, mx) of the unit's map (r = 0 gives S = 1: f̂ = 0).
__device__ __forceinline__ float soft_mask(float x, float thr, float mn, float r, int mode) {
  if (mode == 0) return x < thr ? 1.f : 0.f;  // "am"
  // f̂ = 0 wherever (x − mn)·r is not a number (max = min: 0·Inf; ±Inf in the map or max −
  // min overflowing: Inf·0): every S is finite and in [0, 1] (SPEC §1, §4). fmaxf / fminf
  // return the operand that is not NaN (FMNMX): the reference's where(q >= 0, min(q, 1), 0)
  // but for the sign of a zero, which 1 − f̂ drops.
  const float fhat = fminf(fmaxf(__fmul_rn(x - mn, r), 0.f), 1.f);
  if (mode == 1) return 1.f - fhat;  // "sm"
  // "ad": 1 − f̂·[x ≥ t], f̂·[x ≥ t] exact (f̂ finite, ≥ 0), so the one rounding of the fma
  // is the subtraction's: [x ≥ t] one FSET.BF, then an FFMA, no predicate per unit
  return fmaf(-fhat, x >= thr ? 1.f : 0.f, 1.f);
}

}  // namespace guidedrop
