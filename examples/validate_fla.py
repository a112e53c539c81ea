#!/usr/bin/env python3
"""Validate flash-linear-attention's (fla) Triton kernels for Gated DeltaNet, KDA and the
preconditioned delta rules (PGDN, PDN, PKDA) as KLA / Gated DeltaNet / delta-rule family
kernels on the golden cases: outputs, and gradients where the kernel has a backward.

    python3 examples/validate_fla.py [--kernel KERNEL[,...]|all]
        [--dtype float32|bf16|fp16|all] [--forward-only] [--cases GLOB[,GLOB...]]
        [--tol float32|bf16] [--family-rewrites on|off] [--out DIR] [--json FILE]
        [--jobs N] [--verbose]
    python3 examples/validate_fla.py --selftest [--cases GLOB]     # CPU, no fla needed

Kernels, each run on the golden cases of its variant (kla-spec.md sections 1 and 7; a
case of another variant is never given to it, and the header says which selected cases
no selected kernel runs):
- `chunk`: fla.ops.gated_delta_rule.chunk_gated_delta_rule (forward and backward) and
  `fused_recurrent`: fused_recurrent_gated_delta_rule (forward only: fla's backward
  raises NotImplementedError, so it is reported as an ERROR on the first case and the
  rest of that kernel runs forward-only), on the section-1 cases (kla_*, gdn_*).
- `kda`: fla.ops.kda.chunk_kda (forward and backward) and `fused_recurrent_kda` (forward
  only: a plain function over a Triton kernel, its outputs have no grad_fn), on the
  gate-channel cases (kda_*, and kkda_* through the Kaczmarz rewrite below).
- `precond`: fla.ops.precond_gated_delta_rule.chunk_precond_gated_delta_rule (forward and
  backward) and `fused_recurrent_precond` (forward only, NotImplementedError), on the
  ATK cases with a decay per head (pgdn_*, pdn_* with g = 0, pkla_*).
- `precond_kda`: fla.ops.precond_kda.chunk_precond_kda (forward and backward) and
  `fused_recurrent_precond_kda` (forward only, no autograd), on the ATK cases with a
  decay per channel (pkda_*, pkkda_*).
`all` (the default) is all eight; section-1 cases run exactly as before the family was
added. dtypes: the dtype of q, k and v given to the kernel (default float32 and bf16;
`all` adds fp16); every other input (g, beta, the ATK tensors, the states) goes in float32
(beta and beta_atk in the input dtype with --beta-dtype input).

NEEDS a CUDA GPU, PyTorch, Triton and flash-linear-attention (`pip install
flash-linear-attention`). KDA is in fla since 0.4.0 (grouped value heads since 0.5.0);
the preconditioned ops (precond*) only in fla's main branch since e47d5d20 (2026-08-20),
in no release yet at bc3b101d (whose __version__ still says 0.5.2; the v0.5.2 tag is
older): `pip install git+https://github.com/fla-org/flash-linear-attention`. NOT RUN IN
THIS REPOSITORY'S CI, which has none of them. THE FAMILY PATHS (the six kernels after
`fused_recurrent`) HAVE RUN ONLY AGAINST THE CPU STAND-INS, NEVER AGAINST fla ON A GPU:
their fla calls are written from fla's source at the commit below (signatures, shapes,
return values), and a real run may still find a convention this script gets wrong. A
family kernel the installed fla does not have is reported as not applicable (N/A),
never as a failure. The harness itself (subprocesses, reporting, fallbacks, grouped heads,
beta, the family's names, shapes, layouts, initial states and gradients, --out, --json) is
checked on the CPU by `--selftest`, which replaces fla's eight functions with small
float32 PyTorch recurrences written from kla-spec.md sections 1 and 7 and injects a crash
(os.abort), an exception and deliberately wrong stand-ins (KDA's decay after the update,
an ATK without the current token) that the report must call FAIL:
tests/test_validate_fla.py runs it. docs/validating.md walks through validating a kernel.

Isolation: every (case, kernel, dtype) runs in its own process (this script re-invoked
with a hidden --one), so a CUDA error such as an illegal memory access, which leaves the
process's CUDA context unusable, cannot make the runs after it fail. A child that dies or
times out is reported as an ERROR of that kernel on that case, with the tail of its
stderr; what it finished before (the forward pass) is still reported.

Conventions, as checked in fla's source (github.com/fla-org/flash-linear-attention at
commit bc3b101dcb71, 2026-08-22, __version__ 0.5.2, and its tags v0.1.2 .. v0.5.2):
- q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV] ("seq-first"). `head_first` was
  a parameter up to fla 0.3 (default True in the v0.1 fused_recurrent!), is a deprecated
  **kwargs entry in 0.4 and raises DeprecationWarning from 0.5 on: it is passed, as False,
  only when the installed function's signature names it.
- Arguments are passed by keyword: fused_recurrent_gated_delta_rule has `gk, gv` between
  g and beta since fla 0.3, so a positional beta would land in gk.
- g is the natural log of the decay: chunk.py chunk_gated_delta_rule_fwd multiplies its
  chunk cumsum by RCP_LN2 (1/ln 2) for exp2; fused_recurrent.py applies exp(g). Both decay
  the state first, then take the residual against the decayed state, then read o from
  the updated state with scale * q: kla-spec.md section 1.
- initial_state and the final state are [N, HV, K, V] (kla state_layout kv; the vk cases
  are transposed here) and the final state is float32 (chunk_delta_h.py
  chunk_gated_delta_rule_fwd_h, fused_recurrent.py fused_recurrent_gated_delta_rule_fwd).
- cu_seqlens is a LongTensor with B = 1 (both functions raise otherwise).
- scale defaults to K^-1/2 in fla as in the spec; the case's scale is always passed.
- use_qk_l2norm_in_kernel is x / sqrt(sum(x^2) + 1e-6) (fla/modules/l2norm.py
  l2norm_fwd, eps=1e-6; the fused kernel inlines the same): the spec's l2norm.
- beta is read with .to(tl.float32) by every kernel that loads it (fused_recurrent.py;
  chunk_fwd.py chunk_gated_delta_rule_fwd_intra_kernel; wy_fast.py), and its gradient
  is returned in beta's dtype (chunk.py: db.to(beta_raw)), so beta goes in float32.
  So do beta and beta_atk for the family kernels. fla's own tests give those in the
  input dtype (tests/ops/test_kda.py, test_precond_gated_delta.py; g, g_atk, h0, A0 and
  log_atk_scale in float32), so float32 beta with bf16 q, k, v is not a combination fla
  tests there; their kernels follow the GDN kernels' pattern (a product with beta is cast
  before tl.dot: kda/wy_fast.py `tl.dot(b_A, b_kb.to(b_k.dtype))`), which ran with float32
  beta on an H200. Should one refuse it (a Triton dtype error), --beta-dtype input rounds
  beta to the input dtype, the host-formed Kaczmarz beta too: in the self-test that
  rounding alone moves the one-element dlog_atk_scale of the EX5 and EX6 cases by 14%,
  beyond the bf16 set.
- Grouped value heads (HV > H): value head hv reads key head hv // (HV / H), as in the
  spec: `i_h = i_hv // (HV // H)` in fused_recurrent.py (since fla 0.3), and
  `i_h // (HV // H)` in chunk_o.py, chunk_delta_h.py, wy_fast.py and chunk_fwd.py with
  dq, dk summed back per key head (`dk.view(B, T, H, HV // H, K).sum(3)`) since fla
  0.5.0. The script reads the installed fla's source for that mapping; where it is
  missing (chunk before 0.5.0) q and k are repeated per value head with repeat_interleave
  (autograd sums their gradients back) and the report line says so.

KLA through a Gated DeltaNet kernel (kla-spec.md section 1): KLA is GDN with the step
size beta_t = eta_t / (||k_t||^2 + eps), so a GDN kernel computes KLA when given that
beta. It is formed here on the host, in float32, under autograd, from the key the kernel
uses (l2norm(k) when the case has l2norm_k), so deta and the extra term of dk come out of
the chain rule. It is never cast to fp16: in the `knorms` case (key norms 0 and 2^-12)
beta reaches about 1/eps = 1e6, above fp16's 65504. The report notes when beta, or the
products beta * v that fla's chunk kernels round to the input dtype (wy_fast.py
recompute_w_u_fwd_kernel: `(b_v * b_b[:, None]).to(b_v.dtype)`, in fla/ops/kda too),
exceed the kernel dtype's range.

The family (kla-spec.md section 7; notes/delta-family.md 1.1-1.6 and 2.2-2.5), as checked
in fla's source at the commit above:
- KDA: chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state,
  use_qk_l2norm_in_kernel, ..., cu_seqlens) with g [B, T, HV, K] (asserted, per value
  head), beta [B, T, HV], initial_state float32 (asserted), chunk_size 64 (32 or 64 in
  **kwargs; the default is used); fused_recurrent_kda has A_log, dt_bias between beta and
  scale (keywords, again). Grouped value heads since fla 0.5.0 (#833), read from the
  source as for the GDN kernels (fla/ops/kda/chunk_intra.py, wy_fast.py, chunk_bwd.py,
  fused_recurrent.py); before that, q and k are repeated per value head.
- PGDN/PDN: chunk_precond_gated_delta_rule(q, k, v, g_atk, g, beta_atk, beta, scale,
  initial_state, initial_A_state, output_final_state, use_qk_l2norm_in_kernel=True,
  cu_seqlens, ..., x, eps, log_atk_scale) returns (o, final state, A state [N, H, K] in
  k's dtype); g_atk and g must be tensors (chunk_atk_fwd.py calls `log_g.contiguous()`,
  chunk_local_cumsum takes g), so an absent g (PDN) or g_atk goes in as zeros, whose
  gradient is the case's dg / dg_atk at 0. The gradient of initial_A_state is fla's
  dh0_atk (our da0; a0 absent: zeros, da0 at a0 = 0); dlog_atk_scale comes back only when
  log_atk_scale is a tensor (with None, fla fills -0.2 itself and returns no gradient),
  so it is always passed as one (-0.2 where the case has none). squash_x -> x,
  squash_eps -> eps. use_qk_l2norm_in_kernel defaults to True and is always passed.
  fused_recurrent_precond_gated_delta_rule: the same names (g, gk, gv, beta keywords),
  A state float32, a backward that raises.
- PKDA: chunk_precond_kda(q, k, v, g, g_atk, beta_atk, beta, ...) (g BEFORE g_atk) has
  no use_qk_l2norm_in_kernel: it always normalises q and k (`True,   #
  use_qk_l2norm_in_kernel (always True)`), and no grouped value heads (it asserts
  q.shape == k.shape == g.shape and v [B, T, H, V]). fused_recurrent_precond_kda has the
  flag and grouped heads, but keeps one ATK per VALUE head (g_atk, beta_atk,
  log_atk_scale, initial_A_state sized HV: `g_atk + bos * HV + i_hv`), where the spec
  has one per key head; the script reads that from its source.
- Names back: o, ht (final state, transposed for vk cases), at (A state), dq, dk, dv, dg,
  dbeta|deta, dh0, dg_atk, dbeta_atk, dlog_atk_scale, da0 (dh0_atk) from autograd on
  float32 leaves; L = sum(do o) + sum(dht ht) + sum(dat at).

Exact rewrites (--family-rewrites on, the default; off reports these runs N/A), each
noted on the run's report line:
- Kaczmarz step (mode kla: kkda_*, pkla_*, pkkda_*; fla has none): as for section 1,
  beta = eta / (||k||^2 + eps) is formed on the host (KDA), and under the preconditioner
  beta = eta / (k . kw + eps), kw = k * m from the ATK scan recomputed on the host in
  float32 (fla does not return its write key): exact, but the gradient through that
  beta into k, g_atk, beta_atk, log_atk_scale and a0 is the host's, not fla's.
- l2norm on one of q, k only (use_qk_l2norm_in_kernel does both or neither): that one is
  normalised on the host in float32, as for section 1.
- Raw keys through chunk_precond_kda, which always normalises k to k / n, n =
  sqrt(||k||^2 + 1e-6): the read key, the write key (k / n * m) and the residual all
  shrink by n and the ATK would accumulate (k / n)^2, so v / n, beta * n^2 and
  beta_atk * n^2 give back the case's recurrence exactly (o, ht, at unchanged; autograd
  maps the gradients back). Raw q cannot be rewritten (o is read with the normalised q):
  a case with l2norm_q false is N/A for chunk_precond_kda.
- Grouped value heads where the call has one ATK per value head (q, k repeated for
  chunk_precond_kda, or fused_recurrent_precond_kda's layout): g_atk, beta_atk,
  log_atk_scale and a0 are repeated to the value heads of their key head, which gives
  each the key head's ATK exactly; at is read from the first value head of each group and
  autograd sums the gradients back.

Tolerances (docs/validating.md section 3): the float32 set for a kernel that computes in
float32 from float32 inputs, which is a fused recurrent kernel with float32 inputs
(it loads everything with .to(tl.float32) and keeps its state in float32); the bf16 set
otherwise: bf16/fp16 inputs, and the float32 chunk kernels, whose tl.dot products run in
Triton's default tf32 precision on float32 inputs (about 1e-3). --tol overrides. The
family cases' bf16 set (0.02 for o, ht, at, 0.05 for gradients) has not been calibrated
against a bf16 kernel (tests/test_bf16_tol.py judges section 1's cases only).

Backends: fla 0.5 may route chunk_gated_delta_rule to FlashQLA (package flash_qla, Hopper
and Blackwell, bf16/fp16; FLA_FLASH_QLA=0 turns it off) and chunk_bwd_dqkwg to TileLang
(package tilelang; on by default on Hopper with Triton >= 3.4, FLA_TILELANG=0/1). Without
tilelang, fla's chunk backward refuses to run on Hopper with 3.4.0 <= Triton < 3.7.1 (fla
issue 640; fla >= 0.5.0 raises RuntimeError in fla/ops/common/chunk_o.py chunk_bwd_dqkwg,
which chunk_precond_gated_delta_rule's backward calls too): that is reported as the
backward's ERROR, then forward-only. fla 0.4 runs that backward anyway; on an H200 with
Triton 3.6 its bf16 backward gave wrong dk, dv, dg, deta on kla_B2_T100_H2_HV4_K32_V16_h0
and an illegal memory access on gdn_B2_T100_H2_HV4_K32_V16_h0_l2qk. chunk_kda is
`@dispatch('kda')` too (fla/ops/kda/backends: Triton-Ascend, FlashKDA, TileLang). The
backends fla reports choosing are printed as notes.

Run time: each child imports torch and fla (about 20 s on an H200 machine, most of it
fla's import of transformers) and compiles and autotunes the Triton kernels for its
shapes (up to a few minutes on a cold Triton cache). --jobs N runs N (kernel, dtype)
groups at once; `--jobs 4` with the defaults keeps one per group. The family kernels
add 16 groups of 3 to 9 cases each (68 runs with the defaults).

Outputs: --out DIR keeps what fla produced per run as DIR/CASE.KERNEL.DTYPE.safetensors
(spec names, float32), so that e.g.
    kla verify DIR/CASE.chunk.bf16.safetensors --against golden/CASE.safetensors --tol bf16
prints the same comparison (add --tensors o,ht for a forward-only file, o,ht,at with the
ATK). --json FILE writes every result and the summary. Statuses: PASS, FAIL, ERROR (it
raised or died), SKIP (not run: forward-only, a forward that failed, a crash), N/A (this
fla cannot run the case, with the reason). Exit status: 0 when nothing failed or errored
(N/A and SKIP do not count).
"""

