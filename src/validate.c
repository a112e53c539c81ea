/*
 * validate.c: value checks at the API boundary (finite inputs, the g <= 0 domain, and the
 * ATK state's a >= 0).
 */
#include <math.h>
#include <stdio.h>

#include "kla_internal.h"

/* "[0, 3, 1]" for flat index i of a tensor of the given shape */
static void format_index(char *out, size_t len, int64_t i, const int64_t *shape, int ndim)
{
    int64_t idx[8];
    for (int d = ndim - 1; d >= 0; d--) {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    size_t o = 0;
    o += (size_t)snprintf(out + o, len - o, "[");
    for (int d = 0; d < ndim && o < len; d++)
        o += (size_t)snprintf(out + o, len - o, d ? ", %lld" : "%lld", (long long)idx[d]);
    if (o < len) snprintf(out + o, len - o, "]");
}

int kla__check_values(KlaContext *ctx, const char *name, KlaIn t, const int64_t *shape,
                      int ndim, int sign)
{
    if (!t.data) return 0;
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) n *= shape[d];
    for (int64_t i = 0; i < n; i++) {
        const double x = kla__get_real(t.data, t.dtype, i);
        if (isfinite(x) && !(sign < 0 && x > 0) && !(sign > 0 && x < 0)) continue;
        char where[160];
        format_index(where, sizeof where, i, shape, ndim);
        if (!isfinite(x))
            return kla__fail(ctx, KLA_ERANGE, "tensor %s: %s at %s%s", name,
                             isnan(x) ? "NaN" : "Inf", name, where);
        if (sign < 0)
            return kla__fail(ctx, KLA_ERANGE, "tensor %s: value %g > 0 at %s%s (%s is a log decay: %s <= 0)",
                             name, x, name, where, name, name);
        return kla__fail(ctx, KLA_ERANGE,
                         "tensor %s: value %g < 0 at %s%s (the ATK state must stay >= 0: it enters "
                         "ln(a + squash_eps))", name, x, name, where);
    }
    return 0;
}
