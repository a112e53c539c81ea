/*
 * kla_model.c: the reference of the training step: a KLA layer, a small language model,
 * its loss, every gradient, and AdamW (kla-spec.md section 8; docs/training.md walks
 * through it). Read it after kla_ref.c, which is the operator this calls (through the
 * library, on the caller's backend).
 *
 * Compiled three times: KLA_REAL_BITS=32 and 64 give the plain-loop references (backends
 * "ref" and "ref64"); KLA_MODEL_FAST gives the fast float path (backend "simd"): the same
 * code with OpenBLAS sgemm for every matrix product and OpenMP over rows, and the head
 * computed only at labelled rows. Every function below is one step of the forward with
 * its backward right after it; shapes are given at every pointer. Rows are the B*T
 * tokens, row-major; a Linear weight is [out, in] (PyTorch's), so y = x W^T.
 *
 * The mixer (8.1), per token, H heads of dk (keys) and dv (values), d the model width:
 *
 *     q, k, v = silu(conv4(x Wq^T)), silu(conv4(x Wk^T)), silu(conv4(x Wv^T))
 *     g       = -exp(A_log) * softplus(x Wa^T + dt_bias)           [H]
 *     eta     = sigmoid(x Wb^T + bb)                                [H]
 *     o       = operator(q, k, v, g, eta)                            mode kla: l2norm q,
 *               raw k, beta = eta / (||k||^2 + 1e-6); mixer gdn: l2norm q and k, beta = eta
 *     z       = rmsnorm_per_head(o; w_onorm) * silu(x Wg^T)
 *     y       = z Wo^T
 *
 * The model (8.2):
 *
 *     x = E[ids];  per block: x += mixer(rmsnorm(x; w1));  x += W3(silu(n W1^T) * (n W2^T))^T
 *                  with n = rmsnorm(x; w2)
 *     logits = rmsnorm(x; wf) E^T;  loss = mean over labelled rows of cross-entropy
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kla_model.h"

#if defined(KLA_MODEL_FAST)
typedef float real;
#define MDL(name) kla_##name##_fast
#define RDT KLA_F32
#define r_exp expf
#define r_sqrt sqrtf
#define r_log logf
#define r_log1p log1pf
#include <cblas.h>
#ifdef _OPENMP
#include <omp.h>
#define OMP_FOR _Pragma("omp parallel for schedule(static) num_threads(n_threads)")
static _Thread_local int n_threads = 1; /* set by each entry point from kla_mdims.threads */
#else
#define OMP_FOR
#endif
void openblas_set_num_threads(int); /* OpenBLAS's, not in every cblas.h */
int openblas_get_num_threads(void);
#elif KLA_REAL_BITS == 32
typedef float real;
#define MDL(name) kla_##name##_f32
#define RDT KLA_F32
#define r_exp expf
#define r_sqrt sqrtf
#define r_log logf
#define r_log1p log1pf
#define OMP_FOR
#elif KLA_REAL_BITS == 64
typedef double real;
#define MDL(name) kla_##name##_f64
#define RDT KLA_F64
#define r_exp exp
#define r_sqrt sqrt
#define r_log log
#define r_log1p log1p
#define OMP_FOR
#else
#error "define KLA_REAL_BITS as 32 or 64, or KLA_MODEL_FAST"
#endif

#define CONV 4 /* the short convolution's width; tap CONV-1 is the current token */

/* Scratch of n reals, zeroed: from the call's workspace (kla_ws) when there is one. */
static _Thread_local kla_ws *ws_cur;

static void *ws_alloc(kla_ws *ws, size_t bytes)
{
    bytes = (bytes + 63) & ~(size_t)63;
    ws->need += bytes;
    if (ws->base && ws->used + bytes <= ws->cap) {
        void *p = ws->base + ws->used;
        ws->used += bytes;
        memset(p, 0, bytes);
        return p;
    }
    /* beyond the workspace this time: plain memory, and the workspace grows at the end */
    if (ws->nextra == ws->capextra) {
        const int cap = ws->capextra ? 2 * ws->capextra : 64;
        void **e = realloc(ws->extra, (size_t)cap * sizeof *e);
        if (!e) return NULL;
        ws->extra = e, ws->capextra = cap;
    }
    void *p = calloc(1, bytes);
    if (p) ws->extra[ws->nextra++] = p;
    return p;
}

static real *alloc_reals(int64_t n)
{
    if (n <= 0) n = 1;
    if ((uint64_t)n > (SIZE_MAX - 64) / sizeof(real)) return NULL;
    return ws_cur ? ws_alloc(ws_cur, (size_t)n * sizeof(real)) : calloc((size_t)n, sizeof(real));
}

/* releases what alloc_reals gave when there is no workspace (else ws_end does) */
static void free_reals(void *p)
{
    if (!ws_cur) free(p);
}

static void ws_begin(kla_ws *ws)
{
    ws_cur = ws;
    if (ws) ws->used = ws->need = 0;
}

static void ws_end(kla_ws *ws)
{
    ws_cur = NULL;
    if (!ws) return;
    for (int i = 0; i < ws->nextra; i++) free(ws->extra[i]);
    ws->nextra = 0;
    if (ws->need > ws->cap) { /* next time everything fits */
        free(ws->base);
        ws->base = aligned_alloc(64, ws->need);
        ws->cap = ws->base ? ws->need : 0;
    }
}

/* ---- 1. matrix products: the only matrix-shaped work ------------------------------------ */

#if defined(KLA_MODEL_FAST)
/* [lo, hi) of n for part t of nt, in multiples of 16 */
static void split(int64_t n, int t, int nt, int64_t *lo, int64_t *hi)
{
    const int64_t blocks = (n + 15) / 16;
    *lo = blocks * t / nt * 16, *hi = blocks * (t + 1) / nt * 16;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}
