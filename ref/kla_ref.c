/*
 * kla_ref.c: the scalar reference of Kaczmarz Linear Attention (KLA) and Gated DeltaNet.
 *
 * Read this file top to bottom to learn the algorithm; docs/algorithm.md derives every
 * step with the same symbol names. It is compiled twice: KLA_REAL_BITS=32 gives the
 * float32 reference (backend "ref"), 64 the float64 one ("ref64"). No intrinsics, no
 * threads; every loop names its math.
 *
 * The contract (kla-spec.md). For one sequence and one value head, tokens t = 1..T:
 *
 *     alpha_t = exp(g_t)                       g_t <= 0, a log decay
 *     beta_t  = eta_t / (||k_t||^2 + eps)      mode KLA (relaxed Kaczmarz step)
 *             = given                          mode GDN
 *     S       = alpha_t S_{t-1}                decay first
 *     e_t     = v_t - S^T k_t                  residual against the decayed state
 *     S_t     = S + beta_t k_t e_t^T           delta-rule step
 *     o_t     = S_t^T (scale q_t)              read the updated state
 *
 * S is K x V, row-major (S[i*V + j], i over keys, j over values). Optionally q and k are
 * first normalised, x / sqrt(||x||^2 + 1e-6). Value head hv reads key head hv/(HV/H).
 *
 * Tensors (see kla_ref.h): q, k [total, H, K]; v, o [total, HV, V]; g, a [total, HV];
 * states [N, HV, K, V]; sequence n is tokens cu[n] .. cu[n+1]-1.
 *
 * Layout of this file:
 *   1. helpers                 4. chunkwise forward
 *   2. preparation (l2norm,    5. recurrent backward
 *      step size) and its      6. chunkwise backward
 *      backward                7. entry points: forward, backward, decode
 *   3. the step (= decode) and the recurrent forward
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"
#include "kla_ref.h"

#if KLA_REAL_BITS == 32
typedef float real;
#define REF(name) kla_ref_##name##_f32
#define r_exp expf
#define r_sqrt sqrtf
#elif KLA_REAL_BITS == 64
typedef double real;
#define REF(name) kla_ref_##name##_f64
#define r_exp exp
#define r_sqrt sqrt
#else
#error "define KLA_REAL_BITS as 32 or 64"
#endif

#define L2NORM_EPS 1e-6 /* fixed by the spec, independent of the KLA eps */
#define CKPT 64         /* recurrent backward: a saved state every CKPT tokens */

/* ---- 1. helpers -------------------------------------------------------------------- */

static real dot(const real *x, const real *y, int64_t n)
{
    real s = 0;
    for (int64_t i = 0; i < n; i++) s += x[i] * y[i];
    return s;
}

/* calloc of n reals, NULL on overflow or failure. */
static real *alloc_reals(int64_t n)
{
    if (n <= 0) n = 1;
    if ((uint64_t)n > SIZE_MAX / sizeof(real)) return NULL;
    return calloc((size_t)n, sizeof(real));
}

/* The rows one (token, head) reads. */
static const real *qk_row(const kla_problem *p, const real *x, int64_t t, int64_t h)
{
    return x + (t * p->H + h) * p->K;
}
static int64_t key_head(const kla_problem *p, int64_t hv) { return hv / (p->HV / p->H); }
static real decay_log(const real *g, const kla_problem *p, int64_t t, int64_t hv)
{
    return g ? g[t * p->HV + hv] : 0;
}

/* ---- 2. preparation: normalised q, k and the step size beta --------------------------- */

/* What the core recurrence reads, computed once per call from the raw inputs. */
typedef struct prepared {
    real *qhat; /* [total, H, K]  q, or q / rq when l2norm_q */
    real *khat; /* [total, H, K]  k, or k / rk when l2norm_k */
    real *rq;   /* [total, H]     sqrt(||q||^2 + 1e-6), when l2norm_q */
    real *rk;   /* [total, H]     sqrt(||k||^2 + 1e-6), when l2norm_k */
    real *nk;   /* [total, H]     ||khat||^2 + eps, mode KLA */
    real *beta; /* [total, HV]    the delta-rule step */
} prepared;

static void prepared_free(prepared *P)
{
    free(P->qhat), free(P->khat), free(P->rq), free(P->rk), free(P->nk), free(P->beta);
    memset(P, 0, sizeof *P);
}

/* y = x / r, r = sqrt(||x||^2 + 1e-6) */
static void l2norm_forward(const real *x, real *y, real *r, int64_t n)
{
    *r = r_sqrt(dot(x, x, n) + (real)L2NORM_EPS);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] / *r;
}

/* y = x / r  =>  dx = (dy - y (y . dy)) / r */
static void l2norm_backward(const real *y, real r, const real *dy, real *dx, int64_t n)
{
    real ydy = dot(y, dy, n);
    for (int64_t i = 0; i < n; i++) dx[i] = (dy[i] - y[i] * ydy) / r;
}

