"""Runs the test stages and counts TAP results; the last line is 'N passed, N failed'.

Each stage configures its own build folder, builds it, then runs every test that meson
knows about (meson introspect --tests), so a test registered in any meson.build is run.
Logs go to BUILD/test-logs/NAME.log; failures are also printed here.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
passed = failed = 0


def sh(cmd, **kw):
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw)


def record(stage, name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL [{stage}] {name} {detail}".rstrip(), flush=True)


def build(builddir, setup_args, env=None):
    if not os.path.exists(os.path.join(ROOT, builddir, "build.ninja")):
        r = sh(["meson", "setup", builddir] + setup_args, env=env)
        if r.returncode:
            return False
    return sh(["ninja", "-C", builddir], env=env).returncode == 0


def count_tap(stage, test, out, rc):
    """Counts ok / not ok lines; a crash or a non-zero exit without them is one failure."""
    n_ok = len(re.findall(r"^ok \d+", out, re.M))
    bad = re.findall(r"^not ok \d+.*$", out, re.M)
    for line in bad:
        record(stage, test, False, line)
    for _ in range(n_ok):
        record(stage, test, True)
    if rc != 0 and not bad:
        record(stage, test, False, f"exited with {rc} (see the log)")
    print(f"[{stage}] {test}: {n_ok} ok, {len(bad)} not ok, exit {rc}", flush=True)


def preload_sanitizers(env):
    """A Python test loading a sanitized libkla through ctypes: the interpreter is not
    built with ASan, so its runtime (and UBSan's) must be preloaded first; Python's own
    allocations at exit are not leaks of ours."""
    libs = []
    for lib in ("libasan.so", "libubsan.so"):
        p = subprocess.run(["gcc", "-print-file-name=" + lib], capture_output=True, text=True)
        if p.returncode == 0 and os.path.isabs(p.stdout.strip()):
            libs.append(p.stdout.strip())
    env["LD_PRELOAD"] = " ".join(libs + [env.get("LD_PRELOAD", "")]).strip()
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "").replace("detect_leaks=1", "detect_leaks=0")


def run_meson_tests(stage, builddir, extra_env=None):
    info = subprocess.run(["meson", "introspect", builddir, "--tests"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    logdir = os.path.join(ROOT, builddir, "test-logs")
    os.makedirs(logdir, exist_ok=True)
    for t in json.loads(info.stdout):
        env = dict(os.environ)
        env.update(t.get("env") or {})
        env.update(extra_env or {})
        if env.get("KLA_PRELOAD_SANITIZERS"):
            preload_sanitizers(env)
        start = time.time()
        try:
            p = subprocess.run(t["cmd"], cwd=t.get("workdir") or os.path.join(ROOT, builddir),
                               env=env, capture_output=True, text=True,
                               timeout=(t.get("timeout") or 300) * 2)
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), -1
            out += "\n(timed out)\n"
        with open(os.path.join(logdir, t["name"] + ".log"), "w") as f:
            f.write(out)
        if rc != 0:
            sys.stdout.write("".join("    | " + l + "\n" for l in out.splitlines()[-40:]))
        count_tap(stage, t["name"] + f" ({time.time() - start:.0f}s)", out, rc)


def stage_release():
    if not build("build", []):
        return record("release", "build", False)
    run_meson_tests("release", "build")


def run_mutate(stage, builddir, extra_env):
    """tests/mutate.py on the build's kla and examples/validate for KLA_MUTATE_SECONDS
    (120 by default); its TAP is counted, its output goes to BUILD/test-logs/mutate.log."""
    seconds = os.environ.get("KLA_MUTATE_SECONDS", "120")
    logdir = os.path.join(ROOT, builddir, "test-logs")
    os.makedirs(logdir, exist_ok=True)
    cmd = ["/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable,
           os.path.join(ROOT, "tests", "mutate.py"), "--seconds", seconds,
           "--kla", os.path.join(ROOT, builddir, "kla"),
           "--validate", os.path.join(ROOT, builddir, "examples", "validate"),
           "--src", ROOT, "--findings", os.path.join(logdir, "mutate-findings")]
    start = time.time()
    try:
        p = sh(cmd, env=dict(os.environ, **extra_env), capture_output=True, text=True,
               timeout=float(seconds) + 600)
        out, rc = p.stdout + p.stderr, p.returncode
    except (subprocess.TimeoutExpired, ValueError) as e:
        out, rc = f"{e}\n", -1
    with open(os.path.join(logdir, "mutate.log"), "w") as f:
        f.write(out)
    if rc != 0:
        sys.stdout.write("".join("    | " + l + "\n" for l in out.splitlines()[-40:]))
    count_tap(stage, f"mutate ({time.time() - start:.0f}s)", out, rc)


def stage_sanitize():
    args = ["-Db_sanitize=address,undefined", "-Db_lundef=false", "--buildtype=debugoptimized"]
    if not build("build-asan", args):
        return record("sanitize", "build", False)
    env = {
        # see tests/nodlclose.c; it is preloaded ahead of libasan, hence the link-order flag
        "LD_PRELOAD": os.path.join(ROOT, "build-asan", "tests", "libnodlclose.so"),
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1:verify_asan_link_order=0",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "LSAN_OPTIONS": "suppressions=" + os.path.join(ROOT, "tests", "lsan.supp"),
    }
    run_meson_tests("sanitize", "build-asan", env)
    run_mutate("sanitize", "build-asan", env)


def stage_fuzz(seconds):
    env = dict(os.environ, CC="clang")
    args = ["-Dfuzz=true", "-Dsimd=disabled", "-Dvulkan=disabled", "--buildtype=debugoptimized"]
    if not build("build-fuzz", args, env):
        return record("fuzz", "build", False)
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus")
        shutil.copytree(os.path.join(ROOT, "tests", "fuzz-corpus"), corpus)
        p = sh([os.path.join(ROOT, "build-fuzz", "tests", "fuzz_safetensors"),
                f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048",
                f"-artifact_prefix={work}/", corpus], capture_output=True, text=True)
        tail = (p.stdout + p.stderr).splitlines()[-5:]
        print("\n".join("    | " + l for l in tail))
        record("fuzz", f"fuzz_safetensors for {seconds}s", p.returncode == 0,
               "" if p.returncode == 0 else "crash: see the output above")


def stage_neon():
    script = os.path.join(ROOT, "tests", "neon.sh")
    if not os.path.exists(script):
        print("[neon] tests/neon.sh absent: no NEON stage yet")
        return
    p = sh(["bash", script], capture_output=True, text=True)
    out = p.stdout + p.stderr
    os.makedirs(os.path.join(ROOT, "build-aarch64"), exist_ok=True)
    with open(os.path.join(ROOT, "build-aarch64", "neon.log"), "w") as f:
        f.write(out)
    if p.returncode:
        sys.stdout.write("".join("    | " + l + "\n" for l in out.splitlines()[-40:]))
    count_tap("neon", "qemu-aarch64", out, p.returncode)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="release build and tests only")
    ap.add_argument("--stage", action="append", choices=["release", "sanitize", "fuzz", "neon"])
    ap.add_argument("--fuzz-seconds", type=int, default=int(os.environ.get("KLA_FUZZ_SECONDS", "60")))
    a = ap.parse_args()
    stages = a.stage or (["release"] if a.quick else ["release", "sanitize", "fuzz", "neon"])
    t0 = time.time()
    for s in stages:
        print(f"==== stage {s}", flush=True)
        if s == "fuzz":
            stage_fuzz(a.fuzz_seconds)
        else:
            globals()["stage_" + s]()
    print(f"==== {time.time() - t0:.0f}s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
