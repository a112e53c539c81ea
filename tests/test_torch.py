#!/usr/bin/python3
"""Tests of kla.torch (python/kla/torch.py), TAP. Needs PyTorch (Debian's python3-torch)
and libkla; skips when either is missing.

Our autograd Function (backend ref64, float64 tensors) against a plain PyTorch float64
implementation of the recurrence written here from kla-spec.md section 1 (autograd on a
Python loop): o, final_state and every gradient to 1e-10, on cases with grouped heads,
cu_seqlens, initial_state, l2norm, both modes, vk states; fla's signatures; the float32
path against float64; bf16 in and out; errors naming the tensor; gradcheck.

    /usr/bin/python3 tests/test_torch.py --lib build/libkla.so [--src .]
"""

import argparse
import inspect
import math
import os
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tap import Tap  # noqa: E402

tap = Tap()
torch = None
F64 = None


# ------------------------------------------------------------------ the reference, from the spec

def l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def spec_ref(q, k, v, g, b, mode="gdn", scale=None, eps=1e-6, h0=None, cu=None, l2q=False,
             l2k=False, vk=False):
    """kla-spec.md section 1, one token at a time, in the dtype of the inputs. Returns
    (o [B, T, HV, V], ht [N, HV, K, V] or [N, HV, V, K])."""
    if l2q:
        q = l2(q)
    if l2k:
        k = l2(k)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    sc = K ** -0.5 if scale is None else scale
    if cu is None:
        seqs = [(bb, 0, T) for bb in range(B)]
    else:
        c = [int(x) for x in cu]
        seqs = [(0, c[n], c[n + 1]) for n in range(len(c) - 1)]
    o = {}
    hts = []
    for n, (bb, s, e) in enumerate(seqs):
        row = []
        for hv in range(HV):
            h = hv // G
            if h0 is None:
                S = torch.zeros(K, V, dtype=v.dtype)
            else:
                S = h0[n, hv].transpose(0, 1) if vk else h0[n, hv]
            for t in range(s, e):
                kt, qt, vt = k[bb, t, h], q[bb, t, h], v[bb, t, hv]
                if g is not None:
                    S = torch.exp(g[bb, t, hv]) * S
                beta = b[bb, t, hv] / ((kt * kt).sum() + eps) if mode == "kla" else b[bb, t, hv]
                err = vt - S.transpose(0, 1) @ kt
                S = S + beta * torch.outer(kt, err)
                o[bb, t, hv] = S.transpose(0, 1) @ (sc * qt)
            row.append(S.transpose(0, 1) if vk else S)
        hts.append(torch.stack(row))
    out = torch.stack([torch.stack([torch.stack([o[bb, t, hv] for hv in range(HV)])
                                    for t in range(T)]) for bb in range(B)])
    return out, torch.stack(hts)


# --------------------------------------------------------------------------------- helpers

def maxrel(a, b):
    """max |a - b| / max(1, max |b|)"""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return math.inf
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def rel_rmse(a, b):
    a, b = a.detach().double(), b.detach().double()
    d = float(((a - b) ** 2).mean().sqrt())
    r = float((b ** 2).mean().sqrt())
    return d / r if r > 0 else d


def make(seed, B=2, T=9, H=2, HV=4, K=5, V=3, N=None, h0=True, g=True, mode="gdn",
         dtype=None, cu=None):
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float64
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    N = N if N is not None else (len(cu) - 1 if cu is not None else B)
    x = {"q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, HV, V),
         "g": -0.05 - 0.6 * u(B, T, HV) if g else None,
         "b": (0.2 + 0.8 * u(B, T, HV)) if mode == "gdn" else (0.3 + 1.2 * u(B, T, HV)),
         "h0": 0.5 * r(N, HV, K, V) if h0 else None,
         "cu": torch.tensor(cu, dtype=torch.int64) if cu is not None else None}
    for n in ("q", "k", "v", "g", "b", "h0"):
        if x[n] is not None:
            x[n] = x[n].to(dtype).requires_grad_()
    return x


