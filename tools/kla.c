/*
 * kla: command-line front end of libkla.
 *   kla forward|backward|decode [options] IN -o OUT   run the operator on a safetensors file
 *   kla verify GOT --against REF                     compare outputs (kla-spec.md section 5)
 *   kla info                                         version, backends, CPU features
 *   kla golden generate|check                        golden vectors (golden.c)
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "golden.h"
#include "kla.h"
#include "safetensors.h"
#include "bench.h"
#include "verify.h"

enum { CMD_FORWARD, CMD_BACKWARD, CMD_DECODE, CMD_VERIFY, CMD_INFO };

static const char *const cmd_names[] = { "forward", "backward", "decode", "verify", "info" };

static const char *const usage_text[] = {
    /* forward */
    "usage: kla forward [--backend B] [--algo auto|recurrent|chunk] [--chunk-size N]\n"
    "                   [--threads N] IN -o OUT\n"
    "Runs the operator on the inputs of IN (q k v [g] eta|beta [h0] [cu_seqlens], options in\n"
    "__metadata__) and writes o and ht to OUT (F64 with --backend ref64, else F32).\n"
    "  --backend B      ref, ref64, ... (default: the library's choice)\n"
    "  --algo A         auto (default), recurrent or chunk\n"
    "  --chunk-size N   16, 32, 64 (default) or 128\n"
    "  --threads N      worker threads, 0 = all cores (default)\n"
    "  --cpu MASK       CPU levels allowed: 1 AVX2+FMA, 2 AVX-512, 4 NEON, 0 plain C\n"
    "  -o, --output OUT output file, written only when the computation succeeded\n",
    /* backward */
    "usage: kla backward [--backend B] [--algo auto|recurrent|chunk] [--chunk-size N]\n"
    "                    [--threads N] IN -o OUT\n"
    "IN holds the forward inputs plus do and optionally dht; OUT gets o, ht and the\n"
    "gradients dq dk dv dg deta|dbeta (and dh0 when IN has h0).\n"
    "  --backend B      ref, ref64, ... (default: the library's choice)\n"
    "  --algo A         auto (default), recurrent or chunk\n"
    "  --chunk-size N   16, 32, 64 (default) or 128\n"
    "  --threads N      worker threads, 0 = all cores (default)\n"
    "  --cpu MASK       CPU levels allowed: 1 AVX2+FMA, 2 AVX-512, 4 NEON, 0 plain C\n"
    "  -o, --output OUT output file\n",
    /* decode */
    "usage: kla decode [--backend B] [--threads N] IN -o OUT\n"
    "Feeds the tokens of IN one at a time through kla_decode (state starting from h0 or\n"
    "zeros, cu_seqlens packing supported) and writes o and ht to OUT; the result should\n"
    "equal kla forward.\n"
    "  --backend B      ref, ref64, ... (default: the library's choice)\n"
    "  --threads N      worker threads, 0 = all cores (default)\n"
    "  --cpu MASK       CPU levels allowed: 1 AVX2+FMA, 2 AVX-512, 4 NEON, 0 plain C\n"
    "  -o, --output OUT output file\n",
    /* verify */
    "usage: kla verify GOT --against REF [--tol X] [--tensors a,b,..]\n"
    "Compares the output tensors of REF (o ht dq dk dv dg deta dbeta dh0, or every tensor\n"
    "when it has none of them) with GOT: rel_rmse = rms(ref - got) / rms(ref) <= tol,\n"
    "every element within max(tol, 1e-4) * (|ref| + rms(ref)), no NaN/Inf where REF is\n"
    "finite. Exit 0 if all pass, 1 otherwise.\n"
    "  --against REF    reference file\n"
    "  --tol X          tolerance for every tensor; default: REF's own set (tol_float32 in\n"
    "                   its metadata, as golden cases have), else 1e-5 for o, ht and 1e-4\n"
    "                   for gradients. --tol bf16 (or float32) picks REF's tol_bf16 set\n"
    "  --tensors LIST   compare only these tensors\n",
    /* info */
    ("usage: kla info\n"
     "Prints the library version, the backends (built, usable), CPU features and cores.\n"),
};

static void usage_main(FILE *f)
{
    fprintf(f,
            "usage: kla COMMAND [options]\n"
            "commands:\n"
            "  forward    run the operator on a safetensors file\n"
            "  backward   gradients of sum(do*o) + sum(dht*ht)\n"
            "  decode     token-by-token decoding (equals forward)\n"
            "  verify     compare two safetensors files\n"
            "  info       version, backends, CPU features\n"
            "  golden     generate or check the golden vectors (kla golden --help)\n"
            "  bench      throughput of forward, backward, decode (kla bench --help)\n"
            "  help [COMMAND], --help, --version\n"
            "'kla COMMAND --help' describes a command.\n");
}

static int usage_error(int cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "kla %s: ", cmd_names[cmd]);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n%s", usage_text[cmd]);
    return 2;
}

