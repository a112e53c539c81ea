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
 * Use (every tensor with its element count):
 *     KlaParams p;  kla_default_params(&p);  p.backend = "ref";
 *     KlaContext *ctx;  if (kla_open(&ctx, &p) < 0) ...
 *     KlaShape s = { .B = 1, .T = 4096, .H = 16, .HV = 16, .K = 128, .V = 128 };
 *     int64_t nq = s.B * s.T * s.H * s.K, nv = s.B * s.T * s.HV * s.V, ng = s.B * s.T * s.HV;
 *     KlaOptions opt;  kla_default_options(&opt);
 *     KlaTensors t = { .q = KLA_F32_IN(q, nq), .k = KLA_F32_IN(k, nq), .v = KLA_F32_IN(v, nv),
 *                      .eta = KLA_F32_IN(eta, ng), .o = KLA_F32_OUT(o, nv) };
 *     int r = kla_forward(ctx, &s, &opt, &t);
 *     if (r < 0) fprintf(stderr, "%s\n", kla_error_detail(ctx));
 *     kla_close(&ctx);
 *
 * Conventions: tensors are dense, row-major (last index fastest), float32 or float64 for
 * real-valued tensors (each tensor may have its own dtype), int32 or int64 for cu_seqlens.
 * Inputs are never modified. Every function returns 0 or a negative error code (KLA_E*),
 * and kla_error_detail() names the tensor and the problem. An error found while checking
 * the call (shapes, sizes, options, values) leaves every output untouched; an error found
 * after computing (a non-finite result from finite inputs, KLA_ERANGE) leaves the outputs
 * holding what was computed, the decode state included.
 *
 * Threads: a context serves one call at a time. A call made while another thread is
 * inside a call on the same context (or on a KlaState of it) fails with KLA_EBUSY and
 * changes nothing; use one context per thread. Closing a context while another thread
 * uses it is undefined.
 */
#ifndef KLA_H
#define KLA_H

#include <math.h>
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
#define KLA_VERSION_MINOR 3
#define KLA_VERSION_PATCH 0

/* "0.4.0" */
KLA_API const char *kla_version(void);

/* ---- errors: negative errno values ------------------------------------------------ */
#define KLA_EINVAL (-22) /* bad argument: shape, option, missing or extra tensor */
#define KLA_ERANGE (-34) /* a value outside the domain: NaN, Inf, g > 0, bad cu_seqlens */
#define KLA_ENOMEM (-12) /* out of memory, or a size that overflows */
#define KLA_ENOSYS (-38) /* backend or operation not built into this library */
#define KLA_ENODEV (-19) /* backend built but unusable here (no CPU support, no GPU) */
#define KLA_EIO (-5)     /* device or runtime failure */
#define KLA_EBUSY (-16)  /* the context is in use by another thread */

/* A short text for an error code ("invalid argument", ...). Never NULL. */
KLA_API const char *kla_strerror(int err);

/* ---- tensors ---------------------------------------------------------------------- */
/* Real tensors may be F32, F64, F16 (IEEE binary16) or BF16 (bfloat16), in and out:
 * backends compute in float32 or float64 (16-bit inputs widened exactly, 16-bit outputs
 * rounded to nearest even). cu_seqlens is I32 or I64. */
typedef enum KlaDtype { KLA_F32 = 0, KLA_F64 = 1, KLA_I32 = 2, KLA_I64 = 3, KLA_F16 = 4, KLA_BF16 = 5 } KlaDtype;

typedef struct KlaBuffer KlaBuffer; /* a tensor kept by the backend: see "buffers" below */

/* An input tensor: data == NULL (and buffer == NULL) means absent. numel is the number of
 * elements the memory holds; every call checks it against the element count the shape
 * asks for and refuses a mismatch (naming the tensor, the expected shape and what was
 * given). With buffer set (KLA_BUF_IN), data must be NULL and dtype and numel are the
 * buffer's. */
typedef struct KlaIn {
    const void *data;
    KlaDtype dtype;
    int64_t numel;
    KlaBuffer *buffer;
} KlaIn;

/* An output tensor: data == NULL (and buffer == NULL) means not wanted (where the output
 * is optional). */
typedef struct KlaOut {
    void *data;
    KlaDtype dtype;
    int64_t numel;
    KlaBuffer *buffer;
} KlaOut;

