/*
 * fuzz_safetensors.c: libFuzzer target for the safetensors reader (src/safetensors.c).
 *
 * Feeds the input to st_parse; when it is accepted, checks the invariants the rest of
 * the project relies on, then frees. Build: meson -Dfuzz=true (clang), or
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Isrc src/safetensors.c \
 *         tests/fuzz_safetensors.c -o fuzz_safetensors
 * Seeds: tests/fuzz-corpus (copy it to a scratch folder first: the fuzzer adds files).
 */
#include "safetensors.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file f;
    char err[512];
    if (st_parse(data, size, &f, err, sizeof err) != 0) {
        /* a failure leaves the output empty and says why */
        if (f.tensors || f.count || f.meta_keys || f.meta_values || f.meta_count || !err[0])
            abort();
        if (!memchr(err, '\0', sizeof err))
            abort();
        return 0;
    }
    size_t total = 0;
    for (int i = 0; i < f.count; i++) {
        const st_tensor *t = &f.tensors[i];
        if (!t->name || t->ndim < 0 || t->ndim > ST_MAX_DIMS)
            abort();
        if ((unsigned)t->dtype >= (unsigned)ST_DTYPE_COUNT)
            abort();
        int64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0)
                abort();
            if (t->shape[d] == 0)
                numel = 0;
        }
        for (int d = 0; d < t->ndim && numel; d++)
            numel *= t->shape[d]; /* cannot overflow: the reader checked */
        if (t->numel != numel || t->nbytes != (size_t)numel * st_dtype_size(t->dtype))
            abort();
        if ((t->nbytes == 0) != (t->data == NULL))
            abort();
        if (t->data && ((uintptr_t)t->data % 64) != 0)
            abort();
        if (t->nbytes) { /* touch every byte: ASan checks the allocation */
            volatile uint8_t sink = 0;
            const uint8_t *p = t->data;
            for (size_t k = 0; k < t->nbytes; k++)
                sink ^= p[k];
            (void)sink;
        }
        total += t->nbytes;
        const st_tensor *found = st_find(&f, t->name);
        if (!found || strcmp(found->name, t->name) != 0)
            abort();
    }
    if (total > size) /* ranges do not overlap, so the copies fit in the input */
        abort();
    for (int i = 0; i < f.meta_count; i++) {
        if (!f.meta_keys[i] || !f.meta_values[i])
            abort();
        const char *v = st_meta(&f, f.meta_keys[i]);
        if (!v || strcmp(v, f.meta_values[i]) != 0) /* keys are unique */
            abort();
    }
    st_free(&f);
    return 0;
}
