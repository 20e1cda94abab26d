// Exact k-th largest per row / per map (AttentionDrop's top-percentile threshold, the
// top-k candidates of SelectScale and CamDrop), AttentionDrop's per-map statistics and its
// apply kernel.
//
// Maps of at most 1024 units whose rows are one stride apart (every map of a CNN layer of
// 32 x 32 or less, in NCHW or channels_last, and rows of up to 1024 channels) take a warp,
// or 4 lanes up to 256 units, each (map_select_regs_kernel, BLOCK = false): keys in
// registers, a histogram per group of lanes, no block-wide barrier. Longer maps of
// rows one stride apart, up to 256 x 56 units (56 x 56), take a block each with the keys in
// registers (BLOCK = true, 56 keys a thread: 16-byte loads where the maps are contiguous
// chunks, VEC). Other maps (other strides over 1024 units, longer ones) take one block per
// row (kth_largest) or per (n, c) map (map_threshold, attention_stats), in a grid-stride
// loop over rows (map_select_kernel). The row's values are read once into shared memory as
// order-preserving uint32 keys when they fit (<= kSmemKeys), the top digit counted on the
// way; the exact k-th largest key then takes the lower 8-bit radix passes on chip
// (common.cuh; four in all, two for bfloat16 x, three for float16: the key bits below never
// differ there, kKeyBits; histogram in shared memory, ties counted, so the top k are
// exactly the values >= the result). A longer row is read twice: the top digit's pass,
// then the keys in its bin are packed into shared memory for the lower passes (re-read
// from x only when more than kSmemKeys keys share the top 8 bits). Block-stride loops cover rows of any
// length. attention_stats skips the maps whose gamma is 0 (their outputs are 0) and adds
// the NaN-propagating min / max (written as min and r = range_reciprocal(min, max)) and the
// sum of the soft mask S (SPEC §4).
// attentiondrop_stats (AttentionDrop's plan, issue 12) is the same kernel drawing gamma
// itself: gamma[m] = u[n, c] < alpha, u read from noise of any floating dtype and strides
// and rounded to float32 in the kernel (SPEC §1), alpha a float32 kernel argument or a
// 0-dim float32 tensor read in the kernel (a runtime rate either way: no recompile); it
// writes gamma as the `active` mask, and 0 to thr / mn / r / msum of the inactive maps.
// r = range_reciprocal(min, max), computed here once per map for the apply.
#include "common.cuh"
#include "launchers.h"

#include <cmath>

namespace guidedrop {
namespace {

constexpr int64_t kSmemKeys = 10240;  // 40 KiB of keys: under the 48 KiB default limit

// gamma: given (active, read), or drawn (u.p set: u < alpha, written to active_out).
struct Gamma {
  const bool* active;
  Uniforms u;
  const float* alpha_ptr;  // nullptr: alpha
  float alpha;
  bool* active_out;
};

struct KeyMin {
  __device__ uint32_t operator()(uint32_t a, uint32_t b) const { return min(a, b); }
};
struct KeyMax {
  __device__ uint32_t operator()(uint32_t a, uint32_t b) const { return max(a, b); }
};

// n of map m = n * C + c: a multiply-high by fc where m and C are under 2^31 (every tensor
// in practice), not the call of an int64 division routine, run by every thread once a map.
__device__ __forceinline__ int64_t map_sample(int64_t m, int64_t C, const FastDiv& fc) {
  return (m | C) < (int64_t(1) << 31) ? div_of(static_cast<uint32_t>(m), fc) : m / C;
}

// Whether map m = (n, c) is active (stats only): drawn, u[n, c] < alpha (a NaN u is not:
// the reference's comparison), written to active_out by `lead`; or given. `lead` writes an
// inactive map's outputs, 0.
__device__ __forceinline__ bool map_active(const Gamma& g, float alpha, int64_t m, int64_t n,
                                           int64_t c, bool lead, float* thr, float* mn,
                                           float* rcp, int64_t os, double* msum) {
  const bool draw = g.u.p != nullptr;
  const bool act = draw ? g.u(n, c) < alpha : g.active[m];
  if (lead && draw) g.active_out[m] = act;
  if (lead && !act) {
    thr[m * os] = mn[m * os] = rcp[m * os] = 0.f;
    msum[m] = 0.0;
  }
  return act;
}

// The map's min and max from its keys' (-0.0 below +0.0; a NaN in the map: both NaN).
__device__ __forceinline__ float2 key_range(uint32_t kmin, uint32_t kmax) {
  const float hi = key_float(kmax);
  return make_float2(kmax == 0xffffffffu ? hi : key_float(kmin), hi);
}

// The soft mask S of SPEC §4 step 3 (soft_mask) in one form for the three modes, so that the
// per-unit sum of the selection kernels has no branch on the mode: S = 1 − a·b with
// a = min(max((x − mn)·r, lo), 1) and b = [!(x < tb)]. "am": lo = 1 (a = 1, also for a NaN
// product) and tb = thr, so S = [x < thr]; "sm": lo = 0 and tb = −Inf (b = 1), so S = 1 − f̂;
// "ad": lo = 0 and tb = thr, so S = 1 − f̂·[x ≥ thr] (a NaN x has f̂ = 0, so S = 1 whichever
// b; a NaN thr needs a NaN in the map, whose mn and r are then NaN: f̂ = 0 again). Each
// product a·b is exact, so the fma rounds once, as soft_mask does: the same S to the bit.
struct SoftMaskTerms {
  float tb, lo, mn, r;
};
__device__ __forceinline__ SoftMaskTerms soft_mask_terms(float thr, float mn, float r,
                                                         int mode) {
  return {mode == 1 ? -INFINITY : thr, mode == 0 ? 1.f : 0.f, mn, r};
}
__device__ __forceinline__ float soft_mask_at(float x, const SoftMaskTerms& s) {
  const float a = fminf(fmaxf(__fmul_rn(x - s.mn, s.r), s.lo), 1.f);
  return fmaf(-a, x < s.tb ? 0.f : 1.f, 1.f);
}

// Threads of map_select_kernel for maps of L units: about 32 units a thread (each thread
// pays the map's barriers, picks and reductions: about 1100 instructions, against about 60
// a unit), 32 to 256 (a 56 x 56 map: 128, not 256).
int select_threads(int64_t L) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(L, 32 * 32) * 32, 32, kThreads));
}

