"""The serving export: the edge decoder with every adapter slot in the graph, for the engine's ONNX executor.

The same graph as `quadapt export-onnx` (`onnx_graph`: MatMulNBits weights, GroupQueryAttention
over a shared past/present buffer, the fused norms), with three differences that let one session
serve a batch whose rows sit at different positions and use different adapters:

- GroupQueryAttention's lengths are inputs, `seqlens_k` int32 [B] (positions held per row, minus
  one, after this step) and `total_sequence_length` int32 scalar, instead of an attention mask:
  the executor knows them and each row of the shared KV buffer has its own.
- Every projection of every layer (q, k, v, o, gate, up, down) carries LoRA stacks as required
  inputs, `{module}.lora_A` float32 [S, r, in] and `{module}.lora_B` [S, r, out] (the LoRA scale
  folded into B), S = slots + 1: stack entry 0 is all zeros and stands for "no adapter", entry
  `slot + 1` holds engine slot `slot`, ranks zero-padded to `r`. The executor owns these arrays
  and binds them once; loading an adapter into a slot writes into them in place.
- `lora_slots` int64 [B] picks each row's stack entry for the gather path, `(x @ Gather(A,
  slot)^T) @ Gather(B, slot)`; `lora_mask` float32 [B, 1, slots x r] keeps each row's columns for
  the masked path, `((x @ A_all^T) * mask) @ B_all`, where `{module}.lora_A_all` [slots x r, in] and
  `lora_B_all` are the stacks without entry 0. The executor runs one path per step and binds the
  other with a zero width (see `_ServingBuilder._lora`).

`export_serving` writes `model.onnx`, `model.onnx.data` and `quadapt_serving.json` atomically. It
runs no model: `runtime/engine/onnx_executor.py` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from onnx import TensorProto, helper

from ..runtime.checkpoints import open_checkpoint
from ..runtime.checkpoints.loader import load_model
from ..runtime.model.fused import checkpoint_module
from ..runtime.engine.onnx_setup import SERVING_FORMAT, SERVING_MANIFEST, SERVING_VERSION
from ..runtime.errors import InvalidParameterError
from .onnx_export import _FUSED, DATA_FILE, MODEL_FILE, _decoder_weights, _shape
from .onnx_graph import ACCURACY_LEVELS, DecoderWeights, Shape, _Builder
from .writer import check_output_dir, staged_dir

logger = logging.getLogger("quadapt.converters.onnx_serving")



def export_serving(
    model: str | Path,
    out_dir: str | Path,
    *,
    num_slots: int,
    max_rank: int,
    bits: int = 4,
    block_size: int = 32,
    lm_head: Literal["int8", "int4", "float"] = "int8",
    accuracy_level: int = 4,
    overwrite: bool = False,
) -> Path:
    """Export `model` (a checkpoint directory or .gguf) as the engine's serving graph at `out_dir`.

    Args:
        model: the checkpoint; packed int4/int8 weights of a power-of-two group size >= 16 are
            repacked bit for bit, as `export_onnx` does.
        out_dir: the directory to create.
        num_slots: adapter slots (the stacks hold `num_slots + 1` entries, entry 0 the base).
        max_rank: the rank every stack entry is padded to.
        bits, block_size, lm_head, accuracy_level: as `export_onnx`'s.
        overwrite: replace `out_dir` if it exists.

    Returns:
        The output directory.

    Raises:
        InvalidParameterError: a bad setting.
        CheckpointError, ConfigError, UnsupportedError: from reading the model.
    """
    for name, value in (("num_slots", num_slots), ("max_rank", max_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_slots" else 1):
            raise InvalidParameterError(f"{name} must be a non-negative integer (max_rank positive), got {value!r}")
    if bits not in (4, 8):
        raise InvalidParameterError(f"bits must be 4 or 8 (what MatMulNBits runs on CPU), got {bits!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise InvalidParameterError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
    out = check_output_dir(out_dir, overwrite=overwrite)
    reader = open_checkpoint(model)
    torch_model = load_model(reader)  # a checkpoint the export cannot take is refused here, before any message
    logger.info("building the ONNX serving export of %s in %s (once per checkpoint and slot setting)", reader.path, out)
    config = torch_model.config
    weights, report = _decoder_weights(torch_model, bits, block_size, lm_head, {})
    modules = {}
    for i, layer in enumerate(torch_model.model.layers):
        for kind, parts in _FUSED.items():
            names = [f"model.layers.{i}.{part}" for part in parts]
            found = [checkpoint_module(torch_model, n) for n in names]  # HF names, through the stacks
            weights.lora[(i, kind)] = [(n, m.in_features, m.out_features) for n, m in zip(names, found)]
            modules.update({n: [m.in_features, m.out_features] for n, m in zip(names, found)})
    graph = _ServingBuilder(weights, _shape(config), accuracy_level, num_slots + 1, max_rank).build()
    logger.info("serving export: %d weights repacked, %d quantized; %d slots of rank %d",
                report["repacked"], report["quantized"], num_slots, max_rank)

    import onnx

    with staged_dir(out, overwrite=overwrite) as staging:
        onnx.save_model(
            graph, str(staging / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
            location=DATA_FILE, size_threshold=1024,
        )
        onnx.checker.check_model(str(staging / MODEL_FILE))
        manifest = {
            "format": SERVING_FORMAT, "version": SERVING_VERSION, "model": MODEL_FILE, "source": str(reader.path),
            "vocab_size": config.vocab_size, "context_length": config.max_position_embeddings,
            "num_hidden_layers": config.num_hidden_layers, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "bits": bits, "block_size": block_size, "lm_head": lm_head,
            "accuracy_level": accuracy_level, "num_slots": num_slots, "max_rank": max_rank,
            "lora_modules": modules, "weights": report,
        }
        (staging / SERVING_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


class _ServingBuilder(_Builder):
    """The decoder builder with per-row lengths, slot indices and stacked LoRA inputs."""

    def __init__(self, weights: DecoderWeights, shape: Shape, accuracy_level: int, stacks: int, rank: int) -> None:
        super().__init__(weights, shape, accuracy_level)
        self.stacks, self.rank = stacks, rank

    def _length_inputs(self) -> None:
        self.inputs += [
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            helper.make_tensor_value_info("lora_slots", TensorProto.INT64, ["batch_size"]),
            helper.make_tensor_value_info("lora_mask", TensorProto.FLOAT, ["batch_size", 1, "lora_columns"]),
        ]

    def _lengths(self) -> tuple[str, str]:
        return "seqlens_k", "total_sequence_length"

    def _lora(self, module: str, x: str, k: int, n: int) -> str:
        """Each row's adapter term, by two paths whose sum is the term (the executor feeds one of
        them and binds the other empty, `lora_rank` or `lora_columns` = 0, so it costs no work):

        - gather: `(A[slot] [B, r, k] @ x^T [B, k, S])^T [B, S, r] @ B[slot] [B, r, n]`, the factors
          copied per row (cheap for few rows);
        - masked: `((x @ A_all^T) * lora_mask) @ B_all`, every slot's factors at once as one GEMM
          each, `lora_mask` [B, 1, columns] keeping each row's own slot's columns (cheap for many
          rows: the factors are read once per step, whatever the batch).

        A is stored rank-major ([S, r, k], as PEFT stores it) so an adapter of a lower rank than the
        stacks', or one that leaves the module alone, writes (and makes resident) only its own rows;
        `A_all` [S' x r, k] and `B_all` are the same memory seen without the base entry.
        """
        a, b = f"{module}.lora_A", f"{module}.lora_B"
        self.inputs.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, [self.stacks, "lora_rank", k]))
        self.inputs.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, [self.stacks, "lora_rank", n]))
        a_rows = self.node("Gather", [a, "lora_slots"], axis=0)[0]
        b_rows = self.node("Gather", [b, "lora_slots"], axis=0)[0]
        x_t = self.node("Transpose", [x], perm=[0, 2, 1])[0]
        shrunk = self.node("Transpose", [self.node("MatMul", [a_rows, x_t])[0]], perm=[0, 2, 1])[0]
        gathered = self.node("MatMul", [shrunk, b_rows])[0]
        a_all, b_all = f"{module}.lora_A_all", f"{module}.lora_B_all"
        self.inputs.append(helper.make_tensor_value_info(a_all, TensorProto.FLOAT, ["lora_columns", k]))
        self.inputs.append(helper.make_tensor_value_info(b_all, TensorProto.FLOAT, ["lora_columns", n]))
        every = self.node("MatMul", [x, self.node("Transpose", [a_all], perm=[1, 0])[0]])[0]  # fused: transB
        masked = self.node("MatMul", [self.node("Mul", [every, "lora_mask"])[0], b_all])[0]
        return self.node("Add", [gathered, masked])[0]
