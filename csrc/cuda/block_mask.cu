// Block masks: DropBlock / CamDrop seeds packed into bits, their r x r coverage, and the
// apply kernels that upsample a small block mask (CorrDrop, FocusedDropout) or expand the
// packed seeds (DropBlock, CamDrop) inside the kernel, never materialising an x-sized mask.
//
// Seeds are packed as one bit string per sample: bit i of sample n is the unit (cs, h, w) with
// i = (cs * H + h) * W + w, no padding per row or map (1/16 of a 16-bit x, any W).
// seed_bits: one thread per run of kSeedRun output bytes (n, q) = bits i = 8q .. 8q + 7,
//   (cs, h, w) divided out once per run and stepped per unit. A unit is a
//   seed when u < g, it is a valid centre, and it is a spatial / channel candidate. g is a
//   float32 read from device memory (a runtime rate: no recompile, no host read); u is
//   noise[n, cs, h, w] rounded to float32 whatever noise's dtype (SPEC §1: u and g both in
//   the compute dtype), or, without noise, a Philox-4x32-10 uniform
//   keyed by the logical element index e = ((n * Cs + cs) * H + h) * W + w: counter
//   (offset / 4, e / 4), key = seed, word e % 4 — the value curand_init(seed, e / 4, offset)
//   followed by curand4() would give — as u = (bits >> 8) * 2^-24 in [0, 1). The seed and
//   offset come from the generator's philox_cuda_state(4) (graph-safe: unpacked in the
//   kernel), so any tiling, and a rerun with the same generator state, draws the same u.
//   For seeds_plan it also zeroes the counters of plans/dropblock.cu's coverage + scale
//   kernel, the next launch on the stream (no memset launch).
// covered_run (seed_cover.cuh): the r x r test for a run of up to 32 units of a row at once
//   (the seed rows ORed once into a row mask, then dilated), for apply_seeds.
// seed_coverage: one thread per byte of the seeds' r x r blocks (seed_cover.cuh's
//   block_byte, shared with plans/dropblock.cu, which also writes them), counting the
//   covered units; block sums, then one int64 atomicAdd per block and sample (integer:
//   deterministic).
// apply_block: w = mask[n, h / k, w / k] * scale[n]; dense aligned x in flat 16-byte chunks
//   (apply_block_rows_kernel for NCHW with C * H * W % V == 0, apply_block_pixels_kernel
//   for channels_last with C % V == 0), else apply_kernel with BlockW (k: a host-computed
//   fast division).
// apply_seeds: w = (covered ? 0 : 1) * scale[n]. r = 1 (the DropBlock / CamDrop plans'
//   state: their seeds' r x r blocks) on dense aligned x: a bit per element, read a byte
//   per 8 elements (apply_bits_maps_kernel for NCHW, apply_bits_pixels_kernel for
//   channels_last with C % V == 0); else apply_kernel with SeedsW: the r x r OR over the
//   packed bits of the rows h - lo .. h + hi (lo = r - 1 - r // 2, hi = r // 2) read in the
//   kernel, once per line segment (SeedsW::row).
#include "common.cuh"
#include "launchers.h"
#include "seed_cover.cuh"

#include <ATen/cuda/PhiloxUtils.cuh>

