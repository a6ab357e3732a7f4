"""LoRA extraction: a PEFT adapter from a fully fine-tuned checkpoint by truncated SVD of the change.

For each target projection, delta = W_tuned - W_base [out, in] is factored by SVD and cut to the
`rank` largest singular values: delta ~= U_r diag(S_r) V_r^T. The factors split the singular
values evenly, B = U_r diag(sqrt(S_r)) and A = diag(sqrt(S_r)) V_r^T, so neither factor carries
all the magnitude (better conditioned for storage in half precision and for further training);
`lora_alpha = rank`, so the scale is 1 and B @ A is the truncated delta itself.

Both checkpoints stream: tensors are paired by name as they arrive (when the two files list them
in the same order, as checkpoints from one writer do, only one pair is held), and each projection
is factored and dropped before the next is read. The output directory gets the adapter and
`extraction_report.json`: per module the retained energy (sum of kept S^2 over the total), the
target modules left out because they did not change, and every other tensor that changed but a
LoRA cannot carry (norms, embeddings, unselected projections).

It does not choose ranks per module or calibrate on data; `rank` is the same for every module.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..runtime.model.config import ModelConfig
from ..runtime.errors import AdapterError, CheckpointError
from ..runtime.model.lora import LoRAWeights
from ..runtime.checkpoints import CheckpointReader, as_reader
from ..runtime.checkpoints.peft import PeftAdapter
from ..runtime.checkpoints.peft_fit import BaseModules
from .peft import write_peft_adapter
from .writer import check_output_dir

REPORT_FILE = "extraction_report.json"
_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim",
)

logger = logging.getLogger(__name__)


@dataclass
class ModuleExtraction:
    """How well one module's change was captured.

    Attributes:
        rank: the rank kept.
        retained_energy: sum of the kept singular values squared over all of them (1.0 = exact).
        delta_norm: Frobenius norm of W_tuned - W_base.
    """

    rank: int
    retained_energy: float
    delta_norm: float


@dataclass
class ExtractionReport:
    """What `extract_adapter` did, written as `extraction_report.json` beside the adapter.

    Attributes:
        rank: the rank asked for.
        modules: extracted module -> how well its change was captured.
        unchanged: target modules whose weights are identical in both checkpoints (no LoRA made).
        not_captured: tensor -> relative change ||W_tuned - W_base|| / ||W_base|| of every tensor
            that changed but is not an extracted projection; the adapter does not carry these.
    """

    rank: int
    modules: dict[str, ModuleExtraction] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    not_captured: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def extract_adapter(
    base: str | Path | CheckpointReader,
    tuned: str | Path | CheckpointReader,
    out_dir: str | Path,
    *,
    rank: int,
    target_modules: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> ExtractionReport:
    """Extract a rank-`rank` LoRA of `tuned` relative to `base` and write it as a PEFT adapter.

    Each module's outcome is logged as it is decided (info; a changed tensor the adapter cannot
    carry is a warning), and recorded in the report.

    Args:
        base: the base checkpoint (directory or .gguf), or a reader on it.
        tuned: the fine-tuned checkpoint of the same architecture and shapes.
        out_dir: the adapter directory to create.
        rank: the LoRA rank of every module.
        target_modules: short projection names to consider (`q_proj`, `down_proj`, ...); default
            all attention and MLP projections. Those that did not change are skipped and reported.
        dtype: dtype of the written LoRA factors (the SVD runs in fp32).
        overwrite: replace an existing directory at `out_dir`.

    Returns:
        The report, also written to `out_dir/extraction_report.json`.

    Raises:
        AdapterError: a bad rank or target name, or no target module changed.
        CheckpointError: the two checkpoints differ in shapes or tensor names.
    """
    check_output_dir(out_dir, overwrite=overwrite)
    base_reader, tuned_reader = as_reader(base), as_reader(tuned)
    _check_same_shapes(base_reader, tuned_reader)
    layout = BaseModules.of_checkpoint(base_reader)
    targets = _select_targets(layout, target_modules, rank)

    report = ExtractionReport(rank=rank)
    modules: dict[str, LoRAWeights] = {}
    for name, w_base, w_tuned in _paired(base_reader, tuned_reader):
        module = name.removesuffix(".weight")
        if module not in targets or not name.endswith(".weight"):
            if not torch.equal(w_base, w_tuned):
                change = (w_tuned.float() - w_base.float()).norm() / w_base.float().norm().clamp_min(1e-12)
                report.not_captured[name] = float(change)
                logger.warning("%s: changed by %.3g (relative) but is not extracted; the adapter lacks it", name, float(change))
            continue
        if torch.equal(w_base, w_tuned):
            report.unchanged.append(module)
            logger.info("%s: unchanged, skipped", module)
            continue
        weights, extraction = _factor(w_tuned.float() - w_base.float(), rank, dtype)
        modules[module] = weights
        report.modules[module] = extraction
        logger.info("%s: rank %d, retained energy %.6f", module, rank, extraction.retained_energy)
    if not modules:
        raise AdapterError(
            f"no target module differs between {base_reader.path} and {tuned_reader.path} "
            f"(targets: {', '.join(sorted({t.rsplit('.', 1)[-1] for t in targets}))}); there is nothing to extract"
        )

    config = {"r": rank, "lora_alpha": rank, "use_rslora": False, "base_model_name_or_path": str(base_reader.path)}
    adapter = PeftAdapter(modules=dict(sorted(modules.items())), config=config)
    write_peft_adapter(
        adapter,
        out_dir,
        base_linear_names=layout.projection_names(),
        extra_files={REPORT_FILE: report.to_json()},
        overwrite=overwrite,
    )
    return report


def _factor(delta: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[LoRAWeights, ModuleExtraction]:
    """Truncated SVD of `delta` [out, in] into LoRA factors with scale 1."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # U [out, k], S [k], Vh [k, in]
    root = S[:rank].sqrt()
    b = U[:, :rank] * root  # [out, r]
    a = root[:, None] * Vh[:rank]  # [r, in]
    energy = S.double().pow(2)
    retained = float(energy[:rank].sum() / energy.sum())
    weights = LoRAWeights(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous(), alpha=float(rank))
    return weights, ModuleExtraction(rank=rank, retained_energy=retained, delta_norm=float(delta.norm()))


