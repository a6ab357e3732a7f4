"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in plain PyTorch.

Module names follow Hugging Face's, but for one layout on every device and in every weight format:
q/k/v are one `qkv_proj` and gate/up one `gate_up_proj` (`fused.STACKED`), whose sections the
loader fills from the checkpoint's `q_proj`, `k_proj`, ... tensors (`checkpoint_shapes` lists the
names a checkpoint holds). RoPE uses HF's rotate-half layout. This file holds no I/O, no
quantization and no sampling: the loader fills and swaps the linear layers, and generation lives
in `generate.py` and `engine.py`.

Two ways in, one model: `forward(input_ids [B, T], cache)` places rows of equal length after a
contiguous cache's prefix (the reference generator, perplexity); `forward(input_ids [N], cache,
batch=ForwardBatch)` runs the tokens of many requests laid end to end, each at its own position
(the engine). Attention is the cache's: each cache's `attend` stores the new keys and values and
attends every row over its own prefix.
"""

from __future__ import annotations

import math

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attention import causal_attention
from .batch import ForwardBatch
from .config import ModelConfig, RopeScaling
from .fused import FusedLinear
from ..errors import ContextLengthError


class Cache(Protocol):
    """What attention needs of a cache (`KVCache`, `PagedKVCache`)."""

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch | None
    ) -> torch.Tensor:
        """Store `k`, `v` [B, H_kv, T, D]; attend `q` [B, H, T, D] over each row's prefix; return [B, T, H*D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and scale in the input dtype, as the reference implementations do.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [D/2] of RoPE, rescaled per `scaling`; always fp32 on the CPU."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Llama 3.1: long wavelengths slow down by `factor`, short ones stay, the band between blends.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, H, T, D] by the angles whose cos and sin are [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = config.qkv_bias or config.attention_bias
        hidden, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # q, k and v in one matmul, whatever the weight format (`fused`); the loader writes the
        # checkpoint's q_proj, k_proj and v_proj into its sections.
        self.qkv_proj: nn.Module = FusedLinear(
            hidden, (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)), bias=qkv_bias
        )
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.attention_bias)
        self.q_dim, self.kv_dim = q_dim, kv_dim

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Cache | None,
        batch: ForwardBatch | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # [B, T, H*D] -> [B, H, T, D]
        q, k, v = self.qkv_proj(x).split((self.q_dim, self.kv_dim, self.kv_dim), dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            # [B, H, T, D] -> [B, T, H*D]
            out = causal_attention(q, k, v, offset=0).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        else:
            out = cache.attend(self.layer, q, k, v, batch)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        # gate and up in one matmul, as `qkv_proj`
        self.gate_up_proj: nn.Module = FusedLinear(hidden, (("gate_proj", inter), ("up_proj", inter)), bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None, batch: ForwardBatch | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, the stack of layers, and the final norm (HF's `model.*`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":
            nn.init.normal_(weight)  # nn.Embedding's own initialization
        # On the meta device (the loader, the adapter checks) there is nothing to fill, and
        # normal_ there runs a torch._refs decomposition that imports torch._dynamo: 150 MB of
        # resident memory and ~2 s, measured, in every process that builds a model.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """A Llama-family causal language model: token ids in, next-token logits out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a buffer: it is derived from the config, never loaded, and must exist even when the
        # module is built on the meta device.
        self._inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, 1, T, D] for `positions` [B, T]."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self._inv_freq  # [B, T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        logits_to_keep: int = 0,
        batch: ForwardBatch | None = None,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, T] placed after the cache's prefix (or at 0 without a cache);
        with `batch`, logits for the tokens of many rows laid end to end.

        Args:
            input_ids: token ids [B, T]; with `batch`, [N] as `batch.input_ids`.
            cache: keys and values of earlier positions; without `batch`, a `KVCache` to which
                this call appends T positions; with it, the `PagedKVCache` the batch's slots index.
            logits_to_keep: compute logits only for the last N positions (0 = all); not with `batch`.
            batch: the explicit batch description (positions, cache slots, rows, logits wanted).

        Returns:
            Logits [B, T, V] (or [B, N, V]) in the model's dtype; with `batch`, [L, V] for the
            tokens of `batch.logits_indices`.

        Raises:
            ContextLengthError: the sequence would pass the model's context.
        """
        if batch is not None:
            return self._forward_batch(input_ids, cache, batch)
        B, T = input_ids.shape
        start = cache.seq_len if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"sequence of {start + T} tokens exceeds the model's context of "
                f"{self.config.max_position_embeddings}; shorten the prompt or lower max_new_tokens"
            )
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def _forward_batch(self, input_ids: torch.Tensor, cache: Cache | None, batch: ForwardBatch) -> torch.Tensor:
        if cache is None:
            raise ValueError("a batched forward needs the paged cache its ForwardBatch indexes")
        if batch.max_position >= self.config.max_position_embeddings:
            raise ContextLengthError(
                f"position {batch.max_position} is past the model's context of "
                f"{self.config.max_position_embeddings}; the scheduler must stop a request at the context"
            )
        x = self.model.embed_tokens(input_ids)[None]  # [1, N, hidden]
        cos, sin = self.rope(batch.positions[None], x.dtype)  # [1, 1, N, D]
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, batch)
        # Norm and head only where logits are wanted; both act on each token alone.
        return self.lm_head(self.model.norm(x[0, batch.logits_indices]))  # [L, V]


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The float parameters a checkpoint of `config` holds, by HF name, in model order, with their
    shapes: each stacked module's weight and bias listed as its sections' (`q_proj.weight`, ...).
    A tied head is listed once, as the embedding."""
    with torch.device("meta"):
        model = CausalLM(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for module_name, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False)]
        sections = getattr(module, "section_names", ())
        parent = module_name.rpartition(".")[0]
        for param_name, p in params:
            if p is model.model.embed_tokens.weight and module is not model.model.embed_tokens:
                continue  # the tied head
            if not sections:
                shapes[f"{module_name}.{param_name}"] = tuple(p.shape)
                continue
            for section, size in zip(sections, module.section_sizes):
                shapes[f"{parent}.{section}.{param_name}"] = (size, *p.shape[1:])
    return shapes


def checkpoint_linears(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every linear a checkpoint of `config` holds, by HF module name (`model.layers.0.self_attn.k_proj`,
    `lm_head`), in model order: (out_features, in_features)."""
    return {
        name.removesuffix(".weight"): shape for name, shape in checkpoint_shapes(config).items()
        if name.endswith(".weight") and len(shape) == 2 and name != "model.embed_tokens.weight"
    } | ({"lm_head": (config.vocab_size, config.hidden_size)} if config.tie_word_embeddings else {})
