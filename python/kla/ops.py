"""kla.forward / kla.backward: our reference (libkla) on numpy arrays, through ctypes.

    out = kla.forward(q, k, v, g=g, eta=eta)            # everything after v by keyword
    out = kla.backward(**case.inputs, **case.options)   # a golden case, as stored
    out = kla.backward(q, k, v, g=g, beta=beta, beta_atk=beta_atk, dout=do)  # PGDN: + at,
                                                        # dg_atk dbeta_atk dlog_atk_scale da0

Arrays may be anything with __array__ (torch CPU tensors included; see kla.torch for
autograd); results are numpy arrays, float64 for the backend ref64 and float32 for the
others. Shapes are checked here first, so a wrong one is reported with the tensor's name
and the shape expected (ValueError); what the library refuses raises KlaError with its
message (kla_error_detail).

The delta-rule family (kla-spec.md section 7): gate="channel" (inferred when g has 4
dimensions) is KDA's per-key-channel decay; precond="atk" (inferred when beta_atk is
given) adds the ATK preconditioner (PDN, PGDN, PKDA), with inputs g_atk, beta_atk,
log_atk_scale, a0 (and dat in backward) and outputs at (and dg_atk, dbeta_atk,
dlog_atk_scale, da0). Only the backends ref and ref64 run the family.

Which libkla: $KLA_LIB (the file, or a folder holding it) when set, and nothing else;
else the repository's build/ when this package runs from a checkout; else
`pkg-config --variable=libdir kla`; else the lib folders of the install prefixes
(this package's, sys.prefix, /usr/local, /usr; lib, lib/<multiarch>, lib64); else
ctypes.util.find_library("kla"). A library of another ABI version is skipped. When none
loads, library() raises OSError naming KLA_LIB and listing where it looked.

Contexts: a context (kla_open) is opened once per (backend, threads) and thread, kept
for the thread's later calls (opening one costs up to seconds on a GPU backend) and
closed when the thread ends or the interpreter exits. A context serves one call at a
time, and ctypes releases the GIL during the call: hence one per thread.
"""

import atexit
import ctypes
import ctypes.util
import glob
import math
import os
import subprocess
import sys
import sysconfig
import threading
import weakref

import numpy as np

__all__ = ["forward", "backward", "library", "library_path", "describe", "last_algo",
           "close_contexts", "KlaError", "ABI_VERSION"]

ABI_VERSION = (0, 4)  # the KlaIn/KlaOut/KlaOptions/KlaTensors layout these structures mirror


class KlaError(RuntimeError):
    """A libkla call failed; the message is kla_error_detail(). .code is the KLA_E* value."""

    def __init__(self, msg, code=None):
        super().__init__(msg)
        self.code = code


F32, F64, I32, I64 = 0, 1, 2, 3
EBUSY = -16
ALGOS = {"auto": 0, "recurrent": 1, "chunk": 2}


class _In(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("numel", ctypes.c_int64), ("buffer", ctypes.c_void_p)]


class _Out(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("numel", ctypes.c_int64), ("buffer", ctypes.c_void_p)]


class _Shape(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("B", "T", "H", "HV", "K", "V", "N")]


class _Options(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_int), ("scale", ctypes.c_double), ("eps", ctypes.c_double),
                ("l2norm_q", ctypes.c_int), ("l2norm_k", ctypes.c_int),
                ("state_layout", ctypes.c_int), ("algo", ctypes.c_int),
                ("chunk_size", ctypes.c_int), ("gate", ctypes.c_int), ("precond", ctypes.c_int),
                ("squash_x", ctypes.c_double), ("squash_eps", ctypes.c_double)]


# KlaTensors in kla.h order
_IN_NAMES = ("q", "k", "v", "g", "eta", "beta", "h0", "cu_seqlens", "dout", "dht",
             "g_atk", "beta_atk", "log_atk_scale", "a0", "dat")
