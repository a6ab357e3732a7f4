"""Calibration: tokenize the calibration texts, then run the model one decoder layer at a time.

`calibration_sequences` reads the texts (the shipped default set, `calibration_set.py`, and/or the
user's files), cuts them into sequences, and takes them round-robin across texts up to a token
budget. `split_heldout` keeps every `HELDOUT_EVERY`-th sequence apart: the methods fit on the
rest and check each result on these (`calibrated.py`), so a layer that overfits its calibration
inputs is caught.

`calibrated_layers` holds one layer in memory at a time. It embeds the sequences, stacked into
batches of one length (`stack_sequences`), then for each layer: loads its float weights, runs the layer on the current hidden states while accumulating
each linear's input statistics on the fitting and the held-out sequences (q/k/v share one, gate/up
share one), hands the layer to a `quantize_layer` callback, puts what it returns back (the
dequantized linears, any float weight it rescaled), and runs the layer again so the next layer sees
what the quantized model will compute; each finished layer is logged with an estimate of the time
left. Tensors are yielded for writing as they are final, in model
order (embedding, layers, final norm, head).

Layers need random access to the checkpoint: an HF directory is read in place (`hf.SafetensorsFile`,
plain reads of one tensor at a time); any other reader (a GGUF file, a merged-adapter stream) is first spilled to a
scratch directory of safetensors files, one pass, one tensor at a time.

It does not choose schemes, quantize or write files: `plan.py`, `calibrated.py` and `convert.py` do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime.model.config import ModelConfig
from ..runtime.errors import InvalidParameterError
from ..runtime.model.fused import checkpoint_tensor, stack_state_dict, stacked_name
from ..runtime.model.model import CausalLM, DecoderLayer
from ..runtime.text.tokenizer import Tokenizer
from ..runtime.checkpoints import CheckpointReader
from .calibration_set import (
    DEFAULT_CALIBRATION_NAME, DEFAULT_CALIBRATION_TOKENS, MIN_TOKENS_PER_INPUT, default_calibration_texts,
)
from .gptq import HessianAccumulator

logger = logging.getLogger(__name__)

MIN_CALIBRATION_TOKENS = 128  # per text: below this a file is surely not what was meant
CALIBRATION_SEQUENCE_LENGTH = 512
HELDOUT_EVERY = 8  # every 8th sequence is held out to check each layer's result
# Tokens per batch of the layer-by-layer forward: same-length sequences run stacked, so each
# matmul and each Hessian product is over a few thousand rows rather than one sequence's.
CALIBRATION_BATCH_TOKENS = 4096

# Linears that read the same input share a Hessian: (the linears, the one whose input is hooked).
INPUT_GROUPS = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.q_proj"),
    (("self_attn.o_proj",), "self_attn.o_proj"),
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_proj"),
    (("mlp.down_proj",), "mlp.down_proj"),
)


@dataclass(frozen=True)
class LayerStats:
    """Input statistics of one linear in one layer: on the fitting and the held-out sequences."""

    fit: HessianAccumulator
    heldout: HessianAccumulator


@dataclass(frozen=True)
class LayerResult:
    """What `quantize_layer` returns for one decoder layer.

    Attributes:
        tensors: checkpoint name -> the tensors to write in its place (a packed linear's several).
            Names absent here are written as read.
        restored: checkpoint name -> the float weight the next layers must see (a dequantized
            linear, a rescaled norm), in the layer's own parameter shape.
        entries: quantized linear -> its manifest entry (`manifest.py`), for the conversion's report.
    """

    tensors: dict[str, list[tuple[str, torch.Tensor]]]
    restored: dict[str, torch.Tensor]
    entries: dict[str, dict[str, Any]]


# quantize_layer(layer prefix, {name: weight as stored}, {member: LayerStats}) -> LayerResult
QuantizeLayerFn = Callable[[str, dict[str, torch.Tensor], dict[str, LayerStats]], LayerResult]


def calibration_sequences(
    texts: str | Path | Sequence[str | Path] | None, tokenizer: Tokenizer, *,
    max_tokens: int = DEFAULT_CALIBRATION_TOKENS, sequence_length: int,
) -> list[torch.Tensor]:
    """Tokenize the calibration texts and cut them into sequences, up to `max_tokens` in all.

    Args:
        texts: UTF-8 text files, where the name "default" stands for the shipped default set
            (`calibration_set.py`); None is the default set alone.
        tokenizer: the model's tokenizer (its usual special tokens are added, e.g. BOS).
        max_tokens: use at most this many tokens, taking sequences round-robin across the texts
            so that each is represented.
        sequence_length: tokens per sequence; a text's last one may be shorter.

    Returns:
        Token id tensors [1, T].

    Raises:
        InvalidParameterError: a file cannot be read, or holds fewer than MIN_CALIBRATION_TOKENS tokens.
    """
    if texts is None:
        texts = [DEFAULT_CALIBRATION_NAME]
    elif isinstance(texts, (str, Path)):
        texts = [texts]
    contents = []
    for text in texts:
        contents += default_calibration_texts() if str(text) == DEFAULT_CALIBRATION_NAME else [_read(text)]
    per_text = [_chunks(label, content, tokenizer, sequence_length) for label, content in contents]
    sequences, total = [], 0
    for i in range(max(len(chunks) for chunks in per_text)):
        for chunks in per_text:
            if i < len(chunks) and total < max_tokens:
                chunk = chunks[i][: max_tokens - total]
                if len(chunk) >= 2:  # one token alone carries no attention context
                    sequences.append(torch.tensor([chunk]))
                    total += len(chunk)
    return sequences


def _read(text: str | Path) -> tuple[str, str]:
    path = Path(text).expanduser()
    try:
        return repr(str(path)), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameterError(f"cannot read calibration text {str(path)!r}: {e}; pass a UTF-8 text file") from None


def _chunks(label: str, content: str, tokenizer: Tokenizer, sequence_length: int) -> list[list[int]]:
    ids = tokenizer.encode(content)
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise InvalidParameterError(
            f"calibration text {label} is {len(ids)} tokens long; GPTQ needs at least {MIN_CALIBRATION_TOKENS} "
            "tokens (a few thousand work well); pass a longer text with --calib-text"
        )
    return [ids[i : i + sequence_length] for i in range(0, len(ids), sequence_length)]


def split_heldout(sequences: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(fitting, held-out): every `HELDOUT_EVERY`-th sequence held out, at least one of two or more.

    With a single sequence nothing can be held out; the checks then run on the fitting inputs.
    """
    if len(sequences) < 2:
        return sequences, []
    heldout = [s for i, s in enumerate(sequences) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1] or [sequences[-1]]
    kept = {id(s) for s in heldout}
    return [s for s in sequences if id(s) not in kept], heldout


def check_token_count(fit_tokens: int, widest: int, what: str) -> None:
    """Refuse fewer fitting tokens than the widest input; warn below `MIN_TOKENS_PER_INPUT` x it.

    A Hessian X^T X of a K-wide input has rank at most the number of tokens, so below K it is
    singular and the methods fit noise; well above K it is a stable estimate.

    Raises:
        InvalidParameterError: fewer tokens than `widest`.
    """
    if fit_tokens < widest:
        raise InvalidParameterError(
            f"{what}: {fit_tokens} calibration tokens fit the layers, fewer than the widest layer's {widest} inputs, "
            f"so its Hessian is singular; give at least {MIN_TOKENS_PER_INPUT * widest} tokens (--calib-tokens, or a "
            "longer --calib-text, or the default set)"
        )
    if fit_tokens < MIN_TOKENS_PER_INPUT * widest:
        logger.warning(
            "%s: %d calibration tokens for layers up to %d inputs wide; under %d x the width the input statistics are "
            "noisy and the result may overfit the text (the default set gives %d)",
            what, fit_tokens, widest, MIN_TOKENS_PER_INPUT, DEFAULT_CALIBRATION_TOKENS,
        )


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


def calibrated_layers(
    store: TensorStore,
    names: list[str],
    config: ModelConfig,
    fit: list[torch.Tensor],
    heldout: list[torch.Tensor],
    targets: set[str],
    quantize_layer: QuantizeLayerFn,
    check: Callable[[str, torch.Tensor], None] = lambda name, tensor: None,
    label: str = "calibrated",
    first_tokens: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Quantize a model's `targets` linears layer by layer on calibration inputs; yield every tensor to write.

    Args:
        store: random access to the float checkpoint.
        names: every tensor name to write, in the checkpoint's order.
        config: the model's config.
        fit: calibration token ids the methods fit on, each [1, T].
        heldout: calibration token ids held out for the checks, each [1, T] (may be empty).
        targets: names of the linears to quantize (`model.layers.3.mlp.up_proj`); others stay float.
        quantize_layer: called once per decoder layer (see `QuantizeLayerFn`, `LayerResult`).
        check: called on every tensor as it is read, before it is used (e.g. to refuse NaN).
        label: the method's name in the progress log.
        first_tokens: False leaves each sequence's first token (the attention sink) out of the
            statistics `quantize_layer` gets (AWQ's; see `awq.py`).

    Returns:
        An iterator of `(name, tensor)`: float tensors as the checkpoint holds them (or as
        `quantize_layer` rescaled them), and the quantized tensors of each target.
    """
    def read(name: str) -> torch.Tensor:
        tensor = store.get(name)
        check(name, tensor)
        return tensor

    with torch.device("meta"):
        shell = CausalLM(config)  # only for its rope tables, which live on the CPU
    embed = read("model.embed_tokens.weight")
    yield "model.embed_tokens.weight", embed
    batches = [(ids, False) for ids in stack_sequences(fit)] + [(ids, True) for ids in stack_sequences(heldout)]
    is_heldout = [held for _, held in batches]
    hidden = [torch.nn.functional.embedding(ids, embed.float()) for ids, _ in batches]  # [B, T, hidden] each
    del embed
    rope = [shell.rope(torch.arange(ids.shape[1])[None], torch.float32) for ids, _ in batches]  # [1, 1, T, D]
    written = {"model.embed_tokens.weight"}
    eta = LayerClock(label, config.num_hidden_layers)

    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        own = [name for name in names if name.startswith(prefix)]
        weights = {name: read(name) for name in own}  # one layer, as stored
        layer = DecoderLayer(config, i).float()
        layer.load_state_dict(stack_state_dict({name[len(prefix) :]: w.float() for name, w in weights.items()}),
                              strict=True)
        layer.requires_grad_(False)
        stats = _collect_stats(layer, hidden, rope, is_heldout, prefix, targets, first_tokens)
        result = quantize_layer(prefix, weights, stats)
        with torch.no_grad():
            for name, restored in result.restored.items():
                checkpoint_tensor(layer, name[len(prefix) :]).copy_(restored)
        for name in own:
            yield from result.tensors.get(name, [(name, weights[name])])
            written.add(name)
        del weights
        with torch.no_grad():
            hidden = [layer(h, cos, sin, None) for h, (cos, sin) in zip(hidden, rope)]
        eta.done(i + 1)
    for name in names:
        if name not in written:
            yield name, read(name)


def stack_sequences(sequences: list[torch.Tensor], tokens: int = CALIBRATION_BATCH_TOKENS) -> list[torch.Tensor]:
    """Sequences [1, T] stacked into batches [B, T] of one length, up to `tokens` tokens each (at
    least one sequence), in their order of first appearance."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for ids in sequences:
        by_length.setdefault(ids.shape[1], []).append(ids)
    batches = []
    for length, same in by_length.items():
        per_batch = max(1, tokens // length)
        batches += [torch.cat(same[i : i + per_batch]) for i in range(0, len(same), per_batch)]
    return batches


class LayerClock:
    """Logs each finished layer with its time and an estimate of the time left (the mean so far)."""

    def __init__(self, label: str, layers: int) -> None:
        self.label, self.layers, self.start = label, layers, time.perf_counter()

    def done(self, finished: int) -> None:
        elapsed = time.perf_counter() - self.start
        left = elapsed / finished * (self.layers - finished)
        logger.info(
            "%s: layer %d/%d quantized (%.0f s so far, about %s left)",
            self.label, finished, self.layers, elapsed, _duration(left),
        )


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _collect_stats(
    layer: DecoderLayer, hidden: list[torch.Tensor], rope: list[tuple[torch.Tensor, torch.Tensor]],
    is_heldout: list[bool], prefix: str, targets: set[str], first_tokens: bool,
) -> dict[str, LayerStats]:
    """Run the float layer on the hidden states; return each target linear's input statistics."""
    hooked: dict[str, LayerStats] = {}
    handles = []
    current = {"heldout": False}  # which accumulator the hooks feed, switched per sequence
    for members, source in INPUT_GROUPS:
        if not any(prefix + member in targets for member in members):
            continue
        linear = layer.get_submodule(stacked_name(source)[0])  # a stacked module reads its sections' input
        # Products in float64: with float32 products (summed in float64) GPTQ group 32 on SmolLM2
        # converted 22% faster, but its held-out perplexity rose 0.4-0.9% on all three texts.
        pair = LayerStats(*(HessianAccumulator(linear.in_features, first_tokens=first_tokens) for _ in range(2)))

        def hook(_module, args, pair=pair):
            (pair.heldout if current["heldout"] else pair.fit).add(args[0])

        handles.append(linear.register_forward_pre_hook(hook))
        for member in members:
            hooked[member] = pair
    try:
        with torch.no_grad():
            for h, (cos, sin), held in zip(hidden, rope, is_heldout):
                current["heldout"] = held
                layer(h, cos, sin, None)
    finally:
        for handle in handles:
            handle.remove()
    return hooked
