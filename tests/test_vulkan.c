/*
 * test_vulkan.c: the Vulkan backend against the float64 reference, through the public API.
 * TAP. Skips when no Vulkan device is usable. Run with KLA_VULKAN_VALIDATION=1 (meson
 * does): the last test asserts the validation layer reported nothing.
 *
 * Shapes stay small for run time. llvmpipe ends the loops of a shader invocation after
 * 65535 iterations in all (LP_MAX_TGSI_LOOP_ITERATIONS), silently; the backend runs the
 * sequential passes in windows there, and the "long" case fails without them
 * (KLA_VULKAN_LOOP_CAP=0). Larger shapes: tests/vkcheck on a real GPU.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"

int kla__vulkan_messages(void); /* vulkan/vk_backend.c */

typedef struct tcase {
    const char *name;
    int mode;              /* KLA_MODE_KLA / GDN */
    int B, T, H, HV, K, V; /* B = 0 with lens: packed sequences */
    int nlen;
    int lens[8];
    int cu64;              /* cu_seqlens as int64 */
    int h0, dht, nog, vk, l2q, l2k, chunk;
    double scale;
} tcase;

static const tcase cases[] = {
    { "kla basic", KLA_MODE_KLA, 2, 37, 2, 2, 16, 16, 0, { 0 }, 0, 0, 0, 0, 0, 0, 0, 16, 0 },
    { "gdn basic", KLA_MODE_GDN, 1, 40, 2, 2, 16, 8, 0, { 0 }, 0, 0, 0, 0, 0, 0, 1, 16, 0 },
    { "kla grouped heads", KLA_MODE_KLA, 1, 33, 2, 6, 16, 16, 0, { 0 }, 0, 1, 1, 0, 0, 0, 0, 16, 0 },
    { "kla cu_seqlens i32 with length-1 sequences", KLA_MODE_KLA, 0, 0, 2, 2, 8, 16, 5,
      { 1, 17, 1, 0, 20 }, 0, 1, 1, 0, 0, 0, 0, 16, 0 },
    { "gdn cu_seqlens i64", KLA_MODE_GDN, 0, 0, 1, 2, 16, 16, 3, { 9, 33, 1 }, 1, 1, 0, 0, 0, 1, 1, 32, 0 },
    { "kla h0 and dht", KLA_MODE_KLA, 2, 20, 1, 1, 16, 24, 0, { 0 }, 0, 1, 1, 0, 0, 0, 0, 16, 0 },
    { "kla vk state layout", KLA_MODE_KLA, 1, 21, 2, 4, 8, 16, 0, { 0 }, 0, 1, 1, 0, 1, 0, 0, 16, 0 },
    { "kla l2norm q and k, scale", KLA_MODE_KLA, 1, 25, 2, 2, 16, 16, 0, { 0 }, 0, 0, 0, 0, 0, 1, 1, 16, 0.5 },
    { "kla l2norm q only, no g", KLA_MODE_KLA, 1, 19, 1, 2, 16, 16, 0, { 0 }, 0, 1, 0, 1, 0, 1, 0, 16, 0 },
    { "kla T = 1", KLA_MODE_KLA, 3, 1, 2, 2, 16, 16, 0, { 0 }, 0, 1, 1, 0, 0, 0, 0, 16, 0 },
    { "kla T not a multiple of the chunk (T = 70, chunk 32)", KLA_MODE_KLA, 1, 70, 1, 1, 16, 16, 0,
      { 0 }, 0, 1, 0, 0, 0, 1, 0, 32, 0 },
    { "kla K != V", KLA_MODE_KLA, 1, 30, 2, 2, 32, 8, 0, { 0 }, 0, 1, 1, 0, 0, 0, 0, 16, 0 },
    { "kla K = 96 V = 192", KLA_MODE_KLA, 1, 24, 1, 1, 96, 192, 0, { 0 }, 0, 1, 1, 0, 0, 1, 0, 16, 0 },
    { "kla chunk 128 (run as 64), T = 150", KLA_MODE_KLA, 1, 150, 1, 1, 16, 8, 0, { 0 }, 0, 1, 1, 0, 0, 1, 0, 128, 0 },
    { "gdn K = 96 V = 192 chunk 64", KLA_MODE_GDN, 1, 70, 1, 1, 96, 192, 0, { 0 }, 0, 1, 0, 0, 1, 1, 1, 64, 0 },
    { "gdn chunk 32, grouped heads, no dht, T = 53", KLA_MODE_GDN, 1, 53, 2, 4, 16, 8, 0, { 0 }, 0, 1, 0, 0, 0, 0, 1, 32, 0 },
    { "kla cu_seqlens with length-0 sequences, vk layout", KLA_MODE_KLA, 0, 0, 1, 2, 8, 8, 5,
      { 0, 19, 16, 0, 3 }, 1, 1, 1, 0, 1, 1, 1, 16, 0 },
    /* past llvmpipe's 65535 loop iterations per invocation in one pass: runs in windows */
    { "kla long: T = 260, K = 128, two sequences", KLA_MODE_KLA, 0, 0, 1, 1, 128, 8, 2, { 260, 40 }, 0, 1, 1,
      0, 0, 1, 0, 32, 0 },
};

