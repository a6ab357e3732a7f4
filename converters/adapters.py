"""`convert_adapter`: a PEFT adapter checked against its base, written back normalized.

Reading and checking adapters is `runtime.checkpoints` (`peft`, `peft_fit`); writing the PEFT
format is `peft.py`; SVD extraction is `extract.py`; merging is `merge.py`.
"""

from __future__ import annotations

from pathlib import Path

from ..runtime.checkpoints import CheckpointReader, as_reader
from ..runtime.checkpoints.peft import PeftAdapter
from ..runtime.checkpoints.peft_fit import BaseModules, load_adapter_for
from .peft import write_peft_adapter
from .writer import check_output_dir


def convert_adapter(
    base: str | Path | CheckpointReader,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> PeftAdapter:
    """Validate a PEFT adapter against a base checkpoint and write it normalized.

    The output has the standard keys, explicit target_modules and per-module rank/alpha patterns
    (see `peft.normalized_config`); the weights are copied unchanged, so PEFT and quadapt give
    the same logits with it as with the input.

    Args:
        base: the base checkpoint (directory or .gguf, float or quantized), or a reader on it;
            only its config.json is read.
        adapter_dir: the PEFT adapter directory.
        out_dir: the directory to create.
        overwrite: replace an existing directory at `out_dir`.

    Returns:
        The adapter as read and checked.

    Raises:
        QuadaptError: `out_dir` exists (without `overwrite`), the base is unreadable, or the
            adapter is malformed, unsupported or made for another base.
    """
    check_output_dir(out_dir, overwrite=overwrite)
    reader = as_reader(base)
    modules = BaseModules.of_checkpoint(reader)
    adapter = load_adapter_for(adapter_dir, modules)
    write_peft_adapter(adapter, out_dir, base_linear_names=modules.projection_names(), overwrite=overwrite)
    return adapter
