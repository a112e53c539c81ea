/*
 * test_ref.c: the reference checked against itself and against mathematics, through the
 * public API, on one flat list of named cases (TAP output).
 *
 *   - ref (float32) against ref64; recurrent against chunk for every chunk size;
 *   - backward: every gradient, both algorithms, against ref64 recurrent;
 *   - decode step by step against forward;
 *   - every gradient of ref64 against float64 central finite differences (small cases);
 *   - the exact-projection property (eta = 1, eps = 0: k_t^T S_t = v_t^T);
 *   - the worked example of the spec (section 6);
 *   - bad arguments: the error code, a message naming the tensor, outputs untouched.
 *
 * Usage: test_ref [--seed N] [--case NAME]. The seed is printed; a failure replays with it.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"

/* ---- TAP --------------------------------------------------------------------------- */
static int n_test, n_fail;

static void check(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", ok ? "ok" : "not ok", ++n_test);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!ok) n_fail++;
    fflush(stdout);
}

/* ---- random numbers: xorshift64*, so a seed replays anywhere ------------------------------ */
static uint64_t rng_state;
static double urand(void) /* [0, 1) */
{
    rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}
static double nrand(void)
{
    double u = urand() + 1e-300, v = urand();
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}
/* values exactly representable in float32, so both references see the same inputs */
static double f32(double x) { return (double)(float)x; }

/* ---- the cases ----------------------------------------------------------------------- */
typedef struct tcase {
    const char *name;
    int B, T, H, HV, K, V;
    int mode;          /* KLA_MODE_KLA or KLA_MODE_GDN */
    int nseq;          /* > 0: cu_seqlens with these lengths (B = 1) */
    int lens[6];
    int has_g, has_h0, has_dht, vk, l2q, l2k;
    int eta_one;       /* eta = 1 */
    int fd;            /* also check gradients by finite differences */
} tcase;

static const tcase cases[] = {
    /* name                  B   T  H HV  K   V  mode        nseq lens          g h0 dht vk l2q l2k eta1 fd */
    { "kla_basic",           2, 37, 2, 2,  8,  6, KLA_MODE_KLA, 0, {0},          1, 0, 0, 0, 0, 0, 0, 1 },
    { "gdn_basic",           2, 37, 2, 2,  8,  6, KLA_MODE_GDN, 0, {0},          1, 0, 0, 0, 0, 0, 0, 1 },
    { "deltanet_g0",         1, 40, 1, 1,  6,  5, KLA_MODE_GDN, 0, {0},          0, 0, 0, 0, 0, 0, 0, 1 },
    { "grouped_heads",       1, 45, 2, 6,  8,  4, KLA_MODE_KLA, 0, {0},          1, 1, 1, 0, 0, 0, 0, 1 },
    { "varlen",              1, 96, 2, 4,  8,  8, KLA_MODE_KLA, 4, {1, 70, 5, 20}, 1, 1, 1, 0, 0, 0, 0, 0 },
    { "varlen_small_fd",     1, 12, 1, 2,  4,  3, KLA_MODE_GDN, 3, {1, 9, 2},    1, 1, 1, 0, 1, 1, 0, 1 },
    { "h0_dht",              2, 33, 1, 1,  8,  8, KLA_MODE_KLA, 0, {0},          1, 1, 1, 0, 0, 0, 0, 1 },
    { "state_vk",            2, 29, 2, 2,  8,  4, KLA_MODE_KLA, 0, {0},          1, 1, 1, 1, 0, 0, 0, 1 },
    { "l2norm_q",            1, 50, 2, 2, 16,  8, KLA_MODE_KLA, 0, {0},          1, 0, 0, 0, 1, 0, 0, 1 },
    { "l2norm_qk_gdn",       1, 50, 2, 4, 16,  8, KLA_MODE_GDN, 0, {0},          1, 1, 0, 0, 1, 1, 0, 1 },
    { "l2norm_qk_kla",       1, 30, 1, 1,  8,  8, KLA_MODE_KLA, 0, {0},          1, 1, 1, 0, 1, 1, 0, 1 },
    { "T1",                  3,  1, 1, 2,  4,  3, KLA_MODE_KLA, 0, {0},          1, 1, 1, 0, 0, 0, 0, 1 },
    { "T1_eta1",             1,  1, 1, 1,  5,  2, KLA_MODE_KLA, 0, {0},          0, 0, 0, 0, 0, 0, 1, 1 },
    { "T_not_multiple",      1, 131, 1, 1, 8,  8, KLA_MODE_KLA, 0, {0},          1, 1, 1, 0, 1, 0, 0, 0 },
    { "K_ne_V",              1, 70, 1, 1, 12, 20, KLA_MODE_GDN, 0, {0},          1, 0, 1, 0, 0, 0, 0, 0 },
    { "eta_one",             1, 64, 1, 1,  8,  8, KLA_MODE_KLA, 0, {0},          1, 0, 0, 0, 1, 0, 1, 0 },
    { "paper_K96_V192",      1, 80, 1, 1, 96, 192, KLA_MODE_KLA, 0, {0},         1, 1, 1, 0, 1, 0, 0, 0 },
};
#define NCASES ((int)(sizeof cases / sizeof cases[0]))

