/*
 * validate.c: validate a kernel on one golden case, in plain C with libkla only.
 *
 *   validate CASE.safetensors [BACKEND]      (BACKEND: ref, ref64, simd, ...; default ref)
 *
 * Reads the case's inputs (q k v g eta|beta h0 cu_seqlens do dht, options in
 * __metadata__), runs the backward pass (which also writes o and ht) into float32
 * outputs, and compares every expected tensor with the metric of kla-spec.md section 5:
 * rel_rmse = rms(ref - got) / rms(ref) <= the case's tol_float32 (MANIFEST.json's float32
 * set). Prints one line per tensor and exits 0 if all pass, 1 otherwise.
 *
 * To check your own kernel, replace run_kernel() below. The small safetensors reader
 * handles the golden files (and any file with the standard header); it is not a
 * general JSON parser.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"

/* ---- a minimal safetensors reader ------------------------------------------------- */

typedef struct Tensor {
    char dtype[8];    /* "F32", "F64", "I32", "I64" */
    int ndim;
    int64_t shape[8];
    int64_t numel;
    void *data;       /* malloc'd copy, NULL if absent */
} Tensor;

typedef struct File {
    unsigned char *buf;
    size_t len;
    char *header;     /* NUL-terminated copy of the JSON header */
    const unsigned char *body;
} File;

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* Position just after `"key":` inside [from, to), or NULL. */
static const char *find_key(const char *from, const char *to, const char *key)
{
    size_t kl = strlen(key);
    for (const char *p = from; p && p < to; p++) {
        p = strchr(p, '"');
        if (!p || p >= to) return NULL;
        if (strncmp(p + 1, key, kl) == 0 && p[1 + kl] == '"') {
            const char *q = skip_ws(p + 2 + kl);
            if (*q == ':') return skip_ws(q + 1);
        }
        /* skip over this string */
        for (p++; *p && *p != '"'; p++)
            if (*p == '\\' && p[1]) p++;
    }
    return NULL;
}

static int read_file(const char *path, File *f)
{
    memset(f, 0, sizeof *f);
    FILE *fp = fopen(path, "rb");
    if (!fp) return -1;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    if (n < 8) { fclose(fp); return -1; }
    f->buf = malloc((size_t)n);
    if (!f->buf || fread(f->buf, 1, (size_t)n, fp) != (size_t)n) { fclose(fp); return -1; }
    fclose(fp);
    f->len = (size_t)n;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | f->buf[i];
    if (hl > f->len - 8) return -1;
    f->header = malloc(hl + 1);
    if (!f->header) return -1;
    memcpy(f->header, f->buf + 8, hl);
    f->header[hl] = 0;
    f->body = f->buf + 8 + hl;
    return 0;
}

/* A tensor by name; t->data == NULL when absent. */
static int get_tensor(const File *f, const char *name, Tensor *t)
{
    memset(t, 0, sizeof *t);
    const char *end = f->header + strlen(f->header);
    const char *p = f->header;
    /* a tensor entry is "name": { ... }; metadata entries have string values */
    while ((p = find_key(p, end, name)) && *p != '{') {}
    if (!p) return 0;
    const char *close = strchr(p, '}');
    const char *d = find_key(p, close, "dtype"), *s = find_key(p, close, "shape");
    const char *o = find_key(p, close, "data_offsets");
    if (!d || !s || !o || *s != '[' || *o != '[') return -1;
    sscanf(d, "\"%7[A-Z0-9]\"", t->dtype);
    t->numel = 1;
    for (s = skip_ws(s + 1); *s != ']' && t->ndim < 8;) {
        char *e;
        t->shape[t->ndim] = strtoll(s, &e, 10);
        t->numel *= t->shape[t->ndim++];
        s = skip_ws(e);
        if (*s == ',') s = skip_ws(s + 1);
    }
    long long b0, b1;
    if (sscanf(o, "[ %lld , %lld ]", &b0, &b1) != 2) return -1;
    size_t es = strcmp(t->dtype, "F64") == 0 || strcmp(t->dtype, "I64") == 0 ? 8 : 4;
    if (b0 < 0 || b1 < b0 || (size_t)(b1 - b0) != (size_t)t->numel * es ||
        (size_t)b1 > f->len - (size_t)(f->body - f->buf))
        return -1;
    t->data = malloc((size_t)(b1 - b0) + 8);
    if (!t->data) return -1;
    memcpy(t->data, f->body + b0, (size_t)(b1 - b0));
    return 0;
}

