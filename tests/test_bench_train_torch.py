#!/usr/bin/python3
"""tools/bench_train_torch.py, the PyTorch CPU comparison of `kla bench --op train`. TAP.

    /usr/bin/python3 tests/test_bench_train_torch.py --kla build/kla [--src .]

1. `--check`: the chunked (WY/UT) float64 torch model and step equal the token-loop float64
   reference of tests/torch_model.py (loss, gradients, parameters after AdamW to 1e-10),
   both mixers, both head variants, padded and multi-chunk sequences.
2. A tiny benchmark round (1 round, 2 steps a side, small sizes): it runs, and its JSON has
   both sides' step times, tokens/s, the ratio, the threads, the versions, the machine,
   the command and both sides' memory.
Skips itself (`ok 1 - # SKIP`) without torch.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tap import Tap  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kla", default=os.path.join(os.path.dirname(HERE), "build", "kla"))
    ap.add_argument("--src", default=os.path.dirname(HERE))
    args = ap.parse_args()
    tool = os.path.join(args.src, "tools", "bench_train_torch.py")
    py = sys.executable or "/usr/bin/python3"
    tap = Tap()
    try:
        __import__("torch")
    except Exception as e:  # noqa: BLE001
        print(f"ok 1 - # SKIP no torch ({type(e).__name__}: {e})")
        print("1..1")
        return 0

    # 1. the chunked form against the float64 loop
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "check.json")
        p = subprocess.run([py, tool, "--check", "--json", out], capture_output=True, text=True, timeout=300)
        res = json.load(open(out)) if os.path.exists(out) else {}
    cases = res.get("check", [])
    ok = p.returncode == 0 and res.get("ok") is True and len(cases) >= 6 and all(c["ok"] for c in cases)
    worst = max((max(c["max_abs_err"].values()) for c in cases), default=float("nan"))
    tap(ok, f"--check: the chunked torch step (float64) equals tests/torch_model.py's loop "
        f"({len(cases)} cases, worst |err| {worst:.1e}, {time.time() - t0:.1f} s)",
        [] if ok else [p.stdout[-3000:], p.stderr[-3000:]])

    # 2. one tiny benchmark round
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [py, tool, "--kla", args.kla, "--threads", "1", "--rounds", "1", "--reps", "2", "--B", "2", "--T", "80",
               "--vocab", "300", "--d-model", "32", "--n-layer", "2", "--H", "2", "--K", "8", "--V", "16",
               "--d-ff", "64", "--json", out]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        res = json.load(open(out)) if os.path.exists(out) else {}
    secs = time.time() - t0

    def pos(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    k, tl, ta = res.get("kla", {}), res.get("torch_labelled", {}), res.get("torch_all_rows", {})
    checks = {
        "exit status 0": p.returncode == 0,
        "kla step_ms": pos(k.get("step_ms")) and len(k.get("rounds_step_ms", [])) == 1,
        "torch labelled step_ms": pos(tl.get("step_ms")) and len(tl.get("steps_ms", [[]])[0]) == 2,
        "torch all_rows step_ms": pos(ta.get("step_ms")),
        "tokens/s": all(pos(s.get("tokens_per_s")) for s in (k, tl, ta)),
        "ratio": pos(res.get("ratio")) and pos(res.get("ratio_all_rows"))
        and abs(res["ratio"] - tl.get("step_ms", 0) / k.get("step_ms", 1)) < 1e-9,
        "memory": pos(k.get("peak_rss_bytes")) and pos(k.get("model_bytes")) and pos(tl.get("peak_rss_bytes"))
        and pos(ta.get("peak_rss_bytes")) and tl["peak_rss_bytes"] > tl.get("import_torch_rss_bytes", 0) > 0
        # kla's own peak, not the resident size of the torch process it was started from
        and k["peak_rss_bytes"] < res.get("torch_process_peak_rss_bytes", 0),
        "threads": res.get("threads") == res.get("torch_threads") and pos(res.get("threads")),
        "versions": bool(res.get("versions", {}).get("torch")) and "kla" in res.get("versions", {}).get("kla_info", ""),
        "machine": bool(res.get("machine", {}).get("cpu_model")) and pos(res.get("machine", {}).get("cores_online")),
        "command": "bench_train_torch.py" in res.get("command", ""),
        "same data (labelled rows)": res.get("config", {}).get("labelled_rows", 0) > 0,
        "printed": "ratio torch / kla" in p.stdout,
    }
    bad = [n for n, v in checks.items() if not v]
    tap(not bad, f"a tiny benchmark round: kla {k.get('step_ms', float('nan')):.2f} ms, torch "
        f"{tl.get('step_ms', float('nan')):.2f} ms, ratio {res.get('ratio', float('nan')):.2f} ({secs:.1f} s)",
        ([f"failed: {', '.join(bad)}", p.stdout[-3000:], p.stderr[-3000:]] if bad else []))
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
