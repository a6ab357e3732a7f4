"""The torch executor's decode step as CUDA graphs: one per (batch bucket, block-table width).

A decode step (every row fed one token) is many small launches; on a GPU the host's launch work
costs more than the kernels. `DecodeGraphs` runs such a step from fixed, persistent buffers
(token ids, positions, cache slots, LoRA slots, block tables, attention masks), padded up to a
batch bucket (1, 2, 4, 8, then multiples of 8) and a power-of-two table width, so that one
captured graph per (bucket, width) replays every step of that size. Padded rows are inert: their
key and value go to a cache block reserved for them (`pad_slot`), they attend to one position,
and their logits are dropped. Prefill and mixed steps run eagerly, outside this class.

The bucket choice, the padding and the buffer reuse run on any device; only the capture is
CUDA's: on a CPU (`capture=False`) `run` calls the forward eagerly on the same padded buffers,
which is how the tests check that padding changes no row's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...kernels import NO_SLOT
from ..model.batch import DecodeRows, ForwardBatch, RowSpec
from ..model.lora import SlotMapping

MIN_WIDTH = 4  # the narrowest block table a graph is captured for


def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, then every multiple of 8, up to `max_rows`."""
    buckets = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows, 8)) + [max_rows]
    return tuple(sorted(set(buckets)))


class DecodeGraphs:
    """Decode steps from persistent, padded buffers; captured as CUDA graphs when `capture`.

    Args:
        forward: runs the model on a batch and returns its logits [rows, V] (every row's).
        max_rows: the most rows a step may have (the engine's max_num_seqs).
        max_blocks: the most blocks a row's table may have (the context over the block size).
        block_size: positions per cache block.
        pad_slot: the cache slot padded rows write to (in a block no request holds).
        device: where the buffers live.
        mapping: the model's LoRA slot mapping, or None without adapters.
        capture: capture CUDA graphs (default: on a CUDA device).
    """

    def __init__(
        self,
        forward: Callable[[ForwardBatch], torch.Tensor],
        *,
        max_rows: int,
        max_blocks: int,
        block_size: int,
        pad_slot: int,
        device: torch.device,
        mapping: SlotMapping | None = None,
        capture: bool | None = None,
    ) -> None:
        self.forward = forward
        self.buckets = batch_buckets(max_rows)
        self.max_blocks, self.block_size, self.pad_slot = max_blocks, block_size, pad_slot
        self.device, self.mapping = device, mapping
        self.capture = device.type == "cuda" if capture is None else capture
        B = max_rows
        # The persistent inputs: every batch below is a view of these, so a graph reads them in place.
        self.input_ids = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((B,), pad_slot, dtype=torch.long, device=device)
        self.lora_slots = torch.full((B,), NO_SLOT, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(B, max_blocks, dtype=torch.long, device=device)
        self.mask = torch.zeros(B, 1, 1, max_blocks * block_size, dtype=torch.bool, device=device)
        self.token_index = torch.arange(B, dtype=torch.long, device=device)
        self._batches: dict[tuple[int, int], ForwardBatch] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def key_for(self, rows: Sequence[RowSpec]) -> tuple[int, int] | None:
        """(batch bucket, table width) for a step, or None when it is not a decode step these buffers hold."""
        if not rows or len(rows) > self.buckets[-1] or any(len(row.token_ids) != 1 for row in rows):
            return None
        blocks = max(-(-(row.start + 1) // self.block_size) for row in rows)
        if blocks > self.max_blocks:
            return None
        width = min(self.max_blocks, max(MIN_WIDTH, 1 << (blocks - 1).bit_length()))
        return next(b for b in self.buckets if b >= len(rows)), width

    def prepare(self, rows: Sequence[RowSpec], key: tuple[int, int]) -> ForwardBatch:
        """Copy the step's rows into the buffers, padded to `key`; returns the batch over them (the
        same tensor objects for every step of that key)."""
        bucket, width = key
        bs = self.block_size
        ids = torch.zeros(bucket, dtype=torch.long)
        positions = torch.zeros(bucket, dtype=torch.long)
        slots = torch.full((bucket,), self.pad_slot, dtype=torch.long)
        lora = torch.full((bucket,), NO_SLOT, dtype=torch.long)
        tables = torch.zeros(bucket, width, dtype=torch.long)
        lengths = torch.ones(bucket, dtype=torch.long)  # a padded row sees one position
        for i, row in enumerate(rows):
            p = row.start
            ids[i], positions[i], lora[i], lengths[i] = row.token_ids[0], p, row.lora_slot, p + 1
            slots[i] = row.blocks[p // bs] * bs + p % bs
            used = row.blocks[: -(-(p + 1) // bs)]
            tables[i, : len(used)] = torch.tensor(used, dtype=torch.long)
        mask = torch.arange(width * bs)[None, :] < lengths[:, None]  # [bucket, S]
        self.input_ids[:bucket].copy_(ids, non_blocking=True)
        self.positions[:bucket].copy_(positions, non_blocking=True)
        self.slot_mapping[:bucket].copy_(slots, non_blocking=True)
        self.lora_slots[:bucket].copy_(lora, non_blocking=True)
        self.block_tables[:bucket, :width].copy_(tables, non_blocking=True)
        self.mask[:bucket, 0, 0, : width * bs].copy_(mask, non_blocking=True)
        if self.mapping is not None:
            self.mapping.set_tokens(self.lora_slots[:bucket])  # per-token slots: one graph for any adapters
        if key not in self._batches:
            self._batches[key] = ForwardBatch(
                input_ids=self.input_ids[:bucket], positions=self.positions[:bucket],
                slot_mapping=self.slot_mapping[:bucket], lora_slots=self.lora_slots[:bucket],
                logits_indices=self.token_index[:bucket],
                decode=DecodeRows(self.token_index[:bucket], self.block_tables[:bucket, :width],
                                  self.mask[:bucket, :, :, : width * bs]),
                prefill=[], max_position=0,  # the caller checks positions against the context
            )
        return self._batches[key]

    def run(self, rows: Sequence[RowSpec], key: tuple[int, int]) -> torch.Tensor:
        """Logits [L, V] of the rows with `needs_logits`, in order: a graph replay, or an eager
        forward on the padded buffers when not capturing."""
        batch = self.prepare(rows, key)
        if not self.capture:
            logits = self.forward(batch)
        else:
            if key not in self._graphs:
                self._graphs[key] = self._capture(batch)
            graph, logits = self._graphs[key]
            graph.replay()
        # A copy, always: the graph's output is overwritten by the next replay.
        return logits[[i for i, row in enumerate(rows) if row.needs_logits]]

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (bucket, width) keys captured so far."""
        return sorted(self._graphs)

    def _capture(self, batch: ForwardBatch) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream first (Triton compiles, workspaces reach their size); it writes
        # the step's keys and values, which the replay then writes again, identically.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.forward(batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(batch)
        return graph, logits
