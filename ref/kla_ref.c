/*
 * kla_ref.c: the scalar reference of Kaczmarz Linear Attention (KLA), Gated DeltaNet and
 * their family (KDA's per-channel decay, the ATK preconditioner of PDN / PGDN / PKDA).
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
 * The family (kla-spec.md section 7) changes two things:
 *   - gate channel (KDA): g_t is a vector over the K key channels, and the decay
 *     multiplies row i of S by exp(g_t[i]);
 *   - precond ATK: per key head, a curvature vector a_t (the ATK state) gives a write key
 *     kw_t = k_t * m_t; the update reads and erases with k_t and writes with kw_t,
 *         S_t = S + beta_t kw_t e_t^T,
 *     and mode KLA's step becomes beta_t = eta_t / (k_t^T kw_t + eps), the step that
 *     makes the update an exact projection (k_t^T S_t = v_t^T for eta = 1, eps = 0).
 * Without precond, kw_t = k_t and everything reduces to the operator above.
 *
 * Tensors (see kla_ref.h): q, k [total, H, K]; v, o [total, HV, V]; a [total, HV]; g
 * [total, HV] or [total, HV, K]; states [N, HV, K, V]; the ATK state [N, H, K]; sequence
 * n is tokens cu[n] .. cu[n+1]-1.
 *
 * Layout of this file:
 *   1. helpers                          5. recurrent backward
 *   2. preparation (l2norm, the ATK     6. chunkwise backward
 *      scan, the step size) and its     7. entry points: forward, backward, decode
 *      backward
 *   3. the step (= decode) and the recurrent forward
 *   4. chunkwise forward
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"
#include "kla_ref.h"

#if KLA_REAL_BITS == 32
typedef float real;
typedef kla_ref_io_f32 io;
#define REF(name) kla_ref_##name##_f32
#define r_exp expf
#define r_sqrt sqrtf
#define r_log logf
#define r_abs fabsf
#elif KLA_REAL_BITS == 64
typedef double real;
typedef kla_ref_io_f64 io;
#define REF(name) kla_ref_##name##_f64
#define r_exp exp
#define r_sqrt sqrt
#define r_log log
#define r_abs fabs
#else
#error "define KLA_REAL_BITS as 32 or 64"
#endif

#define L2NORM_EPS 1e-6 /* fixed by the spec, independent of the KLA eps */
#define CKPT 64         /* recurrent backward: a saved state every CKPT tokens */
#define ATK_SCALE_DEFAULT (-0.2) /* log_atk_scale when absent (kla-spec.md 7.3) */

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

/* The log decay of key channel c at (token t, value head hv): g is [total, HV] (gate
 * head, every channel alike) or [total, HV, K] (gate channel); none: 0. */
static real decay_log(const kla_problem *p, const real *g, int64_t t, int64_t hv, int64_t c)
{
    if (!g) return 0;
    return p->gate == KLA_GATE_CHANNEL ? g[(t * p->HV + hv) * p->K + c] : g[t * p->HV + hv];
}

/* alpha[c] = exp(g_t[c]), the decay of each row of the state */
static void decay_row(const kla_problem *p, const real *g, int64_t t, int64_t hv, real *alpha)
{
    for (int64_t c = 0; c < p->K; c++) alpha[c] = r_exp(decay_log(p, g, t, hv, c));
}

/* ---- 2. preparation: normalised q, k, the write key and the step size beta ------------ */

/* What the core recurrence reads, computed once per call from the raw inputs. */
typedef struct prepared {
    real *qhat; /* [total, H, K]  q, or q / rq when l2norm_q */
    real *khat; /* [total, H, K]  k, or k / rk when l2norm_k: the read (and erase) key */
    real *rq;   /* [total, H]     sqrt(||q||^2 + 1e-6), when l2norm_q */
    real *rk;   /* [total, H]     sqrt(||k||^2 + 1e-6), when l2norm_k */
    /* precond ATK, per key head (else NULL, and the write key is khat) */
    real *a;    /* [total, H, K]  the ATK state after each token */
    real *r;    /* [total, H, K]  ln(a + squash_eps) - log_atk_scale */
    real *m;    /* [total, H, K]  the preconditioner, in (1/x, x) */
    real *kw;   /* [total, H, K]  the write key khat * m */
    real *nk;   /* [total, H]     mode KLA: ||khat||^2 + eps, or khat . kw + eps */
    real *beta; /* [total, HV]    the delta-rule step */
} prepared;

static void prepared_free(prepared *P)
{
    free(P->qhat), free(P->khat), free(P->rq), free(P->rk), free(P->a), free(P->r), free(P->m);
    free(P->kw), free(P->nk), free(P->beta);
    memset(P, 0, sizeof *P);
}

