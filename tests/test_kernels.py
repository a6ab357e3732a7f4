"""Triton kernels against their torch references, over ragged shapes, every weight format and dtype.

Without a GPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, set in conftest):
slow but exact, so shapes stay small. The `cuda` variants run the same checks on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from quadapt import kernels
from quadapt.kernels import reference
from quadapt.kernels import KernelBackendError

from .conftest import assert_close

pytest.importorskip("triton")
from quadapt.kernels import qmatmul  # after the skip: it imports triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("QUADAPT_KERNELS", "triton")


def packed_int_weight(N: int, K: int, num_bits: int, group_size: int | None, symmetric: bool, scale_dtype, device):
    """Random packed words (every bit pattern is a valid weight), scales and zero points."""
    words = -(-K * num_bits // 32)
    G = 1 if group_size is None else K // group_size
    packed = torch.randint(-(2**31), 2**31 - 1, (N, words), dtype=torch.int32, device=device)
    scale = (torch.rand(N, G, device=device) * 0.05 + 0.005).to(scale_dtype)
    half = 1 << (num_bits - 1)
    zero = None if symmetric else torch.randint(-half, half, (N, G), dtype=torch.int8, device=device)
    return packed, scale, zero


def nf4_weight(N: int, K: int, blocksize: int, device):
    packed = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(-(-N * K // blocksize), device=device) + 0.1
    return packed, absmax


PACKED_CASES = [  # (num_bits, K, group_size, symmetric)
    (4, 96, 32, True),
    (4, 192, 64, False),
    (4, 256, 128, True),
    (4, 384, 128, False),
    (4, 96, 48, False),  # a group size that is not a power of two: scales looked up per weight
    (8, 80, None, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 17, 70])
@pytest.mark.parametrize("num_bits, K, group_size, symmetric", PACKED_CASES)
def test_qmatmul_packed_int(device, dtype, M, num_bits, K, group_size, symmetric):
    N = 72 if M != 3 else 45  # ragged: not a multiple of the column block
    packed, scale, zero = packed_int_weight(N, K, num_bits, group_size, symmetric, dtype, device)
    x = torch.randn(M, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    got = kernels.qmatmul_packed_int(x, packed, scale, zero, bias, num_bits=num_bits, in_features=K)
    expected = reference.qmatmul_packed_int(x, packed, scale, zero, bias, num_bits=num_bits, in_features=K)
    assert got.dtype == dtype
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 5, 33])
# Rows of whole blocks (64, 160), blocks across rows (96 with 64), rows starting mid-byte (odd K).
@pytest.mark.parametrize("N, K, blocksize", [(40, 64, 64), (37, 96, 64), (24, 160, 32), (7, 33, 64)])
def test_qmatmul_nf4(device, dtype, M, N, K, blocksize):
    packed, absmax = nf4_weight(N, K, blocksize, device)
    x = torch.randn(2, M, K, device=device).to(dtype)  # leading dims are kept
    got = kernels.qmatmul_nf4(x, packed, absmax, None, shape=(N, K), blocksize=blocksize, dtype=dtype)
    expected = reference.qmatmul_nf4(x, packed, absmax, None, shape=(N, K), blocksize=blocksize, dtype=dtype)
    assert got.shape == (2, M, N)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "schedule",
    [
        qmatmul.Schedule(16, 32, 64, split_k=3),  # K splits that do not divide K evenly
        qmatmul.Schedule(1, 16, 512, split_k=2, num_warps=8),  # GEMV rows, one K block wider than K
        qmatmul.Schedule(1, 32, 64, split_k=2),  # GEMV, several K blocks per split
        qmatmul.Schedule(16, 32, 128, split_k=1),  # 16-row tiles, no split
        qmatmul.Schedule(32, 64, 32, split_k=2, num_stages=4),  # a GEMM tile with split K
    ],
    ids=str,
)
def test_qmatmul_any_schedule(device, schedule):
    """Every tiling computes the same product: the benchmark's schedule sweep relies on it."""
    N, K, M = 72, 192, 5
    packed, scale, zero = packed_int_weight(N, K, 4, 64, False, torch.bfloat16, device)
    x = torch.randn(M, K, device=device).to(torch.bfloat16)
    got = qmatmul.qmatmul_packed_int(x, packed, scale, zero, None, num_bits=4, in_features=K, schedule=schedule)
    expected = reference.qmatmul_packed_int(x, packed, scale, zero, None, num_bits=4, in_features=K)
    assert_close(got, expected, torch.bfloat16)
    packed, absmax = nf4_weight(N, K, 64, device)
    got = qmatmul.qmatmul_nf4(x, packed, absmax, None, shape=(N, K), blocksize=64, dtype=torch.bfloat16, schedule=schedule)
    expected = reference.qmatmul_nf4(x, packed, absmax, None, shape=(N, K), blocksize=64, dtype=torch.bfloat16)
    assert_close(got, expected, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_bits, K, group_size, symmetric", PACKED_CASES)
def test_dequant_packed_int_is_bit_exact(device, scale_dtype, num_bits, K, group_size, symmetric):
    packed, scale, zero = packed_int_weight(33, K, num_bits, group_size, symmetric, scale_dtype, device)
    got = kernels.dequant_packed_int(packed, scale, zero, num_bits=num_bits, in_features=K)
    assert torch.equal(got, reference.dequant_packed_int(packed, scale, zero, num_bits=num_bits, in_features=K))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, K", [(45, 128), (37, 96), (7, 33)])
def test_dequant_nf4_is_bit_exact(device, dtype, N, K):
    packed, absmax = nf4_weight(N, K, 64, device)
    got = kernels.dequant_nf4(packed, absmax, shape=(N, K), blocksize=64, dtype=dtype)
    assert torch.equal(got, reference.dequant_nf4(packed, absmax, shape=(N, K), blocksize=64, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, K, N, R", [(1, 64, 48, 8), (37, 70, 90, 12), (64, 128, 200, 16)])
def test_lora_mixed_slots(device, dtype, M, K, N, R):
    S = 4
    x, y = torch.randn(M, K, device=device).to(dtype), torch.randn(M, N, device=device).to(dtype)
    a = (torch.randn(S, R, K, device=device) * 0.1).to(dtype)
    b = (torch.randn(S, N, R, device=device) * 0.1).to(dtype)
    slots = torch.randint(-1, S, (M,), device=device)
    got = kernels.add_lora(y, x, a, b, slots)
    assert_close(got, reference.add_lora(y, x, a, b, slots), dtype)
    assert torch.equal(got[slots == -1], y[slots == -1])  # rows without an adapter are untouched


@pytest.mark.parametrize("device", DEVICES)
def test_lora_single_slot_and_none(device):
    x, y = torch.randn(5, 32, device=device), torch.randn(5, 24, device=device)
    a, b = torch.randn(3, 8, 32, device=device), torch.randn(3, 24, 8, device=device)
    assert torch.equal(kernels.add_lora(y, x, a, b, -1), y)
    assert_close(kernels.add_lora(y, x, a, b, 2), reference.add_lora(y, x, a, b, 2), torch.float32)


def test_backend_setting_is_checked(monkeypatch):
    monkeypatch.setenv("QUADAPT_KERNELS", "fast")
    with pytest.raises(KernelBackendError, match="QUADAPT_KERNELS='fast'"):
        kernels.use_triton(torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1"):
        kernels.use_triton(torch.device("cpu"))


def test_auto_picks_the_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("QUADAPT_KERNELS", "auto")
    assert not kernels.use_triton(torch.device("cpu"))


def _lora_layer(device: str, num_slots: int = 4):
    from quadapt.runtime.model.lora import LoRALinear, LoRAWeights, SlotMapping

    base = torch.nn.Linear(48, 40, device=device)
    mapping = SlotMapping(num_slots)
    layer = LoRALinear(base, mapping, max_rank=8, device=device)
    adapters = [
        LoRAWeights(torch.randn(r, 48, device=device), torch.randn(40, r, device=device), alpha=2.0 * r)
        for r in (4, 8, 6, 5)
    ]
    for slot, weights in enumerate(adapters[:3]):
        layer.set_slot(slot, weights)
    return layer, mapping, adapters


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_adapter_batch_equals_each_row_alone(device):
    layer, mapping, _ = _lora_layer(device)
    x = torch.randn(7, 48, device=device)
    slots = torch.tensor([0, 2, -1, 1, 1, -1, 0], device=device)
    mapping.set(slots)
    batch = layer(x)
    for row, slot in enumerate(slots.tolist()):
        mapping.set(slot)
        assert_close(batch[row : row + 1], layer(x[row : row + 1]), torch.float32, msg=f"row {row} slot {slot}")


@pytest.mark.parametrize("device", DEVICES)
def test_swapping_one_slot_leaves_the_others(device):
    layer, mapping, adapters = _lora_layer(device)
    x = torch.randn(6, 48, device=device)
    slots = torch.tensor([0, 1, 2, -1, 2, 0], device=device)
    mapping.set(slots)
    before = layer(x)
    layer.set_slot(1, adapters[3])  # a new adapter into slot 1 while 0 and 2 stay in use
    after = layer(x)
    untouched = slots != 1
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.allclose(after[~untouched], before[~untouched])
    mapping.set(1)
    assert_close(after[~untouched], layer(x[~untouched]), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 9, 150])  # per-token gathers for decode batches, slot groups above 128 tokens
def test_lora_adds_in_place(device, dtype, M):
    S, K, N, R = 3, 40, 70, 12
    x, y = torch.randn(M, K, device=device).to(dtype), torch.randn(M, N, device=device).to(dtype)
    a = (torch.randn(S, R, K, device=device) * 0.1).to(dtype)
    b = (torch.randn(S, N, R, device=device) * 0.1).to(dtype)
    slots = torch.randint(-1, S, (M,), device=device)
    slots[0] = -1  # a row without an adapter, whatever the draw
    expected = reference.add_lora(y, x, a, b, slots)
    out = y.clone()
    assert kernels.add_lora_(out, x, a, b, slots) is out
    assert_close(out, expected, dtype)
    assert torch.equal(out[slots == -1], y[slots == -1])
    ref_out = y.clone()
    assert reference.add_lora_(ref_out, x, a, b, slots) is ref_out and torch.equal(ref_out, expected)
