/*
 * kernels.c: the simd backend's kernels, written once against simd.h and compiled once
 * per CPU level (simd/meson.build: C, AVX2+FMA, AVX-512, NEON). Each compilation exports
 * one table, kla_simd_kernels_<level>. The math is that of ref/kla_ref.c (see there and
 * docs/algorithm.md for the derivations); only the evaluation order differs:
 *
 * - recurrent forward: columns of the state evolve independently, so each K x 32 slab
 *   runs through a group of 64 tokens while it sits in L1, each token one pass over the
 *   slab: S += beta k e^T fused with the next token's S^T k and S^T q, the decay folded
 *   into a running scale (o_t = alpha S^T q + beta (k.q) e, the same value as S_t^T q);
 * - decode: the same step on one token; blocks of columns are software-pipelined, one
 *   loop reading block u+1 (S^T k, S^T q) and updating block u (rows last to first, so
 *   the rows read last are updated first, likelier from L1): the state is streamed from
 *   memory once, its second touch is from L1 or L2;
 * - chunkwise forward and backward: every product is one small row-major GEMM (gemm()
 *   below); (I + A)^-1 is never formed: w and u come from forward substitution, the
 *   backward's Tm^T products from back substitution, and dA = -(du2 u^T + dw2 w^T)
 *   (= -Tm^T dTm Tm^T on A's strictly lower support). What does not depend on the
 *   state (chunk_prep) or on the state gradient (bwd_pre_one) is separate, so that the
 *   backend can run it for all chunks in parallel when there are fewer (sequence, head)
 *   pairs than threads.
 *
 * l2norm and the KLA step size are applied on the fly from per-token scalars, so the
 * forward needs no T-sized scratch.
 */
#include <math.h>
#include <string.h>

#include "kla.h"
#include "simd.h"
#include "simd_kernels.h"

#ifndef KLA_SIMD_LEVEL
#error "define KLA_SIMD_LEVEL (c, avx2, avx512, neon)"
#endif
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define TABLE CAT(kla_simd_kernels_, KLA_SIMD_LEVEL)
#define STR2(x) #x
#define STR(x) STR2(x)

#define L2NORM_EPS 1e-6f
/* state columns per slab: a K x 32 slab (16 KiB at K = 128) stays in L1; 64 columns
 * with AVX-512, and rows in pairs with two accumulator sets, measured slower on the
 * 2-core AVX-512 machine */
#define LCOLS SIMD_COLS
#define NB (LCOLS / VL) /* vectors per slab row */
/* decode: columns per block; with AVX-512 a whole row of 128 (16 accumulators and 8
 * residuals in zmm registers, the state read contiguously). 64 and 32 columns with
 * AVX-512 measured slower (the rows of a narrow block are 4 V bytes apart, so they share
 * few L1 sets and do not stay there either) */
#ifndef DCOLS
#define DCOLS (VL == 16 ? 128 : VL == 8 ? 64 : 32)
#endif
#define DNB (DCOLS / VL)

static int64_t key_head(const kla_problem *p, int64_t hv) { return hv / (p->HV / p->H); }

/* Per-token scalars: 1/rq, 1/rk (1 without l2norm) and beta, from the raw q, k rows. */
static void token_scalars(const kla_problem *p, const float *q, const float *k, float a,
                          float *inv_rq, float *inv_rk, float *beta)
{
    const int64_t K = p->K;
    const float kk = row_dot(k, k, K);
    *inv_rq = p->l2norm_q ? 1.0f / sqrtf(row_dot(q, q, K) + L2NORM_EPS) : 1.0f;
    *inv_rk = p->l2norm_k ? 1.0f / sqrtf(kk + L2NORM_EPS) : 1.0f;
    *beta = p->mode == KLA_MODE_KLA ? a / (kk * *inv_rk * *inv_rk + (float)p->eps) : a;
}

/* ---- recurrent forward ------------------------------------------------------------------ */

/*
 * Item (n, hv). Tokens go in groups of RG: the per-token scalars (1/rq, 1/rk, beta,
 * alpha, khat.qhat) are computed once per group, then each K x LCOLS slab of the
 * state (contiguous: a strided column block would alias L1 sets) runs through the group
 * while it sits in L1. Each token is one pass over the slab.
 *
 * The slab holds Ss = S / c, c the product of the decays so far, so decay costs no
 * pass: c <- alpha c; S^T x = c Ss^T x; Ss += (beta / c) khat e^T. When c drops below
 * 2^-20 the slab is rescaled (Ss <- c Ss, c = 1): float's relative precision does not
 * depend on the scale, and 1 / c stays finite.
 */
#define RG 64
enum { R_IRQ, R_IRK, R_BETA, R_ALPHA, R_KQ, R_N };

