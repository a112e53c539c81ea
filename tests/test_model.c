/*
 * test_model.c: the training step's reference (ref/kla_model.c) through the public API
 * (TAP). Every parameter gradient of the layer and of the model against float64 central
 * finite differences; float32 and the fast path against float64; AdamW and clipping
 * against a hand computation; a tiny model trained on a recall task whose loss must fall
 * below a bound; bad input refused with a message.
 *   test_model [--seed N] [--steps N]
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"

#include "tap.h"

static uint64_t rng = 20261204;
static double unif(void)
{
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (double)((z ^ (z >> 31)) >> 11) * 0x1p-53;
}

static KlaContext *open_ctx(const char *be)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = be;
    KlaContext *c = NULL;
    if (kla_open(&c, &p) < 0) return NULL;
    return c;
}

static KlaModelConfig tiny(KlaMixer mixer)
{
    KlaModelConfig c;
    kla_default_model_config(&c);
    c.vocab = 13, c.d_model = 8, c.n_layer = 2, c.n_head = 2, c.d_k = 4, c.d_v = 3, c.d_ff = 12;
    c.mixer = mixer;
    return c;
}

/* every parameter: the authors' init, then moved off special values (norms 1, bias 0) */
static void randomize(KlaModel *m, double amp)
{
    kla_model_init(m, 7);
    for (int i = 0; i < kla_model_param_count(m); i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        double *w = malloc((size_t)p.numel * sizeof *w);
        kla_model_read(m, KLA_PART_PARAM, i, KLA_OUT(w, KLA_F64, p.numel));
        for (int64_t j = 0; j < p.numel; j++) w[j] += amp * (2 * unif() - 1);
        kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(w, KLA_F64, p.numel));
        free(w);
    }
}

static void copy_params(KlaModel *dst, KlaModel *src)
{
    for (int i = 0; i < kla_model_param_count(src); i++) {
        KlaParamInfo p;
        kla_model_param_info(src, i, &p);
        double *w = malloc((size_t)p.numel * sizeof *w);
        kla_model_read(src, KLA_PART_PARAM, i, KLA_OUT(w, KLA_F64, p.numel));
        kla_model_write(dst, KLA_PART_PARAM, i, KLA_IN(w, KLA_F64, p.numel));
        free(w);
    }
}

static double *read_part(KlaModel *m, KlaModelPart part, int i, int64_t *n)
{
    KlaParamInfo p;
    kla_model_param_info(m, i, &p);
    double *w = malloc((size_t)p.numel * sizeof *w);
    kla_model_read(m, part, i, KLA_OUT(w, KLA_F64, p.numel));
    *n = p.numel;
    return w;
}

static double rel_rmse(const double *ref, const double *got, int64_t n)
{
    double sd = 0, sr = 0;
    for (int64_t i = 0; i < n; i++) sd += (got[i] - ref[i]) * (got[i] - ref[i]), sr += ref[i] * ref[i];
    return sr > 0 ? sqrt(sd / sr) : sqrt(sd / (double)n);
}

/* ---- the model: finite differences of every parameter ------------------------------------- */

typedef struct batch {
    int64_t B, T, ids[64], labels[64];
} batch;

static batch make_batch(int64_t vocab)
{
    batch b = { .B = 2, .T = 7 };
    for (int i = 0; i < 14; i++) {
        b.ids[i] = (int64_t)(unif() * (double)vocab);
        b.labels[i] = i % 3 == 1 ? -100 : (int64_t)(unif() * (double)vocab);
    }
    return b;
}

static double loss_of(KlaModel *m, const batch *b)
{
    KlaBatch kb = { b->B, b->T, KLA_IN(b->ids, KLA_I64, b->B * b->T), KLA_IN(b->labels, KLA_I64, b->B * b->T) };
    KlaLoss l;
    return kla_model_loss(m, &kb, 0, &l) < 0 ? NAN : l.loss;
}

