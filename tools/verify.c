/* verify.c: rel_rmse / max_abs comparison of safetensors tensors (kla-spec.md section 5). */
#include "verify.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

static const char *const output_names[] = { "o", "ht", "dq", "dk", "dv", "dg", "deta",
                                            "dbeta", "dh0", NULL };

int verify_is_output_name(const char *name)
{
    for (int i = 0; output_names[i]; i++)
        if (strcmp(name, output_names[i]) == 0) return 1;
    return 0;
}

double verify_default_tol(const char *name)
{
    if (verify_is_output_name(name) && name[0] == 'd') return 1e-4;
    return 1e-5;
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
    static const char *const d_qk[] = { "b", "t", "h", "k" };
    static const char *const d_vo[] = { "b", "t", "hv", "v" };
    static const char *const d_kv[] = { "n", "hv", "k", "v" };
    static const char *const d_vk[] = { "n", "hv", "v", "k" };
    const char *const *dn = NULL;
    int nd = t->ndim;
    if (nd == 4 && name_in(name, qk)) dn = d_qk;
    else if (nd == 4 && name_in(name, vo)) dn = d_vo;
    else if (nd == 3 && name_in(name, gb)) dn = d_vo;
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

int verify_tensor(FILE *out, const char *name, const st_tensor *ref, const st_tensor *got,
                  double tol, int vk)
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
    int pass = nbad == 0 && err <= tol; /* NaN err fails */

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
    }
    return pass;
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

    if (opt && opt->tensors) {
        const char *s = opt->tensors;
        while (*s) {
            size_t len = strcspn(s, ",");
            char name[128];
            if (len > 0 && len < sizeof name) {
                memcpy(name, s, len);
                name[len] = '\0';
                int ok = verify_tensor(out, name, st_find(ref, name), st_find(got, name),
                                       tol >= 0 ? tol : verify_default_tol(name), vk);
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
        for (int i = 0; output_names[i]; i++)
            if (st_find(ref, output_names[i])) any_out = 1;
        if (any_out) {
            for (int i = 0; output_names[i]; i++) {
                const char *name = output_names[i];
                const st_tensor *r = st_find(ref, name);
                if (!r) continue;
                int ok = verify_tensor(out, name, r, st_find(got, name),
                                       tol >= 0 ? tol : verify_default_tol(name), vk);
                if (ok) passed++; else failed++;
            }
        } else {
            for (int i = 0; i < ref->count; i++) {
                const char *name = ref->tensors[i].name;
                int ok = verify_tensor(out, name, &ref->tensors[i], st_find(got, name),
                                       tol >= 0 ? tol : verify_default_tol(name), vk);
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
