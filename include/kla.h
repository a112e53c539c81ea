/*
 * kla.h: the public API of libkla, Kaczmarz Linear Attention (KLA) and Gated DeltaNet.
 *
 * The operator (../shared/kla-spec.md, docs/algorithm.md) for one sequence and one value
 * head, t = 1..T, state S in R^{K x V}:
 *
 *     S   <- exp(g_t) * S                      decay first
 *     e_t  = v_t - S^T k_t                      residual against the decayed state
 *     S    = S + beta_t * k_t e_t^T             delta-rule step
 *     o_t  = S^T (scale * q_t)                  read the updated state
 *
 * with beta_t = eta_t / (||k_t||^2 + eps) in mode KLA and beta_t given in mode GDN.
 *
 * Use:
 *     KlaParams p;  kla_default_params(&p);  p.backend = "ref";
 *     KlaContext *ctx;  if (kla_open(&ctx, &p) < 0) ...
 *     KlaShape s = { .B = 1, .T = 4096, .H = 16, .HV = 16, .K = 128, .V = 128 };
 *     KlaOptions opt;  kla_default_options(&opt);
 *     KlaTensors t = { .q = KLA_F32_IN(q), .k = KLA_F32_IN(k), .v = KLA_F32_IN(v),
 *                      .eta = KLA_F32_IN(eta), .o = KLA_F32_OUT(o) };
 *     int r = kla_forward(ctx, &s, &opt, &t);
 *     if (r < 0) fprintf(stderr, "%s\n", kla_error_detail(ctx));
 *     kla_close(&ctx);
 *
 * Conventions: tensors are dense, row-major (last index fastest), float32 or float64 for
 * real-valued tensors (each tensor may have its own dtype), int32 or int64 for cu_seqlens.
 * Inputs are never modified. Every function returns 0 or a negative error code (KLA_E*);
 * on error no output buffer has been written, and kla_error_detail() names the tensor
 * and the problem. A context is not thread-safe: use one per thread.
 */
#ifndef KLA_H
#define KLA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(KLA_BUILDING_DLL)
#define KLA_API __declspec(dllexport)
#elif defined(__GNUC__)
#define KLA_API __attribute__((visibility("default")))
#else
#define KLA_API
#endif

#define KLA_VERSION_MAJOR 0
#define KLA_VERSION_MINOR 1
#define KLA_VERSION_PATCH 0

/* "0.1.0" */
KLA_API const char *kla_version(void);

/* ---- errors: negative errno values ------------------------------------------------ */
#define KLA_EINVAL (-22) /* bad argument: shape, option, missing or extra tensor */
#define KLA_ERANGE (-34) /* a value outside the domain: NaN, Inf, g > 0, bad cu_seqlens */
#define KLA_ENOMEM (-12) /* out of memory, or a size that overflows */
#define KLA_ENOSYS (-38) /* backend or operation not built into this library */
#define KLA_ENODEV (-19) /* backend built but unusable here (no CPU support, no GPU) */
#define KLA_EIO (-5)     /* device or runtime failure */

/* A short text for an error code ("invalid argument", ...). Never NULL. */
KLA_API const char *kla_strerror(int err);

/* ---- tensors ---------------------------------------------------------------------- */
typedef enum KlaDtype { KLA_F32 = 0, KLA_F64 = 1, KLA_I32 = 2, KLA_I64 = 3 } KlaDtype;

/* An input tensor: data == NULL means absent. Shapes come from KlaShape. */
typedef struct KlaIn {
    const void *data;
    KlaDtype dtype;
} KlaIn;

/* An output tensor: data == NULL means not wanted (where the output is optional). */
typedef struct KlaOut {
    void *data;
    KlaDtype dtype;
} KlaOut;

#define KLA_F32_IN(p) ((KlaIn){ (p), KLA_F32 })
#define KLA_F64_IN(p) ((KlaIn){ (p), KLA_F64 })
#define KLA_F32_OUT(p) ((KlaOut){ (p), KLA_F32 })
#define KLA_F64_OUT(p) ((KlaOut){ (p), KLA_F64 })

/* ---- the problem ------------------------------------------------------------------ */
typedef struct KlaShape {
    int64_t B;  /* batch; must be 1 with cu_seqlens */
    int64_t T;  /* tokens per batch row (total tokens with cu_seqlens) */
    int64_t H;  /* key heads (q and k) */
    int64_t HV; /* value heads, a multiple of H; value head hv reads key head hv / (HV/H) */
    int64_t K;  /* key and query dimension */
    int64_t V;  /* value dimension */
    int64_t N;  /* sequences: read only with cu_seqlens (which has N+1 entries); else N = B */
} KlaShape;