namespace guidedrop {
namespace {

// Philox-4x32-10 (Salmon et al. 2011), the generator behind curand's
// curandStatePhilox4_32_10_t and torch's CUDA RNG.
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
  constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
  constexpr uint32_t kWeylA = 0x9E3779B9u, kWeylB = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = kMulA * ctr.x, hi0 = __umulhi(kMulA, ctr.x);
    const uint32_t lo1 = kMulB * ctr.z, hi1 = __umulhi(kMulB, ctr.z);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += kWeylA;
    key.y += kWeylB;
  }
  return ctr;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Output bytes per thread of seed_bits: the unit's (n, cs, h, w) is divided out once per
// run of kSeedRun bytes, then stepped unit by unit (a carry into h and cs, no division).
constexpr int64_t kSeedRun = 8;

// noise == nullptr: Philox. Outputs kSeedRun consecutive bytes of a sample per thread.
template <typename noise_t>
__global__ void seed_bits_kernel(const noise_t* __restrict__ noise, const Strides4 ns,
                                 const bool* __restrict__ cand_s, const bool* __restrict__ cand_c,
                                 const int64_t N, const int64_t Cs, const int64_t H,
                                 const int64_t W, const int64_t Bn, const int64_t r,
                                 const float* __restrict__ g_ptr, const float g_value,
                                 const at::PhiloxCudaState philox, uint8_t* __restrict__ bits,
                                 long long* __restrict__ zero_ws, const int64_t n_ws) {
  const float g = g_ptr != nullptr ? *g_ptr : g_value;
  // The counters of seeds_scale_kernel, next on the stream: zeroed here, not by a memset.
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_ws;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    zero_ws[i] = 0;
  uint64_t seed = 0, offset = 0;
  if (noise == nullptr) {
    const auto so = at::cuda::philox::unpack(philox);
    seed = std::get<0>(so);
    offset = std::get<1>(so);
  }
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t ctr_lo = offset / 4;
  const int64_t per_sample = Cs * H * W, runs = (Bn + kSeedRun - 1) / kSeedRun;
  const int64_t total = N * runs;
  // valid centres: h_lo <= h <= h_hi, same in w
  const int64_t h_lo = r / 2, h_hi = H - r + r / 2, w_lo = r / 2, w_hi = W - r + r / 2;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / runs, q0 = (idx - n * runs) * kSeedRun;
    const int64_t q1 = min(q0 + kSeedRun, Bn);
    // unit i = 8 * q0 = (cs * H + h) * W + w of sample n: the run's only divisions
    int64_t i = 8 * q0, w = i % W, h = (i / W) % H, cs = i / (W * H);
    uint64_t group = ~uint64_t(0);  // Philox block of the cached draw: 4 consecutive units
    uint4 draw = make_uint4(0, 0, 0, 0);
    for (int64_t q = q0; q < q1; ++q) {
      uint32_t byte = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        bool seeded = i < per_sample && h >= h_lo && h <= h_hi && w >= w_lo && w <= w_hi &&
                      (cand_c == nullptr || cand_c[n * Cs + cs]) &&
                      (cand_s == nullptr || cand_s[(n * H + h) * W + w]);
        if (seeded) {
          if (noise != nullptr) {
            seeded = static_cast<float>(noise[off4(ns, n, cs, h, w)]) < g;
          } else {
            const uint64_t e = static_cast<uint64_t>(n * per_sample + i);  // logical element
            if (e / 4 != group) {
              group = e / 4;
              const uint4 ctr = make_uint4(static_cast<uint32_t>(ctr_lo),
                                           static_cast<uint32_t>(ctr_lo >> 32),
                                           static_cast<uint32_t>(group),
                                           static_cast<uint32_t>(group >> 32));
              draw = philox4x32_10(ctr, key);
            }
            const float u = static_cast<float>(word(draw, static_cast<int>(e % 4)) >> 8) *
                            (1.0f / 16777216.0f);
            seeded = u < g;
          }
        }
        if (seeded) byte |= 1u << j;
        ++i;  // the next unit: w, then h, then cs carried
        if (++w == W) {
          w = 0;
          if (++h == H) {
            h = 0;
            ++cs;
          }
        }
      }
      bits[n * Bn + q] = static_cast<uint8_t>(byte);
    }
  }
}

__global__ void seed_coverage_kernel(const uint8_t* __restrict__ bits, const int64_t N,
                                     const int64_t per_sample, const int64_t W,
                                     const int64_t Bn, const int64_t r,
                                     long long* __restrict__ out) {
  __shared__ unsigned long long part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // uniform in the block
    unsigned long long count = 0;
    for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < Bn;
         b += static_cast<int64_t>(gridDim.x) * blockDim.x)
      count += __popc(block_byte(bits + n * Bn, Bn, b, per_sample, W, r));
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) count += __shfl_xor_sync(kFullMask, count, d);
    if (lane == 0) part[warp] = count;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long total = 0;
      for (int i = 0; i < static_cast<int>(blockDim.x >> 5); ++i) total += part[i];
      if (total) atomicAdd(reinterpret_cast<unsigned long long*>(out + n), total);
    }
    __syncthreads();  // before the next sample rewrites part
  }
}