static void rec_fwd(const simd_job *J, int64_t n, int64_t hv, int64_t b0, int64_t b1, float *work)
{
    const kla_problem *p = J->p;
    const int64_t K = p->K, V = p->V, H = p->H, HV = p->HV, h = key_head(p, hv);
    const int64_t t0 = p->cu[n], t1 = p->cu[n + 1], SC = LCOLS, nb = (V + SC - 1) / SC;
    const float scale = (float)p->scale;
    float *slabs = work, *sc = slabs + nb * K * SC, *acc = sc + R_N * RG, *csb = acc + 2 * nb * SC;
    const float *h0 = J->h0 ? J->h0 + (n * HV + hv) * K * V : NULL;
    for (int64_t bI = b0; bI < b1; bI++) {
        const int64_t j0 = bI * SC, w = V - j0 < SC ? V - j0 : SC;
        float *slab = slabs + bI * K * SC, *ea = acc + 2 * bI * SC, *eb = ea + SC;
        csb[bI] = 1.0f;
        for (int64_t j = 0; j < SC; j++) ea[j] = eb[j] = 0;
        for (int64_t i = 0; i < K; i++)
            for (int64_t j = 0; j < SC; j++) slab[i * SC + j] = h0 && j < w ? h0[i * V + j0 + j] : 0.0f;
        if (t0 < t1 && h0) { /* S_0^T k_1 and S_0^T q_1 */
            const float *k = J->k + (t0 * H + h) * K, *q = J->q + (t0 * H + h) * K;
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < w; j++) ea[j] += slab[i * SC + j] * k[i], eb[j] += slab[i * SC + j] * q[i];
        }
    }
    for (int64_t tg = t0; tg < t1; tg += RG) {
        const int64_t G = t1 - tg < RG ? t1 - tg : RG;
        for (int64_t u = 0; u < G; u++) {
            const int64_t t = tg + u;
            const float *k = J->k + (t * H + h) * K, *q = J->q + (t * H + h) * K;
            token_scalars(p, q, k, J->a[t * HV + hv], &sc[R_IRQ * RG + u], &sc[R_IRK * RG + u],
                          &sc[R_BETA * RG + u]);
            sc[R_ALPHA * RG + u] = J->g ? expf(J->g[t * HV + hv]) : 1.0f;
            sc[R_KQ * RG + u] = row_dot(k, q, K) * sc[R_IRK * RG + u] * sc[R_IRQ * RG + u];
        }
        for (int64_t bI = b0; bI < b1; bI++) {
            const int64_t j0 = bI * SC, w = V - j0 < SC ? V - j0 : SC;
            float *slab = slabs + bI * K * SC, *ea = acc + 2 * bI * SC, *eb = ea + SC;
            float cs = csb[bI];
            vf a[NB], b[NB], e[NB];
            for (int c = 0; c < NB; c++) a[c] = vf_load(ea + c * VL), b[c] = vf_load(eb + c * VL);
            for (int64_t u = 0; u < G; u++) {
                const int64_t t = tg + u;
                const float *k = J->k + (t * H + h) * K;
                const float inv_rq = sc[R_IRQ * RG + u], inv_rk = sc[R_IRK * RG + u];
                const float beta = sc[R_BETA * RG + u], alpha = sc[R_ALPHA * RG + u];
                /* e = v - alpha S^T khat;  o = scale (alpha S^T qhat + beta (khat.qhat) e) */
                const float ck = scale * beta * sc[R_KQ * RG + u], bk = beta * inv_rk;
                const float *vt = J->v + (t * HV + hv) * V + j0;
                float *ot = J->o + (t * HV + hv) * V + j0;
                const float *kn = t + 1 < t1 ? k + H * K : NULL, *qn = kn ? J->q + ((t + 1) * H + h) * K : NULL;
                cs *= alpha;
                if (cs < 0x1p-20f) {
                    const vf vc = vf_set1(cs);
                    for (int64_t i = 0; i < K * SC; i += VL) vf_store(slab + i, vf_mul(vc, vf_load(slab + i)));
                    for (int c = 0; c < NB; c++) a[c] = vf_mul(vc, a[c]), b[c] = vf_mul(vc, b[c]);
                    cs = 1.0f;
                }
                if (w == SC) {
                    const vf vca = vf_set1(-cs * inv_rk), vcb = vf_set1(scale * cs * inv_rq), vck = vf_set1(ck);
                    for (int c = 0; c < NB; c++) {
                        e[c] = vf_fma(vca, a[c], vf_load(vt + c * VL));
                        vf_store(ot + c * VL, vf_fma(vcb, b[c], vf_mul(vck, e[c])));
                        a[c] = b[c] = vf_zero();
                    }
                } else { /* a partial block: through memory, the slab's spare columns stay 0 */
                    float av[LCOLS], bv[LCOLS], ev[LCOLS];
                    for (int c = 0; c < NB; c++) vf_store(av + c * VL, a[c]), vf_store(bv + c * VL, b[c]);
                    for (int64_t j = 0; j < SC; j++) {
                        ev[j] = j < w ? vt[j] - cs * inv_rk * av[j] : 0.0f;
                        if (j < w) ot[j] = scale * cs * inv_rq * bv[j] + ck * ev[j];
                    }
                    for (int c = 0; c < NB; c++) e[c] = vf_load(ev + c * VL), a[c] = b[c] = vf_zero();
                }
                /* Ss += (beta / c) khat e^T, fused with the next token's Ss^T k and Ss^T q */
                const float bkc = bk / cs;
                if (kn) {
                    int64_t i = 0;
                    for (; i < K; i++) {
                        const vf kb = vf_set1(bkc * k[i]), ki = vf_set1(kn[i]), qi = vf_set1(qn[i]);
                        float *row = slab + i * SC;
                        for (int c = 0; c < NB; c++) {
                            const vf s = vf_fma(kb, e[c], vf_load(row + c * VL));
                            vf_store(row + c * VL, s);
                            a[c] = vf_fma(s, ki, a[c]);
                            b[c] = vf_fma(s, qi, b[c]);
                        }
                    }
                } else { /* last token: back to S itself */
                    const vf vc = vf_set1(cs);
                    for (int64_t i = 0; i < K; i++) {
                        const vf kb = vf_set1(bk * k[i]);
                        float *row = slab + i * SC;
                        for (int c = 0; c < NB; c++)
                            vf_store(row + c * VL, vf_fma(kb, e[c], vf_mul(vc, vf_load(row + c * VL))));
                    }
                    cs = 1.0f;
                }
            }
            for (int c = 0; c < NB; c++) vf_store(ea + c * VL, a[c]), vf_store(eb + c * VL, b[c]);
            csb[bI] = cs;
        }
    }
    if (J->ht) {
        float *ht = J->ht + (n * HV + hv) * K * V;
        for (int64_t bI = b0; bI < b1; bI++) {
            const int64_t j0 = bI * SC, w = V - j0 < SC ? V - j0 : SC;
            for (int64_t i = 0; i < K; i++)
                memcpy(ht + i * V + j0, slabs + (bI * K + i) * SC, (size_t)w * sizeof(float));
        }
    }
}

/* ---- decode: one token, the state streamed once ------------------------------------------ */