static int ntest, nfail;

static void ok(int cond, const char *fmt, const char *name, const char *what)
{
    ntest++;
    if (!cond) nfail++;
    printf("%sok %d - ", cond ? "" : "not ", ntest);
    printf(fmt, name, what);
    printf("\n");
    fflush(stdout);
}

static uint64_t rng = 88172645463325252ull;
static double urand(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}
static double nrand(void) { return sqrt(-2 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand()); }

static float *frand(size_t n, double lo, double hi, int normal)
{
    float *x = malloc((n ? n : 1) * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = (float)(normal ? nrand() * hi : lo + (hi - lo) * urand());
    return x;
}

/* rel_rmse of got (f32) against ref (f64); fails on any non-finite value */
static double rel_rmse(const double *ref, const float *got, size_t n)
{
    double se = 0, sr = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        se += (ref[i] - got[i]) * (ref[i] - got[i]);
        sr += ref[i] * ref[i];
    }
    return sr > 0 ? sqrt(se / sr) : sqrt(se / (double)(n ? n : 1));
}

static void check(const char *name, const char *what, const double *ref, const float *got, size_t n, double tol)
{
    double e = rel_rmse(ref, got, n);
    char buf[160];
    snprintf(buf, sizeof buf, "%s (rel_rmse %.2e)", what, e);
    ok(e <= tol, "%s: %s", name, buf);
}

