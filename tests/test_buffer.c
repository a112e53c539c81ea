/*
 * test_buffer.c: KlaBuffer (tensors kept where the backend computes) on every usable
 * backend. TAP.
 *
 * The same kernels run whether a tensor is in host memory or in a buffer, so on each
 * backend a call on buffers must give bit for bit what the call on host tensors gives:
 * forward (both algorithms), backward, a decode loop whose state never leaves the
 * backend, and a mix of host tensors and buffers. A forward split in two, the first
 * half's ht buffer passed as the second half's h0, equals the forward in one piece (the
 * recurrent algorithm, whose state between tokens is the float32 state either way).
 * Misuse fails with a message naming the tensor: data and buffer both set, a wrong size,
 * a buffer of another context, an output that is also an input, cu_seqlens or a VK-layout
 * state in device memory, a dtype the backend does not keep.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"

int kla__vulkan_messages(void) __attribute__((weak)); /* vulkan/vk_device.c, when built */

static int n_test, n_fail;
static void ok(int cond, const char *be, const char *what, const char *detail)
{
    n_test++;
    if (!cond) n_fail++;
    printf("%sok %d - %s: %s\n", cond ? "" : "not ", n_test, be, what);
    if (!cond && detail && *detail) printf("# %s\n", detail);
    fflush(stdout);
}

static uint64_t rs = 20261204;
static float *frand(size_t n, double lo, double hi)
{
    float *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) {
        rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
        x[i] = (float)(lo + (hi - lo) * (double)(rs >> 11) / 9007199254740992.0);
    }
    return x;
}

enum { B = 2, T = 40, H = 2, HV = 4, K = 16, V = 8 };
#define NQ ((size_t)B * T * H * K)
#define NV ((size_t)B * T * HV * V)
#define NS ((size_t)B * T * HV)
#define NST ((size_t)B * HV * K * V)

/* the tensors of a call: inputs, then outputs (index names below) */
enum { Q, KK, VV, G, ETA, H0, DO, DHT, O, HT, DQ, DK, DV, DG, DETA, DH0, NT };
static const size_t sizes[NT] = { NQ, NQ, NV, NS, NS, NST, NV, NST, NV, NST, NQ, NQ, NV, NS, NS, NST };

typedef struct data {
    float *x[NT];
} data;

static void make_inputs(data *d)
{
    d->x[Q] = frand(NQ, -1, 1), d->x[KK] = frand(NQ, -1, 1), d->x[VV] = frand(NV, -1, 1);
    d->x[G] = frand(NS, -0.3, -0.01), d->x[ETA] = frand(NS, 0.2, 0.9), d->x[H0] = frand(NST, -0.5, 0.5);
    d->x[DO] = frand(NV, -1, 1), d->x[DHT] = frand(NST, -1, 1);
    for (int i = O; i < NT; i++) d->x[i] = calloc(sizes[i], sizeof(float));
}

/* KlaTensors over host arrays (h) or buffers (b), tensor i from buffers when mask has bit i */
static KlaTensors tensors(float *const *h, KlaBuffer *const *b, unsigned mask, int backward)
{
    KlaIn in[DO + 2];
    KlaOut out[NT - O];
    for (int i = 0; i < NT; i++) {
        const int buf = (mask >> i) & 1;
        if (i < O) in[i] = buf ? KLA_BUF_IN(b[i]) : KLA_F32_IN(h[i], sizes[i]);
        else out[i - O] = buf ? KLA_BUF_OUT(b[i]) : KLA_F32_OUT(h[i], sizes[i]);
    }
    KlaTensors t = { .q = in[Q], .k = in[KK], .v = in[VV], .g = in[G], .eta = in[ETA], .h0 = in[H0],
                     .o = out[O - O], .ht = out[HT - O] };
    if (backward) {
        t.dout = in[DO], t.dht = in[DHT], t.dq = out[DQ - O], t.dk = out[DK - O], t.dv = out[DV - O];
        t.dg = out[DG - O], t.deta = out[DETA - O], t.dh0 = out[DH0 - O];
    }
    return t;
}

static int same(const float *a, const float *b, size_t n) { return !memcmp(a, b, n * sizeof *a); }

/* max |a - b| <= tol max |b| */
static int near(const float *a, const float *b, size_t n, double tol)
{
    double e = 0, m = 0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i])), m = fmax(m, fabs((double)b[i]));
    return e <= tol * m;
}

/* x rounded to dt (F16, BF16) by a buffer of ctx: raw 16-bit values, and their float32 */
static int round16(KlaContext *ctx, KlaDtype dt, const float *x, int64_t n, uint16_t *bits, float *wide)
{
    KlaBuffer *b = NULL;
    int r = kla_buffer_new(ctx, dt, n, &b);
    if (!r) r = kla_buffer_write(b, KLA_F32_IN(x, n));
    if (!r) r = kla_buffer_read(b, KLA_OUT(bits, dt, n));
    if (!r && wide) r = kla_buffer_read(b, KLA_F32_OUT(wide, n));
    kla_buffer_free(&b);
    return r;
}

/* 16-bit buffers (F16, BF16): a backward whose inputs q k v g eta dout and outputs o dq dk
 * dv dg deta are 16-bit buffers equals, bit for bit, the float32 backward on the inputs'
 * 16-bit values with its outputs rounded to 16 bits (vulkan widens and narrows on the
 * GPU, the CPU backends on the host). Odd element counts (g, eta, dg, deta of 7 tokens)
 * cover the last half-filled 32-bit word. A 16-bit state is refused. */
