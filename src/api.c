/*
 * api.c: the public API. Validation at the boundary, then dtype and layout conversion,
 * then the backend from the dispatch table.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla_internal.h"

const char *kla_version(void) { return "0.1.0"; }

const char *kla_strerror(int err)
{
    switch (err) {
    case 0: return "success";
    case KLA_EINVAL: return "invalid argument";
    case KLA_ERANGE: return "value out of range";
    case KLA_ENOMEM: return "out of memory";
    case KLA_ENOSYS: return "not built into this library";
    case KLA_ENODEV: return "backend not usable on this machine";
    case KLA_EIO: return "device or runtime failure";
    default: return "unknown error";
    }
}

void kla_default_options(KlaOptions *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->mode = KLA_MODE_KLA;
    opt->scale = 0;
    opt->eps = 1e-6;
    opt->state_layout = KLA_LAYOUT_KV;
    opt->algo = KLA_ALGO_AUTO;
    opt->chunk_size = 64;
}

void kla_default_params(KlaParams *p)
{
    memset(p, 0, sizeof *p);
    p->backend = NULL;
    p->threads = 0;
    p->cpu_mask = KLA_CPU_ALL;
    p->gpu_device = -1;
}

/* ---- the dispatch table -------------------------------------------------------------- */

/* In order of preference for "auto", which picks the first usable CPU backend: ref64 and
 * GPU backends run only when asked for by name (a GPU pays only for large calls). */
static const kla_backend *const backends[] = {
#ifdef KLA_HAVE_SIMD
    &kla_backend_simd,
#endif
    &kla_backend_ref,
    &kla_backend_ref64,
#ifdef KLA_HAVE_VULKAN
    &kla_backend_vulkan,
#endif
};
static int auto_candidate(const kla_backend *be)
{
    return be != &kla_backend_ref64 && strcmp(be->name, "vulkan") != 0;
}
#define NBACKENDS (sizeof backends / sizeof backends[0])

const char *const *kla_backend_list(void)
{
    static const char *names[NBACKENDS + 1];
    for (size_t i = 0; i < NBACKENDS; i++) names[i] = backends[i]->name;
    names[NBACKENDS] = NULL;
    return names;
}

static const kla_backend *find_backend(const char *name)
{
    for (size_t i = 0; i < NBACKENDS; i++)
        if (!strcmp(backends[i]->name, name)) return backends[i];
    return NULL;
}

int kla_backend_available(const char *name)
{
    const kla_backend *be = name ? find_backend(name) : NULL;
    if (!be) return KLA_ENOSYS;
    return be->usable() ? 1 : 0;
}

/* ---- context --------------------------------------------------------------------------- */

int kla__fail(KlaContext *ctx, int err, const char *fmt, ...)
{
    if (ctx) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->detail, sizeof ctx->detail, fmt, ap);
        va_end(ap);
    }
    return err;
}

/* Why the last kla_open of this thread failed (there is no context to hold it). */
static _Thread_local char open_detail[256];

static int open_fail(int err, const char *fmt, const char *arg)
{
    snprintf(open_detail, sizeof open_detail, fmt, arg);
    return err;
}

int kla_open(KlaContext **out, const KlaParams *params)
{
    open_detail[0] = 0;
    if (!out) return open_fail(KLA_EINVAL, "%s", "kla_open: NULL context pointer");
    *out = NULL;
    KlaParams p;
    if (params) p = *params;
    else kla_default_params(&p);
    if (p.threads < 0) return open_fail(KLA_EINVAL, "%s", "kla_open: threads < 0");

    const kla_backend *be = NULL;
    if (!p.backend || !strcmp(p.backend, "auto")) {
        for (size_t i = 0; i < NBACKENDS && !be; i++)
            if (auto_candidate(backends[i]) && backends[i]->usable()) be = backends[i];
        if (!be) return open_fail(KLA_ENODEV, "%s", "no usable CPU backend");
    } else {
        be = find_backend(p.backend);
        if (!be) return open_fail(KLA_ENOSYS, "backend \"%s\" is not built into this library", p.backend);
        if (!be->usable()) return open_fail(KLA_ENODEV, "backend \"%s\" is not usable on this machine", p.backend);
    }

    KlaContext *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return open_fail(KLA_ENOMEM, "%s", "kla_open: out of memory");
    ctx->be = be;
    ctx->params = p;
    ctx->params.backend = be->name; /* the caller's string need not outlive the call */
    if (be->open) {
        char err[200] = "";
        int r = be->open(&ctx->state, &ctx->params, err, sizeof err);
        if (r < 0) {
            snprintf(open_detail, sizeof open_detail, "backend %s: %s", be->name,
                     err[0] ? err : kla_strerror(r));
            free(ctx);
            return r;
        }
    }
    *out = ctx;
    return 0;
}