#define KLA_IN(p, dt, n) ((KlaIn){ (p), (dt), (int64_t)(n), NULL })
#define KLA_OUT(p, dt, n) ((KlaOut){ (p), (dt), (int64_t)(n), NULL })
#define KLA_F32_IN(p, n) KLA_IN((p), KLA_F32, (n))
#define KLA_F64_IN(p, n) KLA_IN((p), KLA_F64, (n))
#define KLA_F32_OUT(p, n) KLA_OUT((p), KLA_F32, (n))
#define KLA_F64_OUT(p, n) KLA_OUT((p), KLA_F64, (n))
#define KLA_F16_IN(p, n) KLA_IN((p), KLA_F16, (n))   /* p: uint16_t, IEEE binary16 bits */
#define KLA_BF16_IN(p, n) KLA_IN((p), KLA_BF16, (n)) /* p: uint16_t, bfloat16 bits */
#define KLA_F16_OUT(p, n) KLA_OUT((p), KLA_F16, (n))
#define KLA_BF16_OUT(p, n) KLA_OUT((p), KLA_BF16, (n))
#define KLA_BUF_IN(b) ((KlaIn){ NULL, KLA_F32, 0, (b) })   /* a KlaBuffer as an input */
#define KLA_BUF_OUT(b) ((KlaOut){ NULL, KLA_F32, 0, (b) }) /* a KlaBuffer as an output */

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
/* The family (kla-spec.md section 7): decay per value head (GDN, KLA) or per key channel
 * (KDA); no preconditioner, or the diagonal ATK preconditioner (PDN, PGDN, PKDA). */
typedef enum KlaGate { KLA_GATE_HEAD = 0, KLA_GATE_CHANNEL = 1 } KlaGate;
typedef enum KlaPrecond { KLA_PRECOND_NONE = 0, KLA_PRECOND_ATK = 1 } KlaPrecond;

/* KlaOptions.scale when unset: K^-1/2. Any other value, 0 included, is used as given. */
#define KLA_SCALE_DEFAULT ((double)NAN)

typedef struct KlaOptions {
    KlaMode mode;                /* KLA: beta = eta / (||k||^2 + eps); GDN: beta given. Default KLA */
    double scale;                /* query scale, taken literally; KLA_SCALE_DEFAULT (NaN): K^-1/2 */
    double eps;                  /* KLA step-size epsilon, >= 0. Default 1e-6 */
    int l2norm_q;                /* 1: q <- q / sqrt(||q||^2 + 1e-6) first. Default 0 */
    int l2norm_k;                /* same for k (before the KLA norm). Default 0 */
    KlaStateLayout state_layout; /* h0/ht/state as [.., K, V] (KV) or [.., V, K] (VK). Default KV */
    KlaAlgo algo;                /* recurrent, chunk, or AUTO (the backend's faster one). Default AUTO */
    int chunk_size;              /* 16, 32, 64 or 128. Default 64 */
    KlaGate gate;                /* HEAD: g [.., HV]; CHANNEL: g [.., HV, K]. Default HEAD */
    KlaPrecond precond;          /* NONE or ATK (needs beta_atk). Default NONE */
    double squash_x;             /* ATK squash: the preconditioner lies in (1/x, x); > 1. Default 1.5 */
    double squash_eps;           /* ATK: r = ln(a + squash_eps) - log_atk_scale; > 0. Default 1e-6 */
} KlaOptions;

KLA_API void kla_default_options(KlaOptions *opt);

/*
 * All tensors of one call. Shapes (row-major):
 *   q, k, dq, dk        [B, T, H, K]
 *   v, o, dout, dv      [B, T, HV, V]
 *   g, eta, beta, dg, deta, dbeta   [B, T, HV]  (g, dg: [B, T, HV, K] with KLA_GATE_CHANNEL)
 *   h0, ht, dht, dh0    [N, HV, K, V]  ([N, HV, V, K] with KLA_LAYOUT_VK)
 *   cu_seqlens          [N + 1], int32 or int64, cu[0] = 0, non-decreasing, cu[N] = T
 *   precond ATK: g_atk, beta_atk, dg_atk, dbeta_atk [B, T, H]; log_atk_scale,
 *                dlog_atk_scale [H]; a0, at, dat, da0, astate [N, H, K]
 *   decode: q, k [N, H, K]; v, o [N, HV, V]; g, eta, beta [N, HV] (g [N, HV, K] per
 *           channel); g_atk, beta_atk [N, H]; state [N, HV, K, V]; astate [N, H, K]
 * With precond NONE every ATK tensor must be absent.
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
    KlaIn g_atk;      /* ATK: log decay of the ATK state, optional (zeros), <= 0 */
    KlaIn beta_atk;   /* ATK: required, the ATK state's write strength */
    KlaIn log_atk_scale; /* ATK: optional (each -0.2) */
    KlaIn a0;         /* ATK: optional initial ATK state (zeros) */
    KlaIn dat;        /* ATK backward: gradient with respect to at (optional: zeros) */
    /* outputs */
    KlaOut o;         /* forward, backward, decode: required */
    KlaOut ht;        /* forward, backward: optional final states */
    KlaOut dq, dk, dv;  /* backward: required */
    KlaOut dg;          /* backward: optional (allowed without g: the gradient at g = 0) */
    KlaOut deta, dbeta; /* backward: the one matching the mode is required */
    KlaOut dh0;         /* backward: optional (allowed without h0: the gradient at h0 = 0) */
    KlaOut at;          /* ATK, forward and backward: optional final ATK states */
    KlaOut dg_atk, dbeta_atk, dlog_atk_scale, da0; /* ATK backward: optional */
    /* decode only: states of the N sequences, read and updated in place */
    KlaOut state;
    KlaOut astate;      /* decode with ATK: the ATK states [N, H, K], read and updated */
} KlaTensors;

