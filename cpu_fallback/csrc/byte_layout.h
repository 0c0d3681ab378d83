// The byte layout of quantized activations shared by the integer GEMVs (kernel_avx512vnni.cpp, kernel_avx2.cpp)
// and their activation quantizers: which code of a 32-code block each byte slot of a code vector holds, per bit
// depth. Plain constexpr C++ (no intrinsics), so every ISA's object and the portable quantizer agree on it.
#pragma once
#include <cstdint>

namespace xbit {

constexpr int kQMax = 127 * 256 + 127;  // largest |q| whose hi byte still fits in int8

// How a block's 32 codes (B words per column) become vectors of byte codes, `n` of them per block.
// dword mode (B = 1, 2, 4, 8: codes never straddle a byte): vector v = (word[v] >> shift[v]) & byte mask, one
//   column per int32 lane, lane byte k holding code code[v][k]; activations broadcast as one int32.
// qword mode (B = 3, 5, 6, 7): a column's words s and s+1 are paired into one 64-bit lane (unpacklo/hi_epi32,
//   so one vector holds 8 of the 16 columns) and vpmultishiftqb pulls 8 codes at arbitrary bit offsets
//   ctrl[v] of that 64-bit window into bytes; a code straddling words s and s+1 is just another offset.
//   The two int32 halves of a 64-bit lane hold partial sums of the same column (added at the end of a
//   group), and the activations are broadcast as one int64 (slots 0-3 then 4-7). Codes are taken in order,
//   each set of 8 in the highest window that still holds its first code: 4 sets per block for B = 3, 5, 6
//   (8 bytes per code vector, nothing wasted) and 6 for B = 7 (the fewest possible: 6 codes fit in one
//   window only, each in a different one).
struct Plan {
  bool qword = false;
  int n = 0;
  int word[8] = {};          // dword mode: source word; qword mode: window start word s
  int shift[8] = {};         // dword mode only
  uint64_t ctrl[8] = {};     // qword mode only: vpmultishiftqb control, bit offset of each slot in the window
  int code[8][8] = {};       // code index of each byte slot (4 slots in dword mode), -1: empty (activation 0)
};

constexpr Plan make_plan(int B) {
  Plan p;
  for (int v = 0; v < 8; ++v)
    for (int t = 0; t < 8; ++t) p.code[v][t] = -1;
  if (8 % B == 0) {
    for (int i = 0; i < B; ++i)
      for (int t = 0; t < 8 / B; ++t, ++p.n) {
        p.word[p.n] = i;
        p.shift[p.n] = t * B;
        for (int k = 0; k < 4; ++k) p.code[p.n][k] = (32 * i + 8 * k + t * B) / B;
      }
    return p;
  }
  p.qword = true;
  int used = 8;
  for (int j = 0; j < 32; ++j) {
    const int pos = j * B;
    if (used == 8 || pos + B > 32 * p.word[p.n - 1] + 64) {  // new set: full, or code beyond the window
      const int s = pos / 32 < B - 2 ? pos / 32 : B - 2;      // (the last window is words B-2, B-1)
      p.word[p.n++] = s;
      used = 0;
    }
    p.ctrl[p.n - 1] |= uint64_t(pos - 32 * p.word[p.n - 1]) << (8 * used);
    p.code[p.n - 1][used++] = j;
  }
  return p;
}

template <int B>
struct PlanOf {
  static constexpr Plan p = make_plan(B);
  static_assert(p.n <= 8 && p.n * (p.qword ? 8 : 4) <= 64, "a block's activation bytes must fit in 64");
};

constexpr int kXqBlock = 128;  // activation bytes per 32-column block: 64 hi bytes, then 64 lo bytes

// vpermb index of the activation layout: byte i of the hi (lo) half takes byte idx[i] (idx[i] + 32) of
// [32 hi bytes of the block | 32 lo bytes]; valid has bit i set where a slot holds a code.
struct Layout {
  uint8_t idx[64] = {};
  uint64_t valid = 0;
};

constexpr Layout make_layout(int B) {
  const Plan p = make_plan(B);
  const int w = p.qword ? 8 : 4;
  Layout l;
  for (int v = 0; v < p.n; ++v)
    for (int t = 0; t < w; ++t)
      if (p.code[v][t] >= 0) {
        l.idx[v * w + t] = uint8_t(p.code[v][t]);
        l.valid |= uint64_t(1) << (v * w + t);
      }
  return l;
}

constexpr Layout kLayouts[9] = {Layout{},      make_layout(1), make_layout(2), make_layout(3), make_layout(4),
                                make_layout(5), make_layout(6), make_layout(7), make_layout(8)};

}  // namespace xbit