_OUT_NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "deta", "dbeta", "dh0",
              "at", "dg_atk", "dbeta_atk", "dlog_atk_scale", "da0", "state", "astate")


class _Tensors(ctypes.Structure):
    _fields_ = [(n, _In) for n in _IN_NAMES] + [(n, _Out) for n in _OUT_NAMES]


class _Params(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_char_p), ("threads", ctypes.c_int),
                ("cpu_mask", ctypes.c_uint), ("gpu_device", ctypes.c_int)]


_lib = None
_lib_path = None
_lib_lock = threading.Lock()
_EMPTY = np.zeros(1)  # the address passed for a zero-size (present) tensor

# ----------------------------------------------------------------------------- finding it


def _ext():
    return ".dylib" if sys.platform == "darwin" else ".dll" if os.name == "nt" else ".so"


def _names():
    e = _ext()
    return ("kla.dll", "libkla.dll") if e == ".dll" else ("libkla" + e,)


def checkout_root():
    """The repository root when this package runs from a kla checkout (python/kla), else
    None."""
    repo = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    if os.path.isfile(os.path.join(repo, "include", "kla.h")) and \
            os.path.isfile(os.path.join(repo, "meson.build")):
        return repo
    return None


_pc_cache = {}


def pkg_config_variable(var):
    """`pkg-config --variable=VAR kla`: (value or None, what happened, for messages)."""
    if var in _pc_cache:
        return _pc_cache[var]
    try:
        r = subprocess.run(["pkg-config", "--variable=" + var, "kla"], capture_output=True,
                           text=True, timeout=20)
        val = r.stdout.strip()
        if r.returncode != 0:
            res = (None, "pkg-config --variable=%s kla: kla.pc not found" % var)
        elif not val:
            res = (None, "pkg-config --variable=%s kla: empty" % var)
        else:
            res = (val, "pkg-config --variable=%s kla" % var)
    except (OSError, subprocess.SubprocessError) as ex:
        res = (None, "pkg-config --variable=%s kla: %s" % (var, ex.__class__.__name__ if not
                                                           isinstance(ex, FileNotFoundError)
                                                           else "no pkg-config command"))
    _pc_cache[var] = res
    return res


def install_prefixes():
    """Prefixes an installed kla may live under, most specific first: this package's own
    prefix (<prefix>/lib/pythonX.Y/site-packages/kla), sys.prefix, sys.base_prefix,
    /usr/local, /usr."""
    out = []
    here = os.path.dirname(os.path.abspath(__file__)).split(os.sep)
    for i in range(len(here) - 1, 0, -1):  # .../PREFIX/lib*/python3*/...-packages/kla
        if here[i].startswith("python") and i >= 1 and here[i - 1].startswith("lib"):
            out.append(os.sep.join(here[:i - 1]) or os.sep)
            break
    for p in (sys.prefix, getattr(sys, "base_prefix", sys.prefix), "/usr/local", "/usr"):
        if p and p not in out:
            out.append(p)
    return out


def _lib_dirs(prefix):
    multi = sysconfig.get_config_var("MULTIARCH")
    d = [os.path.join(prefix, "lib")]
    if multi:
        d.append(os.path.join(prefix, "lib", multi))
    d.append(os.path.join(prefix, "lib64"))
    return d


def _in_dir(d):
    """Library files in folder d: libkla.so, else its versioned names."""
    out = [os.path.join(d, n) for n in _names()]
    if _ext() == ".so":
        out += sorted(glob.glob(os.path.join(d, "libkla.so.*")), key=len)
    return out