static void check_16bit(KlaContext *ctx, const char *be, int dev)
{
    enum { T7 = 7, H1 = 1, K1 = 16, V1 = 8 };
    const KlaShape s = { .B = 1, .T = T7, .H = H1, .HV = H1, .K = K1, .V = V1 };
    const int64_t n[12] = { T7 * K1, T7 * K1, T7 * V1, T7, T7, T7 * V1, /* q k v g eta do */
                            T7 * V1, T7 * K1, T7 * K1, T7 * V1, T7, T7 }; /* o dq dk dv dg deta */
    KlaOptions opt;
    kla_default_options(&opt);
    for (int d = 0; d < 2; d++) {
        const KlaDtype dt = d ? KLA_BF16 : KLA_F16;
        const char *dn = d ? "bf16" : "f16";
        float *x[12], *w[12];
        uint16_t *want[12], *got[12];
        KlaBuffer *b[12] = { 0 };
        int r = 0;
        for (int i = 0; i < 12; i++) {
            x[i] = i == 3 ? frand((size_t)n[i], -0.3, -0.01) : i == 4 ? frand((size_t)n[i], 0.2, 0.9)
                                                                   : frand((size_t)n[i], -1, 1);
            w[i] = calloc((size_t)n[i], 4), want[i] = calloc((size_t)n[i], 2), got[i] = calloc((size_t)n[i], 2);
            if (!r) r = kla_buffer_new(ctx, dt, n[i], &b[i]);
            if (i < 6 && !r) r = round16(ctx, dt, x[i], n[i], want[i], w[i]) || kla_buffer_write(b[i], KLA_F32_IN(x[i], n[i]));
        }
        /* the float32 backward on the 16-bit values, its outputs rounded */
        KlaTensors th = { .q = KLA_F32_IN(w[0], n[0]), .k = KLA_F32_IN(w[1], n[1]), .v = KLA_F32_IN(w[2], n[2]),
                          .g = KLA_F32_IN(w[3], n[3]), .eta = KLA_F32_IN(w[4], n[4]), .dout = KLA_F32_IN(w[5], n[5]),
                          .o = KLA_F32_OUT(w[6], n[6]), .dq = KLA_F32_OUT(w[7], n[7]), .dk = KLA_F32_OUT(w[8], n[8]),
                          .dv = KLA_F32_OUT(w[9], n[9]), .dg = KLA_F32_OUT(w[10], n[10]),
                          .deta = KLA_F32_OUT(w[11], n[11]) };
        if (!r) r = kla_backward(ctx, &s, &opt, &th);
        for (int i = 6; i < 12 && !r; i++) r = round16(ctx, dt, w[i], n[i], want[i], NULL);
        KlaTensors tb = { .q = KLA_BUF_IN(b[0]), .k = KLA_BUF_IN(b[1]), .v = KLA_BUF_IN(b[2]), .g = KLA_BUF_IN(b[3]),
                          .eta = KLA_BUF_IN(b[4]), .dout = KLA_BUF_IN(b[5]), .o = KLA_BUF_OUT(b[6]),
                          .dq = KLA_BUF_OUT(b[7]), .dk = KLA_BUF_OUT(b[8]), .dv = KLA_BUF_OUT(b[9]),
                          .dg = KLA_BUF_OUT(b[10]), .deta = KLA_BUF_OUT(b[11]) };
        if (!r) r = kla_backward(ctx, &s, &opt, &tb);
        int eq = 1;
        for (int i = 0; i < 12 && !r; i++) {
            r = kla_buffer_read(b[i], KLA_OUT(got[i], dt, n[i]));
            eq &= !memcmp(got[i], want[i], (size_t)n[i] * 2); /* inputs: unchanged */
        }
        char what[160], msg[600];
        snprintf(what, sizeof what, "%s buffers in and out (odd counts included) equal the float32 backward on the "
                 "%s values, rounded, bit for bit", dn, dn);
        snprintf(msg, sizeof msg, "rc %d %s", r, kla_error_detail(ctx));
        ok(!r && eq, be, what, msg);
        /* the same with 16-bit host tensors (vulkan: uploaded in 16 bits, widened and
         * narrowed on the GPU; the CPU backends: on the host) */
        uint16_t *hb[12];
        for (int i = 0; i < 12; i++) hb[i] = calloc((size_t)n[i], 2);
        for (int i = 0; i < 6; i++) memcpy(hb[i], want[i], (size_t)n[i] * 2);
        KlaTensors t16 = { .q = KLA_IN(hb[0], dt, n[0]), .k = KLA_IN(hb[1], dt, n[1]), .v = KLA_IN(hb[2], dt, n[2]),
                           .g = KLA_IN(hb[3], dt, n[3]), .eta = KLA_IN(hb[4], dt, n[4]), .dout = KLA_IN(hb[5], dt, n[5]),
                           .o = KLA_OUT(hb[6], dt, n[6]), .dq = KLA_OUT(hb[7], dt, n[7]), .dk = KLA_OUT(hb[8], dt, n[8]),
                           .dv = KLA_OUT(hb[9], dt, n[9]), .dg = KLA_OUT(hb[10], dt, n[10]),
                           .deta = KLA_OUT(hb[11], dt, n[11]) };
        int r2 = kla_backward(ctx, &s, &opt, &t16), eq2 = 1;
        for (int i = 0; i < 12; i++) eq2 &= !memcmp(hb[i], want[i], (size_t)n[i] * 2);
        if (dev && !r2) { /* the GPU widened and narrowed them (its timestamps name the passes) */
            double ms[16];
            const char *nm[16];
            const int ng = kla_gpu_time(ctx, ms, nm, 16);
            ok(ng >= 3 && !strcmp(nm[1], "widen") && !strcmp(nm[ng - 1], "narrow"), be,
               "16-bit host tensors are widened and narrowed on the GPU", ng >= 2 ? nm[1] : "no GPU time");
        }
        snprintf(what, sizeof what, "%s host tensors in and out equal the float32 backward on the %s values, "
                 "rounded, bit for bit", dn, dn);
        snprintf(msg, sizeof msg, "rc %d %s", r2, kla_error_detail(ctx));
        ok(!r2 && eq2, be, what, msg);
        /* and a forward with 16-bit host inputs, float32 output: as the float32 forward */
        float *o32 = calloc((size_t)n[6], 4), *o16 = calloc((size_t)n[6], 4);
        KlaTensors tf = { .q = KLA_F32_IN(w[0], n[0]), .k = KLA_F32_IN(w[1], n[1]), .v = KLA_F32_IN(w[2], n[2]),
                          .g = KLA_F32_IN(w[3], n[3]), .eta = KLA_F32_IN(w[4], n[4]), .o = KLA_F32_OUT(o32, n[6]) };
        r2 = kla_forward(ctx, &s, &opt, &tf);
        tf.q = t16.q, tf.k = t16.k, tf.v = t16.v, tf.g = t16.g, tf.eta = t16.eta, tf.o = KLA_F32_OUT(o16, n[6]);
        if (!r2) r2 = kla_forward(ctx, &s, &opt, &tf);
        snprintf(what, sizeof what, "%s host inputs with a float32 output equal the float32 forward, bit for bit", dn);
        snprintf(msg, sizeof msg, "rc %d %s", r2, kla_error_detail(ctx));
        ok(!r2 && !memcmp(o32, o16, (size_t)n[6] * 4), be, what, msg);
        free(o32), free(o16);
        for (int i = 0; i < 12; i++) free(hb[i]);
        if (dev) {
            KlaBuffer *h0 = NULL;
            kla_buffer_new(ctx, dt, (int64_t)H1 * K1 * V1, &h0);
            tb.h0 = KLA_BUF_IN(h0);
            r = kla_backward(ctx, &s, &opt, &tb);
            snprintf(what, sizeof what, "a %s state buffer (h0): refused", dn);
            ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor h0: a state stays float32"), be, what,
               kla_error_detail(ctx));
            kla_buffer_free(&h0);
            uint64_t vb, off;
            KlaBuffer *wr = NULL;
            kla_buffer_vulkan_handle(b[3], &vb, &off);
            r = kla_buffer_wrap_vulkan(ctx, vb, off, dt, T7, &wr);
            snprintf(what, sizeof what, "wrapping a %s Vulkan buffer of an odd count: refused", dn);
            ok(r == KLA_EINVAL && !wr && strstr(kla_error_detail(ctx), "even count"), be, what, kla_error_detail(ctx));
        }
        for (int i = 0; i < 12; i++) kla_buffer_free(&b[i]), free(x[i]), free(w[i]), free(want[i]), free(got[i]);
    }
}

