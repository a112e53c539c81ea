/*
 * test_half.c: 16-bit tensors (KLA_F16, KLA_BF16) through the public API. TAP output.
 *
 *   - the conversions (src/half.c): every one of the 65536 bit patterns of each type
 *     widens to float32 and rounds back to itself (NaNs stay NaN); narrowing rounds to
 *     nearest with ties to even, overflows to Inf, keeps subnormals, against independent
 *     arithmetic on the halfway points of every binade;
 *   - a call with 16-bit inputs equals the same call on those values widened to float32,
 *     bit for bit, on ref, ref64 and simd; 16-bit outputs are the float32 outputs rounded;
 *   - value checks see 16-bit data (NaN, g > 0); KlaState reads and writes 16-bit.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "half.h"
#include "kla.h"

#include "tap.h"

/* ---- conversions ------------------------------------------------------------------------- */

static void check_conversions(void)
{
    int bad16 = 0, badb = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = kla__f16_to_f32((uint16_t)h), b = kla__bf16_to_f32((uint16_t)h);
        const int nan16 = ((h >> 10) & 0x1f) == 31 && (h & 0x3ff), nanb = ((h >> 7) & 0xff) == 255 && (h & 0x7f);
        if (nan16 ? !isnan(f) || !isnan(kla__f16_to_f32(kla__f64_to_f16(f))) : kla__f64_to_f16(f) != h) bad16++;
        if (nanb ? !isnan(b) || !isnan(kla__bf16_to_f32(kla__f64_to_bf16(b))) : kla__f64_to_bf16(b) != h) badb++;
    }
    check(!bad16 && !badb, "every f16 and bf16 value widens and rounds back to itself (%d, %d differ)", bad16, badb);

    /* widening by arithmetic: f16 = (-1)^s 2^(e-15) (1 + m/1024), subnormal 2^-24 m */
    int badw = 0;
    for (uint32_t h = 0; h < 0x7c00; h++) {
        const int e = (int)(h >> 10), m = (int)(h & 0x3ff);
        const double want = e ? ldexp(1 + m / 1024.0, e - 15) : ldexp(m, -24);
        if (kla__f16_to_f32((uint16_t)h) != want || kla__f16_to_f32((uint16_t)(h | 0x8000)) != -want) badw++;
    }
    check(!badw && isinf(kla__f16_to_f32(0x7c00)) && kla__f16_to_f32(0xfc00) < 0,
          "f16 widening equals (-1)^s 2^(e-15) (1 + m/1024) on every finite value, Inf (%d differ)", badw);

    /* halfway points between neighbours a < b round to the even one; just above, to b */
    int badt = 0;
    for (uint32_t h = 0; h < 0x7bff; h++) {
        const double a = kla__f16_to_f32((uint16_t)h), b = kla__f16_to_f32((uint16_t)(h + 1)), mid = (a + b) / 2;
        const uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        if (kla__f64_to_f16(mid) != even || kla__f64_to_f16(nextafter(mid, 1e9)) != h + 1 ||
            kla__f64_to_f16(nextafter(mid, -1e9)) != h || kla__f64_to_f16(-mid) != (even | 0x8000))
            badt++;
    }
    for (uint32_t h = 0; h < 0x7f7f; h += 7) {
        const double a = kla__bf16_to_f32((uint16_t)h), b = kla__bf16_to_f32((uint16_t)(h + 1)), mid = (a + b) / 2;
        const uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        if (kla__f64_to_bf16(mid) != even || kla__f64_to_bf16(nextafter(mid, 1e300)) != h + 1) badt++;
    }
    check(!badt, "narrowing: halfway points to the even neighbour, above and below them to the nearer "
          "(every f16 pair, subnormals included; every 7th bf16 pair): %d wrong", badt);
    check(kla__f64_to_f16(65504) == 0x7bff && kla__f64_to_f16(65519.99) == 0x7bff && kla__f64_to_f16(65520) == 0x7c00 &&
              kla__f64_to_f16(1e300) == 0x7c00 && kla__f64_to_f16(-1e300) == 0xfc00 && kla__f64_to_f16(0x1p-25) == 0 &&
              kla__f64_to_f16(0x1.0000001p-25) == 1 && kla__f64_to_f16(-0.0) == 0x8000 &&
              kla__f64_to_bf16(0x1p128) == 0x7f80 && kla__f64_to_bf16(3.4e38) == 0x7f80 &&
              kla__f64_to_bf16(0x1.fep127) == 0x7f7f && kla__f64_to_bf16(0x1p-133) == 1 &&
              kla__f64_to_bf16(0x1p-134) == 0 && isnan(kla__f16_to_f32(kla__f64_to_f16(NAN))) &&
              isnan(kla__bf16_to_f32(kla__f64_to_bf16(NAN))),
          "edges: 65504 is the largest f16, 65520 and up Inf, 2^-25 ties to 0, -0 kept, bf16's largest and "
          "smallest subnormal, NaN stays NaN");
    /* one rounding from double, not two: x just above a float32 halfway point that a
     * rounding through float would move onto the halfway point itself */
    const double x = 1.0 + 0x1p-11 + 0x1p-40; /* f16: just above the midpoint of 1 and 1 + 2^-10 */
    check(kla__f64_to_f16(x) == 0x3c01 && kla__f64_to_bf16(1.0 + 0x1p-8 + 0x1p-40) == 0x3f81,
          "narrowing rounds the double once (no double rounding through float32)");
}

