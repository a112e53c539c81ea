/*
 * mqar.c: `kla train`, the KLA authors' MQAR experiment (notes: layer-and-mqar.md section
 * 4) on this library's training step: their data distribution (seeded; our generator, not
 * numpy's), their model and AdamW settings by default, a progress line per step,
 * validation every --eval-every steps with early stopping, checkpoints as safetensors
 * under the spec's names (--resume continues a run bit for bit), a JSON-lines log, and at
 * the end the accuracy of the best checkpoint at 1x, 2x, 4x and 8x the training length.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kla.h"
#include "safetensors.h"
#include "train.h"

/* ---- the data: the authors' generate_mqar_data ------------------------------------------ */

typedef struct Mqar {
    int64_t vocab, pairs, len, n; /* n examples of len tokens */
    int64_t *ids, *labels;        /* [n, len] */
} Mqar;

static uint64_t sm64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double unif(uint64_t *s) { return (double)(sm64(s) >> 11) * 0x1p-53; }
static int64_t below(uint64_t *s, int64_t n) { return (int64_t)(unif(s) * (double)n); }

/*
 * One example (their generator, key_len 1, power_law_alpha 0.1):
 *   keys from [0, V/2) and values from [V/2, V), D pairs drawn with replacement;
 *   seq[0 : 2D] = k0 v0 k1 v1 ...; seq[2D : L] = noise over the whole vocabulary;
 *   for the pairs in a shuffled order: pos = floor(x), x ~ p(x) ~ x^-0.1 on [2D, L - 2]
 *   (inverse CDF), seq[pos] = the key, label[pos] = its value (the value is not written
 *   after it; a later query at the same position overwrites an earlier one);
 *   every other label is -100.
 */
static void mqar_example(uint64_t *s, int64_t V, int64_t D, int64_t L, int64_t *ids, int64_t *lab)
{
    int64_t key[4096], val[4096], order[4096];
    for (int64_t i = 0; i < D; i++) key[i] = below(s, V / 2);
    for (int64_t i = 0; i < D; i++) val[i] = V / 2 + below(s, V - V / 2);
    for (int64_t i = 0; i < D; i++) ids[2 * i] = key[i], ids[2 * i + 1] = val[i];
    for (int64_t t = 2 * D; t < L; t++) ids[t] = below(s, V);
    for (int64_t t = 0; t < L; t++) lab[t] = -100;
    for (int64_t i = 0; i < D; i++) order[i] = i;
    for (int64_t i = D - 1; i > 0; i--) { /* Fisher-Yates */
        const int64_t j = below(s, i + 1), x = order[i];
        order[i] = order[j], order[j] = x;
    }
    const double lo = pow((double)(2 * D), 0.9), hi = pow((double)(L - 2), 0.9);
    for (int64_t i = 0; i < D; i++) {
        int64_t pos = (int64_t)floor(pow(unif(s) * (hi - lo) + lo, 1 / 0.9));
        if (pos < 2 * D) pos = 2 * D;
        if (pos > L - 2) pos = L - 2;
        ids[pos] = key[order[i]];
        lab[pos] = val[order[i]];
    }
}

static int mqar_make(Mqar *d, int64_t V, int64_t D, int64_t L, int64_t n, uint64_t seed)
{
    d->vocab = V, d->pairs = D, d->len = L, d->n = n;
    d->ids = malloc((size_t)(n * L) * sizeof *d->ids);
    d->labels = malloc((size_t)(n * L) * sizeof *d->labels);
    if (!d->ids || !d->labels) return -1;
    for (int64_t e = 0; e < n; e++) {
        uint64_t s = seed * 0x100000001B3ull + (uint64_t)e; /* one stream per example */
        mqar_example(&s, V, D, L, d->ids + e * L, d->labels + e * L);
    }
    return 0;
}

static void mqar_free(Mqar *d)
{
    free(d->ids), free(d->labels);
    memset(d, 0, sizeof *d);
}

