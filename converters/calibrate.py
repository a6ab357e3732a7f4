"""Calibration for GPTQ: tokenize a text, then run the model one decoder layer at a time.

`gptq_layers` holds one layer in memory at a time. It embeds the calibration sequences, then for
each layer: loads its float weights, runs the layer on the current hidden states while
accumulating each linear's input Hessian (q/k/v share one, gate/up share one), hands every linear
to a `quantize` callback, puts the dequantized weights back, and runs the layer again so the next
layer sees what the quantized model will compute. Tensors are yielded for writing as they are
final, in model order (embedding, layers, final norm, head).

Layers need random access to the checkpoint: an HF directory is read in place (`hf.SafetensorsFile`,
plain reads of one tensor at a time); any other reader (a GGUF file, a merged-adapter stream) is first spilled to a
scratch directory of safetensors files, one pass, one tensor at a time.

It does not choose schemes or write files: `plan.py` and `convert.py` do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..runtime.config import ModelConfig
from ..runtime.errors import InvalidParameterError
from ..runtime.model import CausalLM, DecoderLayer
from ..runtime.tokenizer import Tokenizer
from ..runtime.checkpoints import CheckpointReader
from .gptq import HessianAccumulator

logger = logging.getLogger(__name__)

MIN_CALIBRATION_TOKENS = 128  # below this, H = X^T X of a 576-wide layer is badly rank-deficient
MAX_CALIBRATION_TOKENS = 16384
CALIBRATION_SEQUENCE_LENGTH = 512

# Linears that read the same input share a Hessian: (the linears, the one whose input is hooked).
_INPUT_GROUPS = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.q_proj"),
    (("self_attn.o_proj",), "self_attn.o_proj"),
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_proj"),
    (("mlp.down_proj",), "mlp.down_proj"),
)

# quantize(module name, float weight, Hessian) -> (tensors to write, dequantized float weight)
QuantizeFn = Callable[[str, torch.Tensor, torch.Tensor], tuple[list[tuple[str, torch.Tensor]], torch.Tensor]]


def calibration_sequences(
    path: str | Path, tokenizer: Tokenizer, *, max_tokens: int = MAX_CALIBRATION_TOKENS, sequence_length: int
) -> list[torch.Tensor]:
    """Tokenize a calibration text file and cut it into sequences.

    Args:
        path: a UTF-8 text file.
        tokenizer: the model's tokenizer (its usual special tokens are added, e.g. BOS).
        max_tokens: use at most this many tokens.
        sequence_length: tokens per sequence; the last one may be shorter.

    Returns:
        Token id tensors [1, T].

    Raises:
        InvalidParameterError: the file cannot be read, or holds fewer than MIN_CALIBRATION_TOKENS tokens.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameterError(f"cannot read calibration text {str(path)!r}: {e}; pass a UTF-8 text file") from None
    ids = tokenizer.encode(text)[:max_tokens]
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise InvalidParameterError(
            f"calibration text {str(path)!r} is {len(ids)} tokens long; GPTQ needs at least {MIN_CALIBRATION_TOKENS} "
            "tokens (a few thousand work well); pass a longer text with --calib-text"
        )
    chunks = [ids[i : i + sequence_length] for i in range(0, len(ids), sequence_length)]
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks.pop()  # one token alone carries no attention context
    return [torch.tensor([chunk]) for chunk in chunks]


class TensorStore:
    """Random access by name to a checkpoint's tensors (see the module docstring)."""

    def __init__(self, reader: CheckpointReader, scratch: Path) -> None:
        from safetensors.torch import save_file

        from ..runtime.checkpoints.hf import HFCheckpoint, SafetensorsFile

        self.files: dict[str, SafetensorsFile] = {}
        if isinstance(reader, HFCheckpoint):
            for path, names in reader.shards.items():
                file = SafetensorsFile(path)
                self.files.update(dict.fromkeys(names, file))
            return
        scratch.mkdir(parents=True, exist_ok=True)
        for i, (name, tensor) in enumerate(reader.tensors()):
            path = scratch / f"{i:06d}.safetensors"
            save_file({name: tensor.contiguous()}, path)
            self.files[name] = SafetensorsFile(path)

    def get(self, name: str) -> torch.Tensor:
        return self.files[name].read(name)