/* One case's tensors, all float64 (values representable in float32 for inputs). */
typedef struct data {
    KlaShape s;
    KlaOptions o;
    int64_t nq, nv, ns, nst;
    double *q, *k, *v, *g, *a, *h0, *dout, *dht;
    int32_t cu[8];
} data;

static double *rnd_array(int64_t n, double lo, double hi, int normal)
{
    double *x = malloc((size_t)n * sizeof *x);
    for (int64_t i = 0; i < n; i++) x[i] = f32(normal ? nrand() * hi : lo + (hi - lo) * urand());
    return x;
}

static void make_data(const tcase *c, data *d)
{
    memset(d, 0, sizeof *d);
    d->s = (KlaShape){ c->B, c->T, c->H, c->HV, c->K, c->V, c->nseq };
    kla_default_options(&d->o);
    d->o.mode = c->mode;
    d->o.l2norm_q = c->l2q, d->o.l2norm_k = c->l2k;
    d->o.state_layout = c->vk ? KLA_LAYOUT_VK : KLA_LAYOUT_KV;
    if (c->eta_one) d->o.eps = 0;
    const int64_t N = c->nseq ? c->nseq : c->B, BT = (int64_t)c->B * c->T;
    d->nq = BT * c->H * c->K, d->nv = BT * c->HV * c->V, d->ns = BT * c->HV;
    d->nst = N * c->HV * c->K * c->V;
    d->q = rnd_array(d->nq, 0, 1, 1);
    /* keys: unit-ish norm, so GDN's beta in (0, 1) is a contraction */
    d->k = rnd_array(d->nq, 0, c->l2k ? 1.0 : 1.0 / sqrt(c->K), 1);
    d->v = rnd_array(d->nv, 0, 1, 1);
    if (c->has_g) {
        d->g = malloc((size_t)d->ns * sizeof(double));
        for (int64_t i = 0; i < d->ns; i++) d->g[i] = f32(log(1 / (1 + exp(-(nrand() + 2))))); /* log sigmoid */
    }
    d->a = rnd_array(d->ns, c->mode == KLA_MODE_KLA ? 0.1 : 0.05, c->mode == KLA_MODE_KLA ? 1.5 : 0.95, 0);
    if (c->eta_one)
        for (int64_t i = 0; i < d->ns; i++) d->a[i] = 1;
    if (c->has_h0) d->h0 = rnd_array(d->nst, 0, 0.5, 1);
    d->dout = rnd_array(d->nv, 0, 1, 1);
    if (c->has_dht) d->dht = rnd_array(d->nst, 0, 1, 1);
    if (c->nseq) {
        d->cu[0] = 0;
        for (int i = 0; i < c->nseq; i++) d->cu[i + 1] = d->cu[i] + c->lens[i];
    }
}

static void free_data(data *d)
{
    free(d->q), free(d->k), free(d->v), free(d->g), free(d->a), free(d->h0), free(d->dout), free(d->dht);
}

/* Outputs of one run, float64. */
typedef struct result {
    double *o, *ht, *dq, *dk, *dv, *dg, *da, *dh0;
} result;

