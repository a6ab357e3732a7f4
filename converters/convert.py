"""`quadapt convert`: a float checkpoint in, a quantized checkpoint directory out, streaming.

`convert_checkpoint` reads any `CheckpointReader` (HF directory, GGUF file, a merged-adapter
stream) and writes, through `writer.write_checkpoint` (temporary name, rename at the end):

- int4 (`int4` symmetric, `int4-asym`) group-wise and int8 (`int8`, per output channel, symmetric)
  as compressed-tensors `pack-quantized` (what llm-compressor writes; vLLM and transformers load it);
- `nf4` as the bitsandbytes serialization transformers writes (block 64, double quantization),
  byte-identical to bitsandbytes;
- the tokenizer and generation config, and `quadapt_manifest.json` (`manifest.py`).

The embedding stays float, and so does the output head unless `lm_head="int8"`
(`--lm-head int8`); so do linears named by `keep`. Calibration: `minmax` (round to nearest), `mse`
(a search per group: a weighted least-squares refit of each group's scale, and zero point if
asymmetric, over candidate codes; symmetric 8-bit keeps min-max; see `quantize.quantize_int`), or `gptq` / `awq` (activation-aware scaling and clipping) on
calibration text, layer by layer (`calibrate.py`, `calibrated.py`), by default the shipped broad
set (`calibration_set.py`). RTN and MSE stream one tensor at a time.

The int8 head is int8 per output row, symmetric (W8A16), in compressed-tensors: the first config
group covers it under `int8`, a second group naming `lm_head` under `int4` (compressed-tensors
and transformers pick a name target over the `Linear` class target, and transformers' default
load path is then exact). The head is calibrated by min-max (`mse` leaves symmetric 8-bit to
min-max too); GPTQ and AWQ calibrate the decoder layers only.

Every option is checked before any work (`plan.py`, which also says what is refused and why); the
plan is then fixed, and what the conversion does is recorded as it streams in a
`manifest.ConversionReport`, written out as the manifest. `quantize_linear` is the one rounding of
a linear, shared with quantizing a loaded model in memory (`in_memory.py`). It does not requantize
quantized checkpoints (that compounds the error): convert the float model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from ..runtime.checkpoints import CheckpointReader, as_reader, is_derived_key
from ..runtime.model.config import ModelConfig
from ..runtime.errors import CheckpointError
from .formats import quantized_tensors
from .manifest import MANIFEST_FILE, ConversionReport, int_entry, manifest_files, nf4_entry, quantization_config
from .plan import (
    CALIBRATED, CALIBRATIONS, HEAD, HEAD_PRECISIONS, SCHEMES, Calibration, HeadPrecision, Plan, Scheme,
    check_choices, check_disk_space, check_names, plan_conversion, refuse_quantized_source,
)
from .calibration_set import DEFAULT_CALIBRATION_TOKENS
from .progress import progress
from .quantize import IntQuantized, NF4Quantized, quantize_int, quantize_nf4, scale_dtype
from .writer import check_output_dir, scratch_dir, write_checkpoint

# Re-exported: callers import the choices and the manifest's name from here.
__all__ = [
    "CALIBRATIONS", "HEAD_PRECISIONS", "MANIFEST_FILE", "SCHEMES", "Calibration", "HeadPrecision", "Scheme",
    "check_finite", "convert_checkpoint", "quantize_linear",
]

logger = logging.getLogger(__name__)


def convert_checkpoint(
    source: str | Path | CheckpointReader,
    out_dir: str | Path,
    scheme: Scheme,
    *,
    group_size: int | None = None,
    calibration: Calibration = "minmax",
    calib_text: str | Path | Sequence[str | Path] | None = None,
    calib_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    keep: Sequence[str] = (),
    actorder: bool | None = None,
    lm_head: HeadPrecision = "float",
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Quantize a float checkpoint into a packed checkpoint directory.

    Args:
        source: a checkpoint directory, a `.gguf` file, or an opened `CheckpointReader`.
        out_dir: the directory to create.
        scheme: "int4" (symmetric), "int4-asym", "int8" (per-channel symmetric) or "nf4".
        group_size: int4 only: 32, 64 or 128; None picks the largest that divides every
            quantized linear's input size. int8 is per-channel; nf4 uses blocks of 64.
        calibration: "minmax", "mse" (not for nf4), "gptq" or "awq" (int schemes; calibrated on
            `calib_text`, see `calibrated.py`).
        calib_text: for gptq and awq: UTF-8 text file(s) (at least 128 tokens each), where
            "default" names the shipped default set (`calibration_set.py`); None: the default set.
            A list mixes its texts.
        calib_tokens: calibration tokens to use at most (one in `calibrate.HELDOUT_EVERY` is held
            out to check each layer's result).
        keep: linears to leave in float: a full module name (`model.layers.0.mlp.down_proj`), a
            suffix (`down_proj`: every layer's) or a prefix (`model.layers.0`). The embedding
            always stays float.
        actorder: GPTQ only: static act-order (columns by decreasing Hessian diagonal); None
            means on for GPTQ (it was better on every held-out text of docs/quality.md).
        lm_head: the output head's precision: "float", or "int8" (per output row, symmetric;
            `int4` and `int8` schemes, on a model whose head is not tied to the embedding).
        overwrite: replace an existing `out_dir`.
        max_shard_bytes: safetensors shard size; defaults to the writer's (2 GB).

    Returns:
        `out_dir`.

    Raises:
        InvalidParameterError: an unknown scheme, calibration or head precision, a bad group
            size, a missing or too short calibration text, a `keep` entry that matches nothing,
            an int8 head with a scheme whose format cannot hold it (nf4, int4-asym).
        UnsupportedError: the source is already quantized, or an int8 head tied to the embedding.
        CheckpointError: unreadable source, unexpected tensors, NaN or Inf in a weight.
        QuadaptError: `out_dir` exists without `overwrite`, or the disk is too full.
    """
    check_choices(scheme, calibration, lm_head)
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    reader = as_reader(source)
    config_dict = reader.config_dict()
    refuse_quantized_source(reader, config_dict)
    config = ModelConfig.from_dict(config_dict)
    plan = plan_conversion(
        reader, config, scheme, group_size, calibration, calib_text, actorder, keep, lm_head, calib_tokens
    )
    names = check_names(reader, config)
    check_disk_space(out_dir, config, plan, config_dict)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = ConversionReport()  # filled as the tensors stream; the manifest is written from it at the end
    with scratch_dir(out_dir) as scratch:  # where GPTQ may spill the source: on the disk that was checked
        if calibration in CALIBRATED:
            tensors = _calibrated_stream(reader, names, config, plan, report, calib_text, calib_tokens, Path(scratch))
        else:
            source_tensors = progress(reader.tensors(), total=len(reader.keys()), label=f"converting to {scheme}")
            tensors = _rtn_stream(source_tensors, plan, report)
        write_checkpoint(
            out_dir,
            {**config_dict, "quantization_config": quantization_config(plan, config_dict)},
            tensors,
            reader.tokenizer_files(),
            overwrite=overwrite,
            extra_files=lambda: manifest_files(plan, report),
            **({} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}),
        )
    return out_dir


