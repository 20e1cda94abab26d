// guidedrop._C: the operator schemas (TORCH_LIBRARY) and their CUDA implementations
// (TORCH_LIBRARY_IMPL) of the hot-path primitives of python/guidedrop/backend_contract.md.
//
// This is the only translation unit that includes <torch/library.h> (and Python.h):
// it checks every argument (TORCH_CHECK with the op and argument names), allocates the
// outputs and calls the launchers of csrc/cuda/*.cu, which include only ATen/c10 headers.
// Every op is functional: inputs are never mutated, outputs are new tensors (so
// torch.library.opcheck and torch.compile can use the fake implementations registered in
// python/guidedrop/cuda_backend.py). CPU tensors get a clear error from a CPU kernel that
// only raises.
#include <Python.h>

#include <ATen/core/Generator.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>

#include "cuda/launchers.h"

namespace guidedrop {
namespace {

constexpr int64_t kMaxRow = (int64_t(1) << 31) - 1;  // rows / maps selected in one block

// ------------------------------------------------------------------------ checks

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), op, ": ", name,
              " must be a CUDA tensor (the guidedrop CUDA kernels run on the GPU; use the "
              "reference backend elsewhere), got a tensor on ",
              t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a strided (dense) tensor");
}

void check_feature_map(const at::Tensor& x, const char* op, const char* name) {
  check_cuda(x, op, name);
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt,
              " (float64 runs on the reference backend)");
}

// A small state tensor: on `like`'s device, of `dtype` and exactly `shape`.
void check_small(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name,
                 at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

void check_positive(int64_t v, const char* op, const char* name) {
  TORCH_CHECK(v >= 1, op, ": ", name, " must be >= 1, got ", v);
}

void check_k(int64_t k, int64_t L, const char* op) {
  TORCH_CHECK(L <= kMaxRow, op, ": rows of more than 2^31 - 1 values are not supported, got ", L);
  TORCH_CHECK(k >= 1 && k <= L, op, ": k must be in [1, ", L, "], got ", k);
}

int parse_mode(c10::string_view mode_view, const char* op) {
  const std::string mode(mode_view.data(), mode_view.size());
  if (mode == "am") return kModeAM;
  if (mode == "sm") return kModeSM;
  TORCH_CHECK(mode == "ad", op, ": mode must be one of 'am', 'sm', 'ad', got '", mode, "'");
  return kModeAD;
}

// noise: the uniforms of SPEC §1 in the dtypes the kernels read (not float8 or float4,
// which at::isFloatingType admits: a kernel would read their bytes as another type).
void check_noise(const at::Tensor& noise, const at::Tensor& like, const char* op,
                 at::IntArrayRef shape) {
  TORCH_CHECK(noise.defined(), op, ": noise is an undefined tensor");
  TORCH_CHECK(noise.device() == like.device(), op, ": noise must be on ", like.device(),
              ", got ", noise.device());
  const auto dt = noise.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, ": noise must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(noise.sizes() == shape, op, ": noise must have shape ", shape, ", got ",
              noise.sizes());
}

// reference.one_window: a block at least as large as the map is one window (the same
// pooling, the same indices), so that no work or memory grows with k beyond the map.
int64_t one_window(int64_t k, int64_t H, int64_t W) {
  return std::min(k, std::max<int64_t>({H, W, 1}));
}

at::TensorOptions f32(const at::Tensor& like) { return like.options().dtype(at::kFloat); }

// ------------------------------------------------------------------------ statistics

// F (N, N') of x into F with its scratch (launchers.h): the rows â in float64 (k^2 times
// smaller than x), a flag per row and the Gram's int64 column sums. k <= max(H, W).
void pooled_correlation_into(const at::Tensor& x, int64_t k, const at::Tensor& F) {
  const int64_t N = x.size(0), C = x.size(1), Np = F.numel() / std::max<int64_t>(N, 1);
  at::Tensor pooled = at::empty({N, Np, C}, x.options().dtype(at::kDouble));
  at::Tensor row_flag = at::empty({N, Np}, f32(x));
  at::Tensor colsum = at::empty({N, Np}, x.options().dtype(at::kLong));
  launch_pooled_correlation(x, k, pooled, row_flag, colsum, F);
}

at::Tensor pooled_correlation(const at::Tensor& x, int64_t k) {
  constexpr const char* op = "guidedrop::pooled_correlation";
  check_feature_map(x, op, "x");
  check_positive(k, op, "k");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  k = one_window(k, H, W);
  const int64_t Hp = (H + k - 1) / k, Wp = (W + k - 1) / k;
  at::Tensor F = at::empty({N, Hp, Wp}, f32(x));
  pooled_correlation_into(x, k, F);
  return F;
}