/* "kla: PATH: message" on stderr. */
static void ferr(const char *path, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "kla: %s: ", path);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* ---- options ------------------------------------------------------------------------ */

typedef struct Cli {
    int cmd;
    const char *backend;
    KlaAlgo algo;
    const char *algo_name;
    int chunk_size, chunk_set;
    int threads;
    unsigned cpu_mask; /* --cpu: allowed CPU levels (KLA_CPU_*), default all */
    const char *in, *out;
    const char *against, *tensors;
    double tol;
    const char *tol_set;
} Cli;

static int parse_int(const char *s, int lo, int hi, int *v)
{
    char *end;
    errno = 0;
    long x = strtol(s, &end, 10);
    if (errno || end == s || *end || x < lo || x > hi) return -1;
    *v = (int)x;
    return 0;
}

/* Returns -1 to go on, else the exit code. */
static int parse_args(Cli *c, int argc, char **argv)
{
    int cmd = c->cmd, run = cmd == CMD_FORWARD || cmd == CMD_BACKWARD;
    int npos = 0;
    const char *pos[2] = { NULL, NULL };
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(usage_text[cmd], stdout);
            return 0;
        }
        if (strcmp(a, "--") == 0) {
            for (i++; i < argc; i++) {
                if (npos >= 1) return usage_error(cmd, "unexpected argument '%s'", argv[i]);
                pos[npos++] = argv[i];
            }
            break;
        }
        if (a[0] != '-' || a[1] == '\0') {
            if (npos >= 1) return usage_error(cmd, "unexpected argument '%s'", a);
            pos[npos++] = a;
            continue;
        }
        /* an option: --name[=value] or -o [value] */
        char name[32];
        const char *val = NULL;
        if (a[1] == '-') {
            const char *eq = strchr(a, '=');
            size_t len = eq ? (size_t)(eq - a) : strlen(a);
            if (len >= sizeof name) return usage_error(cmd, "unknown option '%s'", a);
            memcpy(name, a, len);
            name[len] = '\0';
            if (eq) val = eq + 1;
        } else if (a[1] == 'o') {
            strcpy(name, "-o");
            if (a[2]) val = a + 2;
        } else {
            return usage_error(cmd, "unknown option '%s'", a);
        }
        int known = (run && (strcmp(name, "--algo") == 0 || strcmp(name, "--chunk-size") == 0)) ||
                    ((run || cmd == CMD_DECODE) &&
                     (strcmp(name, "--backend") == 0 || strcmp(name, "--threads") == 0 ||
                      strcmp(name, "--cpu") == 0 ||
                      strcmp(name, "-o") == 0 || strcmp(name, "--output") == 0)) ||
                    (cmd == CMD_VERIFY &&
                     (strcmp(name, "--against") == 0 || strcmp(name, "--tol") == 0 ||
                      strcmp(name, "--tensors") == 0));
        if (!known) return usage_error(cmd, "unknown option '%s'", name);
        if (!val) {
            if (i + 1 >= argc) return usage_error(cmd, "option '%s' needs a value", name);
            val = argv[++i];
        }
        if (strcmp(name, "--backend") == 0) {
            if (!*val) return usage_error(cmd, "empty backend name");
            c->backend = val;
        } else if (strcmp(name, "--algo") == 0) {
            if (strcmp(val, "auto") == 0) c->algo = KLA_ALGO_AUTO;
            else if (strcmp(val, "recurrent") == 0) c->algo = KLA_ALGO_RECURRENT;
            else if (strcmp(val, "chunk") == 0) c->algo = KLA_ALGO_CHUNK;
            else return usage_error(cmd, "--algo '%s': expected auto, recurrent or chunk", val);
            c->algo_name = val;
        } else if (strcmp(name, "--chunk-size") == 0) {
            if (parse_int(val, 1, 1 << 20, &c->chunk_size) < 0)
                return usage_error(cmd, "--chunk-size '%s': expected a positive integer", val);
            c->chunk_set = 1;
        } else if (strcmp(name, "--threads") == 0) {
            if (parse_int(val, 0, 1 << 16, &c->threads) < 0)
                return usage_error(cmd, "--threads '%s': expected an integer >= 0", val);
        } else if (strcmp(name, "--cpu") == 0) {
            char *end;
            errno = 0;
            unsigned long m = strtoul(val, &end, 0);
            if (errno || end == val || *end || m > 0xffffffffu)
                return usage_error(cmd, "--cpu '%s': expected a mask (1 AVX2, 2 AVX-512, 4 NEON, 0 plain C)", val);
            c->cpu_mask = (unsigned)m;
        } else if (strcmp(name, "-o") == 0 || strcmp(name, "--output") == 0) {
            if (!*val) return usage_error(cmd, "empty output path");
            c->out = val;
        } else if (strcmp(name, "--against") == 0) {
            c->against = val;
        } else if (strcmp(name, "--tol") == 0 &&
                   (strcmp(val, "bf16") == 0 || strcmp(val, "float32") == 0)) {
            c->tol_set = val;
        } else if (strcmp(name, "--tol") == 0) {
            char *end;
            double x = strtod(val, &end);
            if (end == val || *end || !isfinite(x) || x < 0)
                return usage_error(cmd, "--tol '%s': expected a number >= 0", val);
            c->tol = x;
        } else if (strcmp(name, "--tensors") == 0) {
            c->tensors = val;
        }
    }
    if (cmd == CMD_INFO) {
        if (npos) return usage_error(cmd, "unexpected argument '%s'", pos[0]);
        return -1;
    }
    if (npos == 0) return usage_error(cmd, cmd == CMD_VERIFY ? "missing GOT" : "missing IN");
    c->in = pos[0];
    if (cmd == CMD_VERIFY) {
        if (!c->against) return usage_error(cmd, "missing --against REF");
    } else if (!c->out) {
        return usage_error(cmd, "missing -o OUT");
    }
    return -1;
}

