/*
 * test_family.c: the delta-rule family (kla-spec.md section 7) through the public API,
 * float64 (ref64) unless said otherwise. TAP output.
 *
 *   - every gradient of every variant (gate head|channel x precond none|atk x mode
 *     kla|gdn) against float64 central finite differences of
 *     L = sum(do o) + sum(dht ht) + sum(dat at), recurrent and chunkwise, with grouped
 *     heads, cu_seqlens, h0 and a0 (dg per channel, dg_atk, dbeta_atk, dlog_atk_scale, da0
 *     included);
 *   - the notes' worked examples (notes/delta-family.md 1.8, EX2, EX2K, EX3 to EX6);
 *   - properties: the exact projection of mode kla with gate channel and with precond atk
 *     (eta = 1, eps = 0: k_t^T S_t = v_t^T after every token); a channel gate with equal
 *     channels is gate head; PDN (no g) is PGDN with g = 0; decode (carrying the ATK
 *     state) is forward; strong per-channel decays (-5, -20 per step) over long
 *     sequences keep the chunkwise form finite and equal to the recurrent one;
 *   - bad variant input refused with a message naming it, outputs and inputs untouched.
 *
 * Usage: test_family [--seed N]. The seed is printed; a failure replays with it.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kla.h"

#include "tap.h"

static uint64_t rng_state;
static double urand(void) /* [0, 1), xorshift64* */
{
    rng_state ^= rng_state >> 12, rng_state ^= rng_state << 25, rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}
static double nrand(void) { return sqrt(-2 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand()); }

/* ---- one problem: every input as float64 ------------------------------------------------ */

/* the differentiable inputs, in this order; A is eta or beta */
enum { Q, Kk, Vv, G, A, H0, GATK, BATK, LATK, A0, NX };
static const char *const xname[NX] = { "q", "k", "v", "g", "a", "h0", "g_atk", "beta_atk", "log_atk_scale", "a0" };

typedef struct fam {
    KlaShape s;
    KlaOptions o;
    double *x[NX];
    int64_t n[NX];
    double *dout, *dht, *dat;
    int64_t *cu, ncu;
    int64_t no, nst, nat; /* elements of o, of the states, of the ATK states */
} fam;

static double *rnd(int64_t n, double lo, double hi)
{
    double *p = malloc((size_t)(n ? n : 1) * sizeof *p);
    for (int64_t i = 0; i < n; i++) p[i] = lo + (hi - lo) * urand();
    return p;
}

/* seqlens: N lengths (B = 1), or NULL for B rows of T tokens. Present optional inputs:
 * g (unless no_g), h0, a0, g_atk, log_atk_scale, dht, dat. */
static void fam_make(fam *f, int mode, int chan, int atk, int B, int T, int H, int HV, int K, int V,
                     const int *seqlens, int nseq, int no_g)
{
    memset(f, 0, sizeof *f);
    kla_default_options(&f->o);
    f->o.mode = mode, f->o.gate = chan ? KLA_GATE_CHANNEL : KLA_GATE_HEAD;
    f->o.precond = atk ? KLA_PRECOND_ATK : KLA_PRECOND_NONE;
    int64_t N = B;
    if (seqlens) {
        B = 1, T = 0, N = nseq;
        f->cu = malloc((size_t)(nseq + 1) * sizeof *f->cu), f->ncu = nseq + 1;
        f->cu[0] = 0;
        for (int i = 0; i < nseq; i++) T += seqlens[i], f->cu[i + 1] = T;
    }
    f->s = (KlaShape){ .B = B, .T = T, .H = H, .HV = HV, .K = K, .V = V, .N = N };
    const int64_t BT = (int64_t)B * T;
    f->n[Q] = f->n[Kk] = BT * H * K, f->n[Vv] = BT * HV * V, f->n[G] = no_g ? 0 : BT * HV * (chan ? K : 1);
    f->n[A] = BT * HV, f->n[H0] = N * HV * K * V;
    if (atk) f->n[GATK] = f->n[BATK] = BT * H, f->n[LATK] = H, f->n[A0] = N * H * K;
    for (int i = 0; i < NX; i++) {
        if (!f->n[i]) continue;
        switch (i) {
        case G: f->x[i] = rnd(f->n[i], -0.8, -0.05); break;
        case A: f->x[i] = rnd(f->n[i], mode == KLA_MODE_GDN ? 0.2 : 0.3, mode == KLA_MODE_GDN ? 0.9 : 1.3); break;
        case GATK: f->x[i] = rnd(f->n[i], -0.9, -0.05); break;
        case BATK: f->x[i] = rnd(f->n[i], 0.1, 1); break;
        case LATK: f->x[i] = rnd(f->n[i], -1, 0); break;
        case A0: f->x[i] = rnd(f->n[i], 0.1, 2); break;
        default:
            f->x[i] = malloc((size_t)f->n[i] * sizeof(double));
            for (int64_t j = 0; j < f->n[i]; j++) f->x[i][j] = (i == H0 ? 0.5 : 1) * nrand();
        }
    }
    f->no = BT * HV * V, f->nst = N * HV * K * V, f->nat = N * H * K;
    f->dout = rnd(f->no, -1, 1), f->dht = rnd(f->nst, -1, 1);
    f->dat = atk ? rnd(f->nat, -1, 1) : NULL;
}

static void fam_free(fam *f)
{
    for (int i = 0; i < NX; i++) free(f->x[i]);
    free(f->dout), free(f->dht), free(f->dat), free(f->cu);
}

static KlaIn xin(const fam *f, int i) { return f->x[i] ? KLA_F64_IN(f->x[i], f->n[i]) : (KlaIn){ 0 }; }

