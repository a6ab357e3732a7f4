"""An exported decoder in one onnxruntime session: the KV cache, IO binding, and adapters per call.

`EdgeModel` opens a directory written by `quadapt export-onnx` (checking its manifest first),
creates one `InferenceSession`, and reads every adapter the export lists (onnxruntime's
`.onnx_adapter` files) into OrtValues once; a call binds the chosen adapter's values to the
graph's LoRA inputs (the zero-rank defaults for the base), so switching reloads nothing. (Binding
them ourselves, rather than through `RunOptions.add_active_adapter`, is what works with IO
binding: `run_with_iobinding` does not apply active adapters.) `EdgeModel.start` opens a `Sequence`: the KV cache lives in
preallocated buffers bound as both past and present (GroupQueryAttention writes in place), the
token and the logits in arrays bound once, so a decode step allocates no tensor memory.

This file runs the graph; it does not sample, tokenize or decide when to stop (`generate.py`).
It imports numpy and onnxruntime only, never torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import (
    AdapterError,
    CheckpointError,
    ContextLengthError,
    InvalidParameterError,
)
from . import MANIFEST

logger = logging.getLogger("quadapt.runtime.edge.model")

FORMAT = "quadapt-onnx"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EdgeManifest:
    """What `quadapt_edge.json` says about an export."""

    path: Path
    model_file: str
    vocab_size: int
    context_length: int
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    adapters: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, path: str | Path) -> EdgeManifest:
        """Read and check the manifest of the export at `path`.

        Raises:
            CheckpointError: `path` is not a quadapt ONNX export, or one of another format version.
        """
        path = Path(path).expanduser()
        file = path / MANIFEST
        hint = "export one with `quadapt export-onnx --model CHECKPOINT --out DIR`"
        if not file.is_file():
            raise CheckpointError(f"{str(path)!r} is not a quadapt ONNX export (it has no {MANIFEST}); {hint}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot be read as JSON ({e}); {hint}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{file}: not a quadapt ONNX export manifest (format {FORMAT!r} expected); {hint}")
        if data.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{file}: export format version {data.get('version')!r}, this runtime reads version {FORMAT_VERSION}; "
                "export the model again with this quadapt"
            )
        try:
            manifest = cls(
                path=path, model_file=str(data["model"]), vocab_size=int(data["vocab_size"]),
                context_length=int(data["context_length"]), num_hidden_layers=int(data["num_hidden_layers"]),
                num_key_value_heads=int(data["num_key_value_heads"]), head_dim=int(data["head_dim"]),
                adapters=dict(data.get("adapters") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: incomplete manifest ({e!r}); {hint}") from None
        if not (path / manifest.model_file).is_file():
            raise CheckpointError(f"{path}: the manifest names {manifest.model_file!r}, which is missing; {hint}")
        return manifest


class EdgeModel:
    """An exported model in one onnxruntime session, with its adapters loaded.

    Attributes:
        manifest: the export's manifest.
        session: the one `InferenceSession` (never recreated).
        adapters: names of the adapters that can be chosen per call.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        """Open the export at `path`.

        Args:
            path: a directory written by `quadapt export-onnx`.
            threads: intra-op threads (default: onnxruntime's, one per physical core).

        Raises:
            CheckpointError: not an export, or a file of it is missing or unreadable.
            AdapterError: an adapter file does not fit the graph (another base, or another export).
        """
        self.manifest = EdgeManifest.read(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the LoRA and logits inputs with defaults warn on every load
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.manifest.path / self.manifest.model_file), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types for a bad file
            raise CheckpointError(f"{self.manifest.path}: onnxruntime cannot load the model: {e}") from None
        # LoRA slots are inputs with (zero-rank) defaults: onnxruntime lists them as overridable initializers.
        self._lora_inputs = {
            i.name: i.shape for i in self.session.get_overridable_initializers() if i.name.endswith((".lora_A", ".lora_B"))
        }
        # Each adapter's factors, read once; a call binds one adapter's (or the zero-rank defaults).
        self._zero = {
            name: ort.OrtValue.ortvalue_from_numpy(np.zeros((shape[0], 0) if name.endswith(".lora_A") else (0, shape[1]), np.float32))
            for name, shape in self._lora_inputs.items()
        }
        self._adapters: dict[str | None, dict[str, ort.OrtValue]] = {None: dict(self._zero)}
        for name, entry in self.manifest.adapters.items():
            self._load_adapter(name, self.manifest.path / str(entry.get("file", "")))

    @property
    def adapters(self) -> list[str]:
        return sorted(name for name in self._adapters if name is not None)

    def _load_adapter(self, name: str, file: Path) -> None:
        if not file.is_file():
            raise AdapterError(f"adapter {name!r}: its file {str(file)!r} is missing; export the model again with it")
        params = ort.AdapterFormat.read_adapter(str(file)).get_parameters()
        for key, value in params.items():
            expected = self._lora_inputs.get(key)
            shape = value.shape()
            fixed = expected is not None and (expected[0] if key.endswith(".lora_A") else expected[1])
            actual = shape[0] if key.endswith(".lora_A") else shape[-1]
            if expected is None or len(shape) != 2 or fixed != actual:
                raise AdapterError(
                    f"adapter {name!r} ({file}) does not fit this model: its tensor {key!r} {shape} matches no LoRA "
                    f"input of the graph (expected {expected}); it was exported for another base model. Export the "
                    "model and the adapter together with `quadapt export-onnx --adapter NAME=PATH`"
                )
        self._adapters[name] = {**self._zero, **params}

    def adapter_inputs(self, adapter: str | None) -> dict[str, ort.OrtValue]:
        """The LoRA inputs that select `adapter` (None: the base model, all slots zero-rank).

        Raises:
            InvalidParameterError: `adapter` is not one of the export's adapters.
        """
        inputs = self._adapters.get(adapter)
        if inputs is None:
            known = ", ".join(self.adapters) or "none: export with --adapter NAME=PATH to add some"
            raise InvalidParameterError(f"unknown adapter {adapter!r}; this export's adapters are: {known}")
        return inputs

    def start(self, prompt_ids: list[int], capacity: int, adapter: str | None = None) -> Sequence:
        """Open a sequence with room for `capacity` positions and prefill `prompt_ids`.

        Args:
            prompt_ids: the prompt, at least one id, each in the vocabulary.
            capacity: positions the cache holds (prompt included), at most the context.
            adapter: the adapter for every step of this sequence, or None.

        Returns:
            The sequence; its `logits` hold the prompt's last position.

        Raises:
            InvalidParameterError: an empty prompt, an id outside the vocabulary, an unknown adapter.
            ContextLengthError: the prompt does not fit the context.
        """
        return Sequence(self, prompt_ids, capacity, self.adapter_inputs(adapter))

    def logits(self, ids: list[int], adapter: str | None = None) -> np.ndarray:
        """Logits [T, V] of every position of `ids`, from an empty cache (for perplexity)."""
        seq = Sequence(self, ids, len(ids), self.adapter_inputs(adapter), keep_all=True)
        return seq.all_logits


