/*
 * golden.c: the golden vectors (docs/golden.md).
 *   kla golden generate DIR    writes every case of the table below and DIR/MANIFEST.json
 *   kla golden check [--backend B] [--cases GLOB] [--dir DIR]
 *                              runs a backend on every case and compares
 *
 * Inputs come from splitmix64 streams through exact transforms (section 1), so they can
 * be regenerated bit for bit in any language; expected outputs and gradients are those
 * of the float64 reference (backend ref64, recurrent algorithm).
 */
#include "golden.h"
#include "golden_train.h"

#include <dirent.h>
#include <errno.h>
#include <fnmatch.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "half.h"
#include "kla.h"
#include "safetensors.h"
#include "sha256.h"
#include "verify.h"

/* ---- 1. inputs: splitmix64 and the transforms ---------------------------------------- */

/* splitmix64 (Steele, Lea, Flood 2014), as in Java's SplittableRandom. */
static uint64_t sm64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* u in [0, 1): the top 24 bits of one draw, times 2^-24 (exact in float32). */
static double unif(uint64_t *s) { return (double)(sm64(s) >> 40) * 0x1p-24; }

/* Tensor ids: the stream of tensor X in a case with seed S starts at state 16*S + id. */
enum { I_Q, I_K, I_V, I_G, I_E, I_H0, I_CU, I_DO, I_DHT, I_GATK, I_BATK, I_LATK, I_A0, I_DAT, NIN };
/* forward outputs first (o, ht, at), then the gradients */
enum { O_O, O_HT, O_AT, O_DQ, O_DK, O_DV, O_DG, O_DE, O_DH0, O_DGATK, O_DBATK, O_DLATK, O_DA0, NOUT };
static const int stream_id[NIN] = { 1, 2, 3, 4, 5, 6, 0, 7, 8, 9, 10, 11, 12, 13 };

/* g: -u/2; absent; 0; -20 at every 3rd element; -5u (down to -5 per step) */
enum { G_RAND, G_ABSENT, G_ZERO, G_STRONG, G_M5 };
enum { E_RAND, E_ONE, E_SMALL };             /* eta: 1/4 + 5u/4; 1; 2^-10 (1 + u) */
enum { KEY_RAND, KEY_NORMS };                /* k rows: as drawn; scaled by row_scale */

/* KEY_NORMS: row r = (b*T + t)*H + h of k is multiplied by row_scale[r % 8]. */
static const double row_scale[8] = { 1, 0x1p-12, 0x1p5, 0, 0x1p-8, 1, 0x1p3, 0x1p-4 };

typedef struct GCase {
    const char *tag;  /* name suffix, or NULL */
    const char *what; /* what the case exercises */
    int gdn, B, T, H, HV, K, V;
    int nseq, seqlens[6], cu64; /* cu_seqlens from these lengths (B = 1), I64 if cu64 */
    int h0, dht, l2q, l2k, vk;
    double scale;         /* 0: K^-1/2 */
    double eps;           /* used when eps_set, else 1e-6 */
    int eps_set;
    int g, eta, key;
    int readable;         /* values on a grid of 1/4 */
    int spec6;            /* the hand example of kla-spec.md section 6 */
    /* the family (kla-spec.md section 7) */
    int chan;             /* gate channel: g [B, T, HV, K] */
    int atk;              /* precond atk: beta_atk, and these optional inputs: */
    int gatk, latk, a0, dat; /* g_atk, log_atk_scale, a0, dat present */
    double sqx, sqe;      /* squash_x, squash_eps (0: the defaults 1.5, 1e-6) */
    const struct Fixed *fixed; /* a worked example of notes/delta-family.md: fixed values */
    int drop;             /* an output not stored (O_*; 0: none), with why: */
    const char *drop_why; /* analytically 0 there, so its float64 value is rounding noise */
    uint64_t seed;
} GCase;

/* The worked examples of notes/delta-family.md (T = 2, K = 2, V = 1, one head), as
 * float64 values rounded to the files' float32 (so the notes' numbers are met to about
 * 1e-7; their l2norm is fla's x / ||x||, the spec's x / sqrt(||x||^2 + 1e-6) moves them
 * by a few 1e-8). NULL: absent. */
typedef struct Fixed {
    const double *v[NIN];
} Fixed;
#define E1 0.36787944117144233 /* 1/e */
#define EE 7.3890560989306502  /* e^2 */
/* section 1.8: KDA, and its Kaczmarz form (eta = (1, 0.8), eps = 0) */
static const double k18_q[] = { 1, 0, 1, 1 }, k18_k[] = { 1, 1, 1, 0 }, k18_v[] = { 2, 3 },
                    k18_g[] = { 0, -0.69314718055994531, -0.69314718055994531, -1.3862943611198906 },
                    k18_b[] = { 0.5, 0.8 }, k18_e[] = { 1, 0.8 }, k18_do[] = { 1, 1 }, k18_dht[] = { 0.5, 2 };
static const Fixed ex_kda18 = { { k18_q, k18_k, k18_v, k18_g, k18_b, NULL, NULL, k18_do, k18_dht } };
static const Fixed ex_kda18k = { { k18_q, k18_k, k18_v, k18_g, k18_e, NULL, NULL, k18_do, k18_dht } };
/* EX2: PGDN by hand (x = 4, c = 0, scale 1), and EX2K: its Kaczmarz form (eta = 1, eps = 0) */
static const double e2_q[] = { 1, 0, 0.6, 0.8 }, e2_v[] = { 3, 1 }, e2_g[] = { 0, -0.69314718055994531 },
                    e2_b[] = { 0.5, 0.5 }, e2_e[] = { 1, 1 }, e2_ga[] = { -1, 0 }, e2_ba[] = { E1, 0 },
                    e2_c[] = { 0 }, e2_a0[] = { 0, EE }, e2_do[] = { 1, 1 }, e2k_do[] = { 0, 0 },
                    e2k_dht[] = { 1, 0 };
static const Fixed ex_e2 = { { e2_q, e2_q, e2_v, e2_g, e2_b, NULL, NULL, e2_do, NULL, e2_ga, e2_ba, e2_c, e2_a0 } };
/* EX2K's gradients: L = ht[0] (do = 0, dht = (1, 0)), docs/algorithm.md 13.3's table */
static const Fixed ex_e2k = { { e2_q, e2_q, e2_v, e2_g, e2_e, NULL, NULL, e2k_do, e2k_dht, e2_ga, e2_ba, e2_c,
                                e2_a0 } };
/* EX3 (PGDN, fla's defaults), EX4 (PKDA: EX3 with a per-channel g), EX5 and EX6 (EX3 with
 * eta = (0.7, 0.4) in mode kla, l2norm on q and k, or on q only) */
static const double e3_q[] = { 1, 2, -1, 0.5 }, e3_k[] = { 2, 1, 1, -3 }, e3_v[] = { 1, -2 },
                    e3_g[] = { -0.10536051565782628, -0.69314718055994531 },
                    e3_g4[] = { -0.10536051565782628, -0.35667494393873238, -0.69314718055994531,
                                -0.051293294387550578 },
                    e3_b[] = { 0.7, 0.4 }, e3_h0[] = { 0.1, -0.2 },
                    e3_ga[] = { -0.22314355131420976, -0.51082562376599068 }, e3_ba[] = { 0.5, 0.9 },
                    e3_c[] = { -0.2 }, e3_a0[] = { 0.3, 0.05 }, e3_do[] = { 1, -0.5 }, e3_dht[] = { 0.3, -0.2 };
static const Fixed ex_e3 = { { e3_q, e3_k, e3_v, e3_g, e3_b, e3_h0, NULL, e3_do, e3_dht, e3_ga, e3_ba, e3_c,
                               e3_a0 } };
static const Fixed ex_e4 = { { e3_q, e3_k, e3_v, e3_g4, e3_b, e3_h0, NULL, e3_do, e3_dht, e3_ga, e3_ba, e3_c,
                               e3_a0 } };
#undef E1
#undef EE

