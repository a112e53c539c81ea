#!/usr/bin/python3
"""Independent check of the `kla` command against the float64 numpy oracle (kla_np.py).

    /usr/bin/python3 tests/test_indep.py --kla build/kla

Prints TAP. Part (a) validates the oracle itself (finite differences through every
gradient, the hand example of spec section 6, the exact-projection property, a
second forward formulation, the safetensors round trip). Part (b) writes random F32
inputs for a list of named cases, runs `kla forward|backward|decode` with the ref64
and ref backends and every other usable one (simd, vulkan; or --backends), both algorithms, and compares every output with the oracle
evaluated in float64 on the float32-rounded inputs, using
rel_rmse = rms(ref - got) / rms(ref). Without --kla only part (a) runs.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import kla_np  # noqa: E402
from kla.safetensors import load, save  # noqa: E402
from tap import Tap  # noqa: E402

tap = Tap()


# --------------------------------------------------------------------------- metric

def rel_rmse(ref, got):
    """rms(ref - got) / rms(ref); the plain rms(got) if ref is exactly zero."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    num = np.sqrt(np.mean((ref - got) ** 2)) if ref.size else 0.0
    den = np.sqrt(np.mean(ref ** 2)) if ref.size else 0.0
    return num / den if den > 0 else num


# --------------------------------------------------------------------------- inputs

def make_inputs(rng, B=1, T=None, H=1, HV=1, K=8, V=8, mode="kla", g=True, h0=False, cu=None,
                layout="kv", unit_keys=False, eta_one=False, do=False, dht=False,
                cu_dtype=np.int32, f32=True):
    """Random inputs. cu = list of sequence lengths (then B = 1, T = sum)."""
    dt = np.float32 if f32 else np.float64
    if cu is not None:
        B, T = 1, int(sum(cu))
    inp = {}
    inp["q"] = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T, H, K))
    if unit_keys:  # gdn without l2norm_k: keep |1 - beta |k|^2| < 1
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    inp["k"] = k
    inp["v"] = rng.standard_normal((B, T, HV, V))
    if g:  # g = log(sigmoid(x)) <= 0, mostly gentle decay
        x = rng.normal(2.0, 1.5, (B, T, HV))
        inp["g"] = -np.logaddexp(0.0, -x)
    if mode == "kla":
        inp["eta"] = (np.ones((B, T, HV)) if eta_one
                      else rng.uniform(0.05, 1.45, (B, T, HV)))
    else:
        inp["beta"] = rng.uniform(0.05, 0.95, (B, T, HV))
    N = len(cu) if cu is not None else B
    sshape = (N, HV, K, V) if layout == "kv" else (N, HV, V, K)
    if h0:
        inp["h0"] = 0.5 * rng.standard_normal(sshape)
    if do:
        inp["do"] = rng.standard_normal((B, T, HV, V))
    if dht:
        inp["dht"] = rng.standard_normal(sshape)
    inp = {n: a.astype(dt) for n, a in inp.items()}
    if cu is not None:
        inp["cu_seqlens"] = np.concatenate([[0], np.cumsum(cu)]).astype(cu_dtype)
    return inp


def as64(inp):
    """float64 copies of the (float32-rounded) inputs, cu_seqlens untouched."""
    return {n: (a if n == "cu_seqlens" else a.astype(np.float64)) for n, a in inp.items()}


# --------------------------------------------------------------------------- (a) self-checks

DIFF_INPUTS = ("q", "k", "v", "g", "eta", "beta", "h0")


def loss(inp, opts):
    out = kla_np.forward(inp, opts)
    L = np.sum(inp["do"] * out["o"])
    if "dht" in inp:
        L += np.sum(inp["dht"] * out["ht"])
    return L


