/*
 * bench.c: `kla bench`, throughput of the operator on random inputs, with yardsticks
 * measured in the same process (docs/benchmarks.md explains the figures):
 *
 *   - forward (recurrent, chunkwise, auto), backward, decode of 1 and N sequences:
 *     best-of-reps time, tokens/s, GFLOP/s (FLOP counts in docs/benchmarks.md);
 *   - the ratio to the scalar "ref" backend (on a smaller T when T is large: --ref-T);
 *   - an OpenBLAS sgemm (1024^3, same thread count) GFLOP/s, when built with OpenBLAS,
 *     against the chunkwise kernel's executed GEMM FLOP/s;
 *   - for decode, the state-streaming bound: one read and one write of every state;
 *   - thread scaling: the forward with 1 thread against --threads.
 * With a GPU backend (vulkan) it prints instead, for forward chunk and recurrent,
 * forward+backward and decode, the GPU time of the dispatches (kla_gpu_time; median and
 * minimum) beside the wall time of the whole API call, and each dispatch's mean GPU
 * time, twice: with the tensors in host memory (the call copies them through the host)
 * and resident (every tensor a KlaBuffer, written once; the calls back to back, as a
 * program keeping its tensors on the GPU makes them, so the GPU stays busy and at its
 * clock). call/GPU is the whole call's wall time over its GPU time. KLA_VULKAN_PASSES=n
 * (default 1) records a call's dispatches n times and times the last.
 *
 * kla bench [--backend B] [--T n] [--B n] [--H n] [--K n] [--V n] [--N n] [--threads n]
 *           [--algo auto|recurrent|chunk] [--chunk C] [--reps n] [--cpu MASK] [--ref-T n]
 *           [--op all|forward|backward|decode] [--json]
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef KLA_HAVE_OPENBLAS
#include <cblas.h>
#endif

#include "bench.h"
#include "bench_train.h"
#include "kla.h"

typedef struct bopt {
    const char *backend, *op, *in;
    long T, B, H, V, K, N, reps, ref_T, chunk;
    int threads, algo, json;
    unsigned cpu;
    long vocab, d_model, n_layer, d_ff; /* --op train */
    int gdn, scaling;
    KlaDtype storage; /* --storage: the resident rows' tensors (states stay F32) */
    double warmup;    /* --warmup: seconds of untimed calls before each GPU row */
    int where;        /* --tensors: 1 host rows, 2 resident rows, 3 both */
    unsigned set; /* which of --T --B --H --K --V --reps were given (1 2 4 8 16 32), 64: a GPU-only option */
} bopt;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rs = 0x2545F4914F6CDD1Dull;
static float frand(float lo, float hi)
{
    rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
    return lo + (hi - lo) * (float)((rs >> 11) * (1.0 / 9007199254740992.0));
}
static float *rnd(long n, float lo, float hi)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!x) {
        fprintf(stderr, "kla bench: out of memory\n");
        exit(1);
    }
    for (long i = 0; i < n; i++) x[i] = frand(lo, hi);
    return x;
}

/* inputs of one problem: q, k l2-normalised by the op (the KLA layer normalises q; we
 * normalise both so that any T is numerically tame), g in [-0.1, 0], eta in [0.2, 1] */
typedef struct prob {
    KlaShape s;
    float *q, *k, *v, *g, *eta, *dout, *o, *dq, *dk, *dv, *dg, *deta;
} prob;

static void prob_make(prob *P, long B, long T, long H, long K, long V, int backward)
{
    memset(P, 0, sizeof *P);
    P->s = (KlaShape){ B, T, H, H, K, V, B };
    const long nq = B * T * H * K, nv = B * T * H * V, ns = B * T * H;
    P->q = rnd(nq, -1, 1), P->k = rnd(nq, -1, 1), P->v = rnd(nv, -1, 1);
    P->g = rnd(ns, -0.1f, 0), P->eta = rnd(ns, 0.2f, 1);
    P->o = rnd(nv, 0, 0);
    if (backward) {
        P->dout = rnd(nv, -1, 1), P->dq = rnd(nq, 0, 0), P->dk = rnd(nq, 0, 0);
        P->dv = rnd(nv, 0, 0), P->dg = rnd(ns, 0, 0), P->deta = rnd(ns, 0, 0);
    }
}

static void prob_free(prob *P)
{
    free(P->q), free(P->k), free(P->v), free(P->g), free(P->eta), free(P->dout), free(P->o);
    free(P->dq), free(P->dk), free(P->dv), free(P->dg), free(P->deta);
}

static KlaOptions options(int algo, long chunk)
{
    KlaOptions o;
    kla_default_options(&o);
    o.algo = algo, o.l2norm_q = 1, o.l2norm_k = 1, o.chunk_size = (int)chunk;
    return o;
}

static KlaContext *open_ctx(const char *backend, int threads, unsigned cpu)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = backend, p.threads = threads, p.cpu_mask = cpu;
    KlaContext *ctx;
    int r = kla_open(&ctx, &p);
    if (r < 0) {
        fprintf(stderr, "kla bench: %s\n", kla_error_detail(NULL));
        return NULL;
    }
    return ctx;
}

/* the tensors of P for forward (and decode), or with the gradients for backward */
static KlaTensors tensors(const prob *P, int backward)
{
    const KlaShape *s = &P->s;
    const int64_t nq = s->B * s->T * s->H * s->K, nv = s->B * s->T * s->HV * s->V, ns = s->B * s->T * s->HV;
    KlaTensors t = { .q = KLA_F32_IN(P->q, nq), .k = KLA_F32_IN(P->k, nq), .v = KLA_F32_IN(P->v, nv),
                     .g = KLA_F32_IN(P->g, ns), .eta = KLA_F32_IN(P->eta, ns), .o = KLA_F32_OUT(P->o, nv) };
    if (backward) {
        t.dout = KLA_F32_IN(P->dout, nv), t.dq = KLA_F32_OUT(P->dq, nq), t.dk = KLA_F32_OUT(P->dk, nq);
        t.dv = KLA_F32_OUT(P->dv, nv), t.dg = KLA_F32_OUT(P->dg, ns), t.deta = KLA_F32_OUT(P->deta, ns);
    }
    return t;
}

