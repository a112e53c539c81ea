/*
 * test_safetensors.c: TAP tests of the safetensors reader and writer (src/safetensors.c).
 *
 * Round trips through st_write/st_read, files built byte by byte for st_parse, and one
 * named test per kind of malformed input, each expecting failure with a message that
 * contains a meaningful word.
 */
#include "safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

static int n_run, n_failed;
static char tmpdir[64];

static void ok(bool cond, const char *name, const char *diag)
{
    n_run++;
    if (!cond)
        n_failed++;
    printf("%sok %d - %s\n", cond ? "" : "not ", n_run, name);
    if (!cond && diag && diag[0])
        printf("# %s\n", diag);
}

/* ---- building files by hand ---------------------------------------------------------- */

typedef struct {
    uint8_t *p;
    size_t n;
} bytes;

/* 8-byte length of hlen, header bytes, then dlen data bytes (0, 1, 2, ...). */
static bytes mkfile_n(const char *hdr, size_t hlen, size_t dlen)
{
    bytes b;
    b.n = 8 + hlen + dlen;
    b.p = malloc(b.n ? b.n : 1);
    for (int i = 0; i < 8; i++)
        b.p[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    memcpy(b.p + 8, hdr, hlen);
    for (size_t i = 0; i < dlen; i++)
        b.p[8 + hlen + i] = (uint8_t)i;
    return b;
}

static bytes mkfile(const char *hdr, size_t dlen) { return mkfile_n(hdr, strlen(hdr), dlen); }

static bool file_empty(const st_file *f)
{
    return f->tensors == NULL && f->count == 0 && f->meta_keys == NULL &&
           f->meta_values == NULL && f->meta_count == 0;
}

/* st_parse must fail, leave the output empty and say something containing word. */
static void expect_fail_buf(const char *name, const uint8_t *buf, size_t len, const char *word)
{
    st_file f;
    memset(&f, 0xAB, sizeof f);
    char err[512] = "";
    int rc = st_parse(buf, len, &f, err, sizeof err);
    char diag[700];
    snprintf(diag, sizeof diag, "rc=%d err=\"%s\", wanted \"%s\"", rc, err, word);
    bool good = rc == -1 && file_empty(&f) && strstr(err, word) != NULL;
    ok(good, name, diag);
    if (rc == 0)
        st_free(&f);
}

static void expect_fail(const char *name, const char *hdr, size_t dlen, const char *word)
{
    bytes b = mkfile(hdr, dlen);
    expect_fail_buf(name, b.p, b.n, word);
    free(b.p);
}

static void expect_ok(const char *name, const char *hdr, size_t dlen, st_file *f)
{
    bytes b = mkfile(hdr, dlen);
    char err[512] = "";
    int rc = st_parse(b.p, b.n, f, err, sizeof err);
    ok(rc == 0, name, err);
    free(b.p);
}

/* ---- helpers for files on disk ------------------------------------------------------- */

static void path_in(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", tmpdir, name);
}

/* Entries of tmpdir whose name contains ".tmp" (leftover temporaries). */
static int count_temps(void)
{
    DIR *d = opendir(tmpdir);
    int n = 0;
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".tmp"))
            n++;
    closedir(d);
    return n;
}

static bool exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void fill(void *p, size_t n, unsigned seed)
{
    uint8_t *b = p;
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b[i] = (uint8_t)x;
    }
}

static st_tensor mk_tensor(const char *name, st_dtype dt, int ndim, const int64_t *shape)
{
    st_tensor t;
    memset(&t, 0, sizeof t);
    t.name = (char *)name;
    t.dtype = dt;
    t.ndim = ndim;
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        t.shape[i] = shape[i];
        numel *= shape[i];
    }
    t.numel = numel;
    t.nbytes = (size_t)numel * st_dtype_size(dt);
    if (t.nbytes) {
        t.data = malloc(t.nbytes);
        fill(t.data, t.nbytes, (unsigned)strlen(name) * 31u + (unsigned)dt);
    }
    return t;
}

static bool same_tensor(const st_tensor *a, const st_tensor *b)
{
    if (strcmp(a->name, b->name) || a->dtype != b->dtype || a->ndim != b->ndim ||
        a->numel != b->numel || a->nbytes != b->nbytes)
        return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i])
            return false;
    if (a->nbytes == 0)
        return b->data == NULL;
    if (!b->data || ((uintptr_t)b->data % 64) != 0)
        return false;
    return memcmp(a->data, b->data, a->nbytes) == 0;
}

/* ---- round trips --------------------------------------------------------------------- */

