// C ABI of the x-bit CPU kernels (loaded with ctypes; see cpu_fallback/__init__.py): ISA detection, the
// permute-and-pad of x, the per-group sums of x, and the OpenMP split of the output columns.
#include <cmath>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "xbit_cpu.h"

namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAvx2Int = 4 };

bool isa_supported(int isa) {
  if (isa == kScalar) return true;
#if defined(XBIT_HAVE_X86_SIMD)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx2 || isa == kAvx2Int) return avx2;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  if (isa == kAvx512) return avx512;
#if !defined(XBIT_NO_VNNI)  // (set by setup.py when the compiler could not build kernel_avx512vnni.cpp)
  if (isa == kAvx512Vnni)  // vpdpbusd, plus vpmultishiftqb / vpermb (VBMI) and byte ops (BW)
    return avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512vbmi");
#endif
#endif
  return false;
}

using RangeFn = void (*)(const xbit::Args&, int64_t, int64_t, int64_t, int);

RangeFn range_fn(int isa) {
#if defined(XBIT_HAVE_X86_SIMD)
#if !defined(XBIT_NO_VNNI)
  if (isa == kAvx512Vnni) return xbit::range_avx512vnni;
#endif
  if (isa == kAvx512) return xbit::range_avx512;
  if (isa == kAvx2) return xbit::range_avx2;
  if (isa == kAvx2Int) return xbit::range_avx2int;
#endif
  return xbit::range_scalar;
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Element i of x, float32 or bfloat16.
float load_x(const void* x, int x_bf16, int64_t i) {
  return x_bf16 ? bf16_to_float(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
}

// v <- H v / sqrt(n) in place: the orthonormal fast Walsh-Hadamard transform of n (a power of two) values, the
// same Sylvester-ordered matrix as xbit/rotation.py builds.
void hadamard_block(float* v, int n) {
  for (int h = 1; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  const float norm = 1.0f / std::sqrt(float(n));
  for (int j = 0; j < n; ++j) v[j] *= norm;
}

// The segment table's rows as Segs, checking (O(segments) per call) that every row lies inside the buffers.
int read_segs(const int32_t* seg_table, int32_t nseg, int64_t K, int64_t nwords, int32_t group_size, int64_t ngroups,
              int64_t Kp, xbit::Seg* segs) {
  for (int i = 0; i < nseg; ++i) {
    const int32_t* r = seg_table + 6 * i;
    if (r[0] < 1 || r[0] > 8) return -3;
    const int64_t blocks = (int64_t(r[2]) + xbit::kBlock - 1) / xbit::kBlock;
    if (r[1] < 0 || r[2] < 0 || r[3] < 0 || r[4] < 0 || r[5] < 0 || r[1] + int64_t(r[2]) > K ||
        r[3] + blocks * r[0] > nwords || r[4] + (r[2] + group_size - 1) / group_size > ngroups ||
        r[5] + blocks * xbit::kBlock > Kp)
      return -5;
    segs[i] = {r[0], r[2], r[3], r[4], r[5], r[1]};
  }
  return 0;
}

// R^T x of a layer stored in a rotated basis, row m of x (float32 or bfloat16) into out (float32 [K]).
void rotate_row(const void* x, int x_bf16, int64_t m, int64_t K, const float* signs, int rot_block, int64_t k0,
                float* out) {
  for (int j = 0; j < rot_block; ++j) out[j] = load_x(x, x_bf16, m * K + k0 + j) * signs[k0 + j];
  hadamard_block(out, rot_block);
}

}  // namespace

extern "C" {

int xbit_cpu_isa_supported(int isa) { return isa_supported(isa) ? 1 : 0; }

int xbit_cpu_best_isa(void) {
  for (int isa : {kAvx512Vnni, kAvx512, kAvx2Int})
    if (isa_supported(isa)) return isa;
  return kScalar;
}

int xbit_cpu_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// The segment table of a layer, built once per layer from bits (uint8 [K], original column order) and perm (int32
// [K], storage order), checking every index the kernels will use: perm a permutation of 0..K-1, bits 0..8, each
// depth one run of storage order. seg_table receives the rows xbit_cpu_matmul takes (depths > 0, at most 8 rows of
// 6); info[0..3] = {nseg, words, groups, Kp}. Returns 0, or a negative code with info[4] the position at fault:
// -10 perm[i] outside 0..K-1, -11 perm[i] repeats an earlier entry, -12 bits[i] > 8, -13 storage position i starts
// a second run of its depth; -1 group_size <= 0.
int xbit_cpu_plan(const uint8_t* bits, const int32_t* perm, int64_t K, int32_t group_size, int32_t* seg_table,
                  int64_t* info) {
  if (group_size <= 0) return -1;
  std::vector<uint8_t> seen(size_t(K), 0);
  for (int64_t i = 0; i < K; ++i) {
    info[4] = i;
    if (perm[i] < 0 || perm[i] >= K) return -10;
    if (seen[perm[i]]++) return -11;
  }
  for (int64_t i = 0; i < K; ++i)
    if (bits[i] > 8) return info[4] = i, -12;
  bool used[9] = {};
  int64_t nseg = 0, words = 0, groups = 0, kp = 0;
  for (int64_t i = 0, j; i < K; i = j) {  // runs of equal depth in storage order, as xbit.format.segments_of
    const int b = bits[perm[i]];
    for (j = i; j < K && bits[perm[j]] == b; ++j) {
    }
    if (used[b]) return info[4] = i, -13;
    used[b] = true;
    if (b == 0) continue;  // 0-bit columns store nothing
    const int64_t cols = j - i, blocks = (cols + xbit::kBlock - 1) / xbit::kBlock;
    int32_t* r = seg_table + 6 * nseg++;
    r[0] = b, r[1] = int32_t(i), r[2] = int32_t(cols), r[3] = int32_t(words), r[4] = int32_t(groups);
    r[5] = int32_t(kp);
    words += blocks * b, groups += (cols + group_size - 1) / group_size, kp += blocks * xbit::kBlock;
  }
  info[0] = nseg, info[1] = words, info[2] = groups, info[3] = kp;
  return 0;
}

// y[M, N] float32 = x[M, K] (float32, or bfloat16 when x_bf16) @ W.T, W in the x-bit format.
// seg_table: nseg rows of (bits, start, cols, word_start, group_start, xoff) for the segments with bits > 0, from
// xbit_cpu_plan (which checked perm); Kp: total padded columns (sum of segment columns rounded up to 32); nwords
// and ngroups: the rows of qweight and of scales/zeros. signs (float32 [K], or null) and rot_block:
// a layer stored in a rotated basis (xbit/rotation.py) multiplies R^T x, computed here first.
// Returns 0, or < 0 on bad arguments.
int xbit_cpu_matmul(int isa, int threads, const void* x, int x_bf16, int64_t M, int64_t K, const int32_t* perm,
                    const int32_t* qweight, int64_t nwords, const uint16_t* scales, const uint16_t* zeros, int64_t N,
                    const int32_t* seg_table, int32_t nseg, int32_t group_size, int64_t ngroups, int64_t Kp,
                    const float* signs, int32_t rot_block, float* y) {
  if (group_size <= 0 || group_size % xbit::kBlock != 0) return -1;
  if (signs && (rot_block < 1 || (rot_block & (rot_block - 1)) || K % rot_block)) return -4;
  if (!isa_supported(isa)) return -2;
  if (threads < 1) threads = 1;
  std::vector<xbit::Seg> segs(nseg);
  const int rc = read_segs(seg_table, nseg, K, nwords, group_size, ngroups, Kp, segs.data());
  if (rc != 0) return rc;
  // every element of these is written below (padding included): no value-initialisation
  std::unique_ptr<float[]> xp(new float[size_t(M * Kp)]), gsum(new float[size_t(M * ngroups)]);
  xbit::Args a{xp.get(), gsum.get(), qweight, scales, zeros, segs.data(), y, N, Kp, ngroups, nseg, group_size};
  // the integer GEMVs (VNNI, AVX2) also want x quantized to bytes; larger batches and huge groups take the float
  // kernels
  const bool vnni = isa == kAvx512Vnni && M <= 4 && group_size <= xbit::kVnniMaxGroup;
  const bool bytes = vnni || (isa == kAvx2Int && M <= 4 && group_size <= xbit::kVnniMaxGroup);
  std::unique_ptr<int8_t[]> xq(bytes ? new int8_t[size_t(M * Kp / xbit::kBlock * 128)] : nullptr);
  std::unique_ptr<float[]> xs(bytes ? new float[size_t(2 * M * ngroups)] : nullptr);
  if (bytes) a.xq = xq.get(), a.xs = xs.get();
  const RangeFn fn = range_fn(isa);

  // Gather items: one group of one row each (segment, first column), so a batch-1 call splits them too.
  std::vector<std::pair<int, int>> groups;
  for (int i = 0; i < nseg; ++i)
    for (int c0 = 0; c0 < seg_table[6 * i + 2]; c0 += group_size) groups.emplace_back(i, c0);
  const int64_t ng = int64_t(groups.size());

  // Work items: contiguous column ranges, a multiple of the thread count so the split stays even; for the GEMM
  // at most ~512 columns each, so one item's output rows stay in cache.
  // The GEMV (M <= 4) keeps no output tile, so it takes one long range per thread: longer row streams.
  const int64_t per = M <= 4 ? 1 : (N + 511) / 512, items_t = per < 1 ? 1 : per;
  int64_t items = threads * ((items_t + threads - 1) / threads);
  int64_t width = ((N + items - 1) / items + 15) / 16 * 16;
  items = (N + width - 1) / width;

  // a rotated layer gathers from R^T x (float32) instead of x
  std::unique_ptr<float[]> xr(signs ? new float[size_t(M * K)] : nullptr);
  const int64_t nrot = signs ? M * (K / rot_block) : 0;
  const void* xin = signs ? static_cast<const void*>(xr.get()) : x;
  const int in_bf16 = signs ? 0 : x_bf16;

#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t it = 0; it < nrot; ++it) {  // one block of one row each
      const int64_t m = it / (K / rot_block), k0 = (it % (K / rot_block)) * rot_block;
      rotate_row(x, x_bf16, m, K, signs, rot_block, k0, xr.get() + m * K + k0);
    }
#pragma omp for schedule(static)
    for (int64_t it = 0; it < M * ng; ++it) {  // gather x into storage order, zero padding, sum each group
      const int64_t m = it / ng;
      const int i = groups[it % ng].first, c0 = groups[it % ng].second;
      const int32_t* r = seg_table + 6 * i;
      const int32_t start = r[1], cols = r[2], xoff = r[5], g = r[4] + c0 / group_size;
      const int c1 = cols < c0 + group_size ? cols : c0 + group_size;
      float* row = xp.get() + m * Kp + xoff;
      double sum = 0.0;  // double: zero * gsum is subtracted from the code dot product
      for (int c = c0; c < c1; ++c) {
        row[c] = load_x(xin, in_bf16, m * K + perm[start + c]);
        sum += row[c];
      }
      gsum[m * ngroups + g] = float(sum);
      if (c1 == cols)
        for (int c = cols; c % xbit::kBlock != 0; ++c) row[c] = 0.0f;
#if defined(XBIT_HAVE_X86_SIMD) && !defined(XBIT_NO_VNNI)
      if (vnni) xbit::quantize_group_vnni(a, m, segs[i], c0 / xbit::kBlock, g, xq.get(), xs.get());
#endif
      if (bytes && !vnni) xbit::quantize_group_bytes(a, m, segs[i], c0 / xbit::kBlock, g, xq.get(), xs.get());
    }
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n0 = it * width, n1 = n0 + width < N ? n0 + width : N;
      for (int64_t m = 0; m < M; ++m) std::memset(y + m * N + n0, 0, sizeof(float) * (n1 - n0));
      for (int64_t m0 = 0; m0 < M; m0 += xbit::kMaxRows)
        fn(a, n0, n1, m0, int(M - m0 < xbit::kMaxRows ? M - m0 : xbit::kMaxRows));
    }
  }
  return 0;
}

