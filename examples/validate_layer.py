#!/usr/bin/env python3
"""Check a PyTorch KLA mixer layer (kla-spec.md section 8.1) against our reference: y, dx
and the gradient of every parameter, on one of our layer cases.

    python3 examples/validate_layer.py CASE [CASE ...] [--fla] [--kla PATH] [--tol T]
                                       [--dtype float64|float32] [--device cpu|cuda]
                                       [--save OUT.safetensors]
    python3 examples/validate_layer.py                  # every golden layer case
    python3 examples/validate_layer.py --selftest [--fla]

CASE is a layer file: a golden case (golden/layer_*.safetensors, or its name as listed in
golden/MANIFEST.json with "kind": "layer"), which holds the inputs and the expected y, dx,
grad.<name>; or an input file of `kla layer backward` (parameters, x, dy, optional
cu_seqlens; see below), for which the script makes the expected outputs by running
`kla layer backward --backend ref64 CASE -o ...` (our float64 reference). It then builds a
layer, loads the case's parameters into it by name, runs y = layer(x), y.backward(dy),
and compares y, x.grad and every parameter's .grad with kla.compare (the per-tensor
rel_rmse report of `kla verify`). Exit status 0 when every case passes, 1 otherwise.

The layer:
- default: the spec layer of tests/torch_model.py (plain PyTorch, float64, a token loop),
  written from kla-spec.md alone; it passes at ~1e-14.
- --fla: flash-linear-attention's `fla.layers.GatedDeltaNet` with its Triton `chunk`
  kernel (CUDA, float32), configured as our layer (see "fla" below).
- yours: edit make_my_layer() below (it returns the module, its forward, and the map from
  our parameter names to its own) and run with --mine.

Our file format (safetensors; kla.load / kla.save read and write it): parameters named as
flash-linear-attention's GatedDeltaNet, PyTorch shapes, prefixed `attn.`:
  attn.q_proj.weight [H*dk, d]   attn.k_proj.weight [H*dk, d]   attn.v_proj.weight [H*dv, d]
  attn.a_proj.weight [H, d]      attn.b_proj.weight [H, d]      attn.b_proj.bias [H]
  attn.g_proj.weight [H*dv, d]   attn.o_proj.weight [d, H*dv]
  attn.{q,k,v}_conv1d.weight [C, 1, 4]   attn.A_log [H]   attn.dt_bias [H]   attn.o_norm.weight [dv]
  x [B, T, d], dy [B, T, d], cu_seqlens [N+1] (optional, B = 1)
  __metadata__: mixer (kla | gdn, default kla), norm_eps (default 1e-5), d_model n_head d_k d_v
The layer (8.1): q, k, v = silu(causal_conv4(x W)); g = -exp(A_log) softplus(x Wa^T + dt_bias);
eta = sigmoid(x Wb^T + bb); o = the recurrence of kla-spec.md section 1 with l2norm on q,
raw k, beta = eta / (||k||^2 + 1e-6), scale dk^-1/2 (mixer gdn: l2norm on q and k,
beta = eta); o = rmsnorm(o; o_norm.weight, norm_eps) * silu(x Wg^T) per head; y = o Wo^T.

fla (checked against fla-org/flash-linear-attention bc3b101d, 2026-08-22, version 0.5.2,
fla/layers/gated_deltanet.py): GatedDeltaNet(hidden_size=d, head_dim=dk, expand_v=dv/dk,
num_heads=H, use_gate=True, use_short_conv=True, conv_size=4, conv_bias=False,
norm_eps=norm_eps, mode='chunk'). Its parameter names are ours without `attn.`:
q_proj k_proj v_proj a_proj b_proj g_proj o_proj .weight, {q,k,v}_conv1d.weight (a
ShortConvolution, an nn.Conv1d with activation silu), A_log, dt_bias, o_norm.weight (a
FusedRMSNormGated, swish gate). What fla's layer cannot express, and what this script does:
1. b_proj.bias: fla's b_proj is nn.Linear(bias=False). The script swaps in
   nn.Linear(d, H, bias=True) before loading; the layer's forward only calls
   self.b_proj(x), so nothing else changes.
2. KLA's step size and normalisation: the layer always calls the kernel with
   use_qk_l2norm_in_kernel=True (l2norm on q AND k) and use_beta_sigmoid_in_kernel=True
   (beta = sigmoid(b)). For mixer kla the script does not call the layer's forward but
   runs the same steps with the layer's own modules: the projections and short
   convolutions, q = l2norm(q) outside the kernel, k raw, beta = sigmoid(x Wb^T + bb) /
   (||k||^2 + 1e-6) and g = -exp(A_log) softplus(x Wa^T + dt_bias) computed in float32
   under autograd outside the kernel (so d(eta), the extra term of dk and dA_log, ddt_bias
   come out of the chain rule), then chunk_gated_delta_rule(q, k, v, g, beta,
   scale=dk^-1/2, use_qk_l2norm_in_kernel=False, cu_seqlens=...), then the layer's o_norm
   (o, g_proj(x)) and o_proj. For mixer gdn the layer's own forward is our GDN layer
   (with 1. for the bias).
3. The model around it (not used here): fla's GatedDeltaNetForCausalLM names are ours
   prefixed `model.` (model.embeddings.weight, model.layers.{i}.attn_norm.weight,
   model.layers.{i}.attn.*, model.layers.{i}.mlp.{gate,up,down}_proj.weight,
   model.norm.weight) plus lm_head.weight, which our tied model does not have
   (tie_word_embeddings=True ties it to model.embeddings.weight); fla's model passes
   norm_eps from its config (1e-6 by default) to o_norm, ours 1e-5.
fla's chunk kernel computes its tl.dot products in Triton's default TF32 precision on
float32 inputs, so --fla is compared at --tol 5e-3 unless you give one. That bound is an
estimate, not a measurement: the --fla wiring (names, bias, beta, gate, l2norm, varlen)
was checked on the CPU in float64 with fla's kernel and layer replaced by stand-ins
(kla.torch.chunk_gated_delta_rule on our ref64, and a module with GatedDeltaNet's names and
forward), where it matches at 1e-15; it has not been run against fla's Triton kernels.

Needs: Python 3, numpy, PyTorch; the kla Python package (the checkout's python/, found
relative to this script, or `pip install ./python`); the `kla` program for input files
without expected outputs and for --selftest (--kla PATH, $KLA, the checkout's build/kla,
or PATH); tests/torch_model.py for the spec layer (relative to this script, $KLA_SRC/tests,
or --model-py PATH); for --fla a CUDA GPU, Triton and flash-linear-attention (`pip install
flash-linear-attention`, or its source on PYTHONPATH).

--selftest generates random layer files (mixer kla and gdn, B 2, and a varlen case with
cu_seqlens [0, 7, 20]), makes their references with `kla layer backward --backend ref64`,
validates the layer against them and against every golden layer case (the spec layer, or
fla's with --fla), and checks that a wrong layer fails (the other mixer; the o_norm weight
scaled by 1 + 1e-3, by 1 + 5e-2 with --fla).
"""

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if os.path.isdir(os.path.join(ROOT, "python", "kla")):
    sys.path.insert(0, os.path.join(ROOT, "python"))