/* The set. Names come from the parameters (case_name); seeds are fixed per case. */
static const GCase cases[] = {
    { .tag = "spec6", .what = "the worked example of kla-spec.md section 6 (scale 1, eps 0); "
      "g[1] is ln 0.5 rounded to float32, so o[1] is 0.8125 to 1e-8",
      .B = 1, .T = 2, .H = 1, .HV = 1, .K = 2, .V = 1, .scale = 1, .eps = 0, .eps_set = 1,
      .spec6 = 1 },
    { .tag = "readable", .what = "tiny case with values on a 1/4 grid: h0, dht",
      .B = 1, .T = 3, .H = 1, .HV = 1, .K = 3, .V = 2, .h0 = 1, .dht = 1, .readable = 1,
      .seed = 2 },
    { .tag = "readable", .what = "tiny gdn case on a 1/4 grid, grouped value heads (HV = 2H)",
      .gdn = 1, .B = 1, .T = 3, .H = 1, .HV = 2, .K = 2, .V = 3, .readable = 1, .seed = 3 },
    { .tag = "readable", .what = "T = 1 with two batch rows and h0 (one decode step each)",
      .B = 2, .T = 1, .H = 1, .HV = 1, .K = 2, .V = 2, .h0 = 1, .dht = 1, .readable = 1,
      .seed = 4 },
    { .what = "main kla case: grouped value heads, h0 and dht, T not a multiple of 64",
      .B = 2, .T = 100, .H = 2, .HV = 4, .K = 32, .V = 16, .h0 = 1, .dht = 1, .seed = 5 },
    { .what = "gdn as used in Gated DeltaNet layers: l2norm on q and k, grouped heads, h0",
      .gdn = 1, .B = 2, .T = 100, .H = 2, .HV = 4, .K = 32, .V = 16, .h0 = 1, .dht = 1,
      .l2q = 1, .l2k = 1, .seed = 6 },
    { .tag = "deltanet", .what = "DeltaNet: gdn without g (g = 0), unit keys, no h0, dht",
      .gdn = 1, .B = 2, .T = 70, .H = 2, .HV = 2, .K = 16, .V = 16, .dht = 1, .g = G_ABSENT,
      .seed = 7 },
    { .what = "cu_seqlens (int32) with sequences of 1, 130 (> one chunk), 5 and 64 tokens, h0",
      .B = 1, .T = 200, .H = 2, .HV = 4, .K = 16, .V = 16, .nseq = 4,
      .seqlens = { 1, 130, 5, 64 }, .h0 = 1, .dht = 1, .seed = 8 },
    { .what = "gdn, cu_seqlens (int64) 70, 1, 79, h0 in state layout vk, unit keys",
      .gdn = 1, .B = 1, .T = 150, .H = 1, .HV = 2, .K = 16, .V = 8, .nseq = 3,
      .seqlens = { 70, 1, 79 }, .cu64 = 1, .h0 = 1, .dht = 1, .vk = 1, .seed = 9 },
    { .what = "state layout vk (h0, ht, dht, dh0 as [N, HV, V, K]), K != V",
      .B = 2, .T = 65, .H = 1, .HV = 2, .K = 8, .V = 16, .h0 = 1, .dht = 1, .vk = 1,
      .seed = 10 },
    { .what = "l2norm on q only (the KLA layer), T a multiple of 64",
      .B = 1, .T = 128, .H = 2, .HV = 2, .K = 32, .V = 32, .l2q = 1, .seed = 11 },
    { .what = "l2norm on q and k in mode kla, T = 129",
      .B = 1, .T = 129, .H = 1, .HV = 2, .K = 16, .V = 16, .l2q = 1, .l2k = 1, .dht = 1,
      .seed = 12 },
    { .what = "K = 96, V = 192 (not powers of two), h0",
      .B = 1, .T = 40, .H = 1, .HV = 1, .K = 96, .V = 192, .h0 = 1, .dht = 1, .seed = 13 },
    { .what = "K = V = 128, grouped heads, h0",
      .B = 1, .T = 70, .H = 1, .HV = 2, .K = 128, .V = 128, .h0 = 1, .dht = 1, .seed = 14 },
    { .tag = "knorms", .what = "key norms from 0 (all-zero rows) and 2^-12 (|k|^2 < eps) to 2^5",
      .B = 1, .T = 96, .H = 2, .HV = 2, .K = 16, .V = 16, .key = KEY_NORMS, .dht = 1,
      .seed = 15 },
    { .tag = "g0", .what = "no decay: g present and 0",
      .B = 1, .T = 50, .H = 1, .HV = 2, .K = 16, .V = 16, .h0 = 1, .g = G_ZERO, .seed = 16 },
    { .tag = "gm20", .what = "decay near 0: g = -20 on every third (token, head)",
      .B = 1, .T = 50, .H = 1, .HV = 2, .K = 16, .V = 16, .h0 = 1, .dht = 1, .g = G_STRONG,
      .seed = 17 },
    { .tag = "eta1", .what = "eta = 1: exact Kaczmarz projections",
      .B = 1, .T = 50, .H = 1, .HV = 2, .K = 16, .V = 16, .h0 = 1, .dht = 1, .eta = E_ONE,
      .seed = 18 },
    { .tag = "eta0", .what = "eta near 0 (2^-10 to 2^-9)",
      .B = 1, .T = 50, .H = 1, .HV = 2, .K = 16, .V = 16, .h0 = 1, .dht = 1, .eta = E_SMALL,
      .seed = 19 },
    { .tag = "opts", .what = "explicit scale 0.5 and eps 1e-3",
      .B = 1, .T = 33, .H = 1, .HV = 1, .K = 8, .V = 8, .scale = 0.5, .eps = 1e-3, .eps_set = 1,
      .seed = 20 },
    { .what = "K = V = 64, a production tile width: four value heads on two key heads, h0, "
      "T across two chunks of 64",
      .B = 1, .T = 130, .H = 2, .HV = 4, .K = 64, .V = 64, .h0 = 1, .dht = 1, .seed = 22 },
    { .what = "gdn at K = V = 128 with four heads (the Gated DeltaNet layer's tiles): l2norm "
      "on q and k, h0",
      .gdn = 1, .B = 1, .T = 80, .H = 4, .HV = 4, .K = 128, .V = 128, .h0 = 1, .dht = 1,
      .l2q = 1, .l2k = 1, .seed = 23 },
    { .what = "K = V = 64 with eight value heads on four key heads, cu_seqlens (int32) 37 and 63",
      .B = 1, .T = 100, .H = 4, .HV = 8, .K = 64, .V = 64, .nseq = 2, .seqlens = { 37, 63 },
      .dht = 1, .seed = 24 },
    { .tag = "long", .what = "one long sequence (16384 tokens), small K and V",
      .B = 1, .T = 16384, .H = 1, .HV = 1, .K = 8, .V = 8, .dht = 1, .seed = 21 },

    /* the family (kla-spec.md section 7). Names: kda = gdn with gate channel, kkda = kla
     * with gate channel (Kaczmarz-KDA), pgdn / pdn (no g) = gdn with precond atk, pkda =
     * both, pkla = kla with precond atk, pkkda = kla with both */
    { .tag = "ex18", .what = "notes/delta-family.md 1.8, KDA by hand: o = [1, 2.75], ht = [2.5, 0.25], "
      "dk = [(1.15, 0.75), (2.4, 5.7)], dg = [(0, 0), (0.15, 0.75)], dbeta = [3.8, 3.75] (scale 1)",
      .gdn = 1, .chan = 1, .B = 1, .T = 2, .H = 1, .HV = 1, .K = 2, .V = 1, .scale = 1, .dht = 1,
      .fixed = &ex_kda18 },
    { .tag = "ex18", .what = "notes/delta-family.md 1.8, Kaczmarz-KDA (eta = (1, 0.8), eps 0): o and ht as "
      "KDA, dk = [(-0.75, -1.15), (-3.6, 5.7)], deta = [1.9, 3.75]",
      .chan = 1, .B = 1, .T = 2, .H = 1, .HV = 1, .K = 2, .V = 1, .scale = 1, .eps = 0, .eps_set = 1,
      .dht = 1, .fixed = &ex_kda18k },
    { .tag = "ex2", .what = "notes/delta-family.md EX2, PGDN by hand (squash_x 4, log_atk_scale 0, scale 1, "
      "a0 = (0, e^2)): o = [3, 0.952], ht = [1.56, 0.02], at = [1/e, e]; squash_eps 1e-30 stands for the "
      "notes' 0",
      .gdn = 1, .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .sqx = 4, .sqe = 1e-30, .B = 1, .T = 2, .H = 1,
      .HV = 1, .K = 2, .V = 1, .scale = 1, .fixed = &ex_e2 },
    { .tag = "ex2k", .what = "notes/delta-family.md EX2K, EX2 with the Kaczmarz step (eta = 1, eps 0): "
      "o = [3, 1] (an exact projection), ht = [21/13, 1/26]; do = 0 and dht = (1, 0) give the gradients of "
      "docs/algorithm.md 13.3, e.g. dg = [0, 6/13], deta = [6/13, 3/26], dg_atk = [0.012304388, 0]",
      .drop = O_DLATK, .drop_why = "0 in exact arithmetic (docs/algorithm.md 13.3); from these float32 inputs "
      "the float64 value is rounding noise (about 5e-10), which no relative tolerance can judge",
      .dht = 1, .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .sqx = 4, .sqe = 1e-30, .B = 1, .T = 2, .H = 1, .HV = 1,
      .K = 2, .V = 1, .scale = 1, .eps = 0, .eps_set = 1, .fixed = &ex_e2k },
    { .tag = "ex3", .what = "notes/delta-family.md EX3, PGDN with fla's defaults (l2norm q and k, h0, a0, "
      "log_atk_scale -0.2): o = [0.385617550675, 0.212627964402], at = [0.474, 0.894], the gradient table "
      "to about 1e-7",
      .gdn = 1, .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .h0 = 1, .dht = 1, .l2q = 1, .l2k = 1, .B = 1,
      .T = 2, .H = 1, .HV = 1, .K = 2, .V = 1, .fixed = &ex_e3 },
    { .tag = "ex4", .what = "notes/delta-family.md EX4, PKDA (EX3 with a per-channel g): "
      "o = [0.402490284856, 0.231774921639], dg = [(0.0048025, -0.031341), (0.20651, -0.036319)]",
      .gdn = 1, .chan = 1, .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .h0 = 1, .dht = 1, .l2q = 1, .l2k = 1,
      .B = 1, .T = 2, .H = 1, .HV = 1, .K = 2, .V = 1, .fixed = &ex_e4 },
    { .tag = "ex5", .what = "notes/delta-family.md EX5, KLA under preconditioning, fla-compatible (EX3 with "
      "eta = (0.7, 0.4), l2norm q and k): o = [0.332973366725, 0.23724330962]",
      .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .h0 = 1, .dht = 1, .l2q = 1, .l2k = 1, .B = 1, .T = 2,
      .H = 1, .HV = 1, .K = 2, .V = 1, .fixed = &ex_e3 },
    { .tag = "ex6", .what = "notes/delta-family.md EX6, KLA under preconditioning on raw keys (l2norm q "
      "only): o = [0.11049722673, 0.030217815194]",
      .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .h0 = 1, .dht = 1, .l2q = 1, .B = 1, .T = 2, .H = 1,
      .HV = 1, .K = 2, .V = 1, .fixed = &ex_e3 },
    { .what = "KDA as fla's chunk_kda runs it: l2norm q and k, grouped heads, h0, dht, T across two chunks",
      .gdn = 1, .chan = 1, .B = 2, .T = 100, .H = 2, .HV = 4, .K = 16, .V = 16, .h0 = 1, .dht = 1,
      .l2q = 1, .l2k = 1, .seed = 30 },
    { .what = "Kaczmarz-KDA (KLA's step on the per-channel decay): raw keys, l2norm q, grouped heads, h0",
      .chan = 1, .B = 1, .T = 130, .H = 2, .HV = 4, .K = 16, .V = 16, .h0 = 1, .dht = 1, .l2q = 1,
      .seed = 31 },
    { .tag = "gm5", .what = "KDA with strong per-channel decays, g uniform in [-5, 0], a long sequence "
      "(the chunkwise form must never exponentiate a positive number)",
      .gdn = 1, .chan = 1, .g = G_M5, .B = 1, .T = 1000, .H = 1, .HV = 1, .K = 16, .V = 8, .dht = 1,
      .l2q = 1, .l2k = 1, .seed = 32 },
    { .tag = "gm20", .what = "Kaczmarz-KDA with g = -20 on every third element (per token, head and "
      "channel), cu_seqlens 1, 150, 99",
      .chan = 1, .g = G_STRONG, .B = 1, .T = 250, .H = 1, .HV = 1, .K = 16, .V = 16, .nseq = 3,
      .seqlens = { 1, 150, 99 }, .h0 = 1, .dht = 1, .l2q = 1, .seed = 33 },
    { .what = "PGDN as fla's chunk_precond_gated_delta_rule runs it: l2norm q and k, grouped heads, h0 "
      "and a0, dht and dat, g_atk, log_atk_scale",
      .gdn = 1, .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .dat = 1, .B = 2, .T = 100, .H = 2, .HV = 4,
      .K = 16, .V = 16, .h0 = 1, .dht = 1, .l2q = 1, .l2k = 1, .seed = 34 },
    { .what = "PDN: PGDN without g, g_atk present, log_atk_scale absent (-0.2)",
      .gdn = 1, .atk = 1, .gatk = 1, .g = G_ABSENT, .B = 1, .T = 70, .H = 2, .HV = 2, .K = 16, .V = 16,
      .dht = 1, .l2q = 1, .l2k = 1, .seed = 35 },
    { .what = "PKDA: per-channel g and the ATK, cu_seqlens 37, 1, 62, h0 and a0 with state layout vk, dat",
      .gdn = 1, .chan = 1, .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .dat = 1, .B = 1, .T = 100, .H = 2,
      .HV = 2, .K = 16, .V = 8, .nseq = 3, .seqlens = { 37, 1, 62 }, .h0 = 1, .dht = 1, .vk = 1, .l2q = 1,
      .l2k = 1, .seed = 36 },
    { .what = "KLA under preconditioning, raw keys (l2norm q only), grouped heads, h0, a0, dat, "
      "log_atk_scale; g_atk absent (0)",
      .atk = 1, .latk = 1, .a0 = 1, .dat = 1, .B = 1, .T = 129, .H = 1, .HV = 2, .K = 16, .V = 16,
      .h0 = 1, .dht = 1, .l2q = 1, .seed = 37 },
    { .what = "KLA under preconditioning, fla-compatible (l2norm q and k), squash_x 2 and squash_eps 1e-3, "
      "cu_seqlens (int64) 50 and 80",
      .atk = 1, .gatk = 1, .latk = 1, .sqx = 2, .sqe = 1e-3, .B = 1, .T = 130, .H = 2, .HV = 2, .K = 16,
      .V = 16, .nseq = 2, .seqlens = { 50, 80 }, .cu64 = 1, .dht = 1, .l2q = 1, .l2k = 1, .seed = 38 },
    { .what = "Kaczmarz-PKDA (both variants in mode kla): K = 64, grouped heads, h0, a0, T across "
      "three chunks",
      .chan = 1, .atk = 1, .gatk = 1, .latk = 1, .a0 = 1, .B = 1, .T = 130, .H = 1, .HV = 2, .K = 64,
      .V = 32, .h0 = 1, .dht = 1, .l2q = 1, .seed = 39 },
};
#define NCASES ((int)(sizeof cases / sizeof cases[0]))