#ifdef _OPENMP
#define PAR_PARTS _Pragma("omp parallel num_threads(n_threads)")
#define PART_ID omp_get_thread_num()
#define PART_COUNT omp_get_num_threads()
#else
#define PAR_PARTS
#define PART_ID 0
#define PART_COUNT 1
#endif
#endif

/* out [N, M] (+)= in [N, K] W^T, W [M, K] */
static void matmul_nt(real *out, const real *in, const real *W, int64_t N, int64_t M, int64_t K, int acc)
{
#if defined(KLA_MODEL_FAST)
    if (N && M && K)
        PAR_PARTS
        {
            int64_t n0, n1; /* rows of out */
            split(N, PART_ID, PART_COUNT, &n0, &n1);
            if (n1 > n0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(n1 - n0), (int)M, (int)K, 1.0f,
                            in + n0 * K, (int)K, W, (int)K, acc ? 1.0f : 0.0f, out + n0 * M, (int)M);
        }
#else
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            real s = 0;
            for (int64_t k = 0; k < K; k++) s += in[n * K + k] * W[m * K + k];
            out[n * M + m] = acc ? out[n * M + m] + s : s;
        }
#endif
}

/* din [N, K] += dout [N, M] W, the gradient of out = in W^T with respect to in */
static void matmul_nn_acc(real *din, const real *dout, const real *W, int64_t N, int64_t M, int64_t K)
{
#if defined(KLA_MODEL_FAST)
    if (N && M && K)
        PAR_PARTS
        {
            int64_t n0, n1; /* rows of din */
            split(N, PART_ID, PART_COUNT, &n0, &n1);
            if (n1 > n0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)(n1 - n0), (int)K, (int)M, 1.0f,
                            dout + n0 * M, (int)M, W, (int)K, 1.0f, din + n0 * K, (int)K);
        }
#else
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const real d = dout[n * M + m];
            for (int64_t k = 0; k < K; k++) din[n * K + k] += d * W[m * K + k];
        }
#endif
}

/* dW [M, K] += dout [N, M]^T in [N, K], the gradient of out = in W^T with respect to W */
static void matmul_tn_acc(real *dW, const real *dout, const real *in, int64_t N, int64_t M, int64_t K)
{
#if defined(KLA_MODEL_FAST)
    if (N && M && K)
        PAR_PARTS
        {
            int64_t m0, m1; /* rows of dW */
            split(M, PART_ID, PART_COUNT, &m0, &m1);
            if (m1 > m0)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)(m1 - m0), (int)K, (int)N, 1.0f, dout + m0,
                            (int)M, in, (int)K, 1.0f, dW + m0 * K, (int)K);
        }
#else
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const real d = dout[n * M + m];
            for (int64_t k = 0; k < K; k++) dW[m * K + k] += d * in[n * K + k];
        }
#endif
}

/* ---- 2. elementwise pieces ----------------------------------------------------------------- */

static real sigmoid(real x) { return 1 / (1 + r_exp(-x)); }
static real silu(real x) { return x * sigmoid(x); }
/* d silu / dx = s (1 + x (1 - s)), s = sigmoid(x) */
static real silu_grad(real x)
{
    const real s = sigmoid(x);
    return s * (1 + x * (1 - s));
}
/* softplus(x) = log(1 + e^x), written so that it neither overflows nor loses the small end */
static real softplus(real x) { return (x > 0 ? x : 0) + r_log1p(r_exp(-(x > 0 ? x : -x))); }

/*
 * RMSNorm over n values: y = x * rstd * w, rstd = (mean(x^2) + eps)^-1/2.
 * Backward (u = dy * w): dw += dy * x * rstd;  dx = rstd * (u - x * rstd^2 * mean(u * x)).
 */
