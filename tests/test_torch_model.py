#!/usr/bin/python3
"""The mixer layer, the model and the training step (kla-spec.md section 8) of our C
reference against tests/torch_model.py, a plain float64 PyTorch implementation written
from the spec and notes/layer-and-mqar.md alone (autograd, the recurrence a token loop,
torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW). TAP output.

    /usr/bin/python3 tests/test_torch_model.py --kla build/kla [--src .] [--seed N] [--keep DIR]

1. The torch implementation on the worked example of kla-spec.md section 6.
2. `kla layer backward --backend ref64` on random layer files (mixer kla and gdn, B 2,
   a varlen case with cu_seqlens [0, 7, 20] and B 1, F32 and F64 inputs, a non-default
   norm_eps): y, dx and every grad.<name> at rel_rmse <= 1e-9.
3. `kla model step --backend ref64` on random models (2 blocks, both mixers, labels with
   -100, the default AdamW settings with clipping active and other settings with
   clipping inactive): loss, every grad.<name> and every new.<name> at rel_rmse <= 1e-9.
4. The golden layer and model cases (MANIFEST.json entries of kind "layer" / "model"),
   loaded into the torch modules by name (load_state_dict): every expected output at
   rel_rmse <= 1e-9. Skipped while there are none.
Every parameter is drawn away from special values (norm weights not 1, biases not 0, ...)
so that every path of the gradient carries weight. Needs PyTorch (Debian's python3-torch)
and numpy; skips itself without torch.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tap import Tap  # noqa: E402

TOL = 1e-9
tap = Tap()
torch = None
tm = None
kla = None
summary = {}   # kind -> (max rel_rmse, where)


def rel_rmse(ref, got):
    ref = np.asarray(ref, np.float64).ravel()
    got = np.asarray(got, np.float64).ravel()
    if ref.shape != got.shape:
        return float("inf")
    den = np.sqrt(np.mean(ref ** 2)) if ref.size else 0.0
    num = np.sqrt(np.mean((ref - got) ** 2)) if ref.size else 0.0
    return float(num / den if den > 0 else num)


def kind_of(name):
    if name.startswith("grad."):
        return "grad"
    if name.startswith("new."):
        return "new"
    return name


def compare_all(label, ref, got, names):
    """ref: torch's (dict of arrays); got: the C reference's. One TAP line; the worst
    tensor of each kind goes into the summary."""
    bad, lines, worst = [], [], (0.0, "")
    for n in names:
        if n not in got:
            bad.append(n)
            lines.append(f"{n}: missing in the C output")
            continue
        r, g = np.asarray(ref[n], np.float64), np.asarray(got[n], np.float64)
        if r.shape != g.shape:
            bad.append(n)
            lines.append(f"{n}: shape {g.shape} from kla, {r.shape} from torch")
            continue
        e = rel_rmse(r, g)
        if not np.all(np.isfinite(g)) or not e <= TOL:
            bad.append(n)
            i = int(np.argmax(np.abs(r - g))) if r.size else 0
            lines.append(f"{n}: rel_rmse {e:.3e}; worst element {np.unravel_index(i, r.shape)}: "
                         f"torch {r.ravel()[i]:.17g}  kla {g.ravel()[i]:.17g}")
        k = kind_of(n)
        if k not in summary or e >= summary[k][0]:
            summary[k] = (e, f"{n} ({label})")
        if e >= worst[0]:
            worst = (e, n)
    extra = sorted(set(n for n in got if n.startswith(("grad.", "new."))) - set(names))
    if extra:
        bad += extra
        lines.append("in the C output but not torch's: " + ", ".join(extra))
    lines.append(f"{len(names)} tensors, worst {worst[1]} at rel_rmse {worst[0]:.2e}")
    return tap(not bad, f"{label}: {len(names)} outputs at rel_rmse <= {TOL:g}", lines)


# ------------------------------------------------------------------------ random inputs

LAYER_SHAPES = {
    "q_proj.weight": lambda c: (c["H"] * c["dk"], c["d"]),
    "k_proj.weight": lambda c: (c["H"] * c["dk"], c["d"]),
    "v_proj.weight": lambda c: (c["H"] * c["dv"], c["d"]),
    "a_proj.weight": lambda c: (c["H"], c["d"]),
    "b_proj.weight": lambda c: (c["H"], c["d"]),
    "b_proj.bias": lambda c: (c["H"],),
    "g_proj.weight": lambda c: (c["H"] * c["dv"], c["d"]),
    "o_proj.weight": lambda c: (c["d"], c["H"] * c["dv"]),
    "q_conv1d.weight": lambda c: (c["H"] * c["dk"], 1, 4),
    "k_conv1d.weight": lambda c: (c["H"] * c["dk"], 1, 4),
    "v_conv1d.weight": lambda c: (c["H"] * c["dv"], 1, 4),
    "A_log": lambda c: (c["H"],),
    "dt_bias": lambda c: (c["H"],),
    "o_norm.weight": lambda c: (c["dv"],),
}


def draw(rng, name, shape):
    """A parameter away from special values: no exact 0 or 1 anywhere."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.3 * rng.standard_normal(shape)
    if name.endswith("A_log"):
        return rng.uniform(-1.5, 1.0, shape)
    if name.endswith("dt_bias"):
        return rng.uniform(-2.0, 0.5, shape)
    if name.endswith("bias"):
        return 0.6 * rng.standard_normal(shape)
    if "conv1d" in name:
        return 0.6 * rng.standard_normal(shape)
    if name == "embeddings.weight":
        return 0.7 * rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(shape[-1])   # Linear [out, in]


