"""A simulated bf16 (or fp16) chunk kernel of the KLA / Gated DeltaNet operator, forward
and backward, with switches for four known bugs. Used by tests/test_bf16_tol.py to
calibrate and check the golden set's `tol_bf16` tolerances.

    run(inp, opts, precision="bf16", chunk=64, bug=None, ...) -> dict of float64 arrays
        inp, opts: as tests/kla_np.py (the spec's tensor names; options as Python values
        or metadata strings). Returns o ht dq dk dv dg deta|dbeta [dh0] in the spec's
        shapes and state layout.

Which algorithm, and why
------------------------
The chunked WY / UT form of flash-linear-attention's `chunk_gated_delta_rule` (chunk
size 64), because that is the bf16 kernel people run and the one with the most rounding:
a recurrent kernel keeps the state in float32 registers and rounds only its inputs and
outputs. Per chunk of L <= C tokens (cumulative log decay gc within the chunk, beta per
token, h the state at the chunk start):

    A   = strict_lower(beta_i (k_i . k_j) exp(gc_i - gc_j))      float32 (fla: kkt, F32)
    Ti  = (I + A)^-1                                             float32 solve, stored bf16
    w   = Ti (beta exp(gc) k),   u = Ti (beta v)                 bf16 operands, stored bf16
    vn  = u - w bf16(h)                                          "v_new" = beta e, stored bf16
    o   = scale (exp(gc) q bf16(h) + bf16(lower_incl((q k^T) exp(gc_i - gc_j))) vn)   -> bf16
    h  <- exp(gc_L) h + k^T bf16(vn exp(gc_L - gc))              h carried in float32

Rounding model (bf16 round-to-nearest-even unless stated):
  * inputs q k v g eta|beta h0 do dht are rounded (g and h0 optional: round_g, round_h0);
  * l2norm (float32 arithmetic) stores its output in bf16, like fla's l2norm kernel;
  * KLA's beta = eta / (||k||^2 + eps) is computed in float32 from the stored bf16 key
    and stored in bf16 (it is a bf16 tensor when handed to a bf16 kernel);
  * every matrix product (`_Dot`) takes bf16 operands and accumulates in float32, as a
    tensor-core tl.dot does: both operands in the forward, the incoming gradient and the
    saved operands in the backward;
  * every tensor a kernel stores between kernels (`_Round`: Ti, w, u, v_new, the per-chunk
    bf16 copy of the state, o, ht, the per-value-head q/k before the group sum) is rounded
    in the forward, and its gradient is rounded in the backward, like a bf16 tensor's
    gradient in PyTorch or fla's bf16 dh / dv / dw / du buffers;
  * the state carried from chunk to chunk stays float32 (as in fla's chunk_fwd_h, which
    keeps it in registers and stores a bf16 copy per chunk); carry_bf16=True rounds it;
  * everything else (exp, cumsum of g, the elementwise products, the reductions of the
    norms, the gradient accumulation) is float32.
The backward is PyTorch autograd (float32) of this forward: it walks the same chunks
backwards with the same rounding points, so the gradients see bf16 stored states, bf16
v_new, bf16 dh between chunks, and bf16 operands in every product. It is not fla's
hand-fused backward, but it rounds at the same kinds of places. On the golden set its
errors are of the size measured for fla's bf16 chunk kernel: rel_rmse up to 8.3e-3 on
o, ht, dq (fla: 8.3e-3), worst elements 3.6e-2 of |ref| + rms(ref) for o (fla: 2.9e-2)
and 7.6e-2 for dk (fla: 6.2e-2).

precision="fp16" rounds the same points to IEEE half instead; eta, beta and g then
stay float32 (beta = eta / eps reaches 1.5e6 in the knorms case, past fp16's range).
precision="none" (with dtype float64) turns every rounding off: then the chunk form must
agree with the float64 recurrence, which `selfcheck()` verifies for every bug flag.
rounding="sr" uses stochastic rounding (bf16 only) seeded by `seed`: different
independent draws of the rounding errors, about 1.4 times noisier than nearest.

Bugs (bug=...), each consistent in forward and backward (autograd of the buggy forward):
  "head_map"     value head hv reads key head hv % H instead of hv / (HV / H)
                 (differs only when H > 1 and HV > H);
  "decay_after"  S_t = alpha_t (S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)): decay applied
                 after the update; in the WY form this is exactly v_t -> alpha_t v_t;
  "norm_grad"    beta = eta / (||k||^2 + eps) with no gradient through ||k||^2 (mode kla);
  "varlen_leak"  with cu_seqlens, sequence n > 0 starts from the final state of sequence
                 n - 1 instead of its own h0 (chunks still split at the boundaries).
"""

