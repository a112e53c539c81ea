/*
 * problem.c: problem files (kla.h, "problem files"): the one loader that the kla command
 * (forward, backward, decode, golden check, bench --in), the examples and users' own
 * programs read a problem through, so that every check is made once, here.
 *
 * The safetensors reader (safetensors.c) already refuses malformed files (header,
 * offsets, dtypes, duplicates, UTF-8); this adds the contract of kla-spec.md: which names
 * exist, their dtypes and shapes, the options in __metadata__, and cu_seqlens values.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla_internal.h"
#include "safetensors.h"

struct KlaFile {
    st_file f;
    char *path;
};

int kla_file_read(const char *path, KlaFile **out)
{
    kla__noclear();
    if (!out) return kla__nofail(KLA_EINVAL, "kla_file_read: NULL result pointer");
    *out = NULL;
    if (!path) return kla__nofail(KLA_EINVAL, "kla_file_read: NULL path");
    KlaFile *f = calloc(1, sizeof *f);
    char *p = f ? strdup(path) : NULL;
    if (!p) {
        free(f);
        return kla__nofail(KLA_ENOMEM, "%s: out of memory", path);
    }
    char err[512];
    if (st_read(path, &f->f, err, sizeof err) < 0) {
        free(p);
        free(f);
        return kla__nofail(st_last_failed_oom() ? KLA_ENOMEM : KLA_EINVAL, "%s", err);
    }
    f->path = p;
    *out = f;
    return 0;
}

void kla_file_free(KlaFile **f)
{
    if (!f || !*f) return;
    st_free(&(*f)->f);
    free((*f)->path);
    free(*f);
    *f = NULL;
}

const st_file *kla__file_st(const KlaFile *f) { return &f->f; }

int kla_file_count(const KlaFile *f) { return f ? f->f.count : 0; }

static KlaDtype kdtype(st_dtype d, int *ok)
{
    *ok = 1;
    switch (d) {
    case ST_F32: return KLA_F32;
    case ST_F64: return KLA_F64;
    case ST_F16: return KLA_F16;
    case ST_BF16: return KLA_BF16;
    case ST_I32: return KLA_I32;
    case ST_I64: return KLA_I64;
    default: *ok = 0; return KLA_F32;
    }
}

/* A present tensor is never passed as NULL data, even when it has no elements. */
static const double empty_data[1];

static void view(const st_tensor *s, KlaFileTensor *t)
{
    memset(t, 0, sizeof *t);
    t->name = s->name;
    t->dtype = st_dtype_name(s->dtype);
    t->ndim = s->ndim;
    for (int d = 0; d < s->ndim && d < 8; d++) t->shape[d] = s->shape[d];
    t->numel = s->numel;
    t->data = s->data;
    int ok;
    KlaDtype kd = kdtype(s->dtype, &ok);
    if (ok) t->in = KLA_IN(s->data ? s->data : (const void *)empty_data, kd, s->numel);
}

int kla_file_tensor(const KlaFile *f, int i, KlaFileTensor *t)
{
    if (!f || !t || i < 0 || i >= f->f.count) return KLA_EINVAL;
    view(&f->f.tensors[i], t);
    return 0;
}

int kla_file_find(const KlaFile *f, const char *name, KlaFileTensor *t)
{
    if (t) memset(t, 0, sizeof *t);
    const st_tensor *s = f && name ? st_find(&f->f, name) : NULL;
    if (!s) return 0;
    if (t) view(s, t);
    return 1;
}

const char *kla_file_meta(const KlaFile *f, const char *key)
{
    return f && key ? st_meta(&f->f, key) : NULL;
}

/* ---- names ------------------------------------------------------------------------------- */

/* kla-spec.md sections 2 to 4, and 7.3 (the preconditioner's tensors) */
static const char *const spec_names[] = { "q", "k", "v", "g", "eta", "beta", "h0", "cu_seqlens", "do",
                                          "dht", "o", "ht", "dq", "dk", "dv", "dg", "deta", "dbeta",
                                          "dh0", "g_atk", "beta_atk", "log_atk_scale", "a0", "at", "dat",
                                          "dg_atk", "dbeta_atk", "dlog_atk_scale", "da0", NULL };
