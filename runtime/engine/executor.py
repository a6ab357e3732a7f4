"""Executors: what runs one forward pass for the engine, behind one small interface.

The engine hands an executor the rows of a step (`RowSpec`s) and gets back the logits of the
rows that sample; it never sees the model, the cache or the device. An executor also owns the
adapter slots that live beside its model (`write_adapter_slot`), so the registry can fill them
without knowing how they are stored.

`TorchExecutor` runs `CausalLM` with a `PagedKVCache`: Triton kernels on CUDA, the torch
references elsewhere (see `kernels`), on the model as the loader laid it out (q/k/v and gate/up
stacked in every format; packed weights dequantized at load when the caller asked, as
`build_engine` does on CPU). It changes no module of the model: it only wraps the projections in
LoRA slot stacks (`adapters.add_lora_slots`, the base module kept inside), and on CPU stores each
float base weight beside its stack's A factors (`LoRALinear.fuse_shrink`: the same values, one
GEMM). A later ONNX executor runs packed weights on CPU through the same interface.

On CUDA, decode steps (every row fed one token) replay CUDA graphs captured per batch bucket and
block-table width (`decode_graphs.DecodeGraphs`: inputs in fixed, persistent buffers, one cache
block reserved for padded rows); prefill and mixed steps run eagerly. On CPU every step is eager,
as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from ...kernels import NO_SLOT
from ..checkpoints.adapters import add_lora_slots, lora_modules, projection_names
from ..model.batch import RowSpec, build_batch
from ..model.config import ModelConfig
from ..model.lora import LoRALinear, LoRAWeights, SlotMapping
from ..model.model import CausalLM
from .decode_graphs import DecodeGraphs
from .paged_cache import PagedKVCache

# The projections a served adapter may target: every linear of a decoder layer.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Executor(Protocol):
    """What the engine needs of an executor."""

    name: str  # "torch", "onnx": which executor, for logs and errors
    config: ModelConfig
    block_size: int
    num_blocks: int
    num_lora_slots: int
    device: torch.device

    def execute(self, rows: Sequence[RowSpec]) -> torch.Tensor:
        """Run one forward pass; return float32 logits [L, V] of the rows with `needs_logits`, in order."""
        ...

    def write_adapter_slot(self, slot: int, modules: Mapping[str, LoRAWeights] | None) -> None:
        """Copy an adapter (HF module name -> factors) into `slot`, or clear it (None)."""
        ...


class TorchExecutor:
    """`CausalLM` over a paged cache; see the module docstring.

    Args:
        model: a loaded model (float or quantized linears), taken over: LoRA slots are put on it.
        num_blocks: cache blocks to allocate.
        block_size: positions per block.
        max_num_batched_tokens: the most tokens one step feeds (sizes the LoRA slot buffer).
        num_lora_slots: adapter slots beside the model (0: no adapters served).
        max_lora_rank: the largest adapter rank a slot holds.
        lora_targets: the short names of the projections that get slots.
        max_num_seqs: the most rows a step may have; sizes the decode graphs' buffers.
        cuda_graphs: run decode steps through `DecodeGraphs` (default: on a CUDA device with
            `max_num_seqs` given); capturing needs CUDA, the padded buffers run anywhere.
    """

    name = "torch"

    def __init__(
        self,
        model: CausalLM,
        *,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        num_lora_slots: int = 0,
        max_lora_rank: int = 16,
        lora_targets: Iterable[str] = LORA_TARGETS,
        max_num_seqs: int = 0,
        cuda_graphs: bool | None = None,
    ) -> None:
        weight = next(p for p in model.parameters() if p.is_floating_point())
        self.model = model
        self.config = model.config
        self.device = weight.device
        self.dtype = weight.dtype
        backend = getattr(model, "kernel_backend", None)
        self.block_size = block_size
        self.num_blocks = num_blocks
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and max_num_seqs > 0
        # Padded decode rows write into one more block, which no request is ever given.
        self.cache = PagedKVCache(model.config, num_blocks + int(cuda_graphs), block_size, dtype=self.dtype,
                                  device=self.device)
        self.num_lora_slots = num_lora_slots
        self.mapping: SlotMapping | None = None
        if num_lora_slots:
            names = projection_names(model, tuple(lora_targets))
            self.mapping = add_lora_slots(
                model, names, num_slots=num_lora_slots, max_rank=max_lora_rank, max_tokens=max_num_batched_tokens
            )
            if backend == "cpu":
                for stack in (m for m in model.modules() if isinstance(m, LoRALinear)):
                    if isinstance(getattr(stack.base, "weight", None), nn.Parameter):
                        stack.fuse_shrink()  # one GEMM for the base and the shrink (kernels.lora_linear)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            self.graphs = DecodeGraphs(
                # A step has at most max_num_seqs rows and max_num_batched_tokens tokens (the LoRA slot buffer's size).
                self._forward, max_rows=max(1, min(max_num_seqs, max_num_batched_tokens)),
                max_blocks=-(-model.config.max_position_embeddings // block_size), block_size=block_size,
                pad_slot=num_blocks * block_size, device=self.device, mapping=self.mapping,
                capture=self.device.type == "cuda",
            )

    def execute(self, rows: Sequence[RowSpec]) -> torch.Tensor:
        if self.graphs is not None:
            key = self.graphs.key_for(rows)
            if key is not None and max(row.start for row in rows) < self.config.max_position_embeddings:
                with torch.inference_mode():
                    return self.graphs.run(rows, key).float()
        batch = build_batch(rows, self.block_size, self.device)
        if self.mapping is not None:
            slots = {row.lora_slot for row in rows}
            if batch.lora_slots is None:
                self.mapping.set(NO_SLOT)
            elif len(slots) == 1 and self.device.type == "cpu":
                # Every token uses one slot: the LoRA ops read that slot's factors alone, not the
                # whole stack (the host knows the slot; nothing is read back from a device).
                self.mapping.set(slots.pop())
            else:
                self.mapping.set_tokens(batch.lora_slots)
        with torch.inference_mode():
            return self._forward(batch).float()

    def _forward(self, batch) -> torch.Tensor:
        return self.model(batch.input_ids, self.cache, batch=batch)

    def write_adapter_slot(self, slot: int, modules: Mapping[str, LoRAWeights] | None) -> None:
        if modules is None:
            for stack in lora_modules(self.model).values():
                stack.clear_slot(slot)
            return
        from ..checkpoints.adapters import load_into_slot

        load_into_slot(self.model, modules, slot)