static KlaTensors fam_tensors(const fam *f)
{
    KlaTensors t;
    memset(&t, 0, sizeof t);
    t.q = xin(f, Q), t.k = xin(f, Kk), t.v = xin(f, Vv), t.g = xin(f, G), t.h0 = xin(f, H0);
    if (f->o.mode == KLA_MODE_KLA) t.eta = xin(f, A);
    else t.beta = xin(f, A);
    t.g_atk = xin(f, GATK), t.beta_atk = xin(f, BATK), t.log_atk_scale = xin(f, LATK), t.a0 = xin(f, A0);
    if (f->cu) t.cu_seqlens = KLA_IN(f->cu, KLA_I64, f->ncu);
    return t;
}

typedef struct res {
    double *o, *ht, *at;
    double *d[NX]; /* gradients of the inputs (dg even without g: [.., HV(, K)]) */
} res;

static void res_alloc(res *r, const fam *f)
{
    memset(r, 0, sizeof *r);
    r->o = calloc((size_t)f->no, sizeof(double)), r->ht = calloc((size_t)f->nst, sizeof(double));
    r->at = calloc((size_t)(f->nat ? f->nat : 1), sizeof(double));
    for (int i = 0; i < NX; i++) {
        int64_t n = f->n[i];
        if (i == G && !n) n = f->n[A] * (f->o.gate == KLA_GATE_CHANNEL ? f->s.K : 1);
        r->d[i] = calloc((size_t)(n ? n : 1), sizeof(double));
    }
}

static void res_free(res *r)
{
    free(r->o), free(r->ht), free(r->at);
    for (int i = 0; i < NX; i++) free(r->d[i]);
}

static int64_t dg_numel(const fam *f) { return f->n[A] * (f->o.gate == KLA_GATE_CHANNEL ? f->s.K : 1); }

/* forward (bwd = 0) or backward (1) into r */
static int fam_run(KlaContext *ctx, const fam *f, KlaAlgo algo, int chunk, int bwd, res *r)
{
    KlaOptions o = f->o;
    o.algo = algo, o.chunk_size = chunk;
    KlaTensors t = fam_tensors(f);
    const int atk = f->o.precond == KLA_PRECOND_ATK;
    t.o = KLA_F64_OUT(r->o, f->no), t.ht = KLA_F64_OUT(r->ht, f->nst);
    if (atk) t.at = KLA_F64_OUT(r->at, f->nat);
    if (!bwd) return kla_forward(ctx, &f->s, &o, &t);
    t.dout = KLA_F64_IN(f->dout, f->no), t.dht = KLA_F64_IN(f->dht, f->nst);
    t.dq = KLA_F64_OUT(r->d[Q], f->n[Q]), t.dk = KLA_F64_OUT(r->d[Kk], f->n[Kk]), t.dv = KLA_F64_OUT(r->d[Vv], f->n[Vv]);
    t.dg = KLA_F64_OUT(r->d[G], dg_numel(f));
    if (f->o.mode == KLA_MODE_KLA) t.deta = KLA_F64_OUT(r->d[A], f->n[A]);
    else t.dbeta = KLA_F64_OUT(r->d[A], f->n[A]);
    if (f->x[H0]) t.dh0 = KLA_F64_OUT(r->d[H0], f->n[H0]);
    if (atk) {
        t.dat = KLA_F64_IN(f->dat, f->nat);
        t.dg_atk = KLA_F64_OUT(r->d[GATK], f->n[GATK]), t.dbeta_atk = KLA_F64_OUT(r->d[BATK], f->n[BATK]);
        t.dlog_atk_scale = KLA_F64_OUT(r->d[LATK], f->n[LATK]), t.da0 = KLA_F64_OUT(r->d[A0], f->n[A0]);
    }
    return kla_backward(ctx, &f->s, &o, &t);
}

static double fam_loss(KlaContext *ctx, const fam *f, res *r)
{
    if (fam_run(ctx, f, KLA_ALGO_RECURRENT, 64, 0, r) < 0) return NAN;
    double L = 0;
    for (int64_t i = 0; i < f->no; i++) L += f->dout[i] * r->o[i];
    for (int64_t i = 0; i < f->nst; i++) L += f->dht[i] * r->ht[i];
    for (int64_t i = 0; f->dat && i < f->nat; i++) L += f->dat[i] * r->at[i];
    return L;
}

static double maxabs(const double *x, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs(x[i]));
    return m;
}

/* ---- finite differences ------------------------------------------------------------------- */

static void check_fd(KlaContext *ctx, const char *name, fam *f)
{
    static const struct { KlaAlgo algo; int chunk; const char *what; } algos[] = {
        { KLA_ALGO_RECURRENT, 64, "recurrent" }, { KLA_ALGO_CHUNK, 16, "chunk 16" } };
    res an[2], tmp;
    int rc = 0;
    for (int a = 0; a < 2; a++) {
        res_alloc(&an[a], f);
        rc |= fam_run(ctx, f, algos[a].algo, algos[a].chunk, 1, &an[a]);
    }
    res_alloc(&tmp, f);
    /* g absent: differentiate at g = 0 (dg is the gradient there) */
    const int g_absent = !f->x[G];
    if (g_absent) f->x[G] = calloc((size_t)dg_numel(f), sizeof(double)), f->n[G] = dg_numel(f);
    double worst[2] = { 0, 0 };
    const char *wn[2] = { "-", "-" };
    const double h = 1e-6;
    for (int i = 0; i < NX && !rc; i++) {
        if (!f->x[i]) continue;
        double *fd = calloc((size_t)f->n[i], sizeof(double));
        for (int64_t j = 0; j < f->n[i]; j++) {
            const double x0 = f->x[i][j];
            f->x[i][j] = x0 + h;
            double lp = fam_loss(ctx, f, &tmp);
            f->x[i][j] = x0 - h;
            double lm = fam_loss(ctx, f, &tmp);
            f->x[i][j] = x0;
            fd[j] = (lp - lm) / (2 * h);
        }
        for (int a = 0; a < 2; a++) {
            double e = 0;
            for (int64_t j = 0; j < f->n[i]; j++) e = fmax(e, fabs(fd[j] - an[a].d[i][j]));
            e /= fmax(1, maxabs(fd, f->n[i]));
            if (!(e <= worst[a])) worst[a] = e, wn[a] = xname[i];
        }
        free(fd);
    }
    if (g_absent) free(f->x[G]), f->x[G] = NULL, f->n[G] = 0;
    for (int a = 0; a < 2; a++) {
        check(!rc && worst[a] < 1e-7, "fd %s, %s: every gradient (worst %.1e, d%s)", name, algos[a].what, worst[a],
              wn[a]);
        res_free(&an[a]);
    }
    res_free(&tmp);
}

