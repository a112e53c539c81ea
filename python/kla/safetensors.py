"""Minimal safetensors reader/writer (numpy + stdlib only).

File layout (https://github.com/huggingface/safetensors):
    8 bytes   little-endian uint64 N, the length of the JSON header
    N bytes   JSON object: {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
              "__metadata__": {str: str}}; offsets are relative to the data section
    rest      raw little-endian tensor data, row-major

`load` returns (tensors, metadata); F16 and BF16 tensors are widened to float32.
`save` writes atomically (temporary file + os.replace) and pads the header with
spaces so that the data section starts on an 8-byte boundary; tensors are stored
largest element size first, so every tensor is naturally aligned in the file.
"""

import json
import os
import struct
import tempfile

import numpy as np

__all__ = ["load", "save"]

# safetensors dtype name -> little-endian numpy dtype
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # decoded by hand below
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# numpy dtype -> safetensors dtype name (for save; BF16 has no numpy type)
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


def load(path):
    """Read a safetensors file. Returns (dict name -> np.ndarray, dict metadata)."""
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8:
        raise ValueError(f"{path}: file too short for a safetensors header")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8:
        raise ValueError(f"{path}: header length {n} exceeds file size")
    header = json.loads(buf[8:8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    data = memoryview(buf)[8 + n:]
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        dt = info["dtype"]
        if dt not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r}: unsupported dtype {dt}")
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        npdt = _DTYPES[dt]
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= begin <= end <= len(data)) or end - begin != count * npdt.itemsize:
            raise ValueError(f"{path}: tensor {name!r}: bad data_offsets {begin}..{end}")
        a = np.frombuffer(data[begin:end], dtype=npdt, count=count).reshape(shape)
        if dt == "BF16":  # bfloat16 = upper 16 bits of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            a = a.astype(np.float32)
        # native byte order, writable, independent of the file buffer
        tensors[name] = np.array(a, dtype=a.dtype.newbyteorder("="))
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _meta_str(v):
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # shortest round-trip decimal
    return str(v)


def save(path, tensors, metadata=None):
    """Write `tensors` (name -> array-like) and string `metadata` to `path` atomically."""
    arrays = {}
    for name, t in tensors.items():
        a = np.asarray(t)
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {a.dtype}")
        arrays[name] = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    # largest element first: every tensor then starts at a multiple of its element size
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header, offset = {}, 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _NAMES[a.dtype.newbyteorder("=")],
                        "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): _meta_str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-(8 + len(hb)) % 8)  # data section starts 8-aligned

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