/* ---- reading the input file --------------------------------------------------------- */

typedef struct Problem {
    const char *path;
    st_file f;
    KlaShape s;
    KlaOptions opt;
    const st_tensor *q, *k, *v, *g, *eta, *beta, *h0, *cu, *dout, *dht;
    int64_t hshape[4]; /* h0 / ht shape */
} Problem;

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t len;
    snprintf(buf, n, "[");
    for (int d = 0; d < ndim; d++) {
        len = strlen(buf);
        snprintf(buf + len, n - len, "%s%lld", d ? ", " : "", (long long)shape[d]);
    }
    len = strlen(buf);
    snprintf(buf + len, n - len, "]");
}

static int same_shape(const st_tensor *t, int ndim, const int64_t *shape)
{
    if (t->ndim != ndim) return 0;
    for (int d = 0; d < ndim; d++)
        if (t->shape[d] != shape[d]) return 0;
    return 1;
}

static int check_real(const Problem *p, const st_tensor *t)
{
    if (t->dtype == ST_F32 || t->dtype == ST_F64) return 0;
    ferr(p->path, "tensor \"%s\": dtype %s, expected F32 or F64", t->name,
         st_dtype_name(t->dtype));
    return -1;
}

/* t must be real with the given shape; dims names the dimensions, e.g. "[B, T, HV]". */
static int check_tensor(const Problem *p, const st_tensor *t, int ndim, const int64_t *shape,
                        const char *dims)
{
    if (!t) return 0;
    if (check_real(p, t) < 0) return -1;
    if (same_shape(t, ndim, shape)) return 0;
    char a[160], b[160];
    shape_str(a, sizeof a, t->ndim, t->shape);
    shape_str(b, sizeof b, ndim, shape);
    ferr(p->path, "tensor \"%s\": shape %s, expected %s = %s", t->name, a, dims, b);
    return -1;
}

static int meta_bool(const Problem *p, const char *key, int *v)
{
    const char *s = st_meta(&p->f, key);
    if (!s) return 0;
    if (strcmp(s, "true") == 0) *v = 1;
    else if (strcmp(s, "false") == 0) *v = 0;
    else {
        ferr(p->path, "metadata \"%s\": \"%s\", expected true or false", key, s);
        return -1;
    }
    return 0;
}