class Sequence:
    """One sequence being decoded: its cache buffers and its IO binding."""

    def __init__(
        self, model: EdgeModel, prompt_ids: list[int], capacity: int, adapter: dict[str, ort.OrtValue], keep_all: bool = False
    ) -> None:
        m = model.manifest
        if not prompt_ids:
            raise InvalidParameterError("the prompt is empty; the model needs at least one token to condition on")
        prompt = np.asarray(prompt_ids, dtype=np.int64)[None]  # [1, T]
        bad = prompt[(prompt < 0) | (prompt >= m.vocab_size)]
        if bad.size:
            raise InvalidParameterError(
                f"prompt ids {bad[:5].tolist()} are outside the model's vocabulary [0, {m.vocab_size}); "
                "encode the prompt with this model's tokenizer"
            )
        if prompt.shape[1] > m.context_length or (not keep_all and prompt.shape[1] >= m.context_length):
            raise ContextLengthError(
                f"the prompt has {prompt.shape[1]} tokens but the model's context is {m.context_length}, which leaves "
                f"no room for output; shorten the prompt to at most {m.context_length - 1} tokens"
            )
        self.model = model
        self.capacity = max(min(capacity, m.context_length), prompt.shape[1])
        self.length = 0
        session = model.session
        self._binding = binding = session.io_binding()
        # Cache: [1, kv_heads, capacity, D] per layer and kind, bound as past and present alike.
        self._cache = []
        for i in range(m.num_hidden_layers):
            for kind in ("key", "value"):
                buffer = np.zeros((1, m.num_key_value_heads, self.capacity, m.head_dim), np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
                self._cache.append((buffer, value))
        for name, value in adapter.items():
            binding.bind_ortvalue_input(name, value)
        self._mask = np.zeros((1, self.capacity), np.int64)  # ones on the positions held
        self._token = np.zeros((1, 1), np.int64)
        self._logits = np.zeros((1, 1, m.vocab_size), np.float32)
        self._keep = np.array([0 if keep_all else 1], np.int64)
        # bind_ortvalue_input: bind_cpu_input refuses an input that has a default initializer.
        binding.bind_ortvalue_input("num_logits_to_keep", ort.OrtValue.ortvalue_from_numpy(self._keep))
        if keep_all:
            binding.bind_output("logits", "cpu")
        else:
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
        self._run(prompt)
        if keep_all:
            self.all_logits = self._outputs_logits()
        self._token_value = ort.OrtValue.ortvalue_from_numpy(self._token)
        binding.bind_ortvalue_input("input_ids", self._token_value)
        # Decode binds the whole mask once: GroupQueryAttention attends over each row's first
        # sum(mask) positions (seqlens_k), not over the mask's width, so a step only sets its
        # position's one in place and rebinds nothing.
        binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self._mask))

    def _outputs_logits(self) -> np.ndarray:
        return self._binding.get_outputs()[-1].numpy()[0]  # outputs come in binding order: logits last

    def _run(self, ids: np.ndarray) -> None:
        self._binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids))
        total = self.length + ids.shape[1]
        self._mask[0, :total] = 1
        # A prompt binds the mask's first `total` columns (a view, no copy): GroupQueryAttention
        # takes a run whose width equals its new tokens for a first prompt.
        self._binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(self._mask[:, :total]))
        # No RunOptions: onnxruntime's Python wrapper probes a given one for a graph-capture key on
        # every run, and the probe (an exception when the key is unset) costs about 1% of a step.
        self.model.session.run_with_iobinding(self._binding)
        self.length += ids.shape[1]

    @property
    def logits(self) -> np.ndarray:
        """Logits [V] of the last position fed (a view, overwritten by the next step)."""
        return self._logits[0, -1]

    def step(self, token: int) -> np.ndarray:
        """Feed one token; return the logits [V] of its position (a view, overwritten next step).

        Raises:
            ContextLengthError: the cache is full.
        """
        if self.length >= self.capacity:
            raise ContextLengthError(
                f"the sequence holds {self.length} positions, its cache's capacity; start it with a larger capacity "
                f"(at most the context, {self.model.manifest.context_length})"
            )
        self._token[0, 0] = token
        self._mask[0, self.length] = 1
        self.model.session.run_with_iobinding(self._binding)
        self.length += 1
        return self._logits[0, -1]
