#!/usr/bin/python3
"""Tests of the Python package python/kla (TAP). Needs numpy only; the ctypes part needs
libkla (--lib), the comparison with `kla verify` the kla command (--kla).

    /usr/bin/python3 tests/test_python.py --kla build/kla --lib build/libkla.so [--src .]
"""

import argparse
import io
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

        # pip install offline into a target folder (the source is copied: no build
        # droppings in the repository)
        pipsrc = os.path.join(tmp, "pysrc")
        shutil.copytree(os.path.join(src, "python"), pipsrc,
                        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        target = os.path.join(tmp, "site")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                            "--no-deps", "--no-index", "--target", target, pipsrc],
                           capture_output=True, text=True)
        if r.returncode and "No module named pip" in r.stderr:
            tap.skip("pip install ./python", "no pip")
        else:
            chk = subprocess.run([sys.executable, "-c",
                                  "import kla, sys; print(kla.__file__); "
                                  "print(len(kla.golden_cases()))"],
                                 capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=target))
            ok = (r.returncode == 0 and chk.returncode == 0
                  and chk.stdout.startswith(target) and int(chk.stdout.split()[-1]) >= 20)
            tap(ok, "pip install --no-build-isolation --no-deps --no-index ./python works "
                    "offline; installed package lists the cases (KLA_GOLDEN)",
                [] if ok else [r.stdout[-1500:], r.stderr[-1500:], chk.stdout, chk.stderr])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