static const char *family_name(const GCase *c)
{
    if (c->atk && c->chan) return c->gdn ? "pkda" : "pkkda";
    if (c->atk) return c->gdn ? (c->g == G_ABSENT ? "pdn" : "pgdn") : "pkla";
    if (c->chan) return c->gdn ? "kda" : "kkda";
    return c->gdn ? "gdn" : "kla";
}

static void case_name(const GCase *c, char *buf, size_t n)
{
    snprintf(buf, n, "%s_B%d_T%d_H%d_HV%d_K%d_V%d%s%s%s%s%s%s", family_name(c),
             c->B, c->T, c->H, c->HV, c->K, c->V, c->nseq ? "_varlen" : "", c->h0 ? "_h0" : "",
             c->vk ? "_vk" : "", c->l2q && c->l2k ? "_l2qk" : c->l2q ? "_l2q" : c->l2k ? "_l2k" : "",
             c->tag ? "_" : "", c->tag ? c->tag : "");
}

/* ---- 2. a problem in memory: shapes, inputs, outputs ----------------------------------- */

typedef struct Prob {
    KlaShape s;
    KlaOptions opt;
    KlaIn in[NIN];      /* data NULL: absent */
    int64_t ish[NIN][4];
    int ind[NIN];
    int64_t osh[NOUT][4];
    int ond[NOUT];
    int64_t *start, *len; /* tokens of sequence n: rows start[n] .. start[n]+len[n]-1 */
    int drop;             /* generate: an output left out of the file (0: none) */
} Prob;

static const char *in_name(const Prob *p, int i)
{
    static const char *const n[NIN] = { "q", "k", "v", "g", "eta", "h0", "cu_seqlens", "do", "dht",
                                        "g_atk", "beta_atk", "log_atk_scale", "a0", "dat" };
    if (i == I_E && p->opt.mode == KLA_MODE_GDN) return "beta";
    return n[i];
}

static const char *out_name(const Prob *p, int i)
{
    static const char *const n[NOUT] = { "o", "ht", "at", "dq", "dk", "dv", "dg", "deta", "dh0",
                                         "dg_atk", "dbeta_atk", "dlog_atk_scale", "da0" };
    if (i == O_DE && p->opt.mode == KLA_MODE_GDN) return "dbeta";
    return n[i];
}

static int64_t numel(const int64_t *sh, int nd)
{
    int64_t n = 1;
    for (int d = 0; d < nd; d++) n *= sh[d];
    return n;
}

static void set4(int64_t *d, int64_t a, int64_t b, int64_t c, int64_t e)
{
    d[0] = a; d[1] = b; d[2] = c; d[3] = e;
}

/* Shapes from p->s and the layout (kla-spec.md section 2). */
static void prob_shapes(Prob *p)
{
    const KlaShape *s = &p->s;
    int vk = p->opt.state_layout == KLA_LAYOUT_VK;
    int64_t a = vk ? s->V : s->K, b = vk ? s->K : s->V;
    set4(p->ish[I_Q], s->B, s->T, s->H, s->K);
    set4(p->ish[I_K], s->B, s->T, s->H, s->K);
    set4(p->ish[I_V], s->B, s->T, s->HV, s->V);
    set4(p->ish[I_G], s->B, s->T, s->HV, s->K);
    set4(p->ish[I_E], s->B, s->T, s->HV, 0);
    set4(p->ish[I_H0], s->N, s->HV, a, b);
    set4(p->ish[I_CU], s->N + 1, 0, 0, 0);
    set4(p->ish[I_DO], s->B, s->T, s->HV, s->V);
    set4(p->ish[I_DHT], s->N, s->HV, a, b);
    set4(p->ish[I_GATK], s->B, s->T, s->H, 0);
    set4(p->ish[I_BATK], s->B, s->T, s->H, 0);
    set4(p->ish[I_LATK], s->H, 0, 0, 0);
    set4(p->ish[I_A0], s->N, s->H, s->K, 0);
    set4(p->ish[I_DAT], s->N, s->H, s->K, 0);
    const int ind[NIN] = { 4, 4, 4, p->opt.gate == KLA_GATE_CHANNEL ? 4 : 3, 3, 4, 1, 4, 4, 3, 3, 1, 3, 3 };
    memcpy(p->ind, ind, sizeof ind);
    static const int src[NOUT] = { I_V, I_H0, I_A0, I_Q, I_K, I_V, I_G, I_E, I_H0, I_GATK, I_BATK, I_LATK, I_A0 };
    for (int i = 0; i < NOUT; i++) {
        memcpy(p->osh[i], p->ish[src[i]], sizeof p->osh[i]);
        p->ond[i] = ind[src[i]];
    }
}

static int64_t in_numel(const Prob *p, int i) { return numel(p->ish[i], p->ind[i]); }
static int64_t out_numel(const Prob *p, int i) { return numel(p->osh[i], p->ond[i]); }

static size_t kdt_size(KlaDtype d) { return d == KLA_F16 || d == KLA_BF16 ? 2 : d == KLA_F32 || d == KLA_I32 ? 4 : 8; }

static int64_t cu_get(KlaIn cu, int64_t i)
{
    return cu.dtype == KLA_I32 ? ((const int32_t *)cu.data)[i] : ((const int64_t *)cu.data)[i];
}

