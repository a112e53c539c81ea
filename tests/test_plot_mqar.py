#!/usr/bin/python3
"""Tests of tools/plot_mqar.py (the MQAR figures and table) on two tiny `kla train` runs. TAP.

    /usr/bin/python3 tests/test_plot_mqar.py --kla build/kla [--src .]

Two runs of 10 steps (one GDN with seed 42, one KLA with seed 2; --backend ref) are
plotted with --paper and --table; then both SVGs must parse as XML and hold one series
per run, mixer and paper line, the table must hold both mixers at the 4 lengths with the
logs' accuracies, and a log cut short, a missing log and a corrupt log must each give the
documented message and exit status. Standard library only; about a second.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tap import Tap  # noqa: E402

tap = Tap()
NS = "{http://www.w3.org/2000/svg}"
TINY = ["--vocab", "64", "--d-model", "16", "--n-layer", "1", "--n-head", "2", "--d-k", "8", "--d-v", "8",
        "--d-ff", "32", "--pairs", "4", "--seq-len", "16", "--batch", "8", "--steps", "10",
        "--train-examples", "64", "--eval-examples", "16", "--eval-every", "5", "--eval-factors", "1,2,4,8",
        "--backend", "ref", "--quiet"]


def check(ok, name, diag=()):
    """A TAP line; the diagnostics only when it fails."""
    return tap(ok, name, () if ok else diag)


def series(root, cls):
    """The <g class="series CLS"> elements of a parsed SVG."""
    return [g for g in root.iter(NS + "g") if g.get("class", "").split() == ["series", cls]]


def parsed(path):
    """The root of the SVG at path (a TAP line says whether it parses), or None."""
    name = os.path.basename(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return check(False, f"{name} parses as SVG", [e])
    return root if check(root.tag == NS + "svg", f"{name} parses as SVG", [root.tag]) else None


def texts(root):
    return [t.text or "" for t in root.iter(NS + "text")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kla", required=True)
    ap.add_argument("--src", default=os.path.dirname(HERE))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="plot_mqar.") as tmp:
        run(args, tmp)
    return tap.finish()


def run(args, tmp):
    script = os.path.join(args.src, "tools", "plot_mqar.py")

    def plot(*argv):
        return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=60)

    logs = {name: os.path.join(tmp, f"{name}.jsonl") for name in ("gdn", "kla2")}
    ok = True
    for name, extra in (("gdn", ["--mixer", "gdn"]), ("kla2", ["--seed", "2"])):
        r = subprocess.run([args.kla, "train", *TINY, *extra, "--log", logs[name]], capture_output=True,
                           text=True, timeout=60)
        ok &= check(r.returncode == 0 and os.path.exists(logs[name]), f"kla train {' '.join(extra)} writes a log",
                    [f"exit {r.returncode}", r.stderr[-2000:]])
    if not ok:
        return
    finals = {}
    for name, path in logs.items():
        with open(path) as f:
            finals[name] = json.loads(f.read().splitlines()[-1])["final"]  # kla train's own last line

    out, table_md = os.path.join(tmp, "out"), os.path.join(tmp, "table.md")
    r = plot(logs["gdn"], logs["kla2"], "--out", out, "--paper", "--train-len", "16", "--table", table_md)
    check(r.returncode == 0 and not r.stderr, "two finished runs: exit 0, nothing on stderr",
          [f"exit {r.returncode}", r.stderr])

    acc = parsed(os.path.join(out, "accuracy.svg"))
    if acc is not None:
        got = {c: sorted(g.get("data-mixer") for g in series(acc, c)) for c in ("run", "mean", "paper")}
        check(got == {c: ["gdn", "kla"] for c in got}, "accuracy.svg: a run, a mean and a paper series per mixer",
              [got])
        t = texts(acc)
        want = ["MQAR: accuracy against evaluation length", "accuracy (%)", "16", "32", "64", "128",
                "KLA: paper (1 seed)", "GDN: mean over seeds"]
        check(all(w in t for w in want) and any(s.startswith("evaluation length") for s in t),
              "accuracy.svg: title, axis labels, length ticks, legend", [w for w in want if w not in t])
    cur = parsed(os.path.join(out, "curves.svg"))
    if cur is not None:
        loss, val = series(cur, "loss"), series(cur, "validation")
        npts = [len(g.find(NS + "polyline").get("points").split()) for g in loss + val]
        check(len(loss) == 2 and len(val) == 2 and npts == [10, 10, 2, 2],
              "curves.svg: a loss line of 10 steps and a validation line of 2 evaluations per run",
              [f"{len(loss)} loss, {len(val)} validation series, points {npts}"])
        t = texts(cur)
        want = ["MQAR: training curves", "training loss (log scale)", "validation accuracy (%)", "step",
                "KLA seed 2", "GDN seed 42"]
        check(all(w in t for w in want), "curves.svg: title, axis labels, legend", [w for w in want if w not in t])

    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    lengths = ["16 (1\u00d7)", "32 (2\u00d7)", "64 (4\u00d7)", "128 (8\u00d7)"]
    have = {(c[0], c[1]) for c in cells[1:]}
    check(all((m, n) in have for m in ("KLA", "GDN") for n in lengths),
          "the table: both mixers at the 4 lengths", [r.stdout])
    head = cells[0] if cells else []
    bad = []
    for c in cells[1:]:
        name, key = ("kla2", "seed 2") if c[0] == "KLA" else ("gdn", "seed 42")
        f = re.search(r"\((\d+)\u00d7\)", c[1])
        if f and key in head:
            want = f"{100 * finals[name]['acc'][f[1]]:.2f}"
            bad += [] if c[head.index(key)] == want else [f"{c[0]} {c[1]}: {c[head.index(key)]} != {want}"]
    steps = {c[0]: c[head.index("seed 2" if c[0] == "KLA" else "seed 42")] for c in cells[1:]
             if c[1] == "steps (best)" and "seed 2" in head and "seed 42" in head}
    for m, name in (("KLA", "kla2"), ("GDN", "gdn")):
        with open(logs[name]) as f:
            last = max(json.loads(ln)["step"] for ln in f if '"loss"' in ln)
        want = f"{last} ({finals[name]['best_step']})"
        bad += [] if steps.get(m) == want else [f"{m} steps (best): {steps.get(m)} != {want}"]
    paper_ok = "paper" in head and any(c[0] == "KLA" and c[head.index("paper")] == "98.35" for c in cells[1:])
    check(not bad and paper_ok and len(head) > 3, "the table: each seed's accuracy, steps and best step as in its log, the paper's",
          bad)
    try:
        with open(table_md, encoding="utf-8") as f:
            check(f.read() == r.stdout, "--table writes the table printed on stdout")
    except OSError as e:
        check(False, "--table writes the table printed on stdout", [e])

    # a run cut short: no final line, its last line half written
    with open(logs["gdn"]) as f:
        text = f.read()
    cut = os.path.join(tmp, "cut.jsonl")
    with open(cut, "w") as f:
        f.write(text[:text.index('{"final"')] + '{"step": 11, "lo')
    out2 = os.path.join(tmp, "out2")
    r = plot(logs["kla2"], cut, "--out", out2)
    msg = f"plot_mqar: {cut}: no final evaluation"
    n = None
    try:
        n = (len(series(ET.parse(os.path.join(out2, "accuracy.svg")).getroot(), "run")),
             len(series(ET.parse(os.path.join(out2, "curves.svg")).getroot(), "loss")))
    except (OSError, ET.ParseError):
        pass
    check(r.returncode == 0 and msg in r.stderr and "cut-off last line" in r.stderr and n == (1, 2),
          "a log without a final line: 'no final evaluation', left out of accuracy.svg, kept in curves.svg",
          [f"exit {r.returncode}, (accuracy runs, curves runs) {n}", r.stderr])

    missing, corrupt = os.path.join(tmp, "missing.jsonl"), os.path.join(tmp, "corrupt.jsonl")
    with open(corrupt, "w") as f:
        f.write(text.replace("\n", "\nnot json\n", 1))
    r = plot(logs["kla2"], missing, corrupt, "--out", os.path.join(tmp, "out3"))
    check(r.returncode == 1 and f"{missing}: cannot read" in r.stderr and f"{corrupt}:2: not a line" in r.stderr
          and os.path.exists(os.path.join(tmp, "out3", "accuracy.svg")),
          "a missing and a corrupt log: named with the reason, left out, exit 1, the rest plotted",
          [f"exit {r.returncode}", r.stderr])
    r = plot(missing, "--out", os.path.join(tmp, "out4"))
    check(r.returncode == 1 and "no readable log" in r.stderr, "no readable log at all: exit 1",
          [f"exit {r.returncode}", r.stderr])


if __name__ == "__main__":
    sys.exit(main())