def layer_params(rng, c, prefix="attn."):
    return {prefix + n: draw(rng, prefix + n, f(c)) for n, f in LAYER_SHAPES.items()}


def model_params(rng, c):
    p = {"embeddings.weight": draw(rng, "embeddings.weight", (c["vocab"], c["d"]))}
    for i in range(c["L"]):
        pre = f"layers.{i}."
        p[pre + "attn_norm.weight"] = draw(rng, "attn_norm.weight", (c["d"],))
        p.update(layer_params(rng, c, pre + "attn."))
        p[pre + "mlp_norm.weight"] = draw(rng, "mlp_norm.weight", (c["d"],))
        p[pre + "mlp.gate_proj.weight"] = draw(rng, "w", (c["F"], c["d"]))
        p[pre + "mlp.up_proj.weight"] = draw(rng, "w", (c["F"], c["d"]))
        p[pre + "mlp.down_proj.weight"] = draw(rng, "w", (c["d"], c["F"]))
    p["norm.weight"] = draw(rng, "norm.weight", (c["d"],))
    return p


def cast(tensors, dt):
    """Floating tensors stored as dt (F32 values are exact in float64, so torch sees
    exactly what the C code reads)."""
    return {n: (a.astype(dt) if a.dtype.kind == "f" else a) for n, a in tensors.items()}


LAYER_CASES = [
    # name, mixer, B, T, cu_seqlens, dtype, norm_eps (None: not stated)
    ("layer_kla_B2_T20", "kla", 2, 20, None, np.float64, None),
    ("layer_gdn_B2_T19_f32_eps1e-3", "gdn", 2, 19, None, np.float32, 1e-3),
    ("layer_kla_varlen_0_7_20", "kla", 1, 20, np.array([0, 7, 20], np.int64), np.float64, None),
    ("layer_gdn_varlen_0_7_20_i32", "gdn", 1, 20, np.array([0, 7, 20], np.int32), np.float32, 1e-5),
]

MODEL_CASES = [
    # name, mixer, B, T, adamw metadata (None: defaults), norm_eps
    ("model_kla_B2_T20_defaults", "kla", 2, 20, None, None),
    ("model_gdn_B2_T18_adamw", "gdn", 2, 18,
     {"lr": "0.003", "beta1": "0.8", "beta2": "0.99", "adam_eps": "1e-06",
      "weight_decay": "0.05", "clip": "50"}, 1e-4),
    ("model_kla_B1_T21_tightclip", "kla", 1, 21,
     {"lr": "0.01", "weight_decay": "0", "clip": "0.05"}, 1e-5),
]

DIMS = {"d": 16, "H": 2, "dk": 8, "dv": 4, "vocab": 37, "L": 2, "F": 24}


def run_kla(args, inp, out):
    t0 = time.time()
    p = subprocess.run([args.kla] + inp + ["-o", out], capture_output=True, text=True, timeout=120)
    return p, time.time() - t0


