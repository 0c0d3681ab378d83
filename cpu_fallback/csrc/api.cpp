// C ABI of the x-bit CPU kernels (loaded with ctypes; see cpu_fallback/__init__.py): ISA detection, the
// permute-and-pad of x, the per-group sums of x, and the OpenMP split of the output columns.
#include <cstdlib>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "xbit_cpu.h"

namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool isa_supported(int isa) {
  if (isa == kScalar) return true;
#if defined(XBIT_HAVE_X86_SIMD)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512) return avx2 && __builtin_cpu_supports("avx512f");
#endif
  return false;
}

using RangeFn = void (*)(const xbit::Args&, int64_t, int64_t, int64_t, int);

RangeFn range_fn(int isa) {
#if defined(XBIT_HAVE_X86_SIMD)
  if (isa == kAvx512) return xbit::range_avx512;
  if (isa == kAvx2) return xbit::range_avx2;
#endif
  return xbit::range_scalar;
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

extern "C" {

int xbit_cpu_isa_supported(int isa) { return isa_supported(isa) ? 1 : 0; }

int xbit_cpu_best_isa(void) { return isa_supported(kAvx512) ? kAvx512 : isa_supported(kAvx2) ? kAvx2 : kScalar; }

int xbit_cpu_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// y[M, N] float32 = x[M, K] (float32, or bfloat16 when x_bf16) @ W.T, W in the x-bit format.
// seg_table: nseg rows of (bits, start, cols, word_start, group_start, xoff) for the segments with bits > 0;
// Kp: total padded columns (sum of segment columns rounded up to 32). Returns 0, or < 0 on bad arguments.
int xbit_cpu_matmul(int isa, int threads, const void* x, int x_bf16, int64_t M, int64_t K, const int32_t* perm,
                    const int32_t* qweight, const uint16_t* scales, const uint16_t* zeros, int64_t N,
                    const int32_t* seg_table, int32_t nseg, int32_t group_size, int64_t ngroups, int64_t Kp,
                    float* y) {
  if (group_size <= 0 || group_size % xbit::kBlock != 0) return -1;
  if (!isa_supported(isa)) return -2;
  if (threads < 1) threads = 1;
  std::vector<xbit::Seg> segs(nseg);
  for (int i = 0; i < nseg; ++i) {
    const int32_t* r = seg_table + 6 * i;
    if (r[0] < 1 || r[0] > 8) return -3;
    segs[i] = {r[0], r[2], r[3], r[4], r[5]};
  }
  std::vector<float> xp(size_t(M * Kp)), gsum(size_t(M * ngroups));
  const xbit::Args a{xp.data(), gsum.data(), qweight, scales, zeros, segs.data(), y, N, Kp, ngroups, nseg, group_size};
  const RangeFn fn = range_fn(isa);

  // Work items: contiguous column ranges, a multiple of the thread count so the split stays even; for the GEMM
  // at most ~512 columns each, so one item's output rows stay in cache.
  // The GEMV (M <= 4) keeps no output tile, so it takes one long range per thread: longer row streams.
  const int64_t per = M <= 4 ? 1 : (N + 511) / 512, items_t = per < 1 ? 1 : per;
  int64_t items = threads * ((items_t + threads - 1) / threads);
  int64_t width = ((N + items - 1) / items + 15) / 16 * 16;
  items = (N + width - 1) / width;

#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {  // gather x into storage order, zero padding, sum each group
      float* row = xp.data() + m * Kp;
      for (int64_t k = 0; k < Kp; ++k) row[k] = 0.0f;
      for (int64_t n = 0; n < N; ++n) y[m * N + n] = 0.0f;
      for (int i = 0; i < nseg; ++i) {
        const int32_t* r = seg_table + 6 * i;
        const int32_t start = r[1], cols = r[2], g0 = r[4], xoff = r[5];
        for (int c = 0; c < cols; ++c) {
          const int64_t src = m * K + perm[start + c];
          row[xoff + c] = x_bf16 ? bf16_to_float(static_cast<const uint16_t*>(x)[src]) : static_cast<const float*>(x)[src];
        }
        for (int c0 = 0, g = g0; c0 < cols; c0 += group_size, ++g) {
          double s = 0.0;  // double: zero * gsum is subtracted from the code dot product
          for (int c = c0; c < cols && c < c0 + group_size; ++c) s += row[xoff + c];
          gsum[m * ngroups + g] = float(s);
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n0 = it * width, n1 = n0 + width < N ? n0 + width : N;
      for (int64_t m0 = 0; m0 < M; m0 += xbit::kMaxRows)
        fn(a, n0, n1, m0, int(M - m0 < xbit::kMaxRows ? M - m0 : xbit::kMaxRows));
    }
  }
  return 0;
}

}  // extern "C"