import argparse
import fnmatch
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))  # or: pip install ./python
import kla  # noqa: E402  (numpy only; torch and fla are imported in the child processes)

KERNELS = {
    "chunk": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    "fused_recurrent": ("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "kda": ("fla.ops.kda", "chunk_kda"),
    "fused_recurrent_kda": ("fla.ops.kda", "fused_recurrent_kda"),
    "precond": ("fla.ops.precond_gated_delta_rule", "chunk_precond_gated_delta_rule"),
    "fused_recurrent_precond": ("fla.ops.precond_gated_delta_rule",
                                "fused_recurrent_precond_gated_delta_rule"),
    "precond_kda": ("fla.ops.precond_kda", "chunk_precond_kda"),
    "fused_recurrent_precond_kda": ("fla.ops.precond_kda", "fused_recurrent_precond_kda"),
}
SECTION1 = ("chunk", "fused_recurrent")  # a failure to import these is an ERROR, never N/A
# the cases each kernel runs: their (gate, precond), kla-spec.md section 7
VARIANT = {"chunk": ("head", "none"), "fused_recurrent": ("head", "none"),
           "kda": ("channel", "none"), "fused_recurrent_kda": ("channel", "none"),
           "precond": ("head", "atk"), "fused_recurrent_precond": ("head", "atk"),
           "precond_kda": ("channel", "atk"), "fused_recurrent_precond_kda": ("channel", "atk")}
VARIANT_NAME = {("head", "none"): "KLA/GDN", ("channel", "none"): "KDA",
                ("head", "atk"): "PGDN/PDN", ("channel", "atk"): "PKDA"}
# kernels that, when their signature has no use_qk_l2norm_in_kernel, always normalise q and
# k (fla/ops/precond_kda/chunk.py passes `True,   # use_qk_l2norm_in_kernel (always True)`)
# rather than never (fla < 0.3's gated delta rule)
ALWAYS_L2 = ("precond_kda",)
DTYPES = ("float32", "bf16", "fp16")
GRAD_NAMES = ("dq", "dk", "dv", "dg", "deta", "dbeta", "dh0",
              "dg_atk", "dbeta_atk", "dlog_atk_scale", "da0")
PASSES = ("forward", "backward")
STATUSES = ("PASS", "FAIL", "ERROR", "SKIP", "N/A")

# where fla loads the key head of value head i_h: `i_h // (HV // H)` (or i_hv); the
# modules of each kernel that must all have it for native grouped value heads
GVA_PATTERN = re.compile(r"i_hv?\s*//\s*\(\s*HV\s*//\s*H\s*\)")
GVA_MODULES = {
    "fused_recurrent": ("fla.ops.gated_delta_rule.fused_recurrent",),
    "chunk": ("fla.ops.common.chunk_o", "fla.ops.common.chunk_delta_h",
              "fla.ops.gated_delta_rule.wy_fast"),
    "kda": ("fla.ops.kda.chunk_intra", "fla.ops.kda.wy_fast", "fla.ops.kda.chunk_bwd",
            "fla.ops.common.chunk_delta_h"),
    "fused_recurrent_kda": ("fla.ops.kda.fused_recurrent",),
    "precond": ("fla.ops.precond_gated_delta_rule.chunk_precond_kkt_fwd",
                "fla.ops.precond_gated_delta_rule.chunk_precond_wy_bwd",
                "fla.ops.common.chunk_delta_h", "fla.ops.common.chunk_o"),
    "fused_recurrent_precond": ("fla.ops.precond_gated_delta_rule.fused_recurrent",),
    # none: chunk_precond_kda asserts `q.shape == k.shape == g.shape` and v [B, T, H, V]
    "precond_kda": (),
    "fused_recurrent_precond_kda": ("fla.ops.precond_kda.fused_recurrent",),
}
# whose heads the ATK state follows in the fused recurrent kernels: `g_atk + bos * H + i_h`
# (per key head, as the spec) or `g_atk + bos * HV + i_hv` (per value head); the chunk
# kernels run fla/ops/atk/chunk_atk_fwd.py on k's heads
ATK_PATTERN = re.compile(r"g_atk\s*\+\s*bos\s*\*\s*(HV|H)\b")
ATK_MODULES = {"fused_recurrent_precond": "fla.ops.precond_gated_delta_rule.fused_recurrent",
               "fused_recurrent_precond_kda": "fla.ops.precond_kda.fused_recurrent"}


# ---------------------------------------------------------------- small helpers


def _finite(x):
    """JSON-safe floats: NaN and Inf as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _write_json(path, obj):
    """Atomically, so that a child killed mid-write leaves the previous state."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(obj), f, indent=1)
    os.replace(tmp, path)


def _short_path(p):
    """.../site-packages/triton/x.py -> triton/x.py; .../fla/ops/x.py -> fla/ops/x.py"""
    m = re.search(r"(?:site|dist)-packages/(.*)$", p) or re.search(r"(?:^|/)(fla/.*)$", p)
    return m.group(1) if m else p


def _error_info(ex, limit=3):
    """Type, message, the last `limit` frames (with the innermost frame in fla in front
    when those are all in torch or triton) and the full traceback."""
    tb = traceback.extract_tb(ex.__traceback__)
    last = list(tb[-limit:]) if limit > 0 else []
    in_fla = [f for f in tb if re.search(r"(?:^|/)fla/", f.filename)]
    if in_fla and not any(f in last for f in in_fla) and limit > 0:
        last = [in_fla[-1]] + last[1:]
    return {
        "type": type(ex).__name__,
        "message": str(ex),
        "frames": [[_short_path(f.filename), f.lineno, f.name] for f in last],
        "traceback": "".join(traceback.format_exception(type(ex), ex, ex.__traceback__)),
    }


def _tail(text, lines=15, chars=3000):
    """The end of a child's stderr, less faulthandler's list of extension modules."""
    keep = [x for x in (text or "").rstrip()[-chars:].splitlines()
            if not x.startswith("Extension modules:")]
    return "\n".join(keep[-lines:])


def _tol_choice(kernel, dtype, forced):
    """(tolerance set, reason)."""
    if forced:
        return forced, "--tol %s" % forced
    if kernel.startswith("fused_recurrent") and dtype == "float32":
        src = ("fused_recurrent.py" if kernel == "fused_recurrent" else
               KERNELS[kernel][0].replace(".", "/") + "/fused_recurrent.py")
        return "float32", ("float32 inputs into a kernel that computes in float32 "
                           "(%s loads q, k, v, g, beta, h0 .to(tl.float32) "
                           "and keeps the state in float32)" % src)
    if dtype == "float32":
        return "bf16", ("the chunk kernel's tl.dot products run in tf32 on float32 "
                        "inputs (about 1e-3), beyond the float32 set")
    return "bf16", "q, k, v rounded to %s" % dtype


# ---------------------------------------------------------------- host-side recurrences


def _segments(B, T, cu):
    """[(batch row, first token, end token)] of the N sequences."""
    if cu is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError("The batch size is expected to be 1 when using `cu_seqlens`.")
    c = [int(x) for x in cu.tolist()]
    return [(0, c[n], c[n + 1]) for n in range(len(c) - 1)]


def _atk_scan(torch, k, g_atk, beta_atk, lsc, a0, cu, x, eps, stale=False):
    """kla-spec.md 7.2's ATK preconditioner in float32, under autograd: per ATK head
        a_t = exp(g_atk_t) a_{t-1} + beta_atk_t (k_t * k_t)      (token t included)
        r_t = ln(a_t + eps) - c,  m_t = exp(-ln(x) r_t / (1 + |r_t|)),  kw_t = k_t * m_t
    k [B, T, A, K] (A ATK heads), g_atk and beta_atk [B, T, A], lsc (c) [A], a0 [N, A, K]
    or None. Returns (kw [B, T, A, K], at [N, A, K]). stale=True takes m_t from a_{t-1}
    (the current token left out): a deliberate bug for the self-test."""
    B, T, A, K = k.shape
    lx = math.log(x)
    rows, finals = {}, []
    for n, (b, t0, t1) in enumerate(_segments(B, T, cu)):
        a = (torch.zeros(A, K, dtype=torch.float32, device=k.device) if a0 is None
             else a0[n].to(torch.float32))
        for t in range(t0, t1):
            an = torch.exp(g_atk[b, t])[:, None] * a + beta_atk[b, t][:, None] * k[b, t] ** 2
            r = torch.log((a if stale else an) + eps) - lsc[:, None]
            rows[(b, t)] = k[b, t] * torch.exp(-lx * r / (1 + r.abs()))
            a = an
        finals.append(a)
    kw = torch.stack([torch.stack([rows[(b, t)] for t in range(T)]) for b in range(B)])
    return kw, torch.stack(finals)


# ---------------------------------------------------------------- the self-test stand-in
# Float32 PyTorch recurrences under fla's names and argument conventions, so that
# --selftest exercises this harness on the CPU: section 1's (kla-spec.md) for the two Gated
# DeltaNet kernels, section 7's (per-channel decay, the ATK preconditioner with its write
# key) for the family's six. The chunk stand-ins have autograd; the GDN chunk one, like
# fla before 0.5.0's chunk, has no grouped value heads (it refuses HV > H, where old fla
# would silently read wrong strides), nor has chunk_precond_kda's (fla asserts H == HV).
# fused_recurrent_gated_delta_rule's and fused_recurrent_precond_gated_delta_rule's have a
# backward that raises, as fla's; fused_recurrent_kda's and fused_recurrent_precond_kda's
# have no autograd at all (fla's are plain functions over a Triton kernel), and the
# latter keeps its ATK per value head, as fla's does (g_atk, beta_atk [B, T, HV]). The
# stand-ins refuse fla options they do not model and keyword arguments fla does not have
# (real fla swallows many of those in **kwargs), so that a wrong name in the harness fails.

_INJECT = {}  # pass -> "raise" | "abort" | "hang" | "wrong", set by the child from --inject-now


def _st_inject(kernel, stage):
    act = _INJECT.get(stage)
    if act == "raise":
        raise RuntimeError("selftest: injected error in %s %s" % (kernel, stage))
    if act == "abort":
        sys.stderr.write("selftest: injected abort (os.abort) in %s %s\n" % (kernel, stage))
        sys.stderr.flush()
        os.abort()
    if act == "hang":
        sys.stderr.write("selftest: injected hang in %s %s\n" % (kernel, stage))
        sys.stderr.flush()
        while True:
            time.sleep(1)


def _st_wrong():
    """--inject wrong: the stand-in computes a deliberately wrong variant."""
    return _INJECT.get("forward") == "wrong"


def _st_heads(H, HV, native_gva, name):
    """The stand-ins refuse what fla's kernels refuse: HV not a multiple of H, and grouped
    value heads where the kernel has none."""
    if HV % H:
        raise ValueError("num_v_heads (HV=%d) must be divisible by num_heads (H=%d)" % (HV, H))
    if HV != H and not native_gva:
        raise ValueError("selftest %s stand-in: no native grouped value heads (H=%d, HV=%d)"
                         % (name, H, HV))


def _st_recurrence(torch, q, k, v, g, beta, scale, h0, cu, l2, native_gva, name):
    f32 = torch.float32
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    _st_heads(H, HV, native_gva, name)
    q, k, v, beta = q.to(f32), k.to(f32), v.to(f32), beta.to(f32)
    g = torch.zeros(B, T, HV, dtype=f32, device=q.device) if g is None else g.to(f32)
    if l2:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    idx = torch.arange(HV, device=q.device) // (HV // H)  # value head hv reads key head hv // G
    q, k = q.index_select(2, idx), k.index_select(2, idx)
    scale = K ** -0.5 if scale is None else scale
    after = _st_wrong()  # the bug: decay after the update
    tok, finals = {}, []
    for n, (b, t0, t1) in enumerate(_segments(B, T, cu)):
        S = (torch.zeros(HV, K, V, dtype=f32, device=q.device) if h0 is None
             else h0[n].to(f32))
        for t in range(t0, t1):
            if not after:
                S = S * torch.exp(g[b, t])[:, None, None]               # decay first
            e = v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t])          # residual
            S = S + beta[b, t][:, None, None] * k[b, t][:, :, None] * e[:, None, :]
            if after:
                S = S * torch.exp(g[b, t])[:, None, None]
            tok[(b, t)] = torch.einsum("hkv,hk->hv", S, scale * q[b, t])  # updated state
        finals.append(S)
    o = torch.stack([torch.stack([tok[(b, t)] for t in range(T)]) for b in range(B)])
    return o, torch.stack(finals)


