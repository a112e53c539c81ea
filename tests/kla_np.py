"""Independent float64 numpy oracle for the KLA / Gated DeltaNet operator.

Written from /work/shared/kla-spec.md only (sections 1-3), as a second reference
for the C library. Everything is computed in float64 by the plain token-by-token
recurrence, vectorised over value heads only.

    inp:  dict of arrays, the spec's input names: q k v [g] eta|beta [h0] [cu_seqlens]
          (and do [dht] for backward); any float dtype, converted to float64.
    opts: dict of options, either Python values or the metadata strings of an
          interchange file: mode (kla|gdn), scale, eps, l2norm_q, l2norm_k
          ("true"/"false" or bool), state_layout (kv|vk). Missing keys take the
          spec's defaults.

forward(inp, opts)  -> {o, ht}
backward(inp, opts) -> {o, ht, dq, dk, dv, dg, deta|dbeta, [dh0]}
    gradients of L = sum(do * o) + sum(dht * ht); dg is returned even if g was
    absent (the gradient at g = 0); dh0 only when h0 was given.

Per sequence and value head hv (key head h = hv // (HV // H)), token t:
    qn, kn = l2norm(q), l2norm(k)     (if enabled; l2norm(x) = x / sqrt(|x|^2 + 1e-6))
    beta   = eta / (|kn|^2 + eps)     (mode kla; given in mode gdn)
    A      = exp(g) S_{t-1}           decay first
    e      = v - A^T kn               residual against the decayed state
    S_t    = A + beta kn e^T
    o_t    = S_t^T (scale qn)         reads the updated state
"""

import numpy as np

__all__ = ["forward", "backward", "resolve_opts"]

L2NORM_EPS = 1e-6  # fixed by the spec, independent of the `eps` option


# --------------------------------------------------------------------------- options

def _flag(v):
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1"):
            return True
        if s in ("false", "0", ""):
            return False
        raise ValueError(f"bad boolean option {v!r}")
    return bool(v)


def resolve_opts(inp, opts=None):
    """Fill in the spec's defaults. Returns a dict with python-typed values."""
    opts = dict(opts or {})
    K = np.shape(inp["q"])[-1]
    if "eta" in inp and "beta" in inp:
        raise ValueError("give exactly one of eta and beta")
    mode = opts.get("mode") or ("kla" if "eta" in inp else "gdn")
    if mode not in ("kla", "gdn"):
        raise ValueError(f"bad mode {mode!r}")
    if ("eta" if mode == "kla" else "beta") not in inp:
        raise ValueError(f"mode {mode} needs {'eta' if mode == 'kla' else 'beta'}")
    layout = opts.get("state_layout") or "kv"
    if layout not in ("kv", "vk"):
        raise ValueError(f"bad state_layout {layout!r}")
    scale = opts.get("scale")
    eps = opts.get("eps")
    return {
        "mode": mode,
        "scale": K ** -0.5 if scale is None else float(scale),
        "eps": 1e-6 if eps is None else float(eps),
        "l2norm_q": _flag(opts.get("l2norm_q", False)),
        "l2norm_k": _flag(opts.get("l2norm_k", False)),
        "state_layout": layout,
    }


# --------------------------------------------------------------------------- helpers

def _l2norm(x):
    """y = x / r with r = sqrt(sum(x^2) + 1e-6) over the last axis. Returns (y, r)."""
    r = np.sqrt((x * x).sum(-1, keepdims=True) + L2NORM_EPS)
    return x / r, r


def _l2norm_bwd(x, r, dy):
    """Vector-Jacobian product of l2norm: dx = dy / r - x (x . dy) / r^3."""
    return dy / r - x * (x * dy).sum(-1, keepdims=True) / r ** 3


def _sequences(inp, B, T):
    """List of (batch index, first token, end token) per sequence n = 0..N-1."""
    cu = inp.get("cu_seqlens")
    if cu is None:
        return [(b, 0, T) for b in range(B)]
    cu = np.asarray(cu).astype(np.int64).ravel()
    if B != 1:
        raise ValueError("cu_seqlens requires B == 1")
    if cu[0] != 0 or cu[-1] != T or np.any(np.diff(cu) < 0):
        raise ValueError(f"bad cu_seqlens {cu.tolist()} for T={T}")
    return [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]


