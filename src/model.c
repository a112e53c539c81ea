/*
 * model.c: the public API of the layer, the model and the training step (kla.h): the
 * parameter table with flash-linear-attention's names, validation at the boundary, dtype
 * conversion, and dispatch to the reference (ref/kla_model.c) in the context's precision:
 * float64 on ref64, the fast float path on simd (when built with OpenBLAS), else float.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla_internal.h"
#include "kla_model.h"

void kla_default_model_config(KlaModelConfig *c)
{
    memset(c, 0, sizeof *c);
    c->vocab = 8192, c->d_model = 256, c->n_layer = 2, c->n_head = 4, c->d_k = 48, c->d_v = 96;
    c->d_ff = 1024, c->norm_eps = 1e-5, c->mixer = KLA_MIXER_KLA;
}

void kla_default_adamw(KlaAdamW *a)
{
    a->lr = 1e-3, a->beta1 = 0.9, a->beta2 = 0.95, a->eps = 1e-8, a->weight_decay = 0.1, a->clip = 1.0;
}

/* ---- the parameter table ---------------------------------------------------------------- */

static int add_param(kla_mparam *out, int max, int n, int64_t *off, const char *prefix, const char *name,
                     int ndim, int64_t a, int64_t b, int64_t c)
{
    if (n < max) {
        kla_mparam *p = &out[n];
        snprintf(p->name, sizeof p->name, "%s%s", prefix, name);
        p->ndim = ndim;
        p->shape[0] = a, p->shape[1] = b, p->shape[2] = c;
        p->numel = a * (ndim > 1 ? b : 1) * (ndim > 2 ? c : 1);
        p->offset = *off;
    }
    *off += a * (ndim > 1 ? b : 1) * (ndim > 2 ? c : 1);
    return n + 1;
}

int kla_mparams(const kla_mdims *m, kla_mparam *out, int max, int64_t *total)
{
    const int64_t d = m->d, H = m->H, Dk = H * m->dk, Dv = H * m->dv, F = m->F;
    int64_t off = 0;
    int n = 0;
    char pre[48];
    if (!m->layer_only) n = add_param(out, max, n, &off, "", "embeddings.weight", 2, m->vocab, d, 0);
    for (int64_t l = 0; l < (m->layer_only ? 1 : m->L); l++) {
        snprintf(pre, sizeof pre, m->layer_only ? "attn." : "layers.%lld.attn.", (long long)l);
        if (!m->layer_only) {
            char bp[48];
            snprintf(bp, sizeof bp, "layers.%lld.", (long long)l);
            n = add_param(out, max, n, &off, bp, "attn_norm.weight", 1, d, 0, 0);
        }
        n = add_param(out, max, n, &off, pre, "q_proj.weight", 2, Dk, d, 0);
        n = add_param(out, max, n, &off, pre, "k_proj.weight", 2, Dk, d, 0);
        n = add_param(out, max, n, &off, pre, "v_proj.weight", 2, Dv, d, 0);
        n = add_param(out, max, n, &off, pre, "a_proj.weight", 2, H, d, 0);
        n = add_param(out, max, n, &off, pre, "b_proj.weight", 2, H, d, 0);
        n = add_param(out, max, n, &off, pre, "b_proj.bias", 1, H, 0, 0);
        n = add_param(out, max, n, &off, pre, "g_proj.weight", 2, Dv, d, 0);
        n = add_param(out, max, n, &off, pre, "o_proj.weight", 2, d, Dv, 0);
        n = add_param(out, max, n, &off, pre, "q_conv1d.weight", 3, Dk, 1, 4);
        n = add_param(out, max, n, &off, pre, "k_conv1d.weight", 3, Dk, 1, 4);
        n = add_param(out, max, n, &off, pre, "v_conv1d.weight", 3, Dv, 1, 4);
        n = add_param(out, max, n, &off, pre, "A_log", 1, H, 0, 0);
        n = add_param(out, max, n, &off, pre, "dt_bias", 1, H, 0, 0);
        n = add_param(out, max, n, &off, pre, "o_norm.weight", 1, m->dv, 0, 0);
        if (!m->layer_only) {
            char bp[48];
            snprintf(bp, sizeof bp, "layers.%lld.", (long long)l);
            n = add_param(out, max, n, &off, bp, "mlp_norm.weight", 1, d, 0, 0);
            n = add_param(out, max, n, &off, bp, "mlp.gate_proj.weight", 2, F, d, 0);
            n = add_param(out, max, n, &off, bp, "mlp.up_proj.weight", 2, F, d, 0);
            n = add_param(out, max, n, &off, bp, "mlp.down_proj.weight", 2, d, F, 0);
        }
    }
    if (!m->layer_only) n = add_param(out, max, n, &off, "", "norm.weight", 1, d, 0, 0);
    *total = off;
    return n;
}