def _st_family(torch, name, q, k, v, g, beta, scale, h0, cu, l2, native_gva, atk=None):
    """kla-spec.md section 7 in float32: g [B, T, HV] (a decay per head) or [B, T, HV, K]
    (per key channel: row i of the state decays by exp(g[i])), and with `atk` (a dict:
    g_atk, beta_atk, lsc, a0, x, eps, per_value) the ATK's write key kw = k * m for the
    update while reading and erasing use k. per_value: one ATK per value head (fla's
    PKDA fused recurrent kernel), its inputs sized HV; else per key head. Returns
    (o, ht, at or None). --inject wrong: the ATK leaves the current token out (with atk),
    else the decay comes after the update."""
    f32 = torch.float32
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    _st_heads(H, HV, native_gva, name)
    q, k, v, beta, g = q.to(f32), k.to(f32), v.to(f32), beta.to(f32), g.to(f32)
    if l2:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    idx = torch.arange(HV, device=q.device) // (HV // H)  # value head hv reads key head hv // G
    qv, kv = q.index_select(2, idx), k.index_select(2, idx)
    scale = K ** -0.5 if scale is None else scale
    wrong, at = _st_wrong(), None
    if atk is None:
        kwv = kv
    else:
        ka = kv if atk["per_value"] else k
        kwa, at = _atk_scan(torch, ka, atk["g_atk"].to(f32), atk["beta_atk"].to(f32),
                            atk["lsc"].to(f32), atk["a0"], cu, atk["x"], atk["eps"],
                            stale=wrong)
        kwv = kwa if atk["per_value"] else kwa.index_select(2, idx)
    after = wrong and atk is None
    tok, finals = {}, []
    for n, (b, t0, t1) in enumerate(_segments(B, T, cu)):
        S = (torch.zeros(HV, K, V, dtype=f32, device=q.device) if h0 is None
             else h0[n].to(f32))
        for t in range(t0, t1):
            d = torch.exp(g[b, t])
            d = d[:, :, None] if d.dim() == 2 else d[:, None, None]
            if not after:
                S = S * d                                                  # decay first
            e = v[b, t] - torch.einsum("hkv,hk->hv", S, kv[b, t])          # read with k
            S = S + beta[b, t][:, None, None] * kwv[b, t][:, :, None] * e[:, None, :]
            if after:
                S = S * d
            tok[(b, t)] = torch.einsum("hkv,hk->hv", S, scale * qv[b, t])
        finals.append(S)
    o = torch.stack([torch.stack([tok[(b, t)] for t in range(T)]) for b in range(B)])
    return o, torch.stack(finals), at


