/*
 * test_state.c: KlaState (decode states kept by the backend) on every usable backend.
 * For each backend, T decode steps through kla_decode_state must give exactly what
 * kla_decode gives with the state in host memory (the same kernels run; the host state
 * is float64, which holds a float32 backend's state exactly and is ref64's own), in both state
 * layouts and dtypes; kla_state_write/read round-trip; bad uses fail with a message and
 * leave the state as it was. TAP.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"

static int n_test, n_fail;
static void ok(int cond, const char *be, const char *what, const char *detail)
{
    n_test++;
    if (!cond) n_fail++;
    printf("%sok %d - %s: %s\n", cond ? "" : "not ", n_test, be, what);
    if (!cond && detail) printf("# %s\n", detail);
}

static uint64_t rs = 12345;
static double urand(double lo, double hi)
{
    rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
    return lo + (hi - lo) * (double)(rs >> 11) / 9007199254740992.0;
}
static float *frand(size_t n, double lo, double hi)
{
    float *x = malloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = (float)urand(lo, hi);
    return x;
}

enum { N = 3, H = 2, HV = 4, K = 16, V = 8, T = 5 };
#define NST ((size_t)N * HV * K * V)

static void run_backend(const char *be)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = be;
    KlaContext *ctx = NULL, *other = NULL;
    if (kla_open(&ctx, &p) < 0 || kla_open(&other, &p) < 0) {
        ok(0, be, "open", kla_error_detail(NULL));
        return;
    }
    KlaOptions opt;
    kla_default_options(&opt);
    opt.l2norm_k = 1;
    const KlaShape s = { N, 1, H, HV, K, V, N };
    float *q = frand((size_t)T * N * H * K, -1, 1), *k = frand((size_t)T * N * H * K, -1, 1);
    float *v = frand((size_t)T * N * HV * V, -1, 1), *g = frand((size_t)T * N * HV, -0.2, 0);
    float *eta = frand((size_t)T * N * HV, 0.2, 1), *h0 = frand(NST, -0.3, 0.3);
    double *S_host = malloc(NST * 8);
    float *o_host = malloc((size_t)T * N * HV * V * 4);
    float *o_st = malloc((size_t)T * N * HV * V * 4), *S_back = malloc(NST * 4);
    double *S64 = malloc(NST * 8), *Svk = malloc(NST * 8), *Skv = malloc(NST * 8);
    for (size_t i = 0; i < NST; i++) S_host[i] = h0[i];

    KlaState *st = NULL;
    int r = kla_state_new(ctx, N, HV, K, V, &st);
    ok(r == 0 && st, be, "kla_state_new", kla_error_detail(ctx));
    if (r) goto end;
    r = kla_state_read(st, KLA_F64_OUT(S64), KLA_LAYOUT_KV);
    int zero = r == 0;
    for (size_t i = 0; zero && i < NST; i++) zero = S64[i] == 0;
    ok(zero, be, "a new state is zero", kla_error_detail(ctx));
    r = kla_state_write(st, KLA_F32_IN(h0), KLA_LAYOUT_KV);
    ok(r == 0, be, "kla_state_write F32 KV", kla_error_detail(ctx));

    /* T steps both ways */
    int same = 1, rc = 0;
    for (int t = 0; t < T; t++) {
        const size_t oq = (size_t)t * N * H * K, ov = (size_t)t * N * HV * V, og = (size_t)t * N * HV;
        KlaTensors a = { .q = KLA_F32_IN(q + oq), .k = KLA_F32_IN(k + oq), .v = KLA_F32_IN(v + ov),
                         .g = KLA_F32_IN(g + og), .eta = KLA_F32_IN(eta + og) };
        KlaTensors b = a;
        a.o = KLA_F32_OUT(o_host + ov), a.state = KLA_F64_OUT(S_host);
        b.o = KLA_F32_OUT(o_st + ov);
        rc |= kla_decode(ctx, &s, &opt, &a) | kla_decode_state(ctx, &s, &opt, &b, st);
    }
    for (size_t i = 0; i < (size_t)T * N * HV * V; i++) same &= o_host[i] == o_st[i];
    ok(rc == 0 && same, be, "5 steps of kla_decode_state: o equals kla_decode's, bit for bit",
       kla_error_detail(ctx));
    r = kla_state_read(st, KLA_F64_OUT(S64), KLA_LAYOUT_KV);
    same = r == 0;
    for (size_t i = 0; same && i < NST; i++) same = S64[i] == S_host[i];
    ok(same, be, "and the state read back equals the host state", kla_error_detail(ctx));

    /* layouts and dtypes: read VK F64, write it back VK, read KV F64 */
    r = kla_state_read(st, KLA_F64_OUT(Svk), KLA_LAYOUT_VK) | kla_state_read(st, KLA_F64_OUT(Skv), KLA_LAYOUT_KV);
    int tr = r == 0;
    for (size_t m = 0; tr && m < (size_t)N * HV; m++)
        for (size_t i = 0; tr && i < K; i++)
            for (size_t j = 0; tr && j < V; j++) tr = Svk[(m * V + j) * K + i] == Skv[(m * K + i) * V + j];
    ok(tr, be, "kla_state_read VK is the transpose of KV", kla_error_detail(ctx));
    r = kla_state_write(st, KLA_F64_IN(Svk), KLA_LAYOUT_VK) | kla_state_read(st, KLA_F64_OUT(S64), KLA_LAYOUT_KV);
    same = r == 0;
    for (size_t i = 0; same && i < NST; i++) same = S64[i] == S_host[i];
    ok(same, be, "kla_state_write VK F64 round trip", kla_error_detail(ctx));

    /* bad uses: an error naming the problem, the state untouched */
    KlaTensors b = { .q = KLA_F32_IN(q), .k = KLA_F32_IN(k), .v = KLA_F32_IN(v), .g = KLA_F32_IN(g),
                     .eta = KLA_F32_IN(eta), .o = KLA_F32_OUT(o_st) };
    KlaShape s2 = s;
    s2.B = s2.N = N - 1;
    r = kla_decode_state(ctx, &s2, &opt, &b, st);
    ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "KlaState: holds N=3"), be,
       "shape not matching the state: KLA_EINVAL", kla_error_detail(ctx));
    b.state = KLA_F32_OUT(S_back);
    r = kla_decode_state(ctx, &s, &opt, &b, st);
    ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor state"), be, "t->state given too: KLA_EINVAL",
       kla_error_detail(ctx));
    b.state = (KlaOut){ 0 };
    r = kla_decode_state(other, &s, &opt, &b, st);
    ok(r == KLA_EINVAL && strstr(kla_error_detail(other), "another context"), be,
       "a state of another context: KLA_EINVAL", kla_error_detail(other));
    float *bad = malloc(NST * 4);
    memcpy(bad, h0, NST * 4);
    bad[NST - 2] = NAN;
    r = kla_state_write(st, KLA_F32_IN(bad), KLA_LAYOUT_KV);
    ok(r == KLA_ERANGE && strstr(kla_error_detail(ctx), "NaN at state[2, 3, 15, 6]"), be,
       "kla_state_write with a NaN: KLA_ERANGE naming the element", kla_error_detail(ctx));
    r = kla_state_write(st, (KlaIn){ h0, KLA_I32 }, KLA_LAYOUT_KV);
    ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "dtype"), be, "kla_state_write I32: KLA_EINVAL",
       kla_error_detail(ctx));
    r = kla_state_read(st, KLA_F32_OUT(S_back), (KlaStateLayout)7);
    ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "layout"), be, "bad layout: KLA_EINVAL", kla_error_detail(ctx));
    r = kla_state_read(st, KLA_F64_OUT(S64), KLA_LAYOUT_KV);
    same = r == 0;
    for (size_t i = 0; same && i < NST; i++) same = S64[i] == S_host[i];
    ok(same, be, "after the failed calls the state is unchanged", kla_error_detail(ctx));
    KlaState *z = NULL;
    r = kla_state_new(ctx, N, HV, 0, V, &z);
    ok(r == KLA_EINVAL && !z && strstr(kla_error_detail(ctx), "K = 0"), be, "kla_state_new K = 0: KLA_EINVAL",
       kla_error_detail(ctx));
    free(bad);
    kla_state_free(&st);
    ok(st == NULL, be, "kla_state_free sets NULL", NULL);
    kla_state_free(&st);
end:
    free(q), free(k), free(v), free(g), free(eta), free(h0), free(S_host), free(o_host), free(o_st);
    free(S_back), free(S64), free(Svk), free(Skv);
    kla_close(&other);
    kla_close(&ctx);
}

int main(void)
{
    const char *const *names = kla_backend_list();
    for (int i = 0; names[i]; i++)
        if (kla_backend_available(names[i]) == 1) run_backend(names[i]);
    printf("1..%d\n", n_test);
    return n_fail ? 1 : 0;
}