void kla_close(KlaContext **ctx)
{
    if (!ctx || !*ctx) return;
    if ((*ctx)->be->close) (*ctx)->be->close((*ctx)->state);
    free(*ctx);
    *ctx = NULL;
}

const char *kla_backend_name(const KlaContext *ctx) { return ctx ? ctx->be->name : "none"; }

int kla_gpu_time(const KlaContext *ctx, double *ms, const char **names, int max)
{
    if (!ctx || !ms || max < 1 || !ctx->be->gpu_time) return 0;
    return ctx->be->gpu_time(ctx->state, ms, names, max);
}

const char *kla_error_detail(const KlaContext *ctx)
{
    if (!ctx) return open_detail[0] ? open_detail : "no error recorded";
    return ctx->detail[0] ? ctx->detail : "no error recorded";
}

/* ---- validation ---------------------------------------------------------------------- */

/* a * b into *r, 0 on overflow (all operands >= 0). The result must also fit in size_t
 * once multiplied by 8 bytes. */
static int mul(int64_t a, int64_t b, int64_t *r)
{
    if (a != 0 && b > (INT64_MAX / 8) / a) return 0;
    *r = a * b;
    return 1;
}

static int mul4(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *r)
{
    int64_t x, y;
    return mul(a, b, &x) && mul(x, c, &y) && mul(y, d, r);
}

static int is_real(KlaDtype d) { return d == KLA_F32 || d == KLA_F64; }
static size_t dsize(KlaDtype d) { return d == KLA_F64 || d == KLA_I64 ? 8 : 4; }

typedef enum { OP_FORWARD, OP_BACKWARD, OP_DECODE, OP_DECODE_STATE } op_kind;

struct KlaState {
    KlaContext *ctx;
    int64_t N, HV, K, V, n; /* n = N HV K V */
    void *host;             /* backends without state hooks: backend dtype, KV layout */
    void *h;                /* else the backend's handle */
};

/* Sizes of one call, once validated. */
typedef struct sizes {
    int64_t B, T, H, HV, K, V, N, total;
    int64_t nq, nv, ns, nst; /* elements of q, v, g (and eta, beta), state tensors */
} sizes;

static int check_options(KlaContext *ctx, const KlaOptions *o)
{
    if (o->mode != KLA_MODE_KLA && o->mode != KLA_MODE_GDN)
        return kla__fail(ctx, KLA_EINVAL, "options: mode %d is neither KLA nor GDN", (int)o->mode);
    if (!isfinite(o->scale))
        return kla__fail(ctx, KLA_EINVAL, "options: scale is not finite");
    if (!isfinite(o->eps) || o->eps < 0)
        return kla__fail(ctx, KLA_EINVAL, "options: eps %g must be finite and >= 0", o->eps);
    if ((o->l2norm_q != 0 && o->l2norm_q != 1) || (o->l2norm_k != 0 && o->l2norm_k != 1))
        return kla__fail(ctx, KLA_EINVAL, "options: l2norm_q and l2norm_k must be 0 or 1");
    if (o->state_layout != KLA_LAYOUT_KV && o->state_layout != KLA_LAYOUT_VK)
        return kla__fail(ctx, KLA_EINVAL, "options: state_layout %d is neither KV nor VK",
                         (int)o->state_layout);
    if (o->algo != KLA_ALGO_AUTO && o->algo != KLA_ALGO_RECURRENT && o->algo != KLA_ALGO_CHUNK)
        return kla__fail(ctx, KLA_EINVAL, "options: unknown algorithm %d", (int)o->algo);
    if (o->chunk_size != 16 && o->chunk_size != 32 && o->chunk_size != 64 && o->chunk_size != 128)
        return kla__fail(ctx, KLA_EINVAL, "options: chunk size %d is not 16, 32, 64 or 128",
                         o->chunk_size);
    return 0;
}

