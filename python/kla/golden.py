"""The golden cases (golden/MANIFEST.json, docs/golden.md): list and load them.

The folder (golden_dir()): $KLA_GOLDEN if set; else the repository's golden/ when this
package runs from a kla checkout (python/kla -> ../../golden); else
`pkg-config --variable=goldendir kla` (an installed kla puts the set in
<datadir>/kla/golden); else <prefix>/share/kla/golden under the install prefixes
(this package's, sys.prefix, /usr/local, /usr); else ./golden. When none holds a
MANIFEST.json, golden_dir() raises FileNotFoundError naming KLA_GOLDEN and listing
where it looked.
"""

import json
import os

import numpy as np

from .safetensors import load

__all__ = ["golden_dir", "golden_cases", "load_case", "Case", "INPUT_NAMES", "generate_inputs",
           "splitmix64"]

INPUT_NAMES = ("q", "k", "v", "g", "eta", "beta", "h0", "cu_seqlens", "do", "dht",
               "g_atk", "beta_atk", "log_atk_scale", "a0", "dat")


def _has_manifest(d):
    return os.path.isfile(os.path.join(d, "MANIFEST.json"))


def golden_dir(dir=None):
    """The golden folder: dir, $KLA_GOLDEN, the checkout's golden/, pkg-config's
    goldendir, <prefix>/share/kla/golden, ./golden (the first holding MANIFEST.json).
    Raises FileNotFoundError naming KLA_GOLDEN when there is none."""
    if dir:
        return os.fspath(dir)
    env = os.environ.get("KLA_GOLDEN")
    if env:
        if not os.path.isdir(env):
            raise FileNotFoundError("KLA_GOLDEN=%s: no such folder (set KLA_GOLDEN to the "
                                    "golden folder, the one holding MANIFEST.json)" % env)
        return env
    from .ops import checkout_root, install_prefixes, pkg_config_variable
    looked = ["KLA_GOLDEN: not set"]
    cands = []
    repo = checkout_root()
    if repo:
        cands.append((os.path.join(repo, "golden"), "the repository"))
    gd, how = pkg_config_variable("goldendir")
    if gd:
        cands.append((gd, how))
    else:
        looked.append(how)
    for p in install_prefixes():
        cands.append((os.path.join(p, "share", "kla", "golden"), "prefix " + p))
    cands.append((os.path.abspath("golden"), "the current folder"))
    for d, how in cands:
        if _has_manifest(d):
            return d
        looked.append("%s (%s): %s" % (d, how, "no MANIFEST.json" if os.path.isdir(d)
                                       else "absent"))
    raise FileNotFoundError(
        "golden cases not found: set KLA_GOLDEN to the golden folder (the repository's "
        "golden/, or <datadir>/kla/golden of an installed kla, as `pkg-config "
        "--variable=goldendir kla` names it). Looked at: " + "; ".join(looked))