// Rows are maps (n, c) of x: unit i of map m = n * C + c sits at
// n * s.n + c * s.c + (i / W) * s.h + (i % W) * s.w. A matrix v (R, L) is the case
// C = 1, H = 1, W = L, s = (stride(0), 0, 0, stride(1)).
// gamma.active == nullptr and gamma.u.p == nullptr: threshold only (mn, r, msum unused,
// may be nullptr). Map m's thr, mn and r sit at [m * os] (AttentionDrop's plan writes them
// into its (N, C, 4) state: reference.attention_state); msum at [m].
template <typename scalar_t>
__global__ void map_select_kernel(const scalar_t* __restrict__ x, const Strides4 s,
                                  const int64_t maps, const int64_t C, const FastDiv fc,
                                  const int64_t H,
                                  const int64_t W, const uint32_t k, const Gamma gamma,
                                  const int mode,
                                  const bool use_smem, float* __restrict__ thr,
                                  float* __restrict__ mn, float* __restrict__ rcp,
                                  const int64_t os, double* __restrict__ msum) {
  extern __shared__ uint32_t keys[];  // H * W keys when use_smem, else kSmemKeys
  __shared__ SelectSmem sel;
  __shared__ uint32_t kscratch[32];
  __shared__ double dscratch[32];
  __shared__ uint32_t packed;  // keys packed so far (longer maps)
  const int lane = threadIdx.x & 31;
  const bool stats = gamma.u.p != nullptr || gamma.active != nullptr;
  const float alpha = gamma.alpha_ptr != nullptr ? *gamma.alpha_ptr : gamma.alpha;
  const int64_t L = H * W;
  // Rows one stride apart (contiguous NCHW maps; channels_last, s.w = C): unit i at
  // i * s.w, with no int64 division and remainder per unit (each a call of a routine of
  // tens of instructions).
  const bool flat = H == 1 || s.h == W * s.w;
  for (int64_t m = blockIdx.x; m < maps; m += gridDim.x) {  // uniform in the block
    const int64_t n = map_sample(m, C, fc), c = m - n * C;
    if (stats && !map_active(gamma, alpha, m, n, c, threadIdx.x == 0, thr, mn, rcp, os, msum)) {
      continue;
    }
    const scalar_t* base = x + n * s.n + c * s.c;
    auto load = [&](int64_t i) {
      return to_float(base[flat ? i * s.w : (i / W) * s.h + (i % W) * s.w]);
    };

    // the map's min and max keys: -0.0 below +0.0 and a NaN above all (reference.order_key;
    // a float a < b keeps either zero of a tie), two integer min / max per unit
    uint32_t kmin = 0xffffffffu, kmax = 0;
    uint32_t tkey;
    if (use_smem) {
      // The map in shared memory: x read once, its top digit counted on the way, the lower
      // passes on chip (int indices: L <= kSmemKeys).
      const int n = static_cast<int>(L);
      RadixState st{0, 0, k};
      radix_clear(sel);
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = load(i);
        const uint32_t key = float_key(v);
        keys[i] = key;
        kmin = min(kmin, key);
        kmax = max(kmax, key);
        radix_count(key >> 24, sel.hist);
      }
      radix_pick(24, st, sel);  // its barriers make the keys visible to the whole block
#pragma unroll 1
      for (int shift = 16; shift >= kLowestShift<scalar_t>; shift -= 8) {
        block_radix_pass([&](int i) { return keys[i]; }, n, shift, st, sel);
      }
      tkey = fill_low(st.prefix, kLowestShift<scalar_t>);
    } else {
      // A longer map: the top digit from x (read 1); then the keys of x in that digit's
      // bin are packed into shared memory (read 2, with min / max) when they fit, and the
      // lower digits are found there. Only when more than kSmemKeys keys share the top
      // 8 bits (sign and 7 exponent bits) do those passes re-read x.
      auto get_x = [&](int64_t i) { return float_key(load(i)); };
      RadixState st{0, 0, k};
      const uint32_t n = block_radix_pass(get_x, L, 24, st, sel);
      const bool pack = n <= kSmemKeys;
      if (threadIdx.x == 0) packed = 0;
      __syncthreads();
      if (pack || stats) {
        // Uniform trip count for the whole block, so every lane reaches the ballot.
        for (int64_t b = 0; b < L; b += blockDim.x) {
          const int64_t i = b + threadIdx.x;
          uint32_t key = 0;
          bool hit = false;
          if (i < L) {
            const float v = load(i);
            key = float_key(v);
            hit = pack && (key & st.mask) == st.prefix;
            kmin = min(kmin, key);
            kmax = max(kmax, key);
          }
          const unsigned ballot = __ballot_sync(kFullMask, hit);
          uint32_t at = 0;
          if (lane == 0 && ballot != 0) at = atomicAdd(&packed, __popc(ballot));
          at = __shfl_sync(kFullMask, at, 0) + __popc(ballot & ((1u << lane) - 1u));
          if (hit) keys[at] = key;  // any order: only the counts matter
        }
        __syncthreads();
      }
#pragma unroll 1
      for (int shift = 16; shift >= kLowestShift<scalar_t>; shift -= 8) {
        if (pack) {
          block_radix_pass([&](int64_t i) { return keys[i]; }, n, shift, st, sel);
        } else {
          block_radix_pass(get_x, L, shift, st, sel);
        }
      }
      tkey = fill_low(st.prefix, kLowestShift<scalar_t>);
    }
    const float t = key_float(tkey);
    if (!stats) {
      if (threadIdx.x == 0) thr[m * os] = t;
      continue;  // radix_pick ended with __syncthreads: keys may be reused
    }
    const float2 range = key_range(block_reduce(kmin, KeyMin(), kscratch),
                                   block_reduce(kmax, KeyMax(), kscratch));
    const float lo = range.x;
    // msum in double: every S is a multiple of 2^-24 in [0, 1], so the sum is exact in any
    // order (backend_contract.md), the reference's to the bit.
    double sum = 0.0;
    const float r = range_reciprocal(lo, range.y);
    const SoftMaskTerms terms = soft_mask_terms(t, lo, r, mode);
    for (int64_t i = threadIdx.x; i < L; i += blockDim.x) {
      const float v = use_smem ? key_float(keys[i]) : load(i);  // the key round-trips exactly
      sum += soft_mask_at(v, terms);
    }
    sum = block_reduce(sum, SumOp(), dscratch);  // ends with __syncthreads
    if (threadIdx.x == 0) {
      thr[m * os] = t;
      mn[m * os] = lo;
      rcp[m * os] = r;
      msum[m] = sum;
    }
  }
}

