/*
 * memory.c: tensors and states kept by the backend: KlaState (decode states) and
 * KlaBuffer (any tensor of a call), in the backend's memory (mem_new) or in host memory.
 * The calls that use them are in api.c (resolve_buffers, run_checked).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kla_internal.h"

/* ---- KlaState --------------------------------------------------------------------------- */

static int state_new(KlaContext *ctx, int64_t N, int64_t HV, int64_t K, int64_t V, KlaState **out)
{
    const char *what[] = { "N", "HV", "K", "V" };
    const int64_t d[] = { N, HV, K, V };
    for (int i = 0; i < 4; i++)
        if (d[i] <= 0) return kla__fail(ctx, KLA_EINVAL, "KlaState: %s = %lld, must be > 0", what[i], (long long)d[i]);
    int64_t n;
    if (!kla__mul4(N, HV, K, V, &n)) return kla__fail(ctx, KLA_ENOMEM, "KlaState: sizes overflow");
    KlaState *st = calloc(1, sizeof *st);
    if (!st) return kla__fail(ctx, KLA_ENOMEM, "KlaState: out of memory");
    *st = (KlaState){ .ctx = ctx, .N = N, .HV = HV, .K = K, .V = V, .n = n };
    const int64_t bytes = n * (int64_t)kla__dsize(ctx->be->real);
    int r = 0;
    if (ctx->be->mem_new) r = ctx->be->mem_new(ctx->state, bytes, &st->h);
    else if (!(st->host = calloc((size_t)n, kla__dsize(ctx->be->real)))) r = KLA_ENOMEM;
    if (r) {
        free(st);
        if (ctx->detail[0]) return r;
        return kla__fail(ctx, r, "KlaState: %lld bytes on backend %s: %s", (long long)bytes, ctx->be->name,
                         kla_strerror(r));
    }
    *out = st;
    return 0;
}

int kla_state_new(KlaContext *ctx, int64_t N, int64_t HV, int64_t K, int64_t V, KlaState **out)
{
    if (out) *out = NULL;
    if (!ctx) return KLA_EINVAL;
    int r = kla__enter(ctx, "kla_state_new");
    if (r) return r;
    if (!out) return kla__leave(ctx, kla__fail(ctx, KLA_EINVAL, "KlaState: NULL result pointer"));
    return kla__leave(ctx, state_new(ctx, N, HV, K, V, out));
}

int kla_state_new_atk(KlaContext *ctx, int64_t N, int64_t H, int64_t HV, int64_t K, int64_t V, KlaState **out)
{
    if (out) *out = NULL;
    if (!ctx) return KLA_EINVAL;
    int r = kla__enter(ctx, "kla_state_new_atk");
    if (r) return r;
    if (!out) return kla__leave(ctx, kla__fail(ctx, KLA_EINVAL, "KlaState: NULL result pointer"));
    if (!(ctx->be->variants & KLA_VARIANT_ATK))
        return kla__leave(ctx, kla__fail(ctx, KLA_ENOSYS, "KlaState: backend %s does not run precond atk yet (backends "
                                    "ref and ref64 do)", ctx->be->name));
    if (H <= 0 || HV <= 0 || HV % H)
        return kla__leave(ctx, kla__fail(ctx, KLA_EINVAL, "KlaState: H = %lld, must be > 0 and divide HV = %lld",
                                    (long long)H, (long long)HV));
    int64_t na;
    if (!kla__mul4(N > 0 ? N : 1, H, K > 0 ? K : 1, 1, &na)) return kla__leave(ctx, kla__fail(ctx, KLA_ENOMEM, "KlaState: sizes overflow"));
    KlaState *st = NULL;
    if ((r = state_new(ctx, N, HV, K, V, &st))) return kla__leave(ctx, r);
    st->H = H, st->na = na;
    /* a backend running the family keeps states on the host (no state hooks) */
    if (!(st->ahost = calloc((size_t)na, kla__dsize(ctx->be->real)))) {
        kla_state_free(&st);
        return kla__leave(ctx, kla__fail(ctx, KLA_ENOMEM, "KlaState: out of memory for the ATK state"));
    }
    *out = st;
    return kla__leave(ctx, 0);
}