/* The write key of (token t, key head h): kw, or khat without a preconditioner. */
static const real *kw_row(const kla_problem *p, const prepared *P, int64_t t, int64_t h)
{
    return qk_row(p, P->kw ? P->kw : P->khat, t, h);
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

static real atk_scale(const io *x, int64_t h)
{
    return x->log_atk_scale ? x->log_atk_scale[h] : (real)ATK_SCALE_DEFAULT;
}

/*
 * The ATK scan of sequence n, key head h (precond ATK), from a0 (or zeros):
 *
 *     a_t  = exp(g_atk_t) a_{t-1} + beta_atk_t (k_t * k_t)     elementwise; includes token t
 *     r_t  = ln(a_t + squash_eps) - c_h                          c_h = log_atk_scale[h]
 *     m_t  = exp(-ln(x) r_t / (1 + |r_t|))                       in (1/x, x)
 *     kw_t = k_t * m_t                                           the write key
 *
 * k is khat. It does not depend on the state, so it runs first. Writes at[n, h].
 * docs/algorithm.md section 10 derives it, section 11 the Kaczmarz step that uses kw.
 */
static void atk_scan(const kla_problem *p, const io *x, prepared *P, int64_t n, int64_t h)
{
    const int64_t K = p->K, H = p->H;
    const real lx = r_log((real)p->squash_x), c = atk_scale(x, h);
    const real *prev = x->a0 ? x->a0 + (n * H + h) * K : NULL; /* NULL: zeros */
    for (int64_t t = p->cu[n]; t < p->cu[n + 1]; t++) {
        const int64_t th = t * H + h;
        const real decay = x->g_atk ? r_exp(x->g_atk[th]) : 1, ba = x->beta_atk[th];
        const real *k = P->khat + th * K;
        real *a = P->a + th * K, *r = P->r + th * K, *m = P->m + th * K, *kw = P->kw + th * K;
        for (int64_t i = 0; i < K; i++) {
            a[i] = (prev ? decay * prev[i] : 0) + ba * k[i] * k[i];
            r[i] = r_log(a[i] + (real)p->squash_eps) - c;
            m[i] = r_exp(-lx * r[i] / (1 + r_abs(r[i])));
            kw[i] = k[i] * m[i];
        }
        prev = a;
    }
    /* at = the last a (a0, or zeros, for an empty sequence) */
    if (x->at) {
        real *at = x->at + (n * H + h) * K;
        for (int64_t i = 0; i < K; i++) at[i] = prev ? prev[i] : 0;
    }
}

static int prepare(const kla_problem *p, const io *x, prepared *P)
{
    const int64_t T = p->total, H = p->H, HV = p->HV, K = p->K;
    const int atk = p->precond == KLA_PRECOND_ATK;
    memset(P, 0, sizeof *P);
    P->qhat = alloc_reals(T * H * K);
    P->khat = alloc_reals(T * H * K);
    P->rq = alloc_reals(T * H);
    P->rk = alloc_reals(T * H);
    P->nk = alloc_reals(T * H);
    P->beta = alloc_reals(T * HV);
    if (atk) {
        P->a = alloc_reals(T * H * K), P->r = alloc_reals(T * H * K);
        P->m = alloc_reals(T * H * K), P->kw = alloc_reals(T * H * K);
    }
    if (!P->qhat || !P->khat || !P->rq || !P->rk || !P->nk || !P->beta ||
        (atk && (!P->a || !P->r || !P->m || !P->kw))) {
        prepared_free(P);
        return KLA_ENOMEM;
    }
    /* qhat = l2norm(q) or q;  khat = l2norm(k) or k */
    for (int64_t th = 0; th < T * H; th++) {
        if (p->l2norm_q) l2norm_forward(x->q + th * K, P->qhat + th * K, &P->rq[th], K);
        else memcpy(P->qhat + th * K, x->q + th * K, (size_t)K * sizeof(real));
        if (p->l2norm_k) l2norm_forward(x->k + th * K, P->khat + th * K, &P->rk[th], K);
        else memcpy(P->khat + th * K, x->k + th * K, (size_t)K * sizeof(real));
    }
    /* the write key: the ATK scan of every sequence and key head */
    for (int64_t n = 0; atk && n < p->N; n++)
        for (int64_t h = 0; h < H; h++) atk_scan(p, x, P, n, h);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t th = t * H + h;
            /* nk = khat . kw + eps: the length the Kaczmarz step divides by (||khat||^2 + eps
             * without a preconditioner) */
            P->nk[th] = dot(P->khat + th * K, kw_row(p, P, t, h), K) + (real)p->eps;
        }
        for (int64_t hv = 0; hv < HV; hv++) {
            const int64_t th = t * H + key_head(p, hv);
            /* KLA: beta = eta / nk.  GDN: beta is the input. */
            if (p->mode == KLA_MODE_KLA) P->beta[t * HV + hv] = x->a[t * HV + hv] / P->nk[th];
            else P->beta[t * HV + hv] = x->a[t * HV + hv];
        }
    }
    return 0;
}

/*
 * From the gradients with respect to what the core read (dqhat, dkhat, dkw, dbeta) to
 * those of the raw inputs (dq, dk, da, and the ATK's). dkhat and dkw are updated in
 * place; without a preconditioner dkw is dkhat (the same key).
 */