def _candidates(notes):
    """Paths to try, in order; notes collects what each step found, for the error."""
    env = os.environ.get("KLA_LIB")
    if env:
        yield (_in_dir(env)[0] if os.path.isdir(env) else env), "KLA_LIB"
        return
    notes.append("KLA_LIB: not set")
    repo = checkout_root()
    if repo:
        for n in _names():
            yield os.path.join(repo, "build", n), "the repository's build/"
        for p in sorted(glob.glob(os.path.join(repo, "build*", _names()[0]))):
            yield p, "the repository"
    libdir, how = pkg_config_variable("libdir")
    if libdir:
        for p in _in_dir(libdir):
            yield p, how
    else:
        notes.append(how)
    for prefix in install_prefixes():
        for d in _lib_dirs(prefix):
            for p in _in_dir(d):
                yield p, "prefix " + prefix
    found = ctypes.util.find_library("kla")
    if found:
        yield found, "ctypes.util.find_library('kla')"
    else:
        notes.append("ctypes.util.find_library('kla'): nothing")


def _declare(lib):
    P = ctypes.POINTER
    c = ctypes
    lib.kla_version.restype = c.c_char_p
    lib.kla_version.argtypes = []
    lib.kla_default_params.argtypes = [P(_Params)]
    lib.kla_default_options.argtypes = [P(_Options)]
    lib.kla_open.argtypes = [P(c.c_void_p), P(_Params)]
    lib.kla_open.restype = c.c_int
    lib.kla_close.argtypes = [P(c.c_void_p)]
    lib.kla_close.restype = None
    lib.kla_error_detail.argtypes = [c.c_void_p]
    lib.kla_error_detail.restype = c.c_char_p
    lib.kla_strerror.argtypes = [c.c_int]
    lib.kla_strerror.restype = c.c_char_p
    lib.kla_backend_name.argtypes = [c.c_void_p]
    lib.kla_backend_name.restype = c.c_char_p
    lib.kla_describe.argtypes = [c.c_void_p, c.c_char_p, c.c_size_t]
    lib.kla_describe.restype = c.c_char_p
    lib.kla_last_algo.argtypes = [c.c_void_p]
    lib.kla_last_algo.restype = c.c_int
    lib.kla_file_read.argtypes = [c.c_char_p, P(c.c_void_p)]
    lib.kla_file_read.restype = c.c_int
    lib.kla_file_free.argtypes = [P(c.c_void_p)]
    lib.kla_file_free.restype = None
    lib.kla_file_count.argtypes = [c.c_void_p]
    lib.kla_file_count.restype = c.c_int
    lib.kla_file_meta.argtypes = [c.c_void_p, c.c_char_p]
    lib.kla_file_meta.restype = c.c_char_p
    for fn in (lib.kla_forward, lib.kla_backward):
        fn.argtypes = [c.c_void_p, P(_Shape), P(_Options), P(_Tensors)]
        fn.restype = c.c_int


