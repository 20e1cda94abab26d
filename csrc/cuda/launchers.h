// Host launchers of the CUDA kernels, called by csrc/guidedrop.cpp after it has checked
// every argument and allocated every output. Included by the .cpp and by every .cu, so a
// signature mismatch is a compile error. Only light ATen/c10 headers here: the .cu files
// must not pull in torch/extension.h (its headers multiply every .cu file's compile time).
//
// Conventions: x, t: (N, C, H, W) float32/float16/bfloat16, any strides. Small tensors
// (per-sample, per-map, masks, bits) are contiguous, on x's device, of the dtype named in
// python/guidedrop/backend_contract.md. Outputs are freshly allocated by the caller.
#pragma once

#include <ATen/core/TensorBase.h>
#include <ATen/cuda/PhiloxCudaState.h>

#include <cstdint>

namespace guidedrop {

// Soft-mask modes of AttentionDrop (SPEC §4), as passed to the kernels.
enum AttentionMode : int { kModeAM = 0, kModeSM = 1, kModeAD = 2 };

// pooled_correlation.cu. pooled: (N, N', C) float64 and row_flag: (N, N') float32 scratch
// (per pooled row: 1 for a zero row, NaN for a row with a NaN or Inf, else 0), colsum: (N, N')
// int64 scratch (the Gram tiles' column sums), F: (N, H', W') float32.
void launch_pooled_correlation(const at::TensorBase& x, int64_t k, const at::TensorBase& pooled,
                               const at::TensorBase& row_flag, const at::TensorBase& colsum,
                               const at::TensorBase& F);

// channel_ranking.cu. applied: undefined, or a 0-d bool (false: x is not read, amax and
// mean are 0). amax, mean: (N, C) float32. w: (N, C) float32.
void launch_channel_stats(const at::TensorBase& x, const at::TensorBase& applied,
                          const at::TensorBase& amax, const at::TensorBase& mean);
void launch_apply_channel(const at::TensorBase& t, const at::TensorBase& w,
                          const at::TensorBase& out);

// percentile_threshold.cu. v: (R, L) float32 any strides, out: (R,) float32.
void launch_kth_largest(const at::TensorBase& v, int64_t k, const at::TensorBase& out);
// out: (N, C) float32.
void launch_map_threshold(const at::TensorBase& x, int64_t k, const at::TensorBase& out);
// active: (N, C) bool; thr, mn, rcp: (N, C) float32 (rcp = range_reciprocal(min, max)),
// msum (N, C) float64, the exact sum (zeros for inactive maps).
void launch_attention_stats(const at::TensorBase& x, int64_t k, const at::TensorBase& active,
                            int mode, const at::TensorBase& thr, const at::TensorBase& mn,
                            const at::TensorBase& rcp, const at::TensorBase& msum);
// AttentionDrop's statistics drawing gamma = u < alpha itself (plan, issue 12): noise (N, C)
// float32/float64/float16/bfloat16 of any strides; alpha_t: undefined (then `alpha`) or a 0-dim
// float32; writes active (N, C) bool, thr, mn, r into state (N, C, 4) float32 (thr, -, mn, r:
// reference.attention_state, the scale left to launch_attentiondrop_scale) and msum (N, C) float64
// (zeros where inactive).
void launch_attentiondrop_stats(const at::TensorBase& x, int64_t k, const at::TensorBase& noise,
                                const at::TensorBase& alpha_t, float alpha, int mode,
                                const at::TensorBase& state, const at::TensorBase& msum,
                                const at::TensorBase& active);
// state: (N, C, 4) float32 contiguous, 16-byte aligned (reference.attention_state: thr,
// scale[n], mn, r), active: (N, C) bool.
void launch_apply_attention(const at::TensorBase& t, const at::TensorBase& x,
                            const at::TensorBase& state, const at::TensorBase& active, int mode,
                            const at::TensorBase& out);

// ------------------------------------------------------------------------ plan kernels
// csrc/cuda/plans/ (issue 12). normalize: 0 none, 1 sample, 2 batch (SPEC §1, layers._scale).
enum Normalize : int { kNormNone = 0, kNormSample = 1, kNormBatch = 2 };

// plans/attentiondrop.cu. msum: (N, C) float64, active: (N, C) bool, state: (N, C, 4)
// float32: kept[n] = sum_c (active ? msum : H*W) in float64, scale = layers._scale(kept,
// C*H*W) into state[n, c, 1] for every c.
void launch_attentiondrop_scale(const at::TensorBase& msum, const at::TensorBase& active,
                                int64_t HW, int normalize, const at::TensorBase& state);

// plans/dropblock.cu. bits: (N, ceil(Cs*H*W/8)) uint8 from launch_seed_bits with zero_ws =
// ws: (N + 1) int64; blocks: bits' shape, the seeds' packed r x r blocks
// (reference.seed_blocks); scale: (N,) float32 = layers._scale(C*H*W - covered * (C / Cs)).
void launch_seeds_scale(const at::TensorBase& bits, int64_t r, int64_t C, int64_t Cs, int64_t H,
                        int64_t W, int normalize, const at::TensorBase& ws,
                        const at::TensorBase& blocks, const at::TensorBase& scale);

// plans/corrdrop.cu. F: (N, H'*W') float32 from launch_pooled_correlation; noise:
// (2, N, H', W') float32/float64/float16/bfloat16, any strides; p_t: undefined (then
// p_value) or a 0-dim float64 (p_blocks = p * H*W / block_size²); keep: (N, H', W') uint8,
// scale: (N,) float32.
void launch_corrdrop_plan(const at::TensorBase& F, const at::TensorBase& noise,
                          const at::TensorBase& p_t, double p_value, int64_t H, int64_t W,
                          int64_t k, int normalize, const at::TensorBase& keep,
                          const at::TensorBase& scale);

// plans/camdrop.cu (CamDrop's plan after launch_camdrop_cam, before seed_bits and seeds_scale).
// J: (N, L) and alpha: (N, C) float32 contiguous -> cand_s (N, L) and cand_c (N, C) bool: the
// top k_s of J's rows and the top k_c of alpha's rows, ties kept (1 <= k <= the row length);
// k_c read from device memory instead where k_c_ptr is not null (a float64 count).
void launch_camdrop_candidates(const at::TensorBase& J, const at::TensorBase& alpha,
                               int64_t k_s, int64_t k_c, const double* k_c_ptr,
                               const at::TensorBase& cand_s, const at::TensorBase& cand_c);

// class_activation.cu: the CAM, one kernel for the cam op and CamDrop's plan. The cam op:
// alpha: (N, C) float32 of any strides, J: (N, H, W) float32 out.
void launch_cam(const at::TensorBase& x, const at::TensorBase& alpha, const at::TensorBase& J);
// CamDrop's first plan kernel (plans/camdrop.cu runs the rest). weight: (K, C_fc)
// float32/float64/float16/bfloat16 of any strides, C_fc a multiple of C >= 1; target: (N,)
// int64/int32/int16/int8/uint8/uint16/uint32/uint64 of any stride, read by value: asserted
// in [0, K) on the device (an asynchronous assertion naming `target`) and clamped. Writes alpha (N, C) float32 (the
// C_fc / C columns of weight[target] averaged) and J: (N, H*W) float32 (the CAM).
void launch_camdrop_cam(const at::TensorBase& x, const at::TensorBase& weight,
                        const at::TensorBase& target, const at::TensorBase& alpha,
                        const at::TensorBase& J);

// block_mask.cu.
// bits: (N, ceil(Cs*H*W/8)) uint8 output, one bit string per sample, bit i = the unit
// (cs, h, w) with i = (cs * H + h) * W + w. noise: undefined, or (N, Cs, H, W) floating of
// any dtype and strides (then `philox` is unused); cand_s: undefined or (N, H, W) bool;
// cand_c: undefined or (N, Cs) bool; g: the seed rate, a 0-dim float32 read in the kernel,
// or undefined (then `g_value`). zero_ws: undefined, or an int64 workspace the kernel sets
// to 0 (the counters of launch_seeds_scale, which runs next on the stream: no memset).
void launch_seed_bits(const at::TensorBase& noise, const at::TensorBase& cand_s,
                      const at::TensorBase& cand_c, const at::TensorBase& g, float g_value,
                      int64_t r, int64_t Cs, int64_t H, int64_t W, at::PhiloxCudaState philox,
                      const at::TensorBase& bits, const at::TensorBase& zero_ws);
// out: (N,) int64, zero-initialised by the caller.
void launch_seed_coverage(const at::TensorBase& bits, int64_t r, int64_t Cs, int64_t H,
                          int64_t W, const at::TensorBase& out);
// mask: (N, Hs, Ws) uint8, scale: (N,) float32.
void launch_apply_block(const at::TensorBase& t, const at::TensorBase& mask, int64_t k,
                        const at::TensorBase& scale, const at::TensorBase& out);
// bits: (N, ceil(Cs*H*W/8)) uint8, Cs = 1 when shared (one map for every channel) else C;
// scale: (N,) float32.
void launch_apply_seeds(const at::TensorBase& t, const at::TensorBase& bits, int64_t r,
                        bool shared, const at::TensorBase& scale, const at::TensorBase& out);

// ------------------------------------------------------------------------ plan kernels
// csrc/cuda/plans/: one launch each between a layer's statistics and its apply (issue 12).
// noise: floating of any dtype (rounded to float32 in the kernel) and any strides.
// rates: undefined (the rates as the float arguments computed on the host), or float64 (2,)
// contiguous on the device, read by the kernel instead (torch.compile: symbolic rates).

// plans/selectscale.cu. amax: (N, C) float32 contiguous, noise: (N, C), w: (N, C) float32.
// k: the candidates (1 <= k <= C); lo, span: float(retain), float(2 * (1 - retain)).
void launch_selectscale_plan(const at::TensorBase& amax, const at::TensorBase& noise, int64_t k,
                             float lo, float span, const at::TensorBase& rates,
                             const at::TensorBase& w);
// n_drop: the channels dropped (0 <= n_drop <= C); inv_keep: float(1 / keep).
void launch_selectout_plan(const at::TensorBase& amax, const at::TensorBase& noise, int64_t k,
                           int64_t n_drop, float inv_keep, const at::TensorBase& rates,
                           const at::TensorBase& w);

// plans/focused_dropout.cu. mean: (N, C) float32 contiguous (C >= 1); noise: (N, H, W) when
// per_position, else (N,); lo, span: float(low), float(high - low); mask: (N, H, W) uint8,
// scale: (N,) float32 (ones). applied: undefined, or a 0-d bool (false: mask all ones,
// nothing read but applied).
void launch_focused_dropout_plan(const at::TensorBase& x, const at::TensorBase& mean,
                                 const at::TensorBase& noise, bool per_position, float lo,
                                 float span, const at::TensorBase& rates,
                                 const at::TensorBase& applied, const at::TensorBase& mask,
                                 const at::TensorBase& scale);

}  // namespace guidedrop
