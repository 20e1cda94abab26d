// AttentionDrop's plan kernel (layers.attentiondrop, SPEC §4; issue 12): between the
// statistics (attentiondrop_stats in percentile_threshold.cu, which also draws gamma) and
// the apply (apply_attention), one launch of one block computes, per sample,
//   kept[n] = sum_c (gamma[n, c] ? msum[n, c] : H*W)   in float64,
// and the multiplier of SPEC §1 exactly as layers._scale computes it in float64 before
// rounding to float32: where(kept > 0, units / kept.clamp_min(1e-300), 0), with torch's
// `int / tensor` = reciprocal(tensor) * int, over the whole batch for "batch", written into
// every map's state (reference.attention_state: thr, scale, mn, r).
// One warp per sample (lanes over channels, a fixed-order butterfly sum), then a block sum
// for "batch": the (N, C) state is small, one block reads it all, no second launch.
// The scale is the reference's bit for bit: msum and the sums of it here are exact float64
// sums (every soft-mask value is a multiple of 2^-24 in [0, 1]: backend_contract.md).
#include "../common.cuh"
#include "../launchers.h"

namespace guidedrop {
namespace {

constexpr int kPlanThreads = 1024;

__device__ __forceinline__ double scale_of(double kept, double units) {
  return kept > 0 ? (1.0 / fmax(kept, 1e-300)) * units : 0.0;  // NaN kept: 0, as torch.where
}

// Blocks of up to kPlanThreads (1024): nvcc keeps it at 64 registers a thread or fewer.
__global__ void __launch_bounds__(kPlanThreads)
attentiondrop_scale_kernel(const double* __restrict__ msum, const bool* __restrict__ active,
                           const int64_t N, const int64_t C, const int64_t HW, const int norm,
                           float* __restrict__ state) {
  __shared__ double scratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const double units = static_cast<double>(C * HW);
  double batch = 0.0;  // this warp's samples, summed (lane 0's copy is the one used)
  for (int64_t n = warp; n < N; n += warps) {  // uniform in the warp
    double kept = 0.0;
    for (int64_t c = lane; c < C; c += 32) {
      const int64_t m = n * C + c;
      kept += active[m] ? msum[m] : static_cast<double>(HW);
    }
    kept = warp_reduce(kept, SumOp());
    if (norm == kNormBatch) {
      batch += kept;
    } else {
      const float s = norm == kNormNone ? 1.f : static_cast<float>(scale_of(kept, units));
      for (int64_t c = lane; c < C; c += 32) state[(n * C + c) * 4 + 1] = s;
    }
  }
  if (norm != kNormBatch) return;  // uniform in the block
  const double total = block_reduce(lane == 0 ? batch : 0.0, SumOp(), scratch);
  const float s = static_cast<float>(scale_of(total, static_cast<double>(N * C * HW)));
  for (int64_t m = threadIdx.x; m < N * C; m += blockDim.x) state[m * 4 + 1] = s;
}

}  // namespace

void launch_attentiondrop_scale(const at::TensorBase& msum, const at::TensorBase& active,
                                int64_t HW, int normalize, const at::TensorBase& state) {
  const int64_t N = msum.size(0), C = msum.size(1);
  if (N == 0) return;
  // One warp per sample, up to kPlanThreads.
  const int threads = static_cast<int>(std::min<int64_t>(kPlanThreads, N * 32));
  attentiondrop_scale_kernel<<<1, threads, 0, current_stream()>>>(
      msum.data_ptr<double>(), active.data_ptr<bool>(), N, C, HW, normalize,
      state.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace guidedrop
