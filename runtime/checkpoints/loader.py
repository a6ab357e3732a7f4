"""Build a model from a checkpoint: construct on the meta device, then stream tensors into it.

Loading is strict: every parameter must come from the checkpoint with the right shape, and every
checkpoint tensor must find a parameter; both lists are reported in full otherwise. Format
details (HF directories, GGUF) stay in the readers of `runtime/checkpoints/`; this file sees HF
names only.

A checkpoint whose config.json carries a `quantization_config` (compressed-tensors int4/int8, or
bitsandbytes NF4) gets quantized modules (`runtime.quant`) in place of the linears it quantizes,
built on the meta device like the rest; their tensors are checked and turned into buffers by
`runtime.checkpoints.quantized`, under the same strict key accounting.

The model has one layout whatever the format and device: the checkpoint's q/k/v and gate/up
tensors are written into its stacked `qkv_proj` and `gate_up_proj` (packed formats stacked packed).
Packed weights are dequantized here, once, when the caller asks (the engine on CPU).

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
from ..model.fused import FusedLinear, as_float_linear, stack_modules
from ..model.model import CausalLM
from ..model.quant import NF4Linear, PackedIntLinear


def load_model(
    source: str | Path | CheckpointReader,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    dequantize: bool = False,
) -> CausalLM:
    """Load a Llama-family model from a checkpoint directory or a `.gguf` file.

    The checkpoint's q_proj/k_proj/v_proj and gate_proj/up_proj tensors go into the model's
    stacked `qkv_proj` and `gate_up_proj` (`fused.stack_modules`): float ones as a `FusedLinear`,
    packed ones of one format as a packed module of that format. A group whose members cannot stack
    packed (one kept float by `convert --keep`, or an NF4 weight that is not a whole number of
    64-weight blocks) is dequantized into `dtype` and stacked float.

    Args:
        source: a checkpoint path, or a reader already opened on one.
        dtype: dtype of the float parameters (and of the activations). Quantized weights keep
            their packed buffers, whatever `dtype` is, unless `dequantize`.
        device: where the parameters live.
        dequantize: replace every packed linear by a float one holding its dequantized weight in
            `dtype`, once, here. The engine asks for it on CPU, where the reference dequant-matmul
            would unpack every weight on every call (see `docs/engine.md`); the results are
            unchanged, since the reference computes exactly `x @ dequantize(W).T`.

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
    members = _Members(model)
    quantized = _QuantizedLinears(members, config_dict, str(reader.path), device)

    expected = members.expected_shapes()
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
        members.assign(name, tensor.to(device=device, dtype=dtype))
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
    if dequantize:
        members.dequantize(dtype)
    members.stack(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    bind_kernel_backend(model, backend)
    return model.eval().requires_grad_(False)


class _Members:
    """The linears of a model being loaded, by HF name: the model's own, and a float `nn.Linear`
    (on meta) for each section of a stacked module, filled alone and stacked once all are loaded."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.sections: dict[str, nn.Module] = {}  # HF name of a stacked projection -> its module
        self.groups: dict[str, list[str]] = {}  # stacked module name -> its sections' HF names
        for name, module in list(model.named_modules()):
            if not isinstance(module, FusedLinear):
                continue
            parent = name.rpartition(".")[0]
            self.groups[name] = []
            for section, size in zip(module.section_names, module.section_sizes):
                with torch.device("meta"):
                    linear = nn.Linear(module.in_features, size, bias=module.bias is not None)
                self.sections[f"{parent}.{section}"] = linear
                self.groups[name].append(f"{parent}.{section}")

    def get(self, name: str) -> nn.Module:
        """The module of HF linear (or other module) `name`."""
        return self.sections[name] if name in self.sections else self.model.get_submodule(name)

    def put(self, name: str, module: nn.Module) -> None:
        """Make `module` the one of HF linear `name`."""
        if name in self.sections:
            self.sections[name] = module
            return
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, module)

    def linears(self) -> dict[str, nn.Linear]:
        """Every float `nn.Linear` by HF name, in model order."""
        out = {}
        for name, module in self.model.named_modules():
            if name in self.groups:
                out.update((section, self.sections[section]) for section in self.groups[name])
            elif isinstance(module, nn.Linear):
                out[name] = module
        return out

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every float parameter the checkpoint must hold (a tied weight once,
        under its first name, the embedding)."""
        shapes = {}
        for name, module in self.model.named_modules():
            if name in self.groups:
                for section in self.groups[name]:
                    shapes.update({f"{section}.{p}": tuple(t.shape) for p, t in self.sections[section].named_parameters()})
            elif not isinstance(module, FusedLinear):
                for p, t in module.named_parameters(recurse=False):
                    tied = t is self.model.model.embed_tokens.weight and module is not self.model.model.embed_tokens
                    if not tied:
                        shapes[f"{name}.{p}" if name else p] = tuple(t.shape)
        return shapes

    def assign(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, param_name = name.rpartition(".")
        self.get(module_name)._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)

    def dequantize(self, dtype: torch.dtype) -> None:
        """Replace every packed linear by a float `nn.Linear` of its dequantized weight in `dtype`."""
        packed = [n for n, m in self.model.named_modules() if isinstance(m, (PackedIntLinear, NF4Linear))]
        packed += [n for n, m in self.sections.items() if isinstance(m, (PackedIntLinear, NF4Linear))]
        for name in packed:
            self.put(name, as_float_linear(self.get(name), dtype))

    def stack(self, dtype: torch.dtype) -> None:
        """Put each group's stacked module in the model (`fused.stack_modules`), dropping the
        group's separate modules as it goes, so the copy costs one group's memory at a time."""
        for name, sections in self.groups.items():
            stacked = stack_modules([(s.rpartition(".")[2], self.sections.pop(s)) for s in sections], dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, stacked)


def bind_kernel_backend(model: CausalLM, backend: kernels.Backend) -> None:
    """Give every kernel-calling module the backend resolved at load, and on Triton repack packed
    weights into the kernels' layout (`use_kernel_layout`); LoRA slots added later read the
    backend from `model.kernel_backend`."""
    model.kernel_backend = backend
    for module in model.modules():
        if hasattr(module, "kernel_backend"):
            module.kernel_backend = backend
        if backend == "triton" and isinstance(module, (PackedIntLinear, NF4Linear)):
            module.use_kernel_layout()


class _QuantizedLinears:
    """The quantized linears of a model being loaded: swaps them in, then fills them as tensors arrive.

    A module's tensors may arrive in any order; they are held (packed, small) until the module
    has all of them, then checked and assigned at once.
    """

    def __init__(self, members: _Members, config_dict: dict[str, Any], source: str, device: torch.device | str) -> None:
        self.members, self.source, self.device = members, source, device
        self.specs: dict[str, Any] = {}
        self.owner: dict[str, str] = {}  # checkpoint key -> module name
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.done: set[str] = set()
        self.keys: dict[str, list[str]] = {}  # module name -> its checkpoint keys
        if "quantization_config" not in config_dict:
            return
        linears = members.linears()
        if members.model.config.tie_word_embeddings:
            del linears["lm_head"]  # it is the embedding matrix, which stays float
        self.specs = quantized_linears(config_dict, linears)
        for module, spec in self.specs.items():  # every shape checked before any module changes
            check_linear_shape(module, spec, (linears[module].out_features, linears[module].in_features), source)
        for module, spec in self.specs.items():
            _swap(members, module, spec)
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
        target = self.members.get(module)
        shape = (target.out_features, target.in_features)
        values = module_buffers(module, self.specs[module], tensors, shape, self.source)
        for key, value in values.items():
            if isinstance(value, torch.Tensor) or value is None:
                target._buffers[key] = None if value is None else value.to(self.device)
            else:
                setattr(target, key, value)  # an attribute of the format, e.g. NF4's dtype
        self.done.add(module)


def _swap(members: _Members, name: str, spec: Any) -> None:
    """Replace the nn.Linear `name` by the quantized module `spec` describes, on the meta device."""
    linear = members.get(name)
    shape = dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)
    with torch.device("meta"):
        if isinstance(spec, PackedIntSpec):
            module = PackedIntLinear(**shape, num_bits=spec.num_bits, group_size=spec.group_size, symmetric=spec.symmetric)
        else:
            module = NF4Linear(**shape)
    members.put(name, module)


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