int kla_mparam_index(const kla_mdims *m, int l, int which)
{
    return m->layer_only ? which - P_MIXER_FIRST : 1 + l * NBLOCK_P + which;
}

/* ---- the model object ------------------------------------------------------------------ */

enum { V_F32, V_F64, V_FAST };

struct KlaModel {
    KlaContext *ctx;
    kla_mdims dims;
    int variant;
    KlaDtype dt;
    kla_mparam *tab;
    int np;
    int64_t total;
    void *part[4]; /* parameters, gradients, AdamW m and v: [total] each */
    int64_t steps;
    int has_grad;  /* a backward has filled the gradients */
    atomic_int busy;
    kla_ws ws;     /* the activations and scratch of a call, kept for the next */
};

void kla_ws_free(kla_ws *ws)
{
    free(ws->base);
    free(ws->extra);
    memset(ws, 0, sizeof *ws);
}

static size_t esize(KlaDtype d) { return d == KLA_F64 ? 8 : 4; }

static int check_config(KlaContext *ctx, const KlaModelConfig *c, int layer)
{
    const char *nm[] = { "vocab", "d_model", "n_layer", "n_head", "d_k", "d_v", "d_ff" };
    const int64_t v[] = { c->vocab, c->d_model, c->n_layer, c->n_head, c->d_k, c->d_v, c->d_ff };
    for (int i = 0; i < 7; i++) {
        if (layer && (i == 0 || i == 2 || i == 6)) continue;
        if (v[i] <= 0 || v[i] > (1 << 24))
            return kla__fail(ctx, KLA_EINVAL, "model config: %s = %lld, must be in [1, 2^24]", nm[i], (long long)v[i]);
    }
    if (!isfinite(c->norm_eps) || c->norm_eps <= 0)
        return kla__fail(ctx, KLA_EINVAL, "model config: norm_eps = %g, must be finite and > 0", c->norm_eps);
    if (c->mixer != KLA_MIXER_KLA && c->mixer != KLA_MIXER_GDN)
        return kla__fail(ctx, KLA_EINVAL, "model config: mixer %d is neither KLA nor GDN", (int)c->mixer);
    return 0;
}

static int model_new(KlaContext *ctx, const KlaModelConfig *c, int layer, KlaModel **out)
{
    if (out) *out = NULL;
    if (!ctx) return KLA_EINVAL;
    if (!c || !out) return kla__fail(ctx, KLA_EINVAL, "kla_model_new: NULL config or result pointer");
    int r = check_config(ctx, c, layer);
    if (r) return r;
    KlaModel *m = calloc(1, sizeof *m);
    if (!m) return kla__fail(ctx, KLA_ENOMEM, "model: out of memory");
    m->ctx = ctx;
    m->dims = (kla_mdims){ .vocab = layer ? 0 : c->vocab, .d = c->d_model, .L = layer ? 1 : c->n_layer,
                           .H = c->n_head, .dk = c->d_k, .dv = c->d_v, .F = layer ? 0 : c->d_ff,
                           .norm_eps = c->norm_eps, .mixer = (int)c->mixer, .layer_only = layer,
                           .threads = ctx->params.threads };
    const int fast = !strcmp(ctx->be->name, "simd");
#ifdef KLA_HAVE_MODEL_FAST
    m->variant = ctx->be->real == KLA_F64 ? V_F64 : fast ? V_FAST : V_F32;
#else
    (void)fast;
    m->variant = ctx->be->real == KLA_F64 ? V_F64 : V_F32;
#endif
    m->dt = m->variant == V_F64 ? KLA_F64 : KLA_F32;
    m->np = kla_mparams(&m->dims, NULL, 0, &m->total);
    /* sizes: each parameter is at most 2^48 elements by the config bounds; the sum too */
    m->tab = malloc((size_t)m->np * sizeof *m->tab);
    for (int i = 0; i < 4 && m->tab; i++)
        if (!(m->part[i] = calloc((size_t)m->total, esize(m->dt)))) break;
    if (!m->tab || !m->part[3]) {
        kla_model_free(&m);
        return kla__fail(ctx, KLA_ENOMEM, "model: out of memory for %lld parameters", (long long)4 * m->total);
    }
    kla_mparams(&m->dims, m->tab, m->np, &m->total);
    atomic_init(&m->busy, 0);
    *out = m;
    return 0;
}

