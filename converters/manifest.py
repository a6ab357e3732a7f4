"""What a converted checkpoint says about itself: `quantization_config` and `quadapt_manifest.json`.

`quantization_config` is the block of `config.json` that transformers and vLLM read to load the
output (compressed-tensors, or bitsandbytes for nf4). The manifest is quadapt's own record: the
scheme, group size and calibration, how each linear was quantized (with its SQNR against the float
weight) and what stayed float and why. The plan says what is to happen; the conversion records
what happened in a `ConversionReport` (`int_entry` and `nf4_entry` per linear, as it streams, and
the calibration's data), and `manifest` reads both once the tensors are written.

It does not decide what is quantized (`plan.py`) or quantize (`convert.py`, `quantize.py`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels.reference import dequant_nf4
from .formats import bitsandbytes_config, compressed_tensors_config
from .plan import EMBEDDING, HEAD, Plan, float_dtype_name
from .quantize import IntQuantized, NF4Quantized, sqnr_db

MANIFEST_FILE = "quadapt_manifest.json"


@dataclass
class ConversionReport:
    """What a conversion did, filled in as it streams; the manifest's record of it.

    Attributes:
        linears: quantized linear -> its manifest entry (`int_entry`, `nf4_entry`; GPTQ and AWQ
            add their choice and held-out errors), in the order they were quantized.
        calibration: for GPTQ and AWQ, the calibration data: texts, token counts, sequence
            length and (GPTQ) the damping grid.
    """

    linears: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def choices(self) -> Counter[str]:
        """How often GPTQ or AWQ chose each candidate, in the order first chosen."""
        return Counter(entry["choice"] for entry in self.linears.values() if "choice" in entry)


def int_entry(weight: torch.Tensor, quantized: IntQuantized, calibration: str) -> dict[str, Any]:
    """The manifest's entry for one int-quantized linear: how, and its SQNR in dB."""
    grouping = "per channel" if quantized.group_size is None else f"group {quantized.group_size}"
    kind = "asymmetric" if quantized.zero_point is not None else "symmetric"
    return {
        "quantized": f"int{quantized.num_bits} {kind}, {grouping}, {calibration}",
        "sqnr_db": round(sqnr_db(weight, quantized.dequantize()), 2),
    }


def nf4_entry(weight: torch.Tensor, nf4: NF4Quantized) -> dict[str, Any]:
    """The manifest's entry for one nf4 linear: how, and its SQNR in dB."""
    restored = dequant_nf4(nf4.packed, nf4.float_absmax(), shape=nf4.shape, blocksize=nf4.blocksize, dtype=torch.float32)
    return {"quantized": f"nf4, block {nf4.blocksize}, double quantization", "sqnr_db": round(sqnr_db(weight, restored), 2)}


def quantization_config(plan: Plan, config_dict: dict[str, Any]) -> dict[str, Any]:
    """The `quantization_config` to put in the output's `config.json`.

    Args:
        plan: the conversion's plan.
        config_dict: the source's `config.json` (for the compute dtype of nf4).

    Returns:
        A bitsandbytes config for nf4, else a compressed-tensors one.
    """
    kept_linears = sorted(name for name in plan.kept if name not in (EMBEDDING, HEAD))
    if plan.scheme == "nf4":
        dtype = float_dtype_name(config_dict)
        return bitsandbytes_config(compute_dtype=getattr(torch, dtype, torch.float32), skip_modules=[HEAD, *kept_linears])
    head = [HEAD] if plan.lm_head == "float" else []
    return compressed_tensors_config(
        num_bits=plan.num_bits, group_size=plan.group_size, symmetric=plan.symmetric,
        ignore=[*head, *kept_linears], observer="mse" if plan.calibration == "mse" else "minmax",
        actorder="weight" if plan.actorder else None, int8_linears=[] if head else [HEAD],
    )


def manifest(plan: Plan, report: ConversionReport) -> dict[str, Any]:
    """The contents of `quadapt_manifest.json`: the plan, and the report the conversion has filled.

    Returns:
        A JSON-ready dict: version, source, scheme, format, group size, calibration, head
        precision, per quantized linear its entry, and per float module why it stayed float.
    """
    from importlib.metadata import version

    calibration: dict[str, Any] = {"method": plan.calibration}
    if plan.calibration == "gptq":
        from .gptq import GPTQ_BLOCKSIZE

        calibration |= {"blocksize": GPTQ_BLOCKSIZE, "actorder": "weight" if plan.actorder else None}
    if plan.calibration in ("gptq", "awq"):
        calibration |= {"choices": dict(report.choices), **report.calibration}
    quantized = [*plan.quantized, *([HEAD] if plan.lm_head == "int8" else [])]
    return {
        "quadapt_version": version("quadapt"),
        "source": plan.source,
        "scheme": plan.scheme,
        "format": "bitsandbytes nf4" if plan.scheme == "nf4" else "compressed-tensors pack-quantized",
        "group_size": plan.group_size,
        "calibration": calibration,
        "lm_head": plan.lm_head,
        "quantized": {name: report.linears[name] for name in quantized},
        "kept_float": dict(plan.kept),
    }


def manifest_files(plan: Plan, report: ConversionReport) -> dict[str, str]:
    """The manifest as the writer's `extra_files` take it: file name -> text."""
    return {MANIFEST_FILE: json.dumps(manifest(plan, report), indent=2) + "\n"}