def gptq_layers(
    store: TensorStore,
    names: list[str],
    config: ModelConfig,
    sequences: list[torch.Tensor],
    targets: set[str],
    quantize: QuantizeFn,
    check: Callable[[str, torch.Tensor], None] = lambda name, tensor: None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Quantize a model's `targets` linears with GPTQ, layer by layer; yield every tensor to write.

    Args:
        store: random access to the float checkpoint.
        names: every tensor name to write, in the checkpoint's order.
        config: the model's config.
        sequences: calibration token ids, each [1, T].
        targets: names of the linears to quantize (`model.layers.3.mlp.up_proj`); others stay float.
        quantize: called once per target linear (see `QuantizeFn`).
        check: called on every tensor as it is read, before it is used (e.g. to refuse NaN).

    Returns:
        An iterator of `(name, tensor)`: float tensors as the checkpoint holds them, and what
        `quantize` returns for each target.
    """
    def read(name: str) -> torch.Tensor:
        tensor = store.get(name)
        check(name, tensor)
        return tensor

    with torch.device("meta"):
        shell = CausalLM(config)  # only for its rope tables, which live on the CPU
    embed = read("model.embed_tokens.weight")
    yield "model.embed_tokens.weight", embed
    hidden = [torch.nn.functional.embedding(ids, embed.float()) for ids in sequences]  # [1, T, hidden] each
    del embed
    rope = [shell.rope(torch.arange(ids.shape[1])[None], torch.float32) for ids in sequences]
    written = {"model.embed_tokens.weight"}

    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        own = [name for name in names if name.startswith(prefix)]
        weights = {name: read(name) for name in own}  # one layer, as stored
        layer = DecoderLayer(config, i).float()
        layer.load_state_dict({name[len(prefix) :]: w.float() for name, w in weights.items()}, strict=True)
        layer.requires_grad_(False)
        hessians = _collect_hessians(layer, hidden, rope, prefix, targets)
        errors = []
        for name in own:
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in targets:
                tensors, restored = quantize(module, weights[name], hessians[module[len(prefix) :]])
                linear = layer.get_submodule(module[len(prefix) :])
                errors.append(_relative_error(linear.weight, restored))
                linear.weight.copy_(restored)
                yield from tensors
            else:
                yield name, weights[name]
            written.add(name)
        del weights
        with torch.no_grad():
            hidden = [layer(h, cos, sin, None) for h, (cos, sin) in zip(hidden, rope)]
        mean = sum(errors) / len(errors) if errors else 0.0
        logger.info(
            "gptq: layer %d/%d quantized (mean relative weight change %.4f)", i + 1, config.num_hidden_layers, mean
        )
    for name in names:
        if name not in written:
            yield name, read(name)


def _collect_hessians(
    layer: DecoderLayer, hidden: list[torch.Tensor], rope: list[tuple[torch.Tensor, torch.Tensor]], prefix: str,
    targets: set[str],
) -> dict[str, torch.Tensor]:
    """Run the float layer on the hidden states; return the input Hessian of each target linear."""
    hooked: dict[str, HessianAccumulator] = {}
    handles = []
    for members, source in _INPUT_GROUPS:
        if not any(prefix + member in targets for member in members):
            continue
        linear = layer.get_submodule(source)
        accumulator = HessianAccumulator(linear.in_features)
        handles.append(linear.register_forward_pre_hook(lambda _m, args, acc=accumulator: acc.add(args[0])))
        for member in members:
            hooked[member] = accumulator
    try:
        with torch.no_grad():
            for h, (cos, sin) in zip(hidden, rope):
                layer(h, cos, sin, None)
    finally:
        for handle in handles:
            handle.remove()
    return {member: accumulator.value() for member, accumulator in hooked.items()}


def _relative_error(original: torch.Tensor, restored: torch.Tensor) -> float:
    return float((original - restored).norm() / original.norm().clamp(min=1e-12))
