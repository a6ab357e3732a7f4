"""The training forward pass of a runtime `CausalLM`: no cache, optional gradient checkpointing,
and the output head only where a label is.

`CausalLM.forward` is the inference pass; training needs two things it does not do: recompute
each decoder layer in backward instead of keeping its activations (gradient checkpointing,
`torch.utils.checkpoint`), and skip the vocabulary projection at prompt and padding positions,
whose logits the completion-only loss never reads. The layers themselves are the model's own, so
the two passes compute the same function (tested).

It holds no optimizer and no data handling (`train/loop.py`, `train/data.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..runtime.errors import ContextLengthError
from ..runtime.model.model import CausalLM
from .data import IGNORE


def hidden_states(model: CausalLM, input_ids: torch.Tensor, *, checkpointing: bool = False) -> torch.Tensor:
    """The final-norm hidden states [B, T, hidden] of `input_ids` [B, T] at positions 0..T-1.

    Raises:
        ContextLengthError: T is past the model's context.
    """
    B, T = input_ids.shape
    if T > model.config.max_position_embeddings:
        raise ContextLengthError(
            f"a training sequence of {T} tokens exceeds the model's context of {model.config.max_position_embeddings}; "
            "lower --max-length"
        )
    x = model.model.embed_tokens(input_ids)  # [B, T, hidden]
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    cos, sin = model.rope(positions, x.dtype)
    for layer in model.model.layers:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(layer, x, cos, sin, None, use_reentrant=False)
        else:
            x = layer(x, cos, sin, None)
    return model.model.norm(x)


def completion_loss(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor, *,
                    checkpointing: bool = False) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there are.

    Position t predicts `labels[:, t + 1]`; positions whose next label is `IGNORE` are skipped
    before the output head, so they cost nothing there.

    Args:
        model: the model (with LoRA modules or not).
        input_ids, labels: [B, T] as `train.data.collate` makes them.
        checkpointing: recompute each decoder layer in backward.

    Returns:
        (the summed loss in fp32, the number of predicted tokens).
    """
    h = hidden_states(model, input_ids, checkpointing=checkpointing)
    targets = labels[:, 1:]
    keep = targets != IGNORE  # [B, T-1]
    logits = model.lm_head(h[:, :-1][keep])  # [n, V]
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())