// mask[n, h / k, w / k] * scale[n]: a mask row per NCHW line, one value per NHWC pixel.
struct BlockW {
  const uint8_t* mask;
  const float* scale;
  int64_t Hs, Ws;
  FastDiv k;  // h, w and k fit in 32 bits (checked by the caller)
  struct Row {
    const uint8_t* m;  // mask row (n, h / k)
    float s, v;        // scale[n]; NHWC: the multiplier
    uint32_t w0;       // NCHW: the segment's first w
  };
  template <bool CL>
  __device__ __forceinline__ Row row(const Coord4& p, int) const {
    const uint8_t* m = mask + (p.n * Hs + div_of(static_cast<uint32_t>(p.h), k)) * Ws;
    const float s = scale[p.n];
    if (!CL) return {m, s, 0.f, static_cast<uint32_t>(p.w)};
    return {m, s, static_cast<float>(m[div_of(static_cast<uint32_t>(p.w), k)]) * s, 0};
  }
  template <bool CL>
  __device__ __forceinline__ float at(const Row& r, int j) const {
    if (CL) return r.v;
    return static_cast<float>(r.m[div_of(r.w0 + j, k)]) * r.s;
  }
};

// apply_block on dense, 16-byte aligned x: flat 16-byte chunks of V = 16 / sizeof(T)
// elements, the chunk's (n, c, h, w0) from fast divisions per chunk, not BlockW's line
// segments in apply_kernel (a division by k per element: 8.6-47 SASS per element). The
// launch's mask (N, Hs, Ws) and its 32-bit indices: Hs * Ws <= C * H * W (launch_apply_block).
struct BlockGeom {
  uint32_t numel, N;
  FastDiv C, H, W, k;  // k: only where it is a runtime value (K = 0)
  uint32_t nH, nW, nk;  // -H, -W, -k mod 2^32: a remainder in one multiply-add
  uint32_t HsWs, Ws, last_col;  // last_col = (W - 1) / k
};