/* Sequence boundaries from cu_seqlens or B. */
static int prob_seqs(Prob *p)
{
    int64_t N = p->s.N;
    p->start = calloc((size_t)N, sizeof *p->start);
    p->len = calloc((size_t)N, sizeof *p->len);
    if (!p->start || !p->len) return -1;
    for (int64_t n = 0; n < N; n++) {
        if (p->in[I_CU].data) {
            p->start[n] = cu_get(p->in[I_CU], n);
            p->len[n] = cu_get(p->in[I_CU], n + 1) - p->start[n];
        } else {
            p->start[n] = n * p->s.T;
            p->len[n] = p->s.T;
        }
    }
    return 0;
}

typedef struct Outs {
    void *t[NOUT];
    KlaDtype dt;
} Outs;

static void outs_free(Outs *o)
{
    for (int i = 0; i < NOUT; i++) {
        free(o->t[i]);
        o->t[i] = NULL;
    }
}

static int outs_alloc(Outs *o, const Prob *p, KlaDtype dt)
{
    memset(o, 0, sizeof *o);
    o->dt = dt;
    for (int i = 0; i < NOUT; i++) {
        o->t[i] = calloc((size_t)out_numel(p, i) + 1, kdt_size(dt));
        if (!o->t[i]) {
            outs_free(o);
            return -1;
        }
    }
    return 0;
}

static KlaTensors prob_tensors(const Prob *p, Outs *o)
{
    KlaTensors t;
    memset(&t, 0, sizeof t);
    t.q = p->in[I_Q];
    t.k = p->in[I_K];
    t.v = p->in[I_V];
    t.g = p->in[I_G];
    if (p->opt.mode == KLA_MODE_KLA) t.eta = p->in[I_E];
    else t.beta = p->in[I_E];
    t.h0 = p->in[I_H0];
    t.cu_seqlens = p->in[I_CU];
    t.o = KLA_OUT(o->t[O_O], o->dt, out_numel(p, O_O));
    t.ht = KLA_OUT(o->t[O_HT], o->dt, out_numel(p, O_HT));
    t.g_atk = p->in[I_GATK];
    t.beta_atk = p->in[I_BATK];
    t.log_atk_scale = p->in[I_LATK];
    t.a0 = p->in[I_A0];
    if (p->opt.precond == KLA_PRECOND_ATK) t.at = KLA_OUT(o->t[O_AT], o->dt, out_numel(p, O_AT));
    return t;
}

enum { RUN_FWD, RUN_BWD, RUN_DEC };

/* Runs forward, backward or decode (token by token, sequence by sequence) into o. */
static int run_op(KlaContext *ctx, const Prob *p, int op, KlaAlgo algo, Outs *o)
{
    KlaOptions opt = p->opt;
    opt.algo = algo;
    KlaTensors t = prob_tensors(p, o);
    if (op == RUN_FWD) return kla_forward(ctx, &p->s, &opt, &t);
    if (op == RUN_BWD) {
        t.dout = p->in[I_DO];
        t.dht = p->in[I_DHT];
        t.dq = KLA_OUT(o->t[O_DQ], o->dt, out_numel(p, O_DQ));
        t.dk = KLA_OUT(o->t[O_DK], o->dt, out_numel(p, O_DK));
        t.dv = KLA_OUT(o->t[O_DV], o->dt, out_numel(p, O_DV));
        t.dg = KLA_OUT(o->t[O_DG], o->dt, out_numel(p, O_DG));
        if (opt.mode == KLA_MODE_KLA) t.deta = KLA_OUT(o->t[O_DE], o->dt, out_numel(p, O_DE));
        else t.dbeta = KLA_OUT(o->t[O_DE], o->dt, out_numel(p, O_DE));
        if (p->in[I_H0].data) t.dh0 = KLA_OUT(o->t[O_DH0], o->dt, out_numel(p, O_DH0));
        if (opt.precond == KLA_PRECOND_ATK) {
            t.dat = p->in[I_DAT];
            t.dg_atk = KLA_OUT(o->t[O_DGATK], o->dt, out_numel(p, O_DGATK));
            t.dbeta_atk = KLA_OUT(o->t[O_DBATK], o->dt, out_numel(p, O_DBATK));
            t.dlog_atk_scale = KLA_OUT(o->t[O_DLATK], o->dt, out_numel(p, O_DLATK));
            t.da0 = KLA_OUT(o->t[O_DA0], o->dt, out_numel(p, O_DA0));
        }
        return kla_backward(ctx, &p->s, &opt, &t);
    }
    /* decode */
    const KlaShape *s = &p->s;
    size_t oes = kdt_size(o->dt);
    const int atk = opt.precond == KLA_PRECOND_ATK;
    int64_t nst = s->HV * s->K * s->V, qrow = s->H * s->K, vrow = s->HV * s->V, grow = s->HV;
    int64_t gcrow = opt.gate == KLA_GATE_CHANNEL ? s->HV * s->K : s->HV, nat = s->H * s->K;
    KlaShape ds = *s;
    ds.B = 1;
    ds.T = 1;
    ds.N = 1;
    for (int64_t n = 0; n < s->N; n++) {
        char *state = (char *)o->t[O_HT] + (size_t)(n * nst) * oes;
        for (int64_t i = 0; i < nst; i++) {
            double x = 0;
            if (p->in[I_H0].data)
                x = kla__get_real(p->in[I_H0].data, p->in[I_H0].dtype, n * nst + i);
            if (o->dt == KLA_F64) ((double *)state)[i] = x;
            else ((float *)state)[i] = (float)x;
        }
        /* the ATK state starts from a0 (or zeros) and ends as at */
        char *astate = (char *)o->t[O_AT] + (size_t)(n * nat) * oes;
        for (int64_t i = 0; atk && i < nat; i++) {
            double x = 0;
            if (p->in[I_A0].data)
                x = kla__get_real(p->in[I_A0].data, p->in[I_A0].dtype, n * nat + i);
            if (o->dt == KLA_F64) ((double *)astate)[i] = x;
            else ((float *)astate)[i] = (float)x;
        }
        for (int64_t r = p->start[n]; r < p->start[n] + p->len[n]; r++) {
            KlaTensors d;
            memset(&d, 0, sizeof d);
#define ROW(ix, w) KLA_IN((const char *)p->in[ix].data + (size_t)(r * (w)) * kdt_size(p->in[ix].dtype), \
                          p->in[ix].dtype, (w))
            d.q = ROW(I_Q, qrow);
            d.k = ROW(I_K, qrow);
            d.v = ROW(I_V, vrow);
            if (p->in[I_G].data) d.g = ROW(I_G, gcrow);
            if (p->in[I_GATK].data) d.g_atk = ROW(I_GATK, s->H);
            if (p->in[I_BATK].data) d.beta_atk = ROW(I_BATK, s->H);
            d.log_atk_scale = p->in[I_LATK];
            if (atk) d.astate = KLA_OUT(astate, o->dt, nat);
            if (opt.mode == KLA_MODE_KLA) d.eta = ROW(I_E, grow);
            else d.beta = ROW(I_E, grow);
#undef ROW
            d.o = KLA_OUT((char *)o->t[O_O] + (size_t)(r * vrow) * oes, o->dt, vrow);
            d.state = KLA_OUT(state, o->dt, nst);
            int rc = kla_decode(ctx, &ds, &opt, &d);
            if (rc < 0) return rc;
        }
    }
    return 0;
}

/* ---- 3. metric and tolerances ------------------------------------------------------- */

static double at(const void *x, KlaDtype dt, int64_t i)
{
    return dt == KLA_F64 ? ((const double *)x)[i] : ((const float *)x)[i];
}

/* The worst |got - ref| / (|ref| + rms(ref)) over the elements: the quantity the element
 * bound of kla verify limits. Inf if non-finite. */
static double elem_ratio(const double *ref, const void *got, KlaDtype dt, int64_t n)
{
    double sr = 0, w = 0;
    for (int64_t i = 0; i < n; i++) sr += ref[i] * ref[i];
    const double rms = n ? sqrt(sr / (double)n) : 0;
    for (int64_t i = 0; i < n; i++) {
        double g = at(got, dt, i), d = fabs(g - ref[i]);
        if (!isfinite(g)) return INFINITY;
        if (d > 0) w = fmax(w, d / (fabs(ref[i]) + rms));
    }
    return w;
}

/* rel_rmse of kla-spec.md section 5 (rms(got) if ref is all zero); Inf if non-finite. */
static double rel_rmse(const double *ref, const void *got, KlaDtype dt, int64_t n)
{
    double sd = 0, sr = 0, sg = 0;
    for (int64_t i = 0; i < n; i++) {
        double g = at(got, dt, i), d = g - ref[i];
        if (!isfinite(g)) return INFINITY;
        sd += d * d;
        sr += ref[i] * ref[i];
        sg += g * g;
    }
    if (n == 0) return 0;
    return sr > 0 ? sqrt(sd / (double)n) / sqrt(sr / (double)n) : sqrt(sg / (double)n);
}

/* Base tolerances: float32 = kla verify's defaults; bf16/fp16: rounding these inputs to
 * bf16 alone costs about 3e-3 (measured per case), and flash-linear-attention's own bf16
 * tests allow 0.005 (o, ht) to 0.02 (gradients) on top of that. */
static double base_tol(int out, int bf16)
{
    if (bf16) return out < O_DQ ? 2e-2 : 5e-2;
    return out < O_DQ ? 1e-5 : 1e-4;
}

/* The smallest value of 1, 2, 5 times a power of ten that is >= x (x <= 10). */
double golden_up125(double x)
{
    char buf[32];
    for (int e = -15; e <= 1; e++)
        for (int m = 1; m <= 5; m += m == 2 ? 3 : 1) {
            snprintf(buf, sizeof buf, "%de%d", m, e);
            double v = strtod(buf, NULL);
            if (v >= x) return v;
        }
    return x;
}

