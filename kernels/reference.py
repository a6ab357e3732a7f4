"""Torch references of the quantized-weight ops: dequantization and dequant-matmul, per format.

Each function here is the slow, obviously correct definition of an op that a Triton kernel
implements under the same name and signature; `kernels/__init__.py` picks between them. Two in-memory layouts are covered:

- **packed int** (compressed-tensors `pack-quantized`, 4 or 8 bits): `weight_packed` int32
  [N, ceil(K * bits / 32)], element k of a row at bits `bits * (k % per_word)` of word
  `k // per_word`, stored offset-binary (value + 2^(bits-1)); `weight_scale` [N, G] in a float
  dtype; optional `weight_zero_point` int8 [N, G] (asymmetric). W = (q - z) * s, computed in the
  scale's dtype exactly as compressed-tensors computes it, so both give the same bits.
- **NF4** (bitsandbytes): `weight_packed` uint8 [ceil(N*K/2)], two codes a byte, the first in the
  high nibble; `absmax` float32, one per `blocksize` consecutive weights of the flattened
  matrix. W = NF4[q] * absmax, in float32, then cast; this is bitsandbytes' own arithmetic.

`dequant_weight` and `qlinear` take a weight in the kernels' layout (`kernels/layout.py`, a
`KernelWeight`): they are defined as the ops above on its standard layout, restored exactly.

The LoRA ops (`add_lora`, and `lora_linear` for a base weight stored above the A stack) are the
same kind of definition for the slot stacks of `runtime/model/lora.py`.

It does not read checkpoints, know tensor names, quantize, or pick between kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import INT, KernelWeight, standard_nf4, standard_packed_int

NO_SLOT = -1  # the LoRA slot of a token that uses no adapter: its rows get the base output only

# The NF4 code book (bitsandbytes `get_4bit_type("nf4")`), as Python floats: a CPU tensor is made
# on demand so that importing this module allocates nothing.
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as a float32 tensor on `device`."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def unpack_int32(packed: torch.Tensor, num_bits: int, size: int) -> torch.Tensor:
    """Unpack offset-binary integers packed along the last dimension of an int32 tensor.

    Args:
        packed: int32 [R, W], `32 // num_bits` values a word, the first in the lowest bits.
        num_bits: 4 or 8.
        size: how many values each row holds (the rest of the last word is padding).

    Returns:
        int8 [R, size] with values in [-2^(num_bits-1), 2^(num_bits-1) - 1].
    """
    assert packed.dtype == torch.int32 and num_bits in (4, 8), (packed.dtype, num_bits)
    per_word = 32 // num_bits
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int32, device=packed.device)
    # Arithmetic shift sign-extends the top field; the mask keeps num_bits either way.
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)  # [R, W, per_word]
    values = fields.reshape(packed.shape[0], packed.shape[1] * per_word)[:, :size]
    return (values - (1 << (num_bits - 1))).to(torch.int8)


def dequant_packed_int(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    *,
    num_bits: int,
    in_features: int,
) -> torch.Tensor:
    """Dequantize a compressed-tensors packed int4/int8 weight.

    Args:
        weight_packed: int32 [N, ceil(K * num_bits / 32)].
        weight_scale: [N, G] float; G = K / group size (G = 1 for per-channel scales).
        weight_zero_point: int8 [N, G], or None when symmetric.
        num_bits: 4 or 8.
        in_features: K.

    Returns:
        W [N, K] in the scale's dtype.
    """
    q = unpack_int32(weight_packed, num_bits, in_features)  # [N, K]
    N, G = weight_scale.shape
    dtype = weight_scale.dtype
    w = q.view(N, G, in_features // G).to(dtype)  # [N, G, group]
    if weight_zero_point is not None:
        w = w - weight_zero_point.to(dtype).unsqueeze(-1)
    return (w * weight_scale.unsqueeze(-1)).reshape(N, in_features)


def dequant_nf4(
    weight_packed: torch.Tensor,
    absmax: torch.Tensor,
    *,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize a bitsandbytes NF4 weight whose block scales are plain float32.

    Args:
        weight_packed: uint8 [ceil(N*K/2)] (any shape with that many bytes).
        absmax: float32 [ceil(N*K / blocksize)].
        shape: (N, K).
        blocksize: weights per absmax, over the flattened matrix.
        dtype: the dtype of the result.

    Returns:
        W [N, K] in `dtype`.
    """
    n = shape[0] * shape[1]
    flat = weight_packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)[:n]  # high nibble first
    values = nf4_code(flat.device)[codes.long()]  # float32 [n]
    full = n - n % blocksize
    scaled = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(full)
    if full < n:  # a short last block, when N*K is not a multiple of the block size
        scaled = torch.cat((scaled, values[full:] * absmax[-1]))
    return scaled.view(shape).to(dtype)


