/*
 * train.c: `kla layer backward IN -o OUT` and `kla model step IN -o OUT` (kla-spec.md
 * 8.3): a mixer layer's forward and backward, and one training step of the model, on the
 * parameters, inputs and settings of a safetensors file, written with the spec's names so
 * that any implementation's layer or step can be compared with `kla verify`.
 */
#include "train.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- output lists ------------------------------------------------------------------------ */

void *outlist_add(OutList *o, const char *name, st_dtype dt, int ndim, const int64_t *shape)
{
    if (o->n == o->cap) {
        int cap = o->cap ? 2 * o->cap : 64;
        st_tensor *t = realloc(o->t, (size_t)cap * sizeof *t);
        if (!t) goto oom;
        o->t = t, o->cap = cap;
    }
    st_tensor *t = &o->t[o->n];
    memset(t, 0, sizeof *t);
    t->dtype = dt;
    t->ndim = ndim;
    t->numel = 1;
    for (int d = 0; d < ndim; d++) t->shape[d] = shape[d], t->numel *= shape[d];
    t->nbytes = (size_t)t->numel * st_dtype_size(dt);
    t->name = strdup(name);
    t->data = calloc(t->nbytes ? t->nbytes : 1, 1);
    if (!t->name || !t->data) {
        free(t->name), free(t->data);
        goto oom;
    }
    o->n++;
    return t->data;
oom:
    fprintf(stderr, "kla: out of memory for output \"%s\"\n", name);
    return NULL;
}

void outlist_free(OutList *o)
{
    for (int i = 0; i < o->n; i++) free(o->t[i].name), free(o->t[i].data);
    free(o->t);
    memset(o, 0, sizeof *o);
}

int outlist_add_params(OutList *o, KlaModel *m, KlaModelPart part, const char *prefix, st_dtype dt)
{
    for (int i = 0; i < kla_model_param_count(m); i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        char name[160];
        snprintf(name, sizeof name, "%s%s", prefix, p.name);
        void *x = outlist_add(o, name, dt, p.ndim, p.shape);
        if (!x) return -1;
        if (kla_model_read(m, part, i, KLA_OUT(x, dt == ST_F64 ? KLA_F64 : KLA_F32, p.numel)) < 0) return -1;
    }
    return 0;
}

/* ---- configuration from a file ---------------------------------------------------------- */

static int meta_int(const char *path, const KlaFile *f, const char *key, int64_t *v, int *present)
{
    const char *s = kla_file_meta(f, key);
    *present = s != NULL;
    if (!s) return 0;
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || end == s || *end || x <= 0) {
        fprintf(stderr, "kla: %s: metadata \"%s\": \"%s\", expected a positive integer\n", path, key, s);
        return -1;
    }
    *v = x;
    return 0;
}

static int meta_double(const char *path, const KlaFile *f, const char *key, double *v)
{
    const char *s = kla_file_meta(f, key);
    if (!s) return 0;
    char *end;
    double x = strtod(s, &end);
    if (end == s || *end || !isfinite(x)) {
        fprintf(stderr, "kla: %s: metadata \"%s\": \"%s\" is not a finite number\n", path, key, s);
        return -1;
    }
    *v = x;
    return 1;
}

/* the shape of a required tensor, or an error naming it */
static int need(const char *path, const KlaFile *f, const char *name, int ndim, KlaFileTensor *t)
{
    if (!kla_file_find(f, name, t)) {
        fprintf(stderr, "kla: %s: missing tensor \"%s\" (needed to know the model's sizes)\n", path, name);
        return -1;
    }
    if (t->ndim != ndim) {
        fprintf(stderr, "kla: %s: tensor \"%s\" has %d dimensions, expected %d\n", path, name, t->ndim, ndim);
        return -1;
    }
    return 0;
}