/* the ATK state <-> a caller's [N, H, K] tensor */
static int state_atk_xfer(KlaState *st, void *data, KlaDtype dt, int64_t numel, int to_state)
{
    KlaContext *ctx = st->ctx;
    const char *name = to_state ? "src" : "dst";
    if (!st->ahost)
        return kla__fail(ctx, KLA_EINVAL, "KlaState: made without an ATK state (kla_state_new_atk makes one)");
    if (!data) return kla__fail(ctx, KLA_EINVAL, "KlaState: %s is NULL", name);
    if (!kla__is_real(dt))
        return kla__fail(ctx, KLA_EINVAL, "KlaState: %s has dtype %d, expected F32, F64, F16 or BF16", name, (int)dt);
    const int64_t sh[] = { st->N, st->H, st->K };
    int r = kla__need_numel(ctx, name, data, numel, "[N, H, K]", sh, 3);
    if (r) return r;
    if (to_state && (r = kla__check_values(ctx, "astate", KLA_IN(data, dt, numel), sh, 3, 1))) return r;
    if (to_state) kla__convert(data, dt, st->ahost, ctx->be->real, st->na);
    else kla__convert(st->ahost, ctx->be->real, data, dt, st->na);
    return 0;
}

int kla_state_write_atk(KlaState *st, KlaIn src)
{
    if (!st) return KLA_EINVAL;
    int r = kla__enter(st->ctx, "kla_state_write_atk");
    if (r) return r;
    return kla__leave(st->ctx, state_atk_xfer(st, (void *)src.data, src.dtype, src.numel, 1));
}

int kla_state_read_atk(KlaState *st, KlaOut dst)
{
    if (!st) return KLA_EINVAL;
    int r = kla__enter(st->ctx, "kla_state_read_atk");
    if (r) return r;
    return kla__leave(st->ctx, state_atk_xfer(st, dst.data, dst.dtype, dst.numel, 0));
}

void kla_state_free(KlaState **st)
{
    if (!st || !*st) return;
    if ((*st)->h) (*st)->ctx->be->mem_free((*st)->ctx->state, (*st)->h);
    free((*st)->ahost);
    free((*st)->host);
    free(*st);
    *st = NULL;
}

/* state <-> a caller's tensor of the given dtype and layout (to_state: write) */
static int state_xfer(KlaState *st, void *data, KlaDtype dt, int64_t numel, KlaStateLayout layout,
                      int to_state)
{
    KlaContext *ctx = st->ctx;
    const char *name = to_state ? "src" : "dst";
    if (!data) return kla__fail(ctx, KLA_EINVAL, "KlaState: %s is NULL", name);
    if (!kla__is_real(dt))
        return kla__fail(ctx, KLA_EINVAL, "KlaState: %s has dtype %d, expected F32, F64, F16 or BF16", name, (int)dt);
    if (layout != KLA_LAYOUT_KV && layout != KLA_LAYOUT_VK)
        return kla__fail(ctx, KLA_EINVAL, "KlaState: layout %d is neither KV nor VK", (int)layout);
    const int vk = layout == KLA_LAYOUT_VK;
    const int64_t sh[] = { st->N, st->HV, vk ? st->V : st->K, vk ? st->K : st->V };
    int r = kla__need_numel(ctx, name, data, numel, vk ? "[N, HV, V, K]" : "[N, HV, K, V]", sh, 4);
    if (r) return r;
    const KlaDtype R = ctx->be->real;
    if (to_state && (r = kla__check_values(ctx, "state", KLA_IN(data, dt, numel), sh, 4, 0))) return r;
    void *tmp = st->h ? malloc((size_t)st->n * kla__dsize(R)) : st->host;
    if (!tmp) return kla__fail(ctx, KLA_ENOMEM, "KlaState: out of memory");
    if (to_state) {
        if (vk) kla__transpose(data, dt, tmp, R, st->N * st->HV, st->V, st->K);
        else kla__convert(data, dt, tmp, R, st->n);
        if (st->h) r = ctx->be->mem_copy(ctx->state, st->h, tmp, st->n * (int64_t)kla__dsize(R), 1);
    } else {
        if (st->h) r = ctx->be->mem_copy(ctx->state, st->h, tmp, st->n * (int64_t)kla__dsize(R), 0);
        if (!r && vk) kla__transpose(tmp, R, data, dt, st->N * st->HV, st->K, st->V);
        else if (!r) kla__convert(tmp, R, data, dt, st->n);
    }
    if (st->h) free(tmp);
    if (r && !ctx->detail[0]) kla__fail(ctx, r, "KlaState: copy on backend %s: %s", ctx->be->name, kla_strerror(r));
    return r;
}

