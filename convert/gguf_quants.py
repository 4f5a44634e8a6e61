"""Vectorised NumPy dequantization of GGUF tensor data (the ggml block formats).

Each quantized type stores a row as consecutive blocks of `block_size` values packed into
`type_size` bytes (`gguf.GGML_QUANT_SIZES`); fp16 fields are little-endian IEEE half.
The maths follows ggml-quants.c (dequantize_row_*) operation for operation, in float32, so
the results are bit-identical to ggml's reference and the gguf package's numpy code.
Blocks are processed in cache-sized chunks; within a chunk everything is array ops.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from minikv.errors import MinikvError

_CHUNK_ELEMS = 1 << 18  # output values per chunk (1 MiB): temporaries stay in cache
_LOHI = np.array([0, 4], dtype=np.uint8)  # shifts selecting the low / high nibble
_F16 = np.dtype("<f2")


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte offset `at` of every block, as float32 of shape (n, 1)."""
    return b[:, at:at + 2].view(_F16).astype(np.float32)


def _nibbles(qs: np.ndarray, n_groups: int) -> np.ndarray:
    """(n, n_groups*L) bytes -> (n, n_groups, 2, L): [.., 0, :] low nibbles, [.., 1, :] high."""
    n = qs.shape[0]
    return (qs.reshape(n, n_groups, 1, -1) >> _LOHI[:, None]) & np.uint8(0x0F)


def _bits(qh: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8k) bits, bit i of the little-endian integer at position i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


# Q8_0: 34 bytes = fp16 d | int8 q[32];  x[i] = q[i] * d
def _q8_0(b, out):
    np.multiply(b[:, 2:].view(np.int8), _f16(b, 0), out=out)


# Q4_0: 18 bytes = fp16 d | qs[16];  x[j] = (lo(qs[j]) - 8) * d, x[j+16] = (hi(qs[j]) - 8) * d
def _q4_0(b, out):
    q = _nibbles(b[:, 2:], 1).reshape(len(b), 32).view(np.int8) - np.int8(8)
    np.multiply(q, _f16(b, 0), out=out)


# Q4_1: 20 bytes = fp16 d | fp16 m | qs[16];  x = q * d + m, nibble order as Q4_0
def _q4_1(b, out):
    q = _nibbles(b[:, 4:], 1).reshape(len(b), 32)
    np.multiply(q, _f16(b, 0), out=out)
    out += _f16(b, 2)


# Q5_0: 22 bytes = fp16 d | u32 qh | qs[16];  5-bit q[i] = nibble as Q4_0 | bit i of qh << 4;
# x = (q - 16) * d
def _q5(b, at):
    return _nibbles(b[:, at + 4:], 1).reshape(len(b), 32) | (_bits(b[:, at:at + 4]) << np.uint8(4))


def _q5_0(b, out):
    np.multiply(_q5(b, 2).view(np.int8) - np.int8(16), _f16(b, 0), out=out)


# Q5_1: 24 bytes = fp16 d | fp16 m | u32 qh | qs[16];  x = q * d + m, q as Q5_0
def _q5_1(b, out):
    np.multiply(_q5(b, 4), _f16(b, 0), out=out)
    out += _f16(b, 2)