class _Prepared:
    """Inputs in float64 plus everything the recurrence needs, shared by fwd/bwd."""

    def __init__(self, inp, opts):
        o = self.opts = resolve_opts(inp, opts)
        f64 = lambda name: np.asarray(inp[name], dtype=np.float64)
        self.q_raw, self.k_raw, self.v = f64("q"), f64("k"), f64("v")
        B, T, H, K = self.q_raw.shape
        HV, V = self.v.shape[2], self.v.shape[3]
        if self.k_raw.shape != (B, T, H, K) or self.v.shape[:2] != (B, T):
            raise ValueError("q, k, v shapes disagree")
        if HV % H:
            raise ValueError("HV must be a multiple of H")
        self.B, self.T, self.H, self.HV, self.K, self.V = B, T, H, HV, K, V
        self.G = HV // H  # value heads per key head
        self.has_g = inp.get("g") is not None
        self.g = f64("g") if self.has_g else np.zeros((B, T, HV))
        self.sname = "eta" if o["mode"] == "kla" else "beta"
        self.s = f64(self.sname)  # eta or beta, [B, T, HV]
        self.seqs = _sequences(inp, B, T)
        N = len(self.seqs)
        self.has_h0 = inp.get("h0") is not None
        if self.has_h0:
            self.h0 = self._state_in(f64("h0"), N)
        else:
            self.h0 = np.zeros((N, HV, K, V))

        # optional l2 normalisation of the key-head inputs
        self.q, self.rq = (_l2norm(self.q_raw) if o["l2norm_q"] else (self.q_raw, None))
        self.k, self.rk = (_l2norm(self.k_raw) if o["l2norm_k"] else (self.k_raw, None))
        # broadcast to value heads: value head hv reads key head hv // G
        hmap = np.arange(HV) // self.G
        self.qv = self.q[:, :, hmap]  # [B, T, HV, K]
        self.kv = self.k[:, :, hmap]
        # step size beta per (b, t, hv)
        if o["mode"] == "kla":
            self.knorm2 = (self.kv * self.kv).sum(-1)  # |kn|^2 on the (normalised) key
            self.beta = self.s / (self.knorm2 + o["eps"])
        else:
            self.beta = self.s
        self.alpha = np.exp(self.g)

    def _state_in(self, h, N):
        """h0 from the file layout to [N, HV, K, V]."""
        want = (N, self.HV, self.K, self.V)
        if self.opts["state_layout"] == "vk":
            if h.shape != (N, self.HV, self.V, self.K):
                raise ValueError(f"h0 shape {h.shape}, want [N,HV,V,K]")
            return np.ascontiguousarray(h.transpose(0, 1, 3, 2))
        if h.shape != want:
            raise ValueError(f"h0 shape {h.shape}, want {list(want)}")
        return h.copy()

    def state_out(self, S):
        """[N, HV, K, V] to the file layout."""
        if self.opts["state_layout"] == "vk":
            return np.ascontiguousarray(S.transpose(0, 1, 3, 2))
        return S


# --------------------------------------------------------------------------- forward

def _forward(p, keep_states=False):
    """Run the recurrence. Returns o [B,T,HV,V], ht [N,HV,K,V] (kv layout) and, if
    keep_states, the list per sequence of states S_0..S_L (each [HV,K,V])."""
    scale = p.opts["scale"]
    o = np.zeros((p.B, p.T, p.HV, p.V))
    ht = np.zeros((len(p.seqs), p.HV, p.K, p.V))
    states = []
    for n, (b, t0, t1) in enumerate(p.seqs):
        S = p.h0[n].copy()
        hist = [S]
        for t in range(t0, t1):
            k, q, v = p.kv[b, t], p.qv[b, t], p.v[b, t]  # [HV,K], [HV,K], [HV,V]
            A = p.alpha[b, t][:, None, None] * S  # decay first
            e = v - np.einsum("hkv,hk->hv", A, k)  # residual against decayed state
            S = A + p.beta[b, t][:, None, None] * k[:, :, None] * e[:, None, :]
            o[b, t] = scale * np.einsum("hkv,hk->hv", S, q)  # read the updated state
            if keep_states:
                hist.append(S)
        ht[n] = S
        states.append(hist)
    return o, ht, states


def forward(inp, opts=None):
    """Float64 forward pass. Returns {'o': [B,T,HV,V], 'ht': [N,HV,K,V] or [N,HV,V,K]}."""
    p = _Prepared(inp, opts)
    o, ht, _ = _forward(p)
    return {"o": o, "ht": p.state_out(ht)}