/* best time of reps runs of forward (op 0) or backward (op 1) */
static double time_op(KlaContext *ctx, prob *P, int op, int algo, long chunk, long reps)
{
    KlaOptions o = options(algo, chunk);
    KlaTensors t = tensors(P, op == 1);
    double best = INFINITY;
    for (long r = -1; r < reps; r++) { /* r = -1: warm-up (threads, page faults), untimed */
        const double t0 = now();
        const int e = op == 1 ? kla_backward(ctx, &P->s, &o, &t) : kla_forward(ctx, &P->s, &o, &t);
        const double dt = now() - t0;
        if (e < 0) {
            fprintf(stderr, "kla bench: %s\n", kla_error_detail(ctx));
            return NAN;
        }
        if (r >= 0 && dt < best) best = dt;
    }
    return best;
}

/* decode: time per call of N sequences x H heads (best of reps, each the mean of 20 calls) */
static double time_decode(KlaContext *ctx, long N, long H, long K, long V, long reps, float *state)
{
    float *q = rnd(N * H * K, -1, 1), *k = rnd(N * H * K, -1, 1), *v = rnd(N * H * V, -1, 1);
    float *g = rnd(N * H, -0.1f, 0), *eta = rnd(N * H, 0.2f, 1), *o = rnd(N * H * V, 0, 0);
    KlaShape s = { N, 1, H, H, K, V, N };
    KlaOptions opt = options(KLA_ALGO_AUTO, 64);
    KlaTensors t = { .q = KLA_F32_IN(q, N * H * K), .k = KLA_F32_IN(k, N * H * K), .v = KLA_F32_IN(v, N * H * V),
                     .g = KLA_F32_IN(g, N * H), .eta = KLA_F32_IN(eta, N * H), .o = KLA_F32_OUT(o, N * H * V),
                     .state = KLA_F32_OUT(state, N * H * K * V) };
    double best = INFINITY;
    kla_decode(ctx, &s, &opt, &t); /* warm-up */
    for (long r = 0; r < reps; r++) {
        const double t0 = now();
        for (int i = 0; i < 20; i++)
            if (kla_decode(ctx, &s, &opt, &t) < 0) {
                fprintf(stderr, "kla bench: %s\n", kla_error_detail(ctx));
                best = NAN;
                r = reps;
                break;
            }
        const double dt = (now() - t0) / 20;
        if (dt < best) best = dt;
    }
    free(q), free(k), free(v), free(g), free(eta), free(o);
    return best;
}

/* one pass x = 0.999 x + 1e-7 over x[j0 .. j1-1]: one read and one write of each float,
 * with the widest vectors the CPU has (a pass of baseline SSE2 code is limited by its
 * 4 stores per 64 bytes, not by the memory: it would make a slow, unfair bound) */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx512f"))) static void stream_avx512(float *x, long j0, long j1)
{
    const __m512 a = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-7f);
    long j = j0;
    for (; j < j1 && ((uintptr_t)(x + j) & 63); j++) x[j] = x[j] * 0.999f + 1e-7f;
    for (; j + 16 <= j1; j += 16) _mm512_store_ps(x + j, _mm512_fmadd_ps(_mm512_load_ps(x + j), a, c));
    for (; j < j1; j++) x[j] = x[j] * 0.999f + 1e-7f;
}
__attribute__((target("avx2,fma"))) static void stream_avx2(float *x, long j0, long j1)
{
    const __m256 a = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-7f);
    long j = j0;
    for (; j < j1 && ((uintptr_t)(x + j) & 31); j++) x[j] = x[j] * 0.999f + 1e-7f;
    for (; j + 8 <= j1; j += 8) _mm256_store_ps(x + j, _mm256_fmadd_ps(_mm256_load_ps(x + j), a, c));
    for (; j < j1; j++) x[j] = x[j] * 0.999f + 1e-7f;
}
#endif
static void stream_plain(float *x, long j0, long j1)
{
    for (long j = j0; j < j1; j++) x[j] = x[j] * 0.999f + 1e-7f;
}
static void (*stream_fn(void))(float *, long, long)
{
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return stream_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return stream_avx2;
#endif
    return stream_plain;
}

/* the state-streaming bound: read and write every float of the state once, threaded
 * like decode (the same threads, each one contiguous equal share), best of reps x 20
 * passes */
static double time_stream(float *x, long n, int threads, long reps)
{
    void (*fn)(float *, long, long) = stream_fn();
    double best = INFINITY;
    int nt = 1;
#ifdef _OPENMP
    nt = threads > 0 ? threads : omp_get_max_threads();
#endif
    (void)threads;
    for (long r = -1; r < reps; r++) { /* r = -1: warm-up */
        const double t0 = now();
        for (int i = 0; i < 20; i++) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
            {
                const long t = omp_get_thread_num();
                fn(x, n * t / nt, n * (t + 1) / nt);
            }
#else
            fn(x, 0, n);
#endif
        }
        const double dt = (now() - t0) / 20;
        if (r >= 0 && dt < best) best = dt;
    }
    return best;
}

static double sgemm_gflops(int threads)
{
#ifdef KLA_HAVE_OPENBLAS
    const int n = 1024;
    float *a = rnd((long)n * n, -1, 1), *b = rnd((long)n * n, -1, 1), *c = rnd((long)n * n, 0, 0);
#ifdef _OPENMP
    openblas_set_num_threads(threads > 0 ? threads : omp_get_max_threads());
#else
    openblas_set_num_threads(threads > 0 ? threads : 1);
#endif
    double best = INFINITY;
    for (int r = 0; r < 5; r++) {
        const double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, a, n, b, n, 0, c, n);
        const double dt = now() - t0;
        if (dt < best) best = dt;
    }
    free(a), free(b), free(c);
    return 2.0 * n * n * n / best * 1e-9;