def library():
    """The loaded libkla (ctypes.CDLL); raises OSError naming KLA_LIB and the places
    looked in when none is found."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        notes, tried = [], set()
        for path, how in _candidates(notes):
            if path in tried:
                continue
            tried.add(path)
            if os.path.sep in path and not os.path.exists(path):
                if how == "KLA_LIB":
                    notes.append("KLA_LIB=%s: no such file" % path)
                elif not how.startswith("prefix") or path.endswith(_names()[0]):
                    notes.append("%s (%s): absent" % (path, how))
                continue
            try:
                lib = ctypes.CDLL(path)
            except OSError as ex:
                notes.append("%s (%s): cannot load: %s" % (path, how, ex))
                continue
            if not hasattr(lib, "kla_version") or not hasattr(lib, "kla_file_read"):
                notes.append("%s (%s): not libkla %d.%d (no kla_file_read)" % ((path, how)
                                                                               + ABI_VERSION))
                continue
            lib.kla_version.restype = ctypes.c_char_p
            ver = lib.kla_version().decode()
            if tuple(int(x) for x in ver.split(".")[:2]) != ABI_VERSION:
                notes.append("%s (%s): version %s, this package needs %d.%d" % ((path, how, ver)
                                                                               + ABI_VERSION))
                continue
            _declare(lib)
            _lib, _lib_path = lib, path
            return lib
        multi = sysconfig.get_config_var("MULTIARCH")
        example = os.path.join("/usr/local/lib", multi or "", _names()[0])
        raise OSError(
            "libkla %d.%d not found: set KLA_LIB to the library file (for example "
            "KLA_LIB=%s), or build it (meson setup build && ninja -C build) "
            "or install it so that `pkg-config --variable=libdir kla` names its folder. "
            "Looked at: %s" % (ABI_VERSION + (example, "; ".join(notes))))


def library_path():
    """The file library() loaded."""
    library()
    return _lib_path


# ------------------------------------------------------------------------------ contexts

_registry_lock = threading.Lock()
_registry = weakref.WeakValueDictionary()  # id -> every thread's table, closed at exit
_exiting = False


class _Table:
    """One thread's contexts: (backend, threads) -> [ctx pointer, busy flag]."""

    def __init__(self):
        self.pid = os.getpid()
        self.ctx = {}
        self.last = None
        with _registry_lock:
            _registry[id(self)] = self

    def close(self, only_idle=False):
        lib = _lib
        for key, ent in list(self.ctx.items()):
            if only_idle and ent[1]:
                continue  # a daemon thread still inside a call: leave it
            self.ctx.pop(key, None)
            if lib is not None and ent[0]:
                lib.kla_close(ctypes.byref(ent[0]))
        self.last = None

    def __del__(self):  # the thread ended (its threading.local went away)
        try:
            with _registry_lock:
                _registry.pop(id(self), None)
            if self.pid == os.getpid() and not _exiting:
                self.close(only_idle=True)
        except Exception:  # interpreter shutdown
            pass


_local = threading.local()


def _table():
    t = getattr(_local, "t", None)
    if t is None or t.pid != os.getpid():  # new thread, or a forked child: fresh contexts
        if t is not None:
            t.ctx = {}  # the parent's contexts are not ours to close
        t = _Table()
        _local.t = t
    return t


@atexit.register
def _close_all():
    global _exiting
    _exiting = True
    with _registry_lock:
        tables = list(_registry.values())
    for t in tables:
        if t.pid == os.getpid():
            t.close(only_idle=True)


def close_contexts():
    """Close the calling thread's cached contexts (they reopen on the next call)."""
    t = getattr(_local, "t", None)
    if t is not None and t.pid == os.getpid():
        t.close()


def _context(backend, threads):
    """This thread's context for (backend, threads), opened on first use."""
    lib = library()
    t = _table()
    key = (backend or "auto", int(threads))
    ent = t.ctx.get(key)
    if ent is None:
        par = _Params()
        lib.kla_default_params(ctypes.byref(par))
        par.backend = backend.encode() if backend else None
        par.threads = int(threads)
        ctx = ctypes.c_void_p()
        r = lib.kla_open(ctypes.byref(ctx), ctypes.byref(par))
        if r < 0:
            raise KlaError("backend %r: %s" % (backend, lib.kla_error_detail(None).decode(
                errors="replace") or lib.kla_strerror(r).decode()), r)
        ent = t.ctx[key] = [ctx, False]
    return t, ent


def describe(backend="ref64", threads=0):
    """kla_describe() of the context this thread uses for (backend, threads), e.g.
    'simd: avx512, 2 threads'."""
    lib = library()
    _, ent = _context(backend, threads)
    buf = ctypes.create_string_buffer(512)
    return lib.kla_describe(ent[0], buf, len(buf)).decode(errors="replace")


def last_algo():
    """'recurrent' or 'chunk': what the calling thread's last successful forward or
    backward ran (what algo='auto' chose); None before any."""
    t = getattr(_local, "t", None)
    if t is None or t.last is None or t.last[0] is None:
        return None
    a = library().kla_last_algo(t.last[0])
    return {1: "recurrent", 2: "chunk"}.get(a)


# ----------------------------------------------------------------------------- arguments


