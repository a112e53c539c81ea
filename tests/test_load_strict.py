#!/usr/bin/python3
"""kla.load (python/kla/safetensors.py) against libkla's reader (kla_file_read, through
ctypes): the same verdict, accept or refuse, on every file (TAP).

Files: tests/fuzz-corpus/*.safetensors, the small golden cases, hand-written edge cases
(UTF-8 forms, JSON corners, nesting depth, dims, offsets, duplicates, metadata), and
mutants of golden and corpus files (bit flips, byte overwrites, truncations, inserted
bytes, header length, header edits: dtypes, shapes, offsets, duplicated and renamed
entries, unknown keys, metadata, splices). A disagreement fails and prints the file's
recipe (seed, index), both messages and the start of its header; --keep DIR saves it.

    /usr/bin/python3 tests/test_load_strict.py --lib build/libkla.so [--src .]
        [--mutants 4000] [--seed 1] [--keep DIR]
"""

import argparse
import ctypes
import glob
import json
import os
import random
import shutil
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tap import Tap  # noqa: E402

tap = Tap()


class CReader:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        L = self.lib
        L.kla_file_read.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        L.kla_file_read.restype = ctypes.c_int
        L.kla_file_free.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        L.kla_file_free.restype = None
        L.kla_file_count.argtypes = [ctypes.c_void_p]
        L.kla_file_count.restype = ctypes.c_int
        L.kla_error_detail.argtypes = [ctypes.c_void_p]
        L.kla_error_detail.restype = ctypes.c_char_p

    def verdict(self, path):
        """(accepted, message or tensor count)"""
        f = ctypes.c_void_p()
        r = self.lib.kla_file_read(path.encode(), ctypes.byref(f))
        if r < 0:
            return False, self.lib.kla_error_detail(None).decode(errors="replace")
        n = self.lib.kla_file_count(f)
        self.lib.kla_file_free(ctypes.byref(f))
        return True, n


def py_verdict(kla, path):
    try:
        t, _ = kla.load(path)
        return True, len(t)
    except ValueError as ex:  # SafetensorsError
        return False, str(ex)


# ------------------------------------------------------------------------ building files

def st_file(header, data=b"", length=None):
    """header: bytes or str (the JSON text as is); length: the length field (default the
    header's)."""
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    n = len(header) if length is None else length
    return struct.pack("<Q", n % (1 << 64)) + header + data


def obj(pairs):
    """JSON object text from (key, value) pairs; a value that is a Raw is put as is."""
    parts = []
    for k, v in pairs:
        kt = k.text if isinstance(k, Raw) else json.dumps(k)
        vt = v.text if isinstance(v, Raw) else json.dumps(v)
        parts.append(kt + ":" + vt)
    return "{" + ",".join(parts) + "}"


class Raw:
    def __init__(self, text):
        self.text = text


def T(dtype="F32", shape=(2,), off=(0, 8), extra=()):
    return Raw(obj([("dtype", dtype), ("shape", list(shape)), ("data_offsets", list(off))]
                   + list(extra)))


