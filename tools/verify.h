/*
 * verify.h: tensor comparison of kla-spec.md section 5, shared by `kla verify` and
 * `kla golden check`.
 */
#ifndef KLA_TOOLS_VERIFY_H
#define KLA_TOOLS_VERIFY_H

#include <stdio.h>

#include "safetensors.h"

typedef struct VerifyOptions {
    double tol;          /* < 0: verify_default_tol() per tensor */
    const char *tensors; /* comma-separated names to compare; NULL: see verify_files */
} VerifyOptions;

/* 1e-5 for o, ht and non-gradient names; 1e-4 for gradients (dq dk dv dg deta dbeta dh0). */
double verify_default_tol(const char *name);

/* 1 if name is an output name (o ht dq dk dv dg deta dbeta dh0). */
int verify_is_output_name(const char *name);

/* Writes "name[b=0, t=3, hv=1, v=2]" (dimension names by tensor name, see kla-spec.md
 * section 2; [i0=.., i1=..] for other names) for flat index `flat` of shape. */
void verify_format_index(char *buf, size_t n, const char *name, const st_tensor *t,
                         int vk, long long flat);

/* Compares one tensor and prints one line (two for a failure) to out.
 * got == NULL means missing. vk: state tensors are [n, hv, v, k]. Returns 1 pass, 0 fail. */
int verify_tensor(FILE *out, const char *name, const st_tensor *ref, const st_tensor *got,
                  double tol, int vk);

/* Compares got against ref: the tensors named in opt->tensors, else ref's output-named
 * tensors, else all of ref's tensors; prints a line per tensor and the summary line
 * "verify: P passed, F failed". Returns the number of failures (an empty selection
 * counts as one). */
int verify_files(FILE *out, const st_file *got, const st_file *ref, const VerifyOptions *opt);

#endif