/* ---- context ---------------------------------------------------------------------- */
typedef struct KlaContext KlaContext;

typedef struct KlaParams {
    /* "ref" (scalar float32), "ref64" (scalar float64), later "simd", "vulkan";
     * NULL or "auto" picks the fastest usable backend. Default NULL. */
    const char *backend;
    int threads;            /* worker threads for backends that use them; 0 = all cores,
                             * at most KLA_MAX_THREADS */
    unsigned cpu_mask;      /* CPU feature levels allowed (KLA_CPU_*); default all. The
                             * environment's KLA_CPU_MASK (kla_cpu_mask_parse syntax)
                             * narrows it further (an empty value counts as unset);
                             * kla_open refuses a malformed one. */
    int gpu_device;         /* GPU index for GPU backends; -1 = automatic. Default -1 */
} KlaParams;

#define KLA_MAX_THREADS 1024

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
 * With ctx == NULL: why this thread's last kla_open or kla_file_* call failed. */
KLA_API const char *kla_error_detail(const KlaContext *ctx);

/* One line on what the context runs: the backend and its settings in effect, e.g.
 * "simd: avx512, 2 threads" or "vulkan: NVIDIA H100 (discrete)". Returns buf. */
KLA_API const char *kla_describe(const KlaContext *ctx, char *buf, size_t len);

/* The algorithm the last successful kla_forward or kla_backward on ctx ran:
 * KLA_ALGO_RECURRENT or KLA_ALGO_CHUNK (what AUTO chose, or a fallback the backend took
 * when the requested one cannot run with this shape); KLA_ALGO_AUTO before any. */
KLA_API KlaAlgo kla_last_algo(const KlaContext *ctx);

/* Parses a CPU level mask: a number ("0", "3", "0x2": KLA_CPU_* bits) or names joined by
 * ',' or '+': "avx2", "avx512", "neon", "all", and "none" or "c" (the plain C kernels).
 * Returns 0, or KLA_EINVAL for anything else (unknown names, unknown bits, empty). */
KLA_API int kla_cpu_mask_parse(const char *s, unsigned *mask);

/* 1 if backend `name` is built and usable here, 0 if built but unusable,
 * KLA_ENOSYS if not built or unknown. */
KLA_API int kla_backend_available(const char *name);
/* Variants of the family (kla-spec.md section 7) a backend runs beyond section 1's
 * operator (gate head, precond none, which every backend runs): KLA_VARIANT_* bits, or
 * KLA_ENOSYS if the backend is not built or unknown. The others are refused by the
 * operations with KLA_ENOSYS and a message naming the variant. */
#define KLA_VARIANT_CHANNEL (1u << 0) /* gate channel (KDA) */
#define KLA_VARIANT_ATK (1u << 1)     /* precond atk (PDN, PGDN, PKDA) */
KLA_API int kla_backend_variants(const char *name);
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
/* A KlaState that also holds the ATK states [N, H, K] of the preconditioned variants
 * (precond atk), zero when new, for kla_decode_state with precond atk (t->astate absent).
 * Only on backends that run precond atk (kla_backend_variants); H divides HV. */
KLA_API int kla_state_new_atk(KlaContext *ctx, int64_t N, int64_t H, int64_t HV, int64_t K, int64_t V,
                              KlaState **st);