def quantize_linear(plan: Plan, module: str, weight: torch.Tensor) -> IntQuantized | NF4Quantized:
    """Round-to-nearest (or MSE-searched) quantization of one planned linear, as the checkpoint stores it.

    Args:
        plan: the plan; its calibration is `minmax` or `mse` (GPTQ and AWQ quantize whole layers,
            `calibrated.py`, and leave only an int8 head to this).
        module: a linear of `plan.quantized`, quantized with the scheme, or the head under
            `lm_head="int8"`: int8 per output row, symmetric, min-max (which `mse` keeps at 8 bits).
        weight: its float weight [N, K].

    Returns:
        The quantized weight; `formats.quantized_tensors` lays it out for the checkpoint.
    """
    mse = plan.calibration == "mse"
    if module == HEAD:
        return quantize_int(weight, num_bits=8, group_size=None, symmetric=True, mse=mse, scale_dtype=scale_dtype(weight))
    if plan.scheme == "nf4":
        return quantize_nf4(weight)
    return quantize_int(
        weight, num_bits=plan.num_bits, group_size=plan.group_size, symmetric=plan.symmetric, mse=mse,
        scale_dtype=scale_dtype(weight),
    )


def check_finite(name: str, tensor: torch.Tensor, source: str) -> None:
    """Refuse a float tensor holding NaN or Inf, which no quantization can represent.

    Raises:
        CheckpointError: naming the tensor, the count of bad values and where it comes from.
    """
    if not tensor.is_floating_point():
        return
    # In slices, so the check's boolean temporaries stay small beside a large tensor.
    if all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(1 << 22)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise CheckpointError(
        f"tensor {name!r} in {source} holds {bad} NaN or Inf value(s); a quantized weight needs finite values. "
        "The checkpoint is damaged or was saved after a diverged training step; fix it at the source"
    )