static int need_real(KlaContext *ctx, const char *name, const void *data, KlaDtype d, int required)
{
    if (!data) return required ? kla__fail(ctx, KLA_EINVAL, "tensor %s: missing", name) : 0;
    if (!is_real(d))
        return kla__fail(ctx, KLA_EINVAL, "tensor %s: dtype must be F32 or F64", name);
    return 0;
}
#define NEED_IN(name, req) need_real(ctx, #name, t->name.data, t->name.dtype, req)
#define NEED_OUT(name, req) need_real(ctx, #name, t->name.data, t->name.dtype, req)

static int forbid(KlaContext *ctx, const char *name, const void *data, const char *why)
{
    return data ? kla__fail(ctx, KLA_EINVAL, "tensor %s: not allowed %s", name, why) : 0;
}

/* Reads cu_seqlens into cu [N+1] (allocated) after checking it. */
static int read_cu(KlaContext *ctx, const KlaIn *in, int64_t N, int64_t T, int64_t **cu_out)
{
    if (in->dtype != KLA_I32 && in->dtype != KLA_I64)
        return kla__fail(ctx, KLA_EINVAL, "tensor cu_seqlens: dtype must be I32 or I64");
    int64_t *cu = malloc((size_t)(N + 1) * sizeof *cu);
    if (!cu) return KLA_ENOMEM;
    for (int64_t i = 0; i <= N; i++)
        cu[i] = in->dtype == KLA_I32 ? ((const int32_t *)in->data)[i] : ((const int64_t *)in->data)[i];
    int r = 0;
    if (cu[0] != 0)
        r = kla__fail(ctx, KLA_ERANGE, "tensor cu_seqlens: cu_seqlens[0] = %lld, must be 0",
                      (long long)cu[0]);
    for (int64_t i = 1; i <= N && !r; i++)
        if (cu[i] < cu[i - 1])
            r = kla__fail(ctx, KLA_ERANGE,
                          "tensor cu_seqlens: not increasing: cu_seqlens[%lld] = %lld < cu_seqlens[%lld] = %lld",
                          (long long)i, (long long)cu[i], (long long)(i - 1), (long long)cu[i - 1]);
    if (!r && cu[N] != T)
        r = kla__fail(ctx, KLA_ERANGE, "tensor cu_seqlens: ends at %lld, must end at T = %lld",
                      (long long)cu[N], (long long)T);
    if (r) {
        free(cu);
        return r;
    }
    *cu_out = cu;
    return 0;
}

