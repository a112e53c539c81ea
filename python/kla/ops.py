"""kla.forward / kla.backward: our reference (libkla) on numpy arrays, through ctypes.

libkla is found at $KLA_LIB (the file), else in the repository's build folders
(build/libkla.so, ...), else by the system's library search. Arrays may be anything
with __array__ (torch CPU tensors included); results are numpy arrays, float64 for the
backend ref64 and float32 for the others.
"""

import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np

__all__ = ["forward", "backward", "library", "KlaError"]


class KlaError(RuntimeError):
    """A libkla call failed; the message is kla_error_detail()."""


F32, F64, I32, I64 = 0, 1, 2, 3


class _In(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int)]


class _Out(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int)]


class _Shape(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "T", "H", "HV", "K", "V", "N")]


class _Options(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("scale", ctypes.c_double), ("eps", ctypes.c_double),
                ("l2norm_q", ctypes.c_int), ("l2norm_k", ctypes.c_int),
                ("state_layout", ctypes.c_int), ("algo", ctypes.c_int),
                ("chunk_size", ctypes.c_int)]


_IN_NAMES = ("q", "k", "v", "g", "eta", "beta", "h0", "cu_seqlens", "dout", "dht")
_OUT_NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "deta", "dbeta", "dh0", "state")


class _Tensors(ctypes.Structure):
    _fields_ = [(n, _In) for n in _IN_NAMES] + [(n, _Out) for n in _OUT_NAMES]


class _Params(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_char_p), ("threads", ctypes.c_int),
                ("cpu_mask", ctypes.c_uint), ("gpu_device", ctypes.c_int)]


_lib = None
_EMPTY = np.zeros(1)  # the address passed for a zero-size (present) tensor


def _candidates():
    env = os.environ.get("KLA_LIB")
    if env:
        yield env
        return
    repo = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    ext = ".dylib" if sys.platform == "darwin" else ".dll" if os.name == "nt" else ".so"
    yield os.path.join(repo, "build", "libkla" + ext)
    yield from sorted(glob.glob(os.path.join(repo, "build*", "libkla" + ext)))
    found = ctypes.util.find_library("kla")
    if found:
        yield found


def library():
    """The loaded libkla (ctypes.CDLL); raises OSError when none is found."""
    global _lib
    if _lib is not None:
        return _lib
    tried = []
    for path in _candidates():
        tried.append(path)
        if os.path.sep in path and not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        P = ctypes.POINTER
        lib.kla_default_params.argtypes = [P(_Params)]
        lib.kla_default_options.argtypes = [P(_Options)]
        lib.kla_open.argtypes = [P(ctypes.c_void_p), P(_Params)]
        lib.kla_open.restype = ctypes.c_int
        lib.kla_close.argtypes = [P(ctypes.c_void_p)]
        lib.kla_error_detail.argtypes = [ctypes.c_void_p]
        lib.kla_error_detail.restype = ctypes.c_char_p
        lib.kla_strerror.argtypes = [ctypes.c_int]
        lib.kla_strerror.restype = ctypes.c_char_p
        for fn in (lib.kla_forward, lib.kla_backward):
            fn.argtypes = [ctypes.c_void_p, P(_Shape), P(_Options), P(_Tensors)]
            fn.restype = ctypes.c_int
        _lib = lib
        return lib
    raise OSError("libkla not found (build it with meson/ninja, or set KLA_LIB to the file); "
                  "tried: " + ", ".join(tried))


def _array(x, name, ints=False):
    """A C-contiguous numpy array: float32 stays float32, other floats become float64."""
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch: detach, CPU, widen bf16/fp16
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
    a = np.asarray(x)
    if ints:
        if a.dtype not in (np.int32, np.int64):
            a = a.astype(np.int64)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


def _dt(a):
    return {np.dtype(np.float32): F32, np.dtype(np.float64): F64,
            np.dtype(np.int32): I32, np.dtype(np.int64): I64}[a.dtype.newbyteorder("=")]


