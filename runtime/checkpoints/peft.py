"""Reading the PEFT LoRA adapter format strictly, resolved per module.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with tensors
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]
(notes/serving.md §3.7). `read_peft_adapter` turns it into a `PeftAdapter`: one `LoRAWeights`
per HF module name with the rank and alpha PEFT would give that module (its `rank_pattern` and
`alpha_pattern` resolved as `peft.utils.other.get_pattern_key` does). Anything the runtime would
serve differently from PEFT is refused with the reason: DoRA, `modules_to_save`, biases,
embedding LoRA, `fan_in_fan_out`, init methods that modify the base weights, other LoRA variants
and non-LoRA PEFT types. Pickle weights (`adapter_model.bin`) are never loaded.

Reading is two steps so a caller can refuse an adapter before paying for it: `read_peft_header`
checks the config, the weights file's size and the factor shapes from the safetensors header
(no tensor data), and `read_peft_weights` then reads the tensors.

Checking an adapter against a base model is `peft_fit.py`; writing adapters is
`converters.peft`. This file knows only the format, and only reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.config import read_json_object
from ..errors import AdapterError, UnsupportedError, quote
from ..model.lora import LoRAWeights

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# The largest adapter_model.safetensors read unless a caller says otherwise. Rank 64 on every
# projection of an 8B Llama is 0.67 GB in fp32, so real adapters fit; the cap bounds what one
# careless or hostile LoadAdapter can make a server map and copy into memory.
MAX_ADAPTER_BYTES = 1 << 30
# adapter_config.json is read whole; a real one (rank_pattern included) is a few KB.
_MAX_CONFIG_BYTES = 16 << 20

_WEIGHT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
# Keys of PEFT features the runtime does not serve, each with the reason given to the user.
_REFUSED_KEYS = (
    (re.compile(r"\.lora_embedding_[AB]$"), ("embedding LoRA (lora_embedding_A/B) is not supported; "
     "quadapt applies LoRA to linear projections only; retrain without embed_tokens/lm_head in target_modules")),
    (re.compile(r"(^|\.)(embed_tokens|lm_head)\.base_layer\.weight$"), ("a full embedding or lm_head weight saved "
     "beside the LoRA (PEFT does that when target_modules names embed_tokens or lm_head); LoRA on the embedding or "
     "lm_head is not supported; retrain without them in target_modules")),
    (re.compile(r"\.lora_magnitude_vector$"), ("DoRA (lora_magnitude_vector) is not supported; merge it into the "
     "base with peft's merge_and_unload() and serve the merged model, or retrain without use_dora")),
    (re.compile(r"\.lora_B\.bias$"), "LoRA biases (lora_bias=True) are not supported; retrain with lora_bias=False"),
    (re.compile(r"trainable_tokens"), "trainable token deltas (trainable_token_indices) are not supported"),
    (re.compile(r"\.lora_[AB]\.[^.]+\.weight$"), ("the key still carries an adapter name; save the adapter with "
     "peft's save_pretrained(), which strips it")),
)
# Config keys that describe the adapter without changing what it computes at inference.
_METADATA_KEYS = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "eva_config", "corda_config", "lora_ga_config", "loftq_config",
}
# Config keys quadapt reads itself; every other key must hold a neutral value (None, False, {}, ...).
_HANDLED_KEYS = {
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "layers_pattern", "init_lora_weights", "bias",
}
_REFUSED_CONFIG = {
    "use_dora": "DoRA (use_dora) is not supported; merge it into the base with peft's merge_and_unload() and serve "
    "the merged model, or retrain without use_dora",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported; quadapt serves LoRA factors "
    "only; retrain without modules_to_save, or merge the adapter and serve the merged model",
    "lora_bias": "LoRA biases (lora_bias) are not supported; retrain with lora_bias=False",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D bases) is not supported; Llama-family bases store "
    "nn.Linear weights",
    "layer_replication": "layer_replication is not supported; it changes the base model's layer stack",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported; target linear modules",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) is not supported",
}
# init_lora_weights values whose adapters apply to the unmodified base (others rewrite the base).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter, resolved per module.

    Attributes:
        modules: HF module name (`model.layers.0.self_attn.q_proj`) -> its factors, rank and alpha.
        config: `adapter_config.json` as read (target_modules etc. still in PEFT's own terms).
        path: the directory it was read from, or None when made in memory.
    """

    modules: dict[str, LoRAWeights]
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    @property
    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """HF module name -> (lora_A shape, lora_B shape)."""
        return {name: (tuple(w.a.shape), tuple(w.b.shape)) for name, w in self.modules.items()}

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory adapter>"