int kla_model_new(KlaContext *ctx, const KlaModelConfig *c, KlaModel **m) { return model_new(ctx, c, 0, m); }
int kla_layer_new(KlaContext *ctx, const KlaModelConfig *c, KlaModel **m) { return model_new(ctx, c, 1, m); }

void kla_model_free(KlaModel **m)
{
    if (!m || !*m) return;
    for (int i = 0; i < 4; i++) free((*m)->part[i]);
    kla_ws_free(&(*m)->ws);
    free((*m)->tab);
    free(*m);
    *m = NULL;
}

int kla_model_param_count(const KlaModel *m) { return m ? m->np : 0; }

int kla_model_param_info(const KlaModel *m, int i, KlaParamInfo *info)
{
    if (!m || !info || i < 0 || i >= m->np) return KLA_EINVAL;
    const kla_mparam *p = &m->tab[i];
    info->name = p->name;
    info->ndim = p->ndim;
    memcpy(info->shape, p->shape, sizeof info->shape);
    info->numel = p->numel;
    return 0;
}

int kla_model_param_index(KlaModel *m, const char *name)
{
    if (!m) return KLA_EINVAL;
    if (!name) return kla__fail(m->ctx, KLA_EINVAL, "model: NULL parameter name");
    for (int i = 0; i < m->np; i++)
        if (!strcmp(m->tab[i].name, name)) return i;
    /* a hint: the same name with or without the layer prefix, or the right prefix */
    const char *dot = strrchr(name, '.'), *hint = NULL;
    for (int i = 0; i < m->np && !hint; i++) {
        const char *t = m->tab[i].name, *tail = strstr(t, "attn.");
        if (m->dims.layer_only && strstr(name, tail ? tail : t)) hint = t;
        else if (!m->dims.layer_only && !strncmp(name, "attn.", 5) && strstr(t, name)) hint = t;
    }
    (void)dot;
    if (hint)
        return kla__fail(m->ctx, KLA_EINVAL, "parameter \"%s\" is not one of this %s's; did you mean \"%s\"?", name,
                         m->dims.layer_only ? "layer" : "model", hint);
    return kla__fail(m->ctx, KLA_EINVAL, "parameter \"%s\" is not one of this %s's (kla-spec.md 8.3 names, e.g. "
                     "\"%s\")", name, m->dims.layer_only ? "layer" : "model", m->tab[0].name);
}

/* ---- moving values in and out ---------------------------------------------------------- */

static const char *part_name(int part)
{
    static const char *const n[] = { "parameter", "gradient", "AdamW first moment", "AdamW second moment" };
    return part >= 0 && part < 4 ? n[part] : "?";
}

static double get(const void *x, KlaDtype dt, int64_t i)
{
    return dt == KLA_F64 ? ((const double *)x)[i] : ((const float *)x)[i];
}

static void put(void *x, KlaDtype dt, int64_t i, double v)
{
    if (dt == KLA_F64) ((double *)x)[i] = v;
    else ((float *)x)[i] = (float)v;
}