static void fd_cases(KlaContext *ctx)
{
    static const int seqs[3] = { 3, 1, 20 };
    for (int mode = 0; mode < 2; mode++)
        for (int chan = 0; chan < 2; chan++)
            for (int atk = 0; atk < 2; atk++) {
                char name[96];
                fam f;
                snprintf(name, sizeof name, "%s gate %s precond %s, grouped heads, T 21", mode ? "gdn" : "kla",
                         chan ? "channel" : "head", atk ? "atk" : "none");
                fam_make(&f, mode, chan, atk, 1, 21, 1, 2, 3, 2, NULL, 0, 0);
                check_fd(ctx, name, &f);
                fam_free(&f);
                snprintf(name, sizeof name, "%s gate %s precond %s, cu_seqlens 3 1 20, H 2", mode ? "gdn" : "kla",
                         chan ? "channel" : "head", atk ? "atk" : "none");
                fam_make(&f, mode, chan, atk, 1, 0, 2, 2, 2, 2, seqs, 3, 0);
                check_fd(ctx, name, &f);
                fam_free(&f);
            }
    fam f;
    fam_make(&f, KLA_MODE_GDN, 0, 1, 2, 7, 1, 1, 3, 2, NULL, 0, 1);
    check_fd(ctx, "pdn (g absent: dg at g = 0), B 2", &f);
    fam_free(&f);
    fam_make(&f, KLA_MODE_KLA, 1, 1, 1, 9, 1, 1, 3, 2, NULL, 0, 0);
    f.o.l2norm_q = f.o.l2norm_k = 1, f.o.squash_x = 2, f.o.squash_eps = 1e-2, f.o.eps = 0.05, f.o.scale = 0.7;
    check_fd(ctx, "kla channel atk, l2norm q and k, squash_x 2, squash_eps 1e-2, eps 0.05, scale 0.7", &f);
    fam_free(&f);
}

/* ---- the notes' worked examples ------------------------------------------------------------ */

/* T = 2, K = 2, V = 1, one head, B = 1 */
static fam ex_make(int mode, int chan, int atk, const double *q, const double *k, const double *v, const double *g,
                   const double *a)
{
    fam f;
    fam_make(&f, mode, chan, atk, 1, 2, 1, 1, 2, 1, NULL, 0, 0);
    const double *src[] = { q, k, v, g, a };
    for (int i = 0; i < 5; i++) memcpy(f.x[i], src[i], (size_t)f.n[i] * sizeof(double));
    f.o.scale = 1;
    free(f.x[H0]), f.x[H0] = NULL, f.n[H0] = 0;
    return f;
}

static int near(const double *got, const double *want, int n, double tol, double *err)
{
    double e = 0;
    for (int i = 0; i < n; i++) e = fmax(e, fabs(got[i] - want[i]) / fmax(1, fabs(want[i])));
    *err = e;
    return e <= tol;
}

static void set(fam *f, int i, const double *x) { memcpy(f->x[i], x, (size_t)f->n[i] * sizeof(double)); }

