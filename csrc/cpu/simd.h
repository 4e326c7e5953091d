// Small SIMD helpers for the CPU kernels: dtype conversion of sub-blocks and fp32 dot products.
// Written with GCC/Clang vector extensions; hot functions are compiled for x86-64-v4 (AVX-512), AVX2(+F16C)
// and a baseline, selected at run time (target_clones / __builtin_cpu_supports). The arithmetic is the same
// on every path (256-bit vectors, the same lane order, no FMA contraction: -ffp-contract=off), so results do
// not depend on the path taken. The v4 clone still uses 256-bit vectors; what it gains is AVX-512VL's 32
// vector registers, which hold all m(m+1)/2 Gram accumulators for m >= 4 without spilling (bf16 Gram of
// 5 vectors: 51 -> 28 ms on the GPT-2-small list, bit-identical to the AVX2 clone).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ATAX_X86 1
#include <immintrin.h>
#define ATAX_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define ATAX_X86 0
#define ATAX_CLONES
#endif

namespace atax {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));

inline v8f loadu8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

#ifndef ATAX_GRAM_PREFETCH
#define ATAX_GRAM_PREFETCH 1024
#endif

constexpr int kLanes = 32;  // element e accumulates into lane e % 32

// sum_e a[e] * b[e] over len elements: fp32 products in 32 fixed lanes, lanes summed in fp64 in
// fixed order.
ATAX_CLONES __attribute__((noinline, unused)) static double dot_block(const float* __restrict a,
                                                              const float* __restrict b, int64_t len) {
  v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t e = 0;
  for (; e + kLanes <= len; e += kLanes) {
    s0 += loadu8(a + e) * loadu8(b + e);
    s1 += loadu8(a + e + 8) * loadu8(b + e + 8);
    s2 += loadu8(a + e + 16) * loadu8(b + e + 16);
    s3 += loadu8(a + e + 24) * loadu8(b + e + 24);
  }
  float lanes[kLanes];
  std::memcpy(lanes, &s0, 32);
  std::memcpy(lanes + 8, &s1, 32);
  std::memcpy(lanes + 16, &s2, 32);
  std::memcpy(lanes + 24, &s3, 32);
  for (int l = 0; e < len; ++e, ++l) lanes[l] += a[e] * b[e];
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += static_cast<double>(lanes[l]);
  return s;
}

// Fused Gram of a sub-block for small m: all m(m+1)/2 pairs accumulated in registers in one sweep
// (8*A fp32 lanes per pair), then each pair's lanes summed in fp64 in fixed order into acc[p]
// (upper triangle, row-major).
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8f load8(const float* p) { return loadu8(p); }
__attribute__((always_inline)) inline v8f load8(const c10::BFloat16* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  v8u32 w = __builtin_convertvector(h, v8u32) << 16;
  v8f f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}
#if ATAX_X86
inline __attribute__((target("avx2,f16c"))) v8f load8(const c10::Half* p) {
  __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
}
inline __attribute__((target("avx2,f16c"))) void store8_half(c10::Half* p, v8f r) {
  __m256 f;
  std::memcpy(&f, &r, sizeof(f));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
}
#endif
__attribute__((always_inline)) inline float load1(const c10::Half* p) { return static_cast<float>(*p); }
__attribute__((always_inline)) inline float load1(const float* p) { return *p; }
__attribute__((always_inline)) inline float load1(const c10::BFloat16* p) { return static_cast<float>(*p); }