def _k_scales(b: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12 scale bytes at offset 4 -> per-sub-block (d*sc, dmin*m), each (n, 8).
    For j < 4: sc = s[j] & 63, m = s[j+4] & 63; for j >= 4 (k = j - 4):
    sc = (s[j+4] & 15) | (s[k] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4."""
    s = b[:, 4:16]
    lo, mi, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mi & 63, (hi >> 4) | ((mi >> 6) << 4)], axis=1)
    return d * sc.astype(np.float32), dmin * m.astype(np.float32)


# Q4_K: 144 bytes = fp16 d | fp16 dmin | scales[12] | qs[128]; 8 sub-blocks of 32 with 6-bit
# (sc, m) each (see _k_scales). Sub-block 2i = low nibbles of qs[32i:32i+32], 2i+1 = high.
# x = (d * sc) * q - (dmin * m)
def _q4_k(b, out):
    n = len(b)
    dl, ml = _k_scales(b, _f16(b, 0), _f16(b, 2))
    o = out.reshape(n, 8, 32)
    np.multiply(_nibbles(b[:, 16:], 4).reshape(n, 8, 32), dl[:, :, None], out=o)
    o -= ml[:, :, None]


# Q5_K: 176 bytes = fp16 d | fp16 dmin | scales[12] | qh[32] | qs[128]; as Q4_K, plus the 5th
# bit of value l of sub-block s is bit s of qh[l].
def _q5_k(b, out):
    n = len(b)
    dl, ml = _k_scales(b, _f16(b, 0), _f16(b, 2))
    hi = _bits(b[:, 16:48]).reshape(n, 32, 8).transpose(0, 2, 1)  # (n, sub-block, l)
    q = _nibbles(b[:, 48:], 4).reshape(n, 8, 32) | (hi << np.uint8(4))
    o = out.reshape(n, 8, 32)
    np.multiply(q, dl[:, :, None], out=o)
    o -= ml[:, :, None]


# Q6_K: 210 bytes = ql[128] | qh[64] | int8 scales[16] | fp16 d; two halves of 128 values.
# Value 128h + 32k + l: low 4 bits = nibble (k >= 2: high) of ql[64h + 32(k%2) + l],
# top 2 bits = bits 2k..2k+1 of qh[32h + l]; x = (d * scales[idx // 16]) * (q - 32)
_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)


def _q6_k(b, out):
    n = len(b)
    lo = _nibbles(b[:, :128], 2).reshape(n, 2, 4, 32)
    hi = (b[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFT2[:, None]) & np.uint8(3)
    q = (lo | (hi << np.uint8(4))).view(np.int8)
    q -= np.int8(32)
    dl = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
    np.multiply(q.reshape(n, 16, 16), dl[:, :, None], out=out.reshape(n, 16, 16))


_KERNELS = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
}
SUPPORTED: frozenset[T] = frozenset({T.F32, T.F16, T.BF16, *_KERNELS})


def _type_name(qtype) -> str:
    try:
        return T(int(qtype)).name
    except (ValueError, TypeError):
        return f"unknown ggml type {qtype!r}"


def dequantize(data: np.ndarray, qtype: int | T, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes as stored in the GGUF file (uint8 array, or any array viewable as bytes)
    -> float32 array of the given logical shape (numpy order: rows x row_length, last axis
    contiguous). Raises MinikvError for an unsupported type or a byte count that does not
    match the shape (corrupt file)."""
    try:
        qt = T(int(qtype))
    except (ValueError, TypeError):
        qt = None
    if qt not in SUPPORTED:
        raise MinikvError(f"unsupported GGUF tensor type {_type_name(qtype)}; minikv reads "
                          f"{', '.join(sorted(t.name for t in SUPPORTED))} (re-quantize the model)")
    shape = tuple(int(s) for s in shape)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n = int(np.prod(shape, dtype=np.int64))
    block_size, type_size = GGML_QUANT_SIZES[qt]
    if (shape[-1] if shape else 1) % block_size or raw.size != n // block_size * type_size:
        raise MinikvError(f"corrupt GGUF tensor: {qt.name} data of shape {shape} should be "
                          f"{n // block_size * type_size} bytes (row length a multiple of "
                          f"{block_size}), got {raw.size}")
    if qt == T.F32:
        return raw.view("<f4").astype(np.float32).reshape(shape)
    if qt == T.F16:
        return raw.view(_F16).astype(np.float32).reshape(shape)
    if qt == T.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    kernel, nb = _KERNELS[qt], n // block_size
    blocks = raw.reshape(nb, type_size)
    out = np.empty((nb, block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMS // block_size)
    for i in range(0, nb, step):  # chunks of many blocks, not a per-block loop
        kernel(blocks[i:i + step], out[i:i + step])
    return out.reshape(shape)