static void test_model_fd(KlaContext *c64, KlaMixer mixer)
{
    const char *mx = mixer == KLA_MIXER_GDN ? "gdn" : "kla";
    KlaModelConfig cfg = tiny(mixer);
    KlaModel *m = NULL;
    if (kla_model_new(c64, &cfg, &m) < 0) {
        check(0, "model %s: kla_model_new: %s", mx, kla_error_detail(c64));
        return;
    }
    randomize(m, 0.3);
    batch b = make_batch(cfg.vocab);
    KlaBatch kb = { b.B, b.T, KLA_IN(b.ids, KLA_I64, 14), KLA_IN(b.labels, KLA_I64, 14) };
    KlaLoss l;
    int r = kla_model_loss(m, &kb, 1, &l);
    check(r == 0 && l.labelled == 9 && isfinite(l.loss), "model %s: loss %.6f over %lld labels", mx, l.loss,
          (long long)l.labelled);
    double worst = 0;
    const char *wname = "";
    for (int i = 0; i < kla_model_param_count(m); i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        int64_t n;
        double *w = read_part(m, KLA_PART_PARAM, i, &n), *g = read_part(m, KLA_PART_GRAD, i, &n);
        double *fd = malloc((size_t)n * sizeof *fd);
        for (int64_t j = 0; j < n; j++) {
            const double o = w[j], h = 2e-6;
            w[j] = o + h;
            kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(w, KLA_F64, n));
            const double lp = loss_of(m, &b);
            w[j] = o - h;
            kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(w, KLA_F64, n));
            const double lm = loss_of(m, &b);
            w[j] = o;
            kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(w, KLA_F64, n));
            fd[j] = (lp - lm) / (2 * h);
        }
        const double e = rel_rmse(fd, g, n);
        if (e > worst || isnan(e)) worst = e, wname = p.name;
        check(e < 1e-6, "model %s: d %s against float64 central differences: rel_rmse %.1e", mx, p.name, e);
        free(w), free(g), free(fd);
    }
    printf("# model %s: worst %.2e (%s)\n", mx, worst, wname);
    kla_model_free(&m);
}

/* ---- the layer: y, dx and every parameter gradient ------------------------------------- */