/* a 16-bit value as float (bf: bfloat16, else IEEE binary16; finite h only) */
static float wide16(uint16_t h, int bf)
{
    if (bf) {
        const uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    const float v = e ? ldexpf(1 + m / 1024.0f, e - 15) : ldexpf((float)m, -24);
    return h & 0x8000 ? -v : v;
}

/* The conversions themselves, on every 16-bit value: a decode in mode gdn with K = 1,
 * k = q = 1, beta = 1, g = 0, scale 1 and a zero state makes the new state and o equal to
 * v exactly (but -0, which comes out +0), so o = v converts v's dtype into o's. Widening: v every finite F16 (BF16)
 * bit pattern, o F32, against the host's widening. Narrowing: v F32 values at, on and
 * either side of every F16 (BF16) halfway point, both signs, and values that overflow;
 * o 16-bit, against the host's rounding (kla_buffer_write converts on the host). */
static void check_conversions(KlaContext *ctx, const char *be)
{
    const int dev = !strcmp(be, "vulkan");
    enum { NSQ = 128, VW = 1024 };
    const int64_t n = (int64_t)NSQ * VW;
    const KlaShape s = { .B = NSQ, .T = 1, .H = 1, .HV = 1, .K = 1, .V = VW };
    KlaOptions opt;
    kla_default_options(&opt);
    opt.mode = KLA_MODE_GDN, opt.scale = 1;
    float *one = malloc(NSQ * 4), *zero = calloc(NSQ, 4), *v = malloc((size_t)n * 4), *o = malloc((size_t)n * 4);
    uint16_t *bits = malloc((size_t)n * 2), *want = malloc((size_t)n * 2);
    for (int i = 0; i < NSQ; i++) one[i] = 1;
    for (int d = 0; d < 2; d++) {
        const KlaDtype dt = d ? KLA_BF16 : KLA_F16;
        const char *dn = d ? "bf16" : "f16";
        for (int pass = 0; pass < 2; pass++) { /* 0: widen, 1: narrow */
            KlaBuffer *bv = NULL, *bo = NULL, *st = NULL;
            if (pass == 0)
                for (int64_t i = 0; i < n; i++) { /* every pattern; NaN and Inf as 0 */
                    const uint16_t h = (uint16_t)(i & 0xffff);
                    bits[i] = (d ? ((h >> 7) & 0xff) == 0xff : ((h >> 10) & 0x1f) == 0x1f) || h == 0x8000 ? 0 : h;
                }
            else
                for (int64_t i = 0; i < n; i++) {
                    const uint16_t lim = d ? 0x7f7f : 0x7bff, h = (uint16_t)((i / 8) % lim);
                    const float a = wide16(h, d), c = wide16((uint16_t)(h + 1), d), mid = (a + c) / 2;
                    const float x[4] = { a, mid, nextafterf(mid, 0), nextafterf(mid, INFINITY) };
                    v[i] = (i % 8 < 4 ? 1 : -1) * x[i % 4];
                    if (i % 4099 == 0) v[i] = (i % 2 ? 1 : -1) * (d ? 3.3e38f : 65520.0f * (1 + (i % 7)));
                    if (v[i] == 0) v[i] = 0; /* -0 comes out +0 (0 - 0 in the update) */
                }
            int r = kla_buffer_new(ctx, pass ? KLA_F32 : dt, n, &bv) | kla_buffer_new(ctx, pass ? dt : KLA_F32, n, &bo) |
                    kla_buffer_new(ctx, KLA_F32, n, &st);
            if (!r) r = pass ? kla_buffer_write(bv, KLA_F32_IN(v, n)) : kla_buffer_write(bv, KLA_IN(bits, dt, n));
            KlaTensors t = { .q = KLA_F32_IN(one, NSQ), .k = KLA_F32_IN(one, NSQ), .v = KLA_BUF_IN(bv),
                             .g = KLA_F32_IN(zero, NSQ), .beta = KLA_F32_IN(one, NSQ), .o = KLA_BUF_OUT(bo),
                             .state = KLA_BUF_OUT(st) };
            if (!r) r = kla_decode(ctx, &s, &opt, &t);
            /* The decode is an identity in exact arithmetic, but Vulkan leaves float32
             * subnormals to the implementation and NVIDIA's flushes them to zero in the
             * kernel's arithmetic (the converters move bits and keep them): a subnormal
             * that came out as zero is counted apart, never as a difference. */
            int bad = 0, flushed = 0;
            if (!pass) {
                if (!r) r = kla_buffer_read(bo, KLA_F32_OUT(o, n));
                if (!r) r = kla_buffer_read(bv, KLA_F32_OUT(v, n)); /* widened by the host */
                for (int64_t i = 0; i < n && !r; i++) {
                    const int sub = v[i] != 0 && fabsf(v[i]) < FLT_MIN;
                    if (memcmp(&o[i], &v[i], 4) == 0) continue;
                    if (dev && sub && o[i] == 0) flushed++;
                    else bad++;
                }
            } else {
                KlaBuffer *hb = NULL; /* the host's rounding: a write into a 16-bit buffer */
                if (!r) r = kla_buffer_new(ctx, dt, n, &hb);
                if (!r) r = kla_buffer_write(hb, KLA_F32_IN(v, n));
                if (!r) r = kla_buffer_read(hb, KLA_OUT(want, dt, n));
                if (!r) r = kla_buffer_read(bo, KLA_OUT(bits, dt, n));
                for (int64_t i = 0; i < n && !r; i++) {
                    if (bits[i] == want[i]) continue;
                    if (dev && v[i] != 0 && fabsf(v[i]) < FLT_MIN && (bits[i] & 0x7fff) == 0) flushed++;
                    else bad++;
                }
                kla_buffer_free(&hb);
            }
            char what[160], msg[600];
            if (pass) snprintf(what, sizeof what, "float32 -> %s at every halfway point (and either side, "
                               "overflow), as the host rounds", dn);
            else snprintf(what, sizeof what, "%s -> float32 of every finite %s value, exact", dn, dn);
            snprintf(msg, sizeof msg, "rc %d, %d differ%s %s", r, bad,
                     flushed ? " (and float32 subnormals flushed to zero by the device's arithmetic)" : "",
                     r ? kla_error_detail(ctx) : "");
            if (flushed) printf("# %s: %d float32 subnormal values flushed to zero by the decode kernel\n", be, flushed);
            ok(!r && !bad, be, what, msg);
            kla_buffer_free(&bv), kla_buffer_free(&bo), kla_buffer_free(&st);
        }
    }
    free(one), free(zero), free(v), free(o), free(bits), free(want);
}

static void run_backend(const char *be)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = be;
    KlaContext *ctx = NULL, *other = NULL;
    if (kla_open(&ctx, &p) < 0) {
        printf("# %s: not usable here (%s)\n", be, kla_error_detail(NULL));
        return;
    }
    kla_open(&other, &p);
    const int dev = !strcmp(be, "vulkan");
    /* ref64 computes in float64: its buffers on the host may hold any dtype; F32 here */
    const KlaShape s = { .B = B, .T = T, .H = H, .HV = HV, .K = K, .V = V };
    KlaOptions opt;
    kla_default_options(&opt);
    char msg[600];
    data host, viab;
    make_inputs(&host);
    for (int i = 0; i < NT; i++) {
        viab.x[i] = malloc(sizes[i] * sizeof(float));
        memcpy(viab.x[i], host.x[i], sizes[i] * sizeof(float));
    }
    KlaBuffer *b[NT] = { 0 };
    int r = 0;
    for (int i = 0; i < NT && !r; i++) r = kla_buffer_new(ctx, KLA_F32, (int64_t)sizes[i], &b[i]);
    for (int i = 0; i < O && !r; i++) r = kla_buffer_write(b[i], KLA_F32_IN(host.x[i], sizes[i]));
    snprintf(msg, sizeof msg, "%s", r ? kla_error_detail(ctx) : "");
    ok(!r, be, "buffers made and written", msg);
    if (r) goto done;
    const unsigned all = (1u << NT) - 1;

    /* forward, both algorithms; backward */
    for (int algo = KLA_ALGO_RECURRENT; algo <= KLA_ALGO_CHUNK; algo++) {
        opt.algo = (KlaAlgo)algo;
        KlaTensors th = tensors(host.x, b, 0, 0), tb = tensors(host.x, b, all, 0);
        int r1 = kla_forward(ctx, &s, &opt, &th), r2 = kla_forward(ctx, &s, &opt, &tb);
        int r3 = kla_buffer_read(b[O], KLA_F32_OUT(viab.x[O], NV)) | kla_buffer_read(b[HT], KLA_F32_OUT(viab.x[HT], NST));
        char what[96];
        snprintf(what, sizeof what, "forward (%s) on buffers equals it on host tensors, bit for bit",
                 algo == KLA_ALGO_CHUNK ? "chunk" : "recurrent");
        snprintf(msg, sizeof msg, "rc %d %d %d %s", r1, r2, r3, kla_error_detail(ctx));
        ok(!r1 && !r2 && !r3 && same(host.x[O], viab.x[O], NV) && same(host.x[HT], viab.x[HT], NST), be, what, msg);
    }
    opt.algo = KLA_ALGO_AUTO;
    {
        KlaTensors th = tensors(host.x, b, 0, 1), tb = tensors(host.x, b, all, 1);
        int r1 = kla_backward(ctx, &s, &opt, &th), r2 = kla_backward(ctx, &s, &opt, &tb), r3 = 0, eq = 1;
        for (int i = O; i < NT; i++) {
            r3 |= kla_buffer_read(b[i], KLA_F32_OUT(viab.x[i], sizes[i]));
            eq &= same(host.x[i], viab.x[i], sizes[i]);
        }
        snprintf(msg, sizeof msg, "rc %d %d %d %s", r1, r2, r3, kla_error_detail(ctx));
        ok(!r1 && !r2 && !r3 && eq, be, "backward on buffers equals it on host tensors, bit for bit", msg);
        /* a mix: q, v, dout from the host, the rest buffers */
        const unsigned mix = all & ~((1u << Q) | (1u << VV) | (1u << DO) | (1u << DK));
        KlaTensors tm = tensors(host.x, b, mix, 1);
        memset(viab.x[DK], 0, NQ * sizeof(float));
        tm.dk = KLA_F32_OUT(viab.x[DK], NQ);
        r2 = kla_backward(ctx, &s, &opt, &tm);
        r3 = kla_buffer_read(b[DQ], KLA_F32_OUT(viab.x[DQ], NQ));
        snprintf(msg, sizeof msg, "rc %d %d %s", r2, r3, kla_error_detail(ctx));
        ok(!r2 && !r3 && same(host.x[DK], viab.x[DK], NQ) && same(host.x[DQ], viab.x[DQ], NQ), be,
           "backward with host tensors and buffers mixed equals it on host tensors", msg);
    }

    /* a forward in two halves chained through a buffer: ht of the first is h0 of the second */
    {
        opt.algo = KLA_ALGO_RECURRENT;
        const KlaShape s1 = { .B = 1, .T = T, .H = H, .HV = HV, .K = K, .V = V };
        const KlaShape sh = { .B = 1, .T = T / 2, .H = H, .HV = HV, .K = K, .V = V };
        const size_t q1 = (size_t)T * H * K, v1 = (size_t)T * HV * V, g1 = (size_t)T * HV, st1 = (size_t)HV * K * V;
        float *o1 = calloc(v1, 4), *ht1 = calloc(st1, 4), *o2 = calloc(v1, 4), *ht2 = calloc(st1, 4);
        KlaTensors tw = { .q = KLA_F32_IN(host.x[Q], q1), .k = KLA_F32_IN(host.x[KK], q1), .v = KLA_F32_IN(host.x[VV], v1),
                          .g = KLA_F32_IN(host.x[G], g1), .eta = KLA_F32_IN(host.x[ETA], g1),
                          .o = KLA_F32_OUT(o1, v1), .ht = KLA_F32_OUT(ht1, st1) };
        int r1 = kla_forward(ctx, &s1, &opt, &tw);
        KlaBuffer *st = NULL, *st2 = NULL;
        int r2 = kla_buffer_new(ctx, KLA_F32, (int64_t)st1, &st) | kla_buffer_new(ctx, KLA_F32, (int64_t)st1, &st2);
        for (int half = 0; half < 2 && !r2; half++) {
            const size_t oq = half * q1 / 2, ov = half * v1 / 2, og = half * g1 / 2;
            KlaTensors th = { .q = KLA_F32_IN(host.x[Q] + oq, q1 / 2), .k = KLA_F32_IN(host.x[KK] + oq, q1 / 2),
                              .v = KLA_F32_IN(host.x[VV] + ov, v1 / 2), .g = KLA_F32_IN(host.x[G] + og, g1 / 2),
                              .eta = KLA_F32_IN(host.x[ETA] + og, g1 / 2), .o = KLA_F32_OUT(o2 + ov, v1 / 2),
                              .ht = KLA_BUF_OUT(half ? st2 : st) };
            if (half) th.h0 = KLA_BUF_IN(st);
            r2 = kla_forward(ctx, &sh, &opt, &th);
        }
        if (!r2) r2 = kla_buffer_read(st2, KLA_F32_OUT(ht2, st1));
        snprintf(msg, sizeof msg, "rc %d %d %s", r1, r2, kla_error_detail(ctx));
        /* bit for bit where the backend's state between tokens is the float32 it stores
         * (ref, vulkan); ref64 rounds its float64 state into the F32 buffer, simd may
         * block tokens differently for another T */
        ok(!r1 && !r2 && near(o1, o2, v1, 1e-6) && near(ht1, ht2, st1, 1e-6) &&
               ((strcmp(be, "ref") && !dev) || (same(o1, o2, v1) && same(ht1, ht2, st1))),
           be, "a forward in two halves chained by an ht buffer as h0 equals one forward", msg);
        kla_buffer_free(&st), kla_buffer_free(&st2);
        free(o1), free(ht1), free(o2), free(ht2);
        opt.algo = KLA_ALGO_AUTO;
    }

    /* a decode loop: the state stays in a buffer; each token's tensors are buffers too */
    {
        const KlaShape sd = { .B = B, .T = 1, .H = H, .HV = HV, .K = K, .V = V };
        const size_t dq = (size_t)B * H * K, dv = (size_t)B * HV * V, dg = (size_t)B * HV;
        float *sth = malloc(NST * 4), *stb = malloc(NST * 4), *oh = calloc(dv, 4), *ob = calloc(dv, 4);
        memcpy(sth, host.x[H0], NST * 4);
        KlaBuffer *bst = NULL, *bq = NULL, *bk = NULL, *bv = NULL, *bg = NULL, *be_ = NULL, *bo = NULL;
        int r1 = 0, r2 = kla_buffer_new(ctx, KLA_F32, (int64_t)NST, &bst) | kla_buffer_new(ctx, KLA_F32, (int64_t)dq, &bq) |
                         kla_buffer_new(ctx, KLA_F32, (int64_t)dq, &bk) | kla_buffer_new(ctx, KLA_F32, (int64_t)dv, &bv) |
                         kla_buffer_new(ctx, KLA_F32, (int64_t)dg, &bg) | kla_buffer_new(ctx, KLA_F32, (int64_t)dg, &be_) |
                         kla_buffer_new(ctx, KLA_F32, (int64_t)dv, &bo);
        if (!r2) r2 = kla_buffer_write(bst, KLA_F32_IN(host.x[H0], NST));
        int eq = 1;
        for (int step = 0; step < 4 && !r1 && !r2; step++) {
            /* token `step` of every sequence: rows are [B, T] so sequence n's token is row n*T + step */
            float *q = malloc(dq * 4), *k = malloc(dq * 4), *v = malloc(dv * 4), *g = malloc(dg * 4), *e = malloc(dg * 4);
            for (int n = 0; n < B; n++) {
                const size_t row = (size_t)n * T + step;
                memcpy(q + n * H * K, host.x[Q] + row * H * K, H * K * 4);
                memcpy(k + n * H * K, host.x[KK] + row * H * K, H * K * 4);
                memcpy(v + n * HV * V, host.x[VV] + row * HV * V, HV * V * 4);
                memcpy(g + n * HV, host.x[G] + row * HV, HV * 4);
                memcpy(e + n * HV, host.x[ETA] + row * HV, HV * 4);
            }
            KlaTensors th = { .q = KLA_F32_IN(q, dq), .k = KLA_F32_IN(k, dq), .v = KLA_F32_IN(v, dv),
                              .g = KLA_F32_IN(g, dg), .eta = KLA_F32_IN(e, dg), .o = KLA_F32_OUT(oh, dv),
                              .state = KLA_F32_OUT(sth, NST) };
            r1 = kla_decode(ctx, &sd, &opt, &th);
            r2 = kla_buffer_write(bq, KLA_F32_IN(q, dq)) | kla_buffer_write(bk, KLA_F32_IN(k, dq)) |
                 kla_buffer_write(bv, KLA_F32_IN(v, dv)) | kla_buffer_write(bg, KLA_F32_IN(g, dg)) |
                 kla_buffer_write(be_, KLA_F32_IN(e, dg));
            KlaTensors tb = { .q = KLA_BUF_IN(bq), .k = KLA_BUF_IN(bk), .v = KLA_BUF_IN(bv), .g = KLA_BUF_IN(bg),
                              .eta = KLA_BUF_IN(be_), .o = KLA_BUF_OUT(bo), .state = KLA_BUF_OUT(bst) };
            if (!r2) r2 = kla_decode(ctx, &sd, &opt, &tb);
            if (!r2) r2 = kla_buffer_read(bo, KLA_F32_OUT(ob, dv));
            eq &= same(oh, ob, dv);
            free(q), free(k), free(v), free(g), free(e);
        }
        if (!r2) r2 = kla_buffer_read(bst, KLA_F32_OUT(stb, NST));
        snprintf(msg, sizeof msg, "rc %d %d %s", r1, r2, kla_error_detail(ctx));
        ok(!r1 && !r2 && eq && same(sth, stb, NST), be,
           "4 decode steps with the state in a buffer equal them with a host state, bit for bit", msg);
        KlaBuffer **all_b[] = { &bst, &bq, &bk, &bv, &bg, &be_, &bo };
        for (size_t i = 0; i < sizeof all_b / sizeof all_b[0]; i++) kla_buffer_free(all_b[i]);
        free(sth), free(stb), free(oh), free(ob);
    }

    /* misuse */
    {
        KlaTensors t = tensors(host.x, b, all, 0);
        t.k.data = host.x[KK];
        r = kla_forward(ctx, &s, &opt, &t);
        ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor k: both data and buffer"), be,
           "data and buffer both set: refused, naming the tensor", kla_error_detail(ctx));
        KlaBuffer *small = NULL;
        kla_buffer_new(ctx, KLA_F32, (int64_t)NQ - 1, &small);
        t = tensors(host.x, b, all, 0);
        t.k = KLA_BUF_IN(small);
        r = kla_forward(ctx, &s, &opt, &t);
        ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor k:") && strstr(kla_error_detail(ctx), "expected"),
           be, "a buffer of the wrong size: refused, naming the tensor and the shape", kla_error_detail(ctx));
        kla_buffer_free(&small);
        KlaBuffer *foreign = NULL;
        if (other && kla_buffer_new(other, KLA_F32, (int64_t)NQ, &foreign) == 0) {
            t = tensors(host.x, b, all, 0);
            t.q = KLA_BUF_IN(foreign);
            r = kla_forward(ctx, &s, &opt, &t);
            ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor q: a KlaBuffer of another context"), be,
               "a buffer of another context: refused", kla_error_detail(ctx));
            kla_buffer_free(&foreign);
        }
        float *before = malloc(NV * 4), *after = malloc(NV * 4);
        kla_buffer_read(b[VV], KLA_F32_OUT(before, NV));
        t = tensors(host.x, b, all, 0);
        t.o = KLA_BUF_OUT(b[VV]);
        r = kla_forward(ctx, &s, &opt, &t);
        snprintf(msg, sizeof msg, "%s", kla_error_detail(ctx));
        kla_buffer_read(b[VV], KLA_F32_OUT(after, NV));
        ok(r == KLA_EINVAL && strstr(msg, "tensor o: its memory overlaps input v") && same(before, after, NV), be,
           "an output buffer that is also an input: refused, the buffer unchanged", msg);
        free(before), free(after);
        KlaBuffer *bad = NULL;
        r = kla_buffer_new(ctx, KLA_F32, 0, &bad);
        ok(r == KLA_EINVAL && !bad && strstr(kla_error_detail(ctx), "numel = 0"), be, "a buffer of 0 elements: refused",
           kla_error_detail(ctx));
        r = kla_buffer_write(b[Q], KLA_F32_IN(host.x[Q], NQ - 1));
        ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "src holds"), be, "a write of the wrong size: refused",
           kla_error_detail(ctx));
        /* dtypes: converted on write and read */
        double *d64 = malloc(NQ * 8);
        r = kla_buffer_read(b[Q], KLA_F64_OUT(d64, NQ));
        int eqd = !r;
        for (size_t i = 0; i < NQ && eqd; i++) eqd = d64[i] == (double)host.x[Q][i];
        ok(eqd, be, "a buffer reads into F64, exactly", kla_error_detail(ctx));
        free(d64);
        if (dev) {
            r = kla_buffer_new(ctx, KLA_F64, 16, &bad);
            ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "keeps KLA_F32, KLA_F16 and KLA_BF16 buffers"), be,
               "an F64 buffer on vulkan: refused, naming the dtype it keeps", kla_error_detail(ctx));
            KlaBuffer *cu = NULL;
            kla_buffer_new(ctx, KLA_F32, 2, &cu);
            const KlaShape s1 = { .B = 1, .T = T, .H = H, .HV = HV, .K = K, .V = V, .N = 1 };
            t = tensors(host.x, b, 0, 0);
            t.q.numel = t.k.numel = (int64_t)NQ / 2, t.v.numel = t.o.numel = (int64_t)NV / 2;
            t.g.numel = t.eta.numel = (int64_t)NS / 2, t.h0 = (KlaIn){ 0 }, t.ht = (KlaOut){ 0 };
            t.cu_seqlens = KLA_BUF_IN(cu);
            r = kla_forward(ctx, &s1, &opt, &t);
            ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor cu_seqlens: must be in host memory"), be,
               "cu_seqlens in a device buffer: refused", kla_error_detail(ctx));
            kla_buffer_free(&cu);
            t = tensors(host.x, b, all, 0);
            opt.state_layout = KLA_LAYOUT_VK;
            r = kla_forward(ctx, &s, &opt, &t);
            opt.state_layout = KLA_LAYOUT_KV;
            ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor h0: a device buffer holds states in the KV"), be,
               "a state buffer with state_layout VK: refused", kla_error_detail(ctx));
            uint64_t vb = 0, off = 1;
            ok(kla_buffer_vulkan_handle(b[Q], &vb, &off) == 0 && vb && off == 0, be,
               "kla_buffer_vulkan_handle gives the VkBuffer behind a buffer", "");
            /* the sequence offsets stay on the device between calls on the same sequences:
             * alternating two packings of the same N must each give ref's result */
            KlaContext *rc = NULL;
            KlaParams rp;
            kla_default_params(&rp);
            rp.backend = "ref";
            int good = kla_open(&rc, &rp) == 0;
            const KlaShape sv = { .B = 1, .T = T, .H = H, .HV = HV, .K = K, .V = V, .N = 2 };
            const int32_t cus[2][3] = { { 0, 15, T }, { 0, 25, T } };
            float *og = calloc(NV / 2, 4), *orf = calloc(NV / 2, 4);
            for (int rep = 0; rep < 4 && good; rep++) {
                KlaTensors tv = { .q = KLA_F32_IN(host.x[Q], NQ / 2), .k = KLA_F32_IN(host.x[KK], NQ / 2),
                                  .v = KLA_F32_IN(host.x[VV], NV / 2), .g = KLA_F32_IN(host.x[G], NS / 2),
                                  .eta = KLA_F32_IN(host.x[ETA], NS / 2), .cu_seqlens = KLA_IN(cus[rep % 2], KLA_I32, 3),
                                  .o = KLA_F32_OUT(og, NV / 2) };
                good = kla_forward(ctx, &sv, &opt, &tv) == 0;
                tv.o = KLA_F32_OUT(orf, NV / 2);
                good = good && kla_forward(rc, &sv, &opt, &tv) == 0 && near(og, orf, NV / 2, 1e-5);
            }
            ok(good, be, "calls alternating two packings of the same N sequences: each as ref (offsets not stale)",
               kla_error_detail(ctx));
            free(og), free(orf);
            kla_close(&rc);
        } else {
            /* host-backed buffers are host tensors: value checks apply, any dtype is kept */
            float nan1 = host.x[Q][3];
            float *qn = malloc(NQ * 4);
            memcpy(qn, host.x[Q], NQ * 4);
            qn[3] = NAN;
            kla_buffer_write(b[Q], KLA_F32_IN(qn, NQ));
            t = tensors(host.x, b, all, 0);
            r = kla_forward(ctx, &s, &opt, &t);
            ok(r < 0 && strstr(kla_error_detail(ctx), "tensor q:") && strstr(kla_error_detail(ctx), "NaN"), be,
               "a NaN in a host-backed buffer: refused as for a host tensor", kla_error_detail(ctx));
            qn[3] = nan1;
            kla_buffer_write(b[Q], KLA_F32_IN(qn, NQ));
            free(qn);
            KlaBuffer *b16 = NULL;
            r = kla_buffer_new(ctx, KLA_BF16, 16, &b16);
            ok(!r && kla_buffer_dtype(b16) == KLA_BF16 && kla_buffer_numel(b16) == 16, be,
               "a CPU backend keeps a BF16 buffer", kla_error_detail(ctx));
            kla_buffer_free(&b16);
            uint64_t vb, off;
            ok(kla_buffer_vulkan_handle(b[Q], &vb, &off) == KLA_EINVAL, be,
               "kla_buffer_vulkan_handle on a CPU backend: KLA_EINVAL", "");
        }
    }
    check_16bit(ctx, be, dev);
    check_conversions(ctx, be);