/* ---- calls ------------------------------------------------------------------------------- */

static uint64_t rs = 12345;
static double urand(void)
{
    rs ^= rs >> 12, rs ^= rs << 25, rs ^= rs >> 27;
    return (double)((rs * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

enum { Q, K, V, G, E, H0, DO, NX };

static void check_calls(const char *backend)
{
    KlaParams par;
    kla_default_params(&par);
    par.backend = backend;
    KlaContext *ctx = NULL;
    if (kla_open(&ctx, &par) < 0) {
        printf("ok %d - # SKIP %s: %s\n", ++n_test, backend, kla_error_detail(NULL));
        return;
    }
    const KlaDtype R = !strcmp(backend, "ref64") ? KLA_F64 : KLA_F32;
    KlaShape s = { .B = 2, .T = 37, .H = 2, .HV = 4, .K = 16, .V = 8 };
    const int64_t n[NX] = { 2 * 37 * 2 * 16, 2 * 37 * 2 * 16, 2 * 37 * 4 * 8, 2 * 37 * 4, 2 * 37 * 4, 2 * 4 * 16 * 8,
                            2 * 37 * 4 * 8 };
    const int64_t nst = n[H0];
    for (int t16 = 0; t16 < 2; t16++) {
        const KlaDtype D = t16 ? KLA_BF16 : KLA_F16;
        const char *dn = t16 ? "bf16" : "f16";
        uint16_t *h[NX];
        float *w[NX];
        for (int i = 0; i < NX; i++) {
            h[i] = malloc((size_t)n[i] * 2), w[i] = malloc((size_t)n[i] * 4);
            for (int64_t j = 0; j < n[i]; j++) {
                const double x = i == G ? -0.5 * urand() : i == E ? 0.2 + urand() : 2 * urand() - 1;
                kla__put_real(h[i], D, j, x);
                w[i][j] = (float)kla__get_real(h[i], D, j);
            }
        }
        KlaOptions o;
        kla_default_options(&o);
        o.algo = KLA_ALGO_CHUNK;
        const size_t es = R == KLA_F64 ? 8 : 4;
        void *o16 = calloc((size_t)n[DO], es), *o32 = calloc((size_t)n[DO], es), *d16 = calloc((size_t)n[K], es),
             *d32 = calloc((size_t)n[K], es), *dv16 = calloc((size_t)n[V], es), *dv32 = calloc((size_t)n[V], es);
        void *dg16 = calloc((size_t)n[G], es), *dg32 = calloc((size_t)n[G], es), *de16 = calloc((size_t)n[E], es),
             *de32 = calloc((size_t)n[E], es), *dq16 = calloc((size_t)n[Q], es), *dq32 = calloc((size_t)n[Q], es);
        uint16_t *ob = calloc((size_t)n[DO], 2), *hb = calloc((size_t)nst, 2);
        void *ht = calloc((size_t)nst, es);
        KlaTensors a = { .q = KLA_IN(h[Q], D, n[Q]), .k = KLA_IN(h[K], D, n[K]), .v = KLA_IN(h[V], D, n[V]),
                         .g = KLA_IN(h[G], D, n[G]), .eta = KLA_IN(h[E], D, n[E]), .h0 = KLA_IN(h[H0], D, nst),
                         .dout = KLA_IN(h[DO], D, n[DO]), .o = KLA_OUT(o16, R, n[DO]),
                         .dq = KLA_OUT(dq16, R, n[Q]), .dk = KLA_OUT(d16, R, n[K]), .dv = KLA_OUT(dv16, R, n[V]),
                         .dg = KLA_OUT(dg16, R, n[G]), .deta = KLA_OUT(de16, R, n[E]) };
        KlaTensors b = { .q = KLA_F32_IN(w[Q], n[Q]), .k = KLA_F32_IN(w[K], n[K]), .v = KLA_F32_IN(w[V], n[V]),
                         .g = KLA_F32_IN(w[G], n[G]), .eta = KLA_F32_IN(w[E], n[E]), .h0 = KLA_F32_IN(w[H0], nst),
                         .dout = KLA_F32_IN(w[DO], n[DO]), .o = KLA_OUT(o32, R, n[DO]),
                         .dq = KLA_OUT(dq32, R, n[Q]), .dk = KLA_OUT(d32, R, n[K]), .dv = KLA_OUT(dv32, R, n[V]),
                         .dg = KLA_OUT(dg32, R, n[G]), .deta = KLA_OUT(de32, R, n[E]) };
        int r = kla_backward(ctx, &s, &o, &a) | kla_backward(ctx, &s, &o, &b);
        int same = !r && !memcmp(o16, o32, (size_t)n[DO] * es) && !memcmp(d16, d32, (size_t)n[K] * es) &&
                   !memcmp(dv16, dv32, (size_t)n[V] * es) && !memcmp(dg16, dg32, (size_t)n[G] * es) &&
                   !memcmp(de16, de32, (size_t)n[E] * es) && !memcmp(dq16, dq32, (size_t)n[Q] * es);
        check(same, "%s: backward with %s inputs = with those values in float32, bit for bit (%s)", backend, dn,
              r ? kla_error_detail(ctx) : "o and every gradient");

        /* 16-bit outputs: the backend's result rounded once */
        KlaTensors c = b;
        memset(&c.dout, 0, sizeof c.dout);
        c.dq = c.dk = c.dv = c.dg = c.deta = (KlaOut){ 0 };
        c.o = KLA_OUT(ob, D, n[DO]), c.ht = KLA_OUT(hb, D, nst);
        KlaTensors e = c;
        e.o = KLA_OUT(o32, R, n[DO]), e.ht = KLA_OUT(ht, R, nst);
        r = kla_forward(ctx, &s, &o, &c) | kla_forward(ctx, &s, &o, &e);
        int64_t wrong = 0;
        for (int64_t j = 0; j < n[DO]; j++) wrong += ob[j] != (D == KLA_BF16 ? kla__f64_to_bf16(kla__get_real(o32, R, j))
                                                                                : kla__f64_to_f16(kla__get_real(o32, R, j)));
        for (int64_t j = 0; j < nst; j++) wrong += hb[j] != (D == KLA_BF16 ? kla__f64_to_bf16(kla__get_real(ht, R, j))
                                                                            : kla__f64_to_f16(kla__get_real(ht, R, j)));
        check(!r && !wrong, "%s: %s outputs (o, ht) are the backend's results rounded once (%lld differ)", backend, dn,
              (long long)wrong);

        /* value checks read 16-bit data */
        uint16_t keep = h[G][5];
        kla__put_real(h[G], D, 5, 0.25);
        r = kla_backward(ctx, &s, &o, &a);
        check(r == KLA_ERANGE && strstr(kla_error_detail(ctx), "tensor g: value 0.25 > 0"),
              "%s: g > 0 in an %s tensor is found (\"%s\")", backend, dn, kla_error_detail(ctx));
        h[G][5] = keep;
        keep = h[K][7];
        h[K][7] = t16 ? 0x7fc0 : 0x7e00;
        r = kla_backward(ctx, &s, &o, &a);
        check(r == KLA_ERANGE && strstr(kla_error_detail(ctx), "tensor k: NaN"),
              "%s: NaN in an %s tensor is found (\"%s\")", backend, dn, kla_error_detail(ctx));
        h[K][7] = keep;
        KlaTensors f = a;
        f.k.numel = n[K] - 1;
        r = kla_backward(ctx, &s, &o, &f);
        check(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor k:"), "%s: an %s tensor's size is checked",
              backend, dn);

        /* KlaState: write 16-bit, read 16-bit */
        KlaState *st = NULL;
        r = kla_state_new(ctx, 2, 4, 16, 8, &st);
        if (!r) r = kla_state_write(st, KLA_IN(h[H0], D, nst), KLA_LAYOUT_KV);
        uint16_t *back = calloc((size_t)nst, 2);
        if (!r) r = kla_state_read(st, KLA_OUT(back, D, nst), KLA_LAYOUT_KV);
        check(!r && !memcmp(back, h[H0], (size_t)nst * 2), "%s: a KlaState written and read as %s is unchanged",
              backend, dn);
        kla_state_free(&st);
        free(back);
        for (int i = 0; i < NX; i++) free(h[i]), free(w[i]);
        free(o16), free(o32), free(d16), free(d32), free(dv16), free(dv32), free(dg16), free(dg32);
        free(de16), free(de32), free(dq16), free(dq32), free(ob), free(hb), free(ht);
    }
    kla_close(&ctx);
}

int main(void)
{
    check_conversions();
    check_calls("ref");
    check_calls("ref64");
    if (kla_backend_available("simd") == 1) check_calls("simd");
    printf("1..%d\n# %d passed, %d failed\n", n_test, n_test - n_fail, n_fail);
    return n_fail ? 1 : 0;
}
