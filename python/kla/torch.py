"""kla.torch: flash-linear-attention's delta-rule APIs on our reference, with autograd.

    import torch
    from kla.torch import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, chunk_kla

    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                   output_final_state=True)     # Gated DeltaNet
    o, ht = chunk_kla(q, k, v, g, eta, output_final_state=True)   # KLA: beta = eta/(|k|^2+eps)
    (o * do).sum().backward()      # dq dk dv dg dbeta|deta dh0 through libkla's backward

The delta-rule family (kla-spec.md section 7), with the same machinery:

    o, ht = chunk_kda(q, k, v, g, beta, ...)              # KDA: g [B, T, HV, K] per key channel
    o, ht = chunk_kaczmarz_kda(q, k, v, g, eta, ...)      # KDA with KLA's step
    o, ht, at = chunk_precond_gated_delta_rule(q, k, v, g_atk, g, beta_atk, beta, ...)  # PGDN
    o, ht, at = chunk_precond_kda(q, k, v, g, g_atk, beta_atk, beta, ...)  # PKDA (fla's order)
    o, ht, at = chunk_precond_kla(q, k, v, g_atk, g, beta_atk, eta, ...)  # KLA under ATK

(see each function's docstring and the section "The family" below).

Drop-in for fla.ops.gated_delta_rule's functions (same argument names, order and
defaults, same return values), computed by libkla's reference on the CPU, so that a
Triton/CUDA kernel or a model can be checked against it from PyTorch:
- Layout [B, T, H, K] for q, k; [B, T, HV, V] for v (HV a multiple of H: value head hv
  reads key head hv // (HV // H)); [B, T, HV] for g, beta, eta; states [N, HV, K, V]
  ([N, HV, V, K] with state_v_first=True). g is the natural-log decay (<= 0).
- Positional order q, k, v, g, beta, scale, initial_state, output_final_state; every
  other argument by keyword (fla has moved cu_seqlens and the flags between versions,
  so a positional call past output_final_state is refused rather than misread).
- scale None means K^-1/2 (any number, 0 included, is used as given);
  use_qk_l2norm_in_kernel normalises q and k (x / sqrt(|x|^2 + 1e-6)), with gradients
  to the raw inputs; cu_seqlens (a LongTensor [N + 1]) packs N sequences into B = 1;
  initial_state then has N rows.
- Returns (o, final_state): final_state is None unless output_final_state.
- Devices: CPU tensors are computed in place; CUDA (or other) tensors are copied to the
  CPU for the computation and the results moved back to the input's device (so this is a
  reference, not a fast path). Every tensor argument must be on q's device.
- Dtypes: bf16 and fp16 inputs are computed in float32 (as fla's kernels do
  internally); o comes back in q's dtype, final_state in float32 (as fla) or float64
  when q is float64, each gradient in its input's dtype.
- backend: None (default) picks "ref64" (float64 throughout) when q is float64 and
  "ref" (float32, what fla's kernels compute in) otherwise; "ref", "ref64", "simd",
  "vulkan" or "auto" choose explicitly. algo: "auto", "chunk" or "recurrent" (the
  fused_recurrent functions default to "recurrent"); chunk_size 16, 32, 64 or 128;
  threads: worker threads of the backend (0: all cores). Contexts are cached per thread.
- Autograd: torch.autograd.Function with libkla's backward (kla_backward): gradients for
  q, k, v, g, beta or eta, and initial_state (through final_state's gradient too).
  Not twice differentiable.

fla extras handled in PyTorch before the operator (with autograd), in
chunk_gated_delta_rule and fused_recurrent_gated_delta_rule: head_first=True
(inputs [B, H, T, ...], as fla <= 0.2 accepted; o returned the same way),
use_beta_sigmoid_in_kernel / allow_neg_eigval (beta <- sigmoid(beta), times 2),
use_gate_in_kernel with A_log, dt_bias (g <- -exp(A_log) * softplus(g + dt_bias)),
state_v_first (or the deprecated transpose_state_layout). Accepted and ignored:
cu_seqlens_cpu, chunk_indices. Refused: cp_context, fused_recurrent's per-channel decays
gk/gv and per-channel beta (a per-key-channel decay is chunk_kda's g).

The family (kla-spec.md section 7; only the backends ref and ref64 run it):
- chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, *, ...):
  fla.ops.kda.chunk_kda, mode gdn with g [B, T, HV, K] (one natural-log decay per key
  channel, gate channel). Takes use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel,
  allow_neg_eigval (beta in PyTorch, as above), state_v_first / transpose_state_layout,
  cu_seqlens. Refused with NotImplementedError when given non-default values (the gate
  activation and kernel paths of fla's KDA kernel, which this reference does not run):
  use_gate_in_kernel, A_log, dt_bias, safe_gate, lower_bound (compute g in PyTorch,
  e.g. g = -A_log.exp()[:, None] * softplus(g_raw + dt_bias.view(HV, K)), and pass it:
  autograd carries the gradients), return_intermediate_states, use_graph,
  max_num_seqs, cp_context. Accepted and ignored (memory/speed of fla's kernel only):
  disable_recompute, cu_seqlens_cpu, chunk_indices.
- chunk_kaczmarz_kda(q, k, v, g, eta, ...): KDA with KLA's step
  beta = eta / (||k||^2 + eps), keywords as chunk_kla.
- chunk_precond_gated_delta_rule(q, k, v, g_atk, g, beta_atk, beta, scale,
  initial_state, initial_A_state, output_final_state, *, use_qk_l2norm_in_kernel=True,
  cu_seqlens, transpose_state_layout, x=1.5, eps=1e-6, log_atk_scale=None):
  fla.ops.precond_gated_delta_rule's PGDN (PDN with g None); returns
  (o, final_state, final_A_state), the states None unless output_final_state. x and
  eps are the squash range and epsilon (fla's names). g [B, T, HV, K] (gate channel)
  makes it PKDA, beyond fla's signature.
- chunk_precond_kda(q, k, v, g, g_atk, beta_atk, beta, ...): fla.ops.precond_kda's
  order (g before g_atk; q and k always L2-normalised, as there).
- chunk_precond_kla(q, k, v, g_atk, g, beta_atk, eta, ...): the Kaczmarz step under the
  preconditioner, beta = eta / (k^T kw + eps) (kla-spec.md 7.2); keywords as chunk_kla
  (eps is the step's epsilon; the squash is squash_x= and squash_eps=).
ATK tensors: g_atk, beta_atk [B, T, H] and log_atk_scale [H] per key head (g_atk None:
zeros; log_atk_scale None: each -0.2, no gradient), initial_A_state and final_A_state
[N, H, K]. Gradients reach every tensor input: q, k, v, g, beta|eta, g_atk, beta_atk,
log_atk_scale (when a tensor), initial_state, initial_A_state (through the final
states' gradients too). final_A_state comes back in float32 (float64 when q is), where
fla returns it in k's dtype. Positional arguments end at output_final_state, as above.

The KLA authors (github.com/JiaxuanZou0714/KaczmarzLinearAttention, lit_gpt/
gated_delta_net.py) have no KLA kernel of their own: their layer forms
beta = eta / (sum(k * k) + 1e-6) in PyTorch and calls a head-first GDN kernel
chunk_gated_delta_rule(q, k, v, beta, g, BT=64, initial_state, output_final_state)
(beta before g). chunk_kla takes fla's order instead (q, k, v, g, eta) and forms the
step size inside the operator, on k after the optional l2norm, with eps (default 1e-6,
as theirs).
"""