static int prepare(const kla_problem *p, const real *q, const real *k, const real *a,
                   prepared *P)
{
    const int64_t T = p->total, H = p->H, HV = p->HV, K = p->K;
    memset(P, 0, sizeof *P);
    P->qhat = alloc_reals(T * H * K);
    P->khat = alloc_reals(T * H * K);
    P->rq = alloc_reals(T * H);
    P->rk = alloc_reals(T * H);
    P->nk = alloc_reals(T * H);
    P->beta = alloc_reals(T * HV);
    if (!P->qhat || !P->khat || !P->rq || !P->rk || !P->nk || !P->beta) {
        prepared_free(P);
        return KLA_ENOMEM;
    }
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t th = t * H + h;
            /* qhat = l2norm(q) or q;  khat = l2norm(k) or k */
            if (p->l2norm_q) l2norm_forward(q + th * K, P->qhat + th * K, &P->rq[th], K);
            else memcpy(P->qhat + th * K, q + th * K, (size_t)K * sizeof(real));
            if (p->l2norm_k) l2norm_forward(k + th * K, P->khat + th * K, &P->rk[th], K);
            else memcpy(P->khat + th * K, k + th * K, (size_t)K * sizeof(real));
            /* nk = ||khat||^2 + eps, the squared length the Kaczmarz step divides by */
            const real *kh = P->khat + th * K;
            P->nk[th] = dot(kh, kh, K) + (real)p->eps;
        }
        for (int64_t hv = 0; hv < HV; hv++) {
            const int64_t th = t * H + key_head(p, hv);
            /* KLA: beta = eta / (||khat||^2 + eps).  GDN: beta is the input. */
            if (p->mode == KLA_MODE_KLA) P->beta[t * HV + hv] = a[t * HV + hv] / P->nk[th];
            else P->beta[t * HV + hv] = a[t * HV + hv];
        }
    }
    return 0;
}

/*
 * From the gradients with respect to what the core read (dqhat, dkhat, dbeta) to those
 * of the raw inputs (dq, dk, da). dkhat is updated in place.
 */
static void prepare_backward(const kla_problem *p, const real *a, const prepared *P,
                             const real *dqhat, real *dkhat, const real *dbeta, real *dq,
                             real *dk, real *da)
{
    const int64_t T = p->total, H = p->H, HV = p->HV, K = p->K;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t hv = 0; hv < HV; hv++) {
            const int64_t tv = t * HV + hv, th = t * H + key_head(p, hv);
            if (p->mode == KLA_MODE_KLA) {
                /* beta = eta / nk, nk = ||khat||^2 + eps:
                 *   deta = dbeta / nk;  dkhat += dbeta * (-eta / nk^2) * 2 khat */
                const real nk = P->nk[th];
                da[tv] = dbeta[tv] / nk;
                const real c = -2 * dbeta[tv] * a[tv] / (nk * nk);
                for (int64_t i = 0; i < K; i++) dkhat[th * K + i] += c * P->khat[th * K + i];
            } else {
                da[tv] = dbeta[tv]; /* GDN: beta is the input */
            }
        }
        for (int64_t h = 0; h < H; h++) {
            const int64_t th = t * H + h;
            /* qhat = q / rq  =>  dq = (dqhat - qhat (qhat . dqhat)) / rq; else dq = dqhat */
            if (p->l2norm_q) l2norm_backward(P->qhat + th * K, P->rq[th], dqhat + th * K, dq + th * K, K);
            else memcpy(dq + th * K, dqhat + th * K, (size_t)K * sizeof(real));
            if (p->l2norm_k) l2norm_backward(P->khat + th * K, P->rk[th], dkhat + th * K, dk + th * K, K);
            else memcpy(dk + th * K, dkhat + th * K, (size_t)K * sizeof(real));
        }
    }
}

/* ---- 3. the step (one token, one head) and the recurrent forward -------------------- */

/*
 * One token of the recurrence, in place on S [K, V]. This is the decode step and the
 * body of the recurrent forward. e is scratch [V]. Writes o [V].
 */
static void step(real *S, const real *q, const real *k, const real *v, real alpha,
                 real beta, real scale, int64_t K, int64_t V, real *e, real *o)
{
    /* S <- alpha S */
    for (int64_t i = 0; i < K * V; i++) S[i] *= alpha;
    /* e = v - S^T k */
    for (int64_t j = 0; j < V; j++) {
        real s = 0;
        for (int64_t i = 0; i < K; i++) s += S[i * V + j] * k[i];
        e[j] = v[j] - s;
    }
    /* S <- S + beta k e^T */
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j < V; j++) S[i * V + j] += beta * k[i] * e[j];
    /* o = S^T (scale q) */
    for (int64_t j = 0; j < V; j++) {
        real s = 0;
        for (int64_t i = 0; i < K; i++) s += S[i * V + j] * q[i];
        o[j] = scale * s;
    }
}

/* S = h0[n, hv] or zeros. */
static void load_state(const kla_problem *p, const real *h0, int64_t n, int64_t hv, real *S)
{
    const int64_t KV = p->K * p->V;
    if (h0) memcpy(S, h0 + (n * p->HV + hv) * KV, (size_t)KV * sizeof(real));
    else memset(S, 0, (size_t)KV * sizeof(real));
}

