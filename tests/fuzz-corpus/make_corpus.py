#!/usr/bin/env python3
"""Writes the seed corpus of tests/fuzz_safetensors.c into this folder.

Deterministic, standard library only. Valid files follow kla-spec.md section 4 (tensors
q k v g eta|beta, h0, cu_seqlens, __metadata__ {"mode": ...}); the others are malformed
in one way each. Run: python3 tests/fuzz-corpus/make_corpus.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "U8": 1, "BF16": 2}
PACK = {"F64": "d", "F32": "f", "I64": "q", "I32": "i"}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_bytes(dtype, shape, seed):
    n = numel(shape)
    if dtype in ("F32", "F64"):
        vals = [((i * 37 + seed * 11) % 17 - 8) / 8.0 for i in range(n)]
    else:
        vals = [(i * 5 + seed) % 13 for i in range(n)]
    return struct.pack("<%d%s" % (n, PACK[dtype]), *vals) if n else b""


def build(tensors, meta=None, align=True):
    """tensors: list of (name, dtype, shape). Returns the file bytes."""
    header, data = {}, b""
    if meta is not None:
        header["__metadata__"] = meta
    for seed, (name, dtype, shape) in enumerate(tensors):
        raw = tensor_bytes(dtype, shape, seed)
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return frame(json.dumps(header, separators=(",", ":")).encode(), data, align)


def frame(hdr, data, align=True):
    if align:
        hdr += b" " * ((-(8 + len(hdr))) % 8)
    return struct.pack("<Q", len(hdr)) + hdr + data


def kla_inputs(mode, dt="F32", B=1, T=3, H=1, HV=1, K=2, V=2, extra=()):
    ts = [("q", dt, [B, T, H, K]), ("k", dt, [B, T, H, K]), ("v", dt, [B, T, HV, V]),
          ("g", dt, [B, T, HV]), ("eta" if mode == "kla" else "beta", dt, [B, T, HV])]
    return ts + list(extra)


def main():
    files = {}
    files["valid_kla_f32.safetensors"] = build(kla_inputs("kla"), {"mode": "kla"})
    files["valid_gdn_f32.safetensors"] = build(
        kla_inputs("gdn"), {"mode": "gdn", "scale": "0.5", "l2norm_q": "true"})
    files["valid_kla_h0_cu_i32.safetensors"] = build(
        kla_inputs("kla", T=4, extra=[("h0", "F32", [2, 1, 2, 2]), ("cu_seqlens", "I32", [3])]),
        {"mode": "kla", "eps": "1e-6", "state_layout": "kv"})
    files["valid_cu_i64.safetensors"] = build(
        kla_inputs("kla", T=2, extra=[("cu_seqlens", "I64", [2])]), {"mode": "kla"})
    files["valid_outputs_f64.safetensors"] = build(
        [("o", "F64", [1, 2, 1, 2]), ("ht", "F64", [1, 1, 2, 2]), ("dq", "F64", [1, 2, 1, 2]),
         ("deta", "F64", [1, 2, 1])], {"mode": "kla"})
    files["valid_scalar_empty.safetensors"] = build(
        [("s", "F64", []), ("z", "F32", [0, 4]), ("i", "I32", [1])])
    files["valid_no_metadata.safetensors"] = build([("q", "F32", [2, 2])])
    files["valid_unaligned.safetensors"] = build(
        [("a", "I32", [3]), ("b", "F64", [1])], {"mode": "kla"}, align=False)

    good = build([("q", "F32", [2, 3])], {"mode": "kla"})
    files["bad_truncated.safetensors"] = good[:-5]
    files["bad_header_len.safetensors"] = struct.pack("<Q", 5000) + good[8:]
    hdr = b'{"q":{"dtype":"F32","shape":[2,3],"data_offsets":[0,100]}}'
    files["bad_offsets_mismatch.safetensors"] = frame(hdr, bytes(100))
    hdr = (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
           b'"b":{"dtype":"F32","shape":[4],"data_offsets":[12,28]}}')
    files["bad_overlap.safetensors"] = frame(hdr, bytes(28))
    hdr = b'{"q":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}'
    files["bad_dtype.safetensors"] = frame(hdr, bytes(4))
    hdr = b'{"q":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}'
    files["bad_huge_shape.safetensors"] = frame(hdr, bytes(4))
    hdr = b'{"q":{"x":' + b"[" * 100 + b'],"dtype":"U8"}}'
    files["bad_deep.safetensors"] = frame(hdr, b"")
    hdr = (b'{"__metadata__":{"mode":"kla","mode":"gdn"},'
           b'"\\ud83d\\ude00\\u00e9":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}')
    files["bad_dup_meta_key.safetensors"] = frame(hdr, b"\x01")
    hdr = b'{"q\xff":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    files["bad_utf8.safetensors"] = frame(hdr, b"\x01")
    hdr = b'{"__metadata__":{"scale":0.5},"q":{"dtype":"I64","shape":[2.5],"data_offsets":[0,8]}}x'
    files["bad_numbers_trailing.safetensors"] = frame(hdr, bytes(8))

    for name in sorted(files):
        data = files[name]
        assert len(data) < 4096, name
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
