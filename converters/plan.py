"""The plan of a conversion: the options checked against the model, and what happens to each linear.

Everything here runs before any tensor is read or written, so a mistake costs no work: the
scheme, calibration and head precision are checked, then the model (its config and its tensor
names), then the disk. `plan_conversion` decides per linear: quantized with the scheme (and its
group size), kept float (the embedding, the head by default, `keep`), or the head as int8.

What cannot be loaded is refused here, never written:
- a quantized embedding, and so an int8 head tied to it (`tie_word_embeddings`, SmolLM2's case):
  compressed-tensors 0.20 can compress an `nn.Embedding`, but transformers 5.24 cannot load one
  (its `_init_weights` reads the embedding's `weight`, which the compressed module no longer has);
- `int4-asym` with an int8 head: transformers loads asymmetric int4 only through
  `CompressedTensorsConfig(dequantize=True)`, which decodes every module with the first group's
  scheme, so it cannot read an int8 head beside int4 linears (that path also misreads the head of
  an `int4` output; its default path reads it exactly);
- `nf4` with an int8 head: a bitsandbytes checkpoint has one precision for all its quantized
  linears (4-bit or LLM.int8, never both).

Group size: int4 takes 32, 64 or 128, and compressed-tensors (0.20) needs it to divide every
quantized linear's input size (it refuses a padded last group when it decompresses); the default
is the largest of 128, 64, 32 that divides them all (SmolLM2's 576 gives 64).

It does not read weights, quantize or write: `convert.py` streams, `manifest.py` describes the output.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

import torch

from ..runtime.checkpoints import CheckpointReader, is_derived_key
from ..runtime.model.config import ModelConfig
from ..runtime.errors import CheckpointError, InvalidParameterError, QuadaptError, UnsupportedError
from ..runtime.model.model import checkpoint_linears, checkpoint_shapes
from .calibration_set import DEFAULT_CALIBRATION_TOKENS

Scheme = Literal["int4", "int4-asym", "int8", "nf4"]
Calibration = Literal["minmax", "mse", "gptq", "awq"]
HeadPrecision = Literal["float", "int8"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
HEAD_PRECISIONS: tuple[str, ...] = get_args(HeadPrecision)
CALIBRATED = ("gptq", "awq")  # the methods that run the model on calibration text
MIN_CALIB_TOKENS = 1024
INT4_GROUP_SIZES = (128, 64, 32)  # largest first: the default is the first that fits
EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"


@dataclass(frozen=True)
class Plan:
    """The validated options and, per module, what happens to it; fixed once planned.

    Attributes:
        scheme, group_size, calibration, actorder, lm_head: the checked options (`group_size` is
            the one chosen: None for int8, 64 for nf4).
        quantized: linear -> (N, K), quantized with the scheme; an int8 head is apart (`lm_head`).
        kept: module -> why it stays float.
        source: the source checkpoint's path, for messages and the manifest.

    What the conversion did (each linear's result, the calibration's data) is not part of the
    plan: the conversion records it in a `manifest.ConversionReport`.
    """

    scheme: str
    group_size: int | None
    calibration: str
    actorder: bool
    lm_head: str
    quantized: Mapping[str, tuple[int, int]]
    kept: Mapping[str, str]
    source: str

    def __post_init__(self) -> None:
        # Read-only views, so the plan cannot change under the conversion that follows it.
        object.__setattr__(self, "quantized", MappingProxyType(dict(self.quantized)))
        object.__setattr__(self, "kept", MappingProxyType(dict(self.kept)))

    @property
    def num_bits(self) -> int:
        return 8 if self.scheme == "int8" else 4

    @property
    def symmetric(self) -> bool:
        return self.scheme != "int4-asym"


def check_choices(scheme: str, calibration: str, lm_head: str) -> None:
    """Refuse a scheme, calibration or head precision that is not one of the closed choices.

    Raises:
        InvalidParameterError: naming the bad value and the choices.
    """
    for flag, value, choices in (
        ("scheme", scheme, SCHEMES), ("calibration", calibration, CALIBRATIONS), ("--lm-head", lm_head, HEAD_PRECISIONS)
    ):
        if value not in choices:
            raise InvalidParameterError(f"unknown {flag} {value!r}; choose one of {', '.join(choices)}")


def refuse_quantized_source(reader: CheckpointReader, config_dict: dict[str, Any]) -> None:
    """Raise if the source is already quantized (its config carries a `quantization_config`).

    Raises:
        UnsupportedError: with what to convert instead.
    """
    if "quantization_config" in config_dict:
        method = (config_dict["quantization_config"] or {}).get("quant_method", "unknown")
        raise UnsupportedError(
            f"{reader.path} is already quantized ({method}); quantizing quantized weights again compounds the "
            "error, so quadapt refuses it; convert from the float model instead"
        )


def plan_conversion(
    reader: CheckpointReader, config: ModelConfig, scheme: str, group_size: int | None, calibration: str,
    calib_text: str | Path | Sequence[str | Path] | None, actorder: bool | None, keep: Sequence[str], lm_head: str,
    calib_tokens: int = DEFAULT_CALIBRATION_TOKENS,
) -> Plan:
    """Check the options against the model, and decide per linear.

    Args:
        reader: the source checkpoint.
        config: its model config.
        scheme, group_size, calibration, calib_text, actorder, keep, lm_head, calib_tokens: as
            `convert_checkpoint` takes them.

    Returns:
        The plan.

    Raises:
        InvalidParameterError: a bad group size, a `keep` entry that matches nothing or leaves nothing
            to quantize, a calibration that does not apply to the scheme, a calibrated method without a
            tokenizer, a calibration text or `actorder` without a method that uses it, too few
            calibration tokens, an int8 head the scheme's format cannot hold.
        UnsupportedError: an int8 head tied to the embedding.
    """
    quantized, kept, group_size = plan_linears(config, scheme, group_size, keep, lm_head, str(reader.path))
    check_calibration(scheme, calibration)
    if calibration in CALIBRATED:
        if reader.tokenizer_files() is None:
            raise InvalidParameterError(
                f"{reader.path} carries no tokenizer, which calibration {calibration!r} needs to read its calibration text"
            )
    elif calib_text is not None:
        raise InvalidParameterError(
            f"--calib-text applies to the calibrated methods ({', '.join(CALIBRATED)}), not {calibration!r}; "
            "add --calibration gptq or awq, or drop --calib-text"
        )
    if actorder and calibration != "gptq":
        raise InvalidParameterError("--actorder applies to GPTQ only; add --calibration gptq or drop --actorder")
    actorder = calibration == "gptq" if actorder is None else actorder
    if calib_tokens < MIN_CALIB_TOKENS:
        raise InvalidParameterError(
            f"--calib-tokens {calib_tokens} is too few; give at least {MIN_CALIB_TOKENS} (the default, "
            f"{DEFAULT_CALIBRATION_TOKENS}, suits layers up to about 4,000 inputs wide)"
        )
    return Plan(scheme, group_size, calibration, actorder, lm_head, quantized, kept, str(reader.path))


def plan_linears(
    config: ModelConfig, scheme: str, group_size: int | None, keep: Sequence[str], lm_head: str, source: str
) -> tuple[dict[str, tuple[int, int]], dict[str, str], int | None]:
    """Decide per linear of a model whether it is quantized, and with which group size.

    The part of the plan that depends on the model's shape alone, so that quantizing a model in
    memory (`in_memory.py`) follows the same rules as converting its checkpoint.

    Args:
        config: the model config.
        scheme, group_size, keep, lm_head: as `convert_checkpoint` takes them (checked choices).
        source: where the model comes from, for messages.

    Returns:
        (linear -> (N, K) to quantize with the scheme, module -> why it stays float, the group size).

    Raises:
        InvalidParameterError: a bad group size, a `keep` entry that matches nothing or leaves
            nothing to quantize, an int8 head the scheme's format cannot hold.
        UnsupportedError: an int8 head tied to the embedding.
    """
    linears = checkpoint_linears(config)
    kept = {EMBEDDING: "embedding: stays float (transformers cannot load a quantized embedding)"}
    if lm_head == "int8":
        _check_int8_head(source, config, scheme, keep)
    elif config.tie_word_embeddings:
        kept[HEAD] = "output head: tied to the embedding, stays float"
    else:
        kept[HEAD] = "output head: stays float (default; --lm-head int8 quantizes it)"
    del linears[HEAD]
    for entry in keep:
        matched = [name for name in linears if _keep_matches(name, entry)]
        if not matched and not _keep_matches(HEAD, entry) and not _keep_matches(EMBEDDING, entry):
            raise InvalidParameterError(
                f"--keep {entry!r} matches no linear module; give a module name ({next(iter(linears))}), a suffix "
                "(down_proj) or a prefix (model.layers.0)"
            )
        for name in matched:
            kept[name] = f"--keep {entry}"
    quantized = {name: shape for name, shape in linears.items() if name not in kept}
    if not quantized:
        raise InvalidParameterError("--keep leaves no linear to quantize; remove some --keep entries")
    return quantized, kept, _group_size(scheme, group_size, quantized)


def check_calibration(scheme: str, calibration: str) -> None:
    """Refuse a calibration that does not apply to the scheme (`mse`, `gptq` and `awq` with nf4).

    Raises:
        InvalidParameterError: naming the calibration to use instead.
    """
    if calibration == "mse" and scheme == "nf4":
        raise InvalidParameterError(
            "calibration 'mse' does not apply to nf4: its block scale is the block's absmax by format; use minmax"
        )
    if calibration in CALIBRATED and scheme == "nf4":
        raise InvalidParameterError(f"calibration {calibration!r} is for int4/int8 schemes; nf4 uses minmax")


def _check_int8_head(source: str, config: ModelConfig, scheme: str, keep: Sequence[str]) -> None:
    """Refuse an int8 head the output format, or transformers reading it, cannot express."""
    if scheme == "nf4":
        raise InvalidParameterError(
            "--lm-head int8 cannot be written with nf4: a bitsandbytes checkpoint holds one precision for all its "
            "quantized linears (4-bit or 8-bit, not both); use --lm-head float, or a compressed-tensors scheme "
            "(--scheme int4 or int8)"
        )
    if scheme == "int4-asym":
        raise InvalidParameterError(
            "--lm-head int8 cannot be combined with int4-asym: transformers reads asymmetric int4 only by "
            "dequantizing every module with the first config group's scheme, which would misread an int8 head; "
            "use --scheme int4 (symmetric) or int8 with --lm-head int8, or keep --lm-head float"
        )
    if config.tie_word_embeddings:
        raise UnsupportedError(
            f"--lm-head int8: {source} ties the output head to the embedding (tie_word_embeddings), so an int8 "
            "head is an int8 embedding, which transformers cannot load from compressed-tensors; keep --lm-head float"
        )
    if any(_keep_matches(HEAD, entry) for entry in keep):
        raise InvalidParameterError("--keep lm_head and --lm-head int8 contradict each other; drop one of them")


def _keep_matches(module: str, entry: str) -> bool:
    return module == entry or module.endswith("." + entry) or module.startswith(entry + ".")


def _group_size(scheme: str, group_size: int | None, quantized: dict[str, tuple[int, int]]) -> int | None:
    """The int4 group size: the one given, checked, or the largest that divides every input size."""
    if scheme == "int8":
        if group_size is not None:
            raise InvalidParameterError(f"int8 is per output channel; --group-size {group_size} does not apply, drop it")
        return None
    if scheme == "nf4":
        if group_size not in (None, 64):
            raise InvalidParameterError(f"nf4 uses bitsandbytes' block size 64; --group-size {group_size} is not allowed")
        return 64
    in_sizes = sorted({k for _, k in quantized.values()})
    fitting = [g for g in INT4_GROUP_SIZES if all(k % g == 0 for k in in_sizes)]
    if group_size is None:
        if not fitting:
            raise InvalidParameterError(
                f"no int4 group size ({', '.join(map(str, INT4_GROUP_SIZES))}) divides every linear input size "
                f"{in_sizes}; keep the odd-sized linears float with --keep"
            )
        return fitting[0]
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidParameterError(
            f"--group-size {group_size} is not allowed for int4; choose one of {', '.join(map(str, INT4_GROUP_SIZES))}"
        )
    if group_size not in fitting:
        odd = sorted(name for name, (_, k) in quantized.items() if k % group_size)
        remedy = (
            f"use --group-size {' or '.join(map(str, fitting))}" if fitting
            else f"no allowed size divides them all; keep those linears float (--keep {odd[0].rsplit('.', 1)[-1]})"
        )
        raise InvalidParameterError(
            f"--group-size {group_size} does not divide the input size of {len(odd)} linear(s) (e.g. {odd[0]}, "
            f"{quantized[odd[0]][1]} inputs), and compressed-tensors cannot decompress a padded last group; {remedy}"
        )
    return group_size


def check_names(reader: CheckpointReader, config: ModelConfig) -> list[str]:
    """The source's tensor names to write, in order; refuse names the model does not have.

    Raises:
        CheckpointError: the source holds unexpected tensors or lacks expected ones.
    """
    expected = set(checkpoint_shapes(config))
    names, unknown = [], []
    for name in reader.keys():
        if is_derived_key(name) or (name == f"{HEAD}.weight" and config.tie_word_embeddings):
            continue  # derived state / the tied head, which the output does not store either
        (names if name in expected else unknown).append(name)
    missing = sorted(expected - set(names))
    if unknown or missing:
        raise CheckpointError(
            f"{reader.path} does not match its config: unexpected tensors {unknown[:5]}, missing {missing[:5]}; "
            "convert a checkpoint whose weights and config.json belong together"
        )
    return names


def float_dtype_name(config_dict: dict[str, Any]) -> str:
    """The checkpoint's float dtype as its config names it (`torch_dtype`, or `dtype` in newer configs)."""
    return config_dict.get("torch_dtype") or config_dict.get("dtype") or "float32"


