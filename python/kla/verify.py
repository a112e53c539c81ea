"""kla.compare: the comparison of `kla verify` (kla-spec.md section 5), line for line.

Per tensor: rel_rmse = rms(ref - got) / rms(ref) (rms(got) when ref is all zero), the
largest absolute error and where it is; any NaN/Inf in GOT where REF is finite fails.
The sums run in index order as in tools/verify.c, so the numbers printed are the same.
"""

import math
import sys

import numpy as np

from .safetensors import load

__all__ = ["compare", "Report", "OUTPUT_NAMES", "default_tol"]

OUTPUT_NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "deta", "dbeta", "dh0",
                "at", "dg_atk", "dbeta_atk", "dlog_atk_scale", "da0")

# index names by tensor name and rank, as tools/verify.c (kla-spec.md sections 2 and 7.3)
_QK = ("q", "k", "dq", "dk")
_VO = ("v", "o", "dv", "do")
_GB = ("g", "eta", "beta", "dg", "deta", "dbeta")
_ST = ("h0", "ht", "dh0", "dht")
_GC = ("g", "dg")                                        # gate channel: [B, T, HV, K]
_GA = ("g_atk", "beta_atk", "dg_atk", "dbeta_atk")       # [B, T, H]
_AS = ("a0", "at", "dat", "da0")                         # the ATK state: [N, H, K]


ELEM_TOL = 1e-4  # tools/verify.h VERIFY_ELEM_TOL
BF16_ELEM_FACTOR = 5  # tools/verify.h VERIFY_BF16_ELEM_FACTOR: bf16 element bound without elem_bf16


def is_output_name(name):
    """The operator's outputs, and the layer's and training step's (kla-spec.md 8.3)."""
    return name in OUTPUT_NAMES or name in ("y", "dx", "loss") or name.startswith(("grad.", "new."))


def default_tol(name):
    """kla verify's defaults: 1e-4 for gradients (d*, dx, grad.*), 1e-5 for the rest."""
    return 1e-4 if is_output_name(name) and name.startswith(("d", "grad.")) else 1e-5


def meta_tol(meta, key, name):
    """Tolerance of `name` in metadata entry `key` ("o=1e-05,ht=1e-05,..."), or None."""
    s = (meta or {}).get(key)
    if not s:
        return None
    for item in s.split(","):
        n, _, v = item.partition("=")
        if n == name:
            try:
                t = float(v)
            except ValueError:
                return None
            return t if math.isfinite(t) and t >= 0 else None
    return None


def format_index(name, shape, vk, flat):
    """'o[b=1, t=17, hv=2, v=5]': dimension names by tensor name (kla-spec.md section 2)."""
    nd = len(shape)
    dn = None
    if nd == 4 and name in _QK:
        dn = ("b", "t", "h", "k")
    elif nd == 4 and name in _VO:
        dn = ("b", "t", "hv", "v")
    elif nd == 3 and name in _GB:
        dn = ("b", "t", "hv")
    elif nd == 4 and name in _GC:
        dn = ("b", "t", "hv", "k")
    elif nd == 3 and name in _GA:
        dn = ("b", "t", "h")
    elif nd == 3 and name in _AS:
        dn = ("n", "h", "k")
    elif nd == 1 and name == "dlog_atk_scale":
        dn = ("h",)
    elif nd == 4 and name in _ST:
        dn = ("n", "hv", "v", "k") if vk else ("n", "hv", "k", "v")
    idx, rest = [], int(flat)
    for d in range(nd - 1, -1, -1):
        ext = int(shape[d]) if shape[d] > 0 else 1
        idx.append(rest % ext)
        rest //= ext
    idx.reverse()
    parts = [f"{dn[d] if dn else 'i%d' % d}={idx[d]}" for d in range(nd)]
    return f"{name}[{', '.join(parts)}]"


def _shape_str(shape):
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _as_f64(x):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch: no grad, on the CPU, bf16 widened
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
    return np.asarray(x)


