/*
 * validate.c: validate a kernel on one golden case, in plain C with libkla only.
 *
 *   validate CASE.safetensors [BACKEND]      (BACKEND: ref, ref64, simd, ...; default ref)
 *
 * Reads the case with the library's loader (kla_file_read + kla_file_problem: every
 * check `kla forward` makes, so nothing read from a malformed file is out of bounds),
 * runs the backward pass (which also writes o and ht) into float32 outputs, and compares
 * every expected tensor with the metric of kla-spec.md section 5: rel_rmse =
 * rms(ref - got) / rms(ref) <= the case's tol_float32 (MANIFEST.json's float32 set), and
 * every element within max(tol, 1e-4) * (|ref| + rms(ref)), as `kla verify` does. Prints
 * one line per tensor and exits 0 if all pass, 1 otherwise (2 on a usage error).
 *
 * To check your own kernel, replace run_kernel() below: it gets the case's inputs, each
 * with its dtype and element count, and writes float32 outputs of the sizes given.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kla.h"

/* ---- the kernel under test --------------------------------------------------------- */

/* Replace this with a call to your kernel: it gets the case's inputs in t and must write
 * o, ht and the gradients (float32 here). Returns 0 or a negative code. */
static int run_kernel(const char *backend, const KlaShape *s, const KlaOptions *opt,
                      const KlaTensors *t)
{
    KlaParams par;
    kla_default_params(&par);
    par.backend = backend;
    KlaContext *ctx;
    int r = kla_open(&ctx, &par);
    if (r < 0) {
        fprintf(stderr, "validate: %s\n", kla_error_detail(NULL));
        return r;
    }
    r = kla_backward(ctx, s, opt, t);
    if (r < 0) fprintf(stderr, "validate: %s\n", kla_error_detail(ctx));
    kla_close(&ctx);
    return r;
}

/* ---- comparison ---------------------------------------------------------------------- */

/* The case's float32 tolerance for name ("o=1e-05,ht=1e-05,dq=0.0001,..."), else the
 * defaults of kla verify. */
static double tol_for(const KlaFile *f, const char *name)
{
    const char *s = kla_file_meta(f, "tol_float32");
    const size_t nl = strlen(name);
    while (s && *s) {
        if (strncmp(s, name, nl) == 0 && s[nl] == '=') {
            char *end;
            double x = strtod(s + nl + 1, &end);
            if (end != s + nl + 1 && (*end == ',' || !*end) && isfinite(x) && x >= 0) return x;
            break;
        }
        s = strchr(s, ',');
        if (s) s++;
    }
    return name[0] == 'd' ? 1e-4 : 1e-5;
}

/* One line: name, PASS/FAIL, rel_rmse, the worst element against its bound and its index.
 * ref is F64 of n elements (checked by the caller). Returns 1 if pass. */