/* The definition: o and ht of sequence n, value head hv, one token at a time. */
static void recurrent_forward(const kla_problem *p, const prepared *P, int64_t n, int64_t hv,
                              const real *v, const real *g, const real *h0, real *o, real *ht,
                              real *S, real *e)
{
    const int64_t K = p->K, V = p->V, HV = p->HV, h = key_head(p, hv);
    load_state(p, h0, n, hv, S);
    for (int64_t t = p->cu[n]; t < p->cu[n + 1]; t++) {
        step(S, qk_row(p, P->qhat, t, h), qk_row(p, P->khat, t, h), v + (t * HV + hv) * V,
             r_exp(decay_log(g, p, t, hv)), P->beta[t * HV + hv], (real)p->scale, K, V, e,
             o + (t * HV + hv) * V);
    }
    if (ht) memcpy(ht + (n * HV + hv) * K * V, S, (size_t)(K * V) * sizeof(real));
}

/* ---- 4. chunkwise forward ----------------------------------------------------------- */

/*
 * Within a chunk of L <= C tokens starting from state S0, positions i, j = 0..L-1:
 *
 *     G_i     = g_0 + ... + g_i                  cumulative log decay
 *     gamma_i = exp(G_i)
 *     A[i,j]  = beta_i exp(G_i - G_j) k_i . k_j  (j < i; A is strictly lower)
 *     Tm      = (I + A)^-1                       unit lower triangular
 *     w       = Tm diag(beta gamma) K            [L, K]
 *     u       = Tm diag(beta) V                  [L, V]
 *     vnew    = u - w S0                         [L, V]  (vnew_j = beta_j e_j)
 *     o_i     = scale (gamma_i S0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) vnew_j)
 *     S_L     = gamma_L S0 + sum_j exp(G_L - G_j) k_j vnew_j^T
 *
 * Only exp of differences G_i - G_j <= 0 is taken, so nothing overflows.
 */
typedef struct chunk_work {
    int64_t C, K, V;
    real *G, *gamma;       /* [C] */
    real *beta;            /* [C] */
    const real *q[128], *k[128], *v[128]; /* rows of the chunk's tokens */
    real *A, *Tm;          /* [C, C] */
    real *w;               /* [C, K] */
    real *u, *vnew;        /* [C, V] */
    /* backward only */
    real *dG, *dvnew, *dw, *dTm, *dA, *X, *du2, *dw2; /* dG [C]; [C,V]; [C,K]; [C,C] x3; [C,V]; [C,K] */
} chunk_work;

static void chunk_work_free(chunk_work *W)
{
    free(W->G), free(W->gamma), free(W->beta), free(W->A), free(W->Tm), free(W->w);
    free(W->u), free(W->vnew), free(W->dG), free(W->dvnew), free(W->dw), free(W->dTm);
    free(W->dA), free(W->X), free(W->du2), free(W->dw2);
}

static int chunk_work_alloc(chunk_work *W, int64_t C, int64_t K, int64_t V, int backward)
{
    memset(W, 0, sizeof *W);
    W->C = C, W->K = K, W->V = V;
    W->G = alloc_reals(C), W->gamma = alloc_reals(C), W->beta = alloc_reals(C);
    W->A = alloc_reals(C * C), W->Tm = alloc_reals(C * C), W->w = alloc_reals(C * K);
    W->u = alloc_reals(C * V), W->vnew = alloc_reals(C * V);
    int ok = W->G && W->gamma && W->beta && W->A && W->Tm && W->w && W->u && W->vnew;
    if (backward) {
        W->dG = alloc_reals(C), W->dvnew = alloc_reals(C * V), W->dw = alloc_reals(C * K);
        W->dTm = alloc_reals(C * C), W->dA = alloc_reals(C * C), W->X = alloc_reals(C * C);
        W->du2 = alloc_reals(C * V), W->dw2 = alloc_reals(C * K);
        ok = ok && W->dG && W->dvnew && W->dw && W->dTm && W->dA && W->X && W->du2 && W->dw2;
    }
    if (!ok) {
        chunk_work_free(W);
        return KLA_ENOMEM;
    }
    return 0;
}

/* Everything of one chunk that does not need S0: G, gamma, A, Tm, w, u. */
static void chunk_prepare(const kla_problem *p, const prepared *P, const real *v, const real *g,
                          int64_t t0, int64_t L, int64_t hv, chunk_work *W)
{
    const int64_t K = p->K, V = p->V, C = W->C, h = key_head(p, hv);
    for (int64_t i = 0; i < L; i++) {
        const int64_t t = t0 + i;
        W->q[i] = qk_row(p, P->qhat, t, h);
        W->k[i] = qk_row(p, P->khat, t, h);
        W->v[i] = v + (t * p->HV + hv) * V;
        W->beta[i] = P->beta[t * p->HV + hv];
        /* G_i = G_{i-1} + g_i;  gamma_i = exp(G_i) */
        W->G[i] = (i ? W->G[i - 1] : 0) + decay_log(g, p, t, hv);
        W->gamma[i] = r_exp(W->G[i]);
    }
    /* A[i,j] = beta_i exp(G_i - G_j) k_i . k_j for j < i, else 0 */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++)
            W->A[i * C + j] = j < i ? W->beta[i] * r_exp(W->G[i] - W->G[j]) * dot(W->k[i], W->k[j], K) : 0;
    /* Tm = (I + A)^-1 by forward substitution: row i of (I + A) Tm = I gives
     * Tm[i,j] = [i == j] - sum_{j <= m < i} A[i,m] Tm[m,j] */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++) {
            real s = i == j ? 1 : 0;
            if (j < i)
                for (int64_t m = j; m < i; m++) s -= W->A[i * C + m] * W->Tm[m * C + j];
            W->Tm[i * C + j] = j <= i ? s : 0;
        }
    /* w = Tm diag(beta gamma) K;  u = Tm diag(beta) V */
    for (int64_t i = 0; i < L; i++) {
        for (int64_t c = 0; c < K; c++) {
            real s = 0;
            for (int64_t j = 0; j <= i; j++) s += W->Tm[i * C + j] * W->beta[j] * W->gamma[j] * W->k[j][c];
            W->w[i * K + c] = s;
        }
        for (int64_t c = 0; c < V; c++) {
            real s = 0;
            for (int64_t j = 0; j <= i; j++) s += W->Tm[i * C + j] * W->beta[j] * W->v[j][c];
            W->u[i * V + c] = s;
        }
    }
}

