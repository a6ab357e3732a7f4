"""Export a checkpoint to an ONNX directory the torch-free edge runtime (and onnxruntime-genai) runs.

`export_onnx` loads the checkpoint with quadapt's loader, turns every linear into MatMulNBits
weights (`onnx_weights`: bit for bit from our packed int4/int8 where the layouts agree, quantized
from float otherwise), builds the graph (`onnx_graph`) and writes, atomically:

    model.onnx, model.onnx.data    the decoder; every initializer in the one external data file
    adapters/NAME.onnx_adapter     each adapter's LoRA factors, onnxruntime's adapter format
    tokenizer.json, tokenizer_config.json, generation_config.json, config.json
    genai_config.json              what onnxruntime-genai needs to run the export
    quadapt_edge.json              the manifest the edge runtime reads (and checks first)

It does not run the model: `runtime/edge` does, without torch.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..runtime.checkpoints import open_checkpoint
from ..runtime.checkpoints.peft import PeftAdapter
from ..runtime.checkpoints.peft_fit import BaseModules, load_adapter_for
from ..runtime.model.config import ModelConfig
from ..runtime.edge import MANIFEST
from ..runtime.errors import InvalidParameterError, UnsupportedError
from ..runtime.checkpoints.loader import load_model
from ..runtime.model.fused import checkpoint_module
from ..runtime.model.model import CausalLM, rope_inv_freq
from .onnx_graph import (
    ACCURACY_LEVELS,
    DecoderWeights,
    LayerWeights,
    Shape,
    build_decoder,
)
from .onnx_weights import NBitsWeight, concat_rows, quantize, to_nbits
from .writer import check_output_dir, staged_dir

logger = logging.getLogger("quadapt.converters.onnx_export")

FORMAT = "quadapt-onnx"
FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ADAPTER_DIR = "adapters"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Which of our modules each fused projection stacks, in order.
_FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def export_onnx(
    model: str | Path,
    out_dir: str | Path,
    *,
    bits: int = 4,
    block_size: int = 32,
    adapters: dict[str, str | Path] | None = None,
    lm_head: Literal["int8", "int4", "float"] = "int8",
    accuracy_level: int = 4,
    overwrite: bool = False,
) -> Path:
    """Export `model` (an HF checkpoint directory, quantized or float, or a .gguf) to `out_dir`.

    Args:
        model: the checkpoint.
        out_dir: the directory to create.
        bits: 4 or 8, the bits of the layer weights. A packed checkpoint with these bits and a
            power-of-two group size >= 16 is repacked bit for bit (keeping its group size);
            other weights are quantized from float with `block_size`.
        block_size: block size (a power of two >= 16) for weights quantized here.
        adapters: name -> PEFT adapter directory; each gets LoRA slots in the graph and an
            `.onnx_adapter` file, and the runtime picks one per call.
        lm_head: "int8" (8-bit MatMulNBits), "int4" (4-bit, half the bytes per token, more error)
            or "float"; quantized from the float head with `block_size`.
        accuracy_level: MatMulNBits' compute: 4 (int8 activations, the fast CPU path) or 1
            (float32, which computes exactly what the weights say).
        overwrite: replace `out_dir` if it exists.

    Returns:
        The output directory.

    Raises:
        InvalidParameterError: bad bits, block size, lm_head or adapter name.
        CheckpointError, ConfigError, UnsupportedError, AdapterError: from reading the model or
            an adapter (an adapter made for another base is refused here).
    """
    if bits not in (4, 8):
        raise InvalidParameterError(f"bits must be 4 or 8 (what MatMulNBits runs on CPU), got {bits!r}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise InvalidParameterError(f"block_size must be a power of two >= 16 (e.g. 32), got {block_size!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise InvalidParameterError(f"accuracy_level must be one of {ACCURACY_LEVELS} (4: int8 compute, 1: float32), got {accuracy_level!r}")
    if lm_head not in ("int8", "int4", "float"):
        raise InvalidParameterError(f"lm_head must be 'int8', 'int4' or 'float', got {lm_head!r}")
    adapters = dict(adapters or {})
    for name in adapters:
        if not ADAPTER_NAME.match(name):
            raise InvalidParameterError(
                f"adapter name {name!r} is not allowed; use letters, digits, '_', '.' and '-' (starting with a letter or digit)"
            )
    out = check_output_dir(out_dir, overwrite=overwrite)
    reader = open_checkpoint(model)
    tokenizer = reader.tokenizer_files()
    if tokenizer is None:
        raise UnsupportedError(
            f"{reader.path} has no tokenizer; the edge runtime needs one beside the model. Copy tokenizer.json "
            "(and tokenizer_config.json) from the model's repository into the checkpoint directory"
        )
    torch_model = load_model(reader)
    config = torch_model.config
    base = BaseModules.of_model(torch_model, str(reader.path))
    peft = {name: load_adapter_for(path, base) for name, path in adapters.items()}
    weights, report = _decoder_weights(torch_model, bits, block_size, lm_head, peft)
    logger.info(
        "%d weights repacked bit for bit, %d quantized from float (%d-bit, block %d)",
        report["repacked"], report["quantized"], bits, block_size,
    )
    graph = build_decoder(weights, _shape(config), accuracy_level)

    import onnx

    with staged_dir(out, overwrite=overwrite) as staging:
        onnx.save_model(
            graph, str(staging / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
            location=DATA_FILE, size_threshold=1024,
        )
        onnx.checker.check_model(str(staging / MODEL_FILE))
        adapter_entries = {name: _write_adapter(staging, name, adapter) for name, adapter in peft.items()}
        (staging / "tokenizer.json").write_text(tokenizer.tokenizer_json, encoding="utf-8")
        _write_json(staging / "tokenizer_config.json", tokenizer.tokenizer_config)
        if tokenizer.generation_config:
            _write_json(staging / "generation_config.json", tokenizer.generation_config)
        _write_json(staging / "config.json", reader.config_dict())
        _write_json(staging / "genai_config.json", genai_config(config, tokenizer.generation_config))
        _write_json(staging / MANIFEST, {
            "format": FORMAT, "version": FORMAT_VERSION, "model": MODEL_FILE, "source": str(reader.path),
            "vocab_size": config.vocab_size, "context_length": config.max_position_embeddings,
            "num_hidden_layers": config.num_hidden_layers, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "bits": bits, "block_size": block_size, "lm_head": lm_head,
            "accuracy_level": accuracy_level, "weights": report, "adapters": adapter_entries,
        })
    return out


def _shape(config: ModelConfig) -> Shape:
    return Shape(
        hidden=config.hidden_size, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim, intermediate=config.intermediate_size, vocab=config.vocab_size, eps=config.rms_norm_eps,
    )


def _decoder_weights(
    model: CausalLM, bits: int, block_size: int, lm_head: str, adapters: dict[str, PeftAdapter]
) -> tuple[DecoderWeights, dict[str, int]]:
    report = {"repacked": 0, "quantized": 0}
    targeted = {module for adapter in adapters.values() for module in adapter.modules}
    lora: dict[tuple[int, str], list[tuple[str, int, int]]] = {}

    def fused(i: int, kind: str) -> NBitsWeight:
        modules = [checkpoint_module(model, f"model.layers.{i}.{part}") for part in _FUSED[kind]]
        parts = [to_nbits(m, bits, block_size) for m in modules]
        if len({(p.bits, p.block_size) for p in parts}) > 1:  # mixed formats: one grid for the fused weight
            parts = [quantize(p.dequantize(), bits, block_size) for p in parts]
        for p in parts:
            report["repacked" if p.exact else "quantized"] += 1
        names = [f"model.layers.{i}.{part}" for part in _FUSED[kind]]
        if targeted.intersection(names):
            lora[(i, kind)] = [(name, m.in_features, m.out_features) for name, m in zip(names, modules)]
        return concat_rows(parts)

    def bias(i: int, kind: str) -> np.ndarray | None:
        modules = [checkpoint_module(model, f"model.layers.{i}.{part}") for part in _FUSED[kind]]
        if all(getattr(m, "bias", None) is None for m in modules):
            return None
        return np.concatenate([
            m.bias.float().numpy() if m.bias is not None else np.zeros(m.out_features, np.float32) for m in modules
        ])

    layers = []
    for i, layer in enumerate(model.model.layers):
        layers.append(LayerWeights(
            input_norm=_array(layer.input_layernorm.weight), post_norm=_array(layer.post_attention_layernorm.weight),
            qkv=fused(i, "qkv"), qkv_bias=bias(i, "qkv"), o=fused(i, "o"), o_bias=bias(i, "o"),
            gate_up=fused(i, "gate_up"), down=fused(i, "down"),
        ))
    head = _lm_head(model.lm_head, lm_head, block_size)
    config = model.config
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).double().numpy()
    angles = np.arange(config.max_position_embeddings, dtype=np.float64)[:, None] * inv_freq[None]  # [context, D/2]
    weights = DecoderWeights(
        embed=_array(model.model.embed_tokens.weight), layers=layers, norm=_array(model.model.norm.weight),
        lm_head=head, cos=np.cos(angles).astype(np.float32), sin=np.sin(angles).astype(np.float32), lora=lora,
    )
    return weights, report


def _lm_head(module: nn.Module, kind: str, block_size: int) -> NBitsWeight | np.ndarray:
    if kind == "float":
        weight = module.dequantize() if hasattr(module, "dequantize") else module.weight
        return _array(weight)
    return to_nbits(module, 8 if kind == "int8" else 4, block_size)


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().numpy().copy()


def _write_adapter(staging: Path, name: str, adapter: PeftAdapter) -> dict[str, object]:
    """Write one adapter as `adapters/NAME.onnx_adapter`: per module A^T [K, r] and scale * B^T
    [r, N], named as the graph's LoRA inputs."""
    import onnxruntime as ort

    params = {}
    for module, w in adapter.modules.items():
        params[f"{module}.lora_A"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w.a.float().numpy().T))
        params[f"{module}.lora_B"] = ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray((w.b.float().numpy() * w.scale).T)
        )
    (staging / ADAPTER_DIR).mkdir(exist_ok=True)
    file = f"{ADAPTER_DIR}/{name}.onnx_adapter"
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(FORMAT_VERSION)
    writer.set_parameters(params)
    writer.export_adapter(str(staging / file))
    return {"file": file, "source": adapter.name, "modules": sorted(adapter.modules), "max_rank": adapter.max_rank}


def genai_config(config: ModelConfig, generation_config: dict) -> dict:
    """onnxruntime-genai's `genai_config.json` for the export (greedy search by default, the KV
    cache shared between past and present as the graph expects).

    Args:
        config: the model config.
        generation_config: the checkpoint's generation_config.json (eos ids), may be empty.

    Returns:
        The config as a dict.
    """
    eos = generation_config.get("eos_token_id", list(config.eos_token_ids))
    eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    pad = generation_config.get("pad_token_id")
    return {
        "model": {
            "bos_token_id": generation_config.get("bos_token_id", config.bos_token_id or 0),
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0],
            "pad_token_id": pad if pad is not None else (eos_ids[0] if eos_ids else 0),
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