/*
 * Work units are (item, block of DCOLS columns) in order, item = n HV + hv; a call runs
 * units u0 .. u1-1 (simd_kernels.decode_cols gives the backend DCOLS). For a block:
 * e = v - alpha S^T khat needs a whole pass over the rows before the update
 * S <- alpha S + beta khat e^T can start, and o = scale (alpha S^T qhat + beta (khat.qhat) e)
 * (the same value as S_new^T qhat) comes from the same pass. The units are software-
 * pipelined: one loop over the rows reads unit u+1 for its S^T k and S^T q and updates
 * unit u, which the previous loop has just read (so its second touch hits L1 or L2), so
 * the state is streamed from memory once and the FMAs overlap that stream instead of
 * following it. Each column's arithmetic is the same for any split into units, so any
 * thread count gives the same bits.
 */
typedef struct dunit {
    const float *k, *q, *vt;
    float *ot, *S;
    int64_t w; /* columns in the block (DCOLS but in a tail block) */
    float ca, cb, ck, bk, alpha;
} dunit;

static void dunit_setup(const simd_job *J, int64_t u, dunit *d, int64_t *last_it)
{
    const kla_problem *p = J->p;
    const int64_t K = p->K, V = p->V, H = p->H, HV = p->HV, nbu = (V + DCOLS - 1) / DCOLS;
    const int64_t it = u / nbu, j0 = u % nbu * DCOLS, n = it / HV, hv = it % HV, h = key_head(p, hv);
    d->k = J->k + (n * H + h) * K, d->q = J->q + (n * H + h) * K;
    d->vt = J->v + it * V + j0, d->ot = J->o + it * V + j0, d->S = J->ht + it * K * V + j0;
    d->w = V - j0 < DCOLS ? V - j0 : DCOLS;
    if (it == *last_it) return; /* the scalars of the item are already there */
    *last_it = it;
    float inv_rq, inv_rk, beta;
    token_scalars(p, d->q, d->k, J->a[it], &inv_rq, &inv_rk, &beta);
    const float alpha = J->g ? expf(J->g[it]) : 1.0f, scale = (float)p->scale;
    const float kq = row_dot(d->k, d->q, K) * inv_rk * inv_rq;
    d->ca = alpha * inv_rk, d->cb = scale * alpha * inv_rq, d->ck = scale * beta * kq;
    d->bk = beta * inv_rk, d->alpha = alpha;
}

/* a tail block (w < DCOLS), by itself: two passes */
static void decode_tail(const dunit *d, int64_t K, int64_t V)
{
    const int64_t w = d->w;
    float a[DCOLS] = { 0 }, b[DCOLS] = { 0 }, e[DCOLS];
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j < w; j++) {
            a[j] += d->S[i * V + j] * d->k[i];
            b[j] += d->S[i * V + j] * d->q[i];
        }
    for (int64_t j = 0; j < w; j++) {
        e[j] = d->vt[j] - d->ca * a[j];
        d->ot[j] = d->cb * b[j] + d->ck * e[j];
    }
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j < w; j++) d->S[i * V + j] = d->alpha * d->S[i * V + j] + d->bk * d->k[i] * e[j];
}

/* e and o of a full block from its S^T k (a) and S^T q (b) */
static inline void dunit_finish(const dunit *d, const vf *a, const vf *b, vf *e)
{
    const vf vca = vf_set1(-d->ca), vcb = vf_set1(d->cb), vck = vf_set1(d->ck);
    for (int c = 0; c < DNB; c++) {
        e[c] = vf_fma(vca, a[c], vf_load(d->vt + c * VL));
        vf_store(d->ot + c * VL, vf_fma(vcb, b[c], vf_mul(vck, e[c])));
    }
}

static void decode(const simd_job *J, int64_t u0, int64_t u1)
{
    const int64_t K = J->p->K, V = J->p->V;
    int64_t last_it = -1;
    dunit cur = { 0 }, nxt;
    vf e[DNB];
    int pending = 0; /* cur has e and waits for its update */
    for (int64_t u = u0; u < u1; u++) {
        nxt = cur; /* keeps the item's scalars when u is in the same item */
        dunit_setup(J, u, &nxt, &last_it);
        if (nxt.w < DCOLS) {
            decode_tail(&nxt, K, V);
            continue;
        }
        vf a[DNB], b[DNB];
        for (int c = 0; c < DNB; c++) a[c] = b[c] = vf_zero();
        if (pending) { /* update cur while reading nxt */
            const vf valpha = vf_set1(cur.alpha);
            for (int64_t i = 0; i < K; i++) {
                /* cur's rows last to first: the rows read last are likelier in L1 */
                const int64_t ir = K - 1 - i;
                const float *rn = nxt.S + i * V;
                float *rc = cur.S + ir * V;
                const vf ki = vf_set1(nxt.k[i]), qi = vf_set1(nxt.q[i]), kb = vf_set1(cur.bk * cur.k[ir]);
                for (int c = 0; c < DNB; c++) {
                    const vf s = vf_reg(vf_load(rn + c * VL));
                    a[c] = vf_fma(s, ki, a[c]);
                    b[c] = vf_fma(s, qi, b[c]);
                    vf_store(rc + c * VL, vf_fma(kb, e[c], vf_mul(valpha, vf_load(rc + c * VL))));
                }
            }
        } else {
            for (int64_t i = 0; i < K; i++) {
                const float *rn = nxt.S + i * V;
                const vf ki = vf_set1(nxt.k[i]), qi = vf_set1(nxt.q[i]);
                for (int c = 0; c < DNB; c++) {
                    const vf s = vf_load(rn + c * VL);
                    a[c] = vf_fma(s, ki, a[c]);
                    b[c] = vf_fma(s, qi, b[c]);
                }
            }
        }
        dunit_finish(&nxt, a, b, e);
        cur = nxt, pending = 1;
    }
    if (pending) {
        const vf valpha = vf_set1(cur.alpha);
        for (int64_t i = 0; i < K; i++) {
            float *rc = cur.S + i * V;
            const vf kb = vf_set1(cur.bk * cur.k[i]);
            for (int c = 0; c < DNB; c++) vf_store(rc + c * VL, vf_fma(kb, e[c], vf_mul(valpha, vf_load(rc + c * VL))));
        }
    }
}

