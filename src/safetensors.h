/*
 * safetensors.h: reader and writer of the interchange format (kla-spec.md section 4).
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON header, then raw
 * little-endian data. The header is an object: each key a tensor name mapping to
 * {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} (offsets relative to the
 * byte after the header), plus an optional "__metadata__" object of string -> string.
 *
 * The reader accepts any byte string without crashing: every malformed input is an
 * error with a message naming the problem (and the tensor, where there is one).
 * Internal to the project (tool, tests, fuzzer); not part of the public API.
 */
#ifndef KLA_SAFETENSORS_H
#define KLA_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8

typedef enum st_dtype {
    ST_F64, ST_F32, ST_F16, ST_BF16, ST_I64, ST_I32, ST_I16, ST_I8, ST_U64, ST_U32,
    ST_U16, ST_U8, ST_BOOL, ST_F8_E4M3, ST_F8_E5M2, ST_DTYPE_COUNT
} st_dtype;

typedef struct st_tensor {
    char *name;               /* NUL-terminated, owned */
    st_dtype dtype;
    int ndim;                 /* 0..ST_MAX_DIMS; 0 is a scalar */
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;            /* product of shape (1 for a scalar) */
    size_t nbytes;            /* numel * st_dtype_size(dtype) */
    void *data;               /* owned, 64-byte aligned copy; NULL when nbytes == 0 */
} st_tensor;

typedef struct st_file {
    st_tensor *tensors;       /* in file order of data offsets */
    int count;
    char **meta_keys;         /* __metadata__, owned */
    char **meta_values;
    int meta_count;
} st_file;

/* "F32", "F64", ... */
const char *st_dtype_name(st_dtype d);
size_t st_dtype_size(st_dtype d);

/* Parse a whole file image. On success returns 0 and fills *out (free with st_free).
 * On failure returns -1, leaves *out empty and writes a message to err. */
int st_parse(const uint8_t *buf, size_t len, st_file *out, char *err, size_t errlen);

/* Read and parse a file. Messages start with the path: "PATH: truncated file ...". */
/* 1 when the last st_parse / st_read of this thread failed for want of memory. */
int st_last_failed_oom(void);
int st_read(const char *path, st_file *out, char *err, size_t errlen);

void st_free(st_file *f);

/* NULL when absent. */
const st_tensor *st_find(const st_file *f, const char *name);
const char *st_meta(const st_file *f, const char *key);

/* Write tensors and metadata to path atomically: a temporary file in the same folder,
 * renamed over path only when everything was written; on failure no file is left at
 * path (nor the temporary). Tensor data are laid out in the given order, 8-byte
 * aligned; metadata keys in the given order. Returns 0, or -1 with a message in err. */
int st_write(const char *path, const st_tensor *tensors, int count,
             const char *const *meta_keys, const char *const *meta_values, int meta_count,
             char *err, size_t errlen);

/* The parsed file behind a KlaFile (kla.h), for the project's own tools. */
struct KlaFile;
const st_file *kla__file_st(const struct KlaFile *f);

#endif
