#!/usr/bin/env python3
"""Mutation fuzzer of every file-reading command of kla (and examples/validate).

    /usr/bin/python3 tests/mutate.py --kla BUILD/kla --validate BUILD/examples/validate \\
        [--src DIR] [--seconds S] [--seed N] [--index I] [--findings DIR] [--jobs J]

Takes seed files (the small golden cases, tests/fuzz-corpus/valid_*.safetensors and a few
cases written here with cu_seqlens, h0, do and dht), derives mutants from them and feeds
each mutant to every command of COMMANDS below. Mutant I of seed N is a function of
(N, I) only: `--seed N --index I[,J..]` rebuilds and reruns exactly those.

Mutations, one to three stacked per mutant:
  bytes   random bit flips, byte overwrites, truncation (inside the header or the data),
          inserted or appended bytes, a wrong header length field;
  header  edits of the parsed JSON header, rewritten: dtypes (valid, unsupported, invalid,
          not a string), shapes (dims +-1, 0, negative, huge, extra or missing dims, not a
          list), data_offsets, tensors renamed (to spec names and to names the spec does not
          define, e.g. initial_state), swapped, duplicated, removed, reordered,
          __metadata__ keys and values added, removed or altered (mode, scale incl. "0",
          eps, l2norm_*, state_layout, unknown keys, non-string values), the JSON text
          spliced;
  targeted  cu_seqlens values (negative, decreasing, > T, first != 0, huge, int32 overflow,
          wrong N+1, other dtypes and ranks; added where there was none), float values
          (NaN, Inf, huge, denormal, zeros, a zero key row, g > 0).
Shape, dtype, rename and value edits rewrite the data to match (most of the time), so a
mutant passes the reader's offset checks and reaches what comes after it.

A finding: a sanitizer report on stderr (AddressSanitizer, "runtime error:",
LeakSanitizer), a death by signal (rc < 0 or >= 128), another exit code than 0, 1 or 2,
exit 1 or 2 with nothing said, a timeout, an output file left behind by a failed run, an
output file that is not a readable safetensors file, or NaN/Inf in the output of a
successful run whose inputs were well posed (finite, moderate, each step a contraction:
see well_posed; eta = 100 or v = 1e38 overflow in any implementation). Each distinct
finding (command, kind, sanitizer summary and first frame) is saved once under
--findings: the mutant, the seed it came from, cmd.sh (the command, with the
environment) and report.txt. The first mutants (index < number of seeds) are the seeds
themselves, unmodified.

Memory: under ASan each run gets allocator_may_return_null=1, max_allocation_size_mb and
hard_rss_limit_mb (--mem-mb), so a header that claims a huge shape gets NULL from malloc
(a clean "out of memory" error is fine) instead of taking the machine; without ASan the
address space of the runs is limited (RLIMIT_AS).

Output: TAP, one line per command family (ok N - FAMILY on M mutants), then 1..N.
Exit 0 if nothing was found, 1 otherwise, 2 on a usage error.
"""
import argparse
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import numpy as np

# mutants hold NaN, Inf and values that overflow when converted; numpy's error state is
# per thread (Fuzzer.worker sets it too), warnings filters are not
np.seterr(all="ignore")
warnings.filterwarnings("ignore", category=RuntimeWarning)

# ---- the commands --------------------------------------------------------------------
# Placeholders: {kla} {validate} the binaries, {in} the mutant, {out} an output path
# (absent before the run), {orig} the seed the mutant came from, {dir} a folder that holds
# only the mutant. out=True: the command writes {out} (checked for leftovers on failure
# and for NaN/Inf on success). probe: run once at start; the family is skipped (with a
# comment, not counted) unless it exits 0 and its output contains probe_text, so commands
# that later versions of kla add can be listed here ahead of time.
COMMANDS = [
    dict(family="forward", argv=["{kla}", "forward", "{in}", "-o", "{out}"], out=True),
    dict(family="backward", argv=["{kla}", "backward", "{in}", "-o", "{out}"], out=True),
    dict(family="forward --algo chunk", out=True,
         argv=["{kla}", "forward", "--algo", "chunk", "--chunk-size", "16", "{in}", "-o", "{out}"]),
    dict(family="backward --algo chunk", out=True,
         argv=["{kla}", "backward", "--algo", "chunk", "--chunk-size", "16", "{in}", "-o", "{out}"]),
    dict(family="decode", argv=["{kla}", "decode", "{in}", "-o", "{out}"], out=True),
    dict(family="verify GOT", argv=["{kla}", "verify", "{in}", "--against", "{orig}"]),
    dict(family="verify REF", argv=["{kla}", "verify", "{orig}", "--against", "{in}"]),
    dict(family="golden check", argv=["{kla}", "golden", "check", "--dir", "{dir}"]),
    dict(family="examples/validate", argv=["{validate}", "{in}"]),
    dict(family="bench --in", argv=["{kla}", "bench", "--in", "{in}"],
         probe=["{kla}", "bench", "--help"], probe_text="--in"),
    dict(family="layer backward", argv=["{kla}", "layer", "backward", "{in}", "-o", "{out}"],
         out=True, probe=["{kla}", "layer", "--help"], probe_text="backward"),
    dict(family="model step", argv=["{kla}", "model", "step", "{in}", "-o", "{out}"],
         out=True, probe=["{kla}", "model", "--help"], probe_text="step"),
]

SANITIZER = re.compile(r"ERROR: AddressSanitizer|runtime error:|LeakSanitizer|"
                       r"ERROR: UndefinedBehaviorSanitizer|hard rss limit")

# ---- safetensors ---------------------------------------------------------------------
NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
      "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "u1"}