/* ---- a small row-major GEMM ------------------------------------------------------------- */

static inline void put(float *c, vf acc, vf valpha, vf vbeta, int has_beta)
{
    acc = vf_mul(valpha, acc);
    vf_store(c, has_beta ? vf_fma(vbeta, vf_load(c), acc) : acc);
}

/* C = beta C + alpha A B with A(i, kk) = A[i rsa + kk csa] (row-major A: rsa = lda,
 * csa = 1; A transposed: rsa = 1, csa = lda), B [Kd, N] (ldb), C [M, N] (ldc), row-major.
 * beta == 0: C is only written. Register block: 4 rows x 2 vectors. */
static void gemm_s(int64_t M, int64_t N, int64_t Kd, float alpha, const float *A, int64_t rsa,
                   int64_t csa, const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    const vf va = vf_set1(alpha), vb = vf_set1(beta);
    const int hb = beta != 0.0f;
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) {
        const float *a0 = A + i * rsa, *a1 = a0 + rsa, *a2 = a1 + rsa, *a3 = a2 + rsa;
        float *c0 = C + i * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;
        int64_t j = 0;
        for (; j + 2 * VL <= N; j += 2 * VL) {
            vf x00 = vf_zero(), x01 = x00, x10 = x00, x11 = x00, x20 = x00, x21 = x00, x30 = x00, x31 = x00;
            const float *bp = B + j;
            for (int64_t kk = 0; kk < Kd; kk++, bp += ldb) {
                const vf b0 = vf_load(bp), b1 = vf_load(bp + VL);
                vf x = vf_set1(a0[kk * csa]);
                x00 = vf_fma(x, b0, x00), x01 = vf_fma(x, b1, x01);
                x = vf_set1(a1[kk * csa]);
                x10 = vf_fma(x, b0, x10), x11 = vf_fma(x, b1, x11);
                x = vf_set1(a2[kk * csa]);
                x20 = vf_fma(x, b0, x20), x21 = vf_fma(x, b1, x21);
                x = vf_set1(a3[kk * csa]);
                x30 = vf_fma(x, b0, x30), x31 = vf_fma(x, b1, x31);
            }
            put(c0 + j, x00, va, vb, hb), put(c0 + j + VL, x01, va, vb, hb);
            put(c1 + j, x10, va, vb, hb), put(c1 + j + VL, x11, va, vb, hb);
            put(c2 + j, x20, va, vb, hb), put(c2 + j + VL, x21, va, vb, hb);
            put(c3 + j, x30, va, vb, hb), put(c3 + j + VL, x31, va, vb, hb);
        }
        for (; j + VL <= N; j += VL) {
            vf x0 = vf_zero(), x1 = x0, x2 = x0, x3 = x0;
            const float *bp = B + j;
            for (int64_t kk = 0; kk < Kd; kk++, bp += ldb) {
                const vf b0 = vf_load(bp);
                x0 = vf_fma(vf_set1(a0[kk * csa]), b0, x0), x1 = vf_fma(vf_set1(a1[kk * csa]), b0, x1);
                x2 = vf_fma(vf_set1(a2[kk * csa]), b0, x2), x3 = vf_fma(vf_set1(a3[kk * csa]), b0, x3);
            }
            put(c0 + j, x0, va, vb, hb), put(c1 + j, x1, va, vb, hb);
            put(c2 + j, x2, va, vb, hb), put(c3 + j, x3, va, vb, hb);
        }
        for (; j < N; j++) {
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            for (int64_t kk = 0; kk < Kd; kk++) {
                const float bv = B[kk * ldb + j];
                s0 += a0[kk * csa] * bv, s1 += a1[kk * csa] * bv, s2 += a2[kk * csa] * bv, s3 += a3[kk * csa] * bv;
            }
            c0[j] = alpha * s0 + (hb ? beta * c0[j] : 0), c1[j] = alpha * s1 + (hb ? beta * c1[j] : 0);
            c2[j] = alpha * s2 + (hb ? beta * c2[j] : 0), c3[j] = alpha * s3 + (hb ? beta * c3[j] : 0);
        }
    }
    for (; i < M; i++) { /* single rows: 4 vectors wide */
        const float *a0 = A + i * rsa;
        float *c0 = C + i * ldc;
        int64_t j = 0;
        for (; j + 4 * VL <= N; j += 4 * VL) {
            vf x0 = vf_zero(), x1 = x0, x2 = x0, x3 = x0;
            const float *bp = B + j;
            for (int64_t kk = 0; kk < Kd; kk++, bp += ldb) {
                const vf x = vf_set1(a0[kk * csa]);
                x0 = vf_fma(x, vf_load(bp), x0), x1 = vf_fma(x, vf_load(bp + VL), x1);
                x2 = vf_fma(x, vf_load(bp + 2 * VL), x2), x3 = vf_fma(x, vf_load(bp + 3 * VL), x3);
            }
            put(c0 + j, x0, va, vb, hb), put(c0 + j + VL, x1, va, vb, hb);
            put(c0 + j + 2 * VL, x2, va, vb, hb), put(c0 + j + 3 * VL, x3, va, vb, hb);
        }
        for (; j + VL <= N; j += VL) {
            vf x0 = vf_zero();
            const float *bp = B + j;
            for (int64_t kk = 0; kk < Kd; kk++, bp += ldb) x0 = vf_fma(vf_set1(a0[kk * csa]), vf_load(bp), x0);
            put(c0 + j, x0, va, vb, hb);
        }
        for (; j < N; j++) {
            float s = 0;
            for (int64_t kk = 0; kk < Kd; kk++) s += a0[kk * csa] * B[kk * ldb + j];
            c0[j] = alpha * s + (hb ? beta * c0[j] : 0);
        }
    }
}