static void check_examples(KlaContext *ctx)
{
    const double ln05 = log(0.5), ln025 = log(0.25), e1 = exp(-1.0), e2 = exp(2.0);
    double err;
    res r;
    /* 1.8: KDA and Kaczmarz-KDA (eps 0), do = (1, 1), dht = (0.5, 2) */
    {
        const double q[] = { 1, 0, 1, 1 }, k[] = { 1, 1, 1, 0 }, v[] = { 2, 3 }, g[] = { 0, ln05, ln05, ln025 };
        const double b[] = { 0.5, 0.8 }, eta[] = { 1, 0.8 }, dout[] = { 1, 1 }, dht[] = { 0.5, 2 };
        for (int kz = 0; kz < 2; kz++) {
            fam f = ex_make(kz ? KLA_MODE_KLA : KLA_MODE_GDN, 1, 0, q, k, v, g, kz ? eta : b);
            f.o.eps = 0;
            memcpy(f.dout, dout, sizeof dout), memcpy(f.dht, dht, sizeof dht);
            res_alloc(&r, &f);
            int ok = fam_run(ctx, &f, KLA_ALGO_RECURRENT, 64, 1, &r) == 0;
            const double o[] = { 1, 2.75 }, ht[] = { 2.5, 0.25 }, dq[] = { 1, 1, 2.5, 0.25 }, dv[] = { 0.95, 1.2 };
            const double dg[] = { 0, 0, 0.15, 0.75 }, dk0[] = { 1.15, 0.75, 2.4, 5.7 }, dk1[] = { -0.75, -1.15, -3.6, 5.7 };
            const double db[] = { 3.8, 3.75 }, de[] = { 1.9, 3.75 };
            double w = 0;
            ok = ok && near(r.o, o, 2, 1e-14, &err), w = fmax(w, err);
            ok = ok && near(r.ht, ht, 2, 1e-14, &err), w = fmax(w, err);
            ok = ok && near(r.d[Q], dq, 4, 1e-14, &err), w = fmax(w, err);
            ok = ok && near(r.d[Kk], kz ? dk1 : dk0, 4, 1e-14, &err), w = fmax(w, err);
            ok = ok && near(r.d[Vv], dv, 2, 1e-14, &err), w = fmax(w, err);
            ok = ok && near(r.d[G], dg, 4, 1e-14, &err), w = fmax(w, err);
            ok = ok && near(r.d[A], kz ? de : db, 2, 1e-14, &err), w = fmax(w, err);
            check(ok, "notes 1.8, %s: o, ht and every gradient by hand (worst %.1e)", kz ? "Kaczmarz-KDA" : "KDA", w);
            res_free(&r);
            fam_free(&f);
        }
    }
    /* EX2 (PGDN, x = 4, c = 0, eps_s -> 0) and EX2K (eta = 1, eps = 0) */
    {
        const double q[] = { 1, 0, 0.6, 0.8 }, v[] = { 3, 1 }, g[] = { 0, ln05 }, b[] = { 0.5, 0.5 }, eta[] = { 1, 1 };
        const double ga[] = { -1, 0 }, ba[] = { e1, 0 }, c[] = { 0 }, a0[] = { 0, e2 };
        for (int kz = 0; kz < 2; kz++) {
            fam f = ex_make(kz ? KLA_MODE_KLA : KLA_MODE_GDN, 0, 1, q, q, v, g, kz ? eta : b);
            set(&f, GATK, ga), set(&f, BATK, ba), set(&f, LATK, c), set(&f, A0, a0);
            f.o.squash_x = 4, f.o.squash_eps = 1e-300, f.o.eps = 0;
            res_alloc(&r, &f);
            int ok = fam_run(ctx, &f, KLA_ALGO_RECURRENT, 64, 0, &r) == 0;
            const double o[] = { 3, 0.952 }, ht[] = { 1.56, 0.02 }, ok2[] = { 3, 1 }, htk[] = { 21.0 / 13, 1.0 / 26 };
            const double at[] = { e1, exp(1.0) };
            double w = 0;
            ok = ok && near(r.o, kz ? ok2 : o, 2, 1e-14, &err), w = fmax(w, err);
            ok = ok && near(r.ht, kz ? htk : ht, 2, 1e-14, &err), w = fmax(w, err);
            ok = ok && near(r.at, at, 2, 1e-14, &err), w = fmax(w, err);
            check(ok, "notes %s: o, ht and at by hand (worst %.1e)", kz ? "EX2K (an exact projection: o2 = 1)" : "EX2",
                  w);
            res_free(&r);
            fam_free(&f);
        }
    }
    /* EX3 to EX6 (l2norm: fla's x / ||x|| in the notes, the spec's x / sqrt(||x||^2 + 1e-6)
     * here, which moves them by up to about 3e-7) */
    {
        const double q[] = { 1, 2, -1, 0.5 }, k[] = { 2, 1, 1, -3 }, v[] = { 1, -2 }, g[] = { log(0.9), log(0.5) };
        const double g4[] = { log(0.9), log(0.7), log(0.5), log(0.95) }, b[] = { 0.7, 0.4 }, h0[] = { 0.1, -0.2 };
        const double ga[] = { log(0.8), log(0.6) }, ba[] = { 0.5, 0.9 }, c[] = { -0.2 }, a0[] = { 0.3, 0.05 };
        const double dout[] = { 1, -0.5 }, dht[] = { 0.3, -0.2 };
        static const struct {
            const char *name;
            int mode, chan, l2k;
            double o[2], ht[2], da[2], dlc;
        } ex[] = {
            { "EX3 (PGDN)", KLA_MODE_GDN, 0, 1, { 0.385617550675, 0.212627964402 }, { 0.090091265202, 0.85257119216 },
              { 0.894623002471, -1.115369891454 }, -0.005117757389 },
            { "EX4 (PKDA)", KLA_MODE_GDN, 1, 1, { 0.402490284856, 0.231774921639 }, { 0.102668390857, 0.9382734386 },
              { 0.840721981188, -1.044655422726 }, -0.000903518313 },
            { "EX5 (KLA under preconditioning, l2norm q and k)", KLA_MODE_KLA, 0, 1,
              { 0.332973366725, 0.23724330962 }, { 0.046715349767, 0.843659917571 },
              { 0.794959962551, -1.136105092796 }, 0.007421995243 },
            { "EX6 (KLA under preconditioning, raw keys)", KLA_MODE_KLA, 0, 0, { 0.11049722673, 0.030217815194 },
              { 0.081584927487, 0.258726976901 }, { 0.362163119469, -0.375866997391 }, 0.000897758312 },
        };
        for (size_t e = 0; e < sizeof ex / sizeof ex[0]; e++) {
            fam f;
            fam_make(&f, ex[e].mode, ex[e].chan, 1, 1, 2, 1, 1, 2, 1, NULL, 0, 0);
            set(&f, Q, q), set(&f, Kk, k), set(&f, Vv, v), set(&f, G, ex[e].chan ? g4 : g), set(&f, A, b);
            set(&f, H0, h0), set(&f, GATK, ga), set(&f, BATK, ba), set(&f, LATK, c), set(&f, A0, a0);
            memcpy(f.dout, dout, sizeof dout), memcpy(f.dht, dht, sizeof dht), memset(f.dat, 0, 2 * sizeof(double));
            f.o.l2norm_q = 1, f.o.l2norm_k = ex[e].l2k;
            res_alloc(&r, &f);
            int ok = fam_run(ctx, &f, KLA_ALGO_RECURRENT, 64, 1, &r) == 0;
            const double at[] = { ex[e].l2k ? 0.474 : 2.244, ex[e].l2k ? 0.894 : 8.424 };
            double w = 0;
            ok = ok && near(r.o, ex[e].o, 2, 3e-7, &err), w = fmax(w, err);
            ok = ok && near(r.ht, ex[e].ht, 2, 3e-7, &err), w = fmax(w, err);
            ok = ok && near(r.at, at, 2, 3e-6, &err), w = fmax(w, err);
            ok = ok && near(r.d[A], ex[e].da, 2, 3e-7, &err), w = fmax(w, err);
            ok = ok && near(r.d[LATK], &ex[e].dlc, 1, 3e-7, &err), w = fmax(w, err);
            check(ok, "notes %s: o, ht, at, d%s, dlog_atk_scale (worst %.1e; the spec's l2norm moves them)", ex[e].name,
                  ex[e].mode == KLA_MODE_KLA ? "eta" : "beta", w);
            res_free(&r);
            fam_free(&f);
        }
    }
}

