#!/usr/bin/python3
"""Tests of kla.torch's delta-rule family (python/kla/torch.py: chunk_kda,
chunk_kaczmarz_kda, chunk_precond_gated_delta_rule, chunk_precond_kda, chunk_precond_kla),
TAP. Needs PyTorch (Debian's python3-torch), numpy and libkla; skips without torch or
with --no-lib.

Our autograd Functions (backend ref64, float64 tensors) against two independent
implementations of kla-spec.md sections 1 and 7:
- a plain PyTorch float64 recurrence written here (autograd on a Python loop over
  tokens: the ATK scan, the squash, the write key, per-channel or scalar decay, the
  given or Kaczmarz step), and
- tests/kla_np.py (numpy, forward and hand-written backward),
on KDA, Kaczmarz-KDA, PGDN, PDN, PKDA (both entry points) and KLA under the
preconditioner, with grouped heads, cu_seqlens (an empty sequence too), initial
states (initial_state, initial_A_state), the final states' gradients (dht, dat),
log_atk_scale as a tensor or None, l2norm on or off, both state layouts. Then
torch.autograd.gradcheck on tiny shapes for each function (every input requiring
grad), fla's signatures, the exact-projection property of the Kaczmarz steps,
refusals (bad shapes, unsupported fla keywords) with their messages, inputs left
untouched, and the float32 path against float64.

    /usr/bin/python3 tests/test_torch_family.py --lib build/libkla.so [--src .]
"""

import argparse
import inspect
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tap import Tap  # noqa: E402

tap = Tap()
torch = None


# ------------------------------------------------------------------ the reference, from the spec

def l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def spec_ref(q, k, v, g, b, mode="gdn", scale=None, eps=1e-6, h0=None, cu=None, l2q=False,
             l2k=False, vk=False, g_atk=None, beta_atk=None, lsc=None, a0=None, sx=1.5,
             se=1e-6):
    """kla-spec.md sections 1 and 7, one token at a time, autograd-able. g: None, [B, T, HV]
    (gate head) or [B, T, HV, K] (gate channel); the ATK preconditioner when beta_atk is
    given. Returns (o [B, T, HV, V], ht [N, HV, K, V] or [N, HV, V, K], at [N, H, K] or
    None)."""
    if l2q:
        q = l2(q)
    if l2k:
        k = l2(k)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    G = HV // H
    sc = K ** -0.5 if scale is None else scale
    atk = beta_atk is not None
    lam = math.log(sx)
    if cu is None:
        seqs = [(bb, 0, T) for bb in range(B)]
    else:
        c = [int(x) for x in cu]
        seqs = [(0, c[n], c[n + 1]) for n in range(len(c) - 1)]
    zero = torch.zeros((), dtype=v.dtype)
    o, hts, ats = {}, [], []
    for n, (bb, s, e) in enumerate(seqs):
        kw = {}
        if atk:  # a_t = exp(g_atk) a_{t-1} + beta_atk k*k, per key head; kw = k * m(a)
            arow = []
            for h in range(H):
                a = a0[n, h] if a0 is not None else torch.zeros(K, dtype=v.dtype)
                c_h = lsc[h] if lsc is not None else zero - 0.2
                for t in range(s, e):
                    kt = k[bb, t, h]
                    ga = g_atk[bb, t, h] if g_atk is not None else zero
                    a = torch.exp(ga) * a + beta_atk[bb, t, h] * kt * kt
                    r = torch.log(a + se) - c_h
                    m = torch.exp(-lam * r / (1 + torch.abs(r)))
                    kw[t, h] = kt * m
                arow.append(a)
            ats.append(torch.stack(arow))
        row = []
        for hv in range(HV):
            h = hv // G
            if h0 is None:
                S = torch.zeros(K, V, dtype=v.dtype)
            else:
                S = h0[n, hv].transpose(0, 1) if vk else h0[n, hv]
            for t in range(s, e):
                kt, qt, vt = k[bb, t, h], q[bb, t, h], v[bb, t, hv]
                kwt = kw[t, h] if atk else kt
                if g is not None:  # decay first
                    S = (torch.exp(g[bb, t, hv])[:, None] if g.dim() == 4
                         else torch.exp(g[bb, t, hv])) * S
                beta = b[bb, t, hv] / ((kt * kwt).sum() + eps) if mode == "kla" else b[bb, t, hv]
                err = vt - S.transpose(0, 1) @ kt  # read / erase with k
                S = S + beta * torch.outer(kwt, err)  # write with kw
                o[bb, t, hv] = S.transpose(0, 1) @ (sc * qt)
            row.append(S.transpose(0, 1) if vk else S)
        hts.append(torch.stack(row))
    out = torch.stack([torch.stack([torch.stack([o[bb, t, hv] for hv in range(HV)])
                                    for t in range(T)]) for bb in range(B)])
    return out, torch.stack(hts), (torch.stack(ats) if atk else None)


# --------------------------------------------------------------------------------- helpers

