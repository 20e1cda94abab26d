// DropBlock's plan kernel (layers.dropblock / layers._seeds_plan, SPEC §7; issue 12):
// between the seeds (seed_bits, block_mask.cu) and the apply (apply_seeds), ONE launch
// writes the seeds' r x r blocks, packed as the seeds (the plan's state: the apply then
// reads one bit per unit, r = 1), counts the units they cover and turns the counts into
// the multiplier:
//   kept[n] = C*H*W - covered[n] * (C / Cs),  scale = layers._scale(kept, C*H*W, normalize)
// exactly (integer counts, then float64 as torch: where(kept > 0, reciprocal(kept) * units,
// 0), units * N over the summed kept for "batch"), so the scale is bit for bit the
// reference's.
//
// Grid (blocks per sample, samples), a thread per byte of the blocks: every block adds
// its count of a sample into
// covered[n] (one int64 atomicAdd per block and sample: integer, deterministic). The scale
// needs every count ("batch": the whole batch's), so the LAST block to finish writes all
// the scales: each block fences its atomics (__threadfence) and then takes a ticket (an
// atomicAdd on a counter); the block that draws the last ticket has seen every block's
// counts. The counters live in a per-call int64 workspace (N counts + the ticket) that
// seed_bits_kernel, the launch before this one on the same stream, sets to 0: no memset
// launch, no state kept between calls, so concurrent calls on other streams cannot race.
// Maps with no unit (Cs*H*W = 0: seed_bits does not launch) take one block and no counter.
#include "../common.cuh"
#include "../launchers.h"
#include "../seed_cover.cuh"

namespace guidedrop {
namespace {

__device__ __forceinline__ double scale_of(double kept, double units) {
  return kept > 0 ? (1.0 / fmax(kept, 1e-300)) * units : 0.0;
}

__global__ void seeds_scale_kernel(const uint8_t* __restrict__ bits,
                                   uint8_t* __restrict__ blocks, const int64_t N,
                                   const int64_t C, const int64_t Cs, const int64_t H,
                                   const int64_t W, const int64_t Bn, const int64_t r,
                                   const int norm, long long* __restrict__ ws,
                                   float* __restrict__ scale) {
  __shared__ long long part[32];
  __shared__ bool last;
  const int64_t per_sample = Cs * H * W;
  long long* covered_n = ws;     // (N,)
  long long* ticket = ws + N;    // ()
  if (per_sample > 0) {
    for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // uniform in the block
      long long count = 0;
      // One thread per byte of the blocks (seed_cover.cuh's block_byte): written, counted.
      for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < Bn;
           b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const uint32_t m = block_byte(bits + n * Bn, Bn, b, per_sample, W, r);
        blocks[n * Bn + b] = static_cast<uint8_t>(m);
        count += __popc(m);
      }
      count = block_reduce(count, SumOp(), part);
      if (threadIdx.x == 0 && count) atomicAdd(reinterpret_cast<unsigned long long*>(covered_n + n),
                                               static_cast<unsigned long long>(count));
    }
    if (threadIdx.x == 0) {
      __threadfence();  // this block's counts are visible to every block before its ticket
      const unsigned long long blocks = static_cast<unsigned long long>(gridDim.x) * gridDim.y;
      last = atomicAdd(reinterpret_cast<unsigned long long*>(ticket), 1ull) == blocks - 1;
    }
    __syncthreads();
    if (!last) return;  // uniform in the block
    __threadfence();
  }
  // The last block: every count is in covered_n (read through volatile: not a stale cache).
  const volatile long long* cov = covered_n;
  const int64_t units = C * H * W, mult = C / Cs;
  long long batch = 0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const long long kept = units - (per_sample > 0 ? cov[n] : 0) * mult;
    if (norm == kNormBatch) batch += kept;
    else scale[n] = norm == kNormNone ? 1.f : static_cast<float>(scale_of(kept, units));
  }
  if (norm != kNormBatch) return;  // uniform in the block
  // Integer sum: exact; the reference's float64 sum of these integers is exact below 2^53.
  const long long total = block_reduce(batch, SumOp(), part);
  const float s = static_cast<float>(scale_of(static_cast<double>(total),
                                              static_cast<double>(units * N)));
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) scale[n] = s;
}

}  // namespace

void launch_seeds_scale(const at::TensorBase& bits, int64_t r, int64_t C, int64_t Cs, int64_t H,
                        int64_t W, int normalize, const at::TensorBase& ws,
                        const at::TensorBase& blocks, const at::TensorBase& scale) {
  const int64_t N = bits.size(0), Bn = bits.size(1);
  if (N == 0) return;
  const int64_t per_sample = Cs * H * W;
  const dim3 grid(per_sample > 0 ? std::min<unsigned>(grid_for(Bn, kThreads), 1024u) : 1u,
                  per_sample > 0 ? static_cast<unsigned>(std::min<int64_t>(N, 65535)) : 1u);
  seeds_scale_kernel<<<grid, kThreads, 0, current_stream()>>>(
      bits.data_ptr<uint8_t>(), blocks.data_ptr<uint8_t>(), N, C, Cs, H, W, Bn, r, normalize,
      reinterpret_cast<long long*>(ws.data_ptr<int64_t>()), scale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace guidedrop
