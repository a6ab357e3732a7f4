"""Calibrated quantization that holds on text the calibration never saw: GPTQ and AWQ on tiny models.

The regression this guards: GPTQ fitted to one text made every other text worse than plain
rounding. Here a tiny random Llama is calibrated on one kind of text (verse drama) and scored on
another (the Python language reference) against its float self; each calibrated method must do
at least as well as round-to-nearest there. Also: the per-linear check rejects an overfitted GPTQ
result, the AWQ output is plain compressed-tensors that transformers loads, the default
calibration set needs nothing from the user, and too few tokens for a layer's width is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from quadapt.converters.awq import search_clip
from quadapt.converters.calibrate import LayerStats
from quadapt.converters.calibrated import gptq_layer
from quadapt.converters.convert import MANIFEST_FILE, convert_checkpoint
from quadapt.converters.gptq import HessianAccumulator, gptq_quantize, output_error
from quadapt.converters.plan import Plan
from quadapt.converters.quantize import quantize_int
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama (inputs 64 and 128 wide) with a ChatML tokenizer beside its weights."""
    _, path = save_hf_model(tmp_path_factory.mktemp("quality"), "llama", vocab_size=512, intermediate_size=128)
    return build_chatml_dir(path)


@pytest.fixture(scope="module")
def verse(tmp_path_factory) -> Path:
    """One kind of text to calibrate on: about 3,000 tiny-tokenizer tokens of verse drama."""
    path = tmp_path_factory.mktemp("calib") / "verse.txt"
    path.write_text((DATA / "coriolanus_calib.txt").read_text()[:4000])
    return path