def _st_functions():
    import torch

    class Inject(torch.autograd.Function):
        """Identity whose backward runs the injected fault of the backward pass."""
        @staticmethod
        def forward(ctx, x, name):
            ctx.name = name
            return x.view_as(x)

        @staticmethod
        def backward(ctx, dx):
            _st_inject(ctx.name, "backward")
            return dx, None

    # fla's fused recurrent kernels have no backward: their stand-ins raise the same
    # NotImplementedError on purpose, so that the selftest covers the forward-only fallback
    class FusedRecurrent(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, g, beta, scale, h0, cu, l2):
            return _st_recurrence(torch, q, k, v, g, beta, scale, h0, cu, l2, True,
                                  "fused_recurrent")

        @staticmethod
        def backward(ctx, do, dht):
            raise NotImplementedError(
                "Backward pass is not implemented yet (selftest stand-in for fla's "
                "FusedRecurrentFunction.backward)")

    class FusedRecurrentPrecond(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, g, beta, g_atk, beta_atk, lsc, h0, a0, scale, cu, l2, x, eps):
            return _st_family(torch, "fused_recurrent_precond", q, k, v, g, beta, scale, h0,
                              cu, l2, True, atk=dict(g_atk=g_atk, beta_atk=beta_atk, lsc=lsc,
                                                     a0=a0, x=x, eps=eps, per_value=False))

        @staticmethod
        def backward(ctx, do, dht, dat):
            raise NotImplementedError(
                "Backward pass is not implemented yet (selftest stand-in for fla's "
                "FusedRecurrentPrecondGatedDeltaRuleFunction.backward)")

    def refuse(name, kwargs, allowed=(), **flags):
        """fla options a stand-in does not model, and keywords fla does not have."""
        extra = sorted(set(kwargs) - set(allowed))
        if extra:
            raise TypeError("selftest %s stand-in: unexpected keyword argument(s) %s"
                            % (name, ", ".join(extra)))
        bad = [f for f, on in flags.items() if on]
        if bad:
            raise NotImplementedError("selftest %s stand-in: %s not modelled"
                                      % (name, ", ".join(bad)))

    def shapes(name, q, v, g, beta, gate, atk_heads=None, g_atk=None, beta_atk=None,
               lsc=None, a0=None, h0=None, cu=None):
        """fla's shape contract for the family (fla asserts most of it)."""
        B, T, H, K = q.shape
        HV = v.shape[2]
        N = B if cu is None else len(cu) - 1
        want = {"g": (B, T, HV, K) if gate == "channel" else (B, T, HV), "beta": (B, T, HV)}
        got = {"g": g, "beta": beta}
        if atk_heads:
            A = HV if atk_heads == "value" else H
            want.update(g_atk=(B, T, A), beta_atk=(B, T, A), log_atk_scale=(A,),
                        initial_A_state=(N, A, K))
            got.update(g_atk=g_atk, beta_atk=beta_atk, log_atk_scale=lsc, initial_A_state=a0)
        for n, w in want.items():
            if got[n] is not None and tuple(got[n].shape) != w:
                raise ValueError("selftest %s stand-in: %s must have shape %s, got %s"
                                 % (name, n, list(w), list(got[n].shape)))
        if h0 is not None and h0.dtype != torch.float32:
            raise AssertionError("initial_state must be in float32.")

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                               output_final_state=False, use_qk_l2norm_in_kernel=False,
                               cu_seqlens=None, **kwargs):
        if "head_first" in kwargs:
            raise DeprecationWarning("head_first has been removed.")
        _st_inject("chunk", "forward")
        o, ht = _st_recurrence(torch, q, k, v, g, beta, scale, initial_state, cu_seqlens,
                               use_qk_l2norm_in_kernel, False, "chunk")
        o = Inject.apply(o.to(q.dtype), "chunk")
        return o, (ht if output_final_state else None)

    def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None,
                                         scale=None, initial_state=None,
                                         output_final_state=False,
                                         use_qk_l2norm_in_kernel=False, cu_seqlens=None,
                                         **kwargs):
        if "head_first" in kwargs:
            raise DeprecationWarning("head_first has been removed.")
        if gk is not None or gv is not None:
            raise ValueError("selftest stand-in: gk/gv not supported (beta passed by position?)")
        _st_inject("fused_recurrent", "forward")
        if beta is None:
            beta = torch.ones_like(q[..., 0])
        o, ht = FusedRecurrent.apply(q, k, v, g, beta, scale, initial_state, cu_seqlens,
                                     use_qk_l2norm_in_kernel)
        o = Inject.apply(o.to(v.dtype), "fused_recurrent")
        return o, (ht if output_final_state else None)

    def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                  use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, safe_gate=False,
                  lower_bound=None, disable_recompute=False, return_intermediate_states=False,
                  state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, cp_context=None,
                  **kwargs):
        refuse("chunk_kda", kwargs, ("chunk_size",), use_gate_in_kernel=use_gate_in_kernel,
               use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, safe_gate=safe_gate,
               lower_bound=lower_bound is not None, state_v_first=state_v_first,
               return_intermediate_states=return_intermediate_states,
               cp_context=cp_context is not None)
        if kwargs.get("chunk_size", 64) not in (32, 64):
            raise ValueError("`chunk_size` must be either 32 or 64 for KDA")
        shapes("chunk_kda", q, v, g, beta, "channel", h0=initial_state, cu=cu_seqlens)
        _st_inject("kda", "forward")
        o, ht, _ = _st_family(torch, "kda", q, k, v, g, beta, scale, initial_state, cu_seqlens,
                              use_qk_l2norm_in_kernel, True)
        return Inject.apply(o.to(q.dtype), "kda"), (ht if output_final_state else None)

    def fused_recurrent_kda(q, k, v, g, beta, A_log=None, dt_bias=None, scale=None,
                            initial_state=None, output_final_state=False,
                            use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False,
                            use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                            lower_bound=None, state_v_first=False, cu_seqlens=None, **kwargs):
        refuse("fused_recurrent_kda", kwargs, use_gate_in_kernel=use_gate_in_kernel,
               use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
               state_v_first=state_v_first)
        shapes("fused_recurrent_kda", q, v, g, beta, "channel", h0=initial_state, cu=cu_seqlens)
        _st_inject("fused_recurrent_kda", "forward")
        with torch.no_grad():  # as fla's: a plain function over a Triton kernel, no autograd
            o, ht, _ = _st_family(torch, "fused_recurrent_kda", q, k, v, g, beta, scale,
                                  initial_state, cu_seqlens, use_qk_l2norm_in_kernel, True)
        return o.to(v.dtype), (ht if output_final_state else None)

    def chunk_precond_gated_delta_rule(q, k, v, g_atk, g, beta_atk, beta, scale=None,
                                       initial_state=None, initial_A_state=None,
                                       output_final_state=False, use_qk_l2norm_in_kernel=True,
                                       cu_seqlens=None, cu_seqlens_cpu=None, cp_context=None,
                                       transpose_state_layout=False, x=1.5, eps=1e-6,
                                       log_atk_scale=None, **kwargs):
        if "head_first" in kwargs:
            raise DeprecationWarning("head_first has been removed.")
        refuse("chunk_precond_gated_delta_rule", kwargs, cp_context=cp_context is not None,
               transpose_state_layout=transpose_state_layout)
        g_atk, g = g_atk.contiguous(), g.contiguous()  # fla: None fails here too
        lsc = (log_atk_scale if isinstance(log_atk_scale, torch.Tensor) else
               torch.full((k.shape[2],), -0.2, dtype=torch.float32, device=k.device))
        shapes("chunk_precond_gated_delta_rule", q, v, g, beta, "head", "key", g_atk, beta_atk,
               lsc, initial_A_state, cu=cu_seqlens)
        _st_inject("precond", "forward")
        o, ht, at = _st_family(torch, "precond", q, k, v, g, beta, scale, initial_state,
                               cu_seqlens, use_qk_l2norm_in_kernel, True,
                               atk=dict(g_atk=g_atk, beta_atk=beta_atk, lsc=lsc,
                                        a0=initial_A_state, x=x, eps=eps, per_value=False))
        o = Inject.apply(o.to(q.dtype), "precond")
        return (o, ht if output_final_state else None,  # A state in k's dtype, as fla's
                at.to(k.dtype) if output_final_state else None)

    def fused_recurrent_precond_gated_delta_rule(
            q, k, v, g=None, gk=None, gv=None, beta=None, g_atk=None, beta_atk=None, scale=None,
            initial_state=None, initial_A_state=None, output_final_state=False,
            use_qk_l2norm_in_kernel=True, cu_seqlens=None, transpose_state_layout=False, x=1.5,
            eps=1e-6, log_atk_scale=None):
        refuse("fused_recurrent_precond_gated_delta_rule", {}, gk=gk is not None,
               gv=gv is not None, transpose_state_layout=transpose_state_layout)
        g = torch.zeros_like(v[..., 0]) if g is None else g
        beta = torch.ones_like(v[..., 0]) if beta is None else beta
        lsc = (log_atk_scale if isinstance(log_atk_scale, torch.Tensor) else
               torch.full((k.shape[2],), -0.2, dtype=torch.float32, device=k.device))
        shapes("fused_recurrent_precond_gated_delta_rule", q, v, g, beta, "head", "key", g_atk,
               beta_atk, lsc, initial_A_state, cu=cu_seqlens)
        _st_inject("fused_recurrent_precond", "forward")
        o, ht, at = FusedRecurrentPrecond.apply(q, k, v, g, beta, g_atk, beta_atk, lsc,
                                                initial_state, initial_A_state, scale,
                                                cu_seqlens, use_qk_l2norm_in_kernel, x, eps)
        o = Inject.apply(o.to(v.dtype), "fused_recurrent_precond")
        return o, (ht if output_final_state else None), (at if output_final_state else None)

    def chunk_precond_kda(q, k, v, g, g_atk, beta_atk, beta, scale=None, initial_state=None,
                          initial_A_state=None, output_final_state=False,
                          use_gate_in_kernel=False, safe_gate=False, lower_bound=None,
                          cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                          cp_context=None, transpose_state_layout=False, x=1.5, eps=1e-6,
                          log_atk_scale=None, solve_tril_precision=None,
                          disable_recompute=False, return_intermediate_states=False, **kwargs):
        refuse("chunk_precond_kda", kwargs, use_gate_in_kernel=use_gate_in_kernel,
               safe_gate=safe_gate, cp_context=cp_context is not None,
               transpose_state_layout=transpose_state_layout,
               return_intermediate_states=return_intermediate_states)
        if not q.shape == k.shape == g.shape:
            raise AssertionError("q, k, g must have the same shape.")
        if beta.shape != q.shape[:3] or v.shape[:3] != q.shape[:3]:
            raise AssertionError("beta must be of shape (batch size, seq len, num of head).")
        lsc = (log_atk_scale if isinstance(log_atk_scale, torch.Tensor) else
               torch.full((k.shape[2],), -0.2, dtype=torch.float32, device=k.device))
        shapes("chunk_precond_kda", q, v, g, beta, "channel", "key", g_atk, beta_atk, lsc,
               initial_A_state, initial_state, cu_seqlens)
        _st_inject("precond_kda", "forward")
        o, ht, at = _st_family(torch, "precond_kda", q, k, v, g, beta, scale, initial_state,
                               cu_seqlens, True, False,  # always L2-normalises q and k
                               atk=dict(g_atk=g_atk, beta_atk=beta_atk, lsc=lsc,
                                        a0=initial_A_state, x=x, eps=eps, per_value=False))
        o = Inject.apply(o.to(q.dtype), "precond_kda")
        return (o, ht if output_final_state else None,
                at.to(k.dtype) if output_final_state else None)

    def fused_recurrent_precond_kda(q, k, v, g, g_atk, beta_atk, beta, A_log=None,
                                    dt_bias=None, scale=None, initial_state=None,
                                    initial_A_state=None, output_final_state=False,
                                    use_qk_l2norm_in_kernel=True, use_gate_in_kernel=False,
                                    lower_bound=None, cu_seqlens=None,
                                    transpose_state_layout=False, x=1.5, eps=1e-6,
                                    log_atk_scale=None, **kwargs):
        refuse("fused_recurrent_precond_kda", kwargs, use_gate_in_kernel=use_gate_in_kernel,
               transpose_state_layout=transpose_state_layout)
        lsc = (log_atk_scale if isinstance(log_atk_scale, torch.Tensor) else
               torch.full((v.shape[2],), -0.2, dtype=torch.float32, device=k.device))
        shapes("fused_recurrent_precond_kda", q, v, g, beta, "channel", "value", g_atk,
               beta_atk, lsc, initial_A_state, initial_state, cu_seqlens)
        _st_inject("fused_recurrent_precond_kda", "forward")
        with torch.no_grad():  # as fla's: no autograd
            o, ht, at = _st_family(torch, "fused_recurrent_precond_kda", q, k, v, g, beta,
                                   scale, initial_state, cu_seqlens, use_qk_l2norm_in_kernel,
                                   True, atk=dict(g_atk=g_atk, beta_atk=beta_atk, lsc=lsc,
                                                  a0=initial_A_state, x=x, eps=eps,
                                                  per_value=True))
        return o.to(v.dtype), (ht if output_final_state else None), (
            at if output_final_state else None)

    chunk_gated_delta_rule._kla_selftest_gva = False
    fused_recurrent_gated_delta_rule._kla_selftest_gva = True
    chunk_kda._kla_selftest_gva = fused_recurrent_kda._kla_selftest_gva = True
    chunk_precond_gated_delta_rule._kla_selftest_gva = True
    fused_recurrent_precond_gated_delta_rule._kla_selftest_gva = True
    chunk_precond_kda._kla_selftest_gva = False
    fused_recurrent_precond_kda._kla_selftest_gva = True
    chunk_precond_gated_delta_rule._kla_selftest_atk = "key"
    fused_recurrent_precond_gated_delta_rule._kla_selftest_atk = "key"
    chunk_precond_kda._kla_selftest_atk = "key"
    fused_recurrent_precond_kda._kla_selftest_atk = "value"
    return {f.__name__: f for f in (
        chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, chunk_kda, fused_recurrent_kda,
        chunk_precond_gated_delta_rule, fused_recurrent_precond_gated_delta_rule,
        chunk_precond_kda, fused_recurrent_precond_kda)}


def _install_selftest_fla():
    """Put stand-in `fla.ops.*` modules for the eight kernels into sys.modules, less those
    named in $VALIDATE_FLA_SELFTEST_ABSENT (comma separated: an older fla without them)."""
    import types
    fns = _st_functions()
    absent = set(os.environ.get("VALIDATE_FLA_SELFTEST_ABSENT", "").split(","))
    mods = {}
    for name in ["fla", "fla.ops"] + sorted({m for m, _ in KERNELS.values()} - absent):
        m = types.ModuleType(name)
        m.__file__ = os.path.abspath(__file__)
        mods[name] = m
    mods["fla"].__version__ = "selftest (a PyTorch stand-in for fla, float32, CPU)"
    for mod, fn in KERNELS.values():
        if mod in mods:
            setattr(mods[mod], fn, fns[fn])
    sys.modules.update(mods)


# ---------------------------------------------------------------- the child processes


def _import_kernel(kernel):
    import importlib
    mod, fn = KERNELS[kernel]
    return getattr(importlib.import_module(mod), fn)


def _detect_gva(kernel, fn):
    """(native: bool, evidence) from the installed fla's source (see GVA_MODULES)."""
    st = getattr(fn, "_kla_selftest_gva", None)
    if st is not None:
        return st, "selftest stand-in (%s)" % ("native" if st else "none")
    if not GVA_MODULES[kernel]:
        return False, "%s asserts that q, k, g and v have the same heads" % KERNELS[kernel][1]
    import importlib
    import inspect
    found, missing = [], []
    for name in GVA_MODULES[kernel]:
        try:
            src = inspect.getsource(importlib.import_module(name))
        except Exception as ex:  # module absent in this version, or no source
            missing.append("%s (%s)" % (name, type(ex).__name__))
            continue
        m = GVA_PATTERN.search(src)
        if m:
            found.append("%s.py `%s`" % (name.replace(".", "/"), m.group(0)))
        else:
            missing.append(name.replace(".", "/") + ".py")
    if missing:
        return False, "no key-head mapping `i_h // (HV // H)` in " + ", ".join(missing)
    return True, "value head -> key head in " + ", ".join(found)