static void free_result(result *r)
{
    free(r->o), free(r->ht), free(r->dq), free(r->dk), free(r->dv), free(r->dg), free(r->da), free(r->dh0);
    memset(r, 0, sizeof *r);
}

static KlaIn in64(const double *x) { return (KlaIn){ x, KLA_F64 }; }

static KlaTensors tensors_of(const data *d)
{
    KlaTensors t = { 0 };
    t.q = in64(d->q), t.k = in64(d->k), t.v = in64(d->v), t.g = in64(d->g), t.h0 = in64(d->h0);
    if (d->o.mode == KLA_MODE_KLA) t.eta = in64(d->a);
    else t.beta = in64(d->a);
    if (d->s.N) t.cu_seqlens = (KlaIn){ d->cu, KLA_I32 };
    return t;
}

static KlaContext *open_backend(const char *name)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = name;
    KlaContext *ctx = NULL;
    int r = kla_open(&ctx, &p);
    if (r < 0) {
        fprintf(stderr, "cannot open backend %s: %s\n", name, kla_strerror(r));
        exit(2);
    }
    return ctx;
}

/* forward (backward when bwd) of data d, float64 buffers (the glue converts for ref) */
static int run(KlaContext *ctx, const data *d, int algo, int chunk, int bwd, result *res)
{
    KlaOptions o = d->o;
    o.algo = algo, o.chunk_size = chunk;
    KlaTensors t = tensors_of(d);
    memset(res, 0, sizeof *res);
    res->o = calloc((size_t)d->nv, sizeof(double));
    res->ht = calloc((size_t)d->nst, sizeof(double));
    t.o = KLA_F64_OUT(res->o), t.ht = KLA_F64_OUT(res->ht);
    if (bwd) {
        res->dq = calloc((size_t)d->nq, 8), res->dk = calloc((size_t)d->nq, 8);
        res->dv = calloc((size_t)d->nv, 8), res->dg = calloc((size_t)d->ns, 8);
        res->da = calloc((size_t)d->ns, 8), res->dh0 = calloc((size_t)d->nst, 8);
        t.dout = in64(d->dout), t.dht = in64(d->dht);
        t.dq = KLA_F64_OUT(res->dq), t.dk = KLA_F64_OUT(res->dk), t.dv = KLA_F64_OUT(res->dv);
        t.dg = KLA_F64_OUT(res->dg), t.dh0 = KLA_F64_OUT(res->dh0);
        if (o.mode == KLA_MODE_KLA) t.deta = KLA_F64_OUT(res->da);
        else t.dbeta = KLA_F64_OUT(res->da);
        return kla_backward(ctx, &d->s, &o, &t);
    }
    return kla_forward(ctx, &d->s, &o, &t);
}

static double rel_rmse(const double *ref, const double *got, int64_t n)
{
    double e = 0, r = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        e += (ref[i] - got[i]) * (ref[i] - got[i]), r += ref[i] * ref[i];
    }
    return r > 0 ? sqrt(e / r) : sqrt(e / (double)n);
}

/* worst rel RMSE over the outputs (and gradients when bwd); names the worst tensor */
static double compare(const data *d, const result *ref, const result *got, int bwd, const char **worst)
{
    const char *names[] = { "o", "ht", "dq", "dk", "dv", "dg", "deta/dbeta", "dh0" };
    const double *R[] = { ref->o, ref->ht, ref->dq, ref->dk, ref->dv, ref->dg, ref->da, ref->dh0 };
    const double *G[] = { got->o, got->ht, got->dq, got->dk, got->dv, got->dg, got->da, got->dh0 };
    const int64_t n[] = { d->nv, d->nst, d->nq, d->nq, d->nv, d->ns, d->ns, d->nst };
    double w = 0;
    *worst = "o";
    for (int i = 0; i < (bwd ? 8 : 2); i++) {
        if (i == 7 && !d->h0 && !d->dht) continue;
        double e = rel_rmse(R[i], G[i], n[i]);
        if (!(e <= w)) w = e, *worst = names[i];
    }
    return w;
}

/* ---- the checks of one case ---------------------------------------------------------- */

