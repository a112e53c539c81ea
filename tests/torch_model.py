"""A plain PyTorch implementation of the KLA mixer layer, the model and its training step,
written from kla-spec.md section 8 and notes/layer-and-mqar.md sections 3.1-3.5 alone.

Everything is autograd on straightforward code: the recurrence is a Python loop over the
tokens (kla-spec.md section 1: decay first, then the delta step against the decayed
state, then read the updated state), vectorised only over batch and heads. Meant for
float64 (use .double()); nothing here is fast.

    KLAMixer(d, H, dk, dv, norm_eps=1e-5, mixer="kla")   the mixer of 8.1; its parameters
        are q_proj.weight, k_proj.weight, v_proj.weight, a_proj.weight, b_proj.weight,
        b_proj.bias, g_proj.weight, o_proj.weight, {q,k,v}_conv1d.weight, A_log,
        dt_bias, o_norm.weight (flash-linear-attention's GatedDeltaNet names, 8.3)
    KLALayer(...)       the same mixer as submodule `attn`, so its state_dict names are
        those of a `kla layer backward` file: attn.q_proj.weight, ...
    KLAModel(vocab, d, n_layer, H, dk, dv, d_ff, norm_eps=1e-5, mixer="kla")   8.2:
        embeddings.weight, layers.{i}.attn_norm.weight, layers.{i}.attn.*,
        layers.{i}.mlp_norm.weight, layers.{i}.mlp.{gate,up,down}_proj.weight, norm.weight
    layer_from_tensors(tensors, metadata) / model_from_tensors(...)   build one from a
        file's tensors (sizes from the shapes, as `kla layer|model` do) and load them
    layer_backward(layer, x, dy, cu_seqlens=None) -> (y, dx, {name: grad})
    train_step(model, input_ids, labels, lr=1e-3, beta1=0.9, beta2=0.95, adam_eps=1e-8,
               weight_decay=0.1, clip=1.0) -> (loss, {name: grad before clipping},
               {name: parameter after one AdamW step})

Only torch is needed (any version with torch.optim.AdamW; tested with 1.13 and 2.x).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["KLAMixer", "KLALayer", "KLAModel", "RMSNorm", "SwiGLU", "Block",
           "layer_from_tensors", "model_from_tensors", "layer_backward", "train_step",
           "causal_conv4", "recurrence", "LAYER_PARAMS"]

# the mixer's parameters, as named inside `attn` (kla-spec.md 8.3)
LAYER_PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight",
                "b_proj.weight", "b_proj.bias", "g_proj.weight", "o_proj.weight",
                "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight", "A_log", "dt_bias",
                "o_norm.weight")


def silu(x):
    return x * torch.sigmoid(x)


def softplus(x):
    # log(1 + e^x) with no threshold switch (torch's softplus returns x above 20)
    return torch.logaddexp(x, torch.zeros_like(x))


def l2norm(x, eps=1e-6):
    """kla-spec.md section 1: x / sqrt(sum(x^2) + 1e-6) over the last dimension."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def rmsnorm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w over the last dimension."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


class RMSNorm(nn.Module):
    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return rmsnorm(x, self.weight, self.eps)


