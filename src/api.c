/*
 * api.c: the public API. Validation at the boundary, then dtype and layout conversion,
 * then the backend from the dispatch table.
 */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla_internal.h"

const char *kla_version(void) { return "0.4.0"; }

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
    case KLA_EBUSY: return "context in use by another thread";
    default: return "unknown error";
    }
}

void kla_default_options(KlaOptions *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->mode = KLA_MODE_KLA;
    opt->scale = KLA_SCALE_DEFAULT;
    opt->eps = 1e-6;
    opt->state_layout = KLA_LAYOUT_KV;
    opt->algo = KLA_ALGO_AUTO;
    opt->chunk_size = 64;
    opt->gate = KLA_GATE_HEAD;
    opt->precond = KLA_PRECOND_NONE;
    opt->squash_x = 1.5;
    opt->squash_eps = 1e-6;
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

int kla_backend_variants(const char *name)
{
    const kla_backend *be = name ? find_backend(name) : NULL;
    return be ? (int)be->variants : KLA_ENOSYS;
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
static _Thread_local char open_detail[512];

/* The KLA_EBUSY of a thread that found the context in use: kept per thread, since the
 * context's own message belongs to the thread inside it. */
static _Thread_local const void *busy_ctx;
static _Thread_local char busy_detail[128];

int kla__nofail(int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(open_detail, sizeof open_detail, fmt, ap);
    va_end(ap);
    return err;
}

void kla__noclear(void) { open_detail[0] = 0; }

static int open_fail(int err, const char *fmt, const char *arg)
{
    snprintf(open_detail, sizeof open_detail, fmt, arg);
    return err;
}

int kla_cpu_mask_parse(const char *s, unsigned *mask)
{
    if (!s || !mask) return KLA_EINVAL;
    const unsigned known = KLA_CPU_AVX2 | KLA_CPU_AVX512 | KLA_CPU_NEON;
    if (*s >= '0' && *s <= '9') {
        char *end;
        errno = 0;
        unsigned long m = strtoul(s, &end, 0);
        if (errno || *end || (m & ~(unsigned long)known)) return KLA_EINVAL;
        *mask = (unsigned)m;
        return 0;
    }
    static const struct { const char *name; unsigned bits; } names[] = {
        { "avx2", KLA_CPU_AVX2 }, { "avx512", KLA_CPU_AVX512 }, { "neon", KLA_CPU_NEON },
        { "all", KLA_CPU_ALL }, { "none", 0 }, { "c", 0 },
    };
    unsigned m = 0;
    int any = 0;
    for (const char *p = s;; p++) {
        size_t l = strcspn(p, ",+");
        int found = 0;
        for (size_t i = 0; i < sizeof names / sizeof names[0] && !found; i++)
            if (l == strlen(names[i].name) && !strncmp(p, names[i].name, l)) m |= names[i].bits, found = 1;
        if (!found) return KLA_EINVAL;
        any = 1;
        p += l;
        if (!*p) break;
    }
    if (!any) return KLA_EINVAL;
    *mask = m;
    return 0;
}

static int open_backend(KlaContext **out, const KlaParams *p, const kla_backend *be, const KlaVulkanDevice *dev);

int kla_open_vulkan(KlaContext **out, const KlaParams *params, const KlaVulkanDevice *dev)
{
    open_detail[0] = 0;
    if (!out) return open_fail(KLA_EINVAL, "%s", "kla_open_vulkan: NULL context pointer");
    *out = NULL;
    const kla_backend *be = find_backend("vulkan");
    if (!be || !be->open_external)
        return open_fail(KLA_ENOSYS, "%s", "kla_open_vulkan: the vulkan backend is not built into this library");
    if (!dev || !dev->instance || !dev->physical_device || !dev->device || !dev->queue)
        return open_fail(KLA_EINVAL, "%s", "kla_open_vulkan: a NULL KlaVulkanDevice or one of its handles is NULL");
    KlaParams p;
    if (params) p = *params;
    else kla_default_params(&p);
    return open_backend(out, &p, be, dev);
}

int kla_open(KlaContext **out, const KlaParams *params)
{
    open_detail[0] = 0;
    if (!out) return open_fail(KLA_EINVAL, "%s", "kla_open: NULL context pointer");
    *out = NULL;
    KlaParams p;
    if (params) p = *params;
    else kla_default_params(&p);
    /* more threads than any machine has cores only costs (and OpenMP runtimes crash on
     * hundreds of thousands) */
    if (p.threads < 0 || p.threads > KLA_MAX_THREADS)
        return kla__nofail(KLA_EINVAL, "kla_open: threads = %d, must be in [0, %d] (0: all cores)", p.threads,
                           KLA_MAX_THREADS);
    const char *env = getenv("KLA_CPU_MASK");
    if (env && *env) {
        unsigned m;
        if (kla_cpu_mask_parse(env, &m) < 0)
            return open_fail(KLA_EINVAL, "KLA_CPU_MASK=%s: expected a number of KLA_CPU_* bits (1 avx2, "
                             "2 avx512, 4 neon) or names: avx2, avx512, neon, all, none", env);
        p.cpu_mask &= m;
    }

    const kla_backend *be = NULL;
    if (!p.backend || !strcmp(p.backend, "auto")) {
        for (size_t i = 0; i < NBACKENDS && !be; i++)
            if (auto_candidate(backends[i]) && backends[i]->usable()) be = backends[i];
        if (!be) return open_fail(KLA_ENODEV, "%s", "no usable CPU backend");
    } else {
        be = find_backend(p.backend);
        if (!be) return open_fail(KLA_ENOSYS, "backend \"%s\" is not built into this library", p.backend);
        /* a backend asked for by name that is not usable says why through its open */
        if (!be->usable() && !be->open)
            return open_fail(KLA_ENODEV, "backend \"%s\" is not usable on this machine", p.backend);
    }

    return open_backend(out, &p, be, NULL);
}

/* The context of backend be (on the application's Vulkan device when dev). */
static int open_backend(KlaContext **out, const KlaParams *p, const kla_backend *be, const KlaVulkanDevice *dev)
{
    KlaContext *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return open_fail(KLA_ENOMEM, "%s", "kla_open: out of memory");
    ctx->be = be;
    ctx->params = *p;
    ctx->params.backend = be->name; /* the caller's string need not outlive the call */
    atomic_init(&ctx->busy, 0);
    if (be->open) {
        char err[200] = "";
        int r = dev ? be->open_external(&ctx->state, &ctx->params, dev, err, sizeof err)
                    : be->open(&ctx->state, &ctx->params, err, sizeof err);
        if (r == 0 && !be->usable()) {
            if (be->close) be->close(ctx->state);
            r = KLA_ENODEV;
        }
        if (r < 0) {
            snprintf(open_detail, sizeof open_detail, "backend %s: %s", be->name,
                     err[0] ? err : r == KLA_ENODEV ? "not usable on this machine" : kla_strerror(r));
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
    if (ctx && ctx == busy_ctx) return busy_detail;
    if (!ctx) return open_detail[0] ? open_detail : "no error recorded";
    return ctx->detail[0] ? ctx->detail : "no error recorded";
}

/* ---- validation ---------------------------------------------------------------------- */

/* a * b into *r, 0 on overflow (all operands >= 0). The result must also fit in size_t
 * once multiplied by 8 bytes. */
int kla__mul(int64_t a, int64_t b, int64_t *r)
{
    if (a != 0 && b > (INT64_MAX / 8) / a) return 0;
    *r = a * b;
    return 1;
}

int kla__mul4(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *r)
{
    int64_t x, y;
    return kla__mul(a, b, &x) && kla__mul(x, c, &y) && kla__mul(y, d, r);
}

int kla__is_real(KlaDtype d) { return d == KLA_F32 || d == KLA_F64 || d == KLA_F16 || d == KLA_BF16; }
size_t kla__dsize(KlaDtype d) { return d == KLA_F64 || d == KLA_I64 ? 8 : d == KLA_F16 || d == KLA_BF16 ? 2 : 4; }

typedef enum { OP_FORWARD, OP_BACKWARD, OP_DECODE, OP_DECODE_STATE } op_kind;


/* Sizes of one call, once validated. */
typedef struct sizes {
    int64_t B, T, H, HV, K, V, N, total;
    int64_t nq, nv, ns, nst; /* elements of q, v, g (and eta, beta), state tensors */
} sizes;

static int check_options(KlaContext *ctx, const KlaOptions *o)
{
    if (o->mode != KLA_MODE_KLA && o->mode != KLA_MODE_GDN)
        return kla__fail(ctx, KLA_EINVAL, "options: mode %d is neither KLA nor GDN", (int)o->mode);
    if (isinf(o->scale))
        return kla__fail(ctx, KLA_EINVAL, "options: scale is infinite (KLA_SCALE_DEFAULT, a NaN, means K^-1/2)");
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
    if (o->gate != KLA_GATE_HEAD && o->gate != KLA_GATE_CHANNEL)
        return kla__fail(ctx, KLA_EINVAL, "options: gate %d is neither HEAD nor CHANNEL", (int)o->gate);
    if (o->precond != KLA_PRECOND_NONE && o->precond != KLA_PRECOND_ATK)
        return kla__fail(ctx, KLA_EINVAL, "options: precond %d is neither NONE nor ATK", (int)o->precond);
    /* the squash is read only with the preconditioner (options filled by hand before it
     * existed hold zeros there) */
    if (o->precond == KLA_PRECOND_ATK) {
        if (!(isfinite(o->squash_x) && o->squash_x > 1))
            return kla__fail(ctx, KLA_EINVAL, "options: squash_x %g must be finite and > 1 (the preconditioner "
                             "lies in (1/squash_x, squash_x))", o->squash_x);
        if (!(isfinite(o->squash_eps) && o->squash_eps > 0))
            return kla__fail(ctx, KLA_EINVAL, "options: squash_eps %g must be finite and > 0", o->squash_eps);
    }
    return 0;
}

static int need_real(KlaContext *ctx, const char *name, const void *data, KlaDtype d, int required)
{
    if (!data) return required ? kla__fail(ctx, KLA_EINVAL, "tensor %s: missing", name) : 0;
    if (!kla__is_real(d))
        return kla__fail(ctx, KLA_EINVAL, "tensor %s: dtype %d, must be KLA_F32, KLA_F64, KLA_F16 or KLA_BF16",
                         name, (int)d);
    return 0;
}
#define NEED_IN(name, req) need_real(ctx, #name, t->name.data, t->name.dtype, req)
#define NEED_OUT(name, req) need_real(ctx, #name, t->name.data, t->name.dtype, req)

static int forbid(KlaContext *ctx, const char *name, const void *data, const char *why)
{
    return data ? kla__fail(ctx, KLA_EINVAL, "tensor %s: not allowed %s", name, why) : 0;
}

/* "[B, T, H, K] = [2, 50, 1, 16]" */
static void dims_str(char *buf, size_t n, const char *dims, const int64_t *shape, int ndim)
{
    size_t o = (size_t)snprintf(buf, n, "%s = [", dims);
    for (int d = 0; d < ndim && o < n; d++)
        o += (size_t)snprintf(buf + o, n - o, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

/* The element count a present tensor declares must be the one its shape asks for. */
int kla__need_numel(KlaContext *ctx, const char *name, const void *data, int64_t given,
                      const char *dims, const int64_t *shape, int ndim)
{
    if (!data) return 0;
    int64_t want = 1;
    for (int d = 0; d < ndim; d++) want *= shape[d];
    if (given == want) return 0;
    char ds[160];
    dims_str(ds, sizeof ds, dims, shape, ndim);
    if (given == 0)
        return kla__fail(ctx, KLA_EINVAL, "tensor %s: numel is 0 (not set); expected %s, %lld elements",
                         name, ds, (long long)want);
    return kla__fail(ctx, KLA_EINVAL, "tensor %s: %lld elements given, expected %s, %lld elements",
                     name, (long long)given, ds, (long long)want);
}

/* Reads cu_seqlens into cu [N+1] (allocated) after checking it. */
static int read_cu(KlaContext *ctx, const KlaIn *in, int64_t N, int64_t T, int64_t **cu_out)
{
    if (in->dtype != KLA_I32 && in->dtype != KLA_I64)
        return kla__fail(ctx, KLA_EINVAL, "tensor cu_seqlens: dtype must be I32 or I64");
    int64_t *cu = malloc((size_t)(N + 1) * sizeof *cu);
    if (!cu) return kla__fail(ctx, KLA_ENOMEM, "tensor cu_seqlens: out of memory");
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

/* The tensors of a call with their expected shapes (set by check_call). */
enum { I_Q, I_K, I_V, I_G, I_A, I_H0, I_DO, I_DHT, I_GATK, I_BATK, I_LATK, I_A0, I_DAT, NIN };
enum { O_O, O_HT, O_DQ, O_DK, O_DV, O_DG, O_DA, O_DH0, O_AT, O_DGATK, O_DBATK, O_DLATK, O_DA0,
       O_STATE, O_ASTATE, NOUT };

typedef struct slot {
    const char *name, *dims;
    int64_t shape[4];
    int ndim;
    int vk;    /* a state tensor in layout VK */
    int64_t n; /* elements */
} slot;

static void set_slot(slot *x, const char *name, const char *dims, int ndim, int64_t a, int64_t b,
                     int64_t c, int64_t d, int vk)
{
    const int64_t sh[4] = { a, b, c, d };
    x->name = name, x->dims = dims, x->ndim = ndim, x->vk = vk, x->n = 1;
    for (int i = 0; i < 4; i++) x->shape[i] = i < ndim ? sh[i] : 1, x->n *= x->shape[i];
}

/* Expected shapes of every tensor of the call (decode: one token per sequence). */
static void set_slots(const sizes *z, const KlaOptions *o, int decode, slot in[NIN], slot out[NOUT])
{
    const int vk = o->state_layout == KLA_LAYOUT_VK;
    const int64_t a = vk ? z->V : z->K, b = vk ? z->K : z->V;
    const char *sd = vk ? "[N, HV, V, K]" : "[N, HV, K, V]";
    const int kla = o->mode == KLA_MODE_KLA, chan = o->gate == KLA_GATE_CHANNEL;
    if (decode) {
        set_slot(&in[I_Q], "q", "[N, H, K]", 3, z->N, z->H, z->K, 1, 0);
        set_slot(&in[I_K], "k", "[N, H, K]", 3, z->N, z->H, z->K, 1, 0);
        set_slot(&in[I_V], "v", "[N, HV, V]", 3, z->N, z->HV, z->V, 1, 0);
        if (chan) set_slot(&in[I_G], "g", "[N, HV, K]", 3, z->N, z->HV, z->K, 1, 0);
        else set_slot(&in[I_G], "g", "[N, HV]", 2, z->N, z->HV, 1, 1, 0);
        set_slot(&in[I_A], kla ? "eta" : "beta", "[N, HV]", 2, z->N, z->HV, 1, 1, 0);
        set_slot(&in[I_GATK], "g_atk", "[N, H]", 2, z->N, z->H, 1, 1, 0);
        set_slot(&in[I_BATK], "beta_atk", "[N, H]", 2, z->N, z->H, 1, 1, 0);
        set_slot(&out[O_O], "o", "[N, HV, V]", 3, z->N, z->HV, z->V, 1, 0);
    } else {
        set_slot(&in[I_Q], "q", "[B, T, H, K]", 4, z->B, z->T, z->H, z->K, 0);
        set_slot(&in[I_K], "k", "[B, T, H, K]", 4, z->B, z->T, z->H, z->K, 0);
        set_slot(&in[I_V], "v", "[B, T, HV, V]", 4, z->B, z->T, z->HV, z->V, 0);
        if (chan) set_slot(&in[I_G], "g", "[B, T, HV, K]", 4, z->B, z->T, z->HV, z->K, 0);
        else set_slot(&in[I_G], "g", "[B, T, HV]", 3, z->B, z->T, z->HV, 1, 0);
        set_slot(&in[I_A], kla ? "eta" : "beta", "[B, T, HV]", 3, z->B, z->T, z->HV, 1, 0);
        set_slot(&in[I_GATK], "g_atk", "[B, T, H]", 3, z->B, z->T, z->H, 1, 0);
        set_slot(&in[I_BATK], "beta_atk", "[B, T, H]", 3, z->B, z->T, z->H, 1, 0);
        set_slot(&out[O_O], "o", "[B, T, HV, V]", 4, z->B, z->T, z->HV, z->V, 0);
    }
    set_slot(&in[I_LATK], "log_atk_scale", "[H]", 1, z->H, 1, 1, 1, 0);
    set_slot(&in[I_A0], "a0", "[N, H, K]", 3, z->N, z->H, z->K, 1, 0);
    set_slot(&in[I_DAT], "dat", "[N, H, K]", 3, z->N, z->H, z->K, 1, 0);
    set_slot(&out[O_AT], "at", "[N, H, K]", 3, z->N, z->H, z->K, 1, 0);
    set_slot(&out[O_DGATK], "dg_atk", "[B, T, H]", 3, z->B, z->T, z->H, 1, 0);
    set_slot(&out[O_DBATK], "dbeta_atk", "[B, T, H]", 3, z->B, z->T, z->H, 1, 0);
    set_slot(&out[O_DLATK], "dlog_atk_scale", "[H]", 1, z->H, 1, 1, 1, 0);
    set_slot(&out[O_DA0], "da0", "[N, H, K]", 3, z->N, z->H, z->K, 1, 0);
    set_slot(&out[O_ASTATE], "astate", "[N, H, K]", 3, z->N, z->H, z->K, 1, 0);
    set_slot(&in[I_H0], "h0", sd, 4, z->N, z->HV, a, b, vk);
    set_slot(&in[I_DO], "do", "[B, T, HV, V]", 4, z->B, z->T, z->HV, z->V, 0);
    set_slot(&in[I_DHT], "dht", sd, 4, z->N, z->HV, a, b, vk);
    set_slot(&out[O_HT], "ht", sd, 4, z->N, z->HV, a, b, vk);
    set_slot(&out[O_DQ], "dq", "[B, T, H, K]", 4, z->B, z->T, z->H, z->K, 0);
    set_slot(&out[O_DK], "dk", "[B, T, H, K]", 4, z->B, z->T, z->H, z->K, 0);
    set_slot(&out[O_DV], "dv", "[B, T, HV, V]", 4, z->B, z->T, z->HV, z->V, 0);
    if (chan) set_slot(&out[O_DG], "dg", "[B, T, HV, K]", 4, z->B, z->T, z->HV, z->K, 0);
    else set_slot(&out[O_DG], "dg", "[B, T, HV]", 3, z->B, z->T, z->HV, 1, 0);
    set_slot(&out[O_DA], kla ? "deta" : "dbeta", "[B, T, HV]", 3, z->B, z->T, z->HV, 1, 0);
    set_slot(&out[O_DH0], "dh0", sd, 4, z->N, z->HV, a, b, vk);
    set_slot(&out[O_STATE], "state", sd, 4, z->N, z->HV, a, b, vk);
}

static void gather(const KlaTensors *t, int kla, KlaIn in[NIN], KlaOut out[NOUT])
{
    const KlaIn i[NIN] = { t->q, t->k, t->v, t->g, kla ? t->eta : t->beta, t->h0, t->dout, t->dht,
                           t->g_atk, t->beta_atk, t->log_atk_scale, t->a0, t->dat };
    const KlaOut o[NOUT] = { t->o, t->ht, t->dq, t->dk, t->dv, t->dg, kla ? t->deta : t->dbeta,
                             t->dh0, t->at, t->dg_atk, t->dbeta_atk, t->dlog_atk_scale, t->da0,
                             t->state, t->astate };
    memcpy(in, i, sizeof i);
    memcpy(out, o, sizeof o);
}

/* [p, p + bytes) */
static int overlap(const void *a, int64_t an, const void *b, int64_t bn)
{
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + (uintptr_t)bn && y < x + (uintptr_t)an;
}

/* No output may share memory with an input or another output (the decode state, read
 * and written in place, is one tensor). */
static int check_overlaps(KlaContext *ctx, const KlaIn in[NIN], const slot si[NIN],
                          const KlaOut out[NOUT], const slot so[NOUT], const KlaIn *cu, int64_t ncu)
{
    for (int i = 0; i < NOUT; i++) {
        if (!out[i].data) continue;
        /* a device buffer (.buffer set, .data its handle) is one block of its own */
        const int64_t bi = out[i].buffer ? 1 : so[i].n * (int64_t)kla__dsize(out[i].dtype);
        for (int j = 0; j < NIN; j++)
            if (in[j].data && !out[i].buffer == !in[j].buffer &&
                overlap(out[i].data, bi, in[j].data, in[j].buffer ? 1 : si[j].n * (int64_t)kla__dsize(in[j].dtype)))
                return kla__fail(ctx, KLA_EINVAL, "tensor %s: its memory overlaps input %s", so[i].name,
                                 si[j].name);
        if (cu->data && !out[i].buffer && overlap(out[i].data, bi, cu->data, ncu * (int64_t)kla__dsize(cu->dtype)))
            return kla__fail(ctx, KLA_EINVAL, "tensor %s: its memory overlaps input cu_seqlens", so[i].name);
        for (int j = 0; j < i; j++)
            if (out[j].data && !out[i].buffer == !out[j].buffer &&
                overlap(out[i].data, bi, out[j].data, out[j].buffer ? 1 : so[j].n * (int64_t)kla__dsize(out[j].dtype)))
                return kla__fail(ctx, KLA_EINVAL, "tensor %s: its memory overlaps output %s", so[i].name,
                                 so[j].name);
    }
    return 0;
}

/* Mode kla: every step size beta = eta / (||k||^2 + eps) must be finite (eps = 0 with a
 * zero key is the usual way to break it), checked before computing so that the message
 * can name the token, which a chunkwise algorithm would smear over its chunk. */
static int check_step(KlaContext *ctx, const sizes *z, const KlaOptions *o, const KlaTensors *t,
                      int decode, const int64_t *cu)
{
    const int64_t G = z->HV / z->H;
    for (int64_t n = 0; n < z->N; n++)
        for (int64_t r = cu[n]; r < cu[n + 1]; r++)
            for (int64_t h = 0; h < z->H; h++) {
                double nk = 0;
                for (int64_t i = 0; i < z->K; i++) {
                    const int64_t j = (r * z->H + h) * z->K + i;
                    const double x = kla__get_real(t->k.data, t->k.dtype, j);
                    nk += x * x;
                }
                if (o->l2norm_k) nk = nk / (nk + 1e-6); /* ||l2norm(k)||^2 */
                for (int64_t hv = h * G; hv < (h + 1) * G; hv++) {
                    const int64_t j = r * z->HV + hv;
                    const double eta = kla__get_real(t->eta.data, t->eta.dtype, j);
                    if (isfinite(eta / (nk + o->eps))) continue;
                    char where[96];
                    if (decode) snprintf(where, sizeof where, "n=%lld, hv=%lld", (long long)r, (long long)hv);
                    else snprintf(where, sizeof where, "b=%lld, t=%lld, hv=%lld", (long long)(r / z->T),
                                  (long long)(r % z->T), (long long)hv);
                    return kla__fail(ctx, KLA_ERANGE,
                                     "tensor eta: the step size beta = eta / (%s + eps) is not finite at "
                                     "[%s]: eta = %g, ||k||^2 = %g, eps = %g (a zero key needs eps > 0)",
                                     o->precond == KLA_PRECOND_ATK ? "k^T kw" : "||k||^2", where, eta, nk, o->eps);
                }
            }
    return 0;
}

/* Which tensors of the preconditioner a call takes: none without it; beta_atk always
 * with it, the ATK state as a0/at outside decode and astate in decode. */
static int check_atk_tensors(KlaContext *ctx, const KlaShape *s, const KlaOptions *o, const KlaTensors *t,
                             op_kind op, const KlaState *st)
{
    int r;
    const int decode = op == OP_DECODE || op == OP_DECODE_STATE;
    if (o->precond != KLA_PRECOND_ATK) {
        const char *why = "without precond ATK (KlaOptions.precond)";
        const struct { const char *name; const void *data; } x[] = {
            { "g_atk", t->g_atk.data }, { "beta_atk", t->beta_atk.data }, { "log_atk_scale", t->log_atk_scale.data },
            { "a0", t->a0.data }, { "dat", t->dat.data }, { "at", t->at.data }, { "dg_atk", t->dg_atk.data },
            { "dbeta_atk", t->dbeta_atk.data }, { "dlog_atk_scale", t->dlog_atk_scale.data },
            { "da0", t->da0.data }, { "astate", t->astate.data },
        };
        for (size_t i = 0; i < sizeof x / sizeof x[0]; i++)
            if ((r = forbid(ctx, x[i].name, x[i].data, why))) return r;
        if (op == OP_DECODE_STATE && st->ahost)
            return kla__fail(ctx, KLA_EINVAL, "KlaState: holds an ATK state (kla_state_new_atk), but precond "
                             "is none");
        return 0;
    }
    if (!t->beta_atk.data) return kla__fail(ctx, KLA_EINVAL, "tensor beta_atk: missing (precond atk)");
    if ((r = NEED_IN(beta_atk, 1)) || (r = NEED_IN(g_atk, 0)) || (r = NEED_IN(log_atk_scale, 0)) ||
        (r = NEED_IN(a0, 0)))
        return r;
    if (decode) {
        if ((r = forbid(ctx, "a0", t->a0.data, "in decode (the ATK state is t->astate)")) ||
            (r = forbid(ctx, "at", t->at.data, "in decode (the ATK state is updated in place)")))
            return r;
        if (op == OP_DECODE_STATE) {
            if (!st->ahost)
                return kla__fail(ctx, KLA_EINVAL, "KlaState: made without the ATK state that precond atk "
                                 "carries (make it with kla_state_new_atk)");
            if (st->H != s->H)
                return kla__fail(ctx, KLA_EINVAL, "KlaState: its ATK state has H=%lld key heads, the shape asks "
                                 "for H=%lld", (long long)st->H, (long long)s->H);
            return forbid(ctx, "astate", t->astate.data, "with a KlaState (the ATK state is in it)");
        }
        if (!t->astate.data) return kla__fail(ctx, KLA_EINVAL, "tensor astate: missing (decode with precond atk)");
        if ((r = NEED_OUT(astate, 1))) return r;
    } else if ((r = forbid(ctx, "astate", t->astate.data, "outside decode")) || (r = NEED_OUT(at, 0))) {
        return r;
    }
    if (op == OP_BACKWARD)
        return (r = NEED_IN(dat, 0)) || (r = NEED_OUT(dg_atk, 0)) || (r = NEED_OUT(dbeta_atk, 0)) ||
                       (r = NEED_OUT(dlog_atk_scale, 0)) || (r = NEED_OUT(da0, 0)) ? r : 0;
    const char *why = "outside backward";
    if ((r = forbid(ctx, "dat", t->dat.data, why)) || (r = forbid(ctx, "dg_atk", t->dg_atk.data, why)) ||
        (r = forbid(ctx, "dbeta_atk", t->dbeta_atk.data, why)) ||
        (r = forbid(ctx, "dlog_atk_scale", t->dlog_atk_scale.data, why)) || (r = forbid(ctx, "da0", t->da0.data, why)))
        return r;
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
    if (t->cu_seqlens.data && s->N <= 0)
        return kla__fail(ctx, KLA_EINVAL, "tensor cu_seqlens: N = %lld sequences, must be > 0", (long long)s->N);
    if (!kla__mul(z->B, z->T, &z->total) || !kla__mul4(z->total, z->H, z->K, 1, &z->nq) ||
        !kla__mul4(z->total, z->HV, z->V, 1, &z->nv) || !kla__mul(z->total, z->HV, &z->ns) ||
        !kla__mul4(z->N, z->HV, z->K, z->V, &z->nst) || z->N == INT64_MAX)
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
    const int decode = op == OP_DECODE || op == OP_DECODE_STATE;
    if (decode) {
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
    }
    if (decode || op == OP_FORWARD) {
        if ((r = decode ? forbid(ctx, "ht", t->ht.data, "in decode (the state is updated in place)")
                        : NEED_OUT(ht, 0)) ||
            (r = op != OP_DECODE ? forbid(ctx, "state", t->state.data, "outside decode") : 0))
            return r;
    } else if ((r = NEED_OUT(ht, 0)) || (r = forbid(ctx, "state", t->state.data, "outside decode"))) {
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
    if ((r = check_atk_tensors(ctx, s, o, t, op, st))) return r;

    /* sizes: every present tensor holds exactly what its shape asks for */
    slot si[NIN], so[NOUT];
    KlaIn in[NIN];
    KlaOut out[NOUT];
    set_slots(z, o, decode, si, so);
    gather(t, o->mode == KLA_MODE_KLA, in, out);
    for (int i = 0; i < NIN && !r; i++)
        r = kla__need_numel(ctx, si[i].name, in[i].data, in[i].numel, si[i].dims, si[i].shape, si[i].ndim);
    for (int i = 0; i < NOUT && !r; i++)
        r = kla__need_numel(ctx, so[i].name, out[i].data, out[i].numel, so[i].dims, so[i].shape, so[i].ndim);
    const int64_t ncu[1] = { z->N + 1 };
    if (!r) r = kla__need_numel(ctx, "cu_seqlens", t->cu_seqlens.data, t->cu_seqlens.numel, "[N + 1]", ncu, 1);
    if (!r) r = check_overlaps(ctx, in, si, out, so, &t->cu_seqlens, ncu[0]);
    if (r) return r;

    /* sequences */
    if (t->cu_seqlens.data) {
        if (s->B != 1)
            return kla__fail(ctx, KLA_EINVAL, "tensor cu_seqlens: needs B = 1, got B = %lld", (long long)s->B);
        if ((r = read_cu(ctx, &t->cu_seqlens, z->N, z->total, cu))) return r;
    } else {
        if (!(*cu = malloc((size_t)(z->N + 1) * sizeof **cu)))
            return kla__fail(ctx, KLA_ENOMEM, "out of memory for %lld sequence offsets", (long long)z->N + 1);
        for (int64_t n = 0; n <= z->N; n++) (*cu)[n] = n * z->T;
    }

    /* values: finite everywhere, log decays <= 0, the ATK state and its input >= 0; the
     * decode states too */
    /* (device buffers: the caller's, kla.h) */
    for (int i = 0; i < NIN && !r; i++)
        if (!in[i].buffer)
            r = kla__check_values(ctx, si[i].name, in[i], si[i].shape, si[i].ndim,
                                  i == I_G || i == I_GATK ? -1 : i == I_BATK || i == I_A0 ? 1 : 0);
    if (!r && op == OP_DECODE && !t->state.buffer)
        r = kla__check_values(ctx, "state", KLA_IN(t->state.data, t->state.dtype, so[O_STATE].n),
                              so[O_STATE].shape, 4, 0);
    if (!r && op == OP_DECODE && t->astate.data)
        r = kla__check_values(ctx, "astate", KLA_IN(t->astate.data, t->astate.dtype, so[O_ASTATE].n),
                              so[O_ASTATE].shape, 3, 1);
    if (!r && o->mode == KLA_MODE_KLA && !t->k.buffer && !t->eta.buffer) r = check_step(ctx, z, o, t, decode, *cu);
    if (r) {
        free(*cu);
        *cu = NULL;
    }
    return r;
}

/* ---- conversion between the caller's tensors and the backend's ------------------------- */

/* A buffer the backend reads or writes: either the caller's memory or an owned copy. */
typedef struct buf {
    void *ptr;
    void *owned;
} buf;

void kla__convert(const void *src, KlaDtype sd, void *dst, KlaDtype dd, int64_t n)
{
    if (sd == dd) {
        memcpy(dst, src, (size_t)n * kla__dsize(sd));
    } else if (sd == KLA_F32 && dd == KLA_F64) {
        for (int64_t i = 0; i < n; i++) ((double *)dst)[i] = ((const float *)src)[i];
    } else if (sd == KLA_F64 && dd == KLA_F32) {
        for (int64_t i = 0; i < n; i++) ((float *)dst)[i] = (float)((const double *)src)[i];
    } else { /* a 16-bit side: widened exactly, or rounded once to nearest even */
        for (int64_t i = 0; i < n; i++) kla__put_real(dst, dd, i, kla__get_real(src, sd, i));
    }
}

/* [M, R, Cc] -> [M, Cc, R] with dtype conversion: the VK <-> KV state transposition. */
void kla__transpose(const void *src, KlaDtype sd, void *dst, KlaDtype dd, int64_t M,
                      int64_t R, int64_t Cc)
{
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < R; i++)
            for (int64_t j = 0; j < Cc; j++) {
                const int64_t a = (m * R + i) * Cc + j, b = (m * Cc + j) * R + i;
                kla__put_real(dst, dd, b, kla__get_real(src, sd, a));
            }
}

/* An input in the backend's dtype (and KV layout when vk). */
static int in_buf(KlaIn in, int64_t n, KlaDtype want, const sizes *z, int vk, buf *b)
{
    b->ptr = b->owned = NULL;
    if (!in.data) return 0;
    if (in.buffer || (in.dtype == want && !vk)) { /* a device buffer: its handle */
        b->ptr = (void *)in.data; /* read only */
        return 0;
    }
    if (!(b->owned = malloc((size_t)n * kla__dsize(want)))) return KLA_ENOMEM;
    if (vk) kla__transpose(in.data, in.dtype, b->owned, want, z->N * z->HV, z->V, z->K);
    else kla__convert(in.data, in.dtype, b->owned, want, n);
    b->ptr = b->owned;
    return 0;
}

/* An output: the caller's memory when dtype and layout match, else scratch. */
static int out_buf(KlaOut out, int64_t n, KlaDtype want, int vk, buf *b)
{
    b->ptr = b->owned = NULL;
    if (!out.data) return 0;
    if (out.buffer || (out.dtype == want && !vk)) {
        b->ptr = out.data;
        return 0;
    }
    if (!(b->owned = calloc((size_t)n, kla__dsize(want)))) return KLA_ENOMEM;
    b->ptr = b->owned;
    return 0;
}

/* Scratch back into the caller's output. */
static void out_finish(KlaOut out, int64_t n, KlaDtype have, int vk, const sizes *z, const buf *b)
{
    if (!b->owned) return;
    if (vk) kla__transpose(b->owned, have, out.data, out.dtype, z->N * z->HV, z->K, z->V);
    else kla__convert(b->owned, have, out.data, out.dtype, n);
}

/* The first non-finite element of an output, as "tensor o: Inf at o[b=0, t=5, hv=1, v=3]":
 * the inputs were finite, so the computation overflowed (eps = 0 with a zero key, a huge
 * eta or beta). Tokens are scanned in order, so the first token where it happened. */
static int check_finite_out(KlaContext *ctx, const slot *x, const void *data, KlaDtype dt)
{
    if (!data) return 0;
    for (int64_t i = 0; i < x->n; i++) {
        const double v = kla__get_real(data, dt, i);
        if (isfinite(v)) continue;
        int64_t idx[4], r = i;
        for (int d = x->ndim - 1; d >= 0; d--) idx[d] = r % x->shape[d], r /= x->shape[d];
        /* index names from the dims, "[B, T, HV, V]" -> b, t, hv, v */
        char where[160];
        size_t o = 0;
        const char *dn = x->dims + 1;
        for (int d = 0; d < x->ndim && o < sizeof where; d++) {
            size_t l = strcspn(dn, ",]");
            char nm[8] = "";
            for (size_t j = 0; j < l && j + 1 < sizeof nm; j++) nm[j] = (char)(dn[j] | 0x20);
            o += (size_t)snprintf(where + o, sizeof where - o, "%s%s=%lld", d ? ", " : "", nm,
                                  (long long)idx[d]);
            dn += l + (dn[l] == ',' ? 2 : 0);
        }
        return kla__fail(ctx, KLA_ERANGE,
                         "tensor %s: %s at %s[%s] from finite inputs (the computation overflowed: "
                         "eps = 0 with a zero key, or a huge eta, beta, scale or state?)",
                         x->name, isnan(v) ? "NaN" : "Inf", x->name, where);
    }
    return 0;
}

/* After a chunkwise forward found non-finite outputs: rerun the forward recurrently into
 * scratch and name its first non-finite o instead (or say that it stays finite). */
static void locate_recurrent(KlaContext *ctx, const kla_problem *p, const kla_io *io, const slot so[NOUT])
{
    const size_t es = kla__dsize(ctx->be->real);
    void *o = calloc((size_t)so[O_O].n, es);
    char first[512];
    snprintf(first, sizeof first, "%s", ctx->detail);
    if (!o) return;
    const unsigned ins = KLA_R_Q | KLA_R_K | KLA_R_V | KLA_R_G | KLA_R_A;
    kla_io x = { .algo = KLA_ALGO_RECURRENT, .q = io->q, .k = io->k, .v = io->v, .g = io->g, .a = io->a,
                 .h0 = io->h0, .g_atk = io->g_atk, .beta_atk = io->beta_atk,
                 .log_atk_scale = io->log_atk_scale, .a0 = io->a0, .o = o,
                 .resident = io->resident & ins, .f16 = io->f16 & ins, .bf16 = io->bf16 & ins };
    int r = ctx->be->forward(ctx->state, p, &x);
    ctx->detail[0] = 0;
    if (r == 0 && check_finite_out(ctx, &so[O_O], o, ctx->be->real) == KLA_ERANGE) {
        char rec[512];
        snprintf(rec, sizeof rec, "%s", ctx->detail);
        kla__fail(ctx, KLA_ERANGE, "%s (located by a recurrent rerun: the chunkwise run spread it over its chunk)",
                  rec);
    } else {
        kla__fail(ctx, KLA_ERANGE, "%s (with the chunkwise algorithm only: the recurrent algorithm stays finite "
                  "on these inputs)", first);
    }
    free(o);
}

_Thread_local KlaContext *kla__current;

int kla__enter(KlaContext *ctx, const char *what)
{
    busy_ctx = NULL;
    if (atomic_exchange(&ctx->busy, 1)) {
        busy_ctx = ctx;
        snprintf(busy_detail, sizeof busy_detail,
                 "%s: the context is in use by another thread (use one context per thread)", what);
        return KLA_EBUSY;
    }
    ctx->detail[0] = 0;
    kla__current = ctx;
    return 0;
}

int kla__leave(KlaContext *ctx, int r)
{
    if (r < 0 && !ctx->detail[0]) kla__fail(ctx, r, "%s", kla_strerror(r));
    kla__current = NULL;
    atomic_store(&ctx->busy, 0);
    return r;
}

/* A log decay below G_FLOOR acts as G_FLOOR: exp of either is 0 in float64 (and float32),
 * so the result is the same, but the chunkwise algorithms' cumulative sums of g stay
 * finite (two -3.4e38 make -inf, and -inf - -inf a NaN). The caller's g is not changed:
 * a copy is floored when needed. */
#define G_FLOOR (-1e4)

/* any element of a host tensor below x */
static int below(KlaIn in, int64_t n, double x)
{
    for (int64_t i = 0; i < n; i++)
        if (kla__get_real(in.data, in.dtype, i) < x) return 1;
    return 0;
}
static int floor_g(buf *b, KlaIn in, int64_t n, KlaDtype R)
{
    if (!b->ptr || in.buffer) return 0; /* a device buffer: the caller's (kla.h) */
    int64_t i = 0;
    for (; i < n; i++)
        if ((R == KLA_F32 ? ((const float *)b->ptr)[i] : ((const double *)b->ptr)[i]) < G_FLOOR) break;
    if (i == n) return 0;
    if (!b->owned) {
        if (!(b->owned = malloc((size_t)n * kla__dsize(R)))) return KLA_ENOMEM;
        kla__convert(in.data, in.dtype, b->owned, R, n);
        b->ptr = b->owned;
    }
    for (; i < n; i++) {
        if (R == KLA_F32 && ((float *)b->owned)[i] < G_FLOOR) ((float *)b->owned)[i] = (float)G_FLOOR;
        if (R == KLA_F64 && ((double *)b->owned)[i] < G_FLOOR) ((double *)b->owned)[i] = G_FLOOR;
    }
    return 0;
}

/* Buffers in a call's tensors: a host-backed one (CPU backends) becomes its host memory;
 * a device one keeps .buffer, with .data its handle (so that presence checks see it),
 * dtype and numel its own, and sets its KLA_R_* bit. Tensors without a bit (cu_seqlens,
 * the family's) must be host memory. */
static int resolve_buffers(KlaContext *ctx, const KlaOptions *opt, const KlaTensors *t, KlaTensors *rt,
                           unsigned *resident, unsigned *r16)
{
    static const struct {
        const char *name;
        size_t off;
        int out;
        unsigned bit;
        int state;
    } f[] = {
#define TI(n, b) { #n, offsetof(KlaTensors, n), 0, b, 0 }
#define TO(n, b) { #n, offsetof(KlaTensors, n), 1, b, 0 }
        TI(q, KLA_R_Q), TI(k, KLA_R_K), TI(v, KLA_R_V), TI(g, KLA_R_G), TI(eta, KLA_R_A), TI(beta, KLA_R_A),
        { "h0", offsetof(KlaTensors, h0), 0, KLA_R_H0, 1 }, TI(cu_seqlens, 0), TI(dout, KLA_R_DO),
        { "dht", offsetof(KlaTensors, dht), 0, KLA_R_DHT, 1 }, TI(g_atk, 0), TI(beta_atk, 0),
        TI(log_atk_scale, 0), TI(a0, 0), TI(dat, 0), TO(o, KLA_R_O), { "ht", offsetof(KlaTensors, ht), 1, KLA_R_HT, 1 },
        TO(dq, KLA_R_DQ), TO(dk, KLA_R_DK), TO(dv, KLA_R_DV), TO(dg, KLA_R_DG), TO(deta, KLA_R_DA),
        TO(dbeta, KLA_R_DA), { "dh0", offsetof(KlaTensors, dh0), 1, KLA_R_DH0, 1 }, TO(at, 0), TO(dg_atk, 0),
        TO(dbeta_atk, 0), TO(dlog_atk_scale, 0), TO(da0, 0), { "state", offsetof(KlaTensors, state), 1, KLA_R_STATE, 1 },
        TO(astate, 0),
#undef TI
#undef TO
    };
    *rt = *t;
    *resident = r16[0] = r16[1] = 0;
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        char *p = (char *)rt + f[i].off;
        /* KlaIn and KlaOut have the same layout; only const differs */
        KlaOut *x = (KlaOut *)(void *)p;
        KlaBuffer *b = x->buffer;
        if (!b) continue;
        if (x->data)
            return kla__fail(ctx, KLA_EINVAL, "tensor %s: both data and buffer are set (give one)", f[i].name);
        if (b->ctx != ctx)
            return kla__fail(ctx, KLA_EINVAL, "tensor %s: a KlaBuffer of another context", f[i].name);
        if (b->host) {
            *x = (KlaOut){ b->host, b->dtype, b->numel, NULL };
            continue;
        }
        if (!f[i].bit)
            return kla__fail(ctx, KLA_EINVAL, "tensor %s: must be in host memory, not a device buffer%s", f[i].name,
                             strcmp(f[i].name, "cu_seqlens") ? " (backend vulkan does not run the family)"
                                                             : " (its values decide the work)");
        if (f[i].state && opt && opt->state_layout == KLA_LAYOUT_VK)
            return kla__fail(ctx, KLA_EINVAL, "tensor %s: a device buffer holds states in the KV layout only "
                             "(state_layout VK is for host tensors)", f[i].name);
        const int half = b->dtype == KLA_F16 || b->dtype == KLA_BF16;
        if (half && f[i].state)
            return kla__fail(ctx, KLA_EINVAL, "tensor %s: a state stays float32 on backend %s (a KLA_F32 buffer), "
                             "this buffer is 16-bit", f[i].name, ctx->be->name);
        x->data = b->h, x->dtype = b->dtype, x->numel = b->numel;
        *resident |= f[i].bit;
        if (half) r16[b->dtype == KLA_BF16] |= f[i].bit;
    }
    return 0;
}

static int run_checked(KlaContext *ctx, const KlaShape *shape, const KlaOptions *opt,
                       const KlaTensors *t, op_kind op, KlaState *kst)
{
    if (!shape || !opt || !t) return kla__fail(ctx, KLA_EINVAL, "NULL shape, options or tensors");
    if (op == OP_DECODE_STATE && (!kst || kst->ctx != ctx))
        return kla__fail(ctx, KLA_EINVAL, "KlaState: %s", kst ? "made for another context" : "NULL");
    KlaTensors rt;
    unsigned resident = 0, r16[2] = { 0, 0 };
    int r = resolve_buffers(ctx, opt, t, &rt, &resident, r16);
    if (r) return r;
    t = &rt;
    sizes z = { 0 };
    int64_t *cu = NULL;
    r = check_call(ctx, shape, opt, t, op, kst, &z, &cu);
    if (r) return r;
    const unsigned need = (opt->gate == KLA_GATE_CHANNEL ? KLA_VARIANT_CHANNEL : 0) |
                          (opt->precond == KLA_PRECOND_ATK ? KLA_VARIANT_ATK : 0);
    if (need & ~ctx->be->variants) {
        free(cu);
        return kla__fail(ctx, KLA_ENOSYS, "backend %s does not run %s yet (backends ref and ref64 do)",
                         ctx->be->name, need & ~ctx->be->variants & KLA_VARIANT_CHANNEL ? "gate channel (KDA)"
                                                                                        : "precond atk (PDN, PGDN, PKDA)");
    }

    const KlaDtype R = ctx->be->real;
    const int vk = opt->state_layout == KLA_LAYOUT_VK;
    const int decode = op == OP_DECODE || op == OP_DECODE_STATE;
    kla_problem p = {
        .N = z.N, .H = z.H, .HV = z.HV, .K = z.K, .V = z.V, .cu = cu, .total = z.total,
        .mode = opt->mode, .scale = isnan(opt->scale) ? 1 / sqrt((double)z.K) : opt->scale,
        .eps = opt->eps, .l2norm_q = opt->l2norm_q, .l2norm_k = opt->l2norm_k,
        .chunk = opt->chunk_size, .threads = ctx->params.threads, .gate = opt->gate,
        .precond = opt->precond, .squash_x = opt->squash_x, .squash_eps = opt->squash_eps,
    };

    slot si[NIN], so[NOUT];
    KlaIn ins[NIN];
    KlaOut outs[NOUT];
    set_slots(&z, opt, decode, si, so);
    gather(t, opt->mode == KLA_MODE_KLA, ins, outs);
    buf bi[NIN] = { { 0 } }, bo[NOUT] = { { 0 } };

    /* 16-bit host tensors go to a backend that widens on its device (dev16) as they are,
     * but states, and a g that needs flooring */
    unsigned raw16[2] = { 0, 0 };
    static const struct { int slot, out; unsigned bit; } r16map[] = {
        { I_Q, 0, KLA_R_Q }, { I_K, 0, KLA_R_K }, { I_V, 0, KLA_R_V }, { I_G, 0, KLA_R_G }, { I_A, 0, KLA_R_A },
        { I_DO, 0, KLA_R_DO }, { O_O, 1, KLA_R_O }, { O_DQ, 1, KLA_R_DQ }, { O_DK, 1, KLA_R_DK },
        { O_DV, 1, KLA_R_DV }, { O_DG, 1, KLA_R_DG }, { O_DA, 1, KLA_R_DA } };
    for (size_t i = 0; ctx->be->dev16 && i < sizeof r16map / sizeof r16map[0]; i++) {
        const int sl = r16map[i].slot;
        const KlaDtype dt = r16map[i].out ? outs[sl].dtype : ins[sl].dtype;
        const void *d = r16map[i].out ? (const void *)outs[sl].data : ins[sl].data;
        const int buffer = r16map[i].out ? outs[sl].buffer != NULL : ins[sl].buffer != NULL;
        if (!d || buffer || (dt != KLA_F16 && dt != KLA_BF16)) continue;
        if (!r16map[i].out && sl == I_G && below(ins[sl], si[sl].n, G_FLOOR)) continue;
        raw16[dt == KLA_BF16] |= r16map[i].bit;
        if (r16map[i].out) bo[sl].ptr = outs[sl].data;
        else bi[sl].ptr = (void *)ins[sl].data;
    }
    for (int i = 0; i < NIN && !r; i++)
        if (!bi[i].ptr) r = in_buf(ins[i], si[i].n, R, &z, si[i].vk, &bi[i]);
    if (!r && !((raw16[0] | raw16[1]) & KLA_R_G)) r = floor_g(&bi[I_G], ins[I_G], si[I_G].n, R);
    if (!r) r = floor_g(&bi[I_GATK], ins[I_GATK], si[I_GATK].n, R);
    for (int i = 0; i < NOUT && !r; i++)
        if (!bo[i].ptr) r = out_buf(outs[i], so[i].n, R, so[i].vk, &bo[i]);
    /* the decode state is read as well as written */
    if (!r && op == OP_DECODE && bo[O_STATE].owned) {
        if (vk) kla__transpose(t->state.data, t->state.dtype, bo[O_STATE].owned, R, z.N * z.HV, z.V, z.K);
        else kla__convert(t->state.data, t->state.dtype, bo[O_STATE].owned, R, z.nst);
    }
    if (!r && op == OP_DECODE && bo[O_ASTATE].owned)
        kla__convert(t->astate.data, t->astate.dtype, bo[O_ASTATE].owned, R, so[O_ASTATE].n);
    if (r == KLA_ENOMEM) r = kla__fail(ctx, r, "out of memory for the converted tensors");

    int computed = 0;
    if (!r) {
        kla_io io = { .algo = opt->algo, .q = bi[I_Q].ptr, .k = bi[I_K].ptr, .v = bi[I_V].ptr,
                      .g = bi[I_G].ptr, .a = bi[I_A].ptr, .h0 = bi[I_H0].ptr, .dout = bi[I_DO].ptr,
                      .dht = bi[I_DHT].ptr, .o = bo[O_O].ptr, .ht = bo[O_HT].ptr, .dq = bo[O_DQ].ptr,
                      .dk = bo[O_DK].ptr, .dv = bo[O_DV].ptr, .dg = bo[O_DG].ptr, .da = bo[O_DA].ptr,
                      .dh0 = bo[O_DH0].ptr, .g_atk = bi[I_GATK].ptr, .beta_atk = bi[I_BATK].ptr,
                      .log_atk_scale = bi[I_LATK].ptr, .a0 = bi[I_A0].ptr, .dat = bi[I_DAT].ptr,
                      .at = bo[O_AT].ptr, .dg_atk = bo[O_DGATK].ptr, .dbeta_atk = bo[O_DBATK].ptr,
                      .dlog_atk_scale = bo[O_DLATK].ptr, .da0 = bo[O_DA0].ptr, .state = bo[O_STATE].ptr,
                      .astate = bo[O_ASTATE].ptr, .resident = resident, .f16 = r16[0] | raw16[0],
                      .bf16 = r16[1] | raw16[1] };
        void *st = ctx->state;
        if (op == OP_FORWARD) r = ctx->be->forward(st, &p, &io);
        else if (op == OP_BACKWARD) r = ctx->be->backward(st, &p, &io);
        else if (op == OP_DECODE) r = ctx->be->decode(st, &p, &io);
        else if (kst->h) io.state = kst->h, r = ctx->be->decode_state(st, &p, &io);
        else io.state = kst->host, io.astate = kst->ahost, r = ctx->be->decode(st, &p, &io);
        if (r < 0 && !ctx->detail[0])
            kla__fail(ctx, r, "backend %s: %s", ctx->be->name, kla_strerror(r));
        computed = !r;
        /* finite inputs gave non-finite outputs: an error, in the order of the outputs; the
         * state of a KlaState is checked through o */
        int bad = -1;
        for (int i = 0; i < NOUT && !r; i++)
            if (!outs[i].buffer &&
                (r = check_finite_out(ctx, &so[i], bo[i].ptr, bo[i].ptr == outs[i].data ? outs[i].dtype : R)))
                bad = i;
        /* a chunkwise run spreads a non-finite value over its chunk, earlier tokens too:
         * the recurrent algorithm on the same inputs names the token where it arose */
        if (r == KLA_ERANGE && (bad == O_O || bad == O_HT) && io.algo == KLA_ALGO_CHUNK)
            locate_recurrent(ctx, &p, &io, so);
        if (!r && !decode) ctx->last_algo = (KlaAlgo)io.algo;
    }
    if (computed)
        for (int i = 0; i < NOUT; i++) out_finish(outs[i], so[i].n, R, so[i].vk, &z, &bo[i]);

    for (int i = 0; i < NIN; i++) free(bi[i].owned);
    for (int i = 0; i < NOUT; i++) free(bo[i].owned);
    free(cu);
    return r;
}

static int run(KlaContext *ctx, const KlaShape *shape, const KlaOptions *opt,
               const KlaTensors *t, op_kind op, KlaState *kst)
{
    static const char *const what[] = { "kla_forward", "kla_backward", "kla_decode", "kla_decode_state" };
    if (!ctx) return KLA_EINVAL;
    int r = kla__enter(ctx, what[op]);
    if (r) return r;
    return kla__leave(ctx, run_checked(ctx, shape, opt, t, op, kst));
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

KlaAlgo kla_last_algo(const KlaContext *ctx) { return ctx ? ctx->last_algo : KLA_ALGO_AUTO; }

const char *kla_describe(const KlaContext *ctx, char *out, size_t len)
{
    if (!out || !len) return out;
    if (!ctx) {
        snprintf(out, len, "none");
        return out;
    }
    char more[200] = "";
    if (ctx->be->describe) ctx->be->describe(ctx->state, more, sizeof more);
    snprintf(out, len, "%s%s%s", ctx->be->name, more[0] ? ": " : "", more);
    return out;
}

int kla_decode_state(KlaContext *ctx, const KlaShape *s, const KlaOptions *o, const KlaTensors *t, KlaState *st)
{
    return run(ctx, s, o, t, OP_DECODE_STATE, st);
}

/* ---- the reference backends ------------------------------------------------------------ */

static int always(void) { return 1; }

/* The library's untyped tensors as the reference's typed struct. */
#define REF_IO(R, x)                                                                                  \
    {                                                                                                 \
        .q = (x)->q, .k = (x)->k, .v = (x)->v, .g = (x)->g, .a = (x)->a, .h0 = (x)->h0,               \
        .dout = (x)->dout, .dht = (x)->dht, .g_atk = (x)->g_atk, .beta_atk = (x)->beta_atk,           \
        .log_atk_scale = (x)->log_atk_scale, .a0 = (x)->a0, .dat = (x)->dat, .o = (x)->o,             \
        .ht = (x)->ht, .at = (x)->at, .dq = (x)->dq, .dk = (x)->dk, .dv = (x)->dv, .dg = (x)->dg,     \
        .da = (x)->da, .dh0 = (x)->dh0, .dg_atk = (x)->dg_atk, .dbeta_atk = (x)->dbeta_atk,           \
        .dlog_atk_scale = (x)->dlog_atk_scale, .da0 = (x)->da0, .state = (x)->state,                  \
        .astate = (x)->astate,                                                                        \
    }

#define REF_BACKEND(R, sfx, NAME, DT)                                                          \
    static int ref_fwd_##sfx(void *st, const kla_problem *p, kla_io *x)                        \
    {                                                                                          \
        (void)st;                                                                              \
        x->algo = x->algo == KLA_ALGO_CHUNK ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;             \
        const kla_ref_io_##sfx y = REF_IO(R, x);                                               \
        return kla_ref_forward_##sfx(p, x->algo, &y);                                          \
    }                                                                                          \
    static int ref_bwd_##sfx(void *st, const kla_problem *p, kla_io *x)                        \
    {                                                                                          \
        (void)st;                                                                              \
        x->algo = x->algo == KLA_ALGO_CHUNK ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;             \
        const kla_ref_io_##sfx y = REF_IO(R, x);                                               \
        return kla_ref_backward_##sfx(p, x->algo, &y);                                         \
    }                                                                                          \
    static int ref_dec_##sfx(void *st, const kla_problem *p, kla_io *x)                        \
    {                                                                                          \
        (void)st;                                                                              \
        const kla_ref_io_##sfx y = REF_IO(R, x);                                               \
        return kla_ref_decode_##sfx(p, &y);                                                    \
    }                                                                                          \
    const kla_backend kla_backend_##NAME = { .name = #NAME, .real = DT,                        \
                                             .variants = KLA_VARIANT_CHANNEL | KLA_VARIANT_ATK,  \
                                             .usable = always, .forward = ref_fwd_##sfx,       \
                                             .backward = ref_bwd_##sfx, .decode = ref_dec_##sfx };

REF_BACKEND(float, f32, ref, KLA_F32)
REF_BACKEND(double, f64, ref64, KLA_F64)