import numpy as np

try:
    import torch
    from torch.autograd.function import once_differentiable
except ImportError as _ex:  # the rest of the kla package works without torch
    raise ImportError("kla.torch needs PyTorch (pip install torch, or Debian's "
                      "python3-torch): %s" % _ex) from _ex

from . import ops

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "chunk_kla",
           "fused_recurrent_kla", "chunk_kda", "chunk_kaczmarz_kda",
           "chunk_precond_gated_delta_rule", "chunk_precond_kda", "chunk_precond_kla",
           "KlaFunction", "KlaPrecondFunction"]

_LOW = (torch.bfloat16, torch.float16)
_FLA_NAMES = {"h0": "initial_state", "dout": "the gradient of o",
              "dht": "the gradient of final_state", "a0": "initial_A_state",
              "dat": "the gradient of final_A_state"}


class _Cfg:
    """The non-tensor arguments of one call."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _np(x, name):
    """A CPU numpy view (or copy) of tensor x: bf16/fp16 widened to float32."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s: expected a torch.Tensor, got %s" % (name, type(x).__name__))
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    if x.dtype in _LOW:
        x = x.float()
    elif x.is_complex() or x.dtype == torch.bool:
        raise TypeError("%s: dtype %s, expected a real floating point tensor" % (name, x.dtype))
    return x.contiguous().numpy()


