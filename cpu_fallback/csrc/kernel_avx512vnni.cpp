// AVX-512 VNNI path for the GEMV (M <= 4 rows). Built with -mavx512f -mavx512bw -mavx512vnni -mavx512vbmi;
// only called after the runtime CPU check in api.cpp. More rows go to the float AVX-512 GEMM.
//
// Why: the float GEMV spends ~4 instructions (shift, mask, convert, FMA) per code and 16 columns, so batch-1
// decode is instruction-bound at 2-4 bits. Here one vpdpbusd multiplies 4 unsigned byte codes by 4 signed
// byte activations and sums them into each int32 lane, and a vector of 4 codes per lane costs one AND
// (B = 1, 2, 4; none for B = 8) or unpack + vpmultishiftqb + AND (B = 3, 5, 6, 7).
//
// Activations: quantize_group_vnni turns each (row, group) of the float x into int16 q = round(x / s),
// s = max|x| / kQMax, split exactly as q = 256 * hi + lo with hi, lo int8, so every code vector takes two
// vpdpbusd (hi and lo accumulators) and dot(code, x) = s * (256 * acc_hi + acc_lo): ~15-bit activations,
// each x off by at most s / 2 (relative error of y ~2e-5 to 3e-5 on Gaussian x, see the tests). The
// zero-point term uses the sum of the same quantized x (see quantize_group_vnni).
// Overflow: every code byte is <= 255 and |hi|, |lo| <= 128, so an int32 accumulator of one group stays below
// 255 * 128 * group_size < 2^31 for group_size <= 65536 (api.cpp checks it).
//
// Lanes run across output columns, as in simd_impl.inc, and the order of the codes inside a lane is free as
// long as the activation bytes follow it: make_plan fixes that order per bit depth, and the same table drives
// both the kernel (at compile time) and the activation layout (quantize_group_vnni).
#include <immintrin.h>

#include <utility>

#include "byte_layout.h"
#include "xbit_cpu.h"

namespace xbit {
namespace {

// ---- GEMV kernel
// Accumulators of one tile (16 columns), [row][slot][hi, lo]. Slots: qword mode, the unpacklo/hi column
// halves; dword mode, one "class" per shift t*B when they fit in registers: code vector (w >> t*B) & m is
// replaced by w & (m << t*B), the same codes times 2^(t*B) (still <= 255, so the same overflow bound),
// summed apart and shifted back at the end of the group (exact): one instruction less per code vector.
template <int B, int R>
struct Shape {
  static constexpr Plan p = PlanOf<B>::p;
  static constexpr int classes = !p.qword && R * (8 / B) * 2 <= 16 ? 8 / B : 1;
  static constexpr int slots = p.qword ? 2 : classes;
};

template <int B, int R>
using Acc = __m512i[R][Shape<B, R>::slots][2];

inline long long load8(const int8_t* p) {
  long long v;
  std::memcpy(&v, p, 8);
  return v;
}

// acc + q . (4 activation bytes at x, broadcast to every lane): the broadcast folded into vpdpbusd as a
// {1to16} memory operand, one instruction where GCC emits two for _mm512_set1_epi32 of a load.
inline __m512i dpbusd_bcast(__m512i acc, __m512i q, const int8_t* x) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(q), "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}

// Code vector v of a block: decode it from the words w and add it, times each row's activation bytes, into
// the accumulators. xb: the block's activation bytes of row 0; ldq: bytes per activation row.
template <int B, int R, int v>
inline void code_vec(const __m512i* w, const int8_t* xb, int64_t ldq, Acc<B, R>& acc) {
  constexpr Plan p = PlanOf<B>::p;
  constexpr int m = (1 << B) - 1;
  if constexpr (!p.qword) {
    constexpr int sh = p.shift[v], c = Shape<B, R>::classes > 1 ? sh / B : 0;
    __m512i q = w[p.word[v]];
    if constexpr (c > 0 || (sh == 0 && B < 8)) q = _mm512_and_si512(q, _mm512_set1_epi8(char(m << sh)));
    if constexpr (c == 0 && sh > 0) q = _mm512_and_si512(_mm512_srli_epi32(q, sh), _mm512_set1_epi8(char(m)));
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < 2; ++k)
        acc[r][c][k] = dpbusd_bcast(acc[r][c][k], q, xb + r * ldq + 64 * k + 4 * v);
  } else {
    constexpr int s = p.word[v];
    const __m512i ctrl = _mm512_set1_epi64(static_cast<long long>(p.ctrl[v])), mask = _mm512_set1_epi8(char(m));
    // identical unpacks of sets sharing a window are merged by the compiler
    const __m512i q[2] = {
        _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, _mm512_unpacklo_epi32(w[s], w[s + 1])), mask),
        _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, _mm512_unpackhi_epi32(w[s], w[s + 1])), mask)};
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < 2; ++k) {
        const __m512i x = _mm512_set1_epi64(load8(xb + r * ldq + 64 * k + 8 * v));
        for (int h = 0; h < 2; ++h) acc[r][h][k] = _mm512_dpbusd_epi32(acc[r][h][k], q[h], x);
      }
  }
}