// applied: an optional 0-d bool on x's device (FocusedDropout's participation, SPEC §5):
// where it holds False the kernel reads nothing of x and writes the statistics of a zero map.
at::Tensor check_applied(const std::optional<at::Tensor>& applied, const at::Tensor& like,
                         const char* op) {
  if (!applied.has_value() || !applied->defined()) return at::Tensor();
  check_small(*applied, like, op, "applied", at::kBool, {});
  return *applied;
}

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& applied) {
  constexpr const char* op = "guidedrop::channel_stats";
  check_feature_map(x, op, "x");
  const int64_t N = x.size(0), C = x.size(1);
  const at::Tensor on = check_applied(applied, x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor amax = at::empty({N, C}, f32(x));
  at::Tensor mean = at::empty({N, C}, f32(x));
  if (x.size(2) * x.size(3) == 0) {  // empty maps: max |x| = 0, mean = NaN (as torch.mean)
    amax.fill_(0.f);
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    return {amax, mean};
  }
  launch_channel_stats(x, on, amax, mean);
  return {amax, mean};
}

at::Tensor kth_largest(const at::Tensor& v, int64_t k) {
  constexpr const char* op = "guidedrop::kth_largest";
  check_cuda(v, op, "v");
  TORCH_CHECK(v.dim() == 2, op, ": v must be 2-D (R, L), got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat, op, ": v must be float32, got ", v.scalar_type());
  check_k(k, v.size(1), op);
  const c10::cuda::CUDAGuard guard(v.device());
  at::Tensor out = at::empty({v.size(0)}, f32(v));
  launch_kth_largest(v, k, out);
  return out;
}

at::Tensor map_threshold(const at::Tensor& x, int64_t k) {
  constexpr const char* op = "guidedrop::map_threshold";
  check_feature_map(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), x.size(1)}, f32(x));
  if (x.size(2) * x.size(3) == 0) {  // no k-th largest in an empty map
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    return out;
  }
  check_k(k, x.size(2) * x.size(3), op);
  launch_map_threshold(x, k, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_stats(
    const at::Tensor& x, int64_t k, const at::Tensor& active, c10::string_view mode) {
  constexpr const char* op = "guidedrop::attention_stats";
  check_feature_map(x, op, "x");
  check_k(k, x.size(2) * x.size(3), op);
  const int64_t N = x.size(0), C = x.size(1);
  check_small(active, x, op, "active", at::kBool, {N, C});
  const int m = parse_mode(mode, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor act = active.contiguous();
  at::Tensor thr = at::empty({N, C}, f32(x)), mn = at::empty({N, C}, f32(x));
  at::Tensor rcp = at::empty({N, C}, f32(x));  // range_reciprocal(min, max)
  at::Tensor msum = at::empty({N, C}, x.options().dtype(at::kDouble));  // exact sums
  launch_attention_stats(x, k, act, m, thr, mn, rcp, msum);
  return {thr, mn, rcp, msum};
}

at::Tensor cam(const at::Tensor& x, const at::Tensor& alpha) {
  constexpr const char* op = "guidedrop::cam";
  check_feature_map(x, op, "x");
  check_small(alpha, x, op, "alpha", at::kFloat, {x.size(0), x.size(1)});
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor J = at::empty({x.size(0), x.size(2), x.size(3)}, f32(x));
  launch_cam(x, alpha, J);  // alpha read at its strides: no copy
  return J;
}

// ------------------------------------------------------------------------ seed masks

// The arguments of seed_bits / seeds_plan checked, the bits allocated and, without noise,
// the Philox state taken from the generator.
struct Seeds {
  at::Tensor noise, cand_s, cand_c, g, bits;  // undefined when absent
  float g_value = 0.f;
  at::PhiloxCudaState philox;
};

Seeds prepare_seeds(const at::Tensor& device_like, const std::optional<at::Tensor>& noise,
                    const std::optional<at::Tensor>& cand_s,
                    const std::optional<at::Tensor>& cand_c, at::IntArrayRef shape,
                    const std::optional<at::Tensor>& g, double g_value, int64_t r,
                    const std::optional<at::Generator>& generator, const char* op) {
  check_cuda(device_like, op, "device_like");
  TORCH_CHECK(shape.size() == 4, op, ": shape must be (N, Cs, H, W), got ", shape);
  for (const int64_t s : shape) TORCH_CHECK(s >= 0, op, ": shape must be >= 0, got ", shape);
  check_positive(r, op, "r");
  Seeds out;
  // g: the seed rate, a 0-dim float32 tensor read in the kernel or a float argument of it
  // (a runtime value either way), rounded to float32 like the uniforms (SPEC §1).
  if (g.has_value() && g->defined()) {
    check_small(*g, device_like, op, "g", at::kFloat, {});
    out.g = g->contiguous();
  }
  out.g_value = static_cast<float>(g_value);
  const int64_t N = shape[0], Cs = shape[1], H = shape[2], W = shape[3];
  if (noise.has_value() && noise->defined()) {
    check_noise(*noise, device_like, op, shape);
    out.noise = *noise;
  }
  if (cand_s.has_value() && cand_s->defined()) {
    check_small(*cand_s, device_like, op, "cand_s", at::kBool, {N, H, W});
    out.cand_s = cand_s->contiguous();
  }
  if (cand_c.has_value() && cand_c->defined()) {
    check_small(*cand_c, device_like, op, "cand_c", at::kBool, {N, Cs});
    out.cand_c = cand_c->contiguous();
  }
  // One bit string per sample, no padding per row or map: 1/16 of a 16-bit x.
  out.bits = at::empty({N, (Cs * H * W + 7) / 8}, device_like.options().dtype(at::kByte));
  if (!out.noise.defined() && out.bits.numel() > 0) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(device_like.device().index()));
    // See ATen's Note [Acquire lock when using random generators]. Each 128-bit Philox
    // output feeds 4 units, so every logical element uses 4 of the offset's 32-bit values.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    out.philox = gen->philox_cuda_state(4);
  }
  return out;
}

at::Tensor seed_bits(const at::Tensor& device_like, const std::optional<at::Tensor>& noise,
                     const std::optional<at::Tensor>& cand_s,
                     const std::optional<at::Tensor>& cand_c, at::IntArrayRef shape, const at::Tensor& g,
                     int64_t r, std::optional<at::Generator> generator) {
  constexpr const char* op = "guidedrop::seed_bits";
  check_cuda(device_like, op, "device_like");
  TORCH_CHECK(g.defined(), op, ": g is an undefined tensor");
  const c10::cuda::CUDAGuard guard(device_like.device());
  Seeds sd = prepare_seeds(device_like, noise, cand_s, cand_c, shape, g, 0.0, r, generator, op);
  launch_seed_bits(sd.noise, sd.cand_s, sd.cand_c, sd.g, sd.g_value, r, shape[1], shape[2],
                   shape[3], sd.philox, sd.bits, at::Tensor());
  return sd.bits;
}

at::Tensor seed_coverage(const at::Tensor& bits, int64_t r, int64_t cs, int64_t h, int64_t w) {
  constexpr const char* op = "guidedrop::seed_coverage";
  check_cuda(bits, op, "bits");
  check_positive(r, op, "r");
  TORCH_CHECK(cs >= 0 && h >= 0 && w >= 0, op, ": Cs, H, W must be >= 0, got ", cs, ", ", h,
              ", ", w);
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kByte &&
                  bits.size(1) == (cs * h * w + 7) / 8,
              op, ": bits must be uint8 (N, ceil(Cs*H*W/8)) = (N, ", (cs * h * w + 7) / 8,
              "), got ", bits.scalar_type(), " ", bits.sizes());
  const c10::cuda::CUDAGuard guard(bits.device());
  const at::Tensor b = bits.contiguous();
  at::Tensor out = at::zeros({bits.size(0)}, bits.options().dtype(at::kLong));
  launch_seed_coverage(b, r, cs, h, w, out);
  return out;
}