def _back(a, like, dtype=None):
    """numpy -> torch on like's device, in dtype (default like's)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=like.device, dtype=dtype if dtype is not None else like.dtype)


def _sdt(q):
    """The dtype of the returned states: float64 for float64 q, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class KlaFunction(torch.autograd.Function):
    """libkla's forward and backward as an autograd Function.

    KlaFunction.apply(q, k, v, g, b, h0, cu_seqlens, cfg) -> (o, ht), where b is eta (mode
    kla) or beta (mode gdn), g, h0 and cu_seqlens may be None, and cfg a _Cfg of mode,
    scale, eps, l2norm_q, l2norm_k, state_layout, algo, chunk_size, backend, threads,
    names (and optionally gate: None infers it from g's rank). Use the fla-style functions
    of this module rather than this directly."""

    @staticmethod
    def forward(ctx, q, k, v, g, b, h0, cu_seqlens, cfg):
        ctx.set_materialize_grads(False)
        bname = "eta" if cfg.mode == "kla" else "beta"
        arrays = {"q": _np(q, "q"), "k": _np(k, "k"), "v": _np(v, "v"), "g": _np(g, "g"),
                  bname: _np(b, bname), "h0": _np(h0, "initial_state"),
                  "cu_seqlens": _np(cu_seqlens, "cu_seqlens")}
        out = ops.run(False, arrays, **_opts(cfg), want=("ht",))
        ctx.save_for_backward(q, k, v, g, b, h0, cu_seqlens)
        ctx.cfg = cfg
        return _back(out["o"], q), _back(out["ht"], q, _sdt(q))

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        q, k, v, g, b, h0, cu = ctx.saved_tensors
        cfg = ctx.cfg
        need = ctx.needs_input_grad
        if do is None and dht is None:
            return (None,) * 8
        bname = "eta" if cfg.mode == "kla" else "beta"
        B, T, HV, V = v.shape
        arrays = {"q": _np(q, "q"), "k": _np(k, "k"), "v": _np(v, "v"), "g": _np(g, "g"),
                  bname: _np(b, bname), "h0": _np(h0, "initial_state"),
                  "cu_seqlens": _np(cu, "cu_seqlens"),
                  "dout": _np(do, "do") if do is not None else np.zeros((B, T, HV, V),
                                                                      np.float32),
                  "dht": _np(dht, "dht")}
        want = set()
        if g is not None and need[3]:
            want.add("dg")
        if h0 is not None and need[5]:
            want.add("dh0")
        out = ops.run(True, arrays, **_opts(cfg), want=want)
        db = out["deta" if cfg.mode == "kla" else "dbeta"]
        return (_back(out["dq"], q) if need[0] else None,
                _back(out["dk"], k) if need[1] else None,
                _back(out["dv"], v) if need[2] else None,
                _back(out["dg"], g) if "dg" in want else None,
                _back(db, b) if need[4] else None,
                _back(out["dh0"], h0) if "dh0" in want else None,
                None, None)


class KlaPrecondFunction(torch.autograd.Function):
    """libkla's forward and backward with the ATK preconditioner (precond atk,
    kla-spec.md 7.2) as an autograd Function.

    KlaPrecondFunction.apply(q, k, v, g, b, h0, cu_seqlens, g_atk, beta_atk,
    log_atk_scale, a0, cfg) -> (o, ht, at): b is eta (mode kla) or beta (mode gdn);
    g, h0, cu_seqlens, g_atk, log_atk_scale and a0 may be None; cfg as for KlaFunction
    plus gate, squash_x, squash_eps. Gradients for every tensor input (not cu_seqlens).
    Use the fla-style functions of this module rather than this directly."""

    @staticmethod
    def forward(ctx, q, k, v, g, b, h0, cu_seqlens, g_atk, beta_atk, log_atk_scale, a0, cfg):
        ctx.set_materialize_grads(False)
        arrays = _precond_arrays(cfg, q, k, v, g, b, h0, cu_seqlens, g_atk, beta_atk,
                                 log_atk_scale, a0)
        out = ops.run(False, arrays, **_opts(cfg, "atk"), want=("ht", "at"))
        ctx.save_for_backward(q, k, v, g, b, h0, cu_seqlens, g_atk, beta_atk, log_atk_scale,
                              a0)
        ctx.cfg = cfg
        sdt = _sdt(q)
        return _back(out["o"], q), _back(out["ht"], q, sdt), _back(out["at"], q, sdt)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht, dat):
        q, k, v, g, b, h0, cu, g_atk, beta_atk, lsc, a0 = ctx.saved_tensors
        cfg = ctx.cfg
        need = ctx.needs_input_grad
        if do is None and dht is None and dat is None:
            return (None,) * 12
        B, T, HV, V = v.shape
        arrays = _precond_arrays(cfg, q, k, v, g, b, h0, cu, g_atk, beta_atk, lsc, a0)
        arrays["dout"] = _np(do, "do") if do is not None else np.zeros((B, T, HV, V),
                                                                      np.float32)
        arrays["dht"] = _np(dht, "dht")
        arrays["dat"] = _np(dat, "dat")
        want = set()
        for name, x, i in (("dg", g, 3), ("dh0", h0, 5), ("dg_atk", g_atk, 7),
                           ("dbeta_atk", beta_atk, 8), ("dlog_atk_scale", lsc, 9),
                           ("da0", a0, 10)):
            if x is not None and need[i]:
                want.add(name)
        out = ops.run(True, arrays, **_opts(cfg, "atk"), want=want)
        db = out["deta" if cfg.mode == "kla" else "dbeta"]
        opt = lambda name, x: _back(out[name], x) if name in want else None  # noqa: E731
        return (_back(out["dq"], q) if need[0] else None,
                _back(out["dk"], k) if need[1] else None,
                _back(out["dv"], v) if need[2] else None,
                opt("dg", g),
                _back(db, b) if need[4] else None,
                opt("dh0", h0), None, opt("dg_atk", g_atk), opt("dbeta_atk", beta_atk),
                opt("dlog_atk_scale", lsc), opt("da0", a0), None)


def _precond_arrays(cfg, q, k, v, g, b, h0, cu, g_atk, beta_atk, lsc, a0):
    bname = "eta" if cfg.mode == "kla" else "beta"
    return {"q": _np(q, "q"), "k": _np(k, "k"), "v": _np(v, "v"), "g": _np(g, "g"),
            bname: _np(b, bname), "h0": _np(h0, "initial_state"),
            "cu_seqlens": _np(cu, "cu_seqlens"), "g_atk": _np(g_atk, "g_atk"),
            "beta_atk": _np(beta_atk, "beta_atk"), "log_atk_scale": _np(lsc, "log_atk_scale"),
            "a0": _np(a0, "initial_A_state")}


