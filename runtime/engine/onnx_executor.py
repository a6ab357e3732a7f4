"""The ONNX executor: the engine's forward pass on onnxruntime, with packed weights and an adapter per row.

It runs a serving export (`converters/onnx_serving.py`: the edge decoder with MatMulNBits weights,
GroupQueryAttention, per-row lengths and every adapter slot stacked in the graph) in one
`InferenceSession`, behind the same `Executor` interface as `TorchExecutor`: the scheduler,
registry, sampling and text layers run on it unchanged, and it returns float32 logits [L, V].

**KV.** GroupQueryAttention reads one contiguous cache row per sequence, so the executor keeps
`max_num_seqs` *lanes*: per layer a key and a value buffer [lanes, kv_heads, capacity, D], bound
as past and present alike (GroupQueryAttention writes the new positions in place). A request gets
the lowest free lane when it starts (a row at position 0) and keeps it while its first cache block
is held; the engine's block allocator tells the executor when blocks are freed (`release_blocks`:
finish, abort, preemption), which frees the lane at once. The allocator's blocks still decide
admission and preemption, exactly as with the torch executor. The buffers are allocated zeroed
(the OS maps their pages on first write), so memory follows the positions actually held.

**A step.** Rows fed several tokens (prompt chunks) run one by one, batch 1 (GroupQueryAttention
takes new tokens over a past only for one row). Rows fed one token run together: the lanes
`0 .. highest` form the batch, each lane at its own length (`seqlens_k`); an idle lane in that
range is fed a dummy token at its next free position, which its next real token overwrites.
Each run applies adapters one way (`_path`): not at all when no row has one, per row (gather:
`lora_slots` gives each row's stack entry, 0 for the base, slot + 1 otherwise) for fewer rows
than slots, every slot at once otherwise (masked: `lora_mask` keeps each row's columns); the path
not taken is bound with a zero width. Each way has its own IO binding, the stacks bound in it once.

**Adapters.** The stacks `{module}.lora_A` [slots + 1, r, in] and `lora_B` [slots + 1, r, out] are
numpy arrays bound once; `write_adapter_slot` writes a slot in place (the LoRA scale folded into
B), so loading an adapter never makes a new session. Both stacks are rank-major and allocated
zeroed: an adapter writes only its own rank's rows of the modules it targets, and a slot is zeroed
only where it was written, so the stacks' resident memory follows the adapters loaded, not
slots x max rank x every module.

This file runs an export; it does not build one (the converters do, `args.build_engine` asks
them through `serving_exporter`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...kernels import NO_SLOT
from ..errors import AdapterError, CheckpointError, InvalidParameterError
from ..model.batch import RowSpec
from ..model.config import ModelConfig
from ..model.lora import LoRAWeights
from .onnx_setup import SERVING_FORMAT, SERVING_MANIFEST, SERVING_VERSION

logger = logging.getLogger(__name__)

_PATHS = ("base", "gather", "masked")  # how a step applies adapters (`OnnxExecutor._path`)

# The positions a lane holds at first; it doubles as requests grow (up to the longest the engine admits).
_FIRST_CAPACITY = 256


class OnnxExecutor:
    """A serving export in one onnxruntime session; see the module docstring.

    Args:
        path: the serving export's directory.
        config: the model's config (the engine reads its vocabulary and context).
        num_blocks: the engine's cache blocks (admission and preemption work on them).
        block_size: positions per block.
        max_num_seqs: the most requests running at once (the KV lanes).
        threads: onnxruntime's intra-op threads (None: onnxruntime's default).

    Raises:
        CheckpointError: `path` is not a serving export of this format, or onnxruntime cannot load it.
    """

    name = "onnx"

    def __init__(
        self,
        path: str | Path,
        config: ModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.path = Path(path)
        self.manifest = read_serving_manifest(self.path)
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = torch.device("cpu")
        self.num_lora_slots = int(self.manifest["num_slots"])
        self.max_lora_rank = int(self.manifest["max_rank"])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # onnxruntime's threads spin after a run by default, taking the cores the engine's
        # sampling (torch) needs between runs: 15 ms for an isnan over the logits, measured.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The memory pattern plans one block per input shape seen, and a step's shapes change with
        # its rows: SmolLM2 int4 serving 8 streams held 55 MB more with it, at the same speed.
        options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(
                str(self.path / self.manifest["model"]), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise CheckpointError(f"{self.path}: onnxruntime cannot load the serving export: {e}") from None
        # A lane grows to hold the longest request the engine admits, plus the position a dummy token writes.
        self.lanes = max_num_seqs
        self.max_capacity = min(config.max_position_embeddings, num_blocks * block_size) + 1
        self.capacity = 0
        self._cache: dict[str, np.ndarray] = {}
        self._grow(min(self.max_capacity, _FIRST_CAPACITY))
        self._lengths = np.zeros(self.lanes, np.int64)  # positions held per lane
        self._lane_of: dict[int, int] = {}  # a running request's first block -> its lane
        self._free_lanes = set(range(self.lanes))
        self._stacks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._written: dict[tuple[str, int], int] = {}  # (module, stack entry) -> rows written
        # One IOBinding per LoRA path (see `_path`), each with the stacks bound once: a step
        # picks its binding, so no stack is bound again while serving.
        self._bindings = {path: self.session.io_binding() for path in _PATHS}
        self._bound_lanes = dict.fromkeys(_PATHS, (0, 0, 0))  # per binding: lanes and capacity of its KV views
        columns = self.num_lora_slots * self.max_lora_rank
        self._empty = np.zeros(0, np.float32)
        for name, (k, n) in self.manifest["lora_modules"].items():
            a = np.zeros((self.num_lora_slots + 1, self.max_lora_rank, k), np.float32)
            b = np.zeros((self.num_lora_slots + 1, self.max_lora_rank, n), np.float32)
            self._stacks[name] = (a, b)
            for path, binding in self._bindings.items():  # slot writes go into these arrays
                gather, masked = path == "gather", path == "masked"
                self._bind(f"{name}.lora_A", a if gather else self._empty, binding, a.shape if gather else (a.shape[0], 0, k))
                self._bind(f"{name}.lora_B", b if gather else self._empty, binding, b.shape if gather else (b.shape[0], 0, n))
                self._bind(f"{name}.lora_A_all", a[1:] if masked else self._empty, binding, (columns if masked else 0, k))
                self._bind(f"{name}.lora_B_all", b[1:] if masked else self._empty, binding, (columns if masked else 0, n))
        self._keep = np.array([1], np.int64)
        for binding in self._bindings.values():
            self._bind("num_logits_to_keep", self._keep, binding)

    # -- the Executor interface ---------------------------------------------------------------

    def execute(self, rows: Sequence[RowSpec]) -> torch.Tensor:
        lanes = [self._lane(row) for row in rows]
        need = max(int(self._lengths.max()), *(row.start + len(row.token_ids) for row in rows)) + 1
        if need > self.capacity:
            self._grow(min(self.max_capacity, max(need, 2 * self.capacity)))
        logits: dict[int, np.ndarray] = {}
        for index, (row, lane) in enumerate(zip(rows, lanes)):
            if len(row.token_ids) > 1:
                out = self._run(lane, lane + 1, {lane: row})
                if row.needs_logits:
                    logits[index] = out[0, -1].copy()
        decode = {lane: row for row, lane in zip(rows, lanes) if len(row.token_ids) == 1}
        if decode:
            out = self._run(0, max(decode) + 1, decode)
            for index, (row, lane) in enumerate(zip(rows, lanes)):
                if len(row.token_ids) == 1 and row.needs_logits:
                    logits[index] = out[lane, -1]
        kept = [logits[i] for i in range(len(rows)) if rows[i].needs_logits]
        if not kept:
            return torch.empty(0, self.config.vocab_size)
        return torch.from_numpy(np.stack(kept))

    def write_adapter_slot(self, slot: int, modules: Mapping[str, LoRAWeights] | None) -> None:
        """Write an adapter into `slot` of every stack in place, zeroing the modules it lacks
        (None: clear the slot).

        Raises:
            AdapterError: the adapter has a module without a stack, or a rank above the stacks'.
        """
        modules = modules or {}
        missing = [name for name in modules if name not in self._stacks]
        if missing:
            raise AdapterError(
                f"the adapter has LoRA weights for {', '.join(missing[:4])}, but the serving export has no LoRA "
                "stacks there; only the decoder layers' projections can be adapted"
            )
        too_big = {name: w.rank for name, w in modules.items() if w.rank > self.max_lora_rank}
        if too_big:
            raise AdapterError(
                f"the adapter's rank {max(too_big.values())} is above the slots' max rank {self.max_lora_rank}; "
                f"start the engine with max_lora_rank >= {max(too_big.values())} (--max-lora-rank)"
            )
        entry = slot + 1  # stack entry 0 is the base model
        for name, (a, b) in self._stacks.items():
            held = self._written.pop((name, entry), 0)
            if held:  # only rows once written are cleared: the others were never touched
                a[entry, :held] = 0.0
                b[entry, :held] = 0.0
            w = modules.get(name)
            if w is not None:
                r = w.rank
                a[entry, :r] = w.a.detach().float().numpy()
                b[entry, :r] = (w.b.detach().float().numpy() * w.scale).T
                self._written[(name, entry)] = r

    def release_blocks(self, blocks: Sequence[int]) -> None:
        """The allocator freed `blocks`: a lane whose request's first block is among them is free."""
        for block in blocks:
            lane = self._lane_of.pop(block, None)
            if lane is not None:
                self._lengths[lane] = 0
                self._free_lanes.add(lane)

    @property
    def lanes_used(self) -> int:
        """KV lanes held by requests (for tests and metrics)."""
        return self.lanes - len(self._free_lanes)

    # -- internals ----------------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        """Give every lane room for `capacity` positions, keeping what they hold."""
        c = self.config
        shape = (self.lanes, c.num_key_value_heads, capacity, c.head_dim)
        for name in [f"{i}.{kind}" for i in range(c.num_hidden_layers) for kind in ("key", "value")]:
            grown = np.zeros(shape, np.float32)
            old = self._cache.get(name)
            if old is not None:
                grown[:, :, : old.shape[2]] = old
            self._cache[name] = grown
        self.capacity = capacity

    def _lane(self, row: RowSpec) -> int:
        key = row.blocks[0]
        lane = self._lane_of.get(key)
        if row.start == 0:
            if lane is None:
                if not self._free_lanes:
                    raise InvalidParameterError(
                        f"more than {self.lanes} requests are running, the ONNX executor's KV lanes (max_num_seqs)"
                    )
                lane = min(self._free_lanes)
                self._free_lanes.remove(lane)
                self._lane_of[key] = lane
            self._lengths[lane] = 0
        elif lane is None or self._lengths[lane] != row.start:
            raise RuntimeError(f"a row at position {row.start} has no KV lane holding its prefix (block {key})")
        return lane

    def _run(self, first: int, end: int, rows: dict[int, RowSpec]) -> np.ndarray:
        """Run lanes `first .. end-1`, feeding `rows` (lane -> row) and a dummy token to the others."""
        width = max(len(row.token_ids) for row in rows.values())
        batch = end - first
        ids = np.zeros((batch, width), np.int64)
        slots = np.zeros(batch, np.int64)
        for lane, row in rows.items():
            ids[lane - first, : len(row.token_ids)] = row.token_ids
            slots[lane - first] = 0 if row.lora_slot == NO_SLOT else row.lora_slot + 1
        held = self._lengths[first:end] + np.array([width if first + j in rows else 1 for j in range(batch)])
        seqlens = (held - 1).astype(np.int32)
        total = np.array(int(held.max()), np.int32)
        path = self._path(slots)
        binding = self._bindings[path]
        mask = self._mask(slots) if path == "masked" else self._empty
        self._bind("lora_mask", mask, binding, (batch, 1, mask.size // batch))
        self._bind("input_ids", ids, binding)
        self._bind("lora_slots", slots, binding)
        self._bind("seqlens_k", seqlens, binding)
        self._bind("total_sequence_length", total, binding)
        if self._bound_lanes[path] != (first, end, self.capacity):  # a step's decode batch is usually the last one's
            for name, buffer in self._cache.items():
                view = buffer[first:end]
                self._bind(f"past_key_values.{name}", view, binding)
                self._bind(f"present.{name}", view, binding, output=True)
            self._bound_lanes[path] = (first, end, self.capacity)
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        for lane, row in rows.items():
            self._lengths[lane] = row.start + len(row.token_ids)
        return next(v for v in binding.get_outputs() if len(v.shape()) == 3).numpy()  # the one 3-d output

    def _path(self, entries: np.ndarray) -> str:
        """How this step applies adapters: "base" (no row has one: both LoRA paths bound empty),
        "gather" (each row's factors copied: the cost grows with the rows) or "masked" (every
        slot's factors in one GEMM: the cost grows with the slots). Masked from as many rows as
        slots: on SmolLM2's projections (4 slots of rank 16, AVX-512, 2 threads) gather took 5.5
        ms at 1 row and 24.6 at 8, about 2.7 a row; masked 9.6 and 15.9, about 2.4 a slot
        (`benchmarks/onnx_lora.py`)."""
        if not entries.any():
            return "base"
        return "masked" if len(entries) >= self.num_lora_slots else "gather"

    def _mask(self, entries: np.ndarray) -> np.ndarray:
        """[B, 1, slots x rank]: ones over each row's own slot's columns (none for the base)."""
        r = self.max_lora_rank
        mask = np.zeros((len(entries), 1, self.num_lora_slots * r), np.float32)
        for row, entry in enumerate(entries):
            if entry:
                mask[row, 0, (entry - 1) * r: entry * r] = 1.0
        return mask

    def _bind(self, name: str, array: np.ndarray, binding: Any, shape: Sequence[int] | None = None, output: bool = False) -> None:
        """Bind `array`'s memory as `name` (with `shape`, when given, instead of the array's own:
        a zero width, or a view's)."""
        assert array.flags.c_contiguous, name
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cpu", 0, array.dtype, list(array.shape if shape is None else shape), array.ctypes.data)


def read_serving_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the serving export at `path`.

    Raises:
        CheckpointError: not a serving export, or one of another format version.
    """
    file = path / SERVING_MANIFEST
    hint = "delete the directory; the engine builds the export again at start"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable serving export manifest ({e}); {hint}") from None
    if not isinstance(data, dict) or data.get("format") != SERVING_FORMAT or data.get("version") != SERVING_VERSION:
        raise CheckpointError(f"{file}: not a {SERVING_FORMAT} manifest of version {SERVING_VERSION}; {hint}")
    return data