typedef enum KlaMode { KLA_MODE_KLA = 0, KLA_MODE_GDN = 1 } KlaMode;
typedef enum KlaStateLayout { KLA_LAYOUT_KV = 0, KLA_LAYOUT_VK = 1 } KlaStateLayout;
typedef enum KlaAlgo { KLA_ALGO_AUTO = 0, KLA_ALGO_RECURRENT = 1, KLA_ALGO_CHUNK = 2 } KlaAlgo;

typedef struct KlaOptions {
    KlaMode mode;                /* KLA: beta = eta / (||k||^2 + eps); GDN: beta given. Default KLA */
    double scale;                /* query scale; 0 means the default K^-1/2 */
    double eps;                  /* KLA step-size epsilon, >= 0. Default 1e-6 */
    int l2norm_q;                /* 1: q <- q / sqrt(||q||^2 + 1e-6) first. Default 0 */
    int l2norm_k;                /* same for k (before the KLA norm). Default 0 */
    KlaStateLayout state_layout; /* h0/ht/state as [.., K, V] (KV) or [.., V, K] (VK). Default KV */
    KlaAlgo algo;                /* recurrent, chunk, or AUTO (the backend's faster one). Default AUTO */
    int chunk_size;              /* 16, 32, 64 or 128. Default 64 */
} KlaOptions;

KLA_API void kla_default_options(KlaOptions *opt);

/*
 * All tensors of one call. Shapes (row-major):
 *   q, k, dq, dk        [B, T, H, K]
 *   v, o, dout, dv      [B, T, HV, V]
 *   g, eta, beta, dg, deta, dbeta   [B, T, HV]
 *   h0, ht, dht, dh0    [N, HV, K, V]  ([N, HV, V, K] with KLA_LAYOUT_VK)
 *   cu_seqlens          [N + 1], int32 or int64, cu[0] = 0, non-decreasing, cu[N] = T
 *   decode: q, k [N, H, K]; v, o [N, HV, V]; g, eta, beta [N, HV]; state [N, HV, K, V]
 */
typedef struct KlaTensors {
    /* inputs */
    KlaIn q, k, v;
    KlaIn g;          /* optional: zeros (no decay) when absent. Domain g <= 0 */
    KlaIn eta;        /* mode KLA: required; must be absent in mode GDN */
    KlaIn beta;       /* mode GDN: required; must be absent in mode KLA */
    KlaIn h0;         /* optional initial state: zeros when absent */
    KlaIn cu_seqlens; /* optional variable-length packing (B must be 1) */
    KlaIn dout;       /* backward: gradient of the loss with respect to o (required) */
    KlaIn dht;        /* backward: gradient with respect to ht (optional: zeros) */
    /* outputs */
    KlaOut o;         /* forward, backward, decode: required */
    KlaOut ht;        /* forward, backward: optional final states */
    KlaOut dq, dk, dv;  /* backward: required */
    KlaOut dg;          /* backward: optional (allowed without g: the gradient at g = 0) */
    KlaOut deta, dbeta; /* backward: the one matching the mode is required */
    KlaOut dh0;         /* backward: optional (allowed without h0: the gradient at h0 = 0) */
    /* decode only: states of the N sequences, read and updated in place */
    KlaOut state;
} KlaTensors;

/* ---- context ---------------------------------------------------------------------- */
typedef struct KlaContext KlaContext;

typedef struct KlaParams {
    /* "ref" (scalar float32), "ref64" (scalar float64), later "simd", "vulkan";
     * NULL or "auto" picks the fastest usable backend. Default NULL. */
    const char *backend;
    int threads;            /* worker threads for backends that use them; 0 = all cores */
    unsigned cpu_mask;      /* CPU feature levels allowed (KLA_CPU_*); default all */
    int gpu_device;         /* GPU index for GPU backends; -1 = automatic. Default -1 */
} KlaParams;

/* CPU feature levels, for KlaParams.cpu_mask and kla_cpu_flags(). */
#define KLA_CPU_AVX2 (1u << 0)   /* x86-64 AVX2 + FMA, with OS support for AVX state */
#define KLA_CPU_AVX512 (1u << 1) /* x86-64 AVX-512 F */
#define KLA_CPU_NEON (1u << 2)   /* aarch64 Advanced SIMD */
#define KLA_CPU_ALL (~0u)