def maxrel(a, b):
    """max |a - b| / max(1, max |b|); inf for a shape mismatch or one of them None."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    a = torch.as_tensor(a).detach().double()
    b = torch.as_tensor(b).detach().double()
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


# the tensors of a case, in the order of the gradients reported
TNAMES = ("q", "k", "v", "g", "b", "g_atk", "beta_atk", "lsc", "h0", "a0")


def make(seed, B=2, T=7, H=2, HV=4, K=4, V=3, cu=None, gate="head", atk=True, mode="gdn",
         h0=True, a0=True, lsc=True, g_atk=True, dtype=None):
    """Random inputs (float64 unless dtype), every floating one requiring grad. gate None:
    no g."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    N = len(cu) - 1 if cu is not None else B
    x = {"q": r(B, T, H, K), "k": r(B, T, H, K), "v": r(B, T, HV, V),
         "g": (None if gate is None else -0.05 - 0.6 * u(B, T, HV, *((K,) if gate == "channel"
                                                                   else ()))),
         "b": (0.2 + 0.8 * u(B, T, HV)) if mode == "gdn" else (0.3 + 1.2 * u(B, T, HV)),
         "g_atk": -0.5 * u(B, T, H) if atk and g_atk else None,
         "beta_atk": 0.2 + 0.8 * u(B, T, H) if atk else None,
         "lsc": u(H) - 1 if atk and lsc else None,
         "h0": 0.5 * r(N, HV, K, V) if h0 else None,
         "a0": 2 * u(N, H, K) if atk and a0 else None,
         "cu": torch.tensor(cu, dtype=torch.int64) if cu is not None else None}
    for n in TNAMES:
        if x[n] is not None:
            x[n] = x[n].to(dtype or torch.float64).requires_grad_()
    return x


def call(kt, fn, c, vk=False, final=True, **kw):
    """Runs kla.torch's function `fn` (kda, kkda, pgdn, pkda, pkla) on case c; returns
    (o, ht, at) with at None for the functions without the preconditioner."""
    h0 = c["h0"].transpose(2, 3) if (vk and c["h0"] is not None) else c["h0"]
    common = dict(initial_state=h0, output_final_state=final, cu_seqlens=c["cu"])
    if fn == "kda":
        o, ht = kt.chunk_kda(c["q"], c["k"], c["v"], c["g"], c["b"], state_v_first=vk,
                             **common, **kw)
        return o, ht, None
    if fn == "kkda":
        o, ht = kt.chunk_kaczmarz_kda(c["q"], c["k"], c["v"], c["g"], c["b"], state_v_first=vk,
                                      **common, **kw)
        return o, ht, None
    common.update(initial_A_state=c["a0"], log_atk_scale=c["lsc"])
    if fn == "pgdn":
        return kt.chunk_precond_gated_delta_rule(c["q"], c["k"], c["v"], c["g_atk"], c["g"],
                                                 c["beta_atk"], c["b"],
                                                 transpose_state_layout=vk, **common, **kw)
    if fn == "pkda":
        return kt.chunk_precond_kda(c["q"], c["k"], c["v"], c["g"], c["g_atk"], c["beta_atk"],
                                    c["b"], transpose_state_layout=vk, **common, **kw)
    if fn == "pkla":
        return kt.chunk_precond_kla(c["q"], c["k"], c["v"], c["g_atk"], c["g"], c["beta_atk"],
                                    c["b"], state_v_first=vk, **common, **kw)
    raise ValueError(fn)


def grads_of(outs, x, up):
    """Gradients of L = sum(do * o) + sum(dht * ht) + sum(dat * at) for every tensor of x
    requiring grad (None where it does not reach)."""
    o, ht, at = outs
    loss = (o * up["do"]).sum()
    if ht is not None:
        loss = loss + (ht * up["dht"]).sum()
    if at is not None:
        loss = loss + (at * up["dat"]).sum()
    ins = [x[n] for n in TNAMES if x[n] is not None]
    gs = torch.autograd.grad(loss, ins, allow_unused=True)
    it = iter(gs)
    return {n: (next(it) if x[n] is not None else None) for n in TNAMES}


def np_ref(x, opts, up, vk, final):
    """tests/kla_np.py's forward and backward on case x (spec names), as torch tensors."""
    import kla_np
    f = lambda t: None if t is None else t.detach().numpy()  # noqa: E731
    h0 = x["h0"].transpose(2, 3) if (vk and x["h0"] is not None) else x["h0"]
    inp = {"q": f(x["q"]), "k": f(x["k"]), "v": f(x["v"]), "g": f(x["g"]),
           ("eta" if opts["mode"] == "kla" else "beta"): f(x["b"]), "h0": f(h0),
           "cu_seqlens": f(x["cu"]), "g_atk": f(x["g_atk"]), "beta_atk": f(x["beta_atk"]),
           "log_atk_scale": f(x["lsc"]), "a0": f(x["a0"]), "do": f(up["do"])}
    if final:
        inp["dht"] = f(up["dht"])
        if x["beta_atk"] is not None:
            inp["dat"] = f(up["dat"])
    inp = {n: a for n, a in inp.items() if a is not None}
    out = kla_np.backward(inp, dict(opts, state_layout="vk" if vk else "kv"))
    t = lambda n: None if n not in out else torch.from_numpy(np.asarray(out[n]))  # noqa: E731
    g = {"q": t("dq"), "k": t("dk"), "v": t("dv"), "g": t("dg"),
         "b": t("deta" if opts["mode"] == "kla" else "dbeta"), "h0": t("dh0"),
         "g_atk": t("dg_atk"), "beta_atk": t("dbeta_atk"), "lsc": t("dlog_atk_scale"),
         "a0": t("da0")}
    # kla_np returns a gradient for an absent input too (at its default): keep the present
    g = {n: (g[n] if x[n] is not None else None) for n in TNAMES}
    if vk and g["h0"] is not None:
        g["h0"] = g["h0"].transpose(2, 3)  # to h0's own [N, HV, K, V] as make() holds it
    return (t("o"), t("ht"), t("at")), g