template <int M, typename T>
__attribute__((always_inline)) inline void gram_fused_body(const T* const* src, int64_t len,
                                                          double* acc) {
  constexpr int P = M * (M + 1) / 2;
  constexpr int A = M == 1 ? 4 : (M == 2 ? 2 : 1);
  constexpr int W = 8 * A;
  v8f s[P][A];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < A; ++q) s[p][q] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  const T* x[M];
  for (int j = 0; j < M; ++j) x[j] = src[j];
  int64_t e = 0;
  for (; e + W <= len; e += W) {
    v8f v[M][A];
#if ATAX_GRAM_PREFETCH
    for (int j = 0; j < M; ++j) __builtin_prefetch(x[j] + e + ATAX_GRAM_PREFETCH, 0, 3);
#endif
    for (int j = 0; j < M; ++j)
      for (int q = 0; q < A; ++q) v[j][q] = load8(x[j] + e + 8 * q);
    int p = 0;
    for (int a = 0; a < M; ++a)
      for (int b = a; b < M; ++b, ++p)
        for (int q = 0; q < A; ++q) s[p][q] += v[a][q] * v[b][q];
  }
  float lanes[P][W];
  for (int p = 0; p < P; ++p) std::memcpy(lanes[p], s[p], sizeof(float) * W);
  for (int l = 0; e < len; ++e, ++l) {
    int p = 0;
    for (int a = 0; a < M; ++a)
      for (int b = a; b < M; ++b, ++p) lanes[p][l] += load1(x[a] + e) * load1(x[b] + e);
  }
  for (int p = 0; p < P; ++p) {
    double t = 0.0;
    for (int l = 0; l < W; ++l) t += static_cast<double>(lanes[p][l]);
    acc[p] += t;
  }
}

// bf16 specialisation: 16 elements per 32-byte load, split into even (w << 16) and odd
// (w & 0xffff0000) fp32 halves with shifts/masks only (no widening shuffles); even and odd products
// go into the same lane accumulator (even first). Same code on every clone.
template <int M>
__attribute__((always_inline)) inline void gram_fused_body_bf16(const c10::BFloat16* const* src, int64_t len,
                                                               double* acc) {
  constexpr int P = M * (M + 1) / 2;
  constexpr int A = M == 1 ? 4 : (M == 2 ? 2 : 1);
  constexpr int W = 8 * A;
  constexpr int B = 16 * A;  // elements per step
  v8f s[P][A];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < A; ++q) s[p][q] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  const c10::BFloat16* x[M];
  for (int j = 0; j < M; ++j) x[j] = src[j];
  const v8u32 hi = {0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u,
                    0xffff0000u, 0xffff0000u, 0xffff0000u, 0xffff0000u};
  int64_t e = 0;
  for (; e + B <= len; e += B) {
    v8f ve[M][A], vo[M][A];
    for (int j = 0; j < M; ++j)
      for (int q = 0; q < A; ++q) {
        v8u32 w;
        std::memcpy(&w, x[j] + e + 16 * q, sizeof(w));
        const v8u32 we = w << 16, wo = w & hi;
        std::memcpy(&ve[j][q], &we, sizeof(we));
        std::memcpy(&vo[j][q], &wo, sizeof(wo));
      }
    int p = 0;
    for (int a = 0; a < M; ++a)
      for (int b = a; b < M; ++b, ++p)
        for (int q = 0; q < A; ++q) {
          s[p][q] += ve[a][q] * ve[b][q];
          s[p][q] += vo[a][q] * vo[b][q];
        }
  }
  float lanes[P][W];
  for (int p = 0; p < P; ++p) std::memcpy(lanes[p], s[p], sizeof(float) * W);
  for (int l = 0; e < len; ++e, ++l) {
    int p = 0;
    for (int a = 0; a < M; ++a)
      for (int b = a; b < M; ++b, ++p) lanes[p][l % W] += load1(x[a] + e) * load1(x[b] + e);
  }
  for (int p = 0; p < P; ++p) {
    double t = 0.0;
    for (int l = 0; l < W; ++l) t += static_cast<double>(lanes[p][l]);
    acc[p] += t;
  }
}
template <int M, typename T>
__attribute__((always_inline)) inline void gram_fused_dispatch(const T* const* src, int64_t len, double* acc) {
  gram_fused_body<M, T>(src, len, acc);
}
template <int M>
__attribute__((always_inline)) inline void gram_fused_dispatch(const c10::BFloat16* const* src, int64_t len,
                                                               double* acc) {
  gram_fused_body_bf16<M>(src, len, acc);
}

#define ATAX_FUSED(M, T, NAME)                                                               \
  ATAX_CLONES __attribute__((noinline, unused)) static void NAME(const T* const* src, int64_t len, \
                                                                 double* acc) {                  \
    gram_fused_dispatch<M>(src, len, acc);                                                      \
  }