KLA_API void kla_default_params(KlaParams *p);

/* Opens a context on the requested backend. *ctx is NULL on error. */
KLA_API int kla_open(KlaContext **ctx, const KlaParams *p);
/* Closes and sets *ctx to NULL; NULL and *ctx == NULL are fine. */
KLA_API void kla_close(KlaContext **ctx);

/* The backend the context runs ("ref", ...). */
KLA_API const char *kla_backend_name(const KlaContext *ctx);
/* What the last failing call on ctx said: the tensor and the problem. Never NULL.
 * With ctx == NULL: why this thread's last kla_open failed. */
KLA_API const char *kla_error_detail(const KlaContext *ctx);

/* 1 if backend `name` is built and usable here, 0 if built but unusable,
 * KLA_ENOSYS if not built or unknown. */
KLA_API int kla_backend_available(const char *name);
/* Names of the backends built into this library, in order of preference; NULL ends it. */
KLA_API const char *const *kla_backend_list(void);
/* CPU feature levels this machine supports (KLA_CPU_*). */
KLA_API unsigned kla_cpu_flags(void);

/* Vulkan devices, one line each "index: name (type)" into buf (truncated to len, NUL
 * terminated); returns their number, KLA_ENOSYS when the Vulkan backend is not built,
 * KLA_ENODEV when no loader or device is usable. The index is KlaParams.gpu_device. */
KLA_API int kla_vulkan_devices(char *buf, size_t len);

/* GPU time of the last call on ctx that succeeded, for benchmarks: ms[0] is all its
 * dispatches (host transfers excluded, names[0] = "all"), ms[i] its i-th dispatch, named
 * by the shader in names[i] (names may be NULL). Returns the entries written, at most max;
 * 0 on a CPU backend, a device without timestamps, or before a call has succeeded. */
KLA_API int kla_gpu_time(const KlaContext *ctx, double *ms, const char **names, int max);

/* ---- operations ------------------------------------------------------------------- */

/* o (and ht) for B sequences of T tokens, or N packed sequences. */
KLA_API int kla_forward(KlaContext *ctx, const KlaShape *shape, const KlaOptions *opt,
                        const KlaTensors *t);

/* The gradients of L = sum(dout * o) + sum(dht * ht) with respect to q, k, v, g, eta or
 * beta, and h0; also writes o and ht when given. dq/dk are with respect to the raw
 * inputs when l2norm flags are on. */
KLA_API int kla_backward(KlaContext *ctx, const KlaShape *shape, const KlaOptions *opt,
                         const KlaTensors *t);

/* One token for each of shape->B sequences (shape->T must be 1, no cu_seqlens): reads and
 * updates t->state, writes t->o. Equals kla_forward on the same token with h0 = state. */
KLA_API int kla_decode(KlaContext *ctx, const KlaShape *shape, const KlaOptions *opt,
                       const KlaTensors *t);

/* ---- decode states kept by the backend ---------------------------------------------- */

/* The states of N sequences, N x HV x K x V values, kept where the context's backend
 * computes (GPU memory for vulkan), so that a decode loop moves only each token's tensors
 * instead of the whole state every call. It belongs to ctx: free it before closing ctx.
 * A new state is zero. Errors are reported through kla_error_detail(ctx). */
typedef struct KlaState KlaState;
KLA_API int kla_state_new(KlaContext *ctx, int64_t N, int64_t HV, int64_t K, int64_t V,
                          KlaState **st);
/* Frees and sets *st to NULL; NULL and *st == NULL are fine. */
KLA_API void kla_state_free(KlaState **st);
/* Sets the state from src: [N, HV, K, V], or [N, HV, V, K] with KLA_LAYOUT_VK; F32 or F64;
 * every value finite. */
KLA_API int kla_state_write(KlaState *st, KlaIn src, KlaStateLayout layout);
/* Copies the state into dst (shape, dtype and layout as for kla_state_write). */
KLA_API int kla_state_read(KlaState *st, KlaOut dst, KlaStateLayout layout);
/* kla_decode reading and updating st instead of t->state (which must be absent); shape->B,
 * HV, K and V must be those of st. opt->state_layout does not apply. */
KLA_API int kla_decode_state(KlaContext *ctx, const KlaShape *shape, const KlaOptions *opt,
                             const KlaTensors *t, KlaState *st);

#ifdef __cplusplus
}
#endif

#endif /* KLA_H */