/* ---- properties -------------------------------------------------------------------------- */

static double rel(const double *a, const double *b, int64_t n)
{
    double d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) d += (a[i] - b[i]) * (a[i] - b[i]), s += b[i] * b[i];
    return s > 0 ? sqrt(d / s) : sqrt(d);
}

/* The decode tensors of token t of a one-sequence problem (B = 1): q k v g eta, with atk
 * g_atk beta_atk log_atk_scale, and o into that token's slice of o. */
static KlaTensors token(const fam *f, int64_t t, int atk, double *o)
{
    const int64_t H = f->s.H, HV = f->s.HV, K = f->s.K, V = f->s.V;
    const int64_t gw = f->n[G] / f->s.T; /* HV, or HV K per channel */
    KlaTensors d;
    memset(&d, 0, sizeof d);
    d.q = KLA_F64_IN(f->x[Q] + t * H * K, H * K), d.k = KLA_F64_IN(f->x[Kk] + t * H * K, H * K);
    d.v = KLA_F64_IN(f->x[Vv] + t * HV * V, HV * V), d.g = KLA_F64_IN(f->x[G] + t * gw, gw);
    d.eta = KLA_F64_IN(f->x[A] + t * HV, HV);
    if (atk) {
        d.g_atk = KLA_F64_IN(f->x[GATK] + t * H, H), d.beta_atk = KLA_F64_IN(f->x[BATK] + t * H, H);
        d.log_atk_scale = KLA_F64_IN(f->x[LATK], H);
    }
    d.o = KLA_F64_OUT(o + t * HV * V, HV * V);
    return d;
}

/* Decode token by token (carrying state and astate) equals forward; after each token of
 * mode kla with eta = 1, eps = 0, k_t^T S_t = v_t^T (kw writes, k reads). */
static void check_projection_decode(KlaContext *ctx)
{
    for (int v = 0; v < 3; v++) {
        const int chan = v != 1, atk = v != 0;
        fam f;
        fam_make(&f, KLA_MODE_KLA, chan, atk, 1, 12, 1, 2, 4, 3, NULL, 0, 0);
        for (int64_t i = 0; i < f.n[A]; i++) f.x[A][i] = 1;
        f.o.eps = 0;
        const int64_t K = 4, V = 3, HV = 2, H = 1, T = 12;
        double *state = malloc((size_t)f.nst * sizeof(double)), *astate = malloc((size_t)(f.nat ? f.nat : 1) * sizeof(double));
        double *o = calloc((size_t)f.no, sizeof(double));
        memcpy(state, f.x[H0], (size_t)f.nst * sizeof(double));
        if (atk) memcpy(astate, f.x[A0], (size_t)f.nat * sizeof(double));
        double proj = 0;
        int rc = 0;
        for (int64_t t = 0; t < T && !rc; t++) {
            KlaTensors d = token(&f, t, atk, o);
            if (atk) d.astate = KLA_F64_OUT(astate, f.nat);
            d.state = KLA_F64_OUT(state, f.nst);
            KlaShape s1 = f.s;
            s1.T = 1;
            rc = kla_decode(ctx, &s1, &f.o, &d);
            for (int64_t hv = 0; hv < HV; hv++)
                for (int64_t j = 0; j < V; j++) {
                    double s = 0;
                    for (int64_t i = 0; i < K; i++) s += f.x[Kk][t * H * K + i] * state[(hv * K + i) * V + j];
                    proj = fmax(proj, fabs(s - f.x[Vv][(t * HV + hv) * V + j]));
                }
        }
        res r;
        res_alloc(&r, &f);
        rc |= fam_run(ctx, &f, KLA_ALGO_CHUNK, 16, 0, &r);
        const char *var = v == 0 ? "gate channel" : v == 1 ? "precond atk" : "gate channel and precond atk";
        check(!rc && proj < 1e-12, "exact projection, mode kla %s, eta 1, eps 0: k_t^T S_t = v_t^T after every "
              "token (worst %.1e)", var, proj);
        double e = fmax(rel(o, r.o, f.no), rel(state, r.ht, f.nst));
        if (atk) e = fmax(e, rel(astate, r.at, f.nat));
        check(!rc && e < 1e-13, "decode token by token (state%s carried) equals forward, %s (%.1e)",
              atk ? " and ATK state" : "", var, e);
        res_free(&r);
        free(state), free(astate), free(o);
        fam_free(&f);
    }
}

/* kla_decode_state with a KlaState holding the ATK state (kla_state_new_atk) equals forward */
static void check_state_atk(KlaContext *ctx)
{
    fam f;
    fam_make(&f, KLA_MODE_KLA, 1, 1, 1, 15, 2, 4, 3, 2, NULL, 0, 0);
    const int64_t H = 2, HV = 4, K = 3, V = 2, T = 15;
    KlaState *ks = NULL;
    int rc = kla_state_new_atk(ctx, 1, H, HV, K, V, &ks);
    if (!rc) rc = kla_state_write(ks, KLA_F64_IN(f.x[H0], f.nst), KLA_LAYOUT_KV);
    if (!rc) rc = kla_state_write_atk(ks, KLA_F64_IN(f.x[A0], f.nat));
    double *o = calloc((size_t)f.no, sizeof(double)), *ht = calloc((size_t)f.nst, sizeof(double));
    double *at = calloc((size_t)f.nat, sizeof(double));
    for (int64_t t = 0; t < T && !rc; t++) {
        KlaTensors d = token(&f, t, 1, o);
        KlaShape s1 = f.s;
        s1.T = 1;
        rc = kla_decode_state(ctx, &s1, &f.o, &d, ks);
    }
    if (!rc) rc = kla_state_read(ks, KLA_F64_OUT(ht, f.nst), KLA_LAYOUT_KV);
    if (!rc) rc = kla_state_read_atk(ks, KLA_F64_OUT(at, f.nat));
    res r;
    res_alloc(&r, &f);
    rc |= fam_run(ctx, &f, KLA_ALGO_RECURRENT, 64, 0, &r);
    double e = fmax(fmax(rel(o, r.o, f.no), rel(ht, r.ht, f.nst)), rel(at, r.at, f.nat));
    check(!rc && e < 1e-14, "kla_decode_state with kla_state_new_atk (Kaczmarz-PKDA, H 2, HV 4) equals forward: "
          "o, states and ATK states (%.1e%s%s)", e, rc ? ", " : "", rc ? kla_error_detail(ctx) : "");
    res_free(&r);
    kla_state_free(&ks);
    free(o), free(ht), free(at);
    fam_free(&f);
}

