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
 *   - bad arguments: the error code, a message naming the tensor, outputs untouched;
 *   - the 0.2 contract on ref, ref64 and simd (when usable): every tensor's element count
 *     (one too few or too many, 0, -1, INT64_MAX; a scalar eta), overlapping outputs,
 *     KlaState counts, KLA_SCALE_DEFAULT and scale = 0, KLA_ERANGE for non-finite results
 *     from finite inputs (the token named), kla_last_algo, kla_describe,
 *     kla_cpu_mask_parse and KLA_CPU_MASK, KLA_EBUSY from two threads on one context.
 *
 * Usage: test_ref [--seed N] [--case NAME]. The seed is printed; a failure replays with it.
 * --case contract runs the contract checks without the named cases.
 */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kla.h"

#include "tap.h"

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
    int64_t ncu; /* entries of cu in use: nseq + 1 */
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
        d->ncu = c->nseq + 1;
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

/* a float64 input of n elements (absent when x is NULL) */
static KlaIn in64(const double *x, int64_t n) { return KLA_F64_IN(x, n); }
#define NELEM(a) ((int64_t)(sizeof(a) / sizeof((a)[0])))

static KlaTensors tensors_of(const data *d)
{
    KlaTensors t = { 0 };
    t.q = in64(d->q, d->nq), t.k = in64(d->k, d->nq), t.v = in64(d->v, d->nv), t.g = in64(d->g, d->ns);
    t.h0 = in64(d->h0, d->nst);
    if (d->o.mode == KLA_MODE_KLA) t.eta = in64(d->a, d->ns);
    else t.beta = in64(d->a, d->ns);
    if (d->s.N) t.cu_seqlens = KLA_IN(d->cu, KLA_I32, d->ncu);
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
    t.o = KLA_F64_OUT(res->o, d->nv), t.ht = KLA_F64_OUT(res->ht, d->nst);
    if (bwd) {
        res->dq = calloc((size_t)d->nq, 8), res->dk = calloc((size_t)d->nq, 8);
        res->dv = calloc((size_t)d->nv, 8), res->dg = calloc((size_t)d->ns, 8);
        res->da = calloc((size_t)d->ns, 8), res->dh0 = calloc((size_t)d->nst, 8);
        t.dout = in64(d->dout, d->nv), t.dht = in64(d->dht, d->nst);
        t.dq = KLA_F64_OUT(res->dq, d->nq), t.dk = KLA_F64_OUT(res->dk, d->nq), t.dv = KLA_F64_OUT(res->dv, d->nv);
        t.dg = KLA_F64_OUT(res->dg, d->ns), t.dh0 = KLA_F64_OUT(res->dh0, d->nst);
        if (o.mode == KLA_MODE_KLA) t.deta = KLA_F64_OUT(res->da, d->ns);
        else t.dbeta = KLA_F64_OUT(res->da, d->ns);
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
                t1s.q = in64(q1, H * K), t1s.k = in64(k1, H * K), t1s.v = in64(v1, HV * V), t1s.g = in64(g1, HV);
                if (d.o.mode == KLA_MODE_KLA) t1s.eta = in64(a1, HV);
                else t1s.beta = in64(a1, HV);
                t1s.state = KLA_F64_OUT(state + n * HV * K * V, HV * K * V); /* sequence n's state */
                t1s.o = KLA_F64_OUT(o + t * HV * V, HV * V);                /* token t's outputs */
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
        tt.q = in64(q, NELEM(q)), tt.k = in64(k, NELEM(k)), tt.v = in64(v, NELEM(v)), tt.g = in64(g, NELEM(g));
        tt.eta = in64(eta, NELEM(eta));
        tt.state = KLA_F64_OUT(S, NELEM(S)), tt.o = KLA_F64_OUT(o, NELEM(o));
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
        t.q = in64(q, NELEM(q)), t.k = in64(k, NELEM(k)), t.v = in64(v, NELEM(v)), t.g = in64(g, NELEM(g));
        t.eta = in64(eta, NELEM(eta));
        t.o = KLA_F64_OUT(o, NELEM(o)), t.ht = KLA_F64_OUT(ht, NELEM(ht));
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
        t.q = KLA_F32_IN(qq, NELEM(qq)), t.k = KLA_F32_IN(kk, NELEM(kk)), t.v = KLA_F32_IN(vv, NELEM(vv));
        t.g = KLA_F32_IN(gg, NELEM(gg)), t.eta = KLA_F32_IN(eta, NELEM(eta)), t.o = KLA_F32_OUT(o, NELEM(o));
        switch (c) {
        case 0: gg[5] = 0.5f; break;
        case 1: kk[2] = NAN; break;
        case 2: vv[3] = INFINITY; break;
        case 3: s.H = 2, s.HV = 3; break;
        case 4: t.eta.data = NULL; break;
        case 5: t.beta = KLA_F32_IN(eta, NELEM(eta)); break;
        case 6: s.K = 0; break;
        case 7: op.chunk_size = 48; break;
        case 8: op.eps = -1; break;
        case 9: s.N = 3, t.cu_seqlens = KLA_IN(cu_dec, KLA_I32, NELEM(cu_dec)); break;
        case 10: s.N = 2, t.cu_seqlens = KLA_IN(cu_short, KLA_I32, NELEM(cu_short)); break;
        case 11: s.B = 2, s.T = 2, s.N = 2, t.cu_seqlens = KLA_IN(cu_short, KLA_I32, NELEM(cu_short)); break;
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
    t.q = KLA_F32_IN(q, NELEM(q)), t.k = KLA_F32_IN(k, NELEM(k)), t.v = KLA_F32_IN(v, NELEM(v));
    t.g = KLA_F32_IN(g, NELEM(g)), t.eta = KLA_F32_IN(eta, NELEM(eta)), t.o = KLA_F32_OUT(o, NELEM(o));
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

/* ---- the 0.2 API contract, on every CPU backend ------------------------------------------
 * Each tensor's numel checked against its shape (one element too few or too many, 0, -1,
 * INT64_MAX), outputs that overlap inputs or each other, KlaState sizes, the default scale,
 * non-finite results from finite inputs (KLA_ERANGE naming o and the first bad token),
 * kla_last_algo, kla_describe, kla_cpu_mask_parse and KLA_CPU_MASK, and KLA_EBUSY from two
 * threads on one context. Buffers are in the backend's own dtype, so that the backend
 * would write straight into them: a refused call must leave every one as it was. */

enum { X_Q, X_K, X_V, X_G, X_A, X_H0, X_DO, X_DHT, X_CU, X_O, X_HT, X_DQ, X_DK, X_DV, X_DG, X_DA, X_DH0, X_ST, NX };
enum { OP_FWD, OP_BWD, OP_DEC };
static const char *const op_name[] = { "forward", "backward", "decode" };
#define SENTINEL 1234.5

typedef struct prob {
    int op;
    KlaDtype dt; /* of every real tensor: the backend's own */
    KlaShape s;
    KlaOptions opt;
    void *x[NX];     /* NULL: not part of this call */
    int64_t n[NX];   /* its elements as allocated (plus one element of slack, never declared) */
    char name[NX][12], dims[NX][64];
    void *copy[NX];  /* inputs (and the decode state) as they were before the call */
} prob;

static size_t xsize(const prob *P, int i) { return i == X_CU ? 4 : P->dt == KLA_F64 ? 8 : 4; }
static double xget(const prob *P, int i, int64_t j)
{
    return P->dt == KLA_F64 ? ((double *)P->x[i])[j] : ((float *)P->x[i])[j];
}
static void xput(prob *P, int i, int64_t j, double v)
{
    if (P->dt == KLA_F64) ((double *)P->x[i])[j] = v;
    else ((float *)P->x[i])[j] = (float)v;
}

static void xalloc(prob *P, int i, const char *name, int64_t n, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void xalloc(prob *P, int i, const char *name, int64_t n, const char *fmt, ...)
{
    P->n[i] = n;
    P->x[i] = calloc((size_t)n + 1, xsize(P, i));
    P->copy[i] = calloc((size_t)n + 1, xsize(P, i));
    snprintf(P->name[i], sizeof P->name[i], "%s", name);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(P->dims[i], sizeof P->dims[i], fmt, ap);
    va_end(ap);
}

static void free_prob(prob *P)
{
    for (int i = 0; i < NX; i++) free(P->x[i]), free(P->copy[i]);
    memset(P, 0, sizeof *P);
}

/* A valid call of op: every tensor it takes present (cu_seqlens with lens when nseq > 0).
 * The element counts are written out per tensor here, independently of the library. */
static void make_prob(prob *P, KlaDtype dt, int op, int mode, int B, int T, int H, int HV, int K, int V,
                      int nseq, const int *lens, int vk)
{
    memset(P, 0, sizeof *P);
    P->op = op, P->dt = dt;
    P->s = (KlaShape){ B, T, H, HV, K, V, nseq };
    kla_default_options(&P->opt);
    P->opt.mode = mode;
    P->opt.state_layout = vk ? KLA_LAYOUT_VK : KLA_LAYOUT_KV;
    const int kla = mode == KLA_MODE_KLA, N = nseq ? nseq : B, BT = B * T;
    const int sa = vk ? V : K, sb = vk ? K : V;
    const char *sd = vk ? "[N, HV, V, K]" : "[N, HV, K, V]", *a = kla ? "eta" : "beta", *da = kla ? "deta" : "dbeta";
    if (op == OP_DEC) {
        xalloc(P, X_Q, "q", (int64_t)B * H * K, "[N, H, K] = [%d, %d, %d]", B, H, K);
        xalloc(P, X_K, "k", (int64_t)B * H * K, "[N, H, K] = [%d, %d, %d]", B, H, K);
        xalloc(P, X_V, "v", (int64_t)B * HV * V, "[N, HV, V] = [%d, %d, %d]", B, HV, V);
        xalloc(P, X_G, "g", (int64_t)B * HV, "[N, HV] = [%d, %d]", B, HV);
        xalloc(P, X_A, a, (int64_t)B * HV, "[N, HV] = [%d, %d]", B, HV);
        xalloc(P, X_O, "o", (int64_t)B * HV * V, "[N, HV, V] = [%d, %d, %d]", B, HV, V);
        xalloc(P, X_ST, "state", (int64_t)B * HV * K * V, "%s = [%d, %d, %d, %d]", sd, B, HV, sa, sb);
    } else {
        xalloc(P, X_Q, "q", (int64_t)BT * H * K, "[B, T, H, K] = [%d, %d, %d, %d]", B, T, H, K);
        xalloc(P, X_K, "k", (int64_t)BT * H * K, "[B, T, H, K] = [%d, %d, %d, %d]", B, T, H, K);
        xalloc(P, X_V, "v", (int64_t)BT * HV * V, "[B, T, HV, V] = [%d, %d, %d, %d]", B, T, HV, V);
        xalloc(P, X_G, "g", (int64_t)BT * HV, "[B, T, HV] = [%d, %d, %d]", B, T, HV);
        xalloc(P, X_A, a, (int64_t)BT * HV, "[B, T, HV] = [%d, %d, %d]", B, T, HV);
        xalloc(P, X_H0, "h0", (int64_t)N * HV * K * V, "%s = [%d, %d, %d, %d]", sd, N, HV, sa, sb);
        if (nseq) xalloc(P, X_CU, "cu_seqlens", nseq + 1, "[N + 1] = [%d]", nseq + 1);
        xalloc(P, X_O, "o", (int64_t)BT * HV * V, "[B, T, HV, V] = [%d, %d, %d, %d]", B, T, HV, V);
        xalloc(P, X_HT, "ht", (int64_t)N * HV * K * V, "%s = [%d, %d, %d, %d]", sd, N, HV, sa, sb);
        if (op == OP_BWD) {
            xalloc(P, X_DO, "do", (int64_t)BT * HV * V, "[B, T, HV, V] = [%d, %d, %d, %d]", B, T, HV, V);
            xalloc(P, X_DHT, "dht", (int64_t)N * HV * K * V, "%s = [%d, %d, %d, %d]", sd, N, HV, sa, sb);
            xalloc(P, X_DQ, "dq", (int64_t)BT * H * K, "[B, T, H, K] = [%d, %d, %d, %d]", B, T, H, K);
            xalloc(P, X_DK, "dk", (int64_t)BT * H * K, "[B, T, H, K] = [%d, %d, %d, %d]", B, T, H, K);
            xalloc(P, X_DV, "dv", (int64_t)BT * HV * V, "[B, T, HV, V] = [%d, %d, %d, %d]", B, T, HV, V);
            xalloc(P, X_DG, "dg", (int64_t)BT * HV, "[B, T, HV] = [%d, %d, %d]", B, T, HV);
            xalloc(P, X_DA, da, (int64_t)BT * HV, "[B, T, HV] = [%d, %d, %d]", B, T, HV);
            xalloc(P, X_DH0, "dh0", (int64_t)N * HV * K * V, "%s = [%d, %d, %d, %d]", sd, N, HV, sa, sb);
        }
    }
    for (int64_t j = 0; P->x[X_Q] && j < P->n[X_Q]; j++) xput(P, X_Q, j, f32(nrand()));
    for (int64_t j = 0; P->x[X_K] && j < P->n[X_K]; j++) xput(P, X_K, j, f32(nrand() / sqrt(K)));
    for (int64_t j = 0; P->x[X_V] && j < P->n[X_V]; j++) xput(P, X_V, j, f32(nrand()));
    for (int64_t j = 0; P->x[X_G] && j < P->n[X_G]; j++) xput(P, X_G, j, f32(-0.05 - 0.2 * urand()));
    for (int64_t j = 0; P->x[X_A] && j < P->n[X_A]; j++) xput(P, X_A, j, f32(0.2 + 0.6 * urand()));
    for (int64_t j = 0; P->x[X_H0] && j < P->n[X_H0]; j++) xput(P, X_H0, j, f32(0.3 * nrand()));
    for (int64_t j = 0; P->x[X_DO] && j < P->n[X_DO]; j++) xput(P, X_DO, j, f32(nrand()));
    for (int64_t j = 0; P->x[X_DHT] && j < P->n[X_DHT]; j++) xput(P, X_DHT, j, f32(nrand()));
    for (int64_t j = 0; P->x[X_ST] && j < P->n[X_ST]; j++) xput(P, X_ST, j, f32(0.3 * nrand()));
    if (nseq) {
        int32_t *cu = P->x[X_CU];
        cu[0] = 0;
        for (int i = 0; i < nseq; i++) cu[i + 1] = cu[i] + lens[i];
    }
}

/* the struct member of tensor i */
static KlaIn *in_of(KlaTensors *t, int kla, int i)
{
    KlaIn *const m[] = { &t->q, &t->k, &t->v, &t->g, kla ? &t->eta : &t->beta, &t->h0, &t->dout, &t->dht,
                         &t->cu_seqlens };
    return i < X_O ? m[i] : NULL;
}
static KlaOut *out_of(KlaTensors *t, int kla, int i)
{
    KlaOut *const m[] = { &t->o, &t->ht, &t->dq, &t->dk, &t->dv, &t->dg, kla ? &t->deta : &t->dbeta, &t->dh0,
                          &t->state };
    return i >= X_O ? m[i - X_O] : NULL;
}
static int64_t *numel_of(KlaTensors *t, int kla, int i)
{
    return i < X_O ? &in_of(t, kla, i)->numel : &out_of(t, kla, i)->numel;
}

static KlaTensors tensors_prob(const prob *P)
{
    KlaTensors t = { 0 };
    const int kla = P->opt.mode == KLA_MODE_KLA;
    for (int i = 0; i < NX; i++) {
        if (!P->x[i]) continue;
        const KlaDtype dt = i == X_CU ? KLA_I32 : P->dt;
        if (i < X_O) *in_of(&t, kla, i) = KLA_IN(P->x[i], dt, P->n[i]);
        else *out_of(&t, kla, i) = KLA_OUT(P->x[i], dt, P->n[i]);
    }
    return t;
}

/* outputs to the sentinel; inputs and the decode state remembered */
static void prime(prob *P)
{
    for (int i = 0; i < NX; i++) {
        if (!P->x[i]) continue;
        if (i >= X_O && i != X_ST)
            for (int64_t j = 0; j <= P->n[i]; j++) xput(P, i, j, SENTINEL);
        memcpy(P->copy[i], P->x[i], (size_t)(P->n[i] + 1) * xsize(P, i));
    }
}

/* every buffer as prime() left it; names the first one that is not */
static const char *changed(const prob *P)
{
    for (int i = 0; i < NX; i++)
        if (P->x[i] && memcmp(P->copy[i], P->x[i], (size_t)(P->n[i] + 1) * xsize(P, i))) return P->name[i];
    return NULL;
}

static int call_op(KlaContext *ctx, int op, const KlaShape *s, const KlaOptions *o, const KlaTensors *t)
{
    return op == OP_FWD ? kla_forward(ctx, s, o, t) : op == OP_BWD ? kla_backward(ctx, s, o, t) : kla_decode(ctx, s, o, t);
}

static int call_prob(KlaContext *ctx, prob *P, const KlaTensors *t)
{
    prime(P);
    return call_op(ctx, P->op, &P->s, &P->opt, t);
}

/* the backend's own dtype */
static KlaDtype real_of(const char *be) { return !strcmp(be, "ref64") ? KLA_F64 : KLA_F32; }

/* tensor i of P declared with one element too few, one too many, 0, -1 and INT64_MAX:
 * each refused with KLA_EINVAL, a message naming the tensor and its expected shape (and
 * the count given), and nothing written */
static void check_numel_of(KlaContext *ctx, const char *be, const char *what, prob *P, int i)
{
    const int64_t n = P->n[i], bad[] = { n - 1, n + 1, 0, -1, INT64_MAX };
    char why[400] = "";
    int ok = 1;
    for (size_t v = 0; v < sizeof bad / sizeof bad[0] && ok; v++) {
        KlaTensors t = tensors_prob(P);
        *numel_of(&t, P->opt.mode == KLA_MODE_KLA, i) = bad[v];
        const int r = call_prob(ctx, P, &t);
        const char *msg = kla_error_detail(ctx), *ch = changed(P);
        char head[32], given[48], want[48];
        snprintf(head, sizeof head, "tensor %s: ", P->name[i]);
        snprintf(given, sizeof given, "%lld elements given", (long long)bad[v]);
        snprintf(want, sizeof want, ", %lld elements", (long long)n);
        ok = r == KLA_EINVAL && strstr(msg, head) == msg && strstr(msg, P->dims[i]) && strstr(msg, want) &&
             (bad[v] == 0 || strstr(msg, given)) && !ch;
        if (!ok)
            snprintf(why, sizeof why, " [numel %lld: %s, \"%s\"%s%s]", (long long)bad[v], kla_strerror(r), msg,
                     ch ? ", changed " : "", ch ? ch : "");
    }
    check(ok, "%s %s %s: %s with %lld -+ 1, 0, -1, INT64_MAX elements -> KLA_EINVAL naming %s %s, nothing written%s",
          be, op_name[P->op], what, P->name[i], (long long)n, P->name[i], P->dims[i], why);
}

static void check_sizes(KlaContext *ctx, const char *be)
{
    const KlaDtype dt = real_of(be);
    const int lens[] = { 4, 0, 5 };
    struct {
        const char *what;
        int op, mode, B, T, H, HV, K, V, nseq, vk;
        int only[6]; /* the tensors to vary, ending with -1; { -1 }: every one present */
    } cf[] = {
        { "kla B=2", OP_FWD, KLA_MODE_KLA, 2, 5, 1, 2, 4, 3, 0, 0, { -1 } },
        { "kla B=2", OP_BWD, KLA_MODE_KLA, 2, 5, 1, 2, 4, 3, 0, 0, { -1 } },
        { "kla N=3", OP_DEC, KLA_MODE_KLA, 3, 1, 1, 2, 4, 3, 0, 0, { -1 } },
        { "kla packed N=3", OP_FWD, KLA_MODE_KLA, 1, 9, 2, 2, 3, 2, 3, 0, { X_CU, X_Q, X_H0, X_HT, -1 } },
        { "kla packed N=3", OP_BWD, KLA_MODE_KLA, 1, 9, 2, 2, 3, 2, 3, 0, { X_CU, X_DHT, X_DH0, X_DV, -1 } },
        { "kla layout vk", OP_FWD, KLA_MODE_KLA, 2, 3, 1, 1, 4, 3, 0, 1, { X_H0, X_HT, -1 } },
        { "kla layout vk", OP_DEC, KLA_MODE_KLA, 2, 1, 1, 1, 4, 3, 0, 1, { X_ST, -1 } },
        { "gdn", OP_FWD, KLA_MODE_GDN, 2, 5, 1, 2, 4, 3, 0, 0, { X_A, -1 } },
        { "gdn", OP_BWD, KLA_MODE_GDN, 2, 5, 1, 2, 4, 3, 0, 0, { X_A, X_DA, -1 } },
        { "gdn", OP_DEC, KLA_MODE_GDN, 3, 1, 1, 2, 4, 3, 0, 0, { X_A, -1 } },
    };
    for (size_t c = 0; c < sizeof cf / sizeof cf[0]; c++) {
        prob P;
        make_prob(&P, dt, cf[c].op, cf[c].mode, cf[c].B, cf[c].T, cf[c].H, cf[c].HV, cf[c].K, cf[c].V, cf[c].nseq,
                  lens, cf[c].vk);
        KlaTensors t = tensors_prob(&P);
        int r = call_prob(ctx, &P, &t);
        check(r == 0, "%s %s %s: the call with every count right runs (%s)", be, op_name[P.op], cf[c].what,
              r ? kla_error_detail(ctx) : "ok");
        for (int i = 0; i < NX; i++) {
            int vary = cf[c].only[0] < 0 && P.x[i];
            for (int j = 0; cf[c].only[j] >= 0; j++) vary |= cf[c].only[j] == i;
            if (vary) check_numel_of(ctx, be, cf[c].what, &P, i);
        }
        free_prob(&P);
    }

    /* a "scalar" eta (numel 1, its own one-element buffer) where B*T*HV > 1 */
    for (int op = OP_FWD; op <= OP_DEC; op += 2) {
        prob P;
        make_prob(&P, dt, op, KLA_MODE_KLA, 2, op == OP_DEC ? 1 : 5, 1, 2, 4, 3, 0, NULL, 0);
        void *one = malloc(8);
        if (dt == KLA_F64) *(double *)one = 0.5;
        else *(float *)one = 0.5f;
        KlaTensors t = tensors_prob(&P);
        t.eta = KLA_IN(one, dt, 1);
        const int r = call_prob(ctx, &P, &t);
        const char *msg = kla_error_detail(ctx), *ch = changed(&P);
        check(r == KLA_EINVAL && strstr(msg, "tensor eta: 1 elements given") && strstr(msg, P.dims[X_A]) && !ch,
              "%s %s: a scalar eta (1 element for %lld) -> KLA_EINVAL, nothing written (\"%s\")", be, op_name[op],
              (long long)P.n[X_A], msg);
        free(one);
        free_prob(&P);
    }
}

/* ---- overlapping outputs ---- */

/* a call refused for overlap: KLA_EINVAL, a message with every word of want, the inputs
 * (and the region they live in) unchanged */
static void check_refused_overlap(KlaContext *ctx, const char *be, prob *P, const KlaTensors *t,
                                  const void *region, size_t bytes, const char *what, const char *w1, const char *w2)
{
    void *before = malloc(bytes);
    prime(P);
    memcpy(before, region, bytes);
    const int r = call_op(ctx, P->op, &P->s, &P->opt, t);
    const char *msg = kla_error_detail(ctx), *ch = changed(P);
    check(r == KLA_EINVAL && strstr(msg, w1) && strstr(msg, w2) && !memcmp(before, region, bytes) && !ch,
          "%s %s: %s -> KLA_EINVAL, nothing written (\"%s\")", be, op_name[P->op], what, msg);
    free(before);
}

static void check_overlaps(KlaContext *ctx, const char *be)
{
    const KlaDtype dt = real_of(be);
    const size_t es = dt == KLA_F64 ? 8 : 4;
    prob P;
    /* forward, H = HV and K = V: q and o hold the same number of elements */
    make_prob(&P, dt, OP_FWD, KLA_MODE_KLA, 1, 6, 1, 1, 4, 4, 0, NULL, 0);
    const int64_t nq = P.n[X_Q], nv = P.n[X_O];
    KlaTensors t = tensors_prob(&P);
    t.o.data = P.x[X_Q];
    check_refused_overlap(ctx, be, &P, &t, P.x[X_Q], (size_t)nq * es, "o aliasing q",
                          "tensor o: its memory overlaps input q", "");
    /* o starting on q's last element; then right after it (allowed) */
    char *region = calloc((size_t)(nq + nv + 2), 8);
    memcpy(region, P.x[X_Q], (size_t)nq * es);
    t = tensors_prob(&P);
    t.q.data = region;
    t.o.data = region + (nq - 1) * (int64_t)es;
    check_refused_overlap(ctx, be, &P, &t, region, (size_t)nq * es, "o overlapping q's last element",
                          "tensor o: its memory overlaps input q", "");
    t.o.data = region + nq * (int64_t)es;
    int r = call_op(ctx, P.op, &P.s, &P.opt, &t);
    check(r == 0 && !memcmp(region, P.x[X_Q], (size_t)nq * es), "%s forward: o right after q is fine (%s)", be,
          r ? kla_error_detail(ctx) : "ok");
    /* other dtypes: q float32 and o float64 sharing their last / first 8 bytes (nq even) */
    {
        float *rq = calloc((size_t)(nq + 2 * nv + 4), 8);
        for (int64_t j = 0; j < nq; j++) rq[j] = (float)xget(&P, X_Q, j);
        t = tensors_prob(&P);
        t.q = KLA_F32_IN(rq, nq);
        t.o = KLA_F64_OUT((double *)(rq + nq) - 1, nv);
        check_refused_overlap(ctx, be, &P, &t, rq, (size_t)nq * 4, "o (float64) sharing 8 bytes with q (float32)",
                              "tensor o: its memory overlaps input q", "");
        t.o = KLA_F64_OUT((double *)(rq + nq), nv);
        r = call_op(ctx, P.op, &P.s, &P.opt, &t);
        check(r == 0, "%s forward: o (float64) right after q (float32) is fine (%s)", be, r ? kla_error_detail(ctx) : "ok");
        free(rq);
    }
    /* inputs may share memory: k = q */
    t = tensors_prob(&P);
    t.k.data = P.x[X_Q];
    r = call_prob(ctx, &P, &t);
    check(r == 0, "%s forward: inputs sharing memory (k = q) are fine (%s)", be, r ? kla_error_detail(ctx) : "ok");
    /* ht in place of h0 (same shape, K = V) */
    t = tensors_prob(&P);
    t.ht.data = P.x[X_H0];
    check_refused_overlap(ctx, be, &P, &t, P.x[X_H0], (size_t)P.n[X_H0] * es, "ht aliasing h0",
                          "tensor ht: its memory overlaps input h0", "");
    free(region);
    free_prob(&P);

    /* forward with cu_seqlens: o over the cu_seqlens array */
    {
        const int lens[] = { 2, 4 };
        make_prob(&P, dt, OP_FWD, KLA_MODE_KLA, 1, 6, 1, 1, 4, 4, 2, lens, 0);
        char *reg = calloc((size_t)P.n[X_O] + 8, 8);
        memcpy(reg, P.x[X_CU], (size_t)P.n[X_CU] * 4);
        t = tensors_prob(&P);
        t.cu_seqlens.data = reg;
        t.o.data = reg;
        check_refused_overlap(ctx, be, &P, &t, reg, (size_t)P.n[X_CU] * 4, "o over cu_seqlens",
                              "tensor o: its memory overlaps input cu_seqlens", "");
        free(reg);
        free_prob(&P);
    }

    /* backward: dq = dk (outputs of one size), dv over do */
    make_prob(&P, dt, OP_BWD, KLA_MODE_KLA, 2, 5, 1, 2, 4, 3, 0, NULL, 0);
    t = tensors_prob(&P);
    t.dk.data = P.x[X_DQ];
    check_refused_overlap(ctx, be, &P, &t, P.x[X_DQ], 8, "dq aliasing dk", "overlaps output", "dq");
    check(strstr(kla_error_detail(ctx), "dk") != NULL, "%s backward: the overlap message names dk too (\"%s\")", be,
          kla_error_detail(ctx));
    t = tensors_prob(&P);
    t.dv.data = P.x[X_DO];
    check_refused_overlap(ctx, be, &P, &t, P.x[X_DO], (size_t)P.n[X_DO] * es, "dv aliasing do",
                          "tensor dv: its memory overlaps input do", "");
    free_prob(&P);

    /* decode: o inside the state */
    make_prob(&P, dt, OP_DEC, KLA_MODE_KLA, 2, 1, 1, 2, 4, 3, 0, NULL, 0);
    t = tensors_prob(&P);
    t.o.data = (char *)P.x[X_ST] + es;
    check_refused_overlap(ctx, be, &P, &t, P.x[X_ST], (size_t)P.n[X_ST] * es, "o inside state",
                          "overlaps output o", "state");
    free_prob(&P);
}

/* ---- KlaState sizes ---- */

static void check_state_sizes(KlaContext *ctx, const char *be)
{
    enum { SN = 2, SHV = 2, SK = 4, SV = 3, SNST = SN * SHV * SK * SV };
    KlaState *st = NULL;
    int r = kla_state_new(ctx, SN, SHV, SK, SV, &st);
    check(r == 0, "%s: kla_state_new", be);
    if (r) return;
    double a[SNST + 1], b[SNST + 1], rd[SNST + 1];
    for (int i = 0; i <= SNST; i++) a[i] = f32(nrand()), b[i] = f32(nrand());
    r = kla_state_write(st, KLA_F64_IN(a, SNST), KLA_LAYOUT_KV);
    check(r == 0, "%s: kla_state_write with %d elements", be, SNST);
    const int64_t bad[] = { SNST - 1, SNST + 1, 0, -1 };
    const char *dims[] = { "[N, HV, K, V] = [2, 2, 4, 3]", "[N, HV, V, K] = [2, 2, 3, 4]" };
    for (int vk = 0; vk < 2; vk++) {
        int okw = 1, okr = 1;
        char ww[300] = "", wr[300] = "";
        for (size_t v = 0; v < sizeof bad / sizeof bad[0]; v++) {
            char given[48];
            snprintf(given, sizeof given, "%lld elements given", (long long)bad[v]);
            r = kla_state_write(st, KLA_F64_IN(b, bad[v]), vk ? KLA_LAYOUT_VK : KLA_LAYOUT_KV);
            const char *msg = kla_error_detail(ctx);
            int o1 = r == KLA_EINVAL && strstr(msg, "src") && strstr(msg, dims[vk]) && (!bad[v] || strstr(msg, given));
            if (!o1 && okw) snprintf(ww, sizeof ww, " [numel %lld: %s \"%s\"]", (long long)bad[v], kla_strerror(r), msg);
            /* the state is still a */
            for (int i = 0; i <= SNST; i++) rd[i] = SENTINEL;
            r = kla_state_read(st, KLA_F64_OUT(rd, SNST), KLA_LAYOUT_KV);
            o1 &= r == 0 && !memcmp(rd, a, SNST * sizeof(double)) && rd[SNST] == SENTINEL;
            okw &= o1;
            for (int i = 0; i <= SNST; i++) rd[i] = SENTINEL;
            r = kla_state_read(st, KLA_F64_OUT(rd, bad[v]), vk ? KLA_LAYOUT_VK : KLA_LAYOUT_KV);
            msg = kla_error_detail(ctx);
            int o2 = r == KLA_EINVAL && strstr(msg, "dst") && strstr(msg, dims[vk]) && (!bad[v] || strstr(msg, given));
            for (int i = 0; i <= SNST; i++) o2 &= rd[i] == SENTINEL;
            if (!o2 && okr) snprintf(wr, sizeof wr, " [numel %lld: %s \"%s\"]", (long long)bad[v], kla_strerror(r), msg);
            okr &= o2;
        }
        check(okw, "%s: kla_state_write %s with %d -+ 1, 0, -1 elements -> KLA_EINVAL naming %s, state unchanged%s", be,
              vk ? "VK" : "KV", SNST, dims[vk], ww);
        check(okr, "%s: kla_state_read %s with %d -+ 1, 0, -1 elements -> KLA_EINVAL naming %s, dst untouched%s", be,
              vk ? "VK" : "KV", SNST, dims[vk], wr);
    }
    /* kla_decode_state with a wrong count: refused, the state unchanged */
    prob P;
    make_prob(&P, real_of(be), OP_DEC, KLA_MODE_KLA, SN, 1, 1, SHV, SK, SV, 0, NULL, 0);
    KlaTensors t = tensors_prob(&P);
    t.state = (KlaOut){ 0 };
    t.o.numel++;
    prime(&P);
    r = kla_decode_state(ctx, &P.s, &P.opt, &t, st);
    const char *msg = kla_error_detail(ctx);
    int ok = r == KLA_EINVAL && strstr(msg, "tensor o: ") && !changed(&P);
    r = kla_state_read(st, KLA_F64_OUT(rd, SNST), KLA_LAYOUT_KV);
    check(ok && r == 0 && !memcmp(rd, a, SNST * sizeof(double)),
          "%s: kla_decode_state with o one element too long -> KLA_EINVAL, state unchanged (\"%s\")", be, msg);
    free_prob(&P);
    kla_state_free(&st);
}

/* ---- the query scale ---- */

static void check_scale(KlaContext *ctx, const char *be)
{
    KlaOptions def;
    kla_default_options(&def);
    check(isnan(def.scale) && isnan(KLA_SCALE_DEFAULT), "%s: kla_default_options sets scale = KLA_SCALE_DEFAULT (NaN)", be);
    for (int op = OP_FWD; op <= OP_DEC; op++)
        for (int algo = KLA_ALGO_RECURRENT; algo <= (op == OP_DEC ? KLA_ALGO_RECURRENT : KLA_ALGO_CHUNK); algo++) {
            char what[64];
            snprintf(what, sizeof what, "%s %s", op_name[op], op == OP_DEC ? "" : algo == KLA_ALGO_CHUNK ? "chunk" : "recurrent");
            prob P;
            /* K = 4: K^-1/2 = 0.5 exactly */
            make_prob(&P, real_of(be), op, KLA_MODE_KLA, 2, op == OP_DEC ? 1 : 7, 1, 2, 4, 3, 0, NULL, 0);
            P.opt.algo = algo, P.opt.chunk_size = 16;
            const int64_t no = P.n[X_O], nd = op == OP_BWD ? P.n[X_DQ] : 0;
            const int side = op == OP_DEC ? X_ST : X_HT; /* the state written beside o */
            const int64_t ns = P.n[side];
            double *o[4], *sd[4], *dq[4];
            const double scales[4] = { KLA_SCALE_DEFAULT, 0.5, 0, -0.5 };
            void *st0 = op == OP_DEC ? malloc((size_t)(ns + 1) * 8) : NULL;
            if (st0) memcpy(st0, P.x[X_ST], (size_t)(ns + 1) * xsize(&P, X_ST));
            int ok = 1;
            for (int s = 0; s < 4; s++) {
                o[s] = malloc((size_t)no * 8), sd[s] = malloc((size_t)ns * 8), dq[s] = malloc((size_t)(nd + 1) * 8);
                if (st0) memcpy(P.x[X_ST], st0, (size_t)(ns + 1) * xsize(&P, X_ST));
                P.opt.scale = scales[s];
                KlaTensors t = tensors_prob(&P);
                ok &= call_prob(ctx, &P, &t) == 0;
                for (int64_t j = 0; j < no; j++) o[s][j] = xget(&P, X_O, j);
                for (int64_t j = 0; j < ns; j++) sd[s][j] = xget(&P, side, j);
                for (int64_t j = 0; j < nd; j++) dq[s][j] = xget(&P, X_DQ, j);
            }
            int same = ok, zero = ok, neg = ok, differs = 0, st_same = ok;
            for (int64_t j = 0; j < no; j++) {
                same &= o[0][j] == o[1][j];
                zero &= o[2][j] == 0;
                neg &= o[3][j] == -o[1][j];
                differs |= o[0][j] != 0;
            }
            for (int64_t j = 0; j < ns; j++) st_same &= sd[2][j] == sd[0][j];
            for (int64_t j = 0; j < nd; j++) zero &= dq[2][j] == 0, same &= dq[0][j] == dq[1][j];
            check(same && differs, "%s %s: KLA_SCALE_DEFAULT is K^-1/2 (bit for bit the same as scale = 0.5 at K = 4)", be, what);
            check(zero && st_same, "%s %s: scale = 0 gives o == 0 exactly%s, the state as with the default", be, what,
                  op == OP_BWD ? " and dq == 0" : "");
            check(neg, "%s %s: scale = -0.5 gives -o", be, what);
            for (int s = 0; s < 4; s++) free(o[s]), free(sd[s]), free(dq[s]);
            /* infinite scales: refused before anything is written */
            int inf_ok = 1;
            const char *msg = "";
            for (int sg = -1; sg <= 1; sg += 2) {
                if (st0) memcpy(P.x[X_ST], st0, (size_t)(ns + 1) * xsize(&P, X_ST));
                P.opt.scale = sg * INFINITY;
                KlaTensors t = tensors_prob(&P);
                const int r = call_prob(ctx, &P, &t);
                msg = kla_error_detail(ctx);
                inf_ok &= r == KLA_EINVAL && strstr(msg, "scale") && !changed(&P);
            }
            check(inf_ok, "%s %s: scale = +-Inf -> KLA_EINVAL, nothing written (\"%s\")", be, what, msg);
            free(st0);
            free_prob(&P);
        }
}

/* ---- non-finite results from finite inputs ---- */

static int all_finite(const prob *P, int i, int64_t from, int64_t to)
{
    for (int64_t j = from; j < to; j++)
        if (!isfinite(xget(P, i, j))) return 0;
    return 1;
}

/* A forward or backward of P (with its inputs set up to overflow at token bad_t of batch
 * row bad_b) fails with KLA_ERANGE naming tensor o at that token; inputs are unmodified and
 * the tokens before it were computed (finite), unless a chunkwise run smeared the value
 * over its chunk and the message says the token was located by a recurrent rerun. With pre (mode kla's step size, which the
 * library may check before computing): naming tensor pre at that token instead, and then
 * nothing written. */
static void check_overflow_call(KlaContext *ctx, const char *be, prob *P, const char *what, int bad_b, int bad_t,
                                const char *pre)
{
    for (int algo = KLA_ALGO_RECURRENT; algo <= KLA_ALGO_CHUNK; algo++) {
        P->opt.algo = algo, P->opt.chunk_size = 16;
        KlaTensors t = tensors_prob(P);
        const int r = call_prob(ctx, P, &t);
        const char *msg = kla_error_detail(ctx);
        char at[48];
        snprintf(at, sizeof at, "b=%d, t=%d,", bad_b, bad_t);
        int inputs = 1;
        for (int i = 0; i < X_O; i++)
            if (P->x[i] && memcmp(P->copy[i], P->x[i], (size_t)(P->n[i] + 1) * xsize(P, i))) inputs = 0;
        const int64_t row = (int64_t)P->s.T * P->s.HV * P->s.V; /* o of one batch row */
        const int before = all_finite(P, X_O, 0, bad_b * row + (int64_t)bad_t * P->s.HV * P->s.V);
        char head[32] = "-";
        if (pre) snprintf(head, sizeof head, "tensor %s: ", pre);
        const int as_pre = strstr(msg, head) == msg;
        /* a chunkwise run (simd's backward is always one) smears the overflow over its
         * chunk; the library then names the token by a recurrent rerun and says so */
        const int smeared = strstr(msg, "located by a recurrent rerun") != NULL;
        check(r == KLA_ERANGE && strstr(msg, at) && inputs &&
                  (as_pre ? !changed(P) : strstr(msg, "tensor o: ") == msg && (before || smeared)),
              "%s %s %s: %s -> KLA_ERANGE naming o%s%s at %s inputs unmodified, %s (\"%s\")", be, op_name[P->op],
              algo == KLA_ALGO_CHUNK ? "chunk" : "recurrent", what, pre ? " or " : "", pre ? pre : "", at,
              as_pre ? "nothing written" : "the tokens before finite", msg);
    }
}

/* decode token by token, with t's inputs from P's token t (B sequences); the step at
 * bad_t fails with KLA_ERANGE naming o of sequence bad_b, the steps before run */
static void check_overflow_decode(KlaContext *ctx, const char *be, const prob *P, const char *what, int bad_b,
                                  int bad_t, int use_state, const char *pre)
{
    const int B = (int)P->s.B, T = (int)P->s.T, H = (int)P->s.H, HV = (int)P->s.HV, K = (int)P->s.K, V = (int)P->s.V;
    prob D;
    make_prob(&D, P->dt, OP_DEC, P->opt.mode, B, 1, H, HV, K, V, 0, NULL, 0);
    D.opt = P->opt;
    D.opt.algo = KLA_ALGO_AUTO;
    memset(D.x[X_ST], 0, (size_t)D.n[X_ST] * xsize(&D, X_ST));
    KlaState *st = NULL;
    if (use_state && kla_state_new(ctx, B, HV, K, V, &st)) {
        check(0, "%s: kla_state_new (%s)", be, kla_error_detail(ctx));
        free_prob(&D);
        return;
    }
    int r = 0, t = 0;
    for (; t < T && !r; t++) {
        for (int b = 0; b < B; b++) { /* token t of every sequence */
            for (int j = 0; j < H * K; j++) {
                xput(&D, X_Q, b * H * K + j, xget(P, X_Q, ((int64_t)b * T + t) * H * K + j));
                xput(&D, X_K, b * H * K + j, xget(P, X_K, ((int64_t)b * T + t) * H * K + j));
            }
            for (int j = 0; j < HV * V; j++) xput(&D, X_V, b * HV * V + j, xget(P, X_V, ((int64_t)b * T + t) * HV * V + j));
            for (int j = 0; j < HV; j++) {
                xput(&D, X_G, b * HV + j, xget(P, X_G, ((int64_t)b * T + t) * HV + j));
                xput(&D, X_A, b * HV + j, xget(P, X_A, ((int64_t)b * T + t) * HV + j));
            }
        }
        KlaTensors tt = tensors_prob(&D);
        prime(&D);
        if (use_state) {
            tt.state = (KlaOut){ 0 };
            r = kla_decode_state(ctx, &D.s, &D.opt, &tt, st);
        } else {
            r = kla_decode(ctx, &D.s, &D.opt, &tt);
        }
    }
    const char *msg = kla_error_detail(ctx);
    int inputs = 1;
    for (int i = 0; i < X_O; i++)
        if (D.x[i] && memcmp(D.copy[i], D.x[i], (size_t)(D.n[i] + 1) * xsize(&D, i))) inputs = 0;
    char at[32], head[32] = "-";
    snprintf(at, sizeof at, "n=%d,", bad_b);
    if (pre) snprintf(head, sizeof head, "tensor %s: ", pre);
    /* a failure found by checking leaves the state as it was */
    const int as_pre = strstr(msg, head) == msg, state_kept = use_state || !memcmp(D.copy[X_ST], D.x[X_ST],
                                                                                   (size_t)D.n[X_ST] * xsize(&D, X_ST));
    check(r == KLA_ERANGE && t - 1 == bad_t && strstr(msg, at) && inputs &&
              (as_pre ? state_kept : strstr(msg, "tensor o: ") == msg),
          "%s %s: %s -> step %d (expected %d) fails with KLA_ERANGE naming o%s%s of sequence %d, inputs unmodified (\"%s\")",
          be, use_state ? "kla_decode_state" : "kla_decode", what, t - 1, bad_t, pre ? " or " : "", pre ? pre : "",
          bad_b, msg);
    kla_state_free(&st);
    free_prob(&D);
}

static void check_overflow(KlaContext *ctx, const char *be)
{
    const KlaDtype dt = real_of(be);
    /* mode kla, eps = 0 and a zero key at token 7 of batch row 1: beta = eta / 0 */
    const int bad_t = 7;
    for (int op = OP_FWD; op <= OP_BWD; op++) {
        prob P;
        make_prob(&P, dt, op, KLA_MODE_KLA, 2, 20, 1, 2, 4, 3, 0, NULL, 0);
        P.opt.eps = 0;
        for (int j = 0; j < 4; j++) xput(&P, X_K, ((int64_t)1 * 20 + bad_t) * 4 + j, 0);
        check_overflow_call(ctx, be, &P, "eps = 0, a zero key", 1, bad_t, "eta");
        if (op == OP_FWD) {
            check_overflow_decode(ctx, be, &P, "eps = 0, a zero key", 1, bad_t, 0, "eta");
            check_overflow_decode(ctx, be, &P, "eps = 0, a zero key", 1, bad_t, 1, "eta");
        }
        free_prob(&P);
    }
    /* mode gdn, beta = 1e30 from token 5 on with one repeated unit key: the state grows by
     * about 1e30 a token, past float32 at the next token, past float64 ten tokens later */
    const int t0 = 5, first = dt == KLA_F64 ? t0 + 10 : t0 + 1;
    for (int op = OP_FWD; op <= OP_BWD; op++) {
        prob P;
        make_prob(&P, dt, op, KLA_MODE_GDN, 1, 24, 1, 1, 4, 3, 0, NULL, 0);
        for (int t = t0; t < 24; t++) {
            for (int j = 0; j < 4; j++) xput(&P, X_K, (int64_t)t * 4 + j, j == 0);
            xput(&P, X_A, t, 1e30);
        }
        check_overflow_call(ctx, be, &P, "beta = 1e30", 0, first, NULL);
        if (op == OP_FWD) {
            check_overflow_decode(ctx, be, &P, "beta = 1e30", 0, first, 0, NULL);
            check_overflow_decode(ctx, be, &P, "beta = 1e30", 0, first, 1, NULL);
        }
        free_prob(&P);
    }
    /* decode: a non-finite state is refused, ht is not allowed */
    prob D;
    make_prob(&D, dt, OP_DEC, KLA_MODE_KLA, 2, 1, 1, 2, 4, 3, 0, NULL, 0);
    xput(&D, X_ST, 29, NAN);
    KlaTensors t = tensors_prob(&D);
    int r = call_prob(ctx, &D, &t);
    const char *msg = kla_error_detail(ctx);
    check(r == KLA_ERANGE && strstr(msg, "tensor state: NaN") && !changed(&D),
          "%s decode: a NaN in the state -> KLA_ERANGE naming it, nothing written (\"%s\")", be, msg);
    xput(&D, X_ST, 29, 0.5);
    double ht[2 * 2 * 4 * 3];
    t = tensors_prob(&D);
    t.ht = KLA_F64_OUT(ht, NELEM(ht));
    r = call_prob(ctx, &D, &t);
    msg = kla_error_detail(ctx);
    check(r == KLA_EINVAL && strstr(msg, "tensor ht: not allowed") && !changed(&D),
          "%s decode: ht -> KLA_EINVAL, nothing written (\"%s\")", be, msg);
    free_prob(&D);
}

/* ---- kla_last_algo, kla_describe ---- */

static void check_last_algo(const char *be)
{
    KlaContext *ctx = open_backend(be);
    const int is_ref = strcmp(be, "simd") != 0;
    check(kla_last_algo(ctx) == KLA_ALGO_AUTO && kla_last_algo(NULL) == KLA_ALGO_AUTO,
          "%s: kla_last_algo is AUTO before any call (and for NULL)", be);
    prob F, Bw, D;
    make_prob(&F, real_of(be), OP_FWD, KLA_MODE_KLA, 1, 40, 1, 1, 8, 8, 0, NULL, 0);
    make_prob(&Bw, real_of(be), OP_BWD, KLA_MODE_KLA, 1, 40, 1, 1, 8, 8, 0, NULL, 0);
    make_prob(&D, real_of(be), OP_DEC, KLA_MODE_KLA, 1, 1, 1, 1, 8, 8, 0, NULL, 0);
    struct { prob *P; int algo; int want; const char *what; } steps[] = {
        { &F, KLA_ALGO_CHUNK, KLA_ALGO_CHUNK, "forward CHUNK" },
        { &F, KLA_ALGO_RECURRENT, KLA_ALGO_RECURRENT, "forward RECURRENT" },
        { &F, KLA_ALGO_CHUNK, KLA_ALGO_CHUNK, "forward CHUNK" },
        { &F, KLA_ALGO_AUTO, is_ref ? KLA_ALGO_RECURRENT : -1, is_ref ? "forward AUTO (the reference: recurrent)" : "forward AUTO" },
        { &Bw, KLA_ALGO_CHUNK, KLA_ALGO_CHUNK, "backward CHUNK" },
        { &Bw, KLA_ALGO_AUTO, is_ref ? KLA_ALGO_RECURRENT : -1, is_ref ? "backward AUTO (the reference: recurrent)" : "backward AUTO" },
        { &Bw, KLA_ALGO_RECURRENT, is_ref ? KLA_ALGO_RECURRENT : -1, "backward RECURRENT" },
    };
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        steps[i].P->opt.algo = steps[i].algo;
        KlaTensors t = tensors_prob(steps[i].P);
        const int r = call_prob(ctx, steps[i].P, &t);
        const KlaAlgo a = kla_last_algo(ctx);
        check(r == 0 && (steps[i].want >= 0 ? a == (KlaAlgo)steps[i].want : a == KLA_ALGO_RECURRENT || a == KLA_ALGO_CHUNK),
              "%s: kla_last_algo after %s is %d", be, steps[i].what, (int)a);
    }
    /* calls that do not set it: decode, a refused call, a failing one (not successful) */
    F.opt.algo = KLA_ALGO_CHUNK;
    KlaTensors t = tensors_prob(&F);
    int r = call_prob(ctx, &F, &t);
    t = tensors_prob(&D);
    r |= call_prob(ctx, &D, &t);
    check(r == 0 && kla_last_algo(ctx) == KLA_ALGO_CHUNK, "%s: a decode leaves kla_last_algo (CHUNK)", be);
    F.opt.algo = KLA_ALGO_RECURRENT;
    t = tensors_prob(&F);
    t.q.numel--;
    r = call_prob(ctx, &F, &t);
    check(r == KLA_EINVAL && kla_last_algo(ctx) == KLA_ALGO_CHUNK, "%s: a refused RECURRENT call leaves kla_last_algo (CHUNK)", be);
    /* overflowing once computed (gdn, beta = 1e30 and one repeated key from token 3 on) */
    prob G;
    make_prob(&G, real_of(be), OP_FWD, KLA_MODE_GDN, 1, 40, 1, 1, 8, 8, 0, NULL, 0);
    for (int tt = 3; tt < 40; tt++) {
        for (int j = 0; j < 8; j++) xput(&G, X_K, tt * 8 + j, j == 0);
        xput(&G, X_A, tt, 1e30);
    }
    G.opt.algo = KLA_ALGO_RECURRENT;
    t = tensors_prob(&G);
    r = call_prob(ctx, &G, &t);
    check(r == KLA_ERANGE && strstr(kla_error_detail(ctx), "tensor o: ") && kla_last_algo(ctx) == KLA_ALGO_CHUNK,
          "%s: a RECURRENT call failing with KLA_ERANGE after computing (not successful) leaves kla_last_algo "
          "(CHUNK; got %d)", be, (int)kla_last_algo(ctx));
    free_prob(&F), free_prob(&Bw), free_prob(&D), free_prob(&G);

    char buf[256];
    kla_describe(ctx, buf, sizeof buf);
    check(!strncmp(buf, be, strlen(be)), "%s: kla_describe names the backend (\"%s\")", be, buf);
    char small[4] = { 'x', 'x', 'x', 'x' };
    kla_describe(ctx, small, sizeof small);
    check(memchr(small, 0, sizeof small) && !strncmp(small, be, 3), "%s: kla_describe truncates to the buffer (\"%s\")", be, small);
    kla_close(&ctx);
}

/* ---- CPU masks ---- */

static void check_cpu_mask(void)
{
    const struct { const char *s; unsigned want; } good[] = {
        { "0", 0 }, { "3", 3 }, { "0x2", 2 }, { "7", 7 }, { "avx2", KLA_CPU_AVX2 }, { "avx512", KLA_CPU_AVX512 },
        { "neon", KLA_CPU_NEON }, { "avx2,avx512", KLA_CPU_AVX2 | KLA_CPU_AVX512 },
        { "avx2+avx512", KLA_CPU_AVX2 | KLA_CPU_AVX512 }, { "none", 0 }, { "c", 0 }, { "all", KLA_CPU_ALL },
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        unsigned m = 0xdead;
        const int r = kla_cpu_mask_parse(good[i].s, &m);
        check(r == 0 && m == good[i].want, "kla_cpu_mask_parse(\"%s\") = 0x%x (got %d, 0x%x)", good[i].s, good[i].want, r, m);
    }
    const char *bad[] = { "", "avx3", "avx2,", ",avx2", "avx2,,avx512", "8", "-1", "1x", "0x", "4294967297", "avx2 ", "AVX2x" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        unsigned m = 0xdead;
        check(kla_cpu_mask_parse(bad[i], &m) == KLA_EINVAL, "kla_cpu_mask_parse(\"%s\") -> KLA_EINVAL", bad[i]);
    }
    check(kla_cpu_mask_parse(NULL, &(unsigned){ 0 }) == KLA_EINVAL && kla_cpu_mask_parse("3", NULL) == KLA_EINVAL,
          "kla_cpu_mask_parse with NULL -> KLA_EINVAL");

    /* KLA_CPU_MASK: a bad value makes kla_open fail, whatever the backend, naming it */
    const char *old = getenv("KLA_CPU_MASK");
    char *saved = old ? strdup(old) : NULL;
    KlaParams p;
    kla_default_params(&p);
    p.backend = "ref";
    setenv("KLA_CPU_MASK", "garbage", 1);
    KlaContext *ctx = (KlaContext *)&p;
    int r = kla_open(&ctx, &p);
    check(r == KLA_EINVAL && ctx == NULL && strstr(kla_error_detail(NULL), "KLA_CPU_MASK"),
          "KLA_CPU_MASK=garbage: kla_open fails, kla_error_detail(NULL) names KLA_CPU_MASK (\"%s\")", kla_error_detail(NULL));
    setenv("KLA_CPU_MASK", "avx2,", 1);
    r = kla_open(&ctx, &p);
    check(r == KLA_EINVAL && ctx == NULL, "KLA_CPU_MASK=\"avx2,\": kla_open fails");
    setenv("KLA_CPU_MASK", "avx2+avx512", 1);
    r = kla_open(&ctx, &p);
    check(r == 0 && ctx, "KLA_CPU_MASK=avx2+avx512: kla_open works (%s)", r ? kla_error_detail(NULL) : "ok");
    kla_close(&ctx);
    if (kla_backend_available("simd") == 1) {
        char buf[256] = "";
        setenv("KLA_CPU_MASK", "none", 1);
        p.backend = "simd";
        r = kla_open(&ctx, &p);
        if (!r) kla_describe(ctx, buf, sizeof buf);
        check(r == 0 && !strncmp(buf, "simd: c,", 8), "KLA_CPU_MASK=none: kla_describe of simd says the c level (\"%s\")", buf);
        kla_close(&ctx);
        unsetenv("KLA_CPU_MASK");
        p.cpu_mask = 0;
        r = kla_open(&ctx, &p);
        if (!r) kla_describe(ctx, buf, sizeof buf);
        check(r == 0 && !strncmp(buf, "simd: c,", 8), "cpu_mask = 0: kla_describe of simd says the c level (\"%s\")", buf);
        kla_close(&ctx);
    }
    if (saved) setenv("KLA_CPU_MASK", saved, 1);
    else unsetenv("KLA_CPU_MASK");
    free(saved);
    check(kla_strerror(KLA_EBUSY) && strcmp(kla_strerror(KLA_EBUSY), kla_strerror(12345)) && !strcmp(kla_version(), "0.4.0"),
          "kla_strerror(KLA_EBUSY) = \"%s\", kla_version() = \"%s\"", kla_strerror(KLA_EBUSY), kla_version());
}

/* ---- two threads on one context ---- */

typedef struct hammer {
    KlaContext *ctx;
    KlaState *st;        /* reader threads: kla_state_read this */
    const prob *P;       /* the call */
    const double *want;  /* its o (or the state read), bit for bit */
    atomic_int *busy_seen, *stop;
    int calls, ok_calls, busy, bad, wrong, bad_msg, touched;
    char msg[200];
} hammer;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *hammer_run(void *arg)
{
    hammer *h = arg;
    const prob *P = h->P;
    const int64_t n = h->st ? P->n[X_ST] : P->n[X_O];
    const size_t es = P->dt == KLA_F64 ? 8 : 4;
    char *o = malloc((size_t)(n + 1) * es); /* this thread's own output */
    const double t_end = now_s() + 20;
    for (int i = 0; i < 100000 && !atomic_load(h->stop); i++) {
        if (now_s() > t_end) break;
        for (int64_t j = 0; j <= n; j++) {
            if (es == 8) ((double *)o)[j] = SENTINEL;
            else ((float *)o)[j] = (float)SENTINEL;
        }
        int r;
        if (h->st) {
            r = kla_state_read(h->st, KLA_OUT(o, P->dt, n), KLA_LAYOUT_KV);
        } else {
            KlaTensors t = tensors_prob(P);
            t.o.data = o;
            r = kla_forward(h->ctx, &P->s, &P->opt, &t);
        }
        h->calls++;
        if (r == KLA_EBUSY) {
            h->busy++;
            atomic_store(h->busy_seen, 1);
            const char *m = kla_error_detail(h->ctx);
            if (!strstr(m, "another thread")) h->bad_msg++, snprintf(h->msg, sizeof h->msg, "%s", m);
            for (int64_t j = 0; j <= n; j++)
                if ((es == 8 ? ((double *)o)[j] : ((float *)o)[j]) != (es == 8 ? SENTINEL : (float)SENTINEL)) {
                    h->touched++;
                    break;
                }
        } else if (r == 0) {
            h->ok_calls++;
            for (int64_t j = 0; j < n; j++)
                if ((es == 8 ? ((double *)o)[j] : ((float *)o)[j]) != h->want[j]) {
                    h->wrong++;
                    break;
                }
        } else {
            h->bad++;
            snprintf(h->msg, sizeof h->msg, "%s: %s", kla_strerror(r), kla_error_detail(h->ctx));
        }
        /* enough: EBUSY seen and this thread has had its own successes */
        if (atomic_load(h->busy_seen) && h->ok_calls >= 5 && h->calls >= 50) break;
    }
    free(o);
    return NULL;
}

static void check_threads(const char *be)
{
    KlaContext *ctx = open_backend(be);
    prob P;
    /* a mid-size forward: long enough that the other thread's calls land inside it */
    make_prob(&P, real_of(be), OP_FWD, KLA_MODE_KLA, 1, 128, 2, 2, 32, 32, 0, NULL, 0);
    P.opt.algo = KLA_ALGO_RECURRENT;
    free(P.x[X_HT]), free(P.copy[X_HT]); /* o only: each thread writes its own */
    P.x[X_HT] = P.copy[X_HT] = NULL;
    KlaTensors t = tensors_prob(&P);
    int r = call_prob(ctx, &P, &t);
    double *want = malloc((size_t)P.n[X_O] * 8);
    for (int64_t j = 0; j < P.n[X_O]; j++) want[j] = xget(&P, X_O, j);
    KlaState *st = NULL;
    r |= kla_state_new(ctx, 1, 2, 32, 32, &st);
    double *sw = malloc(2 * 32 * 32 * 8);
    for (int j = 0; j < 2 * 32 * 32; j++) sw[j] = f32(nrand());
    r |= kla_state_write(st, KLA_F64_IN(sw, 2 * 32 * 32), KLA_LAYOUT_KV);
    check(r == 0, "%s threads: the single-threaded run (%s)", be, r ? kla_error_detail(ctx) : "ok");
    prob S; /* the reader's view: the state as its output */
    memset(&S, 0, sizeof S);
    S.dt = P.dt, S.n[X_ST] = 2 * 32 * 32;

    for (int mode = 0; mode < 2; mode++) { /* two forwards; a forward and a KlaState reader */
        atomic_int seen, stop;
        atomic_init(&seen, 0), atomic_init(&stop, 0);
        hammer h[2];
        pthread_t th[2];
        for (int i = 0; i < 2; i++) {
            memset(&h[i], 0, sizeof h[i]);
            h[i].ctx = ctx, h[i].busy_seen = &seen, h[i].stop = &stop;
            h[i].P = &P, h[i].want = want;
            if (mode == 1 && i == 1) h[i].st = st, h[i].P = &S, h[i].want = sw;
        }
        int started = 0;
        for (int i = 0; i < 2; i++) started += pthread_create(&th[i], NULL, hammer_run, &h[i]) == 0;
        if (started < 2) atomic_store(&stop, 1);
        for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
        const char *what = mode ? "a forward and kla_state_read" : "two threads of forwards";
        const int calls = h[0].calls + h[1].calls, busy = h[0].busy + h[1].busy;
        check(started == 2 && h[0].bad + h[1].bad == 0, "%s %s on one context: every call returns 0 or KLA_EBUSY (%d calls%s%s)",
              be, what, calls, h[0].bad + h[1].bad ? ": " : "", h[0].bad ? h[0].msg : h[1].bad ? h[1].msg : "");
        check(busy > 0, "%s %s: KLA_EBUSY seen (%d of %d calls)", be, what, busy, calls);
        check(h[0].ok_calls > 0 && h[1].ok_calls > 0 && h[0].wrong + h[1].wrong == 0,
              "%s %s: the successful calls (%d, %d) give the single-threaded result bit for bit", be, what, h[0].ok_calls,
              h[1].ok_calls);
        check(h[0].bad_msg + h[1].bad_msg == 0 && h[0].touched + h[1].touched == 0,
              "%s %s: after KLA_EBUSY, kla_error_detail(ctx) in that thread says \"another thread\" and its output is untouched%s%s",
              be, what, h[0].bad_msg + h[1].bad_msg ? ": " : "", h[0].bad_msg ? h[0].msg : h[1].msg);
    }
    /* the context still works alone, with its own messages */
    t = tensors_prob(&P);
    t.q.numel++;
    r = call_prob(ctx, &P, &t);
    check(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "tensor q: "), "%s threads: afterwards the context works alone (\"%s\")",
          be, kla_error_detail(ctx));
    kla_state_free(&st);
    free(want), free(sw);
    free_prob(&P);
    kla_close(&ctx);
}

static void check_contract(void)
{
    const char *bes[] = { "ref", "ref64", "simd" };
    for (int b = 0; b < 3; b++) {
        if (kla_backend_available(bes[b]) != 1) {
            printf("# %s: not built or not usable here, its contract checks skipped\n", bes[b]);
            continue;
        }
        KlaContext *ctx = open_backend(bes[b]);
        check_sizes(ctx, bes[b]);
        check_overlaps(ctx, bes[b]);
        check_state_sizes(ctx, bes[b]);
        check_scale(ctx, bes[b]);
        check_overflow(ctx, bes[b]);
        kla_close(&ctx);
        check_last_algo(bes[b]);
    }
    check_cpu_mask();
    check_threads("ref");
    if (kla_backend_available("simd") == 1) check_threads("simd");
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
    if (!only || !strcmp(only, "contract")) check_contract();
    printf("1..%d\n", n_test);
    printf("# %d passed, %d failed\n", n_test - n_fail, n_fail);
    return n_fail ? 1 : 0;
}