ATAX_FUSED(1, float, gram_fused_1)
ATAX_FUSED(2, float, gram_fused_2)
ATAX_FUSED(3, float, gram_fused_3)
ATAX_FUSED(1, c10::BFloat16, gram_fused_1_bf16)
ATAX_FUSED(2, c10::BFloat16, gram_fused_2_bf16)
ATAX_FUSED(3, c10::BFloat16, gram_fused_3_bf16)
ATAX_FUSED(4, float, gram_fused_4)
ATAX_FUSED(5, float, gram_fused_5)
ATAX_FUSED(6, float, gram_fused_6)
ATAX_FUSED(7, float, gram_fused_7)
ATAX_FUSED(8, float, gram_fused_8)
ATAX_FUSED(4, c10::BFloat16, gram_fused_4_bf16)
ATAX_FUSED(5, c10::BFloat16, gram_fused_5_bf16)
ATAX_FUSED(6, c10::BFloat16, gram_fused_6_bf16)
ATAX_FUSED(7, c10::BFloat16, gram_fused_7_bf16)
ATAX_FUSED(8, c10::BFloat16, gram_fused_8_bf16)
#undef ATAX_FUSED

typedef void (*gram_fused_f32_fn)(const float* const*, int64_t, double*);
typedef void (*gram_fused_bf16_fn)(const c10::BFloat16* const*, int64_t, double*);
inline gram_fused_f32_fn gram_fused_f32(int64_t m) {
  static const gram_fused_f32_fn t[9] = {nullptr, gram_fused_1, gram_fused_2, gram_fused_3, gram_fused_4,
                                         gram_fused_5, gram_fused_6, gram_fused_7, gram_fused_8};
  return (m >= 1 && m <= 8) ? t[m] : nullptr;
}
inline gram_fused_bf16_fn gram_fused_bf16(int64_t m) {
  static const gram_fused_bf16_fn t[9] = {nullptr, gram_fused_1_bf16, gram_fused_2_bf16, gram_fused_3_bf16,
                                          gram_fused_4_bf16, gram_fused_5_bf16, gram_fused_6_bf16,
                                          gram_fused_7_bf16, gram_fused_8_bf16};
  return (m >= 1 && m <= 8) ? t[m] : nullptr;
}

