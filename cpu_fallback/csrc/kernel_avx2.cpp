// AVX2 + FMA path: 8 output columns per vector. Built with -mavx2 -mfma -mf16c; only called after the
// runtime CPU check in api.cpp.
#include <immintrin.h>

#include <cstdlib>
#include <utility>

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

}  // namespace

void range_avx2(const Args& a, int64_t n0, int64_t n1, int64_t m0, int mc) { range_simd(a, n0, n1, m0, mc); }

}  // namespace xbit
