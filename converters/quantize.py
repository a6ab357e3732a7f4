"""Weight quantization algorithms on one float matrix: round-to-nearest int, MSE search, NF4.

- `quantize_int`: int4 / int8, symmetric or asymmetric, group-wise or per output channel, with
  min-max ranges (plain round-to-nearest, "RTN") or an MSE search per group. The conventions are
  compressed-tensors' (llm-compressor's min-max observer): the range always holds 0; symmetric
  scale = max|w| / ((qmax - qmin) / 2); asymmetric scale = (max - min) / (qmax - qmin) with an
  integer zero point; q = clamp(round(w / s + z), qmin, qmax); w = (q - z) * s. The MSE search
  refits a group's scale (and zero point) by weighted least squares over candidate codes (see
  `quantize_int`).
- `quantize_nf4`: bitsandbytes' NF4 with double quantization, byte for byte what
  `bitsandbytes.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
  quant_type="nf4")` returns on CPU, computed here in torch without bitsandbytes.

GPTQ lives in `gptq.py` and reuses `int_qparams`. This file does not pack bits, name tensors or
write files (`formats.py` does); it works on tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.reference import nf4_code
from ..runtime.checkpoints.quantized import resolve_nested_absmax

NF4_BLOCKSIZE = 64  # bitsandbytes' default, which transformers uses
NF4_NESTED_BLOCKSIZE = 256  # the only nested block size bitsandbytes' fused kernels read
# Symmetric MSE search: offsets t of the inverse scale (2^(b-1) + t) / |peak| from which candidate
# codes are drawn, the group's largest-magnitude weight (its peak) landing near the code -2^(b-1);
# llama.cpp's `make_qx_quants` grid.
MSE_SYM_STEPS: tuple[float, ...] = tuple(-0.9 + 0.1 * i for i in range(19))  # -0.9 ... 0.9
# Asymmetric MSE search: offsets t of the inverse scale (qmax - qmin + t) / (max - min) from which
# candidate codes are drawn, llama.cpp's `make_qkx2_quants` grid for its 4-bit k-quants.
MSE_ASYM_STEPS: tuple[float, ...] = tuple(-1.0 + 0.1 * i for i in range(21))  # -1.0 ... 1.0


def scale_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype scales are stored in: the weight's, as compressed-tensors does (bf16 for others)."""
    return weight.dtype if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