static real rmsnorm_forward(const real *x, const real *w, real *y, int64_t n, double eps)
{
    real ss = 0;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const real rstd = 1 / r_sqrt(ss / (real)n + (real)eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * rstd * w[i];
    return rstd;
}

static void rmsnorm_backward(const real *x, const real *w, real rstd, const real *dy, real *dx, real *dw,
                             int64_t n)
{
    real ux = 0;
    for (int64_t i = 0; i < n; i++) ux += dy[i] * w[i] * x[i];
    const real c = rstd * rstd * ux / (real)n;
    for (int64_t i = 0; i < n; i++) {
        dw[i] += dy[i] * x[i] * rstd;
        dx[i] += rstd * (dy[i] * w[i] - x[i] * c);
    }
}

/* RMSNorm of every row of x [N, n] into y, rstd [N] */
static void rmsnorm_rows(const real *x, const real *w, real *y, real *rstd, int64_t N, int64_t n, double eps)
{
    OMP_FOR
    for (int64_t r = 0; r < N; r++) rstd[r] = rmsnorm_forward(x + r * n, w, y + r * n, n, eps);
}

/* dx [N, n] += the rows' backward; dw [n] += (rows summed in order, so threads do not race) */
static int rmsnorm_rows_backward(const real *x, const real *w, const real *rstd, const real *dy, real *dx,
                                 real *dw, int64_t N, int64_t n)
{
    real *dwr = alloc_reals(N * n); /* each row's share of dw, summed below in row order */
    if (!dwr) return KLA_ENOMEM;
    OMP_FOR
    for (int64_t r = 0; r < N; r++) rmsnorm_backward(x + r * n, w, rstd[r], dy + r * n, dx + r * n, dwr + r * n, n);
    for (int64_t r = 0; r < N; r++)
        for (int64_t i = 0; i < n; i++) dw[i] += dwr[r * n + i];
    free_reals(dwr);
    return 0;
}

/* ---- 3. the short convolution: depthwise, causal, 4 taps, reset at sequence starts ----- */

/*
 * pre[t, c] = sum_j w[c, j] x[t - 3 + j, c] (x before the sequence's first row is 0),
 * y = silu(pre). x, pre, y [rows, C]; w [C, CONV].
 */
static void conv_forward(const kla_mseqs *s, const real *x, const real *w, real *pre, real *y, int64_t C)
{
    for (int64_t n = 0; n < s->N; n++) {
        const int64_t t0 = s->cu[n], t1 = s->cu[n + 1];
        OMP_FOR
        for (int64_t t = t0; t < t1; t++)
            for (int64_t c = 0; c < C; c++) {
                real a = 0;
                for (int64_t j = 0; j < CONV; j++) {
                    const int64_t src = t - (CONV - 1) + j;
                    if (src >= t0) a += w[c * CONV + j] * x[src * C + c];
                }
                pre[t * C + c] = a;
                y[t * C + c] = silu(a);
            }
    }
}

/*
 * Backward: dpre = dy * silu'(pre); dw[c, j] += sum_t dpre[t, c] x[t - 3 + j, c];
 * dx[s, c] = sum_j dpre[s + 3 - j, c] w[c, j] (within the sequence). dpre is scratch.
 */
static void conv_backward(const kla_mseqs *s, const real *x, const real *w, const real *pre, const real *dy,
                          real *dpre, real *dx, real *dw, int64_t C)
{
    const int64_t rows = s->cu[s->N];
    OMP_FOR
    for (int64_t i = 0; i < rows * C; i++) dpre[i] = dy[i] * silu_grad(pre[i]);
    for (int64_t n = 0; n < s->N; n++) {
        const int64_t t0 = s->cu[n], t1 = s->cu[n + 1];
        OMP_FOR
        for (int64_t c = 0; c < C; c++)
            for (int64_t t = t0; t < t1; t++)
                for (int64_t j = 0; j < CONV; j++) {
                    const int64_t src = t - (CONV - 1) + j;
                    if (src < t0) continue;
                    dw[c * CONV + j] += dpre[t * C + c] * x[src * C + c];
                    dx[src * C + c] = dx[src * C + c] + dpre[t * C + c] * w[c * CONV + j];
                }
    }
}

/* ---- 4. the mixer layer ------------------------------------------------------------------- */

/* The mixer's weights (a view into the block; kla-spec.md 8.3 names in comments). */
typedef struct mixer_w {
    const real *wq, *wk, *wv; /* attn.{q,k,v}_proj.weight [H dk, d], [H dk, d], [H dv, d] */
    const real *wa, *wb, *bb; /* attn.a_proj.weight [H, d], attn.b_proj.weight [H, d], .bias [H] */
    const real *wg, *wo;      /* attn.g_proj.weight [H dv, d], attn.o_proj.weight [d, H dv] */
    const real *cq, *ck, *cv; /* attn.{q,k,v}_conv1d.weight [C, 1, 4] */
    const real *A_log, *dt_bias, *onorm; /* [H], [H], attn.o_norm.weight [dv] */
} mixer_w;

typedef struct mixer_dw {
    real *wq, *wk, *wv, *wa, *wb, *bb, *wg, *wo, *cq, *ck, *cv, *A_log, *dt_bias, *onorm;
} mixer_dw;

/* What the mixer's backward needs from its forward (rows = B*T). */
typedef struct mixer_acts {
    real *pq, *pk, *pv;       /* [rows, H dk|dv]  projections, the convolution's input */
    real *cq, *ck, *cv;       /* [rows, H dk|dv]  the convolution before silu */
    real *q, *k, *v;          /* [rows, H dk|dv]  after silu: the operator's inputs */
    real *za, *g, *eta;       /* [rows, H]        x Wa^T + dt_bias, the decay, the step gate */
    real *o, *orstd, *zg, *z; /* [rows, H dv], [rows, H], [rows, H dv] x2: operator out, norm, gate */
} mixer_acts;

static void mixer_acts_free(mixer_acts *a)
{
    real **p = (real **)a;
    for (size_t i = 0; i < sizeof *a / sizeof(real *); i++) free_reals(p[i]);
    memset(a, 0, sizeof *a);
}

static int mixer_acts_alloc(mixer_acts *a, const kla_mdims *m, int64_t rows)
{
    const int64_t Dk = m->H * m->dk, Dv = m->H * m->dv;
    const int64_t n[] = { Dk, Dk, Dv, Dk, Dk, Dv, Dk, Dk, Dv, m->H, m->H, m->H, Dv, m->H, Dv, Dv };
    real **p = (real **)a;
    memset(a, 0, sizeof *a);
    for (size_t i = 0; i < sizeof *a / sizeof(real *); i++)
        if (!(p[i] = alloc_reals(rows * n[i]))) {
            mixer_acts_free(a);
            return KLA_ENOMEM;
        }
    return 0;
}

static void mixer_view(const kla_mdims *m, const real *block, mixer_w *w)
{
    int64_t total;
    kla_mparam t[NBLOCK_P + 3];
    kla_mdims one = *m;
    one.layer_only = 1; /* offsets within the mixer's own parameters */
    kla_mparams(&one, t, NBLOCK_P + 3, &total);
    const real *const *f[] = { &w->wq, &w->wk, &w->wv, &w->wa, &w->wb, &w->bb, &w->wg, &w->wo,
                               &w->cq, &w->ck, &w->cv, &w->A_log, &w->dt_bias, &w->onorm };
    for (int i = 0; i < 14; i++) *(const real **)f[i] = block + t[i].offset;
}

static void mixer_dview(const kla_mdims *m, real *block, mixer_dw *w)
{
    mixer_w v;
    mixer_view(m, block, &v);
    memcpy(w, &v, sizeof *w); /* the same fields, writable */
}

/* The operator's options for this mixer (kla-spec.md 8.1). */
static KlaOptions mixer_options(const kla_mdims *m)
{
    KlaOptions o;
    kla_default_options(&o);
    o.mode = m->mixer == KLA_MIXER_GDN ? KLA_MODE_GDN : KLA_MODE_KLA;
    o.l2norm_q = 1;
    o.l2norm_k = m->mixer == KLA_MIXER_GDN;
    o.scale = 1 / sqrt((double)m->dk);
    o.eps = 1e-6;
    return o;
}

/* The operator's tensors of this mixer: one packed stream of rows, sequences by cu. */
static KlaTensors mixer_tensors(const kla_mdims *m, const mixer_acts *a, const kla_mseqs *s, int64_t rows)
{
    const int64_t nq = rows * m->H * m->dk, nv = rows * m->H * m->dv, ng = rows * m->H;
    KlaTensors t = { .q = KLA_IN(a->q, RDT, nq), .k = KLA_IN(a->k, RDT, nq), .v = KLA_IN(a->v, RDT, nv),
                     .g = KLA_IN(a->g, RDT, ng), .cu_seqlens = KLA_IN(s->cu, KLA_I64, s->N + 1) };
    if (m->mixer == KLA_MIXER_GDN) t.beta = KLA_IN(a->eta, RDT, ng);
    else t.eta = KLA_IN(a->eta, RDT, ng);
    return t;
}

static KlaShape mixer_shape(const kla_mdims *m, const kla_mseqs *s, int64_t rows)
{
    KlaShape sh = { .B = 1, .T = rows, .H = m->H, .HV = m->H, .K = m->dk, .V = m->dv, .N = s->N };
    return sh;
}

/* y [rows, d] = mixer(x [rows, d]); keeps what the backward needs in a */
static int mixer_forward(const kla_mdims *m, const mixer_w *w, const kla_mseqs *s, const real *x, real *y,
                         mixer_acts *a, KlaContext *op)
{
    const int64_t rows = s->cu[s->N], d = m->d, H = m->H, dv = m->dv, Dk = H * m->dk, Dv = H * dv;
    /* q, k, v = silu(conv4(x W^T)) */
    matmul_nt(a->pq, x, w->wq, rows, Dk, d, 0);
    matmul_nt(a->pk, x, w->wk, rows, Dk, d, 0);
    matmul_nt(a->pv, x, w->wv, rows, Dv, d, 0);
    conv_forward(s, a->pq, w->cq, a->cq, a->q, Dk);
    conv_forward(s, a->pk, w->ck, a->ck, a->k, Dk);
    conv_forward(s, a->pv, w->cv, a->cv, a->v, Dv);
    /* g = -exp(A_log) softplus(x Wa^T + dt_bias);  eta = sigmoid(x Wb^T + bb) */
    matmul_nt(a->za, x, w->wa, rows, H, d, 0);
    matmul_nt(a->eta, x, w->wb, rows, H, d, 0);
    OMP_FOR
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < H; h++) {
            real *za = &a->za[r * H + h], *e = &a->eta[r * H + h];
            *za += w->dt_bias[h];
            a->g[r * H + h] = -r_exp(w->A_log[h]) * softplus(*za);
            *e = sigmoid(*e + w->bb[h]);
        }
    /* o = operator(q, k, v, g, eta) */
    KlaShape sh = mixer_shape(m, s, rows);
    KlaOptions opt = mixer_options(m);
    KlaTensors t = mixer_tensors(m, a, s, rows);
    t.o = KLA_OUT(a->o, RDT, rows * Dv);
    int r = kla_forward(op, &sh, &opt, &t);
    if (r < 0) return r;
    /* z = rmsnorm(o; onorm) per head * silu(x Wg^T);  y = z Wo^T */
    matmul_nt(a->zg, x, w->wg, rows, Dv, d, 0);
    OMP_FOR
    for (int64_t rh = 0; rh < rows * H; rh++) {
        real *z = a->z + rh * dv;
        a->orstd[rh] = rmsnorm_forward(a->o + rh * dv, w->onorm, z, dv, m->norm_eps);
        for (int64_t j = 0; j < dv; j++) z[j] *= silu(a->zg[rh * dv + j]);
    }
    matmul_nt(y, a->z, w->wo, rows, d, Dv, 0);
    return 0;
}

