// CorrDrop's pooled correlation (SPEC §2 step 2):
//   a = avg_pool2d(x, k, stride=k, ceil_mode=True)   (N, N' = H'W', C)
//   â_i = a_i / max(‖a_i‖₂, 1e-12);  F_i = (1/N') Σ_j P_ij,  P_ij = |â_i·â_j| (j ≠ i),
//   P_ii = 1 − (min(‖a_i‖₂, 1e-12) / 1e-12)² exactly as the reference sets it (0 for a unit
//   row, 1 for a zero row; a rounded |â_i·â_i − 1| would make equal F differ in the last bit).
//
// Two kernels; the only intermediate is the pooled tensor (k² times smaller than x):
// 1. pool_normalize_kernel: one warp per pooled position (n, i); the lanes stride over the
//    channels, each summing its k x k window (rows then columns, like ATen's avg_pool2d;
//    divided by the number of valid units of a border window), then the warp sums the
//    squares and the lanes divide their channels by the clamped norm. Writes â (N, N', C)
//    and P_ii (N, N').
// 2. gram_rowsum_kernel: a block of 32 x 8 threads takes 32 rows i of one sample and walks
//    the columns j in tiles of 32, accumulating â_i·â_j over channel tiles of 32 held in
//    shared memory (a plain tiled GEMM); each thread keeps 4 rows x 1 column, adds |dot| to
//    its row partials, and a warp reduction over the 32 columns of a tile row gives
//    Σ_j |â_i·â_j|, from which F_i swaps the rounded |â_i·â_i| for P_ii. The N' x N' matrix
//    never leaves registers.
#include "common.cuh"
#include "launchers.h"

namespace guidedrop {
namespace {

// P_ii = |â_i·â_i − 1| exactly, as the reference sets it: 1 − (min(‖a_i‖, 1e-12) / 1e-12)²,
// i.e. 0 for a row of norm >= 1e-12 (a unit row) and 1 for a zero row (NaN stays NaN).
// __fmul_rn: no FMA contraction, the reference rounds q * q before the subtraction.
__device__ __forceinline__ float diagonal_term(float norm) {
  const float q = min_nan(norm, 1e-12f) / 1e-12f;
  return 1.f - __fmul_rn(q, q);
}

template <typename scalar_t>
__global__ void pool_normalize_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                      const int64_t N, const int64_t C, const int64_t H,
                                      const int64_t W, const int64_t k, const int64_t Hp,
                                      const int64_t Wp, float* __restrict__ pooled,
                                      float* __restrict__ diag) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x >> 5;
  const int64_t Np = Hp * Wp, total = N * Np;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + (threadIdx.x >> 5); r < total;
       r += static_cast<int64_t>(gridDim.x) * warps) {  // uniform within the warp
    const int64_t n = r / Np, i = r % Np;
    const int64_t h0 = (i / Wp) * k, w0 = (i % Wp) * k;
    const int64_t h1 = min(h0 + k, H), w1 = min(w0 + k, W);
    const float count = static_cast<float>((h1 - h0) * (w1 - w0));
    float* row = pooled + r * C;
    float ss = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      const scalar_t* p = x + n * s.n + c * s.c;
      float sum = 0.f;
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t w = w0; w < w1; ++w) sum += to_float(p[h * s.h + w * s.w]);
      const float a = sum / count;
      row[c] = a;
      ss += a * a;
    }
    ss = warp_reduce(ss, SumOp());
    const float norm = sqrtf(ss);
    const float denom = max_nan(norm, 1e-12f);  // clamp_min keeps NaN
    for (int64_t c = lane; c < C; c += 32) row[c] = row[c] / denom;  // this lane wrote row[c]
    if (lane == 0) diag[r] = diagonal_term(norm);
  }
}

constexpr int kTile = 32;  // rows i, columns j and channels per tile
constexpr int kRowsY = 8;  // threadIdx.y; each thread holds kTile / kRowsY rows
constexpr int kPerThread = kTile / kRowsY;

__global__ void gram_rowsum_kernel(const float* __restrict__ a, const float* __restrict__ diag,
                                   const int64_t N, const int64_t Np, const int64_t C,
                                   float* __restrict__ F) {
  __shared__ float ai[kTile][kTile + 1];
  __shared__ float aj[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // uniform in the block
    const float* an = a + n * Np * C;
    float part[kPerThread] = {}, self[kPerThread] = {};
    for (int64_t j0 = 0; j0 < Np; j0 += kTile) {
      float acc[kPerThread] = {};
      for (int64_t c0 = 0; c0 < C; c0 += kTile) {
        const int64_t c = c0 + tx;
#pragma unroll
        for (int q = 0; q < kPerThread; ++q) {
          const int row = ty + kRowsY * q;
          const int64_t i = i0 + row, j = j0 + row;
          ai[row][tx] = (i < Np && c < C) ? an[i * C + c] : 0.f;
          aj[row][tx] = (j < Np && c < C) ? an[j * C + c] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int cc = 0; cc < kTile; ++cc) {
          const float bj = aj[tx][cc];
#pragma unroll
          for (int q = 0; q < kPerThread; ++q) acc[q] += ai[ty + kRowsY * q][cc] * bj;
        }
        __syncthreads();
      }
      const int64_t j = j0 + tx;
#pragma unroll
      for (int q = 0; q < kPerThread; ++q) {
        const int64_t i = i0 + ty + kRowsY * q;
        if (i < Np && j < Np) {
          const float p = fabsf(acc[q]);
          part[q] += p;
          if (i == j) self[q] = p;
        }
      }
    }
    // blockDim.x == 32: the lanes of a warp are the 32 columns of one tile row; lane
    // tx = ty + kRowsY * q (= i - j0 in the tile that holds j = i) has |â_i·â_i|.
    // F_i = (Σ_j |â_i·â_j| − |â_i·â_i| + P_ii) / N': the sum over every j takes the same
    // values in the same order for equal rows, wherever the diagonal falls, so equal rows
    // give exactly equal F (summing P_ii in place of |â_i·â_i| would not: Np = 33).
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const float sum = warp_reduce(part[q], SumOp());
      const float pii = __shfl_sync(kFullMask, self[q], ty + kRowsY * q);
      const int64_t i = i0 + ty + kRowsY * q;
      if (tx == 0 && i < Np) {
        F[n * Np + i] = ((sum - pii) + diag[n * Np + i]) / static_cast<float>(Np);
      }
    }
  }
}

}  // namespace

void launch_pooled_correlation(const at::TensorBase& x, int64_t k, const at::TensorBase& pooled,
                               const at::TensorBase& diag, const at::TensorBase& F) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hp = ceil_div(H, k), Wp = ceil_div(W, k), Np = Hp * Wp;
  if (N * Np == 0) return;
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::pooled_correlation", [&] {
    pool_normalize_kernel<scalar_t><<<grid_for(N * Np, kThreads / 32), kThreads, 0,
                                      current_stream()>>>(x.data_ptr<scalar_t>(), strides4(x),
                                                          N, C, H, W, k, Hp, Wp,
                                                          pooled.data_ptr<float>(),
                                                          diag.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const dim3 block(kTile, kRowsY);
  const dim3 grid(static_cast<unsigned>(ceil_div(Np, kTile)),
                  static_cast<unsigned>(std::min<int64_t>(N, 65535)));
  gram_rowsum_kernel<<<grid, block, 0, current_stream()>>>(
      pooled.data_ptr<float>(), diag.data_ptr<float>(), N, Np, C, F.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace guidedrop
