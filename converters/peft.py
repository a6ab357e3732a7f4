"""Writing LoRA adapters in PEFT's format, normalized.

`write_peft_adapter` writes standard keys, explicit `target_modules`, and `rank_pattern` /
`alpha_pattern` keyed by escaped full module names, which PEFT loads unchanged. Reading and
checking adapters is `runtime.checkpoints.peft`; this file only writes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..runtime.checkpoints.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX, PeftAdapter
from .writer import staged_dir


def normalized_config(adapter: PeftAdapter, base_linear_names: Collection[str] | None = None) -> dict[str, Any]:
    """The adapter_config.json quadapt writes: every module and its rank and alpha explicit.

    `target_modules` is the short names (`["q_proj", "v_proj"]`) when those select exactly the
    adapter's modules among `base_linear_names`, else the full module names. `r`/`lora_alpha`
    are the most common values; modules that differ get a `rank_pattern`/`alpha_pattern` entry
    keyed by their escaped full name, so no pattern can catch another module.
    """
    names = sorted(adapter.modules)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    covers = base_linear_names is not None and sorted(
        n for n in base_linear_names if n.rsplit(".", 1)[-1] in short
    ) == names
    r = _most_common(w.rank for w in adapter.modules.values())
    alpha = _most_common(w.alpha for w in adapter.modules.values())
    source = adapter.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": source.get("base_model_name_or_path"),
        "revision": source.get("revision"),
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": source.get("lora_dropout", 0.0),
        "use_rslora": adapter.use_rslora,
        "target_modules": short if covers else names,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(n): w.rank for n, w in adapter.modules.items() if w.rank != r},
        "alpha_pattern": {re.escape(n): _number(w.alpha) for n, w in adapter.modules.items() if w.alpha != alpha},
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
    }


def write_peft_adapter(
    adapter: PeftAdapter,
    out_dir: str | Path,
    *,
    base_linear_names: Collection[str] | None = None,
    extra_files: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `adapter` as a normalized PEFT directory, atomically (staged, then renamed).

    Args:
        adapter: the adapter; its tensors are written in their own dtype.
        out_dir: the directory to create.
        base_linear_names: the base's linear module names, to write short target_modules when exact.
        extra_files: more files to write beside the adapter (name -> text), e.g. a report.
        overwrite: replace an existing directory at `out_dir`.

    Returns:
        `out_dir`.

    Raises:
        QuadaptError: `out_dir` exists and `overwrite` is False, or is a file.
    """
    from safetensors.torch import save_file

    config = normalized_config(adapter, base_linear_names)
    tensors = {}
    for name, w in adapter.modules.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = w.a.detach().to("cpu").contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = w.b.detach().to("cpu").contiguous()
    with staged_dir(out_dir, overwrite=overwrite) as staging:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for file_name, text in (extra_files or {}).items():
            (staging / file_name).write_text(text, encoding="utf-8")
    return Path(out_dir).expanduser()


def _most_common(values: Iterator[Any]) -> Any:
    # Ties go to the larger value, so the choice does not depend on module order.
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