def edge_cases():
    """(name, file bytes)"""
    D8 = bytes(8)
    out = []
    add = lambda n, b: out.append((n, b))  # noqa: E731
    add("empty file", b"")
    add("7 bytes", b"\x02\0\0\0\0\0\0")
    add("length 0", st_file(b""))
    add("header {}", st_file("{}"))
    add("header {} + trailing spaces, tabs, CR, LF", st_file("{} \t\r\n "))
    add("header {} + NUL padding", st_file("{}\0\0"))
    add("header {} + trailing x", st_file("{}x"))
    add("header [] (not an object)", st_file("[]"))
    add("header string", st_file('"a"'))
    add("two objects", st_file("{}{}"))
    add("length past the end", st_file("{}", length=3))
    add("length 2^63", st_file("{}", length=1 << 63))
    add("length 100 MiB + 1", st_file("{}", length=100 * 1024 * 1024 + 1))
    add("one F32 tensor", st_file(obj([("a", T())]), D8))
    add("tensor, trailing data", st_file(obj([("a", T())]), D8 + b"xyz"))
    add("tensor with a gap before it", st_file(obj([("a", T(off=(4, 12)))]), bytes(12)))
    add("unaligned offset", st_file(obj([("a", T(off=(1, 9)))]), bytes(9)))
    add("data one byte short", st_file(obj([("a", T())]), bytes(7)))
    add("offsets not matching", st_file(obj([("a", T(off=(0, 4)))]), D8))
    add("offsets reversed", st_file(obj([("a", T(off=(8, 0)))]), D8))
    add("offsets negative", st_file(obj([("a", T(off=(-8, 0)))]), D8))
    add("offsets three", st_file(obj([("a", Raw('{"dtype":"F32","shape":[2],'
                                                 '"data_offsets":[0,8,8]}'))]), D8))
    add("offsets one", st_file(obj([("a", Raw('{"dtype":"F32","shape":[2],'
                                               '"data_offsets":[8]}'))]), D8))
    add("offsets 2^63", st_file(obj([("a", T(off=(0, 1 << 63)))]), D8))
    add("offsets 2^63-1", st_file(obj([("a", T(off=(0, (1 << 63) - 1)))]), D8))
    add("offsets 2^64", st_file(obj([("a", T(off=(0, 1 << 64)))]), D8))
    add("offsets float", st_file(obj([("a", Raw('{"dtype":"F32","shape":[2],'
                                                 '"data_offsets":[0,8.0]}'))]), D8))
    add("offsets strings", st_file(obj([("a", Raw('{"dtype":"F32","shape":[2],'
                                                   '"data_offsets":["0","8"]}'))]), D8))
    add("scalar shape []", st_file(obj([("a", T(shape=(), off=(0, 4)))]), bytes(4)))
    add("shape -0", st_file(obj([("a", Raw('{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}'))])))
    add("shape 2.0", st_file(obj([("a", Raw('{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}'))]), D8))
    add("shape 2e0", st_file(obj([("a", Raw('{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}'))]), D8))
    add("shape 02", st_file(obj([("a", Raw('{"dtype":"F32","shape":[02],"data_offsets":[0,8]}'))]), D8))
    add("shape negative", st_file(obj([("a", T(shape=(-2,), off=(0, 0)))])))
    add("shape 8 dims", st_file(obj([("a", T(shape=(1,) * 7 + (2,)))]), D8))
    add("shape 9 dims", st_file(obj([("a", T(shape=(1,) * 8 + (2,)))]), D8))
    add("shape zero dim, huge others", st_file(obj([("a", T(shape=(0, (1 << 63) - 1), off=(0, 0)))])))
    add("shape zero dim, 2^62", st_file(obj([("a", T(shape=(0, 1 << 62), off=(5, 5)))]), D8))
    add("shape element count overflow", st_file(obj([("a", T(shape=(1 << 32, 1 << 32), off=(0, 0)))])))
    add("shape byte size overflow", st_file(obj([("a", T(shape=(1 << 62,), off=(0, 0)))])))
    add("shape 2^63 (out of range)", st_file(obj([("a", T(shape=(1 << 63,), off=(0, 0)))])))
    add("shape not an array", st_file(obj([("a", Raw('{"dtype":"F32","shape":2,"data_offsets":[0,8]}'))]), D8))
    add("shape nested", st_file(obj([("a", Raw('{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}'))]), D8))
    add("shape trailing comma", st_file(obj([("a", Raw('{"dtype":"F32","shape":[2,],"data_offsets":[0,8]}'))]), D8))
    for dt, size in (("F64", 8), ("F16", 2), ("BF16", 2), ("I64", 8), ("I32", 4), ("I16", 2),
                     ("I8", 1), ("U64", 8), ("U32", 4), ("U16", 2), ("U8", 1), ("BOOL", 1),
                     ("F8_E4M3", 1), ("F8_E5M2", 1)):
        add("dtype " + dt, st_file(obj([("a", T(dt, off=(0, 2 * size)))]), bytes(2 * size)))
    for dt in ("f32", "F33", "", "F8_E4M3FN", "C64", "F32 "):
        add("dtype %r" % dt, st_file(obj([("a", T(dt))]), D8))
    add("dtype a number", st_file(obj([("a", Raw('{"dtype":4,"shape":[2],"data_offsets":[0,8]}'))]), D8))
    add("missing dtype", st_file(obj([("a", Raw('{"shape":[2],"data_offsets":[0,8]}'))]), D8))
    add("missing shape", st_file(obj([("a", Raw('{"dtype":"F32","data_offsets":[0,8]}'))]), D8))
    add("missing offsets", st_file(obj([("a", Raw('{"dtype":"F32","shape":[2]}'))]), D8))
    add("tensor entry not an object", st_file(obj([("a", [1, 2])]), D8))
    add("tensor entry null", st_file(obj([("a", None)]), D8))
    add("unknown key in entry (nested value)", st_file(obj([("a", T(extra=[("x", {"y": [1, {"z": None}]})]))]), D8))
    add("unknown key with NaN", st_file(obj([("a", T(extra=[("x", Raw("NaN"))]))]), D8))
    add("unknown key with Infinity", st_file(obj([("a", T(extra=[("x", Raw("-Infinity"))]))]), D8))
    add("unknown key with 1e999", st_file(obj([("a", T(extra=[("x", Raw("1e999"))]))]), D8))
    add("unknown key with 5000 digits", st_file(obj([("a", T(extra=[("x", Raw("9" * 5000))]))]), D8))
    add("unknown key with -", st_file(obj([("a", T(extra=[("x", Raw("-"))]))]), D8))
    add("unknown key with 1.", st_file(obj([("a", T(extra=[("x", Raw("1."))]))]), D8))
    add("unknown key with .5", st_file(obj([("a", T(extra=[("x", Raw(".5"))]))]), D8))
    add("unknown key with +1", st_file(obj([("a", T(extra=[("x", Raw("+1"))]))]), D8))
    add("unknown key with 1e+", st_file(obj([("a", T(extra=[("x", Raw("1e+"))]))]), D8))
    add("unknown key with 1E-5", st_file(obj([("a", T(extra=[("x", Raw("1E-5"))]))]), D8))
    add("unknown key with True", st_file(obj([("a", T(extra=[("x", Raw("True"))]))]), D8))
    add("unknown key with nul", st_file(obj([("a", T(extra=[("x", Raw("nul"))]))]), D8))
    add("unknown key with single quotes", st_file(obj([("a", T(extra=[("x", Raw("'s'"))]))]), D8))
    add("duplicate unknown key in entry", st_file(obj([("a", T(extra=[("x", 1), ("x", 2)]))]), D8))
    add("duplicate keys inside a skipped value (allowed)",
        st_file(obj([("a", T(extra=[("x", Raw('{"y":1,"y":2}'))]))]), D8))
    add("duplicate dtype key", st_file(obj([("a", T(extra=[("dtype", "F32")]))]), D8))
    add("duplicate dtype key, escaped", st_file(obj([("a", T(extra=[(Raw('"\\u0064type"'), "F32")]))]), D8))
    for depth in (61, 62, 63, 64, 65):
        v = "[" * depth + "]" * depth
        add("unknown value nested %d deep (entry at depth 2)" % depth,
            st_file(obj([("a", T(extra=[("x", Raw(v))]))]), D8))
    add("nesting 100000 deep", st_file(obj([("a", T(extra=[("x", Raw("[" * 100000 + "]" * 100000))]))]), D8))
    add("duplicate tensor", st_file(obj([("a", T()), ("a", T())]), D8))
    add("duplicate tensor, escaped name", st_file(obj([("a", T()), (Raw('"\\u0061"'), T(off=(8, 16)))]), bytes(16)))
    add("two tensors", st_file(obj([("a", T()), ("b", T(off=(8, 16)))]), bytes(16)))
    add("two tensors overlapping by one byte", st_file(obj([("a", T()), ("b", T(off=(7, 15)))]), bytes(16)))
    add("two tensors, same range", st_file(obj([("a", T()), ("b", T())]), bytes(16)))
    add("empty tensor inside another's range", st_file(obj([("a", T()), ("b", T(shape=(0,), off=(4, 4)))]), D8))
    add("two empty tensors at one offset", st_file(obj([("a", T(shape=(0,), off=(3, 3))), ("b", T(shape=(0,), off=(3, 3)))]), D8))
    add("empty name", st_file(obj([("", T())]), D8))
    add("name with é € 😀", st_file(obj([("é€😀", T())]).encode("utf-8")
                                    .replace(b"\\u00e9\\u20ac\\ud83d\\ude00", "é€😀".encode()), D8))
    add("name escaped surrogate pair", st_file(obj([(Raw('"\\ud83d\\ude00"'), T())]), D8))
    add("name lone high surrogate escape", st_file(obj([(Raw('"\\ud83d"'), T())]), D8))
    add("name lone low surrogate escape", st_file(obj([(Raw('"\\ude00"'), T())]), D8))
    add("name high + non-low escape", st_file(obj([(Raw('"\\ud83d\\u0041"'), T())]), D8))
    add("name high + text", st_file(obj([(Raw('"\\ud83dx"'), T())]), D8))
    add("name \\u0000", st_file(obj([(Raw('"a\\u0000"'), T())]), D8))
    add("name raw NUL", st_file(obj([(Raw('"a\0"'), T())]), D8))
    add("name raw tab", st_file(obj([(Raw('"a\t"'), T())]), D8))
    add("name raw DEL", st_file(obj([(Raw('"a\x7f"'), T())]), D8))
    add("name escapes \\/ \\b \\f \\n \\r \\t \\\" \\\\",
        st_file(obj([(Raw('"\\/\\b\\f\\n\\r\\t\\"\\\\"'), T())]), D8))
    add("name invalid escape \\x", st_file(obj([(Raw('"\\x41"'), T())]), D8))
    add("name invalid escape \\u12G4", st_file(obj([(Raw('"\\u12G4"'), T())]), D8))
    add("name truncated \\u12", st_file(obj([(Raw('"\\u12"'), T())]), D8))
    add("name unterminated", st_file('{"a'))
    add("name ends with backslash", st_file('{"a\\'))
    add("name \\U0041 (uppercase U)", st_file(obj([(Raw('"\\U0041"'), T())]), D8))
    add("name \\uABCD uppercase hex", st_file(obj([(Raw('"\\uABCD"'), T())]), D8))
    # UTF-8 of the raw header bytes, inside a name
    for label, bad in (("overlong 2-byte C0 80", b"\xc0\x80"), ("overlong 2-byte C1 BF", b"\xc1\xbf"),
                       ("overlong 3-byte E0 80 80", b"\xe0\x80\x80"),
                       ("overlong 3-byte E0 9F BF", b"\xe0\x9f\xbf"),
                       ("smallest 3-byte E0 A0 80", b"\xe0\xa0\x80"),
                       ("overlong 4-byte F0 80 80 80", b"\xf0\x80\x80\x80"),
                       ("overlong 4-byte F0 8F BF BF", b"\xf0\x8f\xbf\xbf"),
                       ("smallest 4-byte F0 90 80 80", b"\xf0\x90\x80\x80"),
                       ("surrogate ED A0 80", b"\xed\xa0\x80"), ("surrogate ED BF BF", b"\xed\xbf\xbf"),
                       ("last BMP before surrogates ED 9F BF", b"\xed\x9f\xbf"),
                       ("U+10FFFF F4 8F BF BF", b"\xf4\x8f\xbf\xbf"),
                       ("above U+10FFFF F4 90 80 80", b"\xf4\x90\x80\x80"),
                       ("F5 80 80 80", b"\xf5\x80\x80\x80"), ("FF", b"\xff"), ("FE", b"\xfe"),
                       ("lone continuation 80", b"\x80"), ("truncated E2 82", b"\xe2\x82"),
                       ("truncated F0 9F 98", b"\xf0\x9f\x98"), ("C2 followed by ASCII", b"\xc2A"),
                       ("valid C2 A9", b"\xc2\xa9"), ("valid EF BF BF", b"\xef\xbf\xbf")):
        h = b'{"a' + bad + b'":' + T().text.encode() + b"}"
        add("UTF-8 " + label + " in a name", st_file(h, D8))
    h = b'{"a":' + T().text.encode() + b"}  \xe0\x80\x80"
    add("UTF-8 overlong after the object", st_file(h, D8))
    h = b'{"a":' + T().text.encode() + b"} \xc0"
    add("UTF-8 truncated at the end of the header", st_file(h, D8))
    # metadata
    add("metadata null", st_file(obj([("__metadata__", None), ("a", T())]), D8))
    add("metadata null twice", st_file(obj([("__metadata__", None), ("__metadata__", None)])))
    add("metadata {} twice", st_file(obj([("__metadata__", {}), ("__metadata__", {})])))
    add("metadata empty", st_file(obj([("__metadata__", {})])))
    add("metadata strings", st_file(obj([("__metadata__", {"mode": "kla", "x": ""})])))
    add("metadata number value", st_file(obj([("__metadata__", {"scale": 1.0})])))
    add("metadata null value", st_file(obj([("__metadata__", {"scale": None})])))
    add("metadata nested value", st_file(obj([("__metadata__", {"x": {"y": "z"}})])))
    add("metadata a string", st_file(obj([("__metadata__", "x")])))
    add("metadata an array", st_file(obj([("__metadata__", ["x"])])))
    add("metadata nullx", st_file('{"__metadata__":nullx}'))
    add("metadata duplicate key", st_file('{"__metadata__":{"a":"1","a":"2"}}'))
    add("metadata duplicate key, escaped", st_file('{"__metadata__":{"a":"1","\\u0061":"2"}}'))
    add("metadata key escaped as __metadata__", st_file('{"\\u005f_metadata__":{"a":"1"}}'))
    add("metadata value with \\u0000", st_file('{"__metadata__":{"a":"\\u0000"}}'))
    add("metadata trailing comma", st_file('{"__metadata__":{"a":"1",}}'))
    add("metadata missing colon", st_file('{"__metadata__":{"a" "1"}}'))
    add("top trailing comma", st_file(obj([("a", T())])[:-1] + ",}", D8))
    add("top missing comma", st_file(obj([("a", T())])[:-1] + ' "b":' + T(off=(8, 16)).text + "}", bytes(16)))
    add("top key not a string", st_file("{1:2}"))
    add("top unterminated", st_file("{"))
    add("top whitespace only", st_file("   "))
    add("whitespace around everything", st_file(' \n{ "a" : { "dtype" : "F32" , "shape" : [ 2 ] ,'
                                                ' "data_offsets" : [ 0 , 8 ] } } \n', D8))
    add("form feed as whitespace", st_file("{\f}"))
    add("vertical tab as whitespace", st_file("{\v}"))
    add("non-breaking space as whitespace", st_file("{\u00a0}"))
    add("BOM before the object", st_file("\ufeff{}"))
    return out


