"""`minikv convert` from GGUF files and HF checkpoints: weights, configs, safety."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gguf_helpers import llama3_rope_factors, write_gguf
from helpers import hf_logits, make_hf_model, minikv_logits, rel_err, save_hf_model
from minikv.backend import get_backend
from minikv.cli.main import main
from minikv.convert import convert
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
    cases["junk.gguf"] = "not a readable GGUF"
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