static void test_layer_fd(KlaContext *c64, KlaMixer mixer, int varlen)
{
    const char *mx = mixer == KLA_MIXER_GDN ? "gdn" : "kla";
    KlaModelConfig cfg = tiny(mixer);
    KlaModel *m = NULL;
    if (kla_layer_new(c64, &cfg, &m) < 0) {
        check(0, "layer %s: kla_layer_new: %s", mx, kla_error_detail(c64));
        return;
    }
    randomize(m, 0.3);
    const int64_t B = varlen ? 1 : 2, T = varlen ? 13 : 6, d = cfg.d_model, n = B * T * d;
    const int64_t cu[3] = { 0, 5, 13 };
    KlaIn cin = varlen ? KLA_IN(cu, KLA_I64, 3) : (KlaIn){ 0 };
    double *x = malloc((size_t)n * 8), *dy = malloc((size_t)n * 8), *y = malloc((size_t)n * 8);
    double *dx = malloc((size_t)n * 8), *y2 = malloc((size_t)n * 8), *fd = malloc((size_t)n * 8);
    for (int64_t i = 0; i < n; i++) x[i] = 2 * unif() - 1, dy[i] = 2 * unif() - 1;
    int r = kla_layer_backward(m, B, T, KLA_IN(x, KLA_F64, n), KLA_IN(dy, KLA_F64, n), cin, KLA_OUT(y, KLA_F64, n),
                               KLA_OUT(dx, KLA_F64, n));
    check(r == 0, "layer %s%s: kla_layer_backward %s", mx, varlen ? " varlen" : "", r ? kla_error_detail(c64) : "");
    /* L = sum(dy * y) */
#define LOSS(res)                                                                                              \
    do {                                                                                                       \
        kla_layer_backward(m, B, T, KLA_IN(x, KLA_F64, n), (KlaIn){ 0 }, cin, KLA_OUT(y2, KLA_F64, n),          \
                           (KlaOut){ 0 });                                                                     \
        res = 0;                                                                                               \
        for (int64_t q = 0; q < n; q++) res += dy[q] * y2[q];                                                  \
    } while (0)
    for (int64_t i = 0; i < n; i++) {
        const double o = x[i], h = 1e-5;
        double lp, lm;
        x[i] = o + h;
        LOSS(lp);
        x[i] = o - h;
        LOSS(lm);
        x[i] = o;
        fd[i] = (lp - lm) / (2 * h);
    }
    const double ex = rel_rmse(fd, dx, n);
    check(ex < 1e-6, "layer %s%s: dx against central differences: rel_rmse %.1e", mx, varlen ? " varlen" : "", ex);
    /* the parameters' gradients of that call, before the probing calls below replace them */
    const int np = kla_model_param_count(m);
    double **g = calloc((size_t)np, sizeof *g);
    for (int i = 0; i < np; i++) {
        int64_t k;
        g[i] = read_part(m, KLA_PART_GRAD, i, &k);
    }
    for (int i = 0; i < np; i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        int64_t k;
        double *w = read_part(m, KLA_PART_PARAM, i, &k), *f = malloc((size_t)k * 8);
        for (int64_t j = 0; j < k; j++) {
            const double o = w[j], h = 2e-6;
            double lp, lm;
            w[j] = o + h;
            kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(w, KLA_F64, k));
            LOSS(lp);
            w[j] = o - h;
            kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(w, KLA_F64, k));
            LOSS(lm);
            w[j] = o;
            kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(w, KLA_F64, k));
            f[j] = (lp - lm) / (2 * h);
        }
        const double e = rel_rmse(f, g[i], k);
        check(e < 1e-6, "layer %s%s: d %s against central differences: rel_rmse %.1e", mx, varlen ? " varlen" : "",
              p.name, e);
        free(w), free(f), free(g[i]);
    }
#undef LOSS
    free(g), free(x), free(dy), free(y), free(dx), free(y2), free(fd);
    kla_model_free(&m);
}

/* the convolution restarts at each sequence: a layer on [0, 5) + [5, 13) packed equals the
 * two sequences run alone */
static void test_layer_varlen_split(KlaContext *c64)
{
    KlaModelConfig cfg = tiny(KLA_MIXER_KLA);
    KlaModel *m = NULL;
    kla_layer_new(c64, &cfg, &m);
    randomize(m, 0.3);
    const int64_t d = cfg.d_model, n = 13 * d, cu[3] = { 0, 5, 13 };
    double x[13 * 8], y[13 * 8], ya[13 * 8];
    for (int64_t i = 0; i < n; i++) x[i] = 2 * unif() - 1;
    int r = kla_layer_backward(m, 1, 13, KLA_IN(x, KLA_F64, n), (KlaIn){ 0 }, KLA_IN(cu, KLA_I64, 3),
                               KLA_OUT(y, KLA_F64, n), (KlaOut){ 0 });
    r |= kla_layer_backward(m, 1, 5, KLA_IN(x, KLA_F64, 5 * d), (KlaIn){ 0 }, (KlaIn){ 0 },
                            KLA_OUT(ya, KLA_F64, 5 * d), (KlaOut){ 0 });
    r |= kla_layer_backward(m, 1, 8, KLA_IN(x + 5 * d, KLA_F64, 8 * d), (KlaIn){ 0 }, (KlaIn){ 0 },
                            KLA_OUT(ya + 5 * d, KLA_F64, 8 * d), (KlaOut){ 0 });
    double e = 0;
    for (int64_t i = 0; i < n; i++) e = fmax(e, fabs(y[i] - ya[i]));
    check(r == 0 && e < 1e-13, "layer: packed sequences equal separate runs (the convolution restarts): %.1e", e);
    kla_model_free(&m);
}

/* ---- precisions: float32 and the fast path against float64 ------------------------------ */