/* ---- options ------------------------------------------------------------------------------- */

typedef struct Opts {
    KlaModelConfig cfg;
    KlaAdamW adam;
    int64_t pairs, seq_len, batch, steps, train_n, eval_n, eval_every, patience;
    uint64_t seed, data_seed;
    int factors[8], nfactors;
    const char *backend, *checkpoint, *resume, *log;
    int threads, bench, quiet;
} Opts;

static const char usage[] =
    "usage: kla train [options]\n"
    "MQAR (multi-query associative recall) as the KLA authors train it: a model of\n"
    "kla-spec.md 8.2 on their data distribution, AdamW with global-norm clipping, validation\n"
    "every --eval-every steps (early stop after --patience without a better accuracy), and\n"
    "at the end the best checkpoint's accuracy at 1x, 2x, 4x and 8x the training length.\n"
    "  --mixer kla|gdn        the operator (default kla; gdn is the Gated DeltaNet baseline)\n"
    "  --vocab N --d-model N --n-layer N --n-head N --d-k N --d-v N --d-ff N --norm-eps X\n"
    "                         the model (default the authors': 8192 256 2 4 48 96 1024 1e-5)\n"
    "  --lr X --beta1 X --beta2 X --adam-eps X --weight-decay X --clip X\n"
    "                         AdamW (default 1e-3 0.9 0.95 1e-8 0.1 1.0, a constant lr)\n"
    "  --pairs N --seq-len N  MQAR pairs and training length (default 32, 256)\n"
    "  --batch N --steps N    (default 32, 10000)\n"
    "  --train-examples N --eval-examples N   (default 20000, 2000)\n"
    "  --eval-every N --patience N             (default 200, 10)\n"
    "  --eval-factors LIST    lengths of the final evaluation (default 1,2,4,8)\n"
    "  --seed N               model initialisation and batch order (default 42)\n"
    "  --data-seed N          the datasets (default 42: train 42, validation 43, test 44,\n"
    "                         f x length 1042 + f, as the authors' seeds)\n"
    "  --checkpoint FILE      written at every evaluation (FILE.best: the best one)\n"
    "  --resume FILE          continue a run from its checkpoint (same options)\n"
    "  --log FILE             JSON lines: every step, every evaluation, the final result\n"
    "  --backend B --threads N   (default: the library's choice, simd where built)\n"
    "  --bench N              time N steps and print step time and throughput, no training\n"
    "  --quiet                no progress lines on stdout\n";

static int parse_i64(const char *s, int64_t lo, int64_t *v)
{
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || end == s || *end || x < lo) return -1;
    *v = x;
    return 0;
}