// Maps whose keys fit in registers: map_select_kernel's results with the map read once and
// no shared-memory copy of its keys. Each thread holds UNITS keys of its map; the radix
// passes count them into a histogram in shared memory (ATOMS), and every warp of the map
// reads the digit off it (group_radix_digit), so no thread waits for another's pick.
// - BLOCK = false: maps of at most G * UNITS units (1024 at most) whose rows are one stride
//   apart (unit i at i * sw, under 2^31 elements from the map's start: contiguous NCHW,
//   channels_last, rows of a matrix), G lanes per map: a warp (G = 32, 32 keys a lane) for
//   maps of over 256 units, 4 lanes (G = 4, 8 maps a warp) of 64 keys up to 256 units and
//   of 16 up to 64, so that a 7 x 7 or 14 x 14 map's picks, reductions and gamma are paid
//   by 4 lanes, not 32 (bf16 sm_90 SASS per element, 7 x 7 / 14 x 14: 72.7 / 40.8 on 8
//   lanes of 8 / 32 keys, 57.9 / 35.3 on 4 of 16 / 64). Lane l of a group holds units l,
//   l + G, ... (VEC: 16-byte chunks l, l + G, ...); the group's own histogram, cleared
//   before each pass: no block-wide barrier, no block reduction, whose cost (about 1100
//   instructions per thread per map, counted from the SASS) every thread of a block paid
//   even for a 7 x 7 map.
//   The warp's groups run in step (their shuffles and __syncwarp take the whole warp): a
//   group whose map is inactive or past the last computes on a map it does not write.
// - BLOCK = true: maps of more than 1024 units (56 x 56 at the goal shape) whose rows are
//   one stride apart, of at most blockDim.x * UNITS units: a block of 32 to 256 threads per
//   map, a histogram per pass (cleared once a map), __syncthreads between a pass's counts
//   and its pick, the block-wide reductions of min, max and the soft mask's sum.
// VEC (either form): contiguous maps, 16-byte aligned, L a multiple of V = 16 /
// sizeof(scalar_t), a thread reading 16-byte chunks t, t + threads, ... (V keys each); else
// (channels_last, maps of other lengths) units t, t + threads, ... one by one.
// The slots past the map's end (pad of them) hold copies of its first chunk (units 0 .. PV
// - 1, PV = V or 1), so that no unit takes a branch and every loop has a fixed trip count;
// thread 0 takes their counts out of each pass's histogram (atomically, with its own counts)
// and their soft masks out of the sum. Keys off a lower pass's prefix are counted in a bin
// nobody reads (256), not skipped by a branch.
// warps per block of the warp forms: groups of 4 lanes take 4 (32 maps, 32.5 KiB of bins)
template <int G>
constexpr int kSelectWarps = G == 4 ? 4 : 8;
constexpr int kRegsThreads = 256;  // most threads per map of the block form
// keys a thread of the block form: 7 16-byte chunks of bfloat16 (a 56 x 56 map: 2 warps,
// 448 chunks for its 392; 32 keys: 4 warps, 512 chunks), 14 of float32
constexpr int kRegsUnits = 56;

struct alignas(16) WarpHist {
  uint32_t bin[256 + 4];  // 256: the discard bin
};