def fd_check(name, inp, opts, h=1e-5, tol=1e-7):
    """Central finite differences of L for every element of every differentiable
    input (g included even if absent: then at g = 0), against kla_np.backward."""
    grads = kla_np.backward(inp, opts)
    inp_g = dict(inp)
    if "g" not in inp_g:  # absent g: differentiate at g = 0
        inp_g["g"] = np.zeros(inp["v"].shape[:3])
    worst, where = 0.0, ""
    for x in DIFF_INPUTS:
        if x not in inp_g:
            continue
        gname = "d" + x
        if gname not in grads:
            return tap(False, f"fd {name}", [f"{gname} missing from backward"])
        an = grads[gname]
        fd = np.zeros_like(an)
        base = inp_g[x]
        for idx in np.ndindex(base.shape):
            d = dict(inp_g)
            for sgn in (+1, -1):
                a = base.copy()
                a[idx] += sgn * h
                d[x] = a
                fd[idx] += sgn * loss(d, opts) / (2 * h)
        err = np.max(np.abs(fd - an)) / max(1.0, np.max(np.abs(an)))
        if err > worst:
            worst, where = err, gname
    extra = set(grads) - {"o", "ht"} - {"d" + x for x in inp_g if x in DIFF_INPUTS}
    ok = worst < tol and not extra
    diag = [] if ok else [f"worst {where} err {worst:.3e}", f"unexpected outputs {extra}"]
    tap(ok, f"fd {name} (worst {worst:.1e} {where})", diag)


def forward_matrix_form(inp, opts):
    """Second forward: S_t = alpha (I - beta k k^T) S_{t-1} + beta k v^T, loops over
    every (sequence, head) separately, for cross-checking the vectorised oracle."""
    o_ = kla_np.resolve_opts(inp, opts)
    q, k, v = (inp[n].astype(np.float64) for n in "qkv")
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    g = inp["g"] if "g" in inp else np.zeros((B, T, HV))
    nz = lambda x: x / np.sqrt(x @ x + 1e-6)
    cu = inp.get("cu_seqlens")
    seqs = ([(b, 0, T) for b in range(B)] if cu is None
            else [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)])
    o = np.zeros((B, T, HV, V))
    ht = np.zeros((len(seqs), HV, K, V))
    for n, (b, t0, t1) in enumerate(seqs):
        for hv in range(HV):
            h = hv // (HV // H)
            S = np.zeros((K, V))
            if "h0" in inp:
                S = inp["h0"][n, hv].astype(np.float64)
                if o_["state_layout"] == "vk":
                    S = S.T
            for t in range(t0, t1):
                qq, kk = q[b, t, h], k[b, t, h]
                if o_["l2norm_q"]:
                    qq = nz(qq)
                if o_["l2norm_k"]:
                    kk = nz(kk)
                bt = (inp["eta"][b, t, hv] / (kk @ kk + o_["eps"]) if o_["mode"] == "kla"
                      else inp["beta"][b, t, hv])
                S = (np.exp(g[b, t, hv]) * (np.eye(K) - bt * np.outer(kk, kk)) @ S
                     + bt * np.outer(kk, v[b, t, hv]))
                o[b, t, hv] = S.T @ (o_["scale"] * qq)
            ht[n, hv] = S
    if o_["state_layout"] == "vk":
        ht = ht.transpose(0, 1, 3, 2)
    return {"o": o, "ht": ht}


