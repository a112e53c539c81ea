/*
 * safetensors.c: reader and writer of the interchange format (kla-spec.md section 4).
 *
 * The reader takes any byte string. Everything is bounds-checked; the JSON header is
 * parsed by a small hand-written parser with a hard nesting limit; every size
 * computation is checked for overflow. Accepted beyond the strictest reading of the
 * format: gaps between tensor data ranges, bytes after the last range, misaligned
 * offsets (the data are copied into 64-byte aligned buffers), unknown keys inside a
 * tensor entry (skipped), and "__metadata__": null. Rejected: everything else that is
 * not well-formed, including overlapping data ranges, duplicate keys in the objects the
 * reader interprets, invalid UTF-8 and NUL characters in strings.
 *
 * The writer lays the data out contiguously in the given order (no gaps, as the
 * reference safetensors implementation requires), with the header padded with spaces
 * so that the data area starts 8-byte aligned.
 *
 * Tensor data are raw bytes: the host is assumed little-endian, as the format is.
 */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define ST_MAX_HEADER (100u * 1024u * 1024u) /* bytes of JSON header */
#define ST_MAX_DEPTH 64                      /* JSON nesting levels */
#define ST_ALIGN 64                          /* alignment of the data copies */
#define ST_NAME_SHOWN 64                     /* bytes of a name quoted in a message */

/* ---- dtypes ------------------------------------------------------------------------ */

static const struct {
    const char *name;
    size_t size;
} st_dtypes[ST_DTYPE_COUNT] = {
    [ST_F64] = {"F64", 8},   [ST_F32] = {"F32", 4},         [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2}, [ST_I64] = {"I64", 8},         [ST_I32] = {"I32", 4},
    [ST_I16] = {"I16", 2},   [ST_I8] = {"I8", 1},           [ST_U64] = {"U64", 8},
    [ST_U32] = {"U32", 4},   [ST_U16] = {"U16", 2},         [ST_U8] = {"U8", 1},
    [ST_BOOL] = {"BOOL", 1}, [ST_F8_E4M3] = {"F8_E4M3", 1}, [ST_F8_E5M2] = {"F8_E5M2", 1},
};

const char *st_dtype_name(st_dtype d)
{
    if ((unsigned)d >= (unsigned)ST_DTYPE_COUNT)
        return "?";
    return st_dtypes[d].name;
}

size_t st_dtype_size(st_dtype d)
{
    if ((unsigned)d >= (unsigned)ST_DTYPE_COUNT)
        return 0;
    return st_dtypes[d].size;
}

static int dtype_lookup(const char *s, st_dtype *out)
{
    for (int i = 0; i < ST_DTYPE_COUNT; i++) {
        if (strcmp(s, st_dtypes[i].name) == 0) {
            *out = (st_dtype)i;
            return 0;
        }
    }
    return -1;
}

/* ---- messages ---------------------------------------------------------------------- */

#if defined(__GNUC__) || defined(__clang__)
#define ST_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define ST_PRINTF(a, b)
#endif

static void seterr(char *err, size_t errlen, const char *fmt, ...) ST_PRINTF(3, 4);
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when it is not one. Rejects
 * overlong forms, surrogates and code points above U+10FFFF. */
static size_t utf8_seq(const uint8_t *s, size_t n)
{
    uint8_t c = s[0];
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        return (n >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (n < 3 || (s[2] & 0xC0) != 0x80)
            return 0;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
        return (s[1] >= lo && s[1] <= hi) ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (n < 4 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
        return (s[1] >= lo && s[1] <= hi) ? 4 : 0;
    }
    return 0;
}

/* Index of the first byte that does not start a valid UTF-8 sequence, or n. */
static size_t utf8_check(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_seq(s + i, n - i);
        if (k == 0)
            return i;
        i += k;
    }
    return n;
}

/* A name as it appears in a message: quoted, control characters, quotes and invalid
 * UTF-8 escaped, shortened to about ST_NAME_SHOWN bytes. */
typedef struct {
    char s[ST_NAME_SHOWN * 4 + 16];
} shown;

static shown show(const char *name)
{
    shown r;
    size_t o = 0;
    const uint8_t *s = (const uint8_t *)name;
    size_t n = strlen(name);
    size_t i = 0;
    r.s[o++] = '"';
    while (i < n) {
        if (i >= ST_NAME_SHOWN) {
            memcpy(r.s + o, "...", 3);
            o += 3;
            break;
        }
        uint8_t c = s[i];
        size_t k = utf8_seq(s + i, n - i);
        if (c == '"' || c == '\\') {
            r.s[o++] = '\\';
            r.s[o++] = (char)c;
            i++;
        } else if (c < 0x20 || c == 0x7F || k == 0) {
            o += (size_t)snprintf(r.s + o, 5, "\\x%02X", c);
            i++;
        } else {
            memcpy(r.s + o, s + i, k);
            o += k;
            i += k;
        }
    }
    r.s[o++] = '"';
    r.s[o] = '\0';
    return r;
}

/* "[2, 3]" */
typedef struct {
    char s[ST_MAX_DIMS * 22 + 4];
} shown_shape;

static shown_shape show_shape(const int64_t *shape, int ndim)
{
    shown_shape r;
    size_t o = 0;
    r.s[o++] = '[';
    for (int i = 0; i < ndim; i++)
        o += (size_t)snprintf(r.s + o, sizeof r.s - o, "%s%" PRId64, i ? ", " : "", shape[i]);
    r.s[o++] = ']';
    r.s[o] = '\0';
    return r;
}

/* ---- key sets: duplicate detection in O(n log n) ------------------------------------ */

typedef struct {
    const char **keys; /* borrowed */
    size_t n, cap;
} keyset;