static void check_equivalences(KlaContext *ctx)
{
    /* a channel gate with equal channels is gate head: o, ht, and dg summed over channels */
    for (int atk = 0; atk < 2; atk++)
        for (int a = 0; a < 2; a++) {
            fam fh, fc;
            rng_state = 77 + (uint64_t)atk;
            fam_make(&fh, KLA_MODE_KLA, 0, atk, 1, 40, 1, 2, 4, 3, NULL, 0, 0);
            rng_state = 77 + (uint64_t)atk;
            fam_make(&fc, KLA_MODE_KLA, 1, atk, 1, 40, 1, 2, 4, 3, NULL, 0, 0);
            /* same draws except g: give the channel gate the head's values */
            for (int i = 0; i < NX; i++)
                if (i != G && fh.x[i]) memcpy(fc.x[i], fh.x[i], (size_t)fh.n[i] * sizeof(double));
            memcpy(fc.dout, fh.dout, (size_t)fh.no * sizeof(double)), memcpy(fc.dht, fh.dht, (size_t)fh.nst * sizeof(double));
            if (atk) memcpy(fc.dat, fh.dat, (size_t)fh.nat * sizeof(double));
            for (int64_t i = 0; i < fh.n[G]; i++)
                for (int64_t c = 0; c < 4; c++) fc.x[G][i * 4 + c] = fh.x[G][i];
            res rh, rc_;
            res_alloc(&rh, &fh), res_alloc(&rc_, &fc);
            KlaAlgo al = a ? KLA_ALGO_CHUNK : KLA_ALGO_RECURRENT;
            int rc = fam_run(ctx, &fh, al, 16, 1, &rh) | fam_run(ctx, &fc, al, 16, 1, &rc_);
            double e = fmax(rel(rc_.o, rh.o, fh.no), rel(rc_.ht, rh.ht, fh.nst));
            for (int i = 0; i < NX; i++)
                if (i != G && fh.x[i]) e = fmax(e, rel(rc_.d[i], rh.d[i], fh.n[i]));
            double *dgs = calloc((size_t)fh.n[G], sizeof(double));
            for (int64_t i = 0; i < fh.n[G]; i++)
                for (int64_t c = 0; c < 4; c++) dgs[i] += rc_.d[G][i * 4 + c];
            e = fmax(e, rel(dgs, rh.d[G], fh.n[G]));
            check(!rc && e < 1e-13, "gate channel with equal channels = gate head%s, %s: outputs and gradients "
                  "(dg summed over channels) (%.1e)", atk ? " (precond atk)" : "", a ? "chunk" : "recurrent", e);
            free(dgs);
            res_free(&rh), res_free(&rc_);
            fam_free(&fh), fam_free(&fc);
        }
    /* PDN is PGDN with g = 0: g absent gives what g = 0 gives, dg included */
    {
        fam f;
        fam_make(&f, KLA_MODE_GDN, 0, 1, 2, 30, 2, 2, 4, 3, NULL, 0, 0);
        res r0, r1;
        res_alloc(&r0, &f), res_alloc(&r1, &f);
        for (int64_t i = 0; i < f.n[G]; i++) f.x[G][i] = 0;
        int rc = fam_run(ctx, &f, KLA_ALGO_CHUNK, 16, 1, &r0);
        double *g = f.x[G];
        f.x[G] = NULL;
        rc |= fam_run(ctx, &f, KLA_ALGO_CHUNK, 16, 1, &r1);
        f.x[G] = g;
        double e = fmax(rel(r1.o, r0.o, f.no), rel(r1.ht, r0.ht, f.nst));
        for (int i = 0; i < NX; i++)
            if (f.x[i]) e = fmax(e, rel(r1.d[i], r0.d[i], f.n[i]));
        check(!rc && e == 0, "PDN (g absent) = PGDN with g = 0: outputs and every gradient, dg included (%.1e)", e);
        res_free(&r0), res_free(&r1);
        fam_free(&f);
    }
}

/* Per-channel decays down to -5 and -20 per step over long sequences: the chunkwise form
 * evaluates only exp of numbers <= 0, so it stays finite and equal to the recurrent one
 * (ref64), and ref (float32) stays close. */
static void check_strong_decays(KlaContext *c64, KlaContext *c32)
{
    for (int s = 0; s < 2; s++) {
        fam f;
        fam_make(&f, s ? KLA_MODE_KLA : KLA_MODE_GDN, 1, s, 1, 2000, 1, 1, 8, 4, NULL, 0, 0);
        for (int64_t i = 0; i < f.n[G]; i++) f.x[G][i] = s ? (i % 3 == 1 ? -20.0 : -urand()) : -5 * urand();
        f.o.l2norm_q = f.o.l2norm_k = 1;
        res rr, rch, r32;
        res_alloc(&rr, &f), res_alloc(&rch, &f), res_alloc(&r32, &f);
        int rc = fam_run(c64, &f, KLA_ALGO_RECURRENT, 64, 1, &rr) | fam_run(c64, &f, KLA_ALGO_CHUNK, 128, 1, &rch);
        double e = fmax(rel(rch.o, rr.o, f.no), rel(rch.ht, rr.ht, f.nst)), e32;
        for (int i = 0; i < NX; i++)
            if (f.x[i]) e = fmax(e, rel(rch.d[i], rr.d[i], f.n[i]));
        /* float32: the same call with F64 tensors converted by the glue */
        rc |= fam_run(c32, &f, KLA_ALGO_CHUNK, 64, 1, &r32);
        e32 = fmax(rel(r32.o, rr.o, f.no), rel(r32.ht, rr.ht, f.nst));
        double eg = 0;
        for (int i = 0; i < NX; i++)
            if (f.x[i]) eg = fmax(eg, rel(r32.d[i], rr.d[i], f.n[i]));
        const char *what = s ? "g = -20 on every third element, Kaczmarz-PKDA" : "g uniform in [-5, 0], KDA";
        check(!rc && e < 1e-12, "%s, T 2000: chunk 128 = recurrent in float64, gradients included (%.1e)", what, e);
        check(!rc && e32 < 1e-5 && eg < 1e-4, "%s, T 2000: ref chunk 64 within 1e-5 (outputs, %.1e) and 1e-4 "
              "(gradients, %.1e) of ref64", what, e32, eg);
        res_free(&rr), res_free(&rch), res_free(&r32);
        fam_free(&f);
    }
}