static void test_dtypes(void)
{
    for (int d = 0; d < ST_DTYPE_COUNT; d++) {
        char path[128], name[96], err[512] = "";
        path_in(path, sizeof path, "dtype.safetensors");
        int64_t shape[3] = {2, 3, 5};
        st_tensor t = mk_tensor("x", (st_dtype)d, 3, shape);
        st_file f;
        bool good = st_write(path, &t, 1, NULL, NULL, 0, err, sizeof err) == 0 &&
                    st_read(path, &f, err, sizeof err) == 0;
        if (good) {
            good = f.count == 1 && same_tensor(&t, &f.tensors[0]) && f.meta_count == 0;
            st_free(&f);
        }
        snprintf(name, sizeof name, "round trip %s (size %zu)", st_dtype_name((st_dtype)d),
                 st_dtype_size((st_dtype)d));
        ok(good, name, err);
        free(t.data);
        unlink(path);
    }
}

static void test_dtype_names(void)
{
    static const char *const want[] = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8",
                                       "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2"};
    static const size_t sz[] = {8, 4, 2, 2, 8, 4, 2, 1, 8, 4, 2, 1, 1, 1, 1};
    bool good = true;
    for (int d = 0; d < ST_DTYPE_COUNT; d++)
        good = good && strcmp(st_dtype_name((st_dtype)d), want[d]) == 0 &&
               st_dtype_size((st_dtype)d) == sz[d];
    good = good && st_dtype_size(ST_DTYPE_COUNT) == 0 && st_dtype_name(ST_DTYPE_COUNT) != NULL;
    ok(good, "dtype names and sizes", "");
}

static void test_scalar_and_empty(void)
{
    char path[128], err[512] = "";
    path_in(path, sizeof path, "scalar.safetensors");
    int64_t zshape[2] = {0, 3};
    st_tensor ts[3];
    ts[0] = mk_tensor("s", ST_F64, 0, NULL);
    ts[1] = mk_tensor("z", ST_F32, 2, zshape);
    ts[2] = mk_tensor("after", ST_I32, 0, NULL);
    st_file f;
    bool wrote = st_write(path, ts, 3, NULL, NULL, 0, err, sizeof err) == 0;
    bool read = wrote && st_read(path, &f, err, sizeof err) == 0;
    bool good = read && f.count == 3;
    const st_tensor *s = good ? st_find(&f, "s") : NULL;
    ok(s && s->ndim == 0 && s->numel == 1 && s->nbytes == 8 && same_tensor(&ts[0], s),
       "scalar round trip", err);
    const st_tensor *z = good ? st_find(&f, "z") : NULL;
    ok(z && z->numel == 0 && z->nbytes == 0 && z->data == NULL && same_tensor(&ts[1], z),
       "zero-size tensor round trip", err);
    ok(good && same_tensor(&ts[2], st_find(&f, "after")) && f.tensors[0].name[0] == 's' &&
           f.tensors[1].name[0] == 'z' && f.tensors[2].name[0] == 'a',
       "tensors come back in data order", err);
    if (read)
        st_free(&f);
    for (int i = 0; i < 3; i++)
        free(ts[i].data);
    unlink(path);
}

static void test_metadata(void)
{
    char path[128], err[512] = "";
    path_in(path, sizeof path, "meta.safetensors");
    const char *keys[] = {"mode", "scale", "weird \"key\"\\", "ctl\n\t\x01", "utf8 \xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", ""};
    const char *vals[] = {"kla", "0.125", "v\"\\/", "line1\nline2\r\b\f", "\xe6\x97\xa5\xe6\x9c\xac", ""};
    int64_t shape[1] = {4};
    st_tensor t = mk_tensor("q", ST_F32, 1, shape);
    st_file f;
    bool good = st_write(path, &t, 1, keys, vals, 6, err, sizeof err) == 0 &&
                st_read(path, &f, err, sizeof err) == 0;
    if (good) {
        good = f.meta_count == 6 && f.count == 1 && same_tensor(&t, &f.tensors[0]);
        for (int i = 0; good && i < 6; i++)
            good = strcmp(f.meta_keys[i], keys[i]) == 0 && strcmp(f.meta_values[i], vals[i]) == 0 &&
                   st_meta(&f, keys[i]) != NULL && strcmp(st_meta(&f, keys[i]), vals[i]) == 0;
        good = good && st_meta(&f, "absent") == NULL && st_find(&f, "absent") == NULL;
        st_free(&f);
    }
    ok(good, "metadata round trip (escapes, UTF-8, empty strings, order)", err);

    /* __metadata__ is written first, the data area starts 8-aligned, no gaps */
    FILE *fp = fopen(path, "rb");
    uint8_t buf[512];
    size_t n = fp ? fread(buf, 1, sizeof buf, fp) : 0;
    if (fp)
        fclose(fp);
    uint64_t hl = 0;
    for (int i = 7; i >= 0 && n >= 8; i--)
        hl = (hl << 8) | buf[i];
    ok(n >= 8 && (8 + hl) % 8 == 0 && 8 + hl + 16 == n &&
           memcmp(buf + 8, "{\"__metadata__\":{\"mode\":\"kla\"", 29) == 0,
       "written layout: metadata first, data 8-aligned and contiguous", "");
    free(t.data);
    unlink(path);
}