static int check_part(KlaModel *m, int part, int i)
{
    if (part < 0 || part > 3) return kla__fail(m->ctx, KLA_EINVAL, "model: unknown part %d", part);
    if (i < 0 || i >= m->np)
        return kla__fail(m->ctx, KLA_EINVAL, "model: parameter index %d, the %s has %d", i,
                         m->dims.layer_only ? "layer" : "model", m->np);
    return 0;
}

int kla_model_read(KlaModel *m, KlaModelPart part, int i, KlaOut dst)
{
    if (!m) return KLA_EINVAL;
    int r = check_part(m, part, i);
    if (r) return r;
    const kla_mparam *p = &m->tab[i];
    if (!dst.data || (dst.dtype != KLA_F32 && dst.dtype != KLA_F64))
        return kla__fail(m->ctx, KLA_EINVAL, "%s: the destination must be F32 or F64 memory", p->name);
    if (dst.numel != p->numel)
        return kla__fail(m->ctx, KLA_EINVAL, "%s: %lld elements given, the %s has %lld", p->name,
                         (long long)dst.numel, part_name(part), (long long)p->numel);
    const void *src = m->part[part];
    for (int64_t j = 0; j < p->numel; j++) put(dst.data, dst.dtype, j, get(src, m->dt, p->offset + j));
    return 0;
}

int kla_model_write(KlaModel *m, KlaModelPart part, int i, KlaIn src)
{
    if (!m) return KLA_EINVAL;
    int r = check_part(m, part, i);
    if (r) return r;
    const kla_mparam *p = &m->tab[i];
    if (!src.data || (src.dtype != KLA_F32 && src.dtype != KLA_F64))
        return kla__fail(m->ctx, KLA_EINVAL, "%s: the source must be F32 or F64 memory", p->name);
    if (src.numel != p->numel)
        return kla__fail(m->ctx, KLA_EINVAL, "%s: %lld elements given, expected %lld", p->name,
                         (long long)src.numel, (long long)p->numel);
    for (int64_t j = 0; j < p->numel; j++) {
        const double x = get(src.data, src.dtype, j);
        if (!isfinite(x) || (part == KLA_PART_ADAM_V && x < 0))
            return kla__fail(m->ctx, KLA_ERANGE, "%s: %s %g at element %lld", p->name, part_name(part), x,
                             (long long)j);
    }
    for (int64_t j = 0; j < p->numel; j++) put(m->part[part], m->dt, p->offset + j, get(src.data, src.dtype, j));
    if (part == KLA_PART_GRAD) m->has_grad = 1;
    return 0;
}

int64_t kla_model_steps(const KlaModel *m) { return m ? m->steps : 0; }

int64_t kla_model_bytes(const KlaModel *m)
{
    return m ? 4 * m->total * (int64_t)esize(m->dt) + (int64_t)m->ws.cap : 0;
}

int kla_model_set_steps(KlaModel *m, int64_t steps)
{
    if (!m) return KLA_EINVAL;
    if (steps < 0) return kla__fail(m->ctx, KLA_EINVAL, "model: step count %lld < 0", (long long)steps);
    m->steps = steps;
    return 0;
}

/* ---- initialisation ------------------------------------------------------------------------ */

static uint64_t sm64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
/* in (0, 1): 53 bits, never 0 */
static double unif(uint64_t *s) { return ((double)(sm64(s) >> 11) + 0.5) * 0x1p-53; }