def _detect_atk(kernel, fn):
    """("key" | "value", evidence): whose heads the kernel's ATK state follows (for the
    chunk kernels: those of the k it is given)."""
    st = getattr(fn, "_kla_selftest_atk", None)
    if st is not None:
        return st, "selftest stand-in"
    name = ATK_MODULES.get(kernel)
    if name is None:
        return "key", "fla/ops/atk/chunk_atk_fwd.py scans the heads of k"
    guess = "value" if kernel == "fused_recurrent_precond_kda" else "key"
    try:
        import importlib
        import inspect
        m = ATK_PATTERN.search(inspect.getsource(importlib.import_module(name)))
    except Exception as ex:
        return guess, "cannot read %s (%s): per %s head assumed, as in fla 0.5.2" % (
            name, type(ex).__name__, guess)
    if not m:
        return guess, "no `g_atk + bos * H[V]` in %s.py: per %s head assumed, as in fla " \
            "0.5.2" % (name.replace(".", "/"), guess)
    return ("value" if m.group(1) == "HV" else "key"), "%s.py `%s`" % (
        name.replace(".", "/"), m.group(0))


def probe_main(a):
    """Versions, device and what the installed fla supports, as JSON in a.result."""
    info = {"python": sys.version.split()[0], "selftest": bool(a.selftest), "kernels": {}}
    _write_json(a.result, info)
    import torch
    info["torch"] = torch.__version__
    if a.selftest:
        _install_selftest_fla()
        info["device"] = "cpu (selftest)"
    else:
        try:
            import triton
            info["triton"] = triton.__version__
        except Exception as ex:
            info["triton"] = "not importable: %s: %s" % (type(ex).__name__, ex)
        if not torch.cuda.is_available():
            info["fatal"] = "no CUDA device visible to PyTorch (this script needs one; " \
                            "--selftest runs the harness on the CPU)"
            _write_json(a.result, info)
            return 0
        cap = torch.cuda.get_device_capability()
        info["device"] = "%s (sm%d%d)" % (torch.cuda.get_device_name(0), cap[0], cap[1])
    try:
        import fla
        info["fla"] = getattr(fla, "__version__", "?")
        info["fla_path"] = os.path.dirname(getattr(fla, "__file__", "") or "?")
    except Exception as ex:
        info["fatal"] = "cannot import fla (pip install flash-linear-attention): %s: %s" % (
            type(ex).__name__, ex)
        _write_json(a.result, info)
        return 0
    if not a.selftest:  # fla issue 640: see the module docstring
        try:
            import importlib.util
            from fla import utils as fu
            hop = bool(getattr(fu, "IS_NVIDIA_HOPPER", False))
            t34 = bool(getattr(fu, "TRITON_ABOVE_3_4_0", False))
            t371 = getattr(fu, "TRITON_ABOVE_3_7_1", None)
            tl = importlib.util.find_spec("tilelang") is not None
            if hop and t34 and t371 is not True and not tl:
                info["issue_640"] = (
                    "Hopper GPU with Triton %s and no tilelang: fla's gated chunk_bwd_dqkwg "
                    "(the backward of chunk_gated_delta_rule and of "
                    "chunk_precond_gated_delta_rule) refuses to run or, in older fla, gives "
                    "wrong gradients (fla issue 640); Triton >= 3.7.1 or `pip install "
                    "tilelang` fixes it" % info.get("triton"))
            info["flash_qla"] = importlib.util.find_spec("flash_qla") is not None
            info["tilelang"] = tl
        except Exception:
            pass
    import inspect
    for kernel in KERNELS:
        k = {"name": ".".join(KERNELS[kernel])}
        try:
            fn = _import_kernel(kernel)
            params = list(inspect.signature(fn).parameters)
            k["params"] = params
            k["head_first"] = "head_first" in params
            k["native_gva"], k["gva_evidence"] = _detect_gva(kernel, fn)
            k["always_l2"] = kernel in ALWAYS_L2 and "use_qk_l2norm_in_kernel" not in params
            if VARIANT[kernel][1] == "atk":
                k["atk_heads"], k["atk_evidence"] = _detect_atk(kernel, fn)
        except Exception as ex:
            k["error"] = "%s: %s" % (type(ex).__name__, ex)
            # a family kernel this fla does not have (it predates it): not applicable
            k["absent"] = kernel not in SECTION1 and (
                isinstance(ex, AttributeError) or (isinstance(ex, ModuleNotFoundError)
                                                   and str(ex.name or "").startswith("fla")))
        info["kernels"][kernel] = k
    _write_json(a.result, info)
    return 0


class _BackendLog:
    """Collects fla's '[FLA Backend] op -> backend' log lines (fla/ops/backends)."""

    def __init__(self):
        import logging
        self.seen = []
        outer = self

        class H(logging.Handler):
            def emit(self, rec):
                msg = rec.getMessage()
                if "[FLA Backend]" in msg:
                    msg = msg.replace("[FLA Backend] ", "")
                    if msg not in outer.seen:
                        outer.seen.append(msg)

        lg = logging.getLogger("fla")
        lg.addHandler(H())
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)


def _l2norm(x):
    import torch
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _report(rep):
    """A kla.Report as a JSON-able pass result with its worst tensor."""
    tensors = []
    for t in rep.tensors:
        d = dict(t)
        if d.get("max_at") is not None:
            d["max_at"] = list(d["max_at"])
        tensors.append(d)

    def badness(t):
        if t.get("problem") or t.get("nonfinite"):
            return math.inf
        r, tol = t.get("rel_rmse"), t.get("tol") or 0
        if r is None or not math.isfinite(r):
            return math.inf
        return r / tol if tol > 0 else (math.inf if r > 0 else 0.0)

    failing = [t for t in tensors if not t["pass"]]
    pool = failing or tensors
    worst = max(pool, key=badness) if pool else None
    return {"status": "PASS" if rep.ok else "FAIL", "tensors": tensors,
            "failing": [t["name"] for t in failing], "worst": worst, "lines": rep.lines}