def qmatmul_packed_int(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    num_bits: int,
    in_features: int,
) -> torch.Tensor:
    """x @ W.T + bias for a packed int4/int8 weight (see `dequant_packed_int`), in x's dtype.

    Args:
        x: activations [..., K].
        weight_packed, weight_scale, weight_zero_point, num_bits, in_features: as `dequant_packed_int`.
        bias: [N] or None.

    Returns:
        [..., N] in x's dtype.
    """
    w = dequant_packed_int(weight_packed, weight_scale, weight_zero_point, num_bits=num_bits, in_features=in_features)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def qmatmul_nf4(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    absmax: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """x @ W.T + bias for an NF4 weight (see `dequant_nf4`), in x's dtype.

    Args:
        x: activations [..., K].
        weight_packed, absmax, shape, blocksize: as `dequant_nf4`.
        dtype: the weight's own dtype (bitsandbytes' quant-state dtype), which rounds W before
            it is cast to x's dtype.
        bias: [N] or None.

    Returns:
        [..., N] in x's dtype.
    """
    w = dequant_nf4(weight_packed, absmax, shape=shape, blocksize=blocksize, dtype=dtype)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def dequant_weight(weight: KernelWeight) -> torch.Tensor:
    """W [N, K] in `weight.dtype` of a weight in the kernels' layout: the standard format's dequantization."""
    N, K = weight.shape
    if weight.fmt == INT:
        return dequant_packed_int(*standard_packed_int(weight), num_bits=weight.num_bits, in_features=K)
    packed, absmax = standard_nf4(weight)
    return dequant_nf4(packed, absmax, shape=(N, K), blocksize=weight.group_size, dtype=weight.dtype)


def qlinear(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias in x's dtype for a weight in the kernels' layout (W rounded to its dtype first).

    Args:
        x: activations [..., K].
        weight: the weight (`kernels.layout.KernelWeight`).
        bias: [N] or None.

    Returns:
        [..., N] in x's dtype.
    """
    return F.linear(x, dequant_weight(weight).to(x.dtype), None if bias is None else bias.to(x.dtype))


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: int | torch.Tensor,
) -> torch.Tensor:
    """Multi-slot LoRA: y + (x @ A[s].T) @ B[s].T for each row, s its slot (-1 adds nothing).

    Args:
        y: base output [M, out].
        x: input [M, in], in the slot buffers' dtype.
        lora_a: A stack [S, R, in].
        lora_b: B stack [S, out, R], scales already folded in.
        token_slots: one slot for every row (an int), or an int64 tensor [M].

    Returns:
        A new tensor [M, out]; `y` is not modified.
    """
    if isinstance(token_slots, int):
        if token_slots == NO_SLOT:
            return y
        return y + (x @ lora_a[token_slots].T) @ lora_b[token_slots].T  # shrink to R, expand to out
    out = y.clone()
    # Obviously correct, not fast: one gather and two matmuls per slot present in the batch.
    for slot in torch.unique(token_slots).tolist():
        if slot == NO_SLOT:
            continue
        rows = token_slots == slot
        out[rows] += (x[rows] @ lora_a[slot].T) @ lora_b[slot].T
    return out


def add_lora_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: int | torch.Tensor,
) -> torch.Tensor:
    """`add_lora` written into `y` in place; returns `y`."""
    if not (isinstance(token_slots, int) and token_slots == NO_SLOT):
        y.copy_(add_lora(y, x, lora_a, lora_b, token_slots))
    return y


def lora_linear(
    x: torch.Tensor,
    weight_and_a: torch.Tensor,
    bias: torch.Tensor | None,
    lora_b: torch.Tensor,
    token_slots: int | torch.Tensor,
) -> torch.Tensor:
    """x @ W.T + bias plus each row's LoRA, for a float weight W stored above every slot's A.

    Args:
        x: input [M, in], in the weight's dtype.
        weight_and_a: [out + S*R, in]: W's rows, then A [S, R, in] flattened to [S*R, in].
        bias: [out] or None.
        lora_b: B stack [S, out, R], scales already folded in.
        token_slots: one slot for every row (an int), or an int64 tensor [M].

    Returns:
        A new tensor [M, out]: `add_lora(x @ W.T + bias, x, A, B, token_slots)`.
    """
    S, N, R = lora_b.shape
    a = weight_and_a[N:].view(S, R, weight_and_a.shape[1])
    return add_lora(F.linear(x, weight_and_a[:N], bias), x, a, lora_b, token_slots)