// NCHW with W >= V - 1 and C * H * W % V == 0: a chunk holds the elements w0 .. of its row
// and, from j = W - w0 on, the first ones of the next row (h + 1, else row 0 of the next
// map), always of one sample: one scale per chunk. K = 0: k >= V - 1 (a runtime value), so
// the chunk's part in its row spans mask columns c0 = w0 / k and c0 + 1 (from j = b on), its
// part in the next row column 0 only: three mask bytes per chunk, two selects per element.
// 2 <= K < V - 1: k a constant, element j's column c0 + j / K + (r >= K - j % K) (r = w0 %
// K) in its row, (j - W + w0) / K in the next: the chunk's bytes of both rows loaded and
// scaled once, a select per element (compares per chunk). K = 1: one byte load per element
// (cached: neighbours share bytes), its address selected (a chunk's 8 columns and 7 of the
// next row would be 15 loads).
// Scale (float32): the warp's 32 chunks span at most 32 samples, so each lane loads one
// scale and the chunk's comes from a shuffle: one 4-byte load per 16 bytes of x, as
// apply_channel_maps_kernel; the trip count is uniform across the warp for it.
template <typename scalar_t, int K>
__global__ void apply_block_rows_kernel(const scalar_t* __restrict__ t,
                                        scalar_t* __restrict__ out,
                                        const uint8_t* __restrict__ mask,
                                        const float* __restrict__ scale, const BlockGeom g) {
  constexpr uint32_t V = 16 / sizeof(scalar_t);
  // float32: a scale load per chunk would be a second 4-byte load per 16 bytes of x
  constexpr bool kShuffle = V == 4;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31;
  // chunks per grid iteration; the shuffles' loop starts at the warp's first chunk
  const uint32_t step = kShuffle ? (gridDim.x * blockDim.x) & ~31u : gridDim.x * blockDim.x;
  const uint32_t end = g.numel;  // a multiple of V (C * H * W % V == 0)
  // numel < 2^31 and the grid is at most 2^26 threads: no index below wraps. The loop
  // walks element indices (i0: the chunk's first), one multiply fewer per chunk.
#pragma unroll 1
  for (uint32_t base = (kShuffle ? tid & ~31u : tid) * V; base < end; base += step * V) {
    const uint32_t i0 = kShuffle ? base + lane * V : base;
    const uint32_t row = div_of(i0, g.W), w0 = i0 + row * g.nW;
    const uint32_t q = div_of(row, g.H), h = row + q * g.nH;
    const uint32_t n = div_of(q, g.C);
    // the next row is row 0 of the next map, the same sample's (C * H * W % V == 0)
    const bool wrap = h + 1 == g.H.d;
    float s;
    if constexpr (kShuffle) {
      const uint32_t nb = __shfl_sync(kFullMask, n, 0);
      const float sl = scale[min(nb + lane, g.N - 1)];
      s = __shfl_sync(kFullMask, sl, (n - nb) & 31);  // & 31: lanes past the end ask any
    }
    if (i0 >= end) continue;
    const uint32_t nxt = g.W.d - w0;  // the first element of the next row, >= 1
    if constexpr (!kShuffle) s = scale[n];
    const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i0);
    float tf[V];
    unpack(in, tf);
    Vec<scalar_t, V> res;
    if constexpr (K == 0) {
      const uint32_t hk = div_of(h, g.k), hk1 = div_of(wrap ? 0 : h + 1, g.k);
      // b = (c0 + 1) * k - w0 = k - w0 % k, the first element of column c0 + 1: 1 <= b <= k
      const uint32_t c0 = div_of(w0, g.k), b = g.k.d - (w0 + c0 * g.nk);
      const uint8_t* m0 = mask + (n * g.HsWs + hk * g.Ws + c0);
      // __fmul_rn: kept as three values; a plain product would be re-associated into a
      // byte select, then a conversion and a product per element
      const float f0 = __fmul_rn(static_cast<float>(m0[0]), s);
      const float f1 = __fmul_rn(static_cast<float>(m0[c0 < g.last_col]), s);
      const float f2 = __fmul_rn(static_cast<float>(mask[n * g.HsWs + hk1 * g.Ws]), s);
#pragma unroll
      for (uint32_t j = 0; j < V; ++j) {
        const float w = j > 0 && j >= nxt ? f2 : j > 0 && j >= b ? f1 : f0;
        res.v[j] = static_cast<scalar_t>(tf[j] * w);
      }
    } else if constexpr (K == 1) {
      const uint32_t oa = n * g.HsWs + h * g.Ws + w0;
      const uint32_t ob = n * g.HsWs + (wrap ? 0 : h + 1) * g.Ws - nxt;  // wraps; from nxt on
#pragma unroll
      for (uint32_t j = 0; j < V; ++j) {
        const bool here = j == 0 || j < nxt;
        const float m = static_cast<float>(mask[here ? oa + j : ob + j]);
        res.v[j] = static_cast<scalar_t>(tf[j] * (m * s));
      }
    } else {
      // 2 <= K < V - 1: the chunk's part in its row reads columns c0 + i, i < NA, its part
      // in the next row columns 0 .. NB - 1 (NB - 1 <= last_col as W >= V - 1): bytes at
      // constant offsets of two addresses, each times its row's scale, then per element a
      // select among them (compares per chunk), no per-element load or conversion
      constexpr uint32_t NA = (K + V - 2) / K + 1, NB = (V - 2) / K + 1;
      const uint32_t c0 = w0 / K, r = w0 - c0 * K;
      const uint8_t* m0 = mask + (n * g.HsWs + (h / K) * g.Ws + c0);
      const uint8_t* m1 = mask + (n * g.HsWs + ((wrap ? 0 : h + 1) / K) * g.Ws);
      const uint32_t cols = g.last_col - c0;  // the row's columns after c0 (one subtraction)
      float fa[NA], fb[NB];
#pragma unroll
      for (uint32_t i = 0; i < NA; ++i)  // past the row's last column: no element takes it
        fa[i] = i <= cols ? __fmul_rn(static_cast<float>(m0[i]), s) : 0.f;
#pragma unroll
      for (uint32_t i = 0; i < NB; ++i) fb[i] = __fmul_rn(static_cast<float>(m1[i]), s);
#pragma unroll
      for (uint32_t j = 0; j < V; ++j) {
        // column c0 + j / K + (r >= K - j % K) of its row; of the next row, column i from
        // element nxt + i * K on (nxt >= 1: element 0 is always its row's). Every "is the
        // next row's" a compare of a constant with nxt, the same ones for all elements.
        const uint32_t lo = j / K;
        float w = j % K != 0 && lo + 1 < NA && r >= K - j % K ? fa[lo + 1] : fa[lo];
        if (j > 0 && j >= nxt) {
          w = fb[0];
#pragma unroll
          for (uint32_t i = 1; i < NB; ++i) w = j > i * K && j - i * K >= nxt ? fb[i] : w;
        }
        res.v[j] = static_cast<scalar_t>(tf[j] * w);
      }
    }
    *reinterpret_cast<Vec<scalar_t, V>*>(out + i0) = res;
  }
}