def _opts(cfg, precond="none"):
    d = dict(mode=cfg.mode, scale=cfg.scale, eps=cfg.eps, l2norm_q=cfg.l2norm_q,
             l2norm_k=cfg.l2norm_k, state_layout=cfg.state_layout, algo=cfg.algo,
             chunk_size=cfg.chunk_size, backend=cfg.backend, threads=cfg.threads,
             names=cfg.names, gate=getattr(cfg, "gate", None), precond=precond)
    if precond == "atk":
        d.update(squash_x=cfg.squash_x, squash_eps=cfg.squash_eps)
    return d


_IGNORED = ("cu_seqlens_cpu", "chunk_indices")


def _state_v_first(fn, state_v_first, kwargs):
    """fla's deprecated transpose_state_layout as state_v_first."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated "
                             "`transpose_state_layout`.")
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    return state_v_first


def _leftover(fn, kwargs, ignored=_IGNORED):
    """cp_context refused; the ignored names dropped; anything else a TypeError."""
    if kwargs.pop("cp_context", None) is not None:
        raise NotImplementedError("%s: cp_context (context parallelism) is not supported by "
                                  "the reference" % fn)
    for n in ignored:
        kwargs.pop(n, None)
    if kwargs:
        raise TypeError("%s() got unexpected keyword arguments: %s" % (fn, ", ".join(kwargs)))


def _check_args(fn, q, k, v, tensors, cu_seqlens, initial_state):
    """fla's argument checks shared by the front ends: tensors (with q, k, v: (name,
    value) pairs, None allowed) are torch tensors on q's device; q and k have the same
    heads; HV % H == 0; the cu_seqlens rules."""
    for n, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError("%s: %s must be a torch.Tensor, got %s" % (fn, n,
                                                                     type(x).__name__))
    dev = q.device
    for n, x in (("k", k), ("v", v)) + tuple(tensors):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError("%s: %s must be a torch.Tensor or None, got %s"
                            % (fn, n, type(x).__name__))
        if x is not None and x.device != dev:
            raise ValueError("%s: %s is on %s, q on %s (every tensor on one device)"
                             % (fn, n, x.device, dev))


def _check_heads(q, k, v, cu_seqlens, initial_state):
    if q.dim() == 4 and k.dim() == 4 and q.shape[2] != k.shape[2]:
        raise ValueError("q and k must have the same number of heads, but got "
                         "q.shape[2]=%d and k.shape[2]=%d" % (q.shape[2], k.shape[2]))
    if q.dim() == 4 and v.dim() == 4 and v.shape[2] % q.shape[2]:
        raise ValueError("For GVA, num_v_heads (HV=%d) must be evenly divisible by num_heads "
                         "(H=%d), but got HV %% H = %d" % (v.shape[2], q.shape[2],
                                                          v.shape[2] % q.shape[2]))
    if cu_seqlens is not None:
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens: dtype %s, expected a LongTensor (or int32)"
                             % cu_seqlens.dtype)
        if q.shape[0] != 1:
            raise ValueError("The batch size is expected to be 1 rather than %d when using "
                             "`cu_seqlens`. Please flatten variable-length inputs before "
                             "processing." % q.shape[0])
        if initial_state is not None and cu_seqlens.dim() == 1 and \
                initial_state.shape[0] != len(cu_seqlens) - 1:
            raise ValueError("The number of initial states is expected to be equal to the "
                             "number of input sequences, i.e., %d rather than %d."
                             % (len(cu_seqlens) - 1, initial_state.shape[0]))


def _beta_in_kernel(b, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if use_beta_sigmoid_in_kernel:
        b = torch.sigmoid(b) * (2.0 if allow_neg_eigval else 1.0)
    return b


def _cfg(mode, q, scale, eps, l2q, l2k, state_v_first, algo, chunk_size, backend, threads,
         gate, squash_x=1.5, squash_eps=1e-6):
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError("`chunk_size` must be 16, 32, 64 or 128, got %r." % (chunk_size,))
    if backend is None:
        backend = "ref64" if q.dtype == torch.float64 else "ref"
    return _Cfg(mode=mode, scale=None if scale is None else float(scale), eps=float(eps),
                l2norm_q=bool(l2q), l2norm_k=bool(l2k),
                state_layout="vk" if state_v_first else "kv", algo=algo,
                chunk_size=int(chunk_size), backend=backend, threads=int(threads),
                names=_FLA_NAMES, gate=gate, squash_x=float(squash_x),
                squash_eps=float(squash_eps))


def _call(fn, mode, q, k, v, g, b, scale, initial_state, output_final_state, cu_seqlens,
          use_qk_l2norm_in_kernel, eps, l2norm_q, l2norm_k, state_v_first, head_first,
          use_beta_sigmoid_in_kernel, allow_neg_eigval, use_gate_in_kernel, A_log, dt_bias,
          algo, chunk_size, backend, threads, kwargs, gate="head"):
    """The front ends without the preconditioner: GDN, KLA (gate head) and KDA,
    Kaczmarz-KDA (gate channel)."""
    bname = "eta" if mode == "kla" else "beta"
    state_v_first = _state_v_first(fn, state_v_first, kwargs)
    _leftover(fn, kwargs)
    _check_args(fn, q, k, v, (("g", g), (bname, b), ("initial_state", initial_state),
                              ("cu_seqlens", cu_seqlens), ("A_log", A_log),
                              ("dt_bias", dt_bias)), cu_seqlens, initial_state)
    if head_first:  # [B, H, T, ...] -> [B, T, H, ...]
        q, k, v = (x.transpose(1, 2) if x.dim() == 4 else x for x in (q, k, v))
        g, b = (x.transpose(1, 2) if x is not None and x.dim() == 3 else x for x in (g, b))
    _check_heads(q, k, v, cu_seqlens, initial_state)
    b = _beta_in_kernel(b, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    if use_gate_in_kernel:
        if A_log is None:
            raise ValueError("`A_log` must be provided when `use_gate_in_kernel=True`.")
        if g is None:
            raise ValueError("`g` (raw pre-activation) must be provided when "
                             "`use_gate_in_kernel=True`.")
        x = g.float() if g.dtype in _LOW else g
        if dt_bias is not None:
            x = x + dt_bias.to(x.dtype)
        g = -torch.exp(A_log.to(x.dtype)) * torch.nn.functional.softplus(x)
    cfg = _cfg(mode, q, scale, eps, use_qk_l2norm_in_kernel or l2norm_q,
               use_qk_l2norm_in_kernel or l2norm_k, state_v_first, algo, chunk_size, backend,
               threads, gate)
    o, ht = KlaFunction.apply(q, k, v, g, b, initial_state, cu_seqlens, cfg)
    if head_first:
        o = o.transpose(1, 2)
    return o, (ht if output_final_state else None)


def _call_precond(fn, mode, q, k, v, g_atk, g, beta_atk, b, scale, initial_state,
                  initial_A_state, output_final_state, cu_seqlens, l2q, l2k, eps, squash_x,
                  squash_eps, log_atk_scale, state_v_first, algo, chunk_size, backend,
                  threads, kwargs, gate=None, ignored=_IGNORED):
    """The front ends with the ATK preconditioner: PGDN, PDN, PKDA, KLA under ATK.
    gate None: channel when g has 4 dimensions, else head."""
    bname = "eta" if mode == "kla" else "beta"
    state_v_first = _state_v_first(fn, state_v_first, kwargs)
    _leftover(fn, kwargs, ignored)
    _check_args(fn, q, k, v, (("g_atk", g_atk), ("g", g), ("beta_atk", beta_atk), (bname, b),
                              ("initial_state", initial_state),
                              ("initial_A_state", initial_A_state), ("cu_seqlens", cu_seqlens),
                              ("log_atk_scale", log_atk_scale)), cu_seqlens, initial_state)
    if beta_atk is None:
        raise ValueError("%s: beta_atk [B, T, H] is required" % fn)
    if b is None:
        raise ValueError("%s: %s [B, T, HV] is required" % (fn, bname))
    _check_heads(q, k, v, cu_seqlens, initial_state)
    if gate is None:
        gate = "channel" if g is not None and g.dim() == 4 else "head"
    cfg = _cfg(mode, q, scale, eps, l2q, l2k, state_v_first, algo, chunk_size, backend,
               threads, gate, squash_x, squash_eps)
    o, ht, at = KlaPrecondFunction.apply(q, k, v, g, b, initial_state, cu_seqlens, g_atk,
                                         beta_atk, log_atk_scale, initial_A_state, cfg)
    if not output_final_state:
        return o, None, None
    return o, ht, at


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
                           output_final_state=False, *, cu_seqlens=None,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
                           allow_neg_eigval=False, state_v_first=False, head_first=False,
                           use_gate_in_kernel=False, A_log=None, dt_bias=None,
                           backend=None, algo="auto", chunk_size=64, threads=0, **kwargs):
    """fla.ops.gated_delta_rule.chunk_gated_delta_rule on libkla's reference (Gated
    DeltaNet, mode gdn): returns (o [B, T, HV, V], final_state [N, HV, K, V] or None).

    q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] natural-log decay (None: no decay,
    which fla's chunk kernel does not accept); beta [B, T, HV]. Tensors on a CUDA device
    are copied to the CPU for the computation and the results (o, final_state, the
    gradients) moved back to it. See the module docstring for dtypes, backend=, algo=,
    threads= and fla's extra flags."""
    return _call("chunk_gated_delta_rule", "gdn", q, k, v, g, beta, scale, initial_state,
                 output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, 1e-6, False, False,
                 state_v_first, head_first, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                 use_gate_in_kernel, A_log, dt_bias, algo, chunk_size, backend, threads,
                 kwargs)


def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None,
                                     initial_state=None, output_final_state=False, *,
                                     cu_seqlens=None, use_qk_l2norm_in_kernel=False,
                                     use_gate_in_kernel=False, A_log=None, dt_bias=None,
                                     use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                                     state_v_first=False, head_first=False, backend=None,
                                     algo="recurrent", chunk_size=64, threads=0, **kwargs):
    """fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule on libkla's reference:
    returns (o, final_state or None), with a backward (fla's has none).

    fla's signature since 0.3: q, k, v, g=None, gk=None, gv=None, beta=None, ... (beta
    is the 7th positional argument there, so pass it by keyword: a call
    fused_recurrent_gated_delta_rule(q, k, v, g, beta) hands beta to gk, in fla as
    here, and here it is refused). g None: no decay; beta None: ones (as fla).
    Per-channel decays gk, gv and a per-channel beta [B, T, HV, V] are not supported
    (NotImplementedError). CUDA tensors are computed on the CPU, results moved back."""
    if gk is not None or gv is not None:
        hint = ""
        if gk is not None and beta is None and gk.dim() == 3:
            hint = (" (a [B, T, HV] tensor was passed as gk, the 5th positional argument: "
                    "fla's order is q, k, v, g, gk, gv, beta, so pass beta=beta)")
        raise NotImplementedError("fused_recurrent_gated_delta_rule: per-channel decays gk, "
                                  "gv are not supported by the reference" + hint)
    if beta is not None and beta.dim() == v.dim():
        raise NotImplementedError("fused_recurrent_gated_delta_rule: a per-channel beta "
                                  "[B, T, HV, V] is not supported; beta must be [B, T, HV]")
    if beta is None:
        beta = torch.ones(v.shape[:3] if not head_first else v.shape[:3], dtype=q.dtype,
                          device=q.device)
    return _call("fused_recurrent_gated_delta_rule", "gdn", q, k, v, g, beta, scale,
                 initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, 1e-6,
                 False, False, state_v_first, head_first, use_beta_sigmoid_in_kernel,
                 allow_neg_eigval, use_gate_in_kernel, A_log, dt_bias, algo, chunk_size,
                 backend, threads, kwargs)


