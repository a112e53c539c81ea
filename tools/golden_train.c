/*
 * golden_train.c: golden cases of the mixer layer (`kla layer backward`) and of one
 * training step (`kla model step`), kla-spec.md section 8 (docs/golden.md section 7).
 *
 * Inputs are F32 and reproducible: the parameters are the authors' initialisation
 * (kla_model_init with the case's seed) moved by 0.25 (2u - 1) from a splitmix64 stream
 * (so that no norm weight is exactly 1 and no bias 0, which would hide a missing term),
 * rounded to float32; x, dy are 2u - 1; token ids and labels are drawn the same way. The
 * `readable` case uses values on a grid of 1/8 instead. Expected outputs are those of the
 * float64 reference (backend ref64) on those inputs.
 */
#include "golden_train.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "golden.h"
#include "safetensors.h"
#include "sha256.h"
#include "train.h"
#include "verify.h"

typedef struct TCase {
    const char *tag, *what;
    int model; /* 0: layer, 1: model step */
    int gdn;
    int64_t vocab, d, L, H, dk, dv, F, B, T;
    int nseq, seqlens[4]; /* layer: cu_seqlens from these lengths (B = 1) */
    int readable;         /* values on a grid of 1/8 */
    double lr, clip;      /* model: AdamW lr and clip (0: the defaults) */
    uint64_t seed;
} TCase;

static const TCase tcases[] = {
    { .tag = "readable", .what = "a layer small enough to read: d 4, one head of dk 2, dv 2, T 3, values on a "
      "grid of 1/8", .d = 4, .H = 1, .dk = 2, .dv = 2, .B = 1, .T = 3, .readable = 1, .seed = 101 },
    { .what = "the KLA layer: two heads, two batch rows, T across a convolution's reach",
      .d = 16, .H = 2, .dk = 8, .dv = 6, .B = 2, .T = 21, .seed = 102 },
    { .tag = "varlen", .what = "the KLA layer on packed sequences (cu_seqlens 5, 1, 14): the convolution and the "
      "state restart at each", .d = 16, .H = 2, .dk = 8, .dv = 6, .B = 1, .T = 20, .nseq = 3,
      .seqlens = { 5, 1, 14 }, .seed = 103 },
    { .what = "the Gated DeltaNet baseline layer (l2norm on q and k, beta = eta)",
      .gdn = 1, .d = 16, .H = 2, .dk = 8, .dv = 6, .B = 2, .T = 21, .seed = 104 },
    { .what = "one training step of a two-block KLA model: loss over labelled positions (others -100), every "
      "gradient, AdamW from zero moments (the authors' settings)", .model = 1, .vocab = 32, .d = 16, .L = 2,
      .H = 2, .dk = 8, .dv = 4, .F = 24, .B = 2, .T = 12, .seed = 105 },
    { .tag = "clip", .what = "one training step of a two-block GDN model with lr 0.01 and clip 0.1, so that "
      "global-norm clipping acts", .model = 1, .gdn = 1, .vocab = 32, .d = 16, .L = 2, .H = 2, .dk = 8, .dv = 4,
      .F = 24, .B = 2, .T = 12, .lr = 0.01, .clip = 0.1, .seed = 106 },
};
#define NT ((int)(sizeof tcases / sizeof tcases[0]))

int gtrain_count(void) { return NT; }

const char *gtrain_name(int i)
{
    static char names[NT][128];
    const TCase *c = &tcases[i];
    if (c->model)
        snprintf(names[i], sizeof names[i], "model_%s_V%lld_d%lld_L%lld_H%lld_dk%lld_dv%lld_F%lld_B%lld_T%lld%s%s",
                 c->gdn ? "gdn" : "kla", (long long)c->vocab, (long long)c->d, (long long)c->L, (long long)c->H,
                 (long long)c->dk, (long long)c->dv, (long long)c->F, (long long)c->B, (long long)c->T,
                 c->tag ? "_" : "", c->tag ? c->tag : "");
    else
        snprintf(names[i], sizeof names[i], "layer_%s_d%lld_H%lld_dk%lld_dv%lld_B%lld_T%lld%s%s",
                 c->gdn ? "gdn" : "kla", (long long)c->d, (long long)c->H, (long long)c->dk, (long long)c->dv,
                 (long long)c->B, (long long)c->T, c->tag ? "_" : "", c->tag ? c->tag : "");
    return names[i];
}

/* ---- generation ---------------------------------------------------------------------------- */

static uint64_t sm64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double unif(uint64_t *s) { return (double)(sm64(s) >> 40) * 0x1p-24; }

