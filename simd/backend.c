/*
 * backend.c: the "simd" backend's dispatch-table entry (compiled for baseline x86-64 /
 * aarch64): picks a kernel table for the CPU level, splits a call into independent work
 * items and runs them with OpenMP, and does the O(T K) parts of the backward (grouped
 * head reduction, l2norm and step-size gradients).
 *
 * Level: the best of kla_cpu_flags() & KlaParams.cpu_mask (which kla_open has narrowed
 * by $KLA_CPU_MASK: a number of KLA_CPU_* bits or names, "avx2", "none", ...);
 * KLA_CPU_MASK=none forces the plain C kernels. kla_describe() shows the level in effect.
 *
 * Threads: KlaParams.threads (0 = all cores, OpenMP's default). Work items are
 * (sequence, value head) pairs; no two items write the same output element and every
 * reduction runs in a fixed order inside one item (value heads sharing a key head write
 * separate dq/dk buffers, summed per token in head order afterwards), so results are
 * bit-identical for any thread count. Finer items where pairs are few: the recurrent
 * forward splits a pair's state by columns; the chunkwise forward and the backward, with
 * fewer pairs than threads, prepare all chunks in parallel (and the backward runs the
 * part of each chunk that does not depend on the state gradient in parallel), and split
 * the state pass by columns (chunk_fwd_split); decode splits the states into equal
 * ranges of column blocks, one per thread. Each split computes every output element with
 * the same operations in the same order, so the bits stay independent of the threads.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kla_internal.h"
#include "simd_kernels.h"

#ifdef _OPENMP
#define OMP(x) _Pragma(#x)
#else
#define OMP(x)
#endif

typedef struct simd_state {
    const simd_kernels *kern;
    int threads;
    float *scratch; /* per-thread work areas, kept between calls: large blocks malloc'ed */
    int64_t cap;    /* and freed per call cost mmap, page faults and TLB shootdowns */
} simd_state;

/* The kernel table for the allowed levels. */
static const simd_kernels *pick_level(unsigned mask)
{
    mask &= kla_cpu_flags();
#if defined(__x86_64__)
    if (mask & KLA_CPU_AVX512) return &kla_simd_kernels_avx512;
    if (mask & KLA_CPU_AVX2) return &kla_simd_kernels_avx2;
#elif defined(__aarch64__)
    if (mask & KLA_CPU_NEON) return &kla_simd_kernels_neon;
#endif
    return &kla_simd_kernels_c;
}

static int usable(void) { return 1; } /* the C level runs anywhere */

static int simd_open(void **state, const KlaParams *params, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    simd_state *s = calloc(1, sizeof *s);
    if (!s) return KLA_ENOMEM;
    s->kern = pick_level(params->cpu_mask);
    s->threads = params->threads;
    *state = s;
    return 0;
}

static void simd_describe(void *state, char *buf, size_t len)
{
    const simd_state *s = state;
    int nt = s->threads;
#ifdef _OPENMP
    if (nt <= 0) nt = omp_get_max_threads();
#else
    nt = 1;
#endif
    snprintf(buf, len, "%s, %d thread%s", s->kern->name, nt, nt == 1 ? "" : "s");
}

static void simd_close(void *state)
{
    simd_state *s = state;
    if (s) free(s->scratch);
    free(s);
}

static int nthreads(const simd_state *s, const kla_problem *p)
{
    int n = p->threads > 0 ? p->threads : s->threads;
#ifdef _OPENMP
    if (n <= 0) n = omp_get_max_threads();
#else
    n = 1;
#endif
    return n;
}

static float *alloc_floats(int64_t n)
{
    if (n <= 0) n = 1;
    if ((uint64_t)n > SIZE_MAX / sizeof(float) - 64) return NULL;
    return aligned_alloc(64, ((size_t)n * sizeof(float) + 63) / 64 * 64);
}

/* nt slices of `each` floats (rounded to 64 bytes) from the context's cached scratch */
static float *scratch(simd_state *s, int nt, int64_t *each)
{
    *each = (*each + 15) / 16 * 16;
    const int64_t need = *each * nt;
    if (need > s->cap) {
        free(s->scratch);
        s->scratch = alloc_floats(need);
        s->cap = s->scratch ? need : 0;
    }
    return s->scratch;
}

