"""Safetensors reader/writer (numpy + stdlib only), as strict as libkla's reader.

File layout (https://github.com/huggingface/safetensors):
    8 bytes   little-endian uint64 N, the length of the JSON header
    N bytes   JSON object: {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
              "__metadata__": {str: str}}; offsets are relative to the data section
    rest      raw little-endian tensor data, row-major

`load` accepts exactly the files libkla's reader (src/safetensors.c st_parse, behind
kla_file_read and every `kla` command) accepts, and refuses the others with a message
naming the problem (SafetensorsError, a ValueError); tests/test_load_strict.py checks
the two verdicts agree file by file. Refused: a file shorter than 8 bytes, a header
length over 100 MiB or past the end of the file, a header that is not valid UTF-8
(overlong forms, surrogates and code points above U+10FFFF included), JSON that is not
well-formed (NaN/Infinity, leading zeros, trailing commas, control characters or NUL in
strings, unpaired surrogate escapes, anything after the top-level object but
whitespace), nesting deeper than 64, a top level that is not an object, a tensor entry
that is not an object or lacks dtype, shape or data_offsets, duplicate keys (tensor
names, keys of a tensor entry, __metadata__ and its keys), an unknown dtype name, a
shape that is not an array of at most 8 non-negative int64 integers, data_offsets that
are not two integers, negative, reversed, past the end of the data, or not the byte size
of dtype and shape, a byte size that overflows int64, two tensors whose (non-empty) data
ranges share a byte, and __metadata__ that is not null or an object of strings.
Accepted, as libkla does: gaps between data ranges, bytes after the last one, unaligned
offsets, unknown keys inside a tensor entry (any JSON value), "__metadata__": null.
Which tensor names and metadata keys a *problem* file may hold (kla-spec.md) is not
checked here: any well-formed file loads.

`load` returns (tensors, metadata) with tensors in header order; F16, BF16, F8_E4M3 and
F8_E5M2 tensors are widened to float32, BOOL read as numpy bool. A tensor with no
elements whose other dimensions are too large for numpy is returned with those
dimensions as 0 (it has no data either way).
`save` writes atomically (temporary file + os.replace) and pads the header with
spaces so that the data section starts on an 8-byte boundary; tensors are stored
largest element size first, so every tensor is naturally aligned in the file. It
refuses what `load` would refuse (an empty name, "__metadata__" as a name, NUL, more
than 8 dimensions).
"""

import json
import os
import re
import struct
import tempfile

import numpy as np

__all__ = ["load", "save", "SafetensorsError", "MAX_HEADER", "MAX_DEPTH", "MAX_DIMS"]

MAX_HEADER = 100 * 1024 * 1024  # bytes of JSON header (safetensors.c ST_MAX_HEADER)
MAX_DEPTH = 64                  # JSON nesting levels (ST_MAX_DEPTH)
MAX_DIMS = 8                    # ST_MAX_DIMS
_INT64_MAX = (1 << 63) - 1


class SafetensorsError(ValueError):
    """A file the reader refuses; the message starts with the path."""


# safetensors dtype name -> (little-endian numpy dtype of the stored bytes, element size)
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # decoded below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),     # decoded below
    "F8_E4M3": np.dtype("u1"),  # decoded below
    "F8_E5M2": np.dtype("u1"),  # decoded below
}

# numpy dtype -> safetensors dtype name (for save; BF16 and F8 have no numpy type)
_NAMES = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}


def _f8_table(ebits, mbits, bias, fn):
    """float32 value of each of the 256 codes of an 8-bit float (fn: no infinities, only
    the all-ones code is NaN, as float8_e4m3fn)."""
    out = np.zeros(256, np.float32)
    emax = (1 << ebits) - 1
    for c in range(256):
        s = -1.0 if c & 0x80 else 1.0
        e = (c >> mbits) & emax
        m = c & ((1 << mbits) - 1)
        if fn and e == emax and m == (1 << mbits) - 1:
            v = float("nan")
        elif not fn and e == emax:
            v = float("inf") if m == 0 else float("nan")
        elif e == 0:
            v = m / (1 << mbits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << mbits)) * 2.0 ** (e - bias)
        out[c] = s * v
    return out


