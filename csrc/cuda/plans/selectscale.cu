// Plan kernels of SelectScale and Selectout (SPEC §3): from the per-channel max |x| (the
// channel_stats op) and the uniforms u, the multipliers w (N, C) in ONE launch, bit for bit
// those of python/guidedrop/layers.py (selectscale / selectout on the reference backend).
//
// One block per sample (grid-stride over the samples):
// - candidates: the top k channels by amax, ties kept: amax >= the k-th largest (layers._top),
//   found by the radix select of common.cuh, which counts NaN as the largest like
//   torch.topk, so a NaN amax is a candidate (in_top);
// - SelectScale: w = lo + span * u on candidates, 1 elsewhere, with lo = float(retain) and
//   span = float(2 * (1 - retain)) rounded on the host, and one rounding per operation (the
//   reference's two tensor ops: no FMA contraction, hence __fmul_rn / __fadd_rn);
// - Selectout: the n_drop smallest keys are dropped, ties by lower index: the candidates by
//   u (the reference's stable sorts: NaN after +Inf, -0 equal to +0), then every other
//   channel (drop_key, kOther). The n_drop-th smallest key t by the same radix select on
//   inverted keys; then every key < t is dropped, and of the keys == t the first
//   (n_drop - #{key < t}) in channel order, found by a block-wide prefix count of the ties.
//   w = 0 there, float(1 / keep) elsewhere.
// Rates: computed on the host (eager), or, when `rates` is not null (torch.compile traces:
// the rates are symbolic there, a float64 (2,) tensor of [top_rate, retain or keep]), read
// and turned into k, n_drop, lo, span, 1 / keep here with the host's double arithmetic.
#include "../common.cuh"
#include "../launchers.h"

namespace guidedrop {
namespace {

// Selectout's order (layers.selectout): the candidates by u as torch.sort orders float32
// (-0 and +0 equal, every NaN equal and last: float_key's 0xffffffff, here one below), then
// every other channel (kOther). No float key is above +Inf's but NaN's, so a candidate's u
// of +Inf or NaN still ranks before the other channels (where(cand, u, inf) tied them).
constexpr uint32_t kOther = 0xffffffffu;
__device__ __forceinline__ uint32_t drop_key(float u) {
  return min(float_key(u == 0.f ? 0.f : u), kOther - 1);
}

struct ChannelRates {
  uint32_t k, n_drop;
  float lo, span, inv_keep;
};

// The host's arithmetic of csrc/guidedrop.cpp on rates = [top_rate, retain or keep]: round()
// is rint (half to even), every product and quotient in double, then rounded to float32.
__device__ __forceinline__ ChannelRates device_rates(const double* rates, int64_t C,
                                                     bool selectout) {
  const double top_rate = rates[0], q = rates[1], c = static_cast<double>(C);
  ChannelRates r;
  int64_t k = static_cast<int64_t>(rint(top_rate * c));
  k = k < 1 ? 1 : (k > C ? C : k);
  int64_t n_drop = selectout ? static_cast<int64_t>(rint((1.0 - q) * c)) : 0;
  n_drop = n_drop < 0 ? 0 : (n_drop > k ? k : n_drop);  // functional.selectout checks n_drop <= k
  r.k = static_cast<uint32_t>(k);
  r.n_drop = static_cast<uint32_t>(n_drop);
  r.lo = static_cast<float>(q);
  r.span = static_cast<float>(2.0 * (1.0 - q));
  r.inv_keep = static_cast<float>(1.0 / q);
  return r;
}

template <bool kSelectout>
__global__ void channel_plan_kernel(const float* __restrict__ amax, const Uniforms u,
                                    const int64_t N, const int64_t C, ChannelRates rt,
                                    const double* __restrict__ rates, float* __restrict__ w) {
  if (rates != nullptr) rt = device_rates(rates, C, kSelectout);
  const uint32_t k = rt.k, n_drop = rt.n_drop;
  const float lo = rt.lo, span = rt.span, inv_keep = rt.inv_keep;
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
        wn[c] = in_top(s[c], kth) ? __fadd_rn(lo, __fmul_rn(span, u(n, c))) : 1.f;
      continue;  // block_select_kth_largest ended with __syncthreads: sel may be reused
    }
    auto key = [&](int64_t c) { return in_top(s[c], kth) ? drop_key(u(n, c)) : kOther; };
    if (n_drop == 0) {
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) wn[c] = inv_keep;
      continue;
    }
    // t: the n_drop-th smallest key = ~(the n_drop-th largest inverted key).
    const uint32_t t =
        ~block_select_kth_largest([&](int64_t c) { return ~key(c); }, C, n_drop, sel);
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
void launch(const at::TensorBase& amax, const at::TensorBase& noise, const ChannelRates& rt,
            const at::TensorBase& rates, const at::TensorBase& w) {
  const int64_t N = amax.size(0), C = amax.size(1);
  if (N * C == 0) return;
  const int threads = plan_threads(C);
  channel_plan_kernel<kSelectout><<<grid_for(N, 1), threads, 0, current_stream()>>>(
      amax.data_ptr<float>(), uniforms(noise), N, C, rt,
      rates.defined() ? rates.data_ptr<double>() : nullptr, w.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_selectscale_plan(const at::TensorBase& amax, const at::TensorBase& noise, int64_t k,
                             float lo, float span, const at::TensorBase& rates,
                             const at::TensorBase& w) {
  launch<false>(amax, noise, {static_cast<uint32_t>(k), 0u, lo, span, 0.f}, rates, w);
}

void launch_selectout_plan(const at::TensorBase& amax, const at::TensorBase& noise, int64_t k,
                           int64_t n_drop, float inv_keep, const at::TensorBase& rates,
                           const at::TensorBase& w) {
  launch<true>(amax, noise,
               {static_cast<uint32_t>(k), static_cast<uint32_t>(n_drop), 0.f, 0.f, inv_keep},
               rates, w);
}

}  // namespace guidedrop