@dataclass(frozen=True)
class PeftHeader:
    """A PEFT adapter as its files describe it before any tensor is read: the checked config and
    each module's factor shapes from the safetensors header. It holds no weights.

    Attributes:
        path: the adapter directory.
        config: `adapter_config.json`, checked by `check_adapter_config`.
        shapes: HF module name -> (lora_A shape [r, in], lora_B shape [out, r]), with r the rank
            the config gives the module; sorted by name.
    """

    path: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def max_rank(self) -> int:
        return max(a[0] for a, _ in self.shapes.values())

    @property
    def name(self) -> str:
        return str(self.path)


def read_peft_adapter(path: str | Path, *, max_bytes: int = MAX_ADAPTER_BYTES) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter directory: `read_peft_header`, then `read_peft_weights`.

    Args:
        path: a directory with `adapter_config.json` and `adapter_model.safetensors`.
        max_bytes: the largest weights file read; a larger one is refused before any tensor is read.

    Returns:
        The adapter, its modules sorted by name.

    Raises:
        AdapterError: missing files, a weights file above `max_bytes`, malformed config, unexpected
            keys, rank mismatches, non-float or non-finite weights.
        UnsupportedError: a PEFT feature the runtime does not serve (DoRA, modules_to_save, ...).
    """
    return read_peft_weights(read_peft_header(path, max_bytes=max_bytes))


def read_peft_header(path: str | Path, *, max_bytes: int = MAX_ADAPTER_BYTES) -> PeftHeader:
    """Check a PEFT adapter directory without reading its tensors: the config, the weights file's
    size, its keys, and each module's factor shapes against the rank the config gives it.

    Args:
        path: a directory with `adapter_config.json` and `adapter_model.safetensors`.
        max_bytes: the largest weights file accepted.

    Returns:
        The config and the factor shapes; `read_peft_weights` reads the tensors.

    Raises:
        AdapterError: missing files, a weights file above `max_bytes`, malformed config, unexpected
            keys, a factor missing, or shapes that disagree with the config's rank.
        UnsupportedError: a PEFT feature the runtime does not serve (DoRA, modules_to_save, ...).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError) as e:  # a name too long for the file system, or one holding NUL
        raise AdapterError(f"adapter path {quote(str(path), 256)} cannot be looked up ({type(e).__name__}: "
                           f"{quote(str(e))}); pass a PEFT adapter directory") from None
    if not is_dir:
        raise AdapterError(f"adapter path {quote(str(path), 256)} is not a directory; pass a PEFT adapter directory")
    config = _read_config(path)
    check_adapter_config(config, where=str(path / ADAPTER_CONFIG))
    file = _weights_file(path)
    size = file.stat().st_size
    if size > max_bytes:
        raise AdapterError(
            f"{str(file)!r} is {size} bytes, above the limit of {max_bytes} bytes for one adapter; nothing was "
            "read. Use a smaller adapter (lower rank, fewer target modules), or, if it is trusted, raise the "
            "limit (max_bytes)"
        )
    try:
        with safe_open(file, framework="pt") as f:
            shapes = _factor_shapes(f, file, config)
    except SafetensorError as e:
        raise _unreadable(file, e) from None
    return PeftHeader(path=path, config=config, shapes=shapes)