def chunk_kla(q, k, v, g, eta, scale=None, initial_state=None, output_final_state=False, *,
              cu_seqlens=None, use_qk_l2norm_in_kernel=False, eps=1e-6, l2norm_q=False,
              l2norm_k=False, state_v_first=False, head_first=False, backend=None,
              algo="auto", chunk_size=64, threads=0, **kwargs):
    """Kaczmarz Linear Attention (mode kla) with chunk_gated_delta_rule's conventions:
    returns (o, final_state or None).

    The step size is beta = eta / (||k||^2 + eps), formed inside the operator from k after
    the optional l2norm; gradients flow through it into k and eta. eta [B, T, HV].
    use_qk_l2norm_in_kernel normalises q and k; l2norm_q / l2norm_k select one (the KLA
    layer of kla-spec.md section 8.1 normalises q only: l2norm_q=True). g None: no
    decay. CUDA tensors are computed on the CPU, results moved back to their device."""
    return _call("chunk_kla", "kla", q, k, v, g, eta, scale, initial_state,
                 output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, eps, l2norm_q,
                 l2norm_k, state_v_first, head_first, False, False, False, None, None, algo,
                 chunk_size, backend, threads, kwargs)


def fused_recurrent_kla(q, k, v, g=None, eta=None, scale=None, initial_state=None,
                        output_final_state=False, *, algo="recurrent", **kwargs):
    """chunk_kla with the recurrent algorithm by default (g optional; eta required)."""
    if eta is None:
        raise TypeError("fused_recurrent_kla: eta is required")
    return chunk_kla(q, k, v, g, eta, scale, initial_state, output_final_state, algo=algo,
                     **kwargs)