def _manifest(dir=None):
    d = golden_dir(dir)
    path = os.path.join(d, "MANIFEST.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        src = "dir" if dir else "KLA_GOLDEN" if os.environ.get("KLA_GOLDEN") else "golden_dir()"
        raise FileNotFoundError("%s: no MANIFEST.json (the folder comes from %s; KLA_GOLDEN "
                                "should name the golden folder)" % (d, src)) from None


def golden_cases(dir=None, details=False, kind="operator"):
    """Names of the golden cases in MANIFEST.json order (details=True: the entries).
    kind: "operator" (the default: the cases of kla forward/backward), "layer" (kla layer
    backward), "model" (kla model step), or None for all."""
    cases = [c for c in _manifest(dir)["cases"] if kind is None or c.get("kind", "operator") == kind]
    return cases if details else [c["name"] for c in cases]


def _flag(s):
    return str(s).lower() == "true"


class Case:
    """One golden case.
    name, path, tensors (every tensor of the file), metadata (its __metadata__),
    inputs (q k v g eta|beta h0 cu_seqlens do dht, as stored: F32, cu int),
    expected (o ht dq dk dv dg deta|dbeta dh0, float64),
    options (mode, scale, eps, l2norm_q, l2norm_k, state_layout as Python values),
    tolerances ({'float32': {...}, 'bf16': {...}}), manifest (its MANIFEST entry or {}).
    kla.backward(**case.inputs, **case.options) runs our reference on it."""

    def __init__(self, path, manifest_entry=None):
        self.path = path
        self.tensors, self.metadata = load(path)
        self.name = self.metadata.get("case") or os.path.basename(path)[:-len(".safetensors")]
        self.manifest = manifest_entry or {}
        from .verify import OUTPUT_NAMES, is_output_name, meta_tol
        m = self.metadata
        # "operator", or "layer" / "model": a case of kla layer backward / kla model step,
        # whose inputs are every tensor that is not an output (parameters by name, x, dy,
        # cu_seqlens | input_ids, labels) and whose expected are y dx grad.* | loss grad.* new.*
        self.kind = m.get("kind", "operator")
        if self.kind == "operator":
            self.inputs = {n: self.tensors[n] for n in INPUT_NAMES if n in self.tensors}
            self.expected = {n: self.tensors[n] for n in OUTPUT_NAMES if n in self.tensors}
        else:
            self.inputs = {n: a for n, a in self.tensors.items() if not is_output_name(n)}
            self.expected = {n: a for n, a in self.tensors.items() if is_output_name(n)}
        self.options = {
            "mode": m.get("mode", "kla" if "eta" in self.tensors else "gdn"),
            "scale": float(m["scale"]) if "scale" in m else None,
            "eps": float(m.get("eps", "1e-6")),
            "l2norm_q": _flag(m.get("l2norm_q", "false")),
            "l2norm_k": _flag(m.get("l2norm_k", "false")),
            "state_layout": m.get("state_layout", "kv"),
        }
        # the family (kla-spec.md 7.3): given in the metadata, else inferred as kla does
        if self.kind == "operator":
            g = self.tensors.get("g")
            self.options["gate"] = m.get("gate", "channel" if g is not None and g.ndim == 4 else "head")
            self.options["precond"] = m.get("precond", "atk" if "beta_atk" in self.tensors else "none")
            if self.options["precond"] == "atk":
                self.options["squash_x"] = float(m.get("squash_x", "1.5"))
                self.options["squash_eps"] = float(m.get("squash_eps", "1e-6"))
        self.tolerances = {}
        for s in ("float32", "bf16"):
            t = {n: meta_tol(m, "tol_" + s, n) for n in self.expected}
            self.tolerances[s] = {n: v for n, v in t.items() if v is not None}

    def __repr__(self):
        return f"<kla.Case {self.name}>"


def load_case(name, dir=None):
    """Load a golden case by name (or by path to its .safetensors file)."""
    name = os.fspath(name)
    if name.endswith(".safetensors") and os.path.exists(name):
        return Case(name)
    d = golden_dir(dir)
    entry = None
    try:
        for c in _manifest(d)["cases"]:
            if c["name"] == name:
                entry = c
                break
    except FileNotFoundError:
        pass
    file = entry["file"] if entry else name + ".safetensors"
    path = os.path.join(d, file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"golden case {name!r} not found in {d}")
    return Case(path, entry)


# ---------------------------------------------------------------- regenerating inputs

_GAMMA = 0x9E3779B97F4A7C15
_STREAM = {"q": 1, "k": 2, "v": 3, "g": 4, "eta": 5, "beta": 5, "h0": 6, "do": 7, "dht": 8,
           "g_atk": 9, "beta_atk": 10, "log_atk_scale": 11, "a0": 12, "dat": 13}
_ROW_SCALE = (1.0, 2.0 ** -12, 2.0 ** 5, 0.0, 2.0 ** -8, 1.0, 2.0 ** 3, 2.0 ** -4)


def splitmix64(state, n):
    """The first n outputs of splitmix64 started at `state` (numpy uint64 array)."""
    m = (1 << 64) - 1
    with np.errstate(over="ignore"):
        z = (np.uint64(state & m) + np.uint64(_GAMMA)
             * np.arange(1, n + 1, dtype=np.uint64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def generate_inputs(entry):
    """The inputs of a golden case, regenerated from its MANIFEST.json entry alone
    (docs/golden.md, section 'The generator'): bit-identical to the stored ones."""
    gen, dims = entry["inputs_from"], entry["dims"]
    K = dims["K"]
    out = {}
    if "fixed" in gen:  # a worked example: its values are in the entry
        return {n: np.array(v, np.float64).astype(np.float32).reshape(entry["inputs"][n]["shape"])
                for n, v in gen["fixed"].items()}
    if gen["values"] == "fixed":  # kla-spec.md section 6
        f = lambda x, s: np.array(x, np.float32).reshape(s)
        return {"q": f([1, 1, 1, 0], (1, 2, 1, 2)), "k": f([2, 0, 1, 1], (1, 2, 1, 2)),
                "v": f([3, 1], (1, 2, 1, 1)), "g": f([0, np.log(0.5)], (1, 2, 1)),
                "eta": f([1, 0.5], (1, 2, 1)), "do": f([1, 1], (1, 2, 1, 1))}
    for name, info in entry["inputs"].items():
        shape = tuple(info["shape"])
        if name == "cu_seqlens":
            cu = np.concatenate([[0], np.cumsum(gen["seqlens"])])
            out[name] = cu.astype(np.int64 if gen["cu_dtype"] == "I64" else np.int32)
            continue
        n = int(np.prod(shape))
        u = (splitmix64(16 * entry["seed"] + _STREAM[name], n) >> np.uint64(40)).astype(
            np.float64) * 2.0 ** -24
        i = np.arange(n)
        if gen["values"] == "grid":
            if name == "g":
                x = -np.floor(u * 4) / 4
            elif name in ("eta", "beta"):
                x = (1 + np.floor(u * 4)) / 4
            else:
                x = (np.floor(u * 9) - 4) / 4
        elif name == "g":
            x = {"zero": np.zeros(n), "m20": np.where(i % 3 == 1, -20.0, -0.5 * u),
                 "m5": -5 * u, "uniform": -0.5 * u}[gen["g"]]
        elif name == "g_atk":
            x = -0.5 * u
        elif name == "beta_atk":
            x = u
        elif name == "log_atk_scale":
            x = u - 1
        elif name == "a0":
            x = 2 * u
        elif name == "eta":
            x = {"one": np.ones(n), "small": 2.0 ** -10 * (1 + u),
                 "uniform": 0.25 + 1.25 * u}[gen["eta"]]
        elif name == "beta":
            x = 0.125 + 0.75 * u
        elif name == "h0":
            x = u - 0.5
        else:
            x = 2 * u - 1
            if name == "k" and gen["keys"] == "norms":
                x = x * np.array(_ROW_SCALE)[(i // K) % 8]
            elif name == "k" and gen["keys"] == "unit":
                r = x.reshape(-1, K)
                s2 = np.cumsum(r * r, axis=1)[:, -1:]  # summed in order, as in C
                x = (r / np.sqrt(s2)).ravel()
        out[name] = x.astype(np.float32).reshape(shape)
    return out
