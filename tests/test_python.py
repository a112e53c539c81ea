#!/usr/bin/python3
"""Tests of the Python package python/kla (TAP). Needs numpy only; the ctypes part needs
libkla (--lib), the comparison with `kla verify` the kla command (--kla).

    /usr/bin/python3 tests/test_python.py --kla build/kla --lib build/libkla.so [--src .]
"""

import argparse
import ctypes
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tap import Tap  # noqa: E402


tap = Tap()


class Wrapped:
    """Anything with __array__ (as a torch CPU tensor is)."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a if dtype is None else self.a.astype(dtype)


def same_tensors(a, b):
    return set(a) == set(b) and all(a[n].dtype == b[n].dtype and a[n].shape == b[n].shape
                                    and np.array_equal(a[n], b[n]) for n in a)


def check_ops(kla, c):
    """The 0.2 ABI through ctypes: keyword-only arguments, scale, sizes, names."""
    i = c.inputs
    try:
        kla.forward(i["q"], i["k"], i["v"], i["g"], i["eta"])
        tap(False, "kla.forward(q, k, v, g, eta) positionally is refused")
    except TypeError as ex:
        tap(True, f"kla.forward(q, k, v, g, eta) positionally is refused ({ex})")
    opts = dict(c.options)
    K = i["q"].shape[-1]
    base = kla.forward(**i, **dict(opts, scale=None))
    expl = kla.forward(**i, **dict(opts, scale=1 / math.sqrt(K)))  # as libkla computes it
    zero = kla.forward(**i, **dict(opts, scale=0.0))
    tap(np.array_equal(base["o"], expl["o"]) and not np.any(zero["o"])
        and np.array_equal(zero["ht"], base["ht"]),
        "scale None = K^-1/2 (NaN to libkla); scale 0 is a literal 0 (o = 0, ht unchanged)")
    bad = dict(i)
    bad["k"] = i["k"][:, :, :1]
    try:
        kla.forward(**bad, **opts)
        tap(False, "a k of the wrong shape is refused, naming k")
    except ValueError as ex:
        tap("tensor k" in str(ex) and "[2, 100, 2, 32]" in str(ex),
            f"a k of the wrong shape is refused, naming k ({ex})")
    bad = dict(i)
    bad["h0"] = i["h0"][:1]
    try:
        kla.forward(**bad, **opts)
        tap(False, "an h0 of the wrong shape is refused, naming h0")
    except ValueError as ex:
        tap("tensor h0" in str(ex), f"an h0 of the wrong shape is refused ({ex})")
    # the library's own size check (numel), past the Python one
    lib = kla.library()
    ops = kla.ops
    q = np.zeros((1, 50, 1, 16), np.float32)
    v = np.zeros((1, 50, 1, 8), np.float32)
    eta = np.ones((1, 50, 1), np.float32)
    o = np.zeros((1, 50, 1, 8), np.float32)
    t = ops._Tensors()
    t.q = ops._In(q.ctypes.data, ops.F32, q.size)
    t.k = ops._In(q.ctypes.data, ops.F32, q.size // 2)
    t.v = ops._In(v.ctypes.data, ops.F32, v.size)
    t.eta = ops._In(eta.ctypes.data, ops.F32, eta.size)
    t.o = ops._Out(o.ctypes.data, ops.F32, o.size)
    opt = ops._Options()
    lib.kla_default_options(ctypes.byref(opt))
    _, ent = ops._context("ref", 0)
    r = lib.kla_forward(ent[0], ctypes.byref(ops._Shape(1, 50, 1, 1, 16, 8, 1)),
                        ctypes.byref(opt), ctypes.byref(t))
    msg = lib.kla_error_detail(ent[0]).decode()
    tap(r == -22 and "tensor k" in msg and "800 elements" in msg,
        f"_In carries numel: libkla refuses a short k ({msg})")
    tap(isinstance(kla.describe("ref"), str) and kla.last_algo() in ("recurrent", "chunk"),
        f"kla.describe('ref') = {kla.describe('ref')!r}, kla.last_algo() = {kla.last_algo()!r}")


FAMILY = ("at", "dg_atk", "dbeta_atk", "dlog_atk_scale", "da0")


def maxrel(a, b):
    """max |a - b| / max(1, max |b|); inf on a shape mismatch."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf
    if b.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