static void test_many(void)
{
    enum { N = 1000 };
    char path[128], err[512] = "";
    path_in(path, sizeof path, "many.safetensors");
    st_tensor *ts = calloc(N, sizeof *ts);
    char(*names)[16] = calloc(N, sizeof *names);
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "t%04d", N - 1 - i);
        int64_t shape[2] = {1 + i % 3, 1 + i % 5};
        ts[i] = mk_tensor(names[i], (st_dtype)(i % ST_DTYPE_COUNT), 2, shape);
    }
    st_file f;
    bool good = st_write(path, ts, N, NULL, NULL, 0, err, sizeof err) == 0 &&
                st_read(path, &f, err, sizeof err) == 0;
    if (good) {
        good = f.count == N;
        for (int i = 0; good && i < N; i++)
            good = same_tensor(&ts[i], &f.tensors[i]) &&
                   st_find(&f, names[i]) == &f.tensors[i];
        st_free(&f);
    }
    ok(good, "1000 tensors round trip, order kept", err);
    for (int i = 0; i < N; i++)
        free(ts[i].data);
    free(ts);
    free(names);
    unlink(path);
}

static void test_names(void)
{
    char path[128], err[512] = "";
    path_in(path, sizeof path, "names.safetensors");
    const char *names[] = {"a\"b", "back\\slash", "tab\tnl\n", "\xc3\xa9t\xc3\xa9", "\x7f", "__metadata", " "};
    st_tensor ts[7];
    int64_t shape[1] = {3};
    for (int i = 0; i < 7; i++)
        ts[i] = mk_tensor(names[i], ST_I16, 1, shape);
    st_file f;
    bool good = st_write(path, ts, 7, NULL, NULL, 0, err, sizeof err) == 0 &&
                st_read(path, &f, err, sizeof err) == 0;
    if (good) {
        good = f.count == 7;
        for (int i = 0; good && i < 7; i++)
            good = same_tensor(&ts[i], st_find(&f, names[i]));
        st_free(&f);
    }
    ok(good, "tensor names needing escapes round trip", err);
    for (int i = 0; i < 7; i++)
        free(ts[i].data);
    unlink(path);
}

static void test_no_tensors(void)
{
    char path[128], err[512] = "";
    path_in(path, sizeof path, "none.safetensors");
    st_file f;
    bool good = st_write(path, NULL, 0, NULL, NULL, 0, err, sizeof err) == 0 &&
                st_read(path, &f, err, sizeof err) == 0;
    if (good) {
        good = file_empty(&f);
        st_free(&f);
    }
    ok(good, "file with no tensors and no metadata", err);
    const char *k[] = {"mode"}, *v[] = {"gdn"};
    good = st_write(path, NULL, 0, k, v, 1, err, sizeof err) == 0 &&
           st_read(path, &f, err, sizeof err) == 0;
    if (good) {
        good = f.count == 0 && f.meta_count == 1 && strcmp(st_meta(&f, "mode"), "gdn") == 0;
        st_free(&f);
    }
    ok(good, "file with metadata only", err);
    unlink(path);
}

static void test_overwrite(void)
{
    char path[128], err[512] = "";
    path_in(path, sizeof path, "over.safetensors");
    int64_t s1[1] = {100}, s2[1] = {2};
    st_tensor a = mk_tensor("a", ST_U8, 1, s1), b = mk_tensor("b", ST_F64, 1, s2);
    st_file f;
    bool good = st_write(path, &a, 1, NULL, NULL, 0, err, sizeof err) == 0 &&
                st_write(path, &b, 1, NULL, NULL, 0, err, sizeof err) == 0 &&
                st_read(path, &f, err, sizeof err) == 0;
    if (good) {
        good = f.count == 1 && same_tensor(&b, &f.tensors[0]);
        st_free(&f);
    }
    ok(good && count_temps() == 0, "st_write replaces an existing file", err);
    free(a.data);
    free(b.data);
    unlink(path);
}

/* ---- hand-built files that must parse ---------------------------------------------- */