static void run_case(KlaContext *vk, KlaContext *ref, const tcase *c)
{
    const int packed = c->nlen > 0;
    int64_t N = packed ? c->nlen : c->B, B = packed ? 1 : c->B, T = c->T;
    int64_t cu[9] = { 0 };
    int32_t cu32[9] = { 0 };
    if (packed) {
        for (int i = 0; i < c->nlen; i++) cu[i + 1] = cu[i] + c->lens[i];
        T = cu[c->nlen];
        for (int i = 0; i <= c->nlen; i++) cu32[i] = (int32_t)cu[i];
    }
    const size_t nq = (size_t)(B * T * c->H * c->K), nv = (size_t)(B * T * c->HV * c->V);
    const size_t ns = (size_t)(B * T * c->HV), nst = (size_t)(N * c->HV * c->K * c->V);
    const int kla = c->mode == KLA_MODE_KLA;
    /* gdn without l2norm_k: short keys keep beta ||k||^2 < 2 (a stable recurrence) */
    const double ks = !kla && !c->l2k ? 1.0 / sqrt(c->K) : 1.0;
    float *q = frand(nq, 0, 1, 1), *k = frand(nq, 0, ks, 1), *v = frand(nv, 0, 1, 1);
    float *g = frand(ns, -0.3, 0, 0), *a = frand(ns, kla ? 0.2 : 0.1, kla ? 1.0 : 0.9, 0);
    float *h0 = frand(nst, 0, 0.5, 1), *dout = frand(nv, 0, 1, 1), *dht = frand(nst, 0, 1, 1);

    KlaShape s = { .B = B, .T = T, .H = c->H, .HV = c->HV, .K = c->K, .V = c->V, .N = N };
    KlaOptions opt;
    kla_default_options(&opt);
    opt.mode = c->mode;
    opt.scale = c->scale != 0 ? c->scale : KLA_SCALE_DEFAULT; /* 0 in the table: K^-1/2 */
    opt.l2norm_q = c->l2q, opt.l2norm_k = c->l2k;
    opt.state_layout = c->vk ? KLA_LAYOUT_VK : KLA_LAYOUT_KV;
    opt.chunk_size = c->chunk;

    KlaTensors t = { .q = KLA_F32_IN(q, nq), .k = KLA_F32_IN(k, nq), .v = KLA_F32_IN(v, nv) };
    if (!c->nog) t.g = KLA_F32_IN(g, ns);
    if (kla) t.eta = KLA_F32_IN(a, ns);
    else t.beta = KLA_F32_IN(a, ns);
    if (c->h0) t.h0 = KLA_F32_IN(h0, nst);
    if (packed) t.cu_seqlens = c->cu64 ? KLA_IN(cu, KLA_I64, c->nlen + 1) : KLA_IN(cu32, KLA_I32, c->nlen + 1);

    double *ro = calloc(nv, 8), *rht = calloc(nst, 8);
    float *o = calloc(nv, 4), *ht = calloc(nst, 4);
    /* forward, both algorithms */
    for (int al = 0; al < 2; al++) {
        const char *an = al ? "forward chunk" : "forward recurrent";
        opt.algo = al ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;
        KlaTensors tr = t, tv = t;
        tr.o = KLA_F64_OUT(ro, nv), tr.ht = KLA_F64_OUT(rht, nst);
        tv.o = KLA_F32_OUT(o, nv), tv.ht = KLA_F32_OUT(ht, nst);
        int r1 = kla_forward(ref, &s, &opt, &tr), r2 = kla_forward(vk, &s, &opt, &tv);
        if (r1 || r2) {
            fprintf(stderr, "# %s\n", kla_error_detail(r2 ? vk : ref));
            ok(0, "%s: %s (call failed)", c->name, an);
            continue;
        }
        char w[64];
        snprintf(w, sizeof w, "%s o", an);
        check(c->name, w, ro, o, nv, 1e-5);
        snprintf(w, sizeof w, "%s ht", an);
        check(c->name, w, rht, ht, nst, 1e-5);
    }

    /* backward (o, ht, and every gradient): recurrent BPTT, and chunkwise (AUTO takes
     * the chunkwise path too) */
    for (int al = 0; al < 2; al++) {
        const char *an = al ? "backward chunk" : "backward recurrent";
        opt.algo = al ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;
        double *rd[6];
        float *vd[6];
        const size_t sz[6] = { nq, nq, nv, ns, ns, nst };
        const char *nm[6] = { "dq", "dk", "dv", "dg", kla ? "deta" : "dbeta", "dh0" };
        for (int i = 0; i < 6; i++) rd[i] = calloc(sz[i], 8), vd[i] = calloc(sz[i], 4);
        KlaTensors tr = t, tv = t;
        tr.dout = tv.dout = KLA_F32_IN(dout, nv);
        if (c->dht) tr.dht = tv.dht = KLA_F32_IN(dht, nst);
        tr.o = KLA_F64_OUT(ro, nv), tr.ht = KLA_F64_OUT(rht, nst);
        tv.o = KLA_F32_OUT(o, nv), tv.ht = KLA_F32_OUT(ht, nst);
        tr.dq = KLA_F64_OUT(rd[0], sz[0]), tr.dk = KLA_F64_OUT(rd[1], sz[1]), tr.dv = KLA_F64_OUT(rd[2], sz[2]);
        tr.dg = KLA_F64_OUT(rd[3], sz[3]), tr.dh0 = KLA_F64_OUT(rd[5], sz[5]);
        tv.dq = KLA_F32_OUT(vd[0], sz[0]), tv.dk = KLA_F32_OUT(vd[1], sz[1]), tv.dv = KLA_F32_OUT(vd[2], sz[2]);
        tv.dg = KLA_F32_OUT(vd[3], sz[3]), tv.dh0 = KLA_F32_OUT(vd[5], sz[5]);
        if (kla) tr.deta = KLA_F64_OUT(rd[4], sz[4]), tv.deta = KLA_F32_OUT(vd[4], sz[4]);
        else tr.dbeta = KLA_F64_OUT(rd[4], sz[4]), tv.dbeta = KLA_F32_OUT(vd[4], sz[4]);
        int r1 = kla_backward(ref, &s, &opt, &tr), r2 = kla_backward(vk, &s, &opt, &tv);
        if (r1 || r2) {
            fprintf(stderr, "# %s\n", kla_error_detail(r2 ? vk : ref));
            ok(0, "%s: %s (call failed)", c->name, an);
        } else {
            char w[64];
            snprintf(w, sizeof w, "%s o", an);
            check(c->name, w, ro, o, nv, 1e-5);
            snprintf(w, sizeof w, "%s ht", an);
            check(c->name, w, rht, ht, nst, 1e-5);
            for (int i = 0; i < 6; i++) {
                snprintf(w, sizeof w, "%s %s", an, nm[i]);
                check(c->name, w, rd[i], vd[i], sz[i], 1e-4);
            }
        }
        for (int i = 0; i < 6; i++) free(rd[i]), free(vd[i]);
    }

    /* decode: one token for each of the N (or B) sequences from a random state */
    {
        const int64_t D = N;
        KlaShape sd = { .B = D, .T = 1, .H = c->H, .HV = c->HV, .K = c->K, .V = c->V };
        const size_t dq_ = (size_t)(D * c->H * c->K), dv_ = (size_t)(D * c->HV * c->V), ds_ = (size_t)(D * c->HV);
        float *sv = malloc(nst * 4);
        double *sr = malloc(nst * 8);
        for (size_t i = 0; i < nst; i++) sv[i] = h0[i], sr[i] = h0[i];
        /* the first D tokens' worth of q, k, v, g, eta as the D sequences' tokens */
        KlaTensors td = { .q = KLA_F32_IN(q, dq_), .k = KLA_F32_IN(k, dq_), .v = KLA_F32_IN(v, dv_) };
        if (!c->nog) td.g = KLA_F32_IN(g, ds_);
        if (kla) td.eta = KLA_F32_IN(a, ds_);
        else td.beta = KLA_F32_IN(a, ds_);
        KlaTensors tr = td, tv = td;
        tr.o = KLA_F64_OUT(ro, dv_), tr.state = KLA_F64_OUT(sr, nst);
        tv.o = KLA_F32_OUT(o, dv_), tv.state = KLA_F32_OUT(sv, nst);
        int r = 0;
        /* two steps, so the updated state is read back */
        for (int step = 0; step < 2 && !r; step++)
            r = kla_decode(ref, &sd, &opt, &tr) || kla_decode(vk, &sd, &opt, &tv);
        if (r) {
            fprintf(stderr, "# %s / %s\n", kla_error_detail(vk), kla_error_detail(ref));
            ok(0, "%s: %s (call failed)", c->name, "decode");
        } else {
            check(c->name, "decode o", ro, o, dv_, 1e-5);
            check(c->name, "decode state", sr, sv, nst, 1e-5);
        }
        free(sv), free(sr);
    }
    free(q), free(k), free(v), free(g), free(a), free(h0), free(dout), free(dht);
    free(ro), free(rht), free(o), free(ht);
}

