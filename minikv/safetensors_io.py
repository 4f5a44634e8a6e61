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
_MAX_HEADER = 100 * 1024 * 1024  # the reference library's limit
_MAX_DIMS = 32  # NumPy 1's limit (2 allows 64); model tensors have at most 4


def _is_size(x) -> bool:
    """A JSON non-negative integer (the reference's usize): not a float, bool or string."""
    return type(x) is int and x >= 0


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """prod(shape) * itemsize, or None if NumPy could not hold it: the product of the nonzero
    dims (NumPy bounds an empty array's shape too) must stay below 2**63, which also stops the
    reference's u64 overflow. Checked dim by dim, so 10**5 huge dims cost nothing."""
    n = bound = itemsize
    for d in shape:
        n *= d
        bound *= max(d, 1)
        if bound >= 2**63:
            return None
    return n


class SafetensorsFile:
    """One memory-mapped .safetensors file: names, shapes, dtypes and raw tensor views.

    The header is checked as the reference `safetensors` library checks it, so a file it
    rejects is rejected here too, and nothing it declares is allocated before that."""

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
        except (ValueError, RecursionError):  # bad UTF-8 or JSON, a 5000-digit number, [[[[...]]]]
            raise self._corrupt("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if not (meta is None or isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise self._corrupt("__metadata__ is not a map of strings")
        self.metadata: dict[str, str] = meta or {}
        self._data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            name: self._entry(name, e) for name, e in header.items()}
        self._check_layout(size - self._data_start)
        self._mm = None

    def _entry(self, name: str, e) -> tuple[str, tuple[int, ...], int, int]:
        """One header entry, checked on its own: (dtype, shape, begin, end)."""
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
            raise self._corrupt(f"bad header entry for {name!r}")
        dt, shape, offsets = e["dtype"], e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(map(_is_size, shape)) and isinstance(offsets, list)
                and len(offsets) == 2 and all(map(_is_size, offsets))):
            raise self._corrupt(f"bad shape or data_offsets for {name!r}")
        if dt not in _STORED:
            raise MinikvError(f"{self.path}: tensor {name!r} has dtype {dt:.20}, which minikv cannot read")
        if len(shape) > _MAX_DIMS:
            raise MinikvError(f"{self.path}: tensor {name!r} has {len(shape)} dimensions, which minikv cannot read")
        want = _nbytes(shape, np.dtype(_STORED[dt]).itemsize)
        if want is None:
            raise self._corrupt(f"tensor {name!r} has an impossibly large shape")
        lo, hi = offsets
        if hi < lo:
            raise self._corrupt(f"tensor {name!r} has data_offsets {offsets} that end before they begin")
        if hi - lo != want:
            raise self._corrupt(f"tensor {name!r} has {hi - lo} bytes, expected {want}")
        return dt, tuple(shape), lo, hi

    def _check_layout(self, data_size: int) -> None:
        """In offset order the tensors tile the data exactly: no overlap, no gap, no spare bytes."""
        end = 0
        for name, (_, _, lo, hi) in sorted(self.entries.items(), key=lambda kv: kv[1][2:]):
            if lo != end:
                what = "overlaps the one before it" if lo < end else f"leaves a gap of {lo - end} bytes before it"
                raise self._corrupt(f"tensor {name!r} {what}")
            end = hi
        if end > data_size:
            raise self._corrupt(f"tensors end at byte {end} but the data is {data_size} bytes (truncated download?)")
        if end < data_size:
            raise self._corrupt(f"{data_size - end} bytes after the last tensor belong to no tensor")

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