static void prepare_backward(const kla_problem *p, const io *x, const prepared *P, const real *dqhat,
                             real *dkhat, real *dkw, const real *dbeta)
{
    const int64_t T = p->total, H = p->H, HV = p->HV, K = p->K;
    const int atk = p->precond == KLA_PRECOND_ATK;
    /* the step size */
    for (int64_t t = 0; t < T; t++)
        for (int64_t hv = 0; hv < HV; hv++) {
            const int64_t tv = t * HV + hv, th = t * H + key_head(p, hv);
            if (p->mode == KLA_MODE_KLA) {
                /* beta = eta / nk, nk = khat . kw + eps:
                 *   deta = dbeta / nk;  dnk = -dbeta eta / nk^2;  dkhat += dnk kw;  dkw += dnk khat
                 * (without a preconditioner kw = khat: dkhat += 2 dnk khat) */
                const real nk = P->nk[th], dnk = -dbeta[tv] * x->a[tv] / (nk * nk);
                x->da[tv] = dbeta[tv] / nk;
                const real *kh = P->khat + th * K, *kw = kw_row(p, P, t, key_head(p, hv));
                for (int64_t i = 0; i < K; i++) dkhat[th * K + i] += dnk * kw[i];
                for (int64_t i = 0; i < K; i++) dkw[th * K + i] += dnk * kh[i];
            } else {
                x->da[tv] = dbeta[tv]; /* GDN: beta is the input */
            }
        }
    /*
     * The ATK scan (docs/algorithm.md 12.3), in reverse over each sequence's tokens, abar
     * the adjoint of a_t (from dat at the end), lambda = ln x:
     *   kw = khat * m:          dkhat += dkw * m;  dm = dkw * khat
     *   m = exp(-lambda s):     ds = -lambda m dm
     *   s = r / (1 + |r|):      dr = ds / (1 + |r|)^2
     *   r = ln(a + eps_s) - c:  dc -= sum dr;  abar += dr / (a + eps_s)
     *   a = exp(g_atk) a_prev + beta_atk khat^2:
     *       dg_atk = sum abar exp(g_atk) a_prev;  dbeta_atk = sum abar khat^2;
     *       dkhat += 2 beta_atk abar khat;  abar <- exp(g_atk) abar  (-> da0)
     */
    if (atk) {
        real *abar = alloc_reals(K);
        const real lx = r_log((real)p->squash_x);
        for (int64_t h = 0; h < H && x->dlog_atk_scale; h++) x->dlog_atk_scale[h] = 0;
        for (int64_t n = 0; abar && n < p->N; n++)
            for (int64_t h = 0; h < H; h++) {
                for (int64_t i = 0; i < K; i++) abar[i] = x->dat ? x->dat[(n * H + h) * K + i] : 0;
                for (int64_t t = p->cu[n + 1] - 1; t >= p->cu[n]; t--) {
                    const int64_t th = t * H + h;
                    const real *kh = P->khat + th * K, *m = P->m + th * K, *r = P->r + th * K;
                    const real *a = P->a + th * K;
                    const real *aprev = t > p->cu[n] ? P->a + (th - H) * K : x->a0 ? x->a0 + (n * H + h) * K : NULL;
                    const real decay = x->g_atk ? r_exp(x->g_atk[th]) : 1, ba = x->beta_atk[th];
                    real dga = 0, dba = 0, dc = 0;
                    for (int64_t i = 0; i < K; i++) {
                        const real dkwi = dkw[th * K + i];
                        dkhat[th * K + i] += dkwi * m[i];
                        const real ds = -lx * m[i] * dkwi * kh[i];
                        const real d1 = 1 + r_abs(r[i]), dr = ds / (d1 * d1);
                        dc -= dr;
                        abar[i] += dr / (a[i] + (real)p->squash_eps);
                        dga += abar[i] * decay * (aprev ? aprev[i] : 0);
                        dba += abar[i] * kh[i] * kh[i];
                        dkhat[th * K + i] += 2 * ba * abar[i] * kh[i];
                        abar[i] *= decay;
                    }
                    if (x->dg_atk) x->dg_atk[th] = dga;
                    if (x->dbeta_atk) x->dbeta_atk[th] = dba;
                    if (x->dlog_atk_scale) x->dlog_atk_scale[h] += dc;
                }
                if (x->da0)
                    for (int64_t i = 0; i < K; i++) x->da0[(n * H + h) * K + i] = abar[i];
            }
        free(abar);
    }
    /* qhat = q / rq  =>  dq = (dqhat - qhat (qhat . dqhat)) / rq; else dq = dqhat */
    for (int64_t th = 0; th < T * H; th++) {
        if (p->l2norm_q) l2norm_backward(P->qhat + th * K, P->rq[th], dqhat + th * K, x->dq + th * K, K);
        else memcpy(x->dq + th * K, dqhat + th * K, (size_t)K * sizeof(real));
        if (p->l2norm_k) l2norm_backward(P->khat + th * K, P->rk[th], dkhat + th * K, x->dk + th * K, K);
        else memcpy(x->dk + th * K, dkhat + th * K, (size_t)K * sizeof(real));
    }
}

/* ---- 3. the step (one token, one head) and the recurrent forward -------------------- */

/*
 * One token of the recurrence, in place on S [K, V]. This is the decode step and the
 * body of the recurrent forward. k reads and erases, kw writes (kw = k without a
 * preconditioner); alpha [K] is the decay of each row. e is scratch [V]. Writes o [V].
 */
static void step(real *S, const real *q, const real *k, const real *kw, const real *v, const real *alpha,
                 real beta, real scale, int64_t K, int64_t V, real *e, real *o)
{
    /* S <- Diag(alpha) S */
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j < V; j++) S[i * V + j] *= alpha[i];
    /* e = v - S^T k */
    for (int64_t j = 0; j < V; j++) {
        real s = 0;
        for (int64_t i = 0; i < K; i++) s += S[i * V + j] * k[i];
        e[j] = v[j] - s;
    }
    /* S <- S + beta kw e^T */
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j < V; j++) S[i * V + j] += beta * kw[i] * e[j];
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

/* The definition: o and ht of sequence n, value head hv, one token at a time. e [V] and
 * alpha [K] are scratch. */
static void recurrent_forward(const kla_problem *p, const prepared *P, const io *x, int64_t n, int64_t hv,
                              real *S, real *e, real *alpha)
{
    const int64_t K = p->K, V = p->V, HV = p->HV, h = key_head(p, hv);
    load_state(p, x->h0, n, hv, S);
    for (int64_t t = p->cu[n]; t < p->cu[n + 1]; t++) {
        decay_row(p, x->g, t, hv, alpha);
        step(S, qk_row(p, P->qhat, t, h), qk_row(p, P->khat, t, h), kw_row(p, P, t, h), x->v + (t * HV + hv) * V,
             alpha, P->beta[t * HV + hv], (real)p->scale, K, V, e, x->o + (t * HV + hv) * V);
    }
    if (x->ht) memcpy(x->ht + (n * HV + hv) * K * V, S, (size_t)(K * V) * sizeof(real));
}

/* ---- 4. chunkwise forward ----------------------------------------------------------- */