def segments(B, T, cu_seqlens):
    """(row, start, end) of every sequence: B rows of T tokens, or cu_seqlens' spans of
    row 0 (B must be 1)."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError("cu_seqlens needs B = 1")
    c = [int(v) for v in cu_seqlens]
    return [(0, c[n], c[n + 1]) for n in range(len(c) - 1)]


def causal_conv4(x, w, cu_seqlens=None):
    """Depthwise causal convolution, no bias: y[t, c] = sum_j w[c, 0, j] x[t - 3 + j, c],
    x before the start of the sequence = 0 (restarting at every cu_seqlens boundary).
    x [B, T, C], w [C, 1, K]."""
    B, T, C = x.shape
    K = w.shape[-1]
    outs = {}
    for b, s, e in segments(B, T, cu_seqlens):
        seg = x[b:b + 1, s:e].transpose(1, 2)                # [1, C, L]
        seg = F.pad(seg, (K - 1, 0))                          # zeros on the left only
        outs[b, s] = F.conv1d(seg, w, groups=C).transpose(1, 2)[0]   # [L, C]
    rows = []
    for b in range(B):
        parts = [outs[key] for key in sorted(k for k in outs if k[0] == b)]
        rows.append(torch.cat(parts, 0) if parts else x.new_zeros(0, C))
    return torch.stack(rows)


def recurrence(q, k, v, g, b, mode="kla", scale=None, eps=1e-6, cu_seqlens=None):
    """kla-spec.md section 1, a token loop. q, k [B, T, H, K]; v [B, T, H, V]; g, b
    [B, T, H] (b is eta in mode kla, beta in mode gdn). Returns o [B, T, H, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    sc = K ** -0.5 if scale is None else scale
    o = [[None] * T for _ in range(B)]
    for r, s, e in segments(B, T, cu_seqlens):
        S = q.new_zeros(H, K, V)
        for t in range(s, e):
            kt, vt, qt = k[r, t], v[r, t], q[r, t]               # [H, K], [H, V], [H, K]
            S = torch.exp(g[r, t])[:, None, None] * S            # decay first
            if mode == "kla":
                beta = b[r, t] / ((kt * kt).sum(-1) + eps)
            else:
                beta = b[r, t]
            err = vt - torch.einsum("hkv,hk->hv", S, kt)          # against the decayed state
            S = S + beta[:, None, None] * kt[:, :, None] * err[:, None, :]
            o[r][t] = torch.einsum("hkv,hk->hv", S, sc * qt)     # reads the updated state
    return torch.stack([torch.stack(row) for row in o])


class KLAMixer(nn.Module):
    """kla-spec.md 8.1: x [B, T, d] -> y [B, T, d]."""

    def __init__(self, d, H, dk, dv, norm_eps=1e-5, mixer="kla"):
        super().__init__()
        if mixer not in ("kla", "gdn"):
            raise ValueError("mixer: kla or gdn")
        self.d, self.H, self.dk, self.dv = d, H, dk, dv
        self.norm_eps, self.mixer = norm_eps, mixer
        self.q_proj = nn.Linear(d, H * dk, bias=False)
        self.k_proj = nn.Linear(d, H * dk, bias=False)
        self.v_proj = nn.Linear(d, H * dv, bias=False)
        self.a_proj = nn.Linear(d, H, bias=False)
        self.b_proj = nn.Linear(d, H, bias=True)
        self.g_proj = nn.Linear(d, H * dv, bias=False)
        self.o_proj = nn.Linear(H * dv, d, bias=False)
        # depthwise, kernel 4, no bias; the causal padding is done in causal_conv4
        self.q_conv1d = nn.Conv1d(H * dk, H * dk, 4, groups=H * dk, bias=False)
        self.k_conv1d = nn.Conv1d(H * dk, H * dk, 4, groups=H * dk, bias=False)
        self.v_conv1d = nn.Conv1d(H * dv, H * dv, 4, groups=H * dv, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.o_norm = RMSNorm(dv, norm_eps)

    def forward(self, x, cu_seqlens=None):
        B, T, _ = x.shape
        H, dk, dv = self.H, self.dk, self.dv
        q = silu(causal_conv4(self.q_proj(x), self.q_conv1d.weight, cu_seqlens))
        k = silu(causal_conv4(self.k_proj(x), self.k_conv1d.weight, cu_seqlens))
        v = silu(causal_conv4(self.v_proj(x), self.v_conv1d.weight, cu_seqlens))
        g = -torch.exp(self.A_log) * softplus(self.a_proj(x) + self.dt_bias)    # [B, T, H]
        eta = torch.sigmoid(self.b_proj(x))                                     # [B, T, H]
        q = l2norm(q.reshape(B, T, H, dk))
        k = k.reshape(B, T, H, dk)
        if self.mixer == "gdn":
            k = l2norm(k)
        v = v.reshape(B, T, H, dv)
        o = recurrence(q, k, v, g, eta, mode=self.mixer, scale=dk ** -0.5, eps=1e-6,
                       cu_seqlens=cu_seqlens)                                    # [B, T, H, dv]
        gate = self.g_proj(x).reshape(B, T, H, dv)
        o = self.o_norm(o) * silu(gate)             # per head, one weight shared by the heads
        return self.o_proj(o.reshape(B, T, H * dv))


class KLALayer(nn.Module):
    """The mixer as submodule `attn`: state_dict names are a layer file's (attn.*)."""

    def __init__(self, d, H, dk, dv, norm_eps=1e-5, mixer="kla"):
        super().__init__()
        self.attn = KLAMixer(d, H, dk, dv, norm_eps, mixer)

    def forward(self, x, cu_seqlens=None):
        return self.attn(x, cu_seqlens)


class SwiGLU(nn.Module):
    """W3 (silu(n W1) * (n W2)): gate_proj W1, up_proj W2, down_proj W3, no bias."""

    def __init__(self, d, d_ff):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, n):
        return self.down_proj(silu(self.gate_proj(n)) * self.up_proj(n))


class Block(nn.Module):
    def __init__(self, d, H, dk, dv, d_ff, norm_eps=1e-5, mixer="kla"):
        super().__init__()
        self.attn_norm = RMSNorm(d, norm_eps)
        self.attn = KLAMixer(d, H, dk, dv, norm_eps, mixer)
        self.mlp_norm = RMSNorm(d, norm_eps)
        self.mlp = SwiGLU(d, d_ff)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class KLAModel(nn.Module):
    """kla-spec.md 8.2: embedding, n_layer pre-norm blocks, final RMSNorm, tied head."""

    def __init__(self, vocab, d, n_layer, H, dk, dv, d_ff, norm_eps=1e-5, mixer="kla"):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, H, dk, dv, d_ff, norm_eps, mixer)
                                    for _ in range(n_layer))
        self.norm = RMSNorm(d, norm_eps)

    def logits(self, input_ids):
        x = self.embeddings(input_ids)
        for blk in self.layers:
            x = blk(x)
        return F.linear(self.norm(x), self.embeddings.weight)     # tied: x E^T

    def forward(self, input_ids, labels):
        """Mean cross-entropy over the positions whose label is not -100."""
        lg = self.logits(input_ids)
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1).long(),
                               ignore_index=-100, reduction="mean")


