"""What training writes: the PEFT adapter, the resumable training state, the loss curve.

`save_adapter` writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's layout
(keys `base_model.model.<module>.lora_A.weight`), which `PeftModel.from_pretrained`, `quadapt
generate --adapter` and the engine load. `save_state` / `load_state` keep what an exact resume
needs: the LoRA factors, AdamW's moments, the step, the scheduler's position and the RNG states,
all as safetensors tensors plus one JSON file: nothing is pickled, so nothing is unpickled.
Every file is written under a temporary name and renamed, so an interrupted run leaves the last
complete file in place.

It does not train (`train/loop.py`) and reads no adapter for serving (`runtime/checkpoints/peft.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..runtime.checkpoints.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX
from ..runtime.errors import InvalidParameterError, UnsupportedError
from ..runtime.files import follow_umask
from .lora import QLoRALinear

STATE_DIR = "training_state"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LOSS_PLOT = "loss.png"
LOG_FILE = "log.jsonl"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save `tensors` as safetensors at `path` through a temporary file and a rename."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    follow_umask(tmp)  # save_file makes 0600; the adapter is read by servers as any output is
    os.replace(tmp, path)


def adapter_config(modules: Mapping[str, QLoRALinear], *, base_model: str | None, dropout: float,
                   num_layers: int | None = None) -> dict[str, Any]:
    """PEFT's adapter_config.json for `modules` (all of one rank and alpha, as `add_lora` makes them);
    `layers_to_transform` lists their layers when they are not all `num_layers` of the model."""
    first = next(iter(modules.values()))
    layers = sorted({int(n.split(".")[2]) for n in modules})
    every = num_layers is not None and layers == list(range(num_layers))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": first.rank,
        "lora_alpha": int(first.alpha) if float(first.alpha).is_integer() else first.alpha,
        "lora_dropout": dropout,
        "use_rslora": False,
        # Short names: `add_lora` wraps every decoder-layer projection of these names, as PEFT does.
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "exclude_modules": None,
        "layers_to_transform": None if every else layers,
        "layers_pattern": None if every else "layers",
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
    }


def save_adapter(out_dir: str | Path, modules: Mapping[str, QLoRALinear], *, base_model: str | None = None,
                 dropout: float = 0.0, dtype: torch.dtype | None = None, num_layers: int | None = None) -> Path:
    """Write the adapter of `modules` into `out_dir` (created if missing) as a PEFT LoRA adapter.

    Args:
        out_dir: the adapter directory; other files in it are left alone.
        modules: HF module name -> trained module (`train.lora.lora_modules`).
        base_model: recorded as `base_model_name_or_path`.
        dropout: recorded as `lora_dropout` (inference ignores it).
        dtype: the saved factors' dtype (e.g. bfloat16 for a smaller file); None keeps theirs.
        num_layers: the base's decoder layers; None (unknown) always writes `layers_to_transform`.

    Returns:
        `out_dir`.

    Raises:
        InvalidParameterError: no modules, or `out_dir` is a file.
    """
    if not modules:
        raise InvalidParameterError("there are no LoRA modules to save; add them with train.lora.add_lora first")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidParameterError(f"adapter output {str(out)!r} is a file; name a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in sorted(modules.items()):
        for factor in ("lora_A", "lora_B"):
            value = getattr(m, factor).detach()
            tensors[f"{KEY_PREFIX}{name}.{factor}.weight"] = value if dtype is None else value.to(dtype)
    atomic_save_tensors(out / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    config = adapter_config(modules, base_model=base_model, dropout=dropout, num_layers=num_layers)
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def save_state(out_dir: Path, tensors: Mapping[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write the training state (tensors, and JSON-able `info`) under `out_dir/training_state/`;
    the JSON file goes last, so a state is complete once it names its step."""
    state = out_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(state / STATE_TENSORS, tensors)
    atomic_write_text(state / STATE_JSON, json.dumps(info, indent=2) + "\n")


def load_state(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what `save_state` wrote.

    Raises:
        InvalidParameterError: there is no complete training state in `out_dir`.
    """
    from safetensors.torch import load_file

    state = out_dir / STATE_DIR
    if not (state / STATE_JSON).is_file() or not (state / STATE_TENSORS).is_file():
        raise InvalidParameterError(
            f"--resume: {str(out_dir)!r} holds no training state ({STATE_DIR}/{STATE_JSON}); start without --resume"
        )
    info = json.loads((state / STATE_JSON).read_text(encoding="utf-8"))
    return load_file(state / STATE_TENSORS), info


def plot_losses(path: Path, train: list[tuple[int, float]], held_out: list[tuple[int, float]]) -> None:
    """Draw the training and held-out loss against the step into a PNG at `path` (matplotlib, Agg).

    Raises:
        UnsupportedError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise UnsupportedError("the loss curve needs matplotlib; install it with: pip install 'quadapt[train]'") from None

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