static void test_precisions(KlaContext *c64, const char *be, double tol)
{
    KlaContext *c = open_ctx(be);
    if (!c) {
        printf("# backend %s not usable: skipped\n", be);
        return;
    }
    KlaModelConfig cfg = tiny(KLA_MIXER_KLA);
    cfg.d_model = 16, cfg.d_ff = 24;
    KlaModel *m64 = NULL, *m = NULL;
    kla_model_new(c64, &cfg, &m64);
    kla_model_new(c, &cfg, &m);
    randomize(m64, 0.3);
    copy_params(m, m64);
    batch b = make_batch(cfg.vocab);
    KlaBatch kb = { b.B, b.T, KLA_IN(b.ids, KLA_I64, 14), KLA_IN(b.labels, KLA_I64, 14) };
    KlaLoss l64, l;
    int r = kla_model_loss(m64, &kb, 1, &l64) | kla_model_loss(m, &kb, 1, &l);
    check(r == 0 && fabs(l.loss - l64.loss) < tol * fabs(l64.loss), "%s: loss %.8f against float64 %.8f", be, l.loss,
          l64.loss);
    double worst = 0;
    for (int i = 0; i < kla_model_param_count(m); i++) {
        int64_t n;
        double *g64 = read_part(m64, KLA_PART_GRAD, i, &n), *g = read_part(m, KLA_PART_GRAD, i, &n);
        worst = fmax(worst, rel_rmse(g64, g, n));
        free(g64), free(g);
    }
    check(worst < 20 * tol, "%s: every gradient against float64: worst rel_rmse %.1e", be, worst);
    KlaAdamW a;
    kla_default_adamw(&a);
    r = kla_model_update(m64, &a, NULL) | kla_model_update(m, &a, NULL);
    worst = 0;
    for (int i = 0; i < kla_model_param_count(m); i++) {
        int64_t n;
        double *p64 = read_part(m64, KLA_PART_PARAM, i, &n), *p = read_part(m, KLA_PART_PARAM, i, &n);
        worst = fmax(worst, rel_rmse(p64, p, n));
        free(p64), free(p);
    }
    check(r == 0 && worst < tol, "%s: parameters after an AdamW step against float64: worst rel_rmse %.1e", be, worst);
    kla_model_free(&m64);
    kla_model_free(&m);
    kla_close(&c);
}

/* ---- AdamW and clipping by hand ----------------------------------------------------------- */

