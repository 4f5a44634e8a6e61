"""`minikv convert` from GGUF files and HF checkpoints: weights, configs, safety."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from gguf_helpers import llama3_rope_factors, write_gguf
from helpers import hf_logits, make_hf_model, minikv_logits, rel_err, save_hf_model
from minikv.backend import get_backend
from minikv.cli.main import main
from minikv.convert import convert
from minikv.convert.gguf_reader import GGUFFile
from minikv.errors import MinikvError
from minikv.models import load_model
from minikv.safetensors_io import SafetensorsFile

torch = pytest.importorskip("torch")
CPU = get_backend("cpu")


def logits(model_dir, ids):
    return minikv_logits(load_model(model_dir, CPU), ids)


def state(model_dir):
    st = {}
    for f in model_dir.glob("*.safetensors"):
        sf = SafetensorsFile(f)
        st.update({n: sf.float32(n) for n in sf.keys()})
    return st


@pytest.mark.parametrize("case,arch", [("llama-gqa-tied", "llama"), ("llama-mha-untied", "llama"),
                                       ("qwen2-bias", "qwen2"), ("qwen3-qknorm", "qwen3")])
def test_f32_gguf_converts_back_to_the_same_weights(case, arch, tmp_path):
    hf = make_hf_model(case)
    src = write_gguf(hf, tmp_path / "m.gguf", arch)
    dst = convert(src, tmp_path / "out", dtype="f32")
    ours = state(dst)
    ref = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)  # q/k rows un-permuted exactly
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == hf.config.model_type and cfg["tie_word_embeddings"] == hf.config.tie_word_embeddings
    ids = np.random.default_rng(0).integers(0, 300, size=(1, 30))
    assert rel_err(logits(dst, ids), hf_logits(hf, ids)) < 1e-4


def test_q8_0_gguf_matches_the_gguf_packages_dequantization(tmp_path):
    import gguf

    hf = make_hf_model("llama-gqa-tied", num_hidden_layers=1)
    src = write_gguf(hf, tmp_path / "m.gguf", "llama", qtype=gguf.GGMLQuantizationType.Q8_0)
    ours = state(convert(src, tmp_path / "out", dtype="f32"))
    reader = gguf.GGUFReader(src)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    np.testing.assert_array_equal(ours["model.layers.0.self_attn.v_proj.weight"], ref)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    hf = make_hf_model("llama-llama3-rope")
    rp = hf.config.rope_parameters
    D = hf.config.hidden_size // hf.config.num_attention_heads
    factors = llama3_rope_factors(rp["rope_theta"], D, 8.0, 1.0, 4.0, 8192)
    src = write_gguf(hf, tmp_path / "m.gguf", "llama", rope_factors=factors)
    cfg = json.loads((convert(src, tmp_path / "out") / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_hf_bf16_sharded_to_f16_loads_in_hf_and_minikv(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("qwen2-bias", seed=4)
    src = save_hf_model(hf, tmp_path / "src", dtype=torch.bfloat16, max_shard_size="60KB")
    (src / "tokenizer.json").write_text("{}")  # a tokenizer must come along; content not used here
    dst = convert(src, tmp_path / "out", dtype="f16")
    assert (dst / "tokenizer.json").is_file()
    meta = SafetensorsFile(dst / "model.safetensors").metadata
    assert meta["minikv_format"] == "1" and meta["minikv_source"] == "src" and meta["format"] == "pt"
    hf_conv = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, 300, size=(1, 24))
    assert rel_err(logits(dst, ids), hf_logits(hf_conv, ids)) < 1e-4
    assert rel_err(logits(dst, ids), hf_logits(hf, ids)) < 3e-2  # bf16 then f16 rounding of the weights


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    hf = make_hf_model("qwen3-qknorm", num_hidden_layers=1)
    src = write_gguf(hf, tmp_path / "m.gguf", "qwen3")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "out" / "keep").is_file()
    assert main(["convert", str(src), str(tmp_path / "out"), "--force"]) == 0
    assert not (tmp_path / "out" / "keep").exists() and (tmp_path / "out" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_conversion_errors(tmp_path, capsys):
    import gguf

    hf = make_hf_model("llama-gqa-tied", num_hidden_layers=1)
    good = write_gguf(hf, tmp_path / "m.gguf", "llama")
    data = good.read_bytes()
    cases = {}
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) - 1000])
    cases["trunc.gguf"] = "truncated"
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    cases["junk.gguf"] = "corrupt or truncated GGUF file (version 4294967295 at byte 4"
    (tmp_path / "text.gguf").write_text("hello")
    cases["text.gguf"] = "not a GGUF file"
    write_gguf(hf, tmp_path / "q2k.gguf", "llama")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    cases["gpt2.gguf"] = "architecture 'gpt2' is not supported"
    cases["missing.gguf"] = "no such file"
    for name, match in cases.items():
        assert main(["convert", str(tmp_path / name), str(tmp_path / ("out-" + name))]) == 2, name
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / ("out-" + name)).exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_unsupported_tensor_type_is_named(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 66), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(MinikvError, match="IQ2_XXS"):
        convert(tmp_path / "iq.gguf", tmp_path / "out")


@pytest.mark.parametrize("tensor,change,match", [
    ("blk.0.ffn_down.weight", None, "tensor blk.0.ffn_down.weight is missing"),
    ("blk.0.ffn_down.weight", lambda a: a[:, :-32], "tensor blk.0.ffn_down.weight has shape [64, 64], its GGUF "
                                                    "metadata implies [96, 64]"),
    ("blk.0.attn_q_norm.weight", None, "tensor blk.0.attn_q_norm.weight is missing"),
    ("blk.1.attn_v.weight", lambda a: a[:-8], "tensor blk.1.attn_v.weight has shape [64, 40]"),
])
def test_gguf_missing_or_misshapen_tensor_writes_nothing(tensor, change, match, tmp_path, capsys, monkeypatch):
    import gguf

    add_tensor = gguf.GGUFWriter.add_tensor

    def altered(self, name, arr, *args, **kw):  # write_gguf's tensors, one dropped or reshaped
        if name == tensor and change is None:
            return None
        return add_tensor(self, name, change(arr) if name == tensor else arr, *args, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", altered)
    src = write_gguf(make_hf_model("qwen3-qknorm", num_hidden_layers=2), tmp_path / "m.gguf", "qwen3")
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minikv: error: ") and err.count("\n") == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no destination, no partial directory


def _s(b: bytes) -> bytes:
    """A GGUF string: u64 length, bytes."""
    return struct.pack("<Q", len(b)) + b


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _info(name=b"token_embd.weight", dims=(32,), qtype=0, offset=0) -> bytes:
    """A tensor info: name, n_dims, dims (ggml order), ggml type (0: F32), offset."""
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def _gguf(kvs=(), infos=(), version=3, counts=None, data=bytes(128)) -> bytes:
    """A GGUF file from raw parts; `counts` (tensors, kvs) overrides the true ones."""
    n_tensors, n_kv = counts or (len(infos), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + data


ARCH = _kv(b"general.architecture", 8, _s(b"llama"))  # bytes 24 to 69, after the header
_NESTED = struct.pack("<IQ", 9, 1) * 4 + struct.pack("<IQ", 4, 0)  # arrays 5 deep around an empty one
CORRUPT = {  # name: (file bytes, what the message says)
    "string array of 2**40 items": (_gguf([ARCH, _kv(b"tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**40))]),
                                    "1099511627776 items of tokenizer.ggml.tokens at byte"),
    "uint8 array of 2**62 items": (_gguf([ARCH, _kv(b"x", 9, struct.pack("<IQ", 0, 2**62))]),
                                   "4611686018427387904 items"),
    "kv count 2**40": (_gguf([ARCH], counts=(0, 2**40)), "1099511627776 metadata entries at byte 24"),
    "tensor count 2**40": (_gguf([ARCH], counts=(2**40, 1)), "1099511627776 tensor infos"),
    "truncated header": (b"GGUF" + struct.pack("<I", 3),
                         "the tensor count at byte 8 needs 8 bytes, the file has 0 left"),
    "string past the end": (_gguf([ARCH, _kv(b"x", 8, struct.pack("<Q", 10**6))]), "a string in x at byte"),
    "repeated key": (_gguf([ARCH, ARCH]), "metadata key 'general.architecture' at byte 69 repeats an earlier one"),
    "non-UTF-8 key": (_gguf([ARCH, _kv(b"\xff", 4, bytes(4))]), "a metadata key at byte 69 is not UTF-8"),
    "unknown value type": (_gguf([ARCH, _kv(b"x", 13, bytes(4))]), "x at byte 78 has unknown value type 13"),
    "unknown array item type": (_gguf([ARCH, _kv(b"x", 9, struct.pack("<IQ", 13, 0))]), "has item type 13"),
    "arrays nested too deep": (_gguf([ARCH, _kv(b"x", 9, _NESTED)]), "nested more than 4 deep"),
    "alignment not a power of two": (_gguf([ARCH, _kv(b"general.alignment", 4, struct.pack("<I", 48))]),
                                     "general.alignment 48 is not a power of two"),
    "alignment not a uint32": (_gguf([ARCH, _kv(b"general.alignment", 10, struct.pack("<Q", 32))]),
                               "general.alignment at byte 69 is not a uint32"),
    "version 4": (_gguf([ARCH], version=4), "version 4 at byte 4, minikv reads versions 2 and 3"),
    "unknown ggml type": (_gguf([ARCH], [_info(qtype=1000)]),
                          "token_embd.weight at byte 69 has unknown ggml type 1000"),
    "quantized, no dims": (_gguf([ARCH], [_info(dims=(), qtype=8)]), "rows of 1 values, not whole Q8_0 blocks of 32"),
    "row not whole blocks": (_gguf([ARCH], [_info(dims=(33, 2), qtype=8)]), "rows of 33 values"),
    "five dims": (_gguf([ARCH], [_info(dims=(1,) * 5)]), "has 5 dimensions, more than 4"),
    "non-UTF-8 tensor name": (_gguf([ARCH], [_info(name=b"\xc3(")]), "a tensor name at byte 69 is not UTF-8"),
    "repeated tensor": (_gguf([ARCH], [_info(), _info(offset=32)]), "tensor token_embd.weight appears twice"),
    "tensor past the end": (_gguf([ARCH], [_info(offset=64)]), "128 bytes at byte 192 run past the end of the file "
                                                                "at byte 256"),
    "tensor offset 2**64-1": (_gguf([ARCH], [_info(offset=2**64 - 1)]), "run past the end"),
    "tokens not a list": (_gguf([ARCH, _kv(b"tokenizer.ggml.tokens", 8, _s(b"a"))]),
                          "metadata tokenizer.ggml.tokens is not a list of str"),
    "merge not a pair": (_gguf([ARCH, _kv(b"tokenizer.ggml.merges", 9, struct.pack("<IQ", 8, 1) + _s(b"ab"))]),
                         "a tokenizer.ggml.merges entry is not a pair"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_gguf_fails_at_once_saying_where(case, tmp_path):
    data, detail = CORRUPT[case]
    (tmp_path / "m.gguf").write_bytes(data)
    with pytest.raises(MinikvError) as e:
        convert(tmp_path / "m.gguf", tmp_path / "out")
    assert str(e.value).startswith(f"{tmp_path / 'm.gguf'}: corrupt or truncated GGUF file (")
    assert detail in str(e.value) and str(e.value).endswith("); re-download it"), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("version,match", [(1, "GGUF version 1 .an old llama.cpp. is not supported"),
                                           (3 << 24, "a big-endian GGUF file")])
def test_gguf_v1_and_big_endian_are_refused(version, match, tmp_path):
    (tmp_path / "m.gguf").write_bytes(_gguf([ARCH], version=version))
    with pytest.raises(MinikvError, match=match):
        convert(tmp_path / "m.gguf", tmp_path / "out")


def test_gguf_reader_values(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_array("x.nested", [[1, 2], [3]])  # gguf.GGUFReader flattens arrays of arrays; we keep them
    w.add_string("x.latin1", b"caf\xe9")  # a value need not be UTF-8 (a key or tensor name must)
    w.add_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    f = GGUFFile(tmp_path / "m.gguf")
    assert f.fields == {"general.architecture": "llama", "x.nested": [[1, 2], [3]], "x.latin1": "caf\ufffd"}
    t = f.tensors["t"]
    assert (t.name, t.shape, t.tensor_type, t.data.size) == ("t", (2, 3), gguf.GGMLQuantizationType.F32, 24)
    np.testing.assert_array_equal(t.data.view(np.float32), np.arange(6))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(MinikvError, match="corrupt or truncated GGUF file [(]it is empty[)]"):
        GGUFFile(tmp_path / "empty.gguf")
