// CorrDrop's plan kernel (layers.corrdrop, SPEC §2; issue 12): between the statistics
// (pooled_correlation.cu: F (N, N') float32, one launch) and the apply (apply_block), ONE
// launch of one block turns F and the uniforms into S (N, H', W') uint8 and the scale (N,)
// float32, bit for bit the torch code's on the same F (the arithmetic of the Triton plan,
// triton_kernels/plans/corrdrop.py, in the reference's order). Per sample:
//   kappa = (F - min F) / (max F - min F) where the range is > 0 (and F has no NaN: torch's
//           amin / amax are then NaN and range > 0 is false), else 0;   float32
//   M = u0 < kappa,  z = #not M,  p_hat = min(1, p_blocks / max(z, 1))   float64, and
//           1 - p_hat too, rounded to float32 once (as the reference: SPEC §1's q),
//   S = M | (u1 < 1 - p_hat),  kept = sum of the units of the kept blocks (border blocks cut),
//   scale = layers._scale(kept, H*W, normalize): integer counts, then float64 as torch
//           (reciprocal(kept) * units; the batch's summed kept and units * N for "batch").
// One warp per sample (lanes over the pooled positions, three passes over F: range, z, S),
// then a block sum of the integer kept for "batch": the (N, N') state is small and one block
// reads it all. u: (2, N, H', W') of any floating dtype and strides, rounded to float32.
#include "../common.cuh"
#include "../launchers.h"

namespace guidedrop {
namespace {

constexpr int kPlanThreads = 1024;

__device__ __forceinline__ double scale_of(double kept, double units) {
  return kept > 0 ? (1.0 / fmax(kept, 1e-300)) * units : 0.0;
}

// Blocks of up to kPlanThreads (1024): nvcc keeps it at 64 registers a thread or fewer.
template <typename noise_t>
__global__ void __launch_bounds__(kPlanThreads)
corrdrop_plan_kernel(const float* __restrict__ F, const noise_t* __restrict__ u, const Strides4 us,
                     const double* __restrict__ p_ptr, const double p_value, const int64_t N,
                     const int64_t H, const int64_t W, const int64_t k, const int64_t Hp,
                     const int64_t Wp, const int norm, uint8_t* __restrict__ keep,
                     float* __restrict__ scale) {
  __shared__ long long scratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t Np = Hp * Wp;
  const double p_blocks = p_ptr != nullptr ? *p_ptr : p_value;
  long long batch = 0;  // this warp's samples' kept units (lane 0's copy is the one used)
  for (int64_t n = warp; n < N; n += warps) {  // uniform in the warp
    const float* f = F + n * Np;
    float fmin = INFINITY, fmax = -INFINITY;
    int nan = 0;
    for (int64_t i = lane; i < Np; i += 32) {
      const float v = f[i];
      if (v != v) nan = 1;
      else {
        fmin = fminf(fmin, v);
        fmax = fmaxf(fmax, v);
      }
    }
    fmin = warp_reduce(fmin, MinOp());
    fmax = warp_reduce(fmax, MaxOp());
    nan = warp_reduce(nan, SumOp());
    const bool ok = nan == 0 && fmax - fmin > 0.f;
    const float rng = ok ? fmax - fmin : 1.f;
    auto u_at = [&](int64_t plane, int64_t i) {
      return static_cast<float>(u[off4(us, plane, n, i / Wp, i % Wp)]);
    };
    auto kappa_at = [&](int64_t i) { return ok ? __fdiv_rn(f[i] - fmin, rng) : 0.f; };
    long long z = 0;
    for (int64_t i = lane; i < Np; i += 32) z += u_at(0, i) < kappa_at(i) ? 0 : 1;
    z = warp_reduce(z, SumOp());
    // (ones * p_blocks) / clamp_min(z, 1), clamped to 1, and 1 - p_hat: float64 (z as
    // float64, as torch promotes it; IEEE double division whatever the float flags),
    // rounded to float32 once
    const double p_hat = p_blocks / static_cast<double>(z > 0 ? z : 1);
    const float q = static_cast<float>(1.0 - (p_hat > 1.0 ? 1.0 : p_hat));  // NaN stays
    long long kept = 0;
    for (int64_t i = lane; i < Np; i += 32) {
      const bool s = u_at(0, i) < kappa_at(i) || u_at(1, i) < q;
      keep[n * Np + i] = s ? 1 : 0;
      const int64_t hi = i / Wp, wi = i % Wp;  // units of the block: border blocks are cut
      if (s) kept += min(H - hi * k, k) * min(W - wi * k, k);
    }
    kept = warp_reduce(kept, SumOp());
    if (norm == kNormBatch) batch += kept;
    else if (lane == 0)
      scale[n] = norm == kNormNone
                     ? 1.f
                     : static_cast<float>(scale_of(static_cast<double>(kept),
                                                   static_cast<double>(H * W)));
  }
  if (norm != kNormBatch) return;  // uniform in the block
  // Integer sum: exact; the reference's float64 sum of these integers is exact below 2^53.
  const long long total = block_reduce(lane == 0 ? batch : 0ll, SumOp(), scratch);
  const float s = static_cast<float>(scale_of(static_cast<double>(total),
                                              static_cast<double>(H * W * N)));
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) scale[n] = s;
}

}  // namespace

void launch_corrdrop_plan(const at::TensorBase& F, const at::TensorBase& noise,
                          const at::TensorBase& p_t, double p_value, int64_t H, int64_t W,
                          int64_t k, int normalize, const at::TensorBase& keep,
                          const at::TensorBase& scale) {
  const int64_t N = keep.size(0), Hp = keep.size(1), Wp = keep.size(2);
  if (N == 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(kPlanThreads, N * 32));
  const double* p_ptr = p_t.defined() ? p_t.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, noise.scalar_type(),
      "guidedrop::corrdrop_plan", [&] {
        corrdrop_plan_kernel<scalar_t><<<1, threads, 0, current_stream()>>>(
            F.data_ptr<float>(), noise.data_ptr<scalar_t>(), strides4(noise), p_ptr, p_value,
            N, H, W, k, Hp, Wp, normalize, keep.data_ptr<uint8_t>(), scale.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace guidedrop