def _rtn_stream(
    source: Iterable[tuple[str, torch.Tensor]], plan: Plan, report: ConversionReport
) -> Iterator[tuple[str, torch.Tensor]]:
    """Round-to-nearest (or MSE-searched) quantization, one tensor at a time."""
    for name, tensor in source:
        if is_derived_key(name):
            continue
        check_finite(name, tensor, plan.source)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan.quantized:
            yield from _quantized(plan, report, module, tensor)
        elif name == f"{HEAD}.weight" and plan.lm_head == "int8":
            yield from _quantized(plan, report, HEAD, tensor)
        else:
            yield name, tensor


def _quantized(plan: Plan, report: ConversionReport, module: str, weight: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One linear (or the int8 head) quantized by `quantize_linear`: its tensors; its entry goes to the report."""
    quantized = quantize_linear(plan, module, weight)
    if isinstance(quantized, NF4Quantized):
        report.linears[module] = nf4_entry(weight, quantized)
    else:
        report.linears[module] = int_entry(weight, quantized, "mse" if plan.calibration == "mse" else "minmax")
    return quantized_tensors(module, quantized)


def _calibrated_stream(
    reader: CheckpointReader, names: list[str], config: ModelConfig, plan: Plan, report: ConversionReport,
    calib_text: str | Path | Sequence[str | Path] | None, calib_tokens: int, scratch: Path,
) -> Iterator[tuple[str, torch.Tensor]]:
    """GPTQ or activation-aware scaling, layer by layer over a random-access view of the source."""
    from ..runtime.text.tokenizer import Tokenizer
    from .calibrate import (
        CALIBRATION_SEQUENCE_LENGTH, LayerResult, LayerStats, TensorStore, calibrated_layers, calibration_sequences,
        check_token_count, split_heldout,
    )
    from .calibrated import LAYER_METHODS
    from .gptq import GPTQ_PERCDAMP_GRID

    tokenizer = Tokenizer.from_files(reader.tokenizer_files())
    length = min(CALIBRATION_SEQUENCE_LENGTH, config.max_position_embeddings)
    sequences = calibration_sequences(calib_text, tokenizer, max_tokens=calib_tokens, sequence_length=length)
    fit, heldout = split_heldout(sequences)
    fit_tokens, heldout_tokens = (sum(s.shape[1] for s in part) for part in (fit, heldout))
    check_token_count(fit_tokens, max(k for _, k in plan.quantized.values()), plan.calibration)
    report.calibration = {
        "texts": [str(t) for t in _as_list(calib_text)], "tokens": fit_tokens + heldout_tokens,
        "fit_tokens": fit_tokens, "heldout_tokens": heldout_tokens, "sequence_length": length,
        **({"percdamp_grid": list(GPTQ_PERCDAMP_GRID)} if plan.calibration == "gptq" else {}),
    }
    logger.info("%s: %d calibration tokens (%d held out for the checks)", plan.calibration, fit_tokens + heldout_tokens, heldout_tokens)
    store = TensorStore(reader, scratch / "spill")
    method = LAYER_METHODS[plan.calibration]

    def quantize_layer(prefix: str, weights: dict[str, torch.Tensor], stats: dict[str, LayerStats]) -> LayerResult:
        result = method(plan, prefix, weights, stats)
        report.linears.update(result.entries)
        return result

    def check(name: str, tensor: torch.Tensor) -> None:
        check_finite(name, tensor, plan.source)

    layers = calibrated_layers(
        store, names, config, fit, heldout, set(plan.quantized), quantize_layer, check, plan.calibration,
        first_tokens=plan.calibration != "awq",  # AWQ's statistics leave out the attention sink (awq.py)
    )
    for name, tensor in layers:
        if name == f"{HEAD}.weight" and plan.lm_head == "int8":
            yield from _quantized(plan, report, HEAD, tensor)  # the methods calibrate decoder layers; the head is RTN
        else:
            yield name, tensor
    logger.info("%s: choices %s", plan.calibration, dict(report.choices))


def _as_list(calib_text: str | Path | Sequence[str | Path] | None) -> list[str | Path]:
    from .calibration_set import DEFAULT_CALIBRATION_NAME

    if calib_text is None:
        return [DEFAULT_CALIBRATION_NAME]
    return [calib_text] if isinstance(calib_text, (str, Path)) else list(calib_text)