static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Which algorithm AUTO runs. The recurrent kernel does 3 FMA per state element and
 * token on a K x 32 slab in L1; the chunkwise one does about as many FLOPs through small
 * GEMMs, plus their overheads. Measured (docs/benchmarks.md, "Which algorithm"): the
 * recurrent forward was faster for K, V from 32 to 256 and chunk sizes 16 to 128 on the
 * 2-core AVX-512 machine, and with AVX-512 on the 16-core one, so AUTO is recurrent. */
static int pick_algo(int algo, const kla_problem *p)
{
    (void)p;
    return algo == KLA_ALGO_AUTO ? KLA_ALGO_RECURRENT : algo;
}

static int64_t nchunks(const kla_problem *p, int64_t n)
{
    return (p->cu[n + 1] - p->cu[n] + p->chunk - 1) / p->chunk;
}

/* column ranges for splitting a state pass over threads: `split` ranges of `per` slabs of
 * SIMD_COLS columns (the last one shorter), enough that pairs x ranges >= threads */
static void col_split(const kla_problem *p, int64_t nh, int nt, int64_t *split, int64_t *per)
{
    const int64_t nb = (p->V + SIMD_COLS - 1) / SIMD_COLS;
    int64_t sp = (nt + nh - 1) / nh;
    if (sp > nb) sp = nb;
    if (sp < 1) sp = 1;
    *per = (nb + sp - 1) / sp;
    *split = (nb + *per - 1) / *per;
}

static void col_range(const kla_problem *p, int64_t r, int64_t per, int64_t *j0, int64_t *j1)
{
    *j0 = r * per * SIMD_COLS;
    *j1 = (r + 1) * per * SIMD_COLS < p->V ? (r + 1) * per * SIMD_COLS : p->V;
}

/*
 * Chunkwise forward with fewer (sequence, head) pairs than threads. Once a chunk's
 * state-independent part is prepared (chunk_prep: KK^T, A, the forward substitutions for
 * w and u, P), the columns of the state evolve independently. So, in windows of wc chunks
 * per pair (the prepared blocks stay a bounded size): all threads prepare the window's
 * (pair, chunk) items, then all threads advance (pair, column range) items of the state
 * through the window. The same code prepares a chunk on either path, and gemm() computes
 * each column the same way for any column range starting at a multiple of SIMD_COLS, so
 * the results are bit-identical to the plain path's and for any thread count.
 */
static int chunk_fwd_split(simd_state *s, const simd_job *J, int nt)
{
    const kla_problem *p = J->p;
    const simd_kernels *kern = s->kern;
    const int64_t nh = p->N * p->HV, C = p->chunk, K = p->K, V = p->V;
    int64_t maxch = 0, split, per;
    for (int64_t n = 0; n < p->N; n++)
        if (nchunks(p, n) > maxch) maxch = nchunks(p, n);
    col_split(p, nh, nt, &split, &per);
    /* windows of at least 8 chunks per thread and 16 per pair: each window costs two
     * barriers, where a thread that the OS has descheduled holds up all the others */
    int64_t wc = (8 * (int64_t)nt + nh - 1) / nh;
    if (wc < 16) wc = 16;
    if (wc > maxch) wc = maxch > 0 ? maxch : 1;
    const int64_t wsz = (simd_chunk_work_floats(C, K, V) + 15) / 16 * 16;
    const int64_t ssz = simd_chunk_save_floats(C, K, V), kv = (K * V + 15) / 16 * 16;
    int64_t total = nt * wsz + nh * wc * ssz + nh * kv;
    float *buf = scratch(s, 1, &total);
    if (!buf) return KLA_ENOMEM;
    float *save = buf + nt * wsz, *states = save + nh * wc * ssz;
    OMP(omp parallel num_threads(nt))
    {
        float *work = buf + thread_id() * wsz;
        for (int64_t c0 = 0; c0 < (maxch > 0 ? maxch : 1); c0 += wc) {
            OMP(omp for schedule(dynamic, 1))
            for (int64_t it = 0; it < nh * wc; it++) {
                const int64_t pair = it / wc, c = c0 + it % wc, n = pair / p->HV;
                if (c < nchunks(p, n)) kern->chunk_prep(J, n, pair % p->HV, c, work, save + it * ssz);
            }
            OMP(omp for schedule(dynamic, 1))
            for (int64_t it = 0; it < nh * split; it++) {
                const int64_t pair = it / split, n = pair / p->HV, nc = nchunks(p, n);
                const int64_t c1 = c0 + wc < nc ? c0 + wc : nc;
                int64_t j0, j1;
                col_range(p, it % split, per, &j0, &j1);
                if (c0 == 0 || c0 < nc)
                    kern->chunk_fwd(J, n, pair % p->HV, c0, c1, j0, j1, states + pair * kv, work,
                                    save + pair * wc * ssz, SIMD_PREPARED);
            }
        }
    }
    return 0;
}