static void check_case(const tcase *c, KlaContext *ref, KlaContext *ref64)
{
    data d;
    make_data(c, &d);
    const char *w;
    result base, r;

    /* forward: ref64 recurrent is the baseline */
    int e = run(ref64, &d, KLA_ALGO_RECURRENT, 64, 0, &base);
    check(e == 0, "%s: ref64 recurrent forward runs (%s)", c->name, e ? kla_error_detail(ref64) : "");
    for (int C = 16; C <= 128; C *= 2) {
        e = run(ref64, &d, KLA_ALGO_CHUNK, C, 0, &r);
        double err = compare(&d, &base, &r, 0, &w);
        check(e == 0 && err <= 1e-12, "%s: ref64 chunk %d forward = recurrent (rel %.1e in %s)", c->name, C, err, w);
        free_result(&r);
    }
    for (int algo = KLA_ALGO_RECURRENT; algo <= KLA_ALGO_CHUNK; algo++) {
        e = run(ref, &d, algo, 32, 0, &r);
        double err = compare(&d, &base, &r, 0, &w);
        check(e == 0 && err <= 1e-5, "%s: ref %s forward vs ref64 (rel %.1e in %s)", c->name,
              algo == KLA_ALGO_CHUNK ? "chunk" : "recurrent", err, w);
        free_result(&r);
    }
    free_result(&base);

    /* backward: ref64 recurrent is the baseline */
    e = run(ref64, &d, KLA_ALGO_RECURRENT, 64, 1, &base);
    check(e == 0, "%s: ref64 recurrent backward runs", c->name);
    for (int C = 16; C <= 128; C *= 2) {
        e = run(ref64, &d, KLA_ALGO_CHUNK, C, 1, &r);
        double err = compare(&d, &base, &r, 1, &w);
        check(e == 0 && err <= 1e-11, "%s: ref64 chunk %d backward = recurrent (rel %.1e in %s)", c->name, C, err, w);
        free_result(&r);
    }
    for (int algo = KLA_ALGO_RECURRENT; algo <= KLA_ALGO_CHUNK; algo++) {
        e = run(ref, &d, algo, 64, 1, &r);
        double err = compare(&d, &base, &r, 1, &w);
        check(e == 0 && err <= 1e-4, "%s: ref %s backward vs ref64 (rel %.1e in %s)", c->name,
              algo == KLA_ALGO_CHUNK ? "chunk" : "recurrent", err, w);
        free_result(&r);
    }

    /* decode: token by token with the state held here equals the forward pass */
    {
        const int64_t N = c->nseq ? c->nseq : c->B, H = c->H, HV = c->HV, K = c->K, V = c->V;
        double *state = calloc((size_t)d.nst, 8), *o = calloc((size_t)d.nv, 8);
        if (d.h0) memcpy(state, d.h0, (size_t)d.nst * 8);
        double *q1 = malloc((size_t)(H * K) * 8), *k1 = malloc((size_t)(H * K) * 8);
        double *v1 = malloc((size_t)(HV * V) * 8), *g1 = malloc((size_t)HV * 8), *a1 = malloc((size_t)HV * 8);
        int ok = 1;
        for (int64_t n = 0; n < N && ok; n++) {
            const int64_t t0 = c->nseq ? d.cu[n] : n * c->T, t1 = c->nseq ? d.cu[n + 1] : (n + 1) * c->T;
            for (int64_t t = t0; t < t1 && ok; t++) {
                memcpy(q1, d.q + t * H * K, (size_t)(H * K) * 8), memcpy(k1, d.k + t * H * K, (size_t)(H * K) * 8);
                memcpy(v1, d.v + t * HV * V, (size_t)(HV * V) * 8), memcpy(a1, d.a + t * HV, (size_t)HV * 8);
                for (int64_t hv = 0; hv < HV; hv++) g1[hv] = d.g ? d.g[t * HV + hv] : 0;
                KlaShape s1 = { 1, 1, H, HV, K, V, 0 };
                KlaTensors t1s = { 0 };
                t1s.q = in64(q1), t1s.k = in64(k1), t1s.v = in64(v1), t1s.g = in64(g1);
                if (d.o.mode == KLA_MODE_KLA) t1s.eta = in64(a1);
                else t1s.beta = in64(a1);
                t1s.state = KLA_F64_OUT(state + n * HV * K * V);
                t1s.o = KLA_F64_OUT(o + t * HV * V);
                ok = kla_decode(ref64, &s1, &d.o, &t1s) == 0;
            }
        }
        result rd = { .o = o, .ht = state };
        e = run(ref64, &d, KLA_ALGO_RECURRENT, 64, 0, &r);
        double err = compare(&d, &r, &rd, 0, &w);
        check(ok && e == 0 && err <= 1e-14, "%s: ref64 decode = forward (rel %.1e in %s)", c->name, err, w);
        free_result(&r);
        free(state), free(o), free(q1), free(k1), free(v1), free(g1), free(a1);
    }

    /* finite differences: L = sum(do * o) + sum(dht * ht) in float64 */
    if (c->fd) {
        double *ins[] = { d.q, d.k, d.v, d.g, d.a, d.h0 };
        double *grads[] = { base.dq, base.dk, base.dv, base.dg, base.da, base.dh0 };
        const int64_t n[] = { d.nq, d.nq, d.nv, d.ns, d.ns, d.nst };
        const char *names[] = { "dq", "dk", "dv", "dg", c->mode == KLA_MODE_KLA ? "deta" : "dbeta", "dh0" };
        for (int i = 0; i < 6; i++) {
            if (!ins[i]) continue;
            double worst = 0;
            int samples = n[i] < 12 ? (int)n[i] : 12;
            for (int s = 0; s < samples; s++) {
                const int64_t j = samples == n[i] ? s : (int64_t)(urand() * (double)n[i]);
                const double x0 = ins[i][j];
                double h = 1e-5 * (fabs(x0) > 1 ? fabs(x0) : 1);
                if (i == 3 && h > -x0 / 2) h = -x0 / 2; /* g stays in its domain g <= 0 */
                double L[2];
                for (int side = 0; side < 2; side++) {
                    ins[i][j] = x0 + (side ? -h : h);
                    result rr;
                    run(ref64, &d, KLA_ALGO_RECURRENT, 64, 0, &rr);
                    L[side] = 0;
                    for (int64_t m = 0; m < d.nv; m++) L[side] += d.dout[m] * rr.o[m];
                    if (d.dht) /* dht and ht share the caller's layout */
                        for (int64_t m = 0; m < d.nst; m++) L[side] += d.dht[m] * rr.ht[m];
                    free_result(&rr);
                }
                const double fd = (L[0] - L[1]) / (2 * h);
                ins[i][j] = x0;
                const double err = fabs(fd - grads[i][j]) / (fabs(fd) + 1e-2);
                if (err > worst) worst = err;
            }
            check(worst <= 1e-6, "%s: %s matches float64 finite differences (rel %.1e)", c->name, names[i], worst);
        }
    }
    free_result(&base);
    free_data(&d);
}