def check_golden_all(kla):
    """Every operator case through kla.backward(**c.inputs, **c.options) (ref64) and
    kla.forward: the outputs are exactly the case's expected tensors (the family's at,
    dg_atk, dbeta_atk, dlog_atk_scale, da0 included) and equal them."""
    bad, n, nfam = [], 0, 0
    for name in kla.golden_cases():
        c = kla.load_case(name)
        n += 1
        try:
            out = kla.backward(**c.inputs, **c.options)
            fwd = kla.forward(**c.inputs, **c.options)
        except Exception as ex:  # noqa: BLE001
            bad.append("%s: %s: %s" % (name, type(ex).__name__, ex))
            continue
        atk = c.options.get("precond") == "atk"
        nfam += atk or c.options.get("gate") == "channel"
        # an output the generator dropped (MANIFEST "dropped": rounding noise around an
        # exact 0) is still computed; it is not in the file
        dropped = set(c.manifest.get("dropped", {}))
        if set(out) - dropped != set(c.expected) or not dropped <= set(out):
            bad.append("%s: backward gave %s, the case has %s (dropped: %s)"
                       % (name, sorted(out), sorted(c.expected), sorted(dropped)))
        if atk and not set(FAMILY) <= set(c.expected) | dropped:
            bad.append("%s: precond atk without the family outputs in the case" % name)
        for t in sorted(dropped & set(out)):
            if not float(np.max(np.abs(out[t]))) < 1e-8:
                bad.append("%s: dropped %s is not ~0: %s" % (name, t, out[t]))
        want_f = {"o", "ht"} | ({"at"} if atk else set())
        if set(fwd) != want_f:
            bad.append("%s: forward gave %s, expected %s" % (name, sorted(fwd), sorted(want_f)))
        for t in sorted(c.expected):
            e = maxrel(out.get(t, np.zeros(0)), c.expected[t])
            if not e <= 1e-12:
                bad.append("%s: backward %s off by %.1e" % (name, t, e))
        for t in sorted(want_f & set(fwd)):
            e = maxrel(fwd[t], c.expected[t])
            if not e <= 1e-12:
                bad.append("%s: forward %s off by %.1e" % (name, t, e))
        g = c.inputs.get("g")
        if g is not None and out["dg"].shape != g.shape:
            bad.append("%s: dg %s, g %s" % (name, out["dg"].shape, g.shape))
    tap(not bad and n == 42 and nfam == 18,
        "all %d operator cases (%d of the family): kla.backward(**c.inputs, **c.options) and "
        "kla.forward equal the expected tensors (at, dg_atk, dbeta_atk, dlog_atk_scale, da0 "
        "too), dg with g's shape" % (n, nfam), bad[:20])


# the notes' worked examples (notes/delta-family.md 1.8, 2.6), independent of the golden
# files' expected tensors; tolerances cover the inputs' float32 rounding (ln 0.5, 1/e are
# stored as F32: about 4e-8) and the spec's l2norm eps (about 1e-7, notes 2.6)
WORKED = {
    "kda_B1_T2_H1_HV1_K2_V1_ex18": (2e-7, {
        "o": [1, 2.75], "ht": [2.5, 0.25], "dq": [1, 1, 2.5, 0.25], "dk": [1.15, 0.75, 2.4, 5.7],
        "dv": [0.95, 1.2], "dg": [0, 0, 0.15, 0.75], "dbeta": [3.8, 3.75]}),
    "kkda_B1_T2_H1_HV1_K2_V1_ex18": (2e-7, {
        "o": [1, 2.75], "dk": [-0.75, -1.15, -3.6, 5.7], "deta": [1.9, 3.75],
        "dg": [0, 0, 0.15, 0.75]}),
    "pgdn_B1_T2_H1_HV1_K2_V1_ex2": (2e-7, {
        "o": [3, 0.952], "ht": [1.56, 0.02], "at": [1 / math.e, math.e]}),
    "pkla_B1_T2_H1_HV1_K2_V1_ex2k": (2e-7, {
        "o": [3, 1], "ht": [21 / 13, 1 / 26], "at": [1 / math.e, math.e],
        # do = 0, dht = (1, 0): docs/algorithm.md 13.3 (MANIFEST's "what")
        "dg": [0, 6 / 13], "deta": [6 / 13, 3 / 26], "dg_atk": [0.012304388, 0]}),
    "pgdn_B1_T2_H1_HV1_K2_V1_h0_l2qk_ex3": (1e-6, {
        "o": [0.385617550675, 0.212627964402], "ht": [0.090091265202, 0.85257119216],
        "at": [0.474, 0.894], "dg": [-0.047481887072, 0.193136663983],
        "dbeta": [0.894623002471, -1.115369891454],
        "dg_atk": [-0.030793099212, 0.033414551614],
        "dbeta_atk": [-0.104298146511, 0.097844458125],
        "dh0": [0.026281590503, 0.250550230612], "da0": [-0.099334699101, -0.019853789642],
        "dlog_atk_scale": [-0.005117757389]}),
    "pkda_B1_T2_H1_HV1_K2_V1_h0_l2qk_ex4": (1e-6, {
        "o": [0.402490284856, 0.231774921639], "ht": [0.102668390857, 0.9382734386],
        "at": [0.474, 0.894],
        "dg": [0.004802539525, -0.031341024015, 0.206514630978, -0.036318757205],
        "dbeta": [0.840721981188, -1.044655422726],
        "dg_atk": [-0.03037622896, 0.031296068514],
        "dbeta_atk": [-0.10239436072, 0.091641117935],
        "dlog_atk_scale": [-0.000903518313]}),
    "pkla_B1_T2_H1_HV1_K2_V1_h0_l2q_ex6": (1e-6, {
        "o": [0.11049722673, 0.030217815194], "ht": [0.081584927487, 0.258726976901],
        "deta": [0.362163119469, -0.375866997391],
        "dg_atk": [0.000116727382, 0.002438705412],
        "dbeta_atk": [-0.002459026310, 0.000238930350],
        "dlog_atk_scale": [0.000897758312]}),
}