#if ATAX_X86
// bf16 combine_ hot path with AVX2 intrinsics (same rounding as store8_bf16 / c10::BFloat16).
inline __attribute__((target("avx2"))) __m256 load8_bf16_avx2(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __attribute__((target("avx2"))) void store8_bf16_avx2(c10::BFloat16* p, __m256 r) {
  const __m256i u = _mm256_castps_si256(r);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i rr = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  rr = _mm256_blendv_epi8(rr, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rr, rr), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
__attribute__((noinline, unused, flatten, target("avx2"))) static void sub_scaled_bf16_avx2(
    c10::BFloat16* __restrict t, const c10::BFloat16* __restrict v, float c, int64_t len) {
  const __m256 cv = _mm256_set1_ps(c);
  int64_t e = 0;
  for (; e + 8 <= len; e += 8) {
    const __m256 r = _mm256_sub_ps(load8_bf16_avx2(t + e), _mm256_mul_ps(cv, load8_bf16_avx2(v + e)));
    store8_bf16_avx2(t + e, r);
  }
  for (; e < len; ++e) t[e] = static_cast<c10::BFloat16>(static_cast<float>(t[e]) - c * static_cast<float>(v[e]));
}

// Two 8-lane fp32 vectors -> 16 bf16 (round to nearest even, NaN -> 0x7fc0), one 32-byte store.
inline __attribute__((target("avx2"))) __m256i round_bf16_avx2(__m256 r) {
  const __m256i u = _mm256_castps_si256(r);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i rr = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rr, _mm256_set1_epi32(0x7fc0), nan);
}
inline __attribute__((target("avx2"))) void store16_bf16_avx2(c10::BFloat16* p, __m256 r0, __m256 r1) {
  const __m256i packed = _mm256_permute4x64_epi64(
      _mm256_packus_epi32(round_bf16_avx2(r0), round_bf16_avx2(r1)), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
}

// Fused combine_ over K same-dtype vectors: t[e] = round(((t[e] - c0*v0[e]) - c1*v1[e]) - ...), the
// same operation order (and bits) as applying the terms one after another in fp32.
template <int K>
__attribute__((always_inline, target("avx2"))) inline void combine_fused_f32_body(
    float* __restrict t, const float* const* v, const float* c, int64_t len) {
  __m256 cv[K];
  const float* x[K];
  for (int j = 0; j < K; ++j) { cv[j] = _mm256_set1_ps(c[j]); x[j] = v[j]; }
  int64_t e = 0;
  for (; e + 16 <= len; e += 16) {
    __m256 r0 = _mm256_loadu_ps(t + e), r1 = _mm256_loadu_ps(t + e + 8);
    for (int j = 0; j < K; ++j) {
      r0 = _mm256_sub_ps(r0, _mm256_mul_ps(cv[j], _mm256_loadu_ps(x[j] + e)));
      r1 = _mm256_sub_ps(r1, _mm256_mul_ps(cv[j], _mm256_loadu_ps(x[j] + e + 8)));
    }
    _mm256_storeu_ps(t + e, r0);
    _mm256_storeu_ps(t + e + 8, r1);
  }
  for (; e < len; ++e) {
    float r = t[e];
    for (int j = 0; j < K; ++j) r -= c[j] * x[j][e];
    t[e] = r;
  }
}
// bf16 target and vectors: 16 elements per 32-byte load, split into even (w << 16) and odd
// (w & 0xffff0000) fp32 halves without shuffles; the arithmetic is element-wise, so the bits equal
// the scalar path. Rounding (nearest even) recombines the halves with shifts/masks; a block holding a
// NaN result is redone by the scalar path (c10 rounding: NaN -> 0x7fc0).
template <int K>
__attribute__((always_inline, target("avx2"))) inline void combine_fused_bf16_body(
    c10::BFloat16* __restrict t, const c10::BFloat16* const* v, const float* c, int64_t len) {
  __m256 cv[K];
  const c10::BFloat16* x[K];
  for (int j = 0; j < K; ++j) { cv[j] = _mm256_set1_ps(c[j]); x[j] = v[j]; }
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7fff);
  int64_t e = 0;
  for (; e + 16 <= len; e += 16) {
    const __m256i wt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + e));
    __m256 re = _mm256_castsi256_ps(_mm256_slli_epi32(wt, 16));
    __m256 ro = _mm256_castsi256_ps(_mm256_and_si256(wt, hi));
    for (int j = 0; j < K; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[j] + e));
      re = _mm256_sub_ps(re, _mm256_mul_ps(cv[j], _mm256_castsi256_ps(_mm256_slli_epi32(w, 16))));
      ro = _mm256_sub_ps(ro, _mm256_mul_ps(cv[j], _mm256_castsi256_ps(_mm256_and_si256(w, hi))));
    }
    const __m256 un = _mm256_cmp_ps(re, ro, _CMP_UNORD_Q);
    if (__builtin_expect(!_mm256_testz_ps(un, un), 0)) {
      alignas(32) float fe[8], fo[8];
      _mm256_store_ps(fe, re);
      _mm256_store_ps(fo, ro);
      for (int l = 0; l < 8; ++l) {
        t[e + 2 * l] = static_cast<c10::BFloat16>(fe[l]);
        t[e + 2 * l + 1] = static_cast<c10::BFloat16>(fo[l]);
      }
      continue;
    }
    const __m256i ue = _mm256_castps_si256(re), uo = _mm256_castps_si256(ro);
    const __m256i ae = _mm256_add_epi32(_mm256_add_epi32(ue, bias), _mm256_and_si256(_mm256_srli_epi32(ue, 16), one));
    const __m256i ao = _mm256_add_epi32(_mm256_add_epi32(uo, bias), _mm256_and_si256(_mm256_srli_epi32(uo, 16), one));
    const __m256i out = _mm256_or_si256(_mm256_srli_epi32(ae, 16), _mm256_and_si256(ao, hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + e), out);
  }
  for (; e < len; ++e) {
    float r = static_cast<float>(t[e]);
    for (int j = 0; j < K; ++j) r -= c[j] * static_cast<float>(x[j][e]);
    t[e] = static_cast<c10::BFloat16>(r);
  }
}
#define ATAX_CFUSED(K)                                                                              \
  __attribute__((noinline, unused, target("avx2"))) static void combine_fused_f32_##K(             \
      float* __restrict t, const float* const* v, const float* c, int64_t len) {                  \
    combine_fused_f32_body<K>(t, v, c, len);                                                      \
  }                                                                                               \
  __attribute__((noinline, unused, target("avx2"))) static void combine_fused_bf16_##K(            \
      c10::BFloat16* __restrict t, const c10::BFloat16* const* v, const float* c, int64_t len) {  \
    combine_fused_bf16_body<K>(t, v, c, len);                                                     \
  }