/* ---- the exact-projection property ------------------------------------------------------- */

static void check_projection(KlaContext *ref64)
{
    /* eta = 1, eps = 0: after each token k_t^T S_t = v_t^T, whatever the decay and the state */
    const int K = 6, V = 5, T = 40;
    double S[6 * 5], q[6], k[6], v[5], g[1], eta[1] = { 1 }, o[5];
    for (int i = 0; i < K * V; i++) S[i] = nrand();
    KlaOptions opt;
    kla_default_options(&opt);
    opt.eps = 0;
    KlaShape s = { 1, 1, 1, 1, K, V, 0 };
    double worst = 0;
    int ok = 1;
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < K; i++) q[i] = nrand(), k[i] = nrand() * (t % 3 ? 1 : 10);
        for (int j = 0; j < V; j++) v[j] = nrand();
        g[0] = -urand();
        KlaTensors tt = { 0 };
        tt.q = in64(q), tt.k = in64(k), tt.v = in64(v), tt.g = in64(g), tt.eta = in64(eta);
        tt.state = KLA_F64_OUT(S), tt.o = KLA_F64_OUT(o);
        ok &= kla_decode(ref64, &s, &opt, &tt) == 0;
        for (int j = 0; j < V; j++) {
            double kS = 0;
            for (int i = 0; i < K; i++) kS += k[i] * S[i * V + j];
            if (fabs(kS - v[j]) > worst) worst = fabs(kS - v[j]);
        }
    }
    check(ok && worst < 1e-12, "projection: eta = 1 gives k_t^T S_t = v_t^T exactly (max err %.1e)", worst);
}