int kla_model_init(KlaModel *m, uint64_t seed)
{
    if (!m) return KLA_EINVAL;
    uint64_t st = seed;
    void *w = m->part[KLA_PART_PARAM];
    for (int i = 0; i < m->np; i++) {
        const kla_mparam *p = &m->tab[i];
        const char *n = p->name;
        const int64_t o = p->offset;
        for (int64_t j = 0; j < p->numel; j++) {
            double x;
            if (strstr(n, "embeddings")) { /* N(0, 0.02), Box-Muller */
                x = 0.02 * sqrt(-2 * log(unif(&st))) * cos(6.283185307179586 * unif(&st));
            } else if (strstr(n, "norm")) {
                x = 1;
            } else if (strstr(n, "b_proj.bias")) {
                x = 0;
            } else if (strstr(n, "A_log")) {
                x = log(16 * unif(&st));
            } else if (strstr(n, "dt_bias")) {
                double dt = exp(log(1e-3) + unif(&st) * (log(0.1) - log(1e-3)));
                if (dt < 1e-4) dt = 1e-4;
                x = dt + log(-expm1(-dt)); /* softplus^-1(dt) */
            } else if (strstr(n, "conv1d")) {
                x = (2 * unif(&st) - 1) * 0.5; /* U(+-1/sqrt(fan_in)), fan_in = 4 taps */
            } else { /* a Linear weight [out, in]: U(+-1/sqrt(in)) */
                x = (2 * unif(&st) - 1) / sqrt((double)p->shape[1]);
                if (strstr(n, "down_proj")) x /= sqrt(2.0 * (double)m->dims.L);
            }
            put(w, m->dt, o + j, x);
        }
    }
    memset(m->part[KLA_PART_ADAM_M], 0, (size_t)m->total * esize(m->dt));
    memset(m->part[KLA_PART_ADAM_V], 0, (size_t)m->total * esize(m->dt));
    m->steps = 0;
    m->has_grad = 0;
    return 0;
}

/* ---- the calls ------------------------------------------------------------------------------ */

static int enter(KlaModel *m)
{
    if (atomic_exchange(&m->busy, 1))
        return kla__fail(NULL, KLA_EBUSY, "model in use"); /* the context's message is another thread's */
    m->ctx->detail[0] = 0;
    return 0;
}

static int leave(KlaModel *m, int r)
{
    if (r < 0 && !m->ctx->detail[0]) kla__fail(m->ctx, r, "%s", kla_strerror(r));
    atomic_store(&m->busy, 0);
    return r;
}

/* int32 or int64 tokens [B, T] into int64, each in [lo, hi) (or -100 when labels) */
static int read_tokens(KlaModel *m, const char *name, KlaIn t, int64_t n, int64_t T, int labels, int64_t *out)
{
    if (!t.data) return kla__fail(m->ctx, KLA_EINVAL, "tensor %s: missing", name);
    if (t.dtype != KLA_I32 && t.dtype != KLA_I64)
        return kla__fail(m->ctx, KLA_EINVAL, "tensor %s: dtype must be I32 or I64", name);
    if (t.numel != n)
        return kla__fail(m->ctx, KLA_EINVAL, "tensor %s: %lld elements given, expected [B, T], %lld elements", name,
                         (long long)t.numel, (long long)n);
    const int64_t V = m->dims.vocab;
    for (int64_t i = 0; i < n; i++) {
        out[i] = t.dtype == KLA_I32 ? ((const int32_t *)t.data)[i] : ((const int64_t *)t.data)[i];
        if ((out[i] < 0 || out[i] >= V) && !(labels && out[i] == -100))
            return kla__fail(m->ctx, KLA_ERANGE, "tensor %s: %lld at [%lld, %lld], must be in [0, %lld)%s", name,
                             (long long)out[i], (long long)(i / T), (long long)(i % T), (long long)V,
                             labels ? " or -100 (ignored)" : "");
    }
    return 0;
}

/* Fails with the first non-finite parameter (a NaN in the weights). */
static int check_params(KlaModel *m)
{
    const void *w = m->part[KLA_PART_PARAM];
    for (int i = 0; i < m->np; i++)
        for (int64_t j = 0; j < m->tab[i].numel; j++)
            if (!isfinite(get(w, m->dt, m->tab[i].offset + j)))
                return kla__fail(m->ctx, KLA_ERANGE, "parameter %s: %g at element %lld", m->tab[i].name,
                                 get(w, m->dt, m->tab[i].offset + j), (long long)j);
    return 0;
}