/* Shortest decimal that reads back as x ("%.Ng", N = 1..17). */
void golden_fmt_num(char *buf, size_t n, double x)
{
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, x);
        if (strtod(buf, NULL) == x) return;
    }
}

/* ---- 4. generate -------------------------------------------------------------------- */

typedef struct Str {
    char *p;
    size_t n, cap;
} Str;

static void sb_printf(Str *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (w < 0) return;
    if (s->n + (size_t)w + 1 > s->cap) {
        size_t cap = (s->cap ? s->cap * 2 : 4096) + (size_t)w;
        char *q = realloc(s->p, cap);
        if (!q) {
            fprintf(stderr, "kla: out of memory\n");
            exit(1);
        }
        s->p = q;
        s->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(s->p + s->n, s->cap - s->n, fmt, ap);
    va_end(ap);
    s->n += (size_t)w;
}

/* One generated case: inputs as float32 (cu as int32/int64), expected as float64. */
typedef struct Gen {
    Prob p;
    float *in[NIN];
    void *cu;
    Outs exp;
} Gen;

static void gen_free(Gen *g)
{
    for (int i = 0; i < NIN; i++) free(g->in[i]);
    free(g->cu);
    outs_free(&g->exp);
    free(g->p.start);
    free(g->p.len);
}

/* Element transform for draw u; r is the flat index (rows for k and g patterns). */
static double draw(const GCase *c, int id, uint64_t *st, int64_t i)
{
    double u = unif(st);
    if (c->readable) {
        switch (id) {
        case I_G: return -floor(u * 4) / 4;
        case I_E: return (1 + floor(u * 4)) / 4;
        default: return (floor(u * 9) - 4) / 4;
        }
    }
    switch (id) {
    case I_G:
        if (c->g == G_ZERO) return 0;
        if (c->g == G_STRONG && i % 3 == 1) return -20;
        if (c->g == G_M5) return -5 * u;
        return -0.5 * u;
    case I_GATK: return -0.5 * u;
    case I_BATK: return u;          /* fla's sigmoid range */
    case I_LATK: return u - 1;      /* fla's tests: rand(H) - 1 */
    case I_A0: return 2 * u;
    case I_E:
        if (c->gdn) return 0.125 + 0.75 * u;
        if (c->eta == E_ONE) return 1;
        if (c->eta == E_SMALL) return 0x1p-10 * (1 + u);
        return 0.25 + 1.25 * u;
    case I_H0: return u - 0.5;
    default: return 2 * u - 1;
    }
}

static int gen_inputs(const GCase *c, Gen *g)
{
    Prob *p = &g->p;
    memset(g, 0, sizeof *g);
    kla_default_options(&p->opt);
    p->opt.mode = c->gdn ? KLA_MODE_GDN : KLA_MODE_KLA;
    p->opt.scale = c->scale != 0 ? c->scale : 1 / sqrt((double)c->K);
    if (c->eps_set) p->opt.eps = c->eps;
    p->opt.l2norm_q = c->l2q;
    p->opt.l2norm_k = c->l2k;
    p->opt.state_layout = c->vk ? KLA_LAYOUT_VK : KLA_LAYOUT_KV;
    p->opt.gate = c->chan ? KLA_GATE_CHANNEL : KLA_GATE_HEAD;
    p->drop = c->drop;
    p->opt.precond = c->atk ? KLA_PRECOND_ATK : KLA_PRECOND_NONE;
    if (c->sqx != 0) p->opt.squash_x = c->sqx;
    if (c->sqe != 0) p->opt.squash_eps = c->sqe;
    p->s = (KlaShape){ .B = c->B, .T = c->T, .H = c->H, .HV = c->HV, .K = c->K, .V = c->V,
                       .N = c->nseq ? c->nseq : c->B };
    prob_shapes(p);
    int want[NIN] = { 1, 1, 1, c->g != G_ABSENT, 1, c->h0, c->nseq > 0, 1, c->dht,
                      c->atk && c->gatk, c->atk, c->atk && c->latk, c->atk && c->a0, c->atk && c->dat };
    for (int i = 0; i < NIN; i++) {
        if (!want[i]) continue;
        int64_t n = in_numel(p, i);
        if (i == I_CU) {
            g->cu = calloc((size_t)n, c->cu64 ? 8 : 4);
            if (!g->cu) return -1;
            int64_t acc = 0;
            for (int64_t j = 0; j < n; j++) {
                if (c->cu64) ((int64_t *)g->cu)[j] = acc;
                else ((int32_t *)g->cu)[j] = (int32_t)acc;
                if (j < c->nseq) acc += c->seqlens[j];
            }
            p->in[i] = KLA_IN(g->cu, c->cu64 ? KLA_I64 : KLA_I32, n);
            continue;
        }
        float *x = g->in[i] = calloc((size_t)n + 1, sizeof(float));
        if (!x) return -1;
        p->in[i] = KLA_F32_IN(x, n);
        if (c->spec6) {
            static const float q6[4] = { 1, 1, 1, 0 }, k6[4] = { 2, 0, 1, 1 }, v6[2] = { 3, 1 };
            static const float e6[2] = { 1, 0.5f }, d6[2] = { 1, 1 };
            const float g6[2] = { 0, (float)log(0.5) };
            const float *src[NIN] = { q6, k6, v6, g6, e6, NULL, NULL, d6, NULL };
            memcpy(x, src[i], (size_t)n * sizeof(float));
            continue;
        }
        if (c->fixed) {
            for (int64_t j = 0; j < n; j++) x[j] = (float)c->fixed->v[i][j];
            continue;
        }
        uint64_t st = 16 * c->seed + (uint64_t)stream_id[i];
        int unit = i == I_K && c->gdn && !c->l2k && !c->readable;
        if (!unit) {
            for (int64_t j = 0; j < n; j++) {
                double y = draw(c, i, &st, j);
                if (i == I_K && c->key == KEY_NORMS) y *= row_scale[(j / c->K) % 8];
                x[j] = (float)y;
            }
            continue;
        }
        /* gdn without l2norm_k: unit key rows, x / sqrt(sum x^2) in float64 */
        double *row = malloc((size_t)c->K * sizeof *row);
        if (!row) return -1;
        for (int64_t r0 = 0; r0 < n; r0 += c->K) {
            double s2 = 0;
            for (int j = 0; j < c->K; j++) {
                row[j] = draw(c, i, &st, r0 + j);
                s2 += row[j] * row[j];
            }
            for (int j = 0; j < c->K; j++) x[r0 + j] = (float)(row[j] / sqrt(s2));
        }
        free(row);
    }
    return prob_seqs(p);
}

/* Expected: ref64 recurrent forward (o, ht) and backward (gradients). */
static int gen_expected(KlaContext *c64, Gen *g, const char *name)
{
    Outs b;
    if (outs_alloc(&g->exp, &g->p, KLA_F64) < 0 || outs_alloc(&b, &g->p, KLA_F64) < 0)
        return -1;
    int r = run_op(c64, &g->p, RUN_FWD, KLA_ALGO_RECURRENT, &g->exp);
    if (!r) r = run_op(c64, &g->p, RUN_BWD, KLA_ALGO_RECURRENT, &b);
    if (r < 0) {
        fprintf(stderr, "kla golden: %s: ref64: %s\n", name, kla_error_detail(c64));
        outs_free(&b);
        return -1;
    }
    for (int i = O_DQ; i < NOUT; i++) {
        free(g->exp.t[i]);
        g->exp.t[i] = b.t[i];
        b.t[i] = NULL;
    }
    outs_free(&b);
    return 0;
}

/* dh0 with h0; at and the ATK gradients with precond atk (da0 even without a0: the
 * gradient at a0 = 0, as dg without g) */
static int has_out(const Prob *p, int i)
{
    if (p->drop && i == p->drop) return 0;
    if (i == O_DH0) return p->in[I_H0].data != NULL;
    if (i == O_AT || i >= O_DGATK) return p->opt.precond == KLA_PRECOND_ATK;
    return 1;
}

/* Worst rel_rmse per output of runs with our float32 reference (both algorithms), and of
 * ref64 on inputs rounded to bf16. */
static int measure(KlaContext *c32, KlaContext *c64, Gen *g, double e32[NOUT],
                   double e16[NOUT], double w16[NOUT])
{
    Prob *p = &g->p;
    Outs o;
    int r = 0;
    for (int i = 0; i < NOUT; i++) e32[i] = e16[i] = w16[i] = 0;
    if (outs_alloc(&o, p, KLA_F32) < 0) return -1;
    for (int a = 0; a < 2 && !r; a++) {
        KlaAlgo algo = a ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;
        r = run_op(c32, p, RUN_FWD, algo, &o);
        for (int i = O_O; i < O_DQ && !r; i++)
            if (has_out(p, i)) e32[i] = fmax(e32[i], rel_rmse(g->exp.t[i], o.t[i], KLA_F32, out_numel(p, i)));
        if (!r) r = run_op(c32, p, RUN_BWD, algo, &o);
        for (int i = O_DQ; i < NOUT && !r; i++)
            if (has_out(p, i))
                e32[i] = fmax(e32[i], rel_rmse(g->exp.t[i], o.t[i], KLA_F32, out_numel(p, i)));
    }
    outs_free(&o);
    if (r < 0) {
        fprintf(stderr, "kla golden: ref: %s\n", kla_error_detail(c32));
        return -1;
    }

    /* bf16: round-to-nearest-even of every float input */
    Prob pb = *p;
    float *rounded[NIN] = { NULL };
    for (int i = 0; i < NIN; i++) {
        if (!g->in[i]) continue;
        int64_t n = in_numel(p, i);
        rounded[i] = malloc((size_t)n * sizeof(float) + 4);
        if (!rounded[i]) { r = -1; break; }
        for (int64_t j = 0; j < n; j++) {
            uint32_t u;
            memcpy(&u, &g->in[i][j], 4);
            u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
            memcpy(&rounded[i][j], &u, 4);
        }
        pb.in[i] = KLA_F32_IN(rounded[i], n);
    }
    if (!r && outs_alloc(&o, p, KLA_F64) == 0) {
        r = run_op(c64, &pb, RUN_FWD, KLA_ALGO_RECURRENT, &o);
        for (int i = O_O; i < O_DQ && !r; i++)
            if (has_out(p, i)) {
                e16[i] = rel_rmse(g->exp.t[i], o.t[i], KLA_F64, out_numel(p, i));
                w16[i] = elem_ratio(g->exp.t[i], o.t[i], KLA_F64, out_numel(p, i));
            }
        if (!r) r = run_op(c64, &pb, RUN_BWD, KLA_ALGO_RECURRENT, &o);
        for (int i = O_DQ; i < NOUT && !r; i++)
            if (has_out(p, i)) {
                e16[i] = rel_rmse(g->exp.t[i], o.t[i], KLA_F64, out_numel(p, i));
                w16[i] = elem_ratio(g->exp.t[i], o.t[i], KLA_F64, out_numel(p, i));
            }
        outs_free(&o);
    } else {
        r = -1;
    }
    for (int i = 0; i < NIN; i++) free(rounded[i]);
    return r < 0 ? -1 : 0;
}

static void tol_list(char *buf, size_t n, const Prob *p, const double *tol)
{
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < NOUT; i++) {
        if (!has_out(p, i)) continue;
        char num[32];
        golden_fmt_num(num, sizeof num, tol[i]);
        len += (size_t)snprintf(buf + len, n - len, "%s%s=%s", len ? "," : "", out_name(p, i),
                                num);
        if (len >= n) break;
    }
}