/* dx [rows, d] += the gradient through the mixer of dy [rows, d]; dw += its weights' */
static int mixer_backward(const kla_mdims *m, const mixer_w *w, mixer_dw *dw, const kla_mseqs *s,
                          const real *x, const mixer_acts *a, const real *dy, real *dx, KlaContext *op)
{
    const int64_t rows = s->cu[s->N], d = m->d, H = m->H, dv = m->dv, Dk = H * m->dk, Dv = H * dv;
    real *dz = alloc_reals(rows * Dv), *dzg = alloc_reals(rows * Dv), *dO = alloc_reals(rows * Dv);
    real *dq = alloc_reals(rows * Dk), *dk = alloc_reals(rows * Dk), *dv_ = alloc_reals(rows * Dv);
    const int64_t Dm = Dk > Dv ? Dk : Dv; /* the wider of the convolutions */
    real *dg = alloc_reals(rows * H), *deta = alloc_reals(rows * H), *dpre = alloc_reals(rows * Dm);
    real *dp = alloc_reals(rows * Dm), *dn = alloc_reals(rows * Dv), *dnr = alloc_reals(rows * Dv);
    int r = KLA_ENOMEM;
    if (!dz || !dzg || !dO || !dq || !dk || !dv_ || !dg || !deta || !dpre || !dp || !dn || !dnr) goto done;

    /* y = z Wo^T:  dz = dy Wo;  dWo += dy^T z */
    matmul_nn_acc(dz, dy, w->wo, rows, d, Dv);
    matmul_tn_acc(dw->wo, dy, a->z, rows, d, Dv);
    /* z = n * silu(zg), n = rmsnorm(o; onorm):  dn = dz silu(zg);  dzg = dz n silu'(zg);
     * then the norm's backward into dO and d onorm (each (row, head) its own share) */
    OMP_FOR
    for (int64_t rh = 0; rh < rows * H; rh++) {
        const real *o = a->o + rh * dv, rstd = a->orstd[rh];
        for (int64_t j = 0; j < dv; j++) {
            const int64_t i = rh * dv + j;
            const real n = o[j] * rstd * w->onorm[j];
            dn[i] = dz[i] * silu(a->zg[i]);
            dzg[i] = dz[i] * n * silu_grad(a->zg[i]);
        }
        rmsnorm_backward(o, w->onorm, rstd, dn + rh * dv, dO + rh * dv, dnr + rh * dv, dv);
    }
    for (int64_t rh = 0; rh < rows * H; rh++) /* d onorm, summed in (row, head) order */
        for (int64_t j = 0; j < dv; j++) dw->onorm[j] += dnr[rh * dv + j];
    /* zg = x Wg^T */
    matmul_tn_acc(dw->wg, dzg, x, rows, Dv, d);
    matmul_nn_acc(dx, dzg, w->wg, rows, Dv, d);

    /* o = operator(q, k, v, g, eta): its backward (the library recomputes the forward) */
    KlaShape sh = mixer_shape(m, s, rows);
    KlaOptions opt = mixer_options(m);
    KlaTensors t = mixer_tensors(m, a, s, rows);
    t.dout = KLA_IN(dO, RDT, rows * Dv);
    t.o = KLA_OUT(dp, RDT, rows * Dv); /* o again, unused: dp is scratch here */
    t.dq = KLA_OUT(dq, RDT, rows * Dk), t.dk = KLA_OUT(dk, RDT, rows * Dk), t.dv = KLA_OUT(dv_, RDT, rows * Dv);
    t.dg = KLA_OUT(dg, RDT, rows * H);
    if (m->mixer == KLA_MIXER_GDN) t.dbeta = KLA_OUT(deta, RDT, rows * H);
    else t.deta = KLA_OUT(deta, RDT, rows * H);
    if ((r = kla_backward(op, &sh, &opt, &t)) < 0) goto done;

    /* eta = sigmoid(zb), zb = x Wb^T + bb:  dzb = deta eta (1 - eta) */
    OMP_FOR
    for (int64_t i = 0; i < rows * H; i++) deta[i] *= a->eta[i] * (1 - a->eta[i]);
    for (int64_t rr = 0; rr < rows; rr++)
        for (int64_t h = 0; h < H; h++) dw->bb[h] += deta[rr * H + h];
    matmul_tn_acc(dw->wb, deta, x, rows, H, d);
    matmul_nn_acc(dx, deta, w->wb, rows, H, d);
    /* g = -exp(A_log) softplus(za):  dA_log += dg g;  dza = dg (-exp(A_log)) sigmoid(za) */
    for (int64_t rr = 0; rr < rows; rr++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t i = rr * H + h;
            dw->A_log[h] += dg[i] * a->g[i];
            dg[i] *= -r_exp(w->A_log[h]) * sigmoid(a->za[i]); /* now dza */
            dw->dt_bias[h] += dg[i];
        }
    matmul_tn_acc(dw->wa, dg, x, rows, H, d);
    matmul_nn_acc(dx, dg, w->wa, rows, H, d);

    /* q, k, v = silu(conv4(x W^T)): the convolution's backward into dp, then the projection */
    const real *pins[3] = { a->pq, a->pk, a->pv }, *pres[3] = { a->cq, a->ck, a->cv };
    const real *cw[3] = { w->cq, w->ck, w->cv }, *pw[3] = { w->wq, w->wk, w->wv };
    real *dcw[3] = { dw->cq, dw->ck, dw->cv }, *dpw[3] = { dw->wq, dw->wk, dw->wv };
    real *dys[3] = { dq, dk, dv_ };
    for (int i = 0; i < 3; i++) {
        const int64_t C = i < 2 ? Dk : Dv;
        memset(dp, 0, (size_t)(rows * C) * sizeof(real));
        conv_backward(s, pins[i], cw[i], pres[i], dys[i], dpre, dp, dcw[i], C);
        matmul_tn_acc(dpw[i], dp, x, rows, C, d);
        matmul_nn_acc(dx, dp, pw[i], rows, C, d);
    }
    r = 0;
done:
    free_reals(dz), free_reals(dzg), free_reals(dO), free_reals(dq), free_reals(dk), free_reals(dv_);
    free_reals(dg), free_reals(deta), free_reals(dpre), free_reals(dp), free_reals(dn), free_reals(dnr);
    return r;
}