def grads(outs, inputs, do, dht):
    o, ht = outs
    loss = (o * do).sum() + ((ht * dht).sum() if ht is not None and dht is not None else 0)
    ins = [t for t in inputs if t is not None and t.requires_grad]
    gs = torch.autograd.grad(loss, ins, allow_unused=True)
    it = iter(gs)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


NAMES = ("q", "k", "v", "g", "beta|eta", "initial_state")


def compare_case(kt, label, x, mode, tol=1e-10, vk=False, scale=None, eps=1e-6, l2q=False,
                 l2k=False, use_qk=False, final=True, fn=None, **kw):
    """Ours (ref64) vs spec_ref: o, ht and the gradients of every input."""
    args = [x["q"], x["k"], x["v"], x["g"], x["b"]]
    if fn is None:
        fn = kt.chunk_kla if mode == "kla" else kt.chunk_gated_delta_rule
    extra = dict(kw)
    if mode == "kla":
        extra.update(eps=eps, l2norm_q=l2q, l2norm_k=l2k)
        qn, kn = l2q or use_qk, l2k or use_qk
    else:
        qn = kn = use_qk
    h0 = x["h0"].transpose(2, 3) if (vk and x["h0"] is not None) else x["h0"]
    ours = fn(*args, scale=scale, initial_state=h0, output_final_state=final,
              cu_seqlens=x["cu"], use_qk_l2norm_in_kernel=use_qk, state_v_first=vk,
              backend="ref64", **extra)
    ref = spec_ref(x["q"], x["k"], x["v"], x["g"], x["b"], mode=mode, scale=scale, eps=eps,
                   h0=h0, cu=x["cu"], l2q=qn, l2k=kn, vk=vk)
    gen = torch.Generator().manual_seed(99)
    do = torch.randn(ref[0].shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ref[1].shape, generator=gen, dtype=torch.float64) if final else None
    inputs = [x["q"], x["k"], x["v"], x["g"], x["b"], x["h0"]]
    errs = {"o": maxrel(ours[0], ref[0])}
    if final:
        errs["final_state"] = maxrel(ours[1], ref[1])
    elif ours[1] is not None:
        errs["final_state (should be None)"] = math.inf
    ga = grads(ours, inputs, do, dht)
    gb = grads((ref[0], ref[1] if final else None), inputs, do, dht)
    for n, a, b in zip(NAMES, ga, gb):
        if b is None and a is None:
            continue
        errs["d" + n] = maxrel(a, b) if (a is not None and b is not None) else math.inf
    worst = max(errs.values())
    ok = worst <= tol and ours[0].dtype == torch.float64
    tap(ok, "%s: o, final_state, %d gradients vs the spec loop (max rel %.1e)"
        % (label, len(errs) - 2 if final else len(errs) - 1, worst),
        [] if ok else ["%s: %.3e" % kv for kv in errs.items()])


# ------------------------------------------------------------------------------------ main

