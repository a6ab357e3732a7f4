"""Build a model from a checkpoint: construct on the meta device, then stream tensors into it.

Loading is strict: every parameter must come from the checkpoint with the right shape, and every
checkpoint tensor must find a parameter; both lists are reported in full otherwise. Format
details (HF directories, GGUF) stay in the readers of `runtime/checkpoints/`; this file sees HF
names only.

A checkpoint whose config.json carries a `quantization_config` (compressed-tensors int4/int8, or
bitsandbytes NF4) gets quantized modules (`runtime.quant`) in place of the linears it quantizes,
built on the meta device like the rest; their tensors are checked and turned into buffers by
`runtime.checkpoints.quantized`, under the same strict key accounting.

`serving_layout` turns a loaded model into the engine's layout, chosen by its device: packed
weights dequantized once on CPU, q/k/v and gate/up stacked in every weight format.

The kernel backend (`QUADAPT_KERNELS`) is resolved here, once, for the load device, and every
module that calls a kernel keeps it: a bad setting is refused before any weight is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import kernels
from . import CheckpointReader, as_reader, is_derived_key
from .quantized import PackedIntSpec, check_linear_shape, checkpoint_keys, module_buffers, quantized_linears
from ..model.config import ModelConfig
from ..errors import CheckpointError, UnsupportedError
from ..model.fused import fuse_projections
from ..model.model import CausalLM
from ..model.quant import NF4Linear, PackedIntLinear


def load_model(
    source: str | Path | CheckpointReader,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> CausalLM:
    """Load a Llama-family model from a checkpoint directory or a `.gguf` file.

    Args:
        source: a checkpoint path, or a reader already opened on one.
        dtype: dtype of the float parameters (and of the activations). Quantized weights keep
            their packed buffers, whatever `dtype` is.
        device: where the parameters live.

    Returns:
        The model in eval mode, its parameters frozen.

    Raises:
        CheckpointError: missing or unexpected tensors, wrong shapes, unreadable files.
        ConfigError, UnsupportedError: a config (or quantization_config) quadapt cannot run, or a
            `QUADAPT_KERNELS` setting that cannot run on `device`.
    """
    try:
        backend = kernels.resolve_backend(device)
    except kernels.KernelBackendError as e:
        raise UnsupportedError(str(e)) from None
    reader = as_reader(source)
    config_dict = reader.config_dict()
    config = ModelConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = CausalLM(config)
    quantized = _QuantizedLinears(model, config_dict, str(reader.path), device)

    expected = _expected_shapes(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in reader.tensors():
        if quantized.take(name, tensor):
            continue
        if name not in expected:
            tied_head = name == "lm_head.weight" and config.tie_word_embeddings
            if not (tied_head or is_derived_key(name)):
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{reader.path}: tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies "
                f"{expected[name]}; the weights and config.json belong to different models"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{reader.path}: tensor {name!r} has dtype {tensor.dtype}; float weights expected")
        _assign(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)

    missing = sorted(set(expected) - loaded) + quantized.missing()
    packed_embedding = [name for name in unexpected if name.startswith("model.embed_tokens.weight_")]
    if packed_embedding:
        raise UnsupportedError(
            f"{reader.path}: the embedding is quantized ({', '.join(packed_embedding)}); quadapt runs quantized "
            "linears but keeps the embedding float. Convert the float model with `quadapt convert`, which keeps it float"
        )
    if missing or unexpected:
        raise CheckpointError(_key_report(reader.path, missing, unexpected))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _bind_kernel_backend(model, backend)
    return model.eval().requires_grad_(False)


def serving_layout(model: CausalLM, *, dequantize: bool | None = None) -> CausalLM:
    """Lay a loaded model out as the engine runs it, by its device: packed linears dequantized
    once into float `nn.Linear`s of the model's dtype (`dequantize`; None: on CPU only), then q/k/v
    and gate/up stacked into one module each, whatever the weight format (`fused.fuse_projections`).

    On CPU the reference dequant-matmul unpacks the whole weight on every call, which makes a
    quantized model slower than the float one (see `docs/engine.md`); dequantized once, it runs
    the float model's matmuls at the float model's memory. The results are unchanged, since the
    reference computes exactly `x @ dequantize(W).T`. On a GPU the packed weights stay packed and
    their kernels read them.

    Args:
        model: a model from `load_model`, without LoRA slots; modified in place.
        dequantize: dequantize packed linears; None = when the model lives on the CPU.

    Returns:
        `model`.
    """
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    if dequantize if dequantize is not None else device.type == "cpu":
        dequantize_linears(model)
    fuse_projections(model)
    return model


def dequantize_linears(model: nn.Module) -> int:
    """Replace every packed linear of `model` by an `nn.Linear` holding its dequantized weight in
    the model's float dtype. Returns how many were replaced."""
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, (PackedIntLinear, NF4Linear))]
    for name, module in packed:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.dequantize().to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(packed)


