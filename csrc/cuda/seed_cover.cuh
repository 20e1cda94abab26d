// The r x r coverage test of DropBlock / CamDrop's packed seeds, shared by block_mask.cu
// (seed_coverage, apply_seeds) and plans/dropblock.cu (coverage + scale).
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

}  // namespace guidedrop