static void test_parse_accepts(void)
{
    st_file f;
    /* header order differs from data order; misaligned offsets; a gap; trailing bytes */
    expect_ok("accepts misaligned offsets, gaps and out-of-order entries",
              "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[13,21]},"
              "\"a\":{\"dtype\":\"I16\",\"shape\":[3],\"data_offsets\":[1,7]}}",
              24, &f);
    bool good = f.count == 2 && strcmp(f.tensors[0].name, "a") == 0 &&
                strcmp(f.tensors[1].name, "b") == 0;
    const st_tensor *b = st_find(&f, "b");
    uint8_t want[8] = {13, 14, 15, 16, 17, 18, 19, 20};
    good = good && b && b->data && ((uintptr_t)b->data % 64) == 0 &&
           memcmp(b->data, want, 8) == 0 && b->numel == 2 && b->nbytes == 8;
    ok(good, "misaligned data copied to aligned buffers, sorted by offset", "");
    st_free(&f);

    expect_ok("accepts whitespace, padding and unknown keys",
              " \t\r\n{ \"x\" : { \"extra\" : [1, {\"a\": [true, false, null, -1.5e+3]}],"
              " \"dtype\" : \"U8\" , \"shape\" : [ 1 ] , \"data_offsets\" : [ 0 , 1 ] } }     ",
              1, &f);
    st_free(&f);

    expect_ok("accepts \\u escapes and surrogate pairs in names",
              "{\"\\u00e9\\u20AC\\ud83d\\ude00\\/\\b\":{\"dtype\":\"U8\",\"shape\":[],"
              "\"data_offsets\":[0,1]}}",
              1, &f);
    ok(f.count == 1 && strcmp(f.tensors[0].name, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80/\b") == 0,
       "\\u escapes decode to UTF-8", f.count ? f.tensors[0].name : "");
    st_free(&f);

    expect_ok("accepts \"__metadata__\": null and an empty object",
              "{\"__metadata__\":null}", 0, &f);
    st_free(&f);

    expect_ok("accepts zero-size tensors at the same offset as data",
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
              "\"e\":{\"dtype\":\"F32\",\"shape\":[0,7],\"data_offsets\":[2,2]},"
              "\"h\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,0],\"data_offsets\":[4,4]}}",
              4, &f);
    st_free(&f);

    expect_ok("accepts 8 dims", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,2],"
                                "\"data_offsets\":[0,2]}}", 2, &f);
    ok(f.count == 1 && f.tensors[0].ndim == 8 && f.tensors[0].numel == 2, "8 dims parsed", "");
    st_free(&f);

    /* nesting up to the limit is fine */
    char deep[400];
    size_t o = (size_t)snprintf(deep, sizeof deep, "{\"a\":{\"u\":");
    for (int i = 0; i < 62; i++)
        deep[o++] = '[';
    for (int i = 0; i < 62; i++)
        deep[o++] = ']';
    snprintf(deep + o, sizeof deep - o, ",\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}}");
    expect_ok("accepts nesting at the depth limit (64)", deep, 1, &f);
    st_free(&f);

    st_free(&f); /* st_free on an emptied file is harmless */
    st_free(NULL);
    ok(st_find(NULL, "x") == NULL && st_meta(NULL, "x") == NULL, "NULL-safe lookups", "");
}

/* ---- malformed input ----------------------------------------------------------------- */

#define T1 "{\"t\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}"