// ------------------------------------------------------------------------ plans
// The layers' plans (issue 12): statistics and plan kernels in one op (AttentionDrop's,
// CorrDrop's and the seeds' two launches, CamDrop's four: python/guidedrop/launches.py
// KERNELS), no other device op (no zeros / fill / .to: every output is written by a
// kernel). Rates are runtime values: a float argument of the kernel in eager mode, or a
// 0-dim tensor read in the kernel (float32; CorrDrop's p_blocks and CamDrop's k_c float64)
// while torch.compile traces (a float argument of an op would be specialised on, one
// recompile per rate, SPEC §8).

int parse_normalize(c10::string_view view, const char* op) {
  const std::string s(view.data(), view.size());
  if (s == "none") return kNormNone;
  if (s == "sample") return kNormSample;
  TORCH_CHECK(s == "batch", op, ": normalize must be one of 'none', 'sample', 'batch', got '", s,
              "'");
  return kNormBatch;
}

// -> (state, active): (N, C, 4) float32 (reference.attention_state: thr, scale[n], mn, r;
// thr, mn, r 0 where inactive), (N, C) bool. gamma = noise < alpha, both rounded to float32.
std::tuple<at::Tensor, at::Tensor> attentiondrop_plan(
    const at::Tensor& x, const at::Tensor& noise, const std::optional<at::Tensor>& alpha_t,
    double alpha, int64_t k, c10::string_view mode, c10::string_view normalize) {
  constexpr const char* op = "guidedrop::attentiondrop_plan";
  check_feature_map(x, op, "x");
  check_k(k, x.size(2) * x.size(3), op);
  const int64_t N = x.size(0), C = x.size(1);
  check_noise(noise, x, op, {N, C});
  at::Tensor a;  // undefined: alpha
  if (alpha_t.has_value() && alpha_t->defined()) {
    check_small(*alpha_t, x, op, "alpha", at::kFloat, {});
    a = alpha_t->contiguous();
  }
  const int m = parse_mode(mode, op), norm = parse_normalize(normalize, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor state = at::empty({N, C, 4}, f32(x));
  at::Tensor msum = at::empty({N, C}, x.options().dtype(at::kDouble));  // exact sums
  at::Tensor active = at::empty({N, C}, x.options().dtype(at::kBool));
  launch_attentiondrop_stats(x, k, noise, a, static_cast<float>(alpha), m, state, msum, active);
  launch_attentiondrop_scale(msum, active, x.size(2) * x.size(3), norm, state);
  return {state, active};
}

// CorrDrop's plan -> (S (N, H', W') uint8, scale (N,) float32): F in one launch
// (pooled_correlation), then the plan kernel (plans/corrdrop.cu). noise: (2, N, H', W'),
// check_noise's dtypes, any strides; p_blocks = p * H*W / block_size² as p_t (a 0-dim float64,
// under torch.compile) or p (p_t None); k >= 1 (larger than the map: one block).
std::tuple<at::Tensor, at::Tensor> corrdrop_plan(const at::Tensor& x, const at::Tensor& noise,
                                                 const std::optional<at::Tensor>& p_t, double p,
                                                 int64_t k, c10::string_view normalize) {
  constexpr const char* op = "guidedrop::corrdrop_plan";
  check_feature_map(x, op, "x");
  check_positive(k, op, "k");
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  k = one_window(k, H, W);
  const int64_t Hp = (H + k - 1) / k, Wp = (W + k - 1) / k;
  check_noise(noise, x, op, {2, N, Hp, Wp});
  at::Tensor pt;  // undefined: p
  if (p_t.has_value() && p_t->defined()) {
    check_small(*p_t, x, op, "p_blocks", at::kDouble, {});
    pt = p_t->contiguous();
  }
  const int norm = parse_normalize(normalize, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor F = at::empty({N, Hp * Wp}, f32(x));
  at::Tensor keep = at::empty({N, Hp, Wp}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({N}, f32(x));
  pooled_correlation_into(x, k, F);
  launch_corrdrop_plan(F, noise, pt, p, H, W, k, norm, keep, scale);
  return {keep, scale};
}

// DropBlock / CamDrop seeds and their multiplier -> (blocks, scale): the r x r blocks of
// seed_bits' bits, packed as them (layers._seeds_plan), and scale (N,) float32 =
// layers._scale(C*H*W - covered * (C / Cs), C*H*W, normalize).
std::tuple<at::Tensor, at::Tensor> seeds_plan(
    const at::Tensor& device_like, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& cand_s, const std::optional<at::Tensor>& cand_c,
    at::IntArrayRef shape, const std::optional<at::Tensor>& g, double g_value, int64_t r,
    int64_t c, c10::string_view normalize, std::optional<at::Generator> generator) {
  constexpr const char* op = "guidedrop::seeds_plan";
  check_cuda(device_like, op, "device_like");
  const int norm = parse_normalize(normalize, op);
  const c10::cuda::CUDAGuard guard(device_like.device());
  Seeds sd = prepare_seeds(device_like, noise, cand_s, cand_c, shape, g, g_value, r, generator,
                           op);
  const int64_t N = shape[0], Cs = shape[1], H = shape[2], W = shape[3];
  TORCH_CHECK(Cs == 1 || Cs == c, op, ": Cs (shape[1]) must be 1 or C = ", c, ", got ", Cs);
  // N covered counts + the last-block ticket, zeroed by the seed_bits kernel.
  at::Tensor ws = at::empty({N + 1}, device_like.options().dtype(at::kLong));
  at::Tensor scale = at::empty({N}, device_like.options().dtype(at::kFloat));
  launch_seed_bits(sd.noise, sd.cand_s, sd.cand_c, sd.g, sd.g_value, r, Cs, H, W, sd.philox,
                   sd.bits, ws);
  at::Tensor blocks = at::empty_like(sd.bits);
  launch_seeds_scale(sd.bits, r, c, Cs, H, W, norm, ws, blocks, scale);
  return {blocks, scale};
}

// CamDrop's plan -> (blocks (N, ceil(C*H*W/8)) uint8: the seeds' packed r x r blocks, scale (N,)
// float32) in 4 launches: alpha and the CAM J (class_activation.cu, which also checks target's
// range on the device: SPEC §6 step 0 without a host sync), the candidates (plans/camdrop.cu), the
// seeds (seed_bits) and the coverage + scale (seeds_scale). weight: (K, C_fc) floating, C_fc a
// multiple of C; target: (N,) of any integer dtype but bool, read by value (no conversion launch);
// noise: (N, C, H, W) of check_noise's dtypes, or None (Philox in the seed kernel); g: the seed
// rate as g_t (a 0-dim float32, under torch.compile) or g (g_t None); 1 <= r <= min(H, W); k_s,
// k_c: the spatial and channel candidates, computed in Python (SPEC §6 step 3); k_c_t: None, or
// (torch.compile: channel_rate is a runtime value) k_c as a 0-dim float64, read in the kernel (k_c
// is then a placeholder).
std::tuple<at::Tensor, at::Tensor> camdrop_plan(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& g_t, double g,
    int64_t r, int64_t k_s, int64_t k_c, c10::string_view normalize,
    std::optional<at::Generator> generator, const std::optional<at::Tensor>& k_c_t) {
  constexpr const char* op = "guidedrop::camdrop_plan";
  check_feature_map(x, op, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_cuda(weight, op, "weight");
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on ", x.device(), ", got ",
              weight.device());
  const auto wdt = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 && (wdt == at::kFloat || wdt == at::kDouble ||
                                    wdt == at::kHalf || wdt == at::kBFloat16),
              op, ": weight must be a 2-D (K, C_fc) float32, float64, float16 or bfloat16 "
              "tensor, got ", wdt, " ", weight.sizes());
  TORCH_CHECK(C >= 1 && weight.size(0) >= 1 && weight.size(1) >= 1 && weight.size(1) % C == 0,
              op, ": weight (K, C_fc) needs K >= 1 and C_fc a multiple of C = ", C, ", got ",
              weight.sizes());
  check_cuda(target, op, "target");
  TORCH_CHECK(target.device() == x.device(), op, ": target must be on ", x.device(), ", got ",
              target.device());
  const auto tdt = target.scalar_type();
  TORCH_CHECK(at::isIntegralType(tdt, /*includeBool=*/false), op,
              ": target must hold class indices of an integer dtype, got ", tdt);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape (", N,
              ",), got ", target.sizes());
  TORCH_CHECK(r >= 1 && r <= std::min(H, W), op, ": r must be in [1, min(H, W)] = [1, ",
              std::min(H, W), "], got ", r);
  check_k(k_s, H * W, op);
  check_k(k_c, C, op);
  if (k_c_t.has_value()) {
    check_cuda(*k_c_t, op, "k_c_t");
    TORCH_CHECK(k_c_t->device() == x.device() && k_c_t->dim() == 0 &&
                    k_c_t->scalar_type() == at::kDouble,
                op, ": k_c_t must be a 0-dim float64 tensor on ", x.device());
  }
  const int norm = parse_normalize(normalize, op);
  const c10::cuda::CUDAGuard guard(x.device());
  Seeds sd = prepare_seeds(x, noise, std::nullopt, std::nullopt, {N, C, H, W}, g_t, g, r,
                           generator, op);
  at::Tensor alpha = at::empty({N, C}, f32(x));
  at::Tensor J = at::empty({N, H * W}, f32(x));
  at::Tensor cand_s = at::empty({N, H, W}, x.options().dtype(at::kBool));
  at::Tensor cand_c = at::empty({N, C}, x.options().dtype(at::kBool));
  // N covered counts + the last-block ticket, zeroed by the seed_bits kernel.
  at::Tensor ws = at::empty({N + 1}, x.options().dtype(at::kLong));
  at::Tensor scale = at::empty({N}, f32(x));
  launch_camdrop_cam(x, weight, target, alpha, J);
  launch_camdrop_candidates(J, alpha, k_s, k_c,
                            k_c_t.has_value() ? k_c_t->data_ptr<double>() : nullptr, cand_s,
                            cand_c);
  launch_seed_bits(sd.noise, cand_s, cand_c, sd.g, sd.g_value, r, C, H, W, sd.philox, sd.bits,
                   ws);
  at::Tensor blocks = at::empty_like(sd.bits);
  launch_seeds_scale(sd.bits, r, C, C, H, W, norm, ws, blocks, scale);
  return {blocks, scale};
}

// ------------------------------------------------------------------------ apply

at::Tensor apply_channel(const at::Tensor& t, const at::Tensor& w) {
  constexpr const char* op = "guidedrop::apply_channel";
  check_feature_map(t, op, "t");
  check_small(w, t, op, "w", at::kFloat, {t.size(0), t.size(1)});
  const c10::cuda::CUDAGuard guard(t.device());
  at::Tensor wc = w.contiguous();
  // channels_last's vector path loads V weights as 16-byte vectors (a view of w may start
  // anywhere; a copy of N * C floats is aligned)
  if (reinterpret_cast<uintptr_t>(wc.data_ptr()) % 16 != 0) wc = wc.clone();
  at::Tensor out = at::empty_like(t);
  launch_apply_channel(t, wc, out);
  return out;
}

at::Tensor apply_block(const at::Tensor& t, const at::Tensor& mask, int64_t k,
                       const at::Tensor& scale) {
  constexpr const char* op = "guidedrop::apply_block";
  check_feature_map(t, op, "t");
  check_positive(k, op, "k");
  TORCH_CHECK(mask.defined() && mask.dim() == 3, op, ": mask must be 3-D (N, Hs, Ws)");
  const int64_t N = t.size(0);
  // A block larger than the map is the whole map: the same indices h / k, w / k (all 0),
  // and no product below can overflow, however large k is.
  k = one_window(k, t.size(2), t.size(3));
  check_small(mask, t, op, "mask", at::kByte, {N, mask.size(1), mask.size(2)});
  TORCH_CHECK(mask.size(1) * k >= t.size(2) && mask.size(2) * k >= t.size(3), op,
              ": mask (N, Hs, Ws) = ", mask.sizes(), " does not cover H x W = ", t.size(2),
              " x ", t.size(3), " with k = ", k);
  check_small(scale, t, op, "scale", at::kFloat, {N});
  TORCH_CHECK(t.size(2) <= kMaxRow && t.size(3) <= kMaxRow, op, ": H and W must be < 2^31");
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor m = mask.contiguous(), s = scale.contiguous();
  at::Tensor out = at::empty_like(t);
  launch_apply_block(t, m, k, s, out);
  return out;
}

at::Tensor apply_seeds(const at::Tensor& t, const at::Tensor& bits, int64_t r, bool shared,
                       const at::Tensor& scale) {
  constexpr const char* op = "guidedrop::apply_seeds";
  check_feature_map(t, op, "t");
  check_positive(r, op, "r");
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t Cs = shared ? 1 : C;
  check_small(bits, t, op, "bits", at::kByte, {N, (Cs * H * W + 7) / 8});
  check_small(scale, t, op, "scale", at::kFloat, {N});
  const c10::cuda::CUDAGuard guard(t.device());
  const at::Tensor b = bits.contiguous(), s = scale.contiguous();
  at::Tensor out = at::empty_like(t);
  launch_apply_seeds(t, b, r, shared, s, out);
  return out;
}

at::Tensor apply_attention(const at::Tensor& t, const at::Tensor& x, const at::Tensor& state,
                           const at::Tensor& active, c10::string_view mode) {
  constexpr const char* op = "guidedrop::apply_attention";
  check_feature_map(t, op, "t");
  check_feature_map(x, op, "x");
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": t and x must have the same shape, got ", t.sizes(),
              " and ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": t and x must have the same dtype, got ",
              t.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": t and x must be on the same device, got ",
              t.device(), " and ", x.device());
  const int64_t N = x.size(0), C = x.size(1);
  check_small(state, x, op, "state", at::kFloat, {N, C, 4});
  check_small(active, x, op, "active", at::kBool, {N, C});
  const int m = parse_mode(mode, op);
  const c10::cuda::CUDAGuard guard(t.device());
  // read as float4: a fresh copy unless contiguous and 16-byte aligned
  const bool aligned = reinterpret_cast<uintptr_t>(state.data_ptr()) % 16 == 0;
  const at::Tensor st =
      state.is_contiguous() && aligned ? state : state.clone(at::MemoryFormat::Contiguous);
  const at::Tensor act_c = active.contiguous();
  at::Tensor out = at::empty_like(t);
  launch_apply_attention(t, x, st, act_c, m, out);
  return out;
}

// ------------------------------------------------------------------------ plans
// One launch each between a layer's statistics and its apply (issue 12). Rates are runtime
// arguments (`float` in the schema, never a template parameter), and the counts derived
// from them are computed here exactly as layers.py computes them in Python: round() is
// round-half-even on a double, as std::nearbyint in the default rounding mode.
//
// A `float` argument is a constant of the graph under torch.compile (Dynamo specialises
// the rate it is given: one recompile per rate of a schedule). So the Python glue passes
// the rates as the optional `rates` tensor when torch.compile traces (float64 (2,) on the
// device, symbolic there): the kernel then reads them, with the same double arithmetic,
// and the float arguments are ignored (not checked: they are placeholders). Eager calls
// pass floats and no tensor (no launch to build it).

// rates: undefined, or float64 (2,) on like's device -> contiguous.
at::Tensor check_rates(const std::optional<at::Tensor>& rates, const at::Tensor& like,
                       const char* op) {
  if (!rates.has_value() || !rates->defined()) return at::Tensor();
  check_small(*rates, like, op, "rates", at::kDouble, {2});
  return rates->contiguous();
}

void check_rate(double q, const char* op, const char* name, bool open_at_zero = false) {
  TORCH_CHECK(open_at_zero ? (q > 0 && q <= 1) : (q >= 0 && q <= 1), op, ": ", name,
              " must be in ", open_at_zero ? "(0, 1]" : "[0, 1]", ", got ", q);
}

// The candidates max(1, round(top_rate * C)) of the SelectScale family (SPEC §3).
int64_t top_count(double top_rate, int64_t C) {
  const double k = std::nearbyint(top_rate * static_cast<double>(C));
  return std::max<int64_t>(1, static_cast<int64_t>(k));
}

std::tuple<at::Tensor, int64_t> channel_plan_setup(const at::Tensor& amax, const at::Tensor& noise,
                                                   double top_rate, bool traced, const char* op) {
  check_cuda(amax, op, "amax");
  TORCH_CHECK(amax.dim() == 2 && amax.scalar_type() == at::kFloat, op,
              ": amax must be float32 (N, C), got ", amax.scalar_type(), " ", amax.sizes());
  TORCH_CHECK(amax.size(1) <= kMaxRow, op, ": more than 2^31 - 1 channels are not supported");
  check_noise(noise, amax, op, amax.sizes());
  if (!traced) check_rate(top_rate, op, "top_rate");
  return {amax.contiguous(), traced ? 1 : top_count(top_rate, amax.size(1))};
}

at::Tensor selectscale_plan(const at::Tensor& amax, const at::Tensor& noise, double top_rate,
                            double retain, const std::optional<at::Tensor>& rates) {
  constexpr const char* op = "guidedrop::selectscale_plan";
  const at::Tensor r = check_rates(rates, amax, op);
  if (!r.defined()) check_rate(retain, op, "retain");
  const auto [a, k] = channel_plan_setup(amax, noise, top_rate, r.defined(), op);
  const c10::cuda::CUDAGuard guard(amax.device());
  at::Tensor w = at::empty(amax.sizes(), f32(amax));
  // retain + 2 * (1 - retain) * u: the python scalars rounded to float32 as torch does.
  launch_selectscale_plan(a, noise, k, static_cast<float>(retain),
                          static_cast<float>(2.0 * (1.0 - retain)), r, w);
  return w;
}

at::Tensor selectout_plan(const at::Tensor& amax, const at::Tensor& noise, double top_rate,
                          double keep, const std::optional<at::Tensor>& rates) {
  constexpr const char* op = "guidedrop::selectout_plan";
  const at::Tensor r = check_rates(rates, amax, op);
  if (!r.defined()) check_rate(keep, op, "keep", /*open_at_zero=*/true);
  const auto [a, k] = channel_plan_setup(amax, noise, top_rate, r.defined(), op);
  const double c = static_cast<double>(amax.size(1));
  const int64_t n_drop = r.defined() ? 0 : static_cast<int64_t>(std::nearbyint((1.0 - keep) * c));
  TORCH_CHECK(n_drop <= k, op, ": round((1 - keep) * C) = ", n_drop,
              " channels to drop, more than the ", k, " candidates (SPEC §3)");
  const c10::cuda::CUDAGuard guard(amax.device());
  at::Tensor w = at::empty(amax.sizes(), f32(amax));
  launch_selectout_plan(a, noise, k, n_drop, r.defined() ? 1.f : static_cast<float>(1.0 / keep),
                        r, w);
  return w;
}

std::tuple<at::Tensor, at::Tensor> focused_dropout_plan(const at::Tensor& x, const at::Tensor& mean,
                                                        const at::Tensor& noise, double low,
                                                        double high, bool per_position,
                                                        const std::optional<at::Tensor>& rates,
                                                        const std::optional<at::Tensor>& applied) {
  constexpr const char* op = "guidedrop::focused_dropout_plan";
  check_feature_map(x, op, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C >= 1 || N == 0, op, ": x must have at least one channel, got shape ", x.sizes());
  check_small(mean, x, op, "mean", at::kFloat, {N, C});
  if (per_position) check_noise(noise, x, op, {N, H, W});
  else check_noise(noise, x, op, {N});
  const at::Tensor r = check_rates(rates, x, op);
  const at::Tensor on = check_applied(applied, x, op);
  TORCH_CHECK(r.defined() || (0 <= low && low <= high && high <= 1), op,
              ": low and high must satisfy 0 <= low <= high <= 1, got ", low, ", ", high);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor m = mean.contiguous();
  at::Tensor mask = at::empty({N, H, W}, x.options().dtype(at::kByte));
  at::Tensor scale = at::empty({N}, f32(x));  // ones, written by the kernel
  // low + (high - low) * u: the python scalars rounded to float32 as torch does.
  launch_focused_dropout_plan(x, m, noise, per_position, static_cast<float>(low),
                              static_cast<float>(high - low), r, on, mask, scale);
  return {mask, scale};
}

// ------------------------------------------------------------------------ CPU: a clear error

void cpu_error(const c10::OperatorHandle& handle, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, handle.schema().name(),
              ": got CPU tensors, but guidedrop._C has CUDA kernels only; move the tensors to a "
              "GPU, or use the reference backend (GUIDEDROP_BACKEND=reference or auto)");
}