def one_main(a):
    """Run one (case, kernel, dtype) and write its results to a.result as it goes."""
    res = {"case": a.one, "kernel": a.kernel, "dtype": a.dtype, "stage": "setup",
           "passes": {}, "notes": [], "backends": [], "files": []}
    _write_json(a.result, res)
    for kv in (a.inject_now or "").split(","):
        if kv:
            stage, _, act = kv.partition("=")
            _INJECT[stage] = act
    device = "cpu" if a.selftest else "cuda"
    plan = ["forward"] if a.forward_only else ["forward", "backward"]

    def not_applicable(why):
        for ps in PASSES:
            res["passes"][ps] = {"status": "N/A", "reason": "not applicable: " + why}
        res["stage"] = "done"
        _write_json(a.result, res)
        return 0

    try:
        import numpy as np
        import torch
        if a.selftest:
            _install_selftest_fla()
        blog = _BackendLog()
        fn = _import_kernel(a.kernel)
        import inspect
        params = inspect.signature(fn).parameters
        import fla
        fla_version = getattr(fla, "__version__", "?")
        case = kla.load_case(a.one, a.golden)
        dt = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]

        inp, opt = case.inputs, case.options
        B, T, H, K = inp["q"].shape
        HV = inp["v"].shape[2]
        G = HV // H
        is_kla = opt["mode"] == "kla"
        vk = opt["state_layout"] == "vk"
        chan = opt.get("gate", "head") == "channel"
        atk = opt.get("precond", "none") == "atk"
        family = chan or atk
        need_grad = "backward" in plan
        notes = res["notes"]
        if _INJECT.get("forward") == "wrong":
            notes.append("selftest: the stand-in of this run is deliberately wrong (%s): "
                         "the report must say FAIL" % (
                             "the ATK state leaves the current token out" if atk else
                             "the decay comes after the update"))

        def leaf(x):
            return torch.tensor(np.asarray(x), dtype=torch.float32, device=device,
                                requires_grad=need_grad)

        def const(shape, value, why):
            """An input the case leaves out, at its spec value, as a leaf: its gradient
            there is what the case expects (dg without g, da0 without a0)."""
            if why:
                notes.append(why)
            return torch.full(shape, float(value), dtype=torch.float32, device=device,
                              requires_grad=need_grad)

        q, k, v = leaf(inp["q"]), leaf(inp["k"]), leaf(inp["v"])
        # fla wants a LongTensor (chunk.py / fused_recurrent.py: `cu_seqlens:
        # torch.LongTensor`); the golden files may hold I32
        cu = (torch.tensor(np.asarray(inp["cu_seqlens"]), dtype=torch.long, device=device)
              if "cu_seqlens" in inp else None)
        N = B if cu is None else len(cu) - 1
        # no g (DeltaNet, PDN): zeros, so that dg is the gradient at g = 0, as in the case file
        g = leaf(inp["g"]) if "g" in inp else const(
            (B, T, HV, K) if chan else (B, T, HV), 0.0,
            "no g in the case (PDN): zeros given to fla" if family else None)
        s = leaf(inp["eta"] if is_kla else inp["beta"])
        h0 = leaf(inp["h0"]) if "h0" in inp else None
        if atk:
            g_atk = leaf(inp["g_atk"]) if "g_atk" in inp else const(
                (B, T, H), 0.0, "no g_atk in the case: zeros given to fla")
            beta_atk = leaf(inp["beta_atk"])
            # a tensor always: fla returns dlog_atk_scale only for a tensor (with None it
            # fills -0.2 itself and returns no gradient)
            lsc = leaf(inp["log_atk_scale"]) if "log_atk_scale" in inp else const(
                (H,), -0.2, "no log_atk_scale in the case: a tensor of -0.2 (the spec's and "
                "fla's default) given to fla, so that it returns dlog_atk_scale")
            a0 = leaf(inp["a0"]) if "a0" in inp else const(
                (N, H, K), 0.0, "no a0 in the case: initial_A_state zeros, so that fla "
                "returns da0 (dh0_atk), the gradient at a0 = 0")
            sx, seps = opt.get("squash_x", 1.5), opt.get("squash_eps", 1e-6)

        # l2norm: in the kernel (use_qk_l2norm_in_kernel, the spec's formula, see the
        # docstring) when the case normalises both q and k, else explicitly here
        has_l2 = "use_qk_l2norm_in_kernel" in params
        always_l2 = a.kernel in ALWAYS_L2 and not has_l2
        raw_keys = False  # raw keys through a kernel that always normalises them
        if always_l2:
            if not opt["l2norm_q"]:
                return not_applicable(
                    "fla's %s always L2-normalises q (it has no use_qk_l2norm_in_kernel); "
                    "the case has l2norm_q false" % KERNELS[a.kernel][1])
            raw_keys = not opt["l2norm_k"]
            if raw_keys and a.family_rewrites == "off":
                return not_applicable(
                    "fla's %s always L2-normalises k, the case has raw keys "
                    "(--family-rewrites off)" % KERNELS[a.kernel][1])
            in_kernel_l2 = True
            if a.l2norm == "host":
                notes.append("--l2norm host does not apply: fla's %s always normalises q "
                             "and k" % KERNELS[a.kernel][1])
        else:
            in_kernel_l2 = (opt["l2norm_q"] and opt["l2norm_k"] and a.l2norm == "kernel"
                            and has_l2)
        if is_kla and family and a.family_rewrites == "off":
            return not_applicable("fla has no Kaczmarz step (mode kla; --family-rewrites off)")
        qk = q if in_kernel_l2 or not opt["l2norm_q"] else _l2norm(q)
        kk = k if in_kernel_l2 or not opt["l2norm_k"] else _l2norm(k)
        if family and opt["l2norm_q"] != opt["l2norm_k"] and not in_kernel_l2:
            notes.append("l2norm on %s only: normalised here in float32 (fla's "
                         "use_qk_l2norm_in_kernel normalises both or neither)"
                         % ("q" if opt["l2norm_q"] else "k"))
        kn = _l2norm(k) if opt["l2norm_k"] else k  # the key of the recurrence, per key head
        if is_kla:
            # KLA step size on the host, float32, autograd: beta = eta / (||k||^2 + eps),
            # k as the kernel uses it (after l2norm), value head hv on key head hv // G;
            # under the preconditioner beta = eta / (k . kw + eps) (kla-spec.md 7.2), kw
            # the write key of the ATK recomputed here (fla returns none)
            if atk:
                kw, _ = _atk_scan(torch, kn, g_atk, beta_atk, lsc, a0, cu, sx, seps)
                den = (kn * kw).sum(-1)
                if family:
                    notes.append(
                        "Kaczmarz step (fla has none): beta = eta / (k . kw + eps) formed "
                        "here in float32 with autograd, kw = k * m from the ATK recomputed "
                        "here; the gradients through beta into k, g_atk, beta_atk, "
                        "log_atk_scale and a0 are ours, the rest fla's")
            else:
                den = (kn * kn).sum(-1)
                if family:
                    notes.append("Kaczmarz step (fla has none): beta = eta / (||k||^2 + eps) "
                                 "formed here in float32 with autograd")
            den = den.repeat_interleave(G, dim=2) if G > 1 else den
            beta = s / (den + opt["eps"])
        else:
            beta = s
        vv, batk = v, (beta_atk if atk else None)
        if raw_keys:
            # fla normalises k to k / n, n = sqrt(||k||^2 + 1e-6): read key, write key
            # (k/n * m) and the residual (v/n - S^T k/n) all shrink by n, and the ATK would
            # add (k/n)^2; v / n, beta * n^2, beta_atk * n^2 give back the case's recurrence
            # exactly (o, ht, at unchanged); autograd maps the gradients back
            n2 = (k * k).sum(-1) + 1e-6  # [B, T, H]
            n2v = n2.repeat_interleave(G, dim=2) if G > 1 else n2
            vv = v / torch.sqrt(n2v)[..., None]
            beta = beta * n2v
            if atk:
                batk = beta_atk * n2
            notes.append(
                "raw keys through %s, which always normalises k (to k / n, n = sqrt(||k||^2 "
                "+ 1e-6)): given v / n, beta * n^2%s, an exact rewrite" % (
                    KERNELS[a.kernel][1], ", beta_atk * n^2" if atk else ""))
        gva = "-"
        rep_atk = False  # the ATK inputs repeated per value head
        if G > 1:
            gva = a.gva_mode
            if gva == "repeat":
                qk = qk.repeat_interleave(G, dim=2)  # [B, T, HV, K]: hv reads key head hv // G
                kk = kk.repeat_interleave(G, dim=2)
                rep_atk = atk
            if atk and a.atk_heads == "value":
                rep_atk = True
        res["gva"] = gva
        if atk:
            ga, ba, la, ac = g_atk, batk, lsc, a0
            if rep_atk:
                # one ATK per value head in the call: the key head's inputs repeated to its
                # G value heads give each of them the key head's ATK, exactly
                ga, ba = ga.repeat_interleave(G, dim=2), ba.repeat_interleave(G, dim=2)
                la, ac = la.repeat_interleave(G, dim=0), ac.repeat_interleave(G, dim=1)
                notes.append(
                    "ATK per %s in this call: g_atk, beta_atk, log_atk_scale, a0 repeated per "
                    "value head (each copy is its key head's ATK); at read from the first "
                    "value head of each group" % (
                        "value head (%s)" % a.atk_evidence if a.atk_heads == "value"
                        else "key head of the repeated q, k"))

        # beta (and beta_atk): float32 unless --beta-dtype input; notes where the kernel
        # dtype cannot hold it
        bdt = torch.float32 if a.beta_dtype == "float32" else dt
        with torch.no_grad():
            bf = beta.detach()
            bmax = float(bf.abs().max()) if bf.numel() else 0.0
            res["beta_max"] = bmax
            if dt != torch.float32:
                fmax = float(torch.finfo(dt).max)
                if bmax > fmax:
                    notes.append(
                        "beta up to %.3g exceeds %s's max %.6g: %s" % (
                            bmax, a.dtype, fmax,
                            "passed in float32, as fla accepts" if bdt == torch.float32
                            else "cast to %s as asked (--beta-dtype input): inf" % a.dtype))
                bv = float((bf[..., None] * vv.detach()).abs().max()) if bf.numel() else 0.0
                if not a.kernel.startswith("fused_recurrent") and bv > fmax:
                    notes.append(
                        "beta * v up to %.3g exceeds %s's max %.6g: fla's chunk kernel rounds "
                        "v * beta to the input dtype (wy_fast.py recompute_w_u_fwd_kernel), "
                        "expect inf/NaN" % (bv, a.dtype, fmax))

        init = None
        if h0 is not None:
            init = h0.transpose(-1, -2) if vk else h0  # fla's state is [N, HV, K, V]
        kw = dict(q=qk.to(dt), k=kk.to(dt), v=vv.to(dt), g=g, beta=beta.to(bdt),
                  scale=opt["scale"], initial_state=init, output_final_state=True,
                  cu_seqlens=cu)
        if atk:
            kw.update(g_atk=ga, beta_atk=ba.to(bdt), log_atk_scale=la, initial_A_state=ac,
                      x=sx, eps=seps)
            # fla names that the installed function does not have would vanish into its
            # **kwargs: a case that needs them is not applicable to this fla
            lack = [n for n in ("g_atk", "beta_atk", "log_atk_scale", "initial_A_state", "x",
                                "eps") if n not in params]
            if lack:
                return not_applicable("this fla's %s has no argument %s" % (
                    KERNELS[a.kernel][1], ", ".join(lack)))
        if has_l2:
            kw["use_qk_l2norm_in_kernel"] = bool(in_kernel_l2)
        if "head_first" in params:  # an explicit parameter only up to fla 0.3
            kw["head_first"] = False
        res["call"] = {n: (list(x.shape) + [str(x.dtype).replace("torch.", "")]
                           if hasattr(x, "shape") else x) for n, x in kw.items()}
    except Exception as ex:
        res["passes"]["forward"] = dict(status="ERROR", error=_error_info(ex, a.frames))
        res["stage"] = "done"
        _write_json(a.result, res)
        return 0

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def healthy(ex):
        """False when the exception is (or left) a CUDA error in this process."""
        if re.search(r"CUDA error|illegal memory|CUBLAS_STATUS|device-side assert",
                     str(ex)) or type(ex).__name__ == "AcceleratorError":
            return False
        try:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.ones(1, device="cuda").add_(1).item()
            return True
        except Exception:
            return False

    def save(out, passes):
        if not a.out:
            return
        path = os.path.join(a.out, "%s.%s.%s.safetensors" % (a.one, a.kernel, a.dtype))
        kla.save(path, out, {"state_layout": opt["state_layout"],
                             "kernel": "fla " + KERNELS[a.kernel][1], "dtype": a.dtype,
                             "fla_version": fla_version, "passes": passes})
        if path not in res["files"]:
            res["files"].append(path)

    def npy(t):
        return t.detach().float().contiguous().cpu().numpy()

    # ---- forward
    res["stage"] = "forward"
    _write_json(a.result, res)
    try:
        ret = fn(**kw)
        o, ht = ret[0], ret[1]
        at = ret[2] if atk else None
        if at is not None and rep_atk:
            at = at[:, ::G]  # [N, HV, K] -> the first value head of each key head
        sync()
        out = {"o": npy(o), "ht": npy(ht.transpose(-1, -2) if vk else ht)}
        fwd_names = ["o", "ht"]
        if atk:
            out["at"] = npy(at)
            fwd_names.append("at")
            if at.dtype != torch.float32:
                notes.append("fla returned at in %s" % str(at.dtype).replace("torch.", ""))
        rep = kla.compare(out, case, tol=a.tol_set, tensors=fwd_names, file=None)
        res["passes"]["forward"] = _report(rep)
        save(out, "forward")
    except Exception as ex:
        res["passes"]["forward"] = dict(status="ERROR", error=_error_info(ex, a.frames),
                                        device_ok=healthy(ex))
        res["backends"] = blog.seen
        res["stage"] = "done"
        _write_json(a.result, res)
        return 0
    res["backends"] = list(blog.seen)
    _write_json(a.result, res)

    # ---- backward: L = sum(do * o) + sum(dht * ht) (+ sum(dat * at))
    if "backward" in plan:
        res["stage"] = "backward"
        _write_json(a.result, res)
        try:
            if not o.requires_grad:
                raise NotImplementedError(
                    "fla's %s returned o without autograd (no grad_fn): it has no backward"
                    % KERNELS[a.kernel][1])
            outs = [o]
            grads = [torch.tensor(np.asarray(inp["do"]), device=device).to(o.dtype)]
            if "dht" in inp:
                dht = torch.tensor(np.asarray(inp["dht"]), device=device)
                outs.append(ht)
                grads.append((dht.transpose(-1, -2) if vk else dht).contiguous().to(ht.dtype))
            if atk and "dat" in inp:
                outs.append(at)
                grads.append(torch.tensor(np.asarray(inp["dat"]), device=device).to(at.dtype))
            torch.autograd.backward(outs, grads)
            sync()
            gr = {"dq": q.grad, "dk": k.grad, "dv": v.grad, "dg": g.grad,
                  ("deta" if is_kla else "dbeta"): s.grad}
            if h0 is not None:
                gr["dh0"] = h0.grad
            if atk:
                gr.update(dg_atk=g_atk.grad, dbeta_atk=beta_atk.grad, dlog_atk_scale=lsc.grad,
                          da0=a0.grad)
            gout = {n: npy(t) for n, t in gr.items() if t is not None}
            names = [n for n in GRAD_NAMES if n in case.expected]
            rep = kla.compare(gout, case, tol=a.tol_set, tensors=names, file=None)
            res["passes"]["backward"] = _report(rep)
            out.update(gout)
            save(out, "forward,backward")
        except Exception as ex:
            res["passes"]["backward"] = dict(status="ERROR", error=_error_info(ex, a.frames),
                                             device_ok=healthy(ex))
        res["backends"] = list(blog.seen)
    res["stage"] = "done"
    _write_json(a.result, res)
    # everything is on disk: skip the interpreter's teardown, which after a CUDA error can
    # hang or crash in CUDA/Triton destructors
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- the parent


