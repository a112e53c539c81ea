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
 * `total` tokens: q, k [total, H, K]; v, o [total, HV, V]; g, a [total, HV];
 * states [N, HV, K, V]. Sequence n is tokens cu[n] .. cu[n+1]-1. */
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
} kla_problem;

/* algo: KLA_ALGO_RECURRENT or KLA_ALGO_CHUNK. Optional pointers may be NULL:
 * g (no decay), h0 (zeros), ht, dht (zeros), dg, dh0. Return 0 or KLA_ENOMEM. */
#define KLA_REF_DECLARE(R, sfx)                                                          \
    int kla_ref_forward_##sfx(const kla_problem *p, int algo, const R *q, const R *k,    \
                              const R *v, const R *g, const R *a, const R *h0, R *o,     \
                              R *ht);                                                    \
    int kla_ref_backward_##sfx(const kla_problem *p, int algo, const R *q, const R *k,   \
                               const R *v, const R *g, const R *a, const R *h0,          \
                               const R *dout, const R *dht, R *o, R *ht, R *dq, R *dk,   \
                               R *dv, R *dg, R *da, R *dh0);                             \
    int kla_ref_decode_##sfx(const kla_problem *p, const R *q, const R *k, const R *v,   \
                             const R *g, const R *a, R *state, R *o);

KLA_REF_DECLARE(float, f32)
KLA_REF_DECLARE(double, f64)

#endif