def read_peft_weights(header: PeftHeader) -> PeftAdapter:
    """Read the tensors `header` describes.

    Raises:
        AdapterError: non-float or non-finite weights, or a weights file that changed since
            `header` was read.
    """
    from safetensors import SafetensorError, safe_open

    file = header.path / ADAPTER_WEIGHTS
    use_rslora = bool(header.config.get("use_rslora", False))
    modules: dict[str, LoRAWeights] = {}
    try:
        with safe_open(file, framework="pt") as f:
            # The checks the caller made on `header` hold only for the file they were made on.
            if _factor_shapes(f, file, header.config) != header.shapes:
                raise AdapterError(f"{str(file)!r} changed while it was being read; load the adapter again")
            for name in header.shapes:
                a = _read_tensor(f, file, f"{KEY_PREFIX}{name}.lora_A.weight")
                b = _read_tensor(f, file, f"{KEY_PREFIX}{name}.lora_B.weight")
                _, alpha = module_rank_alpha(header.config, name)
                modules[name] = LoRAWeights(a=a, b=b, alpha=alpha, use_rslora=use_rslora)
    except SafetensorError as e:
        raise _unreadable(file, e) from None
    return PeftAdapter(modules=modules, config=header.config, path=header.path)


def check_adapter_config(config: Mapping[str, Any], *, where: str) -> None:
    """Refuse a config whose adapter quadapt would not compute exactly as PEFT does.

    Raises:
        UnsupportedError: a PEFT type, variant or option the runtime does not serve.
        AdapterError: r or lora_alpha missing or invalid.
    """
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"{where}: peft_type {peft_type!r} is not supported; quadapt serves LORA adapters only")
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise UnsupportedError(f"{where}: task_type {task!r} is not supported; quadapt serves CAUSAL_LM adapters")
    for key, reason in _REFUSED_CONFIG.items():
        if not _is_neutral(config.get(key)):
            raise UnsupportedError(f"{where}: {key}={config[key]!r}: {reason}")
    bias = config.get("bias", "none")
    if bias != "none":
        raise UnsupportedError(
            f"{where}: bias={bias!r} is not supported; quadapt serves adapters with bias='none' (trained biases "
            "would change the base); retrain with bias='none'"
        )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise UnsupportedError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights (or changes the forward); "
            "quadapt serves adapters for the unmodified base. Save the adapter with peft's "
            "path_initial_model_for_weight_conversion, or merge it and serve the merged model"
        )
    for key, value in config.items():
        if key in _METADATA_KEYS or key in _HANDLED_KEYS or key in _REFUSED_CONFIG:
            continue
        if not _is_neutral(value):
            raise UnsupportedError(
                f"{where}: {key}={value!r} is a PEFT option quadapt does not know; it may change what the "
                "adapter computes, so the adapter is refused. Remove the option only if it is inert"
            )
    r = config.get("r")
    if not _positive_int(r):
        raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if not _finite_number(alpha):
        raise AdapterError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise AdapterError(f"{where}: {key} {value!r} is not a valid regular expression: {e}") from None
        elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise AdapterError(f"{where}: {key} must be a list of module names or a regex string, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{where}: {key} must be an object of module pattern -> number, got {pattern!r}")
        for k, v in pattern.items():
            try:
                re.compile(k)
            except re.error as e:
                raise AdapterError(f"{where}: {key} key {k!r} is not a valid regular expression: {e}") from None
            if key == "rank_pattern" and not _positive_int(v):
                raise AdapterError(f"{where}: rank_pattern[{k!r}] must be a positive integer, got {v!r}")
            if key == "alpha_pattern" and not _finite_number(v):
                raise AdapterError(f"{where}: alpha_pattern[{k!r}] must be a finite number, got {v!r}")