/* a value from one draw: 2u - 1, or on the grid of 1/8 in [-1, 1] */
static float draw(const TCase *c, uint64_t *s)
{
    const double u = unif(s);
    return c->readable ? (float)((floor(17 * u) - 8) / 8) : (float)(2 * u - 1);
}

typedef struct JSON {
    char *p;
    size_t n, cap;
} JSON;

static void jp(JSON *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void jp(JSON *j, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (k < 0) return;
    if (j->n + (size_t)k + 1 > j->cap) {
        size_t cap = (j->n + (size_t)k + 1) * 2;
        char *p = realloc(j->p, cap);
        if (!p) return;
        j->p = p, j->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(j->p + j->n, j->cap - j->n, fmt, ap);
    va_end(ap);
    j->n += (size_t)k;
}

static KlaModelConfig config_of(const TCase *c)
{
    KlaModelConfig cfg;
    kla_default_model_config(&cfg);
    cfg.vocab = c->vocab, cfg.d_model = c->d, cfg.n_layer = c->L, cfg.n_head = c->H, cfg.d_k = c->dk;
    cfg.d_v = c->dv, cfg.d_ff = c->F, cfg.mixer = c->gdn ? KLA_MIXER_GDN : KLA_MIXER_KLA;
    return cfg;
}

static KlaAdamW adamw_of(const TCase *c)
{
    KlaAdamW a;
    kla_default_adamw(&a);
    if (c->lr) a.lr = c->lr;
    if (c->clip) a.clip = c->clip;
    return a;
}

/* the parameters: init(seed), moved (or, readable, on the grid), rounded to float32 */
static int set_params(const TCase *c, KlaModel *m, OutList *in)
{
    uint64_t s = 16 * c->seed + 1;
    kla_model_init(m, c->seed);
    for (int i = 0; i < kla_model_param_count(m); i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        float *w = outlist_add(in, p.name, ST_F32, p.ndim, p.shape);
        double *x = malloc((size_t)p.numel * sizeof *x);
        if (!w || !x) {
            free(x);
            return -1;
        }
        kla_model_read(m, KLA_PART_PARAM, i, KLA_OUT(x, KLA_F64, p.numel));
        for (int64_t j = 0; j < p.numel; j++) {
            const float d = draw(c, &s);
            /* the grid keeps A_log and dt_bias in range: exp(A_log) <= e */
            w[j] = c->readable ? d : (float)(x[j] + 0.25 * d);
        }
        free(x);
        if (kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(w, KLA_F32, p.numel)) < 0) return -1;
    }
    return 0;
}

/* The outputs (y dx grad.* | loss grad.* new.*) of case c on the backend of ctx, into o. */
static int run_case(const TCase *c, KlaContext *ctx, const OutList *in, st_dtype dt, OutList *o)
{
    KlaModelConfig cfg = config_of(c);
    KlaModel *m = NULL;
    int r = c->model ? kla_model_new(ctx, &cfg, &m) : kla_layer_new(ctx, &cfg, &m);
    if (r < 0) return r;
    const KlaDtype kdt = dt == ST_F64 ? KLA_F64 : KLA_F32;
    for (int i = 0; i < kla_model_param_count(m) && !r; i++)
        r = kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(in->t[i].data, KLA_F32, in->t[i].numel));
    const st_tensor *x = &in->t[kla_model_param_count(m)], *y2 = x + 1, *cu = c->nseq ? x + 2 : NULL;
    if (!r && !c->model) {
        const int64_t sh[3] = { c->B, c->T, c->d };
        void *y = outlist_add(o, "y", dt, 3, sh), *dx = y ? outlist_add(o, "dx", dt, 3, sh) : NULL;
        r = !dx ? KLA_ENOMEM
                : kla_layer_backward(m, c->B, c->T, KLA_IN(x->data, KLA_F32, x->numel), KLA_IN(y2->data, KLA_F32, x->numel),
                                     cu ? KLA_IN(cu->data, KLA_I64, cu->numel) : (KlaIn){ 0 },
                                     KLA_OUT(y, kdt, x->numel), KLA_OUT(dx, kdt, x->numel));
        if (!r) r = outlist_add_params(o, m, KLA_PART_GRAD, "grad.", dt);
    } else if (!r) {
        KlaBatch b = { c->B, c->T, KLA_IN(x->data, KLA_I64, x->numel), KLA_IN(y2->data, KLA_I64, x->numel) };
        KlaLoss l;
        const int64_t one = 1;
        KlaAdamW a = adamw_of(c);
        void *lp = outlist_add(o, "loss", dt, 1, &one);
        r = !lp ? KLA_ENOMEM : kla_model_loss(m, &b, 1, &l);
        if (!r) {
            if (dt == ST_F64) *(double *)lp = l.loss;
            else *(float *)lp = (float)l.loss;
            r = outlist_add_params(o, m, KLA_PART_GRAD, "grad.", dt);
        }
        if (!r) r = kla_model_update(m, &a, NULL);
        if (!r) r = outlist_add_params(o, m, KLA_PART_PARAM, "new.", dt);
    }
    if (r < 0) fprintf(stderr, "kla golden: %s: %s\n", kla_backend_name(ctx), kla_error_detail(ctx));
    kla_model_free(&m);
    return r;
}

