"""config.json parsing (old and new transformers spellings) and safetensors reading/writing."""
from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from minikv.config import ModelConfig
from minikv.errors import MinikvError
from minikv.safetensors_io import SafetensorsFile, float32_to_bf16_bits, save_file, to_float32

BASE = dict(model_type="llama", vocab_size=10, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4)


def test_defaults_and_derived_fields():
    c = ModelConfig.from_dict(BASE)
    assert c.num_key_value_heads == 4 and c.head_dim == 8 and c.rope.type == "default"
    assert not c.attention_bias and not c.qk_norm
    q2 = ModelConfig.from_dict({**BASE, "model_type": "qwen2", "sliding_window": 4096})
    assert q2.attention_bias and not q2.o_bias and q2.sliding_window is None  # use_sliding_window off
    q3 = ModelConfig.from_dict({**BASE, "model_type": "qwen3", "head_dim": 16})
    assert q3.qk_norm and q3.head_dim == 16 and not q3.attention_bias
    ll = ModelConfig.from_dict({**BASE, "attention_bias": True, "eos_token_id": [5, 6]})
    assert ll.attention_bias and ll.o_bias and ll.eos_token_ids == (5, 6)


def test_rope_old_and_new_spellings_agree():
    old = ModelConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    new = ModelConfig.from_dict({**BASE, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert old.rope == new.rope and old.rope.theta == 5e5


@pytest.mark.parametrize("bad,match", [({"model_type": "gpt2"}, "not supported"),
                                       ({"hidden_act": "gelu"}, "hidden_act"),
                                       ({"num_key_value_heads": 3}, "multiple"),
                                       ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "dynamic")])
def test_config_errors(bad, match):
    with pytest.raises(MinikvError, match=match):
        ModelConfig.from_dict({**BASE, **bad})


def test_missing_key_is_named():
    d = dict(BASE)
    del d["vocab_size"]
    with pytest.raises(MinikvError, match="vocab_size"):
        ModelConfig.from_dict(d)


def test_safetensors_roundtrip_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5)).astype(np.float32)
    b = rng.normal(size=(7,)).astype(np.float16)
    c = (rng.normal(size=(4, 4)) * 1e3).astype(np.float32)
    path = tmp_path / "t.safetensors"
    save_file(path, {"a": (a, "F32"), "b": (b, "F16"), "c": (float32_to_bf16_bits(c), "BF16")}, {"format": "pt"})
    ref = load_file(path)
    assert ref["c"].dtype == torch.bfloat16
    np.testing.assert_array_equal(ref["a"].numpy(), a)
    np.testing.assert_array_equal(ref["b"].numpy(), b)
    np.testing.assert_array_equal(ref["c"].float().numpy(), torch.from_numpy(c).bfloat16().float().numpy())
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "pt"} and st.shape("c") == (4, 4)
    np.testing.assert_array_equal(to_float32(st.raw("c"), "BF16"), ref["c"].float().numpy())


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, np.nan], dtype=np.float32)
    bits = float32_to_bf16_bits(x)
    back = to_float32(bits, "BF16")
    np.testing.assert_array_equal(back[:5], [1.0, 1.0, 1.015625, -2.5, np.inf])  # ties go to even
    assert np.isnan(back[5])


def _raw_safetensors(path, header, data_size: int) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data_size))


def _u8(lo, hi, shape=None):
    return {"dtype": "U8", "shape": [hi - lo] if shape is None else shape, "data_offsets": [lo, hi]}


@pytest.mark.parametrize("header,size,match", [
    ({"a": _u8(0, 40), "b": _u8(32, 64)}, 64, "'b' overlaps"),
    ({"a": _u8(0, 64), "b": _u8(0, 64)}, 64, "'b' overlaps"),  # two names for the same bytes
    ({"a": _u8(0, 16), "b": _u8(32, 64)}, 64, "gap of 16 bytes"),
    ({"a": _u8(8, 64)}, 64, "gap of 8 bytes"),  # the first tensor must start at 0
    ({"a": _u8(0, 32)}, 64, "32 bytes after the last tensor"),
    ({"a": _u8(0, 64)}, 40, "truncated"),
    ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [64, 0]}}, 64, "end before they begin"),
    ({"a": {"dtype": "F32", "shape": [15], "data_offsets": [0, 64]}}, 64, "has 64 bytes, expected 60"),
    ({"a": _u8(0, 64, [2**62 + 16, 4])}, 64, "impossibly large"),  # 2**64 + 64 bytes: 64 in 64-bit ints
    ({"a": _u8(0, 0, [2**63, 0]), "b": _u8(0, 64)}, 64, "impossibly large"),  # empty, but NumPy can't
    ({"a": _u8(0, 64, [-64])}, 64, "bad shape"),
    ({"a": _u8(0, 64, [64.0])}, 64, "bad shape"),
    ({"a": _u8(0, 1, [True])}, 1, "bad shape"),
    ({"a": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64, 64]}}, 64, "bad shape or data_offsets"),
    ({"a": {"dtype": ["U8"], "shape": [64], "data_offsets": [0, 64]}}, 64, "bad header entry"),
    ({"a": 1}, 64, "bad header entry"),
    ({"__metadata__": {"format": 1}, "a": _u8(0, 64)}, 64, "__metadata__"),
    ({"__metadata__": ["pt"], "a": _u8(0, 64)}, 64, "__metadata__"),
    ([1, 2], 0, "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 0, "not valid JSON"),
])
def test_safetensors_header_rejected_as_the_reference_does(header, size, match, tmp_path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, size)
    with pytest.raises(MinikvError, match=re.escape(match)):
        SafetensorsFile(path)
    with pytest.raises((SafetensorError, ValueError)):  # ValueError: NumPy, for the empty 2**63 rows
        load_file(path)


@pytest.mark.parametrize("header,size", [
    ({"__metadata__": None, "a": _u8(0, 64)}, 64),
    ({"z": _u8(0, 0, [0, 5]), "a": _u8(0, 32), "b": _u8(32, 64, [2, 16]), "y": _u8(64, 64, [0])}, 64),
    ({"a": {**_u8(0, 64), "extra": [1]}}, 64),  # unknown keys are ignored
    ({}, 0),
])
def test_safetensors_header_accepted_as_the_reference_does(header, size, tmp_path):
    from safetensors.numpy import load_file

    path = tmp_path / "ok.safetensors"
    _raw_safetensors(path, header, size)
    st = SafetensorsFile(path)
    ref = load_file(path)
    assert set(st.keys()) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(st.raw(name), ref[name])


def test_safetensors_huge_shape_with_lying_byte_count_allocates_nothing(tmp_path):
    import tracemalloc

    path = tmp_path / "lie.safetensors"
    _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 64]}}, 64)
    tracemalloc.start()
    try:
        with pytest.raises(MinikvError, match="has 64 bytes, expected 4398046511104"):
            SafetensorsFile(path)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