/* The fast path's threads: the context's count (KlaParams.threads), else all cores. Each
 * product is split over them by OpenMP and OpenBLAS runs single-threaded inside: its own
 * threads and OpenMP's would otherwise spin against each other on every core. */
#if defined(KLA_MODEL_FAST) && defined(_OPENMP)
static _Thread_local int blas_threads; /* OpenBLAS's setting, restored at the end */
#endif
static void use_threads(const kla_mdims *m)
{
#if defined(KLA_MODEL_FAST) && defined(_OPENMP)
    n_threads = m->threads > 0 ? m->threads : omp_get_num_procs();
    blas_threads = openblas_get_num_threads();
    openblas_set_num_threads(1);
#else
    (void)m;
#endif
}

static void end_threads(void)
{
#if defined(KLA_MODEL_FAST) && defined(_OPENMP)
    openblas_set_num_threads(blas_threads);
#endif
}

int MDL(layer_backward)(const kla_mdims *m, const real *w, real *dw, const kla_mseqs *s, const real *x,
                        const real *dy, real *y, real *dx, KlaContext *op, kla_ws *ws)
{
    use_threads(m);
    ws_begin(ws);
    mixer_w W;
    mixer_dw DW;
    mixer_acts a;
    mixer_view(m, w, &W);
    const int64_t rows = s->cu[s->N];
    int r = mixer_acts_alloc(&a, m, rows);
    if (r < 0) return r;
    if (!(r = mixer_forward(m, &W, s, x, y, &a, op)) && dy) {
        mixer_dview(m, dw, &DW);
        memset(dx, 0, (size_t)(rows * m->d) * sizeof(real));
        r = mixer_backward(m, &W, &DW, s, x, &a, dy, dx, op);
    }
    mixer_acts_free(&a);
    end_threads();
    ws_end(ws);
    return r;
}

