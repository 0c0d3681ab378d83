// Shared declarations of the x-bit CPU kernels (see xbit/format.py for the storage format).
// Torch-free: plain pointers in, float32 out.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace xbit {

constexpr int kBlock = 32;   // columns per packed block (32 codes of b bits = b int32 words)
constexpr int kMaxRows = 64; // activation rows per pass of the blocked GEMM (bounds the per-tile buffers)

// f(std::integral_constant<int, B>{}) for a segment's depth B = bits in 1..8 (0-bit columns store nothing): where
// a run-time depth becomes the compile-time one each kernel is specialised for.
template <class F>
inline void with_depth(int bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;
  }
}

// One segment with bits > 0, in storage order.
struct Seg {
  int32_t bits, cols, word_start, group_start, xoff;  // xoff: first column of the segment in the padded x
  int32_t start;  // first storage position (index into perm)
};

struct Args {
  const float* xp;       // [M, Kp] x permuted into storage order, each segment zero-padded to 32 columns
  const float* gsum;     // [M, ngroups] sum of x over each group's columns
  const int32_t* qweight;// [words, N]
  const uint16_t* scales;// [ngroups, N] fp16 bits
  const uint16_t* zeros; // [ngroups, N] fp16 bits
  const Seg* segs;
  float* y;              // [M, N] float32, accumulated into (zeroed by the caller)
  int64_t N, Kp, ngroups;
  int32_t nseg, group_size;  // group_size is a multiple of 32
  // integer GEMVs only (avx512vnni, avx2; nullptr otherwise): x quantized by quantize_group_vnni/_bytes
  const int8_t* xq = nullptr;  // [M, Kp / 32 * 128] bytes
  const float* xs = nullptr;   // [M, ngroups, 2]: scale of the group's quantized x, and its sum
  int64_t K = 0;               // the layer's input features (dequantize_row only)
};

// Each ISA computes y[m0:m0+mc, n0:n1] for all segments; mc <= kMaxRows.
void range_scalar(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc);
void range_avx2(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc);
void range_avx2int(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc);  // M <= 4 needs a.xq
void range_avx512(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc);
void range_avx512vnni(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc);  // M <= 4 needs a.xq

// One group (blocks b0.. of segment s, group index g) of activation row m of a.xp into the avx512vnni byte
// layout; xq, xs as in Args (all rows).
void quantize_group_vnni(const Args& a, int64_t m, const Seg& s, int b0, int64_t g, int8_t* xq, float* xs);
// The same for the integer AVX2 GEMV, in portable code (the layout and numbers of quantize_group_vnni).
void quantize_group_bytes(const Args& a, int64_t m, const Seg& s, int b0, int64_t g, int8_t* xq, float* xs);
// Output row n of the weight into row (float32 [K], the original column order, 0-bit columns 0): scale * (code -
// zero) as xbit.format.dequantize computes it, to the bit. Uses a.qweight, scales, zeros, segs, nseg, N, K,
// group_size.
void dequantize_row(const Args& a, const int32_t* perm, int64_t n, float* row);

constexpr int kVnniMaxGroup = 65536;  // int32 accumulators of one group: 255 * 128 * group_size < 2^31

}  // namespace xbit