static int parse_opts(int argc, char **argv, Opts *o)
{
    memset(o, 0, sizeof *o);
    kla_default_model_config(&o->cfg);
    kla_default_adamw(&o->adam);
    o->pairs = 32, o->seq_len = 256, o->batch = 32, o->steps = 10000, o->train_n = 20000, o->eval_n = 2000;
    o->eval_every = 200, o->patience = 10, o->seed = 42, o->data_seed = 42;
    o->factors[0] = 1, o->factors[1] = 2, o->factors[2] = 4, o->factors[3] = 8, o->nfactors = 4;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            return 0;
        }
        if (!strcmp(a, "--quiet")) {
            o->quiet = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "kla train: option '%s' needs a value\n%s", a, usage);
            return 2;
        }
        i++;
        struct { const char *name; int64_t *p; int64_t lo; } ints[] = {
            { "--vocab", &o->cfg.vocab, 2 }, { "--d-model", &o->cfg.d_model, 1 }, { "--n-layer", &o->cfg.n_layer, 1 },
            { "--n-head", &o->cfg.n_head, 1 }, { "--d-k", &o->cfg.d_k, 1 }, { "--d-v", &o->cfg.d_v, 1 },
            { "--d-ff", &o->cfg.d_ff, 1 }, { "--pairs", &o->pairs, 1 }, { "--seq-len", &o->seq_len, 4 },
            { "--batch", &o->batch, 1 }, { "--steps", &o->steps, 0 }, { "--train-examples", &o->train_n, 1 },
            { "--eval-examples", &o->eval_n, 1 }, { "--eval-every", &o->eval_every, 1 },
            { "--patience", &o->patience, 1 }, { "--bench", NULL, 1 },
        };
        struct { const char *name; double *p; } dbl[] = {
            { "--lr", &o->adam.lr }, { "--beta1", &o->adam.beta1 }, { "--beta2", &o->adam.beta2 },
            { "--adam-eps", &o->adam.eps }, { "--weight-decay", &o->adam.weight_decay }, { "--clip", &o->adam.clip },
            { "--norm-eps", &o->cfg.norm_eps },
        };
        int done = 0;
        for (size_t k = 0; k < sizeof ints / sizeof ints[0] && !done; k++)
            if (!strcmp(a, ints[k].name)) {
                int64_t x;
                if (parse_i64(v, ints[k].lo, &x) < 0) {
                    fprintf(stderr, "kla train: %s '%s': expected an integer >= %lld\n%s", a, v, (long long)ints[k].lo,
                            usage);
                    return 2;
                }
                if (ints[k].p) *ints[k].p = x;
                else o->bench = (int)(x > 100000 ? 100000 : x);
                done = 1;
            }
        for (size_t k = 0; k < sizeof dbl / sizeof dbl[0] && !done; k++)
            if (!strcmp(a, dbl[k].name)) {
                char *end;
                double x = strtod(v, &end);
                if (end == v || *end || !isfinite(x)) {
                    fprintf(stderr, "kla train: %s '%s': expected a number\n%s", a, v, usage);
                    return 2;
                }
                *dbl[k].p = x;
                done = 1;
            }
        if (done) continue;
        if (!strcmp(a, "--mixer")) {
            if (!strcmp(v, "kla")) o->cfg.mixer = KLA_MIXER_KLA;
            else if (!strcmp(v, "gdn")) o->cfg.mixer = KLA_MIXER_GDN;
            else {
                fprintf(stderr, "kla train: --mixer '%s': expected kla or gdn\n%s", v, usage);
                return 2;
            }
        } else if (!strcmp(a, "--seed") || !strcmp(a, "--data-seed")) {
            int64_t x;
            if (parse_i64(v, 0, &x) < 0) {
                fprintf(stderr, "kla train: %s '%s': expected an integer >= 0\n", a, v);
                return 2;
            }
            *(!strcmp(a, "--seed") ? &o->seed : &o->data_seed) = (uint64_t)x;
        } else if (!strcmp(a, "--eval-factors")) {
            o->nfactors = 0;
            for (const char *p = v; *p && o->nfactors < 8;) {
                char *end;
                long f = strtol(p, &end, 10);
                if (end == p || f < 1 || f > 64 || (*end && *end != ',')) {
                    fprintf(stderr, "kla train: --eval-factors '%s': expected integers in [1, 64] joined by ','\n", v);
                    return 2;
                }
                o->factors[o->nfactors++] = (int)f;
                p = *end ? end + 1 : end;
            }
        } else if (!strcmp(a, "--checkpoint")) {
            o->checkpoint = v;
        } else if (!strcmp(a, "--resume")) {
            o->resume = v;
        } else if (!strcmp(a, "--log")) {
            o->log = v;
        } else if (!strcmp(a, "--backend")) {
            o->backend = v;
        } else if (!strcmp(a, "--threads")) {
            int64_t x;
            if (parse_i64(v, 0, &x) < 0 || x > KLA_MAX_THREADS) {
                fprintf(stderr, "kla train: --threads '%s': expected an integer in [0, %d]\n", v, KLA_MAX_THREADS);
                return 2;
            }
            o->threads = (int)x;
        } else {
            fprintf(stderr, "kla train: unknown option '%s'\n%s", a, usage);
            return 2;
        }
    }
    if (2 * o->pairs + 2 > o->seq_len || o->pairs > 4096 || o->cfg.vocab < 2 * o->pairs) {
        fprintf(stderr, "kla train: %lld pairs need --seq-len >= %lld (got %lld), at most 4096 pairs, and a vocab of at "
                "least 2 per pair\n", (long long)o->pairs, (long long)(2 * o->pairs + 2), (long long)o->seq_len);
        return 2;
    }
    return -1;
}