# ------------------------------------------------------------------------------ mutants

INTERESTING = b'\x00\xff"\\{}[],:-0.e \x80\xc0\xc1\xe0\xed\xf0\xf4\xf5\x7f\n9'
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8",
          "BOOL", "F8_E4M3", "F8_E5M2", "F33", "f32", "", "float32", 7, None]
DIMS = [0, 1, 2, 3, -1, -(1 << 63), (1 << 31), (1 << 32), (1 << 62), (1 << 63) - 1, 1 << 63,
        1 << 64, Raw("2.0"), Raw("1e1"), Raw("-0"), Raw('"2"'), Raw("null"), Raw("[2]")]


def split(buf):
    """(header bytes, data bytes) or None when the length field is off."""
    if len(buf) < 8:
        return None
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8:
        return None
    return buf[8:8 + n], buf[8 + n:]


def header_pairs(h):
    """The header as [(key, value)] with tensor entries as [(key, value)] too, or None."""
    try:
        return json.loads(h.decode("utf-8"), object_pairs_hook=list)
    except ValueError:
        return None


def emit(v):
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, list) and v and all(isinstance(p, tuple) and len(p) == 2 for p in v):
        return "{" + ",".join(emit(k) + ":" + emit(x) for k, x in v) + "}"
    if isinstance(v, list) and not v:
        return "[]"
    if isinstance(v, list):
        return "[" + ",".join(emit(x) for x in v) + "]"
    return json.dumps(v)