// NHWC with C % V == 0: a chunk is V channels of one pixel, one multiplier, its pixel from
// five fast divisions per chunk.
template <typename scalar_t>
__global__ void apply_block_pixels_kernel(const scalar_t* __restrict__ t,
                                          scalar_t* __restrict__ out,
                                          const uint8_t* __restrict__ mask,
                                          const float* __restrict__ scale, const BlockGeom g) {
  constexpr uint32_t V = 16 / sizeof(scalar_t);
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t stride = gridDim.x * blockDim.x;
  const uint32_t full = g.numel / V;  // numel % V == 0: C % V == 0
#pragma unroll 1
  for (uint32_t chunk = tid; chunk < full; chunk += stride) {
    const uint32_t i0 = chunk * V;
    const uint32_t pixel = div_of(i0, g.C), row = div_of(pixel, g.W), n = div_of(row, g.H);
    const uint32_t w = pixel + row * g.nW, h = row + n * g.nH;
    const float m = mask[n * g.HsWs + div_of(h, g.k) * g.Ws + div_of(w, g.k)];
    const float f = m * scale[n];
    const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i0);
    float tf[V];
    unpack(in, tf);
    Vec<scalar_t, V> res;
#pragma unroll
    for (uint32_t j = 0; j < V; ++j) res.v[j] = static_cast<scalar_t>(tf[j] * f);
    *reinterpret_cast<Vec<scalar_t, V>*>(out + i0) = res;
  }
}

// k = K for 1 <= K < V - 1 (a constant), else K = 0 (k >= V - 1, a runtime value).
template <typename scalar_t, int K = 1>
void launch_block_rows(int64_t k, unsigned grid, const scalar_t* t, scalar_t* out,
                       const uint8_t* mask, const float* scale, const BlockGeom& g) {
  constexpr int V = 16 / sizeof(scalar_t);
  if constexpr (K < V - 1) {
    if (k != K) return launch_block_rows<scalar_t, K + 1>(k, grid, t, out, mask, scale, g);
    apply_block_rows_kernel<scalar_t, K><<<grid, kThreads, 0, current_stream()>>>(
        t, out, mask, scale, g);
  } else {
    apply_block_rows_kernel<scalar_t, 0><<<grid, kThreads, 0, current_stream()>>>(
        t, out, mask, scale, g);
  }
}

// (covered ? 0 : 1) * scale[n]. NCHW: the coverage of a line segment in one covered_run;
// NHWC: one unit per pixel with shared seeds (CamDrop), else one per channel.
struct SeedsW {
  const uint8_t* bits;
  const float* scale;
  int64_t H, W, Bn, r;
  bool shared;
  struct Row {
    const uint8_t* sample;
    int64_t c, h, w;  // the segment's first element
    uint32_t mask;    // bit j: element j covered (NHWC, not shared: unused)
    float s;
  };
  template <bool CL>
  __device__ __forceinline__ Row row(const Coord4& p, int len) const {
    const uint8_t* sample = bits + p.n * Bn;
    const int64_t plane = shared ? 0 : p.c * H * W;
    uint32_t m = 0;
    if (!CL) m = covered_run(sample, plane, H, W, r, p.h, p.w, len);
    else if (shared) m = covered_run(sample, 0, H, W, r, p.h, p.w, 1) ? ~0u : 0u;
    return {sample, p.c, p.h, p.w, m, scale[p.n]};
  }
  template <bool CL>
  __device__ __forceinline__ float at(const Row& q, int j) const {
    bool cov;
    if (!CL || shared) cov = (q.mask >> (CL ? 0 : j)) & 1u;
    else cov = covered_run(q.sample, (q.c + j) * H * W, H, W, r, q.h, q.w, 1) != 0;
    return (cov ? 0.f : 1.f) * q.s;
  }
};