/*
 * Within a chunk of L <= C tokens starting from state S0, positions i, j = 0..L-1, per
 * key channel c (with gate head every channel is alike):
 *
 *     G_i[c]     = g_0[c] + ... + g_i[c]             cumulative log decay
 *     gamma_i[c] = exp(G_i[c])
 *     E_ij[c]    = exp(G_i[c] - G_j[c])              (j <= i: never > 1)
 *     A[i,j]     = beta_i sum_c k_i[c] kw_j[c] E_ij[c]   (j < i; A is strictly lower)
 *     Tm         = (I + A)^-1                         unit lower triangular
 *     w          = Tm diag(beta) (K * gamma)          [L, K]  (the read key)
 *     u          = Tm diag(beta) V                    [L, V]
 *     vnew       = u - w S0                           [L, V]  (vnew_j = beta_j e_j)
 *     o_i        = scale (S0^T (gamma_i * q_i) + sum_{j<=i} (sum_c q_i[c] kw_j[c] E_ij[c]) vnew_j)
 *     S_L        = Diag(gamma_L) S0 + sum_j (kw_j * E_Lj) vnew_j^T
 *
 * Only exp of differences G_i - G_j <= 0 is taken, so nothing overflows. A scalar decay
 * would let the decay factor out of A (A = D A_0 D^-1, the WY trick of fast kernels);
 * a per-channel one does not, so A carries the decay inside its channel sum, evaluated
 * here as the full decay tensor E_ij[c] for j <= i (docs/algorithm.md sections 9.1 to 9.4).
 */
typedef struct chunk_work {
    int64_t C, K, V;
    int chan;              /* gate channel: E_ij[c] differs per c */
    real *G, *gamma;       /* [C, K] */
    real *E;               /* [K] scratch: E_ij[c] of one pair */
    real *beta;            /* [C] */
    const real *q[128], *k[128], *kw[128], *v[128]; /* rows of the chunk's tokens */
    real *A, *Tm;          /* [C, C] */
    real *w;               /* [C, K] */
    real *u, *vnew;        /* [C, V] */
    /* backward only */
    real *dG, *dvnew, *dw, *dTm, *dA, *X, *du2, *dw2; /* dG [C, K]; [C,V]; [C,K]; [C,C] x3; [C,V]; [C,K] */
} chunk_work;

static void chunk_work_free(chunk_work *W)
{
    free(W->G), free(W->gamma), free(W->E), free(W->beta), free(W->A), free(W->Tm), free(W->w);
    free(W->u), free(W->vnew), free(W->dG), free(W->dvnew), free(W->dw), free(W->dTm);
    free(W->dA), free(W->X), free(W->du2), free(W->dw2);
}