static int state_call(KlaState *st, void *data, KlaDtype dt, int64_t numel, KlaStateLayout layout,
                      int to_state)
{
    if (!st) return KLA_EINVAL;
    int r = kla__enter(st->ctx, to_state ? "kla_state_write" : "kla_state_read");
    if (r) return r;
    return kla__leave(st->ctx, state_xfer(st, data, dt, numel, layout, to_state));
}

int kla_state_write(KlaState *st, KlaIn src, KlaStateLayout layout)
{
    return state_call(st, (void *)src.data, src.dtype, src.numel, layout, 1);
}

int kla_state_read(KlaState *st, KlaOut dst, KlaStateLayout layout)
{
    return state_call(st, dst.data, dst.dtype, dst.numel, layout, 0);
}


/* ---- KlaBuffer ---------------------------------------------------------------------------- */

static int buffer_make(KlaContext *ctx, KlaDtype dt, int64_t numel, KlaBuffer **out, int wrap, uint64_t vkb,
                       uint64_t off)
{
    if (!out) return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: NULL result pointer");
    if (!kla__is_real(dt))
        return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: dtype %d, must be KLA_F32, KLA_F64, KLA_F16 or KLA_BF16", (int)dt);
    if (numel <= 0 || numel > INT64_MAX / 8)
        return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: numel = %lld, must be > 0", (long long)numel);
    const int dev = ctx->be->mem_new != NULL, half = dt == KLA_F16 || dt == KLA_BF16;
    if ((dev || wrap) && dt != ctx->be->real && !(half && ctx->be->dev16))
        return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: backend %s keeps %s%s buffers (dtype %d given)", ctx->be->name,
                         ctx->be->real == KLA_F32 ? "KLA_F32" : "KLA_F64",
                         ctx->be->dev16 ? ", KLA_F16 and KLA_BF16" : "", (int)dt);
    if (wrap && half && numel % 2)
        return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: a 16-bit Vulkan buffer of the application holds an even count "
                         "(the device reads 32-bit words), %lld given", (long long)numel);
    if (wrap && !ctx->be->mem_wrap)
        return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: backend %s does not take Vulkan buffers", ctx->be->name);
    KlaBuffer *b = calloc(1, sizeof *b);
    if (!b) return kla__fail(ctx, KLA_ENOMEM, "KlaBuffer: out of memory");
    *b = (KlaBuffer){ .ctx = ctx, .dtype = dt, .numel = numel };
    const int64_t bytes = numel * (int64_t)kla__dsize(dt);
    int r = 0;
    if (wrap) r = ctx->be->mem_wrap(ctx->state, vkb, off, bytes, &b->h);
    else if (dev) r = ctx->be->mem_new(ctx->state, bytes, &b->h);
    else if (!(b->host = calloc((size_t)numel, kla__dsize(dt)))) r = KLA_ENOMEM;
    if (r) {
        free(b);
        if (ctx->detail[0]) return r;
        return kla__fail(ctx, r, "KlaBuffer: %lld bytes on backend %s: %s", (long long)bytes, ctx->be->name,
                         kla_strerror(r));
    }
    *out = b;
    return 0;
}

int kla_buffer_new(KlaContext *ctx, KlaDtype dtype, int64_t numel, KlaBuffer **b)
{
    if (b) *b = NULL;
    if (!ctx) return KLA_EINVAL;
    int r = kla__enter(ctx, "kla_buffer_new");
    return r ? r : kla__leave(ctx, buffer_make(ctx, dtype, numel, b, 0, 0, 0));
}

