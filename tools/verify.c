/* verify.c: rel_rmse / max_abs comparison of safetensors tensors (kla-spec.md section 5). */
#include "verify.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char *const output_names[] = { "o", "ht", "dq", "dk", "dv", "dg", "deta", "dbeta", "dh0",
                                            "at", "dg_atk", "dbeta_atk", "dlog_atk_scale", "da0", NULL };

int verify_is_output_name(const char *name)
{
    for (int i = 0; output_names[i]; i++)
        if (strcmp(name, output_names[i]) == 0) return 1;
    /* the layer's and the training step's (kla-spec.md 8.3) */
    return !strcmp(name, "y") || !strcmp(name, "dx") || !strcmp(name, "loss") || !strncmp(name, "grad.", 5) ||
           !strncmp(name, "new.", 4);
}

double verify_default_tol(const char *name)
{
    if (verify_is_output_name(name) && (name[0] == 'd' || !strncmp(name, "grad.", 5))) return 1e-4;
    return 1e-5;
}

double verify_meta_tol(const st_file *ref, const char *key, const char *name)
{
    const char *s = ref ? st_meta(ref, key) : NULL;
    size_t nl = strlen(name);
    while (s && *s) {
        size_t len = strcspn(s, ",");
        if (len > nl && strncmp(s, name, nl) == 0 && s[nl] == '=') {
            char *end;
            double t = strtod(s + nl + 1, &end);
            if (end == s + len && isfinite(t) && t >= 0) return t;
            return -1;
        }
        s += len;
        if (*s == ',') s++;
    }
    return -1;
}

static int name_in(const char *name, const char *const *list)
{
    for (int i = 0; list[i]; i++)
        if (strcmp(name, list[i]) == 0) return 1;
    return 0;
}

void verify_format_index(char *buf, size_t n, const char *name, const st_tensor *t,
                         int vk, long long flat)
{
    static const char *const qk[] = { "q", "k", "dq", "dk", NULL };
    static const char *const vo[] = { "v", "o", "dv", "do", NULL };
    static const char *const gb[] = { "g", "eta", "beta", "dg", "deta", "dbeta", NULL };
    static const char *const st[] = { "h0", "ht", "dh0", "dht", NULL };
    static const char *const gc[] = { "g", "dg", NULL }; /* gate channel: [B, T, HV, K] */
    static const char *const ga[] = { "g_atk", "beta_atk", "dg_atk", "dbeta_atk", NULL };
    static const char *const as[] = { "a0", "at", "dat", "da0", NULL };
    static const char *const d_qk[] = { "b", "t", "h", "k" };
    static const char *const d_vo[] = { "b", "t", "hv", "v" };
    static const char *const d_gc[] = { "b", "t", "hv", "k" };
    static const char *const d_kv[] = { "n", "hv", "k", "v" };
    static const char *const d_vk[] = { "n", "hv", "v", "k" };
    static const char *const d_as[] = { "n", "h", "k" };
    const char *const *dn = NULL;
    int nd = t->ndim;
    if (nd == 4 && name_in(name, qk)) dn = d_qk;
    else if (nd == 4 && name_in(name, vo)) dn = d_vo;
    else if (nd == 3 && name_in(name, gb)) dn = d_vo;
    else if (nd == 4 && name_in(name, gc)) dn = d_gc;
    else if (nd == 3 && name_in(name, ga)) dn = d_qk;
    else if (nd == 3 && name_in(name, as)) dn = d_as;
    else if (nd == 1 && !strcmp(name, "dlog_atk_scale")) dn = d_as + 1;
    else if (nd == 4 && name_in(name, st)) dn = vk ? d_vk : d_kv;

    long long idx[ST_MAX_DIMS];
    long long rest = flat;
    for (int d = nd - 1; d >= 0; d--) {
        long long ext = t->shape[d] > 0 ? (long long)t->shape[d] : 1;
        idx[d] = rest % ext;
        rest /= ext;
    }
    size_t len = 0;
    int w = snprintf(buf, n, "%s[", name);
    if (w > 0) len = (size_t)w < n ? (size_t)w : n;
    for (int d = 0; d < nd && len < n; d++) {
        char dname[16];
        if (dn) snprintf(dname, sizeof dname, "%s", dn[d]);
        else snprintf(dname, sizeof dname, "i%d", d);
        w = snprintf(buf + len, n - len, "%s%s=%lld", d ? ", " : "", dname, idx[d]);
        if (w > 0) len += (size_t)w < n - len ? (size_t)w : n - len;
    }
    if (len < n) snprintf(buf + len, n - len, "]");
}