def self_checks():
    # hand example of spec section 6
    inp = {"q": np.array([[1, 1], [1, 0]], float).reshape(1, 2, 1, 2),
           "k": np.array([[2, 0], [1, 1]], float).reshape(1, 2, 1, 2),
           "v": np.array([3, 1], float).reshape(1, 2, 1, 1),
           "g": np.array([0, np.log(0.5)]).reshape(1, 2, 1),
           "eta": np.array([1, 0.5]).reshape(1, 2, 1)}
    out = kla_np.forward(inp, {"mode": "kla", "scale": "1", "eps": "0"})
    ok = (np.allclose(out["o"].ravel(), [1.5, 0.8125], rtol=0, atol=1e-15)
          and np.allclose(out["ht"].reshape(2, 1), [[0.8125], [0.0625]], rtol=0, atol=1e-15))
    tap(ok, "hand example (spec section 6)", [] if ok else [f"o {out['o'].ravel()}",
                                                          f"ht {out['ht'].ravel()}"])

    # eta = 1 with eps = 0: exact Kaczmarz projection, k_t^T S_t = v_t
    rng = np.random.default_rng(1)
    inp = make_inputs(rng, 1, 1, 1, 1, 5, 3, h0=True, eta_one=True, f32=False)
    out = kla_np.forward(inp, {"eps": 0})
    err = np.max(np.abs(inp["k"][0, 0, 0] @ out["ht"][0, 0] - inp["v"][0, 0, 0]))
    tap(err < 1e-12, f"eta=1 projection k^T S = v (err {err:.1e})")

    # vectorised oracle vs. the (I - beta k k^T) matrix form, several option sets
    worst = 0.0
    for i, (kw, opts) in enumerate([
            (dict(mode="kla", h0=True), {}),
            (dict(mode="gdn", unit_keys=True, cu=[3, 1, 4], h0=True, layout="vk"),
             {"state_layout": "vk"}),
            (dict(mode="kla", H=2, HV=4), {"l2norm_q": "true", "l2norm_k": "true",
                                            "scale": "0.7", "eps": "1e-3"})]):
        dims = dict(B=2, T=6, H=1, HV=2, K=4, V=3)
        dims.update({a: kw.pop(a) for a in ("H", "HV") if a in kw})
        inp = make_inputs(np.random.default_rng(10 + i), f32=False, **dims, **kw)
        a, b = kla_np.forward(inp, opts), forward_matrix_form(inp, opts)
        worst = max(worst, rel_rmse(b["o"], a["o"]), rel_rmse(b["ht"], a["ht"]))
    tap(worst < 1e-13, f"oracle forward vs matrix form (worst {worst:.1e})")

    # finite differences, float64, tiny cases; every gradient
    fd_cases = [
        ("kla plain", dict(B=2, T=4, H=1, HV=1, K=3, V=2, do=True, dht=True), {}),
        ("kla no g (dg at 0), no dht", dict(B=1, T=4, H=1, HV=1, K=3, V=2, g=False, do=True),
         {"scale": "0.9"}),
        ("kla l2norm_q+k grouped h0", dict(B=1, T=4, H=1, HV=2, K=3, V=2, h0=True, do=True,
                                           dht=True),
         {"l2norm_q": "true", "l2norm_k": "true"}),
        ("kla l2norm_k only eps=0.1 vk", dict(B=1, T=3, H=2, HV=4, K=2, V=3, h0=True,
                                              layout="vk", do=True, dht=True),
         {"l2norm_k": "true", "eps": "0.1", "state_layout": "vk"}),
        ("gdn cu_seqlens h0", dict(B=1, T=5, H=1, HV=2, K=3, V=2, mode="gdn",
                                   unit_keys=True, cu=[2, 1, 3], h0=True, do=True,
                                   dht=True), {}),
        ("gdn l2norm_q", dict(B=1, T=4, H=1, HV=1, K=4, V=2, mode="gdn", unit_keys=True,
                              h0=True, do=True, dht=True), {"l2norm_q": "true"}),
    ]
    for i, (name, kw, opts) in enumerate(fd_cases):
        inp = make_inputs(np.random.default_rng(100 + i), f32=False, **kw)
        fd_check(name, inp, opts)

    # safetensors round trip (dtypes, metadata, alignment)
    d = tempfile.mkdtemp(prefix="kla-indep-st-")
    try:
        rng = np.random.default_rng(7)
        t = {"a": rng.standard_normal((2, 3)).astype(np.float32),
             "b": rng.standard_normal(5), "c": np.arange(4, dtype=np.int32),
             "d": np.arange(3, dtype=np.int64), "e": np.zeros((0, 2), np.float32),
             "f": np.float16([1.5, -2.25])}
        p = os.path.join(d, "x.safetensors")
        save(p, t, {"mode": "kla", "l2norm_q": True, "scale": 0.25})
        t2, m2 = load(p)
        raw = open(p, "rb").read()
        hlen = int.from_bytes(raw[:8], "little")
        ok = (set(t2) == set(t) and m2 == {"mode": "kla", "l2norm_q": "true", "scale": "0.25"}
              and (8 + hlen) % 8 == 0
              and all(t2[n].shape == t[n].shape and np.array_equal(t2[n], t[n]) for n in t)
              and t2["f"].dtype == np.float32 and t2["a"].dtype == np.float32
              and t2["d"].dtype == np.int64)
        tap(ok, "safetensors round trip")
    finally:
        shutil.rmtree(d)