static int check_call(KlaContext *ctx, const KlaShape *s, const KlaOptions *o,
                      const KlaTensors *t, op_kind op, const KlaState *st, sizes *z, int64_t **cu)
{
    *cu = NULL;
    int r = check_options(ctx, o);
    if (r) return r;
    const char *what[] = { "B", "T", "H", "HV", "K", "V" };
    const int64_t dims[] = { s->B, s->T, s->H, s->HV, s->K, s->V };
    for (int i = 0; i < 6; i++)
        if (dims[i] <= 0)
            return kla__fail(ctx, KLA_EINVAL, "shape: %s = %lld, must be > 0", what[i], (long long)dims[i]);
    if (s->HV % s->H)
        return kla__fail(ctx, KLA_EINVAL, "shape: HV = %lld is not a multiple of H = %lld",
                         (long long)s->HV, (long long)s->H);
    z->B = s->B, z->T = s->T, z->H = s->H, z->HV = s->HV, z->K = s->K, z->V = s->V;
    z->N = t->cu_seqlens.data ? s->N : s->B;
    if (!mul(z->B, z->T, &z->total) || !mul4(z->total, z->H, z->K, 1, &z->nq) ||
        !mul4(z->total, z->HV, z->V, 1, &z->nv) || !mul(z->total, z->HV, &z->ns) ||
        (z->N > 0 && !mul4(z->N, z->HV, z->K, z->V, &z->nst)))
        return kla__fail(ctx, KLA_ENOMEM, "shape: sizes overflow");

    /* which tensors this call takes */
    if ((r = NEED_IN(q, 1)) || (r = NEED_IN(k, 1)) || (r = NEED_IN(v, 1)) || (r = NEED_IN(g, 0)) ||
        (r = NEED_IN(eta, 0)) || (r = NEED_IN(beta, 0)) || (r = NEED_IN(h0, 0)) ||
        (r = NEED_OUT(o, 1)))
        return r;
    if (o->mode == KLA_MODE_KLA) {
        if (!t->eta.data) return kla__fail(ctx, KLA_EINVAL, "tensor eta: missing (mode kla)");
        if ((r = forbid(ctx, "beta", t->beta.data, "in mode kla (it takes eta)"))) return r;
    } else {
        if (!t->beta.data) return kla__fail(ctx, KLA_EINVAL, "tensor beta: missing (mode gdn)");
        if ((r = forbid(ctx, "eta", t->eta.data, "in mode gdn (it takes beta)"))) return r;
    }
    if (op == OP_DECODE || op == OP_DECODE_STATE) {
        if (s->T != 1) return kla__fail(ctx, KLA_EINVAL, "shape: decode takes T = 1, got %lld", (long long)s->T);
        if ((r = forbid(ctx, "cu_seqlens", t->cu_seqlens.data, "in decode")) ||
            (r = forbid(ctx, "h0", t->h0.data, "in decode (the state is t->state)")))
            return r;
        if (op == OP_DECODE && (r = NEED_OUT(state, 1))) return r;
        if (op == OP_DECODE_STATE) {
            if ((r = forbid(ctx, "state", t->state.data, "with a KlaState (the state is in it)"))) return r;
            if (st->N != s->B || st->HV != s->HV || st->K != s->K || st->V != s->V)
                return kla__fail(ctx, KLA_EINVAL,
                                 "KlaState: holds N=%lld HV=%lld K=%lld V=%lld, the shape asks for "
                                 "B=%lld HV=%lld K=%lld V=%lld", (long long)st->N, (long long)st->HV,
                                 (long long)st->K, (long long)st->V, (long long)s->B, (long long)s->HV,
                                 (long long)s->K, (long long)s->V);
        }
    } else {
        if ((r = NEED_OUT(ht, 0)) || (r = forbid(ctx, "state", t->state.data, "outside decode")))
            return r;
    }
    if (op == OP_BACKWARD) {
        if ((r = NEED_IN(dout, 1)) || (r = NEED_IN(dht, 0)) || (r = NEED_OUT(dq, 1)) ||
            (r = NEED_OUT(dk, 1)) || (r = NEED_OUT(dv, 1)) || (r = NEED_OUT(dg, 0)) ||
            (r = NEED_OUT(dh0, 0)))
            return r;
        if (o->mode == KLA_MODE_KLA) {
            if ((r = NEED_OUT(deta, 1)) || (r = forbid(ctx, "dbeta", t->dbeta.data, "in mode kla")))
                return r;
        } else {
            if ((r = NEED_OUT(dbeta, 1)) || (r = forbid(ctx, "deta", t->deta.data, "in mode gdn")))
                return r;
        }
    } else {
        const char *why = "outside backward";
        if ((r = forbid(ctx, "dout", t->dout.data, why)) || (r = forbid(ctx, "dht", t->dht.data, why)) ||
            (r = forbid(ctx, "dq", t->dq.data, why)) || (r = forbid(ctx, "dk", t->dk.data, why)) ||
            (r = forbid(ctx, "dv", t->dv.data, why)) || (r = forbid(ctx, "dg", t->dg.data, why)) ||
            (r = forbid(ctx, "deta", t->deta.data, why)) || (r = forbid(ctx, "dbeta", t->dbeta.data, why)) ||
            (r = forbid(ctx, "dh0", t->dh0.data, why)))
            return r;
    }

    /* sequences */
    if (t->cu_seqlens.data) {
        if (s->B != 1)
            return kla__fail(ctx, KLA_EINVAL, "tensor cu_seqlens: needs B = 1, got B = %lld", (long long)s->B);
        if (s->N <= 0)
            return kla__fail(ctx, KLA_EINVAL, "tensor cu_seqlens: N = %lld sequences, must be > 0", (long long)s->N);
        if ((r = read_cu(ctx, &t->cu_seqlens, z->N, z->total, cu))) return r;
    } else {
        if (!(*cu = malloc((size_t)(z->N + 1) * sizeof **cu))) return KLA_ENOMEM;
        for (int64_t n = 0; n <= z->N; n++) (*cu)[n] = n * z->T;
    }

    /* values: finite everywhere, g <= 0 */
    const int64_t sq[] = { z->B, z->T, z->H, z->K }, sv[] = { z->B, z->T, z->HV, z->V };
    const int64_t sg[] = { z->B, z->T, z->HV };
    const int64_t sst[] = { z->N, z->HV, o->state_layout == KLA_LAYOUT_VK ? z->V : z->K,
                            o->state_layout == KLA_LAYOUT_VK ? z->K : z->V };
    if ((r = kla__check_values(ctx, "q", t->q, sq, 4, 0)) ||
        (r = kla__check_values(ctx, "k", t->k, sq, 4, 0)) ||
        (r = kla__check_values(ctx, "v", t->v, sv, 4, 0)) ||
        (r = kla__check_values(ctx, "g", t->g, sg, 3, 1)) ||
        (r = kla__check_values(ctx, "eta", t->eta, sg, 3, 0)) ||
        (r = kla__check_values(ctx, "beta", t->beta, sg, 3, 0)) ||
        (r = kla__check_values(ctx, "h0", t->h0, sst, 4, 0)) ||
        (r = kla__check_values(ctx, "do", t->dout, sv, 4, 0)) ||
        (r = kla__check_values(ctx, "dht", t->dht, sst, 4, 0))) {
        free(*cu);
        *cu = NULL;
        return r;
    }
    return 0;
}