static int meta_num(const Problem *p, const char *key, double *v)
{
    const char *s = st_meta(&p->f, key);
    if (!s) return 0;
    char *end;
    double x = strtod(s, &end);
    while (end != s && (*end == ' ' || *end == '\t')) end++;
    if (end == s || *end || !isfinite(x)) {
        ferr(p->path, "metadata \"%s\": \"%s\" is not a number", key, s);
        return -1;
    }
    *v = x;
    return 0;
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

static int load(Problem *p, const char *path, int cmd)
{
    char err[512], a[160], b[160];
    memset(p, 0, sizeof *p);
    p->path = path;
    if (st_read(path, &p->f, err, sizeof err) < 0) {
        fprintf(stderr, "kla: %s\n", err);
        return -1;
    }
    const st_file *f = &p->f;
    p->q = st_find(f, "q");
    p->k = st_find(f, "k");
    p->v = st_find(f, "v");
    p->g = st_find(f, "g");
    p->eta = st_find(f, "eta");
    p->beta = st_find(f, "beta");
    p->h0 = st_find(f, "h0");
    p->cu = st_find(f, "cu_seqlens");
    if (cmd == CMD_BACKWARD) {
        p->dout = st_find(f, "do");
        p->dht = st_find(f, "dht");
    }
    static const char *const req[] = { "q", "k", "v" };
    const st_tensor *rt[] = { p->q, p->k, p->v };
    for (int i = 0; i < 3; i++)
        if (!rt[i]) {
            ferr(path, "missing tensor \"%s\"", req[i]);
            return -1;
        }

    /* options */
    KlaOptions *o = &p->opt;
    kla_default_options(o);
    const char *mode = st_meta(f, "mode");
    if (mode && strcmp(mode, "kla") == 0) o->mode = KLA_MODE_KLA;
    else if (mode && strcmp(mode, "gdn") == 0) o->mode = KLA_MODE_GDN;
    else if (mode) {
        ferr(path, "metadata \"mode\": \"%s\", expected kla or gdn", mode);
        return -1;
    }
    if (p->eta && p->beta) {
        ferr(path, "tensors \"eta\" and \"beta\" are both present (exactly one is allowed)");
        return -1;
    }
    if (!mode) {
        if (!p->eta && !p->beta) {
            ferr(path, "missing tensor \"eta\" (mode kla) or \"beta\" (mode gdn)");
            return -1;
        }
        o->mode = p->eta ? KLA_MODE_KLA : KLA_MODE_GDN;
    } else if (o->mode == KLA_MODE_KLA && !p->eta) {
        ferr(path, "missing tensor \"eta\" (mode kla)");
        return -1;
    } else if (o->mode == KLA_MODE_GDN && !p->beta) {
        ferr(path, "missing tensor \"beta\" (mode gdn)");
        return -1;
    }
    if (meta_num(p, "scale", &o->scale) < 0 || meta_num(p, "eps", &o->eps) < 0 ||
        meta_bool(p, "l2norm_q", &o->l2norm_q) < 0 || meta_bool(p, "l2norm_k", &o->l2norm_k) < 0)
        return -1;
    const char *lay = st_meta(f, "state_layout");
    if (lay && strcmp(lay, "kv") == 0) o->state_layout = KLA_LAYOUT_KV;
    else if (lay && strcmp(lay, "vk") == 0) o->state_layout = KLA_LAYOUT_VK;
    else if (lay) {
        ferr(path, "metadata \"state_layout\": \"%s\", expected kv or vk", lay);
        return -1;
    }

    /* shapes */
    if (check_real(p, p->q) < 0) return -1;
    if (p->q->ndim != 4) {
        shape_str(a, sizeof a, p->q->ndim, p->q->shape);
        ferr(path, "tensor \"q\": shape %s, expected 4 dimensions [B, T, H, K]", a);
        return -1;
    }
    KlaShape *s = &p->s;
    s->B = p->q->shape[0];
    s->T = p->q->shape[1];
    s->H = p->q->shape[2];
    s->K = p->q->shape[3];
    if (s->B < 1 || s->T < 1 || s->H < 1 || s->K < 1) {
        shape_str(a, sizeof a, 4, p->q->shape);
        ferr(path, "tensor \"q\": shape %s, B, T, H and K must be at least 1", a);
        return -1;
    }
    if (check_real(p, p->k) < 0) return -1;
    if (!same_shape(p->k, 4, p->q->shape)) {
        shape_str(a, sizeof a, p->k->ndim, p->k->shape);
        shape_str(b, sizeof b, 4, p->q->shape);
        ferr(path, "tensor \"k\": shape %s does not match q %s (must be equal)", a, b);
        return -1;
    }
    if (check_real(p, p->v) < 0) return -1;
    if (p->v->ndim != 4 || p->v->shape[0] != s->B || p->v->shape[1] != s->T) {
        shape_str(a, sizeof a, p->v->ndim, p->v->shape);
        shape_str(b, sizeof b, 4, p->q->shape);
        ferr(path, "tensor \"v\": shape %s does not match q %s (%s)", a, b,
             p->v->ndim != 4 ? "expected [B, T, HV, V]" : "B, T must agree");
        return -1;
    }
    s->HV = p->v->shape[2];
    s->V = p->v->shape[3];
    if (s->HV < 1 || s->V < 1) {
        shape_str(a, sizeof a, 4, p->v->shape);
        ferr(path, "tensor \"v\": shape %s, HV and V must be at least 1", a);
        return -1;
    }
    if (s->HV % s->H) {
        ferr(path, "tensor \"v\": HV = %lld is not a multiple of H = %lld (the heads of q)",
             (long long)s->HV, (long long)s->H);
        return -1;
    }
    int64_t btv[3] = { s->B, s->T, s->HV };
    if (check_tensor(p, p->g, 3, btv, "[B, T, HV]") < 0 ||
        check_tensor(p, p->eta, 3, btv, "[B, T, HV]") < 0 ||
        check_tensor(p, p->beta, 3, btv, "[B, T, HV]") < 0)
        return -1;

    s->N = s->B;
    if (p->cu) {
        const st_tensor *cu = p->cu;
        if (cu->dtype != ST_I32 && cu->dtype != ST_I64) {
            ferr(path, "tensor \"cu_seqlens\": dtype %s, expected I32 or I64",
                 st_dtype_name(cu->dtype));
            return -1;
        }
        if (cu->ndim != 1 || cu->numel < 2) {
            shape_str(a, sizeof a, cu->ndim, cu->shape);
            ferr(path, "tensor \"cu_seqlens\": shape %s, expected [N + 1] with N >= 1", a);
            return -1;
        }
        if (s->B != 1) {
            ferr(path, "tensor \"cu_seqlens\": packing requires B = 1, q has B = %lld",
                 (long long)s->B);
            return -1;
        }
        s->N = cu->numel - 1;
    }
    int vk = o->state_layout == KLA_LAYOUT_VK;
    p->hshape[0] = s->N;
    p->hshape[1] = s->HV;
    p->hshape[2] = vk ? s->V : s->K;
    p->hshape[3] = vk ? s->K : s->V;
    const char *hdims = vk ? "[N, HV, V, K]" : "[N, HV, K, V]";
    if (check_tensor(p, p->h0, 4, p->hshape, hdims) < 0) return -1;
    if (cmd == CMD_BACKWARD) {
        if (!p->dout) {
            ferr(path, "missing tensor \"do\" (the gradient of o, needed by backward)");
            return -1;
        }
        if (check_tensor(p, p->dout, 4, p->v->shape, "[B, T, HV, V]") < 0 ||
            check_tensor(p, p->dht, 4, p->hshape, hdims) < 0)
            return -1;
    }
    return 0;
}

/* The library must not take a present zero-size tensor for an absent one. */
static const double empty_data[1];

static KlaDtype kla_dtype(st_dtype d)
{
    switch (d) {
    case ST_F64: return KLA_F64;
    case ST_I32: return KLA_I32;
    case ST_I64: return KLA_I64;
    default: return KLA_F32;
    }
}

static KlaIn in_of(const st_tensor *t)
{
    KlaIn r = { NULL, KLA_F32 };
    if (t) {
        r.data = t->data ? t->data : (const void *)empty_data;
        r.dtype = kla_dtype(t->dtype);
    }
    return r;
}

/* ---- outputs ------------------------------------------------------------------------ */

#define MAX_OUT 10

typedef struct Outputs {
    st_tensor t[MAX_OUT];
    int n;
    st_dtype dtype;
} Outputs;

/* Adds a zeroed output tensor; NULL (and a message) when too large. */
static void *add_out(Outputs *o, const char *name, int ndim, const int64_t *shape)
{
    st_tensor *t = &o->t[o->n];
    memset(t, 0, sizeof *t);
    t->name = (char *)name;
    t->dtype = o->dtype;
    t->ndim = ndim;
    size_t es = st_dtype_size(o->dtype), bytes = es;
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        t->shape[d] = shape[d];
        if (shape[d] < 0 || (shape[d] > 0 && (uint64_t)bytes > SIZE_MAX / (uint64_t)shape[d])) {
            fprintf(stderr, "kla: output \"%s\" is too large\n", name);
            return NULL;
        }
        bytes *= (size_t)shape[d];
        numel *= shape[d];
    }
    t->numel = numel;
    t->nbytes = bytes;
    t->data = calloc(bytes ? bytes : 1, 1);
    if (!t->data) {
        fprintf(stderr, "kla: out of memory for output \"%s\" (%zu bytes)\n", name, bytes);
        return NULL;
    }
    o->n++;
    return t->data;
}