static int ks_add(keyset *ks, const char *k)
{
    if (ks->n == ks->cap) {
        size_t cap = ks->cap ? ks->cap * 2 : 8;
        const char **p = realloc(ks->keys, cap * sizeof *p);
        if (!p)
            return -1;
        ks->keys = p;
        ks->cap = cap;
    }
    ks->keys[ks->n++] = k;
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A key occurring twice, or NULL. Sorts the set. */
static const char *ks_dup(keyset *ks)
{
    if (ks->n < 2)
        return NULL;
    qsort(ks->keys, ks->n, sizeof *ks->keys, cmp_str);
    for (size_t i = 1; i < ks->n; i++)
        if (strcmp(ks->keys[i - 1], ks->keys[i]) == 0)
            return ks->keys[i];
    return NULL;
}

static void ks_free(keyset *ks)
{
    free(ks->keys);
    memset(ks, 0, sizeof *ks);
}

/* ---- JSON ---------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *s; /* the header, not NUL-terminated */
    size_t n, pos;
    char *err;
    size_t errlen;
    size_t base; /* file offset of s[0], for messages */
} jp;

static int jfail(jp *p, const char *fmt, ...) ST_PRINTF(2, 3);
static int jfail(jp *p, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    seterr(p->err, p->errlen, "invalid header JSON at file offset %zu: %s", p->base + p->pos, msg);
    return -1;
}

/* A header that is well-formed JSON but not a valid safetensors header: no offset. */
static int sfail(jp *p, const char *fmt, ...) ST_PRINTF(2, 3);
static int sfail(jp *p, const char *fmt, ...)
{
    if (!p->err || p->errlen == 0)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, p->errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* set when the last st_parse / st_read of this thread failed for want of memory */
static _Thread_local int last_oom;

int st_last_failed_oom(void) { return last_oom; }

static int oom(char *err, size_t errlen)
{
    last_oom = 1;
    seterr(err, errlen, "out of memory");
    return -1;
}

static int jpeek(jp *p)
{
    while (p->pos < p->n) {
        uint8_t c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            return c;
        p->pos++;
    }
    return -1;
}

static const char *what(int c)
{
    static const char *const names[] = {"end of header", "a string", "an object", "an array",
                                        "a number", "a literal", "an unexpected character"};
    if (c < 0)
        return names[0];
    if (c == '"')
        return names[1];
    if (c == '{')
        return names[2];
    if (c == '[')
        return names[3];
    if (c == '-' || (c >= '0' && c <= '9'))
        return names[4];
    if (c == 't' || c == 'f' || c == 'n')
        return names[5];
    return names[6];
}

static int jexpect(jp *p, char want)
{
    int c = jpeek(p);
    if (c != want) {
        if (c < 0)
            return jfail(p, "expected '%c', got end of header", want);
        if (c >= 0x20 && c < 0x7F)
            return jfail(p, "expected '%c', got '%c'", want, c);
        return jfail(p, "expected '%c', got byte 0x%02X", want, c);
    }
    p->pos++;
    return 0;
}

static int hex4(jp *p, size_t lim, uint32_t *out)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        if (p->pos >= lim)
            return jfail(p, "truncated \\u escape");
        uint8_t c = p->s[p->pos];
        uint32_t d;
        if (c >= '0' && c <= '9')
            d = (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            d = (uint32_t)(c - 'A' + 10);
        else
            return jfail(p, "invalid \\u escape");
        v = v * 16 + d;
        p->pos++;
    }
    *out = v;
    return 0;
}

/* Parses a string at the current position (whitespace already skipped) into a fresh
 * NUL-terminated UTF-8 buffer. The header was checked to be valid UTF-8 beforehand. */