/* ---- bad input ------------------------------------------------------------------------------ */

static void expect_refused(KlaContext *ctx, const char *what, fam *f, KlaTensors *t, int op, int code,
                           const char *msg)
{
    double *o = (double *)t->o.data;
    for (int64_t i = 0; o && i < t->o.numel; i++) o[i] = 12345;
    /* a snapshot of the inputs: nothing the caller passed is modified */
    double *snap[NX];
    for (int i = 0; i < NX; i++) {
        snap[i] = f->x[i] ? malloc((size_t)f->n[i] * sizeof(double)) : NULL;
        if (snap[i]) memcpy(snap[i], f->x[i], (size_t)f->n[i] * sizeof(double));
    }
    KlaShape s = f->s;
    if (op == 2) s.T = 1;
    int r = op == 0 ? kla_forward(ctx, &s, &f->o, t) : op == 1 ? kla_backward(ctx, &s, &f->o, t)
                                                              : kla_decode(ctx, &s, &f->o, t);
    const char *d = kla_error_detail(ctx);
    int untouched = 1;
    for (int64_t i = 0; o && i < t->o.numel; i++) untouched &= o[i] == 12345;
    for (int i = 0; i < NX; i++)
        if (snap[i]) untouched &= !memcmp(snap[i], f->x[i], (size_t)f->n[i] * sizeof(double)), free(snap[i]);
    check(r == code && strstr(d, msg) && untouched, "refused: %s (%d, \"%s\")", what, r, d);
}