int kla_model_loss(KlaModel *m, const KlaBatch *b, int backward, KlaLoss *out)
{
    if (!m) return KLA_EINVAL;
    int r = enter(m);
    if (r) return r;
    int64_t *ids = NULL, *labels = NULL;
    if (m->dims.layer_only) {
        r = kla__fail(m->ctx, KLA_EINVAL, "kla_model_loss: a layer has no loss (use kla_layer_backward)");
        goto done;
    }
    if (!b || !out) {
        r = kla__fail(m->ctx, KLA_EINVAL, "kla_model_loss: NULL batch or result");
        goto done;
    }
    if (b->B <= 0 || b->T <= 0 || b->B > (1 << 24) || b->T > (1 << 28)) {
        r = kla__fail(m->ctx, KLA_EINVAL, "batch: B = %lld, T = %lld, must be positive", (long long)b->B,
                      (long long)b->T);
        goto done;
    }
    const int64_t n = b->B * b->T;
    ids = malloc((size_t)n * sizeof *ids), labels = malloc((size_t)n * sizeof *labels);
    if (!ids || !labels) {
        r = kla__fail(m->ctx, KLA_ENOMEM, "batch: out of memory");
        goto done;
    }
    if ((r = read_tokens(m, "input_ids", b->ids, n, b->T, 0, ids)) ||
        (r = read_tokens(m, "labels", b->labels, n, b->T, 1, labels)) ||
        (r = check_params(m)))
        goto done;
    int64_t nlab = 0;
    for (int64_t i = 0; i < n; i++) nlab += labels[i] != -100;
    if (backward && !nlab) {
        r = kla__fail(m->ctx, KLA_EINVAL, "tensor labels: every label is -100, nothing to learn from");
        goto done;
    }
    void *w = m->part[KLA_PART_PARAM], *g = backward ? m->part[KLA_PART_GRAD] : NULL;
    memset(out, 0, sizeof *out);
    if (m->variant == V_F64)
        r = kla_model_loss_f64(&m->dims, w, g, b->B, b->T, ids, labels, 0, m->ctx, &m->ws, &out->loss, &out->correct,
                               &out->labelled);
#ifdef KLA_HAVE_MODEL_FAST
    else if (m->variant == V_FAST)
        r = kla_model_loss_fast(&m->dims, w, g, b->B, b->T, ids, labels, 1, m->ctx, &m->ws, &out->loss, &out->correct,
                                &out->labelled);
#endif
    else
        r = kla_model_loss_f32(&m->dims, w, g, b->B, b->T, ids, labels, 0, m->ctx, &m->ws, &out->loss, &out->correct,
                               &out->labelled);
    if (r == 0 && !isfinite(out->loss))
        r = kla__fail(m->ctx, KLA_ERANGE, "loss: %g (not finite)", out->loss);
    m->has_grad = backward && r == 0;
done:
    free(ids), free(labels);
    return leave(m, r);
}

