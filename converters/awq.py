"""Activation-aware scaling (AWQ, Lin et al., 2023): per-input-channel scales searched on activations.

Channels that carry large activations matter more to a linear's output. AWQ multiplies each input
channel k of the weights by s_k before rounding and divides the input by s_k, which the preceding
operation absorbs (an RMSNorm's weight, or the rows of the linear before), so the function is
unchanged in float and the rounding error moves off the salient channels:

    y = x W^T = (x / s) (W s)^T ~ (x / s) Q(W s)^T.

The scales follow AutoAWQ's search: s = mean|x|^a / mean|w|^(1 - a), normalised to
sqrt(max * min) = 1, for a on a grid of `AWQ_GRID` points in [0, 1), plus s = 1 (plain rounding);
the winner has the least output error. The error is measured through the input Hessian H, not on
stored activations: ||x W^T - (x/s) Q(W s)^T||^2 summed over inputs is
trace(dW H dW^T) / 2 with dW = W - Q(W s) / s (`gptq.output_error`), so the search needs only the
statistics `calibrate.py` already gathers. (AutoAWQ measures the output of the whole block, the
attention or the MLP; this measures the linears that share the input.)

The statistics leave out each calibration sequence's first token. It is an attention sink: a
few of its channels are orders of magnitude larger than any other token's, so in H it can
outweigh the rest of its sequence, and the search then picks the scales that suit that one
token. Without it the scales suit the others, and AWQ's perplexity drops on each held-out text
at group 64 and group 32 (`docs/quality.md`). GPTQ keeps the first tokens: it compensates each
column's error along H, and without the sink in H the sink's own outputs go uncompensated (its
keys and values feed every later token), which costs far more than it gains.

After the scales, `search_clip` narrows each group's range where that lowers the group's own
output error, AWQ's clipping search, again measured through H (its diagonal blocks). Symmetric,
it also tries the one wider range that puts the group's largest magnitude exactly on the top
code (max|w| / 7 at 4 bits instead of min-max's max|w| / 7.5, from which a positive maximum
rounds down to 7).

The result is plain weights: the scaled linears are rounded like any other, within the ranges
the search chose, and the folded norm or linear stays float, so the checkpoint is the same
compressed-tensors format as round-to-nearest.

This file computes scales on tensors; which linears share an input, and what the scales fold
into, is `calibrated.py`'s business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .gptq import output_error
from .quantize import IntQuantized, dequantize_groups, group_view, int_qparams, int_range, quantize_groups

AWQ_GRID = 20
# The clipping search's shrink factors of each group's min-max range: AutoAWQ's 20 steps from 1.0
# (plain min-max, first, so a tie keeps it) down to 0.525; `search_clip` adds one wider range
# when symmetric.
AWQ_CLIP_GRID: tuple[float, ...] = tuple(1.0 - 0.025 * i for i in range(20))

# Rounds a weight [N, K] and returns it dequantized, in float32.
RoundFn = Callable[[torch.Tensor], torch.Tensor]


def scaled_error(weights: Sequence[torch.Tensor], scales: torch.Tensor, hessian: torch.Tensor, round_fn: RoundFn) -> float:
    """Summed output error of the linears sharing one input, rounded with input scales `scales`.

    Args:
        weights: the float weights [N_i, K] that read the same input.
        scales: s [K], applied as W s before rounding and undone after.
        hessian: H [K, K] of the (unscaled) input to measure on.
        round_fn: the rounding, e.g. min-max int4 group 64.

    Returns:
        sum_i trace(dW_i H dW_i^T), dW_i = W_i - round(W_i s) / s.
    """
    return sum(output_error(w, round_fn(w.float() * scales) / scales, hessian) for w in weights)


def search_scales(
    weights: Sequence[torch.Tensor], mean_abs_input: torch.Tensor, hessian: torch.Tensor, round_fn: RoundFn,
    group_size: int | None, grid: int = AWQ_GRID,
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scales with the least output error on the calibration inputs.

    Args:
        weights: the float weights [N_i, K] that read the same input.
        mean_abs_input: mean |x| per input channel [K].
        hessian: H [K, K] of the calibration inputs.
        round_fn: the rounding the scaled weights will get.
        group_size: the quantization group (the weight magnitude is normalised per group, as
            AutoAWQ does), or None per channel.
        grid: points of the exponent grid.

    Returns:
        (s [K] in float32, its error); s is all ones when no scaling beats plain rounding.
    """
    w = torch.cat([x.float() for x in weights])  # [sum N_i, K]
    N, K = w.shape
    size = K if group_size is None else group_size
    grouped = w.abs().view(N, K // size, size)
    w_mean = (grouped / grouped.amax(dim=-1, keepdim=True).clamp(min=1e-12)).view(N, K).mean(dim=0)
    x_mean = mean_abs_input.float()
    H = hessian.float()
    best = torch.ones(K)
    best_error = scaled_error(weights, best, H, round_fn)
    for i in range(grid):
        ratio = i / grid
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = scaled_error(weights, s, H, round_fn)
        if error < best_error:  # strict: a tie keeps plain rounding
            best, best_error = s, error
    return best, best_error


def search_clip(
    w: torch.Tensor, hessian: torch.Tensor, *, num_bits: int, group_size: int | None, symmetric: bool,
    scale_dtype: torch.dtype,
) -> IntQuantized:
    """Each group's range shrunk to the factor of `AWQ_CLIP_GRID` with the least output error.

    AWQ's clipping search (AutoAWQ's `auto_clip`): a group's contribution to the output is
    x_g w_g^T, so its error is dw_g H_gg dw_g^T with H_gg the group's diagonal block of the input
    Hessian; each group of each row keeps its best shrink. The cross-group terms of H are left
    out, as AutoAWQ leaves them out, so the caller checks the result on the whole H.

    Args:
        w: the float weight [N, K] (already scaled, if its input is).
        hessian: H [K, K] of the input as w sees it.
        num_bits, group_size, symmetric, scale_dtype: the rounding, as `quantize.quantize_int`.

    Returns:
        The quantized matrix, in min-max's form (its scales and zero points from a shrunk range).
    """
    groups = group_view(w, group_size)  # [N, G, size]
    N, G, size = groups.shape
    H = hessian.float()
    blocks = torch.stack([H[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(G)])  # [G, size, size]
    params = {"num_bits": num_bits, "symmetric": symmetric, "scale_dtype": scale_dtype}

    def block_error(shrink: torch.Tensor) -> torch.Tensor:
        scale, zero = int_qparams(groups, shrink=shrink, **params)
        delta = dequantize_groups(quantize_groups(groups, scale, zero, num_bits), scale, zero) - groups
        return torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)

    best_shrink = torch.ones(N, G)
    best = block_error(best_shrink)
    factors = AWQ_CLIP_GRID[1:]
    if symmetric:
        # and the one wider range whose largest magnitude lands exactly on qmax: min-max maps it to
        # (qmax - qmin) / 2, which a positive maximum must round down from
        qmin, qmax = int_range(num_bits)
        factors += ((qmax - qmin) / 2 / qmax,)
    for factor in factors:
        shrink = torch.full((N, G), factor)  # float32, as the final ranges are computed
        error = block_error(shrink)
        better = error < best  # strict: a tie keeps the earlier factor, min-max first
        best = torch.where(better, error, best)
        best_shrink = torch.where(better, shrink, best_shrink)
    scale, zero = int_qparams(groups, shrink=best_shrink, **params)
    q = quantize_groups(groups, scale, zero, num_bits)
    return IntQuantized(q=q.reshape(w.shape), scale=scale, zero_point=zero, num_bits=num_bits)
