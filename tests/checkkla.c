/*
 * checkkla: checkasm-style cross-check of the simd backend. Every kernel (recurrent
 * forward, chunkwise forward, chunkwise backward, decode) at every CPU level this machine
 * has (forced through KlaParams.cpu_mask) is compared with the float64 reference on
 * seeded random inputs, with guard zones around every output (out-of-bounds writes) and
 * bit-identity across 1, 2 and 3 threads. TAP on stdout.
 *
 *   checkkla [--seed N] [--long] [--bench] [--verbose]
 *
 * --seed replays a run (the seed is printed first); --long adds a T = 65536 accuracy
 * case; --bench prints each level's time per kernel on B=1 H=4 T=1024 K=V=128.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kla.h"
#include "tap.h"

#define GUARD 64
#define GUARD_BITS 0x7fc0deadu

static int verbose;

/* ---- random numbers (splitmix64) ---------------------------------------------------- */
static uint64_t rng;
static double urand(void)
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}
static void fill(float *x, int64_t n, double lo, double hi)
{
    for (int64_t i = 0; i < n; i++) x[i] = (float)(lo + (hi - lo) * urand());
}

/* ---- guarded output buffers ----------------------------------------------------------- */
static float *gnew(int64_t n)
{
    float *b = malloc((size_t)(n + 2 * GUARD) * sizeof(float));
    if (!b) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    uint32_t bits = GUARD_BITS;
    for (int64_t i = 0; i < n + 2 * GUARD; i++) memcpy(&b[i], &bits, 4);
    return b + GUARD;
}
static int gok(const float *x, int64_t n)
{
    uint32_t bits;
    for (int64_t i = -GUARD; i < 0; i++)
        if (memcpy(&bits, &x[i], 4), bits != GUARD_BITS) return 0;
    for (int64_t i = n; i < n + GUARD; i++)
        if (memcpy(&bits, &x[i], 4), bits != GUARD_BITS) return 0;
    return 1;
}
static void gfree(float *x)
{
    if (x) free(x - GUARD);
}

static double rel_rmse(const double *ref, const float *got, int64_t n)
{
    double se = 0, sr = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        se += (ref[i] - got[i]) * (ref[i] - got[i]);
        sr += ref[i] * ref[i];
    }
    return sr > 0 ? sqrt(se / sr) : sqrt(se);
}

/* ---- a test case ----------------------------------------------------------------------- */
typedef struct tcase {
    const char *name;
    int64_t B, T, H, HV, K, V;
    int mode, l2q, l2k, has_g, has_h0, has_dht, chunk, want_dg, want_dh0, vk;
    int nseq; const int64_t *cu; /* cu_seqlens (B = 1) */
    double scale;
} tcase;

enum { X_Q, X_K, X_V, X_G, X_A, X_H0, X_DO, X_DHT, NX };
enum { Y_O, Y_HT, Y_DQ, Y_DK, Y_DV, Y_DG, Y_DA, Y_DH0, NY };
static const char *yname[NY] = { "o", "ht", "dq", "dk", "dv", "dg", "da", "dh0" };

typedef struct data {
    KlaShape s;
    KlaOptions opt;
    int64_t nx[NX], ny[NY];
    float *x[NX];
    double *ref[NY];
    int64_t cu64[16];
} data;