static void test_malformed(void)
{
    /* framing */
    expect_fail_buf("empty input", (const uint8_t *)"", 0, "truncated");
    expect_fail_buf("7-byte input", (const uint8_t *)"\x10\0\0\0\0\0\0", 7, "truncated");
    {
        bytes b = mkfile(T1, 24);
        b.p[0] = 0x88;
        b.p[1] = 0x13; /* 5000 */
        expect_fail_buf("header length past end of file", b.p, b.n, "header says 5000 bytes");
        memset(b.p, 0xFF, 8);
        expect_fail_buf("absurd header length (2^64-1)", b.p, b.n, "exceeds the limit");
        memset(b.p, 0, 8);
        b.p[0] = 0x01;
        b.p[2] = 0x40;
        b.p[3] = 0x06; /* 100 MiB + 1 */
        expect_fail_buf("header length just over 100 MiB", b.p, b.n, "exceeds the limit");
        memset(b.p, 0, 8);
        expect_fail_buf("header length 0", b.p, b.n, "JSON object");
        free(b.p);
    }
    expect_fail("truncated data area", T1, 20, "past the end");
    expect_fail("truncated JSON", "{\"t\":{\"dtype\":\"F32\",\"sha", 0, "unterminated");
    expect_fail("truncated JSON after a value", "{\"t\":{\"dtype\":\"F32\"", 0, "end of header");
    expect_fail("trailing garbage after the object", T1 "x", 24, "trailing garbage");
    expect_fail("two top-level objects", T1 "{}", 24, "trailing garbage");
    expect_fail("top level is an array", "[]", 0, "JSON object");
    expect_fail("byte-order mark", "\xef\xbb\xbf{}", 0, "JSON object");
    {
        bytes b = mkfile_n("{}\0", 3, 0);
        expect_fail_buf("trailing NUL padding", b.p, b.n, "trailing");
        free(b.p);
    }

    /* offsets */
    expect_fail("offsets past the end",
                "{\"t\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[8,32]}}", 24,
                "past the end of the data (24 bytes)");
    expect_fail("begin > end", "{\"t\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}",
                24, "begin is after end");
    expect_fail("negative offset",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[-2,0]}}", 24, "negative");
    expect_fail("offsets do not match shape",
                "{\"q\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,100]}}", 100,
                "tensor \"q\": data_offsets [0, 100] do not match shape [2, 3] F32 (24 bytes)");
    expect_fail("overlapping data ranges",
                "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[12,28]}}",
                28, "overlap");
    expect_fail("range inside another range",
                "{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]},"
                "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]}}",
                16, "overlap");
    expect_fail("identical data ranges",
                "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                "\"b\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[0,4]}}",
                4, "overlap");
    expect_fail("data_offsets with three entries",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 4, "two integers");
    expect_fail("data_offsets with one entry",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1]}}", 4, "two integers");
    expect_fail("data_offsets not an array",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":\"0,1\"}}", 4, "array");
    expect_fail("offset beyond int64",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,9223372036854775808]}}",
                4, "out of range");

    /* dtype */
    expect_fail("unknown dtype", "{\"t\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                4, "unknown dtype \"F33\"");
    expect_fail("lowercase dtype", "{\"t\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                4, "unknown dtype \"f32\"");
    expect_fail("dtype not a string", "{\"t\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}",
                4, "dtype must be a string");

    /* shapes */
    expect_fail("huge shape: element count overflows",
                "{\"t\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}",
                4, "overflow");
    expect_fail("huge shape: byte size overflows",
                "{\"t\":{\"dtype\":\"F64\",\"shape\":[2305843009213693952],\"data_offsets\":[0,8]}}",
                8, "overflow");
    expect_fail("huge shape: larger than the data",
                "{\"t\":{\"dtype\":\"F64\",\"shape\":[1000000000000],\"data_offsets\":[0,8000000000000]}}",
                8, "past the end");
    expect_fail("negative dim", "{\"t\":{\"dtype\":\"U8\",\"shape\":[2,-1],\"data_offsets\":[0,0]}}",
                4, "negative dim");
    expect_fail("more than 8 dims",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}",
                4, "more than 8 dims");
    expect_fail("fractional dim",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[2.5],\"data_offsets\":[0,2]}}", 4,
                "2.5 is not an integer");
    expect_fail("dim with exponent",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[1e1],\"data_offsets\":[0,10]}}", 10,
                "not an integer");
    expect_fail("dim as string", "{\"t\":{\"dtype\":\"U8\",\"shape\":[\"2\"],\"data_offsets\":[0,2]}}",
                4, "array of integers");
    expect_fail("dim beyond int64",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[99999999999999999999999],\"data_offsets\":[0,2]}}",
                4, "out of range");
    expect_fail("number with leading zero",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[02],\"data_offsets\":[0,2]}}", 4, "leading zero");
    expect_fail("shape not an array", "{\"t\":{\"dtype\":\"U8\",\"shape\":2,\"data_offsets\":[0,2]}}",
                4, "array");

    /* structure */
    expect_fail("missing dtype", "{\"t\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 4, "missing \"dtype\"");
    expect_fail("missing shape", "{\"t\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 4, "missing \"shape\"");
    expect_fail("missing data_offsets", "{\"t\":{\"dtype\":\"U8\",\"shape\":[1]}}", 4,
                "missing \"data_offsets\"");
    expect_fail("tensor entry not an object", "{\"t\":[1,2]}", 0, "expected an object");
    expect_fail("duplicate tensor names",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                "\"t\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                4, "duplicate tensor name \"t\"");
    expect_fail("duplicate key in a tensor entry",
                "{\"t\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                4, "duplicate key \"dtype\"");
    expect_fail("duplicate unknown key in a tensor entry",
                "{\"t\":{\"x\":1,\"dtype\":\"U8\",\"x\":2,\"shape\":[1],\"data_offsets\":[0,1]}}",
                4, "duplicate key \"x\"");
    expect_fail("duplicate __metadata__", "{\"__metadata__\":{},\"__metadata__\":{}}", 0,
                "duplicate key \"__metadata__\"");
    expect_fail("duplicate metadata key", "{\"__metadata__\":{\"mode\":\"kla\",\"mode\":\"gdn\"}}", 0,
                "duplicate key \"mode\"");
    expect_fail("metadata value a number", "{\"__metadata__\":{\"scale\":0.5}}", 0, "not a string");
    expect_fail("metadata value an object", "{\"__metadata__\":{\"a\":{}}}", 0, "not a string");
    expect_fail("metadata not an object", "{\"__metadata__\":[\"a\"]}", 0, "__metadata__ must be an object");
    expect_fail("metadata value true", "{\"__metadata__\":{\"a\":true}}", 0, "not a string");
    expect_fail("trailing comma in object", "{\"__metadata__\":{},}", 0, "expected a string");
    expect_fail("trailing comma in array",
                "{\"t\":{\"dtype\":\"U8\",\"shape\":[1,],\"data_offsets\":[0,1]}}", 4, "array of integers");
    expect_fail("missing colon", "{\"__metadata__\" {}}", 0, "expected ':'");
    expect_fail("unquoted key", "{t:{}}", 0, "expected a string");
    expect_fail("bad literal", "{\"t\":{\"x\":tru,\"dtype\":\"U8\"}}", 0, "invalid literal");
    expect_fail("bad number in skipped value", "{\"t\":{\"x\":-,\"dtype\":\"U8\"}}", 0, "invalid number");

    /* strings and encoding */
    expect_fail("invalid UTF-8 byte", "{\"\xff\":{}}", 0, "UTF-8");
    expect_fail("overlong UTF-8", "{\"\xc0\x80\":{}}", 0, "UTF-8");
    /* 3- and 4-byte overlong forms: '/' as E0 80 AF and F0 80 80 AF, and the largest
     * code points each form could hold without being overlong (U+07FF, U+FFFF) */
    expect_fail("overlong 3-byte UTF-8 ('/')", "{\"\xe0\x80\xaf\":{}}", 0, "UTF-8");
    expect_fail("overlong 3-byte UTF-8 (U+07FF)", "{\"\xe0\x9f\xbf\":{}}", 0, "UTF-8");
    expect_fail("overlong 4-byte UTF-8 ('/')", "{\"\xf0\x80\x80\xaf\":{}}", 0, "UTF-8");
    expect_fail("overlong 4-byte UTF-8 (U+FFFF)", "{\"\xf0\x8f\xbf\xbf\":{}}", 0, "UTF-8");
    expect_fail("UTF-8 encoded surrogate", "{\"\xed\xa0\x80\":{}}", 0, "UTF-8");
    expect_fail("UTF-8 beyond U+10FFFF", "{\"\xf4\x90\x80\x80\":{}}", 0, "UTF-8");
    expect_fail("truncated UTF-8 sequence", "{\"\xe2\x82\":{}}", 0, "UTF-8");
    {
        static const char h[] = "{\"a\0b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}";
        bytes b = mkfile_n(h, sizeof h - 1, 1);
        expect_fail_buf("raw NUL byte in a name", b.p, b.n, "NUL");
        free(b.p);
    }
    expect_fail("escaped NUL (\\u0000) in a name",
                "{\"a\\u0000b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "NUL");
    expect_fail("escaped NUL in metadata", "{\"__metadata__\":{\"k\":\"\\u0000\"}}", 0, "NUL");
    expect_fail("raw control character in a string", "{\"a\nb\":{}}", 0, "control character");
    expect_fail("lone high surrogate", "{\"\\ud800x\":{}}", 0, "surrogate");
    expect_fail("lone low surrogate", "{\"\\udc00\":{}}", 0, "surrogate");
    expect_fail("high surrogate + non-low", "{\"\\ud800\\u0041\":{}}", 0, "surrogate");
    expect_fail("bad escape", "{\"\\x41\":{}}", 0, "invalid escape");
    expect_fail("short \\u escape", "{\"\\u12\":{}}", 0, "\\u escape");
    expect_fail("unterminated string", "{\"abc", 0, "unterminated");

    /* depth */
    {
        size_t n = 100000;
        char *h = malloc(n + 64);
        size_t o = (size_t)sprintf(h, "{\"t\":{\"x\":");
        memset(h + o, '[', n);
        o += n;
        strcpy(h + o, "}}");
        expect_fail("deep nesting (100000 '[')", h, 0, "nested too deeply");
        o = (size_t)sprintf(h, "{\"t\":{\"x\":");
        for (int i = 0; i < 63; i++)
            h[o++] = '[';
        for (int i = 0; i < 63; i++)
            h[o++] = ']';
        strcpy(h + o, "}}");
        expect_fail("nesting one past the limit", h, 0, "nested too deeply");
        free(h);
    }

    /* the error buffer */
    {
        bytes b = mkfile("{\"q\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,100]}}", 100);
        st_file f;
        char small[8];
        memset(small, 'x', sizeof small);
        int rc = st_parse(b.p, b.n, &f, small, 6);
        ok(rc == -1 && strlen(small) == 5 && small[6] == 'x', "short error buffer is respected", "");
        ok(st_parse(b.p, b.n, &f, NULL, 0) == -1 && file_empty(&f), "NULL error buffer", "");
        char name[80];
        memset(name, 'n', sizeof name);
        free(b.p);
        char h[256];
        snprintf(h, sizeof h, "{\"%.*s\\n\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,8]}}",
                 70, name);
        b = mkfile(h, 8);
        char err[512];
        rc = st_parse(b.p, b.n, &f, err, sizeof err);
        ok(rc == -1 && strstr(err, "nnnn...\"") != NULL && strchr(err, '\n') == NULL,
           "long names are shortened in messages", err);
        free(b.p);
    }
}