/* vnew = u - w S0 */
static void chunk_vnew(const chunk_work *W, int64_t L, const real *S0)
{
    const int64_t K = W->K, V = W->V;
    for (int64_t i = 0; i < L; i++)
        for (int64_t c = 0; c < V; c++) {
            real s = 0;
            for (int64_t m = 0; m < K; m++) s += W->w[i * K + m] * S0[m * V + c];
            W->vnew[i * V + c] = W->u[i * V + c] - s;
        }
}

/* o_i = scale (gamma_i S0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) vnew_j) */
static void chunk_output(const kla_problem *p, const chunk_work *W, int64_t L, const real *S0,
                         int64_t t0, int64_t hv, real *o)
{
    const int64_t K = W->K, V = W->V;
    for (int64_t i = 0; i < L; i++) {
        real *oi = o + ((t0 + i) * p->HV + hv) * V;
        for (int64_t c = 0; c < V; c++) {
            real s = 0;
            for (int64_t m = 0; m < K; m++) s += W->q[i][m] * S0[m * V + c];
            oi[c] = W->gamma[i] * s;
        }
        for (int64_t j = 0; j <= i; j++) {
            const real a = r_exp(W->G[i] - W->G[j]) * dot(W->q[i], W->k[j], K);
            for (int64_t c = 0; c < V; c++) oi[c] += a * W->vnew[j * V + c];
        }
        for (int64_t c = 0; c < V; c++) oi[c] *= (real)p->scale;
    }
}

/* S <- gamma_L S0 + sum_j exp(G_L - G_j) k_j vnew_j^T   (in place: S holds S0) */
static void chunk_state_pass(const chunk_work *W, int64_t L, real *S)
{
    const int64_t K = W->K, V = W->V;
    const real GL = W->G[L - 1];
    for (int64_t i = 0; i < K * V; i++) S[i] *= W->gamma[L - 1];
    for (int64_t j = 0; j < L; j++) {
        const real d = r_exp(GL - W->G[j]);
        for (int64_t m = 0; m < K; m++)
            for (int64_t c = 0; c < V; c++) S[m * V + c] += d * W->k[j][m] * W->vnew[j * V + c];
    }
}

/* o and ht of sequence n, value head hv, chunk by chunk. If S0s is given, the state
 * entering each chunk is saved there ([nchunks, K, V], for the backward pass). */
static void chunk_forward(const kla_problem *p, const prepared *P, int64_t n, int64_t hv,
                          const real *v, const real *g, const real *h0, real *o, real *ht,
                          real *S, chunk_work *W, real *S0s)
{
    const int64_t KV = p->K * p->V, C = p->chunk;
    load_state(p, h0, n, hv, S);
    for (int64_t t0 = p->cu[n], c = 0; t0 < p->cu[n + 1]; t0 += C, c++) {
        const int64_t L = p->cu[n + 1] - t0 < C ? p->cu[n + 1] - t0 : C;
        if (S0s) memcpy(S0s + c * KV, S, (size_t)KV * sizeof(real));
        chunk_prepare(p, P, v, g, t0, L, hv, W);
        chunk_vnew(W, L, S);
        chunk_output(p, W, L, S, t0, hv, o);
        chunk_state_pass(W, L, S);
    }
    if (ht) memcpy(ht + (n * p->HV + hv) * KV, S, (size_t)KV * sizeof(real));
}

/* ---- 5. recurrent backward (back-propagation through time) -------------------------- */

/* Gradients the core writes, with respect to what it read. dqhat and dkhat are
 * accumulated over the value heads that share a key head. */
typedef struct grads {
    real *dqhat, *dkhat; /* [total, H, K] */
    real *dv;            /* [total, HV, V] */
    real *dg;            /* [total, HV] */
    real *dbeta;         /* [total, HV] */
    real *dh0;           /* [N, HV, K, V] or NULL */
} grads;

/*
 * Sequence n, value head hv. The forward pass saves the state every CKPT tokens; the
 * backward pass replays each segment from its checkpoint, then walks it backwards.
 * dS is the gradient with respect to the state after the current token.
 */