int train_config_from_file(const char *path, const KlaFile *f, int layer, KlaModelConfig *c)
{
    kla_default_model_config(c);
    KlaFileTensor t;
    const char *pre = layer ? "attn." : "layers.0.attn.";
    char name[96];
    snprintf(name, sizeof name, "%sA_log", pre);
    if (need(path, f, name, 1, &t) < 0) return -1;
    c->n_head = t.shape[0];
    snprintf(name, sizeof name, "%sq_proj.weight", pre);
    if (need(path, f, name, 2, &t) < 0) return -1;
    c->d_model = t.shape[1];
    c->d_k = c->n_head ? t.shape[0] / c->n_head : 0;
    snprintf(name, sizeof name, "%so_norm.weight", pre);
    if (need(path, f, name, 1, &t) < 0) return -1;
    c->d_v = t.shape[0];
    if (!layer) {
        if (need(path, f, "embeddings.weight", 2, &t) < 0) return -1;
        c->vocab = t.shape[0];
        if (need(path, f, "layers.0.mlp.gate_proj.weight", 2, &t) < 0) return -1;
        c->d_ff = t.shape[0];
        /* blocks: the largest i of layers.{i}. plus one */
        int64_t L = 0;
        for (int i = 0; i < kla_file_count(f); i++) {
            KlaFileTensor x;
            kla_file_tensor(f, i, &x);
            long long li;
            if (sscanf(x.name, "layers.%lld.", &li) == 1 && li >= 0 && li < (1 << 20) && li + 1 > L) L = li + 1;
        }
        c->n_layer = L;
    }
    /* metadata, where present, must agree with the shapes */
    static const char *const keys[] = { "vocab", "d_model", "n_layer", "n_head", "d_k", "d_v", "d_ff" };
    int64_t *vals[] = { &c->vocab, &c->d_model, &c->n_layer, &c->n_head, &c->d_k, &c->d_v, &c->d_ff };
    for (int i = 0; i < 7; i++) {
        if (layer && (i == 0 || i == 2 || i == 6)) continue;
        int64_t v;
        int present;
        if (meta_int(path, f, keys[i], &v, &present) < 0) return -1;
        if (present && v != *vals[i]) {
            fprintf(stderr, "kla: %s: metadata \"%s\" = %lld, but the parameters' shapes give %lld\n", path, keys[i],
                    (long long)v, (long long)*vals[i]);
            return -1;
        }
    }
    if (meta_double(path, f, "norm_eps", &c->norm_eps) < 0) return -1;
    const char *mx = kla_file_meta(f, "mixer");
    if (mx && strcmp(mx, "kla") && strcmp(mx, "gdn")) {
        fprintf(stderr, "kla: %s: metadata \"mixer\": \"%s\", expected kla or gdn\n", path, mx);
        return -1;
    }
    c->mixer = mx && !strcmp(mx, "gdn") ? KLA_MIXER_GDN : KLA_MIXER_KLA;
    return 0;
}

int config_meta(const KlaModelConfig *c, int layer, const char **keys, const char **vals, char buf[][32])
{
    int n = 0;
    static const char *const k[] = { "vocab", "d_model", "n_layer", "n_head", "d_k", "d_v", "d_ff" };
    const int64_t v[] = { c->vocab, c->d_model, c->n_layer, c->n_head, c->d_k, c->d_v, c->d_ff };
    for (int i = 0; i < 7; i++) {
        if (layer && (i == 0 || i == 2 || i == 6)) continue;
        snprintf(buf[n], 32, "%lld", (long long)v[i]);
        keys[n] = k[i], vals[n] = buf[n];
        n++;
    }
    snprintf(buf[n], 32, "%.17g", c->norm_eps);
    keys[n] = "norm_eps", vals[n] = buf[n];
    n++;
    keys[n] = "mixer", vals[n++] = c->mixer == KLA_MIXER_GDN ? "gdn" : "kla";
    return n;
}