def check_disk_space(out_dir: Path, config: ModelConfig, plan: Plan, config_dict: dict[str, Any]) -> None:
    """Refuse to start when the output's disk lacks room for the conversion (GPTQ and AWQ also spill the source).

    Raises:
        QuadaptError: naming what is needed and what is free.
    """
    needed = _estimate_bytes(config, plan, config_dict, spill=plan.calibration in CALIBRATED)
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise QuadaptError(
            f"not enough free disk space for {out_dir}: the conversion needs about {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free on {parent}; free some space or choose another --out"
        )


def _estimate_bytes(config: ModelConfig, plan: Plan, config_dict: dict[str, Any], *, spill: bool) -> int:
    """An upper estimate of the bytes the conversion writes (output, plus GPTQ's spill of the source)."""
    float_bytes = 2 if float_dtype_name(config_dict) in ("bfloat16", "float16") else 4
    total, source_total = 0, 0
    for name, shape in checkpoint_shapes(config).items():
        p = torch.empty(shape, device="meta")
        source_total += p.numel() * float_bytes
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan.quantized:
            N, K = p.shape
            scales = N * (1 if plan.group_size is None else -(-K // plan.group_size)) * float_bytes
            total += N * K * plan.num_bits // 8 + 2 * scales + 64
        elif name == f"{HEAD}.weight" and plan.lm_head == "int8":
            N, K = p.shape
            total += N * K + N * float_bytes + 64
        else:
            total += p.numel() * float_bytes
    return int(total * 1.05) + (source_total if spill else 0) + (16 << 20)