#define gemm(M, N, Kd, al, A, lda, B, ldb, be, C, ldc) gemm_s(M, N, Kd, al, A, lda, 1, B, ldb, be, C, ldc)
/* C = beta C + alpha A^T B with A stored [Kd, M] (lda) */
#define gemm_tn(M, N, Kd, al, A, lda, B, ldb, be, C, ldc) gemm_s(M, N, Kd, al, A, 1, lda, B, ldb, be, C, ldc)

/* dst [cols, rows] (ldd) = src [rows, cols] (lds) transposed, in 8 x 8 tiles */
static void transpose(const float *src, int64_t lds, int64_t rows, int64_t cols, float *dst, int64_t ldd)
{
    for (int64_t r0 = 0; r0 < rows; r0 += 8)
        for (int64_t c0 = 0; c0 < cols; c0 += 8) {
            const int64_t r1 = r0 + 8 < rows ? r0 + 8 : rows, c1 = c0 + 8 < cols ? c0 + 8 : cols;
            for (int64_t c = c0; c < c1; c++)
                for (int64_t r = r0; r < r1; r++) dst[c * ldd + r] = src[r * lds + c];
        }
}

/* X <- (I + A)^-1 X, A strictly lower [L, L] (lda), X [L, N] (ldx): forward substitution
 * by blocks of 4 rows, so that all but the 4 x 4 diagonal triangles run in gemm's
 * 4-row register block */
static void solve_lower(int64_t L, int64_t N, const float *A, int64_t lda, float *X, int64_t ldx)
{
    for (int64_t i0 = 0; i0 < L; i0 += 4) {
        const int64_t nb = L - i0 < 4 ? L - i0 : 4;
        if (i0) gemm(nb, N, i0, -1, A + i0 * lda, lda, X, ldx, 1, X + i0 * ldx, ldx);
        for (int64_t i = i0 + 1; i < i0 + nb; i++)
            for (int64_t m = i0; m < i; m++) row_axpy(X + i * ldx, -A[i * lda + m], X + m * ldx, N);
    }
}

/* X <- (I + A)^-T X: back substitution, X_j -= sum_{i > j} A[i,j] X_i, blocks of 4 rows */
static void solve_lower_t(int64_t L, int64_t N, const float *A, int64_t lda, float *X, int64_t ldx)
{
    for (int64_t j1 = L; j1 > 0; j1 -= 4) {
        const int64_t j0 = j1 - 4 > 0 ? j1 - 4 : 0, nb = j1 - j0;
        if (j1 < L) gemm_tn(nb, N, L - j1, -1, A + j1 * lda + j0, lda, X + j1 * ldx, ldx, 1, X + j0 * ldx, ldx);
        for (int64_t j = j1 - 2; j >= j0; j--)
            for (int64_t i = j + 1; i < j1; i++) row_axpy(X + j * ldx, -A[i * lda + j], X + i * ldx, N);
    }
}

/* ---- chunkwise: scratch and the state-independent part of a chunk -------------------- */

typedef struct cwork {
    float *Qc, *Kc, *KcT, *QcT, *W, *WT, *Y, *Z, *dw, *dw2;    /* [C, K] or [K, C] */
    float *KKt, *A, *E, *P, *Mm, *dP, *spare1, *spare2;        /* [C, C] */
    float *U, *UT, *vnew, *vnewT, *dvnew, *dOg, *du2, *spare;  /* [C, V] or [V, C] */
    float *S, *S0T, *dS, *dST;                                 /* [K, V] */
    float *G, *gam, *beta, *d, *dG, *dbeta, *tmp1, *tmp2;      /* [C] */
} cwork;

static void carve(cwork *w, float *base, int64_t C, int64_t K, int64_t V)
{
    const int64_t r = 16, CC = C * C + r, CK = C * K + r, CV = C * V + r, KV = K * V + r;
    float **ck[] = { &w->Qc, &w->Kc, &w->KcT, &w->QcT, &w->W, &w->WT, &w->Y, &w->Z, &w->dw, &w->dw2 };
    float **cc[] = { &w->KKt, &w->A, &w->E, &w->P, &w->Mm, &w->dP, &w->spare1, &w->spare2 };
    float **cv[] = { &w->U, &w->UT, &w->vnew, &w->vnewT, &w->dvnew, &w->dOg, &w->du2, &w->spare };
    float **kv[] = { &w->S, &w->S0T, &w->dS, &w->dST };
    float **c1[] = { &w->G, &w->gam, &w->beta, &w->d, &w->dG, &w->dbeta, &w->tmp1, &w->tmp2 };
    for (int i = 0; i < 8; i++) *cc[i] = base, base += CC;
    for (int i = 0; i < 10; i++) *ck[i] = base, base += CK;
    for (int i = 0; i < 8; i++) *cv[i] = base, base += CV;
    for (int i = 0; i < 4; i++) *kv[i] = base, base += KV;
    for (int i = 0; i < 8; i++) *c1[i] = base, base += C + r;
}

/* Backward: what the forward computed for chunk c is kept (simd_chunk_save_floats per
 * chunk: S0, Qc, Kc, w, u, vnew, KKt, A, E, P, G, gamma, beta), so the backward does not
 * recompute it. Returns S0 and points w's chunk matrices into the saved block. */
static float *point_saved(cwork *w, float *base, int64_t C, int64_t K, int64_t V)
{
    const int64_t r = 16, CC = C * C + r, CK = C * K + r, CV = C * V + r, KV = K * V + r;
    float *S0 = base;
    base += KV;
    float **ck[] = { &w->Qc, &w->Kc, &w->W }, **cv[] = { &w->U, &w->vnew };
    float **cc[] = { &w->KKt, &w->A, &w->E, &w->P }, **c1[] = { &w->G, &w->gam, &w->beta };
    for (int i = 0; i < 3; i++) *ck[i] = base, base += CK;
    for (int i = 0; i < 2; i++) *cv[i] = base, base += CV;
    for (int i = 0; i < 4; i++) *cc[i] = base, base += CC;
    for (int i = 0; i < 3; i++) *c1[i] = base, base += C + r;
    return S0;
}