/* Sets (values finite and >= 0) or copies out its ATK states, [N, H, K], F32 or F64. */
KLA_API int kla_state_write_atk(KlaState *st, KlaIn src);
KLA_API int kla_state_read_atk(KlaState *st, KlaOut dst);
/* kla_decode reading and updating st instead of t->state (which must be absent); shape->B,
 * HV, K and V must be those of st. opt->state_layout does not apply. */
KLA_API int kla_decode_state(KlaContext *ctx, const KlaShape *shape, const KlaOptions *opt,
                             const KlaTensors *t, KlaState *st);

/* ---- buffers: tensors that stay where the backend computes ------------------------- */

/* A KlaBuffer holds one tensor of numel elements where ctx's backend computes: device
 * memory on vulkan, host memory on the CPU backends. Any tensor of a call (KLA_BUF_IN,
 * KLA_BUF_OUT), the decode state included, may be a buffer, so that consecutive calls on
 * the GPU move no data through the host: the outputs of one call are the inputs of the
 * next. Host tensors and buffers mix freely in one call. Shapes, sizes and dtypes are
 * checked at every call as for host tensors; value checks (finite inputs, g <= 0, a
 * finite step size, finite outputs) need the data, so on a device buffer they are the
 * caller's: a non-finite input gives non-finite outputs, not an error. cu_seqlens stays in
 * host memory (its values decide the work), and states in buffers use the KV layout.
 * On vulkan a buffer is F32 (the backend's dtype); on the CPU backends any real dtype.
 * A buffer belongs to ctx: free it before closing ctx. A new buffer is zero. */
KLA_API int kla_buffer_new(KlaContext *ctx, KlaDtype dtype, int64_t numel, KlaBuffer **b);
/* Frees and sets *b to NULL (a wrapped application buffer is not freed, only forgotten). */
KLA_API void kla_buffer_free(KlaBuffer **b);
/* Host <-> buffer: src/dst hold numel elements of any real dtype (converted). */
KLA_API int kla_buffer_write(KlaBuffer *b, KlaIn src);
KLA_API int kla_buffer_read(KlaBuffer *b, KlaOut dst);
KLA_API int64_t kla_buffer_numel(const KlaBuffer *b);
KLA_API KlaDtype kla_buffer_dtype(const KlaBuffer *b);

/* ---- sharing a Vulkan device with the application ----------------------------------- */

/* The application's own Vulkan objects (handles cast to void *; VkBuffer handles are
 * passed as uint64_t: (uint64_t)buffer). kla records its work into command buffers of its
 * own pool on that device and submits them to that queue; it never destroys them.
 * Synchronisation contract (docs/vulkan.md):
 *  - the queue is externally synchronised: no other thread submits to it during a kla call;
 *  - every kla call begins with a full memory barrier, so work the application submitted
 *    to the same queue earlier is complete and visible to it (work on another queue must
 *    be finished, or signalled through a fence or semaphore the application waits on,
 *    before the call);
 *  - a call returns when its work has completed on the GPU (it waits on its own fence):
 *    its outputs are then ready for anything the application submits afterwards.
 * The device must be Vulkan 1.1 or newer; buffers need VK_BUFFER_USAGE_STORAGE_BUFFER_BIT
 * (and TRANSFER_SRC/DST for kla_buffer_read/write). */
typedef struct KlaVulkanDevice {
    void *instance;        /* VkInstance */
    void *physical_device; /* VkPhysicalDevice */
    void *device;          /* VkDevice */
    void *queue;           /* VkQueue with VK_QUEUE_COMPUTE_BIT */
    uint32_t queue_family; /* the queue's family index */
} KlaVulkanDevice;
/* A context of backend vulkan on the application's device (params->backend is ignored). */
KLA_API int kla_open_vulkan(KlaContext **ctx, const KlaParams *params, const KlaVulkanDevice *dev);
/* The application's VkBuffer, from offset (a multiple of the device's
 * minStorageBufferOffsetAlignment), as a KlaBuffer of numel F32 values. */
KLA_API int kla_buffer_wrap_vulkan(KlaContext *ctx, uint64_t vk_buffer, uint64_t offset, KlaDtype dtype,
                                   int64_t numel, KlaBuffer **b);
/* The VkBuffer and offset behind a buffer of a vulkan context, for the application's own
 * commands; KLA_EINVAL on other backends. */
KLA_API int kla_buffer_vulkan_handle(const KlaBuffer *b, uint64_t *vk_buffer, uint64_t *offset);

/* ---- the layer, the model and the training step (kla-spec.md section 8) ------------- */