/* A __metadata__ value (copied into buf) or NULL. */
static const char *get_meta(const File *f, const char *key, char *buf, size_t n)
{
    const char *end = f->header + strlen(f->header);
    const char *m = find_key(f->header, end, "__metadata__");
    if (!m || *m != '{') return NULL;
    const char *v = find_key(m, strchr(m, '}'), key);
    if (!v || *v != '"') return NULL;
    size_t i = 0;
    for (v++; *v && *v != '"' && i + 1 < n; v++) buf[i++] = *v;
    buf[i] = 0;
    return buf;
}

static KlaIn in_of(const Tensor *t)
{
    KlaDtype d = strcmp(t->dtype, "F64") == 0 ? KLA_F64 : strcmp(t->dtype, "I32") == 0 ? KLA_I32
               : strcmp(t->dtype, "I64") == 0 ? KLA_I64 : KLA_F32;
    return (KlaIn){ t->data, d };
}

/* ---- the kernel under test --------------------------------------------------------- */

/* Replace this with a call to your kernel: it gets the case's inputs in t and must write
 * o, ht and the gradients (float32 here). */
static int run_kernel(const char *backend, const KlaShape *s, const KlaOptions *opt,
                      const KlaTensors *t)
{
    KlaParams par;
    kla_default_params(&par);
    par.backend = backend;
    KlaContext *ctx;
    int r = kla_open(&ctx, &par);
    if (r < 0) {
        fprintf(stderr, "validate: backend %s: %s\n", backend, kla_strerror(r));
        return r;
    }
    r = kla_backward(ctx, s, opt, t);
    if (r < 0) fprintf(stderr, "validate: %s\n", kla_error_detail(ctx));
    kla_close(&ctx);
    return r;
}

/* ---- comparison ---------------------------------------------------------------------- */

static double tol_for(const File *f, const char *name)
{
    char buf[512];
    const char *s = get_meta(f, "tol_float32", buf, sizeof buf);
    size_t nl = strlen(name);
    while (s && *s) {
        if (strncmp(s, name, nl) == 0 && s[nl] == '=') return strtod(s + nl + 1, NULL);
        s = strchr(s, ',');
        if (s) s++;
    }
    return name[0] == 'd' ? 1e-4 : 1e-5; /* kla verify's defaults */
}

