// AVX2 + FMA path: 8 output columns per vector. Built with -mavx2 -mfma -mf16c; only called after the
// runtime CPU check in api.cpp.
//
// range_avx2int (the default on AVX2 machines): the GEMV (M <= 4 rows) of 1, 2, 4 and 8-bit segments runs on
// integers, as the AVX-512 VNNI path does but with
// what AVX2 has: a code vector holds 4 byte codes per int32 lane (one AND, plus a shift for the upper codes of a
// word), vpmaddubsw multiplies them by 4 activation bytes (the ~15-bit x of quantize_group_bytes split into exact
// int8 halves hi, lo) into int16 pair sums, which are added in int16 over the block's code vectors and widened
// once per block by vpmaddwd: about 3 instructions per 32 codes and row where the float path spends 16. Overflow:
// a pair sum is at most 2 * 15 * 128 = 3840 for 4-bit codes and a block adds 8 of them (30720 < 32767); 8-bit
// codes are taken as two 4-bit halves (low nibble, and high nibble weighted by 16 when widened).
// Other depths (3, 5, 6, 7: codes straddle bytes, and AVX2 has no vpmultishiftqb) take the float GEMV.
#include <immintrin.h>

#include <cstdlib>
#include <utility>

#include "byte_layout.h"
#include "xbit_cpu.h"

namespace xbit {
namespace {

struct V {
  static constexpr int L = 8;
  using F = __m256;
  using I = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  template <int S> static I srl(I a) { return _mm256_srli_epi32(a, S); }
  template <int S> static I sll(I a) { return _mm256_slli_epi32(a, S); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I set1i(int v) { return _mm256_set1_epi32(v); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
};

#include "simd_impl.inc"

// ---- integer GEMV (1, 2, 4, 8 bits)
template <int R>
using Acc16 = __m256i[R][2][2];  // [row][nibble class: low, high (8-bit codes only)][hi, lo activation half]

// Code vector v of a block (dword mode of byte_layout.h), times each row's activation bytes, into the int16
// pair sums of the block.
template <int B, int R, int v>
inline void code_vec_int(const __m256i* w, const int8_t* xb, int64_t ldq, Acc16<R>& s16) {
  constexpr Plan p = PlanOf<B>::p;
  constexpr int sh = p.shift[v];
  const __m256i word = sh ? _mm256_srli_epi32(w[p.word[v]], sh) : w[p.word[v]];
  __m256i q[2];
  q[0] = _mm256_and_si256(word, _mm256_set1_epi8(char(B == 8 ? 0x0f : (1 << B) - 1)));
  if constexpr (B == 8) q[1] = _mm256_and_si256(_mm256_srli_epi32(word, 4), _mm256_set1_epi8(0x0f));
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < 2; ++k) {
      int32_t x4;
      std::memcpy(&x4, xb + r * ldq + 64 * k + 4 * v, 4);
      const __m256i x = _mm256_set1_epi32(x4);
      for (int c = 0; c < (B == 8 ? 2 : 1); ++c)
        s16[r][c][k] = _mm256_add_epi16(s16[r][c][k], _mm256_maddubs_epi16(q[c], x));
    }
}

template <int B, int R, int... v>
inline void code_block_int(const __m256i* w, const int8_t* xb, int64_t ldq, Acc16<R>& s16,
                           std::integer_sequence<int, v...>) {
  (code_vec_int<B, R, v>(w, xb, ldq, s16), ...);
}

// Columns [n, n + 8) of group g (blocks b0..b1) of segment s, rows 0..R (the whole GEMV batch).
template <int B, int R>
inline void tile_int(const Args& a, const Seg& s, int64_t g, int b0, int b1, int64_t n, const int8_t* xq0,
                     int64_t ldq) {
  constexpr Plan p = PlanOf<B>::p;
  static_assert(!p.qword, "the integer AVX2 GEMV takes the depths whose codes never straddle a byte");
  const int bpg = a.group_size / kBlock;
  __m256i acc[R][2];  // int32 [row][hi, lo]
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int blk = b0; blk < b1; ++blk) {
    const int32_t* q = a.qweight + int64_t(s.word_start + blk * B) * a.N + n;
    __m256i w[B];
    for (int i = 0; i < B; ++i) {
      __builtin_prefetch(q + i * a.N + kPrefetch);  // as the float GEMV: ahead along the row, next group's rows
      __builtin_prefetch(q + (int64_t(bpg) * B + i) * a.N);
      w[i] = _mm256_loadu_si256((const __m256i*)(q + i * a.N));
    }
    Acc16<R> s16;
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 2; ++c) s16[r][c][0] = s16[r][c][1] = _mm256_setzero_si256();
    code_block_int<B, R>(w, xq0 + blk * kXqBlock, ldq, s16, std::make_integer_sequence<int, p.n>{});
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < 2; ++k) {
        acc[r][k] = _mm256_add_epi32(acc[r][k], _mm256_madd_epi16(s16[r][0][k], _mm256_set1_epi16(1)));
        if constexpr (B == 8)
          acc[r][k] = _mm256_add_epi32(acc[r][k], _mm256_madd_epi16(s16[r][1][k], _mm256_set1_epi16(16)));
      }
  }
  const __m256 sc = V::load_half(a.scales + g * a.N + n), sz = _mm256_mul_ps(sc, V::load_half(a.zeros + g * a.N + n));
  for (int r = 0; r < R; ++r) {  // y += scale * (dot - zero * sum x), both over the quantized x
    const float* xs = a.xs + 2 * (r * a.ngroups + g);
    const __m256 dot = _mm256_mul_ps(_mm256_set1_ps(xs[0]), _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]),
                                                                          _mm256_set1_ps(256.0f),
                                                                          _mm256_cvtepi32_ps(acc[r][1])));
    float* yp = a.y + r * a.N + n;
    const __m256 yv = _mm256_fmadd_ps(sc, dot, _mm256_loadu_ps(yp));
    _mm256_storeu_ps(yp, _mm256_fnmadd_ps(sz, _mm256_set1_ps(xs[1]), yv));
  }
}

