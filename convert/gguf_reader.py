"""A small, bounded reader of GGUF files (llama.cpp's weight format), versions 2 and 3, little-endian:

    f = GGUFFile(path)
    f.fields         # metadata key -> str, int, float, bool or a list of them
    f.tensors[name]  # GGUFTensor: .shape (NumPy order), .tensor_type, .data (its bytes, uint8)

The layout (every integer little-endian; a string is a u64 byte length and UTF-8 bytes):

    b"GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x     key: string | u32 value type | value    (an array: u32 item type | u64 count | items)
    tensor_count x name: string | u32 n_dims | n_dims x u64 dims | u32 ggml type | u64 offset
    padding to general.alignment (default 32) | tensor data, each at its offset from here

Every length and count is checked against the bytes left in the file before anything is allocated
or looped over, so a corrupt file fails at once with one MinikvError whatever it claims. What a
valid file is follows `gguf.GGUFReader` (the gguf package's reader); of that package only the
constants are used, and nothing here builds a NumPy view per item, so a 49K-token vocabulary
reads in a fraction of a second.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from minikv.errors import MinikvError

# value type -> little-endian struct format (also a NumPy dtype); plain ints: looked up per item
_SCALARS = {int(t): struct.Struct(f) for t, f in [
    (GGUFValueType.UINT8, "<B"), (GGUFValueType.INT8, "<b"), (GGUFValueType.UINT16, "<H"),
    (GGUFValueType.INT16, "<h"), (GGUFValueType.UINT32, "<I"), (GGUFValueType.INT32, "<i"),
    (GGUFValueType.FLOAT32, "<f"), (GGUFValueType.BOOL, "<?"), (GGUFValueType.UINT64, "<Q"),
    (GGUFValueType.INT64, "<q"), (GGUFValueType.FLOAT64, "<d")]}
_STRING, _ARRAY, _UINT32 = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY), int(GGUFValueType.UINT32)
_U32, _U64 = _SCALARS[_UINT32], _SCALARS[int(GGUFValueType.UINT64)]
_MAGIC = struct.Struct("<4s")
# The fewest bytes an item of each type takes: a string its length, an array its type and count.
_LEAST = {**{t: s.size for t, s in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
_KV_LEAST, _TENSOR_LEAST = 8 + 4 + 1, 8 + 4 + 4 + 8  # a metadata entry, a tensor info with no dims
_MAX_NESTING = 4  # arrays of arrays: llama.cpp writes and reads none, gguf-py a few levels
_MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp loads no tensor with more
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor. `shape` is in NumPy order (rows first, row length last: the file's ggml dims
    reversed), as `gguf_quants.dequantize` takes it; `data` is a read-only uint8 view of its bytes
    in the memory-mapped file, so nothing is read until it is used."""
    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data: np.ndarray


