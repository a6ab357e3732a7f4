"""The peers' own quantizers, scored like quadapt's rows in `benchmarks/quality.py`.

- llama.cpp: llama-cpp-python's `llama_model_quantize` writes an F32 GGUF of the same weights
  quadapt converts from (the SmolLM2 GGUF dequantized, which is quadapt's "float" row), then
  quantizes it to each type (Q8_0, Q5_K_M, Q4_K_M, Q4_0); the model is scored through
  llama.cpp's own logits (`Llama.eval` with every position's logits kept).
- onnxruntime-genai: its model builder (`-p int4 -e cpu`, blocks of 32) on quadapt's float HF
  checkpoint of the same weights (`quadapt fetch-default`); scored through the logits of the
  ONNX graph it writes, run by onnxruntime.

Each peer is wrapped as a `LanguageModel` (a callable from ids [1, T] to logits [1, T, V] with a
`config`), so `runtime.api.perplexity` scores it on the same token ids and windows as
`quadapt eval-ppl`. `bits_per_weight` counts the stored bytes of the linear layers and the output
head (the embedding when the head is tied to it) the same way for every row.

Needs the `bench` extra (llama-cpp-python, onnxruntime-genai); never imported by the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# row name -> llama.cpp's file type (`LLAMA_FTYPE_MOSTLY_*`)
LLAMA_CPP_ROWS = {
    "llama.cpp-Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "llama.cpp-Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "llama.cpp-Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "llama.cpp-Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
GENAI_ROW = "onnxruntime-genai-int4"
PEER_ROWS = (*LLAMA_CPP_ROWS, GENAI_ROW)
# GGUF tensor names of the linear layers (and the head, `output`) in a llama-family model
_GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_HF_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class _Config:
    max_position_embeddings: int


def llama_cpp_model(source_gguf: Path, row: str, work: Path) -> Path:
    """The GGUF of `row`: an F32 GGUF of `source_gguf`'s weights, quantized by llama.cpp (cached in `work`)."""
    import llama_cpp

    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "f32.gguf"
    if not f32.exists():
        _quantize(source_gguf, f32, llama_cpp.LLAMA_FTYPE_ALL_F32, requantize=True)
    out = work / f"{row}.gguf"
    if not out.exists():
        _quantize(f32, out, getattr(llama_cpp, LLAMA_CPP_ROWS[row]), requantize=False)
    return out


def _quantize(source: Path, out: Path, ftype: int, requantize: bool) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = requantize  # only to dequantize the source to F32
    params.nthread = 2
    tmp = out.with_name(out.name + ".tmp")
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {out}, ftype {ftype}) returned {code}")
    tmp.replace(out)


class LlamaCppLogits:
    """A GGUF run by llama.cpp, as a `LanguageModel` for `perplexity`: every position's logits."""

    def __init__(self, gguf: Path, threads: int, window: int = 1024) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf), n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
            n_threads_batch=threads, logits_all=True, verbose=False,
        )
        self.config = _Config(window)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = ids[0].tolist()
        self.llm.reset()  # the next eval starts at position 0, dropping the cache
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))[None]


def genai_model(float_dir: Path, work: Path) -> Path:
    """onnxruntime-genai's int4 CPU model of the float checkpoint, built by its builder (cached in `work`)."""
    out = work / "genai-int4"
    if not (out / "genai_config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(float_dir), "-o", str(out),
             "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")],
            check=True,
        )
    return out


class GenaiLogits:
    """onnxruntime-genai's model run by onnxruntime from an empty cache: every position's logits."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import onnxruntime as ort

        config = json.loads((model_dir / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(model_dir / decoder["filename"]), options, providers=["CPUExecutionProvider"]
        )
        self.names = {i.name for i in self.session.get_inputs()}
        self.layers, self.kv_heads, self.head_size = (
            decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"],
        )
        self.config = _Config(config["context_length"])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones((1, T), dtype=np.int64)}
        if "position_ids" in self.names:
            feed["position_ids"] = np.arange(T, dtype=np.int64)[None]
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), dtype=np.float32)
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = empty
            feed[f"past_key_values.{i}.value"] = empty
        (logits,) = self.session.run(["logits"], feed)
        return torch.from_numpy(logits)


def bits_per_weight(model: Path) -> float:
    """Stored bits per weight of the linear layers and the output head (the embedding when tied).

    Args:
        model: a quadapt checkpoint directory, a GGUF file, or an onnxruntime-genai model directory.
    """
    if model.suffix == ".gguf":
        return _gguf_bits(model)
    if (model / "genai_config.json").exists():
        return _onnx_bits(model)
    return _safetensors_bits(model)


def _gguf_bits(path: Path) -> float:
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    counted = [t for name, t in tensors.items() if name == head or name.split(".")[-2] in _GGUF_LINEARS]
    return sum(int(t.n_bytes) for t in counted) * 8 / sum(int(t.n_elements) for t in counted)


def _onnx_bits(model_dir: Path) -> float:
    import onnx

    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    graph = onnx.load(str(model_dir / decoder)).graph
    initializers = {t.name: t for t in graph.initializer}
    stored = params = 0
    for node in graph.node:
        if node.op_type not in ("MatMulNBits", "MatMul", "Gemm") or not any(i in initializers for i in node.input):
            continue
        attributes = {a.name: a.i for a in node.attribute}
        for name in node.input:
            if name in initializers:
                stored += _onnx_bytes(initializers[name], model_dir)
        if node.op_type == "MatMulNBits":
            params += attributes["K"] * attributes["N"]
        else:
            params += int(np.prod(initializers[node.input[1]].dims))
    return stored * 8 / params


def _onnx_bytes(tensor, model_dir: Path) -> int:
    import onnx

    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(onnx.numpy_helper.to_array(tensor, base_dir=str(model_dir)).tobytes())


def _safetensors_bits(model_dir: Path) -> float:
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    stored = params = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                parts = name.split(".")
                head = parts[0] == "lm_head" or (
                    name == "model.embed_tokens.weight" and config.get("tie_word_embeddings", False)
                )
                if not head and not any(p in _HF_LINEARS for p in parts):
                    continue
                if name.endswith("weight_shape"):  # two integers of metadata per linear
                    continue
                tensor = f.get_slice(name)
                shape, dtype = tensor.get_shape(), tensor.get_dtype()
                stored += int(np.prod(shape)) * _DTYPE_BYTES[dtype]
                if name.endswith(".weight") or name.endswith(".weight_packed"):
                    params += _weight_params(config, name, shape, dtype)
    return stored * 8 / params


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1, "I64": 8}


def _weight_params(config: dict, name: str, shape: list[int], dtype: str) -> int:
    """Weights of one stored matrix: its shape, or for a packed int4 one the unpacked shape."""
    if not name.endswith("weight_packed"):
        return int(np.prod(shape))
    per_word = 32 // config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"]
    return int(np.prod(shape)) * (per_word if dtype == "I32" else 1)