int main(void)
{
    if (kla_backend_available("vulkan") != 1) {
        printf("1..0 # SKIP no Vulkan device\n");
        return 0;
    }
    KlaParams p;
    kla_default_params(&p);
    p.backend = "vulkan";
    KlaContext *vk = NULL, *ref = NULL;
    if (kla_open(&vk, &p) < 0) {
        printf("1..0 # SKIP the Vulkan backend did not open\n");
        return 0;
    }
    p.backend = "ref64";
    if (kla_open(&ref, &p) < 0) {
        printf("Bail out! ref64 did not open\n");
        return 1;
    }
    char devs[1024];
    int nd = kla_vulkan_devices(devs, sizeof devs);
    printf("# %d Vulkan device(s):\n", nd);
    for (char *line = strtok(devs, "\n"); line; line = strtok(NULL, "\n")) printf("#   %s\n", line);
    const int ncases = (int)(sizeof cases / sizeof cases[0]);
    /* per case: 2 forwards x 2 tensors, 2 backwards x 8 tensors, decode 2; + devices + messages */
    printf("1..%d\n", ncases * 22 + 6 + 2 * 22 + 1);
    ok(nd >= 1, "%s%s", "kla_vulkan_devices lists the device", "");
    {
        /* device choice: a missing index, and a name that matches nothing, fail cleanly */
        KlaContext *x = NULL;
        KlaParams q;
        kla_default_params(&q);
        q.backend = "vulkan";
        q.gpu_device = 1000;
        int r1 = kla_open(&x, &q);
        kla_close(&x);
        q.gpu_device = -1;
        setenv("KLA_VULKAN_DEVICE", "no-such-device-anywhere", 1);
        int r2 = kla_open(&x, &q);
        kla_close(&x);
        setenv("KLA_VULKAN_DEVICE", "0", 1);
        int r3 = kla_open(&x, &q);
        kla_close(&x);
        unsetenv("KLA_VULKAN_DEVICE");
        ok(r1 == KLA_ENODEV && x == NULL, "%s%s", "gpu_device out of range: KLA_ENODEV", "");
        ok(r2 == KLA_ENODEV && r3 == 0, "%s%s", "KLA_VULKAN_DEVICE by name (no match) and by index", "");
    }
    for (int i = 0; i < ncases; i++) run_case(vk, ref, &cases[i]);
    {
        /* KLA_VULKAN_PASSES (kla bench): each call's dispatches recorded 3 times; every pass
         * must recompute the same outputs (nothing accumulates across passes), decode runs
         * once (it updates the state in place) */
        KlaContext *x = NULL;
        KlaParams q;
        kla_default_params(&q);
        q.backend = "vulkan";
        setenv("KLA_VULKAN_PASSES", "0", 1);
        const int r0 = kla_open(&x, &q);
        kla_close(&x);
        ok(r0 == KLA_EINVAL, "%s%s", "KLA_VULKAN_PASSES=0: KLA_EINVAL", "");
        setenv("KLA_VULKAN_PASSES", "3", 1);
        if (kla_open(&x, &q) < 0) x = NULL;
        unsetenv("KLA_VULKAN_PASSES");
        for (int i = 0; i < 2; i++) {
            tcase c = cases[i ? 16 : 5]; /* packed sequences with empty ones; h0 and dht */
            char name[96];
            snprintf(name, sizeof name, "3 passes: %s", c.name);
            c.name = name;
            if (x) run_case(x, ref, &c);
            else for (int j = 0; j < 22; j++) ok(0, "%s%s", "3 passes: the context did not open", "");
        }
        kla_close(&x);
    }
    {
        /* kla_gpu_time after the last case's decode (prep, rec_fwd), and 0 on a CPU backend */
        double ms[8];
        const char *nm[8];
        const int n = kla_gpu_time(vk, ms, nm, 8);
        const int named = n == 3 && !strcmp(nm[0], "all") && !strcmp(nm[1], "prep") && !strcmp(nm[2], "rec_fwd");
        ok(named && ms[0] > 0 && ms[1] >= 0 && ms[2] > 0 && ms[1] + ms[2] <= ms[0] * 1.001 + 1e-6, "%s%s",
           "kla_gpu_time: the last call, all and each dispatch by name", "");
        ok(kla_gpu_time(ref, ms, nm, 8) == 0, "%s%s", "kla_gpu_time: 0 on a CPU backend", "");
    }
    kla_close(&vk);
    kla_close(&ref);
    const int msgs = kla__vulkan_messages();
    ok(msgs == 0, "%s%s", "no validation messages", getenv("KLA_VULKAN_VALIDATION") ? "" : " (validation off)");
    return nfail ? 1 : 0;
}