@dataclass(frozen=True)
class IntQuantized:
    """An integer-quantized matrix W [N, K] ~ (q - zero_point) * scale, group by group.

    Attributes:
        q: int8 [N, K], values in [-2^(num_bits-1), 2^(num_bits-1) - 1].
        scale: [N, G] in the weight's storage dtype; G = K / group_size, or 1 per channel.
        zero_point: int8 [N, G] when asymmetric, else None.
        num_bits: 4 or 8.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    num_bits: int

    @property
    def group_size(self) -> int | None:
        """Input features per scale, or None when there is one scale per output channel."""
        groups = self.scale.shape[1]
        return None if groups == 1 else self.q.shape[1] // groups

    def dequantize(self) -> torch.Tensor:
        """W [N, K] in the scale's dtype, computed as compressed-tensors decompresses it."""
        N, K = self.q.shape
        G = self.scale.shape[1]
        w = self.q.view(N, G, K // G).to(self.scale.dtype)
        if self.zero_point is not None:
            w = w - self.zero_point.to(self.scale.dtype).unsqueeze(-1)
        return (w * self.scale.unsqueeze(-1)).reshape(N, K)


def int_range(num_bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed `num_bits` integer."""
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


def int_qparams(
    groups: torch.Tensor,
    *,
    num_bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    shrink: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of each group from its min-max range, shrunk by `shrink`.

    Args:
        groups: float [..., group] weights, one row per group.
        num_bits: 4 or 8.
        symmetric: no zero point when True.
        scale_dtype: dtype the scale is stored in; the zero point is computed from the stored value.
        shrink: factor (scalar or [...]) applied to the range before the scale is derived.

    Returns:
        (scale [...] in `scale_dtype`, zero point int8 [...] or None).
    """
    qmin, qmax = int_range(num_bits)
    lo = groups.amin(dim=-1).clamp(max=0) * shrink  # the range holds 0, so 0 is exact
    hi = groups.amax(dim=-1).clamp(min=0) * shrink
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.to(scale_dtype)
    # An all-zero group: any positive scale reproduces it; use eps as compressed-tensors does.
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale)
    if symmetric:
        return scale, None
    zero = torch.round(qmin - lo / scale.float()).clamp(qmin, qmax).to(torch.int8)
    return scale, zero


def quantize_groups(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, num_bits: int
) -> torch.Tensor:
    """q = clamp(round(w / s + z)) for groups [..., group] with scales [...]; int8."""
    qmin, qmax = int_range(num_bits)
    x = groups / scale.float().unsqueeze(-1)
    if zero is not None:
        x = x + zero.float().unsqueeze(-1)
    return torch.round(x).clamp(qmin, qmax).to(torch.int8)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(q - z) * s in the scale's dtype, returned in float32, for codes [..., group]."""
    w = q.to(scale.dtype)
    if zero is not None:
        w = w - zero.to(scale.dtype).unsqueeze(-1)
    return (w * scale.unsqueeze(-1)).float()


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """W [N, K] as float32 groups [N, G, group] (G = 1 per channel)."""
    N, K = w.shape
    size = K if group_size is None else group_size
    assert K % size == 0, (K, size)
    return w.float().reshape(N, K // size, size)


def quantize_int(
    w: torch.Tensor,
    *,
    num_bits: int,
    group_size: int | None,
    symmetric: bool,
    mse: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> IntQuantized:
    """Round-to-nearest integer quantization of W [N, K], optionally with an MSE search per group.

    The symmetric search (`_fit_symmetric`) and the asymmetric one (`_fit_asymmetric`) draw
    candidate codes from a grid of scales and refit the scale (and zero point) to them by least
    squares, weighting each weight's squared error by its magnitude (|w| symmetric, w^2
    asymmetric) so that a group's extremes are not clipped to fit its many small weights: with
    the plain squared error a range search clipped so much that int4 group 64 scored worse than
    min-max on held-out text. Both measure the error on what is stored (the scale in
    `scale_dtype`, the integer zero point) and start from min-max, keeping it on ties, so neither
    does worse than min-max under its own objective. Symmetric 8-bit keeps min-max: with 255
    codes a channel's rounding error is already small, and on text outside `docs/quality.md`'s
    report the search moved SmolLM2's perplexity by under 0.6%, up on one text and down on the
    other, so it has shown nothing to pay for a change.

    Args:
        w: the float weight [N, K]; K must be a multiple of `group_size`.
        num_bits: 4 or 8.
        group_size: input features per scale, or None for one scale per output channel.
        symmetric: zero points absent when True.
        mse: search each group's range as above (not for 8 bits symmetric); else plain min-max.
        scale_dtype: dtype of the stored scales; defaults to w's dtype.

    Returns:
        The quantized matrix.
    """
    scale_dtype = scale_dtype or w.dtype
    groups = group_view(w, group_size)  # [N, G, group]
    params = {"num_bits": num_bits, "symmetric": symmetric, "scale_dtype": scale_dtype}
    scale, zero = int_qparams(groups, **params)
    if mse and not symmetric:
        scale, zero = _fit_asymmetric(groups, scale, zero, num_bits)
    elif mse and num_bits < 8:
        scale = _fit_symmetric(groups, scale, num_bits)
    q = quantize_groups(groups, scale, zero, num_bits)
    return IntQuantized(q=q.reshape(w.shape), scale=scale, zero_point=zero, num_bits=num_bits)


def _squared_error(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, num_bits: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of (weighted) squared errors [N, G] of each group after quantize-dequantize."""
    restored = dequantize_groups(quantize_groups(groups, scale, zero, num_bits), scale, zero)
    err = (restored - groups).pow(2)
    return (err if weights is None else err * weights).sum(dim=-1)


def _fit_symmetric(groups: torch.Tensor, scale: torch.Tensor, num_bits: int) -> torch.Tensor:
    """The symmetric MSE search, after llama.cpp's `make_qx_quants`, from the min-max scale.

    Min-max puts a group's largest magnitude at 2^(b-1) - 1/2 codes from 0, so its codes span
    [-7.5, 7.5] of int4's [-8, 7], and the peak's side loses half a step. Here, for each inverse
    scale -(2^(b-1) + t) / peak, t in `MSE_SYM_STEPS` (peak: the group's weight of largest
    magnitude, with its sign), the codes L = round(w * inverse scale) in [qmin, qmax] are fixed,
    so the peak lands near -2^(b-1), the side with the extra code, and the scale s = sum(|w| w L)
    / sum(|w| L^2) minimises sum(|w| (w - s L)^2). A peak that is positive so gets a negative
    scale: w = q * s holds whatever its sign, and compressed-tensors, transformers and the
    kernels compute exactly that. The codes are then recomputed from the stored scale, and the
    scale with the least weighted error wins. The |w| weighting was chosen over w^2 (the
    asymmetric search's) and over the plain squared error on text outside `docs/quality.md`'s
    report (see there).

    Returns:
        The scales [N, G] in `scale`'s dtype.
    """
    qmin, qmax = int_range(num_bits)
    values = groups.float()
    weights = values.abs()
    best = _squared_error(groups, scale, None, num_bits, weights)
    peak = values.gather(-1, weights.argmax(dim=-1, keepdim=True))
    peak = torch.where(peak != 0, peak, 1.0)  # an all-zero group: every candidate is rejected below
    for step in MSE_SYM_STEPS:
        codes = torch.round(values * ((qmin - step) / peak)).clamp(qmin, qmax)
        fitted = (weights * values * codes).sum(-1) / (weights * codes * codes).sum(-1)
        s = torch.where(torch.isfinite(fitted), fitted, 1.0).to(scale.dtype)
        valid = torch.isfinite(fitted) & (s != 0)  # no codes, or a scale the storage dtype flushes to 0
        s = torch.where(valid, s, scale)
        err = _squared_error(groups, s, None, num_bits, weights)
        better = valid & (err < best)  # strict: a tie keeps min-max
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
    return scale


def _fit_asymmetric(
    groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, num_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric MSE search, after llama.cpp's `make_qkx2_quants`, from min-max (scale, zero).

    For each inverse scale (qmax - qmin + t) / (max - min), t in `MSE_ASYM_STEPS`, the codes
    L = round((w - min) * inverse scale) in [0, qmax - qmin] are fixed and the scale a and offset m
    of w ~ a L + m are solved by least squares weighted by w^2 (m <= 0, so the grid can hold 0).
    The zero point z = round(qmin - m / a), with a as stored, is then an integer in [qmin, qmax]
    and the codes are recomputed from the stored pair; the pair with the least weighted error wins.

    Returns:
        (scale [N, G] in `scale`'s dtype, zero point int8 [N, G]).
    """
    qmin, qmax = int_range(num_bits)
    levels = qmax - qmin
    weights = groups.pow(2)  # magnitude weighting: a large weight's error costs more
    best = _squared_error(groups, scale, zero, num_bits, weights)
    lo = groups.amin(dim=-1, keepdim=True).clamp(max=0)
    span = groups.amax(dim=-1, keepdim=True).clamp(min=0) - lo
    span = torch.where(span > 0, span, 1.0)  # an all-zero group: every candidate is rejected below
    sum_w, sum_wx = weights.sum(-1), (weights * groups).sum(-1)
    for step in MSE_ASYM_STEPS:
        codes = torch.round((groups - lo) * ((levels + step) / span)).clamp(0, levels)
        sum_wl, sum_wll = (weights * codes).sum(-1), (weights * codes * codes).sum(-1)
        sum_wxl = (weights * groups * codes).sum(-1)
        det = sum_w * sum_wll - sum_wl * sum_wl
        a = (sum_w * sum_wxl - sum_wx * sum_wl) / det
        m = (sum_wll * sum_wx - sum_wl * sum_wxl) / det
        # An offset above 0 would leave 0 off the grid: pin it to 0 and refit the scale alone.
        a = torch.where(m > 0, sum_wxl / sum_wll, a)
        m = m.clamp(max=0)
        valid = torch.isfinite(a) & torch.isfinite(m) & (a > 0)  # a singular fit is no candidate
        s = torch.where(valid, a, 1.0).to(scale.dtype)
        valid &= s > 0  # a scale too small for the storage dtype underflows to 0
        s, m = torch.where(valid, s, scale), torch.where(valid, m, 0.0)
        z = torch.round(qmin - m / s.float()).clamp(qmin, qmax).to(torch.int8)
        err = _squared_error(groups, s, z, num_bits, weights)
        better = valid & (err < best)  # strict: a tie keeps min-max
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


@dataclass(frozen=True)
class NF4Quantized:
    """An NF4 matrix with double-quantized block scales, as bitsandbytes' QuantState holds it.

    Attributes:
        packed: uint8 [ceil(n/2), 1], two codes a byte, the first in the high nibble.
        absmax: uint8 [n_blocks], indices into `nested_code` (absmax - offset, quantized).
        nested_absmax: float32 [ceil(n_blocks / 256)], the scale of each 256 absmax values.
        nested_code: float32 [256], bitsandbytes' signed dynamic 8-bit map.
        offset: float32 scalar tensor, the mean absmax subtracted before nesting.
        shape: (N, K).
        dtype: the source weight's dtype (what dequantization returns).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor
    nested_code: torch.Tensor
    offset: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int = NF4_BLOCKSIZE
    nested_blocksize: int = NF4_NESTED_BLOCKSIZE

    def float_absmax(self) -> torch.Tensor:
        """The float32 block scales, resolved as bitsandbytes dequantizes them."""
        return resolve_nested_absmax(self.absmax, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`): 256 sorted float32 values.

    Each of 7 decades 10^-6 ... 10^0 holds 2^i values (i = 0..6), the means of a linear split of
    [0.1, 1] scaled to the decade, mirrored negative; plus 0 and 1.0.
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def _code_lookup_table(code: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """uint8 [size]: for each of `size` evenly spaced points of [-1, 1], the nearest code index.

    bitsandbytes' CPU `quantize_blockwise` rounds through this table rather than to the exact
    nearest code, so to match its bytes we must too.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(size, dtype=torch.float32)) / (size - 1)
    return torch.searchsorted(midpoints, points, side="left").to(torch.uint8)


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU blockwise 8-bit quantization of a 1-D float32 tensor against `code`.

    Returns:
        (indices uint8 [n], absmax float32 [n_blocks]).
    """
    n = values.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax == 0, 0.0, 1.0 / absmax)  # a zero block: no NaN from 0 * inf
    normed = (padded * inverse.unsqueeze(1)).clamp(-1.0, 1.0)
    # The table index rounds ((v + 1) / 2) * 65535 to nearest, one float32 step at a time.
    index = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    q = _code_lookup_table(code)[index]
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)  # a zero block stores code 0
    return q.reshape(-1)[:n], absmax


def quantize_nf4(w: torch.Tensor) -> NF4Quantized:
    """NF4 with double quantization, block 64, nested block 256 (the QLoRA recipe).

    Args:
        w: the weight [N, K] in float32, bfloat16 or float16.

    Returns:
        Byte-identical to bitsandbytes' `quantize_4bit(w, blocksize=64, compress_statistics=True,
        quant_type="nf4")` on CPU: packed weight, quantized absmax, nested absmax, offset.
    """
    flat = w.reshape(-1).float()
    n = flat.numel()
    blocksize = NF4_BLOCKSIZE
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:  # bitsandbytes divides the short last block rather than multiplying
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat((absmax, last.unsqueeze(0)))
        scaled = torch.cat((scaled, torch.clamp(flat[full:] / last, -1, 1)))
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    code = nf4_code()
    codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)

    offset = absmax.mean()
    nested = dynamic_map()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested, NF4_NESTED_BLOCKSIZE)
    return NF4Quantized(
        packed=packed, absmax=qabsmax, nested_absmax=nested_absmax, nested_code=nested,
        offset=offset, shape=(w.shape[0], w.shape[1]), dtype=w.dtype,
    )


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|ref|^2 / |ref - approx|^2), in dB."""
    ref = reference.double()
    noise = (ref - approximation.double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