# --------------------------------------------------------------------------- (b) command

# name, make_inputs kwargs, metadata, chunk sizes for ref64 (ref uses the first)
CASES = [
    ("kla_basic", dict(B=2, T=40, H=2, HV=2, K=16, V=16), {"mode": "kla"}, [16, 32, 64, 128]),
    ("gdn_basic", dict(B=2, T=40, H=2, HV=2, K=16, V=16, mode="gdn", unit_keys=True),
     {"mode": "gdn"}, [16, 64]),
    ("deltanet_g0", dict(B=1, T=33, H=2, HV=2, K=16, V=16, mode="gdn", g=False,
                         unit_keys=True, dht=True), {"mode": "gdn"}, [16, 32]),
    ("grouped_H2_HV4", dict(B=1, T=48, H=2, HV=4, K=16, V=8, h0=True, dht=True),
     {"mode": "kla"}, [16, 32]),
    ("cu_seqlens_1_70_5", dict(H=1, HV=2, K=16, V=16, cu=[1, 70, 5], h0=True, dht=True),
     {"mode": "kla"}, [16, 64]),
    ("cu_seqlens_i64_gdn", dict(H=1, HV=1, K=8, V=8, cu=[20, 3, 17], mode="gdn",
                                unit_keys=True, cu_dtype=np.int64), {"mode": "gdn"},
     [16, 32]),
    ("h0_dht", dict(B=2, T=24, H=1, HV=1, K=16, V=16, h0=True, dht=True),
     {"mode": "kla"}, [16, 64]),
    ("state_layout_vk", dict(B=1, T=37, H=1, HV=2, K=8, V=12, h0=True, dht=True, layout="vk"),
     {"mode": "kla", "state_layout": "vk"}, [16, 32]),
    ("l2norm_q", dict(B=1, T=37, H=2, HV=2, K=16, V=16), {"mode": "kla", "l2norm_q": "true"},
     [16, 64]),
    ("l2norm_qk_gdn", dict(B=1, T=37, H=1, HV=2, K=16, V=16, mode="gdn", h0=True),
     {"mode": "gdn", "l2norm_q": "true", "l2norm_k": "true"}, [16, 32]),
    ("l2norm_qk_kla_T130", dict(B=1, T=130, H=1, HV=1, K=16, V=16, dht=True),
     {"mode": "kla", "l2norm_q": "true", "l2norm_k": "true"}, [16, 32, 64, 128]),
    ("K8_V12", dict(B=1, T=21, H=1, HV=1, K=8, V=12, h0=True), {"mode": "kla"}, [16]),
    ("K96_V192", dict(B=1, T=9, H=1, HV=2, K=96, V=192, h0=True, dht=True), {"mode": "kla"},
     [16, 64]),
    ("eta_one", dict(B=1, T=19, H=1, HV=1, K=8, V=8, eta_one=True, h0=True),
     {"mode": "kla"}, [16]),
    ("scale_eps_opts", dict(B=1, T=25, H=1, HV=1, K=8, V=8),
     {"mode": "kla", "scale": "0.3", "eps": "0.01"}, [16]),
]

TOL64 = 1e-10
TOL32_OUT, TOL32_GRAD = 1e-5, 1e-4
FWD_INPUTS = ("q", "k", "v", "g", "eta", "beta", "h0", "cu_seqlens")