static void json_shape(Str *m, const int64_t *sh, int nd)
{
    sb_printf(m, "[");
    for (int d = 0; d < nd; d++) sb_printf(m, "%s%lld", d ? ", " : "", (long long)sh[d]);
    sb_printf(m, "]");
}

static void json_tols(Str *m, const Prob *p, const double *v, int sci)
{
    int first = 1;
    sb_printf(m, "{");
    for (int i = 0; i < NOUT; i++) {
        if (!has_out(p, i)) continue;
        char num[32];
        if (sci) snprintf(num, sizeof num, "%.1e", v[i]);
        else golden_fmt_num(num, sizeof num, v[i]);
        sb_printf(m, "%s\"%s\": %s", first ? "" : ", ", out_name(p, i), num);
        first = 0;
    }
    sb_printf(m, "}");
}

static int mkdir_p(const char *dir)
{
    if (mkdir(dir, 0777) == 0 || errno == EEXIST) return 0;
    return -1;
}

static int is_case_file(const char *name)
{
    size_t n = strlen(name);
    return n > 12 && strcmp(name + n - 12, ".safetensors") == 0 && name[0] != '.';
}

static int cmd_generate(const char *dir)
{
    KlaContext *c64 = NULL, *c32 = NULL;
    KlaParams par;
    kla_default_params(&par);
    par.backend = "ref64";
    if (kla_open(&c64, &par) < 0) {
        fprintf(stderr, "kla golden: backend ref64 unavailable\n");
        return 1;
    }
    par.backend = "ref";
    if (kla_open(&c32, &par) < 0) {
        fprintf(stderr, "kla golden: backend ref unavailable\n");
        kla_close(&c64);
        return 1;
    }
    if (mkdir_p(dir) < 0) {
        fprintf(stderr, "kla golden: %s: %s\n", dir, strerror(errno));
        kla_close(&c64);
        kla_close(&c32);
        return 1;
    }
    Str m = { 0 };
    sb_printf(&m, "{\n  \"format\": \"kla-golden-1\",\n"
                  "  \"generator\": \"kla golden generate DIR (tools/golden.c), see docs/golden.md\",\n"
                  "  \"prng\": \"splitmix64\",\n"
                  "  \"reference\": \"backend ref64 (float64), recurrent algorithm\",\n"
                  "  \"metric\": \"rel_rmse = rms(ref - got) / rms(ref) per tensor, kla-spec.md section 5\",\n"
                  "  \"tolerances\": \"float32: for kernels computing in float32 on these F32 inputs; "
                  "bf16: for kernels that round inputs or intermediates to bf16 or fp16 (rel_rmse "
                  "bounds; bf16_element: the bound of every element, |got - ref| <= b * (|ref| + "
                  "rms(ref)), where float32 uses max(tol, 1e-4))\",\n"
                  "  \"cases\": [\n");
    int rc = 0;
    char names[NCASES][128];
    for (int ci = 0; ci < NCASES && !rc; ci++) {
        const GCase *c = &cases[ci];
        char *name = names[ci], path[4096];
        case_name(c, name, sizeof names[ci]);
        if (snprintf(path, sizeof path, "%s/%s.safetensors", dir, name) >= (int)sizeof path) {
            fprintf(stderr, "kla golden: %s: path too long\n", dir);
            rc = 1;
            break;
        }
        Gen g;
        double e32[NOUT], e16[NOUT], w16[NOUT], t32[NOUT], t16[NOUT], x16[NOUT];
        if (gen_inputs(c, &g) < 0 || gen_expected(c64, &g, name) < 0 ||
            measure(c32, c64, &g, e32, e16, w16) < 0) {
            fprintf(stderr, "kla golden: %s: generation failed\n", name);
            gen_free(&g);
            rc = 1;
            break;
        }
        Prob *p = &g.p;
        for (int i = 0; i < NOUT; i++) {
            t32[i] = fmax(base_tol(i, 0), golden_up125(4 * e32[i]));
            t16[i] = fmax(base_tol(i, 1), golden_up125(4 * e16[i]));
            /* the element bound of the bf16 set: 5 x its rel_rmse bound (tools/verify.h),
             * or 4 x the worst element of the exact computation on bf16 inputs */
            x16[i] = fmax(VERIFY_BF16_ELEM_FACTOR * t16[i], golden_up125(4 * w16[i]));
            /* a float32 bound above 1e-2 means the expected values are rounding noise (a
             * tensor that is 0 in exact arithmetic): such a case must drop it */
            if (has_out(p, i) && t32[i] > 1e-2) {
                fprintf(stderr, "kla golden: %s: tensor %s would get the float32 tolerance %g: its expected "
                        "values are rounding noise; drop it from the case\n", name, out_name(p, i), t32[i]);
                rc = 1;
            }
        }
        if (rc) {
            gen_free(&g);
            break;
        }

        /* the file: inputs (F32, cu I32/I64), then expected outputs (F64) */
        st_tensor ts[NIN + NOUT];
        int nt = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int i = 0; i < (pass ? NOUT : NIN); i++) {
                if (pass ? !has_out(p, i) : !p->in[i].data) continue;
                st_tensor *t = &ts[nt++];
                memset(t, 0, sizeof *t);
                t->name = (char *)(pass ? out_name(p, i) : in_name(p, i));
                t->ndim = pass ? p->ond[i] : p->ind[i];
                memcpy(t->shape, pass ? p->osh[i] : p->ish[i], sizeof(int64_t) * 4);
                t->numel = numel(t->shape, t->ndim);
                t->dtype = pass ? ST_F64 : i == I_CU ? (c->cu64 ? ST_I64 : ST_I32) : ST_F32;
                t->nbytes = (size_t)t->numel * st_dtype_size(t->dtype);
                t->data = pass ? g.exp.t[i] : (void *)p->in[i].data;
            }
        char scale[32], eps[32], tl32[256], tl16[256], tx16[256];
        golden_fmt_num(scale, sizeof scale, p->opt.scale);
        golden_fmt_num(eps, sizeof eps, p->opt.eps);
        tol_list(tl32, sizeof tl32, p, t32);
        tol_list(tl16, sizeof tl16, p, t16);
        tol_list(tx16, sizeof tx16, p, x16);
        const char *mode = c->gdn ? "gdn" : "kla", *lay = c->vk ? "vk" : "kv";
        const char *l2q = c->l2q ? "true" : "false", *l2k = c->l2k ? "true" : "false";
        char sqx[32], sqe[32];
        golden_fmt_num(sqx, sizeof sqx, p->opt.squash_x);
        golden_fmt_num(sqe, sizeof sqe, p->opt.squash_eps);
        const char *gate = c->chan ? "channel" : "head", *pre = c->atk ? "atk" : "none";
        const char *keys[14] = { "case", "mode", "scale", "eps", "l2norm_q", "l2norm_k",
                                 "state_layout", "tol_float32", "tol_bf16", "elem_bf16" };
        const char *vals[14] = { name, mode, scale, eps, l2q, l2k, lay, tl32, tl16, tx16 };
        int nkeys = 10;
        /* the family's options only where they are not section 1's defaults, so that the
         * older cases' files stay as they were */
        if (c->chan) keys[nkeys] = "gate", vals[nkeys++] = gate;
        if (c->atk) {
            keys[nkeys] = "precond", vals[nkeys++] = pre;
            keys[nkeys] = "squash_x", vals[nkeys++] = sqx;
            keys[nkeys] = "squash_eps", vals[nkeys++] = sqe;
        }
        char err[512], sha[65];
        if (st_write(path, ts, nt, keys, vals, nkeys, err, sizeof err) < 0 ||
            sha256_file_hex(path, sha) < 0) {
            fprintf(stderr, "kla golden: %s\n", err);
            gen_free(&g);
            rc = 1;
            break;
        }
        struct stat sb;
        long long bytes = stat(path, &sb) == 0 ? (long long)sb.st_size : -1;

        /* the MANIFEST entry */
        sb_printf(&m, "    {\n      \"name\": \"%s\",\n      \"file\": \"%s.safetensors\",\n", name,
                  name);
        sb_printf(&m, "      \"bytes\": %lld,\n      \"sha256\": \"%s\",\n", bytes, sha);
        sb_printf(&m, "      \"what\": \"%s\",\n      \"seed\": %llu,\n", c->what,
                  (unsigned long long)c->seed);
        static const char *const gk[] = { "uniform", "absent", "zero", "m20", "m5" };
        static const char *const ek[] = { "uniform", "one", "small" };
        sb_printf(&m, "      \"inputs_from\": {\"values\": \"%s\", \"g\": \"%s\", \"%s\": \"%s\", "
                      "\"keys\": \"%s\"",
                  c->spec6 || c->fixed ? "fixed" : c->readable ? "grid" : "uniform", gk[c->g],
                  c->gdn ? "beta" : "eta", c->gdn ? "uniform" : ek[c->eta],
                  c->key == KEY_NORMS ? "norms" : c->gdn && !c->l2k && !c->readable ? "unit"
                                                                                    : "uniform");
        if (c->fixed) { /* the values themselves (float32, shortest decimals) */
            sb_printf(&m, ", \"fixed\": {");
            for (int i = 0, first = 1; i < NIN; i++) {
                if (!p->in[i].data || i == I_CU) continue;
                sb_printf(&m, "%s\"%s\": [", first ? "" : ", ", in_name(p, i));
                for (int64_t j = 0; j < in_numel(p, i); j++) {
                    char num[32];
                    golden_fmt_num(num, sizeof num, (double)g.in[i][j]);
                    sb_printf(&m, "%s%s", j ? ", " : "", num);
                }
                sb_printf(&m, "]");
                first = 0;
            }
            sb_printf(&m, "}");
        }
        if (c->nseq) {
            sb_printf(&m, ", \"seqlens\": [");
            for (int j = 0; j < c->nseq; j++) sb_printf(&m, "%s%d", j ? ", " : "", c->seqlens[j]);
            sb_printf(&m, "], \"cu_dtype\": \"%s\"", c->cu64 ? "I64" : "I32");
        }
        sb_printf(&m, "},\n");
        sb_printf(&m, "      \"options\": {\"mode\": \"%s\", \"scale\": %s, \"eps\": %s, "
                      "\"l2norm_q\": %s, \"l2norm_k\": %s, \"state_layout\": \"%s\"",
                  mode, scale, eps, l2q, l2k, lay);
        if (c->chan || c->atk)
            sb_printf(&m, ", \"gate\": \"%s\", \"precond\": \"%s\"", gate, pre);
        if (c->atk) sb_printf(&m, ", \"squash_x\": %s, \"squash_eps\": %s", sqx, sqe);
        sb_printf(&m, "},\n");
        if (c->drop) sb_printf(&m, "      \"dropped\": {\"%s\": \"%s\"},\n", out_name(p, c->drop), c->drop_why);
        sb_printf(&m, "      \"dims\": {\"B\": %d, \"T\": %d, \"H\": %d, \"HV\": %d, \"K\": %d, "
                      "\"V\": %d, \"N\": %lld},\n",
                  c->B, c->T, c->H, c->HV, c->K, c->V, (long long)p->s.N);
        for (int pass = 0; pass < 2; pass++) {
            sb_printf(&m, "      \"%s\": {", pass ? "outputs" : "inputs");
            int first = 1;
            for (int i = 0; i < nt; i++) {
                if ((ts[i].dtype == ST_F64) != pass) continue;
                sb_printf(&m, "%s\"%s\": {\"dtype\": \"%s\", \"shape\": ", first ? "" : ", ",
                          ts[i].name, st_dtype_name(ts[i].dtype));
                json_shape(&m, ts[i].shape, ts[i].ndim);
                sb_printf(&m, "}");
                first = 0;
            }
            sb_printf(&m, "},\n");
        }
        sb_printf(&m, "      \"tolerances\": {\n        \"float32\": ");
        json_tols(&m, p, t32, 0);
        sb_printf(&m, ",\n        \"bf16\": ");
        json_tols(&m, p, t16, 0);
        sb_printf(&m, ",\n        \"bf16_element\": ");
        json_tols(&m, p, x16, 0);
        sb_printf(&m, "\n      },\n      \"measured\": {\n        \"ref_float32\": ");
        json_tols(&m, p, e32, 1);
        sb_printf(&m, ",\n        \"bf16_inputs\": ");
        json_tols(&m, p, e16, 1);
        sb_printf(&m, ",\n        \"bf16_inputs_element\": ");
        json_tols(&m, p, w16, 1);
        sb_printf(&m, "\n      }\n    },\n");
        printf("%-44s %9lld bytes  %s\n", name, bytes, sha);
        gen_free(&g);
    }
    /* then the layer and training-step cases (tools/golden_train.c) */
    for (int ci = 0; ci < gtrain_count() && !rc; ci++) {
        char *entry = NULL;
        if (gtrain_generate(ci, dir, c64, c32, &entry) < 0) {
            fprintf(stderr, "kla golden: %s: generation failed\n", gtrain_name(ci));
            rc = 1;
        } else {
            sb_printf(&m, "%s%s\n", entry, ci + 1 < gtrain_count() ? "," : "");
        }
        free(entry);
    }
    sb_printf(&m, "  ]\n}\n");
    if (!rc) {
        /* MANIFEST.json atomically; then remove case files that are no longer in the set */
        char path[4096], tmp[4200];
        snprintf(path, sizeof path, "%s/MANIFEST.json", dir);
        snprintf(tmp, sizeof tmp, "%s/.MANIFEST.json.tmp", dir);
        FILE *f = fopen(tmp, "wb");
        if (!f || fwrite(m.p, 1, m.n, f) != m.n || fclose(f) != 0 || rename(tmp, path) != 0) {
            fprintf(stderr, "kla golden: %s: %s\n", path, strerror(errno));
            rc = 1;
        }
        DIR *d = rc ? NULL : opendir(dir);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (!is_case_file(e->d_name)) continue;
            int known = 0;
            for (int ci = 0; ci < NCASES + gtrain_count(); ci++) {
                const char *nm = ci < NCASES ? names[ci] : gtrain_name(ci - NCASES);
                size_t l = strlen(nm);
                if (strncmp(e->d_name, nm, l) == 0 && strcmp(e->d_name + l, ".safetensors") == 0) known = 1;
            }
            if (!known) {
                snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
                if (unlink(path) == 0) printf("removed stale %s\n", path);
            }
        }
        if (d) closedir(d);
        if (!rc)
            printf("golden: %d operator and %d layer/model cases and MANIFEST.json written to %s\n", NCASES,
                   gtrain_count(), dir);
    }
    free(m.p);
    kla_close(&c64);
    kla_close(&c32);
    return rc;
}