static void test_adamw(KlaContext *c64)
{
    KlaModelConfig cfg = tiny(KLA_MIXER_KLA);
    KlaModel *m = NULL;
    kla_model_new(c64, &cfg, &m);
    randomize(m, 0.3);
    batch b = make_batch(cfg.vocab);
    KlaBatch kb = { b.B, b.T, KLA_IN(b.ids, KLA_I64, 14), KLA_IN(b.labels, KLA_I64, 14) };
    KlaAdamW a = { .lr = 0.01, .beta1 = 0.8, .beta2 = 0.9, .eps = 1e-3, .weight_decay = 0.05, .clip = 0.05 };
    const int np = kla_model_param_count(m);
    double **p0 = calloc((size_t)np, sizeof *p0), **g0 = calloc((size_t)np, sizeof *g0);
    double **m1 = calloc((size_t)np, sizeof *m1), **v1 = calloc((size_t)np, sizeof *v1);
    int64_t *nn = calloc((size_t)np, sizeof *nn);
    KlaLoss l;
    double gnorm = -1, ss = 0;
    int r = 0;
    for (int step = 1; step <= 2; step++) {
        r |= kla_model_loss(m, &kb, 1, &l);
        ss = 0;
        for (int i = 0; i < np; i++) {
            free(p0[i]), free(g0[i]);
            p0[i] = read_part(m, KLA_PART_PARAM, i, &nn[i]);
            g0[i] = read_part(m, KLA_PART_GRAD, i, &nn[i]);
            for (int64_t j = 0; j < nn[i]; j++) ss += g0[i][j] * g0[i][j];
            if (step == 1) m1[i] = calloc((size_t)nn[i], 8), v1[i] = calloc((size_t)nn[i], 8);
        }
        r |= kla_model_update(m, &a, &gnorm);
        /* by hand: clip to the global norm, then PyTorch's AdamW */
        const double norm = sqrt(ss), sc = a.clip / (norm + 1e-6) < 1 ? a.clip / (norm + 1e-6) : 1;
        const double bc1 = 1 - pow(a.beta1, step), bc2 = 1 - pow(a.beta2, step);
        double worst = 0;
        for (int i = 0; i < np; i++) {
            int64_t n;
            double *p1 = read_part(m, KLA_PART_PARAM, i, &n), *mm = read_part(m, KLA_PART_ADAM_M, i, &n);
            for (int64_t j = 0; j < n; j++) {
                const double g = g0[i][j] * sc;
                m1[i][j] = a.beta1 * m1[i][j] + (1 - a.beta1) * g;
                v1[i][j] = a.beta2 * v1[i][j] + (1 - a.beta2) * g * g;
                const double want = p0[i][j] * (1 - a.lr * a.weight_decay) -
                                    a.lr / bc1 * m1[i][j] / (sqrt(v1[i][j]) / sqrt(bc2) + a.eps);
                worst = fmax(worst, fabs(p1[j] - want) + fabs(mm[j] - m1[i][j]));
            }
            free(p1), free(mm);
        }
        check(r == 0 && fabs(gnorm - sqrt(ss)) < 1e-12 * sqrt(ss) && sc < 1,
              "AdamW step %d: the global gradient norm %.6f is reported and clipped to %.2f", step, gnorm, a.clip);
        check(r == 0 && worst < 1e-15, "AdamW step %d: parameters and moments as PyTorch's AdamW by hand: %.1e", step,
              worst);
    }
    check(kla_model_steps(m) == 2, "AdamW: two steps counted");
    r = kla_model_update(m, &a, NULL);
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "backward before each update"),
          "a second update without a backward is refused: %s", kla_error_detail(c64));
    for (int i = 0; i < np; i++) free(p0[i]), free(g0[i]), free(m1[i]), free(v1[i]);
    free(p0), free(g0), free(m1), free(v1), free(nn);
    kla_model_free(&m);
}

/* ---- training: a tiny model learns a recall task ------------------------------------------- */

/* keys 1..6, values 7..12; 3 pairs k v, then the 3 keys again in another order, each
 * labelled with its value (positions 6, 7, 8 predict the value of the key they read) */
static void recall_batch(int64_t B, int64_t *ids, int64_t *labels)
{
    const int64_t T = 9;
    for (int64_t b = 0; b < B; b++) {
        int64_t keys[3], vals[3];
        for (int i = 0; i < 3; i++) {
            int dup;
            do {
                keys[i] = 1 + (int64_t)(unif() * 6);
                dup = 0;
                for (int j = 0; j < i; j++) dup |= keys[j] == keys[i];
            } while (dup);
            vals[i] = 7 + (int64_t)(unif() * 6);
        }
        for (int i = 0; i < 3; i++) {
            ids[b * T + 2 * i] = keys[i], ids[b * T + 2 * i + 1] = vals[i];
            labels[b * T + 2 * i] = labels[b * T + 2 * i + 1] = -100;
        }
        const int perm = (int)(unif() * 6), order[6][3] = { { 0, 1, 2 }, { 0, 2, 1 }, { 1, 0, 2 },
                                                            { 1, 2, 0 }, { 2, 0, 1 }, { 2, 1, 0 } };
        for (int i = 0; i < 3; i++) {
            ids[b * T + 6 + i] = keys[order[perm][i]];
            labels[b * T + 6 + i] = vals[order[perm][i]];
        }
    }
}