static int recurrent_backward(const kla_problem *p, const prepared *P, int64_t n, int64_t hv,
                              const real *v, const real *g, const real *h0, const real *dout,
                              const real *dht, real *o, real *ht, grads *D)
{
    const int64_t K = p->K, V = p->V, KV = K * V, HV = p->HV, h = key_head(p, hv);
    const int64_t t_begin = p->cu[n], len = p->cu[n + 1] - t_begin;
    const int64_t nseg = (len + CKPT - 1) / CKPT;
    const real scale = (real)p->scale;
    real *ckpt = alloc_reals((nseg ? nseg : 1) * KV); /* state before each segment */
    real *Ss = alloc_reals((CKPT + 1) * KV);          /* states through one segment */
    real *dS = alloc_reals(KV), *dSp = alloc_reals(KV), *Sp = alloc_reals(KV);
    real *e = alloc_reals(V), *de = alloc_reals(V), *tmp = alloc_reals(V);
    if (!ckpt || !Ss || !dS || !dSp || !Sp || !e || !de || !tmp) {
        free(ckpt), free(Ss), free(dS), free(dSp), free(Sp), free(e), free(de), free(tmp);
        return KLA_ENOMEM;
    }

    /* forward: o, ht, and the checkpoints */
    real *S = Ss;
    load_state(p, h0, n, hv, S);
    for (int64_t i = 0; i < len; i++) {
        const int64_t t = t_begin + i;
        if (i % CKPT == 0) memcpy(ckpt + (i / CKPT) * KV, S, (size_t)KV * sizeof(real));
        step(S, qk_row(p, P->qhat, t, h), qk_row(p, P->khat, t, h), v + (t * HV + hv) * V,
             r_exp(decay_log(g, p, t, hv)), P->beta[t * HV + hv], scale, K, V, e,
             o + (t * HV + hv) * V);
    }
    if (ht) memcpy(ht + (n * HV + hv) * KV, S, (size_t)KV * sizeof(real));

    /* dS_T = dht */
    if (dht) memcpy(dS, dht + (n * HV + hv) * KV, (size_t)KV * sizeof(real));
    else memset(dS, 0, (size_t)KV * sizeof(real));

    for (int64_t s = nseg - 1; s >= 0; s--) {
        const int64_t i0 = s * CKPT, L = len - i0 < CKPT ? len - i0 : CKPT;
        /* replay: Ss[m] = state after m tokens of the segment */
        memcpy(Ss, ckpt + s * KV, (size_t)KV * sizeof(real));
        for (int64_t m = 0; m < L; m++) {
            const int64_t t = t_begin + i0 + m;
            memcpy(Ss + (m + 1) * KV, Ss + m * KV, (size_t)KV * sizeof(real));
            step(Ss + (m + 1) * KV, qk_row(p, P->qhat, t, h), qk_row(p, P->khat, t, h),
                 v + (t * HV + hv) * V, r_exp(decay_log(g, p, t, hv)), P->beta[t * HV + hv],
                 scale, K, V, e, tmp);
        }
        for (int64_t m = L - 1; m >= 0; m--) {
            const int64_t t = t_begin + i0 + m, tv = t * HV + hv;
            const real *q = qk_row(p, P->qhat, t, h), *k = qk_row(p, P->khat, t, h);
            const real *vt = v + tv * V, *dOt = dout + tv * V;
            const real *Sprev = Ss + m * KV, *St = Ss + (m + 1) * KV;
            const real alpha = r_exp(decay_log(g, p, t, hv)), beta = P->beta[tv];
            real *dq = D->dqhat + (t * p->H + h) * K, *dk = D->dkhat + (t * p->H + h) * K;

            /* recompute  Sp = alpha S_{t-1};  e = v - Sp^T k */
            for (int64_t i = 0; i < KV; i++) Sp[i] = alpha * Sprev[i];
            for (int64_t j = 0; j < V; j++) {
                real acc = 0;
                for (int64_t i = 0; i < K; i++) acc += Sp[i * V + j] * k[i];
                e[j] = vt[j] - acc;
            }
            /* o = S_t^T (scale q):  dS += scale q do^T;  dq += scale S_t do */
            for (int64_t i = 0; i < K; i++) {
                real acc = 0;
                for (int64_t j = 0; j < V; j++) {
                    dS[i * V + j] += scale * q[i] * dOt[j];
                    acc += St[i * V + j] * dOt[j];
                }
                dq[i] += scale * acc;
            }
            /* S_t = Sp + beta k e^T:  dbeta = k^T dS e;  dk += beta dS e;  de = beta dS^T k;
             * dSp = dS */
            real dbeta = 0;
            for (int64_t i = 0; i < K; i++) {
                real dSe = 0;
                for (int64_t j = 0; j < V; j++) dSe += dS[i * V + j] * e[j];
                dbeta += k[i] * dSe;
                dk[i] += beta * dSe;
            }
            for (int64_t j = 0; j < V; j++) {
                real acc = 0;
                for (int64_t i = 0; i < K; i++) acc += dS[i * V + j] * k[i];
                de[j] = beta * acc;
            }
            D->dbeta[tv] = dbeta;
            /* e = v - Sp^T k:  dv = de;  dSp -= k de^T;  dk -= Sp de */
            for (int64_t j = 0; j < V; j++) D->dv[tv * V + j] = de[j];
            for (int64_t i = 0; i < K; i++) {
                real acc = 0;
                for (int64_t j = 0; j < V; j++) {
                    dSp[i * V + j] = dS[i * V + j] - k[i] * de[j];
                    acc += Sp[i * V + j] * de[j];
                }
                dk[i] -= acc;
            }
            /* Sp = alpha S_{t-1}, alpha = exp(g):  dg = <Sp, dSp>;  dS_{t-1} = alpha dSp */
            real dgt = 0;
            for (int64_t i = 0; i < KV; i++) dgt += Sp[i] * dSp[i];
            D->dg[tv] = dgt;
            for (int64_t i = 0; i < KV; i++) dS[i] = alpha * dSp[i];
        }
    }
    /* S_0 = h0:  dh0 = dS_0 */
    if (D->dh0) memcpy(D->dh0 + (n * HV + hv) * KV, dS, (size_t)KV * sizeof(real));
    free(ckpt), free(Ss), free(dS), free(dSp), free(Sp), free(e), free(de), free(tmp);
    return 0;
}