static void free_outs(Outputs *o)
{
    for (int i = 0; i < o->n; i++) free(o->t[i].data);
    o->n = 0;
}

static KlaOut out_of(const Outputs *o, void *data)
{
    KlaOut r = { data, o->dtype == ST_F64 ? KLA_F64 : KLA_F32 };
    return r;
}

static int write_outs(const Cli *c, const Problem *p, const Outputs *o, const char *backend)
{
    static const char *const copy[] = { "scale", "eps", "l2norm_q", "l2norm_k", "state_layout" };
    const char *keys[8], *vals[8];
    int n = 0;
    keys[n] = "mode";
    vals[n++] = p->opt.mode == KLA_MODE_GDN ? "gdn" : "kla";
    for (int i = 0; i < 5; i++) {
        const char *v = st_meta(&p->f, copy[i]);
        if (v) {
            keys[n] = copy[i];
            vals[n++] = v;
        }
    }
    keys[n] = "backend";
    vals[n++] = backend;
    keys[n] = "algo";
    vals[n++] = c->cmd == CMD_DECODE ? "decode" : c->algo_name;
    char err[512];
    if (st_write(c->out, o->t, o->n, keys, vals, n, err, sizeof err) < 0) {
        fprintf(stderr, "kla: %s\n", err);
        return -1;
    }
    return 0;
}

/* ---- decode: token by token --------------------------------------------------------- */

static void gather_rows(void *dst, const st_tensor *t, const int64_t *rows, int64_t n,
                        size_t rowbytes)
{
    for (int64_t i = 0; i < n; i++)
        memcpy((char *)dst + (size_t)i * rowbytes,
               (const char *)t->data + (size_t)rows[i] * rowbytes, rowbytes);
}