/* ---- the worked example of kla-spec.md section 6 ----------------------------------------- */

static void check_spec_example(KlaContext *ctx, const char *name, double tol)
{
    const double q[] = { 1, 1, 1, 0 }, k[] = { 2, 0, 1, 1 }, v[] = { 3, 1 };
    const double g[] = { 0, log(0.5) }, eta[] = { 1, 0.5 };
    KlaShape s = { 1, 2, 1, 1, 2, 1, 0 };
    KlaOptions opt;
    kla_default_options(&opt);
    opt.scale = 1, opt.eps = 0;
    for (int algo = KLA_ALGO_RECURRENT; algo <= KLA_ALGO_CHUNK; algo++) {
        double o[2] = { 0 }, ht[2] = { 0 };
        KlaTensors t = { 0 };
        t.q = in64(q), t.k = in64(k), t.v = in64(v), t.g = in64(g), t.eta = in64(eta);
        t.o = KLA_F64_OUT(o), t.ht = KLA_F64_OUT(ht);
        opt.algo = algo;
        int e = kla_forward(ctx, &s, &opt, &t);
        double err = fabs(o[0] - 1.5) + fabs(o[1] - 0.8125) + fabs(ht[0] - 0.8125) + fabs(ht[1] - 0.0625);
        check(e == 0 && err <= tol, "spec example: %s %s gives o = [1.5, 0.8125], ht = [0.8125, 0.0625] (err %.1e)",
              name, algo == KLA_ALGO_CHUNK ? "chunk" : "recurrent", err);
    }
}

/* ---- bad arguments ------------------------------------------------------------------------ */