static void test_training(int steps, double bound)
{
    rng = 20261204; /* the data's own seed: the bound holds for this run, whatever --seed is */
    KlaContext *c = open_ctx("ref");
    KlaModelConfig cfg;
    kla_default_model_config(&cfg);
    cfg.vocab = 13, cfg.d_model = 32, cfg.n_layer = 2, cfg.n_head = 2, cfg.d_k = 16, cfg.d_v = 16, cfg.d_ff = 64;
    KlaModel *m = NULL;
    if (!c || kla_model_new(c, &cfg, &m) < 0) {
        check(0, "training: model: %s", c ? kla_error_detail(c) : "no ref backend");
        kla_close(&c);
        return;
    }
    kla_model_init(m, 42);
    KlaAdamW a;
    kla_default_adamw(&a);
    a.lr = 3e-3;
    enum { B = 16, T = 9 };
    int64_t ids[B * T], labels[B * T];
    double first = 0, last = 0;
    int r = 0;
    for (int s = 0; s < steps && !r; s++) {
        recall_batch(B, ids, labels);
        KlaBatch kb = { B, T, KLA_IN(ids, KLA_I64, B * T), KLA_IN(labels, KLA_I64, B * T) };
        KlaLoss l;
        r = kla_model_loss(m, &kb, 1, &l) || kla_model_update(m, &a, NULL);
        if (s == 0) first = l.loss;
        last = s >= steps - 20 ? last + l.loss / 20 : 0;
        if (s % 50 == 0 || s == steps - 1) printf("# training step %d: loss %.4f\n", s, l.loss);
    }
    check(r == 0 && last < bound, "training: %d steps on a 3-pair recall task: loss %.3f -> %.3f (mean of the last 20), "
          "below %.2f (chance: ln 6 = 1.79)", steps, first, last, bound);
    kla_model_free(&m);
    kla_close(&c);
}

/* ---- bad input ------------------------------------------------------------------------------ */

