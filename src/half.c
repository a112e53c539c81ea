/*
 * half.c: the 16-bit tensor types, IEEE binary16 (F16) and bfloat16 (BF16), to and from
 * float32, and element access to a real tensor of any dtype. Backends compute in float32
 * or float64: 16-bit inputs are widened exactly, outputs rounded once to nearest, ties to
 * even (from the double, not through float: no double rounding).
 */
#include <math.h>
#include <string.h>

#include "kla_internal.h"

float kla__bf16_to_f32(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Rounds |x| to `bits` significant bits, ties to even, for normal numbers with exponent
 * above emin (frexp convention); below it the spacing stays that of emin (subnormals).
 * Returns the rounded magnitude. */
static double round_bits(double a, int bits, int emin)
{
    int e;
    frexp(a, &e);
    if (e < emin) e = emin;
    return ldexp(rint(ldexp(a, bits - e)), e - bits); /* rint: the default mode, ties to even */
}

uint16_t kla__f64_to_bf16(double x)
{
    if (x != x) return 0x7fc0;
    const uint16_t sign = signbit(x) ? 0x8000 : 0;
    const double a = round_bits(fabs(x), 8, -125);
    if (a >= 0x1p128) return sign | 0x7f80; /* Inf */
    const float f = (float)a;           /* exact: 8 bits, in float's range */
    uint32_t u;
    memcpy(&u, &f, 4);
    return sign | (uint16_t)((u >> 16) & 0x7fff);
}

float kla__f16_to_f32(uint16_t h)
{
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v;
    if (e == 0) v = ldexpf((float)m, -24); /* zero and subnormals: m 2^-24 */
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(m | 0x400), e - 25);
    return (h & 0x8000) ? -v : v;
}

uint16_t kla__f64_to_f16(double x)
{
    if (x != x) return 0x7e00;
    const uint16_t sign = signbit(x) ? 0x8000 : 0;
    const double a = round_bits(fabs(x), 11, -13); /* binary16: 11 bits, subnormal below 2^-14 */
    if (a >= 0x1p16) return sign | 0x7c00;      /* 65520 and up round to Inf */
    if (a < 0x1p-14) return sign | (uint16_t)(a * 0x1p24); /* subnormal: m 2^-24, exact */
    int e;
    const double fr = frexp(a, &e); /* a = fr 2^e, fr in [0.5, 1) */
    return sign | (uint16_t)((e + 14) << 10) | (uint16_t)(ldexp(fr, 11) - 1024);
}

double kla__get_real(const void *p, KlaDtype d, int64_t i)
{
    switch (d) {
    case KLA_F64: return ((const double *)p)[i];
    case KLA_F32: return ((const float *)p)[i];
    case KLA_F16: return kla__f16_to_f32(((const uint16_t *)p)[i]);
    case KLA_BF16: return kla__bf16_to_f32(((const uint16_t *)p)[i]);
    default: return NAN;
    }
}

void kla__put_real(void *p, KlaDtype d, int64_t i, double x)
{
    switch (d) {
    case KLA_F64: ((double *)p)[i] = x; break;
    case KLA_F32: ((float *)p)[i] = (float)x; break;
    case KLA_F16: ((uint16_t *)p)[i] = kla__f64_to_f16(x); break;
    case KLA_BF16: ((uint16_t *)p)[i] = kla__f64_to_bf16(x); break;
    default: break;
    }
}