def layer_case(args, tmp, case, rng):
    name, mixer, B, T, cu, dt, eps = case
    c = DIMS
    params = layer_params(rng, c)
    x = rng.standard_normal((B, T, c["d"]))
    dy = rng.standard_normal((B, T, c["d"]))
    t = cast(dict(params, x=x, dy=dy), dt)
    if cu is not None:
        t["cu_seqlens"] = cu
    meta = {"mixer": mixer, "d_model": str(c["d"]), "n_head": str(c["H"]),
            "d_k": str(c["dk"]), "d_v": str(c["dv"])}
    if eps is not None:
        meta["norm_eps"] = repr(eps)
    fin = os.path.join(tmp, name + ".in.safetensors")
    fout = os.path.join(tmp, name + ".out.safetensors")
    kla.save(fin, t, meta)
    p, sec = run_kla(args, ["layer", "backward", "--backend", "ref64", fin], fout)
    if p.returncode:
        return tap(False, f"{name}: kla layer backward", [p.stdout, p.stderr])
    got, _ = kla.load(fout)
    t1 = time.time()
    tt, mt = kla.load(fin)
    layer = tm.layer_from_tensors(tt, mt)
    cu_t = torch.as_tensor(tt["cu_seqlens"].astype(np.int64)) if "cu_seqlens" in tt else None
    y, dx, grads = tm.layer_backward(layer, torch.as_tensor(tt["x"]), torch.as_tensor(tt["dy"]),
                                     cu_t)
    ref = {"y": y.numpy(), "dx": dx.numpy()}
    ref.update({"grad." + n: g.numpy() for n, g in grads.items()})
    names = ["y", "dx"] + ["grad." + n for n in grads]
    dtypes = sorted(set(a.dtype.name for n, a in got.items()))
    return compare_all(name, ref, got, names) and tap(
        dtypes == ["float64"], f"{name}: ref64 outputs are F64",
        [f"dtypes {dtypes}; kla {sec:.2f} s, torch {time.time() - t1:.2f} s"])


def model_case(args, tmp, case, rng):
    name, mixer, B, T, adam, eps = case
    c = DIMS
    params = model_params(rng, c)
    ids = rng.integers(0, c["vocab"], (B, T)).astype(np.int64)
    labels = rng.integers(0, c["vocab"], (B, T)).astype(np.int64)
    labels[rng.random((B, T)) < 0.4] = -100
    labels[0, 0] = 3
    t = cast(params, np.float64 if "defaults" in name else np.float32)
    t.update(input_ids=ids, labels=labels)
    meta = {"mixer": mixer}
    if adam:
        meta.update(adam)
    if eps is not None:
        meta["norm_eps"] = repr(eps)
    fin = os.path.join(tmp, name + ".in.safetensors")
    fout = os.path.join(tmp, name + ".out.safetensors")
    kla.save(fin, t, meta)
    p, sec = run_kla(args, ["model", "step", "--backend", "ref64", fin], fout)
    if p.returncode:
        return tap(False, f"{name}: kla model step", [p.stdout, p.stderr])
    got, _ = kla.load(fout)
    t1 = time.time()
    tt, mt = kla.load(fin)
    model = tm.model_from_tensors(tt, mt)
    loss, grads, new, gnorm = step_with_norm(model, tt, mt)
    ref = {"loss": np.array([loss.item()])}
    ref.update({"grad." + n: g.numpy() for n, g in grads.items()})
    ref.update({"new." + n: v.numpy() for n, v in new.items()})
    names = ["loss"] + ["grad." + n for n in grads] + ["new." + n for n in new]
    clip = tm.adamw_settings(mt)["clip"]
    return compare_all(name, ref, got, names) and tap(
        True, f"{name}: step ran",
        [f"grad norm {gnorm:.4g}, clip {clip:g} ({'active' if gnorm > clip else 'inactive'}); "
         f"{int((labels != -100).sum())} labels; kla {sec:.2f} s, torch {time.time() - t1:.2f} s"])


def step_with_norm(model, tt, mt):
    loss, grads, new = tm.train_step(model, tt["input_ids"], tt["labels"], **tm.adamw_settings(mt))
    gnorm = float(np.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values())))
    return loss, grads, new, gnorm


# ------------------------------------------------------------------------ golden cases

LAYER_IO = ("x", "dy", "cu_seqlens")
MODEL_IO = ("input_ids", "labels")


def golden_cases(src):
    gdir = os.environ.get("KLA_GOLDEN") or os.path.join(src, "golden")
    path = os.path.join(gdir, "MANIFEST.json")
    if not os.path.isfile(path):
        return gdir, []
    with open(path, encoding="utf-8") as f:
        man = json.load(f)
    return gdir, [c for c in man.get("cases", []) if c.get("kind") in ("layer", "model")]


