"""A GGUF file (llama.cpp) as a conversion source: HF config, HF tensor names and layout.

All renaming from GGUF to HF happens here, once, in `TENSOR_NAMES`. GGUF `llama` files
store the Q and K rows permuted for llama.cpp's interleaved-pair RoPE; they are permuted
back to the HF rotate-half layout. `qwen2`/`qwen3` files are not permuted.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from minikv.checkpoint import check_tensors
from minikv.config import ModelConfig
from minikv.errors import MinikvError
from minikv.models import expected_tensors

from .gguf_quants import SUPPORTED, dequantize
from .gguf_reader import GGUFFile
from .gguf_tokenizer import build_tokenizer_files, read_gguf_fields

# general.architecture -> (HF model_type, HF architecture class, Q/K rows permuted?)
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM", True),
                 "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM", False)}

TENSOR_NAMES = {  # GGUF name (per-layer part after "blk.{i}.") -> HF name (after "model.layers.{i}.")
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# End-of-generation tokens llama.cpp also stops at, besides the declared EOS (by their text).
EOG_TEXTS = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>",
             "<|eom_id|>", "</s>"}
_GGUF_NAMES = {hf: gguf for gguf, hf in TENSOR_NAMES.items()}


def hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m:
        rest = TENSOR_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{rest}" if rest else None
    return TENSOR_NAMES.get(gguf_name)


def gguf_name(hf: str) -> str:
    """The inverse of `hf_name`."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    return f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}" if m else _GGUF_NAMES[hf]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert permute(): rows (head, pair, 2) -> (head, 2, pair)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        self.file = GGUFFile(path)  # raises MinikvError for a file it cannot read
        self.fields = read_gguf_fields(self.file)
        arch = self.fields.get("general.architecture")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise MinikvError(f"{path}: GGUF architecture {arch!r:.40} is not supported; minikv converts "
                              f"{', '.join(ARCHITECTURES)}")
        self.arch = arch
        self.model_type, self.hf_class, self.permuted = ARCHITECTURES[arch]
        self.tensors = {}
        for t in self.file.tensors.values():
            if t.tensor_type not in SUPPORTED:
                raise MinikvError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which minikv "
                                  f"cannot dequantize; use a file with {', '.join(sorted(x.name for x in SUPPORTED))}")
            name = hf_name(t.name)
            if name is not None:
                self.tensors[name] = t
            elif t.name != "rope_freqs.weight":
                raise MinikvError(f"{path}: unexpected tensor {t.name} for architecture {arch}")
        self.config = self._config()
        if self.config["tie_word_embeddings"]:
            self.tensors.pop("lm_head.weight", None)
        self.shapes = self._check_tensors()
        self.tokenizer_files = self._tokenizer_files()
        self.default_dtype = "f16"

    def _check_tensors(self) -> dict[str, tuple[int, ...]]:
        """The tensors the config implies, {HF name: shape}, once the file is known to hold each
        with that shape (compared in GGUF's names and dim order), before anything is written."""
        cfg = ModelConfig.from_dict(self.config, source=f"{self.path} (its GGUF metadata)")
        shapes = expected_tensors(cfg, len(self.file.tensors), self.path)
        found = {t.name: t.shape[::-1] for t in self.file.tensors.values()}  # NumPy -> ggml order
        check_tensors(found, {gguf_name(n): s[::-1] for n, s in shapes.items()}, self.path, "its GGUF metadata")
        extra = sorted(set(self.tensors) - set(shapes))
        if extra:
            raise MinikvError(f"{self.path}: tensor {gguf_name(extra[0])} is not part of the model its GGUF "
                              "metadata describes; the file is corrupt")
        return shapes

    def _tokenizer_files(self) -> dict[str, object]:
        try:
            return build_tokenizer_files(self.fields)
        except MinikvError as e:
            raise MinikvError(f"{self.path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception; only that type is handled
            # a vocabulary it cannot build (a merge of tokens not in it) is a corrupt file; any
            # subclass (TypeError, KeyError, ...) is a bug and propagates.
            if type(e) is not Exception:
                raise
            raise MinikvError(f"{self.path}: its tokenizer metadata is inconsistent ({e}); the file is "
                              "corrupt, re-download it") from None

    # -- config -------------------------------------------------------------------------------
    def _get(self, key, default=...):
        v = self.fields.get(f"{self.arch}.{key}", default)
        if v is ...:
            raise MinikvError(f"{self.path}: GGUF metadata {self.arch}.{key} is missing; the file is incomplete")
        return v

    def _positive(self, key, default=..., kind=int):
        """A metadata number that must be a positive `kind` (int, or float also taking ints)."""
        v = self._get(key, default)
        if type(v) not in ((int,) if kind is int else (int, float)) or not 0 < v < math.inf:
            raise MinikvError(f"{self.path}: GGUF metadata {self.arch}.{key} is {v!r:.40}, not a positive "
                              f"{kind.__name__}; the file is corrupt")
        return kind(v)

    def _config(self) -> dict:
        embd = self.tensors.get("model.embed_tokens.weight")
        if embd is None or len(embd.shape) != 2:
            raise MinikvError(f"{self.path}: no 2-D token_embd.weight tensor; the file is incomplete or corrupt")
        n_head = self._positive("attention.head_count")
        hidden = self._positive("embedding_length")
        head_dim = self._positive("attention.key_length", self._get("rope.dimension_count", hidden // n_head))
        if head_dim % 2:
            raise MinikvError(f"{self.path}: head dimension {head_dim} is odd; RoPE needs it even, the file is corrupt")
        theta = self._positive("rope.freq_base", 10000.0, float)
        tok = self.fields.get("tokenizer.ggml.tokens") or []
        eos = self.fields.get("tokenizer.ggml.eos_token_id")
        eog = [i for i, t in enumerate(tok) if t in EOG_TEXTS and i != eos]
        cfg = {
            "architectures": [self.hf_class], "model_type": self.model_type,
            "vocab_size": embd.shape[0],
            "hidden_size": hidden, "intermediate_size": self._positive("feed_forward_length"),
            "num_hidden_layers": self._positive("block_count"), "num_attention_heads": n_head,
            "num_key_value_heads": self._positive("attention.head_count_kv", n_head), "head_dim": head_dim,
            "max_position_embeddings": self._positive("context_length", 2048),
            "rms_norm_eps": self._positive("attention.layer_norm_rms_epsilon", 1e-6, float),
            "rope_theta": theta, "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self.tensors,
            "mlp_bias": False,
            "bos_token_id": self.fields.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos if not eog else [eos] + eog if eos is not None else eog,
        }
        if self.model_type == "qwen2":
            cfg.pop("attention_bias")  # implied by qwen2
        scaling = self._rope_scaling(head_dim, theta)
        if scaling:
            cfg["rope_scaling"] = scaling
        return cfg

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        kind = self._get("rope.scaling.type", None)
        if kind == "linear":
            return {"rope_type": "linear", "factor": self._positive("rope.scaling.factor", kind=float)}
        if kind not in (None, "none"):
            raise MinikvError(f"{self.path}: rope scaling {kind!r} is not supported (linear and llama3 are)")
        freqs = self.file.tensors.get("rope_freqs.weight")
        if freqs is None:
            return None
        if freqs.shape != (head_dim // 2,):
            raise MinikvError(f"{self.path}: rope_freqs.weight has shape {list(freqs.shape)}, expected "
                              f"[{head_dim // 2}]; the file is corrupt")
        factors = dequantize(freqs.data, freqs.tensor_type, freqs.shape).astype(np.float64)
        return llama3_from_freq_factors(factors, head_dim, theta, self.path)

    # -- tensors ------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(self.shapes.items())

    def tensor(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        w = dequantize(t.data, t.tensor_type, self.shapes[name])
        if self.permuted and (".q_proj." in name or ".k_proj." in name):
            heads = self.config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            w = unpermute_qk(w, heads)
        return w

    def files(self, dtype_name: str) -> dict[str, object]:
        """JSON files of the output directory."""
        eos = self.config["eos_token_id"]
        out = {"config.json": {**self.config, "torch_dtype": dtype_name},
               "generation_config.json": {"bos_token_id": self.config["bos_token_id"], "eos_token_id": eos}}
        out.update(self.tokenizer_files)
        return out


def llama3_from_freq_factors(factors: np.ndarray, head_dim: int, theta: float, path) -> dict:
    """Recover Llama 3.1's rope_scaling from llama.cpp's `rope_freqs` tensor (the per-frequency
    divisors its converter bakes in), then check that it reproduces the tensor exactly."""
    if not (np.isfinite(factors).all() and factors.min() > 0):
        raise MinikvError(f"{path}: its rope_freqs tensor holds non-finite or non-positive factors; "
                          "the file is corrupt")
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    factor = float(factors.max())
    old_ctx = 8192  # llama.cpp's converter assumes Llama 3.1's original context
    medium = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    lff, hff = 1.0, 4.0
    if medium.sum() >= 2 and factor > 1:
        # 1/f = (1-s)/factor + s with s = (old_ctx/wavelen - lff) / (hff - lff): s is linear in old_ctx/wavelen
        s = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(old_ctx / wavelen[medium], s, 1)
        lff, hff = round(-b / a, 4), round(-b / a + 1 / a, 4)
    cfg = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lff, "high_freq_factor": hff,
           "original_max_position_embeddings": old_ctx}
    smooth = (old_ctx / wavelen - lff) / (hff - lff)
    rebuilt = np.where(wavelen < old_ctx / hff, 1.0, np.where(wavelen > old_ctx / lff, factor,
                                                               1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(rebuilt, factors, rtol=1e-4):
        raise MinikvError(f"{path}: its rope_freqs tensor matches no llama3 rope scaling; unsupported")
    return cfg