def _tensor(name, ref, got, tol, vk, elem=None):
    """One tensor: (result dict, list of lines) as tools/verify.c verify_tensor."""
    res = {"name": name, "pass": False, "tol": tol, "rel_rmse": None, "max_abs": None,
           "max_at": None, "where": None, "nonfinite": 0, "ref_value": None,
           "got_value": None, "problem": None}
    if ref is None:
        res["problem"] = "missing in REF"
        return res, [f"{name:<6} FAIL  missing in REF"]
    if got is None:
        res["problem"] = "missing in GOT"
        return res, [f"{name:<6} FAIL  missing in GOT"]
    if tuple(ref.shape) != tuple(got.shape):
        res["problem"] = "shape"
        return res, [f"{name:<6} FAIL  shape {_shape_str(got.shape)} in GOT, "
                     f"{_shape_str(ref.shape)} in REF"]
    if ref.size == 0:
        res["pass"] = True
        return res, [f"{name:<6} PASS  empty  (tol {tol:g})"]
    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        rf, gf = np.isfinite(r), np.isfinite(g)
        bad = (~rf & ~((np.isnan(r) & np.isnan(g)) | (r == g))) | (rf & ~gf)
        ok = rf & gf
        idx = np.flatnonzero(ok)
        d = g[idx] - r[idx]
        sdiff = float(np.cumsum(d * d)[-1]) if d.size else 0.0  # in index order, as in C
        sref = float(np.cumsum(r[idx] * r[idx])[-1]) if d.size else 0.0
        sgot = float(np.cumsum(g[idx] * g[idx])[-1]) if d.size else 0.0
    ad = np.abs(d)
    if ad.size and ad.max() > 0:
        max_at = int(idx[int(np.argmax(ad))])
        max_abs = float(ad.max())
    else:
        max_at, max_abs = 0, 0.0
    n = float(r.size)
    rms_ref = math.sqrt(sref / n)
    rel = rms_ref > 0
    err = math.sqrt(sdiff / n) / rms_ref if rel else math.sqrt(sgot / n)
    nbad = int(bad.sum())
    # elementwise, as tools/verify.c: |got - ref| <= etol * (|ref| + rms(ref)), etol the
    # bf16 set's element bound, else max(tol, 1e-4)
    etol = elem if elem is not None else max(tol, ELEM_TOL)
    nover, worst_at, worst = 0, 0, 0.0
    if rel and nbad == 0:
        q = np.abs(g - r) / (np.abs(r) + rms_ref)
        nover = int(np.count_nonzero(q > etol))
        if q.max() > 0:
            worst_at, worst = int(np.argmax(q)), float(q.max())
    passed = nbad == 0 and err <= tol and nover == 0
    where = format_index(name, ref.shape, vk, max_at)
    res.update({"pass": passed, "rel_rmse": err, "max_abs": max_abs, "elements_over": nover,
                "max_at": tuple(int(i) for i in np.unravel_index(max_at, ref.shape)),
                "where": where, "nonfinite": nbad,
                "ref_value": float(r[max_at]), "got_value": float(g[max_at])})
    lines = ["%-6s %s  %s %.1e%s  max_abs %.1e at %s  (tol %g)" % (
        name, "PASS" if passed else "FAIL", "rel_rmse" if rel else "rms_got", err,
        "" if rel else " (ref all zero)", max_abs, where, tol)]
    if nbad:
        b = int(np.argmax(bad))
        lines.append("       %d non-finite mismatch%s, first at %s: ref %.10g  got %.10g" % (
            nbad, "es" if nbad > 1 else "", format_index(name, ref.shape, vk, b), r[b], g[b]))
    elif not passed:
        lines.append("       at %s: ref %.10g  got %.10g" % (where, r[max_at], g[max_at]))
        if nover:
            lines.append("       %d element%s off by more than %g x (|ref| + rms(ref)), worst "
                         "%s: ref %.10g  got %.10g  (%.1e)" % (
                             nover, "s" if nover > 1 else "", etol,
                             format_index(name, ref.shape, vk, worst_at), r[worst_at],
                             g[worst_at], worst))
        if rel:
            lines += _breakdown(name, ref.shape, r, g, tol, rms_ref)
    return res, lines


def _seqsum(x, axis=-1):
    """Sum in index order (as the C loops), not numpy's pairwise order."""
    return np.cumsum(x, axis=axis)[..., -1] if x.shape[axis] else np.zeros(x.shape[:-1])


