// CamDrop's plan kernels (layers.camdrop, SPEC §6; issue 12). The plan is 4 launches, then
// the apply (apply_seeds) is the 5th; without noise the seeds draw Philox in their kernel,
// so there is no extra launch:
//   1. cam_kernel (class_activation.cu, launch_camdrop_cam): alpha = weight[target] averaged
//      over the C_fc / C columns of each channel, and the CAM J = sum_c alpha * x. Being the
//      FIRST kernel, it checks target's range (SPEC §6 step 0) with an asynchronous device
//      assertion that names `target`, and clamps the index, so that a bad target never reads
//      out of bounds (no host sync);
//   2. camdrop_candidates_kernel: the spatial top-k_s of J's rows and the channel top-k_c of
//      alpha's rows, ties kept (layers._top), by the exact radix select of common.cuh (NaN
//      ranks largest, as torch.topk, so a NaN is a candidate: in_top);
//   3. seed_bits (block_mask.cu) with both candidate masks; it zeroes the counters of 4.;
//   4. seeds_scale (plans/dropblock.cu): the coverage and the scale of `normalize`.
#include "../common.cuh"
#include "../launchers.h"

namespace guidedrop {
namespace {

// Rows 0 .. N-1: the top k_s of J's rows (N, L_s); rows N .. 2N-1: the top k_c of alpha's rows
// (N, L_c); o = v >= the k-th largest of the row, as bool. One block per row (grid-stride).
__global__ void camdrop_candidates_kernel(const float* __restrict__ J,
                                          const float* __restrict__ alpha, const int64_t N,
                                          const int64_t L_s, const int64_t L_c,
                                          const uint32_t k_s, uint32_t k_c,
                                          const double* __restrict__ k_c_ptr,
                                          bool* __restrict__ cand_s, bool* __restrict__ cand_c) {
  __shared__ SelectSmem sel;
  if (k_c_ptr != nullptr) k_c = static_cast<uint32_t>(*k_c_ptr);  // a runtime channel_rate's
  for (int64_t row = blockIdx.x; row < 2 * N; row += gridDim.x) {  // uniform in the block
    const bool spatial = row < N;
    const int64_t n = spatial ? row : row - N, L = spatial ? L_s : L_c;
    const float* v = (spatial ? J : alpha) + n * L;
    bool* o = (spatial ? cand_s : cand_c) + n * L;
    const float kth = key_float(block_select_kth_largest(
        [&](int64_t i) { return float_key(v[i]); }, L, spatial ? k_s : k_c, sel));
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) o[i] = in_top(v[i], kth);
    // block_select_kth_largest ended with __syncthreads: `sel` may be reused
  }
}

}  // namespace

void launch_camdrop_candidates(const at::TensorBase& J, const at::TensorBase& alpha,
                               int64_t k_s, int64_t k_c, const double* k_c_ptr,
                               const at::TensorBase& cand_s, const at::TensorBase& cand_c) {
  const int64_t N = alpha.size(0), C = alpha.size(1), L = J.size(1);
  if (N * C * L == 0) return;
  camdrop_candidates_kernel<<<grid_for(2 * N, 1), plan_threads(std::max(L, C)), 0,
                              current_stream()>>>(
      J.data_ptr<float>(), alpha.data_ptr<float>(), N, L, C, static_cast<uint32_t>(k_s),
      static_cast<uint32_t>(k_c), k_c_ptr, cand_s.data_ptr<bool>(), cand_c.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace guidedrop