ATAX_CFUSED(1)
ATAX_CFUSED(2)
ATAX_CFUSED(3)
ATAX_CFUSED(4)
ATAX_CFUSED(5)
ATAX_CFUSED(6)
ATAX_CFUSED(7)
ATAX_CFUSED(8)
#undef ATAX_CFUSED
typedef void (*combine_fused_f32_fn)(float* __restrict, const float* const*, const float*, int64_t);
typedef void (*combine_fused_bf16_fn)(c10::BFloat16* __restrict, const c10::BFloat16* const*, const float*,
                                      int64_t);
inline combine_fused_f32_fn combine_fused_f32(size_t k) {
  static const combine_fused_f32_fn tb[9] = {nullptr, combine_fused_f32_1, combine_fused_f32_2,
                                             combine_fused_f32_3, combine_fused_f32_4, combine_fused_f32_5,
                                             combine_fused_f32_6, combine_fused_f32_7, combine_fused_f32_8};
  return (k >= 1 && k <= 8) ? tb[k] : nullptr;
}
inline combine_fused_bf16_fn combine_fused_bf16(size_t k) {
  static const combine_fused_bf16_fn tb[9] = {nullptr, combine_fused_bf16_1, combine_fused_bf16_2,
                                              combine_fused_bf16_3, combine_fused_bf16_4, combine_fused_bf16_5,
                                              combine_fused_bf16_6, combine_fused_bf16_7, combine_fused_bf16_8};
  return (k >= 1 && k <= 8) ? tb[k] : nullptr;
}

// fp16 inputs: converted in registers with F16C (call only when has_avx2_f16c()).
#define ATAX_FUSED_H(M, NAME)                                                                       \
  __attribute__((noinline, unused, flatten, target("avx2,f16c"))) static void NAME(               \
      const c10::Half* const* src, int64_t len, double* acc) {                                    \
    gram_fused_body<M, c10::Half>(src, len, acc);                                                 \
  }
ATAX_FUSED_H(1, gram_fused_1_half)
ATAX_FUSED_H(2, gram_fused_2_half)
ATAX_FUSED_H(3, gram_fused_3_half)
ATAX_FUSED_H(4, gram_fused_4_half)
ATAX_FUSED_H(5, gram_fused_5_half)
ATAX_FUSED_H(6, gram_fused_6_half)
ATAX_FUSED_H(7, gram_fused_7_half)
ATAX_FUSED_H(8, gram_fused_8_half)
#undef ATAX_FUSED_H
typedef void (*gram_fused_half_fn)(const c10::Half* const*, int64_t, double*);
inline gram_fused_half_fn gram_fused_half(int64_t m) {
  static const gram_fused_half_fn t[9] = {nullptr, gram_fused_1_half, gram_fused_2_half, gram_fused_3_half,
                                          gram_fused_4_half, gram_fused_5_half, gram_fused_6_half,
                                          gram_fused_7_half, gram_fused_8_half};
  return (m >= 1 && m <= 8) ? t[m] : nullptr;
}

inline bool has_avx2_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

// t[e] = half(float(t[e]) - c * float(v[e])): the fp16 combine_ hot path (F16C).
__attribute__((noinline, unused, flatten, target("avx2,f16c"))) static void sub_scaled_half(
    c10::Half* __restrict t, const c10::Half* __restrict v, float c, int64_t len) {
  const v8f cv = {c, c, c, c, c, c, c, c};
  int64_t e = 0;
  for (; e + 8 <= len; e += 8) store8_half(t + e, load8(t + e) - cv * load8(v + e));
  for (; e < len; ++e)
    t[e].x = _cvtss_sh(_cvtsh_ss(t[e].x) - c * _cvtsh_ss(v[e].x), _MM_FROUND_TO_NEAREST_INT);
}
#endif

// ----------------------------------------------------------------------------- bf16
ATAX_CLONES __attribute__((noinline, unused)) static void bf16_to_float(const c10::BFloat16* __restrict src,
                                                                       float* __restrict dst, int64_t len) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t e = 0; e < len; ++e) d[e] = static_cast<uint32_t>(s[e]) << 16;
}