import numpy as np
import torch

__all__ = ["run", "recurrent64", "BUGS", "selfcheck"]

BUGS = ("head_map", "decay_after", "norm_grad", "varlen_leak")
L2NORM_EPS = 1e-6


# --------------------------------------------------------------------------- options

def _flag(v):
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1")
    return bool(v)


def _opts(inp, opts):
    opts = dict(opts or {})
    K = np.shape(inp["q"])[-1]
    mode = opts.get("mode") or ("kla" if "eta" in inp else "gdn")
    scale, eps = opts.get("scale"), opts.get("eps")
    return {"mode": mode,
            "scale": K ** -0.5 if scale is None else float(scale),
            "eps": 1e-6 if eps is None else float(eps),
            "l2norm_q": _flag(opts.get("l2norm_q", False)),
            "l2norm_k": _flag(opts.get("l2norm_k", False)),
            "vk": (opts.get("state_layout") or "kv") == "vk"}


def _sequences(inp, B, T):
    cu = inp.get("cu_seqlens")
    if cu is None:
        return None
    cu = np.asarray(cu).astype(np.int64).ravel()
    return [(int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]


# --------------------------------------------------------------------------- rounding

class _Rounder:
    """x -> x rounded to the storage format (returned in the compute dtype)."""

    def __init__(self, precision, rounding="rne", seed=0):
        self.precision, self.rounding = precision, rounding
        self.gen = torch.Generator().manual_seed(int(seed))
        if precision == "fp16" and rounding != "rne":
            raise ValueError("stochastic rounding only for bf16")

    def __call__(self, x):
        if self.precision == "none":
            return x
        if self.precision == "fp16":
            return x.half().to(x.dtype)
        if self.rounding == "rne":
            return x.to(torch.bfloat16).to(x.dtype)
        # stochastic rounding to bf16: add 16 random low bits, truncate
        bits = x.to(torch.float32).contiguous().view(torch.int32)
        r = torch.randint(0, 1 << 16, bits.shape, generator=self.gen, dtype=torch.int32)
        y = ((bits + r) & -65536).view(torch.float32)
        return torch.where(torch.isfinite(x), y.to(x.dtype), x)


class _Round(torch.autograd.Function):
    """A tensor stored in the low-precision format: rounded forward, gradient rounded."""

    @staticmethod
    def forward(ctx, x, rnd):
        ctx.rnd = rnd
        return rnd(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.rnd(g), None


class _Dot(torch.autograd.Function):
    """a @ b on a tensor core: low-precision operands, float32 accumulation, both passes."""

    @staticmethod
    def forward(ctx, a, b, rnd):
        a, b = rnd(a), rnd(b)
        ctx.save_for_backward(a, b)
        ctx.rnd = rnd
        return a @ b

    @staticmethod
    def backward(ctx, gc):
        a, b = ctx.saved_tensors
        g = ctx.rnd(gc)
        return g @ b.transpose(-1, -2), a.transpose(-1, -2) @ g, None


class _TriInv(torch.autograd.Function):
    """Ti = (I + A)^-1 for strictly lower A: float32 solve, stored rounded. Backward
    dA = strict_lower(-Ti^T dTi Ti^T) with rounded operands (fla's prepare_wy_repr_bwd)."""

    @staticmethod
    def forward(ctx, A, rnd):
        L = A.shape[-1]
        eye = torch.eye(L, dtype=A.dtype).expand_as(A)
        Ti = torch.linalg.solve_triangular(eye + A, eye, upper=False, unitriangular=True)
        Ti = rnd(Ti)
        ctx.save_for_backward(Ti)
        ctx.rnd = rnd
        return Ti

    @staticmethod
    def backward(ctx, gT):
        (Ti,) = ctx.saved_tensors
        rnd = ctx.rnd
        TiT = Ti.transpose(-1, -2)
        dA = -(rnd(rnd(TiT @ rnd(gT)) @ TiT))
        return torch.tril(dA, -1), None


# --------------------------------------------------------------------------- the kernel

def run(inp, opts=None, precision="bf16", chunk=64, bug=None, rounding="rne", seed=0,
        round_g=True, round_h0=True, carry_bf16=False, round_outputs=True, dtype=None):
    """The simulated kernel: forward and backward. Returns float64 numpy arrays:
    o ht dq dk dv dg deta|dbeta [dh0], spec shapes and layout."""
    if bug is not None and bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}")
    o_ = _opts(inp, opts)
    dtype = dtype or (torch.float64 if precision == "none" else torch.float32)
    rnd = _Rounder(precision, rounding, seed)
    lowp = precision != "none"
    R = lambda x: _Round.apply(x, rnd)
    dot = lambda a, b: _Dot.apply(a, b, rnd)

    def leaf(name, shape=None):
        a = inp.get(name)
        t = (torch.zeros(shape, dtype=dtype) if a is None
             else torch.tensor(np.asarray(a, dtype=np.float64), dtype=dtype))
        return t.requires_grad_(True)

    q_raw, k_raw = leaf("q"), leaf("k")
    v_in = leaf("v")
    B, T, H, K = q_raw.shape
    HV, V = v_in.shape[2], v_in.shape[3]
    G = HV // H
    kla = o_["mode"] == "kla"
    sname = "eta" if kla else "beta"
    g_in = leaf("g", (B, T, HV))
    s_in = leaf(sname)
    seqs = _sequences(inp, B, T)
    N = B if seqs is None else len(seqs)
    has_h0 = inp.get("h0") is not None
    h0_in = leaf("h0", (N, HV, K, V) if not o_["vk"] else (N, HV, V, K))
    # scalars per token stay float32 in fp16 (range); bf16 rounds them like other inputs
    Rs = (lambda x: x) if precision == "fp16" else R

    # ---- inputs, normalisation, heads, step size
    q = R(q_raw)
    k = R(k_raw)
    v = R(v_in)
    g = Rs(g_in) if round_g else g_in
    s = Rs(s_in)
    h0 = (R(h0_in) if round_h0 else h0_in)
    if o_["vk"]:
        h0 = h0.transpose(-1, -2)
    if o_["l2norm_q"]:
        q = R(q * torch.rsqrt((q * q).sum(-1, keepdim=True) + L2NORM_EPS))
    if o_["l2norm_k"]:
        k = R(k * torch.rsqrt((k * k).sum(-1, keepdim=True) + L2NORM_EPS))
    hmap = torch.arange(HV) % H if bug == "head_map" else torch.arange(HV) // G
    qv = R(q[:, :, hmap])  # [B, T, HV, K]; per-value-head gradient stored, then summed
    kv = R(k[:, :, hmap])
    if kla:
        kk = kv.detach() if bug == "norm_grad" else kv
        beta = Rs(s / ((kk * kk).sum(-1) + o_["eps"]))
    else:
        beta = s
    vv = v * torch.exp(g)[..., None] if bug == "decay_after" else v
    # kernel layout [B, HV, T, *]
    qk = qv.permute(0, 2, 1, 3)
    kk_ = kv.permute(0, 2, 1, 3)
    vk = vv.permute(0, 2, 1, 3)
    bk = beta.permute(0, 2, 1)
    gk = g.permute(0, 2, 1)
    scale = o_["scale"]

    def chunk_run(bs, t0, t1, S):
        """Tokens t0..t1-1 of batch rows bs from state S [b, HV, K, V]: (o list, S)."""
        outs = []
        for c0 in range(t0, t1, chunk):
            c1 = min(c0 + chunk, t1)
            L = c1 - c0
            qc, kc, vc = qk[bs, :, c0:c1], kk_[bs, :, c0:c1], vk[bs, :, c0:c1]
            bc, gc = bk[bs, :, c0:c1], torch.cumsum(gk[bs, :, c0:c1], -1)
            diff = gc[..., :, None] - gc[..., None, :]
            incl = torch.ones(L, L, dtype=torch.bool).tril()
            strict = torch.ones(L, L, dtype=torch.bool).tril(-1)
            Di = torch.exp(diff.masked_fill(~incl, float("-inf")))
            Ds = torch.exp(diff.masked_fill(~strict, float("-inf")))
            kT = kc.transpose(-1, -2)
            A = bc[..., :, None] * dot(kc, kT) * Ds
            Ti = _TriInv.apply(A, rnd)
            eg = torch.exp(gc)
            w = R(dot(Ti, R(kc * (bc * eg)[..., None])))
            u = R(dot(Ti, R(vc * bc[..., None])))
            hb = R(S)
            vn = u - dot(w, hb)
            Aqk = dot(qc, kT) * Di
            oc = R(scale * (dot(qc, hb) * eg[..., None] + dot(Aqk, R(vn))))
            outs.append(oc)
            gl = gc[..., -1:]
            S = (S * torch.exp(gl)[..., None]
                 + dot(kT, R(vn * torch.exp(gl - gc)[..., None])))
            if carry_bf16:
                S = R(S)
        return outs, S

    if seqs is None:
        outs, S = chunk_run(slice(None), 0, T, h0)
        o = torch.cat(outs, 2) if outs else vk.new_zeros((B, HV, 0, V))
        ht = S
    else:
        os_, hts, S = [], [], None
        for n, (t0, t1) in enumerate(seqs):
            S0 = h0[n:n + 1] if (bug != "varlen_leak" or n == 0) else S
            outs, S = chunk_run(slice(0, 1), t0, t1, S0)
            os_ += outs
            hts.append(S)
        o = torch.cat(os_, 2)
        ht = torch.cat(hts, 0)
    o = o.permute(0, 2, 1, 3)  # [B, T, HV, V]
    if round_outputs and lowp:
        o, ht = R(o), R(ht)
    ht_out = ht.transpose(-1, -2) if o_["vk"] else ht

    # ---- backward: L = sum(do o) + sum(dht ht), upstream gradients rounded too
    do = torch.tensor(np.asarray(inp["do"], np.float64), dtype=dtype)
    loss = (o * rnd(do)).sum()
    if inp.get("dht") is not None:
        dht = torch.tensor(np.asarray(inp["dht"], np.float64), dtype=dtype)
        loss = loss + (ht_out * rnd(dht)).sum()
    loss.backward()

    def out(t):
        return t.detach().to(torch.float64).numpy().copy()

    res = {"o": out(o), "ht": out(ht_out), "dq": out(q_raw.grad), "dk": out(k_raw.grad),
           "dv": out(v_in.grad), "dg": out(g_in.grad), "d" + sname: out(s_in.grad)}
    if has_h0:
        res["dh0"] = out(h0_in.grad)
    return res


# --------------------------------------------------------------------------- float64 recurrence

def recurrent64(inp, opts=None, bug=None):
    """The token-by-token recurrence of kla-spec.md section 1 in float64, with the same
    bug switches, gradients by autograd. The ground truth of each bug (and, with
    bug=None, a check against tests/kla_np.py)."""
    o_ = _opts(inp, opts)
    f = lambda name, shape=None: (torch.zeros(shape, dtype=torch.float64) if inp.get(name) is None
                                  else torch.tensor(np.asarray(inp[name], np.float64))
                                  ).requires_grad_(True)
    q_raw, k_raw, v = f("q"), f("k"), f("v")
    B, T, H, K = q_raw.shape
    HV, V = v.shape[2], v.shape[3]
    kla = o_["mode"] == "kla"
    sname = "eta" if kla else "beta"
    g, s = f("g", (B, T, HV)), f(sname)
    seqs = _sequences(inp, B, T)
    N = B if seqs is None else len(seqs)
    h0_in = f("h0", (N, HV, K, V) if not o_["vk"] else (N, HV, V, K))
    h0 = h0_in.transpose(-1, -2) if o_["vk"] else h0_in
    q, k = q_raw, k_raw
    if o_["l2norm_q"]:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + L2NORM_EPS)
    if o_["l2norm_k"]:
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + L2NORM_EPS)
    hmap = torch.arange(HV) % H if bug == "head_map" else torch.arange(HV) // (HV // H)
    q, k = q[:, :, hmap], k[:, :, hmap]
    if kla:
        kn = k.detach() if bug == "norm_grad" else k
        beta = s / ((kn * kn).sum(-1) + o_["eps"])
    else:
        beta = s
    alpha = torch.exp(g)
    spans = [(b, b, 0, T) for b in range(B)] if seqs is None else \
        [(n, 0, t0, t1) for n, (t0, t1) in enumerate(seqs)]
    o = [[None] * T for _ in range(B)]
    hts, S = [], None
    for n, b, t0, t1 in spans:
        S = h0[n] if (bug != "varlen_leak" or seqs is None or n == 0) else S
        for t in range(t0, t1):
            kt, qt, a, bt = k[b, t], q[b, t], alpha[b, t], beta[b, t]
            if bug == "decay_after":
                e = v[b, t] - torch.einsum("hkv,hk->hv", S, kt)
                S = a[:, None, None] * (S + bt[:, None, None] * kt[:, :, None] * e[:, None, :])
            else:
                S = a[:, None, None] * S
                e = v[b, t] - torch.einsum("hkv,hk->hv", S, kt)
                S = S + bt[:, None, None] * kt[:, :, None] * e[:, None, :]
            o[b][t] = o_["scale"] * torch.einsum("hkv,hk->hv", S, qt)
        hts.append(S)
    o = torch.stack([torch.stack(r) for r in o]) if T else v.new_zeros((B, 0, HV, V))
    ht = torch.stack(hts)
    ht = ht.transpose(-1, -2) if o_["vk"] else ht
    loss = (o * torch.tensor(np.asarray(inp["do"], np.float64))).sum()
    if inp.get("dht") is not None:
        loss = loss + (ht * torch.tensor(np.asarray(inp["dht"], np.float64))).sum()
    loss.backward()
    out = lambda t: t.detach().numpy().copy()
    res = {"o": out(o), "ht": out(ht), "dq": out(q_raw.grad), "dk": out(k_raw.grad),
           "dv": out(v.grad), "dg": out(g.grad), "d" + sname: out(s.grad)}
    if inp.get("h0") is not None:
        res["dh0"] = out(h0_in.grad)
    return res


def selfcheck(inp, opts=None, chunk=64):
    """Worst rel_rmse over tensors of: the chunk form without rounding against the
    float64 recurrence, for bug = None and each bug. Returns {bug: worst}."""
    res = {}
    for bug in (None,) + BUGS:
        a = run(inp, opts, precision="none", chunk=chunk, bug=bug)
        b = recurrent64(inp, opts, bug=bug)
        worst = 0.0
        for n in b:
            den = np.sqrt(np.mean(b[n] ** 2)) if b[n].size else 0.0
            num = np.sqrt(np.mean((a[n] - b[n]) ** 2)) if b[n].size else 0.0
            worst = max(worst, num / den if den > 0 else num)
        res[bug] = worst
    return res