/* ---- 5. the model: embedding, blocks, final norm, tied head, cross-entropy ---------------- */

/* One block's activations. */
typedef struct block_acts {
    real *xin;        /* [rows, d]  the residual stream entering the block */
    real *n1, *rstd1; /* [rows, d], [rows]  rmsnorm(xin; attn_norm) */
    mixer_acts mix;
    real *xmid;       /* [rows, d]  xin + mixer(n1) */
    real *n2, *rstd2; /* [rows, d], [rows]  rmsnorm(xmid; mlp_norm) */
    real *h1, *h2, *hm; /* [rows, F]  n2 W1^T, n2 W2^T, silu(h1) * h2 */
} block_acts;

static void block_acts_free(block_acts *b)
{
    free_reals(b->xin), free_reals(b->n1), free_reals(b->rstd1), free_reals(b->xmid), free_reals(b->n2);
    free_reals(b->rstd2), free_reals(b->h1), free_reals(b->h2), free_reals(b->hm);
    mixer_acts_free(&b->mix);
}

static int block_acts_alloc(block_acts *b, const kla_mdims *m, int64_t rows)
{
    memset(b, 0, sizeof *b);
    const int64_t d = m->d, F = m->F;
    b->xin = alloc_reals(rows * d), b->n1 = alloc_reals(rows * d), b->rstd1 = alloc_reals(rows);
    b->xmid = alloc_reals(rows * d), b->n2 = alloc_reals(rows * d), b->rstd2 = alloc_reals(rows);
    b->h1 = alloc_reals(rows * F), b->h2 = alloc_reals(rows * F), b->hm = alloc_reals(rows * F);
    if (!b->xin || !b->n1 || !b->rstd1 || !b->xmid || !b->n2 || !b->rstd2 || !b->h1 || !b->h2 || !b->hm ||
        mixer_acts_alloc(&b->mix, m, rows) < 0) {
        block_acts_free(b);
        return KLA_ENOMEM;
    }
    return 0;
}

/* The model's parameters as views into the block w (kla-spec.md 8.3 names). */
typedef struct block_w {
    const real *attn_norm; /* layers.{i}.attn_norm.weight [d] */
    const real *mixer;     /* the first of the mixer's parameters (mixer_view) */
    const real *mlp_norm;  /* layers.{i}.mlp_norm.weight [d] */
    const real *w1, *w2, *w3; /* layers.{i}.mlp.{gate,up,down}_proj.weight [F, d], [F, d], [d, F] */
} block_w;

typedef struct model_w {
    const real *E;     /* embeddings.weight [vocab, d], also the head */
    const real *wf;    /* norm.weight [d] */
    block_w *blocks;   /* [L] */
} model_w;

static int model_view(const kla_mdims *m, const real *w, model_w *v)
{
    int64_t total;
    const int n = kla_mparams(m, NULL, 0, &total);
    kla_mparam *t = malloc((size_t)n * sizeof *t);
    v->blocks = malloc((size_t)(m->L ? m->L : 1) * sizeof *v->blocks);
    if (!t || !v->blocks) {
        free(t), free(v->blocks);
        return KLA_ENOMEM;
    }
    kla_mparams(m, t, n, &total);
    v->E = w + t[0].offset;
    v->wf = w + t[n - 1].offset;
    for (int64_t l = 0; l < m->L; l++) {
        block_w *b = &v->blocks[l];
        b->attn_norm = w + t[kla_mparam_index(m, (int)l, P_ATTN_NORM)].offset;
        b->mixer = w + t[kla_mparam_index(m, (int)l, P_MIXER_FIRST)].offset;
        b->mlp_norm = w + t[kla_mparam_index(m, (int)l, P_MLP_NORM)].offset;
        b->w1 = w + t[kla_mparam_index(m, (int)l, P_W1)].offset;
        b->w2 = w + t[kla_mparam_index(m, (int)l, P_W2)].offset;
        b->w3 = w + t[kla_mparam_index(m, (int)l, P_W3)].offset;
    }
    free(t);
    return 0;
}

/*
 * The head: logits = xf E^T at the rows in `rows` (all, or the labelled ones), then the
 * cross-entropy. Its backward: dlogits = (softmax - onehot(label)) / nlab, dxf = dlogits
 * E, dE += dlogits^T xf. One block of rows at a time (head_loss), so that the logits
 * [rows, vocab] of a long evaluation never exist at once.
 */