static int jstring(jp *p, char **out)
{
    *out = NULL;
    if (jpeek(p) != '"')
        return jfail(p, "expected a string, got %s", what(jpeek(p)));
    size_t open = p->pos;
    size_t i = open + 1;
    while (i < p->n && p->s[i] != '"')
        i += (p->s[i] == '\\') ? 2 : 1;
    if (i >= p->n)
        return jfail(p, "unterminated string");
    size_t close = i;
    char *o = malloc(close - open); /* decoded length <= raw length */
    if (!o)
        return oom(p->err, p->errlen);
    size_t k = 0;
    p->pos = open + 1;
    while (p->pos < close) {
        uint8_t c = p->s[p->pos];
        if (c == '\\') {
            p->pos++;
            if (p->pos >= close) {
                free(o);
                return jfail(p, "truncated escape");
            }
            uint8_t e = p->s[p->pos++];
            switch (e) {
            case '"': o[k++] = '"'; break;
            case '\\': o[k++] = '\\'; break;
            case '/': o[k++] = '/'; break;
            case 'b': o[k++] = '\b'; break;
            case 'f': o[k++] = '\f'; break;
            case 'n': o[k++] = '\n'; break;
            case 'r': o[k++] = '\r'; break;
            case 't': o[k++] = '\t'; break;
            case 'u': {
                uint32_t cp = 0;
                if (hex4(p, close, &cp)) {
                    free(o);
                    return -1;
                }
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    uint32_t lo = 0;
                    if (p->pos + 2 > close || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                        free(o);
                        return jfail(p, "unpaired surrogate \\u%04X in string", (unsigned)cp);
                    }
                    p->pos += 2;
                    if (hex4(p, close, &lo)) {
                        free(o);
                        return -1;
                    }
                    if (lo < 0xDC00 || lo > 0xDFFF) {
                        free(o);
                        return jfail(p, "unpaired surrogate \\u%04X in string", (unsigned)cp);
                    }
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    free(o);
                    return jfail(p, "unpaired surrogate \\u%04X in string", (unsigned)cp);
                }
                if (cp == 0) {
                    free(o);
                    return jfail(p, "NUL character (\\u0000) in string");
                }
                if (cp < 0x80) {
                    o[k++] = (char)cp;
                } else if (cp < 0x800) {
                    o[k++] = (char)(0xC0 | (cp >> 6));
                    o[k++] = (char)(0x80 | (cp & 0x3F));
                } else if (cp < 0x10000) {
                    o[k++] = (char)(0xE0 | (cp >> 12));
                    o[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                    o[k++] = (char)(0x80 | (cp & 0x3F));
                } else {
                    o[k++] = (char)(0xF0 | (cp >> 18));
                    o[k++] = (char)(0x80 | ((cp >> 12) & 0x3F));
                    o[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                    o[k++] = (char)(0x80 | (cp & 0x3F));
                }
                break;
            }
            default:
                p->pos--;
                free(o);
                if (e >= 0x20 && e < 0x7F)
                    return jfail(p, "invalid escape '\\%c' in string", e);
                return jfail(p, "invalid escape in string");
            }
        } else if (c < 0x20) {
            free(o);
            if (c == 0)
                return jfail(p, "NUL byte in string");
            return jfail(p, "control character 0x%02X in string", c);
        } else {
            o[k++] = (char)c;
            p->pos++;
        }
    }
    p->pos = close + 1;
    o[k] = '\0';
    *out = o;
    return 0;
}

typedef struct {
    int64_t v;
    bool integral; /* no fraction, no exponent */
    bool range;    /* integral and fits in int64 */
    size_t start, len;
} jnum;

static bool isdig(int c) { return c >= '0' && c <= '9'; }

static int jnumber(jp *p, jnum *out)
{
    int c0 = jpeek(p);
    if (c0 != '-' && !isdig(c0))
        return jfail(p, "expected a number, got %s", what(c0));
    size_t st = p->pos;
    bool neg = false, overflow = false;
    uint64_t acc = 0;
    if (p->s[p->pos] == '-') {
        neg = true;
        p->pos++;
    }
    if (p->pos >= p->n || !isdig(p->s[p->pos]))
        return jfail(p, "invalid number");
    if (p->s[p->pos] == '0') {
        p->pos++;
        if (p->pos < p->n && isdig(p->s[p->pos]))
            return jfail(p, "invalid number (leading zero)");
    } else {
        while (p->pos < p->n && isdig(p->s[p->pos])) {
            unsigned d = (unsigned)(p->s[p->pos] - '0');
            if (acc > (UINT64_MAX - d) / 10)
                overflow = true;
            else
                acc = acc * 10 + d;
            p->pos++;
        }
    }
    bool integral = true;
    if (p->pos < p->n && p->s[p->pos] == '.') {
        integral = false;
        p->pos++;
        if (p->pos >= p->n || !isdig(p->s[p->pos]))
            return jfail(p, "invalid number (no digit after '.')");
        while (p->pos < p->n && isdig(p->s[p->pos]))
            p->pos++;
    }
    if (p->pos < p->n && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        integral = false;
        p->pos++;
        if (p->pos < p->n && (p->s[p->pos] == '+' || p->s[p->pos] == '-'))
            p->pos++;
        if (p->pos >= p->n || !isdig(p->s[p->pos]))
            return jfail(p, "invalid number (no digit in exponent)");
        while (p->pos < p->n && isdig(p->s[p->pos]))
            p->pos++;
    }
    out->start = st;
    out->len = p->pos - st;
    out->integral = integral;
    out->range = false;
    out->v = 0;
    if (integral && !overflow) {
        if (!neg && acc <= (uint64_t)INT64_MAX) {
            out->v = (int64_t)acc;
            out->range = true;
        } else if (neg && acc <= (uint64_t)INT64_MAX + 1u) {
            out->v = acc == (uint64_t)INT64_MAX + 1u ? INT64_MIN : -(int64_t)acc;
            out->range = true;
        }
    }
    return 0;
}

static int jliteral(jp *p)
{
    static const char *const lits[] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++) {
        size_t l = strlen(lits[i]);
        if (p->n - p->pos >= l && memcmp(p->s + p->pos, lits[i], l) == 0) {
            p->pos += l;
            return 0;
        }
    }
    return jfail(p, "invalid literal");
}

/* Skips any value. depth is the nesting level of the value itself. */
static int jskip(jp *p, int depth)
{
    int c = jpeek(p);
    if ((c == '{' || c == '[') && depth > ST_MAX_DEPTH)
        return jfail(p, "nested too deeply (limit %d)", ST_MAX_DEPTH);
    if (c == '{') {
        p->pos++;
        if (jpeek(p) == '}') {
            p->pos++;
            return 0;
        }
        for (;;) {
            char *key;
            if (jstring(p, &key))
                return -1;
            free(key);
            if (jexpect(p, ':') || jskip(p, depth + 1))
                return -1;
            c = jpeek(p);
            if (c == ',') {
                p->pos++;
                continue;
            }
            if (c == '}') {
                p->pos++;
                return 0;
            }
            return jfail(p, "expected ',' or '}' in object, got %s", what(c));
        }
    }
    if (c == '[') {
        p->pos++;
        if (jpeek(p) == ']') {
            p->pos++;
            return 0;
        }
        for (;;) {
            if (jskip(p, depth + 1))
                return -1;
            c = jpeek(p);
            if (c == ',') {
                p->pos++;
                continue;
            }
            if (c == ']') {
                p->pos++;
                return 0;
            }
            return jfail(p, "expected ',' or ']' in array, got %s", what(c));
        }
    }
    if (c == '"') {
        char *s;
        if (jstring(p, &s))
            return -1;
        free(s);
        return 0;
    }
    if (c == '-' || isdig(c)) {
        jnum num;
        return jnumber(p, &num);
    }
    if (c == 't' || c == 'f' || c == 'n')
        return jliteral(p);
    if (c < 0)
        return jfail(p, "expected a value, got end of header");
    if (c >= 0x20 && c < 0x7F)
        return jfail(p, "unexpected character '%c'", c);
    return jfail(p, "unexpected byte 0x%02X", c);
}

/* ---- header ------------------------------------------------------------------------ */

typedef struct {
    st_tensor t;
    int64_t begin, end;
    size_t order;
} tent;

typedef struct {
    jp p;
    uint64_t datalen;
    tent *ts;
    size_t nt, capt;
    char **mk, **mv;
    size_t nm, capm;
    bool have_meta;
} hdr;

static void hdr_free(hdr *h)
{
    for (size_t i = 0; i < h->nt; i++) {
        free(h->ts[i].t.name);
        free(h->ts[i].t.data);
    }
    free(h->ts);
    for (size_t i = 0; i < h->nm; i++) {
        free(h->mk[i]);
        free(h->mv[i]);
    }
    free(h->mk);
    free(h->mv);
    h->ts = NULL;
    h->mk = h->mv = NULL;
    h->nt = h->nm = 0;
}

/* An array of integers into v (at most maxn of them; *n set to the count). what names
 * the array in messages. */