/* other libraries' names for ours */
static const char *const aliases[][2] = {
    { "initial_state", "h0" }, { "final_state", "ht" }, { "output", "o" }, { "out", "o" },
    { "dout", "do" }, { "grad_output", "do" }, { "d_initial_state", "dh0" }, { "dinitial_state", "dh0" },
    { "d_final_state", "dht" }, { "dfinal_state", "dht" }, { "offsets", "cu_seqlens" },
    { "cu_seqlen", "cu_seqlens" }, { "query", "q" }, { "key", "k" }, { "value", "v" },
    { "gk", "g" }, { "decay", "g" }, { "a", "eta or beta" }, { "S0", "h0" }, { "state", "h0" },
    { "initial_A_state", "a0" }, { "A_state", "at" }, { "final_A_state", "at" }, { "dh0_atk", "da0" },
    { "atk_scale", "log_atk_scale" },
};
static const char *const spec_keys[] = { "mode", "scale", "eps", "l2norm_q", "l2norm_k", "state_layout",
                                         "gate", "precond", "squash_x", "squash_eps", NULL };
/* written by this project's own tools (outputs, golden cases) or by the safetensors
 * library itself ("format") */
static const char *const own_keys[] = { "case", "tol_float32", "tol_bf16", "elem_bf16", "backend", "algo",
                                        "format",
                                        NULL };

static int in_list(const char *const *list, const char *s)
{
    for (int i = 0; list[i]; i++)
        if (!strcmp(list[i], s)) return 1;
    return 0;
}

/* Levenshtein distance, capped (names are short) */
static int edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 31 || lb > 31) return 99;
    int d[32][32];
    for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++)
        for (size_t j = 1; j <= lb; j++) {
            int c = d[i - 1][j - 1] + ((a[i - 1] | 0x20) != (b[j - 1] | 0x20));
            if (d[i - 1][j] + 1 < c) c = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < c) c = d[i][j - 1] + 1;
            d[i][j] = c;
        }
    return d[la][lb];
}

/* "; did you mean h0? (flash-linear-attention's initial_state)" or "" */
static void hint(char *buf, size_t n, const char *name, const char *const *known)
{
    buf[0] = 0;
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (!strcmp(name, aliases[i][0])) {
            snprintf(buf, n, "; did you mean %s? (%s is another library's name for it)", aliases[i][1], name);
            return;
        }
    const char *best = NULL;
    int bd = 3;
    for (int i = 0; known[i]; i++) {
        int d = edit_distance(name, known[i]);
        if (d < bd && d <= (int)(strlen(known[i]) + 1) / 2) bd = d, best = known[i];
    }
    if (best) snprintf(buf, n, "; did you mean %s?", best);
}

static int check_names(const KlaFile *f)
{
    char h[160];
    for (int i = 0; i < f->f.count; i++) {
        const char *n = f->f.tensors[i].name;
        if (in_list(spec_names, n)) continue;
        hint(h, sizeof h, n, spec_names);
        return kla__nofail(KLA_EINVAL,
                           "%s: tensor \"%s\" is not defined by kla-spec.md (inputs q k v g eta|beta h0 "
                           "cu_seqlens do dht, with precond atk g_atk beta_atk log_atk_scale a0 dat; "
                           "outputs o ht dq dk dv dg deta|dbeta dh0, at dg_atk dbeta_atk dlog_atk_scale "
                           "da0)%s", f->path, n, h);
    }
    for (int i = 0; i < f->f.meta_count; i++) {
        const char *k = f->f.meta_keys[i];
        if (in_list(spec_keys, k) || in_list(own_keys, k)) continue;
        hint(h, sizeof h, k, spec_keys);
        return kla__nofail(KLA_EINVAL,
                           "%s: metadata key \"%s\" is not defined by kla-spec.md (mode scale eps "
                           "l2norm_q l2norm_k state_layout gate precond squash_x squash_eps)%s", f->path, k, h);
    }
    return 0;
}

/* ---- options ------------------------------------------------------------------------------ */