int kla_buffer_wrap_vulkan(KlaContext *ctx, uint64_t vk_buffer, uint64_t offset, KlaDtype dtype, int64_t numel,
                           KlaBuffer **b)
{
    if (b) *b = NULL;
    if (!ctx) return KLA_EINVAL;
    int r = kla__enter(ctx, "kla_buffer_wrap_vulkan");
    if (r) return r;
    if (!vk_buffer) return kla__leave(ctx, kla__fail(ctx, KLA_EINVAL, "KlaBuffer: VK_NULL_HANDLE given"));
    return kla__leave(ctx, buffer_make(ctx, dtype, numel, b, 1, vk_buffer, offset));
}

int kla_buffer_vulkan_handle(const KlaBuffer *b, uint64_t *vk_buffer, uint64_t *offset)
{
    if (!b || !vk_buffer || !offset || !b->h || !b->ctx->be->mem_handle) return KLA_EINVAL;
    b->ctx->be->mem_handle(b->h, vk_buffer, offset);
    return 0;
}

void kla_buffer_free(KlaBuffer **b)
{
    if (!b || !*b) return;
    if ((*b)->h) (*b)->ctx->be->mem_free((*b)->ctx->state, (*b)->h);
    free((*b)->host);
    free(*b);
    *b = NULL;
}

int64_t kla_buffer_numel(const KlaBuffer *b) { return b ? b->numel : 0; }
KlaDtype kla_buffer_dtype(const KlaBuffer *b) { return b ? b->dtype : KLA_F32; }

/* host <-> buffer, converting dtypes */
static int buffer_xfer(KlaBuffer *b, void *data, KlaDtype dt, int64_t numel, int to_buf)
{
    KlaContext *ctx = b->ctx;
    const char *name = to_buf ? "src" : "dst";
    if (!data) return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: %s is NULL (host memory expected)", name);
    if (!kla__is_real(dt))
        return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: %s has dtype %d, expected F32, F64, F16 or BF16", name, (int)dt);
    if (numel != b->numel)
        return kla__fail(ctx, KLA_EINVAL, "KlaBuffer: %s holds %lld elements, the buffer %lld", name,
                         (long long)numel, (long long)b->numel);
    if (b->host) {
        if (to_buf) kla__convert(data, dt, b->host, b->dtype, numel);
        else kla__convert(b->host, b->dtype, data, dt, numel);
        return 0;
    }
    const int64_t bytes = numel * (int64_t)kla__dsize(b->dtype);
    void *tmp = dt == b->dtype ? data : malloc((size_t)bytes);
    if (!tmp) return kla__fail(ctx, KLA_ENOMEM, "KlaBuffer: out of memory");
    if (to_buf && tmp != data) kla__convert(data, dt, tmp, b->dtype, numel);
    int r = ctx->be->mem_copy(ctx->state, b->h, tmp, bytes, to_buf);
    if (!r && !to_buf && tmp != data) kla__convert(tmp, b->dtype, data, dt, numel);
    if (tmp != data) free(tmp);
    if (r && !ctx->detail[0]) kla__fail(ctx, r, "KlaBuffer: copy on backend %s: %s", ctx->be->name, kla_strerror(r));
    return r;
}

int kla_buffer_write(KlaBuffer *b, KlaIn src)
{
    if (!b) return KLA_EINVAL;
    int r = kla__enter(b->ctx, "kla_buffer_write");
    if (r) return r;
    if (src.buffer) return kla__leave(b->ctx, kla__fail(b->ctx, KLA_EINVAL, "KlaBuffer: src must be host memory"));
    return kla__leave(b->ctx, buffer_xfer(b, (void *)src.data, src.dtype, src.numel, 1));
}

int kla_buffer_read(KlaBuffer *b, KlaOut dst)
{
    if (!b) return KLA_EINVAL;
    int r = kla__enter(b->ctx, "kla_buffer_read");
    if (r) return r;
    if (dst.buffer) return kla__leave(b->ctx, kla__fail(b->ctx, KLA_EINVAL, "KlaBuffer: dst must be host memory"));
    return kla__leave(b->ctx, buffer_xfer(b, dst.data, dst.dtype, dst.numel, 0));
}