// Butterfly reduction over the G lanes of a group (G = 32: warp_reduce); every lane of the
// warp calls it, each group gets its own result.
template <int G, typename T, typename Op>
__device__ __forceinline__ T group_reduce(T v, Op op) {
#pragma unroll
  for (int d = G / 2; d > 0; d >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// warp_radix_digit for each group of G lanes of the warp, with its own hist and rank (G =
// 32: warp_radix_digit itself). G = 4, in steps from the top: the span of bins that holds
// the rank (all 256 at first) is cut in G parts, lane j of the group sums part j (from the
// top; 16-byte loads), and a scan over the group finds the part that holds the rank, until
// 4 bins are left (256, 64, 16, 4); every lane then takes the bin from those 4.
template <int G>
__device__ __forceinline__ RadixDigit group_radix_digit(const uint32_t* hist, uint32_t rank,
                                                        int lane) {
  if constexpr (G == 32) {
    return warp_radix_digit(hist, rank, lane);
  } else {
    static_assert(G == 4, "groups of 4 or 32 lanes");
    const int j = lane % G, first = lane - j;  // lane in the group, the group's first
    auto scan = [&](uint32_t v) {  // inclusive, over the group's lanes
#pragma unroll
      for (int d = 1; d < G; d <<= 1) {
        const uint32_t o = __shfl_up_sync(kFullMask, v, d, G);
        if (j >= d) v += o;
      }
      return v;
    };
    auto sum4 = [](const uint4& q) { return q.x + q.y + q.z + q.w; };
    int top = 255;      // the span's highest bin
    uint32_t acc = 0;   // keys in the bins above the span
#pragma unroll
    for (int span = 256; span > 4; span /= G) {
      constexpr int kMax = 256 / G;  // the first part's bins: the most
      const int part = span / G;     // bins of a part, a multiple of 4
      const uint4* h = reinterpret_cast<const uint4*>(hist + top + 1 - part * (j + 1));
      uint32_t sum = 0;
#pragma unroll
      for (int i = 0; i < kMax / 4; ++i) {
        if (i < part / 4) sum += sum4(h[i]);
      }
      const uint32_t incl = scan(sum) + acc;
      // the first lane of the group whose inclusive count reaches the rank (one exists: the
      // matching keys number at least rank; the last part, defensively)
      const unsigned hit =
          (__ballot_sync(kFullMask, incl >= rank) >> first) & ((1u << G) - 1u);
      const int sel = hit ? __ffs(hit) - 1 : G - 1;
      acc = __shfl_sync(kFullMask, incl - sum, sel, G);
      top -= part * sel;
    }
    // bins top, top - 1, top - 2, top - 3 hold q.w, q.z, q.y, q.x; the digit is the number
    // of them above which fewer than rank keys lie (counts are monotone; top - 3 when none
    // reaches it)
    const uint4 q = *reinterpret_cast<const uint4*>(hist + top - 3);
    const uint32_t a1 = acc + q.w, a2 = a1 + q.z, a3 = a2 + q.y;
    const int i = (a1 < rank) + (a2 < rank) + (a3 < rank);
    const uint32_t before = i == 0 ? acc : i == 1 ? a1 : i == 2 ? a2 : a3;
    const uint32_t count = i == 0 ? q.w : i == 1 ? q.z : i == 2 ? q.y : q.x;
    return {static_cast<uint32_t>(top - i), rank - before, count};
  }
}

template <typename scalar_t, int UNITS, bool BLOCK, int G = 32, bool VEC = BLOCK>
__global__ void __launch_bounds__(BLOCK ? kRegsThreads : 32 * kSelectWarps<G>)
    map_select_regs_kernel(const scalar_t* __restrict__ x, const Strides4 s, const int sw,
                           const int64_t maps, const int64_t C, const FastDiv fc, const int L,
                           const uint32_t k, const Gamma gamma, const int mode,
                           float* __restrict__ thr, float* __restrict__ mn,
                           float* __restrict__ rcp, const int64_t os,
                           double* __restrict__ msum) {
  constexpr int PV = VEC ? 16 / sizeof(scalar_t) : 1;  // units a load
  constexpr int LOADS = UNITS / PV;
  constexpr int kGroups = BLOCK ? 1 : 32 * kSelectWarps<G> / G;  // maps a block
  // BLOCK: hists[p] is pass p's (4 passes at most); else hists[g] is group g's
  __shared__ WarpHist hists[BLOCK ? 4 : kGroups];
  __shared__ uint32_t kscratch[2 * kRegsThreads / 32];  // BLOCK: each warp's min and max
  __shared__ double dscratch[kRegsThreads / 32];  // BLOCK: each warp's sum
  const int lane = threadIdx.x & 31;
  const int tid = BLOCK ? threadIdx.x : lane % G;  // the thread's place in its map
  const int threads = BLOCK ? blockDim.x : G;
  const int group = BLOCK ? 0 : threadIdx.x / G;
  const uint32_t pad = threads * LOADS - L / PV;  // chunks past the map's end
  auto sync = [] {
    if (BLOCK) __syncthreads(); else __syncwarp();
  };
  auto hist = [&](int pass) { return hists[BLOCK ? pass : group].bin; };
  auto clear = [&](int pass) {  // bins 0..255 in 16-byte stores, 64 / G a lane (BLOCK: 1)
    uint4* h4 = reinterpret_cast<uint4*>(hist(pass));
    if (BLOCK) {
      for (int i = tid; i < 64; i += threads) h4[i] = make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
      for (int i = 0; i < 64 / G; ++i) h4[tid + G * i] = make_uint4(0, 0, 0, 0);
    }
  };
  constexpr int kPasses = (32 - kLowestShift<scalar_t>) / 8;
  // the slots below this always lie in the map: the warp forms of G * UNITS slots take the
  // maps of over G * UNITS / 4 units (launch_map_select), but those of 64 slots (1 or more);
  // the block form's chunks are tested (one compare a 16-byte load)
  constexpr int kSure = BLOCK || G * UNITS == 64 ? 0 : UNITS / 4;
  const bool stats = gamma.u.p != nullptr || gamma.active != nullptr;
  const float alpha = gamma.alpha_ptr != nullptr ? *gamma.alpha_ptr : gamma.alpha;
  // the loop runs over the block's first map, so that a warp's groups take it in step
  const int64_t step = int64_t(gridDim.x) * kGroups;
  for (int64_t m0 = int64_t(blockIdx.x) * kGroups; m0 < maps; m0 += step) {
    const int64_t mg = m0 + group;  // this group's map
    const int64_t m = min(mg, maps - 1);  // past the last: computed, not written
    // maps < 2^31 (launch_map_select): n by a multiply-high, no int64 division routine
    const int64_t n = div_of(static_cast<uint32_t>(m), fc), c = m - n * C;
    const bool act = mg < maps && (!stats || map_active(gamma, alpha, m, n, c, tid == 0, thr,
                                                        mn, rcp, os, msum));
    if (BLOCK ? !act : __all_sync(kFullMask, !act)) continue;  // uniform in the warp / block
    const scalar_t* base = x + n * s.n + c * s.c;
    // every thread is past the previous map's picks and reductions (BLOCK: its histograms
    // are cleared here for every pass; else the one histogram before each pass)
    sync();
    if (BLOCK) {
#pragma unroll
      for (int p = 0; p < kPasses; ++p) clear(p);
    } else {
      clear(0);
    }
    sync();
    uint32_t key[UNITS];
    float xf[UNITS];  // the values too, for the soft mask: not each key's float again
    if constexpr (VEC) {
      using V16 = Vec<scalar_t, PV>;
      const V16* chunks = reinterpret_cast<const V16*>(base);
      const int nchunks = L / PV;
#pragma unroll
      for (int j = 0; j < LOADS; ++j) {
        const int q = tid + threads * j;
        const V16 v = chunks[q < nchunks ? q : 0];  // a copy: one 16-byte load
        float f[PV];
        unpack(v, f);
#pragma unroll
        for (int e = 0; e < PV; ++e) {
          xf[j * PV + e] = f[e];
          key[j * PV + e] = float_key(f[e]);
        }
      }
    } else {
      // the thread's units one pointer step of `threads` units apart: one IMAD.WIDE an
      // address, not an index's multiply and widening
      const scalar_t* p = base + tid * sw;
      const int64_t stride = int64_t(threads) * sw;
#pragma unroll
      for (int j = 0; j < UNITS; ++j) {
        const bool in = j < kSure || tid + threads * j < L;
        xf[j] = to_float(*(in ? p : base));
        key[j] = float_key(xf[j]);
        p += stride;
      }
    }
    uint32_t kmin = 0xffffffffu, kmax = 0;  // the keys' min / max: -0.0 below +0.0
#pragma unroll
    for (int j = 0; j < UNITS; ++j) {
      kmin = min(kmin, key[j]);
      kmax = max(kmax, key[j]);
    }
    RadixState st{0, 0, k};
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int shift = 24 - 8 * pass;
      uint32_t* h = hist(pass);
      if (!BLOCK && pass > 0) {  // the group's one histogram again: every lane has read it
        sync();
        clear(pass);
        sync();
      }
      // the digit at shift of a key on the prefix (every key at the top digit), else 256:
      // the prefix's bits below shift + 8 are 0, so key - prefix lies in [0, 2^(shift + 8))
      // exactly when the key is on it (a subtraction, a shift and a min, not a LOP3, a
      // compare, a shift, a LOP3 and a select); the top digit is the key's top byte, one
      // PRMT (a shift and a LOP3 else: nvcc folds the bin's * 4 into the shift)
      const uint32_t prefix = st.prefix;
      auto bin = [&](uint32_t key) {
        return pass == 0 ? __byte_perm(key, 0, 0x4443) : min((key - prefix) >> shift, 256u);
      };
#pragma unroll
      for (int j = 0; j < UNITS; ++j) radix_count(bin(key[j]), h);
      if (tid == 0) {
#pragma unroll
        for (int e = 0; e < PV; ++e) atomicSub(&h[bin(key[e])], pad);
      }
      sync();
      const RadixDigit d = group_radix_digit<BLOCK ? 32 : G>(h, st.rank, lane);
      st.prefix |= d.digit << shift;
      st.mask |= 0xffu << shift;
      st.rank = d.rank;
    }
    const float t = key_float(fill_low(st.prefix, kLowestShift<scalar_t>));
    if (!stats) {
      if (tid == 0 && act) thr[m * os] = t;
      continue;
    }
    kmin = group_reduce<BLOCK ? 32 : G>(kmin, KeyMin());
    kmax = group_reduce<BLOCK ? 32 : G>(kmax, KeyMax());
    if (BLOCK) {  // the warps' pairs through shared memory: one barrier
      if (lane == 0) {
        kscratch[2 * (threadIdx.x >> 5)] = kmin;
        kscratch[2 * (threadIdx.x >> 5) + 1] = kmax;
      }
      __syncthreads();
      for (int w = 0; w < threads / 32; ++w) {
        kmin = min(kmin, kscratch[2 * w]);
        kmax = max(kmax, kscratch[2 * w + 1]);
      }
    }
    const float2 range = key_range(kmin, kmax);
    const float lo = range.x, r = range_reciprocal(lo, range.y);
    const SoftMaskTerms terms = soft_mask_terms(t, lo, r, mode);
    // in double: every S a multiple of 2^-24 in [0, 1], so the sum, and the padding's
    // taken out of it, are exact in any order (backend_contract.md): the reference's to
    // the bit
    double sum = 0.0;
#pragma unroll
    for (int j = 0; j < UNITS; ++j) sum += soft_mask_at(xf[j], terms);
    if (tid == 0) {
#pragma unroll
      for (int e = 0; e < PV; ++e) sum -= double(pad) * soft_mask_at(xf[e], terms);
    }
    sum = group_reduce<BLOCK ? 32 : G>(sum, SumOp());
    if (BLOCK) {  // thread 0 adds the warps' sums (exact: any order)
      if (lane == 0) dscratch[threadIdx.x >> 5] = sum;
      __syncthreads();
      if (tid == 0) {
        for (int w = 1; w < threads / 32; ++w) sum += dscratch[w];
      }
    }
    if (tid == 0 && act) {
      thr[m * os] = t;
      mn[m * os] = lo;
      rcp[m * os] = r;
      msum[m] = sum;
    }
  }
}

template <typename scalar_t>
void launch_map_select(const scalar_t* x, const Strides4& s, int64_t maps, int64_t C, int64_t H,
                       int64_t W, int64_t k, const Gamma& gamma, int mode, float* thr,
                       float* mn, float* rcp, int64_t os, double* msum) {
  if (maps == 0) return;
  const int64_t L = H * W;
  const FastDiv fc = fast_div(C < (int64_t(1) << 31) ? C : 1);
  const bool flat = H == 1 || s.h == W * s.w;  // rows one stride apart
  const bool regs = maps < (int64_t(1) << 31) && C < (int64_t(1) << 31);  // 32-bit m / C
  // contiguous maps of whole 16-byte chunks, 16-byte aligned: read in 16-byte loads (VEC),
  // not unit by unit
  constexpr int64_t V = 16 / sizeof(scalar_t);
  const bool vec = s.w == 1 && L % V == 0 && s.n % V == 0 && s.c % V == 0 &&
                   reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // a group of 4 or 32 lanes per map: the map within 2^31 elements of its start
  if (regs && L >= 1 && L <= 32 * 32 && flat && (L - 1) * s.w < (int64_t(1) << 31)) {
    // G * UNITS slots: 64 (4 lanes, 16 keys a lane), 256 (4 lanes, 64 keys a lane), 1024
    // (a warp, 32 keys a lane); each takes maps of over a quarter of its slots but the
    // first, maps of 1 to 64 units
    const int slots = L <= 64 ? 64 : L <= 256 ? 256 : 1024, G = slots == 1024 ? 32 : 4;
    auto form = [slots](auto vec_tag) {
      constexpr bool VEC = decltype(vec_tag)::value;
      return slots == 64    ? map_select_regs_kernel<scalar_t, 16, false, 4, VEC>
             : slots == 256 ? map_select_regs_kernel<scalar_t, 64, false, 4, VEC>
                            : map_select_regs_kernel<scalar_t, 32, false, 32, VEC>;
    };
    const auto kernel = vec ? form(std::true_type{}) : form(std::false_type{});
    const int threads = 32 * (G == 4 ? kSelectWarps<4> : kSelectWarps<32>);
    kernel<<<grid_for(maps, threads / G), threads, 0, current_stream()>>>(
        x, s, static_cast<int>(s.w), maps, C, fc, static_cast<int>(L),
        static_cast<uint32_t>(k), gamma, mode, thr, mn, rcp, os, msum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // a block per map whose keys fit in registers: contiguous maps of 16-byte aligned chunks
  // in 16-byte loads, other maps of rows one stride apart (channels_last) unit by unit
  if (regs && flat && L <= kRegsThreads * kRegsUnits && (L - 1) * s.w < (int64_t(1) << 31)) {
    const int threads = static_cast<int>(ceil_div(L, 32 * kRegsUnits) * 32);
    const auto kernel = vec ? map_select_regs_kernel<scalar_t, kRegsUnits, true>
                            : map_select_regs_kernel<scalar_t, kRegsUnits, true, 32, false>;
    kernel<<<grid_for(maps, 1), threads, 0, current_stream()>>>(
        x, s, static_cast<int>(s.w), maps, C, fc, static_cast<int>(L),
        static_cast<uint32_t>(k), gamma, mode, thr, mn, rcp, os, msum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool use_smem = L <= kSmemKeys;
  const size_t smem = static_cast<size_t>(use_smem ? L : kSmemKeys) * sizeof(uint32_t);
  map_select_kernel<scalar_t>
      <<<grid_for(maps, 1), select_threads(L), smem, current_stream()>>>(
          x, s, maps, C, fc, H, W, static_cast<uint32_t>(k), gamma, mode, use_smem, thr, mn,
          rcp, os, msum);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
struct AttentionW {
  const scalar_t* x;
  Strides4 xs;
  const float4* state;  // per map: thr, scale[n], mn, r (reference.attention_state)
  const bool* active;
  int64_t C;
  int mode;
  // reference: torch.where(active, S, 1) * scale[n]; x is read only for active maps.
  // NCHW: a map's state once per line; NHWC: per channel.
  struct Row {
    const scalar_t* x;  // x at the segment's first element
    int64_t m;          // map n * C + c of the first element
    float thr, mn, rcp, s;  // rcp: range_reciprocal of the map
    bool act;
  };
  template <bool CL>
  __device__ __forceinline__ Row row(const Coord4& p, int) const {
    const int64_t m = p.n * C + p.c;
    const float4 st = state[m];
    Row r{x + off4(xs, p), m, st.x, st.z, st.w, st.y, false};
    if (!CL) r.act = active[m];
    return r;
  }
  template <bool CL>
  __device__ __forceinline__ float at(const Row& r, int j) const {
    float s = 1.f;
    if (!CL) {
      if (r.act) s = soft_mask(to_float(r.x[j * xs.w]), r.thr, r.mn, r.rcp, mode);
      return s * r.s;
    }
    const int64_t m = r.m + j;
    const float4 st = state[m];  // each map's own scale, as the reference reads it
    if (active[m]) s = soft_mask(to_float(r.x[j * xs.c]), st.x, st.z, st.w, mode);
    return s * st.y;
  }
};

}  // namespace

void launch_kth_largest(const at::TensorBase& v, int64_t k, const at::TensorBase& out) {
  const Strides4 s{v.stride(0), 0, 0, v.stride(1)};
  launch_map_select<float>(v.data_ptr<float>(), s, v.size(0), 1, 1, v.size(1), k, Gamma{}, 0,
                           out.data_ptr<float>(), nullptr, nullptr, 1, nullptr);
}

void launch_map_threshold(const at::TensorBase& x, int64_t k, const at::TensorBase& out) {
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::map_threshold", [&] {
    launch_map_select<scalar_t>(x.data_ptr<scalar_t>(), strides4(x), x.size(0) * x.size(1),
                                x.size(1), x.size(2), x.size(3), k, Gamma{}, 0,
                                out.data_ptr<float>(), nullptr, nullptr, 1, nullptr);
  });
}

void launch_attention_stats(const at::TensorBase& x, int64_t k, const at::TensorBase& active,
                            int mode, const at::TensorBase& thr, const at::TensorBase& mn,
                            const at::TensorBase& rcp, const at::TensorBase& msum) {
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::attention_stats", [&] {
    launch_map_select<scalar_t>(x.data_ptr<scalar_t>(), strides4(x), x.size(0) * x.size(1),
                                x.size(1), x.size(2), x.size(3), k,
                                Gamma{active.data_ptr<bool>(), Uniforms{}, nullptr, 0.f, nullptr},
                                mode, thr.data_ptr<float>(), mn.data_ptr<float>(),
                                rcp.data_ptr<float>(), 1, msum.data_ptr<double>());
  });
}

void launch_attentiondrop_stats(const at::TensorBase& x, int64_t k, const at::TensorBase& noise,
                                const at::TensorBase& alpha_t, float alpha, int mode,
                                const at::TensorBase& state, const at::TensorBase& msum,
                                const at::TensorBase& active) {
  const Gamma gamma{nullptr, uniforms(noise),
                    alpha_t.defined() ? alpha_t.data_ptr<float>() : nullptr, alpha,
                    active.data_ptr<bool>()};
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::attentiondrop_plan", [&] {
    float* st = state.data_ptr<float>();  // (thr, scale, mn, r) per map; scale: the plan's
    launch_map_select<scalar_t>(x.data_ptr<scalar_t>(), strides4(x), x.size(0) * x.size(1),
                                x.size(1), x.size(2), x.size(3), k, gamma, mode, st, st + 2,
                                st + 3, 4, msum.data_ptr<double>());
  });
}

