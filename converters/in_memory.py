"""Quantizing a loaded float model in place, by `quadapt convert`'s rules, for work that needs no checkpoint.

`quantize_model` takes a runtime `CausalLM` whose linears are float and swaps each planned linear
for the `runtime.quant` module that loading `convert`'s output would build: the same plan
(`plan.plan_linears`: the scheme's group size, the largest of 128, 64, 32 that divides every
quantized input size by default; `keep`; the head float unless `lm_head="int8"`), the same
quantization (`convert.quantize_linear`), the same checkpoint tensors (`formats.quantized_tensors`)
turned into module buffers by the loader's own check (`checkpoints.quantized.module_buffers`). So
a model quantized here holds, buffer for buffer, what `load_model(convert_checkpoint(...))` holds.
QLoRA training quantizes its float base this way.

It does not calibrate: GPTQ and AWQ run the model on calibration text layer by layer from a
checkpoint (`calibrate.py`), so they are refused here; convert the checkpoint and load it instead.
It writes nothing and keeps no report (`convert.py` does both).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..runtime.checkpoints.quantized import NF4Spec, PackedIntSpec, module_buffers
from ..runtime.errors import InvalidParameterError, UnsupportedError
from ..runtime.model.fused import checkpoint_module, stack_modules, stacked_name
from ..runtime.model.model import CausalLM
from ..runtime.model.quant import NF4Linear, PackedIntLinear
from .convert import check_finite, quantize_linear
from .formats import quantized_tensors
from .plan import (
    CALIBRATED, HEAD, Calibration, HeadPrecision, Plan, Scheme, check_calibration, check_choices, plan_linears,
)
from .quantize import NF4Quantized

logger = logging.getLogger(__name__)

SOURCE = "the in-memory model"  # where messages say the weights come from


def quantize_model(
    model: CausalLM,
    *,
    scheme: Scheme,
    group_size: int | None = None,
    calibration: Calibration = "minmax",
    keep: Sequence[str] = (),
    lm_head: HeadPrecision = "float",
) -> dict[str, torch.Tensor]:
    """Quantize a float model's linears in place, as `convert_checkpoint` would with the same options.

    Every option is checked against the model before any linear changes. Each weight is quantized
    on the CPU, as `convert` quantizes it, and the packed buffers are put where the weight was.

    Args:
        model: a runtime `CausalLM` with float linears, modified in place.
        scheme: "int4" (symmetric), "int4-asym", "int8" (per-channel symmetric) or "nf4".
        group_size: int4 only: 32, 64 or 128; None picks the largest that divides every
            quantized linear's input size (as `convert`).
        calibration: "minmax" or "mse" (not for nf4), as `convert`.
        keep: linears to leave in float, as `convert`'s `keep`.
        lm_head: "float", or "int8" (per output row, symmetric; int4 and int8 schemes, on a model
            whose head is not tied to the embedding).

    Returns:
        Module name -> the float weight its quantized module replaced (on the model's device), in
        model order; drop it to free them.

    Raises:
        InvalidParameterError: an option `convert` refuses for this model, or a calibrated method
            (`gptq`, `awq`).
        UnsupportedError: the model already holds quantized linears, or an int8 head tied to the embedding.
        CheckpointError: a weight holds NaN or Inf.
    """
    check_choices(scheme, calibration, lm_head)
    if calibration in CALIBRATED:
        raise InvalidParameterError(
            f"calibration {calibration!r} runs the model on calibration text layer by layer from a checkpoint, which "
            f"quantizing in memory does not do; convert the checkpoint (quadapt convert --calibration {calibration}) "
            "and load that, or use minmax or mse"
        )
    packed = [name for name, m in model.named_modules() if isinstance(m, (PackedIntLinear, NF4Linear))]
    if packed:
        raise UnsupportedError(
            f"{SOURCE} is already quantized ({packed[0]} and {len(packed) - 1} more); quantizing quantized weights "
            "again compounds the error; load the float checkpoint"
        )
    quantized, kept, group_size = plan_linears(model.config, scheme, group_size, keep, lm_head, SOURCE)
    check_calibration(scheme, calibration)
    plan = Plan(scheme, group_size, calibration, False, lm_head, quantized, kept, SOURCE)
    targets = [*plan.quantized, *([HEAD] if lm_head == "int8" else [])]
    for name in targets:
        linear = checkpoint_module(model, name)
        assert isinstance(linear, nn.Linear), (name, type(linear))  # the plan lists the model's own linears
        check_finite(f"{name}.weight", linear.weight, SOURCE)
    floats, modules = {}, {}
    for name in targets:
        floats[name], modules[name] = _quantized(model, plan, name)
    _put(model, modules)
    logger.info(
        "quantized %d linears in memory: %s%s", len(targets), scheme,
        "" if plan.group_size is None or scheme == "nf4" else f", group {plan.group_size}",
    )
    return floats


def _put(model: CausalLM, modules: dict[str, nn.Module]) -> None:
    """Put each quantized module in `model` by its HF name: alone, or as its section of a stacked
    module, stacked with the group's other sections as the loader stacks them (`fused.stack_modules`)."""
    groups: dict[str, None] = {}
    for name, module in modules.items():
        holder, section = stacked_name(name)
        if section is None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
        else:
            groups[holder] = None
    dtype = model.model.embed_tokens.weight.dtype
    for holder in groups:
        stacked = model.get_submodule(holder)
        parent, _, child = holder.rpartition(".")
        members = [(s, modules.get(f"{parent}.{s}") or stacked.section(s)) for s in stacked.section_names]
        setattr(model.get_submodule(parent), child, stack_modules(members, dtype))


def _quantized(model: CausalLM, plan: Plan, name: str) -> tuple[torch.Tensor, nn.Module]:
    """The float weight of linear `name` and its quantized module."""
    linear = checkpoint_module(model, name)
    weight = linear.weight.detach()
    shape = (linear.out_features, linear.in_features)
    quantized = quantize_linear(plan, name, weight.to("cpu"))
    tensors = dict(quantized_tensors(name, quantized))
    if isinstance(quantized, NF4Quantized):
        values = module_buffers(name, NF4Spec(double_quant=True), tensors, shape, SOURCE)
        state = {"weight_packed": values["weight_packed"], "absmax": values["absmax"]}
        with torch.device("meta"):
            module: nn.Module = NF4Linear(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                blocksize=values["blocksize"], dtype=values["dtype"],
            )
    else:
        # As the loader reads convert's quantization_config: the head is its own int8 per-row group.
        spec = PackedIntSpec(8, None, True) if name == HEAD else (
            PackedIntSpec(plan.num_bits, plan.group_size, plan.symmetric)
        )
        values = module_buffers(name, spec, tensors, shape, SOURCE)
        state = {key: value for key, value in values.items() if value is not None}
        with torch.device("meta"):
            module = PackedIntLinear(
                linear.in_features, linear.out_features, num_bits=spec.num_bits, group_size=spec.group_size,
                symmetric=spec.symmetric, bias=linear.bias is not None, scale_dtype=values["weight_scale"].dtype,
            )
    if linear.bias is not None:
        state["bias"] = linear.bias.detach()
    module.load_state_dict({key: value.to(weight.device) for key, value in state.items()}, strict=True, assign=True)
    module.kernel_backend = getattr(model, "kernel_backend", None)
    return weight, module