def compare_case(kt, label, fn, c, opts, tol=1e-10, vk=False, final=True, **kw):
    """Ours (ref64) vs the torch spec loop and vs kla_np: o, final states, gradients."""
    ours = call(kt, fn, c, vk=vk, final=final, backend="ref64", **kw)
    atk = c["beta_atk"] is not None
    h0 = c["h0"].transpose(2, 3) if (vk and c["h0"] is not None) else c["h0"]
    ref = spec_ref(c["q"], c["k"], c["v"], c["g"], c["b"], mode=opts["mode"],
                   scale=opts.get("scale"), eps=opts.get("eps", 1e-6), h0=h0, cu=c["cu"],
                   l2q=opts.get("l2norm_q", False), l2k=opts.get("l2norm_k", False), vk=vk,
                   g_atk=c["g_atk"], beta_atk=c["beta_atk"], lsc=c["lsc"], a0=c["a0"],
                   sx=opts.get("squash_x", 1.5), se=opts.get("squash_eps", 1e-6))
    gen = torch.Generator().manual_seed(99)
    up = {"do": torch.randn(ref[0].shape, generator=gen, dtype=torch.float64),
          "dht": torch.randn(ref[1].shape, generator=gen, dtype=torch.float64),
          "dat": (torch.randn(ref[2].shape, generator=gen, dtype=torch.float64)
                  if atk else None)}
    errs = {}
    if not final:
        if ours[1] is not None or ours[2] is not None:
            errs["final states (should be None)"] = math.inf
        ref = (ref[0], None, None)
    npo, npg = np_ref(c, opts, up, vk, final)
    if not final:
        npo = (npo[0], None, None)
    for i, n in enumerate(("o", "final_state", "final_A_state")):
        if ref[i] is None and ours[i] is None:
            continue
        errs[n + " vs spec loop"] = maxrel(ours[i], ref[i])
        errs[n + " vs kla_np"] = maxrel(ours[i], npo[i])
    ga = grads_of(ours, c, up)
    gb = grads_of(ref, c, up)
    ngrad = 0
    for n in TNAMES:
        if c[n] is None:
            continue
        ngrad += 1
        errs["d%s vs spec loop" % n] = maxrel(ga[n], gb[n])
        errs["d%s vs kla_np" % n] = maxrel(ga[n], npg[n])
    worst = max(errs.values())
    ok = worst <= tol and ours[0].dtype == torch.float64
    tap(ok, "%s: o, %s%d gradients vs the spec loop and kla_np (max rel %.1e)"
        % (label, "final states, " if final else "", ngrad, worst),
        [] if ok else ["%s: %.3e" % kv for kv in errs.items() if kv[1] > tol])


