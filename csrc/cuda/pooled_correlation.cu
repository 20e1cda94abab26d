// CorrDrop's pooled correlation (SPEC §2 step 2):
//   a = avg_pool2d(x, k, stride=k, ceil_mode=True)   (N, N' = H'W', C)
//   â_i = a_i / ‖a_i‖₂ (0 for a zero row);  F_i = (1/N') Σ_j P_ij,  P_ij = |â_i·â_j| (j ≠ i),
//   P_ii = 0 for a nonzero row, 1 for a zero row.
// F decides CorrDrop's blocks, so mathematically equal F are exactly equal (SPEC §1), as in
// guidedrop.reference.pooled_correlation:
// - a in float64 (the window sums and their division): exact sums but for windows of values
//   spanning over 2^23 (float32, k = 7), so the same a as the reference's and Triton's
//   whatever the order of the additions, and no sum overflows;
// - â_i = b_i / ‖b_i‖, b_i = a_i / max|a_i|, in float64 as the reference: the norm neither
//   overflows nor underflows, F is invariant to positive scaling of x;
// - |â_i·â_j| in float64 (0 with a zero row), summed over the channels in one fixed order
//   for every (i, j): the same for (j, i) (a·b = b·a);
// - each |â_i·â_j| is rounded to a multiple of 2^-32 and the row sums are int64: exact, so
//   independent of where the diagonal or an equal term falls in the row. The float64
//   errors (about C ulp of 1) are far below that grid, so equal, opposite and parallel rows
//   give 1 exactly, and rows of the same values in another channel order the same terms,
//   but where a value lies within that error of a rounding boundary of the grid;
// - a NaN or an Inf in a pooled row (its â NaN) makes every F of the sample NaN, the zero
//   rows' too, as in the reference (whose Gram product gives 0 · NaN = NaN there).
// The host clamps k to max(H, W) (a block >= the map is one window).
//
// One launch (issue 12: statistics in one kernel), one block of 32 x 32 threads per sample
// (with 32 x 8, the block's loads in flight, one a thread, kept the pooling far below the
// memory's bandwidth: one block per SM at N = 128);
// the only intermediate is the pooled tensor (k² times smaller than x), written and read by
// the same block:
// 1. pooling, coalesced in x's layout: each thread sums whole k x k windows in float64
//    (rows then columns; exact sums, so equal to the reference's window_means in any order;
//    divided by the number of valid units of a border window). x dense in its layout
//    and aligned (PoolVec): read in 16-byte vectors. In NCHW a thread per window,
//    consecutive threads along w, h, then c (a warp reads a band of rows, not a channel a
//    whole map away per lane), each window row read as the aligned vectors that cover it
//    (a vector shared by two neighbouring windows is read by both, the second time from
//    L1); in channels_last a thread per (window, V = 16 / sizeof(T) channels), consecutive
//    threads along the channels. Otherwise one element per access: in NCHW one warp per
//    (channel, pooled row) with the lanes along the pooled columns, in channels_last one
//    warp per pooled position with the lanes along the channels. Then, after a
//    __syncthreads, one warp per pooled position i takes the max |a|, the lanes sum
//    (a / max)² in float64, and divide their channels. Writes â (N', C) float64 over the
//    pooled a (the same scratch) and a flag per row (N'): 1 for a zero row, NaN for a NaN
//    row, else 0.
// 2. after a __syncthreads (the block's global writes are visible to the block): the block
//    takes 32 rows i at a time and walks the columns j in tiles of 32 from its own on (the
//    upper triangle of tiles: P is symmetric bit for bit, so each P_ij is computed once for
//    rows i and j), accumulating â_i·â_j over channel tiles of 32 held in shared memory (a
//    tiled GEMM, float64); each thread keeps 1 row x 1 column and
//    adds the rounded |dot| to its int64 row partials and, off the diagonal, to its column
//    partial, which it adds to row j's int64 sum in colsum (an atomic: integers, so in any
//    order); at the end of a tile row a warp reduction over its 32 columns adds its rows'
//    partials there too. After a __syncthreads, F_i from colsum[i] = Σ_{j≠i} P_ij. The
//    N' x N' matrix never leaves registers.
// Each F_i is the same arithmetic in the same order whatever the tiling (a channel sum in
// channel order per (i, j), exact integer row sums), so F is bit for bit what the earlier
// two-kernel version computed.
#include "common.cuh"
#include "launchers.h"