/* ---- evaluation, checkpoints ---------------------------------------------------------------- */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* accuracy (argmax == label over labelled positions) and mean loss on a dataset */
static int evaluate(KlaModel *m, KlaContext *ctx, const Mqar *d, int64_t batch, double *acc, double *loss)
{
    int64_t correct = 0, labelled = 0;
    double lsum = 0;
    for (int64_t e = 0; e < d->n; e += batch) {
        const int64_t B = e + batch <= d->n ? batch : d->n - e, n = B * d->len;
        KlaBatch b = { B, d->len, KLA_IN(d->ids + e * d->len, KLA_I64, n), KLA_IN(d->labels + e * d->len, KLA_I64, n) };
        KlaLoss l;
        if (kla_model_loss(m, &b, 0, &l) < 0) {
            fprintf(stderr, "kla train: evaluation: %s\n", kla_error_detail(ctx));
            return -1;
        }
        correct += l.correct, labelled += l.labelled, lsum += l.loss * (double)l.labelled;
    }
    *acc = labelled ? (double)correct / (double)labelled : 0;
    *loss = labelled ? lsum / (double)labelled : 0;
    return 0;
}

typedef struct Run {
    int64_t step, best_step, bad_evals, nonfinite;
    double best_acc, lr;
} Run;

/* parameters, AdamW moments and the run's counters, as a safetensors file */
static int save_checkpoint(const char *path, KlaModel *m, const Opts *o, const Run *r)
{
    OutList l = { 0 };
    int rc = -1;
    if (outlist_add_params(&l, m, KLA_PART_PARAM, "", ST_F32) < 0 ||
        outlist_add_params(&l, m, KLA_PART_ADAM_M, "adam_m.", ST_F32) < 0 ||
        outlist_add_params(&l, m, KLA_PART_ADAM_V, "adam_v.", ST_F32) < 0)
        goto done;
    const char *keys[32], *vals[32];
    char buf[32][32];
    int n = config_meta(&o->cfg, 0, keys, vals, buf);
    const char *rk[] = { "steps", "best_step", "bad_evals", "nonfinite", "seed" };
    const int64_t rv[] = { r->step, r->best_step, r->bad_evals, r->nonfinite, (int64_t)o->seed };
    for (int i = 0; i < 5; i++) {
        snprintf(buf[n], 32, "%lld", (long long)rv[i]);
        keys[n] = rk[i], vals[n] = buf[n];
        n++;
    }
    snprintf(buf[n], 32, "%.17g", r->best_acc);
    keys[n] = "best_acc", vals[n] = buf[n];
    n++;
    snprintf(buf[n], 32, "%.17g", r->lr);
    keys[n] = "lr_now", vals[n] = buf[n];
    n++;
    char err[512];
    if (st_write(path, l.t, l.n, keys, vals, n, err, sizeof err) < 0) {
        fprintf(stderr, "kla train: %s\n", err);
        goto done;
    }
    rc = 0;
done:
    outlist_free(&l);
    return rc;
}

static int meta_i64(const KlaFile *f, const char *key, int64_t *v)
{
    const char *s = kla_file_meta(f, key);
    return s && parse_i64(s, 0, v) == 0 ? 0 : -1;
}

/* A run killed while writing its log leaves a cut-off last line; a resumed run would append
 * after it and leave an unreadable line in the middle, so it goes (the steps after the
 * checkpoint are logged again anyway). */