/* metadata keys the training files may hold (kla-spec.md 8.3) and those our tools write */
static const char *const train_keys[] = { "vocab", "d_model", "n_layer", "n_head", "d_k", "d_v", "d_ff", "norm_eps",
                                          "mixer", "lr", "beta1", "beta2", "adam_eps", "weight_decay", "clip",
                                          "case", "kind", "tol_float32", "tol_bf16", "elem_bf16", "backend",
                                          "format", "steps", NULL };

static int in_list(const char *const *l, const char *s)
{
    for (int i = 0; l && l[i]; i++)
        if (!strcmp(l[i], s)) return 1;
    return 0;
}

int train_params_from_file(const char *path, const KlaFile *f, KlaModel *m, KlaContext *ctx,
                           const char *const *allowed)
{
    const int np = kla_model_param_count(m);
    char *seen = calloc((size_t)np, 1);
    if (!seen) return -1;
    int rc = -1;
    for (int i = 0; i < kla_file_count(f); i++) {
        KlaFileTensor t;
        kla_file_tensor(f, i, &t);
        if (in_list(allowed, t.name)) continue;
        /* a golden case's expected values, or another run's outputs */
        if (!strncmp(t.name, "grad.", 5) || !strncmp(t.name, "new.", 4)) continue;
        const int j = kla_model_param_index(m, t.name);
        if (j < 0) {
            fprintf(stderr, "kla: %s: tensor \"%s\" is neither a parameter nor an input: %s\n", path, t.name,
                    kla_error_detail(ctx));
            goto done;
        }
        KlaParamInfo p;
        kla_model_param_info(m, j, &p);
        int same = t.ndim == p.ndim;
        for (int d = 0; same && d < p.ndim; d++) same = t.shape[d] == p.shape[d];
        if (!same) {
            fprintf(stderr, "kla: %s: tensor \"%s\": shape [", path, t.name);
            for (int d = 0; d < t.ndim; d++) fprintf(stderr, "%s%lld", d ? ", " : "", (long long)t.shape[d]);
            fprintf(stderr, "], expected [");
            for (int d = 0; d < p.ndim; d++) fprintf(stderr, "%s%lld", d ? ", " : "", (long long)p.shape[d]);
            fprintf(stderr, "]\n");
            goto done;
        }
        if (!t.in.data || (t.in.dtype != KLA_F32 && t.in.dtype != KLA_F64)) {
            fprintf(stderr, "kla: %s: tensor \"%s\": dtype %s, expected F32 or F64\n", path, t.name, t.dtype);
            goto done;
        }
        seen[j] = 1;
    }
    for (int j = 0; j < np; j++)
        if (!seen[j]) {
            KlaParamInfo p;
            kla_model_param_info(m, j, &p);
            fprintf(stderr, "kla: %s: missing parameter \"%s\"\n", path, p.name);
            goto done;
        }
    for (int j = 0; j < np; j++) {
        KlaParamInfo p;
        KlaFileTensor t;
        kla_model_param_info(m, j, &p);
        kla_file_find(f, p.name, &t);
        if (kla_model_write(m, KLA_PART_PARAM, j, t.in) < 0) {
            fprintf(stderr, "kla: %s: %s\n", path, kla_error_detail(ctx));
            goto done;
        }
    }
    rc = 0;
done:
    free(seen);
    return rc;
}

/* unknown metadata keys are errors here too */
static int check_keys(const char *path, const KlaFile *f)
{
    const st_file *sf = kla__file_st(f);
    for (int i = 0; i < sf->meta_count; i++)
        if (!in_list(train_keys, sf->meta_keys[i])) {
            fprintf(stderr, "kla: %s: metadata key \"%s\" is not defined by kla-spec.md 8.3 (vocab d_model n_layer "
                    "n_head d_k d_v d_ff norm_eps mixer lr beta1 beta2 adam_eps weight_decay clip)\n", path,
                    sf->meta_keys[i]);
            return -1;
        }
    return 0;
}

/* ---- the two commands -------------------------------------------------------------------- */

typedef struct Args {
    const char *backend, *in, *out;
    int threads;
} Args;

