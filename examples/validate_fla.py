#!/usr/bin/env python3
"""Validate flash-linear-attention's chunk_gated_delta_rule as a KLA / Gated DeltaNet
kernel on the golden cases: outputs and gradients.

    python3 examples/validate_fla.py [--cases GLOB] [--dtype bf16|fp16] [--out DIR]

NOT RUN IN THIS REPOSITORY'S CI: it needs a CUDA GPU, PyTorch and flash-linear-attention
(`pip install flash-linear-attention`), none of which the CI machine has. It is meant as
a complete, copyable example of validating a PyTorch kernel; docs/validating.md walks
through it.

KLA through a Gated DeltaNet kernel (kla-spec.md section 1). KLA is GDN with the step
size beta_t = eta_t / (||k_t||^2 + eps), so any GDN kernel computes KLA when it is given
that beta. Here it is computed on the host, in float32, with autograd, from the raw k
(or from l2norm(k) when the case has l2norm_k), so the gradient reaches eta and k
through it. The kernel gets the already-normalised q (and k), with
use_qk_l2norm_in_kernel=False; the norm is l2norm(x) = x / sqrt(||x||^2 + 1e-6), as in
the spec (and fla). When a case normalises both q and k, use_qk_l2norm_in_kernel=True on
the raw q and k is equivalent (beta still from l2norm(k) on the host).

Conventions matched: fla's head_first=False layout [B, T, H, K]; g is the natural log of
the decay (fla's g, "in log space"); fla decays first and reads the updated state, as
the spec does; its states are [N, H, K, V] (our state_layout kv: cases in layout vk are
transposed); cu_seqlens as a LongTensor with B = 1. Grouped value heads (HV > H): value
head hv reads key head hv // (HV / H); q and k are repeated per value head with
repeat_interleave, and autograd sums their gradients back.

fla's chunk kernel takes bf16 or fp16 (not float32) q, k, v: compare with the bf16
tolerance set (tol="bf16"), which is the default here.
"""

import argparse
import fnmatch
import os
import sys

import torch
from fla.ops.gated_delta_rule import chunk_gated_delta_rule

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))  # or: pip install ./python
import kla  # noqa: E402


def l2norm(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def run_case(case, dtype, device):
    """fla's outputs and gradients for one golden case, as float32 numpy arrays named as
    in the spec (o ht dq dk dv dg deta|dbeta dh0)."""
    inp, opt = case.inputs, case.options
    B, T, H, K = inp["q"].shape
    HV = inp["v"].shape[2]
    G = HV // H
    is_kla = opt["mode"] == "kla"
    vk = opt["state_layout"] == "vk"

    # float32 leaves: the gradients come back in float32, with respect to the raw inputs
    def leaf(a):
        return torch.tensor(a, dtype=torch.float32, device=device, requires_grad=True)

    q, k, v = leaf(inp["q"]), leaf(inp["k"]), leaf(inp["v"])
    # no g (DeltaNet): zeros, so that dg is the gradient at g = 0, as in the case file
    g = leaf(inp["g"]) if "g" in inp else torch.zeros(B, T, HV, device=device,
                                                      requires_grad=True)
    s = leaf(inp["eta"] if is_kla else inp["beta"])
    h0 = leaf(inp["h0"]) if "h0" in inp else None
    cu = (torch.tensor(inp["cu_seqlens"], dtype=torch.long, device=device)
          if "cu_seqlens" in inp else None)

    qn = l2norm(q) if opt["l2norm_q"] else q
    kn = l2norm(k) if opt["l2norm_k"] else k
    qv = qn.repeat_interleave(G, dim=2)  # [B, T, HV, K]
    kv = kn.repeat_interleave(G, dim=2)
    if is_kla:
        beta = s / ((kv * kv).sum(-1) + opt["eps"])  # host-side KLA step size, float32
    else:
        beta = s
    init = None
    if h0 is not None:
        init = h0.transpose(-1, -2) if vk else h0  # fla's state is [N, HV, K, V]

    o, ht = chunk_gated_delta_rule(
        qv.to(dtype), kv.to(dtype), v.to(dtype), g, beta.to(dtype),
        scale=opt["scale"], initial_state=init, output_final_state=True,
        use_qk_l2norm_in_kernel=False, cu_seqlens=cu)

    # L = sum(do * o) + sum(dht * ht)
    outs = [o]
    grads = [torch.tensor(inp["do"], device=device).to(o.dtype)]
    if "dht" in inp:
        dht = torch.tensor(inp["dht"], device=device)
        outs.append(ht)
        grads.append((dht.transpose(-1, -2) if vk else dht).to(ht.dtype))
    torch.autograd.backward(outs, grads)

    res = {"o": o, "ht": ht.transpose(-1, -2) if vk else ht, "dq": q.grad, "dk": k.grad,
           "dv": v.grad, "dg": g.grad, ("deta" if is_kla else "dbeta"): s.grad}
    if h0 is not None:
        res["dh0"] = h0.grad
    return {n: t.detach().float().contiguous().cpu().numpy() for n, t in res.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="*", help="glob over case names (default: all)")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--out", default="fla-outputs", help="where to save the outputs")
    ap.add_argument("--golden", default=None, help="golden folder (default: the repo's)")
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    os.makedirs(a.out, exist_ok=True)

    failed = []
    names = [n for n in kla.golden_cases(a.golden) if fnmatch.fnmatch(n, a.cases)]
    for name in names:
        case = kla.load_case(name, a.golden)
        print(f"== {name}")
        try:
            res = run_case(case, dtype, "cuda")
        except Exception as ex:  # a shape or option the kernel does not support
            print(f"   fla raised {type(ex).__name__}: {ex}")
            failed.append(name)
            continue
        # keep the outputs: `kla verify OUT --against golden/CASE.safetensors --tol bf16`
        # prints the same report
        kla.save(os.path.join(a.out, name + ".safetensors"), res,
                 {"state_layout": case.options["state_layout"], "kernel": "fla chunk"})
        rep = kla.compare(res, case, tol="bf16")
        if not rep.ok:
            failed.append(name)
    print(f"{len(names) - len(failed)} of {len(names)} cases pass"
          + (f"; failing: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