def check_family(kla):
    """The family through kla.backward: the notes' worked numbers, gate/precond inferred
    or given, shape checks naming the tensor and the shape, the library's refusals."""
    for name, (tol, want) in WORKED.items():
        c = kla.load_case(name)
        out = kla.backward(**c.inputs, **c.options)
        errs = {t: float(np.max(np.abs(out[t].ravel() - np.array(v, np.float64))))
                if out[t].size == len(v) else math.inf for t, v in want.items()}
        worst = max(errs.values())
        tap(worst <= tol, "%s: kla.backward reproduces the notes' numbers for %s (max err "
            "%.1e)" % (name, ", ".join(want), worst),
            [] if worst <= tol else ["%s %.2e" % kv for kv in errs.items()])

    c = kla.load_case("pkda_B1_T100_H2_HV2_K16_V8_varlen_h0_vk_l2qk")
    i, o = c.inputs, c.options
    base = kla.backward(**i, **o)
    # options inferred: no gate, no precond, no squash (the case's squash is the default)
    inf = {n: v for n, v in o.items() if n not in ("gate", "precond", "squash_x", "squash_eps")}
    out = kla.backward(**i, **inf)
    tap(all(np.array_equal(out[n], base[n]) for n in base) and set(out) == set(base),
        "gate and precond inferred (g 4-dim: channel; beta_atk given: atk) = given")
    # dat matters (golden has it), and forward ignores it as it ignores do and dht
    nodat = kla.backward(**{n: v for n, v in i.items() if n != "dat"}, **o)
    f1 = kla.forward(**i, **o)
    tap(not np.array_equal(nodat["da0"], base["da0"]) and np.array_equal(nodat["o"], base["o"])
        and np.array_equal(f1["at"], base["at"]),
        "dat seeds the ATK gradients in backward; kla.forward ignores dat (as do, dht)")
    # a0 and log_atk_scale absent: da0 and dlog_atk_scale still returned (at their defaults)
    lean = {n: v for n, v in i.items() if n not in ("a0", "log_atk_scale", "g_atk")}
    out = kla.backward(**lean, **o)
    ok = all(n in out for n in FAMILY) and out["da0"].shape == i["a0"].shape and \
        out["dlog_atk_scale"].shape == (2,) and out["dg_atk"].shape == (1, 100, 2)
    tap(ok, "precond atk without a0, log_atk_scale, g_atk: at, dg_atk, dbeta_atk, "
        "dlog_atk_scale, da0 all returned (as kla_np and the golden cases)")

    def err(label, fn, exc, want):
        try:
            fn()
            tap(False, "refused: %s" % label)
        except exc as ex:
            ok = all(w in str(ex) for w in want)
            tap(ok, "refused (%s): %s: %s" % (exc.__name__, label, ex))
        except Exception as ex:  # noqa: BLE001
            tap(False, "refused: %s: %s %s" % (label, type(ex).__name__, ex))

    def mod(**kw):
        d = dict(i)
        for n, v in kw.items():
            if v is None:
                d.pop(n, None)
            else:
                d[n] = v
        return d
    g3 = i["g"][..., 0]
    err("g [B, T, HV] with gate='channel'",
        lambda: kla.backward(**mod(g=g3), **dict(o, gate="channel")), ValueError,
        ["tensor g", "[1, 100, 2]", "[B, T, HV, K] = [1, 100, 2, 16]"])
    err("g [B, T, HV, K] with gate='head'",
        lambda: kla.backward(**i, **dict(o, gate="head")), ValueError,
        ["tensor g", "[1, 100, 2, 16]", "[B, T, HV] = [1, 100, 2]"])
    err("g_atk with HV heads", lambda: kla.forward(**mod(g_atk=np.zeros((1, 100, 4),
                                                                       np.float32)), **o),
        ValueError, ["tensor g_atk", "[1, 100, 4]", "[B, T, H]", "[1, 100, 2]"])
    err("beta_atk [B, T]", lambda: kla.forward(**mod(beta_atk=i["beta_atk"][..., 0]), **o),
        ValueError, ["tensor beta_atk", "[1, 100]", "[1, 100, 2]"])
    err("log_atk_scale [HV + 1]", lambda: kla.forward(**mod(log_atk_scale=np.zeros(3)), **o),
        ValueError, ["tensor log_atk_scale", "[3]", "[H]", "[2]"])
    err("a0 with B rows instead of N", lambda: kla.forward(**mod(a0=i["a0"][:1]), **o),
        ValueError, ["tensor a0", "[N, H, K]", "[3, 2, 16]"])
    err("dat [H, K]", lambda: kla.backward(**mod(dat=i["dat"][0]), **o), ValueError,
        ["tensor dat", "[N, H, K]"])
    err("precond 'none' with ATK tensors",
        lambda: kla.forward(**i, **dict(o, precond="none")), ValueError,
        ["tensor g_atk", "precond 'none'"])
    err("g_atk without beta_atk (precond inferred)",
        lambda: kla.forward(**mod(beta_atk=None), **inf), ValueError,
        ["tensor g_atk", "without beta_atk"])
    err("precond 'atk' without beta_atk",
        lambda: kla.forward(**mod(beta_atk=None), **dict(o, precond="atk")), ValueError,
        ["precond 'atk'", "beta_atk"])
    err("gate 'diag'", lambda: kla.forward(**i, **dict(o, gate="diag")), ValueError,
        ["gate 'diag'"])
    err("squash_x 1 (the library's check)",
        lambda: kla.forward(**i, **dict(o, squash_x=1.0)), kla.KlaError, ["squash_x"])
    err("g_atk > 0 (the library's check)",
        lambda: kla.forward(**mod(g_atk=np.abs(i["g_atk"]) + 0.5), **o), kla.KlaError,
        ["g_atk"])
    lib = kla.library()
    lib.kla_backend_available.argtypes = [ctypes.c_char_p]
    lib.kla_backend_available.restype = ctypes.c_int
    if lib.kla_backend_available(b"simd") != 1:
        tap.skip("backend simd refuses the family", "simd not usable here")
    else:
        try:
            kla.forward(**i, **o, backend="simd", threads=1)
            tap(False, "backend simd refuses the family (KlaError)")
        except kla.KlaError as ex:
            tap(ex.code == -38 and "simd" in str(ex),
                "backend simd refuses the family: KlaError %d (%s)" % (ex.code, ex))
    # the float32 reference runs it and passes the case's float32 tolerances
    out = kla.backward(**i, **o, backend="ref")
    rep = kla.compare(out, c, file=None)
    tap(rep.ok and out["at"].dtype == np.float32 and rep.passed == len(c.expected),
        "backend ref (float32) on %s: %d tensors pass (at, dg_atk, ... included)"
        % (c.name, rep.passed), [] if rep.ok else rep.lines)