/* ---- 6. chunkwise backward ------------------------------------------------------------ */

/*
 * Reverse mode through the chunk steps of section 4, last chunk first. S0 of each chunk
 * comes from the forward pass; dS holds the gradient with respect to the state leaving
 * the chunk and becomes that of the state entering it. dG gathers the gradient with
 * respect to the cumulative decay G; dg is its reverse cumulative sum.
 */
static void chunk_backward_one(const kla_problem *p, chunk_work *W, int64_t L,
                               const real *S0, const real *dout, int64_t t0, int64_t hv,
                               real *dS, grads *D)
{
    const int64_t K = p->K, V = p->V, C = W->C, HV = p->HV, H = p->H, h = key_head(p, hv);
    const real scale = (real)p->scale, GL = W->G[L - 1], gammaL = W->gamma[L - 1];
    real dbeta[128];
    real *dq[128], *dk[128];
    for (int64_t i = 0; i < L; i++) {
        dq[i] = D->dqhat + ((t0 + i) * H + h) * K;
        dk[i] = D->dkhat + ((t0 + i) * H + h) * K;
        dbeta[i] = 0;
        W->dG[i] = 0;
    }
    memset(W->dvnew, 0, (size_t)(L * V) * sizeof(real));

    /* S_L = gamma_L S0 + sum_j exp(G_L - G_j) k_j vnew_j^T:
     *   dvnew_j += exp(G_L - G_j) dS^T k_j;   dk_j += exp(G_L - G_j) dS vnew_j;
     *   dG_L += gamma_L <S0, dS> + sum_j b_j;  dG_j -= b_j,  b_j = exp(G_L - G_j) k_j^T dS vnew_j */
    {
        real s0ds = 0;
        for (int64_t i = 0; i < K * V; i++) s0ds += S0[i] * dS[i];
        W->dG[L - 1] += gammaL * s0ds;
    }
    for (int64_t j = 0; j < L; j++) {
        const real d = r_exp(GL - W->G[j]);
        real b = 0;
        for (int64_t m = 0; m < K; m++) {
            real dSv = 0;
            for (int64_t c = 0; c < V; c++) {
                W->dvnew[j * V + c] += d * dS[m * V + c] * W->k[j][m];
                dSv += dS[m * V + c] * W->vnew[j * V + c];
            }
            dk[j][m] += d * dSv;
            b += d * W->k[j][m] * dSv;
        }
        W->dG[L - 1] += b;
        W->dG[j] -= b;
    }
    /* the state leaving is gamma_L S0 + ...: dS0 = gamma_L dS (more terms follow) */
    for (int64_t i = 0; i < K * V; i++) dS[i] *= gammaL;
    /* from here on dS is dS0 */

    /* o_i = scale (gamma_i S0^T q_i + sum_{j<=i} exp(G_i - G_j)(q_i . k_j) vnew_j):
     *   dq_i += scale gamma_i S0 do_i;  dS0 += scale gamma_i q_i do_i^T;
     *   dG_i += scale gamma_i q_i^T S0 do_i;
     *   with P_ij = scale exp(G_i - G_j) q_i . k_j and dP_ij = do_i . vnew_j:
     *   dvnew_j += P_ij do_i;  dq_i += dP_ij scale exp(G_i - G_j) k_j;
     *   dk_j += dP_ij scale exp(G_i - G_j) q_i;  dG_i += dP_ij P_ij;  dG_j -= dP_ij P_ij */
    for (int64_t i = 0; i < L; i++) {
        const real *doi = dout + ((t0 + i) * HV + hv) * V;
        real qS0do = 0;
        for (int64_t m = 0; m < K; m++) {
            real s = 0;
            for (int64_t c = 0; c < V; c++) s += S0[m * V + c] * doi[c];
            dq[i][m] += scale * W->gamma[i] * s;
            qS0do += W->q[i][m] * s;
        }
        W->dG[i] += scale * W->gamma[i] * qS0do;
        for (int64_t m = 0; m < K; m++)
            for (int64_t c = 0; c < V; c++) dS[m * V + c] += scale * W->gamma[i] * W->q[i][m] * doi[c];
        for (int64_t j = 0; j <= i; j++) {
            const real E = r_exp(W->G[i] - W->G[j]);
            const real P = scale * E * dot(W->q[i], W->k[j], K);
            const real dP = dot(doi, W->vnew + j * V, V);
            for (int64_t c = 0; c < V; c++) W->dvnew[j * V + c] += P * doi[c];
            for (int64_t m = 0; m < K; m++) {
                dq[i][m] += dP * scale * E * W->k[j][m];
                dk[j][m] += dP * scale * E * W->q[i][m];
            }
            W->dG[i] += dP * P;
            W->dG[j] -= dP * P;
        }
    }

    /* vnew = u - w S0:  du = dvnew;  dw_i = -S0 dvnew_i;  dS0 -= sum_i w_i dvnew_i^T */
    for (int64_t i = 0; i < L; i++)
        for (int64_t m = 0; m < K; m++) {
            real s = 0;
            for (int64_t c = 0; c < V; c++) {
                s += S0[m * V + c] * W->dvnew[i * V + c];
                dS[m * V + c] -= W->w[i * K + m] * W->dvnew[i * V + c];
            }
            W->dw[i * K + m] = -s;
        }

    /* u = Tm diag(beta) V,  w = Tm diag(beta gamma) K:
     *   dTm[i,j] = du_i . (beta_j v_j) + dw_i . (beta_j gamma_j k_j)      (j <= i)
     *   du2 = Tm^T du:  dv_j += beta_j du2_j;  dbeta_j += v_j . du2_j
     *   dw2 = Tm^T dw:  dk_j += beta_j gamma_j dw2_j;
     *                   dbeta_j += gamma_j k_j . dw2_j;  dG_j += beta_j gamma_j k_j . dw2_j */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++)
            W->dTm[i * C + j] = j <= i ? W->beta[j] * dot(W->dvnew + i * V, W->v[j], V) +
                                             W->beta[j] * W->gamma[j] * dot(W->dw + i * K, W->k[j], K)
                                       : 0;
    for (int64_t j = 0; j < L; j++) {
        for (int64_t c = 0; c < V; c++) {
            real s = 0;
            for (int64_t i = j; i < L; i++) s += W->Tm[i * C + j] * W->dvnew[i * V + c];
            W->du2[j * V + c] = s;
        }
        for (int64_t m = 0; m < K; m++) {
            real s = 0;
            for (int64_t i = j; i < L; i++) s += W->Tm[i * C + j] * W->dw[i * K + m];
            W->dw2[j * K + m] = s;
        }
        real *dvj = D->dv + ((t0 + j) * HV + hv) * V;
        for (int64_t c = 0; c < V; c++) dvj[c] += W->beta[j] * W->du2[j * V + c];
        dbeta[j] += dot(W->v[j], W->du2 + j * V, V);
        const real kdw2 = dot(W->k[j], W->dw2 + j * K, K);
        for (int64_t m = 0; m < K; m++) dk[j][m] += W->beta[j] * W->gamma[j] * W->dw2[j * K + m];
        dbeta[j] += W->gamma[j] * kdw2;
        W->dG[j] += W->beta[j] * W->gamma[j] * kdw2;
    }

    /* Tm = (I + A)^-1:  dA = -Tm^T dTm Tm^T, kept on the strictly lower part (A's support) */
    for (int64_t i = 0; i < L; i++) /* X = dTm Tm^T */
        for (int64_t j = 0; j < L; j++) {
            real s = 0;
            for (int64_t m = 0; m < L; m++) s += W->dTm[i * C + m] * W->Tm[j * C + m];
            W->X[i * C + j] = s;
        }
    for (int64_t i = 0; i < L; i++) /* dA = -Tm^T X */
        for (int64_t j = 0; j < L; j++) {
            real s = 0;
            if (j < i)
                for (int64_t m = 0; m < L; m++) s += W->Tm[m * C + i] * W->X[m * C + j];
            W->dA[i * C + j] = -s;
        }

    /* A[i,j] = beta_i exp(G_i - G_j) k_i . k_j  (j < i):
     *   dbeta_i += dA_ij exp(G_i - G_j) k_i . k_j;  dk_i += dA_ij beta_i exp(G_i - G_j) k_j;
     *   dk_j += dA_ij beta_i exp(G_i - G_j) k_i;    dG_i += dA_ij A_ij;  dG_j -= dA_ij A_ij */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < i; j++) {
            const real dA = W->dA[i * C + j], E = r_exp(W->G[i] - W->G[j]);
            dbeta[i] += dA * E * dot(W->k[i], W->k[j], K);
            for (int64_t m = 0; m < K; m++) {
                dk[i][m] += dA * W->beta[i] * E * W->k[j][m];
                dk[j][m] += dA * W->beta[i] * E * W->k[i][m];
            }
            W->dG[i] += dA * W->A[i * C + j];
            W->dG[j] -= dA * W->A[i * C + j];
        }

    /* G_i = g_0 + ... + g_i:  dg_t = sum_{i >= t} dG_i */
    real acc = 0;
    for (int64_t i = L - 1; i >= 0; i--) {
        acc += W->dG[i];
        D->dg[(t0 + i) * HV + hv] = acc;
        D->dbeta[(t0 + i) * HV + hv] = dbeta[i];
    }
}