def golden_case(gdir, entry):
    name = entry.get("name") or entry["file"]
    t0 = time.time()
    tt, mt = kla.load(os.path.join(gdir, entry["file"]))
    # the file's __metadata__ first, the MANIFEST entry's config where the file says nothing
    mt = dict({k: repr(v) if isinstance(v, float) else str(v)
               for k, v in (entry.get("config") or {}).items()}, **(mt or {}))
    if entry["kind"] == "layer":
        layer = tm.layer_from_tensors(tt, mt)
        cu = torch.as_tensor(tt["cu_seqlens"].astype(np.int64)) if "cu_seqlens" in tt else None
        y, dx, grads = tm.layer_backward(layer, torch.as_tensor(tt["x"]),
                                         torch.as_tensor(tt["dy"]), cu)
        ref = {"y": y.numpy(), "dx": dx.numpy()}
        ref.update({"grad." + n: g.numpy() for n, g in grads.items()})
    else:
        model = tm.model_from_tensors(tt, mt)
        loss, grads, new, _ = step_with_norm(model, tt, mt)
        ref = {"loss": np.array([loss.item()])}
        ref.update({"grad." + n: g.numpy() for n, g in grads.items()})
        ref.update({"new." + n: v.numpy() for n, v in new.items()})
    expected = [n for n in tt if n in ("y", "dx", "loss") or n.startswith(("grad.", "new."))]
    missing = sorted(set(ref) - set(expected))
    ok = compare_all("golden " + name, ref, tt, expected)
    tap(not missing and bool(expected), f"golden {name}: holds every output",
        [f"not in the file: {', '.join(missing)}" if missing else
         f"{len(expected)} expected outputs; torch {time.time() - t0:.2f} s"])
    return ok


def main():
    global torch, tm, kla
    ap = argparse.ArgumentParser()
    ap.add_argument("--kla", default=None, help="the kla program (default: SRC/build/kla)")
    ap.add_argument("--src", default=os.path.join(HERE, ".."))
    ap.add_argument("--seed", type=int, default=20260515)
    ap.add_argument("--keep", default=None, help="write the generated files into this folder")
    args = ap.parse_args()
    args.kla = args.kla or os.path.join(args.src, "build", "kla")
    sys.path.insert(0, os.path.join(args.src, "python"))
    try:
        import torch as _torch
    except ImportError as e:
        tap.skip("torch model", f"no PyTorch ({e})")
        return tap.finish()
    torch = _torch
    torch.set_default_dtype(torch.float64)
    import kla as _kla
    import torch_model as _tm
    kla, tm = _kla, _tm
    t_start = time.time()

    # 1. the worked example (section 6), decay first
    d = torch.float64
    o = tm.recurrence(torch.tensor([[[[1., 1.]], [[1., 0.]]]], dtype=d),
                      torch.tensor([[[[2., 0.]], [[1., 1.]]]], dtype=d),
                      torch.tensor([[[[3.]], [[1.]]]], dtype=d),
                      torch.tensor([[[0.], [np.log(0.5)]]], dtype=d),
                      torch.tensor([[[1.], [0.5]]], dtype=d), mode="kla", scale=1.0, eps=0.0)
    tap(np.allclose(o.flatten().numpy(), [1.5, 0.8125], rtol=0, atol=1e-15),
        "torch_model.recurrence: the worked example of kla-spec.md section 6",
        [f"o = {o.flatten().tolist()}"])
    # names are exactly those of kla-spec.md 8.3
    lay = tm.KLALayer(16, 2, 8, 4)
    mod = tm.KLAModel(37, 16, 2, 2, 8, 4, 24)
    want = set(LAYER_SHAPES)
    tap(set(n[len("attn."):] for n, _ in lay.named_parameters()) == want
        and all(n.startswith("attn.") for n, _ in lay.named_parameters()),
        "KLALayer parameter names are attn.<8.3 name>",
        [", ".join(n for n, _ in lay.named_parameters())])
    mw = set(model_params(np.random.default_rng(0), DIMS))
    tap(set(n for n, _ in mod.named_parameters()) == mw, "KLAModel parameter names are 8.3's",
        [f"differ: {sorted(set(n for n, _ in mod.named_parameters()) ^ mw)}"])

    if not os.access(args.kla, os.X_OK):
        tap(False, f"the kla program: {args.kla} not found (--kla)")
        return tap.finish()
    rng = np.random.default_rng(args.seed)
    tmp_obj = None
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        tmp = args.keep
    else:
        tmp_obj = tempfile.TemporaryDirectory(prefix="kla-torch-model-")
        tmp = tmp_obj.name
    try:
        for case in LAYER_CASES:
            layer_case(args, tmp, case, rng)
        for case in MODEL_CASES:
            model_case(args, tmp, case, rng)
        gdir, cases = golden_cases(args.src)
        if not cases:
            tap.skip("golden layer and model cases", f"none in {gdir}/MANIFEST.json yet")
        for entry in cases:
            golden_case(gdir, entry)
    finally:
        if tmp_obj:
            tmp_obj.cleanup()
    print("# max rel_rmse per output kind (torch float64 vs kla ref64):")
    for k in sorted(summary):
        print(f"#   {k:5s} {summary[k][0]:.2e}  ({summary[k][1]})")
    print(f"# {time.time() - t_start:.1f} s")
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