static int meta_bool(const KlaFile *f, const char *key, int *v)
{
    const char *s = st_meta(&f->f, key);
    if (!s) return 0;
    if (!strcmp(s, "true")) *v = 1;
    else if (!strcmp(s, "false")) *v = 0;
    else return kla__nofail(KLA_EINVAL, "%s: metadata \"%s\": \"%s\", expected true or false", f->path, key, s);
    return 0;
}

/* A finite decimal (leading and trailing blanks allowed); present: 1, absent: 0. */
static int meta_num(const KlaFile *f, const char *key, double *v)
{
    const char *s = st_meta(&f->f, key);
    if (!s) return 0;
    char *end;
    double x = strtod(s, &end);
    while (end != s && (*end == ' ' || *end == '\t')) end++;
    if (end == s || *end || !isfinite(x))
        return kla__nofail(KLA_EINVAL, "%s: metadata \"%s\": \"%s\" is not a finite number", f->path, key, s);
    *v = x;
    return 1;
}

static int meta_choice(const KlaFile *f, const char *key, const char *a, const char *b, int *v)
{
    const char *s = st_meta(&f->f, key);
    if (!s) return 0;
    if (!strcmp(s, a)) *v = 0;
    else if (!strcmp(s, b)) *v = 1;
    else return kla__nofail(KLA_EINVAL, "%s: metadata \"%s\": \"%s\", expected %s or %s", f->path, key, s, a, b);
    return 1;
}

static int read_options(const KlaFile *f, KlaOptions *o, int has_eta, int has_beta, int g_ndim, int has_batk)
{
    kla_default_options(o);
    int v = 0, r;
    if ((r = meta_choice(f, "mode", "kla", "gdn", &v)) < 0) return r;
    if (has_eta && has_beta)
        return kla__nofail(KLA_EINVAL, "%s: tensors \"eta\" and \"beta\" are both present (exactly one is allowed)",
                           f->path);
    if (r == 0) {
        if (!has_eta && !has_beta)
            return kla__nofail(KLA_EINVAL, "%s: missing tensor \"eta\" (mode kla) or \"beta\" (mode gdn)", f->path);
        o->mode = has_eta ? KLA_MODE_KLA : KLA_MODE_GDN;
    } else {
        o->mode = v ? KLA_MODE_GDN : KLA_MODE_KLA;
        if (o->mode == KLA_MODE_KLA && !has_eta)
            return kla__nofail(KLA_EINVAL, "%s: missing tensor \"eta\" (mode kla)", f->path);
        if (o->mode == KLA_MODE_GDN && !has_beta)
            return kla__nofail(KLA_EINVAL, "%s: missing tensor \"beta\" (mode gdn)", f->path);
    }
    /* scale is taken literally, 0 included; absent means K^-1/2 */
    if ((r = meta_num(f, "scale", &o->scale)) < 0 || (r = meta_num(f, "eps", &o->eps)) < 0) return r;
    if (o->eps < 0) return kla__nofail(KLA_EINVAL, "%s: metadata \"eps\": %g, must be >= 0", f->path, o->eps);
    if ((r = meta_bool(f, "l2norm_q", &o->l2norm_q)) < 0 || (r = meta_bool(f, "l2norm_k", &o->l2norm_k)) < 0)
        return r;
    if ((r = meta_choice(f, "state_layout", "kv", "vk", &v)) < 0) return r;
    if (r) o->state_layout = v ? KLA_LAYOUT_VK : KLA_LAYOUT_KV;
    /* the family (section 7.3): gate from the metadata, else from g's rank; precond from
     * the metadata, else from beta_atk's presence */
    if ((r = meta_choice(f, "gate", "head", "channel", &v)) < 0) return r;
    o->gate = r ? (v ? KLA_GATE_CHANNEL : KLA_GATE_HEAD) : g_ndim == 4 ? KLA_GATE_CHANNEL : KLA_GATE_HEAD;
    if ((r = meta_choice(f, "precond", "none", "atk", &v)) < 0) return r;
    o->precond = r ? (v ? KLA_PRECOND_ATK : KLA_PRECOND_NONE) : has_batk ? KLA_PRECOND_ATK : KLA_PRECOND_NONE;
    if ((r = meta_num(f, "squash_x", &o->squash_x)) < 0) return r;
    if (!(o->squash_x > 1))
        return kla__nofail(KLA_EINVAL, "%s: metadata \"squash_x\": %g, must be > 1", f->path, o->squash_x);
    if ((r = meta_num(f, "squash_eps", &o->squash_eps)) < 0) return r;
    if (!(o->squash_eps > 0))
        return kla__nofail(KLA_EINVAL, "%s: metadata \"squash_eps\": %g, must be > 0", f->path, o->squash_eps);
    if (o->precond == KLA_PRECOND_ATK && !has_batk)
        return kla__nofail(KLA_EINVAL, "%s: missing tensor \"beta_atk\" (precond atk)", f->path);
    return 0;
}