import kla  # noqa: E402

# our names (kla-spec.md 8.3, inside a layer file)
PARAMS = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.a_proj.weight",
          "attn.b_proj.weight", "attn.b_proj.bias", "attn.g_proj.weight", "attn.o_proj.weight",
          "attn.q_conv1d.weight", "attn.k_conv1d.weight", "attn.v_conv1d.weight", "attn.A_log",
          "attn.dt_bias", "attn.o_norm.weight")
INPUTS = ("x", "dy", "cu_seqlens")
FLA_TOL = 5e-3

torch = None


# ----------------------------------------------------------------------------- the case

def config(tensors, meta):
    """Sizes from the parameters' shapes, as `kla layer backward` reads them."""
    H = int(tensors["attn.A_log"].shape[0])
    hk, d = (int(s) for s in tensors["attn.q_proj.weight"].shape)
    return {"d": d, "H": H, "dk": hk // H, "dv": int(tensors["attn.o_norm.weight"].shape[0]),
            "norm_eps": float(meta.get("norm_eps") or 1e-5), "mixer": meta.get("mixer") or "kla"}


def find_kla(arg):
    if arg and not os.access(arg, os.X_OK):
        raise SystemExit(f"validate_layer: --kla {arg}: not an executable file")
    for c in (arg, os.environ.get("KLA"), os.path.join(ROOT, "build", "kla"), shutil.which("kla")):
        if c and os.access(c, os.X_OK):
            return c
    return None


def resolve(case):
    """A path, or a golden case's name."""
    if os.path.exists(case):
        return case
    try:
        d = kla.golden_dir()
    except FileNotFoundError:
        d = None
    if d:
        p = os.path.join(d, case if case.endswith(".safetensors") else case + ".safetensors")
        if os.path.exists(p):
            return p
    raise SystemExit(f"validate_layer: {case}: no such file or golden case")