# --------------------------------------------------------------------------- backward

def backward(inp, opts=None):
    """Float64 gradients of L = sum(do * o) + sum(dht * ht) w.r.t. every input.

    Reverse-mode through the stored states. For one step (per value head), with
    A = alpha S_prev, e = v - A^T k, S = A + beta k e^T, o = scale S^T q and dS the
    gradient arriving at S (from later steps, plus scale q do^T from o_t):
        dq     = scale S do
        dbeta  = k^T dS e
        de     = beta dS^T k              -> dv = de
        dk     = beta dS e - A de
        dA     = dS - k de^T
        dalpha = <dA, S_prev>             -> dg = alpha dalpha
        dS_prev = alpha dA
    then through beta = eta / (|k|^2 + eps) (mode kla), the head grouping (sum over
    the value heads of a key head) and the optional l2norm.
    """
    p = _Prepared(inp, opts)
    scale = p.opts["scale"]
    do = np.asarray(inp["do"], dtype=np.float64)
    if do.shape != (p.B, p.T, p.HV, p.V):
        raise ValueError(f"do shape {do.shape}")
    N = len(p.seqs)
    dht = inp.get("dht")
    dht = (p._state_in(np.asarray(dht, dtype=np.float64), N) if dht is not None
           else np.zeros((N, p.HV, p.K, p.V)))

    o, ht, states = _forward(p, keep_states=True)

    # gradients w.r.t. the per-value-head quantities
    dqv = np.zeros_like(p.qv)  # w.r.t. (normalised) q broadcast to value heads
    dkv = np.zeros_like(p.kv)
    dv = np.zeros_like(p.v)
    dbeta = np.zeros_like(p.beta)
    dg = np.zeros_like(p.g)
    dh0 = np.zeros_like(p.h0)

    for n, (b, t0, t1) in enumerate(p.seqs):
        dS = dht[n].copy()
        hist = states[n]
        for t in range(t1 - 1, t0 - 1, -1):
            i = t - t0
            S_prev, S = hist[i], hist[i + 1]
            k, q, v = p.kv[b, t], p.qv[b, t], p.v[b, t]
            a, bt = p.alpha[b, t], p.beta[b, t]
            A = a[:, None, None] * S_prev
            e = v - np.einsum("hkv,hk->hv", A, k)
            # o_t = scale S^T q
            dS = dS + scale * q[:, :, None] * do[b, t][:, None, :]
            dqv[b, t] = scale * np.einsum("hkv,hv->hk", S, do[b, t])
            # S = A + beta k e^T
            dSe = np.einsum("hkv,hv->hk", dS, e)  # dS e
            dbeta[b, t] = (k * dSe).sum(-1)
            de = bt[:, None] * np.einsum("hkv,hk->hv", dS, k)
            dk = bt[:, None] * dSe
            # e = v - A^T k
            dv[b, t] = de
            dk = dk - np.einsum("hkv,hv->hk", A, de)
            dA = dS - k[:, :, None] * de[:, None, :]
            dkv[b, t] = dk
            # A = alpha S_prev, alpha = exp(g)
            dg[b, t] = a * (dA * S_prev).sum((1, 2))
            dS = a[:, None, None] * dA
        dh0[n] = dS

    # step size
    if p.opts["mode"] == "kla":
        den = p.knorm2 + p.opts["eps"]
        ds = dbeta / den  # deta
        dknorm2 = -dbeta * p.s / den ** 2
        dkv = dkv + 2.0 * p.kv * dknorm2[..., None]
    else:
        ds = dbeta

    # value heads -> key heads: sum over the G value heads of each group
    B, T, H, G, K = p.B, p.T, p.H, p.G, p.K
    dq = dqv.reshape(B, T, H, G, K).sum(3)
    dk = dkv.reshape(B, T, H, G, K).sum(3)

    # through the optional l2norm to the raw inputs
    if p.opts["l2norm_q"]:
        dq = _l2norm_bwd(p.q_raw, p.rq, dq)
    if p.opts["l2norm_k"]:
        dk = _l2norm_bwd(p.k_raw, p.rk, dk)

    out = {"o": o, "ht": p.state_out(ht), "dq": dq, "dk": dk, "dv": dv, "dg": dg,
           "d" + p.sname: ds}
    if p.has_h0:
        out["dh0"] = p.state_out(dh0)
    return out