def header_edit(rng, h, data):
    """One structural edit of the parsed header, re-serialised: (label, header text, data)."""
    top = header_pairs(h)
    if not isinstance(top, list) or not top:
        return None
    top = [list(p) for p in top]
    ti = [i for i, (k, v) in enumerate(top) if k != "__metadata__" and isinstance(v, list)]
    mi = [i for i, (k, v) in enumerate(top) if k == "__metadata__"]
    kind = rng.randrange(16)
    label = None
    if ti:
        i = rng.choice(ti)
        ent = [list(p) for p in top[i][1]]
        keys = [k for k, _ in ent]

        def setk(k, v):
            for p in ent:
                if p[0] == k:
                    p[1] = v
                    return
            ent.append([k, v])
        if kind == 0:
            dt = rng.choice(DTYPES)
            setk("dtype", dt)
            label = "dtype -> %r" % (dt,)
        elif kind == 1 and "shape" in keys:
            sh = list(dict(ent)["shape"])
            op = rng.randrange(5)
            if op == 0 and sh:
                sh[rng.randrange(len(sh))] = rng.choice(DIMS)
            elif op == 1:
                sh.insert(rng.randrange(len(sh) + 1), rng.choice([1, 1, 2, 0]))
            elif op == 2 and sh:
                sh.pop(rng.randrange(len(sh)))
            elif op == 3:
                sh = [1] * rng.randrange(7, 11) + sh[-1:]
            else:
                sh = rng.choice([[], Raw("null"), Raw('"x"'), Raw("{}"), [Raw("[]")]])
            setk("shape", sh)
            label = "shape -> %s" % emit(sh)
        elif kind == 2 and "data_offsets" in keys:
            o = list(dict(ent)["data_offsets"])
            op = rng.randrange(6)
            if op == 0 and len(o) == 2:
                o = [o[1], o[0]]
            elif op == 1 and o:
                j = rng.randrange(len(o))
                o[j] = o[j] + rng.choice([-8, -4, -1, 1, 2, 4, 8]) if isinstance(o[j], int) else 0
            elif op == 2 and len(o) == 2:
                d = rng.choice([-1, 1, 3, 4, 8, 64, len(data)])
                o = [o[0] + d, o[1] + d]
            elif op == 3:
                o = o + [o[-1] if o else 0]
            elif op == 4:
                o = o[:1]
            else:
                o = [rng.choice(DIMS), rng.choice(DIMS)]
            setk("data_offsets", o)
            label = "data_offsets -> %s" % emit(o)
        elif kind == 3:
            k = rng.choice(["dtype", "shape", "data_offsets"])
            ent = [p for p in ent if p[0] != k]
            label = "entry without %s" % k
        elif kind == 4:
            v = rng.choice([Raw("[" * 70 + "]" * 70), Raw("[" * 62 + "]" * 62), {"a": [1, 2]},
                            Raw("NaN"), Raw("1e999"), Raw("-0.5e-3"), "s", None, True,
                            Raw('"\\ud800"'), Raw("01"), Raw('{"x":1,"x":2}')])
            k = rng.choice(["x", "dtype", "extra", "__metadata__"])
            ent.insert(rng.randrange(len(ent) + 1), [k, v])
            label = "entry gets %r: %s" % (k, emit(v)[:40])
        elif kind == 5:  # another tensor's offsets (overlap)
            j = rng.choice(ti)
            oth = dict(top[j][1]).get("data_offsets")
            if oth is not None:
                setk("data_offsets", oth)
            label = "offsets of %r" % top[j][0]
        elif kind == 6:  # duplicate the entry
            top.insert(rng.randrange(len(top) + 1), [top[i][0], [tuple(p) for p in ent]])
            label = "duplicated %r" % top[i][0]
        elif kind == 7:  # rename
            nm = rng.choice(["q", "k", "initial_state", "", "é", "\x7f", "a\u2028", "__metadata__",
                             Raw('"\\u0071"'), Raw('"\\ud800"'), Raw('"\\u0000"'), Raw('"x\\"')])
            label = "renamed %r -> %s" % (top[i][0], emit(nm))
            top[i][0] = nm
        elif kind == 8:
            top[i][1] = rng.choice([Raw("null"), Raw("[]"), Raw('"F32"'), Raw("{}"), Raw("1")])
            label = "entry -> %s" % top[i][1].text
        if kind not in (6, 7, 8):
            top[i][1] = [tuple(p) for p in ent]
    if label is None:
        if kind in (9, 10) or not ti:
            meta = rng.choice([None, {}, {"mode": "kla"}, Raw('{"a":"1","a":"2"}'), Raw("1"),
                               Raw('"s"'), Raw('{"a":1}'), Raw('{"a":null}'), Raw("nullx"),
                               Raw('{"\\u0000":"x"}'), {"eps": "1e-6", "scale": "0"}])
            if mi and rng.random() < 0.5:
                top[mi[0]][1] = meta
            else:
                top.insert(rng.randrange(len(top) + 1), ["__metadata__", meta])
            label = "metadata %s" % emit(meta)
        elif kind == 11 and mi:
            del top[mi[0]]
            label = "no metadata"
        elif kind == 12:
            rng.shuffle(top)
            label = "entries shuffled"
        else:
            tail = rng.choice(["", " ", "\n", "x", "\0", "}", ",", "{}", " \t\r\n", "\u00e9"])
            text = emit([tuple(p) for p in top]) + tail
            return "tail %r" % tail, text.encode("utf-8"), data
    text = emit([tuple(p) for p in top])
    pad = rng.choice(["", "", " " * rng.randrange(8)])
    return label, (text + pad).encode("utf-8"), data