static int run_decode(KlaContext *ctx, const Problem *p, void *o_all, void *ht, st_dtype od)
{
    const KlaShape *s = &p->s;
    int64_t N = s->N;
    size_t oes = st_dtype_size(od);
    size_t qrow = (size_t)(s->H * s->K), vrow = (size_t)(s->HV * s->V), grow = (size_t)s->HV;
    size_t srow = (size_t)(s->HV * s->K * s->V); /* elements of one state */
    const st_tensor *eb = p->eta ? p->eta : p->beta;
    int rc = -1;

    int64_t *start = calloc((size_t)N + 1, sizeof *start);
    int64_t *len = calloc((size_t)N + 1, sizeof *len);
    int64_t *rows = calloc((size_t)N + 1, sizeof *rows);
    int64_t *act = calloc((size_t)N + 1, sizeof *act);
    int64_t maxlen = 0;
    if (!start || !len || !rows || !act) goto oom;
    for (int64_t n = 0; n < N; n++) {
        if (p->cu) {
            int64_t c0 = cu_at(p->cu, n), c1 = cu_at(p->cu, n + 1);
            if (n == 0 && c0 != 0) {
                ferr(p->path, "tensor \"cu_seqlens\": cu_seqlens[0] = %lld, expected 0",
                     (long long)c0);
                goto done;
            }
            if (c1 < c0) {
                ferr(p->path, "tensor \"cu_seqlens\": cu_seqlens[%lld] = %lld is less than "
                     "cu_seqlens[%lld] = %lld (must be non-decreasing)",
                     (long long)(n + 1), (long long)c1, (long long)n, (long long)c0);
                goto done;
            }
            start[n] = c0;
            len[n] = c1 - c0;
        } else {
            start[n] = n * s->T;
            len[n] = s->T;
        }
        if (len[n] > maxlen) maxlen = len[n];
    }
    if (p->cu) {
        int64_t last = cu_at(p->cu, N);
        if (last != s->T) {
            ferr(p->path, "tensor \"cu_seqlens\": last entry cu_seqlens[%lld] = %lld, "
                 "expected T = %lld", (long long)N, (long long)last, (long long)s->T);
            goto done;
        }
    }

    /* state from h0 (converted to the output dtype) or zeros */
    for (size_t i = 0; p->h0 && i < (size_t)N * srow; i++) {
        double x = p->h0->dtype == ST_F64 ? ((const double *)p->h0->data)[i]
                                          : ((const float *)p->h0->data)[i];
        if (od == ST_F64) ((double *)ht)[i] = x;
        else ((float *)ht)[i] = (float)x;
    }

    size_t nn = (size_t)N ? (size_t)N : 1;
    size_t qes = st_dtype_size(p->q->dtype), kes = st_dtype_size(p->k->dtype);
    size_t ves = st_dtype_size(p->v->dtype), ees = st_dtype_size(eb->dtype);
    size_t ges = p->g ? st_dtype_size(p->g->dtype) : 0;
    void *bq = malloc(nn * qrow * qes), *bk = malloc(nn * qrow * kes);
    void *bv = malloc(nn * vrow * ves), *be = malloc(nn * grow * ees);
    void *bg = p->g ? malloc(nn * grow * ges) : NULL;
    void *bo = malloc(nn * vrow * oes), *bs = malloc(nn * srow * oes);
    if (!bq || !bk || !bv || !be || (p->g && !bg) || !bo || !bs) {
        free(bq); free(bk); free(bv); free(be); free(bg); free(bo); free(bs);
        goto oom;
    }

    /* While every sequence is active, the state stays in a KlaState (GPU memory on vulkan);
     * from the first step where some sequence has ended, it is copied back and the steps
     * gather the active sequences' states on the host. */
    const KlaDtype sdt = od == ST_F64 ? KLA_F64 : KLA_F32;
    KlaState *kst = NULL;
    if (N > 0 && maxlen > 0 &&
        (kla_state_new(ctx, N, s->HV, s->K, s->V, &kst) < 0 ||
         kla_state_write(kst, (KlaIn){ ht, sdt }, p->opt.state_layout) < 0)) {
        ferr(p->path, "%s", kla_error_detail(ctx));
        goto fail;
    }
    for (int64_t step = 0; step < maxlen; step++) {
        int64_t na = 0;
        for (int64_t n = 0; n < N; n++)
            if (len[n] > step) {
                act[na] = n;
                rows[na++] = start[n] + step;
            }
        int all = na == N;
        if (!all && kst) {
            if (kla_state_read(kst, (KlaOut){ ht, sdt }, p->opt.state_layout) < 0) {
                ferr(p->path, "%s", kla_error_detail(ctx));
                goto fail;
            }
            kla_state_free(&kst);
        }
        gather_rows(bq, p->q, rows, na, qrow * qes);
        gather_rows(bk, p->k, rows, na, qrow * kes);
        gather_rows(bv, p->v, rows, na, vrow * ves);
        gather_rows(be, eb, rows, na, grow * ees);
        if (p->g) gather_rows(bg, p->g, rows, na, grow * ges);
        void *state = ht;
        if (!all) {
            state = bs;
            for (int64_t i = 0; i < na; i++)
                memcpy((char *)bs + (size_t)i * srow * oes,
                       (char *)ht + (size_t)act[i] * srow * oes, srow * oes);
        }
        KlaShape ds = *s;
        ds.B = na;
        ds.T = 1;
        ds.N = na;
        KlaTensors t;
        memset(&t, 0, sizeof t);
        KlaDtype okd = od == ST_F64 ? KLA_F64 : KLA_F32;
        t.q = (KlaIn){ bq, kla_dtype(p->q->dtype) };
        t.k = (KlaIn){ bk, kla_dtype(p->k->dtype) };
        t.v = (KlaIn){ bv, kla_dtype(p->v->dtype) };
        if (p->g) t.g = (KlaIn){ bg, kla_dtype(p->g->dtype) };
        if (p->eta) t.eta = (KlaIn){ be, kla_dtype(eb->dtype) };
        else t.beta = (KlaIn){ be, kla_dtype(eb->dtype) };
        t.o = (KlaOut){ bo, okd };
        if (!kst) t.state = (KlaOut){ state, okd };
        int r = kst ? kla_decode_state(ctx, &ds, &p->opt, &t, kst) : kla_decode(ctx, &ds, &p->opt, &t);
        if (r < 0) {
            ferr(p->path, "%s (decode step %lld)", kla_error_detail(ctx), (long long)step);
            goto fail;
        }
        for (int64_t i = 0; i < na; i++) {
            memcpy((char *)o_all + (size_t)rows[i] * vrow * oes,
                   (char *)bo + (size_t)i * vrow * oes, vrow * oes);
            if (!all)
                memcpy((char *)ht + (size_t)act[i] * srow * oes,
                       (char *)bs + (size_t)i * srow * oes, srow * oes);
        }
    }
    if (kst && kla_state_read(kst, (KlaOut){ ht, sdt }, p->opt.state_layout) < 0) {
        ferr(p->path, "%s", kla_error_detail(ctx));
        goto fail;
    }
    rc = 0;
fail:
    kla_state_free(&kst);
    free(bq); free(bk); free(bv); free(be); free(bg); free(bo); free(bs);
    goto done;
oom:
    fprintf(stderr, "kla: out of memory\n");
done:
    free(start);
    free(len);
    free(rows);
    free(act);
    return rc;
}

