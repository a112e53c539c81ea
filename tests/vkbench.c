/*
 * vkbench.c: timings of the Vulkan backend (docs/benchmarks.md, "Vulkan"), and with
 * `check`, a comparison with ref64 on mid-sized problems. Wall times are whole API calls
 * (host-to-device uploads and downloads included); GPU times are the dispatches alone,
 * from timestamp queries.
 *   vkbench            the benchmark table
 *   vkbench check      accuracy against ref64 (too large for llvmpipe, whose loop
 *                      limit cuts long shaders short; VKBENCH_SHAPE=T,H,K,V picks one)
 * VKBENCH_BACKEND names another backend (for comparison).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kla.h"

double kla__vulkan_last_gpu_ms(void); /* vulkan/vk_backend.c */
int kla__vulkan_last_gpu_split(double *ms, int max);

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float *frand(size_t n, double lo, double hi)
{
    float *x = malloc((n ? n : 1) * sizeof *x);
    if (!x) exit(2);
    for (size_t i = 0; i < n; i++) {
        rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
        x[i] = (float)(lo + (hi - lo) * (double)(rng >> 11) / 9007199254740992.0);
    }
    return x;
}

static int cmpd(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct prob {
    int64_t T, H, K, V, N; /* N: decode sequences */
    float *q, *k, *v, *g, *eta, *dout, *o, *ht, *dq, *dk, *dv, *dg, *deta, *state;
} prob;

static void prob_init(prob *p, int64_t T, int64_t H, int64_t K, int64_t V)
{
    memset(p, 0, sizeof *p);
    p->T = T, p->H = H, p->K = K, p->V = V;
    const size_t nq = (size_t)(T * H * K), nv = (size_t)(T * H * V), ns = (size_t)(T * H);
    p->q = frand(nq, -1, 1), p->k = frand(nq, -1, 1), p->v = frand(nv, -1, 1);
    p->g = frand(ns, -0.1, 0), p->eta = frand(ns, 0.2, 1), p->dout = frand(nv, -1, 1);
    p->o = calloc(nv, 4), p->dv = calloc(nv, 4), p->dq = calloc(nq, 4), p->dk = calloc(nq, 4);
    p->dg = calloc(ns, 4), p->deta = calloc(ns, 4), p->ht = calloc((size_t)(H * K * V), 4);
}

static void prob_free(prob *p)
{
    free(p->q), free(p->k), free(p->v), free(p->g), free(p->eta), free(p->dout), free(p->o);
    free(p->dv), free(p->dq), free(p->dk), free(p->dg), free(p->deta), free(p->ht), free(p->state);
}

/* op: 0 forward recurrent, 1 forward chunk, 2 forward+backward, 3 decode (T = N sequences) */
static int call(KlaContext *ctx, prob *p, int op)
{
    KlaShape s = { .B = 1, .T = p->T, .H = p->H, .HV = p->H, .K = p->K, .V = p->V };
    KlaOptions opt;
    kla_default_options(&opt);
    opt.l2norm_q = opt.l2norm_k = 1;
    opt.algo = op == 0 ? KLA_ALGO_RECURRENT : KLA_ALGO_CHUNK;
    KlaTensors t = { .q = KLA_F32_IN(p->q), .k = KLA_F32_IN(p->k), .v = KLA_F32_IN(p->v),
                     .g = KLA_F32_IN(p->g), .eta = KLA_F32_IN(p->eta), .o = KLA_F32_OUT(p->o) };
    if (op == 3) {
        s.B = p->T, s.T = 1;
        t.state = KLA_F32_OUT(p->state);
        return kla_decode(ctx, &s, &opt, &t);
    }
    t.ht = KLA_F32_OUT(p->ht);
    if (op < 2) return kla_forward(ctx, &s, &opt, &t);
    t.dout = KLA_F32_IN(p->dout);
    t.dq = KLA_F32_OUT(p->dq), t.dk = KLA_F32_OUT(p->dk), t.dv = KLA_F32_OUT(p->dv);
    t.dg = KLA_F32_OUT(p->dg), t.deta = KLA_F32_OUT(p->deta);
    return kla_backward(ctx, &s, &opt, &t);
}

static void bench(KlaContext *ctx, const char *what, prob *p, int op, int reps)
{
    double wall[64], gpu[64], split[8] = { 0 }, sp[8];
    int nsplit = 0;
    if (reps > 64) reps = 64;
    int r = call(ctx, p, op); /* warm-up: pipelines, buffers */
    for (int i = 0; i < reps && !r; i++) {
        double t0 = now_ms();
        r = call(ctx, p, op);
        wall[i] = now_ms() - t0;
        gpu[i] = kla__vulkan_last_gpu_ms();
        nsplit = kla__vulkan_last_gpu_split(sp, 8);
        for (int j = 0; j < nsplit; j++) split[j] += sp[j] / reps;
    }
    if (r) {
        printf("| %s | failed: %s |\n", what, kla_error_detail(ctx));
        return;
    }
    qsort(wall, (size_t)reps, sizeof(double), cmpd);
    qsort(gpu, (size_t)reps, sizeof(double), cmpd);
    printf("| %s | %.3f | %.3f | %.3f |", what, gpu[reps / 2], gpu[0], wall[reps / 2]);
    for (int j = 0; j < nsplit; j++) printf("%s%.3f", j ? " + " : " ", split[j]);
    printf(" |\n");
    fflush(stdout);
}

static void run_bench(KlaContext *ctx)
{
    printf("| operation | GPU ms (median) | GPU ms (min) | API call ms (median) | GPU ms per dispatch (mean) |\n"
           "|---|---|---|---|---|\n");
    const int64_t cfg[2][3] = { { 16, 128, 128 }, { 12, 96, 192 } };
    for (int c = 0; c < 2; c++) {
        const int64_t H = cfg[c][0], K = cfg[c][1], V = cfg[c][2];
        char w[160];
        prob p;
        prob_init(&p, 4096, H, K, V);
        snprintf(w, sizeof w, "forward chunk T=4096 H=%lld K=%lld V=%lld", (long long)H, (long long)K, (long long)V);
        bench(ctx, w, &p, 1, 9);
        prob_free(&p);
        prob_init(&p, 32768, H, K, V);
        snprintf(w, sizeof w, "forward chunk T=32768 H=%lld K=%lld V=%lld", (long long)H, (long long)K, (long long)V);
        bench(ctx, w, &p, 1, 5);
        snprintf(w, sizeof w, "forward recurrent T=32768 H=%lld K=%lld V=%lld", (long long)H, (long long)K, (long long)V);
        bench(ctx, w, &p, 0, 3);
        snprintf(w, sizeof w, "forward+backward T=32768 H=%lld K=%lld V=%lld", (long long)H, (long long)K, (long long)V);
        bench(ctx, w, &p, 2, 3);
        prob_free(&p);
        const int64_t ns[3] = { 1, 16, 256 };
        for (int i = 0; i < 3; i++) {
            prob_init(&p, ns[i], H, K, V);
            p.state = frand((size_t)(ns[i] * H * K * V), -0.01, 0.01);
            snprintf(w, sizeof w, "decode %lld sequence(s) H=%lld K=%lld V=%lld", (long long)ns[i], (long long)H,
                     (long long)K, (long long)V);
            bench(ctx, w, &p, 3, 31);
            prob_free(&p);
        }
    }
}

static double rel_rmse(const double *ref, const float *got, size_t n)
{
    double se = 0, sr = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        se += (ref[i] - got[i]) * (ref[i] - got[i]), sr += ref[i] * ref[i];
    }
    return sqrt(se / (sr > 0 ? sr : 1));
}