def main():
    global torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib")
    ap.add_argument("--no-lib", action="store_true")
    ap.add_argument("--src", default=os.path.join(HERE, ".."))
    a = ap.parse_args()
    src = os.path.abspath(a.src)
    try:
        import torch as _torch
        torch = _torch
    except ImportError as ex:
        tap.skip("kla.torch", "no PyTorch (%s)" % ex)
        return tap.finish()
    if a.no_lib:
        tap.skip("kla.torch", "--no-lib (sanitizer build)")
        return tap.finish()
    if a.lib:
        os.environ["KLA_LIB"] = os.path.abspath(a.lib)
    os.environ["KLA_GOLDEN"] = os.path.join(src, "golden")
    sys.path.insert(0, os.path.join(src, "python"))
    import kla
    import kla.torch as kt
    torch.set_num_threads(1)

    # 1. against the spec loop, float64, backend ref64
    compare_case(kt, "gdn B=2 H=2 HV=4 (grouped), h0", make(1), "gdn")
    compare_case(kt, "kla B=2 H=2 HV=4, h0", make(2, mode="kla"), "kla")
    compare_case(kt, "gdn H=HV=1, no h0, no g (DeltaNet)", make(3, H=1, HV=1, h0=False, g=False),
                 "gdn")
    compare_case(kt, "kla HV=2H, no h0", make(4, H=1, HV=2, h0=False, mode="kla"), "kla")
    compare_case(kt, "gdn cu_seqlens [0,3,3,8,12] (an empty sequence), h0",
                 make(5, B=1, T=12, cu=[0, 3, 3, 8, 12]), "gdn")
    compare_case(kt, "kla cu_seqlens [0,5,12], HV=2H, h0",
                 make(6, B=1, T=12, H=1, HV=2, cu=[0, 5, 12], mode="kla"), "kla")
    compare_case(kt, "gdn use_qk_l2norm_in_kernel", make(7), "gdn", use_qk=True)
    compare_case(kt, "kla use_qk_l2norm_in_kernel", make(8, mode="kla"), "kla", use_qk=True)
    compare_case(kt, "kla l2norm_q only (the KLA layer)", make(9, mode="kla"), "kla", l2q=True)
    compare_case(kt, "kla l2norm_k only, eps 1e-3", make(10, mode="kla"), "kla", l2k=True,
                 eps=1e-3)
    compare_case(kt, "gdn state_v_first (vk), cu_seqlens, h0",
                 make(11, B=1, T=10, cu=[0, 4, 10]), "gdn", vk=True)
    compare_case(kt, "kla scale 0.37", make(12, mode="kla"), "kla", scale=0.37)
    compare_case(kt, "gdn scale 0 (literal: o = 0)", make(13), "gdn", scale=0.0)
    compare_case(kt, "gdn output_final_state=False (None, no dht)", make(14), "gdn", final=False)
    x = make(18, mode="kla")
    o, ht = kt.chunk_kla(x["q"], x["k"], x["v"], x["g"], x["b"], initial_state=x["h0"],
                         output_final_state=True, backend="ref64")
    _, ht_ref = spec_ref(x["q"], x["k"], x["v"], x["g"], x["b"], mode="kla", h0=x["h0"])
    dht = torch.randn(ht.shape, dtype=torch.float64)
    ins = [x[n] for n in ("q", "k", "v", "g", "b", "h0")]
    ga = torch.autograd.grad((ht * dht).sum(), ins, allow_unused=True)
    gb = torch.autograd.grad((ht_ref * dht).sum(), ins, allow_unused=True)
    z = lambda gr, t: torch.zeros_like(t) if gr is None else gr  # noqa: E731 (q: unused)
    e = max(maxrel(z(p, t), z(r, t)) for p, r, t in zip(ga, gb, ins))
    tap(e < 1e-10, "kla, a loss of final_state alone (o unused): every gradient, dh0 "
        "included, through dht (%.1e)" % e)
    compare_case(kt, "gdn algo chunk, chunk_size 16, T=40", make(15, B=1, T=40, H=1, HV=2),
                 "gdn", algo="chunk", chunk_size=16)
    compare_case(kt, "fused_recurrent_gated_delta_rule (beta=)", make(16), "gdn",
                 fn=lambda q, k, v, g, b, **kw: kt.fused_recurrent_gated_delta_rule(
                     q, k, v, g, beta=b, **kw))
    compare_case(kt, "fused_recurrent_kla, cu_seqlens",
                 make(17, B=1, T=9, cu=[0, 2, 9], mode="kla"), "kla",
                 fn=lambda q, k, v, g, b, **kw: kt.fused_recurrent_kla(q, k, v, g, b, **kw))

    # 2. fla's signatures and conventions
    exp = {
        "chunk_gated_delta_rule": ["q", "k", "v", "g", "beta", "scale", "initial_state",
                                   "output_final_state"],
        "fused_recurrent_gated_delta_rule": ["q", "k", "v", "g", "gk", "gv", "beta", "scale",
                                             "initial_state", "output_final_state"],
        "chunk_kla": ["q", "k", "v", "g", "eta", "scale", "initial_state",
                      "output_final_state"],
    }
    kwnames = {"cu_seqlens", "use_qk_l2norm_in_kernel", "state_v_first", "backend", "algo",
               "chunk_size", "threads", "head_first"}
    P = inspect.Parameter
    for name, pos in exp.items():
        sig = inspect.signature(getattr(kt, name))
        ps = list(sig.parameters.values())
        got_pos = [p.name for p in ps if p.kind == P.POSITIONAL_OR_KEYWORD]
        kwo = {p.name for p in ps if p.kind == P.KEYWORD_ONLY}
        d = {p.name: p.default for p in ps}
        ok = (got_pos == pos and kwnames <= kwo and d["scale"] is None
              and d["initial_state"] is None and d["output_final_state"] is False
              and d["cu_seqlens"] is None and d["use_qk_l2norm_in_kernel"] is False
              and d["backend"] is None)
        if name == "chunk_gated_delta_rule":
            ok = ok and d["g"] is P.empty and d["beta"] is P.empty and \
                {"use_beta_sigmoid_in_kernel", "allow_neg_eigval", "use_gate_in_kernel",
                 "A_log", "dt_bias"} <= kwo
        if name == "fused_recurrent_gated_delta_rule":
            ok = ok and d["g"] is None and d["gk"] is None and d["beta"] is None
        if name == "chunk_kla":
            ok = ok and d["eps"] == 1e-6 and "eps" in kwo
        tap(ok, "signature %s: positional %s; keywords cu_seqlens, "
                "use_qk_l2norm_in_kernel, ...; defaults as fla" % (name, ", ".join(pos)),
            [] if ok else [str(sig)])

    x = make(20)
    args = (x["q"], x["k"], x["v"], x["g"], x["b"])
    o1, h1 = kt.chunk_gated_delta_rule(*args, 0.3, x["h0"], True)
    o2, h2 = kt.chunk_gated_delta_rule(q=x["q"], k=x["k"], v=x["v"], g=x["g"], beta=x["b"],
                                       scale=0.3, initial_state=x["h0"],
                                       output_final_state=True)
    tap(torch.equal(o1, o2) and torch.equal(h1, h2),
        "chunk_gated_delta_rule: positional q, k, v, g, beta, scale, initial_state, "
        "output_final_state = the same by keyword")
    o3, h3 = kt.chunk_gated_delta_rule(*args)
    tap(h3 is None and o3.shape == x["v"].shape, "output_final_state=False: final_state None")
    try:
        kt.chunk_gated_delta_rule(*args, None, None, False, None)
        tap(False, "a 9th positional argument is refused (TypeError)")
    except TypeError as ex:
        tap(True, "a 9th positional argument is refused (TypeError: %s)" % ex)
    try:
        kt.chunk_gated_delta_rule(*args, no_such_flag=True)
        tap(False, "an unknown keyword is refused")
    except TypeError as ex:
        tap("no_such_flag" in str(ex), "an unknown keyword is refused (%s)" % ex)
    try:
        kt.fused_recurrent_gated_delta_rule(*args)
        tap(False, "fused_recurrent(q, k, v, g, beta): beta lands on gk, refused with a hint")
    except NotImplementedError as ex:
        tap("beta=beta" in str(ex), "fused_recurrent(q, k, v, g, beta) positionally: beta "
            "lands on fla's gk, refused with a hint", [str(ex)])
    of, hf = kt.fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], beta=x["b"],
                                                 initial_state=x["h0"],
                                                 output_final_state=True)
    oc, hc = kt.chunk_gated_delta_rule(*args, initial_state=x["h0"], output_final_state=True,
                                       algo="chunk")
    e = max(maxrel(of, oc), maxrel(hf, hc))
    tap(e < 1e-10 and kla.last_algo() == "chunk",
        "fused_recurrent (algo recurrent) = chunk (algo chunk), ref64 (%.1e)" % e)
    ob, _ = kt.fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"])
    oo, _ = kt.chunk_gated_delta_rule(*args[:4], torch.ones_like(x["b"]))
    tap(torch.allclose(ob, oo, rtol=0, atol=1e-13), "fused_recurrent: beta None means ones")
    # head_first (fla <= 0.2): [B, H, T, ...] in and o out
    hf_args = [t.transpose(1, 2) for t in args]
    oh, hh = kt.chunk_gated_delta_rule(*hf_args, initial_state=x["h0"], output_final_state=True,
                                       head_first=True)
    o_plain, h_plain = kt.chunk_gated_delta_rule(*args, initial_state=x["h0"],
                                                 output_final_state=True)
    tap(torch.allclose(oh.transpose(1, 2), o_plain, rtol=0, atol=1e-13) and oh.shape[1] == 4
        and torch.allclose(hh, h_plain, rtol=0, atol=1e-13),
        "head_first=True: [B, H, T, ...] in, o [B, HV, T, V] out, same values")
    # use_beta_sigmoid_in_kernel, allow_neg_eigval, use_gate_in_kernel: with their gradients
    x2 = make(21)
    gin = torch.randn(x2["g"].shape, dtype=torch.float64, requires_grad=True)
    A_log = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dt_bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    braw = torch.randn(x2["b"].shape, dtype=torch.float64, requires_grad=True)
    o_in, _ = kt.chunk_gated_delta_rule(x2["q"], x2["k"], x2["v"], gin, braw,
                                        use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                                        use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    gl = -torch.exp(A_log) * torch.nn.functional.softplus(gin + dt_bias)
    o_ref, _ = spec_ref(x2["q"], x2["k"], x2["v"], gl, 2 * torch.sigmoid(braw))
    do = torch.randn(o_ref.shape, dtype=torch.float64)
    ga = torch.autograd.grad((o_in * do).sum(), [gin, A_log, dt_bias, braw])
    gb = torch.autograd.grad((o_ref * do).sum(), [gin, A_log, dt_bias, braw])
    e = max([maxrel(o_in, o_ref)] + [maxrel(p, r) for p, r in zip(ga, gb)])
    tap(e < 1e-10, "use_gate_in_kernel (A_log, dt_bias), use_beta_sigmoid_in_kernel, "
        "allow_neg_eigval: o and gradients (%.1e)" % e)
    try:
        kt.chunk_gated_delta_rule(*args, allow_neg_eigval=True)
        tap(False, "allow_neg_eigval without use_beta_sigmoid_in_kernel refused")
    except ValueError:
        tap(True, "allow_neg_eigval without use_beta_sigmoid_in_kernel refused (as fla)")
    _, hv1 = kt.chunk_gated_delta_rule(*args, initial_state=x["h0"].transpose(2, 3),
                                       output_final_state=True, transpose_state_layout=True)
    tap(torch.allclose(hv1.transpose(2, 3), h_plain, rtol=0, atol=1e-13),
        "transpose_state_layout (fla's old name of state_v_first): [N, HV, V, K] states")
    try:
        kt.chunk_gated_delta_rule(*args, chunk_size=48)
        tap(False, "chunk_size 48 refused")
    except ValueError:
        tap(True, "chunk_size 48 refused (ValueError)")
    # kla.forward: keyword-only after v
    try:
        kla.forward(x["q"], x["k"], x["v"], x["g"], x["b"])
        tap(False, "kla.forward(q, k, v, g, beta) positionally is a TypeError")
    except TypeError:
        tap(True, "kla.forward(q, k, v, g, beta) positionally is a TypeError")

    # 3. float32 path against float64; bf16 in, bf16 out
    x64 = make(30, B=1, T=40, H=2, HV=4, K=16, V=8, mode="kla")
    x32 = {n: (t.detach().float().requires_grad_() if t is not None and t.is_floating_point()
               else t) for n, t in x64.items()}
    res = {}
    for lab, xx in (("64", x64), ("32", x32)):
        o, h = kt.chunk_kla(xx["q"], xx["k"], xx["v"], xx["g"], xx["b"], initial_state=xx["h0"],
                            output_final_state=True, l2norm_q=True)
        gen = torch.Generator().manual_seed(5)
        do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
        dht = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h.dtype)
        gs = torch.autograd.grad((o * do).sum() + (h * dht).sum(),
                                 [xx[n] for n in ("q", "k", "v", "g", "b", "h0")])
        res[lab] = [o, h] + list(gs)
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "deta", "dh0"]
    errs = [rel_rmse(p, r) for p, r in zip(res["32"], res["64"])]
    dts = [t.dtype for t in res["32"]]
    ok = max(errs) <= 1e-5 and all(d == torch.float32 for d in dts)
    tap(ok, "float32 tensors (backend ref) against float64 (ref64): rel_rmse <= 1e-5 "
        "(worst %.1e), all float32" % max(errs),
        [] if ok else ["%s %.2e %s" % t for t in zip(names, errs, dts)])

    xb = {n: (t.detach().to(torch.bfloat16).requires_grad_() if n in ("q", "k", "v") else t)
          for n, t in x64.items()}
    xb["g"] = x64["g"].detach().float().requires_grad_()
    xb["b"] = x64["b"].detach().to(torch.bfloat16).requires_grad_()
    xb["h0"] = x64["h0"].detach().float().requires_grad_()
    o, h = kt.chunk_kla(xb["q"], xb["k"], xb["v"], xb["g"], xb["b"], initial_state=xb["h0"],
                        output_final_state=True)
    (o.float().sum() + h.sum()).backward()
    ref, href = spec_ref(*[xb[n].detach().double() for n in ("q", "k", "v", "g", "b")],
                         mode="kla", h0=xb["h0"].detach().double())
    e = rel_rmse(o, ref)
    ok = (o.dtype == torch.bfloat16 and h.dtype == torch.float32 and e < 1e-2
          and rel_rmse(h, href) < 1e-5 and xb["q"].grad.dtype == torch.bfloat16
          and xb["b"].grad.dtype == torch.bfloat16 and xb["g"].grad.dtype == torch.float32
          and xb["h0"].grad.dtype == torch.float32)
    tap(ok, "bf16 q, k, v, eta in: o bf16 (rel_rmse %.1e vs float64 on the same inputs), "
        "final_state float32, gradients in their input's dtype" % e,
        [] if ok else [str((o.dtype, h.dtype, e, rel_rmse(h, href), xb["q"].grad.dtype))])
    oh16, _ = kt.chunk_gated_delta_rule(*(t.detach().half() for t in args))
    tap(oh16.dtype == torch.float16, "fp16 in: o fp16")

    # 4. errors naming the tensor
    def err(label, fn, want):
        try:
            fn()
            tap(False, "error: %s" % label)
        except (ValueError, kla.KlaError) as ex:
            ok = all(w in str(ex) for w in want)
            tap(ok, "error: %s: %s" % (label, ex))

    q, k, v, g, b = (t.detach() for t in args)
    h0 = x["h0"].detach()
    err("k with another K", lambda: kt.chunk_gated_delta_rule(q, k[..., :4], v, g, b),
        ["tensor k", "[2, 9, 2, 4]", "[2, 9, 2, 5]"])
    err("v with another T", lambda: kt.chunk_gated_delta_rule(q, k, v[:, :5], g, b),
        ["tensor v", "[2, 5, 4, 3]"])
    err("g [B, T]", lambda: kt.chunk_gated_delta_rule(q, k, v, g[..., 0], b),
        ["tensor g", "[2, 9]", "[B, T, HV]"])
    err("g [B, T, HV, K] (a per-key-channel decay is chunk_kda's, not GDN's)",
        lambda: kt.chunk_gated_delta_rule(q, k, v, g[..., None].expand(2, 9, 4, 5), b),
        ["tensor g", "[2, 9, 4, 5]", "[B, T, HV] = [2, 9, 4]"])
    err("beta with HV - 1 heads", lambda: kt.chunk_gated_delta_rule(q, k, v, g, b[..., :3]),
        ["tensor beta", "[2, 9, 3]", "[2, 9, 4]"])
    err("eta [B, T, HV, 1] in chunk_kla", lambda: kt.chunk_kla(q, k, v, g, b[..., None]),
        ["tensor eta"])
    err("initial_state in [K, V] swapped", lambda: kt.chunk_gated_delta_rule(
        q, k, v, g, b, initial_state=h0.transpose(2, 3)),
        ["tensor initial_state", "[N, HV, K, V]", "[2, 4, 5, 3]"])
    err("q 3-D", lambda: kt.chunk_gated_delta_rule(q[0], k[0], v, g, b), ["tensor q"])
    err("HV not a multiple of H", lambda: kt.chunk_gated_delta_rule(q, k, v[:, :, :3], g[..., :3],
                                                                    b[..., :3]),
        ["HV=3", "H=2"])
    err("cu_seqlens with B = 2", lambda: kt.chunk_gated_delta_rule(
        q, k, v, g, b, cu_seqlens=torch.tensor([0, 9])), ["batch size", "cu_seqlens"])
    err("cu_seqlens ending before T", lambda: kt.chunk_gated_delta_rule(
        q[:1], k[:1], v[:1], g[:1], b[:1], cu_seqlens=torch.tensor([0, 4, 8])),
        ["cu_seqlens"])
    err("g > 0 (refused by libkla, named)", lambda: kt.chunk_gated_delta_rule(
        q, k, v, -g, b), ["tensor g"])

    # 5. gradcheck (torch's finite differences) on tiny cases, ref64
    for lab, mode, kw, xx in (
            ("kla, grouped heads, h0, l2norm_q", "kla", {"l2norm_q": True},
             make(40, B=1, T=3, H=1, HV=2, K=3, V=2, mode="kla")),
            ("gdn, cu_seqlens, h0, use_qk_l2norm_in_kernel", "gdn",
             {"use_qk_l2norm_in_kernel": True},
             make(41, B=1, T=4, H=1, HV=1, K=3, V=2, cu=[0, 1, 4]))):
        fn = kt.chunk_kla if mode == "kla" else kt.chunk_gated_delta_rule
        cu = xx["cu"]

        def f(q, k, v, g, b, h0, fn=fn, cu=cu, kw=kw):
            return fn(q, k, v, g, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                      backend="ref64", **kw)
        ins = tuple(xx[n] for n in ("q", "k", "v", "g", "b", "h0"))
        try:
            ok = torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7, rtol=1e-6)
            tap(ok, "torch.autograd.gradcheck: %s" % lab)
        except Exception as ex:  # GradcheckError: the message holds both Jacobians
            tap(False, "torch.autograd.gradcheck: %s" % lab, [str(ex)[:3000]])

    # 6. threads: one context per thread, used concurrently
    x = make(50, B=1, T=30, mode="kla")
    base = kt.chunk_kla(*(x[n] for n in ("q", "k", "v", "g", "b")), backend="ref")[0]
    outs, errs_t = [], []

    def work():
        try:
            for _ in range(20):
                outs.append(kt.chunk_kla(*(x[n].detach() for n in ("q", "k", "v", "g", "b")),
                                         backend="ref")[0])
        except Exception as ex:  # noqa: BLE001
            errs_t.append(repr(ex))
    ths = [threading.Thread(target=work) for _ in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    ok = not errs_t and len(outs) == 80 and all(torch.equal(o, base.detach()) for o in outs)
    tap(ok, "4 threads x 20 calls at once: no KLA_EBUSY, identical results", errs_t[:3])

    # 7. a device other than the CPU
    if torch.cuda.is_available():
        xc = {n: (t.detach().cuda().requires_grad_() if t is not None and t.is_floating_point()
                  else t) for n, t in make(60).items()}
        o, h = kt.chunk_gated_delta_rule(xc["q"], xc["k"], xc["v"], xc["g"], xc["b"],
                                         initial_state=xc["h0"], output_final_state=True)
        o.sum().backward()
        tap(o.is_cuda and h.is_cuda and xc["q"].grad.is_cuda,
            "CUDA tensors in: computed on the CPU, o, final_state and gradients back on CUDA")
    else:
        tap.skip("CUDA tensors in, CUDA out", "no CUDA device")
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
