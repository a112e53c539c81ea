/*
 * simd.h: the small SIMD vocabulary the kernels of simd/kernels.c are written against
 * (in the style of ggml's simd-mappings.h). One vector type `vf` of VL floats and a few
 * primitives; each primitive has its scalar fallback inline, so kernels.c compiled with
 * no vector extension (or with KLA_SIMD_FORCE_SCALAR) is the plain C level.
 *
 * The level is chosen by the compiler flags of the translation unit (simd/meson.build
 * compiles kernels.c once per level: -mavx512f, -mavx2 -mfma, aarch64 NEON, none); the
 * backend picks one of the resulting tables at run time (simd/backend.c).
 */
#ifndef KLA_SIMD_H
#define KLA_SIMD_H

#include <stdint.h>

#if !defined(KLA_SIMD_FORCE_SCALAR) && defined(__AVX512F__)
#define SIMD_AVX512 1
#include <immintrin.h>
#elif !defined(KLA_SIMD_FORCE_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define SIMD_AVX2 1
#include <immintrin.h>
#elif !defined(KLA_SIMD_FORCE_SCALAR) && defined(__aarch64__) && defined(__ARM_NEON)
#define SIMD_NEON 1
#include <arm_neon.h>
#else
#define SIMD_SCALAR 1
#endif

#if SIMD_AVX512
typedef __m512 vf;
#define VL 16
#elif SIMD_AVX2
typedef __m256 vf;
#define VL 8
#elif SIMD_NEON
typedef float32x4_t vf;
#define VL 4
#else
typedef float vf;
#define VL 1
#endif

static inline vf vf_zero(void)
{
#if SIMD_AVX512
    return _mm512_setzero_ps();
#elif SIMD_AVX2
    return _mm256_setzero_ps();
#elif SIMD_NEON
    return vdupq_n_f32(0);
#else
    return 0;
#endif
}

static inline vf vf_set1(float x)
{
#if SIMD_AVX512
    return _mm512_set1_ps(x);
#elif SIMD_AVX2
    return _mm256_set1_ps(x);
#elif SIMD_NEON
    return vdupq_n_f32(x);
#else
    return x;
#endif
}

static inline vf vf_load(const float *p)
{
#if SIMD_AVX512
    return _mm512_loadu_ps(p);
#elif SIMD_AVX2
    return _mm256_loadu_ps(p);
#elif SIMD_NEON
    return vld1q_f32(p);
#else
    return *p;
#endif
}

static inline void vf_store(float *p, vf x)
{
#if SIMD_AVX512
    _mm512_storeu_ps(p, x);
#elif SIMD_AVX2
    _mm256_storeu_ps(p, x);
#elif SIMD_NEON
    vst1q_f32(p, x);
#else
    *p = x;
#endif
}

static inline vf vf_add(vf a, vf b)
{
#if SIMD_AVX512
    return _mm512_add_ps(a, b);
#elif SIMD_AVX2
    return _mm256_add_ps(a, b);
#elif SIMD_NEON
    return vaddq_f32(a, b);
#else
    return a + b;
#endif
}

static inline vf vf_mul(vf a, vf b)
{
#if SIMD_AVX512
    return _mm512_mul_ps(a, b);
#elif SIMD_AVX2
    return _mm256_mul_ps(a, b);
#elif SIMD_NEON
    return vmulq_f32(a, b);
#else
    return a * b;
#endif
}

/* a * b + c, fused where the level has FMA */
static inline vf vf_fma(vf a, vf b, vf c)
{
#if SIMD_AVX512
    return _mm512_fmadd_ps(a, b, c);
#elif SIMD_AVX2
    return _mm256_fmadd_ps(a, b, c);
#elif SIMD_NEON
    return vfmaq_f32(c, a, b);
#else
    return a * b + c;
#endif
}

/* sum of the lanes */
static inline float vf_reduce(vf a)
{
#if SIMD_AVX512
    return _mm512_reduce_add_ps(a);
#elif SIMD_AVX2
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
#elif SIMD_NEON
    return vaddvq_f32(a);
#else
    return a;
#endif
}

/* x, kept in a register: stops the compiler from folding one load into several
 * instructions as memory operands (each of which would load again) */
static inline vf vf_reg(vf x)
{
#if (SIMD_AVX512 || SIMD_AVX2) && defined(__GNUC__)
    __asm__("" : "+v"(x));
#elif SIMD_NEON && defined(__GNUC__)
    __asm__("" : "+w"(x));
#endif
    return x;
}

/* ---- row helpers: vector body, scalar tail -------------------------------------------- */

static inline float row_dot(const float *x, const float *y, int64_t n)
{
    vf a0 = vf_zero(), a1 = vf_zero();
    int64_t i = 0;
    for (; i + 2 * VL <= n; i += 2 * VL) {
        a0 = vf_fma(vf_load(x + i), vf_load(y + i), a0);
        a1 = vf_fma(vf_load(x + i + VL), vf_load(y + i + VL), a1);
    }
    for (; i + VL <= n; i += VL) a0 = vf_fma(vf_load(x + i), vf_load(y + i), a0);
    float s = vf_reduce(vf_add(a0, a1));
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

/* y += a x */
static inline void row_axpy(float *y, float a, const float *x, int64_t n)
{
    const vf va = vf_set1(a);
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vf_store(y + i, vf_fma(va, vf_load(x + i), vf_load(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* y = a x (y may be x) */
static inline void row_scale(float *y, float a, const float *x, int64_t n)
{
    const vf va = vf_set1(a);
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vf_store(y + i, vf_mul(va, vf_load(x + i)));
    for (; i < n; i++) y[i] = a * x[i];
}

#endif
