/*
 * verify.h: tensor comparison of kla-spec.md section 5, shared by `kla verify` and
 * `kla golden check`.
 */
#ifndef KLA_TOOLS_VERIFY_H
#define KLA_TOOLS_VERIFY_H

#include <stdio.h>

#include "safetensors.h"

typedef struct VerifyOptions {
    double tol;          /* < 0: REF's tolerance set (tol_set), else verify_default_tol() */
    const char *tensors; /* comma-separated names to compare; NULL: see verify_files */
    const char *tol_set; /* "float32" (NULL) or "bf16": REF metadata key tol_<set> */
} VerifyOptions;

/* 1e-5 for o, ht and non-gradient names; 1e-4 for gradients (dq dk dv dg deta dbeta dh0,
 * dx and grad.*). */
double verify_default_tol(const char *name);

/* The tolerance for tensor `name` in REF's metadata key `key` (golden cases carry
 * tol_float32 and tol_bf16 as "o=1e-05,ht=1e-05,dq=0.0001,..."); -1 if absent. */
double verify_meta_tol(const st_file *ref, const char *key, const char *name);

/* 1 if name is an output name (o ht dq dk dv dg deta dbeta dh0; y dx loss grad.* new.*). */
int verify_is_output_name(const char *name);

/* Writes "name[b=0, t=3, hv=1, v=2]" (dimension names by tensor name, see kla-spec.md
 * section 2; [i0=.., i1=..] for other names) for flat index `flat` of shape. */
void verify_format_index(char *buf, size_t n, const char *name, const st_tensor *t,
                         int vk, long long flat);

/* The elementwise floor: every element must be within max(tol, VERIFY_ELEM_TOL) *
 * (|ref| + rms(ref)) besides rel_rmse <= tol. */
#define VERIFY_ELEM_TOL 1e-4

/* The bf16 set's element bound, as a multiple of its rel_rmse bound, for files without
 * elem_bf16 metadata. Calibrated with a simulated bf16 kernel (tests/bf16_sim.py): its
 * worst elements reach 3.6% (o) and 9.6% (dk) against rel_rmse bounds of 2% and 5%, and
 * every known bug still fails (docs/golden.md, "Tolerances"). */
#define VERIFY_BF16_ELEM_FACTOR 5

/* Compares one tensor and prints one line to out; a failure adds the worst element
 * (ref and got), and for tensors with heads the rel_rmse of each head ("by head", only
 * the heads over tol when there are more than 16) and the first token whose own error
 * rms(ref - got over the token) / rms(ref) exceeds tol.
 * got == NULL means missing. elem: the element bound (< 0: max(tol, VERIFY_ELEM_TOL)).
 * vk: state tensors are [n, hv, v, k]. Returns 1 pass, 0 fail. */
int verify_tensor(FILE *out, const char *name, const st_tensor *ref, const st_tensor *got,
                  double tol, double elem, int vk);

/* Compares got against ref: the tensors named in opt->tensors, else ref's output-named
 * tensors, else all of ref's tensors; tolerance opt->tol, else REF's metadata tol_float32
 * (tol_bf16 with opt->tol_set "bf16"), else verify_default_tol(); prints a line per tensor and the summary line
 * "verify: P passed, F failed". Returns the number of failures (an empty selection
 * counts as one). */
int verify_files(FILE *out, const st_file *got, const st_file *ref, const VerifyOptions *opt);

#endif