def _array(x, ints=False):
    """A C-contiguous numpy array: float32 and float64 stay, other floats become float32
    (bf16, fp16) or float64."""
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch: detach, CPU, widen bf16/fp16
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
    a = np.asarray(x)
    if ints:
        if a.dtype not in (np.int32, np.int64):
            if a.dtype.kind not in "iub" and a.size:
                raise ValueError("tensor cu_seqlens: dtype %s, expected integers" % a.dtype)
            a = a.astype(np.int64)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


def _dt(a):
    return {np.dtype(np.float32): F32, np.dtype(np.float64): F64,
            np.dtype(np.int32): I32, np.dtype(np.int64): I64}[a.dtype.newbyteorder("=")]


def _fmt(shape):
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _check_shapes(arrs, vk, names, gate="head"):
    """Shapes of kla-spec.md sections 2 and 7.3, named for the caller (names: spec name ->
    the caller's name for it, e.g. h0 -> initial_state). gate: head (g [B, T, HV]) or
    channel (g [B, T, HV, K]). Returns B, T, H, HV, K, V, N."""
    nm = lambda n: names.get(n, n)  # noqa: E731

    def bad(n, a, dims, want, why=""):
        raise ValueError("tensor %s: shape %s, expected %s = %s%s" % (nm(n), _fmt(a.shape), dims,
                                                                      _fmt(want), why))

    q, k, v = arrs["q"], arrs["k"], arrs["v"]
    for n, a in (("q", q), ("k", k), ("v", v)):
        if a is None:
            raise ValueError("tensor %s is required" % nm(n))
    if q.ndim != 4:
        raise ValueError("tensor %s: shape %s, expected 4 dimensions [B, T, H, K]"
                         % (nm("q"), _fmt(q.shape)))
    B, T, H, K = q.shape
    if k.shape != q.shape:
        bad("k", k, "[B, T, H, K] (as %s)" % nm("q"), q.shape)
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise ValueError("tensor %s: shape %s, expected [B, T, HV, V] with B, T = %d, %d (as %s)"
                         % (nm("v"), _fmt(v.shape), B, T, nm("q")))
    HV, V = v.shape[2], v.shape[3]
    if H < 1 or HV % H:
        raise ValueError("tensor %s: HV = %d value heads is not a multiple of H = %d key heads "
                         "(of %s)" % (nm("v"), HV, H, nm("q")))
    a = arrs.get("g")
    if a is not None:
        if gate == "channel" and a.shape != (B, T, HV, K):
            bad("g", a, "[B, T, HV, K]", (B, T, HV, K), " (gate channel: one decay per key "
                "channel)")
        if gate == "head" and a.shape != (B, T, HV):
            bad("g", a, "[B, T, HV]", (B, T, HV), " (gate head: one decay per value head)")
    for n in ("eta", "beta"):
        a = arrs.get(n)
        if a is not None and a.shape != (B, T, HV):
            bad(n, a, "[B, T, HV]", (B, T, HV))
    cu = arrs.get("cu_seqlens")
    if cu is not None:
        if cu.ndim != 1 or cu.size < 2:
            raise ValueError("tensor %s: shape %s, expected [N + 1] with N >= 1 sequences"
                             % (nm("cu_seqlens"), _fmt(cu.shape)))
        if B != 1:
            raise ValueError("tensor %s: variable-length packing needs B = 1, %s has B = %d"
                             % (nm("cu_seqlens"), nm("q"), B))
        N = cu.size - 1
    else:
        N = B
    st = (N, HV, V, K) if vk else (N, HV, K, V)
    sdims = "[N, HV, V, K]" if vk else "[N, HV, K, V]"
    for n in ("h0", "dht"):
        a = arrs.get(n)
        if a is not None and a.shape != st:
            bad(n, a, sdims, st)
    d = arrs.get("dout")
    if d is not None and d.shape != v.shape:
        bad("dout", d, "[B, T, HV, V] (as %s)" % nm("v"), v.shape)
    # the ATK preconditioner (section 7.3): per key head
    for n in ("g_atk", "beta_atk"):
        a = arrs.get(n)
        if a is not None and a.shape != (B, T, H):
            bad(n, a, "[B, T, H] (per key head)", (B, T, H))
    a = arrs.get("log_atk_scale")
    if a is not None and a.shape != (H,):
        bad("log_atk_scale", a, "[H] (per key head)", (H,))
    for n in ("a0", "dat"):
        a = arrs.get(n)
        if a is not None and a.shape != (N, H, K):
            bad(n, a, "[N, H, K]", (N, H, K))
    return B, T, H, HV, K, V, N