// NCHW, maps of HW >= V elements, t, x and out dense and 16-byte aligned: U 16-byte chunks
// of V elements an iteration (E = U V elements) lie in map m0, or in m0 and m0 + 1 (the
// first k0 < E elements in m0, k0 a multiple of G as HW is; never where G = V, ONE_MAP).
// Per iteration the state of each map it touches (its activity and
// reference.attention_state), per group of G elements which of the two: not the generic
// apply_kernel's state per line segment or element. U = 4 (G = 1: HW % 4 != 0, a select
// per element) shares the index and state work among four chunks, and lies in one sample,
// so the scale, scale[n] in every map's state, is not selected. MODE 0/1/2: "am"/"sm"/"ad"
// (a constant, so that soft_mask folds).
// A map's state for its units' multiplier. "am" (MODE 0): w = s where x < thr, else sd =
// (active ? 0 : 1) * s (0 * s, not 0: the reference's S * scale, NaN for an infinite
// scale), so that a unit costs a compare and a select, not an activity test and products.
struct MapState {
  float thr, mn, r, s, sd;
  bool act;
};

// The state is one 16-byte load (thr, scale, mn, r: reference.attention_state), 8 bytes
// for "am" (thr, scale). r = 0 where inactive ("sm", "ad"): f̂ = 0, S = 1, no activity
// test per unit.
template <int MODE>
__device__ __forceinline__ MapState map_state(uint32_t m, const float4* state,
                                              const bool* active) {
  const bool act = active[m];
  if (MODE == 0) {
    const float2 v = reinterpret_cast<const float2*>(state)[2 * m];
    return {v.x, 0.f, 0.f, v.y, act ? __fmul_rn(0.f, v.y) : v.y, act};
  }
  const float4 v = state[m];
  return {v.x, v.z, act ? v.w : 0.f, v.y, v.y, act};
}