static int trim_cut_line(FILE *f)
{
    if (fseeko(f, 0, SEEK_END) < 0) return -1;
    off_t end = ftello(f), pos = end;
    if (end <= 0) return 0;
    char buf[4096];
    while (pos > 0) {
        size_t n = pos < (off_t)sizeof buf ? (size_t)pos : sizeof buf;
        if (fseeko(f, pos - (off_t)n, SEEK_SET) < 0 || fread(buf, 1, n, f) != n) return -1;
        if (pos == end && buf[n - 1] == '\n') return 0;   /* ends cleanly */
        size_t i = n;
        while (i > 0 && buf[i - 1] != '\n') i--;
        if (i > 0) { pos = pos - (off_t)n + (off_t)i; break; }
        pos -= (off_t)n;
    }
    fflush(f);
    return ftruncate(fileno(f), pos);
}

/* the run continues from a checkpoint: same configuration, parameters, moments, counters */
static int load_checkpoint(const char *path, KlaModel *m, KlaContext *ctx, const Opts *o, Run *r)
{
    KlaFile *f = NULL;
    int rc = -1;
    KlaModelConfig c;
    if (kla_file_read(path, &f) < 0) {
        fprintf(stderr, "kla train: %s\n", kla_error_detail(NULL));
        return -1;
    }
    if (train_config_from_file(path, f, 0, &c) < 0) goto done;
    if (c.vocab != o->cfg.vocab || c.d_model != o->cfg.d_model || c.n_layer != o->cfg.n_layer ||
        c.n_head != o->cfg.n_head || c.d_k != o->cfg.d_k || c.d_v != o->cfg.d_v || c.d_ff != o->cfg.d_ff ||
        c.mixer != o->cfg.mixer) {
        fprintf(stderr, "kla train: %s: a checkpoint of another model (give the options of its run)\n", path);
        goto done;
    }
    for (int part = 0; part < 3; part++) {
        const char *pre = part == 0 ? "" : part == 1 ? "adam_m." : "adam_v.";
        for (int i = 0; i < kla_model_param_count(m); i++) {
            KlaParamInfo p;
            KlaFileTensor t;
            char name[160];
            kla_model_param_info(m, i, &p);
            snprintf(name, sizeof name, "%s%s", pre, p.name);
            if (!kla_file_find(f, name, &t) || t.numel != p.numel) {
                fprintf(stderr, "kla train: %s: tensor \"%s\" missing or of the wrong size\n", path, name);
                goto done;
            }
            if (kla_model_write(m, part == 0 ? KLA_PART_PARAM : part == 1 ? KLA_PART_ADAM_M : KLA_PART_ADAM_V, i,
                                t.in) < 0) {
                fprintf(stderr, "kla train: %s: %s\n", path, kla_error_detail(ctx));
                goto done;
            }
        }
    }
    const char *bs = kla_file_meta(f, "best_acc"), *ls = kla_file_meta(f, "lr_now");
    if (meta_i64(f, "steps", &r->step) < 0 || meta_i64(f, "best_step", &r->best_step) < 0 ||
        meta_i64(f, "bad_evals", &r->bad_evals) < 0 || meta_i64(f, "nonfinite", &r->nonfinite) < 0 || !bs || !ls) {
        fprintf(stderr, "kla train: %s: not a checkpoint of kla train (steps, best_acc, lr_now missing)\n", path);
        goto done;
    }
    r->best_acc = strtod(bs, NULL), r->lr = strtod(ls, NULL);
    kla_model_set_steps(m, r->step);
    rc = 0;
done:
    kla_file_free(&f);
    return rc;
}

/* the parameters, in one float vector (the best model of a run, kept for its final
 * evaluation) */