static int int_array(jp *p, const char *ctx, const char *name, int64_t *v, int maxn, int *n,
                     const char *toomany)
{
    *n = 0;
    if (jpeek(p) != '[')
        return sfail(p, "%s: %s must be an array of integers, got %s", ctx, name, what(jpeek(p)));
    p->pos++;
    if (jpeek(p) == ']') {
        p->pos++;
        return 0;
    }
    for (;;) {
        int c = jpeek(p);
        if (c != '-' && !isdig(c))
            return sfail(p, "%s: %s must be an array of integers, got %s", ctx, name, what(c));
        jnum num;
        if (jnumber(p, &num))
            return -1;
        int shown_len = num.len > 32 ? 32 : (int)num.len;
        const char *txt = (const char *)p->s + num.start;
        if (!num.integral)
            return sfail(p, "%s: %s: %.*s%s is not an integer", ctx, name, shown_len, txt,
                         num.len > 32 ? "..." : "");
        if (!num.range)
            return sfail(p, "%s: %s: %.*s%s is out of range", ctx, name, shown_len, txt,
                         num.len > 32 ? "..." : "");
        if (*n >= maxn)
            return sfail(p, "%s: %s", ctx, toomany);
        v[(*n)++] = num.v;
        c = jpeek(p);
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c == ']') {
            p->pos++;
            return 0;
        }
        return jfail(p, "%s: expected ',' or ']' in %s, got %s", ctx, name, what(c));
    }
}

static int parse_tensor(hdr *h, tent *te)
{
    jp *p = &h->p;
    st_tensor *t = &te->t;
    char ctx[sizeof(shown) + 16];
    snprintf(ctx, sizeof ctx, "tensor %s", show(t->name).s);

    if (jpeek(p) != '{')
        return sfail(p, "%s: expected an object, got %s", ctx, what(jpeek(p)));
    p->pos++;
    bool have_dtype = false, have_shape = false, have_off = false;
    keyset keys = {0};
    char **owned = NULL; /* keys, freed at the end */
    size_t nowned = 0;
    int rc = -1;
    int64_t off[2] = {0, 0};

    if (jpeek(p) == '}') {
        p->pos++;
    } else {
        for (;;) {
            char *key;
            if (jstring(p, &key))
                goto out;
            char **no = realloc(owned, (nowned + 1) * sizeof *no);
            if (!no) {
                free(key);
                oom(p->err, p->errlen);
                goto out;
            }
            owned = no;
            owned[nowned++] = key;
            if (ks_add(&keys, key)) {
                oom(p->err, p->errlen);
                goto out;
            }
            if (jexpect(p, ':'))
                goto out;
            if (strcmp(key, "dtype") == 0) {
                if (jpeek(p) != '"') {
                    sfail(p, "%s: dtype must be a string, got %s", ctx, what(jpeek(p)));
                    goto out;
                }
                char *ds;
                if (jstring(p, &ds))
                    goto out;
                st_dtype d;
                if (dtype_lookup(ds, &d)) {
                    seterr(p->err, p->errlen, "%s: unknown dtype %s", ctx, show(ds).s);
                    free(ds);
                    goto out;
                }
                free(ds);
                t->dtype = d;
                have_dtype = true;
            } else if (strcmp(key, "shape") == 0) {
                char msg[64];
                snprintf(msg, sizeof msg, "shape has more than %d dims", ST_MAX_DIMS);
                if (int_array(p, ctx, "shape", t->shape, ST_MAX_DIMS, &t->ndim, msg))
                    goto out;
                have_shape = true;
            } else if (strcmp(key, "data_offsets") == 0) {
                int n;
                if (int_array(p, ctx, "data_offsets", off, 2, &n,
                              "data_offsets must be two integers [begin, end]"))
                    goto out;
                if (n != 2) {
                    sfail(p, "%s: data_offsets must be two integers [begin, end]", ctx);
                    goto out;
                }
                have_off = true;
            } else {
                if (jskip(p, 3))
                    goto out;
            }
            int c = jpeek(p);
            if (c == ',') {
                p->pos++;
                continue;
            }
            if (c == '}') {
                p->pos++;
                break;
            }
            jfail(p, "%s: expected ',' or '}', got %s", ctx, what(c));
            goto out;
        }
    }
    const char *dup = ks_dup(&keys);
    if (dup) {
        seterr(p->err, p->errlen, "%s: duplicate key %s", ctx, show(dup).s);
        goto out;
    }
    if (!have_dtype || !have_shape || !have_off) {
        seterr(p->err, p->errlen, "%s: missing \"%s\"", ctx,
               !have_dtype ? "dtype" : !have_shape ? "shape" : "data_offsets");
        goto out;
    }

    /* shape -> numel -> nbytes, every step checked */
    shown_shape ss = show_shape(t->shape, t->ndim);
    const char *dn = st_dtype_name(t->dtype);
    bool zero = false;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0) {
            seterr(p->err, p->errlen, "%s: negative dim %" PRId64 " in shape %s", ctx, t->shape[i],
                   ss.s);
            goto out;
        }
        if (t->shape[i] == 0)
            zero = true;
    }
    int64_t numel = zero ? 0 : 1;
    for (int i = 0; i < t->ndim && !zero; i++) {
        if (numel > INT64_MAX / t->shape[i]) {
            seterr(p->err, p->errlen, "%s: shape %s is too large (element count overflows)", ctx,
                   ss.s);
            goto out;
        }
        numel *= t->shape[i];
    }
    size_t es = st_dtype_size(t->dtype);
    if ((uint64_t)numel > (uint64_t)INT64_MAX / es || (uint64_t)numel > SIZE_MAX / es) {
        seterr(p->err, p->errlen, "%s: shape %s %s is too large (byte size overflows)", ctx, ss.s,
               dn);
        goto out;
    }
    t->numel = numel;
    t->nbytes = (size_t)numel * es;

    int64_t b = off[0], e = off[1];
    if (b < 0 || e < 0) {
        seterr(p->err, p->errlen, "%s: negative data_offsets [%" PRId64 ", %" PRId64 "]", ctx, b,
               e);
        goto out;
    }
    if (b > e) {
        seterr(p->err, p->errlen,
               "%s: data_offsets [%" PRId64 ", %" PRId64 "]: begin is after end", ctx, b, e);
        goto out;
    }
    if ((uint64_t)e > h->datalen) {
        seterr(p->err, p->errlen,
               "%s: data_offsets [%" PRId64 ", %" PRId64 "] run past the end of the data (%" PRIu64
               " bytes)",
               ctx, b, e, h->datalen);
        goto out;
    }
    if ((uint64_t)(e - b) != (uint64_t)t->nbytes) {
        seterr(p->err, p->errlen,
               "%s: data_offsets [%" PRId64 ", %" PRId64 "] do not match shape %s %s (%zu bytes)",
               ctx, b, e, ss.s, dn, t->nbytes);
        goto out;
    }
    te->begin = b;
    te->end = e;
    rc = 0;
