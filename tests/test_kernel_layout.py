"""The kernels' layout and the M-dispatched matmul against their torch references.

The repack is exact both ways (a repacked model saves the bytes it loaded); every path of the
dispatch (GEMV, split-K `tl.dot` tiles, dequantize-to-scratch) equals the reference for every
weight format, over ragged shapes, under Triton's interpreter on CPU (`cuda` variants on a GPU);
tuned tables load and are used, defaults where they have no entry.
"""

from __future__ import annotations

import json

import pytest
import torch

from quadapt.kernels import layout, reference

from .conftest import assert_close
from .test_kernels import DEVICES, nf4_weight, packed_int_weight

pytest.importorskip("triton")
from quadapt.kernels import matmul, tuning, unpack  # after the skip: they import triton
from quadapt.kernels.tuning import Config


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("QUADAPT_KERNELS", "triton")


FORMATS = [  # (name, num_bits, K, group_size, symmetric); N is ragged below
    ("int4", 4, 96, 32, True),
    ("int4-asym", 4, 72, 24, False),  # a group that is not a power of two, K not a multiple of 64
    ("int4-odd-k", 4, 84, 42, False),  # K not a multiple of 8: the last word is part padding
    ("int8", 8, 80, None, True),  # one scale per channel
    ("int8-asym", 8, 64, 16, False),
    ("nf4", 4, 128, 64, None),
    ("nf4-32", 4, 96, 32, None),
]
PATHS = [  # (M, config): every branch of the dispatch, the defaults among them
    (1, None), (3, None), (4, Config("gemv", 4, 16, 16, split_k=3)), (2, Config("gemv", 2, 32, 64, split_k=1)),
    (6, None), (21, Config("dot", 16, 32, 32, split_k=2)), (37, Config("dot", 32, 16, 16, split_k=1)),
    (70, None), (5, Config("dequant")),
]


def kernel_weight(fmt, N, dtype, device):
    """A random weight of `fmt` in the kernels' layout, and the reference call on its standard layout."""
    name, bits, K, group, symmetric = fmt
    if name.startswith("nf4"):
        packed, absmax = nf4_weight(N, K, group, device)
        weight = layout.repack_nf4(packed, absmax, shape=(N, K), blocksize=group, dtype=dtype)
        return weight, lambda x, b: reference.qmatmul_nf4(x, packed, absmax, b, shape=(N, K), blocksize=group, dtype=dtype)
    packed, scale, zero = packed_int_weight(N, K, bits, group, symmetric, dtype, device)
    weight = layout.repack_packed_int(packed, scale, zero, num_bits=bits, in_features=K)
    return weight, lambda x, b: reference.qmatmul_packed_int(x, packed, scale, zero, b, num_bits=bits, in_features=K)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f[0])