# ------------------------------------------------------------------------ the family

_KDA_UNSUPPORTED = (
    # (fla keyword, its default, why it is refused)
    ("use_gate_in_kernel", False, "fla's fused gate activation is not run here: compute g = "
     "-A_log.exp()[:, None] * softplus(g_raw + dt_bias.view(HV, K)) (or, with lower_bound, "
     "lower_bound * sigmoid(A_log.exp()[:, None] * (g_raw + dt_bias.view(HV, K)))) in "
     "PyTorch and pass it as g; autograd carries the gradients to A_log and dt_bias"),
    ("A_log", None, "it belongs to use_gate_in_kernel, not run here (compute g in PyTorch)"),
    ("dt_bias", None, "it belongs to use_gate_in_kernel, not run here (compute g in PyTorch)"),
    ("safe_gate", False, "it selects a kernel path of fla's (with the lower_bound gate); "
     "compute a gate in [lower_bound, 0) in PyTorch and pass it as g"),
    ("lower_bound", None, "it belongs to fla's in-kernel gate activation (compute g in "
     "PyTorch)"),
    ("return_intermediate_states", False, "the per-chunk states of fla's inference path are "
     "not produced"),
    ("use_graph", False, "CUDA/NPU graph capture does not apply to the CPU reference"),
    ("max_num_seqs", None, "it belongs to use_graph"),
)
_KDA_IGNORED = _IGNORED + ("disable_recompute", "solve_tril_precision")