def _select_targets(layout: BaseModules, target_modules: list[str] | None, rank: int) -> set[str]:
    """Full names of the projections to extract, after checking the short names and the rank."""
    projections = layout.projection_names()
    short_names = sorted({n.rsplit(".", 1)[-1] for n in projections})
    wanted = target_modules or short_names
    unknown = [t for t in wanted if t not in short_names]
    if unknown:
        raise AdapterError(
            f"target module(s) {', '.join(map(repr, unknown))} are not projections of {layout.label}; "
            f"choose from {', '.join(short_names)}"
        )
    targets = {n for n in projections if n.rsplit(".", 1)[-1] in wanted}
    if rank < 1:
        raise AdapterError(f"rank must be a positive integer, got {rank}")
    for name in targets:
        out_f, in_f = layout.linear[name]
        if rank > min(out_f, in_f):
            raise AdapterError(
                f"rank {rank} exceeds the smaller side of {name!r} ([{out_f}, {in_f}]); a LoRA of that rank "
                f"carries no more than the full delta. Use --rank {min(out_f, in_f)} or less"
            )
    return targets


def _check_same_shapes(base: CheckpointReader, tuned: CheckpointReader) -> None:
    base_cfg, tuned_cfg = ModelConfig.from_dict(base.config_dict()), ModelConfig.from_dict(tuned.config_dict())
    for name in _SHAPE_FIELDS:
        if getattr(base_cfg, name) != getattr(tuned_cfg, name):
            raise CheckpointError(
                f"{tuned.path} is not a fine-tune of {base.path}: {name} is {getattr(tuned_cfg, name)} there and "
                f"{getattr(base_cfg, name)} in the base; extraction needs the same architecture and shapes"
            )
    base_keys, tuned_keys = set(base.keys()), set(tuned.keys())
    if base_keys != tuned_keys:
        only_base, only_tuned = sorted(base_keys - tuned_keys), sorted(tuned_keys - base_keys)
        raise CheckpointError(
            f"{base.path} and {tuned.path} hold different tensors (only in the base: {only_base[:4]}; only in the "
            f"fine-tune: {only_tuned[:4]}); extraction needs checkpoints of the same model"
        )


def _paired(base: CheckpointReader, tuned: CheckpointReader) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, base tensor, tuned tensor) in the fine-tune's order; both streams are read once.

    Base tensors read ahead of their partner wait in `pending`: nothing when both files list
    tensors in the same order, more the more the orders differ. The key sets are known equal.
    """
    base_stream = base.tensors()
    pending: dict[str, torch.Tensor] = {}
    for name, w_tuned in tuned.tensors():
        while name not in pending:
            item = next(base_stream, None)
            if item is None:
                raise CheckpointError(f"{base.path} lists {name!r} but its tensor stream does not yield it")
            pending[item[0]] = item[1]
        w_base = pending.pop(name)
        if w_base.shape != w_tuned.shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(w_base.shape)} in {base.path} but {tuple(w_tuned.shape)} in "
                f"{tuned.path}; extraction needs checkpoints of the same shapes"
            )
        yield name, w_base, w_tuned