def logit_error(path: Path, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((load_model(path)(ids) - reference).pow(2).mean())


def test_calibrating_on_one_text_does_not_hurt_another(source, verse, tmp_path):
    """Calibrated on verse, scored on the Python reference: GPTQ and AWQ are no worse than RTN there."""
    text = (DATA / "python_reference.txt").read_text()
    ids = torch.tensor([Tokenizer.from_dir(source).encode(text)[:256]])
    with torch.no_grad():
        reference = load_model(source)(ids)
    for scheme, options in [("int4", {}), ("int4-asym", {"actorder": True})]:
        rtn = logit_error(convert_checkpoint(source, tmp_path / f"{scheme}-rtn", scheme, group_size=32), reference, ids)
        for method in ("gptq", "awq"):
            extra = options if method == "gptq" else {}
            out = convert_checkpoint(
                source, tmp_path / f"{scheme}-{method}", scheme, group_size=32, calibration=method,
                calib_text=verse, **extra,
            )
            error = logit_error(out, reference, ids)
            assert error <= rtn, f"{scheme} {method}: {error:.3e} > RTN {rtn:.3e} on text it was not calibrated on"
            entries = json.loads((out / MANIFEST_FILE).read_text())["quantized"]
            for entry in entries.values():  # AWQ's scales are shared: their guarantee is the group's
                assert entry.get("group_heldout_error_vs_minmax", entry["heldout_error_vs_minmax"]) <= 1.0


def _plan(calibration: str) -> Plan:
    return Plan("int4", 32, calibration, False, "float", {"model.layers.0.mlp.down_proj": (64, 128)}, {}, "test")


def test_gptq_overfitted_to_its_inputs_is_replaced_by_rounding():
    """Inputs confined to a few directions: GPTQ pushes all its error into the others, which the
    held-out inputs use; the check sees it and stores a rounding (min-max or MSE search) instead."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    fit, heldout = HessianAccumulator(128), HessianAccumulator(128)
    fit.add(torch.randn(4096, 6) @ torch.randn(6, 128))  # rank 6 of 128
    heldout.add(torch.randn(4096, 128))
    overfit = gptq_quantize(w, fit.value(), num_bits=4, group_size=32, symmetric=True)
    rtn = quantize_int(w, num_bits=4, group_size=32, symmetric=True)
    assert output_error(w, overfit.dequantize(), heldout.value()) > output_error(w, rtn.dequantize(), heldout.value())

    plan = _plan("gptq")
    result = gptq_layer(plan, "model.layers.0.", {"model.layers.0.mlp.down_proj.weight": w}, {"mlp.down_proj": LayerStats(fit, heldout)})
    choice = result.entries["model.layers.0.mlp.down_proj"]["choice"]
    assert choice in ("minmax", "mse")  # a rounding, not the overfitted GPTQ
    rounded = rtn if choice == "minmax" else quantize_int(w, num_bits=4, group_size=32, symmetric=True, mse=True)
    assert torch.equal(result.restored["model.layers.0.mlp.down_proj.weight"], rounded.dequantize())

    # The same fit checked on inputs like its own: GPTQ is kept, and beats rounding on them.
    same = HessianAccumulator(128)
    same.add(torch.randn(4096, 6) @ torch.randn(6, 128))
    plan = _plan("gptq")
    result = gptq_layer(plan, "model.layers.0.", {"model.layers.0.mlp.down_proj.weight": w}, {"mlp.down_proj": LayerStats(fit, fit)})
    assert result.entries["model.layers.0.mlp.down_proj"]["choice"].startswith("gptq")
    # within the clipping search's ranges: (q - 0) * s with the clipped scales
    clipped = search_clip(w, fit.value().float(), num_bits=4, group_size=32, symmetric=True, scale_dtype=torch.float32)
    stored = result.tensors["model.layers.0.mlp.down_proj.weight"]
    scale = dict(stored)["model.layers.0.mlp.down_proj.weight_scale"]
    assert torch.equal(scale, clipped.scale) and not torch.equal(scale, rtn.scale)


def test_the_plan_is_fixed_and_a_layer_reports_through_its_result():
    """A layer function leaves the plan as it was: its manifest entries come back in its result."""
    import dataclasses

    from quadapt.converters.calibrated import awq_layer

    plan = Plan("int4", 32, "awq", False, "float", {"model.layers.0.self_attn.o_proj": (64, 128)}, {}, "test")
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    fit, heldout = HessianAccumulator(128), HessianAccumulator(128)
    fit.add(torch.randn(2048, 128))
    heldout.add(torch.randn(256, 128))
    weights = {"model.layers.0.self_attn.o_proj.weight": w}
    result = awq_layer(plan, "model.layers.0.", weights, {"self_attn.o_proj": LayerStats(fit, heldout)})
    assert list(result.entries) == ["model.layers.0.self_attn.o_proj"]  # o_proj's input is the attention's
    assert result.entries["model.layers.0.self_attn.o_proj"]["choice"].startswith("minmax (input not scalable)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.scheme = "int8"
    with pytest.raises(TypeError):
        plan.quantized["model.layers.0.mlp.up_proj"] = (128, 64)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_clip_search_lowers_each_groups_output_error(symmetric):
    """A large weight column on a nearly idle input: clipping it costs little, and the rest of its
    group gets finer steps. Each group's error through its block of H is never above min-max's."""
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    w[:, 5] *= 8
    x = torch.randn(2048, 128)
    x[:, 5] *= 0.01
    inputs = HessianAccumulator(128)
    inputs.add(x)
    H = inputs.value().float()
    clipped = search_clip(w, H, num_bits=4, group_size=32, symmetric=symmetric, scale_dtype=torch.float32)
    minmax = quantize_int(w, num_bits=4, group_size=32, symmetric=symmetric)

    def group_errors(q):
        delta = (w - q.dequantize()).view(48, 4, 32)  # [N, G, group]
        blocks = torch.stack([H[g * 32:(g + 1) * 32, g * 32:(g + 1) * 32] for g in range(4)])
        return torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)

    assert (group_errors(clipped) <= group_errors(minmax) * (1 + 1e-5)).all()
    widest = 7.5 / 7 if symmetric else 1.0  # symmetric: the range that lands max|w| on qmax
    assert (clipped.scale <= minmax.scale * widest * (1 + 1e-6)).all()
    assert (clipped.scale < minmax.scale).any()  # some groups clipped
    assert output_error(w, clipped.dequantize(), H) < 0.8 * output_error(w, minmax.dequantize(), H)


def test_awq_output_is_compressed_tensors_that_transformers_loads(source, verse, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = convert_checkpoint(source, tmp_path / "awq", "int4", group_size=32, calibration="awq", calib_text=verse)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert any(entry["choice"].startswith("awq") for entry in manifest["quantized"].values())  # some scales were folded
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 33, 200, 17, 4, 90]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_model(out)(ids))


def test_default_calibration_set_needs_nothing(source, tmp_path):
    out = convert_checkpoint(source, tmp_path / "gptq", "int4", calibration="gptq", calib_tokens=4096)
    calibration = json.loads((out / MANIFEST_FILE).read_text())["calibration"]
    assert calibration["texts"] == ["default"] and calibration["tokens"] == 4096
    assert 0 < calibration["heldout_tokens"] < calibration["fit_tokens"]


def test_too_few_tokens_for_the_widest_input(tmp_path, caplog):
    _, path = save_hf_model(tmp_path, "llama", vocab_size=512, intermediate_size=512)  # down_proj: 512 inputs
    wide = build_chatml_dir(path)
    licence = (DATA / "licence.txt").read_text()
    short = tmp_path / "short.txt"
    short.write_text(licence[:600])  # a few hundred tokens
    with pytest.raises(InvalidParameterError, match=r"fewer than the widest layer's 512 inputs"):
        convert_checkpoint(wide, tmp_path / "out", "int4", calibration="gptq", calib_text=short)
    assert not (tmp_path / "out").exists()
    medium = tmp_path / "medium.txt"
    medium.write_text(licence[:3000])  # more than 512 tokens, fewer than 8 x 512
    with caplog.at_level(logging.WARNING, logger="quadapt.converters.calibrate"):
        convert_checkpoint(wide, tmp_path / "warned", "int4", calibration="awq", calib_text=medium)
    assert "noisy" in caplog.text and "may overfit" in caplog.text


def test_calib_text_adds_to_the_default_set(source, verse, tmp_path):
    out = convert_checkpoint(source, tmp_path / "mixed", "int4", calibration="gptq", calib_text=["default", verse], calib_tokens=4096)
    calibration = json.loads((out / MANIFEST_FILE).read_text())["calibration"]
    assert calibration["texts"] == ["default", str(verse)]


def test_calibration_sequences_stack_by_length_within_the_batch_budget():
    from quadapt.converters.calibrate import stack_sequences

    sequences = [torch.full((1, 4), i) for i in range(5)] + [torch.full((1, 3), 9)] + [torch.full((1, 4), 5)]
    batches = stack_sequences(sequences, tokens=8)
    assert [tuple(b.shape) for b in batches] == [(2, 4), (2, 4), (2, 4), (1, 3)]
    assert torch.cat([b[:, 0] for b in batches]).tolist() == [0, 1, 2, 3, 4, 5, 9]  # every sequence, once
    assert [tuple(b.shape) for b in stack_sequences(sequences[:2], tokens=2)] == [(1, 4), (1, 4)]  # one at least
