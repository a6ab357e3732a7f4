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

from collections.abc import Sequence

import torch

from .quantize import IntQuantized, group_view, int_qparams, int_range

GPTQ_BLOCKSIZE = 128
GPTQ_PERCDAMP = 0.01  # the reference default, and the first damping tried
# Dampings a calibrated conversion tries per linear, keeping the one (or round-to-nearest) with the
# least output error on held-out calibration activations (`calibrated.py`): a larger damping
# trusts the calibration Hessian less, which is what a linear that overfits it needs.
GPTQ_PERCDAMP_GRID: tuple[float, ...] = (GPTQ_PERCDAMP, 0.1)


class HessianAccumulator:
    """Running H = 2/n * sum_t x_t x_t^T over the rows x_t of a layer's inputs, summed in float64.

    It also keeps sum_t |x_t| per input channel, the activation magnitude the activation-aware
    scale search (`awq.py`) reads. With `first_tokens=False` it leaves out each sequence's first
    token: an attention sink, whose activations are orders of magnitude larger than the others'
    in a few channels, so that it alone can outweigh every other token of its sequence in H.

    Each call's product x^T x is computed in `product_dtype` and summed across calls in float64.
    Calibration passes float32 (`calibrate.py`): its calls are batches of a few thousand rows,
    whose float32 product is exact to about 1e-6 relative, and a float64 one costs several times
    as much, which was a third of a GPTQ conversion's time.
    """

    def __init__(
        self, in_features: int, *, first_tokens: bool = True, product_dtype: torch.dtype = torch.float64
    ) -> None:
        self.product_dtype = product_dtype
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
        rows = x.reshape(-1, x.shape[-1]).to(self.product_dtype)
        self.hessian += (rows.T @ rows).double().mul_(2.0)
        self.abs_sum += rows.abs().sum(dim=0).double()
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
    return gptq_quantize_dampings(
        w, hessian, (percdamp,), num_bits=num_bits, group_size=group_size, symmetric=symmetric,
        scale_dtype=scale_dtype, blocksize=blocksize, actorder=actorder, ranges=ranges,
    )[0]


def gptq_quantize_dampings(
    w: torch.Tensor,
    hessian: torch.Tensor,
    percdamps: Sequence[float],
    *,
    num_bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype | None = None,
    blocksize: int = GPTQ_BLOCKSIZE,
    actorder: bool = False,
    ranges: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> list[IntQuantized]:
    """`gptq_quantize` at several dampings in one pass over the columns: one result per damping.

    The column loop is a few small tensor operations per column, so its cost is mostly their
    dispatch; running the dampings side by side (a leading dimension D) pays it once. Rows are
    independent given H, so the linears that read one input (q/k/v) may also be passed stacked
    as one W, each row with its own range.

    Args:
        percdamps: the dampings, each as `gptq_quantize`'s `percdamp`.
        w, hessian, num_bits, group_size, symmetric, scale_dtype, blocksize, actorder, ranges:
            as `gptq_quantize`.

    Returns:
        The quantized matrices, in the order of `percdamps`.
    """
    scale_dtype = scale_dtype or w.dtype
    N, K = w.shape
    D = len(percdamps)
    size = K if group_size is None else group_size
    assert D >= 1 and K % size == 0 and (group_size is None or blocksize % group_size == 0), (D, K, group_size, blocksize)
    qmin, qmax = int_range(num_bits)
    params = dict(num_bits=num_bits, symmetric=symmetric, scale_dtype=scale_dtype)

    W = w.float().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    G = K // size
    scale = torch.empty(D, N, G, dtype=scale_dtype)
    zero = None if symmetric else torch.empty(D, N, G, dtype=torch.int8)
    static = group_size is None or actorder or ranges is not None
    if static:  # per-channel, act-order or given ranges: every group's scale fixed up front
        s, z = ranges if ranges is not None else int_qparams(group_view(W, group_size), **params)
        scale.copy_(s.expand(D, N, G))
        if zero is not None:
            zero.copy_(z.expand(D, N, G))

    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(K)
    W = W[:, perm].expand(D, N, K).clone()  # [D, N, K] in visiting order
    H = H[perm][:, perm]
    eye, mean_diag = torch.eye(K, dtype=H.dtype), torch.mean(torch.diag(H))
    Hinv = torch.stack([
        torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + damp * mean_diag * eye)), upper=True)
        for damp in percdamps
    ]).float()  # [D, K, K]

    columns = perm.tolist()
    Q = torch.zeros(D, N, K, dtype=torch.int8)  # in visiting order
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        diagonal = torch.diagonal(Hinv1, dim1=1, dim2=2).unsqueeze(-1)  # [D, b, 1]
        for i in range(i2 - i1):
            column = columns[i1 + i]
            g = column // size
            if not static and column % size == 0:
                # The group's scale from its columns as GPTQ has updated them so far.
                s, z = int_qparams(W1[:, :, i : i + size].reshape(D * N, 1, -1), **params)
                scale[:, :, g] = s.view(D, N)
                if zero is not None:
                    zero[:, :, g] = z.view(D, N)
            s = scale[:, :, g]
            z = zero[:, :, g].float() if zero is not None else 0.0
            q = torch.round(W1[:, :, i] / s.float() + z).clamp_(qmin, qmax)  # [D, N]
            restored = ((q - z).to(scale_dtype) * s).float()  # exactly what is stored
            Q[:, :, i1 + i] = q.to(torch.int8)
            err = (W1[:, :, i] - restored) / diagonal[:, i]
            W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, i : i + 1, i:]
            Err1[:, :, i] = err
        W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])

    q_original = torch.empty_like(Q)
    q_original[:, :, perm] = Q
    return [
        IntQuantized(q=q_original[d], scale=scale[d], zero_point=None if zero is None else zero[d], num_bits=num_bits)
        for d in range(D)
    ]


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