/* The operator inside a mixer layer: KLA (l2norm on q, raw k, beta = eta / (||k||^2 +
 * 1e-6)) or the Gated DeltaNet baseline (l2norm on q and k, beta = eta). */
typedef enum KlaMixer { KLA_MIXER_KLA = 0, KLA_MIXER_GDN = 1 } KlaMixer;

typedef struct KlaModelConfig {
    int64_t vocab;    /* tokens; the embedding is also the head */
    int64_t d_model;  /* d */
    int64_t n_layer;  /* blocks */
    int64_t n_head;   /* H */
    int64_t d_k, d_v; /* per head */
    int64_t d_ff;     /* the SwiGLU MLP's width */
    double norm_eps;  /* every RMSNorm's eps */
    KlaMixer mixer;
} KlaModelConfig;

/* The KLA authors' MQAR model: vocab 8192, d 256, 2 blocks, 4 heads, d_k 48, d_v 96,
 * d_ff 1024, norm_eps 1e-5, mixer KLA. */
KLA_API void kla_default_model_config(KlaModelConfig *c);

/* AdamW as PyTorch's (decoupled weight decay, bias-corrected moments) after clipping every
 * gradient by min(1, clip / (||all gradients||_2 + 1e-6)); clip <= 0: no clipping. */
typedef struct KlaAdamW {
    double lr, beta1, beta2, eps, weight_decay, clip;
} KlaAdamW;

/* lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0 (the authors' MQAR run) */
KLA_API void kla_default_adamw(KlaAdamW *a);

/* A model (parameters, their gradients and AdamW moments) on ctx's backend: float64 on
 * ref64, float32 elsewhere (on simd with OpenBLAS matrix products and the head computed
 * only at labelled rows). It belongs to ctx: free it before closing ctx. New parameters
 * are zero: set them with kla_model_write or kla_model_init. */
typedef struct KlaModel KlaModel;
KLA_API int kla_model_new(KlaContext *ctx, const KlaModelConfig *c, KlaModel **m);
/* One mixer layer alone (kla-spec.md 8.1): uses d_model, n_head, d_k, d_v, norm_eps and
 * mixer; its parameters are named attn.* (no layers.{i}. prefix). */
KLA_API int kla_layer_new(KlaContext *ctx, const KlaModelConfig *c, KlaModel **m);
KLA_API void kla_model_free(KlaModel **m);

/* The parameters, in a fixed order, with flash-linear-attention's names and PyTorch's
 * shapes (kla-spec.md 8.3). */
typedef struct KlaParamInfo {
    const char *name;
    int ndim;
    int64_t shape[3];
    int64_t numel;
} KlaParamInfo;
KLA_API int kla_model_param_count(const KlaModel *m);
KLA_API int kla_model_param_info(const KlaModel *m, int i, KlaParamInfo *info);
/* The index of a parameter by name; KLA_EINVAL (with a hint in kla_error_detail) if none. */
KLA_API int kla_model_param_index(KlaModel *m, const char *name);

/* What kla_model_read / kla_model_write move: a parameter, its gradient (of the last
 * kla_model_loss with backward, before clipping), or AdamW's first and second moment. */
typedef enum KlaModelPart { KLA_PART_PARAM = 0, KLA_PART_GRAD = 1, KLA_PART_ADAM_M = 2,
                            KLA_PART_ADAM_V = 3 } KlaModelPart;
KLA_API int kla_model_read(KlaModel *m, KlaModelPart part, int i, KlaOut dst);
/* Values must be finite (and the second moment >= 0). */
KLA_API int kla_model_write(KlaModel *m, KlaModelPart part, int i, KlaIn src);
/* Bytes the model holds: its parameters, gradients and AdamW moments, and the workspace of
 * its largest call so far (the activations a backward needs; linear in B and T). */
KLA_API int64_t kla_model_bytes(const KlaModel *m);

/* AdamW's step count (0: no step taken), for checkpoints. */
KLA_API int64_t kla_model_steps(const KlaModel *m);
KLA_API int kla_model_set_steps(KlaModel *m, int64_t steps);

/* The KLA authors' initialisation (notes: layer-and-mqar.md 3.2), from a seed: embedding
 * N(0, 0.02); Linear U(+-1/sqrt(fan_in)), down_proj that divided by sqrt(2 n_layer); conv
 * U(+-0.5); A_log = log U(0, 16); dt_bias = softplus^-1(exp U(ln 1e-3, ln 0.1)); b_proj
 * bias 0; norms 1. */