// Rows `rows` (int64 [count], each in 0..N-1) of a layer's weight as float32 [count, K] in the original column order
// (0-bit columns 0), the same numbers as xbit.format.dequantize; the other arguments as xbit_cpu_matmul's. Returns 0,
// or < 0 on bad arguments (-6: a row outside the layer).
int xbit_cpu_dequantize(int threads, int64_t K, const int32_t* perm, const int32_t* qweight, int64_t nwords,
                        const uint16_t* scales, const uint16_t* zeros, int64_t N, const int32_t* seg_table,
                        int32_t nseg, int32_t group_size, int64_t ngroups, int64_t Kp, const int64_t* rows,
                        int64_t count, float* out) {
  if (group_size <= 0 || group_size % xbit::kBlock != 0) return -1;
  for (int64_t i = 0; i < count; ++i)
    if (rows[i] < 0 || rows[i] >= N) return -6;
  std::vector<xbit::Seg> segs(nseg);
  const int rc = read_segs(seg_table, nseg, K, nwords, group_size, ngroups, Kp, segs.data());
  if (rc != 0) return rc;
  xbit::Args a{nullptr, nullptr, qweight, scales, zeros, segs.data(), nullptr, N, Kp, ngroups, nseg, group_size};
  a.K = K;
#pragma omp parallel for schedule(static, 16) num_threads(threads < 1 ? 1 : threads)
  for (int64_t i = 0; i < count; ++i) xbit::dequantize_row(a, perm, rows[i], out + i * K);
  return 0;
}

// out (float32 [M, K]) = R^T x for each row of x (float32, or bfloat16 when x_bf16): the input of a layer stored in
// a rotated basis (signs float32 [K], rot_block a power of two dividing K). Returns 0, or < 0 on bad arguments.
int xbit_cpu_rotate(int threads, const void* x, int x_bf16, int64_t M, int64_t K, const float* signs,
                    int32_t rot_block, float* out) {
  if (rot_block < 1 || (rot_block & (rot_block - 1)) || K % rot_block) return -4;
  const int64_t per = K / rot_block;
#pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
  for (int64_t it = 0; it < M * per; ++it)
    rotate_row(x, x_bf16, it / per, K, signs, rot_block, (it % per) * rot_block, out + it * rot_block);
  return 0;
}

}  // extern "C"