template <int MODE>
__device__ __forceinline__ float attention_w(float x, const MapState& st) {
  if constexpr (MODE == 0) return x < st.thr ? st.s : st.sd;
  return soft_mask(x, st.thr, st.mn, st.r, MODE) * st.s;
}

// a or b, field by field: `first ? a : b` of the structs themselves takes their address,
// and nvcc then keeps both in local memory (spills).
__device__ __forceinline__ MapState pick(bool first, const MapState& a, const MapState& b) {
  return {first ? a.thr : b.thr, first ? a.mn : b.mn, first ? a.r : b.r,
          first ? a.s : b.s,   first ? a.sd : b.sd, first ? a.act : b.act};
}

// out[i ... i + V - 1] = t * w for one 16-byte chunk, w from x's chunk (t's where X_IS_T,
// the forward) and the state of the chunk's element j, state_of(j).
template <int MODE, bool X_IS_T, typename scalar_t, typename StateOf>
__device__ __forceinline__ void attention_chunk(const scalar_t* t, const scalar_t* x,
                                                scalar_t* out, uint32_t i, StateOf state_of) {
  constexpr uint32_t V = 16 / sizeof(scalar_t);
  const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i);
  const Vec<scalar_t, V> xin = X_IS_T ? in : *reinterpret_cast<const Vec<scalar_t, V>*>(x + i);
  float tf[V], xf[V];
  unpack(in, tf);
  unpack(xin, xf);
  Vec<scalar_t, V> res;
