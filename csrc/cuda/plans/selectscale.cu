// Plan kernels of SelectScale and Selectout (SPEC §3): from the per-channel max |x| (the
// channel_stats op) and the uniforms u, the multipliers w (N, C) in ONE launch, bit for bit
// those of python/guidedrop/layers.py (selectscale / selectout on the reference backend).
//
// One block per sample (grid-stride over the samples):
// - candidates: the top k channels by amax, ties kept: amax >= the k-th largest (layers._top),
//   found by the radix select of common.cuh, which counts NaN as the largest like
//   torch.topk; the comparison is IEEE's, so a NaN amax is never a candidate;
// - SelectScale: w = lo + span * u on candidates, 1 elsewhere, with lo = float(retain) and
//   span = float(2 * (1 - retain)) rounded on the host, and one rounding per operation (the
//   reference's two tensor ops: no FMA contraction, hence __fmul_rn / __fadd_rn);
// - Selectout: v = u on candidates, +Inf elsewhere; the n_drop smallest v are dropped, ties
//   by lower index (the reference's stable argsort: NaN after +Inf, -0 equal to +0). The
//   n_drop-th smallest key t by the same radix select on inverted keys; then every key < t
//   is dropped, and of the keys == t the first (n_drop - #{key < t}) in channel order, found
//   by a block-wide prefix count of the ties. w = 0 there, float(1 / keep) elsewhere.
#include "../launchers.h"
#include "plan_common.cuh"

namespace guidedrop {
namespace {

// Ascending sort key of torch.sort on float32: -0 and +0 equal, every NaN equal and last.
__device__ __forceinline__ uint32_t sort_key(float v) { return float_key(v == 0.f ? 0.f : v); }

template <bool kSelectout>
__global__ void channel_plan_kernel(const float* __restrict__ amax, const Uniforms u,
                                    const int64_t N, const int64_t C, const uint32_t k,
                                    const uint32_t n_drop, const float lo, const float span,
                                    const float inv_keep, float* __restrict__ w) {
  __shared__ SelectSmem sel;
  __shared__ uint32_t scratch[32];    // block_reduce
  __shared__ uint32_t warp_ties[32];  // ties per warp of a chunk
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {  // uniform in the block
    const float* s = amax + n * C;
    float* wn = w + n * C;
    const float kth = key_float(
        block_select_kth_largest([&](int64_t c) { return float_key(s[c]); }, C, k, sel));
    if (!kSelectout) {
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
        wn[c] = s[c] >= kth ? __fadd_rn(lo, __fmul_rn(span, u(n, c))) : 1.f;
      continue;  // block_select_kth_largest ended with __syncthreads: sel may be reused
    }
    auto key = [&](int64_t c) { return sort_key(s[c] >= kth ? u(n, c) : INFINITY); };
    if (n_drop == 0) {
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) wn[c] = inv_keep;
      continue;
    }
    // t: the n_drop-th smallest key = ~(the n_drop-th largest inverted key).
    const uint32_t t = ~block_select_kth_largest([&](int64_t c) { return ~key(c); }, C, n_drop, sel);
    uint32_t below = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) below += key(c) < t;
    const uint32_t ties_dropped = n_drop - block_reduce(below, SumOp(), scratch);
    // Ties in channel order: a warp ballot per chunk of blockDim.x channels, the counts of
    // the warps before, and those of the chunks before (seen).
    uint32_t seen = 0;
    for (int64_t base = 0; base < C; base += blockDim.x) {  // uniform trip count
      const int64_t c = base + threadIdx.x;
      const uint32_t kc = c < C ? key(c) : 0u;
      const bool tie = c < C && kc == t;
      const unsigned ballot = __ballot_sync(kFullMask, tie);
      if (lane == 0) warp_ties[warp] = __popc(ballot);
      __syncthreads();
      uint32_t rank = seen + __popc(ballot & ((1u << lane) - 1u));  // ties before c
      for (int i = 0; i < warps; ++i) {
        if (i < warp) rank += warp_ties[i];
        seen += warp_ties[i];
      }
      if (c < C) wn[c] = (kc < t || (tie && rank < ties_dropped)) ? 0.f : inv_keep;
      __syncthreads();  // warp_ties is read before the next chunk writes it
    }
  }
}

template <bool kSelectout>
void launch(const at::TensorBase& amax, const at::TensorBase& noise, int64_t k, int64_t n_drop,
            float lo, float span, float inv_keep, const at::TensorBase& w) {
  const int64_t N = amax.size(0), C = amax.size(1);
  if (N * C == 0) return;
  const int threads = plan_threads(C);
  channel_plan_kernel<kSelectout><<<grid_for(N, 1), threads, 0, current_stream()>>>(
      amax.data_ptr<float>(), uniforms(noise), N, C, static_cast<uint32_t>(k),
      static_cast<uint32_t>(n_drop), lo, span, inv_keep, w.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_selectscale_plan(const at::TensorBase& amax, const at::TensorBase& noise, int64_t k,
                             float lo, float span, const at::TensorBase& w) {
  launch<false>(amax, noise, k, 0, lo, span, 0.f, w);
}

void launch_selectout_plan(const at::TensorBase& amax, const at::TensorBase& noise, int64_t k,
                           int64_t n_drop, float inv_keep, const at::TensorBase& w) {
  launch<true>(amax, noise, k, n_drop, 0.f, 0.f, inv_keep, w);
}

}  // namespace guidedrop