static double half_to_double(uint16_t h)
{
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v;
    if (e == 0) v = ldexp(m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexp(m + 1024, e - 25);
    return (h & 0x8000) ? -v : v;
}

/* 1 if the dtype converts to double here. */
static int readable(st_dtype d)
{
    return d != ST_F8_E4M3 && d != ST_F8_E5M2 && d < ST_DTYPE_COUNT;
}

static double get(const st_tensor *t, int64_t i)
{
    const unsigned char *p = (const unsigned char *)t->data + (size_t)i * st_dtype_size(t->dtype);
    switch (t->dtype) {
    case ST_F64: { double x; memcpy(&x, p, 8); return x; }
    case ST_F32: { float x; memcpy(&x, p, 4); return x; }
    case ST_F16: { uint16_t x; memcpy(&x, p, 2); return half_to_double(x); }
    case ST_BF16: { uint16_t x; memcpy(&x, p, 2); uint32_t u = (uint32_t)x << 16; float f;
                    memcpy(&f, &u, 4); return f; }
    case ST_I64: { int64_t x; memcpy(&x, p, 8); return (double)x; }
    case ST_I32: { int32_t x; memcpy(&x, p, 4); return x; }
    case ST_I16: { int16_t x; memcpy(&x, p, 2); return x; }
    case ST_I8: { int8_t x; memcpy(&x, p, 1); return x; }
    case ST_U64: { uint64_t x; memcpy(&x, p, 8); return (double)x; }
    case ST_U32: { uint32_t x; memcpy(&x, p, 4); return x; }
    case ST_U16: { uint16_t x; memcpy(&x, p, 2); return x; }
    case ST_U8: case ST_BOOL: return *p;
    default: return NAN;
    }
}

static void shape_str(char *buf, size_t n, const st_tensor *t)
{
    size_t len = 0;
    snprintf(buf, n, "[");
    len = strlen(buf);
    for (int d = 0; d < t->ndim && len + 1 < n; d++) {
        snprintf(buf + len, n - len, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
        len = strlen(buf);
    }
    if (len + 1 < n) snprintf(buf + len, n - len, "]");
}

/* Head dimension (and token dimension, or -1) of a tensor by its name; 0 if none. */
static int head_token_dims(const char *name, int nd, int *hdim, int *tdim)
{
    static const char *const qk[] = { "q", "k", "dq", "dk", NULL };
    static const char *const vo[] = { "v", "o", "dv", "do", NULL };
    static const char *const gb[] = { "g", "eta", "beta", "dg", "deta", "dbeta", NULL };
    static const char *const st[] = { "h0", "ht", "dh0", "dht", NULL };
    static const char *const gc[] = { "g", "dg", NULL };
    static const char *const ga[] = { "g_atk", "beta_atk", "dg_atk", "dbeta_atk", NULL };
    static const char *const as[] = { "a0", "at", "dat", "da0", NULL };
    if ((nd == 4 && (name_in(name, qk) || name_in(name, vo) || name_in(name, gc))) ||
        (nd == 3 && (name_in(name, gb) || name_in(name, ga)))) {
        *hdim = 2;
        *tdim = 1;
        return 1;
    }
    if ((nd == 4 && name_in(name, st)) || (nd == 3 && name_in(name, as))) {
        *hdim = 1;
        *tdim = -1;
        return 1;
    }
    return 0;
}

/* For a failing tensor: rel_rmse per head, and the first token whose error alone
 * exceeds tol (rms over the token's elements of ref - got, over rms(ref)). All
 * values are finite here; sums run in index order (python/kla/verify.py mirrors it). */
static void breakdown(FILE *out, const char *name, const st_tensor *ref, const st_tensor *got,
                      double tol, double rms_ref)
{
    int hdim, tdim;
    if (!head_token_dims(name, ref->ndim, &hdim, &tdim)) return;
    int64_t nh = ref->shape[hdim], inner = 1;
    for (int d = hdim + 1; d < ref->ndim; d++) inner *= ref->shape[d];
    if (nh < 1 || inner < 1) return;
    double *sd = calloc((size_t)nh, sizeof *sd), *sr = calloc((size_t)nh, sizeof *sr);
    if (!sd || !sr) {
        free(sd);
        free(sr);
        return;
    }
    for (int64_t i = 0; i < ref->numel; i++) {
        int64_t h = (i / inner) % nh;
        double r = get(ref, i), d = get(got, i) - r;
        sd[h] += d * d;
        sr[h] += r * r;
    }
    double per = (double)(ref->numel / nh);
    int64_t over = 0, shown = 0;
    /* tensors per key head (q, k, the ATK's) are broken down by h, the others by hv */
    static const char *const kh[] = { "q", "k", "dq", "dk", "g_atk", "beta_atk", "dg_atk", "dbeta_atk",
                                      "a0", "at", "dat", "da0", NULL };
    const char *hn = name_in(name, kh) ? "h" : "hv";
    for (int64_t h = 0; h < nh; h++) {
        double e = sr[h] > 0 ? sqrt(sd[h] / per) / sqrt(sr[h] / per) : sqrt(sd[h] / per);
        if (!(e <= tol)) over++;
        if (nh > 16 && e <= tol) continue;
        if (shown < 16)
            fprintf(out, "%s%s=%lld %.1e", shown ? ", " : "       by head: ", hn, (long long)h, e);
        shown++;
    }
    if (shown > 16) fprintf(out, ", ...");
    if (shown) fprintf(out, "  (%lld of %lld heads over tol)\n", (long long)over, (long long)nh);
    free(sd);
    free(sr);
    if (tdim < 0) return;
    int64_t block = 1, nt = ref->shape[1];
    for (int d = 2; d < ref->ndim; d++) block *= ref->shape[d];
    int64_t nblocks = block > 0 ? ref->numel / block : 0, first = -1, tover = 0;
    double first_e = 0;
    for (int64_t bk = 0; bk < nblocks; bk++) {
        double s = 0;
        for (int64_t j = bk * block; j < (bk + 1) * block; j++) {
            double d = get(got, j) - get(ref, j);
            s += d * d;
        }
        double e = sqrt(s / (double)block) / rms_ref;
        if (e > tol) {
            if (first < 0) {
                first = bk;
                first_e = e;
            }
            tover++;
        }
    }
    if (first >= 0)
        fprintf(out, "       first token over tol: %s[b=%lld, t=%lld], error %.1e  (%lld of %lld "
                "tokens over tol)\n", name, (long long)(first / nt), (long long)(first % nt),
                first_e, (long long)tover, (long long)nblocks);
}

int verify_tensor(FILE *out, const char *name, const st_tensor *ref, const st_tensor *got,
                  double tol, double elem, int vk)
{
    char a[160], b[160];
    if (!ref) {
        fprintf(out, "%-6s FAIL  missing in REF\n", name);
        return 0;
    }
    if (!got) {
        fprintf(out, "%-6s FAIL  missing in GOT\n", name);
        return 0;
    }
    int same = ref->ndim == got->ndim;
    for (int d = 0; same && d < ref->ndim; d++) same = ref->shape[d] == got->shape[d];
    if (!same) {
        shape_str(a, sizeof a, got);
        shape_str(b, sizeof b, ref);
        fprintf(out, "%-6s FAIL  shape %s in GOT, %s in REF\n", name, a, b);
        return 0;
    }
    if (!readable(ref->dtype) || !readable(got->dtype)) {
        fprintf(out, "%-6s FAIL  unsupported dtype %s (REF) / %s (GOT)\n", name,
                st_dtype_name(ref->dtype), st_dtype_name(got->dtype));
        return 0;
    }
    if (ref->numel == 0) {
        fprintf(out, "%-6s PASS  empty  (tol %g)\n", name, tol);
        return 1;
    }

    double sdiff = 0, sref = 0, sgot = 0, max_abs = 0;
    int64_t max_at = 0, bad_at = -1, nbad = 0;
    for (int64_t i = 0; i < ref->numel; i++) {
        double r = get(ref, i), g = get(got, i);
        if (!isfinite(r)) {
            /* a non-finite reference must be matched exactly */
            int match = (isnan(r) && isnan(g)) || r == g;
            if (!match && nbad++ == 0) bad_at = i;
            continue;
        }
        if (!isfinite(g)) {
            if (nbad++ == 0) bad_at = i;
            continue;
        }
        double d = g - r;
        sdiff += d * d;
        sref += r * r;
        sgot += g * g;
        if (fabs(d) > max_abs) { max_abs = fabs(d); max_at = i; }
    }
    double n = (double)ref->numel;
    double rms_ref = sqrt(sref / n);
    int rel = rms_ref > 0;
    double err = rel ? sqrt(sdiff / n) / rms_ref : sqrt(sgot / n);
    /* Elementwise: one value far off hides in the RMS of a large tensor (a single value
     * off by 0.1% moves rel_rmse by about 1e-3 / sqrt(n)). Each element must be within
     * etol * (|ref| + rms(ref)), etol = max(tol, 1e-4): float32 kernels stay well inside
     * (our float32 reference needs at most 5e-5 on the golden set). */
    const double etol = elem >= 0 ? elem : tol > VERIFY_ELEM_TOL ? tol : VERIFY_ELEM_TOL;
    int64_t nover = 0, worst_at = 0;
    double worst = 0;
    if (rel && nbad == 0)
        for (int64_t i = 0; i < ref->numel; i++) {
            const double r = get(ref, i), q = fabs(get(got, i) - r) / (fabs(r) + rms_ref);
            if (q > etol) nover++;
            if (q > worst) worst = q, worst_at = i;
        }
    int pass = nbad == 0 && err <= tol && nover == 0; /* NaN err fails */

    verify_format_index(a, sizeof a, name, ref, vk, (long long)max_at);
    fprintf(out, "%-6s %s  %s %.1e%s  max_abs %.1e at %s  (tol %g)\n", name,
            pass ? "PASS" : "FAIL", rel ? "rel_rmse" : "rms_got", err,
            rel ? "" : " (ref all zero)", max_abs, a, tol);
    if (nbad) {
        verify_format_index(a, sizeof a, name, ref, vk, (long long)bad_at);
        fprintf(out, "       %lld non-finite mismatch%s, first at %s: ref %.10g  got %.10g\n",
                (long long)nbad, nbad > 1 ? "es" : "", a, get(ref, bad_at), get(got, bad_at));
    } else if (!pass) {
        fprintf(out, "       at %s: ref %.10g  got %.10g\n", a, get(ref, max_at),
                get(got, max_at));
        if (nover) {
            verify_format_index(b, sizeof b, name, ref, vk, (long long)worst_at);
            fprintf(out, "       %lld element%s off by more than %g x (|ref| + rms(ref)), worst "
                    "%s: ref %.10g  got %.10g  (%.1e)\n", (long long)nover, nover > 1 ? "s" : "",
                    etol, b, get(ref, worst_at), get(got, worst_at), worst);
        }
        if (rel) breakdown(out, name, ref, got, tol, rms_ref);
    }
    return pass;
}

static double pick_tol(const st_file *ref, const char *key, double tol, const char *name)
{
    if (tol >= 0) return tol;
    double t = verify_meta_tol(ref, key, name);
    return t >= 0 ? t : verify_default_tol(name);
}

/* The element bound: bf16 set: REF's elem_bf16, else VERIFY_BF16_ELEM_FACTOR x the
 * rel_rmse bound; otherwise (-1) max(tol, VERIFY_ELEM_TOL). */
static double pick_elem(const st_file *ref, int bf16, double tol, double t, const char *name)
{
    if (!bf16 || tol >= 0) return -1;
    double e = verify_meta_tol(ref, "elem_bf16", name);
    return e >= 0 ? e : VERIFY_BF16_ELEM_FACTOR * t;
}

static int state_vk(const st_file *f)
{
    const char *s = st_meta(f, "state_layout");
    return s && strcmp(s, "vk") == 0;
}

int verify_files(FILE *out, const st_file *got, const st_file *ref, const VerifyOptions *opt)
{
    int vk = state_vk(ref) || state_vk(got);
    int passed = 0, failed = 0;
    double tol = opt ? opt->tol : -1;
    const int bf16 = opt && opt->tol_set && strcmp(opt->tol_set, "bf16") == 0;
    const char *key = bf16 ? "tol_bf16" : "tol_float32";

    if (opt && opt->tensors) {
        const char *s = opt->tensors;
        while (*s) {
            size_t len = strcspn(s, ",");
            char name[128];
            if (len > 0 && len < sizeof name) {
                memcpy(name, s, len);
                name[len] = '\0';
                const double t = pick_tol(ref, key, tol, name);
                int ok = verify_tensor(out, name, st_find(ref, name), st_find(got, name), t,
                                       pick_elem(ref, bf16, tol, t, name), vk);
                if (ok) passed++; else failed++;
            } else if (len > 0) {
                fprintf(out, "%.*s FAIL  name too long\n", (int)len, s);
                failed++;
            }
            s += len;
            if (*s == ',') s++;
        }
    } else {
        int any_out = 0;
        for (int i = 0; i < ref->count; i++)
            if (verify_is_output_name(ref->tensors[i].name)) any_out = 1;
        if (any_out) {
            for (int i = 0; i < ref->count; i++) {
                const char *name = ref->tensors[i].name;
                const st_tensor *r = &ref->tensors[i];
                if (!verify_is_output_name(name)) continue;
                const double t = pick_tol(ref, key, tol, name);
                int ok = verify_tensor(out, name, r, st_find(got, name), t,
                                       pick_elem(ref, bf16, tol, t, name), vk);
                if (ok) passed++; else failed++;
            }
        } else {
            for (int i = 0; i < ref->count; i++) {
                const char *name = ref->tensors[i].name;
                const double t = pick_tol(ref, key, tol, name);
                int ok = verify_tensor(out, name, &ref->tensors[i], st_find(got, name), t,
                                       pick_elem(ref, bf16, tol, t, name), vk);
                if (ok) passed++; else failed++;
            }
        }
    }
    if (passed + failed == 0) {
        fprintf(out, "verify: nothing to compare\n");
        return 1;
    }
    fprintf(out, "verify: %d passed, %d failed\n", passed, failed);
    return failed;
}