/* argv[1] must be `sub`; then [--backend B] [--threads N] IN -o OUT. -1 to go on, else the exit code. */
static int parse(int argc, char **argv, const char *sub, const char *usage, Args *a)
{
    memset(a, 0, sizeof *a);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], sub)) {
        fprintf(stderr, "kla %s: unknown subcommand '%s'\n%s", argv[0], argv[1], usage);
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--help") || !strcmp(s, "-h")) {
            fputs(usage, stdout);
            return 0;
        }
        const char **dst = !strcmp(s, "--backend") ? &a->backend : !strcmp(s, "-o") || !strcmp(s, "--output") ? &a->out
                         : NULL;
        if (dst || !strcmp(s, "--threads")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kla %s %s: option '%s' needs a value\n%s", argv[0], sub, s, usage);
                return 2;
            }
            if (dst) {
                *dst = argv[++i];
            } else {
                char *end;
                long t = strtol(argv[++i], &end, 10);
                if (*end || end == argv[i] || t < 0 || t > KLA_MAX_THREADS) {
                    fprintf(stderr, "kla %s %s: --threads '%s': expected an integer in [0, %d]\n%s", argv[0], sub,
                            argv[i], KLA_MAX_THREADS, usage);
                    return 2;
                }
                a->threads = (int)t;
            }
        } else if (s[0] == '-' && s[1]) {
            fprintf(stderr, "kla %s %s: unknown option '%s'\n%s", argv[0], sub, s, usage);
            return 2;
        } else if (!a->in) {
            a->in = s;
        } else {
            fprintf(stderr, "kla %s %s: unexpected argument '%s'\n%s", argv[0], sub, s, usage);
            return 2;
        }
    }
    if (!a->in || !a->out || !*a->out) {
        fprintf(stderr, "kla %s %s: missing %s\n%s", argv[0], sub, a->in ? "-o OUT" : "IN", usage);
        return 2;
    }
    return -1;
}

static KlaContext *open_backend(const Args *a)
{
    KlaParams p;
    kla_default_params(&p);
    p.backend = a->backend;
    p.threads = a->threads;
    KlaContext *ctx = NULL;
    if (kla_open(&ctx, &p) < 0) fprintf(stderr, "kla: %s\n", kla_error_detail(NULL));
    return ctx;
}

static KlaIn file_in(const KlaFile *f, const char *name, KlaFileTensor *t)
{
    return kla_file_find(f, name, t) ? t->in : (KlaIn){ 0 };
}

static const char layer_usage[] =
    "usage: kla layer backward [--backend B] [--threads N] IN -o OUT\n"
    "One mixer layer (kla-spec.md 8.1) on x: IN holds its parameters named attn.q_proj.weight,\n"
    "attn.k_proj.weight, ... (8.3, without layers.{i}.), x [B, T, d], dy [B, T, d] and optionally\n"
    "cu_seqlens (B = 1; the convolution restarts at each sequence). The sizes come from the\n"
    "parameters' shapes; __metadata__ may state d_model n_head d_k d_v (checked), norm_eps\n"
    "(default 1e-5) and mixer (kla or gdn, default kla). OUT gets y, dx and grad.<name> for every\n"
    "parameter, the gradients of sum(dy * y): F64 with --backend ref64, else F32.\n";