done:
    for (int i = 0; i < NT; i++) kla_buffer_free(&b[i]), free(host.x[i]), free(viab.x[i]);
    kla_close(&other);
    kla_close(&ctx);
}

/* NULLs and nonsense at every new entry point: an error, never a crash */
static void check_misuse(void)
{
    KlaContext *ctx = NULL;
    KlaParams p;
    kla_default_params(&p);
    p.backend = "ref";
    kla_open(&ctx, &p);
    KlaBuffer *b = (KlaBuffer *)1;
    int ok1 = kla_buffer_new(NULL, KLA_F32, 4, &b) == KLA_EINVAL && b == NULL;
    ok1 &= kla_buffer_new(ctx, KLA_F32, 4, NULL) == KLA_EINVAL;
    ok1 &= kla_buffer_new(ctx, (KlaDtype)99, 4, &b) == KLA_EINVAL && strstr(kla_error_detail(ctx), "dtype 99");
    ok1 &= kla_buffer_new(ctx, KLA_I32, 4, &b) == KLA_EINVAL;
    ok1 &= kla_buffer_new(ctx, KLA_F32, -5, &b) == KLA_EINVAL;
    ok1 &= kla_buffer_new(ctx, KLA_F32, INT64_MAX, &b) < 0;
    ok1 &= kla_buffer_write(NULL, KLA_F32_IN(NULL, 0)) == KLA_EINVAL && kla_buffer_read(NULL, KLA_F32_OUT(NULL, 0)) == KLA_EINVAL;
    kla_buffer_free(NULL);
    ok1 &= kla_buffer_numel(NULL) == 0 && kla_buffer_vulkan_handle(NULL, NULL, NULL) == KLA_EINVAL;
    float x[4] = { 1, 2, 3, 4 };
    if (kla_buffer_new(ctx, KLA_F32, 4, &b) == 0) {
        ok1 &= kla_buffer_write(b, KLA_F32_IN(NULL, 4)) == KLA_EINVAL && strstr(kla_error_detail(ctx), "src is NULL");
        ok1 &= kla_buffer_read(b, KLA_F32_OUT(NULL, 4)) == KLA_EINVAL;
        ok1 &= kla_buffer_write(b, KLA_IN(x, (KlaDtype)42, 4)) == KLA_EINVAL;
        ok1 &= kla_buffer_write(b, KLA_BUF_IN(b)) == KLA_EINVAL && strstr(kla_error_detail(ctx), "host memory");
        KlaBuffer *w = NULL;
        ok1 &= kla_buffer_wrap_vulkan(ctx, 1234, 0, KLA_F32, 4, &w) == KLA_EINVAL && !w; /* ref takes no VkBuffer */
        kla_buffer_free(&b);
        ok1 &= b == NULL;
    }
    ok1 &= kla_buffer_wrap_vulkan(NULL, 1, 0, KLA_F32, 4, &b) == KLA_EINVAL;
    KlaContext *vc = (KlaContext *)1;
    ok1 &= kla_open_vulkan(NULL, NULL, NULL) == KLA_EINVAL;
    const int rv = kla_open_vulkan(&vc, NULL, NULL);
    ok1 &= vc == NULL && (rv == KLA_EINVAL || rv == KLA_ENOSYS) && kla_error_detail(NULL)[0];
    KlaVulkanDevice d = { 0 };
    ok1 &= kla_open_vulkan(&vc, NULL, &d) < 0 && vc == NULL;
    /* a required tensor given as KLA_BUF_IN(NULL) is missing */
    const KlaShape s = { .B = 1, .T = 1, .H = 1, .HV = 1, .K = 2, .V = 2 };
    KlaOptions opt;
    kla_default_options(&opt);
    float o[2];
    KlaTensors t = { .q = KLA_BUF_IN(NULL), .k = KLA_F32_IN(x, 2), .v = KLA_F32_IN(x, 2), .eta = KLA_F32_IN(x, 1),
                     .o = KLA_F32_OUT(o, 2) };
    ok1 &= kla_forward(ctx, &s, &opt, &t) == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor q: missing");
    ok(ok1, "api", "NULLs and nonsense at the buffer and device-sharing entry points: errors, no crash",
       kla_error_detail(ctx));
    kla_close(&ctx);
}

int main(void)
{
    check_misuse();
    for (const char *const *be = kla_backend_list(); *be; be++) run_backend(*be);
    if (kla__vulkan_messages) ok(kla__vulkan_messages() == 0, "vulkan", "no validation-layer messages", "");
    printf("1..%d\n# %d passed, %d failed\n", n_test, n_test - n_fail, n_fail);
    return n_fail != 0;
}
