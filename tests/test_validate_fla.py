"""examples/validate_fla.py --selftest on the CPU (TAP): the harness around fla's kernels,
with fla replaced by the script's float32 PyTorch stand-in, on three small cases.

Checks the report: pass lines, the injected os.abort in one child (chunk float32 backward
of the first case) reported as that run's ERROR while the next case passes, the injected
exception (chunk bf16 forward of the second case) reported with its type, message and
frames, the forward-only fallback of a kernel whose backward raises (the fused recurrent
stand-in raises NotImplementedError, as fla's does), grouped value heads (native and by
repeat_interleave), the summary table, --json, --out, --forward-only, --gva and the note
on beta beyond fp16's range. Needs python3 with numpy and torch; skips without torch.

    python3 tests/test_validate_fla.py
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
from tap import Tap  # noqa: E402

SCRIPT = os.path.join(ROOT, "examples", "validate_fla.py")
C1 = "kla_B1_T2_H1_HV1_K2_V1_spec6"
C2 = "kla_B1_T3_H1_HV1_K3_V2_h0_readable"
C3 = "gdn_B1_T3_H1_HV2_K2_V3_readable"  # HV = 2H: grouped value heads
CASES = "kla_B1_T2_*,kla_B1_T3_*,gdn_B1_T3_*"


def run(args, timeout=120):
    t = time.time()
    p = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr, time.time() - t


def line(out, case, kd, ps):
    """The report line of (case, kernel/dtype, pass) and the indented lines under it."""
    lines = out.splitlines()
    pat = re.compile(r"^%s\s+%s\s+%s\s+(PASS|FAIL|ERROR|SKIP)\b" % (
        re.escape(case), re.escape(kd), ps))
    for i, x in enumerate(lines):
        if pat.match(x):
            tail = []
            for y in lines[i + 1:]:
                if not y.startswith(" "):
                    break
                tail.append(y.strip())
            return x, tail
    return "", []


def status(out, case, kd, ps):
    m = re.search(r"\b(PASS|FAIL|ERROR|SKIP)\b", line(out, case, kd, ps)[0])
    return m.group(1) if m else None


def main():
    tap_ = Tap()

    def tap(ok, name, diag=()):
        return tap_(bool(ok), name, () if ok else diag)  # the diagnostics of a failure only
    tap.skip, tap.finish = tap_.skip, tap_.finish
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    except ImportError as ex:
        tap.skip("validate_fla --selftest", "needs numpy and torch (%s)" % ex)
        return tap.finish()
    import kla

    tmp = tempfile.mkdtemp(prefix="test_validate_fla.")
    out_dir, jpath = os.path.join(tmp, "out"), os.path.join(tmp, "r.json")
    rc, out, secs = run(["--selftest", "--cases", CASES, "--jobs", "4", "--out", out_dir,
                         "--json", jpath])
    tap(rc == 1 and "summary:" in out,
        "selftest runs, exit 1 for the injected faults (%.0f s)" % secs,
        [] if rc == 1 else ["exit %s" % rc, out[-3000:]])

    # header: both kernels, why each tolerance set
    tap(re.search(r"fused_recurrent .*\n\s+float32 tolerance set float32: float32 inputs", out)
        and re.search(r"chunk .*\n\s+float32 tolerance set bf16: the chunk kernel's tl.dot", out),
        "the header names the tolerance set of each kernel and dtype, and why")

    # plain passes
    want = [(c, kd, "forward") for c in (C1, C2, C3)
            for kd in ("chunk/float32", "fused_recurrent/float32", "fused_recurrent/bf16")]
    want += [(C2, "chunk/float32", "backward"), (C3, "chunk/float32", "backward"),
             (C1, "chunk/bf16", "forward"), (C1, "chunk/bf16", "backward"),
             (C3, "chunk/bf16", "forward"), (C3, "chunk/bf16", "backward")]
    bad = [w for w in want if status(out, *w) != "PASS"]
    tap(not bad, "PASS lines with the worst tensor and its rel_rmse (%d runs)" % len(want),
        ["not PASS: %s" % (w,) for w in bad])
    x, _ = line(out, C2, "fused_recurrent/float32", "forward")
    tap(re.search(r"PASS\s+worst (o|ht) rel_rmse \d\.\de-\d\d \(tol 1e-05\), max_abs "
                  r"\S+ at (o|ht)\[", x) and "[tol float32]" in x,
        "a PASS line names the worst tensor, rel_rmse, tolerance and element", [x])

    # the injected os.abort: that run's ERROR, with the stderr tail; forward kept
    x, tail = line(out, C1, "chunk/float32", "backward")
    tap("ERROR" in x and "child process died in backward" in x and "SIGABRT" in x
        and any("selftest: injected abort" in t for t in tail),
        "a child killed by os.abort is that kernel's ERROR, with its stderr tail", [x] + tail)
    tap(status(out, C1, "chunk/float32", "forward") == "PASS",
        "what the crashed child finished (its forward) is still reported")
    tap(status(out, C2, "chunk/float32", "forward") == "PASS"
        and status(out, C2, "chunk/float32", "backward") == "PASS",
        "the case after the crash passes (isolated in its own process)")

    # the injected exception: type, message, frames
    x, tail = line(out, C2, "chunk/bf16", "forward")
    tap("ERROR" in x and "RuntimeError: selftest: injected error in chunk forward" in x
        and any(re.match(r"at \S+:\d+ in _st_inject", t) for t in tail),
        "an exception is an ERROR line with its type, message and last frames", [x] + tail)
    tap(status(out, C2, "chunk/bf16", "backward") == "SKIP"
        and "not run: forward failed" in line(out, C2, "chunk/bf16", "backward")[0],
        "the backward after a failed forward is skipped, saying why")

    # forward-only fallback of a kernel whose backward raises
    ok = True
    for dt in ("float32", "bf16"):
        x, tail = line(out, C1, "fused_recurrent/" + dt, "backward")
        ok &= "ERROR" in x and "NotImplementedError" in x and any(
            "run forward-only" in t for t in tail)
        for c in (C2, C3):
            y = line(out, c, "fused_recurrent/" + dt, "backward")[0]
            ok &= "SKIP" in y and "forward-only fallback: the backward raised " \
                "NotImplementedError on " + C1 in y
    tap(ok, "a backward that raises: ERROR once, then forward-only, never a PASS")

    # grouped value heads
    a = line(out, C3, "chunk/float32", "forward")[0]
    b = line(out, C3, "fused_recurrent/float32", "forward")[0]
    tap("repeat_interleave" in a and "no native grouped value heads" in a
        and "native grouped heads" in b and "HV>H" not in line(out, C1, "chunk/float32",
                                                              "forward")[0],
        "grouped value heads: native where supported, else repeat_interleave, said so",
        [a, b])

    # summary
    rows = {m.group(1): m.group(2, 3) for m in re.finditer(
        r"^\s+(\S+/\S+)\s+\S+\s+(\d+ / +\d+ / +\d+ / +\d+)\s+(\d+ / +\d+ / +\d+ / +\d+)",
        out, re.M)}
    norm = {k: tuple(re.sub(r"\s+", "", c) for c in v) for k, v in rows.items()}
    exp = {"chunk/float32": ("3/0/0/0", "2/0/1/0"), "chunk/bf16": ("2/0/1/0", "2/0/0/1"),
           "fused_recurrent/float32": ("3/0/0/0", "0/0/1/2"),
           "fused_recurrent/bf16": ("3/0/0/0", "0/0/1/2")}
    tap(norm == exp and "15 passed, 0 failed, 4 errors, 5 skipped" in out,
        "summary: passed / failed / errors / skipped per kernel, dtype and pass",
        ["got %s" % norm])

    # --json
    try:
        with open(jpath) as f:
            doc = json.load(f)
        res = doc["results"]
        summ = {(s["kernel"], s["dtype"]): s for s in doc["summary"]}
        ok = (len(res) == 24 and doc["totals"]["pass"] == 15
              and summ[("fused_recurrent", "float32")]["fallback"]
              and summ[("chunk", "float32")]["backward"] == {"pass": 2, "fail": 0,
                                                             "error": 1, "skip": 0}
              and any(r["status"] == "ERROR" and r["detail"].get("error", {}).get("type")
                      == "RuntimeError" for r in res))
        diag = []
    except Exception as ex:
        ok, diag = False, ["%s: %s" % (type(ex).__name__, ex)]
    tap(ok, "--json: every result and the summary", diag)

    # --out: files that kla verify (kla.compare) reads
    f1 = os.path.join(out_dir, C3 + ".chunk.float32.safetensors")
    f2 = os.path.join(out_dir, C3 + ".fused_recurrent.float32.safetensors")
    try:
        r1 = kla.compare(f1, kla.load_case(C3), tol="bf16", file=None)
        t2, _ = kla.load(f2)
        r2 = kla.compare(f2, kla.load_case(C3), tensors="o,ht", file=None)
        ok, diag = r1.ok and sorted(t2) == ["ht", "o"] and r2.ok, [str(r1), str(r2)]
    except Exception as ex:
        ok, diag = False, ["%s: %s" % (type(ex).__name__, ex)]
    tap(ok, "--out: saved outputs pass kla.compare (forward-only file: o, ht)", diag)

    # --forward-only, --gva native on a kernel without it, beta beyond fp16
    rc, out2, secs = run(["--selftest", "--inject", "none", "--forward-only", "--kernel",
                          "chunk", "--dtype", "fp16", "--gva", "native", "--cases",
                          "gdn_B1_T3_*,*knorms"])
    x, tail = line(out2, C3, "chunk/fp16", "forward")
    y = line(out2, C3, "chunk/fp16", "backward")[0]
    tap(rc == 1 and "ERROR" in x and "ValueError" in x and "SKIP" in y and "--forward-only" in y,
        "--forward-only skips the backward; --gva native on a kernel without it is an "
        "ERROR (%.0f s)" % secs, [x, y])
    x, tail = line(out2, "kla_B1_T96_H2_HV2_K16_V16_knorms", "chunk/fp16", "forward")
    tap(any(re.search(r"beta up to 1\.\d+e\+06 exceeds fp16's max 65504: passed in float32", t)
            for t in tail) and any("beta * v" in t for t in tail),
        "knorms: beta beyond fp16's range is reported, beta goes in float32", [x] + tail)
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