// Round to nearest even; NaN -> quiet NaN (same as c10::BFloat16(float)).
ATAX_CLONES __attribute__((noinline, unused)) static void float_to_bf16(const float* __restrict src,
                                                                       c10::BFloat16* __restrict dst, int64_t len) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t e = 0; e < len; ++e) {
    const uint32_t u = s[e];
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const bool nan = static_cast<int32_t>(u & 0x7fffffffu) > 0x7f800000;
    d[e] = static_cast<uint16_t>(nan ? 0x7fc0u : r);
  }
}

typedef int32_t v8i32 __attribute__((vector_size(32)));

// Round-to-nearest-even fp32 -> bf16 of 8 lanes (NaN -> 0x7fc0), same as c10::BFloat16(float).
__attribute__((always_inline)) inline void store8_bf16(c10::BFloat16* p, v8f r) {
  v8u32 u;
  std::memcpy(&u, &r, sizeof(u));
  v8u32 rr = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  v8i32 isnan = reinterpret_cast<v8i32>(u & 0x7fffffffu) > 0x7f800000;
  rr = isnan ? v8u32{0x7fc0u, 0x7fc0u, 0x7fc0u, 0x7fc0u, 0x7fc0u, 0x7fc0u, 0x7fc0u, 0x7fc0u} : rr;
  v8u16 h = __builtin_convertvector(rr, v8u16);
  std::memcpy(p, &h, sizeof(h));
}

// t[e] = bf16(float(t[e]) - c * float(v[e])): the bf16 combine_ hot path in one sweep.
ATAX_CLONES __attribute__((noinline, unused)) static void sub_scaled_bf16(c10::BFloat16* __restrict t,
                                                                          const c10::BFloat16* __restrict v,
                                                                          float c, int64_t len) {
  const v8f cv = {c, c, c, c, c, c, c, c};
  int64_t e = 0;
  for (; e + 8 <= len; e += 8) store8_bf16(t + e, load8(t + e) - cv * load8(v + e));
  for (; e < len; ++e) t[e] = static_cast<c10::BFloat16>(static_cast<float>(t[e]) - c * static_cast<float>(v[e]));
}

// ----------------------------------------------------------------------------- fp16
#if ATAX_X86
__attribute__((target("avx,f16c"))) inline void half_to_float_f16c(const c10::Half* __restrict src,
                                                                   float* __restrict dst, int64_t len) {
  int64_t e = 0;
  for (; e + 8 <= len; e += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e));
    _mm256_storeu_ps(dst + e, _mm256_cvtph_ps(h));
  }
  for (; e < len; ++e) dst[e] = _cvtsh_ss(src[e].x);
}
__attribute__((target("avx,f16c"))) inline void float_to_half_f16c(const float* __restrict src,
                                                                   c10::Half* __restrict dst, int64_t len) {
  int64_t e = 0;
  for (; e + 8 <= len; e += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + e), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + e), h);
  }
  for (; e < len; ++e) dst[e].x = _cvtss_sh(src[e], _MM_FROUND_TO_NEAREST_INT);
}
inline bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return ok;
}
#endif

inline void half_to_float(const c10::Half* __restrict src, float* __restrict dst, int64_t len) {
#if ATAX_X86
  if (has_f16c()) return half_to_float_f16c(src, dst, len);
#endif
  for (int64_t e = 0; e < len; ++e) dst[e] = static_cast<float>(src[e]);
}

inline void float_to_half(const float* __restrict src, c10::Half* __restrict dst, int64_t len) {
#if ATAX_X86
  if (has_f16c()) return float_to_half_f16c(src, dst, len);
#endif
  for (int64_t e = 0; e < len; ++e) dst[e] = static_cast<c10::Half>(src[e]);
}

// ----------------------------------------------------------------------------- axpy
// acc[e] -= c * v[e] (fp32, no FMA contraction).
ATAX_CLONES __attribute__((noinline, unused)) static void sub_scaled_f32(float* __restrict acc,
                                                                 const float* __restrict v, float c,
                                                                 int64_t len) {
  for (int64_t e = 0; e < len; ++e) acc[e] -= c * v[e];
}

}  // namespace cpu
}  // namespace atax