def check_verify_family(kla, kla_cmd, tmp):
    """kla.compare prints what `kla verify` prints for the family's tensors: index names
    (g/dg [b, t, hv, k], g_atk-like [b, t, h], a0-like [n, h, k], dlog_atk_scale [h]),
    the per-head breakdown and the first token over tol."""
    name = "pkda_B1_T100_H2_HV2_K16_V8_varlen_h0_vk_l2qk"
    c = kla.load_case(name)
    cand = os.path.join(tmp, "fam_pass.safetensors")
    r = subprocess.run([kla_cmd, "backward", "--backend", "ref", c.path, "-o", cand],
                       capture_output=True, text=True)
    if r.returncode:
        tap(False, "kla backward on " + name, [r.stdout, r.stderr])
        return
    tensors, meta = kla.load(cand)
    have = set(tensors)
    bad = {n: v.copy() for n, v in tensors.items()}
    bad["dg"][0, 57, 1, 9] += 0.5
    bad["dg_atk"][0, 12, 1] += 1.0
    bad["dbeta_atk"][0, 3, 0] = np.inf
    bad["at"][2, 1, 5] += 0.25
    bad["da0"][1, 0, 3] = np.nan
    bad["dlog_atk_scale"][1] += 1.0
    badp = os.path.join(tmp, "fam_fail.safetensors")
    kla.save(badp, bad, meta)
    swap = {n: v.copy() for n, v in tensors.items()}  # heads swapped: the breakdowns
    swap["dg"] = swap["dg"][:, :, [1, 0]]
    swap["dg_atk"] = swap["dg_atk"][:, :, [1, 0]]
    swap["at"] = swap["at"][:, [1, 0]]
    swap["da0"] = swap["da0"][:, [1, 0]]
    swap["dlog_atk_scale"] = swap["dlog_atk_scale"][[1, 0]]
    swapp = os.path.join(tmp, "fam_swap.safetensors")
    kla.save(swapp, swap, meta)
    for label, path, want_ok, extra in (
            ("passing", cand, True, []), ("failing", badp, False, []),
            ("heads swapped: by head, first token", swapp, False, []),
            ("--tensors at,dg,dlog_atk_scale,da0", badp, False,
             ["--tensors", "at,dg,dlog_atk_scale,da0"]),
            ("--tol bf16, heads swapped", swapp, False, ["--tol", "bf16"])):
        r = subprocess.run([kla_cmd, "verify", path, "--against", c.path] + extra,
                           capture_output=True, text=True)
        buf = io.StringIO()
        kw = {}
        if extra and extra[0] == "--tensors":
            kw["tensors"] = extra[1]
        if extra and extra[0] == "--tol":
            kw["tol"] = extra[1]
        rep = kla.compare(path, c, file=buf, **kw)
        same = buf.getvalue() == r.stdout
        ok = same and rep.ok == want_ok and (r.returncode == 0) == want_ok
        tap(ok, f"compare matches kla verify on {name} ({label}: "
            f"{'PASS' if rep.ok else 'FAIL'})",
            [] if ok else ["kla verify:", r.stdout, "kla.compare:", buf.getvalue()])
    out = buf.getvalue()
    rep = kla.compare(badp, c, file=None)
    where = {t["name"]: t["where"] for t in rep.tensors}
    ok = (set(FAMILY) <= have and where.get("dg", "").startswith("dg[b=0, t=57, hv=1, k=9]")
          and where.get("dg_atk") == "dg_atk[b=0, t=12, h=1]"
          and where.get("at") == "at[n=2, h=1, k=5]"
          and where.get("dlog_atk_scale") == "dlog_atk_scale[h=1]"
          and "da0[n=1, h=0, k=3]" in "\n".join(rep.lines)
          and "dbeta_atk[b=0, t=3, h=0]" in "\n".join(rep.lines)
          and "by head:" in out and "first token over tol: dg[" in out)
    tap(ok, "the family's index names: dg[b, t, hv, k], dg_atk/dbeta_atk[b, t, h], "
        "at/da0[n, h, k], dlog_atk_scale[h]; per-head breakdowns",
        [] if ok else rep.lines + [out])


