"""examples/validate_fla.py --selftest on the CPU (TAP): the harness around fla's kernels,
with fla replaced by the script's float32 PyTorch stand-ins, on three small section-1
cases, then on ten of the delta-rule family's (kla-spec.md section 7).

Checks the report: pass lines, the injected os.abort in one child (chunk float32 backward
of the first case) reported as that run's ERROR while the next case passes, the injected
exception (chunk bf16 forward of the second case) reported with its type, message and
frames, the forward-only fallback of a kernel whose backward raises (the fused recurrent
stand-in raises NotImplementedError, as fla's does), grouped value heads (native and by
repeat_interleave), the summary table, --json, --out, --forward-only, --gva and the note
on beta beyond fp16's range. The family: each of the six family kernels (chunk_kda,
fused_recurrent_kda, chunk_precond_gated_delta_rule and its fused recurrent form,
chunk_precond_kda, fused_recurrent_precond_kda) runs the cases of its variant only and
passes them, which checks the mapping of names (at <- A state, da0 <- dh0_atk, ...),
shapes, layouts (vk), initial states, varlen and gradients end to end; the deliberately
wrong stand-ins (KDA's decay after the update, the ATK without the current token) are
reported as FAIL; the fused recurrent kernels without a backward fall back to
forward-only; the exact rewrites (the Kaczmarz step on the host, raw keys through
chunk_precond_kda, the ATK repeated per value head, also with --gva repeat) are said on
the report line and pass; --family-rewrites off reports those cases N/A, as it does a
kernel the installed fla lacks; a family case is never given to the Gated DeltaNet
kernels. Needs python3 with numpy and torch; skips
without torch.

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

# the family: per kernel, the cases it runs (the first of each is the deliberately wrong
# stand-in's in float32)
KDA = ["kda_B1_T2_H1_HV1_K2_V1_ex18", "kkda_B1_T2_H1_HV1_K2_V1_ex18",
       "kkda_B1_T130_H2_HV4_K16_V16_h0_l2q"]
PGDN = ["pgdn_B1_T2_H1_HV1_K2_V1_ex2", "pkla_B1_T2_H1_HV1_K2_V1_h0_l2q_ex6",
        "pgdn_B2_T100_H2_HV4_K16_V16_h0_l2qk", "pdn_B1_T70_H2_HV2_K16_V16_l2qk"]
PKDA = ["pkda_B1_T2_H1_HV1_K2_V1_h0_l2qk_ex4", "pkda_B1_T100_H2_HV2_K16_V8_varlen_h0_vk_l2qk",
        "pkkda_B1_T130_H1_HV2_K64_V32_h0_l2q"]
FAMILY = {"kda": KDA, "fused_recurrent_kda": KDA, "precond": PGDN,
          "fused_recurrent_precond": PGDN, "precond_kda": PKDA,
          "fused_recurrent_precond_kda": PKDA}


def run(args, timeout=120, env=None):
    t = time.time()
    p = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=dict(os.environ, **(env or {})))
    return p.returncode, p.stdout + p.stderr, time.time() - t


def line(out, case, kd, ps):
    """The report line of (case, kernel/dtype, pass) and the indented lines under it
    (pass "fwd+bwd": the one line of a run that is not applicable)."""
    lines = out.splitlines()
    pat = re.compile(r"^%s\s+%s\s+%s\s+(PASS|FAIL|ERROR|SKIP|N/A)\b" % (
        re.escape(case), re.escape(kd), re.escape(ps)))
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
    m = re.search(r"\b(PASS|FAIL|ERROR|SKIP|N/A)\b", line(out, case, kd, ps)[0])
    return m.group(1) if m else None


def summary(out):
    """{kernel/dtype: (forward cell, backward cell)} of the summary table, spaces removed."""
    cell = r"(\d+ / +\d+ / +\d+ / +\d+ / +\d+)"
    rows = {m.group(1): m.group(2, 3) for m in re.finditer(
        r"^\s+(\S+/\S+)\s+\S+\s+%s\s+%s" % (cell, cell), out, re.M)}
    return {k: tuple(re.sub(r"\s+", "", c) for c in v) for k, v in rows.items()}


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
    norm = summary(out)
    exp = {"chunk/float32": ("3/0/0/0/0", "2/0/1/0/0"),
           "chunk/bf16": ("2/0/1/0/0", "2/0/0/1/0"),
           "fused_recurrent/float32": ("3/0/0/0/0", "0/0/1/2/0"),
           "fused_recurrent/bf16": ("3/0/0/0/0", "0/0/1/2/0")}
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
                                                             "error": 1, "skip": 0, "na": 0}
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

    family(tap, kla, tmp)
    return tap.finish()


def family(tap, kla, tmp):
    """The six family kernels on ten family cases, float32 (bf16 on a few): the default
    faults are a deliberately wrong stand-in in the float32 run of the first case of kda,
    precond and precond_kda."""
    out_dir, jpath = os.path.join(tmp, "fam_out"), os.path.join(tmp, "fam.json")
    globs = ",".join(sorted({c for cs in FAMILY.values() for c in cs}))
    rc, out, secs = run(["--selftest", "--kernel", ",".join(FAMILY), "--dtype", "float32",
                         "--cases", globs, "--jobs", "4", "--out", out_dir, "--json", jpath],
                        timeout=240)
    tap(rc == 1 and "summary:" in out,
        "family selftest runs, exit 1 for the wrong stand-ins (%.0f s)" % secs,
        [] if rc == 1 else ["exit %s" % rc, out[-3000:]])

    # header: ATK layout, always-normalising kernel, grouped heads
    tap(re.search(r"fused_recurrent_precond_kda .*\n\s+ATK state per value head .*repeated "
                  r"to its value heads", out)
        and re.search(r"precond_kda .*by repeat_interleave.*\n.*ATK state per key head.*\n"
                      r"\s+always L2-normalises q and k", out),
        "the header says where fla's ATK lives and which kernel always normalises")

    # every run of a family kernel passes, but the three deliberately wrong ones
    wrong = {("kda", KDA[0]), ("precond", PGDN[0]), ("precond_kda", PKDA[0])}
    bad = []
    for kn, cs in FAMILY.items():
        for c in cs:
            want = "FAIL" if (kn, c) in wrong else "PASS"
            if status(out, c, kn + "/float32", "forward") != want:
                bad.append("%s %s forward: %s, not %s" % (
                    c, kn, status(out, c, kn + "/float32", "forward"), want))
            if not kn.startswith("fused_recurrent"):
                if status(out, c, kn + "/float32", "backward") != want:
                    bad.append("%s %s backward: %s, not %s" % (
                        c, kn, status(out, c, kn + "/float32", "backward"), want))
    tap(not bad, "family: every run PASSes forward and (chunk kernels) backward, "
        "but the wrong stand-ins' (%d runs)" % sum(len(c) for c in FAMILY.values()), bad)

    ok, diag = True, []
    for kn, c, what in (("kda", KDA[0], "decay comes after the update"),
                        ("precond", PGDN[0], "ATK state leaves the current token out"),
                        ("precond_kda", PKDA[0], "ATK state leaves the current token out")):
        x, tail = line(out, c, kn + "/float32", "forward")
        y = line(out, c, kn + "/float32", "backward")[0]
        ok &= ("FAIL" in x and "failing: o, ht" in x and "FAIL" in y
               and any("deliberately wrong (the %s)" % what in t for t in tail))
        diag += [x] + tail + [y]
    tap(ok, "the deliberately wrong stand-ins (decay after the update, ATK without the "
        "current token) are FAIL, forward and backward, and said so", diag)

    # fused recurrent family kernels: no backward -> ERROR once, then forward-only
    ok, diag = True, []
    for kn, why in (("fused_recurrent_kda", "returned o without autograd"),
                    ("fused_recurrent_precond", "Backward pass is not implemented"),
                    ("fused_recurrent_precond_kda", "returned o without autograd")):
        cs = FAMILY[kn]
        x, tail = line(out, cs[0], kn + "/float32", "backward")
        ok &= "ERROR" in x and "NotImplementedError" in x and why in x and any(
            "run forward-only" in t for t in tail)
        for c in cs[1:]:
            y = line(out, c, kn + "/float32", "backward")[0]
            ok &= "SKIP" in y and "forward-only fallback" in y
        diag.append(x)
    tap(ok, "family kernels without a backward: ERROR once, then forward-only", diag)

    # the rewrites and mappings, said on the line
    checks = [
        (KDA[2], "kda", ["Kaczmarz step (fla has none): beta = eta / (||k||^2 + eps)",
                         "l2norm on q only: normalised here"], "native grouped heads"),
        (PGDN[1], "precond", ["beta = eta / (k . kw + eps)", "ATK recomputed here"], None),
        (PGDN[3], "precond", ["no g in the case (PDN): zeros", "no log_atk_scale in the case: "
                              "a tensor of -0.2", "no a0 in the case: initial_A_state zeros"],
         None),
        (PKDA[2], "precond_kda", ["raw keys through chunk_precond_kda", "v / n, beta * n^2, "
                                  "beta_atk * n^2", "g_atk, beta_atk, log_atk_scale, a0 "
                                  "repeated per value head", "Kaczmarz step"],
         "repeat_interleave"),
        (PKDA[2], "fused_recurrent_precond_kda", ["ATK per value head", "at read from the "
                                                  "first value head"], "native grouped heads"),
    ]
    ok, diag = True, []
    for c, kn, notes, gva in checks:
        x, tail = line(out, c, kn + "/float32", "forward")
        good = all(any(n in t for t in tail) for n in notes) and (gva is None or gva in x)
        ok &= good
        if not good:
            diag += [x] + tail
    tap(ok, "the exact rewrites and stand-in values are said on the report line: Kaczmarz "
        "step, one-sided l2norm, PDN's zeros, raw keys, the ATK per value head", diag)

    # the mapping back, through --json and --out
    try:
        with open(jpath) as f:
            doc = json.load(f)
        res = {(r["case"], r["kernel"], r["pass"]): r for r in doc["results"]}
        fwd = res[(PGDN[2], "precond", "forward")]["detail"]
        bwd = res[(PGDN[2], "precond", "backward")]["detail"]
        names = {t["name"] for t in fwd["tensors"]} | {t["name"] for t in bwd["tensors"]}
        want = {"o", "ht", "at", "dq", "dk", "dv", "dg", "dbeta", "dh0", "dg_atk",
                "dbeta_atk", "dlog_atk_scale", "da0"}
        ok, diag = names == want and not any(
            (r["kernel"] in ("chunk", "fused_recurrent")) for r in doc["results"]) and \
            doc["options"]["kernel_cases"]["precond"] == PGDN, ["compared: %s" % sorted(names)]
        for c, kn in ((PGDN[2], "precond"), (PKDA[1], "precond_kda"), (KDA[2], "kda")):
            f1 = os.path.join(out_dir, "%s.%s.float32.safetensors" % (c, kn))
            r1 = kla.compare(f1, kla.load_case(c), tol="bf16", file=None)
            ok &= r1.ok and len(r1.tensors) == len(kla.load_case(c).expected)
            diag.append(str(r1))
    except Exception as ex:
        ok, diag = False, ["%s: %s" % (type(ex).__name__, ex)]
    tap(ok, "every output and gradient comes back under the spec's names (at, da0, "
        "dlog_atk_scale, ...; vk states; varlen): --json and --out files pass kla.compare",
        diag)

    summ = summary(out)
    exp = {"kda/float32": ("2/1/0/0/0", "2/1/0/0/0"),
           "fused_recurrent_kda/float32": ("3/0/0/0/0", "0/0/1/2/0"),
           "precond/float32": ("3/1/0/0/0", "3/1/0/0/0"),
           "fused_recurrent_precond/float32": ("4/0/0/0/0", "0/0/1/3/0"),
           "precond_kda/float32": ("2/1/0/0/0", "2/1/0/0/0"),
           "fused_recurrent_precond_kda/float32": ("3/0/0/0/0", "0/0/1/2/0")}
    tap(summ == exp, "family summary per kernel", ["got %s" % summ])

    # --family-rewrites off: the Kaczmarz and raw-key cases N/A; a family case is never
    # given to the Gated DeltaNet kernels; bf16 through the family's chunk kernels
    rc, out2, secs = run(["--selftest", "--inject", "none", "--family-rewrites", "off",
                          "--kernel", "chunk,kda,precond_kda",
                          "--dtype", "bf16", "--cases",
                          "kla_B1_T2_*spec6,*_ex18,pkkda_*,pgdn_B1_T2_*ex2,pkda_B1_T2_*"])
    x1 = line(out2, KDA[1], "kda/bf16", "fwd+bwd")[0]
    x2 = line(out2, PKDA[2], "precond_kda/bf16", "fwd+bwd")[0]
    ok = (rc == 0 and all("N/A" in x and "not applicable: fla has no Kaczmarz step" in x
                          for x in (x1, x2))
          and status(out2, KDA[0], "kda/bf16", "backward") == "PASS"
          and status(out2, PKDA[0], "precond_kda/bf16", "backward") == "PASS"
          and status(out2, "kla_B1_T2_H1_HV1_K2_V1_spec6", "chunk/bf16", "forward") == "PASS"
          and re.search(r"not run \(no selected kernel for them\): 1 PGDN/PDN case: "
                        r"pgdn_B1_T2_H1_HV1_K2_V1_ex2 \(--kernel precond,", out2)
          and not re.search(r"^(kda|kkda|pkda|pkkda|pgdn)\S* +chunk/", out2, re.M)
          and re.search(r"\b4 not applicable", out2)
          and summary(out2).get("kda/bf16") == ("1/0/0/0/1", "1/0/0/0/1"))
    tap(ok, "--family-rewrites off: the Kaczmarz cases are N/A with the reason, exit 0; the "
        "Gated DeltaNet kernel never sees a family case; bf16 family runs pass (%.0f s)" % secs,
        [x1, x2, out2[-2500:]])

    # --gva repeat through the PGDN chunk kernel (H = 2, HV = 4): q, k and the ATK inputs
    # repeated per value head, at read back from the first value head of each key head
    rc, out4, secs = run(["--selftest", "--inject", "none", "--kernel", "precond", "--gva",
                          "repeat", "--dtype", "float32", "--cases", PGDN[2]])
    x, tail = line(out4, PGDN[2], "precond/float32", "forward")
    tap(rc == 0 and "PASS" in x and "--gva repeat" in x
        and status(out4, PGDN[2], "precond/float32", "backward") == "PASS"
        and any("ATK per key head of the repeated q, k in this call" in t for t in tail),
        "--gva repeat with the ATK: its inputs repeated per value head, at and the ATK "
        "gradients mapped back (%.0f s)" % secs, [x] + tail + [out4[-1500:]])

    # an fla without the PKDA ops (every release up to 0.5.2): N/A, not a failure
    rc, out5, _ = run(["--selftest", "--inject", "none", "--forward-only", "--kernel",
                       "kda,precond_kda", "--dtype", "float32", "--cases",
                       "kda_B1_T2_*,pkda_B1_T2_*"],
                      env={"VALIDATE_FLA_SELFTEST_ABSENT": "fla.ops.precond_kda"})
    x = line(out5, PKDA[0], "precond_kda/float32", "fwd+bwd")[0]
    tap(rc == 0 and "N/A" in x and "not applicable: this fla has no "
        "fla.ops.precond_kda.chunk_precond_kda (ModuleNotFoundError" in x
        and re.search(r"precond_kda +not in this fla", out5)
        and status(out5, KDA[0], "kda/float32", "forward") == "PASS",
        "a family kernel this fla lacks: N/A with the import error, exit 0", [x, out5[-1500:]])

    rc, out3, _ = run(["--selftest", "--kernel", "chunk,fused_recurrent", "--cases",
                       "pgdn_*,kda_*"])
    tap(rc != 0 and "none of the" in out3 and "--kernel kda,fused_recurrent_kda,precond,"
        "fused_recurrent_precond" in out3,
        "family cases alone with the Gated DeltaNet kernels: nothing run, the right kernels "
        "named", [out3[-1000:]])


if __name__ == "__main__":
    sys.exit(main())
