"""A llama-family GGUF file (llama.cpp's format) read as a checkpoint under Hugging Face names.

`GGUFCheckpoint` parses the header itself, since the `gguf` package's reader walks every vocabulary
string through numpy and takes seconds to open a file. From the header it builds an HF `config.json`
dict, streams tensors one at a time dequantized to float32 by `gguf.quants.dequantize` (undoing
llama.cpp's Q/K row permutation), and rebuilds a `tokenizer.json` from the vocabulary the way
transformers' GGUF loader does, so both tokenize alike.

It does not write GGUF, quantize, or keep weights packed, and reads only the `llama` and `qwen2`
architectures with dense attention and MLP and the rope scalings `runtime/model/config.py` runs (none,
linear, llama3); anything else raises `UnsupportedError` at open.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from ..model.config import RopeType
from ..errors import CheckpointError, QuadaptError, UnsupportedError
from .gguf_file import SUPPORTED_NAMES, SUPPORTED_TYPES, TensorEntry, read_header
from .reader import TokenizerFiles

# One remap table, GGUF module name -> HF module name; `.weight`/`.bias` carry over unchanged.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Per architecture: the HF class, which layer modules may carry a bias, and whether llama.cpp
# permuted Q/K rows on conversion (it does for llama, to its interleaved rope; not for qwen2).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", frozenset(), True),
    "qwen2": ("Qwen2ForCausalLM", frozenset({"attn_q", "attn_k", "attn_v"}), False),
}

class GGUFCheckpoint:
    """A llama-family GGUF file opened for streaming reads (see `CheckpointReader`).

    Opening reads the header (and `rope_freqs`, a few floats, if present) and settles the rope
    scaling; tensor data is memory-mapped and read only as `tensors()` reaches it.

    Attributes:
        path: the file.
        architecture: `general.architecture`, "llama" or "qwen2".
        metadata: every header key-value pair, as Python values.
    """

    def __init__(self, path: str | Path):
        """Open `path` and check that quadapt can read every tensor in it.

        Raises:
            CheckpointError: the file is missing, not GGUF, truncated, or inconsistent (including
                rope scaling metadata without its factor).
            UnsupportedError: another architecture, a tensor type or tensor name quadapt does not
                read, or a rope scaling the model cannot run (yarn, longrope, ...).
        """
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise CheckpointError(
                f"GGUF file {str(self.path)!r} does not exist or is not a file; pass the path of a .gguf file"
            )
        self.metadata, tensors = read_header(self.path)
        self.architecture = self.metadata.get("general.architecture")
        if self.architecture not in _ARCHITECTURES:
            raise UnsupportedError(
                f"GGUF file {str(self.path)!r} holds architecture {self.architecture!r}; quadapt reads "
                f"{sorted(_ARCHITECTURES)}; convert the model from its Hugging Face checkpoint instead"
            )
        self._tensors = self._check_tensors(tensors)
        self._scaling = self._rope_scaling()

    def _check_tensors(self, tensors: list[TensorEntry]) -> list[tuple[str, TensorEntry]]:
        """Pair each tensor with its HF name, raising now for anything that could not be read later."""
        unsupported = [t for t in tensors if t.ggml_type not in SUPPORTED_TYPES]
        if unsupported:
            first = unsupported[0]
            more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
            raise UnsupportedError(
                f"tensor {first.name!r} in {str(self.path)!r} is stored as {_type_name(first.ggml_type)}{more}; "
                f"quadapt dequantizes {SUPPORTED_NAMES}; re-quantize the model to one of those (e.g. Q4_K_M or Q8_0)"
            )
        named, unknown = [], []
        self._freqs_scaling: dict[str, Any] | None = None
        for tensor in tensors:
            if tensor.name == "rope_freqs.weight":
                self._check_rope_freqs(tensor)
                continue  # folded into config_dict()'s rope_scaling
            hf_name = self._hf_name(tensor.name)
            if hf_name is None:
                unknown.append(tensor.name)
            else:
                named.append((hf_name, tensor))
        if unknown:
            raise UnsupportedError(
                f"GGUF file {str(self.path)!r} holds tensors quadapt does not map to a {self.architecture} model: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; only dense attention/MLP models are supported"
            )
        return named

    def _hf_name(self, gguf_name: str) -> str | None:
        """The HF name of a GGUF tensor, or None when the table does not know it."""
        module, _, suffix = gguf_name.rpartition(".")
        if module in _GLOBAL_NAMES and suffix == "weight":
            return f"{_GLOBAL_NAMES[module]}.weight"
        match = _LAYER_TENSOR.fullmatch(gguf_name)
        if match is None or match[2] not in _LAYER_NAMES:
            return None
        layer, module, suffix = match.groups()
        if suffix == "bias" and module not in _ARCHITECTURES[self.architecture][1]:
            return None
        return f"model.layers.{layer}.{_LAYER_NAMES[module]}.{suffix}"

    def _check_rope_freqs(self, tensor: TensorEntry) -> None:
        """Turn llama.cpp's per-dimension rope factors back into the HF rope_scaling they came from.

        transformers drops this tensor, so its GGUF loader runs Llama 3.1/3.2 with plain rope; every
        slow rotary frequency is then off by up to the scaling factor. We recover the `llama3`
        scaling instead, or refuse the file.
        """
        factors = self._read(tensor)
        self._freqs_scaling = None
        if torch.all(factors == 1.0):
            return  # plain rope, which the config already says
        theta = float(self.metadata.get(f"{self.architecture}.rope.freq_base", 10000.0))
        dims = self.metadata.get(f"{self.architecture}.rope.dimension_count")
        self._freqs_scaling = _llama3_rope_scaling(factors, theta, int(dims)) if dims else None
        if self._freqs_scaling is None:
            raise UnsupportedError(
                f"GGUF file {str(self.path)!r} carries rope_freqs (per-dimension rope factors up to "
                f"{factors.max().item():g}) that match no Llama-3 rope scaling, which is all quadapt can "
                "express; convert the model from its Hugging Face checkpoint instead"
            )

    def config_dict(self) -> dict[str, Any]:
        """The model's HF `config.json` as a dict, mapped from the GGUF metadata.

        Raises:
            CheckpointError: a required metadata key is missing.
        """
        arch = self.architecture
        shapes = {name: tensor.shape for name, tensor in self._tensors}
        config: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[arch][0]],
            "model_type": arch,
            "vocab_size": self._vocab_size(shapes),
            "hidden_size": self._require(f"{arch}.embedding_length"),
            "intermediate_size": self._require(f"{arch}.feed_forward_length"),
            "num_hidden_layers": self._require(f"{arch}.block_count"),
        }
        config["num_attention_heads"], config["num_key_value_heads"] = self._heads()
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
            self._check_int(key, config[key])
        head_dim = self._head_dim()
        if head_dim is not None:
            config["head_dim"] = head_dim
        config["max_position_embeddings"] = self._require(f"{arch}.context_length")
        config["rms_norm_eps"] = _f32(self._require(f"{arch}.attention.layer_norm_rms_epsilon"))
        config["rope_theta"] = _f32(self.metadata.get(f"{arch}.rope.freq_base", 10000.0))
        if self._scaling is not None:
            config["rope_scaling"] = dict(self._scaling)
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        config["tie_word_embeddings"] = "lm_head.weight" not in shapes
        for key in ("bos", "eos", "padding"):
            token_id = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None:
                config[f"{'pad' if key == 'padding' else key}_token_id"] = int(token_id)
        config["hidden_act"] = "silu"
        config["torch_dtype"] = "float32"
        return config

    def _heads(self) -> tuple[int, int]:
        """(query heads, key/value heads); llama.cpp omits the latter when they are equal."""
        heads = self._require(f"{self.architecture}.attention.head_count")
        kv_heads = self.metadata.get(f"{self.architecture}.attention.head_count_kv", heads)
        return self._check_int("num_attention_heads", heads), self._check_int("num_key_value_heads", kv_heads)

    def _check_int(self, key: str, value: Any) -> int:
        # llama.cpp writes a per-layer list where layers differ in shape (e.g. hybrid models).
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UnsupportedError(
                f"GGUF file {str(self.path)!r} states {key} as {value!r}; quadapt reads models whose layers all "
                "share one positive shape"
            )
        return value

    def _require(self, key: str) -> Any:
        if key not in self.metadata:
            raise CheckpointError(
                f"GGUF file {str(self.path)!r} lacks metadata key {key!r}; the file is incomplete, re-convert it"
            )
        return self.metadata[key]

    def _vocab_size(self, shapes: dict[str, tuple[int, ...]]) -> int:
        rows = shapes.get("model.embed_tokens.weight", (None,))[0]
        stated = self.metadata.get(f"{self.architecture}.vocab_size")
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab_size = stated if stated is not None else len(tokens) if tokens is not None else rows
        if vocab_size is None or (rows is not None and rows != vocab_size):
            raise CheckpointError(
                f"GGUF file {str(self.path)!r}: vocabulary size {vocab_size} does not match the {rows} rows of "
                "token_embd.weight; the file is inconsistent, re-convert it"
            )
        return int(vocab_size)

    def _head_dim(self) -> int | None:
        key_length = self.metadata.get(f"{self.architecture}.attention.key_length")
        rope_dims = self.metadata.get(f"{self.architecture}.rope.dimension_count")
        if key_length is not None and rope_dims is not None and key_length != rope_dims:
            raise UnsupportedError(
                f"GGUF file {str(self.path)!r} rotates {rope_dims} of {key_length} head dimensions; quadapt "
                "supports full rotary embeddings only"
            )
        head_dim = key_length if key_length is not None else rope_dims
        return None if head_dim is None or self.architecture == "qwen2" else int(head_dim)

    def _rope_scaling(self) -> dict[str, Any] | None:
        """The HF rope_scaling of the file, refusing at open what `ModelConfig` would refuse at load.

        llama.cpp states linear and yarn scaling in `rope.scaling.type` (or the old `rope.scale_linear`)
        and bakes Llama 3's into the `rope_freqs` tensor (see `_check_rope_freqs`).
        """
        key = f"{self.architecture}.rope.scaling."
        kind = self.metadata.get(key + "type", "none")
        if kind == "none":
            linear = self.metadata.get(f"{self.architecture}.rope.scale_linear")  # the pre-2024 key
            stated = None if linear in (None, 1.0) else {"rope_type": "linear", "factor": _f32(linear)}
        elif kind == "linear":
            stated = {"rope_type": "linear", "factor": _f32(self._require(key + "factor"))}
        else:
            # The same refusal as RopeScaling's for a config.json, said in GGUF terms.
            raise UnsupportedError(
                f"GGUF file {str(self.path)!r} uses rope scaling type {kind!r} (metadata {key + 'type'!r}), "
                f"which is not supported; supported: {', '.join(get_args(RopeType))} (in GGUF: 'none', "
                "'linear', or llama3 as a rope_freqs tensor)"
            )
        if self._freqs_scaling is None:
            return stated
        if stated is not None:
            raise UnsupportedError(
                f"GGUF file {str(self.path)!r} states rope scaling {stated['rope_type']!r} and also carries "
                "rope_freqs; quadapt supports one or the other"
            )
        return self._freqs_scaling

    def keys(self) -> list[str]:
        """Every tensor's HF name, in file order (no `lm_head.weight` when the embeddings are tied)."""
        return [name for name, _ in self._tensors]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, float32 tensor)` one at a time, in `keys()` order, in HF layout.

        Raises:
            QuadaptError: the `gguf` package is not installed.
        """
        n_head, n_kv_head = self._heads()
        permuted = _ARCHITECTURES[self.architecture][2]
        for hf_name, tensor in self._tensors:
            weight = self._read(tensor)
            if permuted and ".self_attn.q_proj." in hf_name:
                weight = _unpermute_rows(weight, n_head, tensor.name)
            elif permuted and ".self_attn.k_proj." in hf_name:
                weight = _unpermute_rows(weight, n_kv_head, tensor.name)
            yield hf_name, weight

    def _read(self, tensor: TensorEntry) -> torch.Tensor:
        """Dequantize one tensor to a float32 torch tensor of its torch-order shape."""
        dequantize = _gguf_dequantize()
        _, block, block_bytes = SUPPORTED_TYPES[tensor.ggml_type]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=tensor.start, shape=(tensor.nbytes,))
        # A plain ndarray view: numpy's memmap subclass costs a Python call per block group.
        raw = np.asarray(data).reshape(*tensor.shape[:-1], tensor.shape[-1] // block * block_bytes)
        values = dequantize(raw, tensor.ggml_type)
        # F32 comes back as a read-only view of the map; copy it so the tensor owns its memory.
        values = np.array(values, dtype=np.float32, copy=not values.flags.writeable)
        return torch.from_numpy(values.reshape(tensor.shape))

    def tokenizer_files(self) -> TokenizerFiles | None:
        """The tokenizer the GGUF vocabulary describes, as transformers' GGUF loader builds it.

        Returns:
            TokenizerFiles, or None when the file carries no `tokenizer.ggml.model`.

        Raises:
            UnsupportedError: a tokenizer model other than "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE).
            CheckpointError: the vocabulary is incomplete.
        """
        from .gguf_tokenizer import build_tokenizer

        return build_tokenizer(self.metadata, str(self.path))


def _unpermute_rows(weight: torch.Tensor, n_head: int, name: str) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute`, which interleaves each head's two rotary halves.

    llama.cpp rotates pairs (2i, 2i+1); HF's `rotate_half` pairs (i, i + D/2). The file stores rows
    per head as [r0, r(D/2), r1, r(D/2+1), ...]; this puts them back as [r0, r1, ..., r(D/2), ...].
    """
    rows = weight.shape[0]
    if rows % (2 * n_head) != 0:
        raise CheckpointError(
            f"tensor {name!r} has {rows} rows, not a multiple of 2 x {n_head} heads; the file is inconsistent"
        )
    rest = weight.shape[1:]
    # [H*D, ...] -> [H, D/2, 2, ...] -> [H, 2, D/2, ...] -> [H*D, ...]
    return weight.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


def _llama3_rope_scaling(factors: torch.Tensor, theta: float, rotary_dims: int) -> dict[str, Any] | None:
    """The HF `llama3` rope_scaling from which convert_hf_to_gguf.py computed these factors, or None.

    Each factor is 1 on fast dimensions, `factor` on slow ones, and 1 / ((1 - s) / factor + s) in
    between, where s = (L / wavelen - lo) / (hi - lo) is linear in 1 / wavelen. Two in-between
    factors fix that line's slope L / (hi - lo) and intercept -lo / (hi - lo). Only those reach the
    frequencies, so lo is taken as 1, as in every released Llama 3 config, and hi and L follow.
    """
    f = factors.double().flatten()
    if 2 * f.numel() != rotary_dims:
        return None
    inv_wavelen = theta ** (-torch.arange(0, rotary_dims, 2, dtype=torch.float64) / rotary_dims) / (2 * math.pi)
    factor = f.max().item()
    between = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if factor <= 1 or int(between.sum()) < 2:
        return None
    s = (1 / f[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = (float(c) for c in np.polyfit(inv_wavelen[between].numpy(), s.numpy(), 1))
    if slope <= 0 or intercept >= 0:
        return None
    high = round(1 - 1 / intercept, 4)
    context = round(slope * (high - 1))
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": context,
    }
    # Rebuild the factors from the rounded values: a file they do not reproduce is not llama3 scaling.
    s_all = ((context * inv_wavelen - 1) / (high - 1)).clamp(0, 1)
    rebuilt = 1 / ((1 - s_all) / factor + s_all)
    return scaling if torch.allclose(rebuilt, f, rtol=1e-4, atol=0) else None


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _type_name(ggml_type: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"ggml type {ggml_type}"


def _gguf_dequantize():
    try:
        from gguf.quants import dequantize
    except ImportError as error:
        raise QuadaptError(
            f"reading GGUF tensors needs the `gguf` package ({error}); install it with: pip install 'quadapt[gguf]'"
        ) from error
    return dequantize