ATK_INPUTS = ("g_atk", "beta_atk", "log_atk_scale", "a0", "dat")
ATK_GRADS = ("dg_atk", "dbeta_atk", "dlog_atk_scale", "da0")
_OPTIONAL_OUTS = ("ht", "dg", "dh0", "at") + ATK_GRADS


def _family(arrs, gate, precond, names):
    """gate and precond as given or inferred (kla-spec.md 7.3), checked against the
    tensors present."""
    nm = lambda n: names.get(n, n)  # noqa: E731
    g = arrs.get("g")
    if gate is None:
        gate = "channel" if g is not None and g.ndim == 4 else "head"
    if gate not in ("head", "channel"):
        raise ValueError("gate %r: expected None, 'head' or 'channel'" % (gate,))
    given = [n for n in ATK_INPUTS if arrs.get(n) is not None]
    if precond is None:
        precond = "atk" if arrs.get("beta_atk") is not None else "none"
        if precond == "none" and given:
            raise ValueError("tensor %s given without %s: the ATK preconditioner (precond "
                             "'atk') needs %s" % (nm(given[0]), nm("beta_atk"), nm("beta_atk")))
    if precond not in ("none", "atk"):
        raise ValueError("precond %r: expected None, 'none' or 'atk'" % (precond,))
    if precond == "none" and given:
        raise ValueError("tensor %s: not used with precond 'none' (the tensors %s belong to "
                         "precond 'atk')" % (nm(given[0]), ", ".join(nm(n) for n in ATK_INPUTS)))
    if precond == "atk" and arrs.get("beta_atk") is None:
        raise ValueError("precond 'atk' needs tensor %s [B, T, H]" % nm("beta_atk"))
    return gate, precond