def _refuse(fn, kwargs, table):
    """fla keywords this reference does not run: a non-default value is refused
    (NotImplementedError, saying why and what to do instead), the default accepted."""
    for name, default, why in table:
        if name not in kwargs:
            continue
        val = kwargs.pop(name)
        if val is None and default is None:
            continue
        if default is not None and not isinstance(val, torch.Tensor) and val == default:
            continue
        shown = ("a tensor" if isinstance(val, torch.Tensor) else repr(val))
        raise NotImplementedError("%s: %s=%s is not supported by the reference: %s"
                                  % (fn, name, shown, why))


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, *,
              use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
              allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, backend=None,
              algo="auto", chunk_size=64, threads=0, **kwargs):
    """fla.ops.kda.chunk_kda on libkla's reference (KDA: mode gdn, gate channel): returns
    (o [B, T, HV, V], final_state [N, HV, K, V] or None).

    q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K], one natural-log decay (<= 0) per
    value head and key channel, applied to row i of the state before the delta step;
    beta [B, T, HV]. use_qk_l2norm_in_kernel normalises q and k; use_beta_sigmoid_in_kernel
    (and allow_neg_eigval) take beta as logits, in PyTorch. Not supported, refused with
    NotImplementedError when set: use_gate_in_kernel, A_log, dt_bias, safe_gate,
    lower_bound, return_intermediate_states, use_graph, max_num_seqs, cp_context (the
    module docstring says how to compute the gate instead). disable_recompute,
    cu_seqlens_cpu and chunk_indices are accepted and ignored. chunk_size is our chunk
    algorithm's (16, 32, 64 or 128). Positional arguments end at output_final_state."""
    fn = "chunk_kda"
    _refuse(fn, kwargs, _KDA_UNSUPPORTED)
    kwargs.pop("disable_recompute", None)  # memory of fla's kernel only
    if g is None:
        raise ValueError("%s: g [B, T, HV, K] is required (the per-key-channel decay)" % fn)
    return _call(fn, "gdn", q, k, v, g, beta, scale, initial_state, output_final_state,
                 cu_seqlens, use_qk_l2norm_in_kernel, 1e-6, False, False, state_v_first,
                 False, use_beta_sigmoid_in_kernel, allow_neg_eigval, False, None, None, algo,
                 chunk_size, backend, threads, kwargs, gate="channel")


def chunk_kaczmarz_kda(q, k, v, g, eta, scale=None, initial_state=None,
                       output_final_state=False, *, cu_seqlens=None,
                       use_qk_l2norm_in_kernel=False, eps=1e-6, l2norm_q=False, l2norm_k=False,
                       state_v_first=False, backend=None, algo="auto", chunk_size=64,
                       threads=0, **kwargs):
    """KDA with Kaczmarz Linear Attention's step (mode kla, gate channel), with
    chunk_kla's conventions: returns (o, final_state or None).

    g [B, T, HV, K] per key channel (required), eta [B, T, HV]; beta = eta / (||k||^2 +
    eps) on k after the optional l2norm (use_qk_l2norm_in_kernel: q and k; l2norm_q /
    l2norm_k: one of them). The decay acts before the projection, so eta = 1, eps = 0
    still gives k^T S_t = v_t^T (kla-spec.md 7.1). No fla counterpart."""
    fn = "chunk_kaczmarz_kda"
    if g is None:
        raise ValueError("%s: g [B, T, HV, K] is required (the per-key-channel decay; "
                         "without a decay use chunk_kla)" % fn)
    return _call(fn, "kla", q, k, v, g, eta, scale, initial_state, output_final_state,
                 cu_seqlens, use_qk_l2norm_in_kernel, eps, l2norm_q, l2norm_k, state_v_first,
                 False, False, False, False, None, None, algo, chunk_size, backend, threads,
                 kwargs, gate="channel")


def chunk_precond_gated_delta_rule(q, k, v, g_atk, g, beta_atk, beta, scale=None,
                                   initial_state=None, initial_A_state=None,
                                   output_final_state=False, *, use_qk_l2norm_in_kernel=True,
                                   cu_seqlens=None, transpose_state_layout=False, x=1.5,
                                   eps=1e-6, log_atk_scale=None, backend=None, algo="auto",
                                   chunk_size=64, threads=0, **kwargs):
    """fla.ops.precond_gated_delta_rule.chunk_precond_gated_delta_rule on libkla's
    reference (PGDN: mode gdn, precond atk): returns (o [B, T, HV, V], final_state
    [N, HV, K, V] or None, final_A_state [N, H, K] or None), the states when
    output_final_state.

    q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] (None: no decay, PDN; [B, T, HV, K]:
    per key channel, PKDA, beyond fla's signature); beta [B, T, HV]; g_atk (None: zeros)
    and beta_atk [B, T, H]; log_atk_scale [H] (None: each -0.2, no gradient; a tensor:
    with its gradient); initial_A_state [N, H, K]. x (> 1) and eps (> 0) are the squash's
    range and epsilon (kla-spec.md squash_x, squash_eps). use_qk_l2norm_in_kernel
    defaults to True, as fla's. transpose_state_layout (or state_v_first): states
    [N, HV, V, K]. cu_seqlens_cpu, chunk_indices: accepted and ignored; cp_context:
    NotImplementedError. Positional arguments end at output_final_state (fla has
    cu_seqlens_cpu and cp_context between cu_seqlens and transpose_state_layout)."""
    return _call_precond("chunk_precond_gated_delta_rule", "gdn", q, k, v, g_atk, g, beta_atk,
                         beta, scale, initial_state, initial_A_state, output_final_state,
                         cu_seqlens, use_qk_l2norm_in_kernel, use_qk_l2norm_in_kernel, 1e-6,
                         x, eps, log_atk_scale, kwargs.pop("state_v_first", False) or
                         transpose_state_layout, algo, chunk_size, backend, threads, kwargs)