/* forward (both algorithms), backward and decode against ref64; returns failures */
static int run_check(KlaContext *vk)
{
    KlaParams pr;
    kla_default_params(&pr);
    pr.backend = "ref64";
    KlaContext *ref;
    if (kla_open(&ref, &pr) < 0) return 1;
    const int64_t cfg[3][4] = { { 512, 4, 128, 128 }, { 300, 3, 96, 192 }, { 1000, 2, 64, 64 } };
    int fails = 0;
    const char *env = getenv("VKBENCH_SHAPE"); /* "T,H,K,V": one shape instead */
    long long eT, eH, eK, eV;
    const int one = env && sscanf(env, "%lld,%lld,%lld,%lld", &eT, &eH, &eK, &eV) == 4;
    for (int c = 0; c < (one ? 1 : 3); c++) {
        const int64_t T = one ? eT : cfg[c][0], H = one ? eH : cfg[c][1], K = one ? eK : cfg[c][2],
                      V = one ? eV : cfg[c][3];
        const size_t nq = (size_t)(T * H * K), nv = (size_t)(T * H * V), ns = (size_t)(T * H), nst = (size_t)(H * K * V);
        float *q = frand(nq, -1, 1), *k = frand(nq, -1, 1), *v = frand(nv, -1, 1), *g = frand(ns, -0.2, 0);
        float *eta = frand(ns, 0.2, 1), *dout = frand(nv, -1, 1), *h0 = frand(nst, -0.1, 0.1);
        float *out[8];
        double *rout[8];
        const size_t sz[8] = { nv, nst, nq, nq, nv, ns, ns, nst };
        const char *nm[8] = { "o", "ht", "dq", "dk", "dv", "dg", "deta", "dh0" };
        for (int i = 0; i < 8; i++) out[i] = calloc(sz[i], 4), rout[i] = calloc(sz[i], 8);
        KlaShape s = { .B = 1, .T = T, .H = H, .HV = H, .K = K, .V = V };
        KlaOptions opt;
        kla_default_options(&opt);
        opt.l2norm_q = 1;
        KlaTensors t = { .q = KLA_F32_IN(q), .k = KLA_F32_IN(k), .v = KLA_F32_IN(v), .g = KLA_F32_IN(g),
                         .eta = KLA_F32_IN(eta), .h0 = KLA_F32_IN(h0), .dout = KLA_F32_IN(dout) };
        for (int op = 0; op < 3; op++) {
            KlaTensors tv = t, tr = t;
            opt.algo = op == 1 ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;
            tv.o = KLA_F32_OUT(out[0]), tv.ht = KLA_F32_OUT(out[1]);
            tr.o = KLA_F64_OUT(rout[0]), tr.ht = KLA_F64_OUT(rout[1]);
            int nout = 2;
            if (op == 2) {
                nout = 8;
                tv.dq = KLA_F32_OUT(out[2]), tv.dk = KLA_F32_OUT(out[3]), tv.dv = KLA_F32_OUT(out[4]);
                tv.dg = KLA_F32_OUT(out[5]), tv.deta = KLA_F32_OUT(out[6]), tv.dh0 = KLA_F32_OUT(out[7]);
                tr.dq = KLA_F64_OUT(rout[2]), tr.dk = KLA_F64_OUT(rout[3]), tr.dv = KLA_F64_OUT(rout[4]);
                tr.dg = KLA_F64_OUT(rout[5]), tr.deta = KLA_F64_OUT(rout[6]), tr.dh0 = KLA_F64_OUT(rout[7]);
            } else {
                tv.dout = tr.dout = (KlaIn){ 0 };
            }
            int r = op == 2 ? kla_backward(vk, &s, &opt, &tv) || kla_backward(ref, &s, &opt, &tr)
                            : kla_forward(vk, &s, &opt, &tv) || kla_forward(ref, &s, &opt, &tr);
            printf("T=%lld H=%lld K=%lld V=%lld %-18s", (long long)T, (long long)H, (long long)K, (long long)V,
                   op == 0 ? "forward recurrent" : op == 1 ? "forward chunk" : "backward");
            if (r) {
                printf(" FAILED %s\n", kla_error_detail(vk));
                fails++;
                continue;
            }
            for (int i = 0; i < nout; i++) {
                double e = rel_rmse(rout[i], out[i], sz[i]);
                int bad = e > (i < 2 ? 1e-5 : 1e-4);
                fails += bad;
                printf(" %s %.1e%s", nm[i], e, bad ? "(!)" : "");
            }
            printf("\n");
        }
        /* decode: the state after the forward, one more token */
        {
            KlaShape sd = { .B = 1, .T = 1, .H = H, .HV = H, .K = K, .V = V };
            float *st = malloc(nst * 4);
            double *rst = malloc(nst * 8);
            for (size_t i = 0; i < nst; i++) st[i] = h0[i], rst[i] = h0[i];
            KlaTensors tv = { .q = KLA_F32_IN(q), .k = KLA_F32_IN(k), .v = KLA_F32_IN(v), .g = KLA_F32_IN(g),
                              .eta = KLA_F32_IN(eta) };
            KlaTensors tr = tv;
            tv.o = KLA_F32_OUT(out[0]), tv.state = KLA_F32_OUT(st);
            tr.o = KLA_F64_OUT(rout[0]), tr.state = KLA_F64_OUT(rst);
            int r = kla_decode(vk, &sd, &opt, &tv) || kla_decode(ref, &sd, &opt, &tr);
            double e1 = r ? INFINITY : rel_rmse(rout[0], out[0], (size_t)(H * V)), e2 = r ? INFINITY : rel_rmse(rst, st, nst);
            fails += !(e1 <= 1e-5) + !(e2 <= 1e-5);
            printf("T=%lld H=%lld K=%lld V=%lld decode             o %.1e state %.1e\n", (long long)T, (long long)H,
                   (long long)K, (long long)V, e1, e2);
            free(st), free(rst);
        }
        for (int i = 0; i < 8; i++) free(out[i]), free(rout[i]);
        free(q), free(k), free(v), free(g), free(eta), free(dout), free(h0);
    }
    kla_close(&ref);
    printf("check: %d failure(s)\n", fails);
    return fails;
}

int main(int argc, char **argv)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = getenv("VKBENCH_BACKEND") ? getenv("VKBENCH_BACKEND") : "vulkan";
    KlaContext *ctx;
    int r = kla_open(&ctx, &p);
    if (r < 0) {
        fprintf(stderr, "vkbench: no Vulkan backend: %s\n", kla_strerror(r));
        return 1;
    }
    char devs[1024];
    kla_vulkan_devices(devs, sizeof devs);
    printf("Vulkan devices:\n%s\n", devs);
    int fails = 0;
    if (argc > 1 && !strcmp(argv[1], "check")) fails = run_check(ctx);
    else run_bench(ctx);
    kla_close(&ctx);
    return fails ? 1 : 0;
}