constexpr const char* kOps[] = {
    "pooled_correlation", "channel_stats", "kth_largest",  "map_threshold",
    "attention_stats",    "cam",           "seed_bits",    "seed_coverage",
    "attentiondrop_plan", "seeds_plan",    "corrdrop_plan", "camdrop_plan",
    "apply_channel",      "apply_block",   "apply_seeds",  "apply_attention",
    "selectscale_plan",   "selectout_plan", "focused_dropout_plan",
};

}  // namespace

// Every op returns new tensors and mutates nothing (no `Tensor(a!)` annotations).
TORCH_LIBRARY(guidedrop, m) {
  m.def("pooled_correlation(Tensor x, int k) -> Tensor");
  // applied: FocusedDropout's participation (a 0-d bool; None: true), read in the kernel.
  m.def("channel_stats(Tensor x, Tensor? applied=None) -> (Tensor, Tensor)");
  m.def("kth_largest(Tensor v, int k) -> Tensor");
  m.def("map_threshold(Tensor x, int k) -> Tensor");
  m.def("attention_stats(Tensor x, int k, Tensor active, str mode) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cam(Tensor x, Tensor alpha) -> Tensor");
  // device_like: any tensor on the target device (only its device is read). It gives the
  // dispatcher a tensor when noise, cand_s and cand_c are all None (DropBlock).
  m.def("seed_bits(Tensor device_like, Tensor? noise, Tensor? cand_s, Tensor? cand_c, "
        "SymInt[] shape, Tensor g, int r, Generator? generator=None) -> Tensor");
  m.def("seed_coverage(Tensor bits, int r, SymInt cs, SymInt h, SymInt w) -> Tensor");
  // Plans (issue 12). alpha / g / p: a 0-dim tensor (under torch.compile: float32, p_t
  // float64), else None and the float after it.
  m.def("attentiondrop_plan(Tensor x, Tensor noise, Tensor? alpha_t, float alpha, int k, "
        "str mode, str normalize) -> (Tensor, Tensor)");
  m.def("seeds_plan(Tensor device_like, Tensor? noise, Tensor? cand_s, Tensor? cand_c, "
        "SymInt[] shape, Tensor? g_t, float g, int r, SymInt c, str normalize, "
        "Generator? generator=None) -> (Tensor, Tensor)");
  m.def("corrdrop_plan(Tensor x, Tensor noise, Tensor? p_t, float p, SymInt k, str normalize) "
        "-> (Tensor, Tensor)");
  m.def("camdrop_plan(Tensor x, Tensor weight, Tensor target, Tensor? noise, Tensor? g_t, "
        "float g, int r, SymInt k_s, int k_c, str normalize, Generator? generator=None, "
        "Tensor? k_c_t=None) -> (Tensor, Tensor)");
  m.def("apply_channel(Tensor t, Tensor w) -> Tensor");
  m.def("apply_block(Tensor t, Tensor mask, SymInt k, Tensor scale) -> Tensor");
  m.def("apply_seeds(Tensor t, Tensor bits, int r, bool shared, Tensor scale) -> Tensor");
  m.def("apply_attention(Tensor t, Tensor x, Tensor state, Tensor active, str mode) -> Tensor");
  // Plans (csrc/cuda/plans/). amax / mean: channel_stats' outputs; noise: the layer's
  // uniforms (check_noise's dtypes). Rates are runtime floats (no recompile per rate).
  // rates: None, or (torch.compile) float64 (2,) [top_rate, retain | keep] / [low, high]
  // read by the kernel instead of the float arguments (see "plans" above).
  m.def("selectscale_plan(Tensor amax, Tensor noise, float top_rate, float retain, "
        "Tensor? rates=None) -> Tensor");
  m.def("selectout_plan(Tensor amax, Tensor noise, float top_rate, float keep, "
        "Tensor? rates=None) -> Tensor");
  m.def("focused_dropout_plan(Tensor x, Tensor mean, Tensor noise, float low, float high, "
        "bool per_position, Tensor? rates=None, Tensor? applied=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(guidedrop, CUDA, m) {
  m.impl("pooled_correlation", &pooled_correlation);
  m.impl("channel_stats", &channel_stats);
  m.impl("kth_largest", &kth_largest);
  m.impl("map_threshold", &map_threshold);
  m.impl("attention_stats", &attention_stats);
  m.impl("cam", &cam);
  m.impl("seed_bits", &seed_bits);
  m.impl("seed_coverage", &seed_coverage);
  m.impl("attentiondrop_plan", &attentiondrop_plan);
  m.impl("seeds_plan", &seeds_plan);
  m.impl("corrdrop_plan", &corrdrop_plan);
  m.impl("camdrop_plan", &camdrop_plan);
  m.impl("apply_channel", &apply_channel);
  m.impl("apply_block", &apply_block);
  m.impl("apply_seeds", &apply_seeds);
  m.impl("apply_attention", &apply_attention);
  m.impl("selectscale_plan", &selectscale_plan);
  m.impl("selectout_plan", &selectout_plan);
  m.impl("focused_dropout_plan", &focused_dropout_plan);
}

TORCH_LIBRARY_IMPL(guidedrop, CPU, m) {
  for (const char* name : kOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cpu_error>());
}

}  // namespace guidedrop

// `import guidedrop._C` loads this library, which registers the ops above as
// torch.ops.guidedrop.*; the module itself holds only torch_version, the torch it was built
// against (setup.py passes its characters), which guidedrop.cuda_backend checks. A bare
// CPython module (no pybind11, no torch/extension.h) keeps this file's compile time down.
#define GD_CONCAT_(a, b) a##b
#define GD_CONCAT(a, b) GD_CONCAT_(a, b)
#define GD_STR_(a) #a
#define GD_STR(a) GD_STR_(a)

extern "C" PyMODINIT_FUNC GD_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      GD_STR(TORCH_EXTENSION_NAME),
      "guidedrop CUDA kernels, registered as torch.ops.guidedrop.* (import torch first)",
      -1,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module);
#ifdef GUIDEDROP_TORCH_VERSION_CHARS
  static const char torch_version[] = {GUIDEDROP_TORCH_VERSION_CHARS, 0};
  if (m != nullptr && PyModule_AddStringConstant(m, "torch_version", torch_version) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
#endif
  return m;
}
