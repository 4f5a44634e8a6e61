"""Model configuration read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MinikvError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
POSITIVE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (and o for llama's attention_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise MinikvError(f"{model_dir}: no config.json; point at a Hugging Face or minikv model directory")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MinikvError(f"{path}: not valid JSON ({e}); the file is corrupt, re-download or re-convert it")
        if not isinstance(data, dict):
            raise MinikvError(f"{path}: not a model configuration (a JSON {type(data).__name__}, not an object); "
                              "re-download or re-convert the model")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise MinikvError(
                f"{source}: model_type {mt!r} is not supported; minikv runs {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise MinikvError(f"{source}: hidden_act {act!r} is not supported (only silu)")
        try:
            for key in POSITIVE_KEYS:
                if d.get(key) is not None and (isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 1):
                    raise MinikvError(f"{source}: {key} is {d[key]!r}; it must be a positive integer")
            n_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            n_kv = int(d.get("num_key_value_heads") or n_heads)
            head_dim = int(d.get("head_dim") or hidden // n_heads)
            if head_dim < 1:
                raise MinikvError(f"{source}: hidden_size {hidden} is smaller than num_attention_heads {n_heads}")
            if n_heads % n_kv:
                raise MinikvError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                                  f"num_key_value_heads {n_kv}")
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            attn_bias = bool(d.get("attention_bias", False))
            return cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=n_heads,
                num_key_value_heads=n_kv,
                head_dim=head_dim,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rope=_rope_config(d, source),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases and never an o bias; llama's flag covers all four.
                attention_bias=True if mt == "qwen2" else attn_bias,
                o_bias=attn_bias and mt in ("llama", "mistral"),
                mlp_bias=bool(d.get("mlp_bias", False)),
                qk_norm=mt == "qwen3",
                sliding_window=_sliding_window(d),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise MinikvError(f"{source}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise MinikvError(f"{source}: bad value ({e})") from None


def _sliding_window(d: dict) -> int | None:
    # Qwen2/3 configs carry a sliding_window that is off unless use_sliding_window is set.
    if d.get("model_type") in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        return None
    sw = d.get("sliding_window")
    return int(sw) if sw else None


def _rope_config(d: dict, source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_scaling`.
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise MinikvError(f"{source}: rope scaling {rtype!r} is not supported; minikv supports "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    return RopeConfig(
        theta=theta,
        type=rtype,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