def _run(backward, q, k, v, g, eta, beta, h0, cu_seqlens, dout, dht, mode, scale, eps,
         l2norm_q, l2norm_k, state_layout, algo, chunk_size, backend):
    lib = library()
    arrs = {"q": _array(q, "q"), "k": _array(k, "k"), "v": _array(v, "v"), "g": _array(g, "g"),
            "eta": _array(eta, "eta"), "beta": _array(beta, "beta"), "h0": _array(h0, "h0"),
            "cu_seqlens": _array(cu_seqlens, "cu_seqlens", ints=True),
            "dout": _array(dout, "do"), "dht": _array(dht, "dht")}
    qa, va = arrs["q"], arrs["v"]
    if qa.ndim != 4 or va.ndim != 4:
        raise ValueError("q, k must be [B, T, H, K] and v [B, T, HV, V]")
    B, T, H, K = qa.shape
    HV, V = va.shape[2], va.shape[3]
    cu = arrs["cu_seqlens"]
    N = cu.size - 1 if cu is not None else B
    if mode is None:
        mode = "kla" if eta is not None else "gdn"
    if mode not in ("kla", "gdn"):
        raise ValueError(f"mode {mode!r}: expected 'kla' or 'gdn'")
    if state_layout not in ("kv", "vk"):
        raise ValueError(f"state_layout {state_layout!r}: expected 'kv' or 'vk'")
    algos = {"auto": 0, "recurrent": 1, "chunk": 2}
    if algo not in algos:
        raise ValueError(f"algo {algo!r}: expected auto, recurrent or chunk")

    opt = _Options()
    lib.kla_default_options(ctypes.byref(opt))
    opt.mode = 0 if mode == "kla" else 1
    opt.scale = 0.0 if scale is None else float(scale)
    opt.eps = float(eps)
    opt.l2norm_q, opt.l2norm_k = int(bool(l2norm_q)), int(bool(l2norm_k))
    opt.state_layout = 0 if state_layout == "kv" else 1
    opt.algo, opt.chunk_size = algos[algo], int(chunk_size)
    shape = _Shape(B, T, H, HV, K, V, N)

    par = _Params()
    lib.kla_default_params(ctypes.byref(par))
    par.backend = backend.encode() if backend else None
    ctx = ctypes.c_void_p()
    r = lib.kla_open(ctypes.byref(ctx), ctypes.byref(par))
    if r < 0:
        raise KlaError(f"backend {backend!r}: {lib.kla_strerror(r).decode()}")
    try:
        odt = np.float64 if backend == "ref64" else np.float32
        sshape = (N, HV, K, V) if state_layout == "kv" else (N, HV, V, K)
        outs = {"o": np.zeros((B, T, HV, V), odt), "ht": np.zeros(sshape, odt)}
        if backward:
            outs.update(dq=np.zeros((B, T, H, K), odt), dk=np.zeros((B, T, H, K), odt),
                        dv=np.zeros((B, T, HV, V), odt), dg=np.zeros((B, T, HV), odt))
            outs["deta" if mode == "kla" else "dbeta"] = np.zeros((B, T, HV), odt)
            if h0 is not None:
                outs["dh0"] = np.zeros(sshape, odt)
        t = _Tensors()
        for n, a in arrs.items():
            if a is not None and (backward or n not in ("dout", "dht")):
                # a zero-size tensor is present, not absent: never pass NULL for it
                setattr(t, n, _In(a.ctypes.data or _EMPTY.ctypes.data, _dt(a)))
        for n, a in outs.items():
            setattr(t, n, _Out(a.ctypes.data, _dt(a)))
        fn = lib.kla_backward if backward else lib.kla_forward
        r = fn(ctx, ctypes.byref(shape), ctypes.byref(opt), ctypes.byref(t))
        if r < 0:
            raise KlaError(lib.kla_error_detail(ctx).decode())
        return outs
    finally:
        lib.kla_close(ctypes.byref(ctx))


def forward(q, k, v, g=None, eta=None, beta=None, h0=None, cu_seqlens=None, mode=None,
            scale=None, eps=1e-6, l2norm_q=False, l2norm_k=False, state_layout="kv",
            algo="auto", chunk_size=64, backend="ref64", **extra):
    """Runs the operator. Returns {'o': [B,T,HV,V], 'ht': [N,HV,K,V] (or [N,HV,V,K])}.
    Shapes and options as in kla-spec.md; scale None means K^-1/2; mode None means kla if
    eta is given, else gdn. Extra keyword inputs 'do'/'dht' (as in case.inputs) are
    ignored, so kla.forward(**case.inputs, **case.options) works."""
    extra.pop("do", None)
    extra.pop("dht", None)
    if extra:
        raise TypeError(f"unexpected arguments: {', '.join(extra)}")
    return _run(False, q, k, v, g, eta, beta, h0, cu_seqlens, None, None, mode, scale, eps,
                l2norm_q, l2norm_k, state_layout, algo, chunk_size, backend)


def backward(q, k, v, g=None, eta=None, beta=None, h0=None, cu_seqlens=None, dout=None,
             dht=None, mode=None, scale=None, eps=1e-6, l2norm_q=False, l2norm_k=False,
             state_layout="kv", algo="auto", chunk_size=64, backend="ref64", **extra):
    """Gradients of L = sum(do * o) + sum(dht * ht). The upstream gradient of o is `dout`
    (or keyword 'do', as stored in golden files: kla.backward(**case.inputs,
    **case.options)). Returns o, ht, dq, dk, dv, dg, deta|dbeta and dh0 (when h0 given)."""
    if "do" in extra:
        dout = extra.pop("do")
    if extra:
        raise TypeError(f"unexpected arguments: {', '.join(extra)}")
    if dout is None:
        raise ValueError("backward needs dout (the gradient of o)")
    return _run(True, q, k, v, g, eta, beta, h0, cu_seqlens, dout, dht, mode, scale, eps,
                l2norm_q, l2norm_k, state_layout, algo, chunk_size, backend)