def _breakdown(name, shape, r, g, tol, rms_ref):
    """tools/verify.c breakdown(): rel_rmse per head, first token over tol. The head
    label is 'h' for q, k, dq, dk and 'hv' for every other tensor, the ATK's per key
    head ones included, as tools/verify.c prints it."""
    nd = len(shape)
    if (nd == 4 and name in _QK + _VO + _GC) or (nd == 3 and name in _GB + _GA):
        hdim, tdim = 2, 1
    elif (nd == 4 and name in _ST) or (nd == 3 and name in _AS):
        hdim, tdim = 1, -1
    else:
        return []
    nh = int(shape[hdim])
    inner = int(np.prod(shape[hdim + 1:], dtype=np.int64))
    if nh < 1 or inner < 1:
        return []
    d = g - r
    # [outer, nh, inner] -> [nh, outer * inner] keeps each head's elements in index order
    d3 = (d * d).reshape(-1, nh, inner).transpose(1, 0, 2).reshape(nh, -1)
    r3 = (r * r).reshape(-1, nh, inner).transpose(1, 0, 2).reshape(nh, -1)
    sd, sr = _seqsum(d3), _seqsum(r3)
    per = float(r.size // nh)
    hn = "h" if name in _QK + _GA + _AS else "hv"  # per key head: h
    parts, over = [], 0
    for h in range(nh):
        e = (math.sqrt(sd[h] / per) / math.sqrt(sr[h] / per) if sr[h] > 0
             else math.sqrt(sd[h] / per))
        if not e <= tol:
            over += 1
        if nh > 16 and e <= tol:
            continue
        parts.append("%s=%d %.1e" % (hn, h, e))
    lines = []
    if parts:
        lines.append("       by head: " + ", ".join(parts[:16]) + (", ..." if len(parts) > 16 else "")
                     + "  (%d of %d heads over tol)" % (over, nh))
    if tdim < 0:
        return lines
    nt = int(shape[1])
    block = int(np.prod(shape[2:], dtype=np.int64))
    if block < 1:
        return lines
    e = np.sqrt(_seqsum((d * d).reshape(-1, block)) / float(block)) / rms_ref
    bad = np.flatnonzero(e > tol)
    if bad.size:
        f = int(bad[0])
        lines.append("       first token over tol: %s[b=%d, t=%d], error %.1e  (%d of %d "
                     "tokens over tol)" % (name, f // nt, f % nt, e[f], bad.size, e.size))
    return lines


class Report:
    """What compare found: .ok, .passed, .failed, .tensors (one dict per tensor:
    name, pass, rel_rmse, max_abs, max_at (index tuple), where, tol, nonfinite,
    ref_value, got_value, problem), .lines (the printed report) and str(report)."""

    def __init__(self, tensors, lines, passed, failed):
        self.tensors, self.lines, self.passed, self.failed = tensors, lines, passed, failed
        self.ok = failed == 0 and passed > 0

    def __bool__(self):
        return self.ok

    def __str__(self):
        return "\n".join(self.lines) + "\n"

    def __repr__(self):
        return f"<kla.Report {self.passed} passed, {self.failed} failed>"


def _read(x):
    """(tensors dict, metadata) from a path, a Case, or a dict of arrays."""
    if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__"):
        return load(x)
    if hasattr(x, "tensors") and hasattr(x, "metadata"):  # a golden Case
        return x.tensors, x.metadata
    return dict(x), {}


def compare(outputs, case, tol=None, tensors=None, file=sys.stdout):
    """Compare `outputs` (dict name -> array-like, or a safetensors path) with `case`
    (a golden case name, a Case from load_case, a safetensors path, or a dict of
    reference arrays), print the report of `kla verify GOT --against REF` to `file`
    (None: print nothing), and return a Report.

    tol: None uses the reference's own float32 set (tol_float32 in its metadata, as in
    every golden case; kla verify's defaults otherwise); "bf16" (or "float32") picks
    that set; a number applies to every tensor; a dict maps names to tolerances.
    tensors: names to compare (list or comma-separated string); default: the
    reference's output tensors (o ht dq dk dv dg deta dbeta dh0 at dg_atk dbeta_atk
    dlog_atk_scale da0), else all of them.
    """
    if isinstance(case, str) and not case.endswith(".safetensors") and "/" not in case:
        from .golden import load_case
        case = load_case(case)
    ref, rmeta = _read(case)
    got, gmeta = _read(outputs)
    got = {k: _as_f64(v) for k, v in got.items()}
    ref = {k: np.asarray(v) for k, v in ref.items()}
    vk = rmeta.get("state_layout") == "vk" or gmeta.get("state_layout") == "vk"
    key = "tol_bf16" if tol == "bf16" else "tol_float32"

    def pick_elem(name, t):
        """bf16 set: the reference's elem_bf16, else BF16_ELEM_FACTOR x its bound."""
        if tol != "bf16":
            return None
        e = meta_tol(rmeta, "elem_bf16", name)
        return e if e is not None else BF16_ELEM_FACTOR * t

    def pick(name):
        if isinstance(tol, dict):
            if name in tol:
                return float(tol[name])
        elif tol is not None and not isinstance(tol, str):
            return float(tol)
        t = meta_tol(rmeta, key, name)
        return t if t is not None else default_tol(name)

    if tensors is not None:
        names = [n for n in (tensors.split(",") if isinstance(tensors, str) else tensors) if n]
    elif any(is_output_name(n) for n in ref):
        names = [n for n in ref if is_output_name(n)]  # in the reference's order
    else:
        names = list(ref)  # file order (load keeps the header order)
    results, lines, passed, failed = [], [], 0, 0
    for n in names:
        t = pick(n)
        res, ls = _tensor(n, ref.get(n), got.get(n), t, vk, pick_elem(n, t))
        results.append(res)
        lines += ls
        if res["pass"]:
            passed += 1
        else:
            failed += 1
    if passed + failed == 0:
        lines.append("verify: nothing to compare")
        failed = 1
    else:
        lines.append(f"verify: {passed} passed, {failed} failed")
    rep = Report(results, lines, passed, failed)
    if file is not None:
        file.write(str(rep))
        file.flush()
    return rep