def mutant(rng, seed_buf):
    """(label, bytes)"""
    buf = bytearray(seed_buf)
    parts = split(bytes(buf))
    hlen = len(parts[0]) if parts else 0
    kind = rng.randrange(10)
    if kind in (0, 1) and parts and rng.random() < 0.5:  # structural, most of the time
        kind = 9
    if kind == 0:
        pos = 8 + rng.randrange(hlen) if hlen and rng.random() < 0.8 else rng.randrange(len(buf))
        bit = rng.randrange(8)
        buf[pos] ^= 1 << bit
        return "bit flip at %d" % pos, bytes(buf)
    if kind == 1:
        pos = 8 + rng.randrange(hlen) if hlen and rng.random() < 0.8 else rng.randrange(len(buf))
        b = INTERESTING[rng.randrange(len(INTERESTING))]
        buf[pos] = b
        return "byte %d = 0x%02X" % (pos, b), bytes(buf)
    if kind == 2:
        n = rng.randrange(len(buf) + 1) if rng.random() < 0.3 else \
            max(0, len(buf) - rng.randrange(1, 65))
        return "truncated to %d" % n, bytes(buf[:n])
    if kind == 3 and parts:  # insert into the header, length adjusted
        pos = rng.randrange(hlen + 1)
        ins = rng.choice([b" ", b"\0", b",", b'"', b"\\", b"\xc0\x80", b"\xe0\x80\x80",
                          b"\xf0\x80\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"[", b"{}",
                          b"-", b"0", b"\\u0000", b"\\ud800", b"1e5", b"null,"])
        h = parts[0][:pos] + ins + parts[0][pos:]
        return "insert %r at header %d" % (ins, pos), st_file(h, parts[1])
    if kind == 4:  # length field
        (n,) = struct.unpack("<Q", bytes(buf[:8])) if len(buf) >= 8 else (0,)
        nn = rng.choice([n + 1, n - 1, n + 8, n - 8, 0, 1 << 63, (1 << 64) - 1, len(buf),
                         len(buf) - 8, 100 * 1024 * 1024, rng.randrange(1 << 16)]) % (1 << 64)
        return "length %d" % nn, struct.pack("<Q", nn) + bytes(buf[8:])
    if kind == 5:  # append data
        return "appended", bytes(buf) + bytes(rng.randrange(1, 64))
    if kind == 6 and parts:  # splice: a header range replaced
        a = rng.randrange(hlen + 1)
        b = min(hlen, a + rng.randrange(1, 12))
        rep = rng.choice([b"", b"1", b'"x"', b"{}", b"[]", b"null", b"-1", b"9" * 25, b"1.5",
                          b'":"', b"}", b"]", b",", b" "])
        h = parts[0][:a] + rep + parts[0][b:]
        return "splice %d..%d -> %r" % (a, b, rep), st_file(h, parts[1])
    if kind == 7 and parts:  # a tensor's data cut from the middle
        d = parts[1]
        if d:
            a = rng.randrange(len(d))
            return "data cut at %d" % a, st_file(parts[0], d[:a] + d[a + 1:])
    if parts:
        r = header_edit(rng, parts[0], parts[1])
        if r:
            label, h, d = r
            return label, st_file(h, d)
    pos = rng.randrange(len(buf)) if buf else 0
    if buf:
        buf[pos] ^= 0xFF
    return "byte %d inverted" % pos, bytes(buf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib")
    ap.add_argument("--no-lib", action="store_true", help="skip (sanitizer build)")
    ap.add_argument("--src", default=os.path.join(HERE, ".."))
    ap.add_argument("--mutants", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", help="save disagreeing files here")
    a = ap.parse_args()
    src = os.path.abspath(a.src)
    sys.path.insert(0, os.path.join(src, "python"))
    import kla

    if a.no_lib or not a.lib:
        tap.skip("kla.load against kla_file_read", "no libkla (--no-lib)")
        return tap.finish()
    c = CReader(os.path.abspath(a.lib))
    tmp = tempfile.mkdtemp(prefix="kla-strict-")
    kept = [0]

    msgs = [0, 0]  # refused by both: count, with the same message

    def check(label, data, path=None):
        """(same verdict, lines for a failure); counts identical messages in msgs"""
        if path is None:
            path = os.path.join(tmp, "f.safetensors")
            with open(path, "wb") as f:
                f.write(data)
        cv = c.verdict(path)
        try:
            pv = py_verdict(kla, path)
        except Exception as ex:  # anything but a ValueError is a crash of the reader
            pv = (None, "%s: %s" % (ex.__class__.__name__, ex))
        if cv[0] == pv[0]:
            if not cv[0]:
                msgs[0] += 1
                msgs[1] += cv[1] == pv[1]
            if cv[0] and cv[1] != pv[1]:
                return False, ["%s: both accept, tensors: libkla %s, kla.load %s" % (label, cv[1],
                                                                                    pv[1])]
            return True, []
        lines = ["%s: libkla %s, kla.load %s" % (label, "accepts" if cv[0] else "refuses",
                                                 {True: "accepts", False: "refuses",
                                                  None: "crashes"}[pv[0]]),
                 "  libkla:   %s" % cv[1], "  kla.load: %s" % pv[1]]
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        lines.append("  file (%d bytes), first 400: %r" % (len(data), data[:400]))
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
            kept[0] += 1
            p = os.path.join(a.keep, "diff%04d.safetensors" % kept[0])
            with open(p, "wb") as f:
                f.write(data)
            lines.append("  saved as " + p)
        return False, lines

    try:
        # 1. the fuzz corpus and the golden files as they are
        files = sorted(glob.glob(os.path.join(src, "tests", "fuzz-corpus", "*.safetensors")))
        golden = sorted(glob.glob(os.path.join(src, "golden", "*.safetensors")))
        bad, acc = [], 0
        for p in files + golden:
            ok, lines = check(os.path.relpath(p, src), None, p)
            if not ok:
                bad += lines
            acc += c.verdict(p)[0]
        tap(not bad and len(files) >= 10 and len(golden) >= 20,
            "fuzz-corpus (%d files) and golden (%d): same verdicts (%d accepted)"
            % (len(files), len(golden), acc), bad)

        # 2. hand-written edge cases, one line each
        for name, data in edge_cases():
            ok, lines = check(name, data)
            cv = c.verdict(os.path.join(tmp, "f.safetensors"))
            tap(ok, "edge: %s (%s)" % (name, "accepted" if cv[0] else "refused"), lines)

        # 3. mutants of the small golden files and the valid corpus files
        seeds = [p for p in golden if os.path.getsize(p) < 200000]
        seeds += [p for p in files if os.path.basename(p).startswith("valid_")]
        seed_bufs = []
        for p in seeds:
            with open(p, "rb") as f:
                seed_bufs.append((os.path.relpath(p, src), f.read()))
        families = {}
        for i in range(a.mutants):
            rng = random.Random(a.seed * 1000003 + i)
            sname, sbuf = seed_bufs[rng.randrange(len(seed_bufs))]
            label, data = mutant(rng, sbuf)
            if rng.random() < 0.25:  # stack a second mutation
                l2, data = mutant(rng, data)
                label += " + " + l2
            fam = label.split(" ")[0]
            ok, lines = check("mutant seed %d index %d (%s of %s)" % (a.seed, i, label, sname),
                              data)
            f = families.setdefault(fam, [0, 0, 0, []])
            f[0] += 1
            f[1] += c.verdict(os.path.join(tmp, "f.safetensors"))[0]
            if not ok:
                f[2] += 1
                f[3] += lines
        for fam in sorted(families):
            n, accepted, nbad, lines = families[fam]
            tap(nbad == 0, "mutants '%s': %d files, %d accepted, same verdicts%s"
                % (fam, n, accepted, "" if not nbad else " except %d" % nbad), lines[:40])
        # not a test: the messages are the C reader's wording, ported
        print("# refused by both: %d files, the same message for %d" % tuple(msgs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tap.finish()


if __name__ == "__main__":
    sys.exit(main())