_F8 = {"F8_E4M3": _f8_table(4, 3, 7, True), "F8_E5M2": _f8_table(5, 2, 15, False)}

# ------------------------------------------------------------------- the header parser
# A port of src/safetensors.c (jp, jstring, jnumber, jskip, parse_tensor, parse_meta,
# parse_top, st_parse): same acceptance, same messages where it matters.

_WS = re.compile(rb"[ \t\n\r]*")
_SCAN = re.compile(rb'(?:[^"\\]|\\[\s\S])*')   # a string body, escapes skipped
_PLAIN = re.compile(rb'[^\\\x00-\x1f]+')       # a run needing no decoding
_DIGITS = re.compile(rb"[0-9]*")
_HEX = b"0123456789abcdefABCDEF"
_ESC = {ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/", ord("b"): b"\b", ord("f"): b"\f",
        ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}


class _Fail(Exception):
    pass


def _show(name):
    """A name as safetensors.c quotes it in a message: quoted, escaped, ~64 bytes."""
    b = name.encode("utf-8", "surrogatepass")
    out, i = ['"'], 0
    while i < len(b):
        if i >= 64:
            out.append("...")
            break
        c = b[i]
        if c in (0x22, 0x5C):
            out.append("\\" + chr(c))
            i += 1
        elif c < 0x20 or c == 0x7F:
            out.append("\\x%02X" % c)
            i += 1
        else:
            k = 1 if c < 0x80 else 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            out.append(b[i:i + k].decode("utf-8", "replace"))
            i += k
    out.append('"')
    return "".join(out)


def _what(c):
    if c < 0:
        return "end of header"
    if c == 0x22:
        return "a string"
    if c == 0x7B:
        return "an object"
    if c == 0x5B:
        return "an array"
    if c == 0x2D or 0x30 <= c <= 0x39:
        return "a number"
    if c in (0x74, 0x66, 0x6E):
        return "a literal"
    return "an unexpected character"


def _isdig(c):
    return 0x30 <= c <= 0x39


