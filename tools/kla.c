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
#include "half.h"
#include "kla.h"
#include "safetensors.h"
#include "bench.h"
#include "train.h"
#include "verify.h"

enum { CMD_FORWARD, CMD_BACKWARD, CMD_DECODE, CMD_VERIFY, CMD_INFO };

static const char *const cmd_names[] = { "forward", "backward", "decode", "verify", "info" };

static const char *const usage_text[] = {
    /* forward */
    "usage: kla forward [--backend B] [--algo auto|recurrent|chunk] [--chunk-size N]\n"
    "                   [--threads N] IN -o OUT\n"
    "Runs the operator on the inputs of IN (q k v [g] eta|beta [h0] [cu_seqlens], options in\n"
    "__metadata__) and writes o and ht to OUT (F64 with --backend ref64, else F32).\n"
    "The family (kla-spec.md section 7): g [B, T, HV, K] runs KDA's per-channel decay;\n"
    "beta_atk [g_atk] [log_atk_scale] [a0] run the ATK preconditioner (PDN, PGDN, PKDA;\n"
    "in mode kla the step eta / (k^T kw + eps)) and add at to OUT. Metadata gate, precond,\n"
    "squash_x, squash_eps; `kla info` says which backends run which variant.\n"
    "  --backend B      ref, ref64, ... (default: the library's choice)\n"
    "  --algo A         auto (default), recurrent or chunk\n"
    "  --chunk-size N   16, 32, 64 (default) or 128\n"
    "  --threads N      worker threads, 0 = all cores (default)\n"
    "  --cpu MASK       CPU levels allowed: 1 AVX2+FMA, 2 AVX-512, 4 NEON, 0 plain C, or\n"
    "                   names: avx2,avx512 / neon / none (also $KLA_CPU_MASK)\n"
    "  -o, --output OUT output file, written only when the computation succeeded; '-' is\n"
    "                   standard output; a symlink is followed, a device or FIFO written\n"
    "                   in place (not atomically), a regular file replaced atomically\n"
    "Unknown tensor names or metadata keys in IN are an error (kla-spec.md names only).\n",
    /* backward */
    "usage: kla backward [--backend B] [--algo auto|recurrent|chunk] [--chunk-size N]\n"
    "                    [--threads N] IN -o OUT\n"
    "IN holds the forward inputs plus do and optionally dht; OUT gets o, ht and the\n"
    "gradients dq dk dv dg deta|dbeta (and dh0 when IN has h0). With precond atk also at,\n"
    "dg_atk dbeta_atk dlog_atk_scale da0 (IN may hold dat, the gradient of at).\n"
    "  --backend B      ref, ref64, ... (default: the library's choice)\n"
    "  --algo A         auto (default), recurrent or chunk\n"
    "  --chunk-size N   16, 32, 64 (default) or 128\n"
    "  --threads N      worker threads, 0 = all cores (default)\n"
    "  --cpu MASK       CPU levels allowed: 1 AVX2+FMA, 2 AVX-512, 4 NEON, 0 plain C, or\n"
    "                   names: avx2,avx512 / neon / none (also $KLA_CPU_MASK)\n"
    "  -o, --output OUT output file ('-': standard output)\n",
    /* decode */
    "usage: kla decode [--backend B] [--threads N] IN -o OUT\n"
    "Feeds the tokens of IN one at a time through kla_decode (state starting from h0 or\n"
    "zeros, cu_seqlens packing supported) and writes o and ht to OUT; the result should\n"
    "equal kla forward. With precond atk the ATK state is carried too (from a0) and\n"
    "written as at.\n"
    "  --backend B      ref, ref64, ... (default: the library's choice)\n"
    "  --threads N      worker threads, 0 = all cores (default)\n"
    "  --cpu MASK       CPU levels allowed: 1 AVX2+FMA, 2 AVX-512, 4 NEON, 0 plain C, or\n"
    "                   names: avx2,avx512 / neon / none (also $KLA_CPU_MASK)\n"
    "  -o, --output OUT output file ('-': standard output)\n",
    /* verify */
    "usage: kla verify GOT --against REF [--tol X] [--tensors a,b,..]\n"
    "Compares the output tensors of REF (o ht dq dk dv dg deta dbeta dh0, at dg_atk\n"
    "dbeta_atk dlog_atk_scale da0, y dx loss grad.* new.*, or every tensor\n"
    "when it has none of them) with GOT: rel_rmse = rms(ref - got) / rms(ref) <= tol,\n"
    "every element within max(tol, 1e-4) * (|ref| + rms(ref)), no NaN/Inf where REF is\n"
    "finite. Exit 0 if all pass, 1 otherwise.\n"
    "  --against REF    reference file\n"
    "  --tol X          tolerance for every tensor; default: REF's own set (tol_float32 in\n"
    "                   its metadata, as golden cases have), else 1e-5 for o, ht and 1e-4\n"
    "                   for gradients. --tol bf16 (or float32) picks REF's tol_bf16 set\n"
    "  --tensors LIST   compare only these tensors\n",
    /* info */
    ("usage: kla info [--vulkan]\n"
     "Prints the library version, the backends (built, usable, and what a context of each\n"
     "runs: the CPU level in effect after --cpu/KLA_CPU_MASK, threads; with --vulkan also\n"
     "the Vulkan device a context opens), CPU features and cores. Exit 1 when a usable\n"
     "backend cannot be opened (a malformed KLA_CPU_MASK, say).\n"),
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
            "  layer      kla layer backward IN -o OUT: a KLA layer's output and gradients\n"
            "  model      kla model step IN -o OUT: one training step of the model\n"
            "  train      train a model on MQAR, the KLA authors' benchmark (kla train --help)\n"
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
    int vulkan_info; /* info --vulkan */
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
        if (cmd == CMD_INFO && strcmp(a, "--vulkan") == 0) {
            c->vulkan_info = 1;
            continue;
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
            if (kla_cpu_mask_parse(val, &c->cpu_mask) < 0)
                return usage_error(cmd, "--cpu '%s': expected a mask (1 AVX2, 2 AVX-512, 4 NEON, 0 plain C) "
                                   "or names joined by ',' (avx2, avx512, neon, none)", val);
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

/* ---- reading the input file: the library's loader (kla_file_problem) ---------------- */

typedef struct Problem {
    const char *path;
    KlaFile *f;
    KlaProblem p;
    KlaFileTensor q, v, eb, g, cu; /* eb: eta or beta */
    KlaFileTensor gatk, batk;     /* precond atk */
} Problem;

static int load(Problem *p, const char *path, int cmd)
{
    memset(p, 0, sizeof *p);
    p->path = path;
    KlaOp op = cmd == CMD_BACKWARD ? KLA_OP_BACKWARD : cmd == CMD_DECODE ? KLA_OP_DECODE : KLA_OP_FORWARD;
    if (kla_file_read(path, &p->f) < 0 || kla_file_problem(p->f, op, &p->p) < 0) {
        fprintf(stderr, "kla: %s\n", kla_error_detail(NULL));
        return -1;
    }
    kla_file_find(p->f, "q", &p->q);
    kla_file_find(p->f, "v", &p->v);
    kla_file_find(p->f, p->p.opt.mode == KLA_MODE_KLA ? "eta" : "beta", &p->eb);
    kla_file_find(p->f, "g", &p->g);
    kla_file_find(p->f, "cu_seqlens", &p->cu);
    kla_file_find(p->f, "g_atk", &p->gatk);
    kla_file_find(p->f, "beta_atk", &p->batk);
    return 0;
}

/* ---- outputs ------------------------------------------------------------------------ */

#define MAX_OUT 16

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

/* The last tensor added, as a KlaOut. */
static KlaOut last_out(const Outputs *o)
{
    const st_tensor *t = &o->t[o->n - 1];
    return KLA_OUT(t->data, o->dtype == ST_F64 ? KLA_F64 : KLA_F32, t->numel);
}

static const char *algo_name(KlaAlgo a)
{
    return a == KLA_ALGO_CHUNK ? "chunk" : a == KLA_ALGO_RECURRENT ? "recurrent" : "auto";
}

/* OUT: the outputs, with the options that ran and what ran them in __metadata__ */
static int write_outs(const Cli *c, const Problem *p, const Outputs *o, const char *backend,
                      const char *algo)
{
    static const char *const copy[] = { "scale", "eps", "l2norm_q", "l2norm_k", "state_layout", "squash_x",
                                        "squash_eps" };
    const char *keys[16], *vals[16];
    int n = 0;
    keys[n] = "mode";
    vals[n++] = p->p.opt.mode == KLA_MODE_GDN ? "gdn" : "kla";
    /* the family's variant as it ran (the file may have left it to be inferred) */
    if (p->p.opt.gate == KLA_GATE_CHANNEL) keys[n] = "gate", vals[n++] = "channel";
    if (p->p.opt.precond == KLA_PRECOND_ATK) keys[n] = "precond", vals[n++] = "atk";
    for (int i = 0; i < 7; i++) {
        const char *v = kla_file_meta(p->f, copy[i]);
        if (v) {
            keys[n] = copy[i];
            vals[n++] = v;
        }
    }
    keys[n] = "backend";
    vals[n++] = backend;
    keys[n] = "algo";
    vals[n++] = algo;
    char err[512];
    if (st_write(c->out, o->t, o->n, keys, vals, n, err, sizeof err) < 0) {
        fprintf(stderr, "kla: %s\n", err);
        return -1;
    }
    return 0;
}

/* ---- decode: token by token --------------------------------------------------------- */

/* rows[0..n) of a [rows, w] tensor into dst, as a KlaIn of n rows */
static KlaIn gather_rows(void *dst, const KlaFileTensor *t, const int64_t *rows, int64_t n, int64_t w)
{
    const KlaDtype d = t->in.dtype;
    const size_t rb = (size_t)w * (d == KLA_F64 || d == KLA_I64 ? 8 : d == KLA_F16 || d == KLA_BF16 ? 2 : 4);
    for (int64_t i = 0; i < n; i++)
        memcpy((char *)dst + (size_t)i * rb, (const char *)t->data + (size_t)rows[i] * rb, rb);
    return KLA_IN(dst, t->in.dtype, n * w);
}

/* Feeds the tokens through kla_decode / kla_decode_state. The loader checked cu_seqlens. */
static int run_decode(KlaContext *ctx, const Problem *p, void *o_all, void *ht, void *at, st_dtype od)
{
    const KlaShape *s = &p->p.shape;
    const KlaTensors *in = &p->p.t;
    const int64_t N = s->N;
    const size_t oes = st_dtype_size(od);
    const int atk = p->p.opt.precond == KLA_PRECOND_ATK;
    const int64_t qrow = s->H * s->K, vrow = s->HV * s->V, grow = s->HV, srow = s->HV * s->K * s->V;
    const int64_t gcrow = p->p.opt.gate == KLA_GATE_CHANNEL ? s->HV * s->K : s->HV; /* g */
    const int64_t hrow = s->H, arow = s->H * s->K; /* g_atk, beta_atk; the ATK state */
    const KlaDtype sdt = od == ST_F64 ? KLA_F64 : KLA_F32;
    const KlaFileTensor *k = NULL;
    KlaFileTensor kt;
    kla_file_find(p->f, "k", &kt);
    k = &kt;
    int rc = -1;

    int64_t *start = calloc((size_t)N + 1, sizeof *start), *len = calloc((size_t)N + 1, sizeof *len);
    int64_t *rows = calloc((size_t)N + 1, sizeof *rows), *act = calloc((size_t)N + 1, sizeof *act);
    int64_t maxlen = 0;
    /* scratch for one step of every sequence: 8 bytes an element covers every dtype */
    void *bq = malloc((size_t)(N * qrow) * 8), *bk = malloc((size_t)(N * qrow) * 8);
    void *bv = malloc((size_t)(N * vrow) * 8), *be = malloc((size_t)(N * grow) * 8);
    void *bg = malloc((size_t)(N * gcrow) * 8), *bo = malloc((size_t)(N * vrow) * oes);
    void *bs = malloc((size_t)(N * srow) * oes);
    void *bga = malloc((size_t)(N * hrow) * 8), *bba = malloc((size_t)(N * hrow) * 8);
    void *bas = malloc((size_t)(N * arow) * oes);
    KlaState *kst = NULL;
    if (!start || !len || !rows || !act || !bq || !bk || !bv || !be || !bg || !bo || !bs || !bga || !bba || !bas) {
        fprintf(stderr, "kla: out of memory\n");
        goto done;
    }
    for (int64_t n = 0; n < N; n++) {
        if (p->cu.data) {
            const KlaIn *cu = &p->cu.in;
            start[n] = cu->dtype == KLA_I32 ? ((const int32_t *)cu->data)[n] : ((const int64_t *)cu->data)[n];
            len[n] = (cu->dtype == KLA_I32 ? ((const int32_t *)cu->data)[n + 1]
                                           : ((const int64_t *)cu->data)[n + 1]) - start[n];
        } else {
            start[n] = n * s->T, len[n] = s->T;
        }
        if (len[n] > maxlen) maxlen = len[n];
    }

    /* the states start from h0 (converted to the output dtype) or zeros */
    for (int64_t i = 0; in->h0.data && i < N * srow; i++) {
        double x = kla__get_real(in->h0.data, in->h0.dtype, i);
        if (od == ST_F64) ((double *)ht)[i] = x;
        else ((float *)ht)[i] = (float)x;
    }
    /* the ATK states from a0 or zeros */
    for (int64_t i = 0; atk && in->a0.data && i < N * arow; i++) {
        double x = kla__get_real(in->a0.data, in->a0.dtype, i);
        if (od == ST_F64) ((double *)at)[i] = x;
        else ((float *)at)[i] = (float)x;
    }

    /* While every sequence is active, the states stay in a KlaState (GPU memory on vulkan);
     * from the first step where some sequence has ended, they are copied back and each step
     * gathers the active sequences' states on the host. */
    /* (with precond atk the KlaState holds the ATK states too) */
    if (maxlen > 0 && ((atk ? kla_state_new_atk(ctx, N, s->H, s->HV, s->K, s->V, &kst)
                            : kla_state_new(ctx, N, s->HV, s->K, s->V, &kst)) < 0 ||
                       kla_state_write(kst, KLA_IN(ht, sdt, N * srow), p->p.opt.state_layout) < 0 ||
                       (atk && kla_state_write_atk(kst, KLA_IN(at, sdt, N * arow)) < 0))) {
        ferr(p->path, "%s", kla_error_detail(ctx));
        goto done;
    }
    for (int64_t step = 0; step < maxlen; step++) {
        int64_t na = 0;
        for (int64_t n = 0; n < N; n++)
            if (len[n] > step) act[na] = n, rows[na++] = start[n] + step;
        const int all = na == N;
        if (!all && kst) {
            if (kla_state_read(kst, KLA_OUT(ht, sdt, N * srow), p->p.opt.state_layout) < 0 ||
                (atk && kla_state_read_atk(kst, KLA_OUT(at, sdt, N * arow)) < 0)) {
                ferr(p->path, "%s", kla_error_detail(ctx));
                goto done;
            }
            kla_state_free(&kst);
        }
        KlaTensors t;
        memset(&t, 0, sizeof t);
        t.q = gather_rows(bq, &p->q, rows, na, qrow);
        t.k = gather_rows(bk, k, rows, na, qrow);
        t.v = gather_rows(bv, &p->v, rows, na, vrow);
        if (p->g.data) t.g = gather_rows(bg, &p->g, rows, na, gcrow);
        if (p->gatk.data) t.g_atk = gather_rows(bga, &p->gatk, rows, na, hrow);
        if (p->batk.data) t.beta_atk = gather_rows(bba, &p->batk, rows, na, hrow);
        t.log_atk_scale = in->log_atk_scale;
        if (p->p.opt.mode == KLA_MODE_KLA) t.eta = gather_rows(be, &p->eb, rows, na, grow);
        else t.beta = gather_rows(be, &p->eb, rows, na, grow);
        t.o = KLA_OUT(bo, sdt, na * vrow);
        void *state = ht;
        if (!all) {
            state = bs;
            for (int64_t i = 0; i < na; i++)
                memcpy((char *)bs + (size_t)(i * srow) * oes, (char *)ht + (size_t)(act[i] * srow) * oes,
                       (size_t)srow * oes);
        }
        if (!kst) t.state = KLA_OUT(state, sdt, na * srow);
        void *astate = at;
        if (atk && !all) {
            astate = bas;
            for (int64_t i = 0; i < na; i++)
                memcpy((char *)bas + (size_t)(i * arow) * oes, (char *)at + (size_t)(act[i] * arow) * oes,
                       (size_t)arow * oes);
        }
        if (atk && !kst) t.astate = KLA_OUT(astate, sdt, na * arow);
        KlaShape ds = *s;
        ds.B = ds.N = na;
        ds.T = 1;
        int r = kst ? kla_decode_state(ctx, &ds, &p->p.opt, &t, kst) : kla_decode(ctx, &ds, &p->p.opt, &t);
        if (r < 0) {
            ferr(p->path, "%s (decode step %lld, token %lld of the first active sequence)", kla_error_detail(ctx),
                 (long long)step, (long long)rows[0]);
            goto done;
        }
        for (int64_t i = 0; i < na; i++) {
            memcpy((char *)o_all + (size_t)(rows[i] * vrow) * oes, (char *)bo + (size_t)(i * vrow) * oes,
                   (size_t)vrow * oes);
            if (!all)
                memcpy((char *)ht + (size_t)(act[i] * srow) * oes, (char *)bs + (size_t)(i * srow) * oes,
                       (size_t)srow * oes);
            if (!all && atk)
                memcpy((char *)at + (size_t)(act[i] * arow) * oes, (char *)bas + (size_t)(i * arow) * oes,
                       (size_t)arow * oes);
        }
    }
    if (kst && (kla_state_read(kst, KLA_OUT(ht, sdt, N * srow), p->p.opt.state_layout) < 0 ||
                (atk && kla_state_read_atk(kst, KLA_OUT(at, sdt, N * arow)) < 0))) {
        ferr(p->path, "%s", kla_error_detail(ctx));
        goto done;
    }
    rc = 0;
done:
    kla_state_free(&kst);
    free(start), free(len), free(rows), free(act);
    free(bq), free(bk), free(bv), free(be), free(bg), free(bo), free(bs), free(bga), free(bba), free(bas);
    return rc;
}

/* ---- forward / backward / decode ---------------------------------------------------- */

static int same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && S_ISREG(sa.st_mode) && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

static int cmd_run(const Cli *c)
{
    Problem p;
    Outputs o;
    KlaContext *ctx = NULL;
    int rc = 1;
    memset(&o, 0, sizeof o);
    memset(&p, 0, sizeof p);
    if (strcmp(c->out, "-") != 0 && same_file(c->in, c->out)) {
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
    KlaOptions *opt = &p.p.opt;
    opt->algo = c->algo;
    if (c->chunk_set) opt->chunk_size = c->chunk_size;

    const KlaShape *s = &p.p.shape;
    KlaTensors t = p.p.t;
    if (!add_out(&o, "o", 4, p.v.shape)) goto done;
    t.o = last_out(&o);
    if (!add_out(&o, "ht", 4, p.p.state_shape)) goto done;
    t.ht = last_out(&o);
    const int atk = opt->precond == KLA_PRECOND_ATK;
    const int64_t nhk[3] = { s->N, s->H, s->K };
    if (atk) {
        if (!add_out(&o, "at", 3, nhk)) goto done;
        t.at = last_out(&o);
    }

    if (c->cmd == CMD_DECODE) {
        if (run_decode(ctx, &p, t.o.data, t.ht.data, t.at.data, o.dtype) < 0) goto done;
    } else if (c->cmd == CMD_FORWARD) {
        if (kla_forward(ctx, s, opt, &t) < 0) {
            ferr(c->in, "%s", kla_error_detail(ctx));
            goto done;
        }
    } else {
        const int64_t btv[4] = { s->B, s->T, s->HV, s->K }, bth[3] = { s->B, s->T, s->H };
        KlaFileTensor q;
        kla_file_find(p.f, "q", &q);
        if (!add_out(&o, "dq", 4, q.shape)) goto done;
        t.dq = last_out(&o);
        if (!add_out(&o, "dk", 4, q.shape)) goto done;
        t.dk = last_out(&o);
        if (!add_out(&o, "dv", 4, p.v.shape)) goto done;
        t.dv = last_out(&o);
        if (!add_out(&o, "dg", opt->gate == KLA_GATE_CHANNEL ? 4 : 3, btv)) goto done;
        t.dg = last_out(&o);
        if (!add_out(&o, opt->mode == KLA_MODE_KLA ? "deta" : "dbeta", 3, btv)) goto done;
        if (opt->mode == KLA_MODE_KLA) t.deta = last_out(&o);
        else t.dbeta = last_out(&o);
        if (t.h0.data) {
            if (!add_out(&o, "dh0", 4, p.p.state_shape)) goto done;
            t.dh0 = last_out(&o);
        }
        if (atk) {
            if (!add_out(&o, "dg_atk", 3, bth)) goto done;
            t.dg_atk = last_out(&o);
            if (!add_out(&o, "dbeta_atk", 3, bth)) goto done;
            t.dbeta_atk = last_out(&o);
            if (!add_out(&o, "dlog_atk_scale", 1, &s->H)) goto done;
            t.dlog_atk_scale = last_out(&o);
            /* also without a0: the gradient at a0 = 0, as dg without g */
            if (!add_out(&o, "da0", 3, nhk)) goto done;
            t.da0 = last_out(&o);
        }
        if (kla_backward(ctx, s, opt, &t) < 0) {
            ferr(c->in, "%s", kla_error_detail(ctx));
            goto done;
        }
    }
    if (write_outs(c, &p, &o, bname, c->cmd == CMD_DECODE ? "decode" : algo_name(kla_last_algo(ctx))) < 0)
        goto done;
    rc = 0;
done:
    free_outs(&o);
    kla_close(&ctx);
    kla_file_free(&p.f);
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

static int cmd_info(int vk_info)
{
    int rc = 0;
    static const char *const known[] = { "ref", "ref64", "simd", "vulkan", NULL };
    const char *const *list = kla_backend_list();
    printf("kla %s\n", kla_version());
    printf("backends:\n");
    for (int i = 0; list && list[i]; i++) {
        int a = kla_backend_available(list[i]);
        printf("  %-8s built, %s", list[i], a == 1 ? "usable" : a == 0 ? "not usable here" : kla_strerror(a));
        const int fam = kla_backend_variants(list[i]);
        /* what a context of it runs with here (CPU level after KLA_CPU_MASK, threads, device);
         * vulkan only when asked for, since opening it takes seconds on some machines */
        KlaParams par;
        kla_default_params(&par);
        par.backend = list[i];
        KlaContext *ctx = NULL;
        if (a == 1 && (strcmp(list[i], "vulkan") != 0 || vk_info)) {
            if (kla_open(&ctx, &par) == 0) {
                char d[256];
                const size_t nl = strlen(list[i]);
                if (strncmp(kla_describe(ctx, d, sizeof d), list[i], nl) == 0 && d[nl] == ':') printf("%s", d + nl);
            } else {
                printf(": cannot open: %s", kla_error_detail(NULL));
                rc = 1;
            }
            kla_close(&ctx);
        }
        /* the family's variants (kla-spec.md section 7) it runs besides GDN and KLA */
        if (fam >= 0)
            printf("\n           variants: gdn kla%s%s%s", fam & KLA_VARIANT_CHANNEL ? " kda kaczmarz-kda" : "",
                   fam & KLA_VARIANT_ATK ? " pdn pgdn p-kla" : "",
                   (fam & KLA_VARIANT_CHANNEL) && (fam & KLA_VARIANT_ATK) ? " pkda kaczmarz-pkda" : "");
        putchar('\n');
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
    const char *env = getenv("KLA_CPU_MASK");
    if (env && *env) printf("KLA_CPU_MASK=%s\n", env);
    return rc;
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
    if (strcmp(a, "layer") == 0) return layer_main(argc - 1, argv + 1);
    if (strcmp(a, "model") == 0) return model_main(argc - 1, argv + 1);
    if (strcmp(a, "train") == 0) return train_main(argc - 1, argv + 1);
    if (strcmp(a, "help") == 0) {
        if (argc >= 3 && strcmp(argv[2], "golden") == 0) {
            char *h[] = { argv[2], (char *)"--help", NULL };
            return golden_main(2, h);
        }
        if (argc >= 3 && strcmp(argv[2], "bench") == 0) {
            char *h[] = { argv[2], (char *)"--help", NULL };
            return kla_bench_main(2, h);
        }
        if (argc >= 3 && (!strcmp(argv[2], "layer") || !strcmp(argv[2], "model") || !strcmp(argv[2], "train"))) {
            char *h[] = { argv[2], (char *)"--help", NULL };
            return !strcmp(argv[2], "layer") ? layer_main(2, h) : !strcmp(argv[2], "model") ? model_main(2, h)
                                                                                          : train_main(2, h);
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
    case CMD_INFO: return cmd_info(c.vulkan_info);
    default: return cmd_run(&c);
    }
}