SIZE = {k: np.dtype(v).itemsize for k, v in NP.items()}
SIZE.update({"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1})
FLOAT = ("F32", "F64")
INPUTS = ("q", "k", "v", "g", "eta", "beta", "h0", "cu_seqlens", "do", "dht")


class Obj(list):
    """A JSON object as a list of (key, value) pairs: keeps order and duplicate keys."""

    def get(self, key, default=None):
        for k, v in self:
            if k == key:
                return v
        return default


def dump(x):
    if isinstance(x, Obj):
        return "{" + ",".join(dump(str(k)) + ":" + dump(v) for k, v in x) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(dump(v) for v in x) + "]"
    if isinstance(x, bool) or x is None:
        return json.dumps(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return json.dumps(x)  # NaN, Infinity: not JSON, which is the point
    return json.dumps(x)


def frame(header_bytes, data):
    header_bytes += b" " * ((-(8 + len(header_bytes))) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


class Case:
    """A valid file taken apart: metadata (Obj or None) and tensors [name, dtype, shape, raw]."""

    def __init__(self, meta, tensors):
        self.meta, self.tensors = meta, tensors

    def copy(self):
        meta = None if self.meta is None else Obj(list(self.meta))
        return Case(meta, [[n, d, list(s), r] for n, d, s, r in self.tensors])

    def find(self, name):
        for t in self.tensors:
            if t[0] == name:
                return t
        return None

    def build(self):
        """(header Obj, data bytes) with offsets that match."""
        hdr, data, off = Obj(), [], 0
        if self.meta is not None:
            hdr.append(("__metadata__", self.meta))
        for name, dt, shape, raw in self.tensors:
            hdr.append((name, Obj([("dtype", dt), ("shape", shape),
                                   ("data_offsets", [off, off + len(raw)])])))
            data.append(raw)
            off += len(raw)
        return hdr, b"".join(data)


def parse(buf):
    """A strict reading: Case, or None when buf is not a well-formed file of known dtypes."""
    try:
        if len(buf) < 8:
            return None
        (n,) = struct.unpack("<Q", buf[:8])
        if n > len(buf) - 8:
            return None
        hdr = json.loads(buf[8:8 + n].decode("utf-8"), object_pairs_hook=Obj)
        if not isinstance(hdr, Obj):
            return None
        data = buf[8 + n:]
        meta, tensors, seen = None, [], set()
        for name, e in hdr:
            if name in seen:
                return None
            seen.add(name)
            if name == "__metadata__":
                meta = e
                continue
            if not isinstance(e, Obj):
                return None
            dt, shape, off = e.get("dtype"), e.get("shape"), e.get("data_offsets")
            if dt not in SIZE or not isinstance(shape, list) or not isinstance(off, list):
                return None
            if len(off) != 2 or any(type(x) is not int or x < 0 for x in shape + off):
                return None
            if off[1] < off[0] or off[1] > len(data) or \
                    off[1] - off[0] != int(np.prod(shape, dtype=object)) * SIZE[dt]:
                return None
            tensors.append([name, dt, shape, data[off[0]:off[1]]])
        return Case(meta, tensors)
    except (ValueError, UnicodeDecodeError, struct.error, TypeError, OverflowError,
            RecursionError):
        return None


def well_posed(case, bound):
    """True when the operator's result is finite in exact arithmetic and stays far from
    float32 overflow: every input finite, |x| <= bound (g: any value <= 0), scale and eps
    within bound, ||k_t||^2 + eps >= 1e-6 and each step a contraction (mode kla: eta in
    [0, 2]; gdn: beta ||k||^2 in [0, 2]). Only there is NaN/Inf in an output a finding: a
    step of eta = 100 diverges, and huge inputs overflow, in any correct implementation."""
    try:
        ts = {t[0]: t for t in case.tensors}
        arr = {}
        for name in INPUTS:
            t = ts.get(name)
            if t is None or t[1] not in FLOAT:
                continue
            a = np.frombuffer(t[3], NP[t[1]]).astype(np.float64)
            if not np.isfinite(a).all():
                return False
            if (name == "g" and (a > 0).any()) or (name != "g" and (np.abs(a) > bound).any()):
                return False
            arr[name] = a
        meta = case.meta if isinstance(case.meta, Obj) else Obj()
        opt = {}
        for key, default in (("scale", 1.0), ("eps", 1e-6)):
            v = meta.get(key)
            opt[key] = default if v is None else float(v)
            if not (abs(opt[key]) <= bound):
                return False
        mode = meta.get("mode")
        mode = mode if isinstance(mode, str) else "kla" if "eta" in ts else "gdn"
        step = arr["eta" if mode == "kla" else "beta"]
        B, T, H, K = ts["k"][2]
        HV = ts["v"][2][2]
        k = arr["k"].reshape(B * T, H, K)
        if meta.get("l2norm_k") == "true":
            k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
        n2 = (k * k).sum(-1)
        if (n2 + max(opt["eps"], 0.0)).min() < 1e-6:
            return False
        n2 = n2[:, [hv // (HV // H) for hv in range(HV)]]
        step = step.reshape(B * T, HV)
        contraction = step if mode == "kla" else step * n2
        return bool(((contraction >= 0) & (contraction <= 2)).all())
    except (KeyError, ValueError, TypeError, ZeroDivisionError, IndexError, OverflowError):
        return False


def nonfinite_tensors(case):
    bad = []
    for name, dt, shape, raw in case.tensors:
        if dt in FLOAT:
            a = np.frombuffer(raw, NP[dt])
            n = int((~np.isfinite(a)).sum())
            if n:
                bad.append(f"{name}: {n} of {a.size} not finite")
    return bad


# ---- seeds ---------------------------------------------------------------------------

def synth_seeds():
    """Small valid cases with what the shipped small files lack: cu_seqlens I32 and I64
    with an empty sequence, h0, do, dht, gdn + vk + options."""
    rng = np.random.default_rng(20240601)

    def f32(*shape, lo=-1.0, hi=1.0):
        return rng.uniform(lo, hi, shape).astype("<f4").tobytes()

    out = []
    # kla, varlen (I32), h0, do, dht
    B, T, H, HV, K, V, N = 1, 7, 1, 2, 4, 3, 2
    ts = [["q", "F32", [B, T, H, K], f32(B, T, H, K)], ["k", "F32", [B, T, H, K], f32(B, T, H, K)],
          ["v", "F32", [B, T, HV, V], f32(B, T, HV, V)],
          ["g", "F32", [B, T, HV], f32(B, T, HV, lo=-2, hi=0)],
          ["eta", "F32", [B, T, HV], f32(B, T, HV, lo=0, hi=1)],
          ["h0", "F32", [N, HV, K, V], f32(N, HV, K, V)],
          ["cu_seqlens", "I32", [N + 1], np.array([0, 3, 7], "<i4").tobytes()],
          ["do", "F32", [B, T, HV, V], f32(B, T, HV, V)],
          ["dht", "F32", [N, HV, K, V], f32(N, HV, K, V)]]
    out.append(("synth_kla_varlen_i32", Case(Obj([("mode", "kla")]), ts)))
    # gdn, varlen (I64) with an empty sequence, vk layout, options
    B, T, H, HV, K, V, N = 1, 5, 1, 2, 2, 4, 3
    ts = [["q", "F32", [B, T, H, K], f32(B, T, H, K)], ["k", "F32", [B, T, H, K], f32(B, T, H, K)],
          ["v", "F32", [B, T, HV, V], f32(B, T, HV, V)],
          ["g", "F32", [B, T, HV], f32(B, T, HV, lo=-1, hi=0)],
          ["beta", "F32", [B, T, HV], f32(B, T, HV, lo=0, hi=1)],
          ["h0", "F32", [N, HV, V, K], f32(N, HV, V, K)],
          ["cu_seqlens", "I64", [N + 1], np.array([0, 2, 2, 5], "<i8").tobytes()],
          ["do", "F32", [B, T, HV, V], f32(B, T, HV, V)],
          ["dht", "F32", [N, HV, V, K], f32(N, HV, V, K)]]
    out.append(("synth_gdn_varlen_i64_vk", Case(Obj([
        ("mode", "gdn"), ("state_layout", "vk"), ("scale", "0.5"), ("eps", "1e-5"),
        ("l2norm_q", "true"), ("l2norm_k", "true")]), ts)))
    # kla, B = 2, h0 and do, no g, no metadata
    B, T, H, HV, K, V = 2, 3, 1, 1, 3, 2
    ts = [["q", "F32", [B, T, H, K], f32(B, T, H, K)], ["k", "F32", [B, T, H, K], f32(B, T, H, K)],
          ["v", "F32", [B, T, HV, V], f32(B, T, HV, V)],
          ["eta", "F32", [B, T, HV], f32(B, T, HV, lo=0, hi=1)],
          ["h0", "F32", [B, HV, K, V], f32(B, HV, K, V)],
          ["do", "F32", [B, T, HV, V], f32(B, T, HV, V)]]
    out.append(("synth_kla_B2_h0", Case(None, ts)))
    return out


def load_seeds(src, max_bytes, work):
    """[(name, path, Case)], sorted, so that a seed number means the same everywhere."""
    paths = []
    gdir = os.path.join(src, "golden")
    if os.path.isdir(gdir):
        paths += [os.path.join(gdir, f) for f in sorted(os.listdir(gdir))
                  if f.endswith(".safetensors") and os.path.getsize(os.path.join(gdir, f)) <= max_bytes]
    cdir = os.path.join(src, "tests", "fuzz-corpus")
    if os.path.isdir(cdir):
        paths += [os.path.join(cdir, f) for f in sorted(os.listdir(cdir))
                  if f.startswith("valid_") and f.endswith(".safetensors")]
    seeds = []
    for p in paths:
        with open(p, "rb") as f:
            case = parse(f.read())
        if case is not None:
            seeds.append((os.path.basename(p)[:-12], p, case))
    sdir = os.path.join(work, "seeds")
    os.makedirs(sdir, exist_ok=True)
    for name, case in synth_seeds():
        p = os.path.join(sdir, name + ".safetensors")
        hdr, data = case.build()
        with open(p, "wb") as f:
            f.write(frame(dump(hdr).encode(), data))
        seeds.append((name, p, case))
    return seeds


# ---- mutations -----------------------------------------------------------------------
HUGE_DIMS = [2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64,
             2**64 + 1, 10**30]
DTYPES_OK = ["F32", "F64", "I32", "I64"]
DTYPES_OTHER = ["F16", "BF16", "U8", "I8", "BOOL", "U64", "I16", "F8_E4M3"]
DTYPES_BAD = ["f32", "F128", "", "float32", " F32", "F32 ", "F3", "F32\u0000", "\u00c9"]
NAMES_ODD = ["initial_state", "h0_", "H0", "Q", "q ", "", "x" * 300, "q\u0000", "\u00e9ta",
             "__metadata__", "state", "a0", "g_atk", "beta_atk", "log_atk_scale", "dat", "at"]
NAMES_SPEC = list(INPUTS) + ["o", "ht", "dq", "dk", "dv", "dg", "deta", "dbeta", "dh0"]
META_KEYS = ["mode", "scale", "eps", "l2norm_q", "l2norm_k", "state_layout", "gate",
             "precond", "squash_x", "squash_eps", "tol_float32", "tol_bf16"]
META_ODD_KEYS = ["initial_state", "foo", "", "MODE", "scale ", "Scale", "l2norm", "layout",
                 "x" * 300]
META_VALUES = {
    "mode": ["kla", "gdn", "KLA", "", "deltanet", "kla ", "gdn\u0000"],
    "scale": ["0", "-1", "1", "1e-300", "1e300", "1e39", "-0", "nan", "inf", "-inf", "1e400",
              "0x10", "abc", "", " 1", "1,5", "1.5e", "0.125"],
    "eps": ["0", "-1e-6", "1e-6", "1", "1e300", "1e39", "nan", "inf", "1e-400", "", "x"],
    "l2norm_q": ["true", "false", "1", "0", "TRUE", "yes", ""],
    "l2norm_k": ["true", "false", "1", "0", "True", "no", ""],
    "state_layout": ["kv", "vk", "KV", "kk", "", "vk "],
    "gate": ["head", "channel", "none", ""],
    "precond": ["none", "atk", "ATK", ""],
    "squash_x": ["1.5", "1", "0", "-1", "nan"],
    "squash_eps": ["1e-6", "0", "-1"],
    "tol_float32": ["o=1e-05,ht=1e-05", "o=", "=,,=", "o=nan", "o=-1,ht=abc", ",",
                    "o=1e-5," * 200, "dq"],
    "tol_bf16": ["o=1", "", "o"],
}
META_ODD_VALUES = ["", " ", "nan", "inf", "0", "-0", "1e-320", "true", "\u00e9", "x" * 5000,
                   "\\", "\"", "1" * 400]
JSON_ODD = [1, -1, 1.5, None, True, [], Obj(), [1, 2], "1", Obj([("a", "b")]), 2**64]
TOKENS = [b"{", b"}", b"[", b"]", b"\"", b",", b":", b"\\", b"\\u0000", b"\\ud800", b"\xff",
          b"\xc3", b"null", b"-", b"1e999", b"00", b"-0", b" " * 7, b"\x00", b"\n",
          b"18446744073709551616", b"9223372036854775808", b"-9223372036854775809",
          b"[" * 300, b"{\"a\":" * 300]
BYTES_ODD = [0x00, 0xff, 0x7f, 0x80, 0x01, 0xfe, ord('"'), ord('['), ord(']'), ord('{'),
             ord('}'), ord(','), ord('-'), ord('9'), ord('0'), ord('e'), ord('\\'), ord(' ')]
VALUES = [float("nan"), float("inf"), float("-inf"), 3.4e38, -3.4e38, 1e30, -1e30, 1e20,
          1e10, 1e-45, -1e-45, 1e-38, 0.0, -0.0, 1.0, -1.0, 100.0, -1e4]


def np_of(dt):
    return NP.get(dt)


def resize(raw, n_bytes, rng):
    if n_bytes <= len(raw):
        return raw[:n_bytes]
    if not raw:
        return bytes(rng.getrandbits(8) for _ in range(min(n_bytes, 64))).ljust(n_bytes, b"\0")
    return (raw * (n_bytes // len(raw) + 1))[:n_bytes]


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def pick_tensor(rng, case, prefer=None):
    if not case.tensors:
        return None
    if prefer:
        c = [t for t in case.tensors if t[0] in prefer]
        if c and rng.random() < 0.7:
            return rng.choice(c)
    return rng.choice(case.tensors)


def seq_len(case):
    q = case.find("q")
    if q and len(q[2]) == 4 and all(isinstance(d, int) for d in q[2]):
        return q[2][0], q[2][1]
    return 1, 4


def m_dtype(rng, case):
    t = pick_tensor(rng, case)
    if t is None:
        return "dtype: no tensor"
    old = t[1]
    r = rng.random()
    new = rng.choice(DTYPES_OK if r < 0.4 else DTYPES_OTHER if r < 0.75 else DTYPES_BAD)
    if new == old:
        new = "F64" if old != "F64" else "F32"
    how = "data kept"
    if rng.random() < 0.8 and new in SIZE and isinstance(t[2], list) and \
            all(isinstance(d, int) and d >= 0 for d in t[2]) and numel(t[2]) <= 1 << 20:
        n = numel(t[2])
        if old in NP and new in NP and len(t[3]) == n * SIZE[old]:
            a = np.frombuffer(t[3], NP[old])
            with np.errstate(all="ignore"):
                t[3] = a.astype(NP[new]).tobytes()
            how = "values converted"
        else:
            t[3] = resize(t[3], n * SIZE[new], rng)
            how = "data resized"
    t[1] = new
    return f"dtype of {t[0]!r}: {old} -> {new!r} ({how})"


def m_shape(rng, case):
    t = pick_tensor(rng, case)
    if t is None:
        return "shape: no tensor"
    old = list(t[2])
    s = list(t[2])
    r = rng.randrange(9)
    if r == 0 and s:
        i = rng.randrange(len(s))
        s[i] += rng.choice([1, -1])
    elif r == 1 and s:
        s[rng.randrange(len(s))] = 0
    elif r == 2 and s:
        s[rng.randrange(len(s))] = rng.choice([-1, -2, -2**31, -2**63, -2**63 - 1])
    elif r == 3 and s:
        s[rng.randrange(len(s))] = rng.choice(HUGE_DIMS)
    elif r == 4:
        s.insert(rng.randrange(len(s) + 1), rng.choice([1, 1, 2, 0]))
    elif r == 5 and s:
        del s[rng.randrange(len(s))]
    elif r == 6:
        s = rng.choice([[], [numel(s)] if s else [1], s * 2, [1] * 9, [1] * 65])
    elif r == 7 and len(s) >= 2:
        i, j = rng.sample(range(len(s)), 2)
        s[i], s[j] = s[j], s[i]
    elif r == 8 and len(s) >= 2:
        i, j = rng.sample(range(len(s)), 2)
        s[i] *= 2
        s[j] = max(s[j] // 2, 0)
    else:
        s = s + [1]
    how = "data kept"
    if rng.random() < 0.75 and all(isinstance(d, int) and 0 <= d for d in s) and \
            numel(s) <= 1 << 20 and t[1] in SIZE:
        t[3] = resize(t[3], numel(s) * SIZE[t[1]], rng)
        how = "data resized"
    t[2] = s
    return f"shape of {t[0]!r}: {old} -> {s} ({how})"


def m_names(rng, case):
    if not case.tensors:
        return "names: no tensor"
    r = rng.randrange(7)
    t = pick_tensor(rng, case)
    if r == 0:
        old, t[0] = t[0], rng.choice(NAMES_ODD)
        return f"tensor {old!r} renamed {t[0]!r}"
    if r == 1:
        old, t[0] = t[0], rng.choice(NAMES_SPEC)
        return f"tensor {old!r} renamed {t[0]!r} (a spec name)"
    if r == 2 and len(case.tensors) >= 2:
        a, b = rng.sample(case.tensors, 2)
        a[0], b[0] = b[0], a[0]
        return f"tensors {b[0]!r} and {a[0]!r} swapped"
    if r == 3:
        name = rng.choice([t[0]] + NAMES_SPEC + NAMES_ODD[:2])
        case.tensors.insert(rng.randrange(len(case.tensors) + 1), [name, t[1], list(t[2]), t[3]])
        return f"tensor {t[0]!r} duplicated as {name!r}"
    if r == 4:
        case.tensors.remove(t)
        return f"tensor {t[0]!r} removed"
    if r == 5:
        rng.shuffle(case.tensors)
        return "tensors reordered"
    keep = rng.choice(case.tensors)
    case.tensors = [keep]
    return f"every tensor but {keep[0]!r} removed"


def m_meta(rng, case):
    if case.meta is None or not isinstance(case.meta, Obj):
        case.meta = Obj()
    m = case.meta
    r = rng.randrange(10)
    if r <= 4:
        key = rng.choice(META_KEYS) if rng.random() < 0.8 else rng.choice(META_ODD_KEYS)
        vals = META_VALUES.get(key, [])
        val = rng.choice(vals) if vals and rng.random() < 0.7 else rng.choice(META_ODD_VALUES)
        m[:] = [(k, v) for k, v in m if k != key] + [(key, val)]
        return f"__metadata__[{key!r}] = {val[:40]!r}"
    if r == 5 and m:
        k, v = m.pop(rng.randrange(len(m)))
        return f"__metadata__ key {k!r} removed"
    if r == 6:
        key = rng.choice(META_KEYS + META_ODD_KEYS)
        val = rng.choice(JSON_ODD)
        m.append((key, val))
        return f"__metadata__[{key!r}] = {dump(val)} (not a string)"
    if r == 7 and m:
        k, v = rng.choice(m)
        v2 = rng.choice(META_VALUES.get(k, META_ODD_VALUES))
        m.append((k, v2))
        return f"__metadata__ key {k!r} twice ({v!r}, then {v2!r})"
    if r == 8:
        case.meta = rng.choice(JSON_ODD[:9])
        return f"__metadata__ = {dump(case.meta)}"
    case.meta = None
    return "__metadata__ removed"


def m_cu(rng, case):
    B, T = seq_len(case)
    t = case.find("cu_seqlens")
    note = ""
    if t is None or t[1] not in ("I32", "I64") or len(t[3]) != numel(t[2]) * SIZE[t[1]]:
        n = rng.randint(1, 4)
        cuts = sorted(rng.randint(0, max(T, 0)) for _ in range(n - 1))
        vals = [0] + cuts + [T]
        dt = rng.choice(["I32", "I64"])
        if t is not None:
            case.tensors.remove(t)
        t = ["cu_seqlens", dt, [len(vals)], np.array(vals, NP[dt]).tobytes()]
        case.tensors.append(t)
        note = f"cu_seqlens {vals} {dt} added (B = {B}); "
        if rng.random() < 0.3:
            return note.rstrip("; ")
    dt = t[1]
    c = [int(x) for x in np.frombuffer(t[3], NP[dt])]
    old = list(c)
    n = len(c)
    r = rng.randrange(12)
    i = rng.randrange(n) if n else 0
    what = ""
    if r == 0 and n:
        c[i] = -rng.choice([1, 2, T, 2**31, 2**62])
        what = f"cu[{i}] negative"
    elif r == 1 and n >= 2:
        j = rng.randrange(1, n)
        c[j] = c[j - 1] - rng.randint(1, 3)
        what = f"cu[{j}] < cu[{j - 1}]"
    elif r == 2 and n:
        j = rng.choice([n - 1, i])
        c[j] = T + rng.choice([1, 2, 64, 1000])
        what = f"cu[{j}] > T"
    elif r == 3 and n:
        c[0] = rng.choice([1, -1, T, T + 1])
        what = "cu[0] != 0"
    elif r == 4 and n:
        c[-1] = T - rng.choice([1, T])
        what = "cu[N] < T"
    elif r == 5 and n:
        c[i] = rng.choice([2**31 - 1, 2**31, 2**32, 2**32 + c[i], 2**62, 2**63 - 1, -2**63])
        what = f"cu[{i}] huge"
    elif r == 6 and n:
        if dt == "I32":
            c = rng.choice([[0, 2**31 - 1, T], [-2**31, 0, T], [0, 2**31 - 1, -2**31 + T],
                            [0] + [2**30] * 3 + [T]])
            what = "int32 overflow of the differences"
        else:
            c[i] = c[i] + 2**32
            what = f"cu[{i}] + 2^32 (int32 truncation gives a valid value)"
    elif r == 7:
        c = rng.choice([c[:-1], c + [T], c + [T + 1], c[:1], [], [0] * 40 + [T], [0, T, T, T],
                        c[:1] + c])
        what = "N+1 entries wrong"
    elif r == 8:
        new = rng.choice(["I32", "I64", "F32", "F64", "U8", "I16", "U64"])
        with np.errstate(all="ignore"):
            t[3] = np.array(c, np.int64).astype(NP[new]).tobytes()
        t[1] = new
        return note + f"cu_seqlens dtype {dt} -> {new} (values converted)"
    elif r == 9:
        t[2] = rng.choice([[1, n], [n, 1], [], [n, 0], [1, 1, n]])
        return note + f"cu_seqlens shape [{n}] -> {t[2]}"
    elif r == 10:
        c = [0] * (n - 1) + [T] if n >= 2 else [0, T]
        what = "empty sequences"
    else:
        c = [rng.randint(-3, T + 3) for _ in range(n)]
        what = "random values"
    if dt == "I32":
        v = np.array([x & 0xffffffff for x in c], "<u4").view("<i4")
    else:
        v = np.array([x & 0xffffffffffffffff for x in c], "<u8").view("<i8")
    t[3] = v.tobytes()
    t[2] = [len(c)]
    return note + f"cu_seqlens ({dt}) {old[:8]} -> {[int(x) for x in v][:8]}: {what}"


def m_values(rng, case):
    fl = [t for t in case.tensors if t[1] in FLOAT and len(t[3]) == numel(t[2]) * SIZE[t[1]]]
    if not fl:
        return "values: no float tensor"
    inputs = [t for t in fl if t[0] in INPUTS]
    t = rng.choice(inputs if inputs and rng.random() < 0.85 else fl)
    a = np.frombuffer(t[3], NP[t[1]]).copy()
    if a.size == 0:
        return f"values of {t[0]!r}: empty"
    r = rng.randrange(6)
    if r == 0 and case.find("g") and case.find("g")[1] in FLOAT:
        t = case.find("g")
        a = np.frombuffer(t[3], NP[t[1]]).copy()
        if a.size == 0:
            return "values of 'g': empty"
        i = rng.randrange(a.size)
        a[i] = rng.choice([1e-30, 0.5, 100.0, 1e30])
        what = f"g[{i}] = {a[i]:g} > 0"
    elif r == 1:
        a[:] = 0
        what = "all zero"
    elif r == 2 and t[0] == "k" and len(t[2]) == 4 and t[2][3] > 0:
        row = rng.randrange(a.size // t[2][3])
        a[row * t[2][3]:(row + 1) * t[2][3]] = 0
        what = f"key row {row} zero"
    elif r == 3:
        x = rng.choice(VALUES)
        with np.errstate(all="ignore"):
            a[:] = x
        what = f"all = {x:g}"
    else:
        x = rng.choice(VALUES)
        idx = [rng.randrange(a.size) for _ in range(rng.choice([1, 1, 2, 5]))]
        with np.errstate(all="ignore"):
            a[idx] = x
        what = f"{idx[:5]} = {x:g}"
    t[3] = a.astype(NP[t[1]]).tobytes()
    return f"values of {t[0]!r}: {what}"


def h_offsets(rng, hdr, data_len):
    ents = [(k, e) for k, e in hdr if isinstance(e, Obj) and k != "__metadata__"]
    if not ents:
        return "offsets: no tensor"
    name, e = rng.choice(ents)
    off = e.get("data_offsets")
    b, en = off if isinstance(off, list) and len(off) == 2 else (0, 0)
    others = [x.get("data_offsets") for _, x in ents if x is not e]
    cands = [[en, b], [b, en + 1], [b - 1, en], [b + 4, en + 4], [b, data_len + 4],
             [b, 2**64], [b, 2**64 - 1], [2**63, 2**63 + (en - b)], [-1, en], [0, 0],
             [b, b], [data_len, data_len + (en - b)], [b], [b, en, en], [], "0",
             [float(b), float(en)], [str(b), str(en)], [b, en - 1], None]
    if others:
        cands.append(rng.choice(others))
    new = rng.choice(cands)
    e[:] = [(k, new if k == "data_offsets" else v) for k, v in e]
    return f"data_offsets of {name!r}: {off} -> {dump(new)}"


def h_entry(rng, hdr, data_len):
    ents = [i for i, (k, e) in enumerate(hdr) if isinstance(e, Obj) and k != "__metadata__"]
    r = rng.randrange(6)
    if r == 0 or not ents:
        new = rng.choice([[], "x", 1, None, Obj(), Obj([("__metadata__", Obj())])])
        hdr[:] = new if isinstance(new, Obj) else [("__replaced__", new)]  # see render()
        return f"header replaced by {dump(new)}"
    i = rng.choice(ents)
    name, e = hdr[i]
    if r == 1:
        key = rng.choice(["dtype", "shape", "data_offsets"])
        e[:] = [(k, v) for k, v in e if k != key]
        return f"{name!r}: key {key!r} removed"
    if r == 2:
        e.append((rng.choice(["extra", "dtype", "shape", "offsets"]), rng.choice(JSON_ODD)))
        return f"{name!r}: key {e[-1][0]!r} added"
    if r == 3:
        key = rng.choice(["dtype", "shape", "data_offsets"])
        val = rng.choice(JSON_ODD + [[1.5, 2], [[1]], ["1"], [True]])
        e[:] = [(k, val if k == key else v) for k, v in e]
        return f"{name!r}: {key} = {dump(val)}"
    if r == 4:
        hdr[i] = (name, rng.choice(JSON_ODD))
        return f"{name!r}: entry = {dump(hdr[i][1])}"
    hdr.insert(rng.randrange(len(hdr) + 1), (name, e))
    return f"{name!r}: entry twice (duplicate key)"


def render(hdr):
    if len(hdr) == 1 and hdr[0][0] == "__replaced__":
        return dump(hdr[0][1]).encode()
    return dump(hdr).encode("utf-8", "surrogatepass")


def t_splice(rng, hb):
    if not hb:
        return hb, "header text empty"
    r = rng.randrange(5)
    i = rng.randrange(len(hb) + 1)
    if r == 0:
        j = min(len(hb), i + rng.randint(1, 16))
        return hb[:i] + hb[j:], f"header text: bytes {i}..{j} deleted"
    if r == 1:
        j = min(len(hb), i + rng.randint(1, 32))
        return hb[:j] + hb[i:j] + hb[j:], f"header text: bytes {i}..{j} duplicated"
    if r == 2:
        tok = rng.choice(TOKENS)
        return hb[:i] + tok + hb[i:], f"header text: {tok[:20]!r} inserted at {i}"
    if r == 3:
        digits = [m for m in re.finditer(rb"\d+", hb)]
        if digits:
            m = rng.choice(digits)
            tok = rng.choice([b"18446744073709551616", b"9223372036854775807", b"-1",
                              b"4294967296", b"1e3", b"0.5", b"0" * 30 + b"1"])
            return hb[:m.start()] + tok + hb[m.end():], f"header text: number {m.group()!r} -> {tok!r}"
    pad = rng.choice([b"\x00" * 8, b"x", b" ,", b"}", b"\n" * 8])
    return hb + pad, f"header text: {pad!r} after the JSON"


def b_header_len(rng, buf, hlen):
    new = rng.choice([hlen + 1, hlen - 1, hlen + 8, hlen - 8, 0, 1, 7, len(buf) - 8, len(buf),
                      2**32, 2**32 + hlen, 2**63, 2**64 - 1, 2**31, max(hlen // 2, 0)])
    new &= 2**64 - 1
    return struct.pack("<Q", new) + buf[8:], f"header length {hlen} -> {new}"


def b_bitflip(rng, buf, hlen):
    b = bytearray(buf)
    k = rng.choice([1, 1, 2, 4, 8, 16])
    lim = 8 + hlen if rng.random() < 0.5 else len(b)
    pos = [rng.randrange(max(lim, 1)) for _ in range(k)] if b else []
    for p in pos:
        if p < len(b):
            b[p] ^= 1 << rng.randrange(8)
    return bytes(b), f"{k} bit flip(s) at {sorted(pos)[:8]}"


def b_overwrite(rng, buf, hlen):
    b = bytearray(buf)
    k = rng.randint(1, 8)
    pos = []
    for _ in range(k):
        if not b:
            break
        p = rng.randrange(8 + hlen if rng.random() < 0.6 else len(b)) % len(b)
        b[p] = rng.choice(BYTES_ODD) if rng.random() < 0.7 else rng.getrandbits(8)
        pos.append(p)
    return bytes(b), f"{k} byte(s) overwritten at {sorted(pos)[:8]}"


def b_truncate(rng, buf, hlen):
    r = rng.random()
    if r < 0.4:
        n = rng.randrange(min(8 + hlen + 1, len(buf) + 1))
        where = "in the header"
    elif r < 0.9 and len(buf) > 8 + hlen:
        n = rng.randrange(8 + hlen, len(buf))
        where = "in the data"
    else:
        n = max(len(buf) - rng.choice([1, 2, 3, 4, 8]), 0)
        where = "near the end"
    return buf[:n], f"truncated to {n} of {len(buf)} bytes ({where})"


def b_insert(rng, buf, hlen):
    r = rng.random()
    extra = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 3, 8, 64])))
    if r < 0.5:
        return buf + extra, f"{len(extra)} byte(s) appended"
    p = rng.randrange(len(buf) + 1)
    return buf[:p] + extra + buf[p:], f"{len(extra)} byte(s) inserted at {p}"


# (name, stage, weight, function); stage 0: Case edits, 1: header object, 2: header text,
# 3: whole file bytes
MUTATORS = [
    ("dtype", 0, 8, m_dtype), ("shape", 0, 11, m_shape), ("names", 0, 8, m_names),
    ("meta", 0, 10, m_meta), ("cu_seqlens", 0, 12, m_cu), ("values", 0, 10, m_values),
    ("offsets", 1, 5, h_offsets), ("entry", 1, 4, h_entry), ("splice", 2, 5, t_splice),
    ("header_len", 3, 4, b_header_len), ("bitflip", 3, 8, b_bitflip),
    ("overwrite", 3, 5, b_overwrite), ("truncate", 3, 6, b_truncate), ("insert", 3, 2, b_insert),
]


def make_mutant(seed, index, seeds):
    """(bytes, seed entry, [descriptions]) for mutant `index` of `seed`: deterministic."""
    if index < len(seeds):  # the first mutants are the seeds themselves
        with open(seeds[index][1], "rb") as f:
            return f.read(), seeds[index], ["unmodified seed"]
    rng = random.Random(f"kla-mutate:{seed}:{index}")
    entry = seeds[rng.randrange(len(seeds))]
    case = entry[2].copy()
    k = rng.choices([1, 2, 3], [60, 25, 15])[0]
    chosen = rng.choices(MUTATORS, [m[2] for m in MUTATORS], k=k)
    chosen.sort(key=lambda m: m[1])
    desc = []
    for _, stage, _, fn in chosen:
        if stage == 0:
            desc.append(fn(rng, case))
    hdr, data = case.build()
    for _, stage, _, fn in chosen:
        if stage == 1:
            desc.append(fn(rng, hdr, len(data)))
    hb = render(hdr)
    for _, stage, _, fn in chosen:
        if stage == 2:
            hb, d = fn(rng, hb)
            desc.append(d)
    hb += b" " * ((-(8 + len(hb))) % 8)
    buf = struct.pack("<Q", len(hb)) + hb + data
    for _, stage, _, fn in chosen:
        if stage == 3:
            buf, d = fn(rng, buf, len(hb))
            desc.append(d)
    return buf, entry, desc


# ---- running -------------------------------------------------------------------------

def is_asan(path):
    try:
        with open(path, "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


def signature(kind, detail):
    """What two findings of one bug share: no addresses, sizes, counts or values."""
    s = re.sub(r"0x[0-9a-f]+", "0x?", detail)
    if kind == "nonfinite":
        s = re.sub(r" of \d+ not finite", "", s)
    s = re.sub(r"==\d+==", "", s)
    if kind in ("leak", "nonfinite"):
        s = re.sub(r"\d+", "N", s)
    i = s.find("runtime error:")
    if i >= 0:
        s = s[:i] + re.sub(r"-?\d+", "N", s[i:])
    return s


def sanitizer_summary(err):
    """(summary line, where) of a sanitizer report in err: where is the first frame that is
    not the sanitizer's, plus the first frame in the command's own code (tools/, examples/)
    when that is another one, e.g. "kla__check_values validate.c:31 via run_op golden.c:331"."""
    lines = err.splitlines()
    summ = next((l.strip() for l in lines if l.startswith("SUMMARY:")), None)
    if summ is None:
        summ = next((l.strip() for l in lines if "runtime error:" in l or "ERROR:" in l), "?")
    top = via = ""
    for l in lines:
        if re.match(r"\s*#0 ", l) and top:
            break  # the first stack only (not the allocation's or the free's)
        m = re.match(r"\s*#\d+ 0x[0-9a-f]+ in (\S+) (\S+)", l)
        if not m or re.search(r"asan|ubsan|sanitizer|interceptor|libc\.so|malloc", l):
            continue
        here = f"{m.group(1)} {os.path.basename(m.group(2))}"
        if not top:
            top = here
        if re.search(r"/(tools|examples)/", m.group(2)):
            via = "" if here == top else here
            break
    return summ, top + (f" via {via}" if via else "")


class Fuzzer:
    def __init__(self, a, seeds, work, commands):
        self.a, self.seeds, self.work, self.commands = a, seeds, work, commands
        self.lock = threading.Lock()
        self.replay = list(a.index) if a.index is not None else None  # --index I,J,..
        self.next_index = 0
        self.runs = {c["family"]: 0 for c in commands}
        self.secs = {c["family"]: 0.0 for c in commands}
        self.findings = {}  # signature -> dict
        self.mutants = 0
        self.internal = []  # mutants on which this script failed
        self.deadline = time.monotonic() + a.seconds
        env = dict(os.environ)
        mem = a.mem_mb
        if a.asan:
            opts = env.get("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
            env["ASAN_OPTIONS"] = ":".join(
                [opts, "allocator_may_return_null=1", f"max_allocation_size_mb={mem // 2}",
                 f"hard_rss_limit_mb={mem}", "disable_coredump=1",
                 ]).strip(":")
            env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        self.env = env

    def take(self):
        with self.lock:
            if self.replay is not None:
                return self.replay.pop(0) if self.replay else None
            if time.monotonic() >= self.deadline or \
                    (self.a.max_mutants and self.next_index >= self.a.max_mutants):
                return None
            i = self.next_index
            self.next_index += 1
            return i

    def run_one(self, argv):
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=self.env, start_new_session=True)
        try:
            out, err = p.communicate(timeout=self.a.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            out, err = p.communicate()
            timed_out = True
        return (p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                timed_out, time.monotonic() - t0)

    def worker(self, wid):
        np.seterr(all="ignore")
        wdir = os.path.join(self.work, f"w{wid}")
        cdir = os.path.join(wdir, "case")
        os.makedirs(cdir, exist_ok=True)
        mpath = os.path.join(cdir, "m.safetensors")
        opath = os.path.join(wdir, "out.safetensors")
        while True:
            index = self.take()
            if index is None:
                return
            try:
                self.one_mutant(index, mpath, opath, cdir)
            except Exception:  # a bug of this script: say so, fail, go on
                with self.lock:
                    self.internal.append(index)
                    print(f"# mutate.py: internal error on mutant {index}:\n# " +
                          traceback.format_exc().replace("\n", "\n# "), flush=True)

    def one_mutant(self, index, mpath, opath, cdir):
        buf, entry, desc = make_mutant(self.a.seed, index, self.seeds)
        with open(mpath, "wb") as f:
            f.write(buf)
        parsed = parse(buf)
        finite = parsed is not None and well_posed(parsed, self.a.finite_bound)
        for cmd in self.commands:
            if self.a.index is None and time.monotonic() > self.deadline + self.a.timeout:
                return
            if os.path.exists(opath):
                os.unlink(opath)
            subst = {"{kla}": self.a.kla, "{validate}": self.a.validate, "{in}": mpath,
                     "{out}": opath, "{orig}": entry[1], "{dir}": cdir}
            argv = [subst.get(x, x) for x in cmd["argv"]]
            rc, out, err, timed_out, secs = self.run_one(argv)
            problem = self.judge(cmd, rc, out, err, timed_out, opath, finite)
            with self.lock:
                self.runs[cmd["family"]] += 1
                self.secs[cmd["family"]] += secs
            if problem:
                self.record(cmd, argv, problem, index, entry, desc, buf, rc, out, err, opath)
        with self.lock:
            self.mutants += 1

    def judge(self, cmd, rc, out, err, timed_out, opath, finite):
        """(kind, detail) or None."""
        if timed_out:
            return ("timeout", f"no exit after {self.a.timeout}s")
        if SANITIZER.search(err):
            summ, fr = sanitizer_summary(err)
            kind = "leak" if "LeakSanitizer" in err and "leaked" in summ else "sanitizer"
            if "hard rss limit" in err:
                kind = "memory"
            return (kind, summ + (f" [{fr}]" if fr else ""))
        if rc < 0 or rc >= 128:
            sig = -rc if rc < 0 else rc - 128
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return ("signal", f"killed by {name} (rc {rc})")
        if rc not in (0, 1, 2):
            return ("exit-code", f"exit {rc}")
        if rc != 0 and not out.strip() and not err.strip():
            return ("silent", f"exit {rc} with nothing on stdout or stderr")
        if cmd.get("out"):
            exists = os.path.exists(opath)
            if rc != 0 and exists:
                return ("output-left", f"exit {rc} but {os.path.basename(opath)} was written")
            if rc == 0 and not exists:
                return ("no-output", "exit 0 but no output file")
            if rc == 0:
                with open(opath, "rb") as f:
                    res = parse(f.read())
                if res is None:
                    return ("bad-output", "exit 0 but the output is not a readable safetensors file")
                bad = nonfinite_tensors(res)
                if bad and finite:
                    return ("nonfinite", "well-posed inputs, exit 0, output " + "; ".join(bad[:3]))
        return None

    def record(self, cmd, argv, problem, index, entry, desc, buf, rc, out, err, opath):
        kind, detail = problem
        sig = (cmd["family"], kind, signature(kind, detail))
        with self.lock:
            f = self.findings.get(sig)
            if f:
                f["count"] += 1
                return
            n = len(self.findings) + 1
            fam = re.sub(r"[^A-Za-z0-9]+", "-", cmd["family"]).strip("-")
            d = os.path.join(self.a.findings, f"s{self.a.seed}-m{index}-{fam}-{kind}")
            self.findings[sig] = f = dict(count=1, dir=d, family=cmd["family"], kind=kind,
                                          detail=detail, index=index)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(os.path.join(d, "orig"))
        mut = os.path.join(d, "mutant.safetensors")
        with open(mut, "wb") as fh:
            fh.write(buf)
        orig = os.path.join(d, "orig", os.path.basename(entry[1]))
        shutil.copyfile(entry[1], orig)
        wdir = os.path.dirname(opath)
        rep = []
        for x in argv:
            if x.endswith("m.safetensors") and os.path.dirname(x) == os.path.join(wdir, "case"):
                rep.append(mut)
            elif x == os.path.join(wdir, "case"):
                rep.append(d)
            elif x == opath:
                rep.append(os.path.join(tempfile.gettempdir(), "kla-mutate-out.safetensors"))
            elif x == entry[1]:
                rep.append(orig)
            else:
                rep.append(x)
        envs = [f"{k}={shlex.quote(self.env[k])}" for k in
                ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS", "LD_PRELOAD") if self.env.get(k)]
        line = " ".join(shlex.quote(x) for x in rep)
        f["command"] = line
        f["mutation"] = "; ".join(desc)
        with open(os.path.join(d, "cmd.sh"), "w") as fh:
            fh.write("#!/bin/sh\n# %s: %s: %s\n# seed %d, mutant %d, from %s: %s\n"
                     "# replay: tests/mutate.py --seed %d --index %d ...\n%s \\\n  %s\n" % (
                         cmd["family"], kind, detail, self.a.seed, index, entry[0],
                         "; ".join(desc), self.a.seed, index, " ".join(envs), line))
        with open(os.path.join(d, "report.txt"), "w") as fh:
            fh.write(f"command: {line}\nfamily: {cmd['family']}\nkind: {kind}\n"
                     f"detail: {detail}\nexit: {rc}\nseed: {self.a.seed} mutant: {index}\n"
                     f"from: seed {entry[0]} (a copy: {orig})\nmutation: {'; '.join(desc)}\n\n"
                     f"--- stdout (tail)\n{out[-4000:]}\n--- stderr (tail)\n{err[-12000:]}\n")
        with self.lock:
            print(f"# FINDING {n}: {cmd['family']}: {kind}: {detail}\n"
                  f"#   mutant {index} of seed {self.a.seed} (from {entry[0]}): {'; '.join(desc)}\n"
                  f"#   {line}\n#   saved in {d}", flush=True)


def probe(cmd, a, env):
    if "probe" not in cmd:
        return True
    argv = [a.kla if x == "{kla}" else a.validate if x == "{validate}" else x for x in cmd["probe"]]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and cmd.get("probe_text", "") in p.stdout + p.stderr


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kla", required=True, help="the kla binary")
    ap.add_argument("--validate", required=True, help="examples/validate binary")
    ap.add_argument("--src", default=os.path.dirname(here), help="the repository (for seeds)")
    ap.add_argument("--seconds", type=float, default=60, help="time bound (default 60)")
    ap.add_argument("--seed", type=int, default=None, help="replay this seed (default: random)")
    ap.add_argument("--index", type=lambda x: [int(i) for i in x.split(",")], default=None,
                    help="run only mutants I (I,J,..) of --seed")
    ap.add_argument("--max-mutants", type=int, default=0, help="stop after this many (0: no limit)")
    ap.add_argument("--timeout", type=float, default=20, help="per run, seconds (default 20)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel workers")
    ap.add_argument("--mem-mb", type=int, default=2048, help="memory per run (default 2048)")
    ap.add_argument("--max-seed-kb", type=int, default=200, help="largest golden seed used")
    ap.add_argument("--findings", default=os.path.join(tempfile.gettempdir(), "mutate-findings"),
                    help="where findings are saved (default $TMPDIR/mutate-findings)")
    ap.add_argument("--finite-bound", type=float, default=1e3,
                    help="NaN/Inf out is a finding when the inputs are well posed: finite, "
                    "within this bound (1e3) and more (see well_posed)")
    ap.add_argument("--only", action="append", help="command families to run (repeatable)")
    a = ap.parse_args()
    a.kla, a.validate = os.path.abspath(a.kla), os.path.abspath(a.validate)
    for p in (a.kla, a.validate):
        if not os.access(p, os.X_OK):
            print(f"mutate.py: {p}: not an executable", file=sys.stderr)
            return 2
    if a.index is not None and a.seed is None:
        print("mutate.py: --index needs --seed", file=sys.stderr)
        return 2
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1, 2**31)
    a.asan = is_asan(a.kla) or is_asan(a.validate)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not a.asan:  # ASan reserves terabytes of address space: limit only without it
        lim = a.mem_mb * 2 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    print(f"# mutate.py --seed {a.seed} ({'ASan' if a.asan else 'no ASan'}, "
          f"{a.seconds:g} s, {a.jobs} jobs, findings in {a.findings})", flush=True)
    os.makedirs(a.findings, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kla-mutate.") as work:
        seeds = load_seeds(a.src, a.max_seed_kb * 1024, work)
        if not seeds:
            print(f"mutate.py: no seed file under {a.src}", file=sys.stderr)
            return 2
        print(f"# {len(seeds)} seeds: " + " ".join(s[0] for s in seeds), flush=True)
        commands = []
        probe_env = dict(os.environ)
        for c in COMMANDS:
            if a.only and c["family"] not in a.only:
                continue
            if probe(c, a, probe_env):
                commands.append(c)
            else:
                print(f"# skipped: {c['family']} (not in this kla)", flush=True)
        fz = Fuzzer(a, seeds, work, commands)
        t0 = time.monotonic()
        threads = [threading.Thread(target=fz.worker, args=(w,), daemon=True)
                   for w in range(max(min(a.jobs, len(a.index or [0] * a.jobs)), 1))]
        for t in threads:
            t.start()
        last = t0
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=1)
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                print(f"# {fz.mutants} mutants, {len(fz.findings)} findings, "
                      f"{last - t0:.0f} s", flush=True)
        secs = time.monotonic() - t0
    print(f"# {fz.mutants} mutants in {secs:.1f} s ({fz.mutants / max(secs, 1e-9):.2f}/s), "
          f"{sum(fz.runs.values())} runs, {len(fz.findings)} distinct findings "
          f"({sum(f['count'] for f in fz.findings.values())} in all)", flush=True)
    for n, c in enumerate(commands, 1):
        fam = c["family"]
        mine = [f for f in fz.findings.values() if f["family"] == fam]
        ms = 1000 * fz.secs[fam] / max(fz.runs[fam], 1)
        if not mine:
            print(f"ok {n} - {fam} on {fz.runs[fam]} mutants ({ms:.0f} ms a run)")
            continue
        f = mine[0]
        print(f"not ok {n} - {fam} on {fz.runs[fam]} mutants ({ms:.0f} ms a run): "
              f"{len(mine)} distinct findings, "
              f"first: {f['kind']}: {f['detail']}")
        for f in mine:
            print(f"#   {f['kind']} x{f['count']}: {f['detail']}\n#     mutation: {f.get('mutation')}"
                  f"\n#     {f.get('command')}")
    n = len(commands)
    if fz.internal:
        n += 1
        print(f"not ok {n} - mutate.py itself: internal error on {len(fz.internal)} mutants "
              f"(first: --seed {a.seed} --index {fz.internal[0]})")
    print(f"1..{n}")
    return 1 if fz.findings or fz.internal else 0


if __name__ == "__main__":
    sys.exit(main())
