/*
 * kla_internal.h: the dispatch table every backend fills, and the context.
 *
 * The glue (api.c) validates a call, builds a kla_problem, converts inputs to the
 * backend's dtype (and the state to the KV layout, unless the backend takes VK), calls
 * the backend, and converts outputs back. Backends see only valid, dense data.
 */
#ifndef KLA_INTERNAL_H
#define KLA_INTERNAL_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>

#include "kla.h"
#include "kla_ref.h"
#include "half.h"

/* One call's tensors, in the backend's dtype (states in the KV layout unless the
 * backend takes VK). Optional pointers may be NULL as in kla_ref.h. */
typedef struct kla_io {
    int algo; /* in: KLA_ALGO_AUTO, RECURRENT or CHUNK; out: the one that ran */
    const void *q, *k, *v, *g, *a; /* a: eta (mode kla) or beta (mode gdn) */
    const void *h0, *dout, *dht;
    const void *g_atk, *beta_atk, *log_atk_scale, *a0, *dat; /* precond ATK */
    void *o, *ht, *dq, *dk, *dv, *dg, *da, *dh0;
    void *at, *dg_atk, *dbeta_atk, *dlog_atk_scale, *da0; /* precond ATK */
    void *state;  /* decode: the host states [N, HV, K, V]; decode_state: the backend's handle */
    void *astate; /* decode with precond ATK: the ATK states [N, H, K], read and updated */
    /* KLA_R_* bits: that tensor is a backend memory handle (a KlaBuffer's h), not host
     * memory; only for backends with mem_new, never for the family's tensors */
    unsigned resident;
    /* KLA_R_* bits of tensors in 16 bits (IEEE binary16, bfloat16), as handles (resident)
     * or as the caller's host data (uint16_t); never states; only for backends with dev16 */
    unsigned f16, bf16;
} kla_io;

enum {
    KLA_R_Q = 1 << 0, KLA_R_K = 1 << 1, KLA_R_V = 1 << 2, KLA_R_G = 1 << 3, KLA_R_A = 1 << 4,
    KLA_R_H0 = 1 << 5, KLA_R_DO = 1 << 6, KLA_R_DHT = 1 << 7, KLA_R_O = 1 << 8, KLA_R_HT = 1 << 9,
    KLA_R_DQ = 1 << 10, KLA_R_DK = 1 << 11, KLA_R_DV = 1 << 12, KLA_R_DG = 1 << 13, KLA_R_DA = 1 << 14,
    KLA_R_DH0 = 1 << 15, KLA_R_STATE = 1 << 16
};

/* A tensor kept by the backend (kla_buffer_new): its memory handle h (backends with
 * mem_new) or host memory in dtype. */
struct KlaBuffer {
    KlaContext *ctx;
    KlaDtype dtype;
    int64_t numel;
    void *host;
    void *h;
};



typedef struct kla_backend {
    const char *name;
    KlaDtype real;  /* KLA_F32 or KLA_F64: the dtype of every real tensor it takes */
    unsigned variants; /* KLA_VARIANT_* it runs (kla.h); the glue refuses the others */
    int (*usable)(void);    /* 1 when it can run on this machine */
    /* optional per-context state (device handles, thread pools) */
    int (*open)(void **state, const KlaParams *params, char *err, size_t errlen);
    void (*close)(void *state);
    /* optional: the settings in effect, one line ("avx512, 2 threads") */
    void (*describe)(void *state, char *buf, size_t len);
    /* forward reads q k v g a h0 and writes o ht; backward also reads dout dht and writes
     * dq dk dv dg da dh0; decode reads q k v g a, reads and updates state, writes o.
     * Each sets io->algo to the algorithm it ran. Return 0 or KLA_E* (with a message
     * through kla__fail when there is more to say than the code). */
    int (*forward)(void *state, const kla_problem *p, kla_io *io);
    int (*backward)(void *state, const kla_problem *p, kla_io *io);
    int (*decode)(void *state, const kla_problem *p, kla_io *io);
    /* optional, GPU backends: kla_gpu_time of the last call that succeeded */
    int (*gpu_time)(void *state, double *ms, const char **names, int max);
    /* optional: memory of the backend's own, for KlaState and KlaBuffer (all four, or
     * none: then the glue keeps states and buffers in host memory and calls decode).
     * mem_new makes a zeroed block of `bytes`; mem_copy moves `bytes` between host (the
     * backend's dtype, states in the KV layout) and the handle; decode_state is decode with
     * io->state the handle. forward, backward and decode take handles where io->resident
     * says so. */
    int (*mem_new)(void *state, int64_t bytes, void **h);
    void (*mem_free)(void *state, void *h);
    int (*mem_copy)(void *state, void *h, void *host, int64_t bytes, int to_backend);
    int (*decode_state)(void *state, const kla_problem *p, kla_io *io);
    /* optional, vulkan: a context on the application's device (KlaVulkanDevice), a handle
     * for the application's buffer, the buffer behind a handle */
    int (*open_external)(void **state, const KlaParams *params, const KlaVulkanDevice *dev, char *err,
                         size_t errlen);
    int (*mem_wrap)(void *state, uint64_t buffer, uint64_t offset, int64_t bytes, void **h);
    int dev16; /* its memory also holds F16 and BF16 tensors (not states), widened on the device */
    void (*mem_handle)(void *h, uint64_t *buffer, uint64_t *offset);
} kla_backend;

