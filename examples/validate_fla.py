#!/usr/bin/env python3
"""Validate flash-linear-attention's (fla) Triton kernels for Gated DeltaNet as KLA / Gated
DeltaNet kernels on the golden cases: outputs, and gradients where the kernel has a backward.

    python3 examples/validate_fla.py [--kernel chunk|fused_recurrent|all]
        [--dtype float32|bf16|fp16|all] [--forward-only] [--cases GLOB[,GLOB...]]
        [--tol float32|bf16] [--out DIR] [--json FILE] [--jobs N] [--verbose]
    python3 examples/validate_fla.py --selftest [--cases GLOB]     # CPU, no fla needed

Kernels: `chunk` is fla.ops.gated_delta_rule.chunk_gated_delta_rule (forward and
backward), `fused_recurrent` is fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule
(forward only: fla's backward raises NotImplementedError, so it is reported as an ERROR
on the first case and the rest of that kernel runs forward-only). dtypes: the dtype of q,
k and v given to the kernel (default float32 and bf16; `all` adds fp16). Both kernels
accept float32 q, k, v.

NEEDS a CUDA GPU, PyTorch, Triton and flash-linear-attention (`pip install
flash-linear-attention`). NOT RUN IN THIS REPOSITORY'S CI, which has none of them. The
harness itself (subprocesses, reporting, fallbacks, grouped heads, beta, --out, --json)
is checked on the CPU by `--selftest`, which replaces fla's two kernels with a small
float32 PyTorch recurrence written from kla-spec.md section 1 and injects a crash
(os.abort) and an exception: tests/test_validate_fla.py runs it. docs/validating.md
walks through validating a kernel.

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
products beta * v that fla's chunk kernel rounds to the input dtype (wy_fast.py
recompute_w_u_fwd_kernel: `(b_v * b_b[:, None]).to(b_v.dtype)`), exceed the kernel
dtype's range.

Tolerances (docs/validating.md section 3): the float32 set for a kernel that computes in
float32 from float32 inputs, which is the fused recurrent kernel with float32 inputs
(it loads everything with .to(tl.float32) and keeps its state in float32); the bf16 set
otherwise: bf16/fp16 inputs, and the float32 chunk kernel, whose tl.dot products run in
Triton's default tf32 precision on float32 inputs (about 1e-3). --tol overrides.

Backends: fla 0.5 may route chunk_gated_delta_rule to FlashQLA (package flash_qla, Hopper
and Blackwell, bf16/fp16; FLA_FLASH_QLA=0 turns it off) and chunk_bwd_dqkwg to TileLang
(package tilelang; on by default on Hopper with Triton >= 3.4, FLA_TILELANG=0/1). Without
tilelang, fla's chunk backward refuses to run on Hopper with 3.4.0 <= Triton < 3.7.1 (fla
issue 640; fla >= 0.5.0 raises RuntimeError): that is reported as the backward's ERROR,
then forward-only. fla 0.4 runs that backward anyway; on an H200 with Triton 3.6 its bf16
backward gave wrong dk, dv, dg, deta on kla_B2_T100_H2_HV4_K32_V16_h0 and an illegal
memory access on gdn_B2_T100_H2_HV4_K32_V16_h0_l2qk. The backends fla reports choosing
are printed as notes.

Run time: each child imports torch and fla (about 20 s on an H200 machine, most of it
fla's import of transformers) and compiles and autotunes the Triton kernels for its
shapes (up to a few minutes on a cold Triton cache). --jobs N runs N (kernel, dtype)
groups at once; `--jobs 4` with the defaults keeps one per group.

Outputs: --out DIR keeps what fla produced per run as DIR/CASE.KERNEL.DTYPE.safetensors
(spec names, float32), so that e.g.
    kla verify DIR/CASE.chunk.bf16.safetensors --against golden/CASE.safetensors --tol bf16
prints the same comparison (add --tensors o,ht for a forward-only file). --json FILE
writes every result and the summary. Exit status: 0 when nothing failed or errored.
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
}
DTYPES = ("float32", "bf16", "fp16")
GRAD_NAMES = ("dq", "dk", "dv", "dg", "deta", "dbeta", "dh0")
PASSES = ("forward", "backward")

# where fla loads the key head of value head i_h: `i_h // (HV // H)` (or i_hv); the
# modules of each kernel that must all have it for native grouped value heads
GVA_PATTERN = re.compile(r"i_hv?\s*//\s*\(\s*HV\s*//\s*H\s*\)")
GVA_MODULES = {
    "fused_recurrent": ("fla.ops.gated_delta_rule.fused_recurrent",),
    "chunk": ("fla.ops.common.chunk_o", "fla.ops.common.chunk_delta_h",
              "fla.ops.gated_delta_rule.wy_fast"),
}


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
    if kernel == "fused_recurrent" and dtype == "float32":
        return "float32", ("float32 inputs into a kernel that computes in float32 "
                           "(fused_recurrent.py loads q, k, v, g, beta, h0 .to(tl.float32) "
                           "and keeps the state in float32)")
    if dtype == "float32":
        return "bf16", ("the chunk kernel's tl.dot products run in tf32 on float32 "
                        "inputs (about 1e-3), beyond the float32 set")
    return "bf16", "q, k, v rounded to %s" % dtype


# ---------------------------------------------------------------- the self-test stand-in
# A float32 PyTorch recurrence written from kla-spec.md section 1, under fla's names and
# argument conventions, so that --selftest exercises this harness on the CPU. The chunk
# stand-in has autograd and, like fla before 0.5.0's chunk, no grouped value heads (it
# refuses HV > H, where old fla would silently read wrong strides); the fused recurrent
# stand-in has native grouped heads and, like fla's, a backward that raises.

_INJECT = {}  # pass -> "raise" | "abort" | "hang", set by the child from --inject-now


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


def _st_recurrence(torch, q, k, v, g, beta, scale, h0, cu, l2, native_gva, name):
    f32 = torch.float32
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if HV % H:
        raise ValueError("num_v_heads (HV=%d) must be divisible by num_heads (H=%d)" % (HV, H))
    if HV != H and not native_gva:
        raise ValueError("selftest %s stand-in: no native grouped value heads (H=%d, HV=%d)"
                         % (name, H, HV))
    q, k, v, beta = q.to(f32), k.to(f32), v.to(f32), beta.to(f32)
    g = torch.zeros(B, T, HV, dtype=f32, device=q.device) if g is None else g.to(f32)
    if l2:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    idx = torch.arange(HV, device=q.device) // (HV // H)  # value head hv reads key head hv // G
    q, k = q.index_select(2, idx), k.index_select(2, idx)
    scale = K ** -0.5 if scale is None else scale
    if cu is None:
        segs = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError("The batch size is expected to be 1 when using `cu_seqlens`.")
        c = [int(x) for x in cu.tolist()]
        segs = [(0, c[n], c[n + 1]) for n in range(len(c) - 1)]
    tok, finals = {}, []
    for n, (b, t0, t1) in enumerate(segs):
        S = (torch.zeros(HV, K, V, dtype=f32, device=q.device) if h0 is None
             else h0[n].to(f32))
        for t in range(t0, t1):
            S = S * torch.exp(g[b, t])[:, None, None]                   # decay first
            e = v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t])          # residual
            S = S + beta[b, t][:, None, None] * k[b, t][:, :, None] * e[:, None, :]
            tok[(b, t)] = torch.einsum("hkv,hk->hv", S, scale * q[b, t])  # updated state
        finals.append(S)
    o = torch.stack([torch.stack([tok[(b, t)] for t in range(T)]) for b in range(B)])
    return o, torch.stack(finals)


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

    chunk_gated_delta_rule._kla_selftest_gva = False
    fused_recurrent_gated_delta_rule._kla_selftest_gva = True
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def _install_selftest_fla():
    """Put a stand-in `fla.ops.gated_delta_rule` into sys.modules."""
    import types
    chunk, fused = _st_functions()
    mods = {}
    for name in ("fla", "fla.ops", "fla.ops.gated_delta_rule"):
        m = types.ModuleType(name)
        m.__file__ = os.path.abspath(__file__)
        mods[name] = m
    mods["fla"].__version__ = "selftest (a PyTorch stand-in for fla, float32, CPU)"
    mods["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = chunk
    mods["fla.ops.gated_delta_rule"].fused_recurrent_gated_delta_rule = fused
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
                    "(the chunk backward) refuses to run or, in older fla, gives wrong "
                    "gradients (fla issue 640); Triton >= 3.7.1 or `pip install tilelang` "
                    "fixes it" % info.get("triton"))
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
        except Exception as ex:
            k["error"] = "%s: %s" % (type(ex).__name__, ex)
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
        need_grad = "backward" in plan

        def leaf(x):
            return torch.tensor(np.asarray(x), dtype=torch.float32, device=device,
                                requires_grad=need_grad)

        q, k, v = leaf(inp["q"]), leaf(inp["k"]), leaf(inp["v"])
        # no g (DeltaNet): zeros, so that dg is the gradient at g = 0, as in the case file
        g = leaf(inp["g"]) if "g" in inp else torch.zeros(
            B, T, HV, device=device, requires_grad=need_grad)
        s = leaf(inp["eta"] if is_kla else inp["beta"])
        h0 = leaf(inp["h0"]) if "h0" in inp else None
        # fla wants a LongTensor (chunk.py / fused_recurrent.py: `cu_seqlens:
        # torch.LongTensor`); the golden files may hold I32
        cu = (torch.tensor(np.asarray(inp["cu_seqlens"]), dtype=torch.long, device=device)
              if "cu_seqlens" in inp else None)

        # l2norm: in the kernel (use_qk_l2norm_in_kernel, the spec's formula, see the
        # docstring) when the case normalises both q and k, else explicitly here
        in_kernel_l2 = (opt["l2norm_q"] and opt["l2norm_k"] and a.l2norm == "kernel"
                        and "use_qk_l2norm_in_kernel" in params)
        qk = q if in_kernel_l2 or not opt["l2norm_q"] else _l2norm(q)
        kk = k if in_kernel_l2 or not opt["l2norm_k"] else _l2norm(k)
        if is_kla:
            # KLA step size on the host, float32, autograd: beta = eta / (||k||^2 + eps),
            # k as the kernel uses it (after l2norm), value head hv on key head hv // G
            kb = _l2norm(k) if opt["l2norm_k"] else k
            kb = kb.repeat_interleave(G, dim=2) if G > 1 else kb
            beta = s / ((kb * kb).sum(-1) + opt["eps"])
        else:
            beta = s
        gva = "-"
        if G > 1:
            gva = a.gva_mode
            if gva == "repeat":
                qk = qk.repeat_interleave(G, dim=2)  # [B, T, HV, K]: hv reads key head hv // G
                kk = kk.repeat_interleave(G, dim=2)
        res["gva"] = gva

        # beta: float32 unless --beta-dtype input; notes where the kernel dtype cannot hold it
        bdt = torch.float32 if a.beta_dtype == "float32" else dt
        with torch.no_grad():
            bf = beta.detach()
            bmax = float(bf.abs().max()) if bf.numel() else 0.0
            res["beta_max"] = bmax
            if dt != torch.float32:
                fmax = float(torch.finfo(dt).max)
                if bmax > fmax:
                    res["notes"].append(
                        "beta up to %.3g exceeds %s's max %.6g: %s" % (
                            bmax, a.dtype, fmax,
                            "passed in float32, as fla accepts" if bdt == torch.float32
                            else "cast to %s as asked (--beta-dtype input): inf" % a.dtype))
                bv = float((bf[..., None] * v.detach()).abs().max()) if bf.numel() else 0.0
                if a.kernel == "chunk" and bv > fmax:
                    res["notes"].append(
                        "beta * v up to %.3g exceeds %s's max %.6g: fla's chunk kernel rounds "
                        "v * beta to the input dtype (wy_fast.py recompute_w_u_fwd_kernel), "
                        "expect inf/NaN" % (bv, a.dtype, fmax))

        init = None
        if h0 is not None:
            init = h0.transpose(-1, -2) if vk else h0  # fla's state is [N, HV, K, V]
        kw = dict(q=qk.to(dt), k=kk.to(dt), v=v.to(dt), g=g, beta=beta.to(bdt),
                  scale=opt["scale"], initial_state=init, output_final_state=True,
                  cu_seqlens=cu)
        if "use_qk_l2norm_in_kernel" in params:
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
        o, ht = fn(**kw)
        sync()
        out = {"o": npy(o), "ht": npy(ht.transpose(-1, -2) if vk else ht)}
        rep = kla.compare(out, case, tol=a.tol_set, tensors=["o", "ht"], file=None)
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

    # ---- backward: L = sum(do * o) + sum(dht * ht)
    if "backward" in plan:
        res["stage"] = "backward"
        _write_json(a.result, res)
        try:
            outs = [o]
            grads = [torch.tensor(np.asarray(inp["do"]), device=device).to(o.dtype)]
            if "dht" in inp:
                dht = torch.tensor(np.asarray(inp["dht"]), device=device)
                outs.append(ht)
                grads.append((dht.transpose(-1, -2) if vk else dht).contiguous().to(ht.dtype))
            torch.autograd.backward(outs, grads)
            sync()
            gr = {"dq": q.grad, "dk": k.grad, "dv": v.grad, "dg": g.grad,
                  ("deta" if is_kla else "dbeta"): s.grad}
            if h0 is not None:
                gr["dh0"] = h0.grad
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
    head = "%-*s %-23s %-8s" % (width, row["case"], row["kernel"] + "/" + row["dtype"],
                                row["pass"])
    st = row["status"]
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


def _parse_inject(a, cases):
    """[(action, kernel glob, dtype glob, case glob, pass)]; --selftest's default: an
    os.abort in the chunk float32 backward of the first case, a raised exception in the
    chunk bf16 forward of the second (or the first)."""
    spec = a.inject
    if spec is None and a.selftest and cases:
        spec = "abort:chunk:float32:%s:backward,raise:chunk:bf16:%s:forward" % (
            cases[0], cases[1] if len(cases) > 1 else cases[0])
    out = []
    for item in (spec or "").split(","):
        if not item or item == "none":
            continue
        parts = item.split(":")
        if len(parts) != 5 or parts[0] not in ("abort", "raise", "hang") \
                or parts[4] not in PASSES:
            sys.exit("validate_fla: --inject wants ACTION:KERNEL:DTYPE:CASEGLOB:PASS "
                     "(ACTION abort|raise|hang, PASS forward|backward), got %r" % item)
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
        description="Validate fla's Gated DeltaNet Triton kernels on the KLA golden cases.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The docstring at the top of this file lists the "
               "conventions as checked in fla's source.")
    ap.add_argument("--kernel", default="all",
                    help="chunk, fused_recurrent, all, or a comma list (default: all)")
    ap.add_argument("--dtype", default="float32,bf16",
                    help="dtype of q, k, v: float32, bf16, fp16, all, or a comma list "
                         "(default: float32,bf16)")
    ap.add_argument("--forward-only", action="store_true",
                    help="skip the backward pass (o and ht only)")
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
                         "(kernel) or normalise here (host)")
    ap.add_argument("--beta-dtype", choices=("float32", "input"), default="float32",
                    help="dtype of beta given to the kernel (default float32)")
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
                         "ACTION abort|raise|hang; 'none' for none")
    # the child processes
    for hidden in ("--one", "--result", "--inject-now", "--tol-set", "--gva-mode"):
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
    cases = [n for n in kla.golden_cases(a.golden)
             if any(fnmatch.fnmatch(n, gl) for gl in globs)]
    if not cases:
        sys.exit("validate_fla: no golden case matches %r" % a.cases)
    injects = _parse_inject(a, cases)
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
    gva_mode, tolinfo = {}, {}
    for kernel in kernels:
        ki = info["kernels"].get(kernel, {})
        if "error" in ki:
            print("  %-16s cannot import %s: %s" % (kernel, ki["name"], ki["error"]))
            continue
        native = ki.get("native_gva", False)
        gva_mode[kernel] = ("native" if native else "repeat") if a.gva == "auto" else a.gva
        print("  %-16s %s: grouped value heads (HV > H) %s (%s)%s" % (
            kernel, ki["name"],
            "native" if gva_mode[kernel] == "native" else "by repeat_interleave of q, k",
            ki.get("gva_evidence") if a.gva == "auto" else "--gva " + a.gva,
            "; head_first=False passed" if ki.get("head_first") else ""))
        for dtype in dtypes:
            tolinfo[(kernel, dtype)] = _tol_choice(kernel, dtype, a.tol)
            print("  %-16s %-7s tolerance set %s: %s" % (
                "", dtype, *tolinfo[(kernel, dtype)]))
    if info.get("issue_640"):
        print("  note: " + info["issue_640"])
    print("  beta = eta / (||k||^2 + eps) on the host in float32 with autograd, given to "
          "fla in %s; one process per (case, kernel, dtype), timeout %g s%s" % (
              "float32" if a.beta_dtype == "float32" else "the input dtype", a.timeout,
              "; backward skipped (--forward-only)" if a.forward_only else ""))
    if injects:
        print("  selftest faults: " + ", ".join(":".join(x) for x in injects))
    print()
    sys.stdout.flush()

    width = max(len(c) for c in cases)
    fallback = {}  # (kernel, dtype) -> why its backward is no longer tried

    def run_group(kernel, dtype, emit):
        """The cases of one (kernel, dtype), in order: a backward that raised on one case
        makes the later ones forward-only, so a group is sequential."""
        if kernel not in gva_mode:
            for case in cases:
                for ps in PASSES:
                    emit(dict(case=case, kernel=kernel, dtype=dtype, **{"pass": ps},
                              status="ERROR", tol_set="-", notes=[],
                              detail={"death": "cannot import the kernel: "
                                      + info["kernels"][kernel]["error"]}))
            return
        tolset, tolwhy = tolinfo[(kernel, dtype)]
        for case in cases:
            fwd_only = a.forward_only or (kernel, dtype) in fallback
            now = ["%s=%s" % (ps, act) for act, kg, dg, cg, ps in injects
                   if fnmatch.fnmatch(kernel, kg) and fnmatch.fnmatch(dtype, dg)
                   and fnmatch.fnmatch(case, cg)]
            extra = ["--one", case, "--kernel", kernel, "--dtype", dtype,
                     "--tol-set", tolset, "--gva-mode", gva_mode[kernel],
                     "--l2norm", a.l2norm, "--beta-dtype", a.beta_dtype,
                     "--frames", str(a.frames)]
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
    print("summary: cases passed / failed / errors / skipped, per pass")
    print("  %-24s %-8s  %-22s  %-22s" % ("kernel/dtype", "tol set", "forward", "backward"))
    summary = []
    for kernel in kernels:
        for dtype in dtypes:
            ent = {"kernel": kernel, "dtype": dtype,
                   "tol_set": tolinfo.get((kernel, dtype), ("-", ""))[0]}
            for ps in PASSES:
                sel = [r for r in rows if r["kernel"] == kernel and r["dtype"] == dtype
                       and r["pass"] == ps]
                ent[ps] = {s.lower(): sum(r["status"] == s for r in sel)
                           for s in ("PASS", "FAIL", "ERROR", "SKIP")}
            ent["fallback"] = fallback.get((kernel, dtype))
            summary.append(ent)

            def cell(c):
                return "%3d / %3d / %3d / %3d" % (c["pass"], c["fail"], c["error"], c["skip"])
            print("  %-24s %-8s  %-22s  %-22s%s" % (
                kernel + "/" + dtype, ent["tol_set"], cell(ent["forward"]),
                cell(ent["backward"]), "  (%s)" % ent["fallback"] if ent["fallback"] else ""))
    bad = sum(r["status"] in ("FAIL", "ERROR") for r in rows)
    npass = sum(r["status"] == "PASS" for r in rows)
    print("validate_fla: %d passed, %d failed, %d errors, %d skipped (%d runs of %d cases, "
          "%.0f s)" % (npass, sum(r["status"] == "FAIL" for r in rows),
                       sum(r["status"] == "ERROR" for r in rows),
                       sum(r["status"] == "SKIP" for r in rows),
                       len(kernels) * len(dtypes), len(cases), time.time() - t0))
    if a.out:
        print("outputs in %s: kla verify %s/CASE.KERNEL.DTYPE.safetensors --against "
              "golden/CASE.safetensors --tol SET  (--tensors o,ht for forward-only files)"
              % (a.out, a.out))
    if a.json:
        doc = {"tool": "examples/validate_fla.py", "probe": info,
               "options": {"kernels": kernels, "dtypes": dtypes, "cases": cases,
                           "forward_only": a.forward_only, "tol": a.tol, "gva": a.gva,
                           "gva_mode": gva_mode, "l2norm": a.l2norm,
                           "beta_dtype": a.beta_dtype, "selftest": a.selftest,
                           "inject": [":".join(x) for x in injects]},
               "tolerance": {"%s/%s" % k: {"set": v[0], "why": v[1]}
                             for k, v in tolinfo.items()},
               "results": rows, "summary": summary,
               "totals": {"pass": npass, "fail_or_error": bad}}
        _write_json(a.json, doc)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