static int simd_forward(void *state, const kla_problem *p, kla_io *x)
{
    simd_state *s = state;
    const simd_kernels *kern = s->kern;
    const simd_job J = { .p = p, .q = x->q, .k = x->k, .v = x->v, .g = x->g, .a = x->a, .h0 = x->h0,
                         .o = x->o, .ht = x->ht };
    x->algo = pick_algo(x->algo, p);
    const int nt = nthreads(s, p), rec = x->algo == KLA_ALGO_RECURRENT;
    const int64_t nh = p->N * p->HV, nb = (p->V + SIMD_COLS - 1) / SIMD_COLS;
    if (!rec && nh < nt) return chunk_fwd_split(s, &J, nt);
    /* recurrent: with fewer than 4 (sequence, head) pairs per thread, split each pair's
     * state into column ranges too, so that one slow thread weighs less */
    int64_t split = rec ? (4 * (int64_t)nt + nh - 1) / nh : 1;
    if (split > nb) split = nb;
    const int64_t per = (nb + split - 1) / split;
    split = (nb + per - 1) / per;
    const int64_t items = nh * split;
    int64_t each = rec ? simd_rec_work_floats(p->K, p->V) : simd_chunk_work_floats(p->chunk, p->K, p->V);
    float *buf = scratch(s, nt, &each);
    if (!buf) return KLA_ENOMEM;
    OMP(omp parallel for num_threads(nt) schedule(dynamic, 1))
    for (int64_t it = 0; it < items; it++) {
        float *work = buf + thread_id() * each;
        const int64_t pair = it / split, b0 = it % split * per, b1 = b0 + per < nb ? b0 + per : nb;
        const int64_t n = pair / p->HV, hv = pair % p->HV;
        if (rec) kern->rec_fwd(&J, n, hv, b0, b1, work);
        else kern->chunk_fwd(&J, n, hv, 0, nchunks(p, n), 0, p->V, NULL, work, NULL, 0);
    }
    return 0;
}

static int simd_decode(void *state, const kla_problem *p, kla_io *x)
{
    const simd_state *s = state;
    const simd_kernels *kern = s->kern;
    const simd_job J = { .p = p, .q = x->q, .k = x->k, .v = x->v, .g = x->g, .a = x->a, .o = x->o,
                         .ht = x->state };
    /* units of decode_cols columns of one state, split into equal contiguous ranges (one
     * per thread: the kernel pipelines the units of its range); no more threads than
     * units, none at all for one unit */
    const int64_t units = p->N * p->HV * ((p->V + kern->decode_cols - 1) / kern->decode_cols);
    int64_t nt = nthreads(s, p);
    if (nt > units) nt = units;
    if (nt <= 1) {
        kern->decode(&J, 0, units);
        return 0;
    }
    OMP(omp parallel num_threads((int)nt))
    {
        const int64_t t = thread_id();
        kern->decode(&J, units * t / nt, units * (t + 1) / nt);
    }
    return 0;
}

