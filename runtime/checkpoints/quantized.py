"""Reading the two on-disk quantized formats: compressed-tensors `pack-quantized` and bitsandbytes NF4.

`quantized_linears` reads a checkpoint's `quantization_config` into one `LinearSpec` per quantized
linear (the rest stay float); `check_linear_shape` refuses a layout the runtime cannot hold before
any module is built; `checkpoint_keys` lists the tensors a quantized linear must have on disk, and
`module_buffers` checks them and turns them into the buffers of a `runtime.quant` module.
Anything these formats allow but quadapt cannot run is refused with `UnsupportedError`. Writing
them is `converters.formats`.

Layouts (see `notes/quant.md` §1.1, §1.5):
- compressed-tensors: `P.weight_packed` int32 [N, ceil(K*b/32)] (32/b offset-binary values a word,
  the first in the lowest bits), `P.weight_scale` [N, G], `P.weight_shape` int64 [2] = (N, K),
  `P.weight_zero_point` int32 [ceil(N*b/32), G] packed along N when asymmetric.
- bitsandbytes: `P.weight` uint8 [ceil(N*K/2), 1], `P.weight.absmax` (uint8 when double-quantized,
  else float32), `P.weight.quant_map` float32 [16], `P.weight.nested_absmax`,
  `P.weight.nested_quant_map` float32 [256], `P.weight.quant_state.bitsandbytes__nf4` (UTF-8
  JSON bytes: quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ...kernels.reference import NF4_VALUES, unpack_int32
from ..errors import CheckpointError, UnsupportedError

NF4_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PackedIntSpec:
    """A compressed-tensors pack-quantized linear: `num_bits` 4 or 8, `group_size` None = per channel."""

    num_bits: int
    group_size: int | None
    symmetric: bool


@dataclass(frozen=True)
class NF4Spec:
    """A bitsandbytes NF4 linear; `double_quant` says whether its absmax is nested."""

    double_quant: bool


LinearSpec = PackedIntSpec | NF4Spec


def quantized_linears(config: dict[str, Any], linear_names: Iterable[str]) -> dict[str, LinearSpec]:
    """Which linears a checkpoint's `quantization_config` quantizes, and how.

    Args:
        config: the checkpoint's `config.json` dict (holding `quantization_config`).
        linear_names: every linear module of the model (`model.layers.0.self_attn.q_proj`, `lm_head`).

    Returns:
        module name -> spec, for the quantized ones only.

    Raises:
        UnsupportedError: a quantization method, format or scheme quadapt cannot run.
    """
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"config.json: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors_linears(qc, linear_names)
    if method == "bitsandbytes":
        return _bitsandbytes_linears(qc, linear_names)
    raise UnsupportedError(
        f"config.json: quantization method {method!r} is not supported; quadapt loads 'compressed-tensors' "
        "(pack-quantized int4/int8) and 'bitsandbytes' (NF4) checkpoints; convert the float model with "
        "`quadapt convert` instead"
    )


def _compressed_tensors_linears(qc: dict[str, Any], linear_names: Iterable[str]) -> dict[str, LinearSpec]:
    status = qc.get("quantization_status")
    if status != "compressed":
        raise UnsupportedError(
            f"config.json: compressed-tensors quantization_status {status!r} is not supported; quadapt loads "
            "'compressed' checkpoints (packed weights), as llm-compressor saves them"
        )
    ignore = qc.get("ignore") or []
    groups = qc.get("config_groups") or {}
    specs: dict[str, LinearSpec] = {}
    for name in linear_names:
        if any(_ct_match(name, target) is not None for target in ignore):
            continue
        # compressed-tensors' precedence: a group naming the module beats a regex, which beats the class.
        ranked = sorted(
            (rank, i, group_name)
            for i, (group_name, group) in enumerate(groups.items())
            for target in group.get("targets", [])
            if (rank := _ct_match(name, target)) is not None
        )
        if ranked:
            group_name = ranked[0][2]
            group = groups[group_name]
            specs[name] = _ct_spec(group_name, group, group.get("format") or qc.get("format"))
    return specs


def _ct_match(name: str, target: str) -> int | None:
    """compressed-tensors' target rule for a linear, as its precedence rank: 0 its name, 1 a `re:`
    regex, 2 its class ("Linear"); None when `target` does not select it."""
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) is not None else None
    return 0 if target == name else 2 if target == "Linear" else None


def _ct_spec(group_name: str, group: dict[str, Any], fmt: str | None) -> PackedIntSpec:
    where = f"config.json: quantization_config.config_groups.{group_name}"
    if fmt != "pack-quantized":
        raise UnsupportedError(f"{where}: format {fmt!r} is not supported; quadapt loads 'pack-quantized'")
    if group.get("input_activations") or group.get("output_activations"):
        raise UnsupportedError(f"{where}: activation quantization is not supported; quadapt runs weight-only (W4A16, W8A16)")
    w = group.get("weights") or {}
    num_bits, strategy = w.get("num_bits"), w.get("strategy")
    if w.get("type", "int") != "int" or num_bits not in (4, 8) or w.get("dynamic"):
        raise UnsupportedError(f"{where}: weights {w} are not supported; quadapt runs static int4 or int8 weights")
    if w.get("actorder") not in (None, "weight", "static"):
        raise UnsupportedError(f"{where}: actorder {w.get('actorder')!r} needs g_idx, which quadapt does not read")
    if strategy == "group" and isinstance(w.get("group_size"), int) and w["group_size"] > 0:
        return PackedIntSpec(num_bits=num_bits, group_size=w["group_size"], symmetric=bool(w.get("symmetric", True)))
    if strategy == "channel":
        return PackedIntSpec(num_bits=num_bits, group_size=None, symmetric=bool(w.get("symmetric", True)))
    raise UnsupportedError(f"{where}: strategy {strategy!r} is not supported; quadapt runs 'group' and 'channel'")


def _bitsandbytes_linears(qc: dict[str, Any], linear_names: Iterable[str]) -> dict[str, LinearSpec]:
    if not qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        raise UnsupportedError(
            "config.json: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; quadapt loads 4-bit NF4"
        )
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type != "nf4":
        raise UnsupportedError(f"config.json: bnb_4bit_quant_type {quant_type!r} is not supported; quadapt loads 'nf4'")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise UnsupportedError(f"config.json: bnb_4bit_quant_storage {storage!r} is not supported; quadapt loads 'uint8'")
    skip = qc.get("llm_int8_skip_modules")
    skip = ["lm_head"] if skip is None else skip  # transformers keeps the output head float by default
    spec = NF4Spec(double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)))
    return {name: spec for name in linear_names if not any(_bnb_skipped(name, pattern) for pattern in skip)}


def _bnb_skipped(name: str, pattern: str) -> bool:
    """transformers' `should_convert_module` rule: a prefix to a module boundary, a regex, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return re.match(rf"(?:{pattern}){boundary}", name) is not None or name.endswith(pattern)


