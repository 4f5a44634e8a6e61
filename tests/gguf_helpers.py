"""Write GGUF files from tiny HF models the way llama.cpp's convert_hf_to_gguf.py does."""
from __future__ import annotations

import math

import numpy as np

# byte-level BPE vocabulary: the 256 GPT-2 byte symbols, then merged pairs, up to `vocab` tokens
LETTERS = "etaoinshrdlu"


def tiny_gpt2_vocab(vocab: int):
    from minikv.convert.gguf_tokenizer import _bytes_to_unicode

    alphabet = list(_bytes_to_unicode().values())
    tokens, merges = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet, []
    for a in "Ġ" + LETTERS:
        for b in LETTERS:
            if len(tokens) >= vocab:
                break
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens[:vocab], types[:vocab], merges


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta, dim, factor, lff, hff, old_ctx):
    """llama.cpp's rope_freqs tensor for a llama3 rope_scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < old_ctx / hff:
            out.append(1.0)
        elif wl > old_ctx / lff:
            out.append(factor)
        else:
            s = (old_ctx / wl - lff) / (hff - lff)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(model, path, arch: str, qtype=None, rope_factors=None, pre="qwen2"):
    """Write `model` (an HF torch model) as a GGUF; 2-D weights in `qtype` (default F32)."""
    import gguf

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, types, merges = tiny_gpt2_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")

    def put(name, arr):
        if arr.ndim == 2 and qtype is not None:
            q = gguf.quants.quantize(arr.astype(np.float32), qtype)
            w.add_tensor(name, q, raw_dtype=qtype)  # raw_shape would be read as a byte shape
        else:
            w.add_tensor(name, arr.astype(np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors)
    for i in range(cfg.num_hidden_layers):
        for hf, gg in HF_TO_GGUF.items():
            key = f"model.layers.{i}.{hf}"
            if key not in sd:
                continue
            arr = sd[key]
            if arch == "llama" and hf.startswith("self_attn.q_proj"):
                arr = permute(arr, H)
            elif arch == "llama" and hf.startswith("self_attn.k_proj"):
                arr = permute(arr, Hkv)
            put(f"blk.{i}.{gg}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