static void check_errors(KlaContext *ctx)
{
    enum { B = 1, T = 4, H = 1, HV = 2, K = 3, V = 2 };
    float q[B * T * H * K], k[B * T * H * K], v[B * T * HV * V], g[B * T * HV], eta[B * T * HV];
    float o[B * T * HV * V];
    for (int i = 0; i < B * T * H * K; i++) q[i] = 0.5f, k[i] = 0.25f;
    for (int i = 0; i < B * T * HV * V; i++) v[i] = 1;
    for (int i = 0; i < B * T * HV; i++) g[i] = -0.1f, eta[i] = 1;
    const KlaShape good = { B, T, H, HV, K, V, 0 };
    KlaOptions opt;
    kla_default_options(&opt);

    struct {
        const char *what, *expect;
        int err;
    } want[] = {
        { "g > 0", "tensor g: value", KLA_ERANGE },
        { "NaN in k", "tensor k: NaN", KLA_ERANGE },
        { "Inf in v", "tensor v: Inf", KLA_ERANGE },
        { "HV not a multiple of H", "not a multiple", KLA_EINVAL },
        { "missing eta", "tensor eta: missing", KLA_EINVAL },
        { "beta in mode kla", "tensor beta: not allowed", KLA_EINVAL },
        { "K = 0", "K = 0", KLA_EINVAL },
        { "chunk size 48", "chunk size 48", KLA_EINVAL },
        { "negative eps", "eps", KLA_EINVAL },
        { "cu_seqlens decreasing", "not increasing", KLA_ERANGE },
        { "cu_seqlens not ending at T", "must end at T", KLA_ERANGE },
        { "cu_seqlens with B = 2", "needs B = 1", KLA_EINVAL },
        { "wrong dtype of q", "tensor q: dtype", KLA_EINVAL },
        { "huge shape", "overflow", KLA_ENOMEM },
    };
    for (size_t c = 0; c < sizeof want / sizeof want[0]; c++) {
        KlaShape s = good;
        KlaOptions op = opt;
        float qq[sizeof q / 4], kk[sizeof k / 4], vv[sizeof v / 4], gg[sizeof g / 4];
        memcpy(qq, q, sizeof q), memcpy(kk, k, sizeof k), memcpy(vv, v, sizeof v), memcpy(gg, g, sizeof g);
        int32_t cu_dec[] = { 0, 3, 2, 4 }, cu_short[] = { 0, 2, 3 };
        KlaTensors t = { 0 };
        t.q = KLA_F32_IN(qq), t.k = KLA_F32_IN(kk), t.v = KLA_F32_IN(vv), t.g = KLA_F32_IN(gg);
        t.eta = KLA_F32_IN(eta), t.o = KLA_F32_OUT(o);
        switch (c) {
        case 0: gg[5] = 0.5f; break;
        case 1: kk[2] = NAN; break;
        case 2: vv[3] = INFINITY; break;
        case 3: s.H = 2, s.HV = 3; break;
        case 4: t.eta.data = NULL; break;
        case 5: t.beta = KLA_F32_IN(eta); break;
        case 6: s.K = 0; break;
        case 7: op.chunk_size = 48; break;
        case 8: op.eps = -1; break;
        case 9: s.N = 3, t.cu_seqlens = (KlaIn){ cu_dec, KLA_I32 }; break;
        case 10: s.N = 2, t.cu_seqlens = (KlaIn){ cu_short, KLA_I32 }; break;
        case 11: s.B = 2, s.T = 2, s.N = 2, t.cu_seqlens = (KlaIn){ cu_short, KLA_I32 }; break;
        case 12: t.q.dtype = KLA_I32; break;
        case 13: s.T = (int64_t)1 << 40, s.K = (int64_t)1 << 30; break;
        }
        for (size_t i = 0; i < sizeof o / 4; i++) o[i] = 42;
        float before[sizeof q / 4];
        memcpy(before, qq, sizeof qq);
        int e = kla_forward(ctx, &s, &op, &t);
        int untouched = 1;
        for (size_t i = 0; i < sizeof o / 4; i++) untouched &= o[i] == 42;
        untouched &= !memcmp(before, qq, sizeof qq);
        const char *msg = kla_error_detail(ctx);
        check(e == want[c].err && strstr(msg, want[c].expect) && untouched,
              "bad input: %s -> %s (\"%s\")", want[c].what, kla_strerror(e), msg);
    }
    /* a good call after the bad ones works, and the inputs are not modified */
    float qc[sizeof q / 4];
    memcpy(qc, q, sizeof q);
    KlaTensors t = { 0 };
    t.q = KLA_F32_IN(q), t.k = KLA_F32_IN(k), t.v = KLA_F32_IN(v), t.g = KLA_F32_IN(g);
    t.eta = KLA_F32_IN(eta), t.o = KLA_F32_OUT(o);
    int e = kla_forward(ctx, &good, &opt, &t);
    check(e == 0 && !memcmp(qc, q, sizeof q), "good input after bad: runs, inputs unmodified");

    KlaParams p;
    kla_default_params(&p);
    p.backend = "no-such-backend";
    KlaContext *bad = (KlaContext *)&p;
    check(kla_open(&bad, &p) == KLA_ENOSYS && bad == NULL &&
              strstr(kla_error_detail(NULL), "\"no-such-backend\" is not built"),
          "unknown backend -> KLA_ENOSYS, NULL context, kla_error_detail(NULL) says why");
}

int main(int argc, char **argv)
{
    uint64_t seed = 20261123;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--case") && i + 1 < argc) only = argv[++i];
        else {
            fprintf(stderr, "usage: test_ref [--seed N] [--case NAME]\n");
            return 2;
        }
    }
    printf("# seed %llu (replay: test_ref --seed %llu)\n", (unsigned long long)seed, (unsigned long long)seed);
    rng_state = seed ? seed : 1;

    KlaContext *ref = open_backend("ref"), *ref64 = open_backend("ref64");
    check_spec_example(ref64, "ref64", 1e-15);
    check_spec_example(ref, "ref", 1e-6);
    check_projection(ref64);
    for (int i = 0; i < NCASES; i++)
        if (!only || !strcmp(only, cases[i].name)) check_case(&cases[i], ref, ref64);
    check_errors(ref);
    kla_close(&ref), kla_close(&ref64);
    printf("1..%d\n", n_test);
    printf("# %d passed, %d failed\n", n_test - n_fail, n_fail);
    return n_fail ? 1 : 0;
}