template <int B, int R, int... v>
inline void code_block(const __m512i* w, const int8_t* xb, int64_t ldq, Acc<B, R>& acc, std::integer_sequence<int, v...>) {
  (code_vec<B, R, v>(w, xb, ldq, acc), ...);
}

// qword mode: lanes of `lo` are columns (0,0,1,1) of each 4-column quarter, lanes of `hi` (2,2,3,3); returns
// one sum per column in column order.
inline __m512i pair_sums(__m512i lo, __m512i hi) {
  const __m512 a = _mm512_castsi512_ps(lo), b = _mm512_castsi512_ps(hi);
  return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                          _mm512_castps_si512(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))));
}

// Software prefetch distance, in columns along the group pass. Each tile reads one line from each of the
// group's B * blocks word rows; the tile kPfCols later (wrapping into the next group's rows) is prefetched,
// into L2 only (prefetcht1): without it the batch-1 GEMV lost 10-40% of its bandwidth here, prefetcht0 was
// no better overall, and distances of 128..512 columns measured alike.
constexpr int64_t kPfCols = 256;

// Columns [n, n + 16) of group g (blocks b0..b1) of segment s, all R rows (m0 = 0: M <= 4 rows in all);
// pf: the same tile's first word row kPfCols later in the pass, or nullptr.
template <int B, int R>
inline void tile(const Args& a, const Seg& s, int g, int b0, int b1, int64_t n, const int8_t* xq0, int64_t ldq,
                 const int32_t* pf) {
  constexpr Plan p = PlanOf<B>::p;
  constexpr int S = Shape<B, R>::slots;
  Acc<B, R> acc;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < S; ++c) acc[r][c][0] = acc[r][c][1] = _mm512_setzero_si512();
  for (int blk = b0; blk < b1; ++blk) {
    const int32_t* q = a.qweight + int64_t(s.word_start + blk * B) * a.N + n;
    __m512i w[B];
    for (int i = 0; i < B; ++i) {
      if (pf) __builtin_prefetch(pf + ((blk - b0) * B + i) * a.N, 0, 2);  // prefetcht1
      w[i] = _mm512_loadu_si512(q + i * a.N);
    }
    code_block<B, R>(w, xq0 + blk * kXqBlock, ldq, acc, std::make_integer_sequence<int, p.n>{});
  }
  const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(a.scales + g * a.N + n)));
  const __m512 sz = _mm512_mul_ps(sc, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(a.zeros + g * a.N + n))));
  for (int r = 0; r < R; ++r) {
    __m512i d[2];  // hi, lo
    for (int k = 0; k < 2; ++k) {
      if constexpr (p.qword) {
        d[k] = pair_sums(acc[r][0][k], acc[r][1][k]);
      } else {
        d[k] = acc[r][0][k];
        for (int c = 1; c < S; ++c) d[k] = _mm512_add_epi32(d[k], _mm512_srai_epi32(acc[r][c][k], c * B));
      }
    }
    // y += scale * (dot - zero * sum x), both over the quantized x (see quantize_group_vnni)
    const float* xs = a.xs + 2 * (r * a.ngroups + g);
    const __m512 dot = _mm512_mul_ps(
        _mm512_set1_ps(xs[0]), _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[0]), _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(d[1])));
    float* yp = a.y + r * a.N + n;
    const __m512 yv = _mm512_fmadd_ps(sc, dot, _mm512_loadu_ps(yp));
    _mm512_storeu_ps(yp, _mm512_fnmadd_ps(sz, _mm512_set1_ps(xs[1]), yv));
  }
}

// Group outer, tile inner, as the float GEMV: the B * blocks word rows of a group are each read as one
// sequential stream.
template <int B, int R>
void seg_vnni(const Args& a, const Seg& s, int64_t n0, int64_t n1) {
  const int nblk = (s.cols + kBlock - 1) / kBlock, bpg = a.group_size / kBlock;
  const int64_t ldq = a.Kp / kBlock * kXqBlock, width = n1 - n0;
  const int8_t* xq0 = a.xq + int64_t(s.xoff / kBlock) * kXqBlock;
  for (int b0 = 0, g = s.group_start; b0 < nblk; b0 += bpg, ++g) {
    const int b1 = nblk < b0 + bpg ? nblk : b0 + bpg;
    const int32_t* rows = a.qweight + int64_t(s.word_start + b0 * B) * a.N;
    const bool next = b1 < nblk;  // prefetch no further than this segment's rows
    for (int64_t n = n0; n < n1; n += 16) {
      const int64_t f = n + kPfCols;
      const int32_t* pf = f < n1 ? rows + f : next && f - n1 < width ? rows + int64_t(bpg) * B * a.N + n0 + (f - n1) : nullptr;
      tile<B, R>(a, s, g, b0, b1, n, xq0, ldq, pf);
    }
  }
}

