// Plan kernel of FocusedDropout (SPEC §5): from the channel means (the channel_stats op),
// x and the uniforms u, the spatial keep mask (N, H, W) uint8 and the scale (N,) of ones of
// the apply_block kernel, in ONE launch, bit for bit python/guidedrop/layers.py's
// focused_dropout on the reference backend.
//
// One block per sample (grid-stride over the samples):
// 1. r = argmax_c mean[n, c] like torch.argmax: the first index on ties, the first NaN when
//    there is one (NaN is the largest);
// 2. v = max over (h, w) of x[n, r] in float32, NaN-propagating (torch.amax);
// 3. gamma = lo + span * u (u[n], or u[n, h, w] per position) with lo = float(low) and
//    span = float(high - low) rounded on the host, one rounding per operation (the
//    reference's tensor ops: no FMA contraction); keep = x[n, r, h, w] > gamma * v, or
//    v <= 0 (the sample is left unchanged).
// The scale is written here (1 per sample) rather than by a torch.ones launch.
// applied (optional 0-d bool, the module's participation under torch.compile / CUDA graphs,
// SPEC §5): when it holds false the kernel writes keep = 1 everywhere and scale = 1 and reads
// neither x nor mean, so the apply then gives y = x bit for bit from one read of x.
// Rates: lo and span from the host (eager), or, when `rates` is not null (torch.compile
// traces: symbolic rates), from the float64 (2,) tensor [low, high] with the same arithmetic.
#include "../common.cuh"
#include "../launchers.h"

namespace guidedrop {
namespace {

// Whether (a, i) comes before (b, j) in torch.argmax's order: NaN first, then larger
// values, then the lower index.
__device__ __forceinline__ bool argmax_before(float a, int64_t i, float b, int64_t j) {
  const bool an = a != a, bn = b != b;
  if (an != bn) return an;
  if (!an && a != b) return a > b;
  return i < j;
}

template <typename scalar_t>
__global__ void focused_dropout_plan_kernel(const scalar_t* __restrict__ x, const Strides4 xs,
                                            const float* __restrict__ mean, const Uniforms u,
                                            const int64_t N, const int64_t C, const int64_t H,
                                            const int64_t W, const bool per_position,
                                            float lo, float span,
                                            const double* __restrict__ rates,
                                            const bool* __restrict__ applied,
                                            uint8_t* __restrict__ mask,
                                            float* __restrict__ scale) {
  if (rates != nullptr) {
    lo = static_cast<float>(rates[0]);
    span = static_cast<float>(rates[1] - rates[0]);
  }
  __shared__ float best_v[kThreads];
  __shared__ int64_t best_i[kThreads];
  __shared__ float scratch[32];
  const int64_t HW = H * W;
  const bool on = applied == nullptr || *applied;  // uniform in the grid
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {  // uniform in the block
    if (!on) {  // the identity: keep everything
      if (threadIdx.x == 0) scale[n] = 1.f;
      for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) mask[n * HW + i] = 1;
      continue;
    }
    // 1. argmax of the means: each thread over its channels, then thread 0 over the threads.
    float bv = NAN;
    int64_t bi = -1;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float m = mean[n * C + c];
      if (bi < 0 || argmax_before(m, c, bv, bi)) {
        bv = m;
        bi = c;
      }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int t = 1; t < blockDim.x; ++t) {
        if (best_i[t] >= 0 && (bi < 0 || argmax_before(best_v[t], best_i[t], bv, bi))) {
          bv = best_v[t];
          bi = best_i[t];
        }
      }
      best_i[0] = bi;
      scale[n] = 1.f;
    }
    __syncthreads();
    const scalar_t* ref = x + n * xs.n + best_i[0] * xs.c;
    // 2. v = max of the reference map.
    float v = -INFINITY;
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x)
      v = max_nan(v, to_float(ref[(i / W) * xs.h + (i % W) * xs.w]));
    v = block_reduce(v, MaxOp(), scratch);  // ends with __syncthreads: best_i may be reused
    // 3. the mask.
    const float g = per_position ? 0.f : __fadd_rn(lo, __fmul_rn(span, u(n)));
    for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
      const int64_t h = i / W, w = i % W;
      const float gamma = per_position ? __fadd_rn(lo, __fmul_rn(span, u(n, h, w))) : g;
      const float r = to_float(ref[h * xs.h + w * xs.w]);
      mask[n * HW + i] = (r > __fmul_rn(gamma, v) || v <= 0.f) ? 1 : 0;
    }
  }
}

}  // namespace

void launch_focused_dropout_plan(const at::TensorBase& x, const at::TensorBase& mean,
                                 const at::TensorBase& noise, bool per_position, float lo,
                                 float span, const at::TensorBase& rates,
                                 const at::TensorBase& applied, const at::TensorBase& mask,
                                 const at::TensorBase& scale) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (N == 0) return;
  const int threads = plan_threads(std::max(C, H * W));
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::focused_dropout_plan", [&] {
    focused_dropout_plan_kernel<scalar_t><<<grid_for(N, 1), threads, 0, current_stream()>>>(
        x.data_ptr<scalar_t>(), strides4(x), mean.data_ptr<float>(), uniforms(noise), N, C, H,
        W, per_position, lo, span, rates.defined() ? rates.data_ptr<double>() : nullptr,
        applied.defined() ? applied.data_ptr<bool>() : nullptr, mask.data_ptr<uint8_t>(),
        scale.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace guidedrop