/* ---- conversion between the caller's tensors and the backend's ------------------------- */

/* A buffer the backend reads or writes: either the caller's memory or an owned copy. */
typedef struct buf {
    void *ptr;
    void *owned;
} buf;

static void convert(const void *src, KlaDtype sd, void *dst, KlaDtype dd, int64_t n)
{
    if (sd == dd) {
        memcpy(dst, src, (size_t)n * dsize(sd));
    } else if (sd == KLA_F32) {
        for (int64_t i = 0; i < n; i++) ((double *)dst)[i] = ((const float *)src)[i];
    } else {
        for (int64_t i = 0; i < n; i++) ((float *)dst)[i] = (float)((const double *)src)[i];
    }
}

/* [M, R, Cc] -> [M, Cc, R] with dtype conversion: the VK <-> KV state transposition. */
static void transpose(const void *src, KlaDtype sd, void *dst, KlaDtype dd, int64_t M,
                      int64_t R, int64_t Cc)
{
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < R; i++)
            for (int64_t j = 0; j < Cc; j++) {
                const int64_t a = (m * R + i) * Cc + j, b = (m * Cc + j) * R + i;
                double x = sd == KLA_F32 ? ((const float *)src)[a] : ((const double *)src)[a];
                if (dd == KLA_F32) ((float *)dst)[b] = (float)x;
                else ((double *)dst)[b] = x;
            }
}

/* An input in the backend's dtype (and KV layout when vk). */
static int in_buf(KlaIn in, int64_t n, KlaDtype want, const sizes *z, int vk, buf *b)
{
    b->ptr = b->owned = NULL;
    if (!in.data) return 0;
    if (in.dtype == want && !vk) {
        b->ptr = (void *)in.data; /* read only */
        return 0;
    }
    if (!(b->owned = malloc((size_t)n * dsize(want)))) return KLA_ENOMEM;
    if (vk) transpose(in.data, in.dtype, b->owned, want, z->N * z->HV, z->V, z->K);
    else convert(in.data, in.dtype, b->owned, want, n);
    b->ptr = b->owned;
    return 0;
}

/* An output: the caller's memory when dtype and layout match, else scratch. */
static int out_buf(KlaOut out, int64_t n, KlaDtype want, int vk, buf *b)
{
    b->ptr = b->owned = NULL;
    if (!out.data) return 0;
    if (out.dtype == want && !vk) {
        b->ptr = out.data;
        return 0;
    }
    if (!(b->owned = calloc((size_t)n, dsize(want)))) return KLA_ENOMEM;
    b->ptr = b->owned;
    return 0;
}

/* Scratch back into the caller's output. */
static void out_finish(KlaOut out, int64_t n, KlaDtype have, int vk, const sizes *z, const buf *b)
{
    if (!b->owned) return;
    if (vk) transpose(b->owned, have, out.data, out.dtype, z->N * z->HV, z->K, z->V);
    else convert(b->owned, have, out.data, out.dtype, n);
}

enum { I_Q, I_K, I_V, I_G, I_A, I_H0, I_DO, I_DHT, NIN };
enum { O_O, O_HT, O_DQ, O_DK, O_DV, O_DG, O_DA, O_DH0, O_STATE, NOUT };