def golden_layer_cases():
    """The files of the golden cases of kind "layer" (MANIFEST.json)."""
    try:
        d = kla.golden_dir()
        with open(os.path.join(d, "MANIFEST.json"), encoding="utf-8") as f:
            cases = json.load(f)["cases"]
    except (FileNotFoundError, KeyError, ValueError):
        return []
    return [os.path.join(d, c["file"]) for c in cases if c.get("kind") == "layer"]


def reference(path, kla_exe, tmp):
    """(reference: a path kla.compare reads, tensors, metadata). A golden case is its own
    reference; an input file gets one from `kla layer backward --backend ref64`."""
    t, m = kla.load(path)
    if "y" in t:
        return path, t, m
    if not kla_exe:
        raise SystemExit(f"validate_layer: {path} holds no expected outputs (y, dx, grad.*) and "
                         "the kla program was not found to make them (--kla PATH or $KLA)")
    out = os.path.join(tmp, os.path.basename(path) + ".ref64.safetensors")
    p = subprocess.run([kla_exe, "layer", "backward", "--backend", "ref64", path, "-o", out],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"validate_layer: kla layer backward {path}: {p.stderr.strip()}")
    return out, t, m


# ----------------------------------------------------------------------------- the layers
# Each maker returns (module, forward(x, cu_seqlens) -> y, names): names maps every one of
# our parameter names to the module's own (module.get_parameter(own).grad is read back).

def _torch_model(arg):
    for c in (arg, os.environ.get("KLA_SRC") and os.path.join(os.environ["KLA_SRC"], "tests",
                                                             "torch_model.py"),
              os.path.join(ROOT, "tests", "torch_model.py")):
        if c and os.path.isfile(c):
            spec = importlib.util.spec_from_file_location("torch_model", c)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    raise SystemExit("validate_layer: tests/torch_model.py not found (--model-py PATH or $KLA_SRC)")


def make_spec_layer(cfg, args):
    """tests/torch_model.py's KLALayer: its state_dict names are ours."""
    tm = _torch_model(args.model_py)
    layer = tm.KLALayer(cfg["d"], cfg["H"], cfg["dk"], cfg["dv"], cfg["norm_eps"], cfg["mixer"])
    return layer, (lambda x, cu: layer(x, cu)), {n: n for n in PARAMS}


def make_fla_layer(cfg, args):
    """fla's GatedDeltaNet as our layer (module docstring, "fla")."""
    nn = torch.nn
    from fla.layers import GatedDeltaNet
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    d, H, dk, dv = cfg["d"], cfg["H"], cfg["dk"], cfg["dv"]
    layer = GatedDeltaNet(hidden_size=d, head_dim=dk, expand_v=dv / dk, num_heads=H,
                          mode="chunk", use_gate=True, use_short_conv=True, conv_size=4,
                          conv_bias=False, allow_neg_eigval=False, norm_eps=cfg["norm_eps"],
                          layer_idx=0)
    layer.b_proj = nn.Linear(d, H, bias=True)          # 1. ours has a bias
    layer.train()                                       # mode 'chunk' (it has a backward)
    names = {n: n[len("attn."):] for n in PARAMS}       # fla's names are ours without attn.

    def conv(m, z, cu):
        out = m(x=z, cu_seqlens=cu)
        return out[0] if isinstance(out, tuple) else out   # silu is applied inside

    def f32(t):                                         # at least float32, as fla's gates
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    def kla_forward(x, cu):                             # 2. mixer kla, outside the layer
        B, T, _ = x.shape
        q = conv(layer.q_conv1d, layer.q_proj(x), cu).reshape(B, T, H, dk)
        k = conv(layer.k_conv1d, layer.k_proj(x), cu).reshape(B, T, H, dk)
        v = conv(layer.v_conv1d, layer.v_proj(x), cu).reshape(B, T, H, dv)
        q = q / torch.sqrt((f32(q) ** 2).sum(-1, keepdim=True) + 1e-6).to(q.dtype)
        eta = torch.sigmoid(f32(layer.b_proj(x)))
        beta = eta / ((f32(k) ** 2).sum(-1) + 1e-6)
        a = f32(layer.a_proj(x)) + f32(layer.dt_bias)
        g = -torch.exp(f32(layer.A_log)) * torch.logaddexp(a, torch.zeros_like(a))
        o, _ = chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, scale=dk ** -0.5,
                                      use_qk_l2norm_in_kernel=False, output_final_state=False,
                                      cu_seqlens=cu)
        o = layer.o_norm(o, layer.g_proj(x).reshape(B, T, H, dv))
        return layer.o_proj(o.reshape(B, T, H * dv))

    def gdn_forward(x, cu):
        return layer(x, cu_seqlens=cu)[0]

    return layer, (kla_forward if cfg["mixer"] == "kla" else gdn_forward), names