static int simd_backward(void *state, const kla_problem *p, kla_io *x)
{
    x->algo = KLA_ALGO_CHUNK; /* one backward: chunkwise (it agrees with the recurrent definition) */
    const void *q_ = x->q, *k_ = x->k, *v = x->v, *g = x->g, *a_ = x->a, *h0 = x->h0;
    const void *dout = x->dout, *dht = x->dht;
    void *o = x->o, *ht = x->ht, *dq_ = x->dq, *dk_ = x->dk, *dv = x->dv, *dg = x->dg, *da_ = x->da;
    void *dh0 = x->dh0;
    simd_state *s = state;
    const simd_kernels *kern = s->kern;
    const int64_t T = p->total, H = p->H, HV = p->HV, K = p->K, G = HV / H;
    const float *q = q_, *k = k_, *a = a_;
    float *dq = dq_, *dk = dk_, *da = da_;
    /* gradients w.r.t. qhat, khat per value head; with one value head per key head they
     * go straight into dq, dk (transformed in place below) */
    float *dqv = G == 1 ? dq : calloc((size_t)(T * HV * K) + 1, sizeof(float));
    float *dkv = G == 1 ? dk : calloc((size_t)(T * HV * K) + 1, sizeof(float));
    float *dgb = dg ? dg : malloc((size_t)(T * HV + 1) * sizeof(float));
    if (G == 1) {
        memset(dq, 0, (size_t)(T * H * K) * sizeof(float));
        memset(dk, 0, (size_t)(T * H * K) * sizeof(float));
    }
    if (!dqv || !dkv || !dgb) {
        if (G > 1) free(dqv), free(dkv);
        if (!dg) free(dgb);
        return KLA_ENOMEM;
    }
    const simd_job J = { .p = p, .q = q, .k = k, .v = v, .g = g, .a = a, .h0 = h0, .o = o,
                         .ht = ht, .dout = dout, .dht = dht, .dqv = dqv, .dkv = dkv,
                         .dv = dv, .dg = dgb, .dbeta = da, .dh0 = dh0 };
    const int nt = nthreads(s, p);
    const int64_t items = p->N * HV, C = p->chunk;
    int64_t maxch = 1;
    for (int64_t n = 0; n < p->N; n++)
        if (nchunks(p, n) > maxch) maxch = nchunks(p, n);
    const int64_t wsz = (simd_chunk_work_floats(C, K, p->V) + 15) / 16 * 16;
    const int64_t ssz = simd_chunk_save_floats(C, K, p->V);
    int fail;
    if (items < nt) {
        /* fewer pairs than threads: all threads prepare the chunks (chunk_prep) of all
         * pairs, then run the forward state pass by (pair, column range) as
         * chunk_fwd_split does, keeping the state entering each chunk; then each pair's
         * backward. Bit-identical to the other path, for the reasons given there. */
        int64_t split, per;
        col_split(p, items, nt, &split, &per);
        const int64_t kv = (K * p->V + 15) / 16 * 16, psz = simd_chunk_pre_floats(C, K, p->V);
        int64_t total = nt * wsz + items * maxch * (ssz + psz) + items * kv;
        float *buf = scratch(s, 1, &total);
        fail = !buf;
        float *save = buf ? buf + nt * wsz : NULL, *states = save ? save + items * maxch * ssz : NULL;
        float *pre = states ? states + items * kv : NULL;
        OMP(omp parallel num_threads(nt) if (buf))
        {
            float *work = buf + thread_id() * wsz;
            OMP(omp for schedule(dynamic, 1))
            for (int64_t it = 0; it < (buf ? items * maxch : 0); it++) {
                const int64_t pair = it / maxch, c = it % maxch, n = pair / HV;
                if (c < nchunks(p, n)) kern->chunk_prep(&J, n, pair % HV, c, work, save + it * ssz);
            }
            OMP(omp for schedule(dynamic, 1))
            for (int64_t it = 0; it < (buf ? items * split : 0); it++) {
                const int64_t pair = it / split, n = pair / HV;
                int64_t j0, j1;
                col_range(p, it % split, per, &j0, &j1);
                kern->chunk_fwd(&J, n, pair % HV, 0, nchunks(p, n), j0, j1, states + pair * kv, work,
                                save + pair * maxch * ssz, SIMD_PREPARED | SIMD_KEEP_S0);
            }
            /* the backward's part that does not depend on dS, every chunk in parallel */
            OMP(omp for schedule(dynamic, 1))
            for (int64_t it = 0; it < (buf ? items * maxch : 0); it++) {
                const int64_t pair = it / maxch, c = it % maxch, n = pair / HV;
                if (c < nchunks(p, n))
                    kern->chunk_bwd_pre(&J, n, pair % HV, c, work, save + it * ssz, pre + it * psz);
            }
            OMP(omp for schedule(dynamic, 1))
            for (int64_t it = 0; it < (buf ? items : 0); it++)
                kern->chunk_bwd(&J, it / HV, it % HV, work, save + it * maxch * ssz, pre + it * maxch * psz);
        }
    } else {
        int64_t each = wsz + maxch * ssz;
        float *buf = scratch(s, nt, &each);
        fail = !buf;
        OMP(omp parallel for num_threads(nt) schedule(dynamic, 1))
        for (int64_t it = 0; it < (buf ? items : 0); it++) {
            float *work = buf + thread_id() * each, *save = work + wsz;
            const int64_t n = it / HV;
            kern->chunk_fwd(&J, n, it % HV, 0, nchunks(p, n), 0, p->V, NULL, work, save, SIMD_KEEP_S0);
            kern->chunk_bwd(&J, n, it % HV, work, save, NULL);
        }
    }
    if (!fail) {
        /* per token: sum the value heads of each key head in a fixed order, then the
         * step-size and l2norm gradients (ref/kla_ref.c prepare_backward) */
        float *rows = alloc_floats((int64_t)nt * 2 * K);
        if (!rows) fail = 1;
        OMP(omp parallel for num_threads(nt) schedule(static))
        for (int64_t t = 0; t < (rows ? T : 0); t++) {
#ifdef _OPENMP
            float *khat = rows + (int64_t)omp_get_thread_num() * 2 * K, *dkhat = khat + K;
#else
            float *khat = rows, *dkhat = khat + K;
#endif
            for (int64_t h = 0; h < H; h++) {
                const float *qr = q + (t * H + h) * K, *kr = k + (t * H + h) * K;
                float *dqr = dq + (t * H + h) * K, *dkr = dk + (t * H + h) * K;
                float kk = 0, qq = 0;
                for (int64_t i = 0; i < K; i++) kk += kr[i] * kr[i], qq += qr[i] * qr[i];
                const float rk = p->l2norm_k ? sqrtf(kk + 1e-6f) : 1.0f;
                const float rq = p->l2norm_q ? sqrtf(qq + 1e-6f) : 1.0f;
                for (int64_t i = 0; i < K; i++) khat[i] = kr[i] / rk;
                const float nk = p->l2norm_k ? kk / (rk * rk) + (float)p->eps : kk + (float)p->eps;
                for (int64_t i = 0; i < K; i++) dkhat[i] = 0;
                if (G > 1)
                    for (int64_t i = 0; i < K; i++) dqr[i] = 0;
                float ckh = 0; /* sum over the group of the KLA step-size term */
                for (int64_t hv = h * G; hv < (h + 1) * G; hv++) {
                    const float *dqs = dqv + (t * HV + hv) * K, *dks = dkv + (t * HV + hv) * K;
                    for (int64_t i = 0; i < K; i++) dkhat[i] += dks[i];
                    if (G > 1)
                        for (int64_t i = 0; i < K; i++) dqr[i] += dqs[i];
                    const int64_t tv = t * HV + hv;
                    if (p->mode == KLA_MODE_KLA) {
                        /* beta = eta / nk:  deta = dbeta / nk;  dkhat += -2 dbeta eta / nk^2 khat */
                        ckh += -2 * da[tv] * a[tv] / (nk * nk);
                        da[tv] = da[tv] / nk;
                    }
                }
                for (int64_t i = 0; i < K; i++) dkhat[i] += ckh * khat[i];
                if (p->l2norm_q) { /* dq = (dqhat - qhat (qhat . dqhat)) / rq */
                    float sd = 0;
                    for (int64_t i = 0; i < K; i++) sd += qr[i] / rq * dqr[i];
                    for (int64_t i = 0; i < K; i++) dqr[i] = (dqr[i] - qr[i] / rq * sd) / rq;
                }
                if (p->l2norm_k) {
                    float sd = 0;
                    for (int64_t i = 0; i < K; i++) sd += khat[i] * dkhat[i];
                    for (int64_t i = 0; i < K; i++) dkr[i] = (dkhat[i] - khat[i] * sd) / rk;
                } else {
                    memcpy(dkr, dkhat, (size_t)K * sizeof(float));
                }
            }
        }
        free(rows);
    }
    if (G > 1) free(dqv), free(dkv);
    if (!dg) free(dgb);
    return fail ? KLA_ENOMEM : 0;
}

const kla_backend kla_backend_simd = { .name = "simd", .real = KLA_F32, .usable = usable,
                                       .open = simd_open, .close = simd_close,
                                       .describe = simd_describe, .forward = simd_forward,
                                       .backward = simd_backward, .decode = simd_decode };