extern const kla_backend kla_backend_ref;
extern const kla_backend kla_backend_ref64;
#ifdef KLA_HAVE_SIMD
extern const kla_backend kla_backend_simd;
#endif
#ifdef KLA_HAVE_VULKAN
extern const kla_backend kla_backend_vulkan;
#endif

struct KlaContext {
    const kla_backend *be;
    void *state;
    KlaParams params;
    char detail[512];
    atomic_int busy; /* 1 while a call runs: a second thread gets KLA_EBUSY */
    KlaAlgo last_algo;
};

/* Backends report why a call failed through this: the message of the context whose
 * backend state is `state` (kla__fail on it). Set by the glue for the call's duration. */
extern _Thread_local KlaContext *kla__current;

/* Records a message for kla_error_detail and returns err. */
int kla__fail(KlaContext *ctx, int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* The same for calls without a context (kla_open, kla_file_*): kla_error_detail(NULL).
 * kla__noclear empties it at the start of such a call. */
int kla__nofail(int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void kla__noclear(void);

/* A KlaState (api.c, memory.c). */
struct KlaState {
    KlaContext *ctx;
    int64_t N, HV, K, V, n; /* n = N HV K V */
    void *host;             /* backends without state hooks: backend dtype, KV layout */
    void *h;                /* else the backend's handle */
    int64_t H, na;          /* kla_state_new_atk: key heads, na = N H K; else 0 */
    void *ahost;            /* the ATK states [N, H, K], backend dtype (host memory) */
};

/* The glue's helpers (api.c), shared with memory.c. enter/leave bracket every call on a
 * context (KLA_EBUSY from a second thread, the error message); need_numel checks a
 * tensor's element count against its shape; convert and transpose move real tensors
 * between dtypes (and the VK and KV state layouts). */
int kla__enter(KlaContext *ctx, const char *what);
int kla__leave(KlaContext *ctx, int r);
size_t kla__dsize(KlaDtype d);
int kla__is_real(KlaDtype d);
int kla__mul(int64_t a, int64_t b, int64_t *r);
int kla__mul4(int64_t a, int64_t b, int64_t c, int64_t d, int64_t *r);
int kla__need_numel(KlaContext *ctx, const char *name, const void *data, int64_t given, const char *dims,
                    const int64_t *shape, int ndim);
void kla__convert(const void *src, KlaDtype sd, void *dst, KlaDtype dd, int64_t n);
void kla__transpose(const void *src, KlaDtype sd, void *dst, KlaDtype dd, int64_t M, int64_t R, int64_t Cc);

/* Checks that every element of a real tensor is finite, and <= 0 when sign < 0, >= 0
 * when sign > 0; the message names the tensor and the index. */
int kla__check_values(KlaContext *ctx, const char *name, KlaIn t, const int64_t *shape,
                      int ndim, int sign);

#endif