def run(backward, arrays, mode=None, scale=None, eps=1e-6, l2norm_q=False, l2norm_k=False,
        state_layout="kv", algo="auto", chunk_size=64, backend="ref64", threads=0,
        names=None, want=None, gate=None, precond=None, squash_x=1.5, squash_eps=1e-6):
    """The call behind forward/backward (and kla.torch): arrays maps spec names (q k v g
    eta beta h0 cu_seqlens dout dht g_atk beta_atk log_atk_scale a0 dat) to arrays or
    None. want: the optional outputs to compute among ht, dg, dh0, at, dg_atk, dbeta_atk,
    dlog_atk_scale, da0 (default all that apply). Returns a dict of numpy arrays."""
    names = names or {}
    arrs = {n: _array(arrays.get(n), ints=(n == "cu_seqlens")) for n in _IN_NAMES}
    if not backward:
        arrs["dout"] = arrs["dht"] = arrs["dat"] = None
    if mode is None:
        mode = "kla" if arrs["eta"] is not None else "gdn"
    if mode not in ("kla", "gdn"):
        raise ValueError("mode %r: expected 'kla' or 'gdn'" % (mode,))
    if state_layout not in ("kv", "vk"):
        raise ValueError("state_layout %r: expected 'kv' or 'vk'" % (state_layout,))
    if algo not in ALGOS:
        raise ValueError("algo %r: expected auto, recurrent or chunk" % (algo,))
    if backward and arrs["dout"] is None:
        raise ValueError("backward needs %s (the gradient of o)" % names.get("dout", "dout"))
    gate, precond = _family(arrs, gate, precond, names)
    atk = precond == "atk"
    B, T, H, HV, K, V, N = _check_shapes(arrs, state_layout == "vk", names, gate)

    lib = library()
    opt = _Options()
    lib.kla_default_options(ctypes.byref(opt))
    opt.mode = 0 if mode == "kla" else 1
    opt.scale = math.nan if scale is None else float(scale)  # NaN: K^-1/2
    opt.eps = float(eps)
    opt.l2norm_q, opt.l2norm_k = int(bool(l2norm_q)), int(bool(l2norm_k))
    opt.state_layout = 0 if state_layout == "kv" else 1
    opt.algo, opt.chunk_size = ALGOS[algo], int(chunk_size)
    opt.gate = 0 if gate == "head" else 1
    opt.precond = 1 if atk else 0
    opt.squash_x, opt.squash_eps = float(squash_x), float(squash_eps)
    shape = _Shape(B, T, H, HV, K, V, N)

    odt = np.float64 if backend == "ref64" else np.float32
    sshape = (N, HV, K, V) if state_layout == "kv" else (N, HV, V, K)
    outs = {"o": np.zeros((B, T, HV, V), odt), "ht": np.zeros(sshape, odt)}
    if atk:
        outs["at"] = np.zeros((N, H, K), odt)
    if backward:
        outs.update(dq=np.zeros((B, T, H, K), odt), dk=np.zeros((B, T, H, K), odt),
                    dv=np.zeros((B, T, HV, V), odt),
                    dg=np.zeros((B, T, HV, K) if gate == "channel" else (B, T, HV), odt))
        outs["deta" if mode == "kla" else "dbeta"] = np.zeros((B, T, HV), odt)
        if arrs["h0"] is not None:
            outs["dh0"] = np.zeros(sshape, odt)
        if atk:  # every ATK gradient, da0 too (at a0 = 0 when a0 is absent)
            outs.update(dg_atk=np.zeros((B, T, H), odt), dbeta_atk=np.zeros((B, T, H), odt),
                        dlog_atk_scale=np.zeros((H,), odt), da0=np.zeros((N, H, K), odt))
    if want is not None:  # the optional outputs only when wanted
        outs = {n: a for n, a in outs.items() if n in want or n not in _OPTIONAL_OUTS}
    t = _Tensors()
    for n, a in arrs.items():
        if a is not None:
            # a zero-size tensor is present, not absent: never pass NULL for it
            setattr(t, n, _In(a.ctypes.data or _EMPTY.ctypes.data, _dt(a), a.size))
    for n, a in outs.items():
        setattr(t, n, _Out(a.ctypes.data or _EMPTY.ctypes.data, _dt(a), a.size))

    table, ent = _context(backend, threads)
    fn = lib.kla_backward if backward else lib.kla_forward
    ent[1] = True
    try:
        r = fn(ent[0], ctypes.byref(shape), ctypes.byref(opt), ctypes.byref(t))
    finally:
        ent[1] = False
    if r < 0:
        msg = lib.kla_error_detail(ent[0]).decode(errors="replace")
        for spec, mine in names.items():  # the caller's names in the library's message
            msg = msg.replace("tensor %s:" % spec, "tensor %s:" % mine)
        raise KlaError(msg, r)
    table.last = ent
    return outs


