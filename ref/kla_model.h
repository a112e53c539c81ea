/*
 * kla_model.h: the training step's reference (ref/kla_model.c) for the library's glue
 * (src/model.c) and tests. ref/kla_model.c is compiled three times: float (_f32) and
 * double (_f64) plain loops, and float with OpenBLAS and OpenMP (_fast) where built.
 *
 * Parameters live in one block, in the order of kla_mparams() below (fla's names,
 * kla-spec.md section 8.3); gradients and the AdamW moments use the same layout.
 */
#ifndef KLA_MODEL_H
#define KLA_MODEL_H

#include <stdint.h>

#include "kla.h"

/* The sizes of a model (kla-spec.md 8.2), or of one mixer layer alone (8.1). */
typedef struct kla_mdims {
    int64_t vocab, d, L, H, dk, dv, F; /* L blocks, H heads, F the MLP width */
    double norm_eps;
    int mixer;      /* KLA_MIXER_KLA or KLA_MIXER_GDN */
    int layer_only; /* one mixer: parameters attn.*, no embedding, norms or MLP */
    int threads;    /* the fast path's OpenMP and OpenBLAS threads (KlaParams.threads; 0: all) */
} kla_mdims;

/* Parameters of one block, in their order within the block. */
enum {
    P_ATTN_NORM, P_WQ, P_WK, P_WV, P_WA, P_WB, P_BB, P_WG, P_WO, P_CQ, P_CK, P_CV, P_ALOG, P_DT,
    P_ONORM, P_MLP_NORM, P_W1, P_W2, P_W3, NBLOCK_P
};
/* The mixer's own parameters are P_WQ .. P_ONORM. */
#define P_MIXER_FIRST P_WQ
#define P_MIXER_LAST P_ONORM

typedef struct kla_mparam {
    char name[96];
    int ndim;
    int64_t shape[3];
    int64_t numel, offset; /* elements, and the first one's index in the block */
} kla_mparam;

/* The parameter table: writes up to max entries, returns the count (the model: the
 * embedding, L blocks of NBLOCK_P, the final norm; a layer: the mixer's 14). Total
 * elements in *total. */
int kla_mparams(const kla_mdims *m, kla_mparam *out, int max, int64_t *total);

/* Index of a parameter of block l (or of the layer: l = 0) in the table. */
int kla_mparam_index(const kla_mdims *m, int l, int which);

/* A workspace kept by the caller between calls: the activations and scratch of a step
 * come from it (zeroed), so that a training loop does not map and fault in fresh pages
 * every step. It grows to the largest call's need; kla_ws_free releases it. */
typedef struct kla_ws {
    unsigned char *base;
    size_t cap, used, need; /* need: this call's total, to grow to */
    void **extra;           /* allocations beyond cap in this call */
    int nextra, capextra;
} kla_ws;
void kla_ws_free(kla_ws *ws);

/* Sequences of a call: [N + 1] offsets into the B*T rows (cu_seqlens, or B rows of T). */
typedef struct kla_mseqs {
    const int64_t *cu;
    int64_t N;
} kla_mseqs;

#define KLA_MODEL_DECLARE(R, sfx)                                                              \
    /* one mixer layer: y = mixer(x) for x [rows, d]; with dy, the gradients of sum(dy * y): \
     * dx and dw (accumulated into, zero them first). w, dw: the layer's block. */           \
    int kla_layer_backward_##sfx(const kla_mdims *m, const R *w, R *dw, const kla_mseqs *s,   \
                                 const R *x, const R *dy, R *y, R *dx, KlaContext *op,        \
                                 kla_ws *ws);                                                 \
    /* forward and loss of the model on ids, labels [B, T] (label -100: ignored); with      \
     * grad != NULL also the backward (grad zeroed here). labelled_only: the head only at   \
     * labelled rows (same loss and gradients, and so no accuracy over all rows).           \
     * loss: the mean cross-entropy; correct: argmax == label count; nlab: labels. */       \
    int kla_model_loss_##sfx(const kla_mdims *m, const R *w, R *grad, int64_t B, int64_t T,  \
                             const int64_t *ids, const int64_t *labels, int labelled_only,   \
                             KlaContext *op, kla_ws *ws, double *loss, int64_t *correct,     \
                             int64_t *nlab);                                                 \
    /* sum of squares of g [n], in double */                                                 \
    double kla_sumsq_##sfx(const R *g, int64_t n);                                           \
    /* one AdamW step (PyTorch's) on n parameters with gradients already scaled by clip_scale \
     * applied here: g * clip_scale. step counts from 1. */                                  \
    void kla_adamw_##sfx(R *p, const R *g, R *mo, R *ve, int64_t n, int64_t step, double lr,  \
                         double beta1, double beta2, double eps, double wd, double clip_scale);

KLA_MODEL_DECLARE(float, f32)
KLA_MODEL_DECLARE(double, f64)
KLA_MODEL_DECLARE(float, fast)

#endif
