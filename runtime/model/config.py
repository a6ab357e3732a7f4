"""Model configuration: one dataclass for the Llama family, read from an HF `config.json`.

`ModelConfig.from_dict` keeps the fields quadapt uses and refuses what it cannot run, with a
message that says why. It reads both spellings of RoPE settings (`rope_theta` + `rope_scaling`,
and transformers 5's `rope_parameters`). It does not read files or build models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import CheckpointError, ConfigError, QuadaptError, UnsupportedError

Architecture = Literal["llama", "mistral", "qwen2"]

# HF `architectures` entry -> our family name. SmolLM is a Llama.
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_TYPES: dict[str, Architecture] = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

RopeType = Literal["default", "linear", "llama3"]


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `default` is none; `linear` divides positions by `factor`;
    `llama3` is Llama 3.1's smooth per-frequency rescaling."""

    rope_type: RopeType = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedError(
                f"rope scaling type {self.rope_type!r} is not supported; supported: default, linear, llama3"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            if self.original_max_position_embeddings is None:
                raise ConfigError("llama3 rope scaling needs original_max_position_embeddings in config.json")
            if self.high_freq_factor <= self.low_freq_factor:
                raise ConfigError(
                    f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                    f"{self.high_freq_factor} and {self.low_freq_factor}"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RopeScaling:
        if not d:
            return cls()
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type in ("dynamic", "yarn", "longrope", "su", "mrope"):
            raise UnsupportedError(
                f"rope scaling type {rope_type!r} is not supported; supported: default, linear, llama3. "
                "Remove rope_scaling from config.json only if the model was trained without it."
            )
        return cls(
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=d.get("original_max_position_embeddings"),
        )


@dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM).

    Field names follow HF `config.json`. `max_position_embeddings` is the context quadapt will run:
    for a Mistral with a sliding window shorter than its nominal context it is the window, since
    within the window sliding attention equals full attention.
    """

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o (Llama's `attention_bias`)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(
                f"config.json: rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps} and {self.rope_theta}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from an HF `config.json` dict, keeping the fields quadapt uses.

        Raises:
            UnsupportedError: an architecture, activation, rope scaling or attention variant
                quadapt cannot run.
            ConfigError: a required field is missing or has an invalid value.
        """
        arch = _architecture(d)
        act = d.get("hidden_act", d.get("hidden_activation", "silu"))
        if act != "silu":
            raise UnsupportedError(f"config.json: hidden_act {act!r} is not supported; Llama-family models use 'silu'")
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            vocab_size = int(d["vocab_size"])
            intermediate = int(d["intermediate_size"])
            layers = int(d["num_hidden_layers"])
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a non-integer size field: {e}") from None
        rotary = (d.get("rope_parameters") or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if rotary != 1.0:
            raise UnsupportedError(f"config.json: partial_rotary_factor {rotary} is not supported; quadapt rotates whole heads")
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads
        max_pos = int(d.get("max_position_embeddings", 2048))

        rope = d.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_scaling = RopeScaling.from_dict(scaling)

        window = _sliding_window(d, arch)
        if window is not None and window < max_pos:
            max_pos = window

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            qkv_bias=arch == "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a `config.json` file (or the one inside a checkpoint directory)."""
        return cls.from_dict(read_config_json(path))


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read `config.json` from a file path or a checkpoint directory.

    Raises:
        CheckpointError: no config.json, or it is not valid JSON.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(
            f"{str(path)!r} has no config.json; a checkpoint directory needs the model's config.json "
            "beside its *.safetensors (or pass a .gguf file)"
        )
    return read_json_object(file, CheckpointError)


def read_json_object(file: Path, error: type[QuadaptError], hint: str = "") -> dict[str, Any]:
    """The JSON object in `file`.

    Raises:
        `error`: the file is not UTF-8 JSON, or holds something other than an object; `hint`
            (how to fix it) ends the message.
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{str(file)!r} is not valid JSON: {e}{hint}") from None
    if not isinstance(data, dict):
        raise error(f"{str(file)!r} must hold a JSON object, got {type(data).__name__}{hint}")
    return data


def _architecture(d: dict[str, Any]) -> Architecture:
    archs = d.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    model_type = d.get("model_type")
    if not archs and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    named = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise UnsupportedError(
        f"config.json: architecture {named} is not supported; quadapt runs "
        f"{', '.join(ARCHITECTURES)} (Llama, Mistral, Qwen2, SmolLM)"
    )


def _sliding_window(d: dict[str, Any], arch: Architecture) -> int | None:
    """The attention window quadapt must respect, or None when attention is full."""
    window = d.get("sliding_window")
    if window is None:
        return None
    if arch == "qwen2":
        if not d.get("use_sliding_window", False):
            return None
        # Qwen2 applies the window only from layer max_window_layers on; mixed layers are not run.
        raise UnsupportedError(
            "config.json: Qwen2 with use_sliding_window=true is not supported; quadapt runs full attention only"
        )
    return int(window)