#pragma unroll
  for (uint32_t j = 0; j < V; ++j)
    res.v[j] = static_cast<scalar_t>(tf[j] * attention_w<MODE>(xf[j], state_of(j)));
  *reinterpret_cast<Vec<scalar_t, V>*>(out + i) = res;
}

template <typename scalar_t, int MODE, int G, int U, bool X_IS_T>
__global__ void apply_attention_maps_kernel(const scalar_t* __restrict__ t,
                                            const scalar_t* __restrict__ x,
                                            scalar_t* __restrict__ out,
                                            const float4* __restrict__ state,
                                            const bool* __restrict__ active,
                                            const uint32_t numel, const FastDiv hw,
                                            const uint32_t last_map) {
  constexpr uint32_t V = 16 / sizeof(scalar_t), E = U * V;  // elements per iteration
  constexpr bool ONE_MAP = G == V;
  const uint32_t groups = numel / E;
  const uint32_t stride = gridDim.x * blockDim.x;
  // numel < 2^31 and the grid is at most 2^26 threads: no index below wraps.
#pragma unroll 1
  for (uint32_t grp = blockIdx.x * blockDim.x + threadIdx.x; grp < groups; grp += stride) {
    const uint32_t i0 = grp * E;
    const uint32_t m0 = div_of(i0, hw);
    const uint32_t k0 = (m0 + 1) * hw.d - i0;  // the iteration's elements in map m0
    const MapState a = map_state<MODE>(m0, state, active);
    // the next map's state whether or not the iteration reaches it (then unused: every
    // j < k0), so that no branch merges the two
    const MapState b = ONE_MAP ? a : map_state<MODE>(min(m0 + 1, last_map), state, active);
    // x only where a map of the iteration is active; elsewhere its value is never used
    // (r = 0, sd = s), and t's chunk again (an L1 hit) costs less than merging the two per
    // element
    const bool live = a.act || (!ONE_MAP && k0 < E && b.act);
    const scalar_t* xs = live ? x : t;
#pragma unroll
    for (uint32_t u = 0; u < U; ++u) {
      attention_chunk<MODE, X_IS_T>(t, xs, out, i0 + u * V, [&](uint32_t j) {
        // k0 is a multiple of G (H * W is): element e is map m0's when its group of G is,
        // the same pick for the G elements of a group (one select per field and group)
        const uint32_t e = u * V + j;
        MapState st = pick(e / G * G < k0, a, b);
        // U > 1: the iteration's elements lie in one sample (C * H * W % E == 0), whose
        // scale every map's state holds (reference.attention_state): no select
        if (U > 1) st.s = a.s;
        return st;
      });
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {  // the last numel % E elements
#pragma unroll 1
    for (uint32_t i = groups * E; i < numel; ++i) {
      const MapState st = map_state<MODE>(div_of(i, hw), state, active);
      out[i] = static_cast<scalar_t>(to_float(t[i]) * attention_w<MODE>(to_float(x[i]), st));
    }
  }
}

// channels_last t, x and out, dense and aligned, C % V == 0 (apply_kernel read each
// element's map state there: bf16 56.6 sm_90 SASS per element): a thread takes the V
// channels c0 ... c0 + V - 1 of sample n0 + blockIdx.y and the P pixels p0, p0 + R, ...,
// p0 + (P - 1) R of it, a 16-byte vector each, the lanes along the channels and then the
// pixels (a warp's accesses are contiguous); its V maps' states are read once per P
// pixels, and x only where one of the V maps is active (else t again: an L1 hit).
constexpr int kPixelsPerThread = 4;  // P

template <typename scalar_t, int MODE, bool X_IS_T>
__global__ void apply_attention_pixels_kernel(const scalar_t* __restrict__ t,
                                              const scalar_t* __restrict__ x,
                                              scalar_t* __restrict__ out,
                                              const float4* __restrict__ state,
                                              const bool* __restrict__ active,
                                              const uint32_t HW, const uint32_t C,
                                              const FastDiv vectors, const uint32_t R) {
  constexpr uint32_t V = 16 / sizeof(scalar_t), P = kPixelsPerThread;
  const uint32_t lin = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t r = div_of(lin, vectors);  // vectors.d = C / V per pixel
  if (r >= R) return;
  const uint32_t c0 = (lin - r * vectors.d) * V, n = blockIdx.y;
  const uint32_t m0 = n * C + c0;  // map of channel c0; the launch's first sample is 0
  // numel of a launch < 2^31: no index below wraps
#pragma unroll 1
  for (uint32_t p0 = r; p0 < HW; p0 += P * R) {
    MapState st[V];
    bool live = false;
#pragma unroll
    for (uint32_t j = 0; j < V; ++j) {
      st[j] = map_state<MODE>(m0 + j, state, active);
      live = live || st[j].act;
    }
    const scalar_t* xs = live ? x : t;
#pragma unroll
    for (uint32_t u = 0; u < P; ++u) {
      const uint32_t p = p0 + u * R;
      if (p >= HW) break;
      attention_chunk<MODE, X_IS_T>(t, xs, out, (n * HW + p) * C + c0,
                                    [&](uint32_t j) { return st[j]; });
    }
  }
}

// f(MODE, X_IS_T) as compile-time constants (std::integral_constant) from their runtime
// values: each kernel instance is one path (a runtime test splits nvcc's loop in two, or
// merges both into it), MODE folds soft_mask.
template <typename F>
auto by_mode(int mode, bool x_is_t, F f) {
  auto with_x = [&](auto m) {
    return x_is_t ? f(m, std::true_type{}) : f(m, std::false_type{});
  };
  return mode == 0   ? with_x(std::integral_constant<int, 0>{})
         : mode == 1 ? with_x(std::integral_constant<int, 1>{})
                     : with_x(std::integral_constant<int, 2>{});
}

void launch_apply_attention(const at::TensorBase& t, const at::TensorBase& x,
                            const at::TensorBase& state, const at::TensorBase& active,
                            int mode, const at::TensorBase& out) {
  // t (x or grad_y) has x's dtype: checked by the caller.
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3), per = C * HW;
  const bool dense = t.is_contiguous() && x.is_contiguous() && out.is_contiguous() &&
                     aligned16(t) && aligned16(x) && aligned16(out);
  // (N, C, 4) contiguous and 16-byte aligned: checked by the caller
  const float4* st = reinterpret_cast<const float4*>(state.data_ptr<float>());
  GD_DISPATCH_FLOAT_TYPES(x.scalar_type(), "guidedrop::apply_attention", [&] {
    constexpr int64_t V = 16 / sizeof(scalar_t);
    const int64_t step = flat_samples_per_launch(N, per, V);
    // G: a chunk's map boundary falls on a multiple of G elements. G = V (ONE_MAP): HW a
    // multiple of V, no chunk spans two maps (56 x 56, 28 x 28 and 32 x 32 in bfloat16),
    // one state per chunk; G = 4: a chunk's halves each lie in one map (14 x 14 in
    // bfloat16), a select per half; else (7 x 7) a select per element, four chunks an
    // iteration (E = 4 V elements: the index and state work shared), in one sample (its
    // scale not selected) and at most two maps (HW >= E)
    constexpr int G4 = V == 8 ? 4 : V;
    constexpr int64_t E = 4 * V;
    const int g = HW % V == 0 ? V : HW % 4 == 0 ? 4 : 1;
    if (t.numel() == 0) return;
    constexpr auto cl = at::MemoryFormat::ChannelsLast;
    const bool pixels = !dense && t.is_contiguous(cl) && x.is_contiguous(cl) &&
                        out.is_contiguous(cl) && aligned16(t) && aligned16(x) &&
                        aligned16(out) && C % V == 0 && step > 0;
    if (!pixels && (!dense || step == 0 || HW < V || (g == 1 && (HW < E || per % E != 0)))) {
      // misaligned or strided t, x or out, channels_last with C % V != 0, NCHW maps under
      // V elements, maps of HW % 4 != 0 under E elements or in samples of C * HW % E != 0
      const AttentionW<scalar_t> wfn{x.data_ptr<scalar_t>(), strides4(x), st,
                                     active.data_ptr<bool>(), C, mode};
      launch_apply<scalar_t>(t, out, wfn);
      return;
    }
    // X_IS_T (the forward, t = x): x read once
    const bool x_is_t = x.data_ptr() == t.data_ptr();
    const scalar_t *tp = t.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (pixels) {
      const auto kernel = by_mode(mode, x_is_t, [](auto m, auto xt) {
        return apply_attention_pixels_kernel<scalar_t, decltype(m)::value, decltype(xt)::value>;
      });
      const int64_t R = ceil_div(HW, kPixelsPerThread), vectors = C / V;
      // samples on the grid's y axis (at most 65535 a launch), in launches under 2^31
      // elements
      for (int64_t n0 = 0; n0 < N; n0 += std::min<int64_t>(step, 65535)) {
        const int64_t n = std::min<int64_t>({step, 65535, N - n0});
        const dim3 grid(static_cast<unsigned>(ceil_div(R * vectors, kThreads)),
                        static_cast<unsigned>(n));
        kernel<<<grid, kThreads, 0, current_stream()>>>(
            tp + n0 * per, xp + n0 * per, op + n0 * per, st + n0 * C,
            active.data_ptr<bool>() + n0 * C, static_cast<uint32_t>(HW),
            static_cast<uint32_t>(C), fast_div(vectors), static_cast<uint32_t>(R));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    const auto kernel = by_mode(mode, x_is_t, [&](auto m, auto xt) {
      constexpr int M = decltype(m)::value;
      constexpr bool XT = decltype(xt)::value;
      return g == V ? apply_attention_maps_kernel<scalar_t, M, V, 1, XT>
             : g == 4 ? apply_attention_maps_kernel<scalar_t, M, G4, 1, XT>
                      : apply_attention_maps_kernel<scalar_t, M, 1, 4, XT>;
    });
    for (int64_t n0 = 0; n0 < N; n0 += step) {
      const int64_t n = std::min(step, N - n0), numel = n * per, m0 = n0 * C;
      const unsigned grid = grid_for(ceil_div(numel, g == 1 ? E : V), kThreads);
      kernel<<<grid, kThreads, 0, current_stream()>>>(
          tp + n0 * per, xp + n0 * per, op + n0 * per, st + m0, active.data_ptr<bool>() + m0,
          static_cast<uint32_t>(numel), fast_div(HW), static_cast<uint32_t>(n * C - 1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace guidedrop