int layer_main(int argc, char **argv)
{
    Args a;
    int r = parse(argc, argv, "backward", layer_usage, &a);
    if (r >= 0) return r;
    KlaFile *f = NULL;
    KlaContext *ctx = NULL;
    KlaModel *m = NULL;
    OutList o = { 0 };
    int rc = 1;
    KlaModelConfig c;
    KlaFileTensor xt, dyt, cut;
    if (kla_file_read(a.in, &f) < 0) {
        fprintf(stderr, "kla: %s\n", kla_error_detail(NULL));
        goto done;
    }
    if (check_keys(a.in, f) < 0 || train_config_from_file(a.in, f, 1, &c) < 0 || !(ctx = open_backend(&a)))
        goto done;
    if (kla_layer_new(ctx, &c, &m) < 0) {
        fprintf(stderr, "kla: %s: %s\n", a.in, kla_error_detail(ctx));
        goto done;
    }
    static const char *const allowed[] = { "x", "dy", "cu_seqlens", "y", "dx", NULL };
    if (train_params_from_file(a.in, f, m, ctx, allowed) < 0) goto done;
    KlaIn x = file_in(f, "x", &xt), dy = file_in(f, "dy", &dyt), cu = file_in(f, "cu_seqlens", &cut);
    if (!x.data || xt.ndim != 3 || xt.shape[2] != c.d_model) {
        fprintf(stderr, "kla: %s: tensor \"x\": %s, expected [B, T, d] with d = %lld\n", a.in,
                x.data ? "wrong shape" : "missing", (long long)c.d_model);
        goto done;
    }
    if (!dy.data || dyt.ndim != 3 || dyt.shape[0] != xt.shape[0] || dyt.shape[1] != xt.shape[1] ||
        dyt.shape[2] != xt.shape[2]) {
        fprintf(stderr, "kla: %s: tensor \"dy\": %s, expected the shape of x\n", a.in, dy.data ? "wrong shape" : "missing");
        goto done;
    }
    const int ref64 = !strcmp(kla_backend_name(ctx), "ref64");
    const st_dtype odt = ref64 ? ST_F64 : ST_F32;
    const KlaDtype kdt = ref64 ? KLA_F64 : KLA_F32;
    void *y = outlist_add(&o, "y", odt, 3, xt.shape), *dx = y ? outlist_add(&o, "dx", odt, 3, xt.shape) : NULL;
    if (!dx) goto done;
    if (kla_layer_backward(m, xt.shape[0], xt.shape[1], x, dy, cu, KLA_OUT(y, kdt, xt.numel),
                           KLA_OUT(dx, kdt, xt.numel)) < 0) {
        fprintf(stderr, "kla: %s: %s\n", a.in, kla_error_detail(ctx));
        goto done;
    }
    if (outlist_add_params(&o, m, KLA_PART_GRAD, "grad.", odt) < 0) goto done;
    const char *keys[12], *vals[12];
    char buf[12][32];
    int nk = config_meta(&c, 1, keys, vals, buf);
    keys[nk] = "backend", vals[nk++] = kla_backend_name(ctx);
    char err[512];
    if (st_write(a.out, o.t, o.n, keys, vals, nk, err, sizeof err) < 0) {
        fprintf(stderr, "kla: %s\n", err);
        goto done;
    }
    rc = 0;
done:
    outlist_free(&o);
    kla_model_free(&m);
    kla_close(&ctx);
    kla_file_free(&f);
    return rc;
}

static const char model_usage[] =
    "usage: kla model step [--backend B] [--threads N] IN -o OUT\n"
    "One training step of the model (kla-spec.md 8.2): IN holds every parameter (8.3 names:\n"
    "embeddings.weight, layers.{i}.attn.q_proj.weight, ..., norm.weight), input_ids and\n"
    "labels [B, T] (I32 or I64; label -100 is ignored), and the AdamW settings in __metadata__\n"
    "(lr beta1 beta2 adam_eps weight_decay clip; the authors' defaults 1e-3 0.9 0.95 1e-8 0.1 1)\n"
    "for a first step from zero moments. OUT gets loss [1], grad.<name> (before clipping) and\n"
    "new.<name> (every parameter after the step): F64 with --backend ref64, else F32.\n";

/* AdamW settings from __metadata__ */
static int adamw_from_file(const char *path, const KlaFile *f, KlaAdamW *a)
{
    kla_default_adamw(a);
    static const char *const k[] = { "lr", "beta1", "beta2", "adam_eps", "weight_decay", "clip" };
    double *v[] = { &a->lr, &a->beta1, &a->beta2, &a->eps, &a->weight_decay, &a->clip };
    for (int i = 0; i < 6; i++)
        if (meta_double(path, f, k[i], v[i]) < 0) return -1;
    return 0;
}