/* Qc, Kc (normalised), KcT, G, gamma, beta, KKt, A, and w, u by forward substitution:
 * (I + A) w = diag(beta gamma) K,  (I + A) u = diag(beta) V. */
static void chunk_prepare(const simd_job *J, cwork *w, int64_t t0, int64_t L, int64_t hv)
{
    const kla_problem *p = J->p;
    const int64_t K = p->K, V = p->V, H = p->H, HV = p->HV, C = p->chunk, h = key_head(p, hv);
    for (int64_t i = 0; i < L; i++) {
        const int64_t t = t0 + i;
        const float *q = J->q + (t * H + h) * K, *k = J->k + (t * H + h) * K;
        float inv_rq, inv_rk;
        token_scalars(p, q, k, J->a[t * HV + hv], &inv_rq, &inv_rk, &w->beta[i]);
        row_scale(w->Qc + i * K, inv_rq, q, K);
        row_scale(w->Kc + i * K, inv_rk, k, K);
        w->G[i] = (i ? w->G[i - 1] : 0.0f) + (J->g ? J->g[t * HV + hv] : 0.0f);
        w->gam[i] = expf(w->G[i]);
    }
    transpose(w->Kc, K, L, K, w->KcT, L);
    gemm(L, L, K, 1, w->Kc, K, w->KcT, L, 0, w->KKt, C);
    /* E[i,j] = exp(G_i - G_j) for j <= i (<= 1: only differences are exponentiated) */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++) {
            w->E[i * C + j] = j <= i ? expf(w->G[i] - w->G[j]) : 0.0f;
            w->A[i * C + j] = j < i ? w->beta[i] * w->E[i * C + j] * w->KKt[i * C + j] : 0.0f;
        }
    for (int64_t i = 0; i < L; i++) {
        row_scale(w->W + i * K, w->beta[i] * w->gam[i], w->Kc + i * K, K);
        row_scale(w->U + i * V, w->beta[i], J->v + ((t0 + i) * HV + hv) * V, V);
    }
    solve_lower(L, K, w->A, C, w->W, K);
    solve_lower(L, V, w->A, C, w->U, V);
}

/* P[i,j] = scale exp(G_i - G_j) qhat_i . khat_j for j <= i, else 0 */
static void chunk_P(const simd_job *J, cwork *w, int64_t L)
{
    const int64_t K = J->p->K, C = J->p->chunk;
    const float scale = (float)J->p->scale;
    gemm(L, L, K, 1, w->Qc, K, w->KcT, L, 0, w->P, C);
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++)
            w->P[i * C + j] = j <= i ? scale * w->E[i * C + j] * w->P[i * C + j] : 0.0f;
}

static void load_state(const simd_job *J, const float *src, int64_t n, int64_t hv, float *S)
{
    const int64_t KV = J->p->K * J->p->V;
    if (src) memcpy(S, src + (n * J->p->HV + hv) * KV, (size_t)KV * sizeof(float));
    else memset(S, 0, (size_t)KV * sizeof(float));
}

/* The state-independent part of chunk c of item (n, hv) into its saved block (save_c:
 * simd_chunk_save_floats), so that chunks can be prepared in parallel, ahead of the
 * sequential pass over the state (chunk_fwd with SIMD_PREPARED) */
static void chunk_prep(const simd_job *J, int64_t n, int64_t hv, int64_t c, float *work, float *save_c)
{
    const kla_problem *p = J->p;
    const int64_t C = p->chunk, t0 = p->cu[n] + c * C, L = p->cu[n + 1] - t0 < C ? p->cu[n + 1] - t0 : C;
    cwork w;
    carve(&w, work, C, p->K, p->V);
    point_saved(&w, save_c, C, p->K, p->V);
    chunk_prepare(J, &w, t0, L, hv);
    chunk_P(J, &w, L);
}

/* copy columns j0 .. j1-1 of [K, V] matrices (or zero them when src is NULL) */
static void copy_cols(float *dst, const float *src, int64_t K, int64_t V, int64_t j0, int64_t j1)
{
    for (int64_t i = 0; i < K; i++) {
        if (src) memcpy(dst + i * V + j0, src + i * V + j0, (size_t)(j1 - j0) * sizeof(float));
        else memset(dst + i * V + j0, 0, (size_t)(j1 - j0) * sizeof(float));
    }
}

static void chunk_fwd(const simd_job *J, int64_t n, int64_t hv, int64_t c0, int64_t c1, int64_t j0,
                      int64_t j1, float *S, float *work, float *save, int flags)
{
    const kla_problem *p = J->p;
    const int64_t K = p->K, V = p->V, KV = K * V, HV = p->HV, C = p->chunk, ldo = HV * V;
    const int64_t nch = (p->cu[n + 1] - p->cu[n] + C - 1) / C, ssz = simd_chunk_save_floats(C, K, V);
    const int64_t N = j1 - j0; /* columns of the state (and of v, o) this call advances */
    const float scale = (float)p->scale;
    cwork w;
    carve(&w, work, C, K, V);
    if (!S) S = w.S;
    if (c0 == 0) copy_cols(S, J->h0 ? J->h0 + (n * HV + hv) * KV : NULL, K, V, j0, j1);
    for (int64_t c = c0; c < c1; c++) {
        const int64_t t0 = p->cu[n] + c * C, L = p->cu[n + 1] - t0 < C ? p->cu[n + 1] - t0 : C;
        if (save) {
            float *S0 = point_saved(&w, save + (c - c0) * ssz, C, K, V);
            if (flags & SIMD_KEEP_S0) copy_cols(S0, S, K, V, j0, j1);
        }
        if (!(flags & SIMD_PREPARED)) {
            chunk_prepare(J, &w, t0, L, hv);
            chunk_P(J, &w, L);
        }
        /* vnew = u - w S0 */
        for (int64_t i = 0; i < L; i++) memcpy(w.vnew + i * V + j0, w.U + i * V + j0, (size_t)N * sizeof(float));
        gemm(L, N, K, -1, w.W, K, S + j0, V, 1, w.vnew + j0, V);
        /* o = scale diag(gamma) Qc S0 + P vnew */
        float *o = J->o + (t0 * HV + hv) * V + j0;
        gemm(L, N, K, 1, w.Qc, K, S + j0, V, 0, o, ldo);
        for (int64_t i = 0; i < L; i++) row_scale(o + i * ldo, scale * w.gam[i], o + i * ldo, N);
        gemm(L, N, L, 1, w.P, C, w.vnew + j0, V, 1, o, ldo);
        /* S = gamma_L S0 + Kc^T diag(exp(G_L - G_j)) vnew */
        for (int64_t j = 0; j < L; j++) row_scale(w.dOg + j * V + j0, w.E[(L - 1) * C + j], w.vnew + j * V + j0, N);
        gemm_tn(K, N, L, 1, w.Kc, K, w.dOg + j0, V, w.gam[L - 1], S + j0, V);
    }
    if (J->ht && c1 >= nch) copy_cols(J->ht + (n * HV + hv) * KV, S, K, V, j0, j1);
}