out:
    for (size_t i = 0; i < nowned; i++)
        free(owned[i]);
    free(owned);
    ks_free(&keys);
    return rc;
}

static int parse_meta(hdr *h)
{
    jp *p = &h->p;
    int c = jpeek(p);
    if (c == 'n' && p->n - p->pos >= 4 && memcmp(p->s + p->pos, "null", 4) == 0) {
        p->pos += 4; /* "__metadata__": null, as no metadata */
        return 0;
    }
    if (c != '{')
        return sfail(p, "__metadata__ must be an object of strings, got %s", what(c));
    p->pos++;
    if (jpeek(p) == '}') {
        p->pos++;
        return 0;
    }
    for (;;) {
        char *key, *val;
        if (jstring(p, &key))
            return -1;
        if (jexpect(p, ':')) {
            free(key);
            return -1;
        }
        if (jpeek(p) != '"') {
            sfail(p, "__metadata__: value of %s is not a string (got %s)", show(key).s,
                  what(jpeek(p)));
            free(key);
            return -1;
        }
        if (jstring(p, &val)) {
            free(key);
            return -1;
        }
        if (h->nm == h->capm) {
            size_t cap = h->capm ? h->capm * 2 : 8;
            char **a = realloc(h->mk, cap * sizeof *a);
            if (a)
                h->mk = a;
            char **b = a ? realloc(h->mv, cap * sizeof *b) : NULL;
            if (b)
                h->mv = b;
            if (!a || !b) {
                free(key);
                free(val);
                return oom(p->err, p->errlen);
            }
            h->capm = cap;
        }
        h->mk[h->nm] = key;
        h->mv[h->nm] = val;
        h->nm++;
        c = jpeek(p);
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c == '}') {
            p->pos++;
            break;
        }
        return jfail(p, "__metadata__: expected ',' or '}', got %s", what(c));
    }
    keyset ks = {0};
    for (size_t i = 0; i < h->nm; i++) {
        if (ks_add(&ks, h->mk[i])) {
            ks_free(&ks);
            return oom(p->err, p->errlen);
        }
    }
    const char *dup = ks_dup(&ks);
    if (dup)
        seterr(p->err, p->errlen, "__metadata__: duplicate key %s", show(dup).s);
    ks_free(&ks);
    return dup ? -1 : 0;
}

static int parse_top(hdr *h)
{
    jp *p = &h->p;
    int c = jpeek(p);
    if (c != '{')
        return sfail(p, "the header must be a JSON object, got %s", what(c));
    p->pos++;
    if (jpeek(p) == '}') {
        p->pos++;
    } else {
        for (;;) {
            char *key;
            if (jstring(p, &key))
                return -1;
            if (jexpect(p, ':')) {
                free(key);
                return -1;
            }
            if (strcmp(key, "__metadata__") == 0) {
                free(key);
                if (h->have_meta) {
                    seterr(p->err, p->errlen, "duplicate key \"__metadata__\"");
                    return -1;
                }
                h->have_meta = true;
                if (parse_meta(h))
                    return -1;
            } else {
                if (h->nt == h->capt) {
                    size_t cap = h->capt ? h->capt * 2 : 8;
                    if (cap > (size_t)INT32_MAX) {
                        free(key);
                        seterr(p->err, p->errlen, "too many tensors");
                        return -1;
                    }
                    tent *a = realloc(h->ts, cap * sizeof *a);
                    if (!a) {
                        free(key);
                        return oom(p->err, p->errlen);
                    }
                    h->ts = a;
                    h->capt = cap;
                }
                tent *te = &h->ts[h->nt++];
                memset(te, 0, sizeof *te);
                te->t.name = key;
                te->order = h->nt - 1;
                if (parse_tensor(h, te))
                    return -1;
            }
            c = jpeek(p);
            if (c == ',') {
                p->pos++;
                continue;
            }
            if (c == '}') {
                p->pos++;
                break;
            }
            return jfail(p, "expected ',' or '}' after a tensor entry, got %s", what(c));
        }
    }
    if (jpeek(p) >= 0)
        return jfail(p, "trailing garbage after the header object");
    return 0;
}