static void test_bad(KlaContext *c64)
{
    KlaModelConfig cfg = tiny(KLA_MIXER_KLA);
    KlaModel *m = NULL, *layer = NULL;
    KlaModelConfig bad = cfg;
    bad.d_k = 0;
    int r = kla_model_new(c64, &bad, &m);
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "d_k"), "a config with d_k = 0 is refused: %s",
          kla_error_detail(c64));
    kla_model_new(c64, &cfg, &m);
    kla_layer_new(c64, &cfg, &layer);
    kla_model_init(m, 1);
    r = kla_model_param_index(m, "layers.0.attn.initial_state");
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "initial_state"), "an unknown parameter name is refused: %s",
          kla_error_detail(c64));
    r = kla_model_param_index(m, "attn.q_proj.weight");
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "layers.0.attn.q_proj.weight"),
          "a layer's name on a model gets a hint: %s", kla_error_detail(c64));
    check(kla_model_param_index(m, "layers.1.mlp.down_proj.weight") >= 0, "parameter names are fla's");
    double w[200] = { 0 };
    r = kla_model_write(m, KLA_PART_PARAM, 1, KLA_IN(w, KLA_F64, 7));
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "7 elements"), "a wrong-sized parameter is refused: %s",
          kla_error_detail(c64));
    w[3] = NAN;
    r = kla_model_write(m, KLA_PART_PARAM, 1, KLA_IN(w, KLA_F64, 8));
    check(r == KLA_ERANGE && strstr(kla_error_detail(c64), "nan"), "a NaN parameter is refused: %s",
          kla_error_detail(c64));
    batch b = make_batch(cfg.vocab);
    b.ids[5] = cfg.vocab;
    KlaBatch kb = { b.B, b.T, KLA_IN(b.ids, KLA_I64, 14), KLA_IN(b.labels, KLA_I64, 14) };
    KlaLoss l;
    r = kla_model_loss(m, &kb, 1, &l);
    check(r == KLA_ERANGE && strstr(kla_error_detail(c64), "input_ids: 13 at [0, 5]"), "a token id out of range: %s",
          kla_error_detail(c64));
    b = make_batch(cfg.vocab);
    b.labels[9] = -1;
    kb = (KlaBatch){ b.B, b.T, KLA_IN(b.ids, KLA_I64, 14), KLA_IN(b.labels, KLA_I64, 14) };
    r = kla_model_loss(m, &kb, 1, &l);
    check(r == KLA_ERANGE && strstr(kla_error_detail(c64), "labels: -1 at [1, 2]"), "a label out of range: %s",
          kla_error_detail(c64));
    for (int i = 0; i < 14; i++) b.labels[i] = -100;
    r = kla_model_loss(m, &kb, 1, &l);
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "-100"), "a backward without labels: %s",
          kla_error_detail(c64));
    kb.labels.numel = 13;
    r = kla_model_loss(m, &kb, 0, &l);
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "13 elements"), "labels of the wrong size: %s",
          kla_error_detail(c64));
    KlaAdamW a;
    kla_default_adamw(&a);
    KlaModel *fresh = NULL;
    kla_model_new(c64, &cfg, &fresh);
    r = kla_model_update(fresh, &a, NULL);
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "no fresh gradients"), "an update before any backward: %s",
          kla_error_detail(c64));
    a.beta2 = 1;
    b = make_batch(cfg.vocab);
    kb = (KlaBatch){ b.B, b.T, KLA_IN(b.ids, KLA_I64, 14), KLA_IN(b.labels, KLA_I64, 14) };
    kla_model_loss(m, &kb, 1, &l);
    r = kla_model_update(m, &a, NULL);
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "beta2 1"), "AdamW with beta2 = 1 is refused: %s",
          kla_error_detail(c64));
    r = kla_model_loss(layer, &kb, 0, &l);
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "layer"), "a layer has no loss: %s", kla_error_detail(c64));
    double x[8 * 6] = { 0 }, y[8 * 6];
    r = kla_layer_backward(layer, 1, 6, KLA_IN(x, KLA_F64, 47), (KlaIn){ 0 }, (KlaIn){ 0 }, KLA_OUT(y, KLA_F64, 48),
                           (KlaOut){ 0 });
    check(r == KLA_EINVAL && strstr(kla_error_detail(c64), "tensor x: 47 elements"), "a layer's x of the wrong size: %s",
          kla_error_detail(c64));
    const int64_t cu[3] = { 0, 7, 6 };
    r = kla_layer_backward(layer, 1, 6, KLA_IN(x, KLA_F64, 48), (KlaIn){ 0 }, KLA_IN(cu, KLA_I64, 3),
                           KLA_OUT(y, KLA_F64, 48), (KlaOut){ 0 });
    check(r == KLA_ERANGE && strstr(kla_error_detail(c64), "cu_seqlens"), "a layer's bad cu_seqlens: %s",
          kla_error_detail(c64));
    kla_model_free(&fresh);
    kla_model_free(&m);
    kla_model_free(&layer);
}

int main(int argc, char **argv)
{
    int steps = 400;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "--seed")) rng = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--steps")) steps = atoi(argv[++i]);
    }
    printf("# seed %llu (replay: test_model --seed %llu)\n", (unsigned long long)rng, (unsigned long long)rng);
    KlaContext *c64 = open_ctx("ref64");
    if (!c64) {
        printf("not ok 1 - backend ref64\n1..1\n");
        return 1;
    }
    test_model_fd(c64, KLA_MIXER_KLA);
    test_model_fd(c64, KLA_MIXER_GDN);
    test_layer_fd(c64, KLA_MIXER_KLA, 0);
    test_layer_fd(c64, KLA_MIXER_GDN, 0);
    test_layer_fd(c64, KLA_MIXER_KLA, 1);
    test_layer_varlen_split(c64);
    test_precisions(c64, "ref", 1e-5);
    if (kla_backend_available("simd") == 1) test_precisions(c64, "simd", 1e-5);
    test_adamw(c64);
    test_bad(c64);
    test_training(steps, 0.3);
    kla_close(&c64);
    printf("1..%d\n", n_test);
    return n_fail != 0;
}
