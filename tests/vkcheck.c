/*
 * vkcheck.c: the Vulkan backend against ref64 on mid-sized problems, for a real GPU
 * (llvmpipe runs the same code in tests/test_vulkan.c on small cases; these sizes take
 * it minutes): forward with both algorithms, backward (chunkwise and recurrent) and
 * decode; rel RMSE bounds 1e-5 for outputs, 1e-4 for gradients. Exit status 1 on any
 * failure. VKCHECK_SHAPE=T,H,K,V checks one shape; VKCHECK_BACKEND names another backend.
 * Timings: `kla bench --backend vulkan` (docs/benchmarks.md).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"

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
    const char *env = getenv("VKCHECK_SHAPE"); /* "T,H,K,V": one shape instead */
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
        KlaTensors t = { .q = KLA_F32_IN(q, nq), .k = KLA_F32_IN(k, nq), .v = KLA_F32_IN(v, nv), .g = KLA_F32_IN(g, ns),
                         .eta = KLA_F32_IN(eta, ns), .h0 = KLA_F32_IN(h0, nst), .dout = KLA_F32_IN(dout, nv) };
        for (int op = 0; op < 4; op++) { /* forward recurrent, chunk; backward recurrent, chunk */
            KlaTensors tv = t, tr = t;
            opt.algo = op & 1 ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;
            tv.o = KLA_F32_OUT(out[0], sz[0]), tv.ht = KLA_F32_OUT(out[1], sz[1]);
            tr.o = KLA_F64_OUT(rout[0], sz[0]), tr.ht = KLA_F64_OUT(rout[1], sz[1]);
            int nout = 2;
            if (op >= 2) {
                nout = 8;
                tv.dq = KLA_F32_OUT(out[2], sz[2]), tv.dk = KLA_F32_OUT(out[3], sz[3]), tv.dv = KLA_F32_OUT(out[4], sz[4]);
                tv.dg = KLA_F32_OUT(out[5], sz[5]), tv.deta = KLA_F32_OUT(out[6], sz[6]), tv.dh0 = KLA_F32_OUT(out[7], sz[7]);
                tr.dq = KLA_F64_OUT(rout[2], sz[2]), tr.dk = KLA_F64_OUT(rout[3], sz[3]), tr.dv = KLA_F64_OUT(rout[4], sz[4]);
                tr.dg = KLA_F64_OUT(rout[5], sz[5]), tr.deta = KLA_F64_OUT(rout[6], sz[6]), tr.dh0 = KLA_F64_OUT(rout[7], sz[7]);
            } else {
                tv.dout = tr.dout = (KlaIn){ 0 };
            }
            int r = op >= 2 ? kla_backward(vk, &s, &opt, &tv) || kla_backward(ref, &s, &opt, &tr)
                            : kla_forward(vk, &s, &opt, &tv) || kla_forward(ref, &s, &opt, &tr);
            printf("T=%lld H=%lld K=%lld V=%lld %-18s", (long long)T, (long long)H, (long long)K, (long long)V,
                   op == 0 ? "forward recurrent" : op == 1 ? "forward chunk" : op == 2 ? "backward recurrent" : "backward chunk");
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
            /* the first token: [1, H, K], [1, H, V], [1, H] */
            KlaTensors tv = { .q = KLA_F32_IN(q, H * K), .k = KLA_F32_IN(k, H * K), .v = KLA_F32_IN(v, H * V),
                              .g = KLA_F32_IN(g, H), .eta = KLA_F32_IN(eta, H) };
            KlaTensors tr = tv;
            tv.o = KLA_F32_OUT(out[0], H * V), tv.state = KLA_F32_OUT(st, nst);
            tr.o = KLA_F64_OUT(rout[0], H * V), tr.state = KLA_F64_OUT(rst, nst);
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

int main(void)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = getenv("VKCHECK_BACKEND") ? getenv("VKCHECK_BACKEND") : "vulkan";
    KlaContext *ctx;
    int r = kla_open(&ctx, &p);
    if (r < 0) {
        fprintf(stderr, "vkcheck: backend %s: %s\n", p.backend, kla_error_detail(NULL));
        return 1;
    }
    char devs[1024];
    kla_vulkan_devices(devs, sizeof devs);
    printf("Vulkan devices:\n%s\n", devs);
    const int fails = run_check(ctx);
    kla_close(&ctx);
    return fails ? 1 : 0;
}