template <int B>
void seg_rows(const Args& a, const Seg& s, int64_t n0, int64_t n1, int mc) {
  switch (mc) {
    case 1: seg_vnni<B, 1>(a, s, n0, n1); break;
    case 2: seg_vnni<B, 2>(a, s, n0, n1); break;
    case 3: seg_vnni<B, 3>(a, s, n0, n1); break;
    default: seg_vnni<B, 4>(a, s, n0, n1); break;
  }
}

}  // namespace

void quantize_group_vnni(const Args& a, int64_t m, const Seg& s, int b0, int64_t g, int8_t* xq, float* xs) {
  const Layout& lay = kLayouts[s.bits];
  const int b1 = (s.cols + kBlock - 1) / kBlock < b0 + a.group_size / kBlock ? (s.cols + kBlock - 1) / kBlock
                                                                              : b0 + a.group_size / kBlock;
  const float* x = a.xp + m * a.Kp + s.xoff;
  xq += m * (a.Kp / kBlock * kXqBlock) + int64_t(s.xoff / kBlock) * kXqBlock;
  __m512 mx = _mm512_setzero_ps();  // the padding past s.cols is zero, so whole blocks can be read
  for (int c = b0 * kBlock; c < b1 * kBlock; c += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
  const float amax = _mm512_reduce_max_ps(mx), scale = amax / kQMax;
  const __m512 inv = _mm512_set1_ps(amax > 0.0f ? kQMax / amax : 0.0f);
  const __m512i lim = _mm512_set1_epi32(kQMax), idx_hi = _mm512_loadu_si512(lay.idx),
                idx_lo = _mm512_add_epi8(idx_hi, _mm512_set1_epi8(32));
  __m512i qsum = _mm512_setzero_si512();
  for (int blk = b0; blk < b1; ++blk) {
    __m512i q[2];  // round to nearest even (the default MXCSR mode), clamped against rounding up past kQMax
    for (int h = 0; h < 2; ++h)
      q[h] = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + blk * kBlock + 16 * h), inv)), lim),
                              _mm512_sub_epi32(_mm512_setzero_si512(), lim));
    qsum = _mm512_add_epi32(qsum, _mm512_add_epi32(q[0], q[1]));
    const __m512i q16 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(q[0])), _mm512_cvtepi32_epi16(q[1]), 1);
    const __m512i hi = _mm512_srai_epi16(_mm512_add_epi16(q16, _mm512_set1_epi16(128)), 8);
    const __m512i lo = _mm512_sub_epi16(q16, _mm512_slli_epi16(hi, 8));
    const __m512i bytes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(hi)), _mm512_cvtepi16_epi8(lo), 1);
    // [32 hi | 32 lo] bytes in column order, permuted into the kernel's slot order (vpermb)
    _mm512_storeu_si512(xq + blk * kXqBlock, _mm512_maskz_permutexvar_epi8(lay.valid, idx_hi, bytes));
    _mm512_storeu_si512(xq + blk * kXqBlock + 64, _mm512_maskz_permutexvar_epi8(lay.valid, idx_lo, bytes));
  }
  // Why the quantized sum and not gsum: the zero-point term then cancels the large mean part of the codes
  // exactly, and the error is that of dequantized weights times quantized x (measured ~2.5x lower than with
  // the float sum). |sum| <= kQMax * group_size < 2^31.
  xs[2 * (m * a.ngroups + g)] = scale;
  xs[2 * (m * a.ngroups + g) + 1] = scale * float(_mm512_reduce_add_epi32(qsum));
}

void range_avx512vnni(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc) {
  if (a.xq == nullptr || mc > 4 || m0 != 0) return range_avx512(a, n0, n1, m0, mc);  // GEMM: the float kernel
  const int64_t nv = n0 + (n1 - n0) / 16 * 16;  // full tiles; the rest goes to the scalar path
  for (int i = 0; i < a.nseg && nv > n0; ++i) {
    const Seg& s = a.segs[i];
    with_depth(s.bits, [&](auto b) { seg_rows<decltype(b)::value>(a, s, n0, nv, mc); });
  }
  if (nv < n1) range_scalar(a, nv, n1, m0, mc);
}

}  // namespace xbit