static int head_block(const kla_mdims *m, const real *E, const real *xf, const int64_t *labels, const int64_t *rows,
                      int64_t nr, int64_t nlab, real *dxf, real *dE, double *lsum, int64_t *correct)
{
    const int64_t V = m->vocab, d = m->d;
    real *xr = alloc_reals(nr * d), *logits = alloc_reals(nr * V);
    double *lr = malloc((size_t)(nr ? nr : 1) * sizeof *lr);
    int64_t *cr = malloc((size_t)(nr ? nr : 1) * sizeof *cr);
    if (!xr || !logits || !lr || !cr) {
        free_reals(xr), free_reals(logits), free(lr), free(cr);
        return KLA_ENOMEM;
    }
    for (int64_t i = 0; i < nr; i++) memcpy(xr + i * d, xf + rows[i] * d, (size_t)d * sizeof(real));
    matmul_nt(logits, xr, E, nr, V, d, 0);
    OMP_FOR
    for (int64_t i = 0; i < nr; i++) {
        real *z = logits + i * V;
        const int64_t lab = labels[rows[i]];
        /* loss_i = logsumexp(z) - z[label], with the max taken out; argmax: the first max */
        int64_t am = 0;
        for (int64_t j = 1; j < V; j++)
            if (z[j] > z[am]) am = j;
        const real zmax = z[am];
        double se = 0;
        for (int64_t j = 0; j < V; j++) se += (double)r_exp(z[j] - zmax);
        lr[i] = lab < 0 ? 0 : log(se) + (double)zmax - (double)z[lab];
        cr[i] = lab >= 0 && am == lab;
        /* dlogits, in place: (softmax - onehot) / nlab at labelled rows, 0 elsewhere */
        if (dxf) {
            for (int64_t j = 0; j < V; j++)
                z[j] = lab < 0 ? 0 : (real)((double)r_exp(z[j] - zmax) / se / (double)nlab);
            if (lab >= 0) z[lab] -= (real)(1.0 / (double)nlab);
        }
    }
    for (int64_t i = 0; i < nr; i++) *lsum += lr[i], *correct += cr[i];
    if (dxf) {
        /* xf E^T:  dxf (the gathered rows) = dlogits E;  dE += dlogits^T xf */
        real *dxr = alloc_reals(nr * d);
        if (!dxr) {
            free_reals(xr), free_reals(logits), free(lr), free(cr);
            return KLA_ENOMEM;
        }
        matmul_nn_acc(dxr, logits, E, nr, V, d);
        matmul_tn_acc(dE, logits, xr, nr, V, d);
        for (int64_t i = 0; i < nr; i++)
            for (int64_t j = 0; j < d; j++) dxf[rows[i] * d + j] += dxr[i * d + j];
        free_reals(dxr);
    }
    free_reals(xr), free_reals(logits), free(lr), free(cr);
    return 0;
}

#define HEAD_ROWS 1024

static int head_loss(const kla_mdims *m, const real *E, const real *xf, const int64_t *labels, const int64_t *rows,
                     int64_t nr, int64_t nlab, real *dxf, real *dE, double *loss, int64_t *correct)
{
    double lsum = 0;
    *correct = 0;
    for (int64_t i = 0; i < nr; i += HEAD_ROWS) {
        const int r = head_block(m, E, xf, labels, rows + i, nr - i < HEAD_ROWS ? nr - i : HEAD_ROWS, nlab, dxf, dE,
                                 &lsum, correct);
        if (r < 0) return r;
    }
    *loss = nlab ? lsum / (double)nlab : 0;
    return 0;
}