namespace guidedrop {
namespace {

constexpr double kQuantumInv = 4294967296.0;  // 2^32: P_ij rounded to a multiple of 2^-32
constexpr long long kOne = 4294967296LL;        // P_ii = 1 on that grid

constexpr int kTile = 32;  // rows i, columns j and channels per tile
constexpr int kRowsY = 32;  // warps per block; each thread holds kTile / kRowsY rows (1)
constexpr int kPerThread = kTile / kRowsY;

// The pooling's 16-byte vector paths (see the header, step 1), when x is dense in its
// layout, aligned, and every 16-byte vector that overlaps a sample lies inside it. Indices
// are 32-bit (C * N' < 2^31), divided by multiply-high (FastDiv) once per window.
struct PoolVec {
  bool on, cl;             // cl: channels_last, else NCHW
  FastDiv np, wp, groups;  // by N', W' and the channel groups C / V (channels_last)
};

// Pooled, normalised rows â of sample n (see the header, step 1). Ends with a
// __syncthreads: every row is written.
template <typename scalar_t>
__device__ void pool_normalize(const scalar_t* __restrict__ x, const Strides4& s,
                               const int64_t n, const int64_t C, const int64_t H,
                               const int64_t W, const int64_t k, const int64_t Hp,
                               const int64_t Wp, const int64_t Np, const PoolVec& pv,
                               double* __restrict__ pooled, float* __restrict__ row_flag) {
  constexpr int V = 16 / sizeof(scalar_t);
  using Vec16 = Vec<scalar_t, V>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const scalar_t* xn = x + n * s.n;
  auto window = [&](const scalar_t* p, int64_t hp, int64_t wp) {  // a of one window
    const int64_t h0 = hp * k, w0 = wp * k;
    const int64_t h1 = min(h0 + k, H), w1 = min(w0 + k, W);
    double sum = 0.;
    // The fallback paths: not unrolled, so that the static check (tests/
    // test_static_perf.py) takes the vector loops, the steady state, for the streaming loop.
#pragma unroll 1
    for (int64_t h = h0; h < h1; ++h)
#pragma unroll 1
      for (int64_t w = w0; w < w1; ++w) sum += to_float(p[h * s.h + w * s.w]);
    return sum / static_cast<double>((h1 - h0) * (w1 - w0));
  };
  if (pv.on && pv.cl) {  // channels_last: a thread per (window, V channels)
    const uint32_t G = static_cast<uint32_t>(C / V);
    for (uint32_t item = threadIdx.x; item < Np * G; item += blockDim.x) {
      const uint32_t i = div_of(item, pv.groups), c = (item - i * G) * V;
      const uint32_t hp = div_of(i, pv.wp), wp = i - hp * static_cast<uint32_t>(Wp);
      const int64_t h0 = hp * k, w0 = wp * k;
      const int64_t h1 = min(h0 + k, H), w1 = min(w0 + k, W);
      const double units = static_cast<double>((h1 - h0) * (w1 - w0));
      // 2 float64 sums at a time, the window's vectors read again for each pair of channels
      // (from L1): 8 sums (2-byte x) took 16 registers and spilled (64 a thread in blocks
      // of 1024), and 4 still spilled 4 bytes.
      constexpr int P = 2;
#pragma unroll
      for (int part = 0; part < V; part += P) {
        double acc[P] = {};
#pragma unroll 1
        for (int64_t h = h0; h < h1; ++h) {
          const scalar_t* row = xn + h * W * C + c;  // dense offsets: any size may be 1
#pragma unroll 1
          for (int64_t w = w0; w < w1; ++w) {  // each channel summed rows then columns
            const Vec16 in = *reinterpret_cast<const Vec16*>(row + w * C);
#pragma unroll
            for (int j = 0; j < P; ++j) acc[j] += to_float(in.v[part + j]);
          }
        }
#pragma unroll
        for (int j = 0; j < P; ++j) pooled[i * C + c + part + j] = acc[j] / units;
      }
    }
  } else if (pv.on) {  // NCHW: a thread per window, consecutive threads along w, h, c
    for (uint32_t item = threadIdx.x; item < C * Np; item += blockDim.x) {
      const uint32_t c = div_of(item, pv.np), i = item - c * static_cast<uint32_t>(Np);
      const uint32_t hp = div_of(i, pv.wp), wp = i - hp * static_cast<uint32_t>(Wp);
      const int64_t h0 = hp * k, w0 = wp * k;
      const int64_t h1 = min(h0 + k, H), w1 = min(w0 + k, W);
      double sum = 0.;
#pragma unroll 1
      for (int64_t h = h0; h < h1; ++h) {
        // The window's row [lo, hi) read as the aligned vectors that cover it (inside the
        // sample: its ends are 16-byte aligned); each vector's units in [lo, hi) are
        // added in order, so the sum is the scalar path's.
        const scalar_t* lo = xn + (c * H + h) * W + w0;
        const scalar_t* hi = lo + (w1 - w0);
        const scalar_t* e = lo - (reinterpret_cast<uintptr_t>(lo) % 16) / sizeof(scalar_t);
#pragma unroll 1
        for (; e < hi; e += V) {
          const Vec16 in = *reinterpret_cast<const Vec16*>(e);
          const int a = static_cast<int>(lo - e), b = static_cast<int>(hi - e);
#pragma unroll
          for (int j = 0; j < V; ++j) sum += (j >= a && j < b) ? to_float(in.v[j]) : 0.f;
        }
      }
      pooled[i * C + c] = sum / static_cast<double>((h1 - h0) * (w1 - w0));
    }
  } else if (s.c < s.w) {  // channels inner: lanes along the channels
    for (int64_t i = warp; i < Np; i += kRowsY)  // uniform within the warp
      for (int64_t c = lane; c < C; c += 32)
        pooled[i * C + c] = window(xn + c * s.c, i / Wp, i % Wp);
  } else {  // lanes along w: one warp per (channel, pooled row)
    for (int64_t item = warp; item < C * Hp; item += kRowsY) {  // uniform within the warp
      const int64_t c = item / Hp, hp = item % Hp;
      for (int64_t wp = lane; wp < Wp; wp += 32)
        pooled[(hp * Wp + wp) * C + c] = window(xn + c * s.c, hp, wp);
    }
  }
  __syncthreads();  // every a written (block-scope visibility of the global writes)
  for (int64_t i = warp; i < Np; i += kRowsY) {  // uniform within the warp
    double* row = pooled + i * C;
    double mx = 0.;
    // Loops over pooled, not unrolled (see gram_rowsum's tile fill).
#pragma unroll 1
    for (int64_t c = lane; c < C; c += 32) mx = max_nan(mx, fabs(row[c]));
    mx = warp_reduce(mx, MaxOp());
    double ss = 0.;
#pragma unroll 1
    for (int64_t c = lane; c < C; c += 32) {
      const double b = row[c] / mx;
      ss = __dadd_rn(ss, __dmul_rn(b, b));  // no DFMA: the emulator's (and Triton's) rounding
    }
    ss = warp_reduce(ss, SumOp());
    const double nb = sqrt(ss);
#pragma unroll 1
    for (int64_t c = lane; c < C; c += 32) row[c] = mx == 0. ? 0. : (row[c] / mx) / nb;
    // a NaN row: a NaN or an Inf (Inf / Inf) in it; a zero row's nb is 0 / 0, not counted
    if (lane == 0) row_flag[i] = mx == 0. ? 1.f : (nb != nb ? NAN : 0.f);
  }
}

// F of sample n from its rows â (see the header, step 2); colsum: (N') int64 scratch.
__device__ void gram_rowsum(const double* __restrict__ an, const float* __restrict__ row_flag,
                            unsigned long long* __restrict__ colsum, const int64_t Np,
                            const int64_t C, float* __restrict__ Fn) {
  __shared__ double ai[kTile][kTile + 1];
  __shared__ double aj[kTile][kTile + 1];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  // A NaN row makes every F of the sample NaN (see the header).
  bool nan_row = false;
  for (int64_t i = threadIdx.x; i < Np; i += blockDim.x) {
    nan_row |= row_flag[i] != row_flag[i];
    colsum[i] = 0;
  }
  if (__syncthreads_or(nan_row)) {  // uniform in the block
    for (int64_t i = threadIdx.x; i < Np; i += blockDim.x) Fn[i] = NAN;
    return;
  }
  for (int64_t i0 = 0; i0 < Np; i0 += kTile) {  // uniform in the block
    long long part[kPerThread] = {};
    // Bit q: row i0 + ty + kRowsY * q is a zero row. Read once per row tile, in a loop
    // not unrolled (as the tile fill below).
    unsigned zi = 0;
#pragma unroll 1
    for (int q = 0; q < kPerThread; ++q) {
      const int64_t i = i0 + ty + kRowsY * q;
      if (i < Np && row_flag[i] == 1.f) zi |= 1u << q;
    }
    for (int64_t j0 = i0; j0 < Np; j0 += kTile) {
      double acc[kPerThread] = {};  // â_i·â_j
      for (int64_t c0 = 0; c0 < C; c0 += kTile) {
        const int64_t c = c0 + tx;
        // Not unrolled: this fill loads pooled (k² times smaller than x); unrolled, its 8
        // loads would make it the loop that loads the most, which the static check
        // (tests/test_static_perf.py) takes for the streaming loop.
#pragma unroll 1
        for (int q = 0; q < kPerThread; ++q) {
          const int row = ty + kRowsY * q;
          const int64_t i = i0 + row, j = j0 + row;
          ai[row][tx] = (i < Np && c < C) ? an[i * C + c] : 0.;
          aj[row][tx] = (j < Np && c < C) ? an[j * C + c] : 0.;
        }
        __syncthreads();
#pragma unroll 8
        for (int cc = 0; cc < kTile; ++cc) {
          const double bj = aj[tx][cc];
#pragma unroll
          for (int q = 0; q < kPerThread; ++q) acc[q] = fma(ai[ty + kRowsY * q][cc], bj, acc[q]);
        }
        __syncthreads();
      }
      const int64_t j = j0 + tx;
      const bool zj = j < Np && row_flag[j] == 1.f;
      long long col = 0;  // this thread's rows' terms of column j
#pragma unroll
      for (int q = 0; q < kPerThread; ++q) {
        const int64_t i = i0 + ty + kRowsY * q;
        if (i < Np && j < Np) {
          // 0 with a zero row. A NaN p comes only from a NaN row, whose sample does not
          // get here; p == p keeps it out of the int64 sum all the same.
          const bool zero = ((zi >> q) & 1u) || zj;
          const double p = zero ? 0. : fabs(acc[q]);
          if (p == p && i != j) {
            const long long t = static_cast<long long>(p * kQuantumInv + 0.5);
            part[q] += t;
            col += t;
          }
        }
      }
      // (j, i) off the diagonal tile: row j's terms
      if (j0 != i0 && col != 0) atomicAdd(&colsum[j], static_cast<unsigned long long>(col));
    }
    // The lanes of a warp are the 32 columns of one tile row.
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const long long sum = warp_reduce(part[q], SumOp());
      const int64_t i = i0 + ty + kRowsY * q;
      if (tx == 0 && i < Np && sum != 0) {
        atomicAdd(&colsum[i], static_cast<unsigned long long>(sum));
      }
    }
  }
  __syncthreads();  // every tile's atomics done
  for (int64_t i = threadIdx.x; i < Np; i += blockDim.x) {
    const long long total = static_cast<long long>(colsum[i]) + (row_flag[i] == 1.f ? kOne : 0);
    Fn[i] = static_cast<float>(static_cast<double>(total) / kQuantumInv / static_cast<double>(Np));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTile * kRowsY) pooled_correlation_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                          const int64_t N, const int64_t C, const int64_t H,
                                          const int64_t W, const int64_t k, const int64_t Hp,
                                          const int64_t Wp,
                                          const int64_t Np, const PoolVec pv,
                                          double* __restrict__ pooled,
                                          float* __restrict__ row_flag,
                                          unsigned long long* __restrict__ colsum,
                                          float* __restrict__ F) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {  // uniform in the block
    double* an = pooled + n * Np * C;
    float* zn = row_flag + n * Np;
    pool_normalize(x, s, n, C, H, W, k, Hp, Wp, Np, pv, an, zn);
    __syncthreads();  // every row of the sample written (block-scope visibility)
    gram_rowsum(an, zn, colsum + n * Np, Np, C, F + n * Np);
  }
}

}  // namespace