/* ---- 5. check ----------------------------------------------------------------------- */

/* The problem of a case file, through the library's loader (every check of kla forward). */
static int prob_from_file(Prob *p, const KlaFile *f)
{
    memset(p, 0, sizeof *p);
    KlaProblem P;
    if (kla_file_problem(f, KLA_OP_BACKWARD, &P) < 0) {
        fprintf(stderr, "kla golden: %s\n", kla_error_detail(NULL));
        return -1;
    }
    p->s = P.shape;
    p->opt = P.opt;
    prob_shapes(p);
    const KlaIn in[NIN] = { P.t.q, P.t.k, P.t.v, P.t.g, p->opt.mode == KLA_MODE_KLA ? P.t.eta : P.t.beta,
                            P.t.h0, P.t.cu_seqlens, P.t.dout, P.t.dht, P.t.g_atk, P.t.beta_atk,
                            P.t.log_atk_scale, P.t.a0, P.t.dat };
    memcpy(p->in, in, sizeof in);
    return prob_seqs(p);
}

/* tol_float32 metadata ("o=1e-05,ht=...") or kla verify's default. */
static double case_tol(const st_file *f, const char *name)
{
    double t = verify_meta_tol(f, "tol_float32", name);
    return t >= 0 ? t : verify_default_tol(name);
}

typedef struct Tally {
    int pass, fail, cases, bad_cases, skip;
} Tally;

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* --inputs bf16|f16: every real input rounded to that dtype (to nearest even) and passed
 * as 16-bit tensors; the runs are judged by the case's bf16 set. */
static KlaDtype g_inputs = KLA_F32;

static int round_inputs(Prob *p, uint16_t *bufs[NIN])
{
    for (int i = 0; i < NIN; i++) {
        bufs[i] = NULL;
        if (!p->in[i].data || i == I_CU) continue;
        const int64_t n = in_numel(p, i);
        if (!(bufs[i] = malloc((size_t)(n ? n : 1) * 2))) return -1;
        for (int64_t j = 0; j < n; j++)
            kla__put_real(bufs[i], g_inputs, j, kla__get_real(p->in[i].data, p->in[i].dtype, j));
        p->in[i] = KLA_IN(bufs[i], g_inputs, n);
    }
    return 0;
}