class GGUFFile:
    """The metadata (`fields`, in file order) and tensors (`tensors`: name -> GGUFTensor, in file
    order) of a GGUF file. Raises MinikvError for a file it cannot read, corrupt or unsupported."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map = self._open()
        self._buf, self._pos = memoryview(self._map), 0
        n_tensors, n_kv = self._header()
        self.fields = self._fields(n_kv)
        infos = [self._tensor_info() for _ in range(self._count(n_tensors, _TENSOR_LEAST, "tensor infos"))]
        self.tensors = self._tensors(infos, self._data_start())

    def corrupt(self, detail: str) -> MinikvError:
        """The error for a file that breaks the format (the one message style for all of them)."""
        return MinikvError(f"{self.path}: corrupt or truncated GGUF file ({detail}); re-download it")

    def _open(self) -> np.memmap:
        try:
            if self.path.stat().st_size == 0:  # np.memmap cannot map an empty file
                raise self.corrupt("it is empty")
            return np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as e:
            raise MinikvError(f"{self.path}: cannot read ({e.strerror})") from None

    # -- bounded primitives: every read goes through _take -------------------------------------
    def _take(self, n: int, what: str) -> int:
        """Step over the next n bytes (`what`, for the error); returns where they start."""
        pos, left = self._pos, len(self._buf) - self._pos
        if n > left:
            raise self.corrupt(f"{what} at byte {pos} needs {n} bytes, the file has {left} left")
        self._pos = pos + n
        return pos

    def _count(self, count: int, least: int, what: str) -> int:
        """A count of items taking `least` bytes or more each, once the rest of the file can hold them."""
        left = len(self._buf) - self._pos
        if count * least > left:
            raise self.corrupt(f"{count} {what} at byte {self._pos} need {count * least} bytes or more, "
                               f"the file has {left} left")
        return count

    def _scalar(self, fmt: struct.Struct, what: str):
        return fmt.unpack_from(self._buf, self._take(fmt.size, what))[0]

    def _bytes(self, what: str) -> memoryview:
        n = self._scalar(_U64, f"the length of {what}")
        return self._buf[self._take(n, what):self._pos]

    def _name(self, what: str) -> str:
        """A key or tensor name: unlike a value, not UTF-8 means corrupt."""
        at = self._pos
        try:
            return str(self._bytes(what), "utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} at byte {at} is not UTF-8") from None

    # -- sections -----------------------------------------------------------------------------
    def _header(self) -> tuple[int, int]:
        """(tensor count, metadata count), once the file is known to be a GGUF minikv reads."""
        if self._scalar(_MAGIC, "the magic") != b"GGUF":
            raise self.corrupt("no GGUF magic at byte 0")
        version = self._scalar(_U32, "the version")
        if version and not version & 0xFFFF:  # as GGUFReader: a small version, byte-swapped
            raise MinikvError(f"{self.path}: a big-endian GGUF file; minikv reads little-endian ones only")
        if version == 1:
            raise MinikvError(f"{self.path}: GGUF version 1 (an old llama.cpp) is not supported; minikv reads "
                              "versions 2 and 3, convert the model again with a current llama.cpp")
        if version not in (2, 3):
            raise self.corrupt(f"version {version} at byte 4, minikv reads versions 2 and 3")
        return self._scalar(_U64, "the tensor count"), self._scalar(_U64, "the metadata count")

    def _fields(self, n_kv: int) -> dict:
        fields = {}
        for _ in range(self._count(n_kv, _KV_LEAST, "metadata entries")):
            at = self._pos
            key = self._name("a metadata key")
            if key in fields:
                raise self.corrupt(f"metadata key {key!r} at byte {at} repeats an earlier one")
            vtype = self._scalar(_U32, f"the type of {key}")
            if key == "general.alignment" and vtype != _UINT32:  # GGUFReader's rule
                raise self.corrupt(f"general.alignment at byte {at} is not a uint32")
            fields[key] = self._value(vtype, key, 0)
        return fields

    def _value(self, vtype: int, key: str, depth: int):
        """One value of type vtype; a string keeps invalid UTF-8 (a vocabulary may) as U+FFFD."""
        if vtype == _STRING:
            return str(self._bytes(f"a string in {key}"), "utf-8", "replace")
        if vtype == _ARRAY:
            return self._array(key, depth)
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise self.corrupt(f"{key} at byte {self._pos - 4} has unknown value type {vtype}")
        return self._scalar(fmt, key)

    def _array(self, key: str, depth: int) -> list:
        itype = self._scalar(_U32, f"the item type of {key}")
        if itype not in _LEAST or (itype == _ARRAY and depth + 1 >= _MAX_NESTING):
            raise self.corrupt(f"{key} at byte {self._pos - 4} has item type {itype} (unknown, or arrays "
                               f"nested more than {_MAX_NESTING} deep)")
        count = self._count(self._scalar(_U64, f"the length of {key}"), _LEAST[itype], f"items of {key}")
        fmt = _SCALARS.get(itype)
        if fmt is None:  # strings or arrays: each has its own length
            return [self._value(itype, key, depth + 1) for _ in range(count)]
        # numbers (and bools, any non-zero byte True): one NumPy read, then Python ints / floats
        return np.frombuffer(self._buf, np.dtype(fmt.format), count, self._take(count * fmt.size, key)).tolist()

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]:
        """(name, ggml dims, type, offset from the data section, byte size) of the next tensor."""
        at = self._pos
        name = self._name("a tensor name")
        n_dims = self._scalar(_U32, f"the dimension count of {name}")
        if n_dims > _MAX_DIMS:
            raise self.corrupt(f"tensor {name} at byte {at} has {n_dims} dimensions, more than {_MAX_DIMS}")
        dims = struct.unpack_from(f"<{n_dims}Q", self._buf, self._take(8 * n_dims, f"the dims of {name}"))
        raw_type = self._scalar(_U32, f"the type of {name}")
        offset = self._scalar(_U64, f"the offset of {name}")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self.corrupt(f"tensor {name} at byte {at} has unknown ggml type {raw_type}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        row = dims[0] if dims else 1  # dims[0] is the row length (1 for a scalar)
        if row % block_size:
            raise self.corrupt(f"tensor {name} at byte {at} has rows of {row} values, "
                               f"not whole {qtype.name} blocks of {block_size}")
        return name, dims, qtype, offset, math.prod(dims) // block_size * type_size

    def _data_start(self) -> int:
        """Where the tensor data starts: after the tensor infos, at a multiple of general.alignment."""
        alignment = self.fields.get("general.alignment", _DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):  # GGUFReader's rule
            raise self.corrupt(f"general.alignment {alignment} is not a power of two")
        return -(-self._pos // alignment) * alignment

    def _tensors(self, infos: list, data_start: int) -> dict[str, GGUFTensor]:
        """The tensors, once each name is known to be its own and its bytes to lie inside the file."""
        tensors = {}
        for name, dims, qtype, offset, n_bytes in infos:
            start = data_start + offset
            if name in tensors:
                raise self.corrupt(f"tensor {name} appears twice")
            if start + n_bytes > len(self._buf):
                raise self.corrupt(f"tensor {name}'s {n_bytes} bytes at byte {start} run past the end of "
                                   f"the file at byte {len(self._buf)}")
            tensors[name] = GGUFTensor(name, dims[::-1], qtype, self._map[start:start + n_bytes])
        return tensors