// apply_seeds with r = 1 (a packed mask: the seeds plans' blocks, reference.seed_blocks) on
// dense, 16-byte aligned x whose samples are whole bytes of bits (C * H * W % 8 == 0), in
// flat chunks of 8 elements (one byte of bits; 16 or 32 bytes of x), a fast division per
// chunk for its sample. NCHW: the chunk's units u0 .. u0 + 7 of its sample's string are
// i0 - n * C*H*W (C maps: one byte), or the positions pos .. of its map (SHARED: one byte
// where H * W % 8 == 0 (ONE_BYTE), else two shifted into place and, where the chunk runs
// past its map's end (H * W >= 7: at most once), the next map's first bits, the same
// sample's, shifted in after them).
template <typename scalar_t, bool SHARED, bool ONE_BYTE>
__global__ void apply_bits_maps_kernel(const scalar_t* __restrict__ t,
                                       scalar_t* __restrict__ out,
                                       const uint8_t* __restrict__ bits,
                                       const float* __restrict__ scale, const uint32_t chunks,
                                       const uint32_t Bn, const FastDiv per, const FastDiv hw) {
  constexpr uint32_t V = 16 / sizeof(scalar_t), E = 8, NV = E / V;  // NV vectors per chunk
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t stride = gridDim.x * blockDim.x;
#pragma unroll 1
  for (uint32_t chunk = tid; chunk < chunks; chunk += stride) {
    const uint32_t i0 = chunk * E, n = div_of(i0, per);
    uint32_t m;
    if constexpr (!SHARED) {
      m = bits[i0 / 8];  // samples of whole bytes: bit i of the launch's bits is element i
    } else {
      const uint32_t pos = i0 - div_of(i0, hw) * hw.d, b0 = n * Bn + pos / 8;
      if constexpr (ONE_BYTE) {
        m = bits[b0];
      } else {
        const uint32_t left = hw.d - pos;  // the chunk's elements in its map, >= 1
        m = (bits[b0] | (pos / 8 + 1 < Bn ? uint32_t(bits[b0 + 1]) << 8 : 0u)) >> (pos % 8);
        if (left < E) m = (m & ((1u << left) - 1u)) | (uint32_t(bits[n * Bn]) << left);
      }
    }
    const float s = scale[n], z = 0.f * s;  // (1 - dropped) * s: 0 * s (NaN for s = inf)
#pragma unroll
    for (uint32_t v = 0; v < NV; ++v) {
      const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i0 + v * V);
      float tf[V];
      unpack(in, tf);
      Vec<scalar_t, V> res;
#pragma unroll
      for (uint32_t j = 0; j < V; ++j) {
        const float w = (m >> (v * V + j)) & 1u ? z : s;
        res.v[j] = static_cast<scalar_t>(tf[j] * w);
      }
      *reinterpret_cast<Vec<scalar_t, V>*>(out + i0 + v * V) = res;
    }
  }
}

// NHWC with C % V == 0: a chunk is V channels of one pixel p; its bits are the pixel's
// (SHARED: one bit for the chunk) or unit c * H*W + p of each channel (a byte load each,
// neighbouring chunks' bytes in cache).
template <typename scalar_t, bool SHARED>
__global__ void apply_bits_pixels_kernel(const scalar_t* __restrict__ t,
                                         scalar_t* __restrict__ out,
                                         const uint8_t* __restrict__ bits,
                                         const float* __restrict__ scale,
                                         const uint32_t chunks, const uint32_t Bn,
                                         const FastDiv c, const FastDiv hw) {
  constexpr uint32_t V = 16 / sizeof(scalar_t);
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t stride = gridDim.x * blockDim.x;
#pragma unroll 1
  for (uint32_t chunk = tid; chunk < chunks; chunk += stride) {
    const uint32_t i0 = chunk * V;
    const uint32_t pixel = div_of(i0, c), n = div_of(pixel, hw);
    const uint32_t p = pixel - n * hw.d, c0 = i0 - pixel * c.d;
    const uint8_t* sample = bits + n * Bn;
    const float s = scale[n], z = 0.f * s;
    const Vec<scalar_t, V> in = *reinterpret_cast<const Vec<scalar_t, V>*>(t + i0);
    float tf[V];
    unpack(in, tf);
    Vec<scalar_t, V> res;
    if constexpr (SHARED) {
      const float w = (sample[p / 8] >> (p % 8)) & 1u ? z : s;
#pragma unroll
      for (uint32_t j = 0; j < V; ++j) res.v[j] = static_cast<scalar_t>(tf[j] * w);
    } else {
      uint32_t u = c0 * hw.d + p;
#pragma unroll
      for (uint32_t j = 0; j < V; ++j, u += hw.d) {
        const float w = (sample[u / 8] >> (u % 8)) & 1u ? z : s;
        res.v[j] = static_cast<scalar_t>(tf[j] * w);
      }
    }
    *reinterpret_cast<Vec<scalar_t, V>*>(out + i0) = res;
  }
}

}  // namespace

