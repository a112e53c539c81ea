"""Independent float64 numpy oracle for the KLA / Gated DeltaNet operator family.

Written from /work/shared/kla-spec.md only (sections 1-3 and 7), as a second reference
for the C library: the delta rule with a scalar (`gate = head`) or per-key-channel
(`gate = channel`, KDA) decay, optionally with the ATK diagonal preconditioner
(`precond = atk`: PDN, PGDN, PKDA), each with the given step (mode `gdn`) or the
Kaczmarz step (mode `kla`). Everything is computed in float64 by the plain
token-by-token recurrence, vectorised over heads only.

    inp:  dict of arrays with the spec's names (any float dtype, converted to float64):
            q k v [g] eta|beta [h0] [cu_seqlens]                      section 2
            [g_atk] beta_atk [log_atk_scale] [a0]                    section 7.3 (atk)
          and for backward: do [dht] [dat].
    opts: dict of options, Python values or the metadata strings of an interchange
          file: mode (kla|gdn), scale, eps, l2norm_q, l2norm_k ("true"/"false" or
          bool), state_layout (kv|vk), gate (head|channel), precond (none|atk),
          squash_x, squash_eps. Missing keys take the spec's defaults; keys this module
          does not know are ignored (golden files carry extra ones such as `case`).

forward(inp, opts)  -> {o, ht, [at]}
backward(inp, opts) -> {o, ht, [at], dq, dk, dv, dg, deta|dbeta, [dh0],
                        [dg_atk, dbeta_atk, dlog_atk_scale, da0]}
    gradients of L = sum(do * o) + sum(dht * ht) + sum(dat * at). dg has the shape of
    g and is returned even if g was absent (the gradient at g = 0); dh0 only when h0
    was given. With precond = atk, at and the four ATK gradients are always returned
    (dg_atk at g_atk = 0, dlog_atk_scale at -0.2, da0 at a0 = 0 when absent); without
    it none of them is, so a section 1 call gives exactly the section 1 outputs.
resolve_opts(inp, opts) -> the options with every default filled in.

Both functions take a keyword-only `l2norm_eps` (default 1e-6, the spec's value). It
exists for tests only: l2norm_eps = 0 gives x / ||x||, flash-linear-attention's
F.normalize, to reproduce numbers computed with it.

Per sequence, value head hv (key head h = hv // (HV // H)) and token t:
    qn, kn = l2norm(q), l2norm(k)       (if enabled; l2norm(x) = x / sqrt(|x|^2 + 1e-6))
    precond = atk (per key head h; a_0 = a0, c = log_atk_scale[h]):
        a_t = exp(g_atk) a_{t-1} + beta_atk (kn * kn)
        r_t = ln(a_t + squash_eps) - c
        m_t = exp(-ln(squash_x) r_t / (1 + |r_t|))
        kw  = kn * m_t                  the write key
    precond = none: kw = kn
    beta   = eta / (kn . kw + eps)      (mode kla; given in mode gdn)
    A      = exp(g) S_{t-1}             decay first (gate = channel: row i by exp(g[i]))
    e      = v - A^T kn                 read / erase with kn
    S_t    = A + beta kw e^T            write with kw
    o_t    = S_t^T (scale qn)           reads the updated state
"""

import numpy as np

__all__ = ["forward", "backward", "resolve_opts", "L2NORM_EPS"]

L2NORM_EPS = 1e-6  # fixed by the spec, independent of the `eps` option
ATK_TENSORS = ("g_atk", "beta_atk", "log_atk_scale", "a0", "dat")


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


def _present(inp, name):
    return inp.get(name) is not None