def expect_error(label, fn, exc, want):
    try:
        fn()
        tap(False, "refused: %s (no error)" % label)
    except exc as ex:
        ok = all(w in str(ex) for w in want)
        tap(ok, "refused (%s): %s: %s" % (exc.__name__, label, ex))
    except Exception as ex:  # noqa: BLE001
        tap(False, "refused: %s: %s: %s, expected %s" % (label, type(ex).__name__, ex,
                                                         exc.__name__))


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
        tap.skip("kla.torch family", "no PyTorch (%s)" % ex)
        return tap.finish()
    if a.no_lib:
        tap.skip("kla.torch family", "--no-lib (sanitizer build)")
        return tap.finish()
    if a.lib:
        os.environ["KLA_LIB"] = os.path.abspath(a.lib)
    os.environ["KLA_GOLDEN"] = os.path.join(src, "golden")
    sys.path.insert(0, os.path.join(src, "python"))
    import kla
    import kla.torch as kt
    torch.set_num_threads(1)
    t0 = time.time()

    # 1. against the spec loop and kla_np, float64, backend ref64
    gdn = {"mode": "gdn"}
    kla_ = {"mode": "kla"}
    l2qk = {"l2norm_q": True, "l2norm_k": True}
    compare_case(kt, "KDA B=2 H=2 HV=4 (grouped), h0, use_qk_l2norm_in_kernel", "kda",
                 make(1, gate="channel", atk=False), dict(gdn, **l2qk),
                 use_qk_l2norm_in_kernel=True)
    compare_case(kt, "KDA cu_seqlens [0,3,3,8,12] (an empty sequence), h0, state_v_first",
                 "kda", make(2, B=1, T=12, cu=[0, 3, 3, 8, 12], gate="channel", atk=False),
                 gdn, vk=True)
    compare_case(kt, "KDA scale 0.37, no h0, output_final_state=False", "kda",
                 make(3, gate="channel", atk=False, h0=False), dict(gdn, scale=0.37),
                 final=False, scale=0.37)
    compare_case(kt, "Kaczmarz-KDA H=1 HV=2, h0, l2norm_q, eps 1e-3", "kkda",
                 make(4, H=1, HV=2, gate="channel", atk=False, mode="kla"),
                 dict(kla_, l2norm_q=True, eps=1e-3), l2norm_q=True, eps=1e-3)
    compare_case(kt, "Kaczmarz-KDA cu_seqlens [0,5,12], HV=2H, use_qk_l2norm_in_kernel",
                 "kkda", make(5, B=1, T=12, H=1, HV=2, cu=[0, 5, 12], gate="channel",
                              atk=False, mode="kla"), dict(kla_, **l2qk),
                 use_qk_l2norm_in_kernel=True)
    compare_case(kt, "PGDN B=2 H=2 HV=4, h0, initial_A_state, log_atk_scale tensor, "
                 "l2norm (fla's default)", "pgdn", make(6), dict(gdn, **l2qk))
    compare_case(kt, "PGDN cu_seqlens [0,4,4,11] (an empty sequence), h0, A0 per sequence, "
                 "transpose_state_layout, x 2, eps 1e-3",
                 "pgdn", make(7, B=1, T=11, H=1, HV=2, cu=[0, 4, 4, 11]),
                 dict(gdn, squash_x=2.0, squash_eps=1e-3, **l2qk), vk=True, x=2.0, eps=1e-3)
    compare_case(kt, "PDN (g None), g_atk None, log_atk_scale None, no initial states, raw "
                 "keys", "pgdn", make(8, gate=None, g_atk=False, lsc=False, h0=False, a0=False),
                 gdn, use_qk_l2norm_in_kernel=False)
    compare_case(kt, "PGDN output_final_state=False: (o, None, None), gradients through o",
                 "pgdn", make(9, B=1, T=6), dict(gdn, **l2qk), final=False)
    compare_case(kt, "PKDA chunk_precond_kda (fla's order: g before g_atk), H=HV=2, "
                 "cu_seqlens [0,6,10], h0, A0", "pkda",
                 make(10, B=1, T=10, H=2, HV=2, cu=[0, 6, 10], gate="channel"),
                 dict(gdn, **l2qk))
    compare_case(kt, "PKDA chunk_precond_gated_delta_rule with g [B,T,HV,K], HV=2H, raw keys",
                 "pgdn", make(11, H=1, HV=2, gate="channel"), gdn,
                 use_qk_l2norm_in_kernel=False)
    compare_case(kt, "precond-KLA B=2 H=2 HV=4, h0, A0, log_atk_scale, l2norm_q (ATK on raw "
                 "k)", "pkla", make(12, mode="kla"), dict(kla_, l2norm_q=True), l2norm_q=True)
    compare_case(kt, "precond-KLA gate channel (Kaczmarz-PKDA), cu_seqlens [0,2,9], "
                 "use_qk_l2norm_in_kernel, squash_x 2, squash_eps 1e-3, eps 1e-4", "pkla",
                 make(13, B=1, T=9, H=1, HV=2, cu=[0, 2, 9], gate="channel", mode="kla"),
                 dict(kla_, squash_x=2.0, squash_eps=1e-3, eps=1e-4, **l2qk),
                 use_qk_l2norm_in_kernel=True, squash_x=2.0, squash_eps=1e-3, eps=1e-4)
    compare_case(kt, "precond-KLA no g, no g_atk, state_v_first, l2norm_k only", "pkla",
                 make(14, B=1, gate=None, g_atk=False, mode="kla"),
                 dict(kla_, l2norm_k=True), vk=True, l2norm_k=True)
    compare_case(kt, "PGDN algo chunk, chunk_size 16, T=40, h0, A0", "pgdn",
                 make(15, B=1, T=40, H=1, HV=2, K=8, V=4), dict(gdn, **l2qk), algo="chunk",
                 chunk_size=16)
    x = make(16, B=1, T=20, H=1, HV=2, gate="channel", mode="kla")
    call(kt, "pkla", x, backend="ref64", algo="chunk", chunk_size=16)
    tap(kla.last_algo() == "chunk", "precond-KLA gate channel: algo chunk runs the chunkwise "
        "algorithm (kla.last_algo() = %r)" % kla.last_algo())

    # 2. gradcheck (finite differences) on tiny shapes, every input requiring grad
    gc_cases = (
        ("chunk_kda, HV=2H, h0, use_qk_l2norm_in_kernel", "kda",
         make(40, B=1, T=3, H=1, HV=2, K=3, V=2, gate="channel", atk=False),
         {"use_qk_l2norm_in_kernel": True}),
        ("chunk_kaczmarz_kda, cu_seqlens [0,1,4], h0, l2norm_q", "kkda",
         make(41, B=1, T=4, H=1, HV=1, K=3, V=2, cu=[0, 1, 4], gate="channel", atk=False,
              mode="kla"), {"l2norm_q": True}),
        ("chunk_precond_gated_delta_rule, HV=2H, h0, A0, log_atk_scale", "pgdn",
         make(42, B=1, T=3, H=1, HV=2, K=3, V=2), {}),
        ("chunk_precond_kda, cu_seqlens [0,2,3], h0, A0, log_atk_scale", "pkda",
         make(43, B=1, T=3, H=1, HV=1, K=3, V=2, cu=[0, 2, 3], gate="channel"), {}),
        ("chunk_precond_kla, gate head, HV=2H, h0, A0, raw keys", "pkla",
         make(44, B=1, T=3, H=1, HV=2, K=3, V=2, mode="kla"), {}),
        ("chunk_precond_kla, gate channel, l2norm_q", "pkla",
         make(45, B=1, T=3, H=1, HV=1, K=3, V=2, gate="channel", mode="kla"),
         {"l2norm_q": True}),
    )
    for lab, fn, xx, kw in gc_cases:
        names = [n for n in TNAMES if xx[n] is not None]

        def f(*ts, fn=fn, xx=xx, names=names, kw=kw):
            y = dict(xx)
            y.update(zip(names, ts))
            o, ht, at = call(kt, fn, y, backend="ref64", **kw)
            return (o, ht) if at is None else (o, ht, at)
        try:
            ok = torch.autograd.gradcheck(f, tuple(xx[n] for n in names), eps=1e-6, atol=1e-7,
                                          rtol=1e-6)
            tap(ok, "torch.autograd.gradcheck: %s (inputs %s)" % (lab, " ".join(names)))
        except Exception as ex:  # GradcheckError: the message holds both Jacobians
            tap(False, "torch.autograd.gradcheck: %s" % lab, [str(ex)[:3000]])

    # 3. fla's signatures: positional order and defaults
    P = inspect.Parameter
    exp = {
        "chunk_kda": (["q", "k", "v", "g", "beta", "scale", "initial_state",
                       "output_final_state"], {"use_qk_l2norm_in_kernel": False,
                                               "cu_seqlens": None, "state_v_first": False}),
        "chunk_kaczmarz_kda": (["q", "k", "v", "g", "eta", "scale", "initial_state",
                                "output_final_state"], {"eps": 1e-6, "l2norm_q": False,
                                                        "l2norm_k": False}),
        "chunk_precond_gated_delta_rule": (
            ["q", "k", "v", "g_atk", "g", "beta_atk", "beta", "scale", "initial_state",
             "initial_A_state", "output_final_state"],
            {"use_qk_l2norm_in_kernel": True, "cu_seqlens": None,
             "transpose_state_layout": False, "x": 1.5, "eps": 1e-6, "log_atk_scale": None}),
        "chunk_precond_kda": (
            ["q", "k", "v", "g", "g_atk", "beta_atk", "beta", "scale", "initial_state",
             "initial_A_state", "output_final_state"],
            {"cu_seqlens": None, "transpose_state_layout": False, "x": 1.5, "eps": 1e-6,
             "log_atk_scale": None}),
        "chunk_precond_kla": (
            ["q", "k", "v", "g_atk", "g", "beta_atk", "eta", "scale", "initial_state",
             "initial_A_state", "output_final_state"],
            {"use_qk_l2norm_in_kernel": False, "eps": 1e-6, "squash_x": 1.5,
             "squash_eps": 1e-6, "log_atk_scale": None, "l2norm_q": False}),
    }
    for name, (pos, kwd) in exp.items():
        sig = inspect.signature(getattr(kt, name))
        ps = list(sig.parameters.values())
        got_pos = [p.name for p in ps if p.kind == P.POSITIONAL_OR_KEYWORD]
        kwo = {p.name: p.default for p in ps if p.kind == P.KEYWORD_ONLY}
        d = {p.name: p.default for p in ps}
        ok = (got_pos == pos and d["scale"] is None and d["initial_state"] is None
              and d["output_final_state"] is False and d.get("initial_A_state", None) is None
              and all(n in kwo and kwo[n] == v for n, v in kwd.items())
              and kwo.get("backend", 0) is None and name in kt.__all__)
        tap(ok, "signature %s: positional %s; keywords %s; in __all__"
            % (name, ", ".join(pos), ", ".join("%s=%r" % kv for kv in kwd.items())),
            [] if ok else [str(sig)])

    x = make(20, B=1, T=6, H=1, HV=2, K=3, V=2)
    args = (x["q"], x["k"], x["v"], x["g_atk"], x["g"], x["beta_atk"], x["b"])
    o1 = kt.chunk_precond_gated_delta_rule(*args, 0.3, x["h0"], x["a0"], True)
    o2 = kt.chunk_precond_gated_delta_rule(q=x["q"], k=x["k"], v=x["v"], g_atk=x["g_atk"],
                                           g=x["g"], beta_atk=x["beta_atk"], beta=x["b"],
                                           scale=0.3, initial_state=x["h0"],
                                           initial_A_state=x["a0"], output_final_state=True)
    tap(all(torch.equal(p, r) for p, r in zip(o1, o2)) and len(o1) == 3,
        "chunk_precond_gated_delta_rule: positional = keyword; returns (o, final_state, "
        "final_A_state)")
    o3 = kt.chunk_precond_gated_delta_rule(*args)
    tap(o3[1] is None and o3[2] is None, "output_final_state=False: (o, None, None), as fla")
    # chunk_precond_kda is chunk_precond_gated_delta_rule with fla's PKDA order
    xk = make(21, B=1, T=6, H=1, HV=2, K=3, V=2, gate="channel")
    pk = kt.chunk_precond_kda(xk["q"], xk["k"], xk["v"], xk["g"], xk["g_atk"], xk["beta_atk"],
                              xk["b"], initial_state=xk["h0"], initial_A_state=xk["a0"],
                              output_final_state=True, log_atk_scale=xk["lsc"])
    pg = kt.chunk_precond_gated_delta_rule(xk["q"], xk["k"], xk["v"], xk["g_atk"], xk["g"],
                                           xk["beta_atk"], xk["b"], initial_state=xk["h0"],
                                           initial_A_state=xk["a0"], output_final_state=True,
                                           log_atk_scale=xk["lsc"])
    tap(all(torch.equal(p, r) for p, r in zip(pk, pg)),
        "chunk_precond_kda(q, k, v, g, g_atk, ...) = chunk_precond_gated_delta_rule(q, k, v, "
        "g_atk, g, ...) with g [B, T, HV, K]")
    # log_atk_scale None = each -0.2, without a gradient
    on = kt.chunk_precond_gated_delta_rule(*args, output_final_state=True)
    c02 = torch.full((1,), -0.2, dtype=torch.float64, requires_grad=True)
    oc = kt.chunk_precond_gated_delta_rule(*args, output_final_state=True, log_atk_scale=c02)
    (oc[0].sum() + oc[2].sum()).backward()
    tap(all(torch.equal(p, r) for p, r in zip(on, oc)) and c02.grad is not None
        and c02.grad.shape == (1,),
        "log_atk_scale None = a tensor of -0.2 (which gets its gradient)")
    # chunk_kda: beta logits in PyTorch, the fla keywords left at their defaults accepted
    xd = make(22, B=1, T=5, H=1, HV=2, K=3, V=2, gate="channel", atk=False)
    braw = torch.randn(xd["b"].shape, dtype=torch.float64, requires_grad=True)
    o_s, _ = kt.chunk_kda(xd["q"], xd["k"], xd["v"], xd["g"], braw,
                          use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
                          use_gate_in_kernel=False, A_log=None, dt_bias=None, safe_gate=False,
                          lower_bound=None, disable_recompute=True, cu_seqlens_cpu=None)
    o_r, _, _ = spec_ref(xd["q"], xd["k"], xd["v"], xd["g"], 2 * torch.sigmoid(braw))
    do = torch.randn(o_r.shape, dtype=torch.float64)
    ga = torch.autograd.grad((o_s * do).sum(), braw)[0]
    gb = torch.autograd.grad((o_r * do).sum(), braw)[0]
    e = max(maxrel(o_s, o_r), maxrel(ga, gb))
    tap(e < 1e-10, "chunk_kda use_beta_sigmoid_in_kernel, allow_neg_eigval: o and dbeta_raw "
        "(%.1e); use_gate_in_kernel=False, A_log=None, safe_gate=False, lower_bound=None, "
        "disable_recompute accepted" % e)

    # 4. the Kaczmarz steps project exactly (eta = 1, eps = 0): k_T^T S_T = v_T
    xe = make(23, B=1, T=5, H=1, HV=2, K=4, V=3, gate="channel", mode="kla")
    ones = torch.ones_like(xe["b"])
    kT, vT = xe["k"][0, -1, 0].detach(), xe["v"][0, -1].detach()
    _, ht = kt.chunk_kaczmarz_kda(xe["q"], xe["k"], xe["v"], xe["g"], ones,
                                  initial_state=xe["h0"], output_final_state=True, eps=0.0)
    e1 = max(float((kT @ ht[0, hv].detach() - vT[hv]).abs().max()) for hv in range(2))
    for gg in (xe["g"], xe["g"][..., 0]):
        _, ht, _ = kt.chunk_precond_kla(xe["q"], xe["k"], xe["v"], xe["g_atk"], gg,
                                        xe["beta_atk"], ones, initial_state=xe["h0"],
                                        initial_A_state=xe["a0"], output_final_state=True,
                                        eps=0.0, log_atk_scale=xe["lsc"])
        e1 = max(e1, max(float((kT @ ht[0, hv].detach() - vT[hv]).abs().max())
                         for hv in range(2)))
    tap(e1 < 1e-12, "eta = 1, eps = 0: chunk_kaczmarz_kda and chunk_precond_kla (gate channel "
        "and head) end with k_T^T S_T = v_T exactly (%.1e)" % e1)

    # 5. refusals
    q, k, v, g, b = (x[n].detach() for n in ("q", "k", "v", "g", "b"))
    gatk, batk, a0, h0 = (x[n].detach() for n in ("g_atk", "beta_atk", "a0", "h0"))
    gd = xd["g"].detach()
    qd, kd, vd, bd = (xd[n].detach() for n in ("q", "k", "v", "b"))
    pg_ = kt.chunk_precond_gated_delta_rule
    expect_error("chunk_kda with g [B, T, HV]", lambda: kt.chunk_kda(qd, kd, vd, gd[..., 0], bd),
                 ValueError, ["tensor g", "[1, 5, 2]", "[B, T, HV, K] = [1, 5, 2, 3]"])
    expect_error("chunk_kda with g None", lambda: kt.chunk_kda(qd, kd, vd, None, bd),
                 ValueError, ["chunk_kda", "g [B, T, HV, K] is required"])
    expect_error("chunk_kaczmarz_kda with g [B, T, HV, K-1]",
                 lambda: kt.chunk_kaczmarz_kda(qd, kd, vd, gd[..., :2], bd), ValueError,
                 ["tensor g", "[1, 5, 2, 2]", "[1, 5, 2, 3]"])
    expect_error("chunk_kda beta [B, T, HV, 1]",
                 lambda: kt.chunk_kda(qd, kd, vd, gd, bd[..., None]), ValueError,
                 ["tensor beta", "[B, T, HV]"])
    A_log = torch.zeros(2, dtype=torch.float64)
    for kw, name in (({"use_gate_in_kernel": True, "A_log": A_log}, "use_gate_in_kernel"),
                     ({"A_log": A_log}, "A_log"),
                     ({"dt_bias": torch.zeros(6, dtype=torch.float64)}, "dt_bias"),
                     ({"safe_gate": True}, "safe_gate"), ({"lower_bound": -5.0}, "lower_bound"),
                     ({"return_intermediate_states": True}, "return_intermediate_states"),
                     ({"use_graph": True}, "use_graph"), ({"max_num_seqs": 4}, "max_num_seqs"),
                     ({"cp_context": object()}, "cp_context")):
        expect_error("chunk_kda %s" % ", ".join("%s=..." % n for n in kw),
                     lambda kw=kw: kt.chunk_kda(qd, kd, vd, gd, bd, **kw), NotImplementedError,
                     ["chunk_kda", name, "not supported"])
    expect_error("chunk_kda a 9th positional argument",
                 lambda: kt.chunk_kda(qd, kd, vd, gd, bd, None, None, False, True), TypeError,
                 [])
    expect_error("chunk_kda an unknown keyword",
                 lambda: kt.chunk_kda(qd, kd, vd, gd, bd, no_such_flag=1), TypeError,
                 ["no_such_flag"])
    expect_error("PGDN g_atk per value head [B, T, HV]",
                 lambda: pg_(q, k, v, g, g, batk, b), ValueError,
                 ["tensor g_atk", "[1, 6, 2]", "[B, T, H]", "[1, 6, 1]"])
    expect_error("PGDN beta_atk None", lambda: pg_(q, k, v, gatk, g, None, b), ValueError,
                 ["beta_atk", "required"])
    expect_error("PGDN initial_A_state [N, HV, K]",
                 lambda: pg_(q, k, v, gatk, g, batk, b, initial_A_state=a0.repeat(1, 2, 1)),
                 ValueError, ["tensor initial_A_state", "[1, 2, 3]", "[N, H, K] = [1, 1, 3]"])
    expect_error("PGDN log_atk_scale [HV]",
                 lambda: pg_(q, k, v, gatk, g, batk, b, log_atk_scale=torch.zeros(2)),
                 ValueError, ["tensor log_atk_scale", "[2]", "[H]"])
    expect_error("PGDN log_atk_scale a float",
                 lambda: pg_(q, k, v, gatk, g, batk, b, log_atk_scale=-0.2), TypeError,
                 ["log_atk_scale", "torch.Tensor"])
    expect_error("PGDN initial_state rows != sequences (fla's message)",
                 lambda: pg_(q, k, v, gatk, g, batk, b, initial_state=h0,
                             cu_seqlens=torch.tensor([0, 2, 6])), ValueError,
                 ["number of initial states", "2 rather than 1"])
    expect_error("PGDN A_log (not a keyword of fla's PGDN op)",
                 lambda: pg_(q, k, v, gatk, g, batk, b, A_log=A_log), TypeError, ["A_log"])
    expect_error("PGDN cp_context", lambda: pg_(q, k, v, gatk, g, batk, b, cp_context=object()),
                 NotImplementedError, ["cp_context"])
    expect_error("PGDN g_atk > 0 (libkla's check, named)",
                 lambda: pg_(q, k, v, -gatk + 0.1, g, batk, b), kla.KlaError, ["tensor g_atk"])
    expect_error("PGDN x = 1 (libkla's check)", lambda: pg_(q, k, v, gatk, g, batk, b, x=1.0),
                 kla.KlaError, ["squash_x"])
    expect_error("PGDN on the simd backend (the family runs on ref and ref64)",
                 lambda: pg_(q, k, v, gatk, g, batk, b, backend="simd"), kla.KlaError,
                 ["simd"])
    expect_error("chunk_precond_kda use_qk_l2norm_in_kernel=False",
                 lambda: kt.chunk_precond_kda(q, k, v, xk["g"].detach(), gatk, batk, b,
                                              use_qk_l2norm_in_kernel=False), ValueError,
                 ["always L2-normalised"])
    expect_error("chunk_precond_kda use_gate_in_kernel=True",
                 lambda: kt.chunk_precond_kda(q, k, v, xk["g"].detach(), gatk, batk, b,
                                              use_gate_in_kernel=True, A_log=A_log),
                 NotImplementedError, ["use_gate_in_kernel"])
    expect_error("chunk_precond_kda g [B, T, HV] (fla's order: g before g_atk)",
                 lambda: kt.chunk_precond_kda(q, k, v, g, gatk, batk, b), ValueError,
                 ["tensor g", "[B, T, HV, K]"])
    expect_error("chunk_precond_kla x= (the squash is squash_x= there)",
                 lambda: kt.chunk_precond_kla(q, k, v, gatk, g, batk, b, x=2.0), TypeError,
                 ["squash_x", "eps"])
    expect_error("chunk_precond_kla HV not a multiple of H",
                 lambda: kt.chunk_precond_kla(q.repeat(1, 1, 2, 1), k.repeat(1, 1, 2, 1),
                                              v[:, :, :1].repeat(1, 1, 3, 1), None,
                                              None, batk.repeat(1, 1, 2), b[..., :1].repeat(
                                                  1, 1, 3)), ValueError, ["HV=3", "H=2"])
    expect_error("PGDN a 12th positional argument",
                 lambda: pg_(q, k, v, gatk, g, batk, b, None, None, None, False, True),
                 TypeError, [])

    # 6. inputs are not modified (values, version counters), by forward and backward
    bad = []
    for fn, xx, kw in (("kda", make(30, B=1, T=5, H=1, HV=2, K=3, V=2, gate="channel",
                                    atk=False), {"use_qk_l2norm_in_kernel": True}),
                       ("kkda", make(31, B=1, T=5, H=1, HV=2, K=3, V=2, gate="channel",
                                     atk=False, mode="kla"), {"l2norm_q": True}),
                       ("pgdn", make(32, B=1, T=5, H=1, HV=2, K=3, V=2), {}),
                       ("pkda", make(33, B=1, T=5, H=1, HV=1, K=3, V=2, gate="channel"), {}),
                       ("pkla", make(34, B=1, T=5, H=1, HV=2, K=3, V=2, mode="kla"), {}),
                       ("pgdn", make(35, B=1, T=5, H=1, HV=2, K=3, V=2,
                                     dtype=torch.float32), {})):
        before = {n: (t.detach().clone(), t._version) for n, t in xx.items() if t is not None}
        outs = call(kt, fn, xx, **kw)
        loss = sum(o.double().square().sum() for o in outs if o is not None)
        loss.backward()
        call(kt, fn, xx, vk=True, **kw)
        for n, (c, ver) in before.items():
            t = xx[n]
            if not torch.equal(t.detach(), c) or t._version != ver:
                bad.append("%s: %s changed" % (fn, n))
    tap(not bad, "every input left untouched (values and version counters) by forward and "
        "backward of each function, float64 and float32", bad)

    # 7. float32 tensors (backend ref) against float64 (ref64); bf16 in
    x64 = make(50, B=1, T=40, H=2, HV=4, K=16, V=8, gate="channel")
    x32 = {n: (t.detach().float().requires_grad_() if t is not None and t.is_floating_point()
               else t) for n, t in x64.items()}
    res = {}
    for lab, xx in (("64", x64), ("32", x32)):
        outs = call(kt, "pgdn", xx)
        gen = torch.Generator().manual_seed(5)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
                    ).sum() for o in outs)
        ins = [xx[n] for n in TNAMES if xx[n] is not None]
        res[lab] = list(outs) + list(torch.autograd.grad(loss, ins))
    errs = [rel_rmse(p, r) for p, r in zip(res["32"], res["64"])]
    ok = max(errs) <= 1e-5 and all(t.dtype == torch.float32 for t in res["32"])
    tap(ok, "PKDA float32 tensors (backend ref) against float64 (ref64): o, states and 10 "
        "gradients, rel_rmse <= 1e-5 (worst %.1e), all float32" % max(errs),
        [] if ok else ["%.2e %s" % (e, t.dtype) for e, t in zip(errs, res["32"])])
    xb = make(51, B=1, T=8, H=1, HV=2, K=4, V=3, gate="channel")
    for n in ("q", "k", "v"):
        xb[n] = xb[n].detach().to(torch.bfloat16).requires_grad_()
    o, ht, at = call(kt, "pgdn", xb)
    (o.float().sum() + ht.sum() + at.sum()).backward()
    ok = (o.dtype == torch.bfloat16 and ht.dtype == torch.float32 and at.dtype == torch.float32
          and xb["q"].grad.dtype == torch.bfloat16 and xb["a0"].grad.dtype == torch.float64)
    tap(ok, "bf16 q, k, v: o bf16, final_state and final_A_state float32, gradients in their "
        "inputs' dtypes", [] if ok else [str((o.dtype, ht.dtype, at.dtype))])

    # 8. a device other than the CPU
    if torch.cuda.is_available():
        xc = {n: (t.detach().cuda().requires_grad_() if t is not None and t.is_floating_point()
                  else t) for n, t in make(60, B=1, T=5, H=1, HV=2, K=3, V=2).items()}
        o, ht, at = call(kt, "pgdn", xc)
        (o.sum() + at.sum()).backward()
        tap(o.is_cuda and at.is_cuda and xc["a0"].grad.is_cuda,
            "CUDA tensors in: computed on the CPU, results and gradients back on CUDA")
    else:
        tap.skip("CUDA tensors in, CUDA out", "no CUDA device")
    print("# %.1f s" % (time.time() - t0))
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
