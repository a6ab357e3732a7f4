"""Writing the two on-disk quantized formats: compressed-tensors `pack-quantized` and bitsandbytes NF4.

`packed_int_tensors` / `nf4_tensors` name and lay out one quantized linear's tensors, and
`compressed_tensors_config` / `bitsandbytes_config` write `config.json`'s `quantization_config`
as llm-compressor and transformers write them. Reading them back (the loader's side) is
`runtime.checkpoints.quantized`, which documents the layouts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from ..kernels.reference import NF4_VALUES
from ..runtime.checkpoints.quantized import NF4_STATE_KEY
from .quantize import IntQuantized, NF4Quantized

# The compressed-tensors release whose layout and config this module writes and is tested against.
COMPRESSED_TENSORS_VERSION = "0.20.1"


def pack_int32(values: torch.Tensor, num_bits: int, *, dim: int = 1) -> torch.Tensor:
    """Pack int8 values [R, C] into int32 words along `dim`, offset-binary, first value lowest.

    Args:
        values: int8 [R, C] in [-2^(b-1), 2^(b-1) - 1].
        num_bits: 4 or 8 (a word holds 32 / num_bits values; the last word is zero-padded).
        dim: 1 packs along rows (weights: [R, ceil(C*b/32)]); 0 along columns (zero points).

    Returns:
        int32 packed words.
    """
    assert values.dtype == torch.int8 and num_bits in (4, 8), (values.dtype, num_bits)
    if dim == 0:
        return pack_int32(values.T.contiguous(), num_bits).T.contiguous()
    R, C = values.shape
    per_word = 32 // num_bits
    words = -(-C // per_word)
    unsigned = values.to(torch.int64) + (1 << (num_bits - 1))
    unsigned = torch.nn.functional.pad(unsigned, (0, words * per_word - C)).view(R, words, per_word)
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int64)
    packed = (unsigned << shifts).sum(dim=-1)  # disjoint bit fields: the sum is an OR
    # Reinterpret the low 32 bits as a signed int32, as compressed-tensors stores them.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def packed_int_tensors(prefix: str, quantized: IntQuantized) -> list[tuple[str, torch.Tensor]]:
    """The compressed-tensors tensors of one linear `prefix` (e.g. `model.layers.0.mlp.up_proj`)."""
    N, K = quantized.q.shape
    tensors = [
        (f"{prefix}.weight_packed", pack_int32(quantized.q, quantized.num_bits)),
        (f"{prefix}.weight_scale", quantized.scale.contiguous()),
        (f"{prefix}.weight_shape", torch.tensor([N, K], dtype=torch.int64)),
    ]
    if quantized.zero_point is not None:
        tensors.append((f"{prefix}.weight_zero_point", pack_int32(quantized.zero_point, quantized.num_bits, dim=0)))
    return tensors


def quantized_tensors(prefix: str, quantized: IntQuantized | NF4Quantized) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of one quantized linear: `nf4_tensors` or `packed_int_tensors`."""
    if isinstance(quantized, NF4Quantized):
        return nf4_tensors(prefix, quantized)
    return packed_int_tensors(prefix, quantized)


def compressed_tensors_config(
    *,
    num_bits: int,
    group_size: int | None,
    symmetric: bool,
    ignore: list[str],
    observer: str = "minmax",
    actorder: str | None = None,
    int8_linears: Sequence[str] = (),
) -> dict[str, Any]:
    """`quantization_config` of a weight-only (W4A16 / W8A16) pack-quantized checkpoint.

    Args:
        num_bits: 4 or 8.
        group_size: input features per scale, or None for per-channel ("channel" strategy).
        symmetric: whether there are no zero points.
        ignore: module names left in float (e.g. ["lm_head"]).
        observer: how ranges were chosen ("minmax" or "mse"), recorded as llm-compressor does.
        actorder: "weight" when GPTQ ran with static act-order, else None.
        int8_linears: linears (e.g. ["lm_head"]) stored int8 per output channel, symmetric
            (W8A16) whatever the main scheme: the first group covers them when it is W8A16 itself,
            else a second group targets them by name (compressed-tensors picks a name target over
            the "Linear" class target).

    Returns:
        The dict, with the keys and defaults compressed-tensors' `QuantizationConfig` dumps.
    """
    assert not set(int8_linears) & set(ignore), (int8_linears, ignore)

    def group(weights: dict[str, Any], targets: list[str]) -> dict[str, Any]:
        return {
            "targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
            "format": "pack-quantized",
        }

    weights = _weight_args(num_bits, group_size, symmetric, observer)
    if actorder is not None:
        weights["actorder"] = actorder
    groups = {"group_0": group(weights, ["Linear"])}
    w8a16 = _weight_args(8, None, True, observer)
    if int8_linears and weights != w8a16:
        groups["group_1"] = group(w8a16, list(int8_linears))
    return {
        "config_groups": groups,
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def _weight_args(num_bits: int, group_size: int | None, symmetric: bool, observer: str) -> dict[str, Any]:
    """One group's `weights` (compressed-tensors' `QuantizationArgs`), static int."""
    return {
        "num_bits": num_bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": group_size,
        "strategy": "channel" if group_size is None else "group",
        "dynamic": False,
        "observer": observer,
    }


def nf4_tensors(prefix: str, quantized: NF4Quantized) -> list[tuple[str, torch.Tensor]]:
    """The bitsandbytes tensors of one linear, as `Linear4bit` saves them (double quantization)."""
    state = {
        "quant_type": "nf4",
        "blocksize": quantized.blocksize,
        "dtype": str(quantized.dtype).removeprefix("torch."),
        "shape": list(quantized.shape),
        "nested_blocksize": quantized.nested_blocksize,
        "nested_dtype": "float32",
        "nested_offset": quantized.offset.item(),
    }
    state_bytes = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return [
        (f"{prefix}.weight", quantized.packed),
        (f"{prefix}.weight.absmax", quantized.absmax),
        (f"{prefix}.weight.quant_map", torch.tensor(NF4_VALUES, dtype=torch.float32)),
        (f"{prefix}.weight.nested_absmax", quantized.nested_absmax),
        (f"{prefix}.weight.nested_quant_map", quantized.nested_code.clone()),
        (f"{prefix}.{NF4_STATE_KEY}", state_bytes),
    ]


def bitsandbytes_config(*, compute_dtype: torch.dtype, skip_modules: list[str]) -> dict[str, Any]:
    """`quantization_config` of a bitsandbytes NF4 + double-quant checkpoint, as transformers writes it."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