static double rel(const st_tensor *ref, const st_tensor *got)
{
    double sd = 0, sr = 0;
    for (int64_t i = 0; i < ref->numel; i++) {
        const double a = ((const double *)ref->data)[i];
        const double b = got->dtype == ST_F64 ? ((const double *)got->data)[i] : ((const float *)got->data)[i];
        sd += (a - b) * (a - b), sr += a * a;
    }
    return sr > 0 ? sqrt(sd / sr) : sqrt(sd / (double)(ref->numel ? ref->numel : 1));
}

static void json_tensors(JSON *j, const OutList *l)
{
    for (int i = 0; i < l->n; i++) {
        const st_tensor *t = &l->t[i];
        jp(j, "%s\"%s\": {\"dtype\": \"%s\", \"shape\": [", i ? ", " : "", t->name, st_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) jp(j, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
        jp(j, "]}");
    }
}

int gtrain_generate(int ci, const char *dir, KlaContext *c64, KlaContext *c32, char **json)
{
    const TCase *c = &tcases[ci];
    const char *name = gtrain_name(ci);
    KlaModelConfig cfg = config_of(c);
    KlaModel *m = NULL;
    OutList in = { 0 }, exp = { 0 }, got = { 0 }, all = { 0 };
    JSON j = { 0 };
    int rc = -1;
    if ((c->model ? kla_model_new(c64, &cfg, &m) : kla_layer_new(c64, &cfg, &m)) < 0 || set_params(c, m, &in) < 0)
        goto done;
    /* the data: x, dy (and cu_seqlens), or input_ids and labels */
    uint64_t s = 16 * c->seed + 2;
    if (!c->model) {
        const int64_t sh[3] = { c->B, c->T, c->d };
        float *x = outlist_add(&in, "x", ST_F32, 3, sh), *dy = x ? outlist_add(&in, "dy", ST_F32, 3, sh) : NULL;
        if (!dy) goto done;
        for (int64_t i = 0; i < c->B * c->T * c->d; i++) x[i] = draw(c, &s);
        for (int64_t i = 0; i < c->B * c->T * c->d; i++) dy[i] = draw(c, &s);
        if (c->nseq) {
            const int64_t n1 = c->nseq + 1;
            int64_t *cu = outlist_add(&in, "cu_seqlens", ST_I64, 1, &n1);
            if (!cu) goto done;
            for (int k = 0; k < c->nseq; k++) cu[k + 1] = cu[k] + c->seqlens[k];
        }
    } else {
        const int64_t sh[2] = { c->B, c->T };
        int64_t *ids = outlist_add(&in, "input_ids", ST_I64, 2, sh);
        int64_t *lab = ids ? outlist_add(&in, "labels", ST_I64, 2, sh) : NULL;
        if (!lab) goto done;
        for (int64_t i = 0; i < c->B * c->T; i++) ids[i] = (int64_t)(unif(&s) * (double)c->vocab);
        for (int64_t i = 0; i < c->B * c->T; i++) {
            const int64_t v = (int64_t)(unif(&s) * (double)c->vocab);
            lab[i] = i % 3 == 0 ? -100 : v; /* a third ignored */
        }
    }
    kla_model_free(&m);
    /* expected: ref64; measured: our float32 reference */
    if (run_case(c, c64, &in, ST_F64, &exp) < 0 || run_case(c, c32, &in, ST_F32, &got) < 0) goto done;
    char tl[8192] = "";
    size_t tn = 0;
    JSON tj = { 0 }, mj = { 0 };
    for (int i = 0; i < exp.n; i++) {
        const char *nm = exp.t[i].name;
        const double e = rel(&exp.t[i], &got.t[i]), t = fmax(verify_default_tol(nm), golden_up125(4 * e));
        char num[32];
        golden_fmt_num(num, sizeof num, t);
        tn += (size_t)snprintf(tl + tn, sizeof tl - tn, "%s%s=%s", i ? "," : "", nm, num);
        jp(&tj, "%s\"%s\": %s", i ? ", " : "", nm, num);
        jp(&mj, "%s\"%s\": %.1e", i ? ", " : "", nm, e);
    }
    /* the file: inputs then expected outputs */
    for (int pass = 0; pass < 2; pass++) {
        const OutList *l = pass ? &exp : &in;
        for (int i = 0; i < l->n; i++) {
            const st_tensor *t = &l->t[i];
            void *d = outlist_add(&all, t->name, t->dtype, t->ndim, t->shape);
            if (!d) goto done;
            memcpy(d, t->data, t->nbytes);
        }
    }
    const char *keys[24], *vals[24];
    char buf[24][32];
    int nk = 0;
    keys[nk] = "case", vals[nk++] = name;
    keys[nk] = "kind", vals[nk++] = c->model ? "model" : "layer";
    nk += config_meta(&cfg, !c->model, keys + nk, vals + nk, buf);
    if (c->model) {
        KlaAdamW a = adamw_of(c);
        const char *ak[] = { "lr", "beta1", "beta2", "adam_eps", "weight_decay", "clip" };
        const double av[] = { a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.clip };
        for (int i = 0; i < 6; i++) {
            golden_fmt_num(buf[nk], 32, av[i]);
            keys[nk] = ak[i], vals[nk] = buf[nk];
            nk++;
        }
    }
    keys[nk] = "tol_float32", vals[nk++] = tl;
    char path[4096], err[512], sha[65];
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, name);
    if (st_write(path, all.t, all.n, keys, vals, nk, err, sizeof err) < 0 || sha256_file_hex(path, sha) < 0) {
        fprintf(stderr, "kla golden: %s\n", err);
        free(tj.p), free(mj.p);
        goto done;
    }
    struct stat sb;
    const long long bytes = stat(path, &sb) == 0 ? (long long)sb.st_size : -1;
    jp(&j, "    {\n      \"name\": \"%s\",\n      \"kind\": \"%s\",\n      \"file\": \"%s.safetensors\",\n", name,
       c->model ? "model" : "layer", name);
    jp(&j, "      \"bytes\": %lld,\n      \"sha256\": \"%s\",\n      \"what\": \"%s\",\n      \"seed\": %llu,\n",
       bytes, sha, c->what, (unsigned long long)c->seed);
    jp(&j, "      \"inputs_from\": {\"values\": \"%s\"},\n", c->readable ? "grid" : "init + 0.25 (2u - 1)");
    jp(&j, "      \"config\": {");
    for (int i = 2; i < nk - 1; i++)
        jp(&j, "%s\"%s\": %s%s%s", i > 2 ? ", " : "", keys[i], !strcmp(keys[i], "mixer") ? "\"" : "", vals[i],
           !strcmp(keys[i], "mixer") ? "\"" : "");
    jp(&j, "},\n      \"dims\": {\"B\": %lld, \"T\": %lld", (long long)c->B, (long long)c->T);
    if (c->nseq) {
        jp(&j, ", \"seqlens\": [");
        for (int k = 0; k < c->nseq; k++) jp(&j, "%s%d", k ? ", " : "", c->seqlens[k]);
        jp(&j, "]");
    }
    jp(&j, "},\n      \"inputs\": {");
    json_tensors(&j, &in);
    jp(&j, "},\n      \"outputs\": {");
    json_tensors(&j, &exp);
    jp(&j, "},\n      \"tolerances\": {\"float32\": {%s}},\n      \"measured\": {\"ref_float32\": {%s}}\n    }",
       tj.p ? tj.p : "", mj.p ? mj.p : "");
    free(tj.p), free(mj.p);
    printf("%-44s %9lld bytes  %s\n", name, bytes, sha);
    *json = j.p;
    j.p = NULL;
    rc = 0;
done:
    kla_model_free(&m);
    outlist_free(&in), outlist_free(&exp), outlist_free(&got), outlist_free(&all);
    free(j.p);
    return rc;
}

