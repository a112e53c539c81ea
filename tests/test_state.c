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
    float *o_st = malloc((size_t)T * N * HV * V * 4), *S_back = malloc((NST + 1) * 4); /* one spare */
    double *S64 = malloc(NST * 8), *Svk = malloc(NST * 8), *Skv = malloc(NST * 8);
    for (size_t i = 0; i < NST; i++) S_host[i] = h0[i];

    KlaState *st = NULL;
    int r = kla_state_new(ctx, N, HV, K, V, &st);
    ok(r == 0 && st, be, "kla_state_new", kla_error_detail(ctx));
    if (r) goto end;
    r = kla_state_read(st, KLA_F64_OUT(S64, NST), KLA_LAYOUT_KV);
    int zero = r == 0;
    for (size_t i = 0; zero && i < NST; i++) zero = S64[i] == 0;
    ok(zero, be, "a new state is zero", kla_error_detail(ctx));
    r = kla_state_write(st, KLA_F32_IN(h0, NST), KLA_LAYOUT_KV);
    ok(r == 0, be, "kla_state_write F32 KV", kla_error_detail(ctx));

    /* T steps both ways */
    int same = 1, rc = 0;
    for (int t = 0; t < T; t++) {
        /* token t of the N sequences: [N, H, K], [N, HV, V], [N, HV] slices */
        const size_t oq = (size_t)t * N * H * K, ov = (size_t)t * N * HV * V, og = (size_t)t * N * HV;
        const int64_t nq1 = N * H * K, nv1 = N * HV * V, ng1 = N * HV;
        KlaTensors a = { .q = KLA_F32_IN(q + oq, nq1), .k = KLA_F32_IN(k + oq, nq1), .v = KLA_F32_IN(v + ov, nv1),
                         .g = KLA_F32_IN(g + og, ng1), .eta = KLA_F32_IN(eta + og, ng1) };
        KlaTensors b = a;
        a.o = KLA_F32_OUT(o_host + ov, nv1), a.state = KLA_F64_OUT(S_host, NST);
        b.o = KLA_F32_OUT(o_st + ov, nv1);
        rc |= kla_decode(ctx, &s, &opt, &a) | kla_decode_state(ctx, &s, &opt, &b, st);
    }
    for (size_t i = 0; i < (size_t)T * N * HV * V; i++) same &= o_host[i] == o_st[i];
    ok(rc == 0 && same, be, "5 steps of kla_decode_state: o equals kla_decode's, bit for bit",
       kla_error_detail(ctx));
    r = kla_state_read(st, KLA_F64_OUT(S64, NST), KLA_LAYOUT_KV);
    same = r == 0;
    for (size_t i = 0; same && i < NST; i++) same = S64[i] == S_host[i];
    ok(same, be, "and the state read back equals the host state", kla_error_detail(ctx));

    /* layouts and dtypes: read VK F64, write it back VK, read KV F64 */
    r = kla_state_read(st, KLA_F64_OUT(Svk, NST), KLA_LAYOUT_VK) | kla_state_read(st, KLA_F64_OUT(Skv, NST), KLA_LAYOUT_KV);
    int tr = r == 0;
    for (size_t m = 0; tr && m < (size_t)N * HV; m++)
        for (size_t i = 0; tr && i < K; i++)
            for (size_t j = 0; tr && j < V; j++) tr = Svk[(m * V + j) * K + i] == Skv[(m * K + i) * V + j];
    ok(tr, be, "kla_state_read VK is the transpose of KV", kla_error_detail(ctx));
    r = kla_state_write(st, KLA_F64_IN(Svk, NST), KLA_LAYOUT_VK) | kla_state_read(st, KLA_F64_OUT(S64, NST), KLA_LAYOUT_KV);
    same = r == 0;
    for (size_t i = 0; same && i < NST; i++) same = S64[i] == S_host[i];
    ok(same, be, "kla_state_write VK F64 round trip", kla_error_detail(ctx));

    /* bad uses: an error naming the problem, the state untouched */
    /* the first token's slices */
    const int64_t nq1 = N * H * K, nv1 = N * HV * V, ng1 = N * HV;
    KlaTensors b = { .q = KLA_F32_IN(q, nq1), .k = KLA_F32_IN(k, nq1), .v = KLA_F32_IN(v, nv1), .g = KLA_F32_IN(g, ng1),
                     .eta = KLA_F32_IN(eta, ng1), .o = KLA_F32_OUT(o_st, nv1) };
    KlaShape s2 = s;
    s2.B = s2.N = N - 1;
    KlaTensors b2 = b; /* the counts of N - 1 sequences, so that only the state mismatches */
    b2.q.numel = b2.k.numel = (N - 1) * H * K, b2.v.numel = b2.o.numel = (N - 1) * HV * V;
    b2.g.numel = b2.eta.numel = (N - 1) * HV;
    r = kla_decode_state(ctx, &s2, &opt, &b2, st);
    ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "KlaState: holds N=3"), be,
       "shape not matching the state: KLA_EINVAL", kla_error_detail(ctx));
    b.state = KLA_F32_OUT(S_back, NST);
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
    r = kla_state_write(st, KLA_F32_IN(bad, NST), KLA_LAYOUT_KV);
    ok(r == KLA_ERANGE && strstr(kla_error_detail(ctx), "NaN at state[2, 3, 15, 6]"), be,
       "kla_state_write with a NaN: KLA_ERANGE naming the element", kla_error_detail(ctx));
    r = kla_state_write(st, KLA_IN(h0, KLA_I32, NST), KLA_LAYOUT_KV);
    ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "dtype"), be, "kla_state_write I32: KLA_EINVAL",
       kla_error_detail(ctx));
    r = kla_state_read(st, KLA_F32_OUT(S_back, NST), (KlaStateLayout)7);
    ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "layout"), be, "bad layout: KLA_EINVAL", kla_error_detail(ctx));
    /* element counts: the state's own, and a decode tensor's */
    {
        const int64_t wrong[] = { (int64_t)NST - 1, (int64_t)NST + 1, 0, -1 };
        int okw = 1, okr = 1;
        char ww[300] = "", wr[300] = "";
        for (size_t w = 0; w < sizeof wrong / sizeof wrong[0]; w++) {
            for (int vk = 0; vk < 2; vk++) {
                const char *dims = vk ? "[N, HV, V, K] = [3, 4, 8, 16]" : "[N, HV, K, V] = [3, 4, 16, 8]";
                const KlaStateLayout L = vk ? KLA_LAYOUT_VK : KLA_LAYOUT_KV;
                r = kla_state_write(st, KLA_F32_IN(h0, wrong[w]), L);
                if (!(r == KLA_EINVAL && strstr(kla_error_detail(ctx), dims)) && okw)
                    okw = 0, snprintf(ww, sizeof ww, "write numel %lld: %d \"%s\"", (long long)wrong[w], r, kla_error_detail(ctx));
                for (size_t i = 0; i <= NST; i++) S_back[i] = 1234.5f;
                r = kla_state_read(st, KLA_F32_OUT(S_back, wrong[w]), L);
                int untouched = 1;
                for (size_t i = 0; i <= NST; i++) untouched &= S_back[i] == 1234.5f;
                if (!(r == KLA_EINVAL && strstr(kla_error_detail(ctx), dims) && untouched) && okr)
                    okr = 0, snprintf(wr, sizeof wr, "read numel %lld: %d \"%s\"%s", (long long)wrong[w], r,
                                      kla_error_detail(ctx), untouched ? "" : ", dst written");
            }
        }
        ok(okw, be, "kla_state_write with NST -+ 1, 0, -1 elements (KV and VK): KLA_EINVAL naming the shape", ww);
        ok(okr, be, "kla_state_read with NST -+ 1, 0, -1 elements (KV and VK): KLA_EINVAL naming the shape, dst untouched", wr);
        KlaTensors bq = b;
        bq.q.numel = nq1 - 1;
        r = kla_decode_state(ctx, &s, &opt, &bq, st);
        ok(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor q: ") && strstr(kla_error_detail(ctx), "[N, H, K] = [3, 2, 16]"),
           be, "kla_decode_state with q one element short: KLA_EINVAL naming q [N, H, K]", kla_error_detail(ctx));
    }
    r = kla_state_read(st, KLA_F64_OUT(S64, NST), KLA_LAYOUT_KV);
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