static int run(KlaContext *ctx, const KlaShape *shape, const KlaOptions *opt,
               const KlaTensors *t, op_kind op, KlaState *kst)
{
    if (!ctx) return KLA_EINVAL;
    ctx->detail[0] = 0;
    if (!shape || !opt || !t) return kla__fail(ctx, KLA_EINVAL, "NULL shape, options or tensors");
    if (op == OP_DECODE_STATE && (!kst || kst->ctx != ctx))
        return kla__fail(ctx, KLA_EINVAL, "KlaState: %s", kst ? "made for another context" : "NULL");
    sizes z = { 0 };
    int64_t *cu = NULL;
    int r = check_call(ctx, shape, opt, t, op, kst, &z, &cu);
    if (r) return r;

    const KlaDtype R = ctx->be->real;
    const int vk = opt->state_layout == KLA_LAYOUT_VK;
    const int kla = opt->mode == KLA_MODE_KLA;
    kla_problem p = {
        .N = z.N, .H = z.H, .HV = z.HV, .K = z.K, .V = z.V, .cu = cu, .total = z.total,
        .mode = opt->mode, .scale = opt->scale != 0 ? opt->scale : 1 / sqrt((double)z.K),
        .eps = opt->eps, .l2norm_q = opt->l2norm_q, .l2norm_k = opt->l2norm_k,
        .chunk = opt->chunk_size, .threads = ctx->params.threads,
    };

    const KlaIn ins[NIN] = { t->q, t->k, t->v, t->g, kla ? t->eta : t->beta, t->h0, t->dout, t->dht };
    const int64_t in_n[NIN] = { z.nq, z.nq, z.nv, z.ns, z.ns, z.nst, z.nv, z.nst };
    const int in_vk[NIN] = { 0, 0, 0, 0, 0, vk, 0, vk };
    const KlaOut outs[NOUT] = { t->o, t->ht, t->dq, t->dk, t->dv, t->dg, kla ? t->deta : t->dbeta,
                                t->dh0, t->state };
    const int64_t out_n[NOUT] = { z.nv, z.nst, z.nq, z.nq, z.nv, z.ns, z.ns, z.nst, z.nst };
    const int out_vk[NOUT] = { 0, vk, 0, 0, 0, 0, 0, vk, vk };
    buf bi[NIN] = { { 0 } }, bo[NOUT] = { { 0 } };

    for (int i = 0; i < NIN && !r; i++) r = in_buf(ins[i], in_n[i], R, &z, in_vk[i], &bi[i]);
    for (int i = 0; i < NOUT && !r; i++) r = out_buf(outs[i], out_n[i], R, out_vk[i], &bo[i]);
    /* the decode state is read as well as written */
    if (!r && op == OP_DECODE && bo[O_STATE].owned) {
        if (vk) transpose(t->state.data, t->state.dtype, bo[O_STATE].owned, R, z.N * z.HV, z.V, z.K);
        else convert(t->state.data, t->state.dtype, bo[O_STATE].owned, R, z.nst);
    }
    if (r == KLA_ENOMEM) r = kla__fail(ctx, r, "out of memory for the converted tensors");

    if (!r) {
        const int algo = opt->algo;
        void *st = ctx->state;
        if (op == OP_FORWARD)
            r = ctx->be->forward(st, &p, algo, bi[I_Q].ptr, bi[I_K].ptr, bi[I_V].ptr, bi[I_G].ptr,
                                 bi[I_A].ptr, bi[I_H0].ptr, bo[O_O].ptr, bo[O_HT].ptr);
        else if (op == OP_BACKWARD)
            r = ctx->be->backward(st, &p, algo, bi[I_Q].ptr, bi[I_K].ptr, bi[I_V].ptr, bi[I_G].ptr,
                                  bi[I_A].ptr, bi[I_H0].ptr, bi[I_DO].ptr, bi[I_DHT].ptr,
                                  bo[O_O].ptr, bo[O_HT].ptr, bo[O_DQ].ptr, bo[O_DK].ptr,
                                  bo[O_DV].ptr, bo[O_DG].ptr, bo[O_DA].ptr, bo[O_DH0].ptr);
        else if (op == OP_DECODE)
            r = ctx->be->decode(st, &p, bi[I_Q].ptr, bi[I_K].ptr, bi[I_V].ptr, bi[I_G].ptr,
                                bi[I_A].ptr, bo[O_STATE].ptr, bo[O_O].ptr);
        else if (kst->h)
            r = ctx->be->decode_state(st, &p, bi[I_Q].ptr, bi[I_K].ptr, bi[I_V].ptr, bi[I_G].ptr,
                                      bi[I_A].ptr, kst->h, bo[O_O].ptr);
        else
            r = ctx->be->decode(st, &p, bi[I_Q].ptr, bi[I_K].ptr, bi[I_V].ptr, bi[I_G].ptr,
                                bi[I_A].ptr, kst->host, bo[O_O].ptr);
        if (r < 0 && !ctx->detail[0])
            kla__fail(ctx, r, "backend %s: %s", ctx->be->name, kla_strerror(r));
    }
    if (!r)
        for (int i = 0; i < NOUT; i++) out_finish(outs[i], out_n[i], R, out_vk[i], &z, &bo[i]);

    for (int i = 0; i < NIN; i++) free(bi[i].owned);
    for (int i = 0; i < NOUT; i++) free(bo[i].owned);
    free(cu);
    return r;
}

