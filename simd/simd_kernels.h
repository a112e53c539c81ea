/*
 * simd_kernels.h: the contract between the backend glue (simd/backend.c, baseline ISA,
 * OpenMP) and the per-level kernel tables (simd/kernels.c compiled once per level).
 *
 * A kernel computes one independent work item: one (sequence, value head) pair, or for
 * the recurrent forward a range of column slabs of one. Items
 * never share output elements and each reduces in a fixed order, so any thread count
 * gives bit-identical results.
 */
#ifndef KLA_SIMD_KERNELS_H
#define KLA_SIMD_KERNELS_H

#include <stdint.h>

#include "kla_ref.h"

#define SIMD_COLS 32 /* value columns per slab of the recurrent forward's state */

typedef struct simd_job {
    const kla_problem *p;
    const float *q, *k, *v, *g, *a, *h0; /* raw inputs; l2norm and beta are applied inside */
    float *o, *ht;
    /* backward */
    const float *dout, *dht;
    float *dqv, *dkv; /* [total, HV, K]: gradients w.r.t. qhat, khat per value head, zeroed
                       * by the glue and accumulated into (dq, dk themselves when HV == H) */
    float *dv, *dg, *dbeta, *dh0; /* dv [total, HV, V]; dg, dbeta [total, HV]; dh0 or NULL */
} simd_job;

typedef struct simd_kernels {
    const char *name;
    /* recurrent forward of item (n, hv), slabs b0 .. b1-1 (columns 32 b0 .. 32 b1 - 1;
     * columns evolve independently, so any split gives the same bits); work:
     * simd_rec_work_floats(K, V) floats */
    void (*rec_fwd)(const simd_job *J, int64_t n, int64_t hv, int64_t b0, int64_t b1, float *work);
    /* one token, state [K, V] of item (n, hv) in place (J->ht is the state array) */
    void (*decode)(const simd_job *J, int64_t n, int64_t hv);
    /* chunkwise forward of item (n, hv); work: simd_chunk_work_floats(...) floats.
     * save (or NULL): nchunks x simd_chunk_save_floats(...) floats, where the state
     * entering each chunk and the chunk's matrices are kept for the backward */
    void (*chunk_fwd)(const simd_job *J, int64_t n, int64_t hv, float *work, float *save);
    /* chunkwise backward of item (n, hv), with save filled by chunk_fwd */
    void (*chunk_bwd)(const simd_job *J, int64_t n, int64_t hv, float *work, float *save);
} simd_kernels;

/* floats of recurrent-forward scratch for one thread: the state as K x 32 slabs, the
 * per-token scalars of a group of 64 tokens, per-slab accumulators and scales */
static inline int64_t simd_rec_work_floats(int64_t K, int64_t V)
{
    const int64_t nb = (V + SIMD_COLS - 1) / SIMD_COLS;
    return nb * K * SIMD_COLS + 5 * 64 + 2 * nb * SIMD_COLS + nb + 16;
}

/* floats of chunk scratch for one thread (rounded per buffer to 16 floats) */
static inline int64_t simd_chunk_work_floats(int64_t C, int64_t K, int64_t V)
{
    const int64_t r = 16, CC = C * C + r, CK = C * K + r, CV = C * V + r, KV = K * V + r;
    return 8 * CC + 10 * CK + 8 * CV + 4 * KV + 8 * (C + r);
}

/* floats kept per chunk between the chunkwise forward and backward (kernels.c point_saved) */
static inline int64_t simd_chunk_save_floats(int64_t C, int64_t K, int64_t V)
{
    const int64_t r = 16;
    return K * V + r + 3 * (C * K + r) + 2 * (C * V + r) + 4 * (C * C + r) + 3 * (C + r);
}

extern const simd_kernels kla_simd_kernels_c;
#if defined(__x86_64__)
extern const simd_kernels kla_simd_kernels_avx2;
extern const simd_kernels kla_simd_kernels_avx512;
#endif
#if defined(__aarch64__)
extern const simd_kernels kla_simd_kernels_neon;
#endif

#endif