def module_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module` (an HF module name): the first `rank_pattern` /
    `alpha_pattern` key matching the end of the name at a dot boundary, else `r` / `lora_alpha`."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return int(rank), float(alpha)


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    # peft.utils.other.get_pattern_key: dict order, first key with re.match(rf"(.*\.)?({key})$").
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(
            f"{str(path)!r} has no {ADAPTER_CONFIG}; a PEFT adapter directory needs it beside "
            f"{ADAPTER_WEIGHTS} (save the adapter with peft's save_pretrained())"
        )
    size = file.stat().st_size
    if size > _MAX_CONFIG_BYTES:
        raise AdapterError(
            f"{str(file)!r} is {size} bytes, above the {_MAX_CONFIG_BYTES} bytes an adapter config may have; "
            "it is not a PEFT adapter_config.json"
        )
    return read_json_object(file, AdapterError)


def _weights_file(path: Path) -> Path:
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        pickles = [p.name for p in sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))]
        hint = (
            f" It holds {', '.join(pickles)}: pickle files, which quadapt never loads. Re-save the adapter with "
            "peft's save_pretrained(safe_serialization=True) to get adapter_model.safetensors."
            if pickles
            else ""
        )
        raise AdapterError(f"{str(path)!r} has no {ADAPTER_WEIGHTS}.{hint}")
    return file


def _factor_shapes(f: Any, file: Path, config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """module name -> (lora_A shape, lora_B shape) from an open safetensors header, every key
    accounted for and every shape checked against the config's rank; no tensor data is read."""
    keys = list(f.keys())
    _check_keys(file, keys)
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in keys:
        m = _WEIGHT_KEY.match(key)
        factors.setdefault(m["module"], {})[m["factor"]] = tuple(f.get_slice(key).get_shape())
    shapes = {}
    for name in sorted(factors):
        a, b = factors[name].get("lora_A"), factors[name].get("lora_B")
        if a is None or b is None:
            missing = "lora_A" if a is None else "lora_B"
            raise AdapterError(f"{file.parent}: module {name!r} has no {missing}.weight; the adapter file is incomplete")
        rank, _ = module_rank_alpha(config, name)
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise AdapterError(
                f"{file.parent}: module {name!r} has lora_A {a} and lora_B {b}, but "
                f"adapter_config.json gives it rank {rank} (r, rank_pattern); expected lora_A [{rank}, in] and "
                f"lora_B [out, {rank}]. The config and weights come from different adapters"
            )
        shapes[name] = (a, b)
    if not shapes:
        raise AdapterError(f"{file.parent}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return shapes


def _read_tensor(f: Any, file: Path, key: str) -> torch.Tensor:
    tensor = f.get_tensor(key)
    if not tensor.is_floating_point():
        raise AdapterError(f"{file}: tensor {key!r} has dtype {tensor.dtype}; LoRA weights must be float")
    if not torch.isfinite(tensor).all():
        raise AdapterError(
            f"{file}: tensor {key!r} holds NaN or Inf values; the adapter is broken (diverged training "
            "or a damaged file) and cannot be served"
        )
    return tensor


def _unreadable(file: Path, error: Exception) -> AdapterError:
    return AdapterError(f"{str(file)!r} is not a readable safetensors file ({error}); it is truncated or corrupt")


def _check_keys(file: Path, keys: list[str]) -> None:
    """Refuse keys other than LoRA factors, naming the PEFT feature behind them when known.

    Features are checked across all keys first: PEFT saves an embedding LoRA with the full
    embedding beside it, and the LoRA, not the stray tensor, is what the user must hear about.
    """
    odd = [k for k in keys if not _WEIGHT_KEY.match(k)]
    for pattern, reason in _REFUSED_KEYS:
        for key in odd:
            if pattern.search(key):
                raise UnsupportedError(f"{file}: tensor {key!r}: {reason}")
    if odd:
        raise AdapterError(
            f"{file}: unexpected tensor {odd[0]!r}; a LoRA adapter holds only "
            f"'{KEY_PREFIX}<module>.lora_A.weight' and '.lora_B.weight' (full tensors such as modules_to_save "
            "are not supported); re-save the adapter with peft's save_pretrained()"
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_neutral(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == "" or value == "none"