/* ---- chunkwise backward: reverse mode through the chunk steps, last chunk first ---------- */

/* The part of chunk c's backward that does not depend on the state gradient dS (the
 * sequential part): it needs only the forward's saved values and do, so the chunks can
 * run it in parallel. It writes dq of the chunk's tokens completely and the first term
 * of dk (Mm^T Qc), and keeps in pre (simd_chunk_pre_floats): X = scale Qc^T diag(gamma)
 * dO (the term dS gains in the chunk), P^T dO (dvnew's term) and dG's terms. */
static void bwd_pre_one(const simd_job *J, cwork *w, int64_t t0, int64_t L, int64_t hv,
                        const float *S0, float *pre)
{
    const kla_problem *p = J->p;
    const int64_t K = p->K, V = p->V, HV = p->HV, C = p->chunk;
    const int64_t ldo = HV * V, ldg = HV * K;
    const float scale = (float)p->scale;
    const float *dO = J->dout + (t0 * HV + hv) * V;
    float *dq = J->dqv + (t0 * HV + hv) * K, *dk = J->dkv + (t0 * HV + hv) * K;
    float *X = pre, *PtdO = X + K * V + 16, *dGp = PtdO + C * V + 16;
    for (int64_t i = 0; i < L; i++) dGp[i] = 0;

    /* o_i = gamma_i S0^T qs_i + sum_{j<=i} P_ij vnew_j */
    transpose(S0, V, K, V, w->S0T, K);
    gemm(L, K, V, 1, dO, ldo, w->S0T, K, 0, w->Z, K); /* Z_i = S0 do_i */
    for (int64_t i = 0; i < L; i++) {
        row_axpy(dq + i * ldg, scale * w->gam[i], w->Z + i * K, K);
        dGp[i] += scale * w->gam[i] * row_dot(w->Qc + i * K, w->Z + i * K, K);
        row_scale(w->dOg + i * V, w->gam[i], dO + i * ldo, V);
    }
    gemm_tn(K, V, L, scale, w->Qc, K, w->dOg, V, 0, X, V);
    transpose(w->vnew, V, L, V, w->vnewT, L);
    gemm(L, L, V, 1, dO, ldo, w->vnewT, L, 0, w->dP, C); /* dP_ij = do_i . vnew_j */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++) {
            if (j <= i) {
                const float dp = w->dP[i * C + j], pp = dp * w->P[i * C + j];
                dGp[i] += pp;
                dGp[j] -= pp;
                w->Mm[i * C + j] = dp * scale * w->E[i * C + j];
            } else {
                w->Mm[i * C + j] = 0;
            }
        }
    gemm_tn(L, V, L, 1, w->P, C, dO, ldo, 0, PtdO, V);
    gemm(L, K, L, 1, w->Mm, C, w->Kc, K, 1, dq, ldg);
    gemm_tn(L, K, L, 1, w->Mm, C, w->Qc, K, 1, dk, ldg);
}