class _Parser:
    def __init__(self, s, base, datalen):
        self.s, self.n, self.pos, self.base, self.datalen = s, len(s), 0, base, datalen

    def jfail(self, msg):
        raise _Fail("invalid header JSON at file offset %d: %s" % (self.base + self.pos, msg))

    @staticmethod
    def sfail(msg):
        raise _Fail(msg)

    def peek(self):
        self.pos = _WS.match(self.s, self.pos).end()
        return self.s[self.pos] if self.pos < self.n else -1

    def expect(self, want):
        c = self.peek()
        if c != ord(want):
            if c < 0:
                self.jfail("expected '%s', got end of header" % want)
            if 0x20 <= c < 0x7F:
                self.jfail("expected '%s', got '%s'" % (want, chr(c)))
            self.jfail("expected '%s', got byte 0x%02X" % (want, c))
        self.pos += 1

    def hex4(self, lim):
        v = 0
        for _ in range(4):
            if self.pos >= lim:
                self.jfail("truncated \\u escape")
            c = self.s[self.pos]
            if c not in _HEX:
                self.jfail("invalid \\u escape")
            v = v * 16 + int(chr(c), 16)
            self.pos += 1
        return v

    def string(self):
        c = self.peek()
        if c != 0x22:
            self.jfail("expected a string, got %s" % _what(c))
        s, opn = self.s, self.pos
        close = _SCAN.match(s, opn + 1).end()
        if close >= self.n or s[close] != 0x22:
            self.jfail("unterminated string")
        out = bytearray()
        self.pos = opn + 1
        while self.pos < close:
            m = _PLAIN.match(s, self.pos, close)
            if m:
                out += m.group()
                self.pos = m.end()
                continue
            c = s[self.pos]
            if c != 0x5C:
                self.jfail("NUL byte in string" if c == 0 else
                           "control character 0x%02X in string" % c)
            self.pos += 1
            if self.pos >= close:
                self.jfail("truncated escape")
            e = s[self.pos]
            self.pos += 1
            if e in _ESC:
                out += _ESC[e]
            elif e == 0x75:  # \uXXXX
                cp = self.hex4(close)
                if 0xD800 <= cp <= 0xDBFF:
                    if self.pos + 2 > close or s[self.pos] != 0x5C or s[self.pos + 1] != 0x75:
                        self.jfail("unpaired surrogate \\u%04X in string" % cp)
                    self.pos += 2
                    lo = self.hex4(close)
                    if not 0xDC00 <= lo <= 0xDFFF:
                        self.jfail("unpaired surrogate \\u%04X in string" % cp)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                elif 0xDC00 <= cp <= 0xDFFF:
                    self.jfail("unpaired surrogate \\u%04X in string" % cp)
                if cp == 0:
                    self.jfail("NUL character (\\u0000) in string")
                out += chr(cp).encode("utf-8")
            else:
                self.pos -= 1
                if 0x20 <= e < 0x7F:
                    self.jfail("invalid escape '\\%s' in string" % chr(e))
                self.jfail("invalid escape in string")
        self.pos = close + 1
        return out.decode("utf-8")  # the header was checked to be valid UTF-8

    def number(self):
        """(value or None when not an int64, integral, text)."""
        c0 = self.peek()
        if c0 != 0x2D and not _isdig(c0):
            self.jfail("expected a number, got %s" % _what(c0))
        s, st = self.s, self.pos
        neg = s[self.pos] == 0x2D
        if neg:
            self.pos += 1
        if self.pos >= self.n or not _isdig(s[self.pos]):
            self.jfail("invalid number")
        if s[self.pos] == 0x30:
            self.pos += 1
            if self.pos < self.n and _isdig(s[self.pos]):
                self.jfail("invalid number (leading zero)")
            digits = b"0"
        else:
            e = _DIGITS.match(s, self.pos).end()
            digits = s[self.pos:e]
            self.pos = e
        integral = True
        if self.pos < self.n and s[self.pos] == 0x2E:
            integral = False
            self.pos += 1
            if self.pos >= self.n or not _isdig(s[self.pos]):
                self.jfail("invalid number (no digit after '.')")
            self.pos = _DIGITS.match(s, self.pos).end()
        if self.pos < self.n and s[self.pos] in (0x65, 0x45):
            integral = False
            self.pos += 1
            if self.pos < self.n and s[self.pos] in (0x2B, 0x2D):
                self.pos += 1
            if self.pos >= self.n or not _isdig(s[self.pos]):
                self.jfail("invalid number (no digit in exponent)")
            self.pos = _DIGITS.match(s, self.pos).end()
        text = s[st:self.pos].decode("ascii")
        value = None
        if integral and len(digits) <= 20:
            acc = int(digits)
            if acc < (1 << 64):  # no uint64 overflow in the C accumulator
                if not neg and acc <= _INT64_MAX:
                    value = acc
                elif neg and acc <= _INT64_MAX + 1:
                    value = -acc
        return value, integral, text

    def literal(self):
        for lit in (b"true", b"false", b"null"):
            if self.s.startswith(lit, self.pos):
                self.pos += len(lit)
                return
        self.jfail("invalid literal")

    def skip(self, depth):
        """Any value; depth is the nesting level of the value itself."""
        c = self.peek()
        if c in (0x7B, 0x5B) and depth > MAX_DEPTH:
            self.jfail("nested too deeply (limit %d)" % MAX_DEPTH)
        if c == 0x7B:
            self.pos += 1
            if self.peek() == 0x7D:
                self.pos += 1
                return
            while True:
                self.string()
                self.expect(":")
                self.skip(depth + 1)
                c = self.peek()
                if c == 0x2C:
                    self.pos += 1
                    continue
                if c == 0x7D:
                    self.pos += 1
                    return
                self.jfail("expected ',' or '}' in object, got %s" % _what(c))
        if c == 0x5B:
            self.pos += 1
            if self.peek() == 0x5D:
                self.pos += 1
                return
            while True:
                self.skip(depth + 1)
                c = self.peek()
                if c == 0x2C:
                    self.pos += 1
                    continue
                if c == 0x5D:
                    self.pos += 1
                    return
                self.jfail("expected ',' or ']' in array, got %s" % _what(c))
        if c == 0x22:
            self.string()
            return
        if c == 0x2D or _isdig(c):
            self.number()
            return
        if c in (0x74, 0x66, 0x6E):
            self.literal()
            return
        if c < 0:
            self.jfail("expected a value, got end of header")
        if 0x20 <= c < 0x7F:
            self.jfail("unexpected character '%s'" % chr(c))
        self.jfail("unexpected byte 0x%02X" % c)

    def int_array(self, ctx, name, maxn, toomany):
        c = self.peek()
        if c != 0x5B:
            self.sfail("%s: %s must be an array of integers, got %s" % (ctx, name, _what(c)))
        self.pos += 1
        out = []
        if self.peek() == 0x5D:
            self.pos += 1
            return out
        while True:
            c = self.peek()
            if c != 0x2D and not _isdig(c):
                self.sfail("%s: %s must be an array of integers, got %s" % (ctx, name, _what(c)))
            value, integral, text = self.number()
            shown = text[:32] + ("..." if len(text) > 32 else "")
            if not integral:
                self.sfail("%s: %s: %s is not an integer" % (ctx, name, shown))
            if value is None:
                self.sfail("%s: %s: %s is out of range" % (ctx, name, shown))
            if len(out) >= maxn:
                self.sfail("%s: %s" % (ctx, toomany))
            out.append(value)
            c = self.peek()
            if c == 0x2C:
                self.pos += 1
                continue
            if c == 0x5D:
                self.pos += 1
                return out
            self.jfail("%s: expected ',' or ']' in %s, got %s" % (ctx, name, _what(c)))

    def tensor(self, name):
        """One tensor entry: (dtype name, shape tuple, begin, end, nbytes)."""
        ctx = "tensor " + _show(name)
        c = self.peek()
        if c != 0x7B:
            self.sfail("%s: expected an object, got %s" % (ctx, _what(c)))
        self.pos += 1
        dtype = shape = offsets = None
        keys = []
        if self.peek() == 0x7D:
            self.pos += 1
        else:
            while True:
                key = self.string()
                keys.append(key)
                self.expect(":")
                if key == "dtype":
                    c = self.peek()
                    if c != 0x22:
                        self.sfail("%s: dtype must be a string, got %s" % (ctx, _what(c)))
                    d = self.string()
                    if d not in _DTYPES:
                        self.sfail("%s: unknown dtype %s" % (ctx, _show(d)))
                    dtype = d
                elif key == "shape":
                    shape = self.int_array(ctx, "shape", MAX_DIMS,
                                           "shape has more than %d dims" % MAX_DIMS)
                elif key == "data_offsets":
                    msg = "data_offsets must be two integers [begin, end]"
                    offsets = self.int_array(ctx, "data_offsets", 2, msg)
                    if len(offsets) != 2:
                        self.sfail("%s: %s" % (ctx, msg))
                else:
                    self.skip(3)
                c = self.peek()
                if c == 0x2C:
                    self.pos += 1
                    continue
                if c == 0x7D:
                    self.pos += 1
                    break
                self.jfail("%s: expected ',' or '}', got %s" % (ctx, _what(c)))
        if len(set(keys)) != len(keys):
            dup = sorted(k for k in set(keys) if keys.count(k) > 1)[0]
            self.sfail("%s: duplicate key %s" % (ctx, _show(dup)))
        if dtype is None or shape is None or offsets is None:
            self.sfail('%s: missing "%s"' % (ctx, "dtype" if dtype is None else
                                             "shape" if shape is None else "data_offsets"))
        ss = "[" + ", ".join(str(d) for d in shape) + "]"
        for d in shape:
            if d < 0:
                self.sfail("%s: negative dim %d in shape %s" % (ctx, d, ss))
        numel = 0 if 0 in shape else 1
        if numel:
            for d in shape:
                if numel > _INT64_MAX // d:
                    self.sfail("%s: shape %s is too large (element count overflows)" % (ctx, ss))
                numel *= d
        es = _DTYPES[dtype].itemsize
        if numel > _INT64_MAX // es:
            self.sfail("%s: shape %s %s is too large (byte size overflows)" % (ctx, ss, dtype))
        nbytes = numel * es
        b, e = offsets
        if b < 0 or e < 0:
            self.sfail("%s: negative data_offsets [%d, %d]" % (ctx, b, e))
        if b > e:
            self.sfail("%s: data_offsets [%d, %d]: begin is after end" % (ctx, b, e))
        if e > self.datalen:
            self.sfail("%s: data_offsets [%d, %d] run past the end of the data (%d bytes)"
                       % (ctx, b, e, self.datalen))
        if e - b != nbytes:
            self.sfail("%s: data_offsets [%d, %d] do not match shape %s %s (%d bytes)"
                       % (ctx, b, e, ss, dtype, nbytes))
        return dtype, tuple(shape), b, e, numel

    def meta(self):
        c = self.peek()
        if c == 0x6E and self.s.startswith(b"null", self.pos):
            self.pos += 4  # "__metadata__": null, as no metadata
            return []
        if c != 0x7B:
            self.sfail("__metadata__ must be an object of strings, got %s" % _what(c))
        self.pos += 1
        out = []
        if self.peek() == 0x7D:
            self.pos += 1
            return out
        while True:
            key = self.string()
            self.expect(":")
            c = self.peek()
            if c != 0x22:
                self.sfail("__metadata__: value of %s is not a string (got %s)"
                           % (_show(key), _what(c)))
            out.append((key, self.string()))
            c = self.peek()
            if c == 0x2C:
                self.pos += 1
                continue
            if c == 0x7D:
                self.pos += 1
                break
            self.jfail("__metadata__: expected ',' or '}', got %s" % _what(c))
        keys = [k for k, _ in out]
        if len(set(keys)) != len(keys):
            dup = sorted(k for k in set(keys) if keys.count(k) > 1)[0]
            self.sfail("__metadata__: duplicate key %s" % _show(dup))
        return out

    def top(self):
        """[(name, entry)], [(key, value)] or None"""
        c = self.peek()
        if c != 0x7B:
            self.sfail("the header must be a JSON object, got %s" % _what(c))
        self.pos += 1
        tensors, meta = [], None
        if self.peek() == 0x7D:
            self.pos += 1
        else:
            while True:
                key = self.string()
                self.expect(":")
                if key == "__metadata__":
                    if meta is not None:
                        self.sfail('duplicate key "__metadata__"')
                    meta = self.meta()
                else:
                    tensors.append((key, self.tensor(key)))
                c = self.peek()
                if c == 0x2C:
                    self.pos += 1
                    continue
                if c == 0x7D:
                    self.pos += 1
                    break
                self.jfail("expected ',' or '}' after a tensor entry, got %s" % _what(c))
        if self.peek() >= 0:
            self.jfail("trailing garbage after the header object")
        return tensors, meta or []


