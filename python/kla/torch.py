"""kla.torch: flash-linear-attention's gated delta rule API on our reference, with autograd.

    import torch
    from kla.torch import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, chunk_kla

    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                   output_final_state=True)     # Gated DeltaNet
    o, ht = chunk_kla(q, k, v, g, eta, output_final_state=True)   # KLA: beta = eta/(|k|^2+eps)
    (o * do).sum().backward()      # dq dk dv dg dbeta|deta dh0 through libkla's backward

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

fla extras handled in PyTorch before the operator (with autograd): head_first=True
(inputs [B, H, T, ...], as fla <= 0.2 accepted; o returned the same way),
use_beta_sigmoid_in_kernel / allow_neg_eigval (beta <- sigmoid(beta), times 2),
use_gate_in_kernel with A_log, dt_bias (g <- -exp(A_log) * softplus(g + dt_bias)),
state_v_first (or the deprecated transpose_state_layout). Accepted and ignored:
cu_seqlens_cpu, chunk_indices. Refused: cp_context, per-channel decays gk/gv and
per-channel beta (kla-spec.md section 7, not run by this version).

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
           "fused_recurrent_kla", "KlaFunction"]

_LOW = (torch.bfloat16, torch.float16)
_FLA_NAMES = {"h0": "initial_state", "dout": "the gradient of o",
              "dht": "the gradient of final_state"}


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


class KlaFunction(torch.autograd.Function):
    """libkla's forward and backward as an autograd Function.

    KlaFunction.apply(q, k, v, g, b, h0, cu_seqlens, cfg) -> (o, ht), where b is eta (mode
    kla) or beta (mode gdn), g, h0 and cu_seqlens may be None, and cfg a _Cfg of mode,
    scale, eps, l2norm_q, l2norm_k, state_layout, algo, chunk_size, backend, threads,
    names. Use the fla-style functions of this module rather than this directly."""

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
        sdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        return _back(out["o"], q), _back(out["ht"], q, sdt)

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


def _opts(cfg):
    return dict(mode=cfg.mode, scale=cfg.scale, eps=cfg.eps, l2norm_q=cfg.l2norm_q,
                l2norm_k=cfg.l2norm_k, state_layout=cfg.state_layout, algo=cfg.algo,
                chunk_size=cfg.chunk_size, backend=cfg.backend, threads=cfg.threads,
                names=cfg.names)


_IGNORED = ("cu_seqlens_cpu", "chunk_indices")


def _call(fn, mode, q, k, v, g, b, scale, initial_state, output_final_state, cu_seqlens,
          use_qk_l2norm_in_kernel, eps, l2norm_q, l2norm_k, state_v_first, head_first,
          use_beta_sigmoid_in_kernel, allow_neg_eigval, use_gate_in_kernel, A_log, dt_bias,
          algo, chunk_size, backend, threads, kwargs):
    bname = "eta" if mode == "kla" else "beta"
    if "transpose_state_layout" in kwargs:  # fla's old name of state_v_first
        if state_v_first:
            raise ValueError("Cannot pass both `state_v_first` and the deprecated "
                             "`transpose_state_layout`.")
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    if kwargs.pop("cp_context", None) is not None:
        raise NotImplementedError("%s: cp_context (context parallelism) is not supported by "
                                  "the reference" % fn)
    for n in _IGNORED:
        kwargs.pop(n, None)
    if kwargs:
        raise TypeError("%s() got unexpected keyword arguments: %s" % (fn, ", ".join(kwargs)))
    for n, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError("%s: %s must be a torch.Tensor, got %s" % (fn, n,
                                                                     type(x).__name__))
    dev = q.device
    for n, x in (("k", k), ("v", v), ("g", g), (bname, b), ("initial_state", initial_state),
                 ("cu_seqlens", cu_seqlens), ("A_log", A_log), ("dt_bias", dt_bias)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError("%s: %s must be a torch.Tensor or None, got %s"
                            % (fn, n, type(x).__name__))
        if x is not None and x.device != dev:
            raise ValueError("%s: %s is on %s, q on %s (every tensor on one device)"
                             % (fn, n, x.device, dev))
    if head_first:  # [B, H, T, ...] -> [B, T, H, ...]
        q, k, v = (x.transpose(1, 2) if x.dim() == 4 else x for x in (q, k, v))
        g, b = (x.transpose(1, 2) if x is not None and x.dim() == 3 else x for x in (g, b))
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
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if use_beta_sigmoid_in_kernel:
        b = torch.sigmoid(b) * (2.0 if allow_neg_eigval else 1.0)
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
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError("`chunk_size` must be 16, 32, 64 or 128, got %r." % (chunk_size,))
    if backend is None:
        backend = "ref64" if q.dtype == torch.float64 else "ref"
    qn = use_qk_l2norm_in_kernel or l2norm_q
    kn = use_qk_l2norm_in_kernel or l2norm_k
    cfg = _Cfg(mode=mode, scale=None if scale is None else float(scale), eps=float(eps),
               l2norm_q=bool(qn), l2norm_k=bool(kn),
               state_layout="vk" if state_v_first else "kv", algo=algo,
               chunk_size=int(chunk_size), backend=backend, threads=int(threads),
               names=_FLA_NAMES)
    o, ht = KlaFunction.apply(q, k, v, g, b, initial_state, cu_seqlens, cfg)
    if head_first:
        o = o.transpose(1, 2)
    return o, (ht if output_final_state else None)


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