static float *snapshot(KlaModel *m, float *buf)
{
    int64_t n = 0;
    for (int i = 0; i < kla_model_param_count(m); i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        n += p.numel;
    }
    if (!buf && !(buf = malloc((size_t)n * sizeof *buf))) return NULL;
    int64_t o = 0;
    for (int i = 0; i < kla_model_param_count(m); i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        kla_model_read(m, KLA_PART_PARAM, i, KLA_OUT(buf + o, KLA_F32, p.numel));
        o += p.numel;
    }
    return buf;
}

static int restore(KlaModel *m, const float *buf)
{
    int64_t o = 0;
    for (int i = 0; i < kla_model_param_count(m); i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        if (kla_model_write(m, KLA_PART_PARAM, i, KLA_IN(buf + o, KLA_F32, p.numel)) < 0) return -1;
        o += p.numel;
    }
    return 0;
}

/* ---- the loop ------------------------------------------------------------------------------- */

static void hms(char *buf, size_t n, double s)
{
    if (!isfinite(s) || s < 0) s = 0;
    const long t = (long)s;
    if (t >= 3600) snprintf(buf, n, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
}

/* the batch order: a permutation of the training set per epoch, from (seed, epoch) */
static void epoch_order(uint64_t seed, int64_t epoch, int64_t n, int64_t *perm)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + (uint64_t)epoch;
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    for (int64_t i = n - 1; i > 0; i--) {
        const int64_t j = below(&s, i + 1), x = perm[i];
        perm[i] = perm[j], perm[j] = x;
    }
}