def make_my_layer(cfg, args):
    """EDIT ME: build your layer for cfg (d, H, dk, dv, norm_eps, mixer) and return
    (module, forward(x, cu_seqlens) -> y, {our name: your parameter's name}). The
    parameters are loaded with module.load_state_dict({your name: value}) afterwards."""
    return make_spec_layer(cfg, args)


MAKERS = {"spec": make_spec_layer, "fla": make_fla_layer, "mine": make_my_layer}


# ----------------------------------------------------------------------------- one check

def run_layer(which, tensors, meta, args, perturb=None, mixer=None):
    """Forward and backward of layer `which` on a case: {y, dx, grad.<our name>}."""
    cfg = config(tensors, meta)
    if mixer:
        cfg["mixer"] = mixer
    module, forward, names = MAKERS[which](cfg, args)
    dt = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    module.to(device=dev, dtype=dt)
    sd = {names[n]: torch.as_tensor(np.asarray(tensors[n], np.float64)).to(dev, dt) for n in PARAMS}
    if perturb:
        name, by = perturb
        sd[names[name]] = sd[names[name]] * (1 + by)
    module.load_state_dict(sd, strict=True)
    x = torch.as_tensor(np.asarray(tensors["x"], np.float64)).to(dev, dt).requires_grad_(True)
    dy = torch.as_tensor(np.asarray(tensors["dy"], np.float64)).to(dev, dt)
    cu = None
    if "cu_seqlens" in tensors:
        cu = torch.as_tensor(np.asarray(tensors["cu_seqlens"], np.int64)).to(dev)
    module.zero_grad(set_to_none=True)
    y = forward(x, cu)
    y.backward(dy)
    out = {"y": y, "dx": x.grad}
    for n in PARAMS:
        g = module.get_parameter(names[n]).grad
        out["grad." + n] = g if g is not None else torch.zeros_like(module.get_parameter(names[n]))
    return {n: v.detach().double().cpu().numpy() for n, v in out.items()}


def validate(path, which, args, kla_exe, tmp, quiet=False, **kw):
    ref, t, m = reference(path, kla_exe, tmp)
    got = run_layer(which, t, m, args, **kw)
    if args.save:
        kla.save(args.save, got, {"mixer": config(t, m)["mixer"]})
    tol = args.tol
    if tol is None and which == "fla":
        tol = FLA_TOL
    if tol is not None and tol not in ("float32", "bf16"):
        tol = float(tol)
    if not quiet:
        print(f"== {path}: {which} layer, mixer {config(t, m)['mixer']}, "
              f"{args.dtype} on {args.device}")
    return kla.compare(got, ref, tol=tol, file=None if quiet else sys.stdout)


# ----------------------------------------------------------------------------- self test

def random_case(path, rng, mixer, B, T, cu=None, d=16, H=2, dk=8, dv=4):
    shapes = {"attn.q_proj.weight": (H * dk, d), "attn.k_proj.weight": (H * dk, d),
              "attn.v_proj.weight": (H * dv, d), "attn.a_proj.weight": (H, d),
              "attn.b_proj.weight": (H, d), "attn.b_proj.bias": (H,),
              "attn.g_proj.weight": (H * dv, d), "attn.o_proj.weight": (d, H * dv),
              "attn.q_conv1d.weight": (H * dk, 1, 4), "attn.k_conv1d.weight": (H * dk, 1, 4),
              "attn.v_conv1d.weight": (H * dv, 1, 4), "attn.A_log": (H,), "attn.dt_bias": (H,),
              "attn.o_norm.weight": (dv,)}
    t = {}
    for n, s in shapes.items():
        if n.endswith("norm.weight"):
            a = 1 + 0.3 * rng.standard_normal(s)
        elif n.endswith("A_log"):
            a = rng.uniform(-1.5, 1.0, s)
        elif n.endswith("dt_bias"):
            a = rng.uniform(-2.0, 0.5, s)
        elif n.endswith("bias") or "conv1d" in n:
            a = 0.6 * rng.standard_normal(s)
        else:
            a = rng.standard_normal(s) / math.sqrt(s[-1])
        t[n] = a.astype(np.float32)
    t["x"] = rng.standard_normal((B, T, d)).astype(np.float32)
    t["dy"] = rng.standard_normal((B, T, d)).astype(np.float32)
    if cu is not None:
        t["cu_seqlens"] = np.asarray(cu, np.int64)
    kla.save(path, t, {"mixer": mixer})
    return path