def _bind_kernel_backend(model: CausalLM, backend: kernels.Backend) -> None:
    """Give every kernel-calling module the backend resolved at load; LoRA slots added later
    read it from `model.kernel_backend`."""
    model.kernel_backend = backend
    for module in model.modules():
        if hasattr(module, "kernel_backend"):
            module.kernel_backend = backend


class _QuantizedLinears:
    """The quantized linears of a model being loaded: swaps them in, then fills them as tensors arrive.

    A module's tensors may arrive in any order; they are held (packed, small) until the module
    has all of them, then checked and assigned at once.
    """

    def __init__(self, model: CausalLM, config_dict: dict[str, Any], source: str, device: torch.device | str) -> None:
        self.model, self.source, self.device = model, source, device
        self.specs: dict[str, Any] = {}
        self.owner: dict[str, str] = {}  # checkpoint key -> module name
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.done: set[str] = set()
        self.keys: dict[str, list[str]] = {}  # module name -> its checkpoint keys
        if "quantization_config" not in config_dict:
            return
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        if model.config.tie_word_embeddings:
            del linears["lm_head"]  # it is the embedding matrix, which stays float
        self.specs = quantized_linears(config_dict, linears)
        for module, spec in self.specs.items():  # every shape checked before any module changes
            check_linear_shape(module, spec, (linears[module].out_features, linears[module].in_features), source)
        for module, spec in self.specs.items():
            _swap(model, module, spec)
            self.keys[module] = checkpoint_keys(module, spec)
            self.owner.update(dict.fromkeys(self.keys[module], module))

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Keep `tensor` if it belongs to a quantized linear; False if it is not one of theirs."""
        module = self.owner.get(name)
        if module is None:
            return False
        if module in self.done or name in self.pending.get(module, {}):
            raise CheckpointError(f"{self.source}: tensor {name!r} appears twice in the checkpoint")
        parts = self.pending.setdefault(module, {})
        parts[name] = tensor
        if len(parts) == len(self.keys[module]):
            self._fill(module, self.pending.pop(module))
        return True

    def missing(self) -> list[str]:
        """Checkpoint keys of quantized linears that never arrived."""
        return sorted(
            key for module, keys in self.keys.items() if module not in self.done
            for key in keys if key not in self.pending.get(module, {})
        )

    def _fill(self, module: str, tensors: dict[str, torch.Tensor]) -> None:
        target = self.model.get_submodule(module)
        shape = (target.out_features, target.in_features)
        values = module_buffers(module, self.specs[module], tensors, shape, self.source)
        for key, value in values.items():
            if isinstance(value, torch.Tensor) or value is None:
                target._buffers[key] = None if value is None else value.to(self.device)
            else:
                setattr(target, key, value)  # an attribute of the format, e.g. NF4's dtype
        self.done.add(module)


def _swap(model: CausalLM, name: str, spec: Any) -> None:
    """Replace the nn.Linear `name` by the quantized module `spec` describes, on the meta device."""
    linear = model.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    shape = dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)
    with torch.device("meta"):
        if isinstance(spec, PackedIntSpec):
            module = PackedIntLinear(**shape, num_bits=spec.num_bits, group_size=spec.group_size, symmetric=spec.symmetric)
        else:
            module = NF4Linear(**shape)
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    # named_parameters() lists a tied weight once, under its first name (the embedding).
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)


def _key_report(path: Path, missing: list[str], unexpected: list[str], shown: int = 12) -> str:
    def listing(names: list[str]) -> str:
        more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    parts = [f"{path}: the checkpoint does not match the model config.json describes."]
    if missing:
        parts.append(f"Missing {len(missing)} tensor(s): {listing(missing)}.")
    if unexpected:
        parts.append(f"Unexpected {len(unexpected)} tensor(s): {listing(unexpected)}.")
    parts.append("Check that config.json and the weights come from the same model.")
    return " ".join(parts)