def resolve_opts(inp, opts=None):
    """Fill in the spec's defaults. Returns a dict with python-typed values."""
    opts = dict(opts or {})
    K = np.shape(inp["q"])[-1]
    if _present(inp, "eta") and _present(inp, "beta"):
        raise ValueError("give exactly one of eta and beta")
    mode = opts.get("mode") or ("kla" if _present(inp, "eta") else "gdn")
    if mode not in ("kla", "gdn"):
        raise ValueError(f"bad mode {mode!r}")
    if not _present(inp, "eta" if mode == "kla" else "beta"):
        raise ValueError(f"mode {mode} needs {'eta' if mode == 'kla' else 'beta'}")
    layout = opts.get("state_layout") or "kv"
    if layout not in ("kv", "vk"):
        raise ValueError(f"bad state_layout {layout!r}")

    # section 7.3: gate = head, or channel when g has 4 dimensions
    g_dims = np.ndim(inp["g"]) if _present(inp, "g") else None
    gate = opts.get("gate") or ("channel" if g_dims == 4 else "head")
    if gate not in ("head", "channel"):
        raise ValueError(f"bad gate {gate!r}")
    if g_dims is not None and g_dims != {"head": 3, "channel": 4}[gate]:
        raise ValueError(f"gate {gate} needs g of {3 if gate == 'head' else 4} dimensions, "
                         f"got {g_dims}")
    # precond = none, or atk when beta_atk is present
    precond = opts.get("precond") or ("atk" if _present(inp, "beta_atk") else "none")
    if precond not in ("none", "atk"):
        raise ValueError(f"bad precond {precond!r}")
    if precond == "atk" and not _present(inp, "beta_atk"):
        raise ValueError("precond atk needs beta_atk")
    if precond == "none":
        extra = [n for n in ATK_TENSORS if _present(inp, n)]
        if extra:  # would be silently ignored otherwise
            raise ValueError(f"{', '.join(extra)} given with precond none")

    scale, eps = opts.get("scale"), opts.get("eps")
    sx, se = opts.get("squash_x"), opts.get("squash_eps")
    sx = 1.5 if sx is None else float(sx)
    se = 1e-6 if se is None else float(se)
    if not sx > 1:
        raise ValueError(f"squash_x must be > 1, got {sx}")
    if not se > 0:
        raise ValueError(f"squash_eps must be > 0, got {se}")
    return {
        "mode": mode,
        "scale": K ** -0.5 if scale is None else float(scale),
        "eps": 1e-6 if eps is None else float(eps),
        "l2norm_q": _flag(opts.get("l2norm_q", False)),
        "l2norm_k": _flag(opts.get("l2norm_k", False)),
        "state_layout": layout,
        "gate": gate,
        "precond": precond,
        "squash_x": sx,
        "squash_eps": se,
    }


# --------------------------------------------------------------------------- helpers