#else
    (void)threads;
    return NAN;
#endif
}

/* FLOP per token and value head (docs/benchmarks.md) */
static double flop_recurrence(long K, long V) { return 7.0 * K * V; }
static double flop_chunk(long C, long K, long V) { return 5.0 * C * K + 3.0 * C * V + 6.0 * K * V; }

/* `, "key": value` of the JSON object; null where nothing was measured */
static void jnum(const char *key, double v)
{
    if (isfinite(v)) printf(", \"%s\": %.6g", key, v);
    else printf(", \"%s\": null", key);
}

static void progress(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kla bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

/* ---- GPU backends: GPU time from kla_gpu_time beside the wall time of each call ---------- */

static int cmpd(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct gfig {
    double gpu_med, gpu_min, wall_med, split[16], each[64];
    long n, warm; /* timed calls, untimed warm-up calls */
    const char *name[16];
    int nsplit, ok;
} gfig;

/* Every tensor of t as a KlaBuffer holding its host contents (outputs too: the decode
 * state is read); bufs[] receives them for freeing. */
static KlaDtype g_storage = KLA_F32; /* --storage */
static double g_warmup = 1.0;         /* --warmup */

static int to_buffers(KlaContext *ctx, KlaTensors *t, KlaBuffer **bufs, int *nb)
{
    KlaIn *in[] = { &t->q, &t->k, &t->v, &t->g, &t->eta, &t->beta, &t->h0, &t->dout, &t->dht };
    KlaOut *out[] = { &t->o, &t->ht, &t->dq, &t->dk, &t->dv, &t->dg, &t->deta, &t->dbeta, &t->dh0, &t->state };
    *nb = 0;
    for (size_t i = 0; i < sizeof in / sizeof in[0] + sizeof out / sizeof out[0]; i++) {
        const int isin = i < sizeof in / sizeof in[0];
        KlaIn x = isin ? *in[i] : KLA_IN(out[i - sizeof in / sizeof in[0]]->data, KLA_F32,
                                         out[i - sizeof in / sizeof in[0]]->numel);
        if (!x.data) continue;
        KlaBuffer *b = NULL;
        const void *p = isin ? (const void *)in[i] : (const void *)out[i - sizeof in / sizeof in[0]];
        const int state = p == &t->h0 || p == &t->dht || p == &t->ht || p == &t->dh0 || p == &t->state;
        if (kla_buffer_new(ctx, state ? KLA_F32 : g_storage, x.numel, &b) < 0 || kla_buffer_write(b, x) < 0) {
            kla_buffer_free(&b);
            return -1;
        }
        bufs[(*nb)++] = b;
        if (isin) *in[i] = KLA_BUF_IN(b);
        else *out[i - sizeof in / sizeof in[0]] = KLA_BUF_OUT(b);
    }
    return 0;
}

/* op: 0 forward, 1 backward, 2 decode (P->s has T = 1), 3 decode with the state in a
 * KlaState (kept on the GPU); reps timed calls after a warm-up; resident: every tensor
 * a KlaBuffer */
static gfig gpu_time_op(KlaContext *ctx, prob *P, int op, int algo, long chunk, long reps, float *state,
                        int resident)
{
    gfig f = { 0 };
    KlaOptions o = options(algo, chunk);
    KlaTensors t = tensors(P, op == 1);
    const int64_t nst = P->s.B * P->s.HV * P->s.K * P->s.V;
    if (op >= 2) {
        /* decode tensors are [N, ...]: the same buffers, one token each */
        t.q.numel = t.k.numel = P->s.B * P->s.H * P->s.K, t.v.numel = t.o.numel = P->s.B * P->s.HV * P->s.V;
        t.g.numel = t.eta.numel = P->s.B * P->s.HV;
    }
    if (op == 2) t.state = KLA_F32_OUT(state, nst);
    KlaBuffer *bufs[24];
    int nb = 0;
    if (resident && to_buffers(ctx, &t, bufs, &nb) < 0) {
        fprintf(stderr, "kla bench: %s\n", kla_error_detail(ctx));
        for (int i = 0; i < nb; i++) kla_buffer_free(&bufs[i]);
        return f;
    }
    KlaState *kst = NULL;
    if (op == 3 && (kla_state_new(ctx, P->s.B, P->s.HV, P->s.K, P->s.V, &kst) < 0 ||
                    kla_state_write(kst, KLA_F32_IN(state, nst), KLA_LAYOUT_KV) < 0)) {
        fprintf(stderr, "kla bench: %s\n", kla_error_detail(ctx));
        kla_state_free(&kst);
        return f;
    }
    if (reps > 64) reps = 64;
    double wall[64], gpu[64];
    /* r = -1: warm-up (pipelines, buffers), untimed, repeated for g_warmup seconds: a GPU
     * raises its clock only under sustained load (an H200 idles at 345 MHz and needs a
     * fraction of a second of back-to-back work to reach ~1980 MHz), counted from the end
     * of the first call (which compiles pipelines) */
    double tw = 0;
    for (long r = -1; r < reps; r++) {
        if (r == 0 && now() - tw < g_warmup) r = -1;
        const double t0 = now();
        const int e = op == 0 ? kla_forward(ctx, &P->s, &o, &t)
                    : op == 1 ? kla_backward(ctx, &P->s, &o, &t)
                    : op == 2 ? kla_decode(ctx, &P->s, &o, &t) : kla_decode_state(ctx, &P->s, &o, &t, kst);
        const double dt = now() - t0;
        if (e < 0) {
            fprintf(stderr, "kla bench: %s\n", kla_error_detail(ctx));
            kla_state_free(&kst);
            for (int i = 0; i < nb; i++) kla_buffer_free(&bufs[i]);
            return f;
        }
        if (r < 0) {
            if (!f.warm++) tw = now();
            continue;
        }
        double ms[17];
        const char *nm[17];
        const int n = kla_gpu_time(ctx, ms, nm, 17);
        if (n < 1) {
            fprintf(stderr, "kla bench: backend %s reports no GPU time\n", kla_backend_name(ctx));
            kla_state_free(&kst);
            for (int i = 0; i < nb; i++) kla_buffer_free(&bufs[i]);
            return f;
        }
        wall[r] = dt * 1e3, gpu[r] = f.each[r] = ms[0];
        f.nsplit = n - 1;
        for (int i = 1; i < n; i++) f.split[i - 1] += ms[i] / (double)reps, f.name[i - 1] = nm[i];
    }
    kla_state_free(&kst);
    for (int i = 0; i < nb; i++) kla_buffer_free(&bufs[i]);
    qsort(wall, (size_t)reps, sizeof *wall, cmpd);
    qsort(gpu, (size_t)reps, sizeof *gpu, cmpd);
    f.gpu_med = gpu[reps / 2], f.gpu_min = gpu[0], f.wall_med = wall[reps / 2], f.n = reps, f.ok = 1;
    return f;
}

static int gpu_row(const char *what, const gfig *f, int json, int *first)
{
    if (json) {
        printf("%s\n  {\"op\": \"%s\"", *first ? "" : ",", what);
        jnum("gpu_ms_median", f->ok ? f->gpu_med : NAN), jnum("gpu_ms_min", f->ok ? f->gpu_min : NAN);
        jnum("call_ms_median", f->ok ? f->wall_med : NAN);
        jnum("call_over_gpu", f->ok ? f->wall_med / f->gpu_med : NAN);
        printf(", \"warmup_calls\": %ld", f->ok ? f->warm : 0L);
        printf(", \"gpu_ms_each\": [");
        for (long i = 0; f->ok && i < f->n; i++) printf("%s%.6g", i ? ", " : "", f->each[i]);
        printf("]");
        printf(", \"dispatch_ms_mean\": {");
        for (int i = 0; f->ok && i < f->nsplit; i++)
            printf("%s\"%d %s\": %.6g", i ? ", " : "", i + 1, f->name[i] ? f->name[i] : "?", f->split[i]);
        printf("}}");
        *first = 0;
        return !f->ok;
    }
    if (!f->ok) {
        printf("  %-30s failed\n", what);
        return 1;
    }
    printf("  %-38s %9.3f %9.3f %10.3f %8.2f   ", what, f->gpu_med, f->gpu_min, f->wall_med, f->wall_med / f->gpu_med);
    for (int i = 0; i < f->nsplit; i++)
        printf("%s%s %.3f", i ? " + " : "", f->name[i] ? f->name[i] : "?", f->split[i]);
    printf("\n");
    fflush(stdout);
    return 0;
}

/* The GPU table: forward (chunkwise and recurrent), forward+backward (one kla_backward
 * call with --algo, auto = chunkwise), decode of 1 and N sequences. */
static int bench_gpu(KlaContext *ctx, const bopt *b, int do_fwd, int do_bwd, int do_dec)
{
    int first = 1, fails = 0;
    /* set (main), and valid: the context opened */
    const int passes = (int)strtol(getenv("KLA_VULKAN_PASSES"), NULL, 10);
    if (b->json)
        printf("{\"backend\": \"%s\", \"B\": %ld, \"T\": %ld, \"H\": %ld, \"K\": %ld, \"V\": %ld, "
               "\"N\": %ld, \"chunk\": %ld, \"reps\": %ld, \"passes\": %d, \"warmup_s\": %g, \"storage\": \"%s\", \"rows\": [",
               kla_backend_name(ctx), b->B, b->T, b->H, b->K, b->V, b->N, b->chunk, b->reps, passes, b->warmup,
               b->storage == KLA_BF16 ? "bf16" : b->storage == KLA_F16 ? "f16" : "f32");
    else {
        char desc[200];
        printf("kla bench: backend %s (GPU), B=%ld T=%ld H=%ld K=%ld V=%ld, chunk %ld, %ld timed calls each\n"
               "  %s\n"
               "  GPU ms: a call's dispatches%s; call ms: the whole call (wall), median; host: tensors\n"
               "  in host memory, copied by each call; resident: KlaBuffers (%s, states f32), calls back to back\n"
               "  %-38s %9s %9s %10s %8s   %s\n",
               kla_backend_name(ctx), b->B, b->T, b->H, b->K, b->V, b->chunk, b->reps,
               kla_describe(ctx, desc, sizeof desc), passes > 1 ? " (the last of KLA_VULKAN_PASSES passes)" : "",
               b->storage == KLA_BF16 ? "bf16" : b->storage == KLA_F16 ? "f16" : "f32",
               "operation", "GPU ms", "(min)", "call ms", "call/GPU", "GPU ms per dispatch (mean)");
    }
    prob P;
    if (do_fwd || do_bwd) prob_make(&P, b->B, b->T, b->H, b->K, b->V, do_bwd);
    static const char *const where[2] = { "host", "resident" };
    char w[96];
    for (int res = 0; res < 2 && do_fwd; res++) {
        if (!(b->where & (1 << res))) continue;
        progress("forward chunk, %s", where[res]);
        gfig f = gpu_time_op(ctx, &P, 0, KLA_ALGO_CHUNK, b->chunk, b->reps, NULL, res);
        snprintf(w, sizeof w, "forward chunk, %s", where[res]);
        fails += gpu_row(w, &f, b->json, &first);
        progress("forward recurrent, %s", where[res]);
        f = gpu_time_op(ctx, &P, 0, KLA_ALGO_RECURRENT, b->chunk, b->reps, NULL, res);
        snprintf(w, sizeof w, "forward recurrent, %s", where[res]);
        fails += gpu_row(w, &f, b->json, &first);
    }
    for (int res = 0; res < 2 && do_bwd; res++) {
        if (!(b->where & (1 << res))) continue;
        progress("forward+backward, %s", where[res]);
        gfig f = gpu_time_op(ctx, &P, 1, b->algo, b->chunk, b->reps, NULL, res);
        snprintf(w, sizeof w, "forward+backward %s, %s", b->algo == KLA_ALGO_RECURRENT ? "recurrent" : "chunk",
                 where[res]);
        fails += gpu_row(w, &f, b->json, &first);
    }
    if (do_fwd || do_bwd) prob_free(&P);
    if (do_dec) {
        const long Ns[2] = { 1, b->N };
        for (int i = 0; i < 2; i++) {
            progress("decode of %ld sequences", Ns[i]);
            prob D;
            prob_make(&D, Ns[i], 1, b->H, b->K, b->V, 0);
            float *state = rnd(Ns[i] * b->H * b->K * b->V, -0.01f, 0.01f);
            for (int op = 2; op <= 4; op++) {
                /* host state; KlaState (token tensors from the host); all resident */
                if (!(b->where & (op == 4 ? 2 : 1))) continue;
                gfig f = gpu_time_op(ctx, &D, op == 4 ? 2 : op, KLA_ALGO_AUTO, b->chunk, b->reps * 4 + 1, state,
                                     op == 4);
                snprintf(w, sizeof w, "decode, %ld sequence%s, %s", Ns[i], Ns[i] == 1 ? "" : "s",
                         op == 2 ? "host" : op == 3 ? "KlaState" : "resident");
                fails += gpu_row(w, &f, b->json, &first);
            }
            free(state);
            prob_free(&D);
        }
    }
    if (b->json) printf("\n]}\n");
    return fails ? 1 : 0;
}

/* --in FILE: forward (and backward) on the problem of a file, through the library's loader */
static int bench_file(KlaContext *ctx, const bopt *b)
{
    const int bwd = !strcmp(b->op, "backward") || !strcmp(b->op, "all");
    KlaFile *f = NULL;
    KlaProblem P;
    int rc = 1;
    float *buf = NULL;
    if (kla_file_read(b->in, &f) < 0 ||
        kla_file_problem(f, bwd && kla_file_find(f, "do", NULL) ? KLA_OP_BACKWARD : KLA_OP_FORWARD, &P) < 0) {
        fprintf(stderr, "kla bench: %s\n", kla_error_detail(NULL));
        goto done;
    }
    const KlaShape *s = &P.shape;
    const int64_t nq = s->B * s->T * s->H * s->K, nv = s->B * s->T * s->HV * s->V, ns = s->B * s->T * s->HV;
    const int64_t nst = P.state_numel, tot = nv + nst + (P.t.dout.data ? 2 * nq + nv + 2 * ns + nst : 0);
    if (!(buf = calloc((size_t)tot, sizeof(float)))) {
        fprintf(stderr, "kla bench: out of memory\n");
        goto done;
    }
    KlaTensors t = P.t;
    float *x = buf;
    t.o = KLA_F32_OUT(x, nv), x += nv;
    t.ht = KLA_F32_OUT(x, nst), x += nst;
    P.opt.algo = b->algo, P.opt.chunk_size = (int)b->chunk;
    char desc[256];
    printf("kla bench: %s, %s: B=%lld T=%lld H=%lld HV=%lld K=%lld V=%lld N=%lld\n",
           kla_describe(ctx, desc, sizeof desc), b->in, (long long)s->B, (long long)s->T, (long long)s->H,
           (long long)s->HV, (long long)s->K, (long long)s->V, (long long)s->N);
    for (int op = 0; op <= (P.t.dout.data ? 1 : 0); op++) {
        if (op == 1) {
            t.dq = KLA_F32_OUT(x, nq), x += nq;
            t.dk = KLA_F32_OUT(x, nq), x += nq;
            t.dv = KLA_F32_OUT(x, nv), x += nv;
            t.dg = KLA_F32_OUT(x, ns), x += ns;
            if (P.opt.mode == KLA_MODE_KLA) t.deta = KLA_F32_OUT(x, ns);
            else t.dbeta = KLA_F32_OUT(x, ns);
            x += ns;
            if (t.h0.data) t.dh0 = KLA_F32_OUT(x, nst);
        } else {
            t.dout = t.dht = (KlaIn){ 0 };
        }
        double best = INFINITY;
        for (long r = -1; r < b->reps; r++) {
            const double t0 = now();
            if ((op ? kla_backward(ctx, s, &P.opt, &t) : kla_forward(ctx, s, &P.opt, &t)) < 0) {
                fprintf(stderr, "kla bench: %s: %s\n", b->in, kla_error_detail(ctx));
                goto done;
            }
            const double dt = now() - t0;
            if (r >= 0 && dt < best) best = dt;
        }
        printf("  %-9s (%s): %9.3f ms  %10.0f tokens/s\n", op ? "backward" : "forward",
               kla_last_algo(ctx) == KLA_ALGO_CHUNK ? "chunk" : "recurrent", best * 1e3,
               (double)(s->B * s->T) / best);
        if (op == 0 && P.t.dout.data) t.dout = P.t.dout, t.dht = P.t.dht;
    }
    rc = 0;
done:
    free(buf);
    kla_file_free(&f);
    return rc;
}

static int usage(const char *msg)
{
    if (msg) fprintf(stderr, "kla bench: %s\n", msg);
    fprintf(msg ? stderr : stdout,
            "usage: kla bench [--backend B] [--T n] [--B n] [--H n] [--K n] [--V n] [--N n]\n"
            "                 [--threads n] [--algo auto|recurrent|chunk] [--chunk C] [--reps n]\n"
            "                 [--cpu MASK] [--ref-T n] [--op all|forward|backward|decode] [--json]\n"
            "                 [--storage f32|bf16|f16] [--tensors host|resident|both] [--warmup S]\n"
            "       kla bench --in FILE [--backend B] [--threads n] [--algo A] [--chunk C] [--reps n]\n"
            "                 [--cpu MASK] [--op forward|backward]\n"
            "  forward/backward on B x T tokens of H heads (K, V), decode of 1 and N sequences.\n"
            "       kla bench --op train [--B n] [--T n] [--H n] [--K n] [--V n] [--d-model n]\n"
            "                 [--n-layer n] [--d-ff n] [--vocab n] [--mixer kla|gdn] [--scaling] [--reps n]\n"
            "  --op train   a training step of the model (default the KLA authors' MQAR size, B 32 x\n"
            "               T 256): step time, matrix FLOP/s against OpenBLAS sgemm, memory;\n"
            "               --scaling adds memory and time at T/2, 2T and B/2, 2B\n"
            "  --in FILE    time forward (and backward, when FILE has do) on the problem of FILE\n"
            "  --cpu MASK   allowed CPU levels: a number (1 AVX2+FMA, 2 AVX-512, 4 NEON, 0 plain C)\n"
            "               or names joined by ',' (avx2, avx512, neon, none)\n"
            "  --ref-T n    T for the ratio to the ref backend (default min(T, 256))\n"
            "  --storage D  GPU: the resident rows' tensors in D (states stay f32)\n"
            "  --tensors W  GPU: rows with tensors in host memory, resident (KlaBuffers), or both\n"
            "               (default; decode's KlaState rows count as host)\n"
            "  --warmup S   GPU: untimed calls for S seconds before each row's timed calls, so the\n"
            "               clock is up (default 1; 0: one untimed call)\n");
    return 2;
}

int kla_bench_main(int argc, char **argv)
{
    bopt b = { "simd", "all", NULL, 4096, 1, 16, 128, 128, 16, 5, 0, 64, 0, KLA_ALGO_AUTO, 0, KLA_CPU_ALL, 0, 0, 0, 0, 0, 0, KLA_F32, 1.0, 3, 0 };
    if (kla_backend_available("simd") != 1) b.backend = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        long *lp = !strcmp(a, "--T") ? &b.T : !strcmp(a, "--B") ? &b.B : !strcmp(a, "--H") ? &b.H
                 : !strcmp(a, "--K") ? &b.K : !strcmp(a, "--V") ? &b.V : !strcmp(a, "--N") ? &b.N
                 : !strcmp(a, "--reps") ? &b.reps : !strcmp(a, "--ref-T") ? &b.ref_T
                 : !strcmp(a, "--chunk") ? &b.chunk : !strcmp(a, "--vocab") ? &b.vocab
                 : !strcmp(a, "--d-model") ? &b.d_model : !strcmp(a, "--n-layer") ? &b.n_layer
                 : !strcmp(a, "--d-ff") ? &b.d_ff : NULL;
        if (lp) b.set |= lp == &b.T ? 1u : lp == &b.B ? 2u : lp == &b.H ? 4u : lp == &b.K ? 8u : lp == &b.V ? 16u
                       : lp == &b.reps ? 32u : 0u;
        if (!strcmp(a, "--json")) {
            b.json = 1;
            continue;
        }
        if (!strcmp(a, "--scaling")) {
            b.scaling = 1;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return usage(NULL), 0;
        if (!v) return usage("option needs a value");
        char *end;
        if (lp) {
            *lp = strtol(v, &end, 10);
            if (*end || *lp < (lp == &b.ref_T ? 0 : 1)) return usage("bad number");
        } else if (!strcmp(a, "--threads")) {
            b.threads = (int)strtol(v, &end, 10);
            if (*end || b.threads < 0) return usage("bad --threads");
        } else if (!strcmp(a, "--cpu")) {
            if (kla_cpu_mask_parse(v, &b.cpu) < 0)
                return usage("bad --cpu: a number of KLA_CPU_* bits or names (avx2, avx512, neon, none)");
        } else if (!strcmp(a, "--in")) {
            b.in = v;
        } else if (!strcmp(a, "--storage")) {
            if (!strcmp(v, "f32")) b.storage = KLA_F32;
            else if (!strcmp(v, "bf16")) b.storage = KLA_BF16;
            else if (!strcmp(v, "f16")) b.storage = KLA_F16;
            else return usage("bad --storage: f32, bf16 or f16");
        } else if (!strcmp(a, "--tensors")) {
            b.set |= 64u; /* GPU-only options given */
            if (!strcmp(v, "host")) b.where = 1;
            else if (!strcmp(v, "resident")) b.where = 2;
            else if (!strcmp(v, "both")) b.where = 3;
            else return usage("bad --tensors: host, resident or both");
        } else if (!strcmp(a, "--warmup")) {
            b.set |= 64u;
            b.warmup = strtod(v, &end);
            if (end == v || *end || !(b.warmup >= 0 && b.warmup <= 600)) return usage("bad --warmup: seconds, 0 to 600");
        } else if (!strcmp(a, "--backend")) {
            b.backend = v;
        } else if (!strcmp(a, "--op")) {
            b.op = v;
        } else if (!strcmp(a, "--mixer")) {
            if (strcmp(v, "kla") && strcmp(v, "gdn")) return usage("bad --mixer (kla or gdn)");
            b.gdn = !strcmp(v, "gdn");
        } else if (!strcmp(a, "--algo")) {
            if (!strcmp(v, "auto")) b.algo = KLA_ALGO_AUTO;
            else if (!strcmp(v, "recurrent")) b.algo = KLA_ALGO_RECURRENT;
            else if (!strcmp(v, "chunk")) b.algo = KLA_ALGO_CHUNK;
            else return usage("bad --algo");
        } else {
            return usage("unknown option");
        }
        i++;
    }
    if (!strcmp(b.op, "train")) {
        /* the KLA authors' MQAR model and batch unless given */
        KlaModelConfig c;
        kla_default_model_config(&c);
        if (b.vocab) c.vocab = b.vocab;
        if (b.d_model) c.d_model = b.d_model;
        if (b.n_layer) c.n_layer = b.n_layer;
        if (b.d_ff) c.d_ff = b.d_ff;
        if (b.set & 4u) c.n_head = b.H;
        if (b.set & 8u) c.d_k = b.K;
        if (b.set & 16u) c.d_v = b.V;
        c.mixer = b.gdn ? KLA_MIXER_GDN : KLA_MIXER_KLA;
        KlaContext *tctx = open_ctx(b.backend, b.threads, b.cpu);
        if (!tctx) return 1;
        const int r = bench_train(tctx, &c, b.set & 2u ? b.B : 32, b.set & 1u ? b.T : 256,
                                  (int)(b.set & 32u ? b.reps : 5), b.json, b.scaling);
        kla_close(&tctx);
        return r;
    }
    const int all = !strcmp(b.op, "all"), do_fwd = all || !strcmp(b.op, "forward");
    const int do_bwd = all || !strcmp(b.op, "backward"), do_dec = all || !strcmp(b.op, "decode");
    if (!all && !do_fwd && !do_bwd && !do_dec) return usage("bad --op");
    if (b.in && do_dec && !all) return usage("--in FILE times forward and backward, not decode");
    if (!b.ref_T) b.ref_T = b.T < 256 ? b.T : 256;
    int nthreads = b.threads;
#ifdef _OPENMP
    if (nthreads == 0) nthreads = omp_get_max_threads();
#else
    if (nthreads == 0) nthreads = 1;
#endif
    const int gpu = b.backend && !strcmp(b.backend, "vulkan");
    g_storage = b.storage, g_warmup = b.warmup;
    if (b.storage != KLA_F32 && !gpu) return usage("--storage is for --backend vulkan");
    if ((b.set & 64u) && !gpu) return usage("--tensors and --warmup are for --backend vulkan");
    if (gpu) setenv("KLA_VULKAN_PASSES", "1", 0); /* see the top of the file; the user's value stands */
    KlaContext *ctx = open_ctx(b.backend, b.threads, b.cpu);
    if (!ctx) return 1;
    if (b.in) {
        const int r = bench_file(ctx, &b);
        kla_close(&ctx);
        return r;
    }
    if (gpu) {
        const int r = bench_gpu(ctx, &b, do_fwd, do_bwd, do_dec);
        kla_close(&ctx);
        return r;
    }
    KlaContext *ctx1 = open_ctx(b.backend, 1, b.cpu);
    KlaContext *ref = open_ctx("ref", 1, KLA_CPU_ALL);
    if (!ctx || !ctx1 || !ref) return 1;
    const char *bname = kla_backend_name(ctx);
    const double tokens = (double)b.B * b.T, heads = (double)b.H;
    const double frec = flop_recurrence(b.K, b.V), fch = flop_chunk(b.chunk, b.K, b.V);
    double t_auto = NAN, t_rec = NAN, t_ch = NAN, t_bwd = NAN, t_1 = NAN, t_ref = NAN, t_small = NAN;
    double t_dec1 = NAN, t_decN = NAN, s_dec1 = NAN, s_decN = NAN, t_refbwd = NAN, t_smallbwd = NAN;

    prob P;
    if (do_fwd || do_bwd) prob_make(&P, b.B, b.T, b.H, b.K, b.V, do_bwd);
    if (do_fwd) {
        progress("forward %s B=%ld T=%ld H=%ld K=%ld V=%ld, %d threads", bname, b.B, b.T, b.H, b.K, b.V, nthreads);
        t_auto = time_op(ctx, &P, 0, b.algo, b.chunk, b.reps);
        t_rec = time_op(ctx, &P, 0, KLA_ALGO_RECURRENT, b.chunk, b.reps);
        t_ch = time_op(ctx, &P, 0, KLA_ALGO_CHUNK, b.chunk, b.reps);
        progress("forward with 1 thread");
        t_1 = time_op(ctx1, &P, 0, b.algo, b.chunk, b.reps < 3 ? b.reps : 3);
        progress("ref backend forward at T=%ld", b.ref_T);
        prob S;
        prob_make(&S, b.B, b.ref_T, b.H, b.K, b.V, 0);
        t_ref = time_op(ref, &S, 0, KLA_ALGO_RECURRENT, b.chunk, 1);
        t_small = time_op(ctx1, &S, 0, b.algo, b.chunk, b.reps);
        prob_free(&S);
    }
    if (do_bwd) {
        progress("backward %s", bname);
        t_bwd = time_op(ctx, &P, 1, b.algo, b.chunk, b.reps < 3 ? b.reps : 3);
        const long rt = b.ref_T < 128 ? b.ref_T : 128;
        progress("ref backend backward at T=%ld", rt);
        prob S;
        prob_make(&S, b.B, rt, b.H, b.K, b.V, 1);
        t_refbwd = time_op(ref, &S, 1, KLA_ALGO_CHUNK, b.chunk, 1);
        t_smallbwd = time_op(ctx1, &S, 1, b.algo, b.chunk, b.reps);
        prob_free(&S);
    }
    if (do_fwd || do_bwd) prob_free(&P);
    if (do_dec) {
        const long Ns[2] = { 1, b.N };
        for (int i = 0; i < 2; i++) {
            progress("decode of %ld sequences", Ns[i]);
            const long n = Ns[i] * b.H * b.K * b.V;
            /* 64-byte aligned, as a tensor allocator would give it */
            float *state = aligned_alloc(64, ((size_t)n * sizeof(float) + 63) / 64 * 64);
            if (!state) {
                fprintf(stderr, "kla bench: out of memory\n");
                return 1;
            }
            for (long j = 0; j < n; j++) state[j] = frand(-0.1f, 0.1f);
            const double td = time_decode(ctx, Ns[i], b.H, b.K, b.V, b.reps * 4, state);
            const double ts = time_stream(state, n, b.threads, b.reps * 4);
            if (i == 0) t_dec1 = td, s_dec1 = ts;
            else t_decN = td, s_decN = ts;
            free(state);
        }
    }

    /* last: OpenBLAS's own threads may spin for a while after a call */
    const double sg = sgemm_gflops(b.threads);
    const double gf = 1e-9;
    if (b.json) {
        printf("{\"backend\": \"%s\", \"threads\": %d, \"B\": %ld, \"T\": %ld, \"H\": %ld, \"K\": %ld, "
               "\"V\": %ld, \"N\": %ld, \"chunk\": %ld, \"cpu_mask\": %u",
               bname, nthreads, b.B, b.T, b.H, b.K, b.V, b.N, b.chunk, b.cpu);
        char desc[256];
        printf(", \"describe\": \"%s\"", kla_describe(ctx, desc, sizeof desc));
        jnum("sgemm_gflops", sg);
        if (do_fwd) {
            jnum("forward_ms", t_auto * 1e3), jnum("forward_recurrent_ms", t_rec * 1e3);
            jnum("forward_chunk_ms", t_ch * 1e3), jnum("forward_1thread_ms", t_1 * 1e3);
            jnum("forward_tokens_per_s", tokens / t_auto);
            jnum("forward_gflops", tokens * heads * frec / t_auto * gf);
            jnum("chunk_gemm_gflops", tokens * heads * fch / t_ch * gf);
            jnum("ref_T", (double)b.ref_T), jnum("speedup_vs_ref_1thread", t_ref / t_small);
            jnum("thread_scaling", t_1 / t_auto);
        }
        if (do_bwd) {
            jnum("backward_ms", t_bwd * 1e3), jnum("backward_tokens_per_s", tokens / t_bwd);
            jnum("backward_over_forward", do_fwd ? t_bwd / t_auto : NAN);
            jnum("backward_speedup_vs_ref_1thread", t_refbwd / t_smallbwd);
        }
        if (do_dec) {
            jnum("decode1_us", t_dec1 * 1e6), jnum("decode1_bound_us", s_dec1 * 1e6);
            jnum("decodeN_us", t_decN * 1e6), jnum("decodeN_bound_us", s_decN * 1e6);
        }
        printf("}\n");
    } else {
        char desc[256];
        printf("kla bench: %s, B=%ld T=%ld H=%ld K=%ld V=%ld, chunk %ld\n", kla_describe(ctx, desc, sizeof desc),
               b.B, b.T, b.H, b.K, b.V, b.chunk);
        if (!isnan(sg)) printf("  OpenBLAS sgemm 1024^3:        %8.1f GFLOP/s\n", sg);
        if (do_fwd) {
            printf("  forward (%s):%*s %9.3f ms  %10.0f tokens/s  %7.1f GFLOP/s\n",
                   b.algo == KLA_ALGO_AUTO ? "auto" : b.algo == KLA_ALGO_CHUNK ? "chunk" : "recurrent",
                   b.algo == KLA_ALGO_RECURRENT ? 6 : b.algo == KLA_ALGO_CHUNK ? 10 : 11, "",
                   t_auto * 1e3, tokens / t_auto, tokens * heads * frec / t_auto * gf);
            printf("  forward recurrent:           %9.3f ms  %10.0f tokens/s  %7.1f GFLOP/s\n", t_rec * 1e3,
                   tokens / t_rec, tokens * heads * frec / t_rec * gf);
            printf("  forward chunk:               %9.3f ms  %10.0f tokens/s  %7.1f GFLOP/s executed",
                   t_ch * 1e3, tokens / t_ch, tokens * heads * fch / t_ch * gf);
            if (!isnan(sg)) printf(" (%.0f%% of sgemm)", 100 * tokens * heads * fch / t_ch * gf / sg);
            printf("\n  forward, 1 thread:           %9.3f ms  (scaling x%.2f with %d threads)\n", t_1 * 1e3,
                   t_1 / t_auto, nthreads);
            printf("  vs ref (1 thread, T=%ld):     x%.1f faster\n", b.ref_T, t_ref / t_small);
        }
        if (do_bwd) {
            printf("  backward:                    %9.3f ms  %10.0f tokens/s  %7.1f GFLOP/s", t_bwd * 1e3,
                   tokens / t_bwd, tokens * heads * 3 * frec / t_bwd * gf);
            if (do_fwd) printf("  (%.2f x forward)", t_bwd / t_auto);
            printf("\n  backward vs ref (1 thread, T=%ld): x%.1f faster\n", b.ref_T < 128 ? b.ref_T : 128,
                   t_refbwd / t_smallbwd);
        }
        if (do_dec) {
            const double by1 = 8.0 * b.H * b.K * b.V, byN = by1 * b.N;
            printf("  decode, 1 sequence:          %9.3f us  %6.1f GB/s  bound %9.3f us (x%.2f of it)\n",
                   t_dec1 * 1e6, by1 / t_dec1 * gf, s_dec1 * 1e6, t_dec1 / s_dec1);
            printf("  decode, %ld sequences:%*s %9.3f us  %6.1f GB/s  bound %9.3f us (x%.2f of it)\n", b.N,
                   b.N < 10 ? 9 : b.N < 100 ? 8 : 7, "", t_decN * 1e6, byN / t_decN * gf, s_decN * 1e6,
                   t_decN / s_decN);
        }
    }
    kla_close(&ctx), kla_close(&ctx1), kla_close(&ref);
    return 0;
}