int kla_model_update(KlaModel *m, const KlaAdamW *a, double *grad_norm)
{
    if (!m) return KLA_EINVAL;
    int r = enter(m);
    if (r) return r;
    if (!a) {
        r = kla__fail(m->ctx, KLA_EINVAL, "kla_model_update: NULL settings");
    } else if (!m->has_grad) {
        r = kla__fail(m->ctx, KLA_EINVAL, "kla_model_update: no fresh gradients (run kla_model_loss with backward "
                      "before each update)");
    } else if (!(isfinite(a->lr) && a->lr >= 0 && a->beta1 >= 0 && a->beta1 < 1 && a->beta2 >= 0 && a->beta2 < 1 &&
                 isfinite(a->eps) && a->eps > 0 && isfinite(a->weight_decay) && a->weight_decay >= 0 &&
                 isfinite(a->clip))) {
        r = kla__fail(m->ctx, KLA_EINVAL, "AdamW: lr %g beta1 %g beta2 %g eps %g weight_decay %g clip %g: need lr >= 0, "
                      "betas in [0, 1), eps > 0, weight_decay >= 0, all finite", a->lr, a->beta1, a->beta2, a->eps,
                      a->weight_decay, a->clip);
    }
    if (r) return leave(m, r);
    void *p = m->part[0], *g = m->part[1], *mo = m->part[2], *ve = m->part[3];
    const double ss = m->variant == V_F64 ? kla_sumsq_f64(g, m->total) : kla_sumsq_f32(g, m->total);
    const double norm = sqrt(ss);
    if (grad_norm) *grad_norm = norm;
    if (!isfinite(norm)) return leave(m, kla__fail(m->ctx, KLA_ERANGE, "gradients: the global norm is %g", norm));
    /* PyTorch's clip_grad_norm_: scale = min(1, clip / (norm + 1e-6)) */
    double scale = 1;
    if (a->clip > 0 && a->clip / (norm + 1e-6) < 1) scale = a->clip / (norm + 1e-6);
    m->steps++;
    if (m->variant == V_F64)
        kla_adamw_f64(p, g, mo, ve, m->total, m->steps, a->lr, a->beta1, a->beta2, a->eps, a->weight_decay, scale);
#ifdef KLA_HAVE_MODEL_FAST
    else if (m->variant == V_FAST)
        kla_adamw_fast(p, g, mo, ve, m->total, m->steps, a->lr, a->beta1, a->beta2, a->eps, a->weight_decay, scale);
#endif
    else
        kla_adamw_f32(p, g, mo, ve, m->total, m->steps, a->lr, a->beta1, a->beta2, a->eps, a->weight_decay, scale);
    /* the gradients stay as the backward left them (before clipping); a next step needs
     * a next backward */
    m->has_grad = 0;
    return leave(m, 0);
}