def chunk_precond_kda(q, k, v, g, g_atk, beta_atk, beta, scale=None, initial_state=None,
                      initial_A_state=None, output_final_state=False, *, cu_seqlens=None,
                      transpose_state_layout=False, x=1.5, eps=1e-6, log_atk_scale=None,
                      backend=None, algo="auto", chunk_size=64, threads=0, **kwargs):
    """fla.ops.precond_kda.chunk_precond_kda on libkla's reference (PKDA: mode gdn, gate
    channel, precond atk): returns (o, final_state or None, final_A_state or None).

    fla's order: g [B, T, HV, K] BEFORE g_atk [B, T, H] (chunk_precond_gated_delta_rule
    has g_atk first). q and k are always L2-normalised, as in fla (use_qk_l2norm_in_kernel
    =False is refused). Grouped value heads (HV a multiple of H, the ATK per key head)
    are allowed here; fla's PKDA op has H = HV. Refused as in chunk_kda:
    use_gate_in_kernel, A_log, dt_bias, safe_gate, lower_bound,
    return_intermediate_states, cp_context; accepted and ignored: cu_seqlens_cpu,
    chunk_indices, solve_tril_precision, disable_recompute. Other keywords as
    chunk_precond_gated_delta_rule."""
    fn = "chunk_precond_kda"
    _refuse(fn, kwargs, _KDA_UNSUPPORTED)
    if kwargs.pop("use_qk_l2norm_in_kernel", True) is not True:
        raise ValueError("%s: q and k are always L2-normalised (as in fla's "
                         "chunk_precond_kda); for raw keys use chunk_precond_gated_delta_rule "
                         "with g [B, T, HV, K] and use_qk_l2norm_in_kernel=False" % fn)
    if g is None:
        raise ValueError("%s: g [B, T, HV, K] is required (the per-key-channel decay)" % fn)
    return _call_precond(fn, "gdn", q, k, v, g_atk, g, beta_atk, beta, scale, initial_state,
                         initial_A_state, output_final_state, cu_seqlens, True, True, 1e-6, x,
                         eps, log_atk_scale, kwargs.pop("state_v_first", False) or
                         transpose_state_layout, algo, chunk_size, backend, threads, kwargs,
                         gate="channel", ignored=_KDA_IGNORED)


def chunk_precond_kla(q, k, v, g_atk, g, beta_atk, eta, scale=None, initial_state=None,
                      initial_A_state=None, output_final_state=False, *, cu_seqlens=None,
                      use_qk_l2norm_in_kernel=False, eps=1e-6, l2norm_q=False, l2norm_k=False,
                      squash_x=1.5, squash_eps=1e-6, log_atk_scale=None, state_v_first=False,
                      backend=None, algo="auto", chunk_size=64, threads=0, **kwargs):
    """Kaczmarz Linear Attention under the ATK preconditioner (mode kla, precond atk,
    kla-spec.md 7.2): returns (o, final_state or None, final_A_state or None).

    chunk_precond_gated_delta_rule's tensors with eta [B, T, HV] in place of beta:
    beta = eta / (k^T kw + eps), kw = k * m the preconditioned write key, which makes
    eta = 1, eps = 0 an exact projection. g [B, T, HV] (None: no decay) or [B, T, HV, K]
    (per key channel: Kaczmarz-PKDA). Keywords as chunk_kla: eps is the step's epsilon,
    use_qk_l2norm_in_kernel (default False, raw keys: the ATK accumulates raw k^2),
    l2norm_q, l2norm_k; the squash is squash_x (> 1) and squash_eps (> 0), which
    chunk_precond_gated_delta_rule calls x and eps (x= is refused here, to keep the two
    eps apart). No fla counterpart."""
    fn = "chunk_precond_kla"
    if "x" in kwargs:
        raise TypeError("%s: the squash range is squash_x= here (and its epsilon "
                        "squash_eps=); eps= is the Kaczmarz step's epsilon, as in chunk_kla"
                        % fn)
    return _call_precond(fn, "kla", q, k, v, g_atk, g, beta_atk, eta, scale, initial_state,
                         initial_A_state, output_final_state, cu_seqlens,
                         use_qk_l2norm_in_kernel or l2norm_q,
                         use_qk_l2norm_in_kernel or l2norm_k, eps, squash_x, squash_eps,
                         log_atk_scale, state_v_first, algo, chunk_size, backend, threads,
                         kwargs)
