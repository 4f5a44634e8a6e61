"""Read and write safetensors files with NumPy alone (bfloat16 included).

The `safetensors` package cannot hand bfloat16 to NumPy, so minikv parses the format
itself: 8-byte little-endian header length, a JSON header, then raw little-endian data.
Reading memory-maps the file and returns views, so a tensor is only paged in when used.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import MinikvError

# safetensors dtype -> NumPy dtype of the stored bits (BF16 kept as raw uint16).
_STORED = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One memory-mapped .safetensors file: names, shapes, dtypes and raw tensor views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._corrupt("shorter than a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise self._corrupt(f"header length {n} does not fit in the file of {size} bytes")
                header = json.loads(f.read(n).decode("utf-8"))
        except OSError as e:
            raise MinikvError(f"{self.path}: cannot read ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._corrupt("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dt, shape, (lo, hi) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"bad header entry for {name!r}") from None
            if dt not in _STORED:
                raise MinikvError(f"{self.path}: tensor {name!r} has dtype {dt}, which minikv cannot read")
            want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_STORED[dt]).itemsize
            if hi - lo != want or lo < 0:
                raise self._corrupt(f"tensor {name!r} has {hi - lo} bytes, expected {want}")
            if hi > data_size:
                raise self._corrupt(f"tensor {name!r} ends at byte {hi} but the data is {data_size} bytes "
                                    "(truncated download?)")
            self.entries[name] = (dt, shape, lo, hi)
        self._mm = None

    def _corrupt(self, why: str) -> MinikvError:
        return MinikvError(f"{self.path}: corrupt or truncated safetensors file ({why}); "
                           "re-download or re-convert it")

    def keys(self):
        return self.entries.keys()

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def raw(self, name: str) -> np.ndarray:
        """The stored bits as a read-only NumPy view (uint16 for BF16)."""
        dt, shape, lo, hi = self.entries[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mm[self._data_start + lo:self._data_start + hi]
        return buf.view(_STORED[dt]).reshape(shape)

    def float32(self, name: str) -> np.ndarray:
        """A host float32 copy of one tensor."""
        return to_float32(self.raw(name), self.dtype(name))


def bf16_bits_to_float32(xp, bits):
    """bfloat16 bits (uint16) -> float32: the bf16 pattern is the top half of the float32."""
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def float32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (as torch does); NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


def to_float32(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return bf16_bits_to_float32(np, raw)
    return raw.astype(np.float32)


class SafetensorsWriter:
    """Streams tensors into one file: the header (all names, dtypes, shapes) first, then each
    tensor's bytes in that order as `write` is called, so only one tensor is in memory."""

    def __init__(self, path: str | Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata=None):
        header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
        offset = 0
        self._order = []
        for name, dt, shape in entries:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(_STORED[dt]).itemsize
            header[name] = {"dtype": dt, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
            self._order.append((name, dt, tuple(int(s) for s in shape)))
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as the reference writer does
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        """The next tensor, as an array of its stored bits (uint16 for BF16)."""
        want, dt, shape = self._order[self._next]
        if name != want or arr.dtype != np.dtype(_STORED[dt]) or tuple(arr.shape) != shape:
            raise ValueError(f"expected {want} {dt} {shape}, got {name} {arr.dtype} {arr.shape}")
        self._f.write(np.ascontiguousarray(arr).data)  # little-endian hosts only (x86, arm)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} tensors were never written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def save_file(path: str | Path, tensors: dict[str, tuple[np.ndarray, str]], metadata: dict | None = None):
    """Write tensors {name: (array of stored bits, safetensors dtype)} with string metadata."""
    w = SafetensorsWriter(path, [(n, dt, a.shape) for n, (a, dt) in tensors.items()], metadata)
    for name, (arr, _) in tensors.items():
        w.write(name, arr)
    w.close()
