"""`quadapt convert`: a float checkpoint in, a quantized checkpoint directory out, streaming.

`convert_checkpoint` reads any `CheckpointReader` (HF directory, GGUF file, a merged-adapter
stream) and writes, through `writer.write_checkpoint` (temporary name, rename at the end):

- int4 (`int4` symmetric, `int4-asym`) group-wise and int8 (`int8`, per output channel, symmetric)
  as compressed-tensors `pack-quantized` (what llm-compressor writes; vLLM and transformers load it);
- `nf4` as the bitsandbytes serialization transformers writes (block 64, double quantization),
  byte-identical to bitsandbytes;
- the tokenizer and generation config, and `quadapt_manifest.json`: scheme, group size,
  calibration, how each linear was quantized (with its SQNR) and what stayed float and why.

The embedding stays float, and so does the output head unless `lm_head="int8"`
(`--lm-head int8`); so do linears named by `keep`. Calibration: `minmax` (round to nearest), `mse`
(a search per group: the clipping of a symmetric range, a weighted least-squares refit of an
asymmetric one; see `quantize.quantize_int`), or `gptq` on a calibration text, layer by layer
(`calibrate.py`). RTN and MSE stream one tensor at a time.

The int8 head is int8 per output row, symmetric (W8A16), in compressed-tensors: the first config
group covers it under `int8`, a second group naming `lm_head` under `int4` (compressed-tensors
and transformers pick a name target over the `Linear` class target, and transformers' default
load path is then exact). The head is calibrated by min-max (or MSE with `mse`); GPTQ calibrates
the decoder layers only. What cannot be loaded is refused before any work, never written:
- a quantized embedding, and so an int8 head tied to it (`tie_word_embeddings`, SmolLM2's case):
  compressed-tensors 0.20 can compress an `nn.Embedding`, but transformers 5.24 cannot load one
  (its `_init_weights` reads the embedding's `weight`, which the compressed module no longer has);
- `int4-asym`: transformers loads asymmetric int4 only through `CompressedTensorsConfig(
  dequantize=True)`, which decodes every module with the first group's scheme, so it cannot read
  an int8 head beside int4 linears (that path also misreads the head of an `int4` output; its
  default path reads it exactly);
- `nf4`: a bitsandbytes checkpoint has one precision for all its quantized linears (4-bit or
  LLM.int8, never both), so it cannot hold an int8 head.

Group size: int4 takes 32, 64 or 128, and compressed-tensors (0.20) needs it to divide every
quantized linear's input size (it refuses a padded last group when it decompresses); the default
is the largest of 128, 64, 32 that divides them all (SmolLM2's 576 gives 64).

It does not requantize quantized checkpoints (that compounds the error): convert the float model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from ..runtime.config import ModelConfig
from ..runtime.errors import CheckpointError, InvalidParameterError, QuadaptError, UnsupportedError
from ..runtime.model import CausalLM
from ..kernels.reference import dequant_nf4
from ..runtime.checkpoints import CheckpointReader, as_reader, is_derived_key
from .formats import bitsandbytes_config, compressed_tensors_config, nf4_tensors, packed_int_tensors
from .quantize import IntQuantized, quantize_int, quantize_nf4, sqnr_db
from .progress import progress
from .writer import check_output_dir, write_checkpoint

Scheme = Literal["int4", "int4-asym", "int8", "nf4"]
Calibration = Literal["minmax", "mse", "gptq"]
HeadPrecision = Literal["float", "int8"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
HEAD_PRECISIONS: tuple[str, ...] = get_args(HeadPrecision)
INT4_GROUP_SIZES = (128, 64, 32)  # largest first: the default is the first that fits
MANIFEST_FILE = "quadapt_manifest.json"


@dataclass
class _Plan:
    """The validated options and, per module, what happens to it."""

    scheme: str
    group_size: int | None
    calibration: str
    actorder: bool
    lm_head: str  # "float" or "int8"
    quantized: dict[str, tuple[int, int]]  # linear -> (N, K), the scheme's; an int8 head is apart
    kept: dict[str, str]  # module -> why it stays float
    source: str
    report: dict[str, Any] = field(default_factory=dict)  # linear -> how it was quantized

    @property
    def num_bits(self) -> int:
        return 8 if self.scheme == "int8" else 4


def convert_checkpoint(
    source: str | Path | CheckpointReader,
    out_dir: str | Path,
    scheme: Scheme,
    *,
    group_size: int | None = None,
    calibration: Calibration = "minmax",
    calib_text: str | Path | None = None,
    keep: Sequence[str] = (),
    actorder: bool = False,
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
        calibration: "minmax", "mse" (not for nf4) or "gptq" (int schemes; needs `calib_text`).
        calib_text: path of a UTF-8 text for GPTQ (at least 128 tokens).
        keep: linears to leave in float: a full module name (`model.layers.0.mlp.down_proj`), a
            suffix (`down_proj`: every layer's) or a prefix (`model.layers.0`). The embedding
            always stays float.
        actorder: GPTQ only: static act-order (columns by decreasing Hessian diagonal).
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
    if scheme not in SCHEMES:
        raise InvalidParameterError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if calibration not in CALIBRATIONS:
        raise InvalidParameterError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)}")
    if lm_head not in HEAD_PRECISIONS:
        raise InvalidParameterError(f"unknown --lm-head {lm_head!r}; choose one of {', '.join(HEAD_PRECISIONS)}")
    out_dir = check_output_dir(out_dir, overwrite=overwrite)
    reader = as_reader(source)
    config_dict = reader.config_dict()
    if "quantization_config" in config_dict:
        method = (config_dict["quantization_config"] or {}).get("quant_method", "unknown")
        raise UnsupportedError(
            f"{reader.path} is already quantized ({method}); quantizing quantized weights again compounds the "
            "error, so quadapt refuses it; convert from the float model instead"
        )
    config = ModelConfig.from_dict(config_dict)
    plan = _plan(reader, config, scheme, group_size, calibration, calib_text, actorder, keep, lm_head)
    names = _check_names(reader, config)
    _check_disk_space(out_dir, _estimate_bytes(config, plan, config_dict, spill=calibration == "gptq"))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # GPTQ may spill the source here; a sibling of the output, so on the disk that was checked.
    # Named like the writer's staging directory (with this process's id), so a killed run's is removed later.
    scratch_prefix = f".{out_dir.name}.{os.getpid()}."
    with tempfile.TemporaryDirectory(prefix=scratch_prefix, suffix=".scratch", dir=out_dir.parent) as scratch:
        if calibration == "gptq":
            tensors = _gptq_stream(reader, names, config, plan, calib_text, Path(scratch))
        else:
            source_tensors = progress(reader.tensors(), total=len(reader.keys()), label=f"converting to {scheme}")
            tensors = _rtn_stream(source_tensors, plan)
        write_checkpoint(
            out_dir,
            {**config_dict, "quantization_config": _quantization_config(plan, config_dict)},
            tensors,
            reader.tokenizer_files(),
            overwrite=overwrite,
            extra_files=lambda: {MANIFEST_FILE: json.dumps(_manifest(plan), indent=2) + "\n"},
            **({} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}),
        )
    print(f"quadapt: wrote {out_dir}", file=sys.stderr)
    return out_dir


def _plan(
    reader: CheckpointReader, config: ModelConfig, scheme: str, group_size: int | None, calibration: str,
    calib_text: str | Path | None, actorder: bool, keep: Sequence[str], lm_head: str,
) -> _Plan:
    """Check the options against the model, and decide per linear."""
    with torch.device("meta"):
        model = CausalLM(config)
    linears = {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    kept = {"model.embed_tokens": "embedding: stays float (transformers cannot load a quantized embedding)"}
    if lm_head == "int8":
        _check_int8_head(reader, config, scheme, keep)
    elif config.tie_word_embeddings:
        kept["lm_head"] = "output head: tied to the embedding, stays float"
    else:
        kept["lm_head"] = "output head: stays float (default; --lm-head int8 quantizes it)"
    del linears["lm_head"]
    for entry in keep:
        matched = [name for name in linears if _keep_matches(name, entry)]
        if not matched and not _keep_matches("lm_head", entry) and not _keep_matches("model.embed_tokens", entry):
            raise InvalidParameterError(
                f"--keep {entry!r} matches no linear module; give a module name ({next(iter(linears))}), a suffix "
                "(down_proj) or a prefix (model.layers.0)"
            )
        for name in matched:
            kept[name] = f"--keep {entry}"
    quantized = {name: shape for name, shape in linears.items() if name not in kept}
    if not quantized:
        raise InvalidParameterError("--keep leaves no linear to quantize; remove some --keep entries")

    group_size = _group_size(scheme, group_size, quantized)
    if calibration == "mse" and scheme == "nf4":
        raise InvalidParameterError(
            "calibration 'mse' does not apply to nf4: its block scale is the block's absmax by format; use minmax"
        )
    if calibration == "gptq":
        if scheme == "nf4":
            raise InvalidParameterError("calibration 'gptq' is for int4/int8 schemes; nf4 uses minmax")
        if calib_text is None:
            raise InvalidParameterError("calibration 'gptq' needs a calibration text: pass --calib-text FILE")
        if reader.tokenizer_files() is None:
            raise InvalidParameterError(f"{reader.path} carries no tokenizer, which GPTQ needs to read the calibration text")
    elif actorder:
        raise InvalidParameterError("--actorder applies to GPTQ only; add --calibration gptq or drop --actorder")
    return _Plan(scheme, group_size, calibration, actorder, lm_head, quantized, kept, str(reader.path))


def _check_int8_head(reader: CheckpointReader, config: ModelConfig, scheme: str, keep: Sequence[str]) -> None:
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
            f"--lm-head int8: {reader.path} ties the output head to the embedding (tie_word_embeddings), so an int8 "
            "head is an int8 embedding, which transformers cannot load from compressed-tensors; keep --lm-head float"
        )
    if any(_keep_matches("lm_head", entry) for entry in keep):
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


def _check_names(reader: CheckpointReader, config: ModelConfig) -> list[str]:
    """The source's tensor names to write, in order; refuse names the model does not have."""
    with torch.device("meta"):
        expected = {name for name, _ in CausalLM(config).named_parameters()}
    names, unknown = [], []
    for name in reader.keys():
        if is_derived_key(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # derived state / the tied head, which the output does not store either
        (names if name in expected else unknown).append(name)
    missing = sorted(expected - set(names))
    if unknown or missing:
        raise CheckpointError(
            f"{reader.path} does not match its config: unexpected tensors {unknown[:5]}, missing {missing[:5]}; "
            "convert a checkpoint whose weights and config.json belong together"
        )
    return names


def _check_finite(name: str, tensor: torch.Tensor, source: str) -> None:
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


def _rtn_stream(source: Iterable[tuple[str, torch.Tensor]], plan: _Plan) -> Iterator[tuple[str, torch.Tensor]]:
    """Round-to-nearest (or MSE-clipped) quantization, one tensor at a time."""
    for name, tensor in source:
        if is_derived_key(name):
            continue
        _check_finite(name, tensor, plan.source)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan.quantized:
            yield from _quantize_linear(plan, module, tensor)
        elif name == "lm_head.weight" and plan.lm_head == "int8":
            yield from _quantize_head(plan, tensor)
        else:
            yield name, tensor


def _scale_dtype(weight: torch.Tensor) -> torch.dtype:
    # compressed-tensors stores scales in the weight's dtype (and falls back to bf16 for others).
    return weight.dtype if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def _quantize_linear(plan: _Plan, module: str, weight: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """RTN / MSE quantization of one linear; records how it went."""
    if plan.scheme == "nf4":
        nf4 = quantize_nf4(weight)
        restored = dequant_nf4(nf4.packed, nf4.float_absmax(), shape=nf4.shape, blocksize=nf4.blocksize, dtype=torch.float32)
        plan.report[module] = {"quantized": "nf4, block 64, double quantization", "sqnr_db": round(sqnr_db(weight, restored), 2)}
        return nf4_tensors(module, nf4)
    quantized = quantize_int(
        weight, num_bits=plan.num_bits, group_size=plan.group_size, symmetric=plan.scheme != "int4-asym",
        mse=plan.calibration == "mse", scale_dtype=_scale_dtype(weight),
    )
    _record(plan, module, weight, quantized)
    return packed_int_tensors(module, quantized)


def _quantize_head(plan: _Plan, weight: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The output head as int8 per output row, symmetric (W8A16); min-max, or MSE with `mse`."""
    mse = plan.calibration == "mse"
    quantized = quantize_int(weight, num_bits=8, group_size=None, symmetric=True, mse=mse, scale_dtype=_scale_dtype(weight))
    _record(plan, "lm_head", weight, quantized, calibration="mse" if mse else "minmax")
    return packed_int_tensors("lm_head", quantized)


def _record(
    plan: _Plan, module: str, weight: torch.Tensor, quantized: IntQuantized, calibration: str | None = None
) -> None:
    grouping = "per channel" if quantized.group_size is None else f"group {quantized.group_size}"
    kind = "asymmetric" if quantized.zero_point is not None else "symmetric"
    plan.report[module] = {
        "quantized": f"int{quantized.num_bits} {kind}, {grouping}, {calibration or plan.calibration}",
        "sqnr_db": round(sqnr_db(weight, quantized.dequantize()), 2),
    }


def _gptq_stream(
    reader: CheckpointReader, names: list[str], config: ModelConfig, plan: _Plan, calib_text: str | Path | None,
    scratch: Path,
) -> Iterator[tuple[str, torch.Tensor]]:
    """GPTQ, layer by layer over a random-access view of the source."""
    from ..runtime.tokenizer import Tokenizer
    from .calibrate import CALIBRATION_SEQUENCE_LENGTH, TensorStore, calibration_sequences, gptq_layers
    from .gptq import gptq_quantize

    assert calib_text is not None
    tokenizer = Tokenizer.from_files(reader.tokenizer_files())
    length = min(CALIBRATION_SEQUENCE_LENGTH, config.max_position_embeddings)
    sequences = calibration_sequences(calib_text, tokenizer, sequence_length=length)
    plan.report["_calibration"] = {"tokens": sum(s.shape[1] for s in sequences), "sequence_length": length}
    print(f"quadapt: gptq: {plan.report['_calibration']['tokens']} calibration tokens", file=sys.stderr)
    store = TensorStore(reader, scratch / "spill")

    def quantize(module: str, weight: torch.Tensor, hessian: torch.Tensor) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        quantized = gptq_quantize(
            weight, hessian, num_bits=plan.num_bits, group_size=plan.group_size,
            symmetric=plan.scheme != "int4-asym", scale_dtype=_scale_dtype(weight), actorder=plan.actorder,
        )
        _record(plan, module, weight, quantized)
        return packed_int_tensors(module, quantized), quantized.dequantize().float()

    def check(name: str, tensor: torch.Tensor) -> None:
        _check_finite(name, tensor, plan.source)

    for name, tensor in gptq_layers(store, names, config, sequences, set(plan.quantized), quantize, check):
        if name == "lm_head.weight" and plan.lm_head == "int8":
            yield from _quantize_head(plan, tensor)  # GPTQ calibrates decoder layers; the head is RTN
        else:
            yield name, tensor


def _quantization_config(plan: _Plan, config_dict: dict[str, Any]) -> dict[str, Any]:
    kept_linears = sorted(name for name in plan.kept if name not in ("model.embed_tokens", "lm_head"))
    if plan.scheme == "nf4":
        dtype = config_dict.get("torch_dtype") or config_dict.get("dtype") or "float32"
        return bitsandbytes_config(compute_dtype=getattr(torch, dtype, torch.float32), skip_modules=["lm_head", *kept_linears])
    head = ["lm_head"] if plan.lm_head == "float" else []
    return compressed_tensors_config(
        num_bits=plan.num_bits, group_size=plan.group_size, symmetric=plan.scheme != "int4-asym",
        ignore=[*head, *kept_linears], observer="mse" if plan.calibration == "mse" else "minmax",
        actorder="weight" if plan.actorder else None, int8_linears=[] if head else ["lm_head"],
    )


def _manifest(plan: _Plan) -> dict[str, Any]:
    from importlib.metadata import version

    calibration: dict[str, Any] = {"method": plan.calibration}
    if plan.calibration == "gptq":
        from .gptq import GPTQ_BLOCKSIZE, GPTQ_PERCDAMP

        calibration |= {"percdamp": GPTQ_PERCDAMP, "blocksize": GPTQ_BLOCKSIZE, "actorder": "weight" if plan.actorder else None}
        calibration |= plan.report.get("_calibration", {})
    quantized = [*plan.quantized, *(["lm_head"] if plan.lm_head == "int8" else [])]
    return {
        "quadapt_version": version("quadapt"),
        "source": plan.source,
        "scheme": plan.scheme,
        "format": "bitsandbytes nf4" if plan.scheme == "nf4" else "compressed-tensors pack-quantized",
        "group_size": plan.group_size,
        "calibration": calibration,
        "lm_head": plan.lm_head,
        "quantized": {name: plan.report[name] for name in quantized},
        "kept_float": dict(plan.kept),
    }


def _estimate_bytes(config: ModelConfig, plan: _Plan, config_dict: dict[str, Any], *, spill: bool) -> int:
    """An upper estimate of the bytes the conversion writes (output, plus GPTQ's spill of the source)."""
    dtype = config_dict.get("torch_dtype") or config_dict.get("dtype") or "float32"
    float_bytes = 2 if dtype in ("bfloat16", "float16") else 4
    with torch.device("meta"):
        params = dict(CausalLM(config).named_parameters())
    total, source_total = 0, 0
    for name, p in params.items():
        source_total += p.numel() * float_bytes
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan.quantized:
            N, K = p.shape
            scales = N * (1 if plan.group_size is None else -(-K // plan.group_size)) * float_bytes
            total += N * K * plan.num_bits // 8 + 2 * scales + 64
        elif name == "lm_head.weight" and plan.lm_head == "int8":
            N, K = p.shape
            total += N * K + N * float_bytes + 64
        else:
            total += p.numel() * float_bytes
    return int(total * 1.05) + (source_total if spill else 0) + (16 << 20)


def _check_disk_space(out_dir: Path, needed: int) -> None:
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise QuadaptError(
            f"not enough free disk space for {out_dir}: the conversion needs about {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free on {parent}; free some space or choose another --out"
        )