int model_main(int argc, char **argv)
{
    Args a;
    int r = parse(argc, argv, "step", model_usage, &a);
    if (r >= 0) return r;
    KlaFile *f = NULL;
    KlaContext *ctx = NULL;
    KlaModel *m = NULL;
    OutList o = { 0 };
    int rc = 1;
    KlaModelConfig c;
    KlaAdamW opt;
    KlaFileTensor it, lt;
    if (kla_file_read(a.in, &f) < 0) {
        fprintf(stderr, "kla: %s\n", kla_error_detail(NULL));
        goto done;
    }
    if (check_keys(a.in, f) < 0 || train_config_from_file(a.in, f, 0, &c) < 0 ||
        adamw_from_file(a.in, f, &opt) < 0 || !(ctx = open_backend(&a)))
        goto done;
    if (kla_model_new(ctx, &c, &m) < 0) {
        fprintf(stderr, "kla: %s: %s\n", a.in, kla_error_detail(ctx));
        goto done;
    }
    static const char *const allowed[] = { "input_ids", "labels", "loss", NULL };
    if (train_params_from_file(a.in, f, m, ctx, allowed) < 0) goto done;
    KlaIn ids = file_in(f, "input_ids", &it), labels = file_in(f, "labels", &lt);
    if (!ids.data || it.ndim != 2) {
        fprintf(stderr, "kla: %s: tensor \"input_ids\": %s, expected [B, T]\n", a.in, ids.data ? "wrong shape" : "missing");
        goto done;
    }
    if (!labels.data || lt.ndim != 2 || lt.shape[0] != it.shape[0] || lt.shape[1] != it.shape[1]) {
        fprintf(stderr, "kla: %s: tensor \"labels\": %s, expected [B, T] as input_ids\n", a.in,
                labels.data ? "wrong shape" : "missing");
        goto done;
    }
    KlaBatch b = { it.shape[0], it.shape[1], ids, labels };
    KlaLoss loss;
    if (kla_model_loss(m, &b, 1, &loss) < 0) {
        fprintf(stderr, "kla: %s: %s\n", a.in, kla_error_detail(ctx));
        goto done;
    }
    const int ref64 = !strcmp(kla_backend_name(ctx), "ref64");
    const st_dtype odt = ref64 ? ST_F64 : ST_F32;
    const int64_t one = 1;
    void *lp = outlist_add(&o, "loss", odt, 1, &one);
    if (!lp) goto done;
    if (ref64) *(double *)lp = loss.loss;
    else *(float *)lp = (float)loss.loss;
    if (outlist_add_params(&o, m, KLA_PART_GRAD, "grad.", odt) < 0) goto done;
    if (kla_model_update(m, &opt, NULL) < 0) {
        fprintf(stderr, "kla: %s: %s\n", a.in, kla_error_detail(ctx));
        goto done;
    }
    if (outlist_add_params(&o, m, KLA_PART_PARAM, "new.", odt) < 0) goto done;
    const char *keys[20], *vals[20];
    char buf[20][32];
    int nk = config_meta(&c, 0, keys, vals, buf);
    const char *ak[] = { "lr", "beta1", "beta2", "adam_eps", "weight_decay", "clip" };
    const double av[] = { opt.lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay, opt.clip };
    for (int i = 0; i < 6; i++) {
        snprintf(buf[nk], 32, "%.17g", av[i]);
        keys[nk] = ak[i], vals[nk] = buf[nk];
        nk++;
    }
    keys[nk] = "backend", vals[nk++] = kla_backend_name(ctx);
    char err[512];
    if (st_write(a.out, o.t, o.n, keys, vals, nk, err, sizeof err) < 0) {
        fprintf(stderr, "kla: %s\n", err);
        goto done;
    }
    rc = 0;
done:
    outlist_free(&o);
    kla_model_free(&m);
    kla_close(&ctx);
    kla_file_free(&f);
    return rc;
}