KLA_API int kla_model_init(KlaModel *m, uint64_t seed);

/* A batch: token ids and labels [B, T], I32 or I64; label -100 is ignored. */
typedef struct KlaBatch {
    int64_t B, T;
    KlaIn ids, labels;
} KlaBatch;

typedef struct KlaLoss {
    double loss;       /* mean cross-entropy over labelled positions */
    int64_t correct;   /* labelled positions whose argmax is the label */
    int64_t labelled;
} KlaLoss;

/* The model's forward and loss; with backward, also every gradient (read them with
 * KLA_PART_GRAD). A backward needs at least one labelled position. */
KLA_API int kla_model_loss(KlaModel *m, const KlaBatch *b, int backward, KlaLoss *out);
/* One optimizer step from the gradients of the last backward: clipping, then AdamW. The
 * stored gradients are left as they were (before clipping), and each update needs a
 * backward of its own. grad_norm (may be NULL) gets the global norm before clipping. */
KLA_API int kla_model_update(KlaModel *m, const KlaAdamW *opt, double *grad_norm);

/* A layer's forward y = mixer(x), x and y [B, T, d]; with dy, also dx and the parameters'
 * gradients of sum(dy * y) (KLA_PART_GRAD). cu_seqlens (optional, B = 1) packs sequences:
 * the convolution restarts at each. */
KLA_API int kla_layer_backward(KlaModel *m, int64_t B, int64_t T, KlaIn x, KlaIn dy, KlaIn cu_seqlens,
                               KlaOut y, KlaOut dx);

/* ---- problem files (safetensors, kla-spec.md section 4) ---------------------------- */

/* A file read whole and checked (header, offsets, dtypes, duplicate names, UTF-8). The
 * functions below report errors through kla_error_detail(NULL), starting with the path. */
typedef struct KlaFile KlaFile;
KLA_API int kla_file_read(const char *path, KlaFile **f);
/* Frees and sets *f to NULL; NULL and *f == NULL are fine. */
KLA_API void kla_file_free(KlaFile **f);

/* One tensor of a file, any dtype the format defines. Valid while the file is. */
typedef struct KlaFileTensor {
    const char *name;
    const char *dtype;     /* as in the file: "F32", "F64", "I32", "I64", "BF16", ... */
    int ndim;              /* 0 to 8 */
    int64_t shape[8];
    int64_t numel;
    const void *data;      /* little-endian, 64-byte aligned; NULL when numel is 0 */
    KlaIn in;              /* data as a KlaIn when dtype is F32, F64, I32 or I64, else
                            * in.data == NULL */
} KlaFileTensor;

/* Number of tensors; tensor i (0 <= i < count), or KLA_EINVAL. */
KLA_API int kla_file_count(const KlaFile *f);
KLA_API int kla_file_tensor(const KlaFile *f, int i, KlaFileTensor *t);
/* The tensor called name: 1 found, 0 absent (t zeroed). */
KLA_API int kla_file_find(const KlaFile *f, const char *name, KlaFileTensor *t);
/* A __metadata__ value, or NULL. */
KLA_API const char *kla_file_meta(const KlaFile *f, const char *key);

typedef enum KlaOp { KLA_OP_FORWARD = 0, KLA_OP_BACKWARD = 1, KLA_OP_DECODE = 2 } KlaOp;

/* The problem a file holds, for op. */
typedef struct KlaProblem {
    KlaShape shape;
    KlaOptions opt;          /* from __metadata__; algo AUTO and chunk 64 */
    KlaTensors t;            /* the op's inputs (pointing into the file); outputs absent */
    int64_t state_shape[4];  /* h0 and ht: [N, HV, K, V], or [N, HV, V, K] in layout vk */
    int64_t state_numel;
} KlaProblem;

/* Fills *p from the file with every check the library makes, so that nothing read from
 * it can be out of bounds: tensor names (a name or metadata key kla-spec.md does not
 * define is an error, with a hint for flash-linear-attention's names), dtypes, shapes,
 * option values, and the values of cu_seqlens (0 first, non-decreasing, ending at T).
 * Tensors the op does not read (do and dht in forward, the outputs of a golden case)
 * are allowed and ignored. The value checks of the operations (finite, g <= 0) are left
 * to them. Returns 0 or KLA_EINVAL / KLA_ERANGE. */
KLA_API int kla_file_problem(const KlaFile *f, KlaOp op, KlaProblem *p);

#ifdef __cplusplus
}
#endif

#endif /* KLA_H */