int kla_forward(KlaContext *ctx, const KlaShape *s, const KlaOptions *o, const KlaTensors *t)
{
    return run(ctx, s, o, t, OP_FORWARD, NULL);
}

int kla_backward(KlaContext *ctx, const KlaShape *s, const KlaOptions *o, const KlaTensors *t)
{
    return run(ctx, s, o, t, OP_BACKWARD, NULL);
}

int kla_decode(KlaContext *ctx, const KlaShape *s, const KlaOptions *o, const KlaTensors *t)
{
    return run(ctx, s, o, t, OP_DECODE, NULL);
}

/* ---- KlaState --------------------------------------------------------------------------- */

int kla_state_new(KlaContext *ctx, int64_t N, int64_t HV, int64_t K, int64_t V, KlaState **out)
{
    if (!out) return ctx ? kla__fail(ctx, KLA_EINVAL, "KlaState: NULL result pointer") : KLA_EINVAL;
    *out = NULL;
    if (!ctx) return KLA_EINVAL;
    ctx->detail[0] = 0;
    const char *what[] = { "N", "HV", "K", "V" };
    const int64_t d[] = { N, HV, K, V };
    for (int i = 0; i < 4; i++)
        if (d[i] <= 0) return kla__fail(ctx, KLA_EINVAL, "KlaState: %s = %lld, must be > 0", what[i], (long long)d[i]);
    int64_t n;
    if (!mul4(N, HV, K, V, &n)) return kla__fail(ctx, KLA_ENOMEM, "KlaState: sizes overflow");
    KlaState *st = calloc(1, sizeof *st);
    if (!st) return kla__fail(ctx, KLA_ENOMEM, "KlaState: out of memory");
    *st = (KlaState){ ctx, N, HV, K, V, n, NULL, NULL };
    const int64_t bytes = n * (int64_t)dsize(ctx->be->real);
    int r = 0;
    if (ctx->be->state_new) r = ctx->be->state_new(ctx->state, bytes, &st->h);
    else if (!(st->host = calloc((size_t)n, dsize(ctx->be->real)))) r = KLA_ENOMEM;
    if (r) {
        free(st);
        return kla__fail(ctx, r, "KlaState: %lld bytes on backend %s: %s", (long long)bytes, ctx->be->name,
                         kla_strerror(r));
    }
    *out = st;
    return 0;
}

void kla_state_free(KlaState **st)
{
    if (!st || !*st) return;
    if ((*st)->h) (*st)->ctx->be->state_free((*st)->ctx->state, (*st)->h);
    free((*st)->host);
    free(*st);
    *st = NULL;
}

