/*
 * bench_train.c: `kla bench --op train`, the training step at the KLA authors' MQAR size
 * (d 256, 2 blocks, 4 heads, dk 48, dv 96, MLP 1024, vocab 8192, batch 32 x 256 tokens,
 * 32 labelled positions a sequence), with its yardsticks measured in the same process:
 *
 *   - the step's time (loss, backward, AdamW): median of --reps after two warm-up steps;
 *   - its matrix products' FLOPs (projections, MLP, the head at labelled rows, forward
 *     and backward: docs/benchmarks.md) and their rate against OpenBLAS sgemm (1024^3,
 *     the same threads);
 *   - memory: kla_model_bytes (parameters, gradients, moments, the workspace of a step)
 *     and the process's peak resident size, and how the first grows with T and with B.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef KLA_HAVE_OPENBLAS
#include <cblas.h>
#endif

#include "bench_train.h"
#include "kla.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmpd(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* random ids; labels at `lab` random positions of each row (the MQAR queries), else -100 */
static void batch(uint64_t *s, int64_t B, int64_t T, int64_t V, int64_t lab, int64_t *ids, int64_t *labels)
{
    for (int64_t i = 0; i < B * T; i++) {
        *s = *s * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int64_t)((*s >> 33) % (uint64_t)V), labels[i] = -100;
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < lab; j++) {
            *s = *s * 6364136223846793005ull + 1442695040888963407ull;
            const int64_t t = (int64_t)((*s >> 33) % (uint64_t)T);
            labels[b * T + t] = ids[b * T + (t + 1) % T];
        }
}

/* multiply-adds of the step's matrix products: every Linear forward once and backward
 * twice (input and weight gradients), the head at the labelled rows `nr` */
static double step_macs(const KlaModelConfig *c, int64_t rows, int64_t nr)
{
    const double d = (double)c->d_model, Dk = (double)(c->n_head * c->d_k), Dv = (double)(c->n_head * c->d_v);
    const double H = (double)c->n_head, F = (double)c->d_ff;
    const double block = d * (2 * Dk + Dv + 2 * H + Dv) + Dv * d + 3 * d * F;
    return 3 * ((double)rows * block * (double)c->n_layer + (double)nr * (double)c->vocab * d);
}

static double sgemm_rate(void)
{
#ifdef KLA_HAVE_OPENBLAS
    const int n = 1024;
    float *a = calloc((size_t)n * n, 4), *b = calloc((size_t)n * n, 4), *c = calloc((size_t)n * n, 4);
    if (!a || !b || !c) {
        free(a), free(b), free(c);
        return NAN;
    }
    for (int i = 0; i < n * n; i++) a[i] = (float)(i % 7) - 3, b[i] = (float)(i % 5) - 2;
    double best = INFINITY;
    for (int r = 0; r < 5; r++) {
        const double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1, a, n, b, n, 0, c, n);
        if (now() - t0 < best) best = now() - t0;
    }
    free(a), free(b), free(c);
    return 2.0 * n * n * n / best * 1e-9;
#else
    return NAN;
#endif
}

/* median seconds of `reps` steps after 2 warm-up steps; memory after them */
static int time_steps(KlaContext *ctx, const KlaModelConfig *c, int64_t B, int64_t T, int64_t lab, int reps,
                      double *sec, int64_t *bytes, int64_t *labelled)
{
    KlaModel *m = NULL;
    int64_t *ids = malloc((size_t)(B * T) * sizeof *ids), *labels = malloc((size_t)(B * T) * sizeof *labels);
    double *t = malloc((size_t)(reps + 2) * sizeof *t);
    int r = -1;
    if (!ids || !labels || !t || kla_model_new(ctx, c, &m) < 0 || kla_model_init(m, 1) < 0) {
        fprintf(stderr, "kla bench: %s\n", ctx ? kla_error_detail(ctx) : "out of memory");
        goto done;
    }
    KlaAdamW a;
    kla_default_adamw(&a);
    uint64_t s = 42;
    for (int i = 0; i < reps + 2; i++) {
        batch(&s, B, T, c->vocab, lab, ids, labels);
        KlaBatch kb = { B, T, KLA_IN(ids, KLA_I64, B * T), KLA_IN(labels, KLA_I64, B * T) };
        KlaLoss l;
        const double t0 = now();
        if (kla_model_loss(m, &kb, 1, &l) < 0 || kla_model_update(m, &a, NULL) < 0) {
            fprintf(stderr, "kla bench: %s\n", kla_error_detail(ctx));
            goto done;
        }
        t[i] = now() - t0;
        *labelled = l.labelled;
    }
    qsort(t + 2, (size_t)reps, sizeof *t, cmpd);
    *sec = t[2 + reps / 2];
    *bytes = kla_model_bytes(m);
    r = 0;
done:
    kla_model_free(&m);
    free(ids), free(labels), free(t);
    return r;
}