def parse(buf):
    """The checks of st_parse on a whole file image (bytes): returns (header, n) where
    header is [(name, (dtype, shape, begin, end, numel))] in header order plus the
    metadata pairs; raises SafetensorsError (without a path) when refused."""
    try:
        return _parse(buf)
    except _Fail as ex:
        raise SafetensorsError(str(ex)) from None


def _parse(buf):
    L = len(buf)
    if L < 8:
        raise _Fail("truncated file: %d bytes, shorter than the 8-byte header length" % L)
    (n,) = struct.unpack("<Q", buf[:8])
    if n > MAX_HEADER:
        raise _Fail("header length %d exceeds the limit of %d bytes" % (n, MAX_HEADER))
    if n > L - 8:
        raise _Fail("truncated file: header says %d bytes, file has %d after the length"
                    % (n, L - 8))
    hs = bytes(buf[8:8 + n])
    try:
        hs.decode("utf-8")  # strict: overlong forms, surrogates, > U+10FFFF refused
    except UnicodeDecodeError as ex:
        raise _Fail("header is not valid UTF-8 (byte 0x%02X at file offset %d)"
                    % (hs[ex.start], ex.start + 8)) from None
    p = _Parser(hs, 8, L - 8 - n)
    tensors, meta = p.top()
    names = [t[0] for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted(x for x in set(names) if names.count(x) > 1)[0]
        raise _Fail("duplicate tensor name %s" % _show(dup))
    order = sorted(range(len(tensors)), key=lambda i: (tensors[i][1][2], tensors[i][1][3], i))
    last = None
    for i in order:
        name, (_, _, b, e, _) = tensors[i]
        if b == e:
            continue
        if last is not None and b < last[2]:
            raise _Fail("tensors %s [%d, %d] and %s [%d, %d] overlap"
                        % (_show(last[0]), last[1], last[2], _show(name), b, e))
        last = (name, b, e)
    return (tensors, meta), n


def _array(buf, start, dtype, shape, numel):
    npdt = _DTYPES[dtype]
    a = np.frombuffer(buf, dtype=npdt, count=numel, offset=start)
    if dtype == "BF16":  # bfloat16 = upper 16 bits of a float32
        a = (a.astype(np.uint32) << 16).view(np.float32)
    elif dtype == "F16":
        a = a.astype(np.float32)
    elif dtype in _F8:
        a = _F8[dtype][a]
    elif dtype == "BOOL":
        a = a != 0
    # native byte order, writable, independent of the file buffer
    a = np.array(a, dtype=a.dtype.newbyteorder("="))
    try:
        return a.reshape(shape)
    except ValueError:  # no elements, but dimensions numpy cannot represent
        return a.reshape(tuple(0 if d > 1 << 31 else d for d in shape))


def load(path):
    """Read a safetensors file. Returns (dict name -> np.ndarray in header order, dict
    metadata). Raises SafetensorsError (a ValueError) for every file libkla refuses."""
    with open(path, "rb") as f:
        buf = f.read()
    try:
        (tensors, meta), n = _parse(buf)
    except _Fail as ex:
        raise SafetensorsError("%s: %s" % (os.fspath(path), ex)) from None
    out = {}
    for name, (dtype, shape, b, _, numel) in tensors:
        out[name] = _array(buf, 8 + n + b, dtype, shape, numel)
    return out, dict(meta)


def _meta_str(v):
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # shortest round-trip decimal
    return str(v)


def _check_name(what, s):
    if not s:
        raise ValueError("%s: empty" % what)
    if "\0" in s:
        raise ValueError("%s %r: contains NUL" % (what, s))
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("%s %r: not valid UTF-8 (a lone surrogate)" % (what, s)) from None


def save(path, tensors, metadata=None):
    """Write `tensors` (name -> array-like) and string `metadata` to `path` atomically."""
    arrays = {}
    for name, t in tensors.items():
        _check_name("tensor name", name)
        if name == "__metadata__":
            raise ValueError('"__metadata__" is not a valid tensor name')
        a = np.asarray(t)
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {a.dtype}")
        if a.ndim > MAX_DIMS:
            raise ValueError(f"tensor {name!r}: {a.ndim} dimensions, at most {MAX_DIMS}")
        arrays[name] = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    meta = {}
    for k, v in (metadata or {}).items():
        k, v = str(k), _meta_str(v)
        _check_name("metadata key", k)
        if "\0" in v:
            raise ValueError("metadata %r: value contains NUL" % k)
        meta[k] = v
    # largest element first: every tensor then starts at a multiple of its element size
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header, offset = {}, 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _NAMES[a.dtype.newbyteorder("=")],
                        "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if meta:
        header["__metadata__"] = meta
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-(8 + len(hb)) % 8)  # data section starts 8-aligned
    if len(hb) > MAX_HEADER:
        raise ValueError("header of %d bytes exceeds the limit of %d" % (len(hb), MAX_HEADER))

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    try:
        umask = os.umask(0)  # mkstemp makes 0600; give the usual 0666 & ~umask
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for name in order:
                f.write(arrays[name].tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
