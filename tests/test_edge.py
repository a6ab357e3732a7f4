"""The torch-free edge runtime against the torch runtime, on a tiny int4 model exported with two adapters.

Greedy output equals the torch runtime's on the same quantized checkpoint (alone and with each
adapter); switching adapters creates no session and loads nothing; the numpy sampling and the
edge tokenizer give the torch runtime's answers; a bad directory, adapter, or prompt is a clear
error. The real-model test runs SmolLM2's int4 checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from quadapt.cli import main
from quadapt.converters.convert import convert_checkpoint
from quadapt.converters.onnx_export import export_onnx
from quadapt.runtime.engine import sampling as torch_sampling
from quadapt.runtime.checkpoints.adapters import apply_adapter
from quadapt.runtime.edge import sampling as edge_sampling
from quadapt.runtime.edge.generate import generate_ids, generate_text
from quadapt.runtime.edge.model import EdgeModel
from quadapt.runtime.errors import (
    AdapterError,
    CheckpointError,
    ContextLengthError,
    InvalidParameterError,
    UnsupportedError,
)
from quadapt.runtime.api.generate import generate_ids as torch_generate_ids
from quadapt.runtime.api.generate import generate_text as torch_generate_text
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.text.sampling_params import SamplingParams
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_adapters import make_peft_adapter
from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

GREEDY = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}


_BUILT: dict[str, tuple[Path, Path, dict[str, Path]]] = {}  # built once per session, shared by the edge test files


@pytest.fixture
def tiny(tmp_path_factory):
    """(int4 checkpoint, its export with adapters "a" and "b", the adapter dirs).

    Exported with float32 compute and a float head, the export computes exactly what the
    checkpoint says, so greedy output must equal the torch runtime's token for token even on a
    random model, whose logits are nearly tied; the default int8 compute is checked below."""
    if "tiny" not in _BUILT:
        _BUILT["tiny"] = _build_tiny(tmp_path_factory.mktemp("edge"))
    return _BUILT["tiny"]


def _build_tiny(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    base = make_base(root / "base", intermediate_size=128)
    a = make_peft_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    b = make_peft_adapter(base, root / "b", seed=2, r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj", "up_proj"])
    int4 = convert_checkpoint(base, root / "int4", "int4")
    out = export_onnx(int4, root / "onnx", adapters={"a": a, "b": b}, accuracy_level=1, lm_head="float")
    return int4, out, {"a": a, "b": b}


def make_base(parent: Path, intermediate_size: int) -> Path:
    """A tiny random Llama (vocab 512) with a ChatML tokenizer beside it."""
    _, path = save_hf_model(parent, "llama", vocab_size=512, intermediate_size=intermediate_size)
    return build_chatml_dir(path)


def torch_greedy(checkpoint: Path, ids: list[int], adapter: Path | None = None) -> list[int]:
    model = load_model(checkpoint)
    if adapter is not None:
        apply_adapter(model, adapter)
    eos = Tokenizer.from_dir(checkpoint).eos_token_ids
    return list(torch_generate_ids(model, ids, torch_sampling.SamplingParams(**GREEDY), eos))


def test_greedy_equals_torch_runtime_with_and_without_adapters(tiny):
    checkpoint, export, adapters = tiny
    model, tokenizer = EdgeModel(export), Tokenizer.from_dir(export)
    ids = tokenizer.encode("the sea is calm tonight")
    for name in (None, "a", "b", None):
        expected = torch_greedy(checkpoint, ids, adapters.get(name))
        actual = list(generate_ids(model, ids, SamplingParams(**GREEDY), tokenizer.eos_token_ids, name))
        assert len(actual) == 40 and actual == expected, name
    # Negative control: the adapters change the output.
    outputs = {name: list(generate_ids(model, ids, SamplingParams(**GREEDY), set(), name)) for name in (None, "a", "b")}
    assert outputs[None] != outputs["a"] and outputs[None] != outputs["b"]


def test_default_int8_compute_stays_close_to_torch_runtime(tiny, tmp_path):
    checkpoint, exact, _ = tiny
    fast = export_onnx(checkpoint, tmp_path / "fast")  # int8 activations, int8 head
    ids = list(range(3, 60))
    with torch.no_grad():
        expected = load_model(checkpoint)(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(EdgeModel(exact).logits(ids), expected, atol=1e-4, rtol=1e-4)
    error = np.abs(EdgeModel(fast).logits(ids) - expected).max() / np.abs(expected).max()
    assert 0 < error < 0.05, error


def test_switching_adapters_reloads_nothing(tiny, monkeypatch):
    _, export, _ = tiny
    sessions, adapters = [], []
    real_session, real_read = ort.InferenceSession, ort.AdapterFormat.read_adapter

    def counting_session(*args, **kwargs):
        sessions.append(args)
        return real_session(*args, **kwargs)

    def counting_read(path):
        adapters.append(path)
        return real_read(path)

    monkeypatch.setattr(ort, "InferenceSession", counting_session)
    monkeypatch.setattr(ort.AdapterFormat, "read_adapter", staticmethod(counting_read))
    model = EdgeModel(export)
    assert (len(sessions), len(adapters)) == (1, 2)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    for name in ("a", "b", None, "b", "a"):
        list(generate_ids(model, [5, 6, 7], params, set(), name))
    assert (len(sessions), len(adapters)) == (1, 2)


def test_text_and_stop_strings_equal_torch_runtime(tiny):
    checkpoint, export, _ = tiny
    tokenizer = Tokenizer.from_dir(checkpoint)
    ids = tokenizer.encode("the sea is calm tonight")
    full = "".join(torch_generate_text(load_model(checkpoint), tokenizer, ids, torch_sampling.SamplingParams(**GREEDY)))
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    for stops in ([], [stop]):
        expected = torch_generate_text(load_model(checkpoint), tokenizer, ids, torch_sampling.SamplingParams(**GREEDY, stop=stops))
        actual = generate_text(EdgeModel(export), Tokenizer.from_dir(export), ids, SamplingParams(**GREEDY, stop=stops))
        assert "".join(actual) == "".join(expected)
        assert (actual.result.finish_reason, actual.result.stop_reason, actual.result.completion_tokens) == (
            expected.result.finish_reason, expected.result.stop_reason, expected.result.completion_tokens,
        )


def test_export_tokenizer_equals_checkpoint_tokenizer(tiny):
    checkpoint, export, _ = tiny
    ours, edge = Tokenizer.from_dir(checkpoint), Tokenizer.from_dir(export)
    text = "Hello <|im_start|>the sea, café! <|im_end|>"
    assert edge.encode(text) == ours.encode(text)
    ids = ours.encode(text)
    assert edge.decode(ids) == ours.decode(ids) and edge.eos_token_ids == ours.eos_token_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert edge.apply_chat_template(messages) == ours.apply_chat_template(messages)


def test_numpy_sampling_equals_torch_sampling():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=300).astype(np.float32) * 3
    prev = [3, 3, 17, 299, 120]
    t = torch.from_numpy(logits)
    np.testing.assert_allclose(
        edge_sampling.apply_repetition_penalty(logits, prev, 1.3), torch_sampling.apply_repetition_penalty(t, prev, 1.3).numpy()
    )
    for k in (1, 7, 50):
        np.testing.assert_array_equal(edge_sampling.apply_top_k(logits, k), torch_sampling.apply_top_k(t, k).numpy())
    for p in (0.1, 0.5, 0.9):
        np.testing.assert_array_equal(
            np.isinf(edge_sampling.apply_top_p(logits, p)), np.isinf(torch_sampling.apply_top_p(t, p).numpy())
        )
    greedy = SamplingParams(temperature=0, repetition_penalty=1.3)
    assert edge_sampling.sample(logits, greedy, rng, prev) == torch_sampling.sample(
        t, torch_sampling.SamplingParams(temperature=0, repetition_penalty=1.3), torch.Generator(), prev
    )
    # Sampled: only the kept tokens are ever drawn, and a seed reproduces the draws.
    params = SamplingParams(temperature=0.8, top_k=5, seed=3)
    draws = [edge_sampling.sample(logits, params, np.random.default_rng(3)) for _ in range(3)]
    kept = set(np.argsort(logits)[-5:].tolist())
    assert len(set(draws)) == 1 and draws[0] in kept
    with pytest.raises(InvalidParameterError, match="top_p"):
        SamplingParams(top_p=0)


def test_clear_errors(tiny, tmp_path):
    checkpoint, export, _ = tiny
    with pytest.raises(CheckpointError, match="not a quadapt ONNX export"):
        EdgeModel(checkpoint)
    model = EdgeModel(export)
    with pytest.raises(InvalidParameterError, match="unknown adapter 'c'.*a, b"):
        list(generate_ids(model, [1, 2], SamplingParams(max_new_tokens=2), set(), "c"))
    with pytest.raises(ContextLengthError, match="shorten the prompt"):
        generate_ids(model, [1] * 256, SamplingParams(max_new_tokens=2), set())
    with pytest.raises(UnsupportedError, match="edge runtime does not report logprobs.*quadapt.LLM"):
        generate_ids(model, [1, 2], SamplingParams(max_new_tokens=2, logprobs=1), set())
    # An adapter file of another base (other shapes), put into this export.
    hf_dir = make_base(tmp_path / "other", intermediate_size=96)
    foreign = make_peft_adapter(hf_dir, tmp_path / "foreign", r=2, target_modules=["down_proj"])
    copy = Path(shutil.copytree(export, tmp_path / "copy"))
    foreign_export = export_onnx(hf_dir, tmp_path / "foreign-export", adapters={"x": foreign})
    shutil.copy(foreign_export / "adapters" / "x.onnx_adapter", copy / "adapters" / "x.onnx_adapter")
    manifest = json.loads((copy / "quadapt_edge.json").read_text())
    manifest["adapters"]["x"] = {"file": "adapters/x.onnx_adapter"}
    (copy / "quadapt_edge.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match="another base model"):
        EdgeModel(copy)
    # ... and given to the exporter, refused there.
    with pytest.raises(AdapterError):
        export_onnx(checkpoint, tmp_path / "refused", adapters={"x": foreign})


def test_cli_runs_export_and_reports_errors(tiny, capsys):
    checkpoint, export, _ = tiny
    tokenizer = Tokenizer.from_dir(export)
    status = main(["run-onnx", str(export), "--prompt", "the sea", "--max-new-tokens", "8", "--ignore-eos", "--adapter", "a"])
    out = capsys.readouterr().out
    model = EdgeModel(export)
    expected = "".join(generate_text(model, tokenizer, tokenizer.encode("the sea"), SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True), "a"))
    assert status == 0 and out == expected + "\n"
    assert main(["run-onnx", str(export), "--prompt", "x", "--adapter", "nope"]) == 2
    assert "unknown adapter 'nope'" in capsys.readouterr().err
    assert main(["run-onnx", str(checkpoint), "--prompt", "x"]) == 2
    assert "not a quadapt ONNX export" in capsys.readouterr().err
    assert main(["run-onnx", str(export), "--prompt", "the " * 300]) == 2
    assert "shorten the prompt" in capsys.readouterr().err


def test_eval_ppl_scores_an_export_as_the_torch_runtime_scores_its_checkpoint(tiny, capsys, tmp_path):
    checkpoint, export, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text("the sea is calm tonight, the tide is full, the moon lies fair upon the straits " * 12)
    figures = {}
    for model in (checkpoint, export):
        assert main(["eval-ppl", "--model", str(model), "--text", str(text), "--window", "64"]) == 0
        lines = capsys.readouterr().out.splitlines()
        figures[model] = (lines[0], float(lines[-1].removeprefix("perplexity: ")))
    # The same windows, and (float32 compute, float head) the same perplexity.
    assert figures[export][0] == figures[checkpoint][0] and figures[export][0].endswith("(window 64, stride 32)")
    assert figures[export][1] == pytest.approx(figures[checkpoint][1], rel=1e-4)
    assert main(["eval-ppl", "--model", str(export), "--text", str(text), "--dtype", "bfloat16"]) == 2
    assert "does not apply to an ONNX export" in capsys.readouterr().err


def test_eval_ppl_needs_onnxruntime_only_for_an_export(tiny, capsys, tmp_path, monkeypatch):
    """onnxruntime is an extra: without it a checkpoint still scores, and an export says what to install."""
    checkpoint, export, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text("the sea is calm tonight, the tide is full " * 20)
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith(("onnxruntime.", "quadapt.runtime.edge."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    assert main(["eval-ppl", "--model", str(checkpoint), "--text", str(text), "--window", "64"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("perplexity: ")
    assert main(["eval-ppl", "--model", str(export), "--text", str(text)]) == 2
    assert "pip install 'quadapt[onnx]'" in capsys.readouterr().err


@pytest.mark.real_model
def test_smollm2_int4_greedy_equals_torch_runtime(smollm2_int4, tmp_path):
    # Float32 compute: the export then adds no error of its own. (The default int8 compute flips
    # this prompt's 31st token, where the torch runtime's top two logits are within 0.05.)
    export = export_onnx(smollm2_int4, tmp_path / "onnx", accuracy_level=1)
    tokenizer = Tokenizer.from_dir(smollm2_int4)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in two sentences."}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    expected = list(torch_generate_ids(load_model(smollm2_int4), ids, torch_sampling.SamplingParams(**params), set()))
    actual = list(generate_ids(EdgeModel(export), ids, SamplingParams(**params), set()))
    assert actual == expected


@pytest.mark.real_model
def test_smollm2_default_int8_compute_departs_only_at_near_ties(smollm2_int4, tmp_path):
    """The default export (int8 activations in MatMulNBits, int8 head), teacher-forced on 256
    tokens of a text unlike chat (a licence, where the model is often unsure): its greedy choice
    differs from the torch runtime's at few positions, and only where the torch runtime's top two
    logits were close (on a group-64 checkpoint: 11 positions, all within 0.45)."""
    export = export_onnx(smollm2_int4, tmp_path / "fast")
    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "licence.txt").read_text()
    ids = Tokenizer.from_dir(smollm2_int4).encode(text)[:256]
    with torch.no_grad():
        expected = load_model(smollm2_int4)(torch.tensor([ids]))[0].numpy()
    actual = EdgeModel(export).logits(ids)
    top2 = np.sort(expected, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    flipped = np.flatnonzero(actual.argmax(-1) != expected.argmax(-1))
    assert all(margins[i] < 1.0 for i in flipped), [(int(i), float(margins[i])) for i in flipped]
    assert len(flipped) <= 16, flipped  # at most 1 position in 16


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted to int4 (group 64) by quadapt."""
    return convert_checkpoint(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "int4", "int4")