void launch_pooled_correlation(const at::TensorBase& x, int64_t k, const at::TensorBase& pooled,
                               const at::TensorBase& row_flag, const at::TensorBase& colsum,
                               const at::TensorBase& F) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hp = ceil_div(H, k), Wp = ceil_div(W, k), Np = Hp * Wp;
  if (N * Np == 0) return;
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::pooled_correlation", [&] {
    constexpr int64_t V = 16 / sizeof(scalar_t);
    const Strides4 s = strides4(x);
    // The vector paths (PoolVec): x dense NCHW or channels_last (then C % V == 0, so that
    // a thread's V channels are one aligned vector), aligned, C * H * W % V == 0 (every
    // sample's ends 16-byte aligned) and C * N' < 2^31.
    const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
    PoolVec pv{};
    pv.cl = cl;
    pv.on = (x.is_contiguous() || (cl && C % V == 0)) && aligned16(x) &&
            (C * H * W) % V == 0 && C * Np < (int64_t(1) << 31);
    if (pv.on) {
      pv.np = fast_div(Np);
      pv.wp = fast_div(Wp);
      pv.groups = fast_div(std::max<int64_t>(C / V, 1));
    }
    pooled_correlation_kernel<scalar_t><<<grid_for(N, 1), kTile * kRowsY, 0,
                                          current_stream()>>>(
        x.data_ptr<scalar_t>(), s, N, C, H, W, k, Hp, Wp, Np, pv,
        pooled.data_ptr<double>(), row_flag.data_ptr<float>(),
        reinterpret_cast<unsigned long long*>(colsum.data_ptr<int64_t>()), F.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace guidedrop