int train_main(int argc, char **argv)
{
    Opts o;
    int rc = parse_opts(argc, argv, &o);
    if (rc >= 0) return rc;
    rc = 1;
    KlaParams par;
    kla_default_params(&par);
    par.backend = o.backend, par.threads = o.threads;
    KlaContext *ctx = NULL;
    KlaModel *m = NULL;
    Mqar train = { 0 }, val = { 0 };
    int64_t *perm = NULL, *bids = NULL, *blab = NULL;
    float *best = NULL; /* the best parameters of this run */
    FILE *log = NULL;
    if (kla_open(&ctx, &par) < 0) {
        fprintf(stderr, "kla train: %s\n", kla_error_detail(NULL));
        return 1;
    }
    if (kla_model_new(ctx, &o.cfg, &m) < 0) {
        fprintf(stderr, "kla train: %s\n", kla_error_detail(ctx));
        goto done;
    }
    kla_model_init(m, o.seed);
    Run r = { .lr = o.adam.lr, .best_acc = -1 };
    if (o.resume && load_checkpoint(o.resume, m, ctx, &o, &r) < 0) goto done;
    const int64_t L = o.seq_len, B = o.batch;
    if (mqar_make(&train, o.cfg.vocab, o.pairs, L, o.bench ? B : o.train_n, o.data_seed) < 0 ||
        mqar_make(&val, o.cfg.vocab, o.pairs, L, o.bench ? 1 : o.eval_n, o.data_seed + 1) < 0 ||
        !(perm = malloc((size_t)train.n * sizeof *perm)) || !(bids = malloc((size_t)(B * L) * sizeof *bids)) ||
        !(blab = malloc((size_t)(B * L) * sizeof *blab))) {
        fprintf(stderr, "kla train: out of memory for the data\n");
        goto done;
    }
    if (o.log && !(log = fopen(o.log, o.resume ? "a+" : "w"))) {
        fprintf(stderr, "kla train: %s: %s\n", o.log, strerror(errno));
        goto done;
    }
    if (log && o.resume && trim_cut_line(log) < 0) {
        fprintf(stderr, "kla train: %s: cannot remove its cut-off last line: %s\n", o.log, strerror(errno));
        goto done;
    }
    char desc[256];
    kla_describe(ctx, desc, sizeof desc);
    int64_t np = 0;
    for (int i = 0; i < kla_model_param_count(m); i++) {
        KlaParamInfo p;
        kla_model_param_info(m, i, &p);
        np += p.numel;
    }
    if (!o.quiet)
        printf("kla train: MQAR, mixer %s, %lld parameters, %s; %lld pairs, length %lld, batch %lld, %s%lld steps\n",
               o.cfg.mixer == KLA_MIXER_GDN ? "gdn" : "kla", (long long)np, desc, (long long)o.pairs, (long long)L,
               (long long)B, o.resume ? "resuming, " : "", (long long)(o.bench ? o.bench : o.steps));
    fflush(stdout);
    const double t0 = now();
    const int64_t first = r.step;
    int64_t epoch = -1;
    const int64_t last = o.bench ? o.bench : o.steps;
    for (int64_t step = r.step; step < last; step++) {
        /* the batch: examples perm[step * B % n ...] of this epoch's permutation */
        for (int64_t i = 0; i < B; i++) {
            const int64_t k = step * B + i, e = k / train.n;
            if (e != epoch) epoch_order(o.seed, e, train.n, perm), epoch = e;
            const int64_t ex = perm[k % train.n];
            memcpy(bids + i * L, train.ids + ex * L, (size_t)L * sizeof *bids);
            memcpy(blab + i * L, train.labels + ex * L, (size_t)L * sizeof *blab);
        }
        KlaBatch b = { B, L, KLA_IN(bids, KLA_I64, B * L), KLA_IN(blab, KLA_I64, B * L) };
        KlaLoss l;
        double gnorm = NAN;
        const double ts = now();
        int e = kla_model_loss(m, &b, 1, &l);
        KlaAdamW a = o.adam;
        a.lr = r.lr;
        if (e == 0) e = kla_model_update(m, &a, &gnorm);
        const double dt = now() - ts;
        if (e == KLA_ERANGE) {
            /* the authors' rule: a non-finite loss or gradient skips the step and halves the
             * learning rate (floor 1e-6); 20 in a row end the run */
            r.lr = r.lr / 2 > 1e-6 ? r.lr / 2 : 1e-6;
            if (++r.nonfinite >= 20) {
                fprintf(stderr, "kla train: 20 non-finite steps in a row: stopping (%s)\n", kla_error_detail(ctx));
                goto done;
            }
            fprintf(stderr, "kla train: step %lld skipped: %s; lr now %g\n", (long long)step + 1, kla_error_detail(ctx),
                    r.lr);
            r.step = step + 1;
            continue;
        }
        if (e < 0) {
            fprintf(stderr, "kla train: step %lld: %s\n", (long long)step + 1, kla_error_detail(ctx));
            goto done;
        }
        r.nonfinite = 0;
        r.step = step + 1;
        const double acc = l.labelled ? (double)l.correct / (double)l.labelled : 0;
        const double el = now() - t0, left = el / (double)(r.step - first) * (double)(last - r.step);
        char eta[32];
        hms(eta, sizeof eta, left);
        if (!o.quiet)
            printf("step %6lld/%lld  loss %.4f  acc %.3f  |g| %.3f  %7.0f tok/s  %6.0f ms  left %s\n", (long long)r.step,
                   (long long)last, l.loss, acc, gnorm, (double)(B * L) / dt, dt * 1e3, eta);
        if (log)
            fprintf(log, "{\"step\": %lld, \"loss\": %.6g, \"acc\": %.6g, \"grad_norm\": %.6g, \"lr\": %.6g, "
                    "\"tokens_per_s\": %.6g, \"step_s\": %.6g, \"time_s\": %.6g}\n", (long long)r.step, l.loss, acc,
                    gnorm, r.lr, (double)(B * L) / dt, dt, el);
        fflush(stdout);
        if (o.bench) continue;
        if (r.step % o.eval_every == 0 || r.step == last) {
            double va, vl;
            if (evaluate(m, ctx, &val, B, &va, &vl) < 0) goto done;
            const int better = va > r.best_acc;
            if (better) r.best_acc = va, r.best_step = r.step, r.bad_evals = 0;
            else r.bad_evals++;
            if (better && !(best = snapshot(m, best))) {
                fprintf(stderr, "kla train: out of memory for the best parameters\n");
                goto done;
            }
            if (!o.quiet)
                printf("eval   step %lld: validation accuracy %.4f, loss %.4f (best %.4f at step %lld)\n",
                       (long long)r.step, va, vl, r.best_acc, (long long)r.best_step);
            if (log)
                fprintf(log, "{\"eval\": \"validation\", \"step\": %lld, \"acc\": %.6g, \"loss\": %.6g}\n",
                        (long long)r.step, va, vl);
            if (o.checkpoint) {
                char bp[4200];
                snprintf(bp, sizeof bp, "%s.best", o.checkpoint);
                if ((better && save_checkpoint(bp, m, &o, &r) < 0) || save_checkpoint(o.checkpoint, m, &o, &r) < 0)
                    goto done;
            }
            if (log) fflush(log);
            if (r.bad_evals >= o.patience) {
                if (!o.quiet) printf("early stop: %lld evaluations without a better accuracy\n", (long long)r.bad_evals);
                break;
            }
        }
    }
    if (o.bench) {
        rc = 0;
        goto done;
    }
    /* the final evaluation: the best parameters at each length (fresh examples, seeds
     * 1042 + f): this run's best, else (a run resumed after it) the best checkpoint */
    const char *which = "the best parameters";
    if (best) {
        if (restore(m, best) < 0) goto done;
    } else if (o.checkpoint) {
        char bp[4200];
        snprintf(bp, sizeof bp, "%s.best", o.checkpoint);
        Run rb;
        if (access(bp, R_OK) == 0 && load_checkpoint(bp, m, ctx, &o, &rb) < 0) goto done;
        if (access(bp, R_OK) != 0) which = "the last parameters (no best checkpoint)";
    } else if (r.best_step != r.step) {
        which = "the last parameters (the best are not known: resume with --checkpoint)";
    }
    if (!o.quiet) printf("final: %s (step %lld)\n", which, (long long)(best || r.best_step ? r.best_step : r.step));
    if (log) fprintf(log, "{\"final\": {\"best_step\": %lld, \"mixer\": \"%s\", \"seed\": %llu, \"acc\": {",
                     (long long)r.best_step, o.cfg.mixer == KLA_MIXER_GDN ? "gdn" : "kla", (unsigned long long)o.seed);
    for (int i = 0; i < o.nfactors; i++) {
        const int f = o.factors[i];
        Mqar ev = { 0 };
        double acc, loss;
        if (mqar_make(&ev, o.cfg.vocab, o.pairs, L * f, o.eval_n, f == 1 ? o.data_seed + 1 : o.data_seed + 1000 + f) <
                0 ||
            evaluate(m, ctx, &ev, B, &acc, &loss) < 0) {
            mqar_free(&ev);
            goto done;
        }
        mqar_free(&ev);
        if (!o.quiet) printf("  %dx (length %lld): accuracy %.4f, loss %.4f\n", f, (long long)(L * f), acc, loss);
        if (log) fprintf(log, "%s\"%d\": %.6g", i ? ", " : "", f, acc);
        fflush(stdout);
    }
    /* and the test set (seed + 2) at the training length */
    Mqar te = { 0 };
    double tacc, tloss;
    if (mqar_make(&te, o.cfg.vocab, o.pairs, L, o.eval_n, o.data_seed + 2) < 0 || evaluate(m, ctx, &te, B, &tacc, &tloss) < 0) {
        mqar_free(&te);
        goto done;
    }
    mqar_free(&te);
    if (!o.quiet) printf("  test (length %lld): accuracy %.4f\n", (long long)L, tacc);
    if (log) fprintf(log, "}, \"test\": %.6g}}\n", tacc);
    rc = 0;
done:
    if (log) fclose(log);
    mqar_free(&train), mqar_free(&val);
    free(perm), free(bids), free(blab), free(best);
    kla_model_free(&m);
    kla_close(&ctx);
    return rc;
}