/* the rest of chunk c's backward, sequential in the chunks through dS */
static void bwd_main_one(const simd_job *J, cwork *w, int64_t t0, int64_t L, int64_t hv,
                         const float *S0, const float *pre, int s0t_ready)
{
    const kla_problem *p = J->p;
    const int64_t K = p->K, V = p->V, KV = K * V, HV = p->HV, C = p->chunk;
    const int64_t ldg = HV * K;
    const float GL = w->G[L - 1], gamL = w->gam[L - 1];
    float *dk = J->dkv + (t0 * HV + hv) * K;
    float *dS = w->dS, *dG = w->dG, *dbeta = w->dbeta, *d = w->d;
    const float *X = pre, *PtdO = X + K * V + 16, *dGp = PtdO + C * V + 16;
    for (int64_t i = 0; i < L; i++) dG[i] = dGp[i], dbeta[i] = 0, d[i] = expf(GL - w->G[i]);

    /* S_L = gamma_L S0 + sum_j d_j k_j vnew_j^T */
    gemm(L, V, K, 1, w->Kc, K, dS, V, 0, w->dvnew, V); /* dvnew_j = d_j dS^T k_j */
    for (int64_t j = 0; j < L; j++) {
        row_scale(w->dvnew + j * V, d[j], w->dvnew + j * V, V);
        for (int64_t i = 0; i < V; i++) w->dvnew[j * V + i] += PtdO[j * V + i];
    }
    transpose(dS, V, K, V, w->dST, K);
    gemm(L, K, V, 1, w->vnew, V, w->dST, K, 0, w->Y, K); /* Y_j = dS vnew_j */
    float bsum = 0;
    for (int64_t j = 0; j < L; j++) {
        const float b = d[j] * row_dot(w->Kc + j * K, w->Y + j * K, K);
        row_axpy(dk + j * ldg, d[j], w->Y + j * K, K);
        bsum += b;
        dG[j] -= b;
    }
    dG[L - 1] += gamL * row_dot(S0, dS, KV) + bsum;
    row_scale(dS, gamL, dS, KV); /* dS is dS0 from here on */
    for (int64_t i = 0; i < KV; i++) dS[i] += X[i];

    /* vnew = u - w S0 (S0T: left by bwd_pre_one when it ran on this work area) */
    if (!s0t_ready) transpose(S0, V, K, V, w->S0T, K);
    gemm(L, K, V, -1, w->dvnew, V, w->S0T, K, 0, w->dw, K);
    gemm_tn(K, V, L, -1, w->W, K, w->dvnew, V, 1, dS, V);

    /* du2 = Tm^T dvnew, dw2 = Tm^T dw: back substitution with (I + A)^T */
    memcpy(w->du2, w->dvnew, (size_t)(L * V) * sizeof(float));
    memcpy(w->dw2, w->dw, (size_t)(L * K) * sizeof(float));
    solve_lower_t(L, V, w->A, C, w->du2, V);
    solve_lower_t(L, K, w->A, C, w->dw2, K);
    for (int64_t j = 0; j < L; j++) {
        const float *vj = J->v + ((t0 + j) * HV + hv) * V;
        row_scale(J->dv + ((t0 + j) * HV + hv) * V, w->beta[j], w->du2 + j * V, V);
        const float kdw2 = row_dot(w->Kc + j * K, w->dw2 + j * K, K);
        row_axpy(dk + j * ldg, w->beta[j] * w->gam[j], w->dw2 + j * K, K);
        dbeta[j] += row_dot(vj, w->du2 + j * V, V) + w->gam[j] * kdw2;
        dG[j] += w->beta[j] * w->gam[j] * kdw2;
    }

    /* dA = -(du2 u^T + dw2 w^T) on the strictly lower part */
    transpose(w->U, V, L, V, w->UT, L);
    transpose(w->W, K, L, K, w->WT, L);
    gemm(L, L, V, 1, w->du2, V, w->UT, L, 0, w->dP, C);
    gemm(L, L, K, 1, w->dw2, K, w->WT, L, 1, w->dP, C);
    /* A_ij = beta_i E_ij KKt_ij: R_ij = dA_ij beta_i E_ij;  dk += R Kc + R^T Kc */
    for (int64_t i = 0; i < L; i++)
        for (int64_t j = 0; j < L; j++) {
            if (j < i) {
                const float dA = -w->dP[i * C + j], E = w->E[i * C + j];
                const float dAA = dA * w->A[i * C + j];
                dbeta[i] += dA * E * w->KKt[i * C + j];
                dG[i] += dAA;
                dG[j] -= dAA;
                w->Mm[i * C + j] = dA * w->beta[i] * E;
            } else {
                w->Mm[i * C + j] = 0;
            }
        }
    gemm(L, K, L, 1, w->Mm, C, w->Kc, K, 1, dk, ldg);
    gemm_tn(L, K, L, 1, w->Mm, C, w->Kc, K, 1, dk, ldg);

    /* G_i = g_0 + ... + g_i:  dg_t = sum_{i >= t} dG_i */
    float acc = 0;
    for (int64_t i = L - 1; i >= 0; i--) {
        acc += dG[i];
        J->dg[(t0 + i) * HV + hv] = acc;
        J->dbeta[(t0 + i) * HV + hv] = dbeta[i];
    }
}

/* bwd_pre_one of chunk c of item (n, hv), for the parallel path: save_c is the chunk's
 * saved block, pre_c its simd_chunk_pre_floats block */
static void chunk_bwd_pre(const simd_job *J, int64_t n, int64_t hv, int64_t c, float *work,
                          float *save_c, float *pre_c)
{
    const kla_problem *p = J->p;
    const int64_t C = p->chunk, t0 = p->cu[n] + c * C, L = p->cu[n + 1] - t0 < C ? p->cu[n + 1] - t0 : C;
    cwork w;
    carve(&w, work, C, p->K, p->V);
    const float *S0 = point_saved(&w, save_c, C, p->K, p->V);
    bwd_pre_one(J, &w, t0, L, hv, S0, pre_c);
}

/* pre: the chunks' blocks filled by chunk_bwd_pre, or NULL: each chunk's is computed here
 * (the same code, so the same bits) */
static void chunk_bwd(const simd_job *J, int64_t n, int64_t hv, float *work, float *save, float *pre)
{
    const kla_problem *p = J->p;
    const int64_t K = p->K, V = p->V, KV = K * V, C = p->chunk;
    const int64_t len = p->cu[n + 1] - p->cu[n], nch = (len + C - 1) / C;
    const int64_t ssz = simd_chunk_save_floats(C, K, V), psz = simd_chunk_pre_floats(C, K, V);
    cwork w;
    carve(&w, work, C, K, V);
    float *own = work + simd_chunk_work_floats(C, K, V) - psz; /* the end of work */
    load_state(J, J->dht, n, hv, w.dS);
    for (int64_t c = nch - 1; c >= 0; c--) {
        const int64_t t0 = p->cu[n] + c * C, L = p->cu[n + 1] - t0 < C ? p->cu[n + 1] - t0 : C;
        const float *S0 = point_saved(&w, save + c * ssz, C, K, V);
        float *pc = pre ? pre + c * psz : own;
        if (!pre) bwd_pre_one(J, &w, t0, L, hv, S0, pc);
        bwd_main_one(J, &w, t0, L, hv, S0, pc, !pre);
    }
    if (J->dh0) memcpy(J->dh0 + (n * p->HV + hv) * KV, w.dS, (size_t)KV * sizeof(float));
}

const simd_kernels TABLE = { STR(KLA_SIMD_LEVEL), rec_fwd, decode, DCOLS, chunk_prep, chunk_fwd, chunk_bwd_pre, chunk_bwd };