static void make(const tcase *c, data *d)
{
    memset(d, 0, sizeof *d);
    const int64_t N = c->cu ? c->nseq : c->B, total = c->B * c->T;
    d->s = (KlaShape){ c->B, c->T, c->H, c->HV, c->K, c->V, N };
    kla_default_options(&d->opt);
    d->opt.mode = c->mode, d->opt.l2norm_q = c->l2q, d->opt.l2norm_k = c->l2k;
    d->opt.chunk_size = c->chunk;
    d->opt.scale = c->scale != 0 ? c->scale : KLA_SCALE_DEFAULT; /* 0 in the tables: K^-1/2 */
    d->opt.state_layout = c->vk ? KLA_LAYOUT_VK : KLA_LAYOUT_KV;
    if (c->cu) memcpy(d->cu64, c->cu, (size_t)(N + 1) * sizeof(int64_t));
    const int64_t nq = total * c->H * c->K, nv = total * c->HV * c->V, ns = total * c->HV;
    const int64_t nst = N * c->HV * c->K * c->V;
    const int64_t nx[NX] = { nq, nq, nv, ns, ns, nst, nv, nst };
    const int64_t ny[NY] = { nv, nst, nq, nq, nv, ns, ns, nst };
    memcpy(d->nx, nx, sizeof nx), memcpy(d->ny, ny, sizeof ny);
    for (int i = 0; i < NX; i++) d->x[i] = malloc((size_t)nx[i] * sizeof(float) + 4);
    /* q, k unnormalised of moderate size; with l2norm_k off in GDN, k is scaled so that
     * beta ||k||^2 < 2 (a contraction), as a trained model has it */
    const double ks = c->mode == KLA_MODE_GDN && !c->l2k ? 1.0 / sqrt((double)c->K) : 1.0;
    fill(d->x[X_Q], nq, -1, 1);
    fill(d->x[X_K], nq, -ks, ks);
    fill(d->x[X_V], nv, -1, 1);
    fill(d->x[X_G], ns, -0.3, 0);
    if (c->mode == KLA_MODE_KLA) fill(d->x[X_A], ns, 0.1, 1.0);
    else fill(d->x[X_A], ns, 0.05, c->l2k ? 1.0 : 0.9);
    fill(d->x[X_H0], nst, -0.5, 0.5);
    fill(d->x[X_DO], nv, -1, 1);
    fill(d->x[X_DHT], nst, -0.5, 0.5);
}

static KlaTensors tensors(const tcase *c, data *d, int backward)
{
    KlaTensors t = { 0 };
    t.q = KLA_F32_IN(d->x[X_Q], d->nx[X_Q]), t.k = KLA_F32_IN(d->x[X_K], d->nx[X_K]);
    t.v = KLA_F32_IN(d->x[X_V], d->nx[X_V]);
    if (c->has_g) t.g = KLA_F32_IN(d->x[X_G], d->nx[X_G]);
    if (c->mode == KLA_MODE_KLA) t.eta = KLA_F32_IN(d->x[X_A], d->nx[X_A]);
    else t.beta = KLA_F32_IN(d->x[X_A], d->nx[X_A]);
    if (c->has_h0) t.h0 = KLA_F32_IN(d->x[X_H0], d->nx[X_H0]);
    if (c->cu) t.cu_seqlens = KLA_IN(d->cu64, KLA_I64, c->nseq + 1);
    if (backward) {
        t.dout = KLA_F32_IN(d->x[X_DO], d->nx[X_DO]);
        if (c->has_dht) t.dht = KLA_F32_IN(d->x[X_DHT], d->nx[X_DHT]);
    }
    return t;
}

/* point the outputs at y[] (float) or yd[] (double), each of d->ny[] elements */
static void outputs(const tcase *c, const data *d, KlaTensors *t, int backward, void **y, KlaDtype dt)
{
    const int64_t *n = d->ny;
    t->o = KLA_OUT(y[Y_O], dt, n[Y_O]), t->ht = KLA_OUT(y[Y_HT], dt, n[Y_HT]);
    if (!backward) return;
    t->dq = KLA_OUT(y[Y_DQ], dt, n[Y_DQ]), t->dk = KLA_OUT(y[Y_DK], dt, n[Y_DK]);
    t->dv = KLA_OUT(y[Y_DV], dt, n[Y_DV]);
    if (c->want_dg) t->dg = KLA_OUT(y[Y_DG], dt, n[Y_DG]);
    if (c->mode == KLA_MODE_KLA) t->deta = KLA_OUT(y[Y_DA], dt, n[Y_DA]);
    else t->dbeta = KLA_OUT(y[Y_DA], dt, n[Y_DA]);
    if (c->want_dh0) t->dh0 = KLA_OUT(y[Y_DH0], dt, n[Y_DH0]);
}

static int nouts(int backward) { return backward ? NY : 2; }
static int wanted(const tcase *c, int i)
{
    return !((i == Y_DG && !c->want_dg) || (i == Y_DH0 && !c->want_dh0));
}