/* ---- shapes ------------------------------------------------------------------------------- */

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && o < n; d++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

static int real_dtype(const KlaFile *f, const st_tensor *t)
{
    if (t->dtype == ST_F32 || t->dtype == ST_F64 || t->dtype == ST_F16 || t->dtype == ST_BF16) return 0;
    return kla__nofail(KLA_EINVAL, "%s: tensor \"%s\": dtype %s, expected F32, F64, F16 or BF16", f->path,
                       t->name, st_dtype_name(t->dtype));
}

static int same_shape(const st_tensor *t, int ndim, const int64_t *shape)
{
    if (t->ndim != ndim) return 0;
    for (int d = 0; d < ndim; d++)
        if (t->shape[d] != shape[d]) return 0;
    return 1;
}

/* t (optional) must be real with the given shape; dims names it, e.g. "[B, T, HV]". */
static int need_shape(const KlaFile *f, const st_tensor *t, int ndim, const int64_t *shape, const char *dims)
{
    if (!t) return 0;
    int r = real_dtype(f, t);
    if (r) return r;
    if (same_shape(t, ndim, shape)) return 0;
    char a[200], b[200];
    shape_str(a, sizeof a, t->ndim, t->shape);
    shape_str(b, sizeof b, ndim, shape);
    return kla__nofail(KLA_EINVAL, "%s: tensor \"%s\": shape %s, expected %s = %s", f->path, t->name, a, dims, b);
}

static KlaIn in_of(const st_tensor *t)
{
    if (!t) return (KlaIn){ 0 };
    int ok;
    KlaDtype d = kdtype(t->dtype, &ok);
    return KLA_IN(t->data ? t->data : (const void *)empty_data, d, t->numel);
}

static int64_t cu_at(const st_tensor *cu, int64_t i)
{
    if (cu->dtype == ST_I32) {
        int32_t x;
        memcpy(&x, (const char *)cu->data + 4 * i, 4);
        return x;
    }
    int64_t x;
    memcpy(&x, (const char *)cu->data + 8 * i, 8);
    return x;
}

static int check_cu(const KlaFile *f, const st_tensor *cu, int64_t B, int64_t T, int64_t *N)
{
    char a[200];
    if (cu->dtype != ST_I32 && cu->dtype != ST_I64)
        return kla__nofail(KLA_EINVAL, "%s: tensor \"cu_seqlens\": dtype %s, expected I32 or I64", f->path,
                           st_dtype_name(cu->dtype));
    if (cu->ndim != 1 || cu->numel < 2) {
        shape_str(a, sizeof a, cu->ndim, cu->shape);
        return kla__nofail(KLA_EINVAL, "%s: tensor \"cu_seqlens\": shape %s, expected [N + 1] with N >= 1",
                           f->path, a);
    }
    if (B != 1)
        return kla__nofail(KLA_EINVAL, "%s: tensor \"cu_seqlens\": packing requires B = 1, q has B = %lld",
                           f->path, (long long)B);
    *N = cu->numel - 1;
    if (cu_at(cu, 0) != 0)
        return kla__nofail(KLA_ERANGE, "%s: tensor \"cu_seqlens\": cu_seqlens[0] = %lld, must be 0", f->path,
                           (long long)cu_at(cu, 0));
    for (int64_t i = 1; i <= *N; i++)
        if (cu_at(cu, i) < cu_at(cu, i - 1))
            return kla__nofail(KLA_ERANGE,
                               "%s: tensor \"cu_seqlens\": cu_seqlens[%lld] = %lld is less than cu_seqlens[%lld] "
                               "= %lld (must be non-decreasing)", f->path, (long long)i, (long long)cu_at(cu, i),
                               (long long)(i - 1), (long long)cu_at(cu, i - 1));
    if (cu_at(cu, *N) != T)
        return kla__nofail(KLA_ERANGE, "%s: tensor \"cu_seqlens\": last entry cu_seqlens[%lld] = %lld, must be "
                           "T = %lld", f->path, (long long)*N, (long long)cu_at(cu, *N), (long long)T);
    return 0;
}

