// Portable path: no SIMD intrinsics (the compiler may still auto-vectorise). Also serves the column
// tails (N not a multiple of the vector width) of the SIMD paths, so it takes any column range.
#include <algorithm>
#include <cmath>

#include "byte_layout.h"
#include "xbit_cpu.h"

namespace xbit {
namespace {

constexpr int kLanes = 16;  // output columns decoded together

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float f = float(man) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int B>
void seg_scalar(const Args& a, const Seg& s, int64_t n0, int nw, int64_t m0, int mc) {
  constexpr uint64_t mask = (1u << B) - 1;
  const int nblk = (s.cols + kBlock - 1) / kBlock, bpg = a.group_size / kBlock;
  float code[kBlock][kLanes];
  float dot[kMaxRows][kLanes];
  for (int b0 = 0, g = s.group_start; b0 < nblk; b0 += bpg, ++g) {
    for (int r = 0; r < mc; ++r) std::fill(dot[r], dot[r] + kLanes, 0.0f);
    for (int blk = b0; blk < std::min(nblk, b0 + bpg); ++blk) {
      const int32_t* q = a.qweight + int64_t(s.word_start + blk * B) * a.N + n0;
      for (int j = 0; j < kBlock; ++j) {  // code j: bits [j*B, j*B+B) of the block's little-endian stream
        const int wi = j * B / 32, sh = j * B % 32;
        for (int l = 0; l < nw; ++l) {
          uint64_t v = uint32_t(q[wi * a.N + l]);
          if (wi + 1 < B) v |= uint64_t(uint32_t(q[(wi + 1) * a.N + l])) << 32;
          code[j][l] = float((v >> sh) & mask);
        }
      }
      for (int r = 0; r < mc; ++r) {
        const float* x = a.xp + (m0 + r) * a.Kp + s.xoff + blk * kBlock;
        for (int j = 0; j < kBlock; ++j)
          for (int l = 0; l < nw; ++l) dot[r][l] += code[j][l] * x[j];
      }
    }
    for (int l = 0; l < nw; ++l) {
      const float sc = half_to_float(a.scales[g * a.N + n0 + l]);
      const float sz = sc * half_to_float(a.zeros[g * a.N + n0 + l]);
      for (int r = 0; r < mc; ++r)  // scale * (sum q x - zero * sum x)
        a.y[(m0 + r) * a.N + n0 + l] += sc * dot[r][l] - sz * a.gsum[(m0 + r) * a.ngroups + g];
    }
  }
}

template <int B>
void dequantize_seg(const Args& a, const Seg& s, const int32_t* perm, int64_t n, float* row) {
  // one output row: its B words of each block are read together (a tile's rows share their cache lines), its
  // weights written along the row
  constexpr uint64_t mask = (1u << B) - 1;
  const int nblk = (s.cols + kBlock - 1) / kBlock;
  for (int blk = 0; blk < nblk; ++blk) {
    const int32_t* q = a.qweight + int64_t(s.word_start + blk * B) * a.N + n;
    uint32_t w[B + 1];
    for (int i = 0; i < B; ++i) w[i] = uint32_t(q[int64_t(i) * a.N]);
    w[B] = 0;
    const int64_t g = s.group_start + int64_t(blk) * kBlock / a.group_size;
    const float sc = half_to_float(a.scales[g * a.N + n]), z = half_to_float(a.zeros[g * a.N + n]);
    const int32_t* cols = perm + s.start + blk * kBlock;
    const int jn = std::min(kBlock, s.cols - blk * kBlock);
    for (int j = 0; j < jn; ++j) {
      const int wi = j * B / 32, sh = j * B % 32;
      const uint64_t v = w[wi] | (uint64_t(w[wi + 1]) << 32);
      row[cols[j]] = sc * (float((v >> sh) & mask) - z);
    }
  }
}

}  // namespace

void quantize_group_bytes(const Args& a, int64_t m, const Seg& s, int b0, int64_t g, int8_t* xq, float* xs) {
  // the same numbers as quantize_group_vnni, one element at a time: nearbyint rounds half to even, as the vector
  // conversion does under the default rounding mode
  const Layout& lay = kLayouts[s.bits];
  const int nblk = (s.cols + kBlock - 1) / kBlock, b1 = std::min(nblk, b0 + a.group_size / kBlock);
  const float* x = a.xp + m * a.Kp + s.xoff;
  xq += m * (a.Kp / kBlock * kXqBlock) + int64_t(s.xoff / kBlock) * kXqBlock;
  float amax = 0.0f;
  for (int c = b0 * kBlock; c < b1 * kBlock; ++c) amax = std::isnan(x[c]) ? x[c] : std::max(amax, std::fabs(x[c]));
  const float inv = amax > 0.0f && amax <= 3.4e38f ? kQMax / amax : 0.0f;  // NaN and inf reach y through scale
  int64_t qsum = 0;
  for (int blk = b0; blk < b1; ++blk) {
    int8_t hl[2 * kBlock];  // [32 hi | 32 lo] in column order
    for (int c = 0; c < kBlock; ++c) {
      const int q = int(std::max(-float(kQMax), std::min(float(kQMax), std::nearbyint(x[blk * kBlock + c] * inv))));
      const int hi = (q + 128) >> 8;
      qsum += q;
      hl[c] = int8_t(hi);
      hl[kBlock + c] = int8_t(q - 256 * hi);
    }
    int8_t* out = xq + blk * kXqBlock;
    for (int i = 0; i < 64; ++i) {
      const bool valid = (lay.valid >> i) & 1;
      out[i] = valid ? hl[lay.idx[i]] : 0;
      out[64 + i] = valid ? hl[kBlock + lay.idx[i]] : 0;
    }
  }
  xs[2 * (m * a.ngroups + g)] = amax / kQMax;
  xs[2 * (m * a.ngroups + g) + 1] = amax / kQMax * float(qsum);
}

void range_scalar(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc) {
  for (int64_t n = n0; n < n1; n += kLanes) {
    const int nw = int(std::min<int64_t>(kLanes, n1 - n));
    for (int i = 0; i < a.nseg; ++i) {
      const Seg& s = a.segs[i];
      with_depth(s.bits, [&](auto b) { seg_scalar<decltype(b)::value>(a, s, n, nw, m0, mc); });
    }
  }
}

void dequantize_row(const Args& a, const int32_t* perm, int64_t n, float* row) {
  std::fill(row, row + a.K, 0.0f);  // 0-bit columns
  for (int i = 0; i < a.nseg; ++i) {
    const Seg& s = a.segs[i];
    with_depth(s.bits, [&](auto b) { dequantize_seg<decltype(b)::value>(a, s, perm, n, row); });
  }
}

}  // namespace xbit
