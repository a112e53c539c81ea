#!/usr/bin/python3
"""Figures and a table from the logs of `kla train --log FILE` (MQAR); standard library only.

    python3 tools/plot_mqar.py LOG... [--out DIR] [--paper] [--train-len N] [--table FILE]
                               [--spread minmax|std]

DIR/accuracy.svg  the final accuracy (the best validation checkpoint: the log's "final" line)
    against the evaluation length on a log2 axis: each run as thin dots, each mixer's mean
    over seeds as a thick line with error bars (min-max, or +-1 sample standard deviation
    with --spread std), with --paper the KLA paper's MQAR table (one seed each) as hollow
    diamonds. Logs do not record the training length: --train-len (256) only labels the axis.
DIR/curves.svg  training loss (log scale, the mean of each bucket of steps) and validation
    accuracy against the step, a line per run; a ring marks the best (final) checkpoint.
stdout  per mixer and length each seed's accuracy (%), mean, standard deviation and min-max,
    as a Markdown table for docs/mqar.md (also written to --table FILE).

A log that cannot be read, or has a line that is not JSON (other than a cut-off last line,
which an interrupted run leaves), is reported and left out, and the exit status is 1. A run
without a final line is reported as "no final evaluation" and left out of accuracy.svg and
the table, but kept in curves.svg; so is a second run of the same mixer and seed.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
from xml.sax.saxutils import escape, quoteattr

PAPER = {"kla": {1: 98.35, 2: 98.16, 4: 95.64, 8: 73.84},  # KLA paper, MQAR table, one seed
         "gdn": {1: 98.74, 2: 98.36, 4: 94.31, 8: 66.81}}
NAMES = {"kla": "KLA", "gdn": "GDN"}
COLOURS = {"kla": "#0072b2", "gdn": "#d55e00"}
SPARE = ["#009e73", "#cc79a7", "#e69f00", "#56b4e9"]
DASHES = ["", "6,3", "2,2", "8,3,2,3", "4,4"]
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
W, H = 800, 500  # the size of a figure (curves.svg grows for a long legend)


class LogError(Exception):
    """A log left out, and why."""


class Run:
    """One log: steps {step: loss}, evals {step: acc %}, final (None if unfinished)."""

    def __init__(self, path):
        self.path, self.name = path, os.path.basename(path)
        self.losses, self.evals, self.final = {}, {}, None
        self.mixer = self.seed = self.best = self.test = self.label = None


def load(path, warn):
    run = Run(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}")
    lines = [(n, s.strip()) for n, s in enumerate(lines, 1) if s.strip()]
    for i, (n, text) in enumerate(lines):
        # C's printf writes nan and inf, which JSON spells NaN and Infinity
        text = re.sub(r"\b(-?)inf\b", r"\1Infinity", re.sub(r"-?\bnan\b", "NaN", text))
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            if "final" in rec:
                fin = rec["final"]
                run.final = {int(k): 100 * float(v) for k, v in fin["acc"].items()}
                run.test = 100 * float(fin["test"])
                run.mixer, run.seed, run.best = str(fin["mixer"]), int(fin["seed"]), int(fin["best_step"])
            elif "eval" in rec:
                run.evals[int(rec["step"])] = 100 * float(rec["acc"])
            elif "step" in rec:
                run.losses[int(rec["step"])] = float(rec["loss"])  # a resumed run: the later line wins
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if i == len(lines) - 1:
                warn(f"{path}:{n}: cut-off last line ignored (an interrupted run?)")
            else:
                raise LogError(f"{path}:{n}: not a line of kla train's log ({e}): {text[:60]!r}")
    if not run.losses and run.final is None:
        raise LogError(f"{path}: no training steps: not a log of kla train")
    return run


# ---- SVG -------------------------------------------------------------------------------------

class Axis:
    def __init__(self, lo, hi, p0, p1, log=False):
        self.lo, self.hi, self.p0, self.p1, self.log = lo, hi, p0, p1, log

    def __call__(self, v):
        f = self.log and math.log
        a, b, v = (f(self.lo), f(self.hi), f(v)) if f else (self.lo, self.hi, v)
        return self.p0 + (self.p1 - self.p0) * (v - a) / ((b - a) or 1)


def nice_ticks(lo, hi, n=6):
    """Round ticks covering [lo, hi] and the range they span."""
    raw = (hi - lo) / n or 1
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    a, b = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(a, b + 1)], a * step, b * step


def log_ticks(lo, hi):
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1,), (1, 2, 5), range(1, 10)):
        t = [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mults if lo <= m * 10.0 ** e <= hi]
        if len(t) >= 3:
            return t
    return [v for v in nice_ticks(lo, hi, 6)[0] if lo <= v <= hi]  # less than a factor of 2


def fmt(v):
    return f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"


class Svg:
    def __init__(self, title, subtitle="", height=H):
        self.out = ['<?xml version="1.0" encoding="UTF-8"?>',
                    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} '
                    f'{height}" font-family={quoteattr(FONT)} font-size="12">',
                    f'<title>{escape(title)}</title>', f'<rect width="{W}" height="{height}" fill="white"/>']
        self.text(W / 2, 24, title, size=16, anchor="middle", weight="bold")
        if subtitle:
            self.text(W / 2, 42, subtitle, size=11, anchor="middle", fill="#555")

    def add(self, s):
        self.out.append(s)

    def text(self, x, y, s, size=12, anchor="start", fill="#222", weight="normal", rotate=False):
        rot = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
                 f'font-weight="{weight}"{rot}>{escape(str(s))}</text>')

    def line(self, pts, colour, width=1.0, dash="", opacity=1.0):
        p = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<polyline points="{p}" fill="none" stroke="{colour}" stroke-width="{width}"{d} '
                 f'stroke-opacity="{opacity}" stroke-linejoin="round" stroke-linecap="round"/>')

    def marker(self, x, y, colour, shape="circle", r=3.0, hollow=False, opacity=1.0):
        fill = "white" if hollow else colour
        style = f'fill="{fill}" stroke="{colour}" stroke-width="1.5" opacity="{opacity}"'
        if shape == "diamond":
            r *= 1.35
            self.add(f'<polygon points="{x:.1f},{y - r:.1f} {x + r:.1f},{y:.1f} {x:.1f},{y + r:.1f} '
                     f'{x - r:.1f},{y:.1f}" {style}/>')
        else:
            self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" {style}/>')

    def group(self, cls, **data):
        attrs = "".join(f" data-{k}={quoteattr(str(v))}" for k, v in data.items())
        self.add(f'<g class="series {cls}"{attrs}>')

    def end(self):
        self.add("</g>")

    def frame(self, xa, ya, xticks, yticks, xlabel, ylabel, xfmt=fmt, yfmt=fmt):
        """Grid, box, ticks and labels of the panel spanned by the axes xa and ya."""
        x0, x1, y0, y1 = xa.p0, xa.p1, ya.p1, ya.p0
        rows = max(len(xfmt(t).split("\n")) for t in xticks)
        for t in yticks:
            y = ya(t)
            self.line([(x0, y), (x1, y)], "#e4e4e4")
            self.text(x0 - 7, y + 4, yfmt(t), size=11, anchor="end", fill="#444")
        for t in xticks:
            x = xa(t)
            self.line([(x, y0), (x, y1)], "#e4e4e4")
            for k, s in enumerate(xfmt(t).split("\n")):
                self.text(x, y1 + 16 + 13 * k, s, size=11 - k, anchor="middle", fill="#444" if k == 0 else "#888")
        self.add(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
                 f'fill="none" stroke="#888"/>')
        self.text((x0 + x1) / 2, y1 + 24 + 13 * rows, xlabel, anchor="middle")
        self.text(x0 - 46, (y0 + y1) / 2, ylabel, anchor="middle", rotate=True)

    def legend(self, x, y, items, dx=0, wrap=1):
        """items: (label, kind, colour, dash); a column, or rows of `wrap` entries dx apart."""
        for k, (label, kind, c, dash) in enumerate(items):
            ix, iy = x + dx * (k % wrap), y + 18 * (k // wrap)
            cx, cy, seg = ix + 12, iy - 4, [(ix, iy - 4), (ix + 24, iy - 4)]
            if kind == "bar":
                for pts in ([(cx, cy - 7), (cx, cy + 7)], [(cx - 5, cy - 7), (cx + 5, cy - 7)],
                            [(cx - 5, cy + 7), (cx + 5, cy + 7)]):
                    self.line(pts, c, 1.5)
            else:
                width, opacity = {"mean": (2.8, 1), "seed": (0.8, 0.45)}.get(kind, (1.3, 1))
                self.line(seg, c, width, dash, opacity)
            if kind in ("mean", "seed"):
                self.marker(cx, cy, c, r=4 if kind == "mean" else 2.2, opacity=1 if kind == "mean" else 0.6)
            elif kind == "paper":
                self.marker(cx, cy, c, "diamond", r=4, hollow=True)
            self.text(ix + 30, iy, label if len(label) <= 30 else label[:29] + "\u2026", size=11)

    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(self.out + ["</svg>"]) + "\n")


def order(m):
    return (list(NAMES).index(m) if m in NAMES else len(NAMES), m or "")


def palette(mixers):
    """A colour per mixer: KLA blue, GDN orange, others from SPARE, unknown (None) grey."""
    other = [m for m in mixers if m and m not in COLOURS]
    return {m: COLOURS.get(m) or (SPARE[other.index(m) % len(SPARE)] if m else "#777") for m in mixers}


def spread(vals, how):
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, m, m
    if how == "std":
        s = statistics.stdev(vals)
        return m, max(0.0, m - s), min(100.0, m + s)  # clipped to the possible accuracies
    return m, min(vals), max(vals)


# ---- the figures -----------------------------------------------------------------------------

def accuracy_svg(path, runs, args, colours):
    mixers = sorted({r.mixer for r in runs}, key=order)
    factors = sorted({f for r in runs for f in r.final})
    paper = {m: PAPER[m] for m in mixers if m in PAPER} if args.paper else {}
    vals = [v for r in runs for v in r.final.values()] + [v for p in paper.values() for v in p.values()]
    stats = {m: {f: spread([r.final[f] for r in runs if r.mixer == m and f in r.final], args.spread)
                 for f in factors if any(f in r.final for r in runs if r.mixer == m)} for m in mixers}
    vals += [v for s in stats.values() for t in s.values() for v in t]
    yt, lo, hi = nice_ticks(max(0.0, min(vals) - 2), min(100.0, max(vals) + 1))
    n_seeds = {m: sum(r.mixer == m for r in runs) for m in mixers}
    sub = (f"trained at length {args.train_len}; the best validation checkpoint of each run; "
           + ", ".join(f"{NAMES.get(m, m)}: {n_seeds[m]} seed{'s' * (n_seeds[m] > 1)}" for m in mixers))
    svg = Svg("MQAR: accuracy against evaluation length", sub)
    l2 = [math.log2(f) for f in factors]
    xa = Axis(min(l2) - 0.35, max(l2) + 0.35, 75, 560)
    ya = Axis(lo, hi + (hi - lo) * 0.03, 440, 60)  # headroom: markers at 100% clear the frame
    svg.frame(xa, ya, l2, yt, f"evaluation length (tokens; training length {args.train_len})", "accuracy (%)",
              xfmt=lambda t: f"{round(args.train_len * 2 ** t)}\n{round(2 ** t)}\u00d7")
    for k, m in enumerate(mixers):
        c, off = colours[m], 0.06 * (k - (len(mixers) - 1) / 2)  # the mixers side by side
        X = lambda f: xa(math.log2(f) + off)
        for r in runs:
            if r.mixer == m:
                svg.group("run", mixer=m, seed=r.seed)
                svg.line([(X(f), ya(v)) for f, v in sorted(r.final.items())], c, 0.8, opacity=0.45)
                for f, v in r.final.items():
                    svg.marker(X(f), ya(v), c, r=2.2, opacity=0.6)
                svg.end()
        svg.group("mean", mixer=m)
        for f, (mean, a, b) in stats[m].items():
            if b > a:
                x = X(f)
                svg.line([(x, ya(a)), (x, ya(b))], c, 1.5)
                for v in (a, b):
                    svg.line([(x - 5, ya(v)), (x + 5, ya(v))], c, 1.5)
        svg.line([(X(f), ya(s[0])) for f, s in stats[m].items()], c, 2.8)
        for f, s in stats[m].items():
            svg.marker(X(f), ya(s[0]), c, r=4)
        svg.end()
        if m in paper:
            svg.group("paper", mixer=m)
            pts = [(X(f), ya(v)) for f, v in sorted(paper[m].items()) if f in factors]
            svg.line(pts, c, 1, dash="2,3")
            for x, y in pts:
                svg.marker(x, y, c, "diamond", r=4, hollow=True)
            svg.end()
    how = "min\u2013max" if args.spread == "minmax" else "\u00b11 std"
    items = []
    for m in mixers:
        name, c = NAMES.get(m, m), colours[m]
        items += [(f"{name}: mean over seeds", "mean", c, "")]
        items += [(f"{name}: {how} over seeds", "bar", c, "")] if n_seeds[m] > 1 else []
        items += [(f"{name}: each seed", "seed", c, "")]
        items += [(f"{name}: paper (1 seed)", "paper", c, "2,3")] if m in paper else []
    svg.legend(585, 72, items)
    svg.save(path)


def curves_svg(path, runs, colours):
    last = max([max(r.losses, default=0) for r in runs] + [max(r.evals, default=0) for r in runs] + [1])
    size = max(1, math.ceil(last / 300))  # bucket means: at most ~300 points a line
    losses = {}
    for r in runs:
        b = {}
        for s, v in r.losses.items():
            if v > 0 and math.isfinite(v):
                b.setdefault((s - 1) // size, []).append((s, v))
        losses[r] = [(statistics.fmean(s for s, _ in p), statistics.fmean(v for _, v in p))
                     for _, p in sorted(b.items())]
    lv = [v for pts in losses.values() for _, v in pts] or [1.0]
    llo, lhi = min(lv) / 1.15, max(lv) * 1.15
    xt, _, xhi = nice_ticks(0, last, 5)
    note = f"training loss: mean of each {size} steps" if size > 1 else "training loss: every step"
    rows = math.ceil(len(runs) / 4)
    svg = Svg("MQAR: training curves", f"{note}; the ring marks the best validation step (the final checkpoint)",
              height=max(H, 450 + 18 * rows))
    panels = [(Axis(0, xhi, 75, 370), Axis(llo, lhi, 380, 60, log=True)),
              (Axis(0, xhi, 480, 775), Axis(0, 103, 380, 60))]
    svg.frame(*panels[0], xt, log_ticks(llo, lhi), "step", "training loss (log scale)")
    svg.frame(*panels[1], xt, nice_ticks(0, 100, 5)[0], "step", "validation accuracy (%)")
    (xa, ya), (xb, yb) = panels
    items, dots = [], max(len(r.evals) for r in runs) <= 30
    for m in dict.fromkeys(r.mixer for r in runs):
        for k, r in enumerate(r for r in runs if r.mixer == m):
            c, dash = colours[m], DASHES[k % len(DASHES)]  # a dash pattern per run of the mixer
            svg.group("loss", run=r.label)
            svg.line([(xa(s), ya(v)) for s, v in losses[r]], c, 1.3, dash, opacity=0.85)
            svg.end()
            svg.group("validation", run=r.label)
            ev = sorted(r.evals.items())
            svg.line([(xb(s), yb(v)) for s, v in ev], c, 1.3, dash, opacity=0.85)
            for s, v in ev if dots else ():
                svg.marker(xb(s), yb(v), c, r=1.8)
            if r.final is not None and r.best in r.evals:
                svg.marker(xb(r.best), yb(r.evals[r.best]), c, r=5.5, hollow=True)
            svg.end()
            items.append((r.label, "line", c, dash))
    svg.legend(60, 448, items, dx=185, wrap=4)
    svg.save(path)


def table(runs, args):
    seeds = sorted({r.seed for r in runs})
    head = ["mixer", "length"] + [f"seed {s}" for s in seeds] + ["mean", "std", "min\u2013max"]
    head += ["paper"] if args.paper else []
    rows = []
    for m in sorted({r.mixer for r in runs}, key=order):
        rs = {r.seed: r for r in runs if r.mixer == m}
        keys = sorted({f for r in rs.values() for f in r.final}) + ["test"]
        for f in keys:
            got = {s: (r.test if f == "test" else r.final.get(f)) for s, r in rs.items()}
            vals = [v for v in got.values() if v is not None]
            length = f"test, {args.train_len}" if f == "test" else f"{args.train_len * f} ({f}\u00d7)"
            row = [NAMES.get(m, m), length] + [f"{got[s]:.2f}" if got.get(s) is not None else "" for s in seeds]
            row += [f"{statistics.fmean(vals):.2f}", f"{statistics.stdev(vals):.2f}" if len(vals) > 1 else "",
                    f"{min(vals):.2f}\u2013{max(vals):.2f}" if len(vals) > 1 else ""]
            if args.paper:
                row.append(f"{PAPER[m][f]:.2f}" if f in PAPER.get(m, {}) else "")
            rows.append(row)
        # how long each run trained and where its best checkpoint was: a run that early
        # stopping ended on the chance plateau shows as a short run with an early best
        row = [NAMES.get(m, m), "steps (best)"] + [f"{max(rs[s].losses)} ({rs[s].best})" if s in rs and rs[s].losses
                                                    else "" for s in seeds]
        rows.append(row + ["", "", ""] + ([""] if args.paper else []))
    wid = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(cells, wid))) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if i >= 2 else "-" * (w + 2) for i, w in enumerate(wid)) + "|"
    note = ("\nAccuracy (%) of each run's best validation checkpoint, by evaluation length (training length "
            f"{args.train_len}); steps (best): the steps a run trained and the step of its best checkpoint; "
            "std: sample standard deviation over seeds"
            + ("; paper: the KLA paper's MQAR table, one seed" if args.paper else "") + ".\n")
    return "\n".join([line(head), rule] + [line(r) for r in rows]) + "\n" + note


def main(argv=None):
    ap = argparse.ArgumentParser(description="Figures and a table from kla train's MQAR logs.")
    ap.add_argument("logs", nargs="+", metavar="LOG", help="JSON-lines logs of kla train --log")
    ap.add_argument("--out", default=".", help="folder of accuracy.svg and curves.svg (default .)")
    ap.add_argument("--paper", action="store_true", help="the KLA paper's MQAR accuracies as hollow markers")
    ap.add_argument("--train-len", type=int, default=256, help="the training length, for labels (default 256)")
    ap.add_argument("--table", metavar="FILE", help="also write the table (Markdown) to FILE")
    ap.add_argument("--spread", choices=("minmax", "std"), default="minmax",
                    help="error bars: min-max over seeds (default) or +-1 sample standard deviation")
    args = ap.parse_args(argv)
    if args.train_len < 1:
        ap.error("--train-len: expected a positive integer")
    warn = lambda msg: print(f"plot_mqar: {msg}", file=sys.stderr)
    runs, failed, done = [], False, {}
    for p in args.logs:
        try:
            r = load(p, warn)
        except LogError as e:
            warn(f"{e}: left out")
            failed = True
            continue
        if r.final is None:
            warn(f"{p}: no final evaluation (an unfinished run?): left out of accuracy.svg and the table")
            r.label = f"{r.name} (unfinished)"
        else:
            r.label = f"{NAMES.get(r.mixer, r.mixer)} seed {r.seed}"
            if (r.mixer, r.seed) in done:
                warn(f"{p}: {r.mixer} seed {r.seed} again (first in {done[r.mixer, r.seed].path}): "
                     "left out of accuracy.svg and the table")
                r.label, r.final = f"{r.label} ({r.name})", None
            else:
                done[r.mixer, r.seed] = r
        runs.append(r)
    if not runs:
        warn("no readable log")
        return 1
    runs.sort(key=lambda r: (order(r.mixer), r.seed or 0, r.name))
    colours = palette(dict.fromkeys(r.mixer for r in runs))
    complete = [r for r in runs if r.final]
    try:
        os.makedirs(args.out, exist_ok=True)
        curves_svg(os.path.join(args.out, "curves.svg"), runs, colours)
        if not complete:
            warn("no run with a final evaluation: accuracy.svg and the table not written")
            return int(failed)
        accuracy_svg(os.path.join(args.out, "accuracy.svg"), complete, args, colours)
        text = table(complete, args)
        print(text, end="")
        if args.table:
            with open(args.table, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        warn(f"cannot write: {e}")
        return 1
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