int kla_layer_backward(KlaModel *m, int64_t B, int64_t T, KlaIn x, KlaIn dy, KlaIn cu_seqlens, KlaOut y, KlaOut dx)
{
    if (!m) return KLA_EINVAL;
    int r = enter(m);
    if (r) return r;
    const int64_t d = m->dims.d;
    int64_t *cu = NULL, N = B;
    void *xb = NULL, *dyb = NULL, *yb = NULL, *dxb = NULL;
    if (!m->dims.layer_only) {
        r = kla__fail(m->ctx, KLA_EINVAL, "kla_layer_backward: a model, not a layer (use kla_layer_new)");
        goto done;
    }
    if (B <= 0 || T <= 0 || B > (1 << 24) || T > (1 << 28)) {
        r = kla__fail(m->ctx, KLA_EINVAL, "layer: B = %lld, T = %lld, must be positive", (long long)B, (long long)T);
        goto done;
    }
    const int64_t n = B * T * d;
    const char *nm[4] = { "x", "dy", "y", "dx" };
    const void *data[4] = { x.data, dy.data, y.data, dx.data };
    const KlaDtype dts[4] = { x.dtype, dy.dtype, y.dtype, dx.dtype };
    const int64_t ne[4] = { x.numel, dy.numel, y.numel, dx.numel };
    for (int i = 0; i < 4; i++) {
        if (!data[i] && (i == 0 || i == 2 || (i == 3 && dy.data))) {
            r = kla__fail(m->ctx, KLA_EINVAL, "tensor %s: missing", nm[i]);
            goto done;
        }
        if (!data[i]) continue;
        if (dts[i] != KLA_F32 && dts[i] != KLA_F64) {
            r = kla__fail(m->ctx, KLA_EINVAL, "tensor %s: dtype must be F32 or F64", nm[i]);
            goto done;
        }
        if (ne[i] != n) {
            r = kla__fail(m->ctx, KLA_EINVAL, "tensor %s: %lld elements given, expected [B, T, d] = [%lld, %lld, %lld], "
                          "%lld elements", nm[i], (long long)ne[i], (long long)B, (long long)T, (long long)d,
                          (long long)n);
            goto done;
        }
    }
    if (cu_seqlens.data) {
        if (cu_seqlens.dtype != KLA_I32 && cu_seqlens.dtype != KLA_I64) {
            r = kla__fail(m->ctx, KLA_EINVAL, "tensor cu_seqlens: dtype must be I32 or I64");
            goto done;
        }
        if (B != 1 || cu_seqlens.numel < 2) {
            r = kla__fail(m->ctx, KLA_EINVAL, "tensor cu_seqlens: needs B = 1 and N + 1 >= 2 entries (B = %lld, %lld given)",
                          (long long)B, (long long)cu_seqlens.numel);
            goto done;
        }
        N = cu_seqlens.numel - 1;
    }
    if (!(cu = malloc((size_t)(N + 1) * sizeof *cu))) {
        r = kla__fail(m->ctx, KLA_ENOMEM, "layer: out of memory");
        goto done;
    }
    for (int64_t i = 0; i <= N; i++) {
        cu[i] = !cu_seqlens.data ? i * T
              : cu_seqlens.dtype == KLA_I32 ? ((const int32_t *)cu_seqlens.data)[i] : ((const int64_t *)cu_seqlens.data)[i];
        if ((i == 0 && cu[0] != 0) || (i > 0 && cu[i] < cu[i - 1]) || (i == N && cu[N] != B * T)) {
            r = kla__fail(m->ctx, KLA_ERANGE, "tensor cu_seqlens: cu_seqlens[%lld] = %lld: must start at 0, not decrease "
                          "and end at T = %lld", (long long)i, (long long)cu[i], (long long)T);
            goto done;
        }
    }
    /* the inputs in the model's dtype, finite */
    const size_t es = esize(m->dt);
    xb = malloc((size_t)n * es), yb = malloc((size_t)n * es);
    dyb = dy.data ? malloc((size_t)n * es) : NULL, dxb = dy.data ? malloc((size_t)n * es) : NULL;
    if (!xb || !yb || (dy.data && (!dyb || !dxb))) {
        r = kla__fail(m->ctx, KLA_ENOMEM, "layer: out of memory");
        goto done;
    }
    for (int64_t i = 0; i < n; i++) {
        const double a = get(x.data, x.dtype, i), c = dy.data ? get(dy.data, dy.dtype, i) : 0;
        if (!isfinite(a) || !isfinite(c)) {
            r = kla__fail(m->ctx, KLA_ERANGE, "tensor %s: %g at element %lld", isfinite(a) ? "dy" : "x",
                          isfinite(a) ? c : a, (long long)i);
            goto done;
        }
        put(xb, m->dt, i, a);
        if (dy.data) put(dyb, m->dt, i, c);
    }
    if ((r = check_params(m))) goto done;
    const kla_mseqs s = { cu, N };
    void *w = m->part[KLA_PART_PARAM], *g = m->part[KLA_PART_GRAD];
    if (dy.data) memset(g, 0, (size_t)m->total * es);
    if (m->variant == V_F64) r = kla_layer_backward_f64(&m->dims, w, g, &s, xb, dyb, yb, dxb, m->ctx, &m->ws);
#ifdef KLA_HAVE_MODEL_FAST
    else if (m->variant == V_FAST) r = kla_layer_backward_fast(&m->dims, w, g, &s, xb, dyb, yb, dxb, m->ctx, &m->ws);
#endif
    else r = kla_layer_backward_f32(&m->dims, w, g, &s, xb, dyb, yb, dxb, m->ctx, &m->ws);
    if (r) goto done;
    for (int64_t i = 0; i < n; i++) {
        const double a = get(yb, m->dt, i), c = dy.data ? get(dxb, m->dt, i) : 0;
        if (!isfinite(a) || !isfinite(c)) {
            r = kla__fail(m->ctx, KLA_ERANGE, "tensor %s: %g at element %lld from finite inputs", isfinite(a) ? "dx" : "y",
                          isfinite(a) ? c : a, (long long)i);
            goto done;
        }
    }
    for (int64_t i = 0; i < n; i++) put(y.data, y.dtype, i, get(yb, m->dt, i));
    if (dy.data)
        for (int64_t i = 0; i < n; i++) put(dx.data, dx.dtype, i, get(dxb, m->dt, i));
    m->has_grad = dy.data != NULL;
done:
    free(cu), free(xb), free(yb), free(dyb), free(dxb);
    return leave(m, r);
}