static int cmp_tent(const void *a, const void *b)
{
    const tent *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

int st_parse(const uint8_t *buf, size_t len, st_file *out, char *err, size_t errlen)
{
    last_oom = 0;
    if (err && errlen)
        err[0] = '\0';
    if (!out) {
        seterr(err, errlen, "no output");
        return -1;
    }
    memset(out, 0, sizeof *out);
    if (!buf && len)
        len = 0;
    if (len < 8) {
        seterr(err, errlen, "truncated file: %zu bytes, shorter than the 8-byte header length",
               len);
        return -1;
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | buf[i];
    if (n > ST_MAX_HEADER) {
        seterr(err, errlen, "header length %" PRIu64 " exceeds the limit of %u bytes", n,
               (unsigned)ST_MAX_HEADER);
        return -1;
    }
    if (n > len - 8) {
        seterr(err, errlen, "truncated file: header says %" PRIu64 " bytes, file has %zu after the length",
               n, len - 8);
        return -1;
    }
    const uint8_t *hs = buf + 8;
    size_t bad = utf8_check(hs, (size_t)n);
    if (bad < n) {
        seterr(err, errlen, "header is not valid UTF-8 (byte 0x%02X at file offset %zu)", hs[bad],
               bad + 8);
        return -1;
    }

    hdr h;
    memset(&h, 0, sizeof h);
    h.p.s = hs;
    h.p.n = (size_t)n;
    h.p.err = err;
    h.p.errlen = errlen;
    h.p.base = 8;
    h.datalen = (uint64_t)(len - 8 - (size_t)n);
    const uint8_t *data = hs + n;

    if (parse_top(&h))
        goto fail;

    /* duplicate tensor names */
    {
        keyset ks = {0};
        for (size_t i = 0; i < h.nt; i++) {
            if (ks_add(&ks, h.ts[i].t.name)) {
                ks_free(&ks);
                oom(err, errlen);
                goto fail;
            }
        }
        const char *dup = ks_dup(&ks);
        if (dup)
            seterr(err, errlen, "duplicate tensor name %s", show(dup).s);
        ks_free(&ks);
        if (dup)
            goto fail;
    }

    /* file order, then no two non-empty ranges may share a byte */
    if (h.nt > 1)
        qsort(h.ts, h.nt, sizeof *h.ts, cmp_tent);
    {
        const tent *last = NULL;
        for (size_t i = 0; i < h.nt; i++) {
            const tent *te = &h.ts[i];
            if (te->begin == te->end)
                continue;
            if (last && te->begin < last->end) {
                seterr(err, errlen,
                       "tensors %s [%" PRId64 ", %" PRId64 "] and %s [%" PRId64 ", %" PRId64
                       "] overlap",
                       show(last->t.name).s, last->begin, last->end, show(te->t.name).s,
                       te->begin, te->end);
                goto fail;
            }
            last = te;
        }
    }

    /* copies */
    for (size_t i = 0; i < h.nt; i++) {
        st_tensor *t = &h.ts[i].t;
        if (t->nbytes == 0)
            continue;
        size_t cap = t->nbytes;
        if (cap % ST_ALIGN)
            cap += ST_ALIGN - cap % ST_ALIGN; /* cannot overflow: nbytes <= len */
        void *d = NULL;
        if (posix_memalign(&d, ST_ALIGN, cap) != 0 || !d) {
            oom(err, errlen);
            goto fail;
        }
        memcpy(d, data + h.ts[i].begin, t->nbytes);
        t->data = d;
    }

    out->tensors = NULL;
    if (h.nt) {
        out->tensors = malloc(h.nt * sizeof *out->tensors);
        if (!out->tensors) {
            oom(err, errlen);
            goto fail;
        }
        for (size_t i = 0; i < h.nt; i++)
            out->tensors[i] = h.ts[i].t;
    }
    out->count = (int)h.nt;
    out->meta_keys = h.mk;
    out->meta_values = h.mv;
    out->meta_count = (int)h.nm;
    free(h.ts);
    return 0;

fail:
    hdr_free(&h);
    memset(out, 0, sizeof *out);
    return -1;
}

void st_free(st_file *f)
{
    if (!f)
        return;
    for (int i = 0; i < f->count; i++) {
        free(f->tensors[i].name);
        free(f->tensors[i].data);
    }
    free(f->tensors);
    for (int i = 0; i < f->meta_count; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    if (!f || !name)
        return NULL;
    for (int i = 0; i < f->count; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

const char *st_meta(const st_file *f, const char *key)
{
    if (!f || !key)
        return NULL;
    for (int i = 0; i < f->meta_count; i++)
        if (strcmp(f->meta_keys[i], key) == 0)
            return f->meta_values[i];
    return NULL;
}

/* ---- reading a file ----------------------------------------------------------------- */

int st_read(const char *path, st_file *out, char *err, size_t errlen)
{
    last_oom = 0;
    if (err && errlen)
        err[0] = '\0';
    if (out)
        memset(out, 0, sizeof *out);
    if (!path) {
        seterr(err, errlen, "no path");
        return -1;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        seterr(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        seterr(err, errlen, "%s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (S_ISDIR(sb.st_mode)) {
        seterr(err, errlen, "%s: is a directory", path);
        close(fd);
        return -1;
    }
    size_t cap = 4096;
    if (S_ISREG(sb.st_mode) && sb.st_size > 0) {
        if ((uint64_t)sb.st_size >= (uint64_t)SIZE_MAX) {
            seterr(err, errlen, "%s: file too large", path);
            close(fd);
            return -1;
        }
        cap = (size_t)sb.st_size + 1; /* +1: EOF is seen without growing */
    }
    uint8_t *buf = malloc(cap);
    size_t len = 0;
    if (!buf) {
        last_oom = 1;
        seterr(err, errlen, "%s: out of memory", path);
        close(fd);
        return -1;
    }
    for (;;) {
        if (len == cap) {
            size_t ncap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
            uint8_t *nb = ncap > cap ? realloc(buf, ncap) : NULL;
            if (!nb) {
                last_oom = 1;
                seterr(err, errlen, "%s: out of memory", path);
                free(buf);
                close(fd);
                return -1;
            }
            buf = nb;
            cap = ncap;
        }
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            seterr(err, errlen, "%s: %s", path, strerror(errno));
            free(buf);
            close(fd);
            return -1;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    char msg[1024];
    int rc = st_parse(buf, len, out, msg, sizeof msg);
    free(buf);
    if (rc)
        seterr(err, errlen, "%s: %s", path, msg);
    return rc;
}

/* ---- writing ------------------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (n > SIZE_MAX - b->len - 1) {
        b->oom = true;
        return;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap = cap > SIZE_MAX / 2 ? b->len + n + 1 : cap * 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

static void sb_i64(sbuf *b, int64_t v)
{
    char t[32];
    int k = snprintf(t, sizeof t, "%" PRId64, v);
    sb_putn(b, t, (size_t)k);
}

/* s is valid UTF-8 (checked by the caller): only '"', '\\' and controls need escapes. */
static void sb_jstr(sbuf *b, const char *s)
{
    sb_putn(b, "\"", 1);
    const char *run = s;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c != '"' && c != '\\' && c >= 0x20)
            continue;
        sb_putn(b, run, (size_t)(s - run));
        char t[8];
        switch (c) {
        case '"': sb_putn(b, "\\\"", 2); break;
        case '\\': sb_putn(b, "\\\\", 2); break;
        case '\n': sb_putn(b, "\\n", 2); break;
        case '\r': sb_putn(b, "\\r", 2); break;
        case '\t': sb_putn(b, "\\t", 2); break;
        case '\b': sb_putn(b, "\\b", 2); break;
        case '\f': sb_putn(b, "\\f", 2); break;
        default:
            snprintf(t, sizeof t, "\\u%04x", c);
            sb_putn(b, t, 6);
        }
        run = s + 1;
    }
    sb_putn(b, run, (size_t)(s - run));
    sb_putn(b, "\"", 1);
}

static int write_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t w = write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static bool utf8_ok(const char *s) { return utf8_check((const uint8_t *)s, strlen(s)) == strlen(s); }

static int validate_write(const char *path, const st_tensor *tensors, int count,
                          const char *const *mk, const char *const *mv, int mc, uint64_t *total,
                          char *err, size_t errlen)
{
    if (count < 0 || (count > 0 && !tensors)) {
        seterr(err, errlen, "%s: invalid tensor list", path);
        return -1;
    }
    if (mc < 0 || (mc > 0 && (!mk || !mv))) {
        seterr(err, errlen, "%s: invalid metadata list", path);
        return -1;
    }
    uint64_t sum = 0;
    for (int i = 0; i < count; i++) {
        const st_tensor *t = &tensors[i];
        if (!t->name || !t->name[0]) {
            seterr(err, errlen, "%s: tensor %d has an empty name", path, i);
            return -1;
        }
        shown nm = show(t->name);
        if (!utf8_ok(t->name)) {
            seterr(err, errlen, "%s: tensor name %s is not valid UTF-8", path, nm.s);
            return -1;
        }
        if (strcmp(t->name, "__metadata__") == 0) {
            seterr(err, errlen, "%s: \"__metadata__\" is not a valid tensor name", path);
            return -1;
        }
        if ((unsigned)t->dtype >= (unsigned)ST_DTYPE_COUNT) {
            seterr(err, errlen, "%s: tensor %s: invalid dtype %d", path, nm.s, (int)t->dtype);
            return -1;
        }
        if (t->ndim < 0 || t->ndim > ST_MAX_DIMS) {
            seterr(err, errlen, "%s: tensor %s: ndim %d out of range 0..%d", path, nm.s, t->ndim,
                   ST_MAX_DIMS);
            return -1;
        }
        shown_shape ss = show_shape(t->shape, t->ndim);
        uint64_t numel = 1;
        bool zero = false, over = false;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0) {
                seterr(err, errlen, "%s: tensor %s: negative dim in shape %s", path, nm.s, ss.s);
                return -1;
            }
            if (t->shape[d] == 0)
                zero = true;
        }
        for (int d = 0; d < t->ndim && !zero && !over; d++) {
            if (numel > (uint64_t)INT64_MAX / (uint64_t)t->shape[d])
                over = true;
            else
                numel *= (uint64_t)t->shape[d];
        }
        if (zero)
            numel = 0;
        size_t es = st_dtype_size(t->dtype);
        if (over || numel > (uint64_t)INT64_MAX / es || numel > SIZE_MAX / es) {
            seterr(err, errlen, "%s: tensor %s: shape %s is too large", path, nm.s, ss.s);
            return -1;
        }
        if ((uint64_t)t->nbytes != numel * es) {
            seterr(err, errlen, "%s: tensor %s: nbytes %zu does not match shape %s %s (%" PRIu64
                   " bytes)", path, nm.s, t->nbytes, ss.s, st_dtype_name(t->dtype), numel * es);
            return -1;
        }
        if (t->nbytes > 0 && !t->data) {
            seterr(err, errlen, "%s: tensor %s: no data", path, nm.s);
            return -1;
        }
        if (sum > (uint64_t)INT64_MAX - t->nbytes) {
            seterr(err, errlen, "%s: total data size overflows", path);
            return -1;
        }
        sum += t->nbytes;
    }
    for (int i = 0; i < mc; i++) {
        if (!mk[i] || !mv[i]) {
            seterr(err, errlen, "%s: metadata entry %d is NULL", path, i);
            return -1;
        }
        if (!utf8_ok(mk[i]) || !utf8_ok(mv[i])) {
            seterr(err, errlen, "%s: metadata %s is not valid UTF-8", path, show(mk[i]).s);
            return -1;
        }
    }
    keyset ks = {0};
    const char *dup = NULL;
    for (int i = 0; i < count; i++)
        if (ks_add(&ks, tensors[i].name))
            goto nomem;
    dup = ks_dup(&ks);
    if (dup) {
        seterr(err, errlen, "%s: duplicate tensor name %s", path, show(dup).s);
        ks_free(&ks);
        return -1;
    }
    ks.n = 0;
    for (int i = 0; i < mc; i++)
        if (ks_add(&ks, mk[i]))
            goto nomem;
    dup = ks_dup(&ks);
    if (dup) {
        seterr(err, errlen, "%s: duplicate metadata key %s", path, show(dup).s);
        ks_free(&ks);
        return -1;
    }
    ks_free(&ks);
    *total = sum;
    return 0;
nomem:
    ks_free(&ks);
    seterr(err, errlen, "%s: out of memory", path);
    return -1;
}

/* The final target of path after following symlinks (40 at most, as the kernel does),
 * whether or not it exists; malloc'ed. */
static int resolve_links(const char *path, char **out, char *err, size_t errlen)
{
    char *cur = strdup(path);
    if (!cur) {
        seterr(err, errlen, "%s: out of memory", path);
        return -1;
    }
    for (int hops = 0;; hops++) {
        struct stat ls;
        if (lstat(cur, &ls) != 0 || !S_ISLNK(ls.st_mode)) {
            *out = cur;
            return 0;
        }
        if (hops == 40) {
            seterr(err, errlen, "%s: too many levels of symbolic links", path);
            free(cur);
            return -1;
        }
        size_t cap = (size_t)(ls.st_size > 0 ? ls.st_size : 255) + 1;
        char *link = malloc(cap);
        ssize_t n = link ? readlink(cur, link, cap) : -1;
        if (n < 0 || (size_t)n >= cap) {
            seterr(err, errlen, "%s: cannot read the symbolic link %s", path, cur);
            free(link);
            free(cur);
            return -1;
        }
        link[n] = 0;
        char *next;
        const char *slash = strrchr(cur, '/');
        if (link[0] == '/' || !slash) {
            next = link;
        } else {
            /* relative to the link's folder */
            size_t dl = (size_t)(slash - cur) + 1;
            next = malloc(dl + (size_t)n + 1);
            if (next) {
                memcpy(next, cur, dl);
                memcpy(next + dl, link, (size_t)n + 1);
            }
            free(link);
        }
        free(cur);
        if (!next) {
            seterr(err, errlen, "%s: out of memory", path);
            return -1;
        }
        cur = next;
    }
}

int st_write(const char *path, const st_tensor *tensors, int count,
             const char *const *meta_keys, const char *const *meta_values, int meta_count,
             char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    if (!path || !path[0]) {
        seterr(err, errlen, "st_write: empty path");
        return -1;
    }
    uint64_t total = 0;
    if (validate_write(path, tensors, count, meta_keys, meta_values, meta_count, &total, err,
                       errlen))
        return -1;

    /* header */
    sbuf b = {0};
    sb_putn(&b, "{", 1);
    if (meta_count > 0) {
        sb_puts(&b, "\"__metadata__\":{");
        for (int i = 0; i < meta_count; i++) {
            if (i)
                sb_putn(&b, ",", 1);
            sb_jstr(&b, meta_keys[i]);
            sb_putn(&b, ":", 1);
            sb_jstr(&b, meta_values[i]);
        }
        sb_putn(&b, "}", 1);
    }
    uint64_t off = 0;
    for (int i = 0; i < count; i++) {
        const st_tensor *t = &tensors[i];
        if (i || meta_count > 0)
            sb_putn(&b, ",", 1);
        sb_jstr(&b, t->name);
        sb_puts(&b, ":{\"dtype\":\"");
        sb_puts(&b, st_dtype_name(t->dtype));
        sb_puts(&b, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            if (d)
                sb_putn(&b, ",", 1);
            sb_i64(&b, t->shape[d]);
        }
        sb_puts(&b, "],\"data_offsets\":[");
        sb_i64(&b, (int64_t)off);
        sb_putn(&b, ",", 1);
        off += t->nbytes;
        sb_i64(&b, (int64_t)off);
        sb_puts(&b, "]}");
    }
    sb_putn(&b, "}", 1);
    while (!b.oom && (8 + b.len) % 8 != 0)
        sb_putn(&b, " ", 1);
    if (b.oom) {
        free(b.p);
        seterr(err, errlen, "%s: out of memory", path);
        return -1;
    }
    if (b.len > ST_MAX_HEADER) {
        free(b.p);
        seterr(err, errlen, "%s: header of %zu bytes exceeds the limit of %u bytes", path, b.len,
               (unsigned)ST_MAX_HEADER);
        return -1;
    }
    uint8_t lenbytes[8];
    for (int i = 0; i < 8; i++)
        lenbytes[i] = (uint8_t)(((uint64_t)b.len >> (8 * i)) & 0xFF);

    /* Where the bytes go. "-" is standard output. A symlink is followed to its final
     * target, which is written in its place (the link stays a link). A target that exists
     * and is not a regular file (a device such as /dev/null, a FIFO, a terminal) is
     * written through in place: no atomicity is possible there, and nothing else of it
     * changes. Anything else gets a temporary file beside the target, renamed over it only
     * once everything was written, so a failure leaves no partial file; an existing
     * regular file keeps its permissions. */
    const char *stage = "write";
    int rc = -1, fd = -1, direct = 0;
    char *tmp = NULL, *target = NULL;
    struct stat ts;
    int exists = 0;
    if (!strcmp(path, "-")) {
        fd = STDOUT_FILENO;
        direct = 1;
    } else {
        if (resolve_links(path, &target, err, errlen)) {
            free(b.p);
            return -1;
        }
        exists = stat(target, &ts) == 0;
        if (exists && S_ISDIR(ts.st_mode)) {
            seterr(err, errlen, "%s: is a directory", path);
            free(target);
            free(b.p);
            return -1;
        }
        if (exists && !S_ISREG(ts.st_mode)) {
            stage = "open";
            fd = open(target, O_WRONLY | O_NOCTTY);
            if (fd < 0)
                goto fail;
            direct = 1;
        }
    }
    if (!direct) {
        static const char suffix[] = ".tmpXXXXXX";
        size_t pl = strlen(target);
        tmp = malloc(pl + sizeof suffix);
        if (!tmp) {
            seterr(err, errlen, "%s: out of memory", path);
            free(target);
            free(b.p);
            return -1;
        }
        memcpy(tmp, target, pl);
        memcpy(tmp + pl, suffix, sizeof suffix);
        fd = mkstemp(tmp);
        if (fd < 0) {
            seterr(err, errlen, "%s: cannot create a temporary file: %s", path, strerror(errno));
            free(tmp);
            free(target);
            free(b.p);
            return -1;
        }
        /* mkstemp makes the file 0600: give it the mode of the file it replaces, else the
         * mode a plain creat() would have. The umask is read by setting it back at once
         * (not thread-safe; this is a tool library). A failure here is harmless. */
        mode_t um = umask(0);
        umask(um);
        (void)fchmod(fd, exists ? (ts.st_mode & 07777) : (mode_t)(0666 & ~um));
    }
    stage = "write";
    if (write_all(fd, lenbytes, 8) || write_all(fd, b.p, b.len))
        goto fail;
    for (int i = 0; i < count; i++)
        if (tensors[i].nbytes && write_all(fd, tensors[i].data, tensors[i].nbytes))
            goto fail;
    if (fd == STDOUT_FILENO) {
        fd = -1;
        rc = 0;
        goto done;
    }
    stage = "close";
    {
        int c = close(fd);
        fd = -1;
        if (c != 0)
            goto fail;
    }
    if (!direct) {
        stage = "rename";
        if (rename(tmp, target) != 0)
            goto fail;
    }
    rc = 0;
    goto done;
fail: {
    int e = errno;
    seterr(err, errlen, "%s: %s failed: %s", path, stage, strerror(e));
}
    if (fd >= 0 && fd != STDOUT_FILENO)
        close(fd);
    if (tmp)
        unlink(tmp);
done:
    free(tmp);
    free(target);
    free(b.p);
    return rc;
}