int bench_train(KlaContext *ctx, const KlaModelConfig *c, int64_t B, int64_t T, int reps, int json, int scaling)
{
    const int64_t lab = 32; /* MQAR's queries per sequence */
    double sec;
    int64_t bytes, nlab;
    char desc[256];
    kla_describe(ctx, desc, sizeof desc);
    if (!json) {
        printf("kla bench: %s; a training step (loss, backward, AdamW): vocab %lld, d %lld, %lld blocks, %lld heads, "
               "dk %lld, dv %lld, MLP %lld, mixer %s, B %lld x T %lld, %lld labelled a sequence\n",
               desc, (long long)c->vocab, (long long)c->d_model, (long long)c->n_layer, (long long)c->n_head,
               (long long)c->d_k, (long long)c->d_v, (long long)c->d_ff, c->mixer == KLA_MIXER_GDN ? "gdn" : "kla",
               (long long)B, (long long)T, (long long)lab);
        fflush(stdout);
    }
    if (time_steps(ctx, c, B, T, lab, reps, &sec, &bytes, &nlab) < 0) return 1;
    /* the fast path (simd) computes the head at labelled rows only, the references at all */
    const int labelled_only = !strncmp(desc, "simd", 4);
    const double flop = 2 * step_macs(c, B * T, labelled_only ? nlab : B * T);
    const double sg = sgemm_rate();
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    if (json) {
        printf("{\"describe\": \"%s\", \"B\": %lld, \"T\": %lld, \"step_ms\": %.6g, \"tokens_per_s\": %.6g, "
               "\"matrix_gflop\": %.6g, \"matrix_gflops\": %.6g, \"sgemm_gflops\": %.6g, \"model_bytes\": %lld, "
               "\"peak_rss_bytes\": %lld", desc, (long long)B, (long long)T, sec * 1e3, (double)(B * T) / sec,
               flop * 1e-9, flop / sec * 1e-9, sg, (long long)bytes, (long long)ru.ru_maxrss * 1024);
    } else {
        printf("  step:             %9.1f ms  median of %d  %8.0f tokens/s\n", sec * 1e3, reps, (double)(B * T) / sec);
        printf("  matrix products:  %9.1f GFLOP a step, %6.1f GFLOP/s", flop * 1e-9, flop / sec * 1e-9);
        if (!isnan(sg)) printf(" = %.0f%% of OpenBLAS sgemm (%.1f GFLOP/s, 1024^3, same threads)", 100 * flop / sec * 1e-9 / sg, sg);
        printf("\n  memory:           %9.1f MB held by the model (parameters, gradients, moments, workspace); "
               "peak resident %.1f MB\n", (double)bytes / 1e6, (double)ru.ru_maxrss / 1e3);
    }
    if (scaling) {
        /* the workspace against T (B fixed) and against B (T fixed): linear in both */
        const int64_t Ts[3] = { T / 2, T, 2 * T }, Bs[3] = { B / 2 > 0 ? B / 2 : 1, B, 2 * B };
        if (json) printf(", \"scaling\": [");
        else printf("  memory and time against T (B %lld) and B (T %lld):\n", (long long)B, (long long)T);
        for (int k = 0; k < 6; k++) {
            const int64_t bb = k < 3 ? B : Bs[k - 3], tt = k < 3 ? Ts[k] : T;
            double s2;
            int64_t by, nl;
            if (time_steps(ctx, c, bb, tt, lab, 1, &s2, &by, &nl) < 0) return 1;
            if (json)
                printf("%s{\"B\": %lld, \"T\": %lld, \"model_bytes\": %lld, \"step_ms\": %.6g}", k ? ", " : "",
                       (long long)bb, (long long)tt, (long long)by, s2 * 1e3);
            else
                printf("    B %4lld  T %5lld  %9.1f MB  %9.1f ms\n", (long long)bb, (long long)tt, (double)by / 1e6,
                       s2 * 1e3);
            fflush(stdout);
        }
        if (json) printf("]");
    }
    if (json) printf("}\n");
    return 0;
}