/* state <-> a caller's tensor of the given dtype and layout (to_state: write) */
static int state_xfer(KlaState *st, void *data, KlaDtype dt, KlaStateLayout layout, int to_state)
{
    if (!st) return KLA_EINVAL;
    KlaContext *ctx = st->ctx;
    ctx->detail[0] = 0;
    const char *name = to_state ? "src" : "dst";
    if (!data) return kla__fail(ctx, KLA_EINVAL, "KlaState: %s is NULL", name);
    if (dt != KLA_F32 && dt != KLA_F64)
        return kla__fail(ctx, KLA_EINVAL, "KlaState: %s has dtype %d, expected F32 or F64", name, (int)dt);
    if (layout != KLA_LAYOUT_KV && layout != KLA_LAYOUT_VK)
        return kla__fail(ctx, KLA_EINVAL, "KlaState: layout %d is neither KV nor VK", (int)layout);
    const int vk = layout == KLA_LAYOUT_VK;
    const KlaDtype R = ctx->be->real;
    if (to_state) {
        const int64_t sh[] = { st->N, st->HV, vk ? st->V : st->K, vk ? st->K : st->V };
        int r = kla__check_values(ctx, "state", (KlaIn){ data, dt }, sh, 4, 0);
        if (r) return r;
    }
    void *tmp = st->h ? malloc((size_t)st->n * dsize(R)) : st->host;
    if (!tmp) return kla__fail(ctx, KLA_ENOMEM, "KlaState: out of memory");
    int r = 0;
    if (to_state) {
        if (vk) transpose(data, dt, tmp, R, st->N * st->HV, st->V, st->K);
        else convert(data, dt, tmp, R, st->n);
        if (st->h) r = ctx->be->state_copy(ctx->state, st->h, tmp, st->n * (int64_t)dsize(R), 1);
    } else {
        if (st->h) r = ctx->be->state_copy(ctx->state, st->h, tmp, st->n * (int64_t)dsize(R), 0);
        if (!r && vk) transpose(tmp, R, data, dt, st->N * st->HV, st->K, st->V);
        else if (!r) convert(tmp, R, data, dt, st->n);
    }
    if (st->h) free(tmp);
    return r ? kla__fail(ctx, r, "KlaState: copy on backend %s: %s", ctx->be->name, kla_strerror(r)) : 0;
}

int kla_state_write(KlaState *st, KlaIn src, KlaStateLayout layout)
{
    return state_xfer(st, (void *)src.data, src.dtype, layout, 1);
}

int kla_state_read(KlaState *st, KlaOut dst, KlaStateLayout layout)
{
    return state_xfer(st, dst.data, dst.dtype, layout, 0);
}

int kla_decode_state(KlaContext *ctx, const KlaShape *s, const KlaOptions *o, const KlaTensors *t, KlaState *st)
{
    return run(ctx, s, o, t, OP_DECODE_STATE, st);
}

/* ---- the reference backends ------------------------------------------------------------ */

static int always(void) { return 1; }
static int ref_algo(int algo) { return algo == KLA_ALGO_CHUNK ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT; }

#define REF_BACKEND(R, sfx, NAME, DT)                                                          \
    static int ref_fwd_##sfx(void *st, const kla_problem *p, int algo, const void *q,          \
                             const void *k, const void *v, const void *g, const void *a,       \
                             const void *h0, void *o, void *ht)                                \
    {                                                                                          \
        (void)st;                                                                              \
        return kla_ref_forward_##sfx(p, ref_algo(algo), q, k, v, g, a, h0, o, ht);             \
    }                                                                                          \
    static int ref_bwd_##sfx(void *st, const kla_problem *p, int algo, const void *q,          \
                             const void *k, const void *v, const void *g, const void *a,       \
                             const void *h0, const void *dout, const void *dht, void *o,       \
                             void *ht, void *dq, void *dk, void *dv, void *dg, void *da,       \
                             void *dh0)                                                        \
    {                                                                                          \
        (void)st;                                                                              \
        return kla_ref_backward_##sfx(p, ref_algo(algo), q, k, v, g, a, h0, dout, dht, o, ht,  \
                                      dq, dk, dv, dg, da, dh0);                                \
    }                                                                                          \
    static int ref_dec_##sfx(void *st, const kla_problem *p, const void *q, const void *k,     \
                             const void *v, const void *g, const void *a, void *S, void *o)    \
    {                                                                                          \
        (void)st;                                                                              \
        return kla_ref_decode_##sfx(p, q, k, v, g, a, S, o);                                   \
    }                                                                                          \
    const kla_backend kla_backend_##NAME = { .name = #NAME, .real = DT, .usable = always,     \
                                             .forward = ref_fwd_##sfx, .backward = ref_bwd_##sfx, \
                                             .decode = ref_dec_##sfx };

REF_BACKEND(float, f32, ref, KLA_F32)
REF_BACKEND(double, f64, ref64, KLA_F64)
