"""GPTQ on one linear layer: quantize W column by column, pushing each column's error onto the rest.

GPTQ (Frantar et al., 2022) minimizes the layer-output error ||X W^T - X Q^T||^2 over calibration
inputs X. With H = 2 X^T X (the `HessianAccumulator`), it quantizes the columns in order and, after
each, updates the not-yet-quantized columns by err * (H^-1 row), using the upper Cholesky factor
of H^-1, in lazy blocks of 128 columns. Dampening adds `percdamp` x mean(diag H) to the diagonal.

The error is pushed only along the calibration Hessian, so a Hessian estimated from too few or
too narrow inputs overfits them: `calibrated.py` therefore checks every result against plain
rounding on held-out activations (`output_error`) before it is stored.

Group scales come from the weights as they stand when the group's first column is reached (the
reference algorithm). With `actorder`, columns are visited by decreasing diag(H) ("static" or
"weight" act-order): group scales are then fixed up front from the original weights, so the
stored weight keeps its column order and needs no g_idx. `ranges` fixes them up front instead
(`calibrated.py` passes those of AWQ's clipping search, or the MSE range search's), and GPTQ
then only chooses the integers.

This file holds the algorithm on tensors; running a model to collect X is `calibrate.py`'s job.
"""

from __future__ import annotations

import torch

from .quantize import IntQuantized, group_view, int_qparams, int_range

GPTQ_BLOCKSIZE = 128
GPTQ_PERCDAMP = 0.01  # the reference default, and the first damping tried
# Dampings a calibrated conversion tries per linear, keeping the one (or round-to-nearest) with the
# least output error on held-out calibration activations (`calibrated.py`): a larger damping
# trusts the calibration Hessian less, which is what a linear that overfits it needs.
GPTQ_PERCDAMP_GRID: tuple[float, ...] = (GPTQ_PERCDAMP, 0.1)


class HessianAccumulator:
    """Running H = 2/n * sum_t x_t x_t^T over the rows x_t of a layer's inputs, in float64.

    It also keeps sum_t |x_t| per input channel, the activation magnitude the activation-aware
    scale search (`awq.py`) reads. With `first_tokens=False` it leaves out each sequence's first
    token: an attention sink, whose activations are orders of magnitude larger than the others'
    in a few channels, so that it alone can outweigh every other token of its sequence in H.
    """

    def __init__(self, in_features: int, *, first_tokens: bool = True) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0
        self.first_tokens = first_tokens

    def add(self, x: torch.Tensor) -> None:
        """Add inputs x [..., K] (any leading shape); [B, T, K] sequences when leaving out first tokens."""
        if not self.first_tokens:
            if x.dim() != 3:
                raise ValueError(f"leaving out first tokens needs [B, T, K] sequences, got shape {tuple(x.shape)}")
            x = x[:, 1:]
        rows = x.reshape(-1, x.shape[-1]).double()
        self.hessian += 2.0 * rows.T @ rows
        self.abs_sum += rows.abs().sum(dim=0)
        self.count += rows.shape[0]

    def mean_abs(self) -> torch.Tensor:
        """mean_t |x_t| [K] (zero if nothing was added)."""
        return self.abs_sum / max(self.count, 1)

    def value(self) -> torch.Tensor:
        """H [K, K] averaged over the rows seen (zero if none)."""
        return self.hessian / max(self.count, 1)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    num_bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
    percdamp: float = GPTQ_PERCDAMP,
    blocksize: int = GPTQ_BLOCKSIZE,
    actorder: bool = False,
    ranges: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> IntQuantized:
    """Quantize W [N, K] with GPTQ against the Hessian of its inputs.

    Args:
        w: the float weight [N, K]; K a multiple of `group_size`.
        hessian: H [K, K] = 2 X^T X / n of the layer's calibration inputs.
        num_bits: 4 or 8.
        group_size: input features per scale, or None for one scale per output channel;
            `blocksize` must be a multiple of it.
        symmetric: zero points absent when True.
        scale_dtype: dtype of the stored scales; defaults to w's dtype.
        percdamp: dampening, as a fraction of the mean of diag(H).
        blocksize: columns per lazy update block.
        actorder: visit columns by decreasing diag(H), with group scales fixed up front.
        ranges: the group scales [N, G] and zero points (or None) to use, fixed up front (e.g.
            from a range search), instead of the min-max ranges GPTQ would derive.

    Returns:
        The quantized matrix, columns in their original order.
    """
    scale_dtype = scale_dtype or w.dtype
    N, K = w.shape
    size = K if group_size is None else group_size
    assert K % size == 0 and (group_size is None or blocksize % group_size == 0), (K, group_size, blocksize)
    qmin, qmax = int_range(num_bits)
    params = dict(num_bits=num_bits, symmetric=symmetric, scale_dtype=scale_dtype)

    W = w.float().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    G = K // size
    scale = torch.empty(N, G, dtype=scale_dtype)
    zero = None if symmetric else torch.empty(N, G, dtype=torch.int8)
    static = group_size is None or actorder or ranges is not None
    if static:  # per-channel, act-order or given ranges: every group's scale fixed up front
        s, z = ranges if ranges is not None else int_qparams(group_view(W, group_size), **params)
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)

    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    Q = torch.zeros(N, K, dtype=torch.int8)  # in visiting order
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            g = column // size
            if not static and column % size == 0:
                # The group's scale from its columns as GPTQ has updated them so far.
                s, z = int_qparams(W1[:, i : i + size].unsqueeze(1), **params)
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0]
            s = scale[:, g].float()
            z = zero[:, g].float() if zero is not None else 0.0
            q = torch.round(W1[:, i] / s + z).clamp(qmin, qmax)
            restored = ((q - z).to(scale_dtype) * scale[:, g]).float()  # exactly what is stored
            Q[:, i1 + i] = q.to(torch.int8)
            err = (W1[:, i] - restored) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    q_original = torch.empty_like(Q)
    q_original[:, perm] = Q
    return IntQuantized(q=q_original, scale=scale, zero_point=zero, num_bits=num_bits)


def output_error(w: torch.Tensor, restored: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer-output error of replacing W by `restored`: trace(dW H dW^T) = 2/n ||X dW^T||^2.

    Args:
        w: the float weight [N, K].
        restored: its quantized-dequantized version [N, K].
        hessian: H [K, K] of the inputs to measure on (e.g. held-out ones).

    Returns:
        The summed squared output error per input row (times 2, H's convention).
    """
    delta = w.float() - restored.float()
    # float32 products (the search calls this often), summed in float64
    return float(((delta @ hessian.float()) * delta).sum(dtype=torch.float64))