int MDL(model_loss)(const kla_mdims *m, const real *w, real *grad, int64_t B, int64_t T, const int64_t *ids,
                    const int64_t *labels, int labelled_only, KlaContext *op, kla_ws *ws, double *loss,
                    int64_t *correct, int64_t *nlab)
{
    const int64_t rows = B * T, d = m->d, F = m->F, L = m->L;
    int64_t total;
    kla_mparams(m, NULL, 0, &total);
    use_threads(m);
    ws_begin(ws);
    /* a forward alone (evaluation) keeps no block's activations for a backward: one set
     * serves every block in turn, so its memory does not grow with the blocks */
    const int64_t nacts = grad ? L : 1;
    model_w W, DW = { 0 };
    kla_mseqs seqs = { NULL, B };
    int64_t *cu = malloc((size_t)(B + 1) * sizeof *cu), *hrows = malloc((size_t)(rows ? rows : 1) * sizeof *hrows);
    block_acts *acts = calloc((size_t)(nacts ? nacts : 1), sizeof *acts);
    real *x = alloc_reals(rows * d), *xf = alloc_reals(rows * d), *rstdf = alloc_reals(rows);
    real *dx = alloc_reals(rows * d), *dtmp = alloc_reals(rows * d), *dh = alloc_reals(rows * F);
    int r = KLA_ENOMEM;
    W.blocks = NULL;
    if (!cu || !hrows || !acts || !x || !xf || !rstdf || !dx || !dtmp || !dh || model_view(m, w, &W) < 0) goto done;
    if (grad && model_view(m, grad, &DW) < 0) goto done;
    for (int64_t b = 0; b <= B; b++) cu[b] = b * T;
    seqs.cu = cu;
    for (int64_t l = 0; l < nacts; l++)
        if (block_acts_alloc(&acts[l], m, rows) < 0) goto done;

    /* x = E[ids] */
    for (int64_t i = 0; i < rows; i++) memcpy(x + i * d, W.E + ids[i] * d, (size_t)d * sizeof(real));
    for (int64_t l = 0; l < L; l++) {
        block_acts *a = &acts[grad ? l : 0];
        const block_w *bw = &W.blocks[l];
        mixer_w mw;
        mixer_view(m, bw->mixer, &mw);
        /* x = x + mixer(rmsnorm(x; attn_norm)) */
        memcpy(a->xin, x, (size_t)(rows * d) * sizeof(real));
        rmsnorm_rows(x, bw->attn_norm, a->n1, a->rstd1, rows, d, m->norm_eps);
        if ((r = mixer_forward(m, &mw, &seqs, a->n1, dtmp, &a->mix, op)) < 0) goto done;
        OMP_FOR
        for (int64_t i = 0; i < rows * d; i++) x[i] += dtmp[i];
        /* x = x + W3 (silu(n W1^T) * (n W2^T)),  n = rmsnorm(x; mlp_norm) */
        memcpy(a->xmid, x, (size_t)(rows * d) * sizeof(real));
        rmsnorm_rows(x, bw->mlp_norm, a->n2, a->rstd2, rows, d, m->norm_eps);
        matmul_nt(a->h1, a->n2, bw->w1, rows, F, d, 0);
        matmul_nt(a->h2, a->n2, bw->w2, rows, F, d, 0);
        OMP_FOR
        for (int64_t i = 0; i < rows * F; i++) a->hm[i] = silu(a->h1[i]) * a->h2[i];
        matmul_nt(x, a->hm, bw->w3, rows, d, F, 1);
    }
    /* logits = rmsnorm(x; norm) E^T, the loss at labelled rows */
    rmsnorm_rows(x, W.wf, xf, rstdf, rows, d, m->norm_eps);
    int64_t nl = 0, nr = 0;
    for (int64_t i = 0; i < rows; i++) {
        if (labels[i] >= 0) nl++;
        if (labels[i] >= 0 || !labelled_only) hrows[nr++] = i;
    }
    *nlab = nl;
    real *dxf = grad ? dtmp : NULL;
    if (grad) {
        memset(grad, 0, (size_t)total * sizeof(real));
        memset(dtmp, 0, (size_t)(rows * d) * sizeof(real));
    }
    if ((r = head_loss(m, W.E, xf, labels, hrows, nr, nl, dxf, grad ? (real *)DW.E : NULL, loss, correct)) < 0)
        goto done;
    if (!grad) goto done;

    /* ---- backward, the forward's lines in reverse ---- */
    /* xf = rmsnorm(x; norm) */
    memset(dx, 0, (size_t)(rows * d) * sizeof(real));
    if ((r = rmsnorm_rows_backward(x, W.wf, rstdf, dxf, dx, (real *)DW.wf, rows, d)) < 0) goto done;
    for (int64_t l = L - 1; l >= 0; l--) {
        block_acts *a = &acts[l];
        const block_w *bw = &W.blocks[l], *dbw = &DW.blocks[l];
        mixer_w mw;
        mixer_dw mdw;
        mixer_view(m, bw->mixer, &mw);
        mixer_dview(m, (real *)dbw->mixer, &mdw);
        /* x = xmid + hm W3^T:  dhm = dx W3;  dW3 += dx^T hm;  dxmid = dx (the residual) */
        memset(dh, 0, (size_t)(rows * F) * sizeof(real));
        matmul_nn_acc(dh, dx, bw->w3, rows, d, F);
        matmul_tn_acc((real *)dbw->w3, dx, a->hm, rows, d, F);
        /* hm = silu(h1) * h2:  dh1 = dhm h2 silu'(h1);  dh2 = dhm silu(h1)  (h2 reused) */
        OMP_FOR
        for (int64_t i = 0; i < rows * F; i++) {
            const real g1 = dh[i] * a->h2[i] * silu_grad(a->h1[i]);
            a->h2[i] = dh[i] * silu(a->h1[i]); /* dh2 */
            dh[i] = g1;                        /* dh1 */
        }
        /* h1 = n2 W1^T, h2 = n2 W2^T:  dn2 = dh1 W1 + dh2 W2 */
        memset(dtmp, 0, (size_t)(rows * d) * sizeof(real));
        matmul_nn_acc(dtmp, dh, bw->w1, rows, F, d);
        matmul_nn_acc(dtmp, a->h2, bw->w2, rows, F, d);
        matmul_tn_acc((real *)dbw->w1, dh, a->n2, rows, F, d);
        matmul_tn_acc((real *)dbw->w2, a->h2, a->n2, rows, F, d);
        /* n2 = rmsnorm(xmid; mlp_norm): dx += its backward */
        if ((r = rmsnorm_rows_backward(a->xmid, bw->mlp_norm, a->rstd2, dtmp, dx, (real *)dbw->mlp_norm, rows, d)) < 0)
            goto done;
        /* xmid = xin + mixer(n1):  dn1 = the mixer's backward of dx;  dxin = dx + ... */
        memset(dtmp, 0, (size_t)(rows * d) * sizeof(real));
        if ((r = mixer_backward(m, &mw, &mdw, &seqs, a->n1, &a->mix, dx, dtmp, op)) < 0) goto done;
        /* n1 = rmsnorm(xin; attn_norm) */
        if ((r = rmsnorm_rows_backward(a->xin, bw->attn_norm, a->rstd1, dtmp, dx, (real *)dbw->attn_norm, rows, d)) < 0)
            goto done;
    }
    /* x = E[ids]:  dE[ids[i]] += dx[i] (rows in order) */
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < d; j++) ((real *)DW.E)[ids[i] * d + j] += dx[i * d + j];
    r = 0;
done:
    for (int64_t l = 0; acts && l < nacts; l++) block_acts_free(&acts[l]);
    free(acts), free(cu), free(hrows), free_reals(x), free_reals(xf), free_reals(rstdf), free_reals(dx);
    free_reals(dtmp), free_reals(dh);
    free(W.blocks), free(DW.blocks);
    end_threads();
    ws_end(ws);
    return r;
}

/* ---- 6. the optimizer: global-norm clipping and AdamW --------------------------------- */

double MDL(sumsq)(const real *g, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)g[i] * (double)g[i];
    return s;
}

/*
 * PyTorch's AdamW, step t (from 1), on gradients g * clip_scale:
 *     p <- p (1 - lr wd)                                decoupled weight decay
 *     m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
 *     p <- p - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
 */
void MDL(adamw)(real *p, const real *g, real *mo, real *ve, int64_t n, int64_t step, double lr, double beta1,
                double beta2, double eps, double wd, double clip_scale)
{
    /* in PyTorch's order of operations: step_size = lr / bc1, denom = sqrt(v) / sqrt(bc2) + eps */
    const double bc1 = 1 - pow(beta1, (double)step), bc2 = 1 - pow(beta2, (double)step);
    const double step_size = lr / bc1, bc2_sqrt = sqrt(bc2);
    OMP_FOR
    for (int64_t i = 0; i < n; i++) {
        const double gi = (double)g[i] * clip_scale;
        const double m1 = beta1 * (double)mo[i] + (1 - beta1) * gi;
        const double v1 = beta2 * (double)ve[i] + (1 - beta2) * gi * gi;
        mo[i] = (real)m1, ve[i] = (real)v1;
        const double pi = (double)p[i] * (1 - lr * wd);
        p[i] = (real)(pi - step_size * m1 / (sqrt(v1) / bc2_sqrt + eps));
    }
}