/* ---- st_read ------------------------------------------------------------------------- */

static void test_read_errors(void)
{
    char path[128], err[512] = "";
    st_file f;
    path_in(path, sizeof path, "absent.safetensors");
    int rc = st_read(path, &f, err, sizeof err);
    ok(rc == -1 && strncmp(err, path, strlen(path)) == 0 && file_empty(&f),
       "st_read of a missing file names the path", err);

    path_in(path, sizeof path, "trunc.safetensors");
    FILE *fp = fopen(path, "wb");
    bytes b = mkfile(T1, 24);
    b.p[0] = 0x88;
    b.p[1] = 0x13;
    fwrite(b.p, 1, b.n, fp);
    fclose(fp);
    free(b.p);
    rc = st_read(path, &f, err, sizeof err);
    char want[256];
    snprintf(want, sizeof want, "%s: truncated file: header says 5000 bytes", path);
    ok(rc == -1 && strstr(err, want) == err, "st_read prefixes messages with the path", err);
    unlink(path);

    rc = st_read(tmpdir, &f, err, sizeof err);
    ok(rc == -1 && strstr(err, "directory") != NULL, "st_read of a directory", err);
}

/* ---- st_write failures ---------------------------------------------------------------- */

static void expect_write_fail(const char *name, const char *file, const st_tensor *ts, int n,
                              const char *const *mk, const char *const *mv, int mc,
                              const char *word)
{
    char path[256], err[512] = "", diag[700];
    if (file[0] == '/')
        snprintf(path, sizeof path, "%s", file);
    else
        path_in(path, sizeof path, file);
    int rc = st_write(path, ts, n, mk, mv, mc, err, sizeof err);
    bool good = rc == -1 && !exists(path) && count_temps() == 0 && strstr(err, word) &&
                strncmp(err, path, strlen(path)) == 0;
    snprintf(diag, sizeof diag, "rc=%d err=\"%s\" wanted \"%s\"", rc, err, word);
    ok(good, name, diag);
    unlink(path);
}

