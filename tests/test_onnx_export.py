"""The ONNX exporter: MatMulNBits weights checked against our dequant reference and against
onnxruntime itself, the written directory (checker, one data file, genai_config.json), and the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from quadapt.cli import main
from quadapt.converters.onnx_weights import quantize, repack, to_nbits
from quadapt.converters.quantize import quantize_int
from quadapt.kernels.reference import dequant_packed_int
from quadapt.runtime.model.quant import PackedIntLinear

from .test_edge import make_base, tiny  # noqa: F401  (the module-scoped export fixture)


def packed_linear(out_features: int, in_features: int, bits: int, group: int, symmetric: bool) -> PackedIntLinear:
    """A PackedIntLinear with random packed words, scales and zero points."""
    module = PackedIntLinear(in_features, out_features, num_bits=bits, group_size=group, symmetric=symmetric, bias=False)
    g = torch.Generator().manual_seed(bits * 100 + group)
    module.weight_packed = torch.randint(-(2**31), 2**31 - 1, module.weight_packed.shape, dtype=torch.int32, generator=g)
    module.weight_scale = torch.rand(module.weight_scale.shape, generator=g) * 0.1 + 0.01
    if symmetric:  # the symmetric MSE search stores a negative scale where a group's peak is positive
        module.weight_scale[:, ::2] *= -1
    else:
        half = 1 << (bits - 1)
        module.weight_zero_point = torch.randint(-half, half, module.weight_scale.shape, dtype=torch.int8, generator=g)
    return module


def run_matmul_nbits(x: np.ndarray, weight, accuracy_level: int = 1) -> np.ndarray:
    """One MatMulNBits node (float32 compute; 4: int8 activations per block), run by onnxruntime."""
    inputs = [numpy_helper.from_array(weight.packed(), "B"), numpy_helper.from_array(weight.scales, "scales")]
    names = ["A", "B", "scales"]
    if weight.zero_points is not None:
        inputs.append(numpy_helper.from_array(weight.packed_zero_points(), "zero_points"))
        names.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", names, ["Y"], domain="com.microsoft", K=weight.in_features, N=weight.out_features,
        bits=weight.bits, block_size=weight.block_size, accuracy_level=accuracy_level,
    )
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": x})[0]


@pytest.mark.parametrize(
    "bits,group,symmetric", [(4, 32, True), (4, 64, False), (4, 16, True), (8, 32, True), (8, 64, False)]
)
def test_repack_is_bit_exact_and_onnxruntime_reads_it(bits, group, symmetric):
    module = packed_linear(48, 192, bits, group, symmetric)
    weight = repack(module)
    expected = dequant_packed_int(
        module.weight_packed, module.weight_scale, module.weight_zero_point, num_bits=bits, in_features=192
    ).numpy()
    assert weight.exact and np.array_equal(weight.dequantize(), expected)  # no second rounding
    x = np.random.default_rng(0).normal(size=(3, 192)).astype(np.float32)
    np.testing.assert_allclose(run_matmul_nbits(x, weight), x @ expected.T, rtol=1e-4, atol=1e-4)
    # The int8 compute path the export uses by default, within its activation rounding.
    fast = run_matmul_nbits(x, weight, accuracy_level=4)
    assert np.abs(fast - x @ expected.T).max() < 0.02 * np.abs(x @ expected.T).max()


def test_weights_not_matching_the_layout_are_quantized_from_float():
    per_channel = PackedIntLinear(96, 40, num_bits=8, group_size=None, symmetric=True, bias=False)
    per_channel.weight_packed = torch.randint(-(2**31), 2**31 - 1, per_channel.weight_packed.shape, dtype=torch.int32)
    per_channel.weight_scale = torch.rand(40, 1) * 0.01
    weight = to_nbits(per_channel, 8, 32)
    assert not weight.exact
    reference = per_channel.dequantize().numpy()
    assert np.abs(weight.dequantize() - reference).max() <= np.abs(reference).max() / 127
    float_weight = np.random.default_rng(1).normal(size=(24, 80)).astype(np.float32)  # K not a whole number of blocks
    for bits, bound in ((4, 0.25), (8, 0.02)):
        q = quantize(float_weight, bits, 32)
        relative = np.abs(q.dequantize() - float_weight).max() / np.abs(float_weight).max()
        assert relative < bound, (bits, relative)
        x = np.random.default_rng(2).normal(size=(2, 80)).astype(np.float32)
        np.testing.assert_allclose(run_matmul_nbits(x, q), x @ q.dequantize().T, rtol=1e-4, atol=1e-4)
    # 4 bits: the converter's asymmetric MSE search on the zero-padded weight, the grid as found.
    padded = np.zeros((24, 96), np.float32)
    padded[:, :80] = float_weight
    found = quantize_int(torch.from_numpy(padded), num_bits=4, group_size=32, symmetric=False, mse=True)
    np.testing.assert_array_equal(quantize(float_weight, 4, 32).dequantize(), found.dequantize().numpy()[:, :80])


def test_export_directory(tiny):  # noqa: F811
    _, export, _ = tiny
    onnx.checker.check_model(str(export / "model.onnx"))
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    locations = {
        entry.value for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL
        for entry in t.external_data if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}
    assert {op.domain: op.version for op in model.opset_import} == {"": 21, "com.microsoft": 1}
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops and "Identity" not in ops
    assert all(a.i == 1 for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level")
    manifest = json.loads((export / "quadapt_edge.json").read_text())
    assert manifest["weights"] == {"repacked": 14, "quantized": 0}  # 2 layers x 7 int4 linears, bit for bit
    assert sorted(manifest["adapters"]) == ["a", "b"]
    genai = json.loads((export / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2 and genai["search"]["past_present_share_buffer"]


def test_export_runs_in_onnxruntime_genai(tiny):  # noqa: F811
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a `bench` extra, not a test dependency")
    from quadapt.runtime.edge.generate import generate_ids
    from quadapt.runtime.edge.model import EdgeModel
    from quadapt.runtime.edge.sampling import SamplingParams

    _, export, _ = tiny
    prompt = [5, 17, 33, 101]
    model = og.Model(str(export))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    ids = []
    while not generator.is_done():
        generator.generate_next_token()
        ids.append(int(generator.get_next_tokens()[0]))
    ours = list(generate_ids(EdgeModel(export), prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), set()))
    assert ids == ours


def test_cli_export_and_its_errors(tiny, tmp_path, capsys):  # noqa: F811
    checkpoint, _, adapters = tiny
    out = tmp_path / "cli"
    assert main(["export-onnx", "--model", str(checkpoint), "--out", str(out), "--bits", "8", "--adapter", f"a={adapters['a']}"]) == 0
    manifest = json.loads((out / "quadapt_edge.json").read_text())
    assert manifest["bits"] == 8 and manifest["weights"]["quantized"] == 14 and list(manifest["adapters"]) == ["a"]
    with pytest.raises(SystemExit):
        main(["export-onnx", "--model", str(checkpoint), "--out", str(tmp_path / "x"), "--block-size", "48"])
    assert "power of two" in capsys.readouterr().err
    assert main(["export-onnx", "--model", str(checkpoint), "--out", str(out)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    other = make_base(tmp_path / "other", intermediate_size=96)
    from .test_adapters import make_peft_adapter

    foreign = make_peft_adapter(other, tmp_path / "foreign", r=2, target_modules=["down_proj"])
    assert main(["export-onnx", "--model", str(checkpoint), "--out", str(tmp_path / "y"), "--adapter", f"x={foreign}"]) == 2
    assert "error:" in capsys.readouterr().err