int kla_file_problem(const KlaFile *f, KlaOp op, KlaProblem *p)
{
    kla__noclear();
    if (!f || !p) return kla__nofail(KLA_EINVAL, "kla_file_problem: NULL file or problem");
    if (op != KLA_OP_FORWARD && op != KLA_OP_BACKWARD && op != KLA_OP_DECODE)
        return kla__nofail(KLA_EINVAL, "kla_file_problem: unknown op %d", (int)op);
    memset(p, 0, sizeof *p);
    int r = check_names(f);
    if (r) return r;
    const st_file *sf = &f->f;
    const st_tensor *q = st_find(sf, "q"), *k = st_find(sf, "k"), *v = st_find(sf, "v");
    const st_tensor *g = st_find(sf, "g"), *eta = st_find(sf, "eta"), *beta = st_find(sf, "beta");
    const st_tensor *h0 = st_find(sf, "h0"), *cu = st_find(sf, "cu_seqlens");
    const st_tensor *dout = op == KLA_OP_BACKWARD ? st_find(sf, "do") : NULL;
    const st_tensor *dht = op == KLA_OP_BACKWARD ? st_find(sf, "dht") : NULL;
    static const char *const req[] = { "q", "k", "v" };
    const st_tensor *rt[] = { q, k, v };
    for (int i = 0; i < 3; i++)
        if (!rt[i]) return kla__nofail(KLA_EINVAL, "%s: missing tensor \"%s\"", f->path, req[i]);
    const st_tensor *g_atk = st_find(sf, "g_atk"), *beta_atk = st_find(sf, "beta_atk");
    const st_tensor *latk = st_find(sf, "log_atk_scale"), *a0 = st_find(sf, "a0");
    const st_tensor *dat = op == KLA_OP_BACKWARD ? st_find(sf, "dat") : NULL;
    if ((r = read_options(f, &p->opt, eta != NULL, beta != NULL, g ? g->ndim : 0, beta_atk != NULL))) return r;

    char a[200], b[200];
    if ((r = real_dtype(f, q))) return r;
    if (q->ndim != 4) {
        shape_str(a, sizeof a, q->ndim, q->shape);
        return kla__nofail(KLA_EINVAL, "%s: tensor \"q\": shape %s, expected 4 dimensions [B, T, H, K]", f->path, a);
    }
    KlaShape *s = &p->shape;
    s->B = q->shape[0], s->T = q->shape[1], s->H = q->shape[2], s->K = q->shape[3];
    if (s->B < 1 || s->T < 1 || s->H < 1 || s->K < 1) {
        shape_str(a, sizeof a, 4, q->shape);
        return kla__nofail(KLA_EINVAL, "%s: tensor \"q\": shape %s, B, T, H and K must be at least 1", f->path, a);
    }
    if ((r = real_dtype(f, k))) return r;
    if (!same_shape(k, 4, q->shape)) {
        shape_str(a, sizeof a, k->ndim, k->shape);
        shape_str(b, sizeof b, 4, q->shape);
        return kla__nofail(KLA_EINVAL, "%s: tensor \"k\": shape %s does not match q %s (must be equal)", f->path, a, b);
    }
    if ((r = real_dtype(f, v))) return r;
    if (v->ndim != 4 || v->shape[0] != s->B || v->shape[1] != s->T) {
        shape_str(a, sizeof a, v->ndim, v->shape);
        shape_str(b, sizeof b, 4, q->shape);
        return kla__nofail(KLA_EINVAL, "%s: tensor \"v\": shape %s does not match q %s (%s)", f->path, a, b,
                           v->ndim != 4 ? "expected [B, T, HV, V]" : "B, T must agree");
    }
    s->HV = v->shape[2], s->V = v->shape[3];
    if (s->HV < 1 || s->V < 1) {
        shape_str(a, sizeof a, 4, v->shape);
        return kla__nofail(KLA_EINVAL, "%s: tensor \"v\": shape %s, HV and V must be at least 1", f->path, a);
    }
    if (s->HV % s->H)
        return kla__nofail(KLA_EINVAL, "%s: tensor \"v\": HV = %lld is not a multiple of H = %lld (the heads of q)",
                           f->path, (long long)s->HV, (long long)s->H);
    const int64_t btv[3] = { s->B, s->T, s->HV }, btvk[4] = { s->B, s->T, s->HV, s->K };
    if ((r = p->opt.gate == KLA_GATE_CHANNEL ? need_shape(f, g, 4, btvk, "[B, T, HV, K] (gate channel)")
                                             : need_shape(f, g, 3, btv, "[B, T, HV] (gate head)")) ||
        (r = need_shape(f, eta, 3, btv, "[B, T, HV]")) || (r = need_shape(f, beta, 3, btv, "[B, T, HV]")))
        return r;
    s->N = s->B;
    if (cu && (r = check_cu(f, cu, s->B, s->T, &s->N))) return r;
    const int vk = p->opt.state_layout == KLA_LAYOUT_VK;
    int64_t *hs = p->state_shape;
    hs[0] = s->N, hs[1] = s->HV, hs[2] = vk ? s->V : s->K, hs[3] = vk ? s->K : s->V;
    const char *hdims = vk ? "[N, HV, V, K]" : "[N, HV, K, V]";
    if ((r = need_shape(f, h0, 4, hs, hdims))) return r;
    /* the preconditioner's tensors: only with precond atk */
    const st_tensor *atk_t[] = { g_atk, beta_atk, latk, a0, dat };
    for (int i = 0; i < 5 && p->opt.precond != KLA_PRECOND_ATK; i++)
        if (atk_t[i])
            return kla__nofail(KLA_EINVAL, "%s: tensor \"%s\" is only read with precond atk (metadata \"precond\" "
                               "is \"none\")", f->path, atk_t[i]->name);
    const int64_t bth[3] = { s->B, s->T, s->H }, nhk[3] = { s->N, s->H, s->K };
    if ((r = need_shape(f, g_atk, 3, bth, "[B, T, H]")) || (r = need_shape(f, beta_atk, 3, bth, "[B, T, H]")) ||
        (r = need_shape(f, latk, 1, &s->H, "[H]")) || (r = need_shape(f, a0, 3, nhk, "[N, H, K]")) ||
        (r = need_shape(f, dat, 3, nhk, "[N, H, K]")))
        return r;
    if (op == KLA_OP_BACKWARD) {
        if (!dout) return kla__nofail(KLA_EINVAL, "%s: missing tensor \"do\" (the gradient of o, needed by backward)",
                                      f->path);
        if ((r = need_shape(f, dout, 4, v->shape, "[B, T, HV, V]")) || (r = need_shape(f, dht, 4, hs, hdims)))
            return r;
    }
    /* the state is the one size not bounded by a tensor of the file */
    p->state_numel = 1;
    for (int d = 0; d < 4; d++) {
        if (hs[d] > (INT64_MAX / 8) / p->state_numel)
            return kla__nofail(KLA_EINVAL, "%s: the state %s is too large", f->path, hdims);
        p->state_numel *= hs[d];
    }

    KlaTensors *t = &p->t;
    t->q = in_of(q), t->k = in_of(k), t->v = in_of(v), t->g = in_of(g), t->h0 = in_of(h0);
    if (p->opt.mode == KLA_MODE_KLA) t->eta = in_of(eta);
    else t->beta = in_of(beta);
    t->cu_seqlens = in_of(cu);
    t->dout = in_of(dout);
    t->dht = in_of(dht);
    t->g_atk = in_of(g_atk), t->beta_atk = in_of(beta_atk), t->log_atk_scale = in_of(latk);
    t->a0 = in_of(a0), t->dat = in_of(dat);
    return 0;
}