/* ---- forward / backward / decode ---------------------------------------------------- */

static int same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

static int cmd_run(const Cli *c)
{
    Problem p;
    Outputs o;
    KlaContext *ctx = NULL;
    int rc = 1;
    memset(&o, 0, sizeof o);
    if (same_file(c->in, c->out)) {
        fprintf(stderr, "kla: %s: the output would replace the input\n", c->out);
        return 1;
    }
    if (load(&p, c->in, c->cmd) < 0) goto done;

    KlaParams par;
    kla_default_params(&par);
    par.backend = c->backend;
    par.threads = c->threads;
    par.cpu_mask = c->cpu_mask;
    int r = kla_open(&ctx, &par);
    if (r < 0) {
        fprintf(stderr, "kla: %s\n", kla_error_detail(NULL));
        goto done;
    }
    const char *bname = kla_backend_name(ctx);
    o.dtype = strcmp(bname, "ref64") == 0 ? ST_F64 : ST_F32;
    p.opt.algo = c->algo;
    if (c->chunk_set) p.opt.chunk_size = c->chunk_size;

    const KlaShape *s = &p.s;
    KlaTensors t;
    memset(&t, 0, sizeof t);
    t.q = in_of(p.q);
    t.k = in_of(p.k);
    t.v = in_of(p.v);
    t.g = in_of(p.g);
    t.eta = in_of(p.eta);
    t.beta = in_of(p.beta);
    t.h0 = in_of(p.h0);
    t.cu_seqlens = in_of(p.cu);
    t.dout = in_of(p.dout);
    t.dht = in_of(p.dht);
    void *ob = add_out(&o, "o", 4, p.v->shape);
    void *hb = ob ? add_out(&o, "ht", 4, p.hshape) : NULL;
    if (!hb) goto done;
    t.o = out_of(&o, ob);
    t.ht = out_of(&o, hb);

    if (c->cmd == CMD_DECODE) {
        if (run_decode(ctx, &p, ob, hb, o.dtype) < 0) goto done;
    } else if (c->cmd == CMD_FORWARD) {
        r = kla_forward(ctx, s, &p.opt, &t);
        if (r < 0) {
            ferr(c->in, "%s", kla_error_detail(ctx));
            goto done;
        }
    } else {
        int64_t btv[3] = { s->B, s->T, s->HV };
        void *dq = add_out(&o, "dq", 4, p.q->shape);
        void *dk = dq ? add_out(&o, "dk", 4, p.k->shape) : NULL;
        void *dv = dk ? add_out(&o, "dv", 4, p.v->shape) : NULL;
        void *dg = dv ? add_out(&o, "dg", 3, btv) : NULL;
        void *de = dg ? add_out(&o, p.eta ? "deta" : "dbeta", 3, btv) : NULL;
        void *dh = de && p.h0 ? add_out(&o, "dh0", 4, p.hshape) : NULL;
        if (!de || (p.h0 && !dh)) goto done;
        t.dq = out_of(&o, dq);
        t.dk = out_of(&o, dk);
        t.dv = out_of(&o, dv);
        t.dg = out_of(&o, dg);
        if (p.eta) t.deta = out_of(&o, de);
        else t.dbeta = out_of(&o, de);
        if (dh) t.dh0 = out_of(&o, dh);
        r = kla_backward(ctx, s, &p.opt, &t);
        if (r < 0) {
            ferr(c->in, "%s", kla_error_detail(ctx));
            goto done;
        }
    }
    if (write_outs(c, &p, &o, bname) < 0) goto done;
    rc = 0;
done:
    free_outs(&o);
    kla_close(&ctx);
    st_free(&p.f);
    return rc;
}