static int chunk_work_alloc(chunk_work *W, const kla_problem *p, int backward)
{
    const int64_t C = p->chunk, K = p->K, V = p->V;
    memset(W, 0, sizeof *W);
    W->C = C, W->K = K, W->V = V, W->chan = p->gate == KLA_GATE_CHANNEL;
    W->G = alloc_reals(C * K), W->gamma = alloc_reals(C * K), W->E = alloc_reals(K), W->beta = alloc_reals(C);
    W->A = alloc_reals(C * C), W->Tm = alloc_reals(C * C), W->w = alloc_reals(C * K);
    W->u = alloc_reals(C * V), W->vnew = alloc_reals(C * V);
    int ok = W->G && W->gamma && W->E && W->beta && W->A && W->Tm && W->w && W->u && W->vnew;
    if (backward) {
        W->dG = alloc_reals(C * K), W->dvnew = alloc_reals(C * V), W->dw = alloc_reals(C * K);
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

/* W->E = E_ij[c] = exp(G_i[c] - G_j[c]) (one exp for gate head); i = L means "after the
 * chunk", G_{L-1} */
static const real *decay_pair(chunk_work *W, int64_t i, int64_t j)
{
    const real *Gi = W->G + i * W->K, *Gj = W->G + j * W->K;
    if (!W->chan) {
        const real e = r_exp(Gi[0] - Gj[0]);
        for (int64_t c = 0; c < W->K; c++) W->E[c] = e;
    } else {
        for (int64_t c = 0; c < W->K; c++) W->E[c] = r_exp(Gi[c] - Gj[c]);
    }
    return W->E;
}

/* sum_c a[c] b[c] E[c] */
static real dot3(const real *a, const real *b, const real *E, int64_t n)
{
    real s = 0;
    for (int64_t c = 0; c < n; c++) s += a[c] * b[c] * E[c];
    return s;
}

/* Everything of one chunk that does not need S0: G, gamma, A, Tm, w, u. */
static void chunk_prepare(const kla_problem *p, const prepared *P, const io *x, int64_t t0, int64_t L,
                          int64_t hv, chunk_work *W)
{
    const int64_t K = p->K, V = p->V, C = W->C, h = key_head(p, hv);
    for (int64_t i = 0; i < L; i++) {
        const int64_t t = t0 + i;
        W->q[i] = qk_row(p, P->qhat, t, h);
        W->k[i] = qk_row(p, P->khat, t, h);
        W->kw[i] = kw_row(p, P, t, h);
        W->v[i] = x->v + (t * p->HV + hv) * V;
        W->beta[i] = P->beta[t * p->HV + hv];
        /* G_i = G_{i-1} + g_i;  gamma_i = exp(G_i) */
        for (int64_t c = 0; c < K; c++) {
            W->G[i * K + c] = (i ? W->G[(i - 1) * K + c] : 0) + decay_log(p, x->g, t, hv, c);
            W->gamma[i * K + c] = r_exp(W->G[i * K + c]);
        }
    }
    /* A[i,j] = beta_i sum_c k_i[c] kw_j[c] E_ij[c] for j < i, else 0 */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++)
            W->A[i * C + j] = j < i ? W->beta[i] * dot3(W->k[i], W->kw[j], decay_pair(W, i, j), K) : 0;
    /* Tm = (I + A)^-1 by forward substitution: row i of (I + A) Tm = I gives
     * Tm[i,j] = [i == j] - sum_{j <= m < i} A[i,m] Tm[m,j] */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++) {
            real s = i == j ? 1 : 0;
            if (j < i)
                for (int64_t m = j; m < i; m++) s -= W->A[i * C + m] * W->Tm[m * C + j];
            W->Tm[i * C + j] = j <= i ? s : 0;
        }
    /* w = Tm diag(beta) (K * gamma);  u = Tm diag(beta) V */
    for (int64_t i = 0; i < L; i++) {
        for (int64_t c = 0; c < K; c++) {
            real s = 0;
            for (int64_t j = 0; j <= i; j++) s += W->Tm[i * C + j] * W->beta[j] * W->gamma[j * K + c] * W->k[j][c];
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

/* o_i = scale (S0^T (gamma_i * q_i) + sum_{j<=i} (sum_c q_i[c] kw_j[c] E_ij[c]) vnew_j) */
static void chunk_output(const kla_problem *p, chunk_work *W, int64_t L, const real *S0, int64_t t0,
                         int64_t hv, real *o)
{
    const int64_t K = W->K, V = W->V;
    for (int64_t i = 0; i < L; i++) {
        real *oi = o + ((t0 + i) * p->HV + hv) * V;
        for (int64_t c = 0; c < V; c++) {
            real s = 0;
            for (int64_t m = 0; m < K; m++) s += W->gamma[i * K + m] * W->q[i][m] * S0[m * V + c];
            oi[c] = s;
        }
        for (int64_t j = 0; j <= i; j++) {
            const real a = dot3(W->q[i], W->kw[j], decay_pair(W, i, j), K);
            for (int64_t c = 0; c < V; c++) oi[c] += a * W->vnew[j * V + c];
        }
        for (int64_t c = 0; c < V; c++) oi[c] *= (real)p->scale;
    }
}

/* S <- Diag(gamma_L) S0 + sum_j (kw_j * E_Lj) vnew_j^T   (in place: S holds S0) */
static void chunk_state_pass(chunk_work *W, int64_t L, real *S)
{
    const int64_t K = W->K, V = W->V;
    for (int64_t m = 0; m < K; m++)
        for (int64_t c = 0; c < V; c++) S[m * V + c] *= W->gamma[(L - 1) * K + m];
    for (int64_t j = 0; j < L; j++) {
        const real *E = decay_pair(W, L - 1, j);
        for (int64_t m = 0; m < K; m++)
            for (int64_t c = 0; c < V; c++) S[m * V + c] += E[m] * W->kw[j][m] * W->vnew[j * V + c];
    }
}

/* o and ht of sequence n, value head hv, chunk by chunk. If S0s is given, the state
 * entering each chunk is saved there ([nchunks, K, V], for the backward pass). */
static void chunk_forward(const kla_problem *p, const prepared *P, const io *x, int64_t n, int64_t hv, real *S,
                          chunk_work *W, real *S0s)
{
    const int64_t KV = p->K * p->V, C = p->chunk;
    load_state(p, x->h0, n, hv, S);
    for (int64_t t0 = p->cu[n], c = 0; t0 < p->cu[n + 1]; t0 += C, c++) {
        const int64_t L = p->cu[n + 1] - t0 < C ? p->cu[n + 1] - t0 : C;
        if (S0s) memcpy(S0s + c * KV, S, (size_t)KV * sizeof(real));
        chunk_prepare(p, P, x, t0, L, hv, W);
        chunk_vnew(W, L, S);
        chunk_output(p, W, L, S, t0, hv, x->o);
        chunk_state_pass(W, L, S);
    }
    if (x->ht) memcpy(x->ht + (n * p->HV + hv) * KV, S, (size_t)KV * sizeof(real));
}

/* ---- 5. recurrent backward (back-propagation through time) -------------------------- */

/* Gradients the core writes, with respect to what it read. dqhat, dkhat and dkw are
 * accumulated over the value heads that share a key head; dkw is dkhat without a
 * preconditioner (the same key). */
typedef struct grads {
    real *dqhat, *dkhat, *dkw; /* [total, H, K] */
    real *dv;                  /* [total, HV, V] */
    real *dg;                  /* [total, HV] or [total, HV, K] (gate channel) */
    real *dbeta;               /* [total, HV] */
    real *dh0;                 /* [N, HV, K, V] or NULL */
} grads;

/* dg of (t, hv) from the per-channel gradient dgc [K]: itself, or its sum (gate head) */
static void put_dg(const kla_problem *p, real *dg, int64_t t, int64_t hv, const real *dgc)
{
    if (p->gate == KLA_GATE_CHANNEL) {
        memcpy(dg + (t * p->HV + hv) * p->K, dgc, (size_t)p->K * sizeof(real));
    } else {
        real s = 0;
        for (int64_t c = 0; c < p->K; c++) s += dgc[c];
        dg[t * p->HV + hv] = s;
    }
}

/*
 * Sequence n, value head hv. The forward pass saves the state every CKPT tokens; the
 * backward pass replays each segment from its checkpoint, then walks it backwards.
 * dS is the gradient with respect to the state after the current token.
 */
static int recurrent_backward(const kla_problem *p, const prepared *P, const io *x, int64_t n, int64_t hv,
                              grads *D)
{
    const int64_t K = p->K, V = p->V, KV = K * V, HV = p->HV, h = key_head(p, hv);
    const int64_t t_begin = p->cu[n], len = p->cu[n + 1] - t_begin;
    const int64_t nseg = (len + CKPT - 1) / CKPT;
    const real scale = (real)p->scale;
    real *ckpt = alloc_reals((nseg ? nseg : 1) * KV); /* state before each segment */
    real *Ss = alloc_reals((CKPT + 1) * KV);          /* states through one segment */
    real *dS = alloc_reals(KV), *dSp = alloc_reals(KV), *Sp = alloc_reals(KV);
    real *e = alloc_reals(V), *de = alloc_reals(V), *tmp = alloc_reals(V);
    real *alpha = alloc_reals(K), *dgc = alloc_reals(K);
    if (!ckpt || !Ss || !dS || !dSp || !Sp || !e || !de || !tmp || !alpha || !dgc) {
        free(ckpt), free(Ss), free(dS), free(dSp), free(Sp), free(e), free(de), free(tmp), free(alpha), free(dgc);
        return KLA_ENOMEM;
    }

    /* forward: o, ht, and the checkpoints */
    real *S = Ss;
    load_state(p, x->h0, n, hv, S);
    for (int64_t i = 0; i < len; i++) {
        const int64_t t = t_begin + i;
        if (i % CKPT == 0) memcpy(ckpt + (i / CKPT) * KV, S, (size_t)KV * sizeof(real));
        decay_row(p, x->g, t, hv, alpha);
        step(S, qk_row(p, P->qhat, t, h), qk_row(p, P->khat, t, h), kw_row(p, P, t, h), x->v + (t * HV + hv) * V,
             alpha, P->beta[t * HV + hv], scale, K, V, e, x->o + (t * HV + hv) * V);
    }
    if (x->ht) memcpy(x->ht + (n * HV + hv) * KV, S, (size_t)KV * sizeof(real));

    /* dS_T = dht */
    if (x->dht) memcpy(dS, x->dht + (n * HV + hv) * KV, (size_t)KV * sizeof(real));
    else memset(dS, 0, (size_t)KV * sizeof(real));

    for (int64_t s = nseg - 1; s >= 0; s--) {
        const int64_t i0 = s * CKPT, L = len - i0 < CKPT ? len - i0 : CKPT;
        /* replay: Ss[m] = state after m tokens of the segment */
        memcpy(Ss, ckpt + s * KV, (size_t)KV * sizeof(real));
        for (int64_t m = 0; m < L; m++) {
            const int64_t t = t_begin + i0 + m;
            memcpy(Ss + (m + 1) * KV, Ss + m * KV, (size_t)KV * sizeof(real));
            decay_row(p, x->g, t, hv, alpha);
            step(Ss + (m + 1) * KV, qk_row(p, P->qhat, t, h), qk_row(p, P->khat, t, h), kw_row(p, P, t, h),
                 x->v + (t * HV + hv) * V, alpha, P->beta[t * HV + hv], scale, K, V, e, tmp);
        }
        for (int64_t m = L - 1; m >= 0; m--) {
            const int64_t t = t_begin + i0 + m, tv = t * HV + hv;
            const real *q = qk_row(p, P->qhat, t, h), *k = qk_row(p, P->khat, t, h), *kw = kw_row(p, P, t, h);
            const real *vt = x->v + tv * V, *dOt = x->dout + tv * V;
            const real *Sprev = Ss + m * KV, *St = Ss + (m + 1) * KV;
            const real beta = P->beta[tv];
            real *dq = D->dqhat + (t * p->H + h) * K, *dk = D->dkhat + (t * p->H + h) * K;
            real *dkw = D->dkw + (t * p->H + h) * K;
            decay_row(p, x->g, t, hv, alpha);

            /* recompute  Sp = Diag(alpha) S_{t-1};  e = v - Sp^T k */
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < V; j++) Sp[i * V + j] = alpha[i] * Sprev[i * V + j];
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
            /* S_t = Sp + beta kw e^T:  dbeta = kw^T dS e;  dkw += beta dS e;  de = beta dS^T kw;
             * dSp = dS */
            real dbeta = 0;
            for (int64_t i = 0; i < K; i++) {
                real dSe = 0;
                for (int64_t j = 0; j < V; j++) dSe += dS[i * V + j] * e[j];
                dbeta += kw[i] * dSe;
                dkw[i] += beta * dSe;
            }
            for (int64_t j = 0; j < V; j++) {
                real acc = 0;
                for (int64_t i = 0; i < K; i++) acc += dS[i * V + j] * kw[i];
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
            /* Sp = Diag(exp(g)) S_{t-1}:  dg[i] = <row i of Sp, row i of dSp> (summed over
             * the channels for gate head);  dS_{t-1} = Diag(alpha) dSp */
            for (int64_t i = 0; i < K; i++) dgc[i] = dot(Sp + i * V, dSp + i * V, V);
            put_dg(p, D->dg, t, hv, dgc);
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < V; j++) dS[i * V + j] = alpha[i] * dSp[i * V + j];
        }
    }
    /* S_0 = h0:  dh0 = dS_0 */
    if (D->dh0) memcpy(D->dh0 + (n * HV + hv) * KV, dS, (size_t)KV * sizeof(real));
    free(ckpt), free(Ss), free(dS), free(dSp), free(Sp), free(e), free(de), free(tmp), free(alpha), free(dgc);
    return 0;
}

/* ---- 6. chunkwise backward ------------------------------------------------------------ */

/*
 * Reverse mode through the chunk steps of section 4, last chunk first. S0 of each chunk
 * comes from the forward pass; dS holds the gradient with respect to the state leaving
 * the chunk and becomes that of the state entering it. dG [C, K] gathers the gradient
 * with respect to the cumulative decay G, per channel; dg is its reverse cumulative sum
 * (summed over the channels for gate head).
 */
static void chunk_backward_one(const kla_problem *p, chunk_work *W, int64_t L, const real *S0, const io *x,
                               int64_t t0, int64_t hv, real *dS, grads *D)
{
    const int64_t K = p->K, V = p->V, C = W->C, HV = p->HV, H = p->H, h = key_head(p, hv);
    const real scale = (real)p->scale;
    const real *gammaL = W->gamma + (L - 1) * K;
    real dbeta[128];
    real *dq[128], *dk[128], *dkw[128];
    for (int64_t i = 0; i < L; i++) {
        dq[i] = D->dqhat + ((t0 + i) * H + h) * K;
        dk[i] = D->dkhat + ((t0 + i) * H + h) * K;
        dkw[i] = D->dkw + ((t0 + i) * H + h) * K;
        dbeta[i] = 0;
    }
    memset(W->dG, 0, (size_t)(L * K) * sizeof(real));
    memset(W->dvnew, 0, (size_t)(L * V) * sizeof(real));
    real *dGL = W->dG + (L - 1) * K;

    /* S_L = Diag(gamma_L) S0 + sum_j (kw_j * E_Lj) vnew_j^T:
     *   dvnew_j += sum_c E_Lj[c] kw_j[c] dS[c];   dkw_j[c] += E_Lj[c] (dS[c] . vnew_j);
     *   with b_j[c] = E_Lj[c] kw_j[c] (dS[c] . vnew_j):  dG_L[c] += b_j[c];  dG_j[c] -= b_j[c];
     *   dG_L[c] += gamma_L[c] (S0[c] . dS[c])  (rows c of S0 and dS) */
    for (int64_t m = 0; m < K; m++) dGL[m] += gammaL[m] * dot(S0 + m * V, dS + m * V, V);
    for (int64_t j = 0; j < L; j++) {
        const real *E = decay_pair(W, L - 1, j);
        for (int64_t m = 0; m < K; m++) {
            real dSv = 0;
            for (int64_t c = 0; c < V; c++) {
                W->dvnew[j * V + c] += E[m] * dS[m * V + c] * W->kw[j][m];
                dSv += dS[m * V + c] * W->vnew[j * V + c];
            }
            dkw[j][m] += E[m] * dSv;
            const real b = E[m] * W->kw[j][m] * dSv;
            dGL[m] += b;
            W->dG[j * K + m] -= b;
        }
    }
    /* the state leaving is Diag(gamma_L) S0 + ...: dS0 = Diag(gamma_L) dS (more terms follow) */
    for (int64_t m = 0; m < K; m++)
        for (int64_t c = 0; c < V; c++) dS[m * V + c] *= gammaL[m];
    /* from here on dS is dS0 */

    /* o_i = scale (S0^T (gamma_i * q_i) + sum_{j<=i} P_ij vnew_j / scale), with
     * P_ij = scale sum_c q_i[c] kw_j[c] E_ij[c] and dP_ij = do_i . vnew_j:
     *   dq_i[c] += scale gamma_i[c] (S0[c] . do_i);  dS0[c] += scale gamma_i[c] q_i[c] do_i;
     *   dG_i[c] += scale gamma_i[c] q_i[c] (S0[c] . do_i);
     *   dvnew_j += P_ij do_i;  dq_i[c] += dP_ij scale kw_j[c] E_ij[c];
     *   dkw_j[c] += dP_ij scale q_i[c] E_ij[c];  dG_i[c] += that times kw_j[c];  dG_j[c] -= it */
    for (int64_t i = 0; i < L; i++) {
        const real *doi = x->dout + ((t0 + i) * HV + hv) * V, *gi = W->gamma + i * K;
        for (int64_t m = 0; m < K; m++) {
            const real s = dot(S0 + m * V, doi, V);
            dq[i][m] += scale * gi[m] * s;
            W->dG[i * K + m] += scale * gi[m] * W->q[i][m] * s;
            for (int64_t c = 0; c < V; c++) dS[m * V + c] += scale * gi[m] * W->q[i][m] * doi[c];
        }
        for (int64_t j = 0; j <= i; j++) {
            const real *E = decay_pair(W, i, j);
            const real P = scale * dot3(W->q[i], W->kw[j], E, K);
            const real dP = dot(doi, W->vnew + j * V, V);
            for (int64_t c = 0; c < V; c++) W->dvnew[j * V + c] += P * doi[c];
            for (int64_t m = 0; m < K; m++) {
                const real f = dP * scale * E[m];
                dq[i][m] += f * W->kw[j][m];
                dkw[j][m] += f * W->q[i][m];
                W->dG[i * K + m] += f * W->q[i][m] * W->kw[j][m];
                W->dG[j * K + m] -= f * W->q[i][m] * W->kw[j][m];
            }
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

    /* u = Tm diag(beta) V,  w = Tm diag(beta) (K * gamma):
     *   dTm[i,j] = beta_j (du_i . v_j + dw_i . (k_j * gamma_j))      (j <= i)
     *   du2 = Tm^T du:  dv_j += beta_j du2_j;  dbeta_j += v_j . du2_j
     *   dw2 = Tm^T dw:  dk_j[c] += beta_j gamma_j[c] dw2_j[c];  dbeta_j += (k_j * gamma_j) . dw2_j;
     *                   dG_j[c] += beta_j gamma_j[c] k_j[c] dw2_j[c] */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++)
            W->dTm[i * C + j] = j <= i ? W->beta[j] * (dot(W->dvnew + i * V, W->v[j], V) +
                                                       dot3(W->dw + i * K, W->k[j], W->gamma + j * K, K))
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
        for (int64_t m = 0; m < K; m++) {
            const real kg = W->k[j][m] * W->gamma[j * K + m] * W->dw2[j * K + m];
            dk[j][m] += W->beta[j] * W->gamma[j * K + m] * W->dw2[j * K + m];
            dbeta[j] += kg;
            W->dG[j * K + m] += W->beta[j] * kg;
        }
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

    /* A[i,j] = beta_i sum_c k_i[c] kw_j[c] E_ij[c]  (j < i):
     *   dbeta_i += dA_ij sum_c k_i kw_j E_ij;  dk_i[c] += dA_ij beta_i kw_j[c] E_ij[c];
     *   dkw_j[c] += dA_ij beta_i k_i[c] E_ij[c];
     *   dG_i[c] += dA_ij beta_i k_i[c] kw_j[c] E_ij[c];  dG_j[c] -= the same */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < i; j++) {
            const real dA = W->dA[i * C + j], *E = decay_pair(W, i, j);
            dbeta[i] += dA * dot3(W->k[i], W->kw[j], E, K);
            for (int64_t m = 0; m < K; m++) {
                const real f = dA * W->beta[i] * E[m];
                dk[i][m] += f * W->kw[j][m];
                dkw[j][m] += f * W->k[i][m];
                W->dG[i * K + m] += f * W->k[i][m] * W->kw[j][m];
                W->dG[j * K + m] -= f * W->k[i][m] * W->kw[j][m];
            }
        }

    /* G_i = g_0 + ... + g_i:  dg_t[c] = sum_{i >= t} dG_i[c] */
    for (int64_t i = L - 2; i >= 0; i--)
        for (int64_t m = 0; m < K; m++) W->dG[i * K + m] += W->dG[(i + 1) * K + m];
    for (int64_t i = 0; i < L; i++) {
        put_dg(p, D->dg, t0 + i, hv, W->dG + i * K);
        D->dbeta[(t0 + i) * HV + hv] = dbeta[i];
    }
}

static int chunk_backward(const kla_problem *p, const prepared *P, const io *x, int64_t n, int64_t hv, grads *D,
                          chunk_work *W)
{
    const int64_t KV = p->K * p->V, C = p->chunk;
    const int64_t len = p->cu[n + 1] - p->cu[n], nch = (len + C - 1) / C;
    real *S0s = alloc_reals((nch ? nch : 1) * KV), *S = alloc_reals(KV), *dS = alloc_reals(KV);
    if (!S0s || !S || !dS) {
        free(S0s), free(S), free(dS);
        return KLA_ENOMEM;
    }
    chunk_forward(p, P, x, n, hv, S, W, S0s);
    if (x->dht) memcpy(dS, x->dht + (n * p->HV + hv) * KV, (size_t)KV * sizeof(real));
    else memset(dS, 0, (size_t)KV * sizeof(real));
    for (int64_t c = nch - 1; c >= 0; c--) {
        const int64_t t0 = p->cu[n] + c * C, L = p->cu[n + 1] - t0 < C ? p->cu[n + 1] - t0 : C;
        chunk_prepare(p, P, x, t0, L, hv, W);
        chunk_vnew(W, L, S0s + c * KV);
        chunk_backward_one(p, W, L, S0s + c * KV, x, t0, hv, dS, D);
    }
    if (D->dh0) memcpy(D->dh0 + (n * p->HV + hv) * KV, dS, (size_t)KV * sizeof(real));
    free(S0s), free(S), free(dS);
    return 0;
}

/* ---- 7. entry points ------------------------------------------------------------------ */

int REF(forward)(const kla_problem *p, int algo, const io *x)
{
    prepared P;
    chunk_work W;
    int r = prepare(p, x, &P);
    if (r < 0) return r;
    real *S = alloc_reals(p->K * p->V), *e = alloc_reals(p->V), *alpha = alloc_reals(p->K);
    r = chunk_work_alloc(&W, p, 0);
    if (r < 0 || !S || !e || !alpha) {
        if (r == 0) chunk_work_free(&W);
        free(S), free(e), free(alpha), prepared_free(&P);
        return KLA_ENOMEM;
    }
    for (int64_t n = 0; n < p->N; n++)
        for (int64_t hv = 0; hv < p->HV; hv++) {
            if (algo == KLA_ALGO_CHUNK) chunk_forward(p, &P, x, n, hv, S, &W, NULL);
            else recurrent_forward(p, &P, x, n, hv, S, e, alpha);
        }
    chunk_work_free(&W);
    free(S), free(e), free(alpha), prepared_free(&P);
    return 0;
}

int REF(backward)(const kla_problem *p, int algo, const io *x)
{
    const int64_t T = p->total, H = p->H, K = p->K;
    const int atk = p->precond == KLA_PRECOND_ATK, chan = p->gate == KLA_GATE_CHANNEL;
    prepared P;
    chunk_work W;
    int r = prepare(p, x, &P);
    if (r < 0) return r;
    real *dkhat = alloc_reals(T * H * K), *dkw = atk ? alloc_reals(T * H * K) : dkhat;
    grads D = { alloc_reals(T * H * K), dkhat, dkw, x->dv,
                x->dg ? x->dg : alloc_reals(T * p->HV * (chan ? K : 1)), alloc_reals(T * p->HV), x->dh0 };
    r = chunk_work_alloc(&W, p, 1);
    if (r == 0 && (!D.dqhat || !D.dkhat || !D.dkw || !D.dg || !D.dbeta)) {
        chunk_work_free(&W);
        r = KLA_ENOMEM;
    }
    if (r == 0) {
        /* every core gradient is written or accumulated from zero */
        memset(x->dv, 0, (size_t)(T * p->HV * p->V) * sizeof(real));
        for (int64_t n = 0; n < p->N && r == 0; n++)
            for (int64_t hv = 0; hv < p->HV && r == 0; hv++)
                r = algo == KLA_ALGO_CHUNK ? chunk_backward(p, &P, x, n, hv, &D, &W)
                                           : recurrent_backward(p, &P, x, n, hv, &D);
        if (r == 0) prepare_backward(p, x, &P, D.dqhat, D.dkhat, D.dkw, D.dbeta);
        chunk_work_free(&W);
    }
    free(D.dqhat), free(D.dbeta), free(dkhat);
    if (atk) free(dkw);
    if (!x->dg) free(D.dg);
    prepared_free(&P);
    return r;
}

int REF(decode)(const kla_problem *p, const io *x)
{
    /* one token per sequence: the token stream is q[N, H, K], ... with cu = 0, 1, .., N;
     * the ATK state (precond ATK) is read from astate and written back there */
    io y = *x;
    y.a0 = x->astate, y.at = x->astate;
    prepared P;
    int r = prepare(p, &y, &P);
    if (r < 0) return r;
    real *e = alloc_reals(p->V), *alpha = alloc_reals(p->K);
    if (!e || !alpha) {
        free(e), free(alpha), prepared_free(&P);
        return KLA_ENOMEM;
    }
    const int64_t K = p->K, V = p->V, HV = p->HV;
    for (int64_t n = 0; n < p->N; n++)
        for (int64_t hv = 0; hv < HV; hv++) {
            const int64_t h = key_head(p, hv), tv = n * HV + hv;
            decay_row(p, x->g, n, hv, alpha);
            step(x->state + tv * K * V, qk_row(p, P.qhat, n, h), qk_row(p, P.khat, n, h), kw_row(p, &P, n, h),
                 x->v + tv * V, alpha, P.beta[tv], (real)p->scale, K, V, e, x->o + tv * V);
        }
    free(e), free(alpha);
    prepared_free(&P);
    return 0;
}