def test_repack_is_exact_both_ways(fmt):
    name, bits, K, group, symmetric = fmt
    N = 13
    if name.startswith("nf4"):
        packed, absmax = nf4_weight(N, K, group, "cpu")
        weight = layout.repack_nf4(packed, absmax, shape=(N, K), blocksize=group, dtype=torch.float32)
        assert weight.words.shape == (-(-K // 8), N) and weight.scale.shape == (K // group, N)
        back = layout.standard_nf4(weight)
        assert torch.equal(back[0], packed) and torch.equal(back[1], absmax)
        expected = reference.dequant_nf4(packed, absmax, shape=(N, K), blocksize=group, dtype=torch.float32)
    else:
        packed, scale, zero = packed_int_weight(N, K, bits, group, symmetric, torch.float16, "cpu")
        weight = layout.repack_packed_int(packed, scale, zero, num_bits=bits, in_features=K)
        assert weight.words.shape == (packed.shape[1], N) and weight.scale.shape == (scale.shape[1], N)
        back = layout.standard_packed_int(weight)
        assert torch.equal(back[0], packed) and torch.equal(back[1], scale)
        assert (back[2] is None and zero is None) or torch.equal(back[2], zero)
        expected = reference.dequant_packed_int(packed, scale, zero, num_bits=bits, in_features=K)
    assert torch.equal(reference.dequant_weight(weight), expected)


def test_nf4_blocks_across_rows_have_no_kernel_layout():
    packed, absmax = nf4_weight(37, 96, 64, "cpu")
    assert layout.repack_nf4(packed, absmax, shape=(37, 96), blocksize=64, dtype=torch.float32) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f[0])
def test_every_path_equals_the_reference(device, dtype, fmt):
    N = 45  # not a multiple of any column block
    weight, expected = kernel_weight(fmt, N, dtype, device)
    bias = torch.randn(N, device=device).to(dtype)
    for M, config in PATHS:
        x = torch.randn(M, fmt[2], device=device).to(dtype)
        got = matmul.qlinear(x, weight, bias if M % 2 else None, config=config)
        assert got.dtype == dtype
        assert_close(got, expected(x, bias if M % 2 else None), dtype, msg=f"M={M} {config}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f[0])
def test_dequant_is_bit_exact(device, fmt):
    weight, _ = kernel_weight(fmt, 19, torch.bfloat16, device)
    expected = reference.dequant_weight(weight)
    assert torch.equal(unpack.dequant_weight(weight), expected)
    assert torch.equal(unpack.dequant_weight(weight, dtype=torch.float16), expected.to(torch.float16).t())


@pytest.mark.parametrize("device", DEVICES)
def test_split_k_workspace_is_left_zeroed(device):
    """The split-K reduction leaves its workspace and counters as it found them: the next call
    (and a CUDA graph's replay) needs no memset."""
    weight, expected = kernel_weight(FORMATS[0], 45, torch.float32, device)
    x = torch.randn(3, 96, device=device)
    for config in (Config("gemv", 4, 16, 32, split_k=3), Config("dot", 16, 16, 32, split_k=2)):
        for _ in range(2):
            assert_close(matmul.qlinear(x, weight, None, config=config), expected(x, None), torch.float32)
        space = matmul.workspace(x.device)
        assert not space.work.any() and not space.locks.any()
    # A larger problem grows the workspace; the outgrown one is kept for graphs that captured it.
    before = space.work
    big = torch.randn(4, 96, device=device)
    wide, expected_wide = kernel_weight(FORMATS[0], 45 * 64, torch.float32, device)
    assert_close(matmul.qlinear(big, wide, None, config=Config("gemv", 4, 64, 32, split_k=2)), expected_wide(big, None),
                 torch.float32)
    assert space.work.numel() >= 4 * 45 * 64 and any(t is before for t in space.outgrown)


def test_leading_dims_and_the_dispatching_op():
    from quadapt import kernels

    weight, expected = kernel_weight(FORMATS[1], 45, torch.float32, "cpu")
    x = torch.randn(2, 3, 72)
    got = kernels.qlinear(x, weight, None)
    assert got.shape == (2, 3, 45)
    assert_close(got, expected(x, None), torch.float32)
    assert_close(kernels.qlinear(x, weight, None, backend="reference"), expected(x, None), torch.float32)


def test_m_dispatch_defaults():
    assert tuning.default_config(1, 4096, 4096, 132).path == "gemv"
    assert tuning.default_config(4, 4096, 4096, 132).block_m == 4
    assert tuning.default_config(16, 4096, 4096, 132).path == "dot"
    assert tuning.default_config(256, 4096, 4096, 132).path == "dequant"
    gemv = tuning.default_config(1, 8192, 8192, 132)
    assert gemv.split_k > 1 and 8192 // gemv.block_n * gemv.split_k >= 2 * 132  # the grid fills the device
    assert [tuning.m_bucket(m) for m in (1, 3, 4, 5, 16, 17, 300, 4000)] == [1, 3, 4, 8, 16, 32, 512, 512]


def test_tuned_tables_load_and_win_over_defaults(tmp_path, monkeypatch):
    key = tuning.tuning_key(1, 45, 96, group_size=32, num_bits=4, has_zero=False, fmt=layout.INT, dtype=torch.float32)
    assert key == "m1-n45-k96-g32-int4-z0-float32"
    tuned = Config("gemv", 1, 16, 16, split_k=2, num_warps=2)
    (tmp_path / "nvidia-h200.json").write_text(tuning.table_json("NVIDIA H200", {key: tuned}))
    tables = tuning.load_tables(tmp_path)
    assert tables == {"nvidia-h200": {key: tuned}}
    assert tuning.gpu_slug("NVIDIA H200") == "nvidia-h200"
    monkeypatch.setattr(tuning, "_device_table", lambda device: tables["nvidia-h200"])
    assert tuning.config_for(key, 1, 45, 96, torch.device("cuda")) == tuned
    assert tuning.config_for(key, 1, 45, 96, torch.device("cpu")) == tuning.default_config(1, 45, 96, 4)
    assert tuning.load_tables(tuning.TUNED_DIR) == tuning.TABLES  # the package's own tables parse


def test_a_bad_tuned_table_names_the_file(tmp_path):
    (tmp_path / "gpu.json").write_text(json.dumps({"configs": {"k": {"path": "fast"}}}))
    with pytest.raises(ValueError, match="gpu.json.*python -m quadapt.kernels.tune"):
        tuning.load_tables(tmp_path)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="block_n=48 must be a power of two"):
        Config("dot", 16, 48)
    with pytest.raises(ValueError, match="path 'fast'"):
        Config("fast")


@pytest.mark.parametrize("scheme", ["int4", "int4-asym", "int8", "nf4"])
def test_a_repacked_model_saves_the_bytes_it_loaded(tmp_path, monkeypatch, scheme):
    """Loaded on Triton, every packed linear is repacked, yet its state dict holds the checkpoint's
    own bytes, and the model computes what the reference-backend model computes."""
    from quadapt.converters.convert import convert_checkpoint
    from quadapt.runtime.checkpoints import open_checkpoint
    from quadapt.runtime.checkpoints.loader import load_model
    from quadapt.runtime.model.quant import NF4Linear, PackedIntLinear

    from .test_model import save_hf_model

    _, path = save_hf_model(tmp_path, "llama", intermediate_size=128)
    checkpoint = convert_checkpoint(path, tmp_path / scheme, scheme, group_size=32 if scheme.startswith("int4") else None)
    model = load_model(checkpoint)
    packed = [m for m in model.modules() if isinstance(m, (PackedIntLinear, NF4Linear))]
    assert packed and all(m.kernel_weight is not None for m in packed)
    assert not any(name in m._buffers for m in packed for name in m._standard)  # the standard copy is gone
    monkeypatch.setenv("QUADAPT_KERNELS", "reference")
    plain = load_model(checkpoint)
    state, plain_state = model.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    on_disk = dict(open_checkpoint(checkpoint).tensors())
    # The packed words and scales as stored (a file's zero points may be packed, and NF4's absmax
    # double-quantized under bitsandbytes' names: the loader resolves those, compared above).
    shared = [k for k in state if k in on_disk and k.rpartition(".")[2] in ("weight_packed", "weight_scale")]
    assert (shared or scheme == "nf4") and all(torch.equal(state[k], on_disk[k]) for k in shared)
    ids = torch.randint(3, 256, (1, 6))
    with torch.inference_mode():
        assert_close(model(ids), plain(ids), torch.float32)


@pytest.mark.parametrize("M", [1, 3, 16, 40])
def test_every_tuning_candidate_computes_the_product(M):
    """What the tuner may pick is correct: each candidate of a small problem equals the reference."""
    from quadapt.kernels import tune

    weight, expected = kernel_weight(FORMATS[1], 45, torch.bfloat16, "cpu")
    x = torch.randn(M, 72).to(torch.bfloat16)
    found = tune.candidates(M, 45, 72, 4)
    assert found[0] == tuning.default_config(M, 45, 72, 4) and len(found) == len(set(found)) <= 60
    for config in found[:: max(1, len(found) // 6)]:  # a spread of them: the interpreter is slow
        assert_close(matmul.qlinear(x, weight, None, config=config), expected(x, None), torch.bfloat16, msg=str(config))


def test_the_tuner_needs_the_gpu_it_tunes_for():
    from quadapt.kernels import tune

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the tuner would run")
    with pytest.raises(SystemExit, match="needs the CUDA device"):
        tune.main(["--shapes", "64x64"])
    with pytest.raises(SystemExit):
        tune.main(["--shapes", "64by64"])