# ------------------------------------------------------------------------ from files

def _t(a, dtype):
    return torch.as_tensor(a).to(dtype) if not torch.is_tensor(a) else a.to(dtype)


def _meta_float(meta, key, default):
    v = (meta or {}).get(key)
    return float(v) if v not in (None, "") else default


def layer_from_tensors(tensors, metadata=None, dtype=torch.float64):
    """A KLALayer sized from tensors' shapes (attn.A_log [H], attn.q_proj.weight
    [H*dk, d], attn.o_norm.weight [dv]), norm_eps and mixer from metadata (defaults
    1e-5, kla), with the parameters loaded (load_state_dict, strict)."""
    H = int(tensors["attn.A_log"].shape[0])
    hk, d = (int(s) for s in tensors["attn.q_proj.weight"].shape)
    dv = int(tensors["attn.o_norm.weight"].shape[0])
    m = metadata or {}
    layer = KLALayer(d, H, hk // H, dv, _meta_float(m, "norm_eps", 1e-5), m.get("mixer") or "kla")
    layer = layer.to(dtype)
    sd = {"attn." + n: _t(tensors["attn." + n], dtype) for n in LAYER_PARAMS}
    layer.load_state_dict(sd, strict=True)
    return layer


def model_from_tensors(tensors, metadata=None, dtype=torch.float64):
    """A KLAModel sized from tensors' shapes, parameters loaded (strict)."""
    vocab, d = (int(s) for s in tensors["embeddings.weight"].shape)
    H = int(tensors["layers.0.attn.A_log"].shape[0])
    dk = int(tensors["layers.0.attn.q_proj.weight"].shape[0]) // H
    dv = int(tensors["layers.0.attn.o_norm.weight"].shape[0])
    d_ff = int(tensors["layers.0.mlp.gate_proj.weight"].shape[0])
    L = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("layers."))
    m = metadata or {}
    model = KLAModel(vocab, d, L, H, dk, dv, d_ff, _meta_float(m, "norm_eps", 1e-5),
                     m.get("mixer") or "kla").to(dtype)
    names = [n for n, _ in model.named_parameters()]
    model.load_state_dict({n: _t(tensors[n], dtype) for n in names}, strict=True)
    return model


# ------------------------------------------------------------------------ the two checks

def layer_backward(layer, x, dy, cu_seqlens=None):
    """y = layer(x) and the gradients of sum(dy * y): (y, dx, {name: grad})."""
    p0 = next(layer.parameters())
    x = _t(x, p0.dtype).detach().clone().requires_grad_(True)
    dy = _t(dy, p0.dtype)
    layer.zero_grad(set_to_none=True)
    y = layer(x, cu_seqlens)
    y.backward(dy)
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad.detach(), grads


def train_step(model, input_ids, labels, lr=1e-3, beta1=0.9, beta2=0.95, adam_eps=1e-8,
               weight_decay=0.1, clip=1.0):
    """One training step from zero moments: loss.backward(), clip_grad_norm_(clip),
    AdamW (PyTorch's, weight decay on every parameter). Updates model in place and
    returns (loss, {name: grad before clipping}, {name: parameter after the step})."""
    ids = _t(input_ids, torch.long)
    lab = _t(labels, torch.long)
    model.zero_grad(set_to_none=True)
    loss = model(ids, lab)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters())
    torch.nn.utils.clip_grad_norm_(params, clip)
    kw = {}
    try:  # plain per-parameter loop where the version lets us say so
        import inspect
        if "foreach" in inspect.signature(torch.optim.AdamW).parameters:
            kw["foreach"] = False
    except (TypeError, ValueError):
        pass
    opt = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=adam_eps,
                            weight_decay=weight_decay, **kw)
    opt.step()
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, new


def adamw_settings(metadata):
    """The AdamW settings of a model-step file (kla-spec.md 8.3), defaults the authors'."""
    m = metadata or {}
    return {"lr": _meta_float(m, "lr", 1e-3), "beta1": _meta_float(m, "beta1", 0.9),
            "beta2": _meta_float(m, "beta2", 0.95), "adam_eps": _meta_float(m, "adam_eps", 1e-8),
            "weight_decay": _meta_float(m, "weight_decay", 0.1),
            "clip": _meta_float(m, "clip", 1.0)}


if __name__ == "__main__":  # the worked example of kla-spec.md section 6 through recurrence()
    d = torch.float64
    q = torch.tensor([[[[1., 1.]], [[1., 0.]]]], dtype=d)
    k = torch.tensor([[[[2., 0.]], [[1., 1.]]]], dtype=d)
    v = torch.tensor([[[[3.]], [[1.]]]], dtype=d)
    g = torch.tensor([[[0.], [math.log(0.5)]]], dtype=d)
    eta = torch.tensor([[[1.], [0.5]]], dtype=d)
    o = recurrence(q, k, v, g, eta, mode="kla", scale=1.0, eps=0.0)
    print(o.flatten().tolist(), "expected [1.5, 0.8125]")