def _l2norm(x, eps=L2NORM_EPS):
    """y = x / r with r = sqrt(sum(x^2) + eps) over the last axis. Returns (y, r)."""
    r = np.sqrt((x * x).sum(-1, keepdims=True) + eps)
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
    """Inputs in float64 plus everything the recurrence needs, shared by fwd/bwd:
    the normalised q, k, the ATK scan and write key (precond = atk), the step size."""

    def __init__(self, inp, opts, l2norm_eps=L2NORM_EPS):
        o = self.opts = resolve_opts(inp, opts)
        f64 = lambda name: np.asarray(inp[name], dtype=np.float64)
        self.q_raw, self.k_raw, self.v = f64("q"), f64("k"), f64("v")
        if self.q_raw.ndim != 4 or self.v.ndim != 4:
            raise ValueError("q, k, v must have 4 dimensions")
        B, T, H, K = self.q_raw.shape
        HV, V = self.v.shape[2], self.v.shape[3]
        if self.k_raw.shape != (B, T, H, K) or self.v.shape[:2] != (B, T):
            raise ValueError("q, k, v shapes disagree")
        if HV % H:
            raise ValueError("HV must be a multiple of H")
        self.B, self.T, self.H, self.HV, self.K, self.V = B, T, H, HV, K, V
        self.G = HV // H  # value heads per key head
        self.seqs = _sequences(inp, B, T)
        N = self.N = len(self.seqs)
        self.channel = o["gate"] == "channel"
        self.atk = o["precond"] == "atk"

        gshape = (B, T, HV, K) if self.channel else (B, T, HV)
        self.g = self._get(inp, "g", gshape, 0.0)
        self.sname = "eta" if o["mode"] == "kla" else "beta"
        self.s = self._get(inp, self.sname, (B, T, HV))  # eta or beta
        self.has_h0 = _present(inp, "h0")
        self.h0 = (self._state_in(f64("h0"), N) if self.has_h0
                   else np.zeros((N, HV, K, V)))

        # optional l2 normalisation of the key-head inputs
        self.q, self.rq = (_l2norm(self.q_raw, l2norm_eps) if o["l2norm_q"]
                           else (self.q_raw, None))
        self.k, self.rk = (_l2norm(self.k_raw, l2norm_eps) if o["l2norm_k"]
                           else (self.k_raw, None))

        # the ATK preconditioner, per key head; kw = k without it
        if self.atk:
            self.g_atk = self._get(inp, "g_atk", (B, T, H), 0.0)
            self.beta_atk = self._get(inp, "beta_atk", (B, T, H))
            self.c = self._get(inp, "log_atk_scale", (H,), -0.2)
            self.a0 = self._get(inp, "a0", (N, H, K), 0.0)
            self._atk_forward()
            self.kw = self.k * self.m
        else:
            self.kw = self.k

        # broadcast to value heads: value head hv reads key head hv // G
        hmap = np.arange(HV) // self.G
        self.qv = self.q[:, :, hmap]  # [B, T, HV, K]
        self.kv = self.k[:, :, hmap]
        self.kwv = self.kw[:, :, hmap]
        # step size beta per (b, t, hv)
        if o["mode"] == "kla":
            self.n = (self.kv * self.kwv).sum(-1)  # k . kw (= |k|^2 without precond)
            self.beta = self.s / (self.n + o["eps"])
        else:
            self.beta = self.s
        # decay, per value head [B,T,HV] (head) or per key channel [B,T,HV,K] (channel)
        self.alpha = np.exp(self.g)

    def _get(self, inp, name, shape, default=None):
        """Input `name` as float64 of the given shape, or `default` if absent."""
        if not _present(inp, name):
            if default is None:
                raise ValueError(f"missing {name}")
            return np.full(shape, default, dtype=np.float64)
        a = np.asarray(inp[name], dtype=np.float64)
        if a.shape != shape:
            raise ValueError(f"{name} shape {list(a.shape)}, want {list(shape)}")
        return a

    def _atk_forward(self):
        """a_t (and a_{t-1}) per token and key head, r_t, m_t; at [N, H, K]."""
        lam = np.log(self.opts["squash_x"])
        self.a = np.zeros_like(self.k)
        self.a_prev = np.zeros_like(self.k)
        self.at = np.zeros((self.N, self.H, self.K))
        for n, (b, t0, t1) in enumerate(self.seqs):
            a = self.a0[n].copy()
            for t in range(t0, t1):
                self.a_prev[b, t] = a
                a = (np.exp(self.g_atk[b, t])[:, None] * a
                     + self.beta_atk[b, t][:, None] * self.k[b, t] * self.k[b, t])
                self.a[b, t] = a
            self.at[n] = a
        self.r = np.log(self.a + self.opts["squash_eps"]) - self.c[:, None]
        self.m = np.exp(-lam * self.r / (1.0 + np.abs(self.r)))

    def _state_in(self, h, N):
        """h0 (or dht) from the file layout to [N, HV, K, V]."""
        want = (N, self.HV, self.K, self.V)
        if self.opts["state_layout"] == "vk":
            if h.shape != (N, self.HV, self.V, self.K):
                raise ValueError(f"state shape {h.shape}, want [N,HV,V,K]")
            return np.ascontiguousarray(h.transpose(0, 1, 3, 2))
        if h.shape != want:
            raise ValueError(f"state shape {h.shape}, want {list(want)}")
        return h.copy()

    def state_out(self, S):
        """[N, HV, K, V] to the file layout."""
        if self.opts["state_layout"] == "vk":
            return np.ascontiguousarray(S.transpose(0, 1, 3, 2))
        return S

    def decay(self, b, t):
        """The decay factor shaped to multiply a [HV, K, V] state."""
        a = self.alpha[b, t]
        return a[:, :, None] if self.channel else a[:, None, None]


# --------------------------------------------------------------------------- forward