/* ---- verify, info ------------------------------------------------------------------- */

static int cmd_verify(const Cli *c)
{
    st_file got, ref;
    char err[512];
    memset(&got, 0, sizeof got);
    memset(&ref, 0, sizeof ref);
    if (st_read(c->in, &got, err, sizeof err) < 0) {
        fprintf(stderr, "kla: %s\n", err);
        return 1;
    }
    if (st_read(c->against, &ref, err, sizeof err) < 0) {
        fprintf(stderr, "kla: %s\n", err);
        st_free(&got);
        return 1;
    }
    VerifyOptions vo = { c->tol, c->tensors, c->tol_set };
    int failed = verify_files(stdout, &got, &ref, &vo);
    st_free(&got);
    st_free(&ref);
    return failed ? 1 : 0;
}

static int cmd_info(void)
{
    static const char *const known[] = { "ref", "ref64", "simd", "vulkan", NULL };
    const char *const *list = kla_backend_list();
    printf("kla %s\n", kla_version());
    printf("backends:\n");
    for (int i = 0; list && list[i]; i++) {
        int a = kla_backend_available(list[i]);
        printf("  %-8s built, %s\n", list[i],
               a == 1 ? "usable" : a == 0 ? "not usable here" : kla_strerror(a));
    }
    for (int i = 0; known[i]; i++) {
        int listed = 0;
        for (int j = 0; list && list[j]; j++)
            if (strcmp(list[j], known[i]) == 0) listed = 1;
        if (!listed) printf("  %-8s not built\n", known[i]);
    }
    unsigned fl = kla_cpu_flags();
    printf("cpu features:%s%s%s%s\n", fl & KLA_CPU_AVX2 ? " avx2" : "",
           fl & KLA_CPU_AVX512 ? " avx512" : "", fl & KLA_CPU_NEON ? " neon" : "",
           fl & (KLA_CPU_AVX2 | KLA_CPU_AVX512 | KLA_CPU_NEON) ? "" : " none");
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    printf("cores: %ld\n", cores);
    char vkdev[2048]; /* "index: name (type)" lines; the index is KlaParams.gpu_device */
    int nvk = kla_vulkan_devices(vkdev, sizeof vkdev);
    if (nvk != KLA_ENOSYS) printf("vulkan devices:%s\n", nvk > 0 ? "" : " none usable");
    for (char *s = vkdev, *e; nvk > 0 && (e = strchr(s, '\n')); s = e + 1)
        printf("  %.*s\n", (int)(e - s), s);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage_main(stderr);
        return 2;
    }
    const char *a = argv[1];
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
        usage_main(stdout);
        return 0;
    }
    if (strcmp(a, "--version") == 0) {
        printf("kla %s\n", kla_version());
        return 0;
    }
    if (strcmp(a, "golden") == 0) return golden_main(argc - 1, argv + 1);
    if (strcmp(a, "bench") == 0) return kla_bench_main(argc - 1, argv + 1);
    if (strcmp(a, "help") == 0) {
        if (argc >= 3 && strcmp(argv[2], "golden") == 0) {
            char *h[] = { argv[2], (char *)"--help", NULL };
            return golden_main(2, h);
        }
        if (argc < 3) {
            usage_main(stdout);
            return 0;
        }
        for (int i = 0; i < 5; i++)
            if (strcmp(argv[2], cmd_names[i]) == 0) {
                fputs(usage_text[i], stdout);
                return 0;
            }
        fprintf(stderr, "kla: unknown command '%s'\n", argv[2]);
        usage_main(stderr);
        return 2;
    }
    Cli c;
    memset(&c, 0, sizeof c);
    c.cmd = -1;
    for (int i = 0; i < 5; i++)
        if (strcmp(a, cmd_names[i]) == 0) c.cmd = i;
    if (c.cmd < 0) {
        fprintf(stderr, "kla: unknown command '%s'\n", a);
        usage_main(stderr);
        return 2;
    }
    c.algo = KLA_ALGO_AUTO;
    c.algo_name = "auto";
    c.cpu_mask = KLA_CPU_ALL;
    c.tol = -1;
    int r = parse_args(&c, argc, argv);
    if (r >= 0) return r;
    switch (c.cmd) {
    case CMD_VERIFY: return cmd_verify(&c);
    case CMD_INFO: return cmd_info();
    default: return cmd_run(&c);
    }
}
