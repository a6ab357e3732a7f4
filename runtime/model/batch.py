"""The explicit description of one forward pass over many requests, as the model and the paged cache read it.

A step of the engine feeds each scheduled request (a *row*) some tokens: a chunk of its prompt,
or the one token it sampled last. The rows' tokens are laid end to end (`input_ids` [N]), and
`ForwardBatch` says, per token, its position in its own sequence, the cache slot its key and
value go to, and its LoRA slot; per row, where its tokens lie and which cache blocks hold its
prefix; and which tokens need logits. Rows may sit at different positions and mix prefill and
decode. `build_batch` makes one from `RowSpec`s.

This is a plain description: it does no scheduling and owns no memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...kernels import NO_SLOT


@dataclass(frozen=True)
class RowSpec:
    """One request's part of a forward pass.

    Attributes:
        token_ids: the tokens fed this step (a prompt chunk, or the last sampled token).
        start: the position of the first of them, i.e. how many of the row's tokens the cache
            already holds.
        blocks: the row's block table: the cache blocks holding positions 0, B, 2B, ... (B the
            block size); it covers `start + len(token_ids)` positions.
        needs_logits: return logits for the row's last token (it will sample from them).
        lora_slot: the adapter slot of the row's tokens, `NO_SLOT` for the base model.
    """

    token_ids: list[int]
    start: int
    blocks: list[int]
    needs_logits: bool
    lora_slot: int = NO_SLOT


@dataclass(frozen=True)
class DecodeRows:
    """The rows fed exactly one token: attended together, each query over its own padded prefix.

    Attributes:
        token_index: where each row's token lies in `input_ids` [R].
        block_tables: each row's blocks, padded with block 0 [R, max_blocks].
        mask: which padded key positions each row sees [R, 1, 1, max_blocks * block_size].
    """

    token_index: torch.Tensor
    block_tables: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class PrefillRow:
    """A row fed several tokens, attended on its own: queries `first .. first+length-1` of
    `input_ids` at positions `context-length .. context-1`, over the `context` keys in `blocks`."""

    first: int
    length: int
    context: int
    blocks: torch.Tensor


@dataclass(frozen=True)
class ForwardBatch:
    """One forward pass over several rows; see the module docstring.

    Attributes:
        input_ids: every row's tokens, end to end [N].
        positions: each token's position in its own sequence [N].
        slot_mapping: the cache slot (block * block_size + offset) each token's key and value go to [N].
        lora_slots: each token's adapter slot [N], or None when no row uses an adapter.
        logits_indices: the tokens whose logits the forward returns, in row order [L].
        decode: the one-token rows, or None.
        prefill: the several-token rows.
        max_position: the largest position in the batch (for the context check).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    lora_slots: torch.Tensor | None
    logits_indices: torch.Tensor
    decode: DecodeRows | None
    prefill: list[PrefillRow]
    max_position: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def build_batch(rows: Sequence[RowSpec], block_size: int, device: torch.device | str = "cpu") -> ForwardBatch:
    """Lay `rows` end to end and describe them for the model and the paged cache.

    Args:
        rows: the rows, each with at least one token and a block table long enough for it.
        block_size: positions per cache block.
        device: where the description's tensors go (the model's device).

    Returns:
        The batch; `logits_indices` lists the rows with `needs_logits`, in order.
    """
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    lora: list[int] = []
    logits: list[int] = []
    decode_index: list[int] = []
    decode_blocks: list[list[int]] = []
    decode_lens: list[int] = []
    prefill: list[PrefillRow] = []
    for row in rows:
        T = len(row.token_ids)
        assert T > 0 and len(row.blocks) * block_size >= row.start + T, (T, row.start, len(row.blocks))
        first = len(ids)
        ids.extend(row.token_ids)
        for p in range(row.start, row.start + T):
            positions.append(p)
            slots.append(row.blocks[p // block_size] * block_size + p % block_size)
        lora.extend([row.lora_slot] * T)
        if row.needs_logits:
            logits.append(first + T - 1)
        context = row.start + T
        if T == 1:
            decode_index.append(first)
            decode_blocks.append(row.blocks[: -(-context // block_size)])
            decode_lens.append(context)
        else:
            blocks = torch.tensor(row.blocks[: -(-context // block_size)], dtype=torch.long, device=device)
            prefill.append(PrefillRow(first=first, length=T, context=context, blocks=blocks))

    decode = None
    if decode_index:
        width = max(len(b) for b in decode_blocks)
        table = torch.tensor([b + [0] * (width - len(b)) for b in decode_blocks], dtype=torch.long)
        lens = torch.tensor(decode_lens, dtype=torch.long)
        mask = torch.arange(width * block_size)[None, :] < lens[:, None]  # [R, S]
        decode = DecodeRows(
            token_index=torch.tensor(decode_index, dtype=torch.long, device=device),
            block_tables=table.to(device),
            mask=mask[:, None, None, :].to(device),  # [R, 1, 1, S]
        )

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return ForwardBatch(
        input_ids=tensor(ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        lora_slots=None if all(s == NO_SLOT for s in lora) else tensor(lora),
        logits_indices=tensor(logits),
        decode=decode,
        prefill=prefill,
        max_position=max(positions),
    )