def _forward(p, keep_states=False):
    """Run the recurrence. Returns o [B,T,HV,V], ht [N,HV,K,V] (kv layout) and, if
    keep_states, the list per sequence of states S_0..S_L (each [HV,K,V])."""
    scale = p.opts["scale"]
    o = np.zeros((p.B, p.T, p.HV, p.V))
    ht = np.zeros((p.N, p.HV, p.K, p.V))
    states = []
    for n, (b, t0, t1) in enumerate(p.seqs):
        S = p.h0[n].copy()
        hist = [S]
        for t in range(t0, t1):
            k, kw, q, v = p.kv[b, t], p.kwv[b, t], p.qv[b, t], p.v[b, t]  # [HV,K|V]
            A = p.decay(b, t) * S  # decay first
            e = v - np.einsum("hkv,hk->hv", A, k)  # residual against decayed state
            S = A + p.beta[b, t][:, None, None] * kw[:, :, None] * e[:, None, :]
            o[b, t] = scale * np.einsum("hkv,hk->hv", S, q)  # read the updated state
            if keep_states:
                hist.append(S)
        ht[n] = S
        states.append(hist)
    return o, ht, states


def forward(inp, opts=None, *, l2norm_eps=L2NORM_EPS):
    """Float64 forward pass. Returns {'o': [B,T,HV,V], 'ht': [N,HV,K,V] or [N,HV,V,K]}
    and, with precond = atk, 'at': [N,H,K]."""
    p = _Prepared(inp, opts, l2norm_eps)
    o, ht, _ = _forward(p)
    out = {"o": o, "ht": p.state_out(ht)}
    if p.atk:
        out["at"] = p.at.copy()
    return out


# --------------------------------------------------------------------------- backward

def _atk_backward(p, dkw, dat):
    """Reverse the ATK scan and the squash, given dkw [B,T,H,K], the gradient at the
    write key kw = k * m (summed over the value heads of each key head), and dat
    [N,H,K]. Returns (dk through kw and the k*k term, dg_atk, dbeta_atk, dc, da0)."""
    lam = np.log(p.opts["squash_x"])
    m, r, k = p.m, p.r, p.k
    dk = dkw * m                                      # kw = k * m, direct path
    dm = dkw * k
    dsq = dm * (-lam * m)                             # m = exp(-lam s)
    dr = dsq / (1.0 + np.abs(r)) ** 2                 # s = r / (1 + |r|)
    dc = -dr.sum((0, 1, 3))                           # r = ln(a + eps_s) - c
    da_local = dr / (p.a + p.opts["squash_eps"])      # r's own path into a_t
    dg_atk = np.zeros_like(p.g_atk)
    dbeta_atk = np.zeros_like(p.beta_atk)
    da0 = np.zeros_like(p.a0)
    for n, (b, t0, t1) in enumerate(p.seqs):
        abar = dat[n].copy()                          # adjoint of a_t, from later tokens
        for t in range(t1 - 1, t0 - 1, -1):
            abar = abar + da_local[b, t]
            decay = np.exp(p.g_atk[b, t])             # [H]
            # a_t = exp(g_atk) a_{t-1} + beta_atk (k * k)
            dg_atk[b, t] = decay * (abar * p.a_prev[b, t]).sum(-1)
            dbeta_atk[b, t] = (abar * k[b, t] * k[b, t]).sum(-1)
            dk[b, t] += 2.0 * p.beta_atk[b, t][:, None] * abar * k[b, t]
            abar = decay[:, None] * abar
        da0[n] = abar
    return dk, dg_atk, dbeta_atk, dc, da0