template <int B, int R>
void seg_int(const Args& a, const Seg& s, int64_t n0, int64_t n1) {
  const int nblk = (s.cols + kBlock - 1) / kBlock, bpg = a.group_size / kBlock;
  const int64_t ldq = a.Kp / kBlock * kXqBlock;
  const int8_t* xq0 = a.xq + int64_t(s.xoff / kBlock) * kXqBlock;
  for (int b0 = 0, g = s.group_start; b0 < nblk; b0 += bpg, ++g)
    for (int64_t n = n0; n < n1; n += V::L) tile_int<B, R>(a, s, g, b0, imin(nblk, b0 + bpg), n, xq0, ldq);
}

template <int B>
void seg_gemv(const Args& a, const Seg& s, int64_t n0, int64_t n1, int mc) {
  if constexpr (PlanOf<B>::p.qword) {
    seg_any<B>(a, s, n0, n1, 0, mc, nullptr);  // the float GEMV (mc <= 4 needs no tile buffer)
  } else {
    switch (mc) {
      case 1: seg_int<B, 1>(a, s, n0, n1); break;
      case 2: seg_int<B, 2>(a, s, n0, n1); break;
      case 3: seg_int<B, 3>(a, s, n0, n1); break;
      default: seg_int<B, 4>(a, s, n0, n1); break;
    }
  }
}

}  // namespace

void range_avx2(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc) { range_simd(a, n0, n1, m0, mc); }

void range_avx2int(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc) {
  if (a.xq == nullptr || mc > 4 || m0 != 0) return range_simd(a, n0, n1, m0, mc);  // GEMM: the float kernel
  const int64_t nv = n0 + (n1 - n0) / V::L * V::L;  // full tiles; the rest goes to the scalar path
  for (int i = 0; i < a.nseg && nv > n0; ++i) {
    const Seg& s = a.segs[i];
    with_depth(s.bits, [&](auto b) { seg_gemv<decltype(b)::value>(a, s, n0, nv, mc); });
  }
  if (nv < n1) range_scalar(a, nv, n1, m0, mc);
}

}  // namespace xbit
