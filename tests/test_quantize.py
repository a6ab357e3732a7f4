"""The quantization algorithms on tensors: NF4 against bitsandbytes byte for byte, packing against
compressed-tensors bit for bit, and quality (SQNR per scheme, MSE search, GPTQ) by thresholds."""

from __future__ import annotations

import pytest
import torch

from quadapt.converters.formats import pack_int32
from quadapt.converters.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_dampings
from quadapt.converters.quantize import (
    dynamic_map,
    int_range,
    quantize_blockwise_8bit,
    quantize_int,
    quantize_nf4,
    sqnr_db,
)
from quadapt.kernels.reference import dequant_nf4, dequant_packed_int, unpack_int32

bnb_functional = pytest.importorskip("bitsandbytes.functional")

# Odd shapes on purpose: a short last NF4 block, an odd element count, more than 256 blocks.
NF4_SHAPES = [(96, 576), (64, 64), (33, 64), (7, 9), (3, 5), (300, 128)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gaussian(shape: tuple[int, int], seed: int = 0, std: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


@pytest.mark.parametrize("shape", NF4_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_is_byte_identical_to_bitsandbytes(shape, dtype):
    w = (gaussian(shape, seed=shape[0]) * 10 ** torch.empty(1).uniform_(-3, 1).item()).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    assert torch.equal(ours.offset, state.offset)
    assert ours.dtype == state.dtype and ours.shape == tuple(state.shape)
    # ... and dequantizes to exactly what bitsandbytes dequantizes.
    expected = bnb_functional.dequantize_4bit(packed, state)
    actual = dequant_nf4(ours.packed, ours.float_absmax(), shape=shape, blocksize=64, dtype=dtype)
    assert torch.equal(actual, expected)


def test_dynamic_map_and_blockwise_8bit_match_bitsandbytes():
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())
    for seed, n in enumerate([256 * 8, 256 * 3 + 17, 5]):
        values = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        q, state = bnb_functional.quantize_blockwise(values, blocksize=256)
        absmax = state.absmax
        ours_q, ours_absmax = quantize_blockwise_8bit(values, dynamic_map(), 256)
        assert torch.equal(ours_q, q) and torch.equal(ours_absmax, absmax)


def test_nf4_of_an_all_zero_weight_is_zero():
    ours = quantize_nf4(torch.zeros(4, 64))
    restored = dequant_nf4(ours.packed, ours.float_absmax(), shape=(4, 64), blocksize=64, dtype=torch.float32)
    assert torch.equal(restored, torch.zeros(4, 64))


@pytest.mark.parametrize("num_bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_bit_identical_to_compressed_tensors(num_bits, dim):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    qmin, qmax = int_range(num_bits)
    values = torch.randint(qmin, qmax + 1, (13, 37), dtype=torch.int8)  # 37: a part-filled last word
    ours = pack_int32(values, num_bits, dim=dim)
    assert torch.equal(ours, helpers.pack_to_int32(values, num_bits, packed_dim=dim))
    if dim == 1:
        assert torch.equal(unpack_int32(ours, num_bits, 37), values)


# Thresholds on N(0, 0.02^2) weights [256, 512] (measured: int8 42.6, int4 g32 20.5, g64 19.8,
# g128 19.1 dB; asymmetric about 1 dB more; nf4 20.7); a regression loses more than the margin.
SQNR_FLOOR = {
    ("int8", None): 41.0,
    ("int4", 32): 19.8, ("int4", 64): 19.0, ("int4", 128): 18.4,
    ("int4-asym", 32): 21.0, ("int4-asym", 64): 20.0, ("int4-asym", 128): 19.2,
}


@pytest.mark.parametrize("scheme,group_size", list(SQNR_FLOOR), ids=lambda v: str(v))
def test_sqnr_per_scheme(scheme, group_size):
    w = gaussian((256, 512))
    quantized = quantize_int(w, num_bits=8 if scheme == "int8" else 4, group_size=group_size, symmetric=scheme != "int4-asym")
    assert sqnr_db(w, quantized.dequantize()) >= SQNR_FLOOR[(scheme, group_size)]


def test_sqnr_nf4():
    w = gaussian((256, 512))
    ours = quantize_nf4(w)
    restored = dequant_nf4(ours.packed, ours.float_absmax(), shape=(256, 512), blocksize=64, dtype=torch.float32)
    assert sqnr_db(w, restored) >= 20.0


@pytest.mark.parametrize(
    "num_bits,group_size,symmetric,scale_dtype",
    [(4, 32, True, torch.float32), (4, 64, True, torch.bfloat16), (4, 32, False, torch.float32),
     (4, 128, False, torch.bfloat16), (8, None, True, torch.float32)],
)
def test_mse_search_is_never_worse_than_minmax(num_bits, group_size, symmetric, scale_dtype):
    # Heavy tails (Student t) are where the search pays; no group's objective may grow. The
    # objectives weight the squared error by |w| (symmetric) or w^2 (asymmetric).
    w = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02
    params = {"num_bits": num_bits, "group_size": group_size, "symmetric": symmetric, "scale_dtype": scale_dtype}
    minmax, mse = quantize_int(w, **params), quantize_int(w, mse=True, **params)
    size = 256 if group_size is None else group_size
    weights = w.abs() if symmetric else w.pow(2)

    def group_objective(q):
        return ((q.dequantize().float() - w).pow(2) * weights).reshape(128, -1, size).sum(-1)

    assert bool((group_objective(mse) <= group_objective(minmax)).all())
    if num_bits == 8 and symmetric:  # symmetric 8-bit keeps min-max
        assert torch.equal(mse.q, minmax.q) and torch.equal(mse.scale, minmax.scale)
    if num_bits == 4:
        gain = 10 * torch.log10(group_objective(minmax).sum() / group_objective(mse).sum())
        assert gain > 0.3


def test_symmetric_mse_search_puts_the_peak_on_the_extra_code():
    """A group on the grid q * s whose largest magnitude is positive and uses all 16 codes
    (-7 s ... 8 s): min-max stretches the scale to 8 s / 7.5, while the search finds the grid
    exactly with a negative scale (the peak at code -8), which dequantizes as w = q * s too."""
    s = 0.01
    w = (torch.arange(-7, 9, dtype=torch.float32).repeat(2) * s)[torch.randperm(32)].reshape(1, 32)
    minmax = quantize_int(w, num_bits=4, group_size=32, symmetric=True)
    mse = quantize_int(w, num_bits=4, group_size=32, symmetric=True, mse=True)
    assert minmax.scale[0, 0].item() == pytest.approx(8 * s / 7.5)
    assert not torch.allclose(minmax.dequantize(), w, atol=1e-6)
    assert mse.scale[0, 0].item() == pytest.approx(-s, rel=1e-5)
    assert int(mse.q.min()) == -8 and int(mse.q.max()) == 7
    assert torch.allclose(mse.dequantize(), w, atol=1e-6)
    # An all-zero group keeps min-max's scale and stays exactly zero.
    zero = quantize_int(torch.zeros(1, 32), num_bits=4, group_size=32, symmetric=True, mse=True)
    assert bool((zero.dequantize() == 0).all()) and bool((zero.scale > 0).all())


def test_asymmetric_mse_search_recovers_a_grid_min_max_misses():
    """A group on the grid (q - z) * s that never uses its top code: min-max stretches the scale to
    15 steps over a 14-step span and misses every point; the search finds s and z exactly."""
    s, z = 0.01, -3
    q = torch.arange(-8, 7).repeat(3)[:32]  # codes -8 ... 6; 7 unused
    w = ((q - z) * s).reshape(1, 32)
    minmax = quantize_int(w, num_bits=4, group_size=32, symmetric=False)
    mse = quantize_int(w, num_bits=4, group_size=32, symmetric=False, mse=True)
    assert (minmax.dequantize() - w).abs().max() > 1e-3
    assert mse.scale[0, 0].item() == pytest.approx(s, rel=1e-5)
    assert mse.zero_point is not None and mse.zero_point[0, 0].item() == z
    assert torch.allclose(mse.dequantize(), w, atol=1e-6)


def test_asymmetric_mse_search_keeps_zero_points_in_range():
    # One-signed, all-zero and constant groups are the edges of the refit (m pinned to 0, singular fits).
    w = torch.distributions.StudentT(3.0).sample((16, 128)) * 0.02
    w[0] = w[0].abs() + 0.05
    w[1] = -w[1].abs() - 0.05
    w[2] = 0.0
    w[3, :32] = 0.03
    qmin, qmax = int_range(4)
    for scale_dtype in (torch.float32, torch.bfloat16, torch.float16):
        mse = quantize_int(w, num_bits=4, group_size=32, symmetric=False, mse=True, scale_dtype=scale_dtype)
        assert mse.zero_point is not None and mse.zero_point.dtype == torch.int8
        assert int(mse.zero_point.min()) >= qmin and int(mse.zero_point.max()) <= qmax
        assert bool((mse.scale > 0).all()) and torch.isfinite(mse.dequantize()).all()
        assert bool((mse.dequantize()[2] == 0).all())
        assert sqnr_db(w, mse.dequantize()) > 18.0


def test_int_quantization_conventions():
    """Symmetric int4: scale = max|w| / 7.5, q in [-8, 7]; an all-zero group gets a tiny finite scale."""
    w = torch.tensor([[0.75, -0.75, 0.1, 0.0] + [0.0] * 28, [0.0] * 32])
    quantized = quantize_int(w, num_bits=4, group_size=32, symmetric=True)
    assert quantized.scale[0, 0] == pytest.approx(0.1)
    assert quantized.q[0, :3].tolist() == [7, -8, 1]  # 7.5 clamps to 7; -7.5 rounds half to even
    assert torch.isfinite(quantized.scale).all() and bool((quantized.q[1] == 0).all())
    asym = quantize_int(w, num_bits=4, group_size=32, symmetric=False)
    assert asym.zero_point is not None and asym.zero_point.dtype == torch.int8
    assert torch.allclose(asym.dequantize()[0, :2], torch.tensor([0.75, -0.75]), atol=0.06)


def test_scales_in_bfloat16_round_trip_through_the_reference_dequant():
    w = gaussian((64, 128)).bfloat16()
    quantized = quantize_int(w, num_bits=4, group_size=64, symmetric=False)
    assert quantized.scale.dtype == torch.bfloat16
    packed = pack_int32(quantized.q, 4)
    zero = quantized.zero_point
    assert torch.equal(dequant_packed_int(packed, quantized.scale, zero, num_bits=4, in_features=128), quantized.dequantize())


def correlated_inputs(k: int, n: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.1 + torch.eye(k))


def test_hessian_without_first_tokens_equals_one_fed_the_rest():
    x = correlated_inputs(256, n=3 * 64).reshape(3, 64, 256)
    x[:, 0] *= 100.0  # an attention sink: it dominates H and mean |x|
    stats = HessianAccumulator(256, first_tokens=False)
    stats.add(x[:2])
    stats.add(x[2:])
    rest = HessianAccumulator(256)
    rest.add(x[:, 1:].reshape(-1, 256))
    assert stats.count == 3 * 63
    assert torch.allclose(stats.value(), rest.value()) and torch.allclose(stats.mean_abs(), rest.mean_abs())
    everything = HessianAccumulator(256)
    everything.add(x)
    assert not torch.allclose(everything.value(), rest.value(), rtol=0.5)  # the sink does weigh
    with pytest.raises(ValueError, match=r"\[B, T, K\] sequences"):
        stats.add(x[0])  # rows: which are first tokens is unknown


@pytest.mark.parametrize("num_bits,group_size,actorder", [(4, 32, False), (4, 128, True), (8, None, False), (4, 64, True)])
def test_gptq_has_lower_layer_output_error_than_rtn(num_bits, group_size, actorder):
    w = gaussian((128, 256))
    x = correlated_inputs(256)
    hessian = HessianAccumulator(256)
    hessian.add(x[:1024])
    hessian.add(x[1024:])  # accumulation over batches equals one pass
    expected = HessianAccumulator(256)
    expected.add(x)
    assert torch.allclose(hessian.value(), expected.value())

    rtn = quantize_int(w, num_bits=num_bits, group_size=group_size, symmetric=True)
    gptq = gptq_quantize(w, hessian.value(), num_bits=num_bits, group_size=group_size, symmetric=True, actorder=actorder)

    def output_error(q):
        return float((x @ (w - q.dequantize()).T).pow(2).mean())

    assert output_error(gptq) < 0.7 * output_error(rtn)
    assert gptq.q.dtype == torch.int8 and gptq.scale.shape == rtn.scale.shape


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_keeps_given_ranges_and_beats_their_rounding(symmetric):
    """Ranges from the MSE search, fixed up front: GPTQ stores exactly those scales (and zero
    points) and has less output error than rounding with them."""
    w = gaussian((128, 256))
    x = correlated_inputs(256)
    hessian = HessianAccumulator(256)
    hessian.add(x)
    mse = quantize_int(w, num_bits=4, group_size=64, symmetric=symmetric, mse=True)
    for actorder in (False, True):
        gptq = gptq_quantize(
            w, hessian.value(), num_bits=4, group_size=64, symmetric=symmetric, actorder=actorder,
            ranges=(mse.scale, mse.zero_point),
        )
        assert torch.equal(gptq.scale, mse.scale)
        assert (gptq.zero_point is None) == symmetric
        if not symmetric:
            assert torch.equal(gptq.zero_point, mse.zero_point)
        error = float((x @ (w - gptq.dequantize()).T).pow(2).mean())
        assert error < 0.7 * float((x @ (w - mse.dequantize()).T).pow(2).mean())


def test_gptq_tolerates_dead_inputs():
    """An input feature that is always 0 (zero Hessian row) must not break the Cholesky factorization."""
    x = correlated_inputs(64, 512)
    x[:, 5] = 0
    hessian = HessianAccumulator(64)
    hessian.add(x)
    quantized = gptq_quantize(gaussian((32, 64)), hessian.value(), num_bits=4, group_size=32, symmetric=False)
    assert torch.isfinite(quantized.dequantize()).all()


@pytest.mark.parametrize("symmetric,actorder", [(True, True), (False, False)])
def test_gptq_at_several_dampings_equals_each_alone_and_rows_stack(symmetric, actorder):
    """One pass at several dampings gives each damping's result exactly, and linears reading one
    input, stacked by rows, give each linear's own result (GPTQ's rows are independent given H)."""
    x = correlated_inputs(256)
    hessian = HessianAccumulator(256)
    hessian.add(x)
    w, other = gaussian((64, 256)), gaussian((32, 256)) * 3.0
    mse, other_mse = (quantize_int(m, num_bits=4, group_size=64, symmetric=symmetric, mse=True) for m in (w, other))
    dampings = (0.01, 0.1)
    both = gptq_quantize_dampings(w, hessian.value(), dampings, num_bits=4, group_size=64, symmetric=symmetric,
                                  actorder=actorder, ranges=(mse.scale, mse.zero_point))
    zeros = None if symmetric else torch.cat([mse.zero_point, other_mse.zero_point])
    stacked = gptq_quantize_dampings(
        torch.cat([w, other]), hessian.value(), dampings, num_bits=4, group_size=64, symmetric=symmetric,
        actorder=actorder, ranges=(torch.cat([mse.scale, other_mse.scale]), zeros),
    )
    for damp, together, rows in zip(dampings, both, stacked):
        for matrix, ranges, part in ((w, mse, slice(0, 64)), (other, other_mse, slice(64, 96))):
            alone = gptq_quantize(matrix, hessian.value(), num_bits=4, group_size=64, symmetric=symmetric,
                                  actorder=actorder, percdamp=damp, ranges=(ranges.scale, ranges.zero_point))
            assert torch.equal(rows.q[part], alone.q) and torch.equal(rows.scale[part], alone.scale)
            if matrix is w:
                assert torch.equal(together.q, alone.q) and torch.equal(together.scale, alone.scale)
    assert not torch.equal(both[0].q, both[1].q)  # the dampings do differ


def test_hessian_with_float32_products_matches_float64():
    x = correlated_inputs(256).reshape(4, 512, 256)
    x[:, 0] *= 100.0  # an attention sink's magnitude
    exact, fast = HessianAccumulator(256), HessianAccumulator(256, product_dtype=torch.float32)
    for part in x:
        exact.add(part)
        fast.add(part)
    assert fast.value().dtype == torch.float64
    relative = (fast.value() - exact.value()).abs().max() / exact.value().abs().max()
    assert relative < 1e-6, relative
    assert torch.allclose(fast.mean_abs(), exact.mean_abs(), rtol=1e-6)