void launch_seed_bits(const at::TensorBase& noise, const at::TensorBase& cand_s,
                      const at::TensorBase& cand_c, const at::TensorBase& g, float g_value,
                      int64_t r, int64_t Cs, int64_t H, int64_t W, at::PhiloxCudaState philox,
                      const at::TensorBase& bits, const at::TensorBase& zero_ws) {
  const int64_t N = bits.size(0), Bn = bits.size(1);
  const int64_t total = bits.numel();
  if (total == 0) return;
  const float* g_ptr = g.defined() ? g.data_ptr<float>() : nullptr;
  long long* ws = zero_ws.defined() ? reinterpret_cast<long long*>(zero_ws.data_ptr<int64_t>())
                                    : nullptr;
  const int64_t n_ws = zero_ws.defined() ? zero_ws.numel() : 0;
  const bool* cs_ptr = cand_s.defined() ? cand_s.data_ptr<bool>() : nullptr;
  const bool* cc_ptr = cand_c.defined() ? cand_c.data_ptr<bool>() : nullptr;
  const unsigned grid = grid_for(N * ceil_div(Bn, kSeedRun), kThreads);
  if (!noise.defined()) {
    seed_bits_kernel<float><<<grid, kThreads, 0, current_stream()>>>(
        nullptr, Strides4{0, 0, 0, 0}, cs_ptr, cc_ptr, N, Cs, H, W, Bn, r, g_ptr, g_value, philox,
        bits.data_ptr<uint8_t>(), ws, n_ws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, noise.scalar_type(), "guidedrop::seed_bits",
      [&] {
        seed_bits_kernel<scalar_t><<<grid, kThreads, 0, current_stream()>>>(
            noise.data_ptr<scalar_t>(), strides4(noise), cs_ptr, cc_ptr, N, Cs, H, W, Bn, r,
            g_ptr, g_value, philox, bits.data_ptr<uint8_t>(), ws, n_ws);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void launch_seed_coverage(const at::TensorBase& bits, int64_t r, int64_t Cs, int64_t H,
                          int64_t W, const at::TensorBase& out) {
  const int64_t N = bits.size(0), Bn = bits.size(1);
  const int64_t per_sample = Cs * H * W;
  if (N == 0 || per_sample == 0) return;
  const dim3 grid(std::min<unsigned>(grid_for(Bn, kThreads), 1024u),
                  static_cast<unsigned>(std::min<int64_t>(N, 65535)));
  seed_coverage_kernel<<<grid, kThreads, 0, current_stream()>>>(
      bits.data_ptr<uint8_t>(), N, per_sample, W, Bn, r,
      reinterpret_cast<long long*>(out.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_apply_block(const at::TensorBase& t, const at::TensorBase& mask, int64_t k,
                        const at::TensorBase& scale, const at::TensorBase& out) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3), per = C * H * W;
  const int64_t Hs = mask.size(1), Ws = mask.size(2);
  const bool cl = !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool dense = dense_in_order(t, cl) && dense_in_order(out, cl) && aligned16(t) &&
                     aligned16(out);
  GD_DISPATCH_FLOAT_TYPES(t.scalar_type(), "guidedrop::apply_block", [&] {
    constexpr int64_t V = 16 / sizeof(scalar_t);
    const int64_t step = flat_samples_per_launch(N, per, V);
    // rows: a chunk on at most two rows of one sample
    const bool rows = !cl && W >= V - 1 && per % V == 0, pixels = cl && C % V == 0;
    if (t.numel() == 0) return;
    if (!dense || step == 0 || Hs * Ws > per || !(rows || pixels)) {
      // misaligned or strided x, NCHW rows under V - 1 or samples not of whole chunks,
      // channels_last with C % V != 0, a mask larger than a sample (32-bit mask indices)
      const BlockW wfn{mask.data_ptr<uint8_t>(), scale.data_ptr<float>(), Hs, Ws, fast_div(k)};
      launch_apply<scalar_t>(t, out, wfn);
      return;
    }
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const uint8_t* mp = mask.data_ptr<uint8_t>();
    const float* sp = scale.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += step) {
      const int64_t n = std::min(step, N - n0), numel = n * per;
      const auto neg = [](int64_t d) { return static_cast<uint32_t>(-d); };
      const BlockGeom g{static_cast<uint32_t>(numel), static_cast<uint32_t>(n), fast_div(C),
                        fast_div(H), fast_div(W), fast_div(k), neg(H), neg(W), neg(k),
                        static_cast<uint32_t>(Hs * Ws), static_cast<uint32_t>(Ws),
                        static_cast<uint32_t>((W - 1) / k)};
      const unsigned grid = grid_for(ceil_div(numel, V), kThreads);
      if (rows)
        launch_block_rows<scalar_t>(k, grid, tp + n0 * per, op + n0 * per, mp + n0 * Hs * Ws,
                                    sp + n0, g);
      else
        apply_block_pixels_kernel<scalar_t><<<grid, kThreads, 0, current_stream()>>>(
            tp + n0 * per, op + n0 * per, mp + n0 * Hs * Ws, sp + n0, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void launch_apply_seeds(const at::TensorBase& t, const at::TensorBase& bits, int64_t r,
                        bool shared, const at::TensorBase& scale, const at::TensorBase& out) {
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3), per = C * HW;
  const int64_t Bn = bits.size(1);
  const bool cl = !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool dense = dense_in_order(t, cl) && dense_in_order(out, cl) && aligned16(t) &&
                     aligned16(out);
  GD_DISPATCH_FLOAT_TYPES(t.scalar_type(), "guidedrop::apply_seeds", [&] {
    constexpr int64_t V = 16 / sizeof(scalar_t);
    // r = 1 (the plans' blocks): NCHW samples of whole bytes (a shared map: of 7 units or
    // more), NHWC with C % V == 0
    const bool maps = !cl && per % 8 == 0 && (!shared || HW >= 7);
    const bool pixels = cl && C % V == 0;
    const int64_t step = flat_samples_per_launch(N, per, 8);
    if (t.numel() == 0) return;
    if (r != 1 || !dense || step == 0 || !(maps || pixels)) {
      const SeedsW wfn{bits.data_ptr<uint8_t>(), scale.data_ptr<float>(), t.size(2), t.size(3),
                       Bn, r, shared};
      launch_apply<scalar_t>(t, out, wfn);
      return;
    }
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const uint8_t* bp = bits.data_ptr<uint8_t>();
    const float* sp = scale.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += step) {
      const int64_t n = std::min(step, N - n0), numel = n * per;
      const uint32_t chunks = static_cast<uint32_t>(numel / (maps ? 8 : V)), bn = Bn;
      const unsigned grid = grid_for(chunks, kThreads);
      const scalar_t* tn = tp + n0 * per;
      scalar_t* on = op + n0 * per;
      const uint8_t* bn0 = bp + n0 * Bn;
      if (maps && !shared)
        apply_bits_maps_kernel<scalar_t, false, true><<<grid, kThreads, 0, current_stream()>>>(
            tn, on, bn0, sp + n0, chunks, bn, fast_div(per), fast_div(HW));
      else if (maps && HW % 8 == 0)
        apply_bits_maps_kernel<scalar_t, true, true><<<grid, kThreads, 0, current_stream()>>>(
            tn, on, bn0, sp + n0, chunks, bn, fast_div(per), fast_div(HW));
      else if (maps)
        apply_bits_maps_kernel<scalar_t, true, false><<<grid, kThreads, 0, current_stream()>>>(
            tn, on, bn0, sp + n0, chunks, bn, fast_div(per), fast_div(HW));
      else if (shared)
        apply_bits_pixels_kernel<scalar_t, true><<<grid, kThreads, 0, current_stream()>>>(
            tn, on, bn0, sp + n0, chunks, bn, fast_div(C), fast_div(HW));
      else
        apply_bits_pixels_kernel<scalar_t, false><<<grid, kThreads, 0, current_stream()>>>(
            tn, on, bn0, sp + n0, chunks, bn, fast_div(C), fast_div(HW));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace guidedrop