def check_linear_shape(module: str, spec: LinearSpec, shape: tuple[int, int], source: str) -> None:
    """Refuse a quantized linear of shape (N, K) that its spec cannot describe, before it is built.

    Raises:
        UnsupportedError: a group size that does not divide K (a padded last group, which
            compressed-tensors cannot decompress either).
    """
    K = shape[1]
    if isinstance(spec, PackedIntSpec) and spec.group_size is not None and K % spec.group_size:
        raise UnsupportedError(
            f"{source}: {module} has {K} input features, not a multiple of group_size {spec.group_size}; "
            "compressed-tensors cannot decompress such a group either. Convert the float model again with "
            "a group size that divides every layer's input size (e.g. --group-size 32)"
        )


def checkpoint_keys(module: str, spec: LinearSpec) -> list[str]:
    """The tensor names a quantized linear `module` has on disk (its bias aside)."""
    if isinstance(spec, PackedIntSpec):
        suffixes = ["weight_packed", "weight_scale", "weight_shape"] + ([] if spec.symmetric else ["weight_zero_point"])
    else:
        suffixes = ["weight", "weight.absmax", "weight.quant_map", NF4_STATE_KEY]
        suffixes += ["weight.nested_absmax", "weight.nested_quant_map"] if spec.double_quant else []
    return [f"{module}.{suffix}" for suffix in suffixes]