static int run_ref64(const tcase *c, data *d)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = "ref64";
    KlaContext *ctx;
    if (kla_open(&ctx, &p) < 0) return -1;
    for (int i = 0; i < NY; i++) d->ref[i] = calloc((size_t)d->ny[i] + 1, sizeof(double));
    KlaTensors t = tensors(c, d, 1);
    void *y[NY];
    for (int i = 0; i < NY; i++) y[i] = d->ref[i];
    outputs(c, d, &t, 1, y, KLA_F64);
    d->opt.algo = KLA_ALGO_RECURRENT;
    int r = kla_backward(ctx, &d->s, &d->opt, &t);
    if (r < 0) fprintf(stderr, "ref64: %s\n", kla_error_detail(ctx));
    kla_close(&ctx);
    return r;
}

/* Runs the simd backend; outputs in guarded float buffers y[]. */
static int run_simd(const tcase *c, data *d, unsigned mask, int threads, int algo, int backward,
                    float **y)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = "simd", p.cpu_mask = mask, p.threads = threads;
    KlaContext *ctx;
    int r = kla_open(&ctx, &p);
    if (r < 0) return r;
    for (int i = 0; i < NY; i++) y[i] = gnew(d->ny[i]);
    KlaTensors t = tensors(c, d, backward);
    void *yy[NY];
    for (int i = 0; i < NY; i++) yy[i] = y[i];
    outputs(c, d, &t, backward, yy, KLA_F32);
    d->opt.algo = algo;
    r = backward ? kla_backward(ctx, &d->s, &d->opt, &t) : kla_forward(ctx, &d->s, &d->opt, &t);
    if (r < 0) fprintf(stderr, "simd: %s\n", kla_error_detail(ctx));
    kla_close(&ctx);
    return r;
}

static void yfree(float **y)
{
    for (int i = 0; i < NY; i++) gfree(y[i]), y[i] = NULL;
}

typedef struct level {
    const char *name;
    unsigned mask;
} level;

static void check_case(const tcase *c, const level *lv, int nlv)
{
    data d;
    make(c, &d);
    if (run_ref64(c, &d) < 0) {
        check(0, "%s: ref64 failed", c->name);
        return;
    }
    const struct { const char *name; int algo, backward; } kernels[] = {
        { "forward recurrent", KLA_ALGO_RECURRENT, 0 },
        { "forward chunk", KLA_ALGO_CHUNK, 0 },
        { "backward", KLA_ALGO_AUTO, 1 },
    };
    for (int l = 0; l < nlv; l++)
        for (int kk = 0; kk < 3; kk++) {
            float *y[NY] = { 0 }, *y2[NY] = { 0 };
            const int bw = kernels[kk].backward;
            int r = run_simd(c, &d, lv[l].mask, 2, kernels[kk].algo, bw, y);
            int ok = r == 0, guards = 1;
            double worst = 0;
            const char *worst_name = "";
            for (int i = 0; ok && i < nouts(bw); i++) {
                if (!wanted(c, i)) continue;
                guards &= gok(y[i], d.ny[i]);
                const double e = rel_rmse(d.ref[i], y[i], d.ny[i]);
                const double tol = i < 2 ? 1e-5 : 1e-4;
                if (!(e <= tol)) ok = 0;
                if (e / tol > worst) worst = e / tol, worst_name = yname[i];
                if (verbose) fprintf(stderr, "# %s %s %s %s rel_rmse %.3g\n", c->name, lv[l].name, kernels[kk].name, yname[i], e);
            }
            check(ok && guards, "%s %s %s (worst %s at %.2f of tolerance%s)", c->name, lv[l].name,
                kernels[kk].name, worst_name, worst, guards ? "" : ", GUARD OVERWRITTEN");
            /* thread-count invariance: 1 and 3 threads bit-identical to 2 */
            int same = r == 0;
            for (int th = 1; th <= 3 && same; th += 2) {
                if (run_simd(c, &d, lv[l].mask, th, kernels[kk].algo, bw, y2) != 0) same = 0;
                for (int i = 0; same && i < nouts(bw); i++)
                    if (wanted(c, i) && memcmp(y[i], y2[i], (size_t)d.ny[i] * sizeof(float))) same = 0;
                yfree(y2);
            }
            check(same, "%s %s %s: 1, 2, 3 threads bit-identical", c->name, lv[l].name, kernels[kk].name);
            yfree(y);
        }
    for (int i = 0; i < NX; i++) free(d.x[i]);
    for (int i = 0; i < NY; i++) free(d.ref[i]);
}