def backward(inp, opts=None, *, l2norm_eps=L2NORM_EPS):
    """Float64 gradients of L = sum(do * o) + sum(dht * ht) + sum(dat * at).

    Reverse-mode through the stored states. For one step (per value head), with
    A = D S_prev (D = exp(g), scalar or per key channel), e = v - A^T k,
    S = A + beta kw e^T, o = scale S^T q and dS the gradient arriving at S (from later
    steps, plus scale q do^T from o_t):
        dq     = scale S do
        dbeta  = kw^T dS e
        de     = beta dS^T kw             -> dv = de
        dkw    = beta dS e                (write key)
        dk     = -A de                    (read / erase key)
        dA     = dS - k de^T
        dg     = D * sum_v(dA * S_prev)   (summed over k too for gate = head)
        dS_prev = D dA
    then through beta = eta / (k . kw + eps) (mode kla), the head grouping (sum over
    the value heads of a key head), the ATK scan and squash (precond = atk; dkw there,
    dkw = part of dk otherwise) and the optional l2norm.
    """
    p = _Prepared(inp, opts, l2norm_eps)
    scale = p.opts["scale"]
    do = np.asarray(inp["do"], dtype=np.float64)
    if do.shape != (p.B, p.T, p.HV, p.V):
        raise ValueError(f"do shape {do.shape}")
    N = p.N
    dht = inp.get("dht")
    dht = (p._state_in(np.asarray(dht, dtype=np.float64), N) if dht is not None
           else np.zeros((N, p.HV, p.K, p.V)))

    o, ht, states = _forward(p, keep_states=True)

    # gradients w.r.t. the per-value-head quantities
    dqv = np.zeros_like(p.qv)  # w.r.t. (normalised) q broadcast to value heads
    dkv = np.zeros_like(p.kv)  # read / erase key
    dkwv = np.zeros_like(p.kv)  # write key
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
            k, kw, q, v = p.kv[b, t], p.kwv[b, t], p.qv[b, t], p.v[b, t]
            D, bt = p.decay(b, t), p.beta[b, t]
            A = D * S_prev
            e = v - np.einsum("hkv,hk->hv", A, k)
            # o_t = scale S^T q
            dS = dS + scale * q[:, :, None] * do[b, t][:, None, :]
            dqv[b, t] = scale * np.einsum("hkv,hv->hk", S, do[b, t])
            # S = A + beta kw e^T
            dSe = np.einsum("hkv,hv->hk", dS, e)  # dS e
            dbeta[b, t] = (kw * dSe).sum(-1)
            de = bt[:, None] * np.einsum("hkv,hk->hv", dS, kw)
            dkwv[b, t] = bt[:, None] * dSe
            # e = v - A^T k
            dv[b, t] = de
            dkv[b, t] = -np.einsum("hkv,hv->hk", A, de)
            dA = dS - k[:, :, None] * de[:, None, :]
            # A = D S_prev, D = exp(g)
            if p.channel:
                dg[b, t] = p.alpha[b, t] * (dA * S_prev).sum(2)
            else:
                dg[b, t] = p.alpha[b, t] * (dA * S_prev).sum((1, 2))
            dS = D * dA
        dh0[n] = dS

    if not p.atk:  # kw is k: one key gradient
        dkv = dkwv + dkv
    # step size
    if p.opts["mode"] == "kla":
        den = p.n + p.opts["eps"]
        ds = dbeta / den  # deta
        dn = -dbeta * p.s / den ** 2
        if p.atk:  # n = k . kw
            dkv = dkv + p.kwv * dn[..., None]
            dkwv = dkwv + p.kv * dn[..., None]
        else:  # n = |k|^2
            dkv = dkv + 2.0 * p.kv * dn[..., None]
    else:
        ds = dbeta

    # value heads -> key heads: sum over the G value heads of each group
    B, T, H, G, K = p.B, p.T, p.H, p.G, p.K
    dq = dqv.reshape(B, T, H, G, K).sum(3)
    dk = dkv.reshape(B, T, H, G, K).sum(3)

    # the write key kw = k * m(a(k)) back to k and the ATK inputs
    if p.atk:
        dat = inp.get("dat")
        dat = (p._get(inp, "dat", (N, H, K)) if dat is not None else np.zeros((N, H, K)))
        dkw = dkwv.reshape(B, T, H, G, K).sum(3)
        dk_w, dg_atk, dbeta_atk, dc, da0 = _atk_backward(p, dkw, dat)
        dk = dk + dk_w

    # through the optional l2norm to the raw inputs
    if p.opts["l2norm_q"]:
        dq = _l2norm_bwd(p.q_raw, p.rq, dq)
    if p.opts["l2norm_k"]:
        dk = _l2norm_bwd(p.k_raw, p.rk, dk)

    out = {"o": o, "ht": p.state_out(ht), "dq": dq, "dk": dk, "dv": dv, "dg": dg,
           "d" + p.sname: ds}
    if p.has_h0:
        out["dh0"] = p.state_out(dh0)
    if p.atk:
        out.update(at=p.at.copy(), dg_atk=dg_atk, dbeta_atk=dbeta_atk,
                   dlog_atk_scale=dc, da0=da0)
    return out


if __name__ == "__main__":  # the self-tests: tests/test_family_np.py
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_family_np
    sys.exit(test_family_np.main())