def check_contexts(kla, c):
    """One context per (backend, threads) and thread, reused; a thread's closed at its
    end; everything closed at exit."""
    import gc
    import threading
    ops = kla.ops
    kla.forward(**c.inputs, **c.options, backend="ref")
    p1 = ops._table().ctx[("ref", 0)][0].value
    kla.forward(**c.inputs, **c.options, backend="ref")
    kla.backward(**c.inputs, **c.options, backend="ref")
    p2 = ops._table().ctx[("ref", 0)][0].value
    kla.forward(**c.inputs, **c.options, backend="ref", threads=1)
    keys = set(ops._table().ctx)
    tap(p1 == p2 and p1 and {("ref", 0), ("ref", 1)} <= keys,
        "contexts cached per (backend, threads): the same ref context for 3 calls "
        f"({len(keys)} open in this thread)")
    seen = {}

    def work():
        kla.forward(**c.inputs, **c.options, backend="ref")
        seen["ptr"] = ops._table().ctx[("ref", 0)][0].value
        seen["tables"] = len(ops._registry)
    th = threading.Thread(target=work)
    th.start()
    th.join()
    gc.collect()
    tap(seen.get("ptr") not in (None, p1) and seen["tables"] == len(ops._registry) + 1,
        "another thread gets its own context, closed when the thread ends")
    code = ("import sys, threading; sys.path.insert(0, %r); import kla, numpy as np\n"
            "c = kla.load_case(%r)\n"
            "kla.forward(**c.inputs, **c.options, backend='ref')\n"
            "t = threading.Thread(target=lambda: kla.forward(**c.inputs, **c.options), "
            "daemon=True); t.start(); t.join()\n"
            "print('done')" % (os.path.dirname(os.path.dirname(kla.__file__)), c.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    ok = r.returncode == 0 and r.stdout.strip() == "done" and not r.stderr
    tap(ok, "contexts closed at exit (atexit) without error", [] if ok else [r.stdout, r.stderr])


def check_load(kla, tmp):
    """kla.load refuses what libkla refuses (the full comparison: test_load_strict.py)."""
    p = os.path.join(tmp, "x.safetensors")
    kla.save(p, {"a": np.arange(3, dtype=np.float32)}, {"mode": "kla"})
    with open(p, "rb") as f:
        good = f.read()
    n = int.from_bytes(good[:8], "little")
    h, data = good[8:8 + n].rstrip(b" "), good[8 + n:]
    edits = {
        "a duplicate name": h.replace(b'{"a"', b'{"a":{"dtype":"F32","shape":[0],'
                                      b'"data_offsets":[0,0]},"a"'),
        "an overlong UTF-8 form in a name": h.replace(b'"a"', b'"a\xe0\x80\x80"'),
        "trailing garbage after the header": h + b"x",
        "NaN in an unknown key": h.replace(b'"dtype"', b'"x":NaN,"dtype"'),
    }
    bad = []
    for name, hdr in edits.items():
        with open(p, "wb") as f:
            f.write(len(hdr).to_bytes(8, "little") + hdr + data)
        try:
            kla.load(p)
            bad.append(name + ": accepted")
        except ValueError as ex:
            if not str(ex).startswith(p + ": "):
                bad.append(name + ": message without the path: " + str(ex))
    tap(not bad, "kla.load refuses %s (messages start with the path)" % ", ".join(edits), bad)


def check_no_torch(src):
    """import kla works without torch; import kla.torch says what is missing."""
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, %r)\n"
            "import kla; print('kla ok')\n"
            "try:\n    import kla.torch\nexcept ImportError as ex:\n    print(ex)\n"
            % os.path.join(src, "python"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    ok = r.returncode == 0 and r.stdout.startswith("kla ok") and "PyTorch" in r.stdout
    tap(ok, "without torch: import kla works, import kla.torch raises ImportError naming "
        "PyTorch", [] if ok else [r.stdout, r.stderr])


def check_install(kla, src, tmp, lib, gdir, case):
    """pip install --target into a temporary folder; run from outside the repository:
    without hints the errors name KLA_LIB and KLA_GOLDEN; pkg-config's libdir and
    goldendir are found; KLA_LIB and KLA_GOLDEN work."""
    pipsrc = os.path.join(tmp, "pysrc")
    shutil.copytree(os.path.join(src, "python"), pipsrc,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = os.path.join(tmp, "site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                        "--no-deps", "--no-index", "--target", target, pipsrc],
                       capture_output=True, text=True)
    if r.returncode and "No module named pip" in r.stderr:
        tap.skip("pip install ./python", "no pip")
        return
    tap(r.returncode == 0 and os.path.isfile(os.path.join(target, "kla", "torch.py")),
        "pip install --no-build-isolation --no-deps --no-index --target TMP ./python",
        [] if r.returncode == 0 else [r.stdout[-1500:], r.stderr[-1500:]])
    if r.returncode:
        return
    cwd = os.path.join(tmp, "elsewhere")
    empty = os.path.join(tmp, "empty-pc")
    os.makedirs(cwd)
    os.makedirs(empty)
    base = {k: v for k, v in os.environ.items()
            if k not in ("KLA_LIB", "KLA_GOLDEN", "LD_LIBRARY_PATH", "PKG_CONFIG_PATH",
                         "PKG_CONFIG_LIBDIR", "PYTHONPATH")}
    base.update(PYTHONPATH=target, PKG_CONFIG_PATH=empty, PKG_CONFIG_LIBDIR=empty)

    def run(code, **env):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=cwd, env=dict(base, **env))

    probe = ("import kla, sys\nprint(kla.__file__)\n"
             "try:\n    print('LIB', kla.ops.library_path())\n"
             "except OSError as ex:\n    print('LIBERR', ex)\n"
             "try:\n    print('GOLDEN', kla.golden_dir())\n"
             "except OSError as ex:\n    print('GOLDENERR', ex)\n")
    r = run(probe)
    out = r.stdout
    lines = dict(ln.split(" ", 1) for ln in out.splitlines()[1:] if " " in ln)
    if "LIB" in lines:
        tap.skip("no hints: error names KLA_LIB", "a libkla is installed: " + lines["LIB"])
    else:
        ok = (r.returncode == 0 and out.startswith(target) and "KLA_LIB" in lines.get("LIBERR", "")
              and "pkg-config" in out and "find_library" in out)
        tap(ok, "installed, run elsewhere, no KLA_LIB, no pkg-config hit: OSError naming "
            "KLA_LIB and where it looked", [out, r.stderr])
    if "GOLDEN" in lines:
        tap.skip("no hints: error names KLA_GOLDEN", "golden set installed: " + lines["GOLDEN"])
    else:
        ok = "KLA_GOLDEN" in lines.get("GOLDENERR", "") and "goldendir" in out
        tap(ok, "... and golden_dir() raises FileNotFoundError naming KLA_GOLDEN and where it "
            "looked", [out, r.stderr])
    if not lib:
        tap.skip("installed package with KLA_LIB / pkg-config", "no libkla (--no-lib)")
        return
    libp = os.path.abspath(lib)
    pcdir = os.path.join(tmp, "pc")
    os.makedirs(pcdir)
    with open(os.path.join(pcdir, "kla.pc"), "w") as f:
        f.write("prefix=%s\nlibdir=%s\ngoldendir=%s\n\nName: kla\nDescription: test\n"
                "Version: 0.2.0\nLibs: -L${libdir} -lkla\n"
                % (tmp, os.path.dirname(libp), gdir))
    r = run(probe, PKG_CONFIG_PATH=pcdir)
    if shutil.which("pkg-config"):
        want_lib = os.path.join(os.path.dirname(libp), "libkla.so")
        ok = ("LIB " + want_lib) in r.stdout and ("GOLDEN " + gdir) in r.stdout
        tap(ok, "pkg-config --variable=libdir / goldendir kla: the library and the golden "
            "set are found", [] if ok else [r.stdout, r.stderr])
    else:
        tap.skip("pkg-config libdir / goldendir", "no pkg-config command")
    code = ("import kla, numpy as np\nc = kla.load_case(%r)\n"
            "out = kla.backward(**c.inputs, **c.options, backend='ref')\n"
            "rep = kla.compare(out, c, file=None)\nprint(rep.ok, len(kla.golden_cases()), "
            "kla.ops.library_path())" % case.name)
    r = run(code, KLA_LIB=libp, KLA_GOLDEN=gdir)
    ok = r.returncode == 0 and r.stdout.split()[:2] == ["True", str(len(kla.golden_cases()))]
    tap(ok, "installed, run elsewhere with KLA_LIB and KLA_GOLDEN: backward on a case passes",
        [] if ok else [r.stdout, r.stderr])
    r = run(probe, KLA_LIB=os.path.join(tmp, "nope.so"))
    ok = "KLA_LIB=" in r.stdout and "no such file" in r.stdout
    tap(ok, "KLA_LIB naming a missing file: the error says so", [] if ok else [r.stdout,
                                                                               r.stderr])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kla", required=True)
    ap.add_argument("--lib")
    ap.add_argument("--no-lib", action="store_true", help="skip the ctypes part")
    ap.add_argument("--src", default=os.path.join(HERE, ".."))
    a = ap.parse_args()
    src = os.path.abspath(a.src)
    kla_cmd = os.path.abspath(a.kla)
    gdir = os.path.join(src, "golden")
    os.environ["KLA_GOLDEN"] = gdir
    if a.lib:
        os.environ["KLA_LIB"] = os.path.abspath(a.lib)
    sys.path.insert(0, os.path.join(src, "python"))
    import kla

    tmp = tempfile.mkdtemp(prefix="kla-py-")
    try:
        names = kla.golden_cases()
        tap(len(names) >= 20 and "kla_B1_T2_H1_HV1_K2_V1_spec6" in names,
            f"golden_cases lists {len(names)} cases")
        main_case = "kla_B2_T100_H2_HV4_K32_V16_h0"
        c = kla.load_case(main_case)
        ok = (c.name == main_case and set(c.inputs) == {"q", "k", "v", "g", "eta", "h0", "do", "dht"}
              and set(c.expected) == {"o", "ht", "dq", "dk", "dv", "dg", "deta", "dh0"}
              and c.inputs["q"].dtype == np.float32 and c.expected["o"].dtype == np.float64
              and c.options["mode"] == "kla" and c.tolerances["float32"]["o"] == 1e-5
              and c.manifest.get("sha256"))
        tap(bool(ok), "load_case: inputs F32, expected F64, options, tolerances, manifest")

        # round trip: load, save, load
        t1, m1 = kla.load(c.path)
        p = os.path.join(tmp, "rt.safetensors")
        kla.save(p, t1, m1)
        t2, m2 = kla.load(p)
        tap(same_tensors(t1, t2) and m1 == m2, "round trip load -> save -> load is identical")
        # and the C reader takes the Python file: verify it against the original
        r = subprocess.run([kla_cmd, "verify", p, "--against", c.path, "--tol", "0"],
                           capture_output=True, text=True)
        tap(r.returncode == 0, "kla verify reads the re-saved file (tol 0)",
            [] if r.returncode == 0 else [r.stdout, r.stderr])

        # compare vs kla verify: a passing candidate (our float32 ref) and a failing one
        cand = os.path.join(tmp, "pass.safetensors")
        r = subprocess.run([kla_cmd, "backward", "--backend", "ref", c.path, "-o", cand],
                           capture_output=True, text=True)
        tensors, meta = kla.load(cand)
        bad = {n: v.copy() for n, v in tensors.items()}
        bad["dq"][1, 42, 1, 7] += 0.5  # a gross error in one element
        bad["o"][0, 3, 2, 1] = np.nan
        badp = os.path.join(tmp, "fail.safetensors")
        kla.save(badp, bad, meta)
        swap = {n: v.copy() for n, v in tensors.items()}  # value heads 1 and 2 swapped
        swap["o"] = swap["o"][:, :, [0, 2, 1, 3]]
        swap["ht"] = swap["ht"][:, [0, 2, 1, 3]]
        swapp = os.path.join(tmp, "swap.safetensors")
        kla.save(swapp, swap, meta)
        for label, path, want_ok, extra in (
                ("passing", cand, True, []), ("failing", badp, False, []),
                ("failing, heads swapped: by head, first token", swapp, False, []),
                ("failing, --tensors dq,o", badp, False, ["--tensors", "dq,o"]),
                ("failing, --tol bf16", badp, False, ["--tol", "bf16"])):
            r = subprocess.run([kla_cmd, "verify", path, "--against", c.path] + extra,
                               capture_output=True, text=True)
            buf = io.StringIO()
            kw = {}
            if extra and extra[0] == "--tensors":
                kw["tensors"] = extra[1]
            if extra and extra[0] == "--tol":
                kw["tol"] = extra[1]
            rep = kla.compare(path, main_case, file=buf, **kw)
            same = buf.getvalue() == r.stdout
            ok = same and rep.ok == want_ok and (r.returncode == 0) == want_ok
            tap(ok, f"compare matches kla verify ({label}: {'PASS' if rep.ok else 'FAIL'})",
                [] if ok else ["kla verify:", r.stdout, "kla.compare:", buf.getvalue()])
        # compare on in-memory arrays (wrapped) gives the same report as on the file
        rep = kla.compare({n: Wrapped(v) for n, v in bad.items()}, c, file=None)
        rep2 = kla.compare(badp, c, file=None)
        tap(rep.lines == rep2.lines and not rep.ok
            and [t["name"] for t in rep.tensors if not t["pass"]] == ["o", "dq"]
            and rep.tensors[2]["max_at"] == (1, 42, 1, 7),
            "compare: dict of __array__ objects, structured report (tensor, index)")

        # ctypes
        have_lib = False
        if a.no_lib:
            tap.skip("kla.forward/backward", "--no-lib (sanitizer build)")
        else:
            try:
                kla.library()
                have_lib = True
            except OSError as ex:
                tap(False, f"libkla found ({ex})")
        if have_lib:
            out = kla.backward(**c.inputs, **c.options)  # ref64
            worst = max(float(np.max(np.abs(out[n] - c.expected[n]))) for n in c.expected)
            tap(set(out) == set(c.expected) and out["o"].dtype == np.float64 and worst < 1e-12,
                f"kla.backward (ctypes, ref64) equals the case's expected (max diff {worst:.1e})")
            w = {n: Wrapped(v) for n, v in c.inputs.items() if n not in ("do", "dht")}
            f = kla.forward(**w, **c.options, backend="ref", algo="chunk")
            rep = kla.compare(f, c, tensors="o,ht", file=None)
            tap(rep.ok and f["o"].dtype == np.float32,
                "kla.forward on __array__ objects, backend ref chunk: o, ht pass",
                [] if rep.ok else rep.lines)
            v = kla.load_case("gdn_B1_T150_H1_HV2_K16_V8_varlen_h0_vk")
            out = kla.backward(**v.inputs, **v.options, backend="ref", algo="chunk",
                               chunk_size=16)
            rep = kla.compare(out, v, file=None)
            tap(rep.ok, "kla.backward gdn varlen vk (ref, chunk 16) passes",
                [] if rep.ok else rep.lines)
            try:
                bad_in = dict(v.inputs)
                bad_in["g"] = np.abs(bad_in["g"]) + 1
                kla.forward(**bad_in, **v.options)
                tap(False, "kla.forward raises KlaError for g > 0")
            except kla.KlaError as ex:
                tap("g" in str(ex), f"kla.forward raises KlaError for g > 0 ({ex})")
            check_ops(kla, c)
            check_contexts(kla, c)
            check_golden_all(kla)
            check_family(kla)
            check_verify_family(kla, kla_cmd, tmp)

        check_load(kla, tmp)
        check_no_torch(src)
        check_install(kla, src, tmp, a.lib if have_lib else None, gdir, c)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