def _child(a, extra, timeout):
    """Run this script with `extra` arguments in a new process (its own session, so that
    a timeout kills its Triton compile workers too). Returns (result dict or None, rc,
    stdout, stderr, timed_out)."""
    fd, rpath = tempfile.mkstemp(prefix="validate_fla.", suffix=".json")
    os.close(fd)
    os.unlink(rpath)
    cmd = [sys.executable, os.path.abspath(__file__), "--result", rpath] + extra
    if a.golden:
        cmd += ["--golden", a.golden]
    if a.selftest:
        cmd += ["--selftest"]
    env = dict(os.environ)
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a segfault prints the Python stack
    if a.launch_blocking:
        env["CUDA_LAUNCH_BLOCKING"] = "1"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         start_new_session=True)
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            p.kill()
        out, err = p.communicate()
    res = None
    try:
        with open(rpath, encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, ValueError):
        pass
    for path in (rpath, rpath + ".tmp"):
        try:
            os.unlink(path)
        except OSError:
            pass
    return (res, p.returncode, out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"), timed_out)


def _death(rc, timed_out, timeout, stage):
    if timed_out:
        return "child process timed out after %g s in %s (killed)" % (timeout, stage)
    if rc is not None and rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = "signal %d" % -rc
        return "child process died in %s: killed by %s (exit %d)" % (stage, sig, rc)
    return "child process died in %s: exit status %s" % (stage, rc)


def _fmt_pass(r, tolset):
    """The detail part of a PASS/FAIL line."""
    w = r.get("worst")
    if not w:
        return "no tensors compared"
    n = w["name"]
    if w.get("problem"):
        s = "worst %s: %s" % (n, w["problem"])
    else:
        rr = w.get("rel_rmse")
        s = "worst %s rel_rmse %s (tol %g), max_abs %.1e at %s" % (
            n, "%.1e" % rr if isinstance(rr, float) else rr, w["tol"], w["max_abs"] or 0.0,
            w["where"])
        if r["status"] == "FAIL":
            s += ": ref %.6g got %.6g" % (w["ref_value"], w["got_value"])
        if w.get("nonfinite"):
            s += ", %d non-finite" % w["nonfinite"]
        if w.get("elements_over"):
            s += ", %d elements over the elementwise bound" % w["elements_over"]
    if r["status"] == "FAIL":
        s += "; failing: " + ", ".join(r["failing"])
    return s + "  [tol %s]" % tolset


def _print_result(a, row, width):
    """One line per pass, then indented details."""
    kdw = getattr(a, "kdwidth", 23)
    head = "%-*s %-*s %-8s" % (width, row["case"], kdw, row["kernel"] + "/" + row["dtype"],
                               row["pass"])
    st = row["status"]
    if st == "N/A" and row["pass"] == "backward":
        return  # printed with the forward row
    r = row.get("detail") or {}
    extra = []
    if st in ("PASS", "FAIL"):
        msg = _fmt_pass(r, row["tol_set"])
    elif st == "ERROR":
        e = r.get("error") or {}
        if e:
            lines = (e.get("message") or "").strip().splitlines() or [""]
            msg = "%s: %s" % (e.get("type"), lines[0])
            extra += lines[1:] if a.verbose else lines[1:3]
            if a.verbose and e.get("traceback"):
                extra += e["traceback"].rstrip().splitlines()
            else:
                extra += ["at %s:%s in %s" % tuple(f) for f in e.get("frames", [])]
        else:
            msg = r.get("death", "error")
            if r.get("stderr_tail"):
                extra += ["stderr: " + x for x in r["stderr_tail"].splitlines()]
    else:
        msg = row.get("reason", "")
    if st == "N/A":  # one line for both passes
        head = "%-*s %-*s %-8s" % (width, row["case"], kdw, row["kernel"] + "/" + row["dtype"],
                                   "fwd+bwd")
    gva = row.get("gva")
    if gva == "native":
        msg += "  [HV>H: fla's native grouped heads%s]" % row.get("gva_why", "")
    elif gva == "repeat":
        msg += "  [HV>H: q, k repeat_interleave'd per value head: %s]" % row.get("gva_why", "")
    print("%s %-5s  %s" % (head, st, msg))
    for x in extra:
        print("%s      %s" % (" " * width, x))
    for x in row.get("notes", []):
        print("%s      note: %s" % (" " * width, x))
    if a.verbose and r.get("lines"):
        for x in r["lines"]:
            print("%s      | %s" % (" " * width, x))
    sys.stdout.flush()


def _parse_inject(a, kcases):
    """[(action, kernel glob, dtype glob, case glob, pass)]; --selftest's default: an
    os.abort in the chunk float32 backward of the chunk kernel's first case, a raised
    exception in the chunk bf16 forward of its second (or first), and a deliberately wrong
    stand-in (`wrong`: KDA's decay after the update; the ATK without the current token)
    in the float32 run of the first case of kda, precond and precond_kda.
    kcases: kernel -> the cases it runs."""
    spec = a.inject
    if spec is None and a.selftest:
        items = []
        cs = kcases.get("chunk") or []
        if cs:
            items += ["abort:chunk:float32:%s:backward" % cs[0],
                      "raise:chunk:bf16:%s:forward" % cs[1 if len(cs) > 1 else 0]]
        for kernel in ("kda", "precond", "precond_kda"):
            if kcases.get(kernel):
                items.append("wrong:%s:float32:%s:forward" % (kernel, kcases[kernel][0]))
        spec = ",".join(items)
    out = []
    for item in (spec or "").split(","):
        if not item or item == "none":
            continue
        parts = item.split(":")
        if len(parts) != 5 or parts[0] not in ("abort", "raise", "hang", "wrong") \
                or parts[4] not in PASSES or (parts[0] == "wrong" and parts[4] != "forward"):
            sys.exit("validate_fla: --inject wants ACTION:KERNEL:DTYPE:CASEGLOB:PASS "
                     "(ACTION abort|raise|hang|wrong, PASS forward|backward; wrong: forward, "
                     "it changes the whole run), got %r" % item)
        out.append(tuple(parts))
    return out


def _listarg(s, allowed, what):
    vals = []
    for x in s.split(","):
        x = x.strip()
        if x == "all":
            vals += list(allowed)
        elif x in allowed:
            vals.append(x)
        else:
            sys.exit("validate_fla: unknown %s %r (choose from %s, all)" % (
                what, x, ", ".join(allowed)))
    return list(dict.fromkeys(vals))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Validate fla's Gated DeltaNet, KDA and preconditioned delta-rule Triton "
                    "kernels on the KLA golden cases.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The docstring at the top of this file lists the "
               "conventions as checked in fla's source.")
    ap.add_argument("--kernel", default="all",
                    help="chunk, fused_recurrent (Gated DeltaNet), kda, fused_recurrent_kda, "
                         "precond, fused_recurrent_precond (PGDN), precond_kda, "
                         "fused_recurrent_precond_kda (PKDA), all, or a comma list (default: "
                         "all); each runs the cases of its variant")
    ap.add_argument("--dtype", default="float32,bf16",
                    help="dtype of q, k, v: float32, bf16, fp16, all, or a comma list "
                         "(default: float32,bf16)")
    ap.add_argument("--forward-only", action="store_true",
                    help="skip the backward pass (o and ht, and at, only)")
    ap.add_argument("--cases", default="*",
                    help="glob(s) over case names, comma separated (default: all)")
    ap.add_argument("--tol", choices=("float32", "bf16"), default=None,
                    help="tolerance set for every run (default: float32 for the fused "
                         "recurrent kernel on float32 inputs, bf16 otherwise)")
    ap.add_argument("--out", default=None, help="save fla's outputs here (safetensors)")
    ap.add_argument("--json", default=None, help="write the results and summary here")
    ap.add_argument("--golden", default=None, help="golden folder (default: the repo's)")
    ap.add_argument("--gva", choices=("auto", "native", "repeat"), default="auto",
                    help="grouped value heads: fla's native support when its source has it "
                         "(auto), or force either way")
    ap.add_argument("--l2norm", choices=("kernel", "host"), default="kernel",
                    help="cases with l2norm_q and l2norm_k: use_qk_l2norm_in_kernel=True "
                         "(kernel) or normalise here (host; not for chunk_precond_kda, which "
                         "always normalises)")
    ap.add_argument("--family-rewrites", choices=("on", "off"), default="on",
                    help="exact rewrites for family cases beyond fla's arguments: the "
                         "Kaczmarz step (mode kla) formed on the host, raw keys through "
                         "chunk_precond_kda by rescaling v, beta, beta_atk (default on; off: "
                         "those runs are not applicable)")
    ap.add_argument("--beta-dtype", choices=("float32", "input"), default="float32",
                    help="dtype of beta (and beta_atk) given to the kernel (default float32)")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds for one (case, kernel, dtype) process (default 900)")
    ap.add_argument("--jobs", "-j", type=int, default=1,
                    help="(kernel, dtype) groups run at once, each case still in its own "
                         "process (default 1)")
    ap.add_argument("--launch-blocking", action="store_true",
                    help="CUDA_LAUNCH_BLOCKING=1 in the children (pinpoints a failing kernel)")
    ap.add_argument("--frames", type=int, default=3, help="traceback frames shown (default 3)")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="full tracebacks and the full comparison report of every pass")
    ap.add_argument("--selftest", action="store_true",
                    help="CPU check of this harness with a PyTorch stand-in for fla's kernels, "
                         "with injected faults")
    ap.add_argument("--inject", default=None,
                    help="(--selftest) faults: ACTION:KERNEL:DTYPE:CASEGLOB:PASS,... with "
                         "ACTION abort|raise|hang|wrong (wrong: a deliberately wrong stand-in, "
                         "PASS forward); 'none' for none")
    # the child processes
    for hidden in ("--one", "--result", "--inject-now", "--tol-set", "--gva-mode",
                   "--atk-heads", "--atk-evidence"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.probe:
        return probe_main(a)
    if a.one:
        return one_main(a)
    if a.inject and not a.selftest:
        sys.exit("validate_fla: --inject is for --selftest only")

    kernels = _listarg(a.kernel, tuple(KERNELS), "kernel")
    dtypes = _listarg(a.dtype, DTYPES, "dtype")
    globs = [x for x in a.cases.split(",") if x]
    entries = {e["name"]: e for e in kla.golden_cases(a.golden, details=True)}
    cases = [n for n in entries if any(fnmatch.fnmatch(n, gl) for gl in globs)]
    if not cases:
        sys.exit("validate_fla: no golden case matches %r" % a.cases)

    def variant(case):
        o = entries[case].get("options", {})
        return (o.get("gate", "head"), o.get("precond", "none"))

    # each kernel runs the cases of its variant (a family case is never given to the
    # Gated DeltaNet kernels, nor a section-1 case to the family's)
    kcases = {kn: [c for c in cases if variant(c) == VARIANT[kn]] for kn in kernels}
    idle = [kn for kn in kernels if not kcases[kn]]
    kernels = [kn for kn in kernels if kcases[kn]]
    unrun = [c for c in cases if not any(c in kcases[kn] for kn in kernels)]
    if not kernels:
        sys.exit("validate_fla: none of the %d selected cases is for the selected kernels "
                 "(%s); they are %s cases: --kernel %s" % (
                     len(cases), a.kernel, "/".join(sorted({VARIANT_NAME[variant(c)]
                                                            for c in cases})),
                     ",".join(kn for kn in KERNELS if VARIANT[kn] in {variant(c)
                                                                      for c in cases})))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        a.out = os.path.abspath(a.out)

    # ---- what is installed (in a child too: the parent never touches CUDA)
    t0 = time.time()
    info, rc, out, err, to = _child(a, ["--probe"], min(a.timeout, 600))
    if not info or "fatal" in info or "kernels" not in info or rc != 0:
        why = (info or {}).get("fatal") or _death(rc, to, min(a.timeout, 600), "the probe")
        print("validate_fla: %s" % why)
        if err.strip():
            print(_tail(err))
        return 2
    print("validate_fla: fla %s (%s), torch %s, triton %s, %s" % (
        info.get("fla"), info.get("fla_path", "-"), info.get("torch"),
        info.get("triton", "-"), info.get("device")))

    def na_reason(kernel, case):
        """Why `kernel` cannot run `case` of its variant with this fla, or None."""
        ki = info["kernels"].get(kernel, {})
        opt = entries[case].get("options", {})
        if ki.get("absent"):
            return "not applicable: this fla has no %s (%s)" % (ki["name"], ki["error"])
        if "error" in ki:
            return None  # reported as an ERROR
        if kernel in SECTION1:
            return None
        if opt.get("mode") == "kla" and a.family_rewrites == "off":
            return "not applicable: fla has no Kaczmarz step (mode kla; --family-rewrites off)"
        if ki.get("always_l2"):
            if not opt.get("l2norm_q"):
                return ("not applicable: fla's %s always L2-normalises q (it has no "
                        "use_qk_l2norm_in_kernel), the case has l2norm_q false"
                        % KERNELS[kernel][1])
            if not opt.get("l2norm_k") and a.family_rewrites == "off":
                return ("not applicable: fla's %s always L2-normalises k, the case has raw "
                        "keys (--family-rewrites off)" % KERNELS[kernel][1])
        return None

    plan = {(kn, c): na_reason(kn, c) for kn in kernels for c in kcases[kn]}
    injects = _parse_inject(a, {kn: [c for c in kcases[kn] if not plan[(kn, c)]]
                                for kn in kernels})
    kw_ = max(16, max(len(kn) for kn in kernels))
    a.kdwidth = max(23, max(len(kn) for kn in kernels) + 8)
    gva_mode, tolinfo = {}, {}
    for kernel in kernels:
        ki = info["kernels"].get(kernel, {})
        fam = "" if kernel in SECTION1 else "%d %s case%s; " % (
            len(kcases[kernel]), VARIANT_NAME[VARIANT[kernel]],
            "s" if len(kcases[kernel]) != 1 else "")
        if ki.get("absent"):
            print("  %-*s not in this fla: %s (%s): %sreported as not applicable" % (
                kw_, kernel, ki["name"], ki["error"], fam))
            continue
        if "error" in ki:
            print("  %-*s cannot import %s: %s" % (kw_, kernel, ki["name"], ki["error"]))
            continue
        native = ki.get("native_gva", False)
        gva_mode[kernel] = ("native" if native else "repeat") if a.gva == "auto" else a.gva
        print("  %-*s %s: %sgrouped value heads (HV > H) %s (%s)%s" % (
            kw_, kernel, ki["name"], fam,
            "native" if gva_mode[kernel] == "native" else "by repeat_interleave of q, k",
            ki.get("gva_evidence") if a.gva == "auto" else "--gva " + a.gva,
            "; head_first=False passed" if ki.get("head_first") else ""))
        if ki.get("atk_heads"):
            print("  %-*s ATK state per %s head (%s)%s" % (
                kw_, "", ki["atk_heads"], ki.get("atk_evidence"),
                ": the key head's ATK inputs are repeated to its value heads"
                if ki["atk_heads"] == "value" else ""))
        if ki.get("always_l2"):
            print("  %-*s always L2-normalises q and k (no use_qk_l2norm_in_kernel)" % (kw_, ""))
        for dtype in dtypes:
            tolinfo[(kernel, dtype)] = _tol_choice(kernel, dtype, a.tol)
            print("  %-*s %-7s tolerance set %s: %s" % (
                kw_, "", dtype, *tolinfo[(kernel, dtype)]))
    if idle:
        print("  not run (no selected case of theirs): " + ", ".join(idle))
    if unrun:
        vs = {variant(c) for c in unrun}
        print("  not run (no selected kernel for them): %d %s case%s: %s (--kernel %s)" % (
            len(unrun), "/".join(sorted(VARIANT_NAME[v] for v in vs)),
            "s" if len(unrun) != 1 else "",
            ", ".join(unrun[:4]) + (", ..." if len(unrun) > 4 else ""),
            ",".join(kn for kn in KERNELS if VARIANT[kn] in vs)))
    if info.get("issue_640"):
        print("  note: " + info["issue_640"])
    if any(kn not in SECTION1 for kn in kernels) and any(d != "float32" for d in dtypes) \
            and not a.tol:
        print("  note: the family cases' bf16 set (0.02 o, ht, at; 0.05 gradients) is not "
              "calibrated against a bf16 kernel (tests/test_bf16_tol.py covers section 1)")
    print("  beta = eta / (||k||^2 + eps)%s on the host in float32 with autograd, given to "
          "fla in %s; one process per (case, kernel, dtype), timeout %g s%s" % (
              " (eta / (k . kw + eps) with the ATK)" if any(
                  VARIANT[kn][1] == "atk" for kn in kernels) else "",
              "float32" if a.beta_dtype == "float32" else "the input dtype", a.timeout,
              "; backward skipped (--forward-only)" if a.forward_only else ""))
    if injects:
        print("  selftest faults: " + ", ".join(":".join(x) for x in injects))
    print()
    sys.stdout.flush()

    width = max(len(c) for kn in kernels for c in kcases[kn])
    fallback = {}  # (kernel, dtype) -> why its backward is no longer tried

    def run_group(kernel, dtype, emit):
        """The cases of one (kernel, dtype), in order: a backward that raised on one case
        makes the later ones forward-only, so a group is sequential."""
        ki = info["kernels"][kernel]
        if kernel not in gva_mode and not ki.get("absent"):
            for case in kcases[kernel]:
                for ps in PASSES:
                    emit(dict(case=case, kernel=kernel, dtype=dtype, **{"pass": ps},
                              status="ERROR", tol_set="-", notes=[],
                              detail={"death": "cannot import the kernel: "
                                      + ki["error"]}))
            return
        tolset, tolwhy = tolinfo.get((kernel, dtype), ("-", ""))
        for case in kcases[kernel]:
            if plan[(kernel, case)]:
                for ps in PASSES:
                    emit(dict(case=case, kernel=kernel, dtype=dtype, **{"pass": ps},
                              status="N/A", tol_set="-", notes=[],
                              reason=plan[(kernel, case)]))
                continue
            fwd_only = a.forward_only or (kernel, dtype) in fallback
            now = ["%s=%s" % (ps, act) for act, kg, dg, cg, ps in injects
                   if fnmatch.fnmatch(kernel, kg) and fnmatch.fnmatch(dtype, dg)
                   and fnmatch.fnmatch(case, cg)]
            extra = ["--one", case, "--kernel", kernel, "--dtype", dtype,
                     "--tol-set", tolset, "--gva-mode", gva_mode[kernel],
                     "--l2norm", a.l2norm, "--beta-dtype", a.beta_dtype,
                     "--family-rewrites", a.family_rewrites, "--frames", str(a.frames)]
            if ki.get("atk_heads"):
                extra += ["--atk-heads", ki["atk_heads"], "--atk-evidence",
                          ki.get("atk_evidence", "")]
            if fwd_only:
                extra.append("--forward-only")
            if a.out:
                extra += ["--out", a.out]
            if now:
                extra += ["--inject-now", ",".join(now)]
            t1 = time.time()
            res, rc, out, err, to = _child(a, extra, a.timeout)
            secs = time.time() - t1
            res = res or {"passes": {}, "stage": "setup", "notes": [], "backends": []}
            stage = res.get("stage", "setup")
            crashed = stage != "done"  # died (or was killed) before writing all it ran
            stage = "forward" if stage == "setup" else stage
            late = (not crashed and (to or rc != 0)) and (
                "the child wrote all its results, then: " + _death(rc, to, a.timeout, "exit"))
            for ps in PASSES:
                row = dict(case=case, kernel=kernel, dtype=dtype, **{"pass": ps},
                           tol_set=tolset, tol_reason=tolwhy, seconds=round(secs, 2),
                           gva=res.get("gva") if res.get("gva") != "-" else None,
                           files=res.get("files", []), notes=[])
                if row["gva"] == "native" and a.gva == "native":
                    row["gva_why"] = " (--gva native)"
                if row["gva"] == "repeat":
                    row["gva_why"] = ("--gva repeat" if a.gva == "repeat" else
                                      "this fla has no native grouped value heads for "
                                      + kernel)
                r = res["passes"].get(ps)
                if r is not None:
                    row["status"], row["detail"] = r["status"], r
                    if r["status"] == "N/A":
                        row["reason"] = r["reason"]
                elif crashed and ps == stage:
                    row["status"] = "ERROR"
                    row["detail"] = {"death": _death(rc, to, a.timeout, stage),
                                     "stderr_tail": _tail(err or out)}
                elif crashed:
                    row["status"], row["reason"] = "SKIP", "not run: the child died in " + stage
                elif ps == "backward" and a.forward_only:
                    row["status"], row["reason"] = "SKIP", "--forward-only"
                elif ps == "backward" and (kernel, dtype) in fallback:
                    row["status"], row["reason"] = "SKIP", fallback[(kernel, dtype)]
                else:
                    row["status"], row["reason"] = "SKIP", "not run: forward failed"
                if ps == "forward":
                    row["notes"] = list(res.get("notes", [])) + [
                        "fla dispatched " + b for b in res.get("backends", [])] + (
                        [late] if late else [])
                # a backward that raises while the device stays usable is the kernel
                # refusing it (NotImplementedError, fla issue 640): forward-only from now on.
                # A CUDA error or a crash is that case's error only.
                if (ps == "backward" and row["status"] == "ERROR" and r is not None
                        and r.get("device_ok") and (kernel, dtype) not in fallback):
                    fallback[(kernel, dtype)] = (
                        "forward-only fallback: the backward raised %s on %s" % (
                            r["error"]["type"], case))
                    row["notes"].append(
                        "the backward raised and the device is fine: the remaining %s/%s "
                        "cases run forward-only" % (kernel, dtype))
                    row["fallback"] = True
                emit(row)

    # groups run --jobs at a time; each row is printed (and --json rewritten) as it comes,
    # so that a run killed half way still leaves its report
    rows = []
    lock = threading.Lock()

    def emit(row):
        with lock:
            rows.append(row)
            _print_result(a, row, width)
            if a.json:
                _write_json(a.json, {"tool": "examples/validate_fla.py", "probe": info,
                                     "partial": True, "results": rows})

    groups = [(kn, dt) for kn in kernels for dt in dtypes]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for f in [pool.submit(run_group, kn, dt, emit) for kn, dt in groups]:
            f.result()  # a bug in the harness itself surfaces here
    order = {g: i for i, g in enumerate(groups)}
    rows.sort(key=lambda r: order[(r["kernel"], r["dtype"])])  # stable: case order kept

    # ---- summary
    print()
    kdw = max(24, a.kdwidth + 1)
    print("summary: cases passed / failed / errors / skipped / not applicable, per pass")
    print("  %-*s %-8s  %-28s  %-28s" % (kdw, "kernel/dtype", "tol set", "forward",
                                        "backward"))
    summary = []
    for kernel in kernels:
        for dtype in dtypes:
            ent = {"kernel": kernel, "dtype": dtype,
                   "tol_set": tolinfo.get((kernel, dtype), ("-", ""))[0]}
            for ps in PASSES:
                sel = [r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype
                       and r["pass"] == ps]
                ent[ps] = {s.lower().replace("/", ""): sum(r["status"] == s for r in sel)
                           for s in STATUSES}
            ent["fallback"] = fallback.get((kernel, dtype))
            summary.append(ent)

            def cell(c):
                return "%3d / %3d / %3d / %3d / %3d" % (c["pass"], c["fail"], c["error"],
                                                        c["skip"], c["na"])
            print("  %-*s %-8s  %-28s  %-28s%s" % (
                kdw, kernel + "/" + dtype, ent["tol_set"], cell(ent["forward"]),
                cell(ent["backward"]), "  (%s)" % ent["fallback"] if ent["fallback"] else ""))
    bad = sum(r["status"] in ("FAIL", "ERROR") for r in rows)
    npass = sum(r["status"] == "PASS" for r in rows)
    nna = sum(r["status"] == "N/A" for r in rows)
    print("validate_fla: %d passed, %d failed, %d errors, %d skipped%s (%d runs of %d cases, "
          "%.0f s)" % (npass, sum(r["status"] == "FAIL" for r in rows),
                       sum(r["status"] == "ERROR" for r in rows),
                       sum(r["status"] == "SKIP" for r in rows),
                       ", %d not applicable" % nna if nna else "",
                       len(kernels) * len(dtypes), len(cases), time.time() - t0))
    if a.out:
        print("outputs in %s: kla verify %s/CASE.KERNEL.DTYPE.safetensors --against "
              "golden/CASE.safetensors --tol SET  (--tensors o,ht[,at] for forward-only "
              "files)"
              % (a.out, a.out))
    if a.json:
        doc = {"tool": "examples/validate_fla.py", "probe": info,
               "options": {"kernels": kernels, "dtypes": dtypes, "cases": cases,
                           "kernel_cases": kcases, "forward_only": a.forward_only,
                           "tol": a.tol, "gva": a.gva, "gva_mode": gva_mode,
                           "l2norm": a.l2norm, "family_rewrites": a.family_rewrites,
                           "beta_dtype": a.beta_dtype, "selftest": a.selftest,
                           "inject": [":".join(x) for x in injects]},
               "tolerance": {"%s/%s" % k: {"set": v[0], "why": v[1]}
                             for k, v in tolinfo.items()},
               "results": rows, "summary": summary,
               "totals": {"pass": npass, "fail_or_error": bad, "not_applicable": nna}}
        _write_json(a.json, doc)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
