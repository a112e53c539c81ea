/*
 * kla_ref.h: the scalar reference's entry points, for the library's dispatch table
 * (src/) and for tests. ref/kla_ref.c is compiled twice, giving the _f32 and _f64 sets.
 *
 * All tensors are dense, row-major, in the reference's precision, with the state in
 * the KV layout; the library's glue (src/api.c) validates inputs, converts dtypes and
 * layouts, and resolves defaults before calling in.
 */
#ifndef KLA_REF_H
#define KLA_REF_H

#include <stdint.h>

/* What one call computes. Tokens of all sequences form one flattened stream of
 * `total` tokens: q, k [total, H, K]; v, o [total, HV, V]; a [total, HV]; g [total, HV]
 * (gate head) or [total, HV, K] (gate channel); states [N, HV, K, V]; the ATK state
 * [N, H, K]. Sequence n is tokens cu[n] .. cu[n+1]-1. */
typedef struct kla_problem {
    int64_t N, H, HV, K, V;
    const int64_t *cu; /* [N + 1], cu[0] = 0, non-decreasing, cu[N] = total */
    int64_t total;
    int mode;          /* KLA_MODE_KLA: a is eta; KLA_MODE_GDN: a is beta */
    double scale;      /* resolved (K^-1/2 by default) */
    double eps;
    int l2norm_q, l2norm_k;
    int chunk;         /* chunk size of the chunkwise algorithm */
    int threads;       /* for threaded backends; the reference ignores it */
    int gate;          /* KLA_GATE_HEAD or KLA_GATE_CHANNEL (g per key channel) */
    int precond;       /* KLA_PRECOND_NONE or KLA_PRECOND_ATK (the diagonal preconditioner) */
    double squash_x, squash_eps; /* the ATK squash: m in (1/x, x) */
} kla_problem;

/* One call's tensors. Optional inputs may be NULL: g (no decay), h0 (zeros), dht
 * (zeros), g_atk (zeros), log_atk_scale (each -0.2), a0 (zeros), dat (zeros); optional
 * outputs too: ht, at, dg, dh0, dg_atk, dbeta_atk, dlog_atk_scale, da0. beta_atk is
 * required with precond ATK. Shapes: g_atk, beta_atk [total, H]; log_atk_scale [H];
 * a0, at, dat, da0, astate [N, H, K]. decode: state [N, HV, K, V] and (precond ATK)
 * astate [N, H, K], read and updated. */
#define KLA_REF_TENSORS(R)                                                                     \
    struct {                                                                                   \
        const R *q, *k, *v, *g, *a, *h0, *dout, *dht;                                          \
        const R *g_atk, *beta_atk, *log_atk_scale, *a0, *dat;                                  \
        R *o, *ht, *at, *dq, *dk, *dv, *dg, *da, *dh0;                                         \
        R *dg_atk, *dbeta_atk, *dlog_atk_scale, *da0;                                          \
        R *state, *astate;                                                                     \
    }
typedef KLA_REF_TENSORS(float) kla_ref_io_f32;
typedef KLA_REF_TENSORS(double) kla_ref_io_f64;

/* algo: KLA_ALGO_RECURRENT or KLA_ALGO_CHUNK. Return 0 or KLA_ENOMEM. */
#define KLA_REF_DECLARE(R, sfx)                                                              \
    int kla_ref_forward_##sfx(const kla_problem *p, int algo, const kla_ref_io_##sfx *x);    \
    int kla_ref_backward_##sfx(const kla_problem *p, int algo, const kla_ref_io_##sfx *x);   \
    int kla_ref_decode_##sfx(const kla_problem *p, const kla_ref_io_##sfx *x);

KLA_REF_DECLARE(float, f32)
KLA_REF_DECLARE(double, f64)

#endif
