"""minikv.convert.gguf_quants: our NumPy dequantization must equal the gguf package's
reference (itself bit-exact with ggml-quants.c) bit for bit, on synthetic and real blocks;
minikv.convert.gguf_reader must read what the gguf package's GGUFReader reads."""
from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from minikv.convert.gguf_quants import SUPPORTED, dequantize
from minikv.convert.gguf_reader import GGUFFile
from minikv.errors import MinikvError

QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
# Byte offsets of the fp16 fields (scales / mins) inside one block of each type.
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
# Logical shapes in units of blocks along the row: one block, several rows of several blocks,
# a 3-D tensor, and one big enough (> 2**18 values) to span several dequantization chunks.
ROW_SHAPES = [(1, 1), (4, 3), (3, 2, 5), (70, None)]


def _shape(qt: T, row_shape: tuple) -> tuple[int, ...]:
    bs = GGML_QUANT_SIZES[qt][0]
    *lead, nblk = row_shape
    return (*lead, 4096 if nblk is None else nblk * bs)


def _byte_shape(qt: T, shape: tuple[int, ...]) -> tuple[int, ...]:
    bs, ts = GGML_QUANT_SIZES[qt]
    return (*shape[:-1], shape[-1] // bs * ts)


def _random_blocks(qt: T, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random valid raw blocks: every bit random, except that fp16 fields whose exponent is all
    ones (inf/NaN) get their top exponent bit cleared, so they are finite (subnormals,
    negatives and +-0 still occur)."""
    bs, ts = GGML_QUANT_SIZES[qt]
    nb = int(np.prod(shape)) // bs
    b = np.random.default_rng(seed).integers(0, 256, (nb, ts), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        h = b[:, off:off + 2].copy().view(np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= np.uint16(0xBFFF)
        b[:, off:off + 2] = h.view(np.uint8)
    return b.reshape(_byte_shape(qt, shape))


def _gguf_can_quantize(qt: T) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qt][0]), np.float32), qt)
    except NotImplementedError:
        return False
    return True


# Types the gguf package can quantize (it has no K-quant quantizer; those get random blocks).
QUANTIZABLE = [qt for qt in QUANT_TYPES if _gguf_can_quantize(qt)]


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == ref.shape
    ref = np.ascontiguousarray(ref, dtype=np.float32)
    diff = ours.view(np.uint32) != ref.view(np.uint32)
    assert not diff.any(), f"{diff.sum()} of {diff.size} values differ, first at {np.argwhere(diff)[0]}"


def test_supported_set():
    assert SUPPORTED == frozenset({T.F32, T.F16, T.BF16, *QUANT_TYPES})
    assert {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1} <= set(QUANTIZABLE)


@pytest.mark.parametrize("row_shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("qt", QUANT_TYPES, ids=lambda t: t.name)
def test_random_raw_blocks_match_gguf(qt, row_shape):
    """Arbitrary bit patterns (every nibble/scale/high-bit combination) for every type."""
    shape = _shape(qt, row_shape)
    raw = _random_blocks(qt, shape, seed=zlib.crc32(f"{qt.name}{row_shape}".encode()))
    ours = dequantize(raw, qt, shape)
    assert np.isfinite(ours).all()
    assert_bit_exact(ours, gguf.quants.dequantize(raw, qt))


@pytest.mark.parametrize("row_shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("qt", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_match_gguf(qt, row_shape):
    """Realistic blocks: random float32 data quantized by the gguf package."""
    shape = _shape(qt, row_shape)
    rng = np.random.default_rng(len(shape) * 1000 + int(qt))
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, shape[:-1] + (1,))).astype(np.float32)
    x.reshape(-1)[: GGML_QUANT_SIZES[qt][0]] = 0.0  # an all-zero block (d = 0)
    raw = gguf.quants.quantize(x, qt)
    assert raw.dtype == np.uint8 and raw.shape == _byte_shape(qt, shape)
    ours = dequantize(raw, qt, shape)
    assert_bit_exact(ours, gguf.quants.dequantize(raw, qt))
    assert np.abs(ours - x).max() <= 0.25 * np.abs(x).max()  # and it is an approximation of x


def test_hand_built_blocks():
    """Two blocks worked out by hand, independent of the gguf package."""
    q = np.arange(-16, 16, dtype=np.int8)
    blk = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8), q.view(np.uint8)])
    np.testing.assert_array_equal(dequantize(blk, T.Q8_0, (32,)), q.astype(np.float32) * 0.5)
    nib = np.arange(16, dtype=np.uint8)
    blk = np.concatenate([np.float16(-2.0).reshape(1).view(np.uint8), nib | ((15 - nib) << 4)])
    want = (np.concatenate([nib, 15 - nib]).astype(np.float32) - 8) * -2.0
    np.testing.assert_array_equal(dequantize(blk, T.Q4_0, (1, 32)), want[None])


@pytest.mark.parametrize("shape", [(5,), (3, 64), (2, 3, 40)], ids=str)
def test_float_types(shape):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 100).astype(np.float32)
    # F32: a copy of the stored values (as the reader's float32 view, or as raw bytes)
    for src in (x, x.view(np.uint8).reshape(-1), x.tobytes()):
        assert_bit_exact(dequantize(src, T.F32, shape), x)
    # F16: every bit pattern, including inf, nan and subnormals
    h = rng.integers(0, 1 << 16, shape, dtype=np.uint16).view(np.float16)
    assert_bit_exact(dequantize(h, T.F16, shape), gguf.quants.dequantize(h.view(np.uint8), T.F16)
                     .reshape(shape))
    assert_bit_exact(dequantize(h, T.F16, shape), h.astype(np.float32))
    # BF16: quantized by gguf (round to nearest even), and every bit pattern
    for bf in (gguf.quants.quantize(x, T.BF16), rng.integers(0, 256, (*shape[:-1], 2 * shape[-1]),
                                                              dtype=np.uint8)):
        assert_bit_exact(dequantize(bf, T.BF16, shape), gguf.quants.dequantize(bf, T.BF16))


def test_input_forms_and_readonly():
    """Reader-style 2-D bytes, flat bytes, Python bytes and read-only memory all work and the
    input is not modified."""
    shape = (6, 512)
    raw = _random_blocks(T.Q4_K, shape, seed=3)
    ref = gguf.quants.dequantize(raw, T.Q4_K)
    ro = raw.copy()
    ro.flags.writeable = False
    for src in (raw, raw.reshape(-1), raw.tobytes(), ro, raw.view(np.uint16)):
        assert_bit_exact(dequantize(src, T.Q4_K, shape), ref)
    assert_bit_exact(dequantize(raw, int(T.Q4_K), list(shape)), ref)  # plain int type, list shape
    np.testing.assert_array_equal(ro, raw)


@pytest.mark.parametrize("qt", sorted(SUPPORTED), ids=lambda t: t.name)
def test_wrong_byte_count_raises(qt):
    bs, ts = GGML_QUANT_SIZES[qt]
    shape = (2, 4 * max(bs, 2))
    good = np.zeros(int(np.prod(shape)) // bs * ts, np.uint8)
    dequantize(good, qt, shape)
    for bad in (good[:-1], good[:-ts], np.zeros(good.size + ts, np.uint8)):
        with pytest.raises(MinikvError, match=qt.name) as e:
            dequantize(bad, qt, shape)
        assert "\n" not in str(e.value)
    if bs > 1:  # row length not a whole number of blocks, even though the byte count fits
        with pytest.raises(MinikvError, match=qt.name):
            dequantize(good, qt, (shape[0] * 8, shape[1] // 8))


@pytest.mark.parametrize("qt", [T.IQ2_XXS, T.Q2_K, T.Q3_K, T.IQ4_NL, T.Q8_1, T.TQ1_0],
                         ids=lambda t: t.name)
def test_unsupported_type_raises(qt):
    bs, ts = GGML_QUANT_SIZES[qt]
    with pytest.raises(MinikvError, match=qt.name) as e:
        dequantize(np.zeros(2 * ts, np.uint8), qt, (1, 2 * bs))
    assert "\n" not in str(e.value)
    with pytest.raises(MinikvError, match=qt.name):
        dequantize(np.zeros(2 * ts, np.uint8), int(qt), (1, 2 * bs))


def test_unknown_type_number_raises():
    with pytest.raises(MinikvError, match="unknown ggml type"):
        dequantize(np.zeros(64, np.uint8), 9999, (16,))


# --- real blocks from the SmolLM2-135M Q4_1 GGUF (Q4_1 weights, Q8_0 embeddings, F32 norms) ---

@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


def test_real_gguf_tensors_match_gguf(smollm2_reader):
    by_type: dict[T, list] = {}
    for t in smollm2_reader.tensors:
        by_type.setdefault(T(t.tensor_type), []).append(t)
    assert {T.Q4_1, T.Q8_0, T.F32} <= set(by_type)
    assert set(by_type) <= SUPPORTED  # every tensor in the file is readable
    checked = 0
    for qt, tensors in by_type.items():
        picks = tensors if len(tensors) <= 3 else [tensors[0], tensors[len(tensors) // 2], tensors[-1]]
        for t in picks:
            shape = tuple(int(s) for s in reversed(t.shape))  # ggml ne[] -> numpy order
            data = t.data
            if data.size * data.itemsize > 4 << 20:  # big embedding: first, middle, last rows
                rows = np.r_[0:512, data.shape[0] // 2:data.shape[0] // 2 + 512, -512:0]
                data = np.ascontiguousarray(data[rows])
                shape = (len(rows), *shape[1:])
            ref = gguf.quants.dequantize(data, qt).reshape(shape)
            ours = dequantize(data, qt, shape)
            assert_bit_exact(ours, ref)
            assert np.isfinite(ours).all()
            checked += 1
    assert checked >= 7


# --- our GGUF reader against the gguf package's GGUFReader -----------------------------------

def _typed(v):
    """v with the type of every scalar in it, so that 1 == 1.0 == True do not pass for each other."""
    return [_typed(x) for x in v] if type(v) is list else (type(v), v)


def assert_reader_matches_gguf(path, ref: gguf.GGUFReader) -> None:
    """GGUFFile reads the fields (as plain Python, of the same types), tensor names, types,
    shapes (ours in NumPy order) and bytes that `ref` reads from path."""
    ours = GGUFFile(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # its header
    assert list(ours.fields) == list(want)
    for key, value in want.items():
        assert _typed(ours.fields[key]) == _typed(value), key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert (mine.shape, mine.tensor_type) == (tuple(reversed(t.shape.tolist())), t.tensor_type), t.name
        assert mine.data.dtype == np.uint8 and mine.data.ndim == 1 and not mine.data.flags.writeable
        assert np.array_equal(mine.data, t.data.reshape(-1).view(np.uint8)), t.name


def test_reader_matches_gguf_on_smollm2(smollm2_gguf, smollm2_reader):
    assert_reader_matches_gguf(smollm2_gguf, smollm2_reader)


def test_reader_matches_gguf_on_every_type(tmp_path):
    V = gguf.GGUFValueType
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    for vtype, value in [(V.UINT8, 255), (V.INT8, -128), (V.UINT16, 65535), (V.INT16, -3), (V.UINT32, 2**32 - 1),
                         (V.INT32, -2**31), (V.FLOAT32, 1.5), (V.BOOL, True), (V.STRING, "héllo"),
                         (V.UINT64, 2**64 - 1), (V.INT64, -2**63), (V.FLOAT64, 0.1)]:
        w.add_key_value(f"x.{vtype.name.lower()}", value, vtype)
        w.add_key_value(f"x.{vtype.name.lower()}s", [value, value, value], V.ARRAY, sub_type=vtype)
    w.add_string("x.empty", "")
    rng = np.random.default_rng(0)
    w.add_tensor("scalar", np.float32(rng.normal()).reshape(()))
    w.add_tensor("f32_3d", rng.normal(size=(2, 3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.normal(size=(3, 7)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32))
    for qt in QUANT_TYPES:
        shape = _shape(qt, (2, 2))
        w.add_tensor(f"{qt.name}_2d", _random_blocks(qt, shape, 1).reshape(_byte_shape(qt, shape)), raw_dtype=qt)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    ref = gguf.GGUFReader(path)
    assert ref.alignment == 64
    assert_reader_matches_gguf(path, ref)
