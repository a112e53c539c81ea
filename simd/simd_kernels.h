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
#define SIMD_PREPARED 1 /* chunk_fwd flags */
#define SIMD_KEEP_S0 2

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
    /* one token, units u0 .. u1-1 of the states in place (J->ht is the state array); a
     * unit is a block of decode_cols columns of one item (n HV + hv): unit u is item
     * u / nbu, columns u % nbu * decode_cols .., nbu = ceil(V / decode_cols) */
    void (*decode)(const simd_job *J, int64_t u0, int64_t u1);
    int decode_cols;
    /* the state-independent part of chunk c of item (n, hv) (Qc, Kc, KK^T, A, the
     * forward substitutions for w and u, P, decays, step sizes) into save_c, one chunk's
     * saved block; chunks are independent, so they can be prepared in parallel */
    void (*chunk_prep)(const simd_job *J, int64_t n, int64_t hv, int64_t c, float *work, float *save_c);
    /* chunkwise forward of item (n, hv), chunks c0 .. c1-1, state columns j0 .. j1-1
     * (columns evolve independently once the chunks are prepared; j0 a multiple of
     * SIMD_COLS, so that gemm() blocks each column as a whole-V call does and any split
     * gives the same bits), with the state in S (K x V; NULL: kept in work). c0 == 0 loads
     * h0 into S; c1 >= the item's chunk count writes ht. work: simd_chunk_work_floats(...)
     * floats. save (or NULL): the saved blocks of chunks c0 .. c1-1
     * (simd_chunk_save_floats(...) floats each): SIMD_PREPARED: filled by chunk_prep
     * (required when j0 .. j1 is not all of V); SIMD_KEEP_S0: the state entering each
     * chunk is kept there too, for the backward */
    void (*chunk_fwd)(const simd_job *J, int64_t n, int64_t hv, int64_t c0, int64_t c1, int64_t j0,
                      int64_t j1, float *S, float *work, float *save, int flags);
    /* the part of chunk c's backward that does not depend on the state gradient (dq of
     * its tokens, dk's first term, and pre_c: simd_chunk_pre_floats), from the chunk's
     * saved block save_c filled by chunk_fwd (SIMD_KEEP_S0); chunks are independent */
    void (*chunk_bwd_pre)(const simd_job *J, int64_t n, int64_t hv, int64_t c, float *work,
                          float *save_c, float *pre_c);
    /* chunkwise backward of item (n, hv), with save filled by chunk_fwd (SIMD_KEEP_S0) and
     * pre by chunk_bwd_pre for every chunk, or NULL (then computed here, chunk by chunk) */
    void (*chunk_bwd)(const simd_job *J, int64_t n, int64_t hv, float *work, float *save, float *pre);
} simd_kernels;

/* floats of recurrent-forward scratch for one thread: the state as K x 32 slabs, the
 * per-token scalars of a group of 64 tokens, per-slab accumulators and scales */
static inline int64_t simd_rec_work_floats(int64_t K, int64_t V)
{
    const int64_t nb = (V + SIMD_COLS - 1) / SIMD_COLS;
    return nb * K * SIMD_COLS + 5 * 64 + 2 * nb * SIMD_COLS + nb + 16;
}

/* floats kept per chunk between chunk_bwd_pre and chunk_bwd: a K x V term of dS, a
 * C x V term of dvnew, C terms of dG */
static inline int64_t simd_chunk_pre_floats(int64_t C, int64_t K, int64_t V)
{
    return K * V + 16 + C * V + 16 + C + 16;
}

/* floats of chunk scratch for one thread (rounded per buffer to 16 floats), the last
 * simd_chunk_pre_floats of them for chunk_bwd's own pre block */
static inline int64_t simd_chunk_work_floats(int64_t C, int64_t K, int64_t V)
{
    const int64_t r = 16, CC = C * C + r, CK = C * K + r, CV = C * V + r, KV = K * V + r;
    return 8 * CC + 10 * CK + 8 * CV + 4 * KV + 8 * (C + r) + simd_chunk_pre_floats(C, K, V);
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
