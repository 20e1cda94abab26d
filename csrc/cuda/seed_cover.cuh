// The r x r coverage test of DropBlock / CamDrop's packed seeds, shared by block_mask.cu
// (seed_coverage, apply_seeds) and plans/dropblock.cu (the blocks, coverage + scale).
//
// covered_run answers for a run of up to 32 consecutive units of a row at once: it ORs the
// seed bits of the r rows that can reach the run (one window of len + r - 1 bits per row,
// a few byte loads) into one 64-bit row mask, then dilates it by r columns with log2(r)
// shift-ORs. So a unit costs O(r / len) loads, not the r to 2r of the per-unit covered().
#pragma once

#include "common.cuh"

namespace guidedrop {

// Whether unit (h, w) of a map lies in the r x r block of a seed: a seed at (h', w') with
// h - lo <= h' <= h + hi, same in w. `sample` is the sample's bit string, `plane` the map's
// first bit (cs * H * W).
__device__ __forceinline__ bool covered(const uint8_t* __restrict__ sample, int64_t plane,
                                        int64_t H, int64_t W, int64_t r, int64_t h, int64_t w) {
  const int64_t lo = r - 1 - r / 2, hi = r / 2;
  const int64_t h0 = max(h - lo, int64_t(0)), h1 = min(h + hi, H - 1);
  const int64_t w0 = max(w - lo, int64_t(0)), w1 = min(w + hi, W - 1);
  if (h0 > h1 || w0 > w1) return false;
  for (int64_t hh = h0; hh <= h1; ++hh) {
    const int64_t p0 = plane + hh * W + w0, p1 = plane + hh * W + w1;  // bits p0 .. p1
    const int64_t q0 = p0 >> 3, q1 = p1 >> 3;
    for (int64_t qq = q0; qq <= q1; ++qq) {
      unsigned m = 0xffu;
      if (qq == q0) m &= 0xffu << (p0 & 7);
      if (qq == q1) m &= 0xffu >> (7 - (p1 & 7));
      if (sample[qq] & m) return true;
    }
  }
  return false;
}

// Bits p .. p + n - 1 (1 <= n <= 57) of a bit string: bit j of the result is bit p + j.
__device__ __forceinline__ uint64_t read_bits(const uint8_t* __restrict__ s, int64_t p, int n) {
  const int64_t q0 = p >> 3, q1 = (p + n - 1) >> 3;  // at most 8 bytes
  uint64_t v = 0;
  for (int64_t q = q1; q >= q0; --q) v = (v << 8) | s[q];
  return (v >> (p & 7)) & ((uint64_t(1) << n) - 1);
}

// Bit j (j < len) set when unit (h, w0 + j) of the map starting at bit `plane` is covered:
// exactly covered(sample, plane, H, W, r, h, w0 + j). Needs 1 <= len <= 32, w0 + len <= W.
__device__ __forceinline__ uint32_t covered_run(const uint8_t* __restrict__ sample,
                                                int64_t plane, int64_t H, int64_t W, int64_t r,
                                                int64_t h, int64_t w0, int len) {
  if (len + r - 1 > 57) {  // blocks wider than 57 units: the per-unit test
    uint32_t m = 0;
    for (int j = 0; j < len; ++j) m |= covered(sample, plane, H, W, r, h, w0 + j) ? 1u << j : 0u;
    return m;
  }
  const int64_t lo = r - 1 - r / 2, hi = r / 2;
  // Seeds that can reach the run: columns c0 .. c1 of rows h0 .. h1 (clipped to the map).
  const int64_t c0 = max(w0 - lo, int64_t(0)), c1 = min(w0 + len - 1 + hi, W - 1);
  const int64_t h0 = max(h - lo, int64_t(0)), h1 = min(h + hi, H - 1);
  uint64_t m = 0;  // bit b: a seed in column c0 + b of one of those rows
  for (int64_t hh = h0; hh <= h1; ++hh)
    m |= read_bits(sample, plane + hh * W + c0, static_cast<int>(c1 - c0 + 1));
  m <<= c0 - (w0 - lo);  // bit b: column w0 - lo + b (columns left of the map are 0)
  // Unit w0 + j is covered when a bit of j .. j + r - 1 is set: OR of m >> s, s < r.
  uint64_t d = m;
  int64_t k = 1;  // d is the OR over a window of k bits
  for (; 2 * k <= r; k *= 2) d |= d >> k;
  if (k < r) d |= d >> (r - k);  // windows [0, k) and [r - k, r) cover [0, r): r - k <= k
  return static_cast<uint32_t>(d & ((uint64_t(1) << len) - 1));
}

// Bits p .. p + n - 1 (1 <= n <= 57, p may be < 0) of a sample's string of Bn bytes, the
// bytes outside it read as 0: bit j of the result is bit p + j.
__device__ __forceinline__ uint64_t read_bits_in(const uint8_t* __restrict__ s, int64_t Bn,
                                                 int64_t p, int n) {
  const int64_t q0 = p >> 3, q1 = (p + n - 1) >> 3;  // floor, also below 0: at most 8 bytes
  uint64_t v = 0;
  for (int64_t q = q1; q >= q0; --q) v = (v << 8) | (q >= 0 && q < Bn ? s[q] : 0u);
  return (v >> (p & 7)) & ((uint64_t(1) << n) - 1);
}

// Byte b of the seeds' r x r blocks, packed as the seeds (reference.seed_blocks): bit j set
// when unit 8b + j of the sample (u = (cs * H + h) * W + w, per_sample units) is covered,
// i.e. a seed sits at u + dh * W + d for some dh, d in [-lo, hi]; the bits after the last
// unit 0. Seeds sit at valid centres only, so a bit reached past a row's or a map's end is
// an edge unit's, never a seed: no (h, w) per unit, only the string's bounds. The r rows'
// windows of 8 + r - 1 bits are ORed, then dilated by r with log2(r) shift-ORs, in pieces
// of up to 50 offsets (a window of at most 57 bits).
__device__ __forceinline__ uint32_t block_byte(const uint8_t* __restrict__ sample, int64_t Bn,
                                               int64_t b, int64_t per_sample, int64_t W,
                                               int64_t r) {
  const int64_t lo = r - 1 - r / 2, hi = r / 2, u0 = 8 * b;
  uint32_t out = 0;
  for (int64_t da = -lo; da <= hi; da += 50) {
    const int64_t db = min(da + 49, hi);
    const int span = static_cast<int>(db - da) + 1;
    uint64_t m = 0;  // bit i: a seed at offset da + i from unit u0 in one of the rows
    for (int64_t dh = -lo; dh <= hi; ++dh)
      m |= read_bits_in(sample, Bn, u0 + dh * W + da, span + 7);
    // unit u0 + j is covered when a bit of j .. j + span - 1 is set
    uint64_t d = m;
    int k = 1;
    for (; 2 * k <= span; k *= 2) d |= d >> k;
    if (k < span) d |= d >> (span - k);
    out |= static_cast<uint32_t>(d) & 0xffu;
  }
  const int64_t left = per_sample - u0;  // units in this byte
  return left < 8 ? out & ((1u << left) - 1u) : out;
}

}  // namespace guidedrop