/* decode: N sequences one token each, compared with ref64's decode */
static void check_decode(const tcase *c, const level *lv, int nlv)
{
    data d;
    make(c, &d); /* B = N sequences, T = 1 */
    const int64_t nst = d.nx[X_H0];
    double *sref = malloc((size_t)nst * sizeof(double)), *oref = malloc((size_t)d.ny[Y_O] * sizeof(double));
    for (int64_t i = 0; i < nst; i++) sref[i] = d.x[X_H0][i];
    KlaParams p;
    kla_default_params(&p);
    p.backend = "ref64";
    KlaContext *ctx;
    kla_open(&ctx, &p);
    KlaTensors t = tensors(c, &d, 0);
    t.h0 = (KlaIn){ 0 };
    t.o = KLA_F64_OUT(oref, d.ny[Y_O]), t.state = KLA_F64_OUT(sref, nst);
    int r = kla_decode(ctx, &d.s, &d.opt, &t);
    kla_close(&ctx);
    for (int l = 0; l < nlv; l++) {
        float *st[4], *o[4];
        int same = 1, ok = r == 0;
        double eo = 0, es = 0;
        for (int th = 1; th <= 3; th++) {
            p.backend = "simd", p.cpu_mask = lv[l].mask, p.threads = th;
            st[th] = gnew(nst), o[th] = gnew(d.ny[Y_O]);
            memcpy(st[th], d.x[X_H0], (size_t)nst * sizeof(float));
            if (kla_open(&ctx, &p) < 0) {
                ok = 0;
                continue;
            }
            t.o = KLA_F32_OUT(o[th], d.ny[Y_O]), t.state = KLA_F32_OUT(st[th], nst);
            if (kla_decode(ctx, &d.s, &d.opt, &t) < 0) ok = 0;
            kla_close(&ctx);
            ok &= gok(st[th], nst) && gok(o[th], d.ny[Y_O]);
        }
        if (ok) {
            eo = rel_rmse(oref, o[2], d.ny[Y_O]), es = rel_rmse(sref, st[2], nst);
            ok = eo <= 1e-5 && es <= 1e-5;
            for (int th = 1; th <= 3; th += 2)
                same &= !memcmp(o[th], o[2], (size_t)d.ny[Y_O] * 4) && !memcmp(st[th], st[2], (size_t)nst * 4);
        }
        check(ok, "%s %s decode (o %.2g, state %.2g)", c->name, lv[l].name, eo, es);
        check(ok && same, "%s %s decode: 1, 2, 3 threads bit-identical", c->name, lv[l].name);
        for (int th = 1; th <= 3; th++) gfree(st[th]), gfree(o[th]);
    }
    free(sref), free(oref);
    for (int i = 0; i < NX; i++) free(d.x[i]);
}

/* KLA_CPU_MASK in the environment restricts the level like cpu_mask does: results under
 * KLA_CPU_MASK=m with cpu_mask = all are bit-identical to cpu_mask = m without it */