/* ---- checking ------------------------------------------------------------------------------- */

int gtrain_is_case(const KlaFile *f)
{
    const char *k = kla_file_meta(f, "kind");
    return k && (!strcmp(k, "layer") || !strcmp(k, "model"));
}

void gtrain_check(KlaContext *ctx, const KlaFile *f, const char *cname, int *pass, int *fail)
{
    const int model = !strcmp(kla_file_meta(f, "kind"), "model");
    const char *run = model ? "model step" : "layer backward";
    KlaModelConfig cfg;
    KlaModel *m = NULL;
    OutList o = { 0 };
    const st_file *sf = kla__file_st(f);
    if (train_config_from_file(cname, f, !model, &cfg) < 0 ||
        (model ? kla_model_new(ctx, &cfg, &m) : kla_layer_new(ctx, &cfg, &m)) < 0) {
        if (m == NULL && ctx) fprintf(stderr, "kla golden: %s: %s\n", cname, kla_error_detail(ctx));
        printf("%s %-18s FAIL  not a valid case (see the message above)\n", cname, run);
        (*fail)++;
        return;
    }
    static const char *const allowed[] = { "x", "dy", "cu_seqlens", "y", "dx", "input_ids", "labels", "loss", NULL };
    const int ref64 = !strcmp(kla_backend_name(ctx), "ref64");
    const st_dtype dt = ref64 ? ST_F64 : ST_F32;
    const KlaDtype kdt = ref64 ? KLA_F64 : KLA_F32;
    int r = train_params_from_file(cname, f, m, ctx, allowed);
    KlaFileTensor a, b, cu;
    if (!r && !model) {
        if (!kla_file_find(f, "x", &a) || !kla_file_find(f, "dy", &b) || a.ndim != 3 || b.numel != a.numel) {
            fprintf(stderr, "kla golden: %s: x and dy [B, T, d] needed\n", cname);
            r = -1;
        } else {
            void *y = outlist_add(&o, "y", dt, 3, a.shape), *dx = y ? outlist_add(&o, "dx", dt, 3, a.shape) : NULL;
            kla_file_find(f, "cu_seqlens", &cu);
            r = !dx ? -1
                    : kla_layer_backward(m, a.shape[0], a.shape[1], a.in, b.in, cu.in, KLA_OUT(y, kdt, a.numel),
                                         KLA_OUT(dx, kdt, a.numel));
            if (!r) r = outlist_add_params(&o, m, KLA_PART_GRAD, "grad.", dt);
        }
    } else if (!r) {
        if (!kla_file_find(f, "input_ids", &a) || !kla_file_find(f, "labels", &b) || a.ndim != 2 ||
            b.numel != a.numel) {
            fprintf(stderr, "kla golden: %s: input_ids and labels [B, T] needed\n", cname);
            r = -1;
        } else {
            KlaBatch bt = { a.shape[0], a.shape[1], a.in, b.in };
            KlaLoss l;
            KlaAdamW ad;
            kla_default_adamw(&ad);
            const char *ak[] = { "lr", "beta1", "beta2", "adam_eps", "weight_decay", "clip" };
            double *av[] = { &ad.lr, &ad.beta1, &ad.beta2, &ad.eps, &ad.weight_decay, &ad.clip };
            for (int i = 0; i < 6; i++)
                if (kla_file_meta(f, ak[i])) *av[i] = strtod(kla_file_meta(f, ak[i]), NULL);
            const int64_t one = 1;
            void *lp = outlist_add(&o, "loss", dt, 1, &one);
            r = !lp ? -1 : kla_model_loss(m, &bt, 1, &l);
            if (!r) {
                if (ref64) *(double *)lp = l.loss;
                else *(float *)lp = (float)l.loss;
                r = outlist_add_params(&o, m, KLA_PART_GRAD, "grad.", dt);
            }
            if (!r) r = kla_model_update(m, &ad, NULL);
            if (!r) r = outlist_add_params(&o, m, KLA_PART_PARAM, "new.", dt);
        }
    }
    if (r) {
        printf("%s %-18s FAIL  %s\n", cname, run, kla_error_detail(ctx));
        (*fail)++;
    } else {
        for (int i = 0; i < sf->count; i++) {
            const char *nm = sf->tensors[i].name;
            if (!verify_is_output_name(nm)) continue;
            const st_tensor *got = NULL;
            for (int k = 0; k < o.n; k++)
                if (!strcmp(o.t[k].name, nm)) got = &o.t[k];
            double t = verify_meta_tol(sf, "tol_float32", nm);
            printf("%s %-18s ", cname, run);
            if (verify_tensor(stdout, nm, &sf->tensors[i], got, t >= 0 ? t : verify_default_tol(nm), -1, 0)) (*pass)++;
            else (*fail)++;
        }
    }
    outlist_free(&o);
    kla_model_free(&m);
}