def selftest(args, kla_exe, tmp):
    if not kla_exe:
        raise SystemExit("validate_layer --selftest: the kla program was not found (--kla PATH)")
    which = "fla" if args.fla else "mine" if args.mine else "spec"
    rng = np.random.default_rng(7)
    cases = [random_case(os.path.join(tmp, "kla_B2_T20.safetensors"), rng, "kla", 2, 20),
             random_case(os.path.join(tmp, "gdn_B2_T20.safetensors"), rng, "gdn", 2, 20),
             random_case(os.path.join(tmp, "kla_varlen.safetensors"), rng, "kla", 1, 20,
                         [0, 7, 20])]
    cases += golden_layer_cases()
    ok = True
    for c in cases:
        r = validate(c, which, args, kla_exe, tmp)
        ok &= bool(r)
        print(f"selftest: {which} layer on {os.path.basename(c)}: {'PASS' if r else 'FAIL'}")
    # a wrong layer must fail: the other mixer, and one o_norm weight off by 1e-3
    t, m = kla.load(cases[0])
    by = 1e-3 if which != "fla" else 10 * FLA_TOL     # well above the comparison's tolerance
    for label, kw in (("the gdn mixer on a kla case", {"mixer": "gdn"}),
                      (f"o_norm.weight off by {by:g}", {"perturb": ("attn.o_norm.weight", by)})):
        r = validate(cases[0], which, args, kla_exe, tmp, quiet=True, **kw)
        bad = [x["name"] for x in r.tensors if not x["pass"]]
        print(f"selftest: a wrong layer ({label}) {'fails' if not r else 'PASSES'}: "
              f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}")
        ok &= not r
    print("selftest:", "PASS" if ok else "FAIL")
    return ok


def main():
    global torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help="layer files or golden case names (default: every "
                    "golden layer case)")
    ap.add_argument("--fla", action="store_true", help="flash-linear-attention's GatedDeltaNet")
    ap.add_argument("--mine", action="store_true", help="the layer of make_my_layer()")
    ap.add_argument("--kla", default=None, help="the kla program (reference for input files)")
    ap.add_argument("--model-py", default=None, help="path of tests/torch_model.py")
    ap.add_argument("--tol", default=None, help="a number, float32 or bf16 (default: the "
                    f"case's float32 set; {FLA_TOL:g} with --fla)")
    ap.add_argument("--dtype", default=None, choices=("float64", "float32"),
                    help="default float64, float32 with --fla")
    ap.add_argument("--device", default=None, help="default cpu, cuda with --fla")
    ap.add_argument("--save", default=None, help="write the layer's outputs here (for kla verify)")
    ap.add_argument("--selftest", action="store_true")
    args = ap.parse_args()
    try:
        import torch as _torch
    except ImportError as e:
        print(f"validate_layer: needs PyTorch ({e})", file=sys.stderr)
        return 77 if args.selftest else 2      # 77: a skip, for meson's test()
    torch = _torch
    args.dtype = args.dtype or ("float32" if args.fla else "float64")
    args.device = args.device or ("cuda" if args.fla else "cpu")
    if args.fla:
        if importlib.util.find_spec("fla") is None:
            raise SystemExit("validate_layer --fla: flash-linear-attention (fla) is not importable")
        if not torch.cuda.is_available() and args.device.startswith("cuda"):
            raise SystemExit("validate_layer --fla: fla's Triton kernels need a CUDA GPU")
    kla_exe = find_kla(args.kla)
    with tempfile.TemporaryDirectory(prefix="kla-validate-layer-") as tmp:
        if args.selftest:
            return 0 if selftest(args, kla_exe, tmp) else 1
        cases = [resolve(c) for c in args.cases] or golden_layer_cases()
        if not cases:
            raise SystemExit("validate_layer: no case given and no golden layer case found")
        which = "fla" if args.fla else "mine" if args.mine else "spec"
        ok = True
        for c in cases:
            ok &= bool(validate(c, which, args, kla_exe, tmp))
        print("validate_layer:", "PASS" if ok else "FAIL",
              f"({len(cases)} case{'s' * (len(cases) > 1)})")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