def compare(ref, path, out_names, backend):
    """Compare the file at `path` with the oracle dict `ref` for `out_names`.
    Returns (ok, worst rel_rmse, worst tensor name, diagnostics)."""
    got, _ = load(path)
    want_dt = np.float64 if backend == "ref64" else np.float32
    ok, worst, wname, diag = True, 0.0, out_names[0], []
    for n in out_names:
        if n not in got:
            ok = False
            diag.append(f"{n}: missing from output")
            continue
        g, r = got[n], ref[n]
        if g.shape != r.shape:
            ok = False
            diag.append(f"{n}: shape {list(g.shape)}, want {list(r.shape)}")
            continue
        if g.dtype != want_dt:
            ok = False
            diag.append(f"{n}: dtype {g.dtype}, want {np.dtype(want_dt)}")
        if not np.all(np.isfinite(g)):
            ok = False
            bad = np.argwhere(~np.isfinite(g))[0]
            diag.append(f"{n}: non-finite value at {tuple(bad)}")
            continue
        e = rel_rmse(r, g)
        if backend == "ref64":
            tol = TOL64
        else:
            tol = TOL32_OUT if n in ("o", "ht") else TOL32_GRAD
        if e > worst:
            worst, wname = e, n
        if not e <= tol:
            ok = False
            err = np.abs(g.astype(np.float64) - r)
            idx = np.unravel_index(np.argmax(err), err.shape)
            diag.append(f"{n}: rel_rmse {e:.3e} > {tol:g}; max abs err {err[idx]:.3e} at "
                        f"{tuple(int(i) for i in idx)} (ref {r[idx]:.9g}, got {g[idx]:.9g})")
    return ok, worst, wname, diag


