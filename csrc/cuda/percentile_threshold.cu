// Exact k-th largest per row / per map (AttentionDrop's top-percentile threshold, the
// top-k candidates of SelectScale and CamDrop), AttentionDrop's per-map statistics and its
// apply kernel.
//
// One block per row (kth_largest) or per (n, c) map (map_threshold, attention_stats), in
// a grid-stride loop over rows. The row's values are read once into shared memory as
// order-preserving uint32 keys when they fit (<= kSmemKeys), else re-read from global
// memory at every pass. block_select_kth_largest (common.cuh) then finds the exact k-th
// largest key with four 8-bit radix passes (histogram in shared memory, ties counted, so
// the top k are exactly the values >= the result). Block-stride loops cover rows of any
// length. attention_stats skips the maps whose gamma is 0 (their outputs are 0) and adds
// the NaN-propagating min / max and the float32 sum of the soft mask S (SPEC §4).
#include "common.cuh"
#include "launchers.h"

#include <cmath>

namespace guidedrop {
namespace {

constexpr int64_t kSmemKeys = 10240;  // 40 KiB of keys: under the 48 KiB default limit

int select_threads(int64_t L) {
  if (L >= kThreads) return kThreads;
  return static_cast<int>(std::max<int64_t>(32, ceil_div(L, 32) * 32));
}

// Rows are maps (n, c) of x: unit i of map m = n * C + c sits at
// n * s.n + c * s.c + (i / W) * s.h + (i % W) * s.w. A matrix v (R, L) is the case
// C = 1, H = 1, W = L, s = (stride(0), 0, 0, stride(1)).
// active == nullptr: threshold only (mn, mx, msum unused, may be nullptr).
template <typename scalar_t>
__global__ void map_select_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                  const int64_t maps, const int64_t C, const int64_t H,
                                  const int64_t W, const uint32_t k,
                                  const bool* __restrict__ active, const int mode,
                                  const bool use_smem, float* __restrict__ thr,
                                  float* __restrict__ mn, float* __restrict__ mx,
                                  float* __restrict__ msum) {
  extern __shared__ uint32_t keys[];  // H * W keys when use_smem
  __shared__ SelectSmem sel;
  __shared__ float scratch[32];
  const bool stats = active != nullptr;
  const int64_t L = H * W;
  for (int64_t m = blockIdx.x; m < maps; m += gridDim.x) {  // uniform in the block
    if (stats && !active[m]) {
      if (threadIdx.x == 0) thr[m] = mn[m] = mx[m] = msum[m] = 0.f;
      continue;
    }
    const scalar_t* base = x + (m / C) * s.n + (m % C) * s.c;
    auto load = [&](int64_t i) { return to_float(base[(i / W) * s.h + (i % W) * s.w]); };

    float lo = INFINITY, hi = -INFINITY;
    if (use_smem || stats) {
      for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
        const float v = load(i);
        if (use_smem) keys[i] = float_key(v);
        lo = min_nan(lo, v);
        hi = max_nan(hi, v);
      }
    }
    __syncthreads();  // keys are visible to the whole block
    auto get = [&](int64_t i) { return use_smem ? keys[i] : float_key(load(i)); };
    const float t = key_float(block_select_kth_largest(get, L, k, sel));
    if (!stats) {
      if (threadIdx.x == 0) thr[m] = t;
      continue;  // block_select_kth_largest ended with __syncthreads: keys may be reused
    }
    lo = block_reduce(lo, MinOp(), scratch);
    hi = block_reduce(hi, MaxOp(), scratch);
    float sum = 0.f;
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      const float v = use_smem ? key_float(keys[i]) : load(i);  // the key round-trips exactly
      sum += soft_mask(v, t, lo, hi, mode);
    }
    sum = block_reduce(sum, SumOp(), scratch);  // ends with __syncthreads
    if (threadIdx.x == 0) {
      thr[m] = t;
      mn[m] = lo;
      mx[m] = hi;
      msum[m] = sum;
    }
  }
}

template <typename scalar_t>
void launch_map_select(const scalar_t* x, const Strides4& s, int64_t maps, int64_t C, int64_t H,
                       int64_t W, int64_t k, const bool* active, int mode, float* thr, float* mn,
                       float* mx, float* msum) {
  if (maps == 0) return;
  const int64_t L = H * W;
  const bool use_smem = L <= kSmemKeys;
  const size_t smem = use_smem ? static_cast<size_t>(L) * sizeof(uint32_t) : 0;
  map_select_kernel<scalar_t>
      <<<grid_for(maps, 1), select_threads(L), smem, current_stream()>>>(
          x, s, maps, C, H, W, static_cast<uint32_t>(k), active, mode, use_smem, thr, mn, mx,
          msum);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
struct AttentionW {
  const scalar_t* x;
  Strides4 xs;
  const float *thr, *mn, *mx, *scale;
  const bool* active;
  int64_t C;
  int mode;
  // reference: torch.where(active, S, 1) * scale[n]; x is read only for active maps.
  __device__ __forceinline__ float operator()(const Coord4& p) const {
    const int64_t m = p.n * C + p.c;
    float s = 1.f;
    if (active[m]) s = soft_mask(to_float(x[off4(xs, p)]), thr[m], mn[m], mx[m], mode);
    return s * scale[p.n];
  }
};

}  // namespace

void launch_kth_largest(const at::TensorBase& v, int64_t k, const at::TensorBase& out) {
  const Strides4 s{v.stride(0), 0, 0, v.stride(1)};
  launch_map_select<float>(v.data_ptr<float>(), s, v.size(0), 1, 1, v.size(1), k, nullptr, 0,
                           out.data_ptr<float>(), nullptr, nullptr, nullptr);
}

void launch_map_threshold(const at::TensorBase& x, int64_t k, const at::TensorBase& out) {
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::map_threshold", [&] {
    launch_map_select<scalar_t>(x.data_ptr<scalar_t>(), strides4(x), x.size(0) * x.size(1),
                                x.size(1), x.size(2), x.size(3), k, nullptr, 0,
                                out.data_ptr<float>(), nullptr, nullptr, nullptr);
  });
}

void launch_attention_stats(const at::TensorBase& x, int64_t k, const at::TensorBase& active,
                            int mode, const at::TensorBase& thr, const at::TensorBase& mn,
                            const at::TensorBase& mx, const at::TensorBase& msum) {
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::attention_stats", [&] {
    launch_map_select<scalar_t>(x.data_ptr<scalar_t>(), strides4(x), x.size(0) * x.size(1),
                                x.size(1), x.size(2), x.size(3), k, active.data_ptr<bool>(),
                                mode, thr.data_ptr<float>(), mn.data_ptr<float>(),
                                mx.data_ptr<float>(), msum.data_ptr<float>());
  });
}

void launch_apply_attention(const at::TensorBase& t, const at::TensorBase& x,
                            const at::TensorBase& thr, const at::TensorBase& mn,
                            const at::TensorBase& mx, const at::TensorBase& active, int mode,
                            const at::TensorBase& scale, const at::TensorBase& out) {
  // t (x or grad_y) has x's dtype: checked by the caller.
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::apply_attention", [&] {
    const AttentionW<scalar_t> wfn{x.data_ptr<scalar_t>(), strides4(x),
                                   thr.data_ptr<float>(),  mn.data_ptr<float>(),
                                   mx.data_ptr<float>(),   scale.data_ptr<float>(),
                                   active.data_ptr<bool>(), x.size(1),
                                   mode};
    launch_apply<scalar_t>(t, out, wfn);
  });
}

}  // namespace guidedrop