static void check_case(KlaContext *ctx, const char *dir, const char *file, Tally *ty)
{
    uint16_t *bufs[NIN] = { NULL };
    char path[4096], cname[256];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    snprintf(cname, sizeof cname, "%.*s", (int)(strlen(file) - 12), file);
    KlaFile *kf = NULL;
    Prob p;
    Outs o;
    int fails = 0;
    memset(&o, 0, sizeof o);
    memset(&p, 0, sizeof p);
    if (kla_file_read(path, &kf) < 0) {
        fprintf(stderr, "kla golden: %s\n", kla_error_detail(NULL));
        printf("%s %-18s FAIL  the file cannot be read\n", cname, "load");
        ty->fail++;
        ty->bad_cases++;
        ty->cases++;
        return;
    }
    const st_file *f = kla__file_st(kf);
    if (gtrain_is_case(kf)) { /* a layer or training-step case */
        int pass = 0, fail = 0;
        gtrain_check(ctx, kf, cname, &pass, &fail);
        ty->pass += pass, ty->fail += fail, fails += fail;
        goto done;
    }
    KlaDtype dt = strcmp(kla_backend_name(ctx), "ref64") == 0 ? KLA_F64 : KLA_F32;
    if (prob_from_file(&p, kf) < 0 || outs_alloc(&o, &p, dt) < 0 ||
        (g_inputs != KLA_F32 && round_inputs(&p, bufs) < 0)) {
        printf("%s %-18s FAIL  not a valid case (see the message above)\n", cname, "load");
        ty->fail++;
        fails++;
        goto done;
    }
    static const struct { int op; KlaAlgo algo; const char *label; } runs[] = {
        { RUN_FWD, KLA_ALGO_RECURRENT, "forward/recurrent" },
        { RUN_FWD, KLA_ALGO_CHUNK, "forward/chunk" },
        { RUN_BWD, KLA_ALGO_RECURRENT, "backward/recurrent" },
        { RUN_BWD, KLA_ALGO_CHUNK, "backward/chunk" },
        { RUN_DEC, KLA_ALGO_AUTO, "decode" },
    };
    int vk = p.opt.state_layout == KLA_LAYOUT_VK;
    for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
        for (int i = 0; i < NOUT; i++) memset(o.t[i], 0, (size_t)out_numel(&p, i) * kdt_size(dt));
        int rc = run_op(ctx, &p, runs[r].op, runs[r].algo, &o);
        if (rc == KLA_ENOSYS) {
            /* a variant of the family this backend does not run yet: said, not failed */
            printf("%s %-18s SKIP  %s\n", cname, runs[r].label, kla_error_detail(ctx));
            ty->skip++;
            continue;
        }
        if (rc < 0) {
            /* a run that fails is a failure of its own, whatever the other runs give */
            printf("%s %-18s FAIL  %s\n", cname, runs[r].label, kla_error_detail(ctx));
            ty->fail++;
            fails++;
            continue;
        }
        int lo = runs[r].op == RUN_BWD ? O_DQ : O_O, hi = runs[r].op == RUN_BWD ? NOUT : O_DQ;
        for (int i = lo; i < hi; i++) {
            const char *nm = out_name(&p, i);
            const st_tensor *ref = st_find(f, nm);
            if (!ref) continue;
            st_tensor got;
            memset(&got, 0, sizeof got);
            got.name = (char *)nm;
            got.dtype = dt == KLA_F64 ? ST_F64 : ST_F32;
            got.ndim = p.ond[i];
            memcpy(got.shape, p.osh[i], sizeof(int64_t) * 4);
            got.numel = out_numel(&p, i);
            got.nbytes = (size_t)got.numel * kdt_size(dt);
            got.data = o.t[i];
            printf("%s %-18s ", cname, runs[r].label);
            double tol = case_tol(f, nm), elem = -1;
            if (g_inputs != KLA_F32) { /* the bf16 set, for kernels with 16-bit inputs */
                tol = verify_meta_tol(f, "tol_bf16", nm);
                elem = verify_meta_tol(f, "elem_bf16", nm);
                if (tol < 0) tol = i < O_DQ ? 2e-2 : 5e-2;
                if (elem < 0) elem = VERIFY_BF16_ELEM_FACTOR * tol;
            }
            if (verify_tensor(stdout, nm, ref, &got, tol, elem, vk)) ty->pass++;
            else {
                ty->fail++;
                fails++;
            }
        }
    }
done:
    for (int i = 0; i < NIN; i++) free(bufs[i]);
    ty->cases++;
    if (fails) ty->bad_cases++;
    outs_free(&o);
    free(p.start);
    free(p.len);
    kla_file_free(&kf);
    fflush(stdout);
}

static int cmd_check(const char *backend, const char *glob, const char *dir)
{
    KlaParams par;
    kla_default_params(&par);
    par.backend = backend;
    KlaContext *ctx = NULL;
    int r = kla_open(&ctx, &par);
    if (r < 0) {
        fprintf(stderr, "kla golden: backend \"%s\": %s\n", backend ? backend : "auto",
                kla_strerror(r));
        return 1;
    }
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "kla golden: %s: %s\n", dir, strerror(errno));
        kla_close(&ctx);
        return 1;
    }
    char **files = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!is_case_file(e->d_name)) continue;
        char base[256];
        snprintf(base, sizeof base, "%.*s", (int)(strlen(e->d_name) - 12), e->d_name);
        if (glob && fnmatch(glob, base, 0) != 0 && fnmatch(glob, e->d_name, 0) != 0) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **nf = realloc(files, cap * sizeof *files);
            if (!nf) break;
            files = nf;
        }
        files[n] = strdup(e->d_name);
        if (files[n]) n++;
    }
    closedir(d);
    qsort(files, n, sizeof *files, cmp_str);
    Tally ty = { 0, 0, 0, 0, 0 };
    printf("golden check: backend %s, %s, %zu case%s%s\n", kla_backend_name(ctx), dir, n, n == 1 ? "" : "s",
           g_inputs == KLA_BF16 ? ", inputs rounded to bf16 (the bf16 tolerance set)"
           : g_inputs == KLA_F16 ? ", inputs rounded to f16 (the bf16 tolerance set)" : "");
    for (size_t i = 0; i < n; i++) check_case(ctx, dir, files[i], &ty);
    for (size_t i = 0; i < n; i++) free(files[i]);
    free(files);
    printf("golden check: backend %s: %d cases (%d failing), %d tensors passed, %d failed", kla_backend_name(ctx),
           ty.cases, ty.bad_cases, ty.pass, ty.fail);
    if (ty.skip) printf(", %d runs skipped (variants the backend does not run)", ty.skip);
    printf("\n");
    kla_close(&ctx);
    if (n == 0) {
        fprintf(stderr, "kla golden: no case in %s matches\n", dir);
        return 1;
    }
    return ty.fail ? 1 : 0;
}

/* ---- 6. command line ---------------------------------------------------------------- */

static const char usage[] =
    "usage: kla golden generate DIR\n"
    "       kla golden check [--backend B] [--cases GLOB] [--dir DIR] [--inputs f32|bf16|f16]\n"
    "generate: writes every golden case (inputs F32 from splitmix64 streams, expected\n"
    "  outputs and gradients F64 from backend ref64) and DIR/MANIFEST.json; case files no\n"
    "  longer in the set are removed. docs/golden.md describes the generator.\n"
    "check: runs backend B (default ref) on every case of DIR (default $KLA_GOLDEN or\n"
    "  golden): forward with both algorithms, backward with both, decode; prints a line\n"
    "  per case, run and tensor (rel_rmse, max abs error and where), then a summary.\n"
    "  --inputs bf16|f16: every real input rounded to it and passed as 16-bit tensors,\n"
    "  judged by the bf16 tolerance set.\n"
    "  Tolerances: the case's float32 set (tol_float32 in its metadata = MANIFEST.json).\n"
    "  Exit 0 if everything passes, 1 otherwise.\n"
    "  --cases GLOB   only cases whose name matches (fnmatch), e.g. 'kla_*_h0*'\n"
    "  --inputs T     f32 (default), or bf16 / f16: every real input rounded to that type\n"
    "                 and passed as 16-bit tensors, the runs judged by the bf16 set\n";

int golden_main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "generate") == 0) {
        if (argc == 3 && strcmp(argv[2], "--help") == 0) {
            fputs(usage, stdout);
            return 0;
        }
        if (argc != 3 || argv[2][0] == '-') {
            fprintf(stderr, "kla golden generate: expected one argument DIR\n%s", usage);
            return 2;
        }
        return cmd_generate(argv[2]);
    }
    if (strcmp(argv[1], "check") == 0) {
        const char *backend = "ref", *glob = NULL, *dir = getenv("KLA_GOLDEN");
        if (!dir || !*dir) dir = "golden";
        for (int i = 2; i < argc; i++) {
            const char *a = argv[i], *val = NULL;
            if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
                fputs(usage, stdout);
                return 0;
            }
            const char *opts[] = { "--backend", "--cases", "--dir", "--inputs" };
            int which = -1;
            for (int j = 0; j < 4; j++) {
                size_t l = strlen(opts[j]);
                if (strncmp(a, opts[j], l) == 0 && (a[l] == 0 || a[l] == '=')) {
                    which = j;
                    val = a[l] == '=' ? a + l + 1 : NULL;
                }
            }
            if (which < 0) {
                fprintf(stderr, "kla golden check: unknown argument '%s'\n%s", a, usage);
                return 2;
            }
            if (!val) {
                if (i + 1 >= argc) {
                    fprintf(stderr, "kla golden check: option '%s' needs a value\n", a);
                    return 2;
                }
                val = argv[++i];
            }
            if (which == 0) backend = val;
            else if (which == 1) glob = val;
            else if (which == 2) dir = val;
            else if (!strcmp(val, "f32")) g_inputs = KLA_F32;
            else if (!strcmp(val, "bf16")) g_inputs = KLA_BF16;
            else if (!strcmp(val, "f16")) g_inputs = KLA_F16;
            else {
                fprintf(stderr, "kla golden check: --inputs %s: expected f32, bf16 or f16\n%s", val, usage);
                return 2;
            }
        }
        return cmd_check(backend, glob, dir);
    }
    fprintf(stderr, "kla golden: unknown subcommand '%s'\n%s", argv[1], usage);
    return 2;
}