def module_buffers(
    module: str, spec: LinearSpec, tensors: dict[str, torch.Tensor], shape: tuple[int, int], source: str
) -> dict[str, Any]:
    """Check one quantized linear's tensors and turn them into its runtime buffers.

    Args:
        module: the module name; `tensors` is keyed by the full names of `checkpoint_keys`.
        spec: what the config says the module is.
        tensors: the module's tensors as read from the checkpoint.
        shape: (N, K) the model config implies.
        source: the checkpoint path, for messages.

    Returns:
        Buffer and attribute values for `PackedIntLinear` (weight_packed, weight_scale,
        weight_zero_point) or `NF4Linear` (weight_packed, absmax, dtype).

    Raises:
        CheckpointError: a tensor has the wrong shape, dtype or contents.
    """
    t = {name[len(module) + 1 :]: value for name, value in tensors.items()}

    def check(key: str, expected_shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
        value = t[key]
        if tuple(value.shape) != expected_shape or value.dtype not in dtypes:
            raise CheckpointError(
                f"{source}: tensor {module}.{key} is {value.dtype} {tuple(value.shape)}, but the quantization_config "
                f"and the model shape {shape} imply {'/'.join(map(str, dtypes))} {expected_shape}; the weights and "
                "config.json belong to different models, convert again"
            )
        return value

    N, K = shape
    check_linear_shape(module, spec, shape, source)
    if isinstance(spec, PackedIntSpec):
        groups = 1 if spec.group_size is None else K // spec.group_size
        check("weight_packed", (N, -(-K * spec.num_bits // 32)), (torch.int32,))
        scale = check("weight_scale", (N, groups), tuple(_DTYPES.values()))
        stated = check("weight_shape", (2,), (torch.int64, torch.int32))
        if stated.tolist() != [N, K]:
            raise CheckpointError(f"{source}: {module}.weight_shape says {stated.tolist()}, the model config implies {[N, K]}")
        zero = None
        if not spec.symmetric:
            packed_zero = check("weight_zero_point", (-(-N * spec.num_bits // 32), groups), (torch.int32,))
            zero = unpack_int32(packed_zero.T.contiguous(), spec.num_bits, N).T.contiguous()
        return {"weight_packed": t["weight_packed"], "weight_scale": scale, "weight_zero_point": zero}

    state = _nf4_state(module, t[NF4_STATE_KEY], source)
    if state.get("quant_type") != "nf4" or list(state.get("shape", [])) != [N, K] or state.get("dtype") not in _DTYPES:
        raise CheckpointError(
            f"{source}: {module}'s bitsandbytes quant_state {state} does not describe an nf4 weight of shape "
            f"{[N, K]} in float32/bfloat16/float16; the checkpoint does not match config.json"
        )
    blocksize = state.get("blocksize")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise CheckpointError(f"{source}: {module}'s quant_state blocksize {blocksize!r} is not a bitsandbytes block size")
    n_blocks = -(-N * K // blocksize)
    packed = check("weight", ((N * K + 1) // 2, 1), (torch.uint8,))
    quant_map = check("weight.quant_map", (16,), (torch.float32,))
    if not torch.equal(quant_map, torch.tensor(NF4_VALUES, dtype=torch.float32)):
        raise CheckpointError(f"{source}: {module}.weight.quant_map is not the NF4 code book; the file is damaged")
    if spec.double_quant:
        nested_blocksize = state.get("nested_blocksize")
        if "nested_offset" not in state or not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
            raise CheckpointError(f"{source}: {module}'s quant_state lacks nested_offset/nested_blocksize for double quantization")
        qabsmax = check("weight.absmax", (n_blocks,), (torch.uint8,))
        nested = check("weight.nested_absmax", (-(-n_blocks // nested_blocksize),), (torch.float32,))
        code = check("weight.nested_quant_map", (256,), (torch.float32,))
        offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
        absmax = resolve_nested_absmax(qabsmax, nested, code, offset, nested_blocksize)
    else:
        absmax = check("weight.absmax", (n_blocks,), (torch.float32,))
    return {"weight_packed": packed.reshape(-1), "absmax": absmax, "dtype": _DTYPES[state["dtype"]], "blocksize": blocksize}


def _nf4_state(module: str, raw: torch.Tensor, source: str) -> dict[str, Any]:
    try:
        state = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: {module}.{NF4_STATE_KEY} is not UTF-8 JSON ({e}); the file is damaged") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: {module}.{NF4_STATE_KEY} must hold a JSON object")
    return state


def resolve_nested_absmax(
    qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor | float,
    nested_blocksize: int,
) -> torch.Tensor:
    """float32 absmax = nested_code[q] * nested_absmax[block] + offset (bitsandbytes' order)."""
    values = nested_code[qabsmax.long()]
    n = values.numel()
    full = n - n % nested_blocksize
    out = (values[:full].view(-1, nested_blocksize) * nested_absmax[: full // nested_blocksize].view(-1, 1)).reshape(full)
    if full < n:
        out = torch.cat((out, values[full:] * nested_absmax[-1]))
    return out + offset