static void test_write_errors(void)
{
    int64_t shape[2] = {2, 2};
    st_tensor ts[2];
    ts[0] = mk_tensor("a", ST_F32, 2, shape);
    ts[1] = mk_tensor("a", ST_F32, 2, shape);
    char path[256];
    snprintf(path, sizeof path, "%s/no/such/dir/out.safetensors", tmpdir);
    expect_write_fail("st_write into a missing directory fails, leaves nothing", path, ts, 1,
                      NULL, NULL, 0, "temporary");
    expect_write_fail("st_write with duplicate names fails, leaves nothing", "dup.safetensors",
                      ts, 2, NULL, NULL, 0, "duplicate tensor name \"a\"");
    ts[1].name = "";
    expect_write_fail("st_write with an empty name", "empty.safetensors", ts, 2, NULL, NULL, 0,
                      "empty name");
    ts[1].name = "__metadata__";
    expect_write_fail("st_write with the name __metadata__", "md.safetensors", ts, 2, NULL, NULL,
                      0, "__metadata__");
    ts[1].name = "b\xff";
    expect_write_fail("st_write with a non-UTF-8 name", "u8.safetensors", ts, 2, NULL, NULL, 0,
                      "UTF-8");
    ts[1].name = "b";
    ts[1].nbytes = 15;
    expect_write_fail("st_write with inconsistent nbytes", "nb.safetensors", ts, 2, NULL, NULL, 0,
                      "nbytes 15 does not match");
    ts[1].nbytes = 16;
    void *d = ts[1].data;
    ts[1].data = NULL;
    expect_write_fail("st_write with NULL data", "nd.safetensors", ts, 2, NULL, NULL, 0, "no data");
    ts[1].data = d;
    ts[1].shape[1] = -2;
    expect_write_fail("st_write with a negative dim", "neg.safetensors", ts, 2, NULL, NULL, 0,
                      "negative");
    ts[1].shape[1] = 2;
    ts[1].ndim = 9;
    expect_write_fail("st_write with ndim 9", "nd9.safetensors", ts, 2, NULL, NULL, 0, "ndim");
    ts[1].ndim = 2;
    ts[1].dtype = ST_DTYPE_COUNT;
    expect_write_fail("st_write with an invalid dtype", "dt.safetensors", ts, 2, NULL, NULL, 0,
                      "dtype");
    ts[1].dtype = ST_F32;
    const char *mk[] = {"mode", "mode"}, *mv[] = {"kla", "gdn"};
    expect_write_fail("st_write with duplicate metadata keys", "mk.safetensors", ts, 2, mk, mv, 2,
                      "duplicate metadata key \"mode\"");
    const char *mv2[] = {"kla", NULL};
    const char *mk2[] = {"mode", "eps"};
    expect_write_fail("st_write with a NULL metadata value", "mv.safetensors", ts, 2, mk2, mv2, 2,
                      "NULL");

    /* the path is a directory: refused before anything is written */
    {
        char p[128], err[512] = "";
        path_in(p, sizeof p, "adir");
        mkdir(p, 0755);
        int rc = st_write(p, ts, 1, NULL, NULL, 0, err, sizeof err);
        struct stat sb;
        ok(rc == -1 && strstr(err, "is a directory") && count_temps() == 0 && stat(p, &sb) == 0 &&
               S_ISDIR(sb.st_mode),
           "a directory as the path is refused, no temporary left", err);
        rmdir(p);
    }

    /* a symlink is followed: the target is written, the link stays a link; a device is
     * written through (not replaced): /dev/full makes the write fail, and stays a device */
    {
        char p[128], target[128], err[512] = "";
        path_in(p, sizeof p, "link.safetensors");
        path_in(target, sizeof target, "target.safetensors");
        int made = symlink("target.safetensors", p) == 0;
        int rc = st_write(p, ts, 1, NULL, NULL, 0, err, sizeof err);
        struct stat lb, tb;
        ok(made && rc == 0 && lstat(p, &lb) == 0 && S_ISLNK(lb.st_mode) && stat(target, &tb) == 0 &&
               S_ISREG(tb.st_mode) && tb.st_size > 8 && count_temps() == 0,
           "st_write through a symlink writes its target", err);
        unlink(p);
        unlink(target);
        struct stat db;
        if (stat("/dev/full", &db) == 0 && S_ISCHR(db.st_mode)) {
            rc = st_write("/dev/full", ts, 1, NULL, NULL, 0, err, sizeof err);
            ok(rc == -1 && strstr(err, "write failed") && stat("/dev/full", &db) == 0 && S_ISCHR(db.st_mode),
               "st_write to a device writes through it (/dev/full: the write fails, the node stays)", err);
        }
    }

    /* a failure while writing: the file size limit makes write() fail (EFBIG) */
    {
        char p[128], err[512] = "";
        path_in(p, sizeof p, "big.safetensors");
        int64_t big[1] = {1 << 20};
        st_tensor t = mk_tensor("big", ST_U8, 1, big);
        st_tensor small = mk_tensor("small", ST_U8, 1, big);
        small.shape[0] = 16;
        small.numel = 16;
        small.nbytes = 16;
        bool first = st_write(p, &small, 1, NULL, NULL, 0, err, sizeof err) == 0;
        struct rlimit old, lim;
        getrlimit(RLIMIT_FSIZE, &old);
        lim = old;
        lim.rlim_cur = 65536;
        void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
        bool limited = setrlimit(RLIMIT_FSIZE, &lim) == 0;
        int rc = st_write(p, &t, 1, NULL, NULL, 0, err, sizeof err);
        setrlimit(RLIMIT_FSIZE, &old);
        signal(SIGXFSZ, prev);
        st_file f;
        bool kept = st_read(p, &f, NULL, 0) == 0;
        if (kept) {
            kept = f.count == 1 && same_tensor(&small, &f.tensors[0]);
            st_free(&f);
        }
        ok(first && limited && rc == -1 && strstr(err, "write failed") && count_temps() == 0 && kept,
           "a failed write leaves the old file and no temporary", err);
        free(t.data);
        free(small.data);
        unlink(p);
    }
    free(ts[0].data);
    free(ts[1].data);
}

static void cleanup(void)
{
    DIR *d = opendir(tmpdir);
    if (!d)
        return;
    struct dirent *e;
    char p[512];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(tmpdir);
}

int main(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/st_test_XXXXXX",
             base && base[0] && strlen(base) < 40 ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        printf("Bail out! cannot create a temporary directory: %s\n", strerror(errno));
        return 1;
    }
    test_dtype_names();
    test_dtypes();
    test_scalar_and_empty();
    test_metadata();
    test_many();
    test_names();
    test_no_tensors();
    test_overwrite();
    test_parse_accepts();
    test_malformed();
    test_read_errors();
    test_write_errors();
    cleanup();
    printf("1..%d\n", n_run);
    return n_failed ? 1 : 0;
}