def run_kla(kla, args):
    try:
        p = subprocess.run([kla] + args, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as ex:
        return False, [f"cannot run: {ex}"]
    if p.returncode != 0:
        return False, [f"exit status {p.returncode}: {' '.join(args)}"] + \
            (p.stderr.strip().splitlines() or ["(no stderr)"])
    return True, []


def usable_backends(kla):
    """ref64 and ref, then every other backend `kla info` reports built and usable."""
    out = subprocess.run([kla, "info"], capture_output=True, text=True).stdout
    extra = [ln.split()[0] for ln in out.splitlines()
             if ln.startswith("  ") and "built, usable" in ln]
    return ["ref64", "ref"] + [b for b in extra if b not in ("ref64", "ref")]


def command_tests(kla, tmp, backends):
    for ci, (cname, kw, meta, chunks) in enumerate(CASES):
        rng = np.random.default_rng(1000 + ci)
        inp = make_inputs(rng, do=True, **kw)
        mode = meta["mode"]
        sname = "eta" if mode == "kla" else "beta"

        fin = {n: a for n, a in inp.items() if n in FWD_INPUTS}
        fpath = os.path.join(tmp, f"{cname}.fwd.safetensors")
        bpath = os.path.join(tmp, f"{cname}.bwd.safetensors")
        save(fpath, fin, meta)
        save(bpath, inp, meta)
        ref_f = kla_np.forward(as64(fin), meta)
        ref_b = kla_np.backward(as64(inp), meta)
        f_names = ["o", "ht"]
        b_names = ["o", "ht", "dq", "dk", "dv", "dg", "d" + sname] + \
            (["dh0"] if "h0" in inp else [])

        runs = []  # (command, backend, algo args)
        for backend in backends:
            cs = chunks if backend == "ref64" else chunks[:1]
            algos = [["--algo", "recurrent"]] + \
                [["--algo", "chunk", "--chunk-size", str(c)] for c in cs]
            for cmd in ("forward", "backward"):
                for a in algos:
                    runs.append((cmd, backend, a))
            if backend not in ("ref", "ref64"):
                runs.append(("decode", backend, []))
        runs.append(("decode", "ref64", []))

        for cmd, backend, algo in runs:
            src, ref, names = ((bpath, ref_b, b_names) if cmd == "backward"
                               else (fpath, ref_f, f_names))
            out = os.path.join(tmp, f"{cname}.{cmd}.{backend}.out.safetensors")
            label = " ".join([cname, cmd, backend] +
                             [x for x in algo if x not in ("--algo", "--chunk-size")])
            ok, diag = run_kla(kla, [cmd, "--backend", backend] + algo + [src, "-o", out])
            if not ok:
                tap(False, label, diag)
                continue
            try:
                ok, worst, wname, diag = compare(ref, out, names, backend)
            except Exception as ex:  # unreadable output file
                tap(False, label, [f"cannot read output: {ex!r}"])
                continue
            tap(ok, f"{label} (worst rel_rmse {worst:.1e} {wname})", diag)
            os.unlink(out)


# --------------------------------------------------------------------------- (c) the family

# kla-spec.md section 7: gate head|channel x precond none|atk x mode kla|gdn, and the
# situations that stress them. name, dims, variant flags, metadata
FAMILY = [
    ("kda", dict(B=2, T=40, H=2, HV=4, K=8, V=8, h0=True), dict(chan=True), {"mode": "gdn"}),
    ("kaczmarz_kda", dict(B=1, T=70, H=1, HV=2, K=8, V=6, h0=True), dict(chan=True), {"mode": "kla"}),
    ("pgdn", dict(B=2, T=40, H=2, HV=4, K=8, V=8, h0=True), dict(atk=True), {"mode": "gdn"}),
    ("pdn_g_absent", dict(B=1, T=37, H=1, HV=1, K=8, V=8, g=False), dict(atk=True), {"mode": "gdn"}),
    ("pkda", dict(B=1, T=37, H=2, HV=2, K=8, V=4, h0=True), dict(chan=True, atk=True), {"mode": "gdn"}),
    ("p_kla", dict(B=1, T=70, H=1, HV=2, K=8, V=8, h0=True), dict(atk=True), {"mode": "kla"}),
    ("p_kla_l2qk_squash2", dict(B=1, T=33, H=1, HV=1, K=8, V=8), dict(atk=True),
     {"mode": "kla", "l2norm_q": "true", "l2norm_k": "true", "squash_x": "2", "squash_eps": "1e-3"}),
    ("kaczmarz_pkda", dict(B=1, T=40, H=1, HV=2, K=16, V=8, h0=True), dict(chan=True, atk=True),
     {"mode": "kla", "l2norm_q": "true"}),
    ("pkda_cu_vk", dict(H=1, HV=2, K=8, V=6, cu=[1, 40, 19], h0=True, layout="vk"),
     dict(chan=True, atk=True), {"mode": "gdn", "state_layout": "vk", "l2norm_q": "true", "l2norm_k": "true"}),
    ("kda_decay_m5_T600", dict(B=1, T=600, H=1, HV=1, K=8, V=4), dict(chan=True, gmin=-5.0),
     {"mode": "gdn", "l2norm_q": "true", "l2norm_k": "true"}),
    ("kaczmarz_kda_m20_T300", dict(B=1, T=300, H=1, HV=1, K=8, V=4, h0=True), dict(chan=True, g20=True),
     {"mode": "kla"}),
]


def family_inputs(rng, dims, chan=False, atk=False, gmin=None, g20=False, mode="kla"):
    """make_inputs plus the family's tensors: g per channel (uniform in [gmin, 0], or -20 on
    every third element), and with atk g_atk, beta_atk in [0, 1), log_atk_scale, a0, dat."""
    inp = make_inputs(rng, mode=mode, do=True, dht=True, **dims)
    B, T, H, K = inp["q"].shape
    N = len(inp["cu_seqlens"]) - 1 if "cu_seqlens" in inp else B
    HV = inp["v"].shape[2]
    if "g" in inp and chan:
        g = -rng.uniform(0, -(gmin or -1.0), (B, T, HV, K))
        if g20:
            g.reshape(-1)[1::3] = -20.0
        inp["g"] = g.astype(np.float32)
    if atk:
        inp["g_atk"] = -rng.uniform(0, 1, (B, T, H)).astype(np.float32)
        inp["beta_atk"] = rng.uniform(0, 1, (B, T, H)).astype(np.float32)
        inp["log_atk_scale"] = rng.uniform(-1, 0, H).astype(np.float32)
        inp["a0"] = rng.uniform(0, 2, (N, H, K)).astype(np.float32)
        inp["dat"] = rng.standard_normal((N, H, K)).astype(np.float32)
    return inp


def family_tests(kla, tmp, backends):
    """Every variant through kla forward/backward/decode on ref64 (1e-10) and ref (1e-5
    outputs, 1e-4 gradients), both algorithms, against kla_np; backends that do not run
    the family must refuse it with a message naming the variant."""
    fwd_in = FWD_INPUTS + ("g_atk", "beta_atk", "log_atk_scale", "a0")
    for ci, (cname, dims, var, meta) in enumerate(FAMILY):
        inp = family_inputs(np.random.default_rng(5000 + ci), dims, mode=meta["mode"], **var)
        fin = {n: a for n, a in inp.items() if n in fwd_in}
        fpath, bpath = (os.path.join(tmp, f"{cname}.{x}.safetensors") for x in ("fwd", "bwd"))
        save(fpath, fin, meta)
        save(bpath, inp, meta)
        ref_f = kla_np.forward(as64(fin), meta)
        ref_b = kla_np.backward(as64(inp), meta)
        f_names = sorted(ref_f)
        b_names = sorted(ref_b)
        for backend in ("ref64", "ref"):
            for cmd, algo in [("forward", ["--algo", "recurrent"]), ("forward", ["--algo", "chunk", "--chunk-size", "16"]),
                              ("forward", ["--algo", "chunk", "--chunk-size", "64"]),
                              ("backward", ["--algo", "recurrent"]), ("backward", ["--algo", "chunk", "--chunk-size", "16"]),
                              ("backward", ["--algo", "chunk", "--chunk-size", "64"]), ("decode", [])]:
                if backend == "ref" and algo[-1:] == ["64"]:
                    continue
                src, ref, names = (bpath, ref_b, b_names) if cmd == "backward" else (fpath, ref_f, f_names)
                out = os.path.join(tmp, f"{cname}.out.safetensors")
                label = " ".join(["family", cname, cmd, backend] + [x for x in algo if not x.startswith("--")])
                ok, diag = run_kla(kla, [cmd, "--backend", backend] + algo + [src, "-o", out])
                if not ok:
                    tap(False, label, diag)
                    continue
                ok, worst, wname, diag = compare(ref, out, names, backend)
                tap(ok, f"{label} (worst rel_rmse {worst:.1e} {wname})", diag)
        # the other backends: refused by name, nothing written
        for backend in [b for b in backends if b not in ("ref", "ref64")]:
            out = os.path.join(tmp, f"{cname}.{backend}.safetensors")
            p = subprocess.run([kla, "forward", "--backend", backend, fpath, "-o", out],
                               capture_output=True, text=True)
            want = "gate channel" if var.get("chan") else "precond atk"
            ok = p.returncode == 1 and want in p.stderr and "does not run" in p.stderr and not os.path.exists(out)
            tap(ok, f"family {cname}: backend {backend} refuses it ({p.stderr.strip()[-90:]})",
                [] if ok else [f"exit {p.returncode}", p.stderr])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kla", help="path to the kla command (omit: oracle self-checks only)")
    ap.add_argument("--backends", help="comma-separated (default: ref64, ref and every other "
                    "backend `kla info` reports usable, e.g. simd, vulkan)")
    args = ap.parse_args()
    t0 = time.time()
    self_checks()
    if args.kla:
        tmp = tempfile.mkdtemp(prefix="kla-indep-")
        try:
            kla = os.path.abspath(args.kla)
            backends = args.backends.split(",") if args.backends else usable_backends(kla)
            print(f"# backends: {' '.join(backends)}")
            command_tests(kla, tmp, backends)
            family_tests(kla, tmp, backends)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"# {tap.n - tap.failed}/{tap.n} passed in {time.time() - t0:.1f} s")
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