static int chunk_backward(const kla_problem *p, const prepared *P, int64_t n, int64_t hv,
                          const real *v, const real *g, const real *h0, const real *dout,
                          const real *dht, real *o, real *ht, grads *D, chunk_work *W)
{
    const int64_t KV = p->K * p->V, C = p->chunk;
    const int64_t len = p->cu[n + 1] - p->cu[n], nch = (len + C - 1) / C;
    real *S0s = alloc_reals((nch ? nch : 1) * KV), *S = alloc_reals(KV), *dS = alloc_reals(KV);
    if (!S0s || !S || !dS) {
        free(S0s), free(S), free(dS);
        return KLA_ENOMEM;
    }
    chunk_forward(p, P, n, hv, v, g, h0, o, ht, S, W, S0s);
    if (dht) memcpy(dS, dht + (n * p->HV + hv) * KV, (size_t)KV * sizeof(real));
    else memset(dS, 0, (size_t)KV * sizeof(real));
    for (int64_t c = nch - 1; c >= 0; c--) {
        const int64_t t0 = p->cu[n] + c * C, L = p->cu[n + 1] - t0 < C ? p->cu[n + 1] - t0 : C;
        chunk_prepare(p, P, v, g, t0, L, hv, W);
        chunk_vnew(W, L, S0s + c * KV);
        chunk_backward_one(p, W, L, S0s + c * KV, dout, t0, hv, dS, D);
    }
    if (D->dh0) memcpy(D->dh0 + (n * p->HV + hv) * KV, dS, (size_t)KV * sizeof(real));
    free(S0s), free(S), free(dS);
    return 0;
}