static int compare(const char *name, const KlaFileTensor *ref, const float *got, double tol)
{
    const double *r = ref->data;
    const int64_t n = ref->numel;
    double sd = 0, sr = 0;
    int64_t nonfinite = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) || !isfinite(r[i])) {
            nonfinite++;
            continue;
        }
        const double d = (double)got[i] - r[i];
        sd += d * d, sr += r[i] * r[i];
    }
    const double rms_ref = n ? sqrt(sr / (double)n) : 0;
    const double rel = sr > 0 ? sqrt(sd / sr) : sqrt(sd / (double)(n ? n : 1));
    const double etol = tol > 1e-4 ? tol : 1e-4;
    double worst = 0; /* |got - ref| / (|ref| + rms(ref)) */
    int64_t at = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) || !isfinite(r[i])) continue;
        const double e = fabs((double)got[i] - r[i]) / (fabs(r[i]) + rms_ref + 1e-300);
        if (e > worst) worst = e, at = i;
    }
    const int pass = nonfinite == 0 && rel <= tol && worst <= etol;
    char idx[128] = "";
    int64_t rest = at, ix[8] = { 0 };
    for (int d = ref->ndim - 1; d >= 0; d--) ix[d] = rest % ref->shape[d], rest /= ref->shape[d];
    size_t l = 0;
    for (int d = 0; d < ref->ndim && l < sizeof idx; d++)
        l += (size_t)snprintf(idx + l, sizeof idx - l, "%s%lld", d ? ", " : "", (long long)ix[d]);
    printf("%-6s %s  rel_rmse %.1e (tol %g)  worst element %.1e of its bound at %s[%s] (ref %.8g, got %.8g)%s\n",
           name, pass ? "PASS" : "FAIL", rel, tol, worst / etol, name, idx, n ? r[at] : 0.0,
           n ? (double)got[at] : 0.0, nonfinite ? "  non-finite values" : "");
    return pass;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: validate CASE.safetensors [BACKEND]\n");
        return 2;
    }
    const char *backend = argc > 2 ? argv[2] : "ref";
    KlaFile *f = NULL;
    KlaProblem P;
    /* the loader checks names, dtypes, shapes, options and cu_seqlens; a golden case
     * holds do, so the problem is the backward one */
    if (kla_file_read(argv[1], &f) < 0 || kla_file_problem(f, KLA_OP_BACKWARD, &P) < 0) {
        fprintf(stderr, "validate: %s\n", kla_error_detail(NULL));
        kla_file_free(&f);
        return 1;
    }
    const KlaShape *s = &P.shape;
    const int64_t nq = s->B * s->T * s->H * s->K, nv = s->B * s->T * s->HV * s->V;
    const int64_t ng = s->B * s->T * s->HV, nst = P.state_numel;

    /* outputs, float32 as a kernel would write them */
    const int kla = P.opt.mode == KLA_MODE_KLA;
    const char *const out_names[8] = { "o", "ht", "dq", "dk", "dv", "dg", kla ? "deta" : "dbeta", "dh0" };
    const int64_t out_n[8] = { nv, nst, nq, nq, nv, ng, ng, nst };
    float *out[8] = { NULL };
    int failed = 0, passed = 0;
    for (int i = 0; i < 8; i++)
        if (!(out[i] = calloc((size_t)out_n[i], sizeof(float)))) {
            fprintf(stderr, "validate: out of memory\n");
            failed = 1;
        }

    KlaTensors t = P.t;
    t.o = KLA_F32_OUT(out[0], nv);
    t.ht = KLA_F32_OUT(out[1], nst);
    t.dq = KLA_F32_OUT(out[2], nq);
    t.dk = KLA_F32_OUT(out[3], nq);
    t.dv = KLA_F32_OUT(out[4], nv);
    t.dg = KLA_F32_OUT(out[5], ng);
    if (kla) t.deta = KLA_F32_OUT(out[6], ng);
    else t.dbeta = KLA_F32_OUT(out[6], ng);
    if (t.h0.data) t.dh0 = KLA_F32_OUT(out[7], nst);

    if (!failed && run_kernel(backend, s, &P.opt, &t) < 0) failed = 1;
    for (int i = 0; i < 8 && !failed; i++) {
        KlaFileTensor ref;
        if (!kla_file_find(f, out_names[i], &ref)) continue;
        if (strcmp(ref.dtype, "F64") != 0 || ref.numel != out_n[i]) {
            printf("%-6s FAIL  expected an F64 tensor of %lld elements, the case has %s of %lld\n", out_names[i],
                   (long long)out_n[i], ref.dtype, (long long)ref.numel);
            failed++;
        } else if (compare(out_names[i], &ref, out[i], tol_for(f, out_names[i]))) {
            passed++;
        } else {
            failed++;
        }
    }
    printf("validate %s (backend %s): %d passed, %d failed\n", argv[1], backend, passed, failed);
    for (int i = 0; i < 8; i++) free(out[i]);
    kla_file_free(&f);
    return failed || !passed ? 1 : 0;
}