def forward(q, k, v, *, g=None, eta=None, beta=None, h0=None, cu_seqlens=None, g_atk=None,
            beta_atk=None, log_atk_scale=None, a0=None, mode=None, gate=None, precond=None,
            scale=None, eps=1e-6, l2norm_q=False, l2norm_k=False, state_layout="kv",
            squash_x=1.5, squash_eps=1e-6, algo="auto", chunk_size=64, backend="ref64",
            threads=0, **extra):
    """Runs the operator. Returns {'o': [B,T,HV,V], 'ht': [N,HV,K,V] (or [N,HV,V,K])} and,
    with precond atk, 'at': [N,H,K] (the final ATK states).

    Everything after v is keyword-only (kla.forward(q, k, v, g=g, eta=eta)): a positional
    call cannot silently take beta for eta. Shapes and options as in kla-spec.md; scale
    None means K^-1/2 (any number, 0 included, is used as given); mode None means kla if
    eta is given, else gdn. The family (kla-spec.md section 7): gate None means channel
    when g has 4 dimensions ([B,T,HV,K], KDA), else head; precond None means atk when
    beta_atk is given, else none; with atk: g_atk, beta_atk [B,T,H], log_atk_scale [H],
    a0 [N,H,K], squash_x (> 1) and squash_eps (> 0). Only the backends ref and ref64
    run the family (the others raise KlaError). algo: auto, recurrent or chunk;
    backend: ref64 (float64, default), ref (float32), simd, vulkan, auto; threads: worker
    threads (0: all cores). Keyword inputs 'do'/'dht'/'dat' (as in case.inputs) are
    ignored, so kla.forward(**case.inputs, **case.options) works."""
    for n in ("do", "dht", "dat"):
        extra.pop(n, None)
    if extra:
        raise TypeError("forward() got unexpected keyword arguments: %s" % ", ".join(extra))
    return run(False, dict(q=q, k=k, v=v, g=g, eta=eta, beta=beta, h0=h0,
                           cu_seqlens=cu_seqlens, g_atk=g_atk, beta_atk=beta_atk,
                           log_atk_scale=log_atk_scale, a0=a0), mode=mode, scale=scale,
               eps=eps, l2norm_q=l2norm_q, l2norm_k=l2norm_k, state_layout=state_layout,
               algo=algo, chunk_size=chunk_size, backend=backend, threads=threads, gate=gate,
               precond=precond, squash_x=squash_x, squash_eps=squash_eps)


def backward(q, k, v, *, g=None, eta=None, beta=None, h0=None, cu_seqlens=None, dout=None,
             dht=None, g_atk=None, beta_atk=None, log_atk_scale=None, a0=None, dat=None,
             mode=None, gate=None, precond=None, scale=None, eps=1e-6, l2norm_q=False,
             l2norm_k=False, state_layout="kv", squash_x=1.5, squash_eps=1e-6, algo="auto",
             chunk_size=64, backend="ref64", threads=0, **extra):
    """Gradients of L = sum(dout * o) + sum(dht * ht) + sum(dat * at). The upstream
    gradient of o is `dout` (or keyword 'do', as stored in golden files:
    kla.backward(**case.inputs, **case.options)). Everything after v is keyword-only.
    Returns o, ht, dq, dk, dv, dg (the shape of g: [B,T,HV,K] with gate channel),
    deta|dbeta and dh0 (when h0 is given); with precond atk also at, dg_atk, dbeta_atk
    [B,T,H], dlog_atk_scale [H] and da0 [N,H,K] (each at its default when the input is
    absent: g_atk = 0, log_atk_scale = -0.2, a0 = 0). Options as in forward()."""
    if "do" in extra:
        if dout is not None:
            raise TypeError("backward() got both dout and do")
        dout = extra.pop("do")
    if extra:
        raise TypeError("backward() got unexpected keyword arguments: %s" % ", ".join(extra))
    return run(True, dict(q=q, k=k, v=v, g=g, eta=eta, beta=beta, h0=h0,
                          cu_seqlens=cu_seqlens, dout=dout, dht=dht, g_atk=g_atk,
                          beta_atk=beta_atk, log_atk_scale=log_atk_scale, a0=a0, dat=dat),
               mode=mode, scale=scale, eps=eps, l2norm_q=l2norm_q, l2norm_k=l2norm_k,
               state_layout=state_layout, algo=algo, chunk_size=chunk_size, backend=backend,
               threads=threads, gate=gate, precond=precond, squash_x=squash_x,
               squash_eps=squash_eps)