/* One line: name, PASS/FAIL, rel_rmse, largest error and its index. Returns 1 if pass. */
static int compare(const char *name, const Tensor *ref, const float *got, double tol)
{
    const double *r = ref->data;
    double sd = 0, sr = 0, maxe = 0;
    int64_t at = 0, nonfinite = 0;
    for (int64_t i = 0; i < ref->numel; i++) {
        if (!isfinite(got[i])) { nonfinite++; continue; }
        double d = (double)got[i] - r[i];
        sd += d * d;
        sr += r[i] * r[i];
        if (fabs(d) > maxe) { maxe = fabs(d); at = i; }
    }
    double rel = sr > 0 ? sqrt(sd / sr) : sqrt(sd / (double)ref->numel);
    int pass = nonfinite == 0 && rel <= tol;
    char idx[128];
    int64_t rest = at, ix[8];
    for (int d = ref->ndim - 1; d >= 0; d--) {
        ix[d] = rest % ref->shape[d];
        rest /= ref->shape[d];
    }
    size_t l = 0;
    for (int d = 0; d < ref->ndim; d++)
        l += (size_t)snprintf(idx + l, sizeof idx - l, "%s%lld", d ? ", " : "", (long long)ix[d]);
    printf("%-6s %s  rel_rmse %.1e  max_abs %.1e at %s[%s] (ref %.8g, got %.8g)  (tol %g)%s\n",
           name, pass ? "PASS" : "FAIL", rel, maxe, name, idx, r[at], (double)got[at], tol,
           nonfinite ? "  non-finite values" : "");
    return pass;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: validate CASE.safetensors [BACKEND]\n");
        return 2;
    }
    const char *backend = argc > 2 ? argv[2] : "ref";
    File f;
    if (read_file(argv[1], &f) < 0) {
        fprintf(stderr, "validate: %s: cannot read a safetensors file\n", argv[1]);
        return 1;
    }
    /* inputs */
    static const char *const in_names[] = { "q", "k", "v", "g", "eta", "beta", "h0",
                                            "cu_seqlens", "do", "dht" };
    Tensor in[10];
    for (int i = 0; i < 10; i++)
        if (get_tensor(&f, in_names[i], &in[i]) < 0) {
            fprintf(stderr, "validate: %s: bad entry for \"%s\"\n", argv[1], in_names[i]);
            return 1;
        }
    const Tensor *q = &in[0], *v = &in[2], *cu = &in[7];
    if (!q->data || !v->data || q->ndim != 4 || v->ndim != 4 || !in[8].data) {
        fprintf(stderr, "validate: %s: needs q, k, v, eta|beta and do\n", argv[1]);
        return 1;
    }

    /* options */
    char buf[64];
    KlaOptions opt;
    kla_default_options(&opt);
    opt.mode = in[5].data ? KLA_MODE_GDN : KLA_MODE_KLA;
    if (get_meta(&f, "scale", buf, sizeof buf)) opt.scale = strtod(buf, NULL);
    if (get_meta(&f, "eps", buf, sizeof buf)) opt.eps = strtod(buf, NULL);
    if (get_meta(&f, "l2norm_q", buf, sizeof buf)) opt.l2norm_q = strcmp(buf, "true") == 0;
    if (get_meta(&f, "l2norm_k", buf, sizeof buf)) opt.l2norm_k = strcmp(buf, "true") == 0;
    if (get_meta(&f, "state_layout", buf, sizeof buf))
        opt.state_layout = strcmp(buf, "vk") == 0 ? KLA_LAYOUT_VK : KLA_LAYOUT_KV;

    KlaShape s = { .B = q->shape[0], .T = q->shape[1], .H = q->shape[2], .K = q->shape[3],
                   .HV = v->shape[2], .V = v->shape[3] };
    s.N = cu->data ? cu->numel - 1 : s.B;
    int64_t nq = s.B * s.T * s.H * s.K, nv = s.B * s.T * s.HV * s.V, ng = s.B * s.T * s.HV;
    int64_t nst = s.N * s.HV * s.K * s.V;

    /* outputs, float32 as a kernel would write them */
    static const char *const out_names[] = { "o", "ht", "dq", "dk", "dv", "dg", "deta", "dh0" };
    int64_t out_n[8] = { nv, nst, nq, nq, nv, ng, ng, nst };
    float *out[8];
    for (int i = 0; i < 8; i++) out[i] = calloc((size_t)out_n[i] + 1, sizeof(float));

    KlaTensors t;
    memset(&t, 0, sizeof t);
    t.q = in_of(&in[0]);
    t.k = in_of(&in[1]);
    t.v = in_of(&in[2]);
    if (in[3].data) t.g = in_of(&in[3]);
    if (in[4].data) t.eta = in_of(&in[4]);
    if (in[5].data) t.beta = in_of(&in[5]);
    if (in[6].data) t.h0 = in_of(&in[6]);
    if (cu->data) t.cu_seqlens = in_of(cu);
    t.dout = in_of(&in[8]);
    if (in[9].data) t.dht = in_of(&in[9]);
    t.o = KLA_F32_OUT(out[0]);
    t.ht = KLA_F32_OUT(out[1]);
    t.dq = KLA_F32_OUT(out[2]);
    t.dk = KLA_F32_OUT(out[3]);
    t.dv = KLA_F32_OUT(out[4]);
    t.dg = KLA_F32_OUT(out[5]);
    if (opt.mode == KLA_MODE_KLA) t.deta = KLA_F32_OUT(out[6]);
    else t.dbeta = KLA_F32_OUT(out[6]);
    if (in[6].data) t.dh0 = KLA_F32_OUT(out[7]);

    int failed = 0, passed = 0;
    if (run_kernel(backend, &s, &opt, &t) < 0) {
        failed = 1;
    } else {
        for (int i = 0; i < 8; i++) {
            const char *name = i == 6 && opt.mode == KLA_MODE_GDN ? "dbeta" : out_names[i];
            Tensor ref;
            if (get_tensor(&f, name, &ref) < 0 || !ref.data) continue;
            if (strcmp(ref.dtype, "F64") != 0 || ref.numel != out_n[i]) {
                printf("%-6s FAIL  expected an F64 tensor of %lld elements\n", name,
                       (long long)out_n[i]);
                failed++;
            } else if (compare(name, &ref, out[i], tol_for(&f, name))) {
                passed++;
            } else {
                failed++;
            }
            free(ref.data);
        }
        printf("validate %s (backend %s): %d passed, %d failed\n", argv[1], backend, passed,
               failed);
    }
    for (int i = 0; i < 8; i++) free(out[i]);
    for (int i = 0; i < 10; i++) free(in[i].data);
    free(f.buf);
    free(f.header);
    return failed || !passed ? 1 : 0;
}