static void check_errors(KlaContext *ctx, KlaContext *simd)
{
    fam f;
    fam_make(&f, KLA_MODE_KLA, 1, 1, 1, 6, 1, 2, 3, 2, NULL, 0, 0);
    double *o = calloc((size_t)f.no, sizeof(double)), *at = calloc((size_t)f.nat, sizeof(double));
    KlaTensors t = fam_tensors(&f);
    t.o = KLA_F64_OUT(o, f.no);
    KlaTensors u;

    u = t, u.g.numel = f.n[A]; /* a [B, T, HV] gate with gate channel */
    expect_refused(ctx, "g of the head gate's shape with gate channel", &f, &u, 0, KLA_EINVAL, "tensor g: 12 elements given, expected [B, T, HV, K]");
    u = t, u.beta_atk = (KlaIn){ 0 };
    expect_refused(ctx, "precond atk without beta_atk", &f, &u, 0, KLA_EINVAL, "tensor beta_atk: missing");
    f.o.squash_x = 1;
    expect_refused(ctx, "squash_x = 1", &f, &t, 0, KLA_EINVAL, "squash_x 1 must be finite and > 1");
    f.o.squash_x = 1.5, f.o.squash_eps = 0;
    expect_refused(ctx, "squash_eps = 0", &f, &t, 0, KLA_EINVAL, "squash_eps 0 must be finite and > 0");
    f.o.squash_eps = 1e-6;
    f.x[GATK][3] = 0.25;
    expect_refused(ctx, "g_atk > 0", &f, &t, 0, KLA_ERANGE, "tensor g_atk: value 0.25 > 0 at g_atk[0, 3, 0]");
    f.x[GATK][3] = -0.5, f.x[BATK][2] = -0.5;
    expect_refused(ctx, "beta_atk < 0", &f, &t, 0, KLA_ERANGE, "tensor beta_atk: value -0.5 < 0");
    f.x[BATK][2] = 0.5, f.x[A0][1] = -1;
    expect_refused(ctx, "a0 < 0", &f, &t, 0, KLA_ERANGE, "tensor a0: value -1 < 0");
    f.x[A0][1] = 1, f.x[G][5] = 0.5;
    expect_refused(ctx, "g > 0 per channel", &f, &t, 0, KLA_ERANGE, "tensor g: value 0.5 > 0 at g[0, 0, 1, 2]");
    f.x[G][5] = -0.5, f.x[LATK][0] = NAN;
    expect_refused(ctx, "log_atk_scale NaN", &f, &t, 0, KLA_ERANGE, "tensor log_atk_scale: NaN");
    f.x[LATK][0] = -0.2;
    u = t, u.log_atk_scale.numel = 2;
    expect_refused(ctx, "log_atk_scale of the wrong size", &f, &u, 0, KLA_EINVAL, "tensor log_atk_scale: 2 elements given, expected [H]");
    f.o.gate = 7;
    expect_refused(ctx, "gate 7", &f, &t, 0, KLA_EINVAL, "options: gate 7");
    f.o.gate = KLA_GATE_CHANNEL, f.o.precond = 3;
    expect_refused(ctx, "precond 3", &f, &t, 0, KLA_EINVAL, "options: precond 3");
    f.o.precond = KLA_PRECOND_NONE;
    expect_refused(ctx, "ATK tensors with precond none", &f, &t, 0, KLA_EINVAL, "tensor g_atk: not allowed without precond ATK");
    f.o.precond = KLA_PRECOND_ATK;
    u = t, u.dat = KLA_F64_IN(f.dat, f.nat);
    expect_refused(ctx, "dat in forward", &f, &u, 0, KLA_EINVAL, "tensor dat: not allowed outside backward");
    u = t, u.astate = KLA_F64_OUT(at, f.nat);
    expect_refused(ctx, "astate outside decode", &f, &u, 0, KLA_EINVAL, "tensor astate: not allowed outside decode");
    u = t, u.at = KLA_F64_OUT((double *)f.x[A0], f.nat);
    expect_refused(ctx, "at overlapping a0", &f, &u, 0, KLA_EINVAL, "tensor at: its memory overlaps input a0");

    /* decode: the ATK state is astate, not a0 */
    {
        fam d;
        fam_make(&d, KLA_MODE_GDN, 0, 1, 1, 1, 1, 1, 3, 2, NULL, 0, 0);
        double *od = calloc((size_t)d.no, sizeof(double)), *st = calloc((size_t)d.nst, sizeof(double));
        KlaTensors td = fam_tensors(&d);
        td.h0 = (KlaIn){ 0 }, td.o = KLA_F64_OUT(od, d.no), td.state = KLA_F64_OUT(st, d.nst);
        KlaTensors v = td;
        v.a0 = (KlaIn){ 0 };
        expect_refused(ctx, "decode with precond atk and no astate", &d, &v, 2, KLA_EINVAL, "tensor astate: missing");
        v = td;
        expect_refused(ctx, "decode with a0", &d, &v, 2, KLA_EINVAL, "tensor a0: not allowed in decode");
        KlaState *ks = NULL;
        int r = kla_state_new(ctx, 1, 1, 3, 2, &ks);
        v = td, v.a0 = (KlaIn){ 0 }, v.state = (KlaOut){ 0 };
        KlaShape s1 = d.s;
        r = r ? r : kla_decode_state(ctx, &s1, &d.o, &v, ks);
        check(r == KLA_EINVAL && strstr(kla_error_detail(ctx), "KlaState: made without the ATK state"),
              "refused: kla_decode_state with precond atk on a KlaState without one (%d, \"%s\")", r,
              kla_error_detail(ctx));
        kla_state_free(&ks);
        r = kla_state_new_atk(ctx, 1, 1, 1, 3, 2, &ks);
        double neg[3] = { 1, -1, 0 };
        int w = r ? r : kla_state_write_atk(ks, KLA_F64_IN(neg, 3));
        check(w == KLA_ERANGE && strstr(kla_error_detail(ctx), "tensor astate: value -1 < 0"),
              "refused: a negative ATK state written to a KlaState (\"%s\")", kla_error_detail(ctx));
        w = r ? r : kla_state_write_atk(ks, KLA_F64_IN(neg, 2));
        check(w == KLA_EINVAL && strstr(kla_error_detail(ctx), "expected [N, H, K]"),
              "refused: an ATK state of the wrong size (\"%s\")", kla_error_detail(ctx));
        KlaOptions on = d.o;
        on.precond = KLA_PRECOND_NONE;
        KlaTensors vn = v;
        vn.g_atk = vn.beta_atk = vn.log_atk_scale = (KlaIn){ 0 };
        w = r ? r : kla_decode_state(ctx, &s1, &on, &vn, ks);
        check(w == KLA_EINVAL && strstr(kla_error_detail(ctx), "holds an ATK state (kla_state_new_atk), but precond is none"),
              "refused: a KlaState with an ATK state and precond none (\"%s\")", kla_error_detail(ctx));
        kla_state_free(&ks);
        free(od), free(st);
        fam_free(&d);
    }
    /* a backend that does not run the family says so */
    if (simd) {
        int r = kla_forward(simd, &f.s, &f.o, &t);
        check(r == KLA_ENOSYS && strstr(kla_error_detail(simd), "backend simd does not run gate channel (KDA) yet"),
              "simd refuses gate channel by name (\"%s\")", kla_error_detail(simd));
        f.o.gate = KLA_GATE_HEAD;
        u = t, u.g = (KlaIn){ 0 };
        r = kla_forward(simd, &f.s, &f.o, &u);
        check(r == KLA_ENOSYS && strstr(kla_error_detail(simd), "does not run precond atk"),
              "simd refuses precond atk by name (\"%s\")", kla_error_detail(simd));
        KlaState *ks = NULL;
        r = kla_state_new_atk(simd, 1, 1, 2, 3, 2, &ks);
        check(r == KLA_ENOSYS && !ks && strstr(kla_error_detail(simd), "KlaState: backend simd does not run precond atk"),
              "simd refuses kla_state_new_atk by name (\"%s\")", kla_error_detail(simd));
    }
    free(o), free(at);
    fam_free(&f);
}

int main(int argc, char **argv)
{
    uint64_t seed = (uint64_t)time(NULL);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
    printf("# seed %llu (replay: test_family --seed %llu)\n", (unsigned long long)seed, (unsigned long long)seed);
    rng_state = seed * 2654435761u + 1;
    KlaParams p;
    kla_default_params(&p);
    KlaContext *c64 = NULL, *c32 = NULL, *simd = NULL;
    p.backend = "ref64";
    if (kla_open(&c64, &p) < 0) return printf("Bail out! ref64: %s\n", kla_error_detail(NULL)), 1;
    p.backend = "ref";
    if (kla_open(&c32, &p) < 0) return printf("Bail out! ref: %s\n", kla_error_detail(NULL)), 1;
    p.backend = "simd";
    if (kla_backend_available("simd") == 1) kla_open(&simd, &p);

    fd_cases(c64);
    check_examples(c64);
    check_projection_decode(c64);
    check_equivalences(c64);
    check_state_atk(c64);
    check_strong_decays(c64, c32);
    check_errors(c64, simd);

    kla_close(&c64), kla_close(&c32), kla_close(&simd);
    printf("1..%d\n# %d passed, %d failed (seed %llu)\n", n_test, n_test - n_fail, n_fail, (unsigned long long)seed);
    return n_fail ? 1 : 0;
}