/* ---- 7. entry points ------------------------------------------------------------------ */

int REF(forward)(const kla_problem *p, int algo, const real *q, const real *k, const real *v,
                 const real *g, const real *a, const real *h0, real *o, real *ht)
{
    prepared P;
    chunk_work W;
    int r = prepare(p, q, k, a, &P);
    if (r < 0) return r;
    real *S = alloc_reals(p->K * p->V), *e = alloc_reals(p->V);
    r = chunk_work_alloc(&W, p->chunk, p->K, p->V, 0);
    if (r < 0 || !S || !e) {
        if (r == 0) chunk_work_free(&W);
        free(S), free(e), prepared_free(&P);
        return KLA_ENOMEM;
    }
    for (int64_t n = 0; n < p->N; n++)
        for (int64_t hv = 0; hv < p->HV; hv++) {
            if (algo == KLA_ALGO_CHUNK) chunk_forward(p, &P, n, hv, v, g, h0, o, ht, S, &W, NULL);
            else recurrent_forward(p, &P, n, hv, v, g, h0, o, ht, S, e);
        }
    chunk_work_free(&W);
    free(S), free(e), prepared_free(&P);
    return 0;
}

int REF(backward)(const kla_problem *p, int algo, const real *q, const real *k, const real *v,
                  const real *g, const real *a, const real *h0, const real *dout,
                  const real *dht, real *o, real *ht, real *dq, real *dk, real *dv, real *dg,
                  real *da, real *dh0)
{
    const int64_t T = p->total;
    prepared P;
    chunk_work W;
    int r = prepare(p, q, k, a, &P);
    if (r < 0) return r;
    grads D = { alloc_reals(T * p->H * p->K), alloc_reals(T * p->H * p->K), dv,
                dg ? dg : alloc_reals(T * p->HV), alloc_reals(T * p->HV), dh0 };
    r = chunk_work_alloc(&W, p->chunk, p->K, p->V, 1);
    if (r == 0 && (!D.dqhat || !D.dkhat || !D.dg || !D.dbeta)) {
        chunk_work_free(&W);
        r = KLA_ENOMEM;
    }
    if (r == 0) {
        /* every core gradient is written or accumulated from zero */
        memset(dv, 0, (size_t)(T * p->HV * p->V) * sizeof(real));
        for (int64_t n = 0; n < p->N && r == 0; n++)
            for (int64_t hv = 0; hv < p->HV && r == 0; hv++)
                r = algo == KLA_ALGO_CHUNK
                        ? chunk_backward(p, &P, n, hv, v, g, h0, dout, dht, o, ht, &D, &W)
                        : recurrent_backward(p, &P, n, hv, v, g, h0, dout, dht, o, ht, &D);
        if (r == 0) prepare_backward(p, a, &P, D.dqhat, D.dkhat, D.dbeta, dq, dk, da);
        chunk_work_free(&W);
    }
    free(D.dqhat), free(D.dkhat), free(D.dbeta);
    if (!dg) free(D.dg);
    prepared_free(&P);
    return r;
}

int REF(decode)(const kla_problem *p, const real *q, const real *k, const real *v,
                const real *g, const real *a, real *state, real *o)
{
    /* one token per sequence: the token stream is q[N, H, K], ... with cu = 0, 1, .., N */
    prepared P;
    int r = prepare(p, q, k, a, &P);
    if (r < 0) return r;
    real *e = alloc_reals(p->V);
    if (!e) {
        prepared_free(&P);
        return KLA_ENOMEM;
    }
    const int64_t K = p->K, V = p->V, HV = p->HV;
    for (int64_t n = 0; n < p->N; n++)
        for (int64_t hv = 0; hv < HV; hv++) {
            const int64_t h = key_head(p, hv), tv = n * HV + hv;
            step(state + tv * K * V, qk_row(p, P.qhat, n, h), qk_row(p, P.khat, n, h),
                 v + tv * V, r_exp(decay_log(g, p, n, hv)), P.beta[tv], (real)p->scale, K, V,
                 e, o + tv * V);
        }
    free(e);
    prepared_free(&P);
    return 0;
}
