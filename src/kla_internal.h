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
#include <stddef.h>

#include "kla.h"
#include "kla_ref.h"

typedef struct kla_backend {
    const char *name;
    KlaDtype real;  /* KLA_F32 or KLA_F64: the dtype of every real tensor it takes */
    int (*usable)(void);    /* 1 when it can run on this machine */
    /* optional per-context state (device handles, thread pools) */
    int (*open)(void **state, const KlaParams *params, char *err, size_t errlen);
    void (*close)(void *state);
    /* algo is KLA_ALGO_RECURRENT, KLA_ALGO_CHUNK or KLA_ALGO_AUTO (backend's choice);
     * optional pointers as in kla_ref.h. Return 0 or KLA_E*. */
    int (*forward)(void *state, const kla_problem *p, int algo, const void *q, const void *k,
                   const void *v, const void *g, const void *a, const void *h0, void *o,
                   void *ht);
    int (*backward)(void *state, const kla_problem *p, int algo, const void *q, const void *k,
                    const void *v, const void *g, const void *a, const void *h0,
                    const void *dout, const void *dht, void *o, void *ht, void *dq, void *dk,
                    void *dv, void *dg, void *da, void *dh0);
    int (*decode)(void *state, const kla_problem *p, const void *q, const void *k,
                  const void *v, const void *g, const void *a, void *S, void *o);
    /* optional, GPU backends: kla_gpu_time of the last call that succeeded */
    int (*gpu_time)(void *state, double *ms, const char **names, int max);
    /* optional: KlaState in the backend's own memory (all four, or none: then the glue keeps
     * the state in host memory, in the backend's dtype and the KV layout, and calls decode).
     * state_copy moves `bytes` between host (that layout and dtype) and the handle. */
    int (*state_new)(void *state, int64_t bytes, void **h);
    void (*state_free)(void *state, void *h);
    int (*state_copy)(void *state, void *h, void *host, int64_t bytes, int to_backend);
    int (*decode_state)(void *state, const kla_problem *p, const void *q, const void *k,
                        const void *v, const void *g, const void *a, void *h, void *o);
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
};

/* Records a message for kla_error_detail and returns err. */
int kla__fail(KlaContext *ctx, int err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Checks that every element of a real tensor is finite, and <= 0 when nonpos; the
 * message names the tensor and the index. */
int kla__check_values(KlaContext *ctx, const char *name, KlaIn t, const int64_t *shape,
                      int ndim, int nonpos);

#endif