static void check_env(const tcase *c, const level *lv, int nlv)
{
    data d;
    make(c, &d);
    for (int l = 0; l < nlv; l++) {
        float *y[NY] = { 0 }, *y2[NY] = { 0 };
        char m[16];
        snprintf(m, sizeof m, "0x%x", lv[l].mask);
        int ok = run_simd(c, &d, lv[l].mask, 2, KLA_ALGO_RECURRENT, 0, y) == 0;
        setenv("KLA_CPU_MASK", m, 1);
        ok &= run_simd(c, &d, KLA_CPU_ALL, 2, KLA_ALGO_RECURRENT, 0, y2) == 0;
        unsetenv("KLA_CPU_MASK");
        for (int i = 0; ok && i < 2; i++)
            if (wanted(c, i) && memcmp(y[i], y2[i], (size_t)d.ny[i] * sizeof(float))) ok = 0;
        check(ok, "KLA_CPU_MASK=%s gives the %s level's bits", m, lv[l].name);
        yfree(y), yfree(y2);
    }
    for (int i = 0; i < NX; i++) free(d.x[i]);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void bench(const level *lv, int nlv)
{
    const tcase c = { "bench", 1, 1024, 4, 4, 128, 128, KLA_MODE_KLA, 1, 0, 1, 0, 0, 64, 1, 0, 0, 0, NULL, 0 };
    data d;
    make(&c, &d);
    printf("# bench: B=1 T=1024 H=4 K=V=128, kla mode, 2 threads, best of 3 (ms)\n");
    printf("# %-8s %12s %12s %12s %12s\n", "level", "fwd-rec", "fwd-chunk", "backward", "decode x64");
    for (int l = 0; l < nlv; l++) {
        double best[4] = { 1e9, 1e9, 1e9, 1e9 };
        for (int rep = 0; rep < 3; rep++) {
            float *y[NY];
            for (int kk = 0; kk < 3; kk++) {
                const double t0 = now();
                run_simd(&c, &d, lv[l].mask, 2, kk == 0 ? KLA_ALGO_RECURRENT : KLA_ALGO_CHUNK, kk == 2, y);
                const double dt = now() - t0;
                if (dt < best[kk]) best[kk] = dt;
                yfree(y);
            }
            /* decode: 64 steps of 4 heads from a state of one sequence */
            KlaParams p;
            kla_default_params(&p);
            p.backend = "simd", p.cpu_mask = lv[l].mask, p.threads = 2;
            KlaContext *ctx;
            kla_open(&ctx, &p);
            KlaShape s1 = { 1, 1, 4, 4, 128, 128, 1 };
            float *st = calloc(4 * 128 * 128, sizeof(float)), o[4 * 128];
            /* the first token of the prepared data: [1, 4, 128], [1, 4] */
            KlaTensors t = { .q = KLA_F32_IN(d.x[X_Q], 4 * 128), .k = KLA_F32_IN(d.x[X_K], 4 * 128),
                             .v = KLA_F32_IN(d.x[X_V], 4 * 128), .g = KLA_F32_IN(d.x[X_G], 4),
                             .eta = KLA_F32_IN(d.x[X_A], 4), .o = KLA_F32_OUT(o, 4 * 128),
                             .state = KLA_F32_OUT(st, 4 * 128 * 128) };
            d.opt.algo = KLA_ALGO_AUTO;
            const double t0 = now();
            for (int i = 0; i < 64; i++) kla_decode(ctx, &s1, &d.opt, &t);
            const double dt = now() - t0;
            if (dt < best[3]) best[3] = dt;
            kla_close(&ctx);
            free(st);
        }
        printf("# %-8s %12.3f %12.3f %12.3f %12.3f\n", lv[l].name, best[0] * 1e3, best[1] * 1e3,
               best[2] * 1e3, best[3] * 1e3);
    }
    for (int i = 0; i < NX; i++) free(d.x[i]);
}

int main(int argc, char **argv)
{
    uint64_t seed = (uint64_t)time(NULL);
    int do_bench = 0, do_long = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--bench")) do_bench = 1;
        else if (!strcmp(argv[i], "--long")) do_long = 1;
        else if (!strcmp(argv[i], "--verbose")) verbose = 1;
        else {
            fprintf(stderr, "usage: checkkla [--seed N] [--long] [--bench] [--verbose]\n");
            return 2;
        }
    }
    rng = seed;
    if (kla_backend_available("simd") != 1) {
        printf("1..0 # SKIP simd backend not built or not usable\n");
        return 0;
    }
    const unsigned have = kla_cpu_flags();
    level lv[4];
    int nlv = 0;
    lv[nlv++] = (level){ "c", 0 };
    if (have & KLA_CPU_AVX2) lv[nlv++] = (level){ "avx2", KLA_CPU_AVX2 };
    if (have & KLA_CPU_AVX512) lv[nlv++] = (level){ "avx512", KLA_CPU_AVX2 | KLA_CPU_AVX512 };
    if (have & KLA_CPU_NEON) lv[nlv++] = (level){ "neon", KLA_CPU_NEON };

    static const int64_t cu3[] = { 0, 37, 37, 130 }, cu2[] = { 0, 64, 200 };
    const tcase cases[] = {
        /* name  B T H HV K V  mode  l2q l2k g h0 dht chunk dg dh0 vk nseq cu scale */
        { "kla-basic", 2, 100, 2, 2, 32, 48, KLA_MODE_KLA, 0, 0, 1, 0, 0, 64, 1, 0, 0, 0, NULL, 0 },
        { "gdn-l2norm-grouped-h0-dht", 1, 90, 2, 4, 16, 40, KLA_MODE_GDN, 1, 1, 1, 1, 1, 16, 1, 1, 0, 0, NULL, 0 },
        { "kla-cu-seqlens-empty-seq", 1, 130, 1, 2, 24, 33, KLA_MODE_KLA, 1, 0, 1, 1, 1, 32, 1, 1, 0, 3, cu3, 0 },
        { "kla-no-g-odd-sizes", 1, 70, 1, 3, 7, 5, KLA_MODE_KLA, 0, 1, 0, 0, 1, 64, 0, 1, 0, 0, NULL, 0.5 },
        { "gdn-chunk128-vk-state", 1, 300, 1, 1, 64, 64, KLA_MODE_GDN, 0, 1, 1, 1, 1, 128, 1, 1, 1, 0, NULL, 0 },
        { "kla-cu-seqlens-no-grads-opt", 1, 200, 2, 2, 128, 128, KLA_MODE_KLA, 1, 1, 1, 1, 0, 64, 0, 0, 0, 2, cu2, 0 },
        { "gdn-no-l2norm-chunk16", 2, 33, 1, 1, 20, 36, KLA_MODE_GDN, 0, 0, 1, 0, 1, 16, 1, 0, 0, 0, NULL, 0 },
        /* one (sequence, head) pair, fewer than the 2 and 3 threads of the invariance
         * check: chunks prepared in parallel and the state split by columns (V = 70: two
         * full ranges of 32 and a short one) */
        { "kla-one-pair-split", 1, 300, 1, 1, 40, 70, KLA_MODE_KLA, 1, 1, 1, 1, 1, 32, 1, 1, 0, 0, NULL, 0 },
    };
    const tcase dcases[] = {
        { "decode-kla", 3, 1, 2, 4, 128, 128, KLA_MODE_KLA, 1, 0, 1, 1, 0, 64, 0, 0, 0, 0, NULL, 0 },
        { "decode-gdn-odd", 2, 1, 1, 3, 9, 37, KLA_MODE_GDN, 0, 1, 0, 1, 0, 64, 0, 0, 0, 0, NULL, 0 },
        /* one state, fewer than the threads; V = 200: full column blocks and a tail */
        { "decode-one-state", 1, 1, 1, 1, 64, 200, KLA_MODE_KLA, 1, 1, 1, 1, 0, 64, 0, 0, 0, 0, NULL, 0 },
    };
    const tcase longc = { "long-T65536", 1, 65536, 1, 1, 64, 64, KLA_MODE_KLA, 1, 1, 1, 1, 1, 64, 1, 1, 0, 0, NULL, 0 };
    const tcase midc = { "long-T8192", 1, 8192, 1, 1, 64, 64, KLA_MODE_KLA, 1, 1, 1, 1, 1, 64, 1, 1, 0, 0, NULL, 0 };
    const int ncases = (int)(sizeof cases / sizeof cases[0]), ndc = (int)(sizeof dcases / sizeof dcases[0]);
    const int plan = (ncases + 1) * nlv * 6 + ndc * nlv * 2 + nlv;
    printf("# seed %" PRIu64 " (replay with --seed %" PRIu64 "); levels:", seed, seed);
    for (int l = 0; l < nlv; l++) printf(" %s", lv[l].name);
    printf("\n1..%d\n", plan);
    for (int i = 0; i < ncases; i++) check_case(&cases[i], lv, nlv);
    check_case(do_long ? &longc : &midc, lv, nlv);
    for (int i = 0; i < ndc; i++) check_decode(&dcases[i], lv, nlv);
    check_env(&cases[0], lv, nlv);
    if (do_bench) bench(lv, nlv);
    return n_fail ? 1 : 0;
}
