"""`quadapt convert` end to end: outputs that load and generate, a manifest, atomic writes, clear errors.

Default tests run on tiny random models; `real_model` tests convert SmolLM2-135M-Instruct and check
transformers' greedy text on our output against `quadapt generate`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quadapt.cli import main
from quadapt.converters.convert import MANIFEST_FILE, convert_checkpoint
from quadapt.runtime.checkpoints.hf import HFCheckpoint
from quadapt.runtime.errors import CheckpointError, InvalidParameterError, QuadaptError, UnsupportedError
from quadapt.runtime.api.generate import generate_ids
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.model.fused import checkpoint_module
from quadapt.runtime.model.quant import NF4Linear, PackedIntLinear
from quadapt.runtime.engine.sampling import SamplingParams
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data"
CALIB_TEXT = DATA / "coriolanus_calib.txt"
EVAL_TEXT = DATA / "coriolanus_eval.txt"


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    """The first scenes of the calibration text: about 2,000 tokens of the tiny tokenizer, enough here."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT.read_text()[:2500])
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama (input sizes 64 and 128) with a ChatML tokenizer beside its weights."""
    _, path = save_hf_model(tmp_path_factory.mktemp("convert"), "llama", vocab_size=512, intermediate_size=128)
    return build_chatml_dir(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("scheme", ["int4", "int4-asym", "int8", "nf4"])
def test_cli_convert_then_generate(capsys, source, tmp_path, scheme):
    out = tmp_path / scheme
    status, _, err = run(capsys, "convert", "--model", source, "--out", out, "--scheme", scheme)
    assert status == 0, err
    assert f"quadapt: converting to {scheme}: 100%" in err and "21/21" in err  # progress, on stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", MANIFEST_FILE} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or scratch left behind

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["scheme"] == scheme and manifest["source"] == str(source)
    assert manifest["group_size"] == {"int4": 64, "int4-asym": 64, "int8": None, "nf4": 64}[scheme]
    assert len(manifest["quantized"]) == 14 and set(manifest["kept_float"]) == {"model.embed_tokens", "lm_head"}
    assert all(entry["sqnr_db"] > (35 if scheme == "int8" else 15) for entry in manifest["quantized"].values())

    model = load_model(out)
    module = model.model.layers[1].mlp.down_proj
    assert isinstance(module, NF4Linear if scheme == "nf4" else PackedIntLinear)
    assert module.weight_format == ("int8" if scheme == "int8" else "nf4" if scheme == "nf4" else "int4")
    assert isinstance(model.lm_head, torch.nn.Linear)

    status, text, err = run(capsys, "generate", "--model", out, "--prompt", "hello", "--max-new-tokens", "8", "--ignore-eos",
                            "--executor", "torch")  # the reference generator's numbers (auto: onnx for int4/int8)
    assert status == 0, err
    tokenizer = Tokenizer.from_dir(out)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    expected = tokenizer.decode(list(generate_ids(model, tokenizer.encode("hello"), params, eos_token_ids=set())))
    assert text == expected + "\n"


def test_cli_flags_reach_the_library(capsys, source, calib_text, tmp_path):
    out = tmp_path / "gptq"
    status, _, err = run(
        capsys, "convert", "--model", source, "--out", out, "--scheme", "int4-asym", "--group-size", "32",
        "--calibration", "gptq", "--calib-text", calib_text, "--actorder", "--keep", "o_proj", "model.layers.1.mlp",
    )
    assert status == 0, err
    assert "quadapt: gptq: layer 2/2 quantized" in err
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["scheme"] == "int4-asym" and manifest["group_size"] == 32
    assert manifest["calibration"]["method"] == "gptq" and manifest["calibration"]["actorder"] == "weight"
    assert sorted(manifest["kept_float"]) == [
        "lm_head", "model.embed_tokens", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj",
    ]
    assert all(entry["quantized"] == "int4 asymmetric, group 32, gptq" for entry in manifest["quantized"].values())


def test_quantized_model_stays_close_to_the_float_model(source, tmp_path):
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        reference = load_model(source)(ids)
        for scheme, bound in [("int8", 0.02), ("int4", 0.3), ("nf4", 0.3)]:
            logits = load_model(convert_checkpoint(source, tmp_path / scheme, scheme))(ids)
            assert (logits - reference).abs().max() < bound, scheme


def test_keep_leaves_modules_float_and_records_them(source, tmp_path):
    out = convert_checkpoint(source, tmp_path / "kept", "int4", keep=["down_proj", "model.layers.0.self_attn.q_proj"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert config["ignore"] == ["lm_head", *kept]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["kept_float"]["model.layers.1.mlp.down_proj"] == "--keep down_proj"
    assert len(manifest["quantized"]) == 11
    model, float_model = load_model(out), load_model(source)
    for name in kept:
        module = checkpoint_module(model, name)
        assert type(module) is torch.nn.Linear and torch.equal(module.weight, checkpoint_module(float_model, name).weight)

    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, model(ids))


def test_tied_embeddings(tmp_path):
    _, path = save_hf_model(tmp_path, "llama", tie_word_embeddings=True, intermediate_size=128)
    out = convert_checkpoint(path, tmp_path / "tied", "int4-asym")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    model = load_model(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert json.loads((out / MANIFEST_FILE).read_text())["kept_float"]["lm_head"].startswith("output head: tied")


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_int8_head_is_recorded_and_runs(capsys, source, tmp_path, scheme):
    out = tmp_path / scheme
    status, _, err = run(capsys, "convert", "--model", source, "--out", out, "--scheme", scheme, "--lm-head", "int8")
    assert status == 0, err
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["lm_head"] == "int8" and set(manifest["kept_float"]) == {"model.embed_tokens"}
    assert len(manifest["quantized"]) == 15
    assert manifest["quantized"]["lm_head"]["quantized"] == "int8 symmetric, per channel, minmax"
    assert manifest["quantized"]["lm_head"]["sqnr_db"] > 35
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == []
    assert list(config["config_groups"]) == (["group_0", "group_1"] if scheme == "int4" else ["group_0"])
    assert "lm_head.weight" not in load_file(out / "model.safetensors")

    model = load_model(out)
    head = model.lm_head
    assert isinstance(head, PackedIntLinear) and head.num_bits == 8 and head.group_size is None and head.symmetric
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    status, text, err = run(capsys, "generate", "--model", out, "--prompt", "hello", "--max-new-tokens", "8", "--ignore-eos",
                            "--executor", "torch")  # the reference generator's numbers (auto: onnx for int4/int8)
    assert status == 0, err
    tokenizer = Tokenizer.from_dir(out)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert text == tokenizer.decode(list(generate_ids(model, tokenizer.encode("hello"), params, eos_token_ids=set()))) + "\n"
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():  # the head's int8 error is small beside the float model's logits
        float_head = load_model(convert_checkpoint(source, tmp_path / f"{scheme}-float-head", scheme))(ids)
        assert (model(ids) - float_head).abs().max() < 0.02


def test_int8_head_under_gptq_and_mse(source, calib_text, tmp_path):
    """GPTQ calibrates the decoder layers; the head is min-max (MSE under mse), and says so."""
    gptq = convert_checkpoint(source, tmp_path / "gptq", "int4", calibration="gptq", calib_text=calib_text, lm_head="int8")
    mse = convert_checkpoint(source, tmp_path / "mse", "int8", calibration="mse", lm_head="int8")
    for path, label in [(gptq, "minmax"), (mse, "mse")]:
        entry = json.loads((path / MANIFEST_FILE).read_text())["quantized"]["lm_head"]
        assert entry["quantized"] == f"int8 symmetric, per channel, {label}" and entry["sqnr_db"] > 35
        assert isinstance(load_model(path).lm_head, PackedIntLinear)


def test_int8_head_tied_to_the_embedding_is_refused(capsys, tmp_path):
    _, path = save_hf_model(tmp_path, "llama", tie_word_embeddings=True, intermediate_size=128)
    message = r"ties the output head to the embedding .* transformers cannot load .* keep --lm-head float"
    with pytest.raises(UnsupportedError, match=message):
        convert_checkpoint(path, tmp_path / "out", "int4", lm_head="int8")
    capsys.readouterr()
    status, out, err = run(capsys, "convert", "--model", path, "--out", tmp_path / "out", "--scheme", "int8", "--lm-head", "int8")
    assert status == 2 and out == "" and err.startswith("quadapt: error: --lm-head int8: ") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_gptq_beats_round_to_nearest(source, calib_text, tmp_path):
    ids = torch.tensor([Tokenizer.from_dir(source).encode(EVAL_TEXT.read_text())[:256]])  # not the calibration text
    with torch.no_grad():
        reference = load_model(source)(ids)

        def error(path):
            return float((load_model(path)(ids) - reference).pow(2).mean())

        rtn = convert_checkpoint(source, tmp_path / "rtn", "int4")
        mse = convert_checkpoint(source, tmp_path / "mse", "int4", calibration="mse")
        gptq = convert_checkpoint(source, tmp_path / "gptq", "int4", calibration="gptq", calib_text=calib_text)
        assert error(gptq) < 0.6 * error(rtn)
        assert error(mse) <= error(rtn)
        asym = convert_checkpoint(source, tmp_path / "asym", "int4-asym")
        static = convert_checkpoint(
            source, tmp_path / "asym-actorder", "int4-asym", calibration="gptq", calib_text=calib_text, actorder=True
        )
        assert error(static) < 0.6 * error(asym)
    config = json.loads((static / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    manifest = json.loads((gptq / MANIFEST_FILE).read_text())
    assert manifest["calibration"]["method"] == "gptq" and manifest["calibration"]["tokens"] > 1000
    assert manifest["calibration"]["sequence_length"] == 256  # the tiny model's context


class _SpyReader:
    """A non-HF reader over an HF checkpoint (so GPTQ must spill it), optionally killing the process."""

    def __init__(self, path: Path) -> None:
        self.inner = HFCheckpoint(path)
        self.path = self.inner.path

    def config_dict(self):
        return self.inner.config_dict()

    def keys(self):
        return self.inner.keys()

    def tensors(self):
        yield from self.inner.tensors()

    def tokenizer_files(self):
        return self.inner.tokenizer_files()


def test_gptq_from_a_streaming_reader_equals_gptq_from_the_directory(source, calib_text, tmp_path):
    direct = convert_checkpoint(source, tmp_path / "direct", "int4", calibration="gptq", calib_text=calib_text)
    spilled = convert_checkpoint(_SpyReader(source), tmp_path / "spilled", "int4", calibration="gptq", calib_text=calib_text)
    a, b = load_file(direct / "model.safetensors"), load_file(spilled / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failure_midway_leaves_nothing_and_a_rerun_succeeds(source, tmp_path):
    class Failing(_SpyReader):
        def tensors(self):
            for i, item in enumerate(self.inner.tensors()):
                if i == 10:
                    raise OSError("disk went away")
                yield item

    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk went away"):
        convert_checkpoint(Failing(source), out, "int4")
    assert list(tmp_path.iterdir()) == []
    assert convert_checkpoint(source, out, "int4") == out


def test_a_killed_conversion_leaves_nothing_under_the_final_name(source, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        from quadapt.converters.convert import convert_checkpoint
        from quadapt.runtime.checkpoints.hf import HFCheckpoint

        class Killed(HFCheckpoint):
            def tensors(self):
                for i, item in enumerate(super().tensors()):
                    if i == 12:
                        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs, as with a real kill
                    yield item

        convert_checkpoint(Killed({str(source)!r}), {str(out)!r}, "int4")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert not out.exists()
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # the hidden staging dir was in use
    status = main(["convert", "--model", str(source), "--out", str(out), "--scheme", "int4"])
    assert status == 0 and load_model(out) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the killed run's staging dir is gone


def test_a_quantized_embedding_is_refused_by_name(source, tmp_path, capsys):
    """Another tool's checkpoint with a packed embedding: a clear refusal, not a key-mismatch report."""
    out = convert_checkpoint(source, tmp_path / "int8", "int8")
    tensors = load_file(out / "model.safetensors")
    embed = tensors.pop("model.embed_tokens.weight")
    tensors["model.embed_tokens.weight_packed"] = torch.zeros(embed.shape[0], embed.shape[1] // 4, dtype=torch.int32)
    tensors["model.embed_tokens.weight_scale"] = torch.ones(embed.shape[0], 1, dtype=embed.dtype)
    save_file(tensors, out / "model.safetensors")
    capsys.readouterr()
    with pytest.raises(UnsupportedError, match="the embedding is quantized .*keeps the embedding float"):
        load_model(out)
    status, _, err = run(capsys, "generate", "--model", out, "--prompt", "hi", "--max-new-tokens", "1")
    assert status == 2 and err.startswith("quadapt: error: ") and "embedding is quantized" in err and "Traceback" not in err


def test_a_run_killed_while_replacing_gets_its_old_checkpoint_back(source, tmp_path, capsys):
    """Killed between moving the old checkpoint aside and the new one in: the next run restores it."""
    out = convert_checkpoint(source, tmp_path / "out", "int8")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    trash = tmp_path / f".out.{int(dead.stdout)}.abc123.old"
    trash.mkdir()
    out.rename(trash / "previous")
    capsys.readouterr()
    status, _, err = run(capsys, "convert", "--model", source, "--out", out, "--scheme", "int4")
    assert status == 2 and "already exists; pass --overwrite" in err  # restored, so guarded again
    assert not trash.exists() and checkpoint_module(load_model(out), "model.layers.0.mlp.up_proj").num_bits == 8


def test_overwrite(source, tmp_path, capsys):
    out = convert_checkpoint(source, tmp_path / "out", "int8")
    with pytest.raises(QuadaptError, match="already exists; pass --overwrite"):
        convert_checkpoint(source, out, "int4")
    capsys.readouterr()
    status, _, err = run(capsys, "convert", "--model", source, "--out", out, "--scheme", "int4")
    assert status == 2 and err.startswith("quadapt: error: output directory") and err.count("\n") == 1
    convert_checkpoint(source, out, "int4", overwrite=True)
    assert isinstance(checkpoint_module(load_model(out), "model.layers.0.mlp.up_proj"), PackedIntLinear)
    assert checkpoint_module(load_model(out), "model.layers.0.mlp.up_proj").num_bits == 4


def test_messages_name_the_flag_first_and_the_python_keyword_second(source, tmp_path):
    from quadapt.converters.merge import merge_adapter

    out = convert_checkpoint(source, tmp_path / "out", "int8")
    with pytest.raises(QuadaptError, match=r"pass --overwrite to replace it \(overwrite=True from Python\)"):
        convert_checkpoint(source, out, "int4")
    with pytest.raises(InvalidParameterError, match=(
        r"quantization options --calib-tokens / calib_tokens, --group-size / group_size apply only with a "
        r"quantization scheme; add --scheme \(scheme=... from Python\)"
    )):
        merge_adapter(source, tmp_path / "adapter", tmp_path / "merged", group_size=32, calib_tokens=2048)


def with_tensor(source: Path, tmp_path: Path, name: str, value: float) -> Path:
    """A copy of `source` whose tensor `name` holds `value` at one position."""
    path = tmp_path / "damaged"
    path.mkdir()
    for file in source.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    state = load_file(source / "model.safetensors")
    state[name] = state[name].clone()
    state[name].view(-1)[3] = value
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["model.layers.1.self_attn.v_proj.weight", "model.norm.weight"])
def test_non_finite_weights_are_named(source, tmp_path, value, name):
    damaged = with_tensor(source, tmp_path, name, value)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' .* holds 1 NaN or Inf"):
        convert_checkpoint(damaged, tmp_path / "out", "int4")
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_under_gptq(source, calib_text, tmp_path):
    damaged = with_tensor(source, tmp_path, "model.layers.0.mlp.up_proj.weight", float("nan"))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight"):
        convert_checkpoint(damaged, tmp_path / "out", "int4", calibration="gptq", calib_text=calib_text)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"scheme": "int3"}, InvalidParameterError, "unknown scheme 'int3'; choose one of int4, int4-asym, int8, nf4"),
        ({"scheme": "int4", "calibration": "awq4"}, InvalidParameterError, "unknown calibration 'awq4'"),
        ({"scheme": "int4", "group_size": 48}, InvalidParameterError, "--group-size 48 is not allowed for int4; choose one of 128, 64, 32"),
        ({"scheme": "int4", "group_size": 128}, InvalidParameterError, r"--group-size 128 does not divide .* 64 inputs.*use --group-size 64 or 32"),
        ({"scheme": "int8", "group_size": 64}, InvalidParameterError, "int8 is per output channel"),
        ({"scheme": "nf4", "group_size": 32}, InvalidParameterError, "block size 64"),
        ({"scheme": "nf4", "calibration": "mse"}, InvalidParameterError, "'mse' does not apply to nf4"),
        ({"scheme": "int4", "calib_text": "x.txt"}, InvalidParameterError, "--calib-text applies to the calibrated methods"),
        ({"scheme": "int4", "calibration": "gptq", "calib_tokens": 100}, InvalidParameterError, "--calib-tokens 100 is too few"),
        ({"scheme": "int4", "actorder": True}, InvalidParameterError, "--actorder applies to GPTQ only"),
        ({"scheme": "int4", "keep": ["gate"]}, InvalidParameterError, "--keep 'gate' matches no linear module"),
        ({"scheme": "int4", "lm_head": "int4"}, InvalidParameterError, "unknown --lm-head 'int4'; choose one of float, int8"),
        (
            {"scheme": "nf4", "lm_head": "int8"}, InvalidParameterError,
            "cannot be written with nf4: a bitsandbytes checkpoint holds one precision .* use --lm-head float, or a compr",
        ),
        (
            {"scheme": "int4-asym", "lm_head": "int8"}, InvalidParameterError,
            "cannot be combined with int4-asym: .* use --scheme int4 .* or keep --lm-head float",
        ),
        ({"scheme": "int8", "lm_head": "int8", "keep": ["lm_head"]}, InvalidParameterError, "contradict"),
    ],
    ids=[
        "scheme", "calibration", "group-48", "group-128", "int8-group", "nf4-group", "nf4-mse", "text-without-method", "too-few-tokens",
        "actorder",
        "keep", "head-int4", "head-nf4", "head-int4-asym", "head-kept",
    ],
)
def test_bad_options_are_clear_errors(source, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        convert_checkpoint(source, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_an_int8_head_refusal_is_one_cli_line(capsys, source, tmp_path):
    status, out, err = run(capsys, "convert", "--model", source, "--out", tmp_path / "out", "--scheme", "nf4", "--lm-head", "int8")
    assert status == 2 and out == "" and err.startswith("quadapt: error: --lm-head int8 cannot be written with nf4")
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "out").exists()


def test_calibration_text_too_short(source, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.")
    with pytest.raises(InvalidParameterError, match=r"short.txt' is \d+ tokens long; GPTQ needs at least 128 tokens"):
        convert_checkpoint(source, tmp_path / "out", "int4", calibration="gptq", calib_text=short)
    with pytest.raises(InvalidParameterError, match="cannot read calibration text"):
        convert_checkpoint(source, tmp_path / "out", "int4", calibration="gptq", calib_text=tmp_path / "missing.txt")


def test_a_quantized_input_is_refused(source, tmp_path, capsys):
    quantized = convert_checkpoint(source, tmp_path / "q", "int4")
    with pytest.raises(UnsupportedError, match="already quantized .compressed-tensors.; .* convert from the float model"):
        convert_checkpoint(quantized, tmp_path / "again", "int8")
    status, _, err = run(capsys, "convert", "--model", quantized, "--out", tmp_path / "again", "--scheme", "nf4")
    assert status == 2 and "error:" in err and "already quantized" in err


def test_not_enough_disk_space(source, tmp_path, monkeypatch):
    import shutil

    from quadapt.converters import plan

    monkeypatch.setattr(plan.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(QuadaptError, match=r"not enough free disk space .* needs about \d+ MiB, 0 MiB are free"):
        convert_checkpoint(source, tmp_path / "out", "int4")


# --- the real model ------------------------------------------------------------------------------

NEW_TOKENS = 32
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_gguf, tmp_path_factory):
    return convert_checkpoint(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "int4", "int4")


def transformers_chat_answer(model, tokenizer, prompt: str) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def quadapt_chat_answer(capsys, model: Path, prompt: str) -> str:
    """`quadapt generate --chat` on the torch executor: the checkpoint read as transformers reads it
    (auto would pick the ONNX executor for a packed checkpoint, whose int8 activations move the
    logits' last bits)."""
    status, out, err = run(
        capsys, "generate", "--model", model, "--chat", "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS),
        "--prompt", prompt, "--executor", "torch",
    )
    assert status == 0, err
    return out[:-1]


@pytest.mark.real_model
def test_smollm2_int4_greedy_text_equals_transformers(capsys, smollm2_int4):
    transformers = pytest.importorskip("transformers")
    assert json.loads((smollm2_int4 / MANIFEST_FILE).read_text())["group_size"] == 64  # 576 = 9 x 64
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_int4)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_int4, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        assert quadapt_chat_answer(capsys, smollm2_int4, prompt) == transformers_chat_answer(model, tokenizer, prompt)


@pytest.mark.real_model
def test_smollm2_nf4_greedy_text_equals_transformers(capsys, smollm2_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    out = convert_checkpoint(smollm2_gguf, tmp_path / "nf4", "nf4")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for module in model.modules():  # bitsandbytes' reference fp32 path (see test_formats)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    for prompt in PROMPTS:
        assert quadapt_chat_answer(capsys, out, prompt) == transformers_chat_answer(model, tokenizer, prompt)


@pytest.mark.real_model
def test_smollm2_gptq_perplexity_beats_round_to_nearest(smollm2_gguf, smollm2_int4, tmp_path):
    from quadapt.runtime.api.perplexity import perplexity

    gptq = convert_checkpoint(smollm2_gguf, tmp_path / "gptq", "int4", calibration="gptq", calib_text=CALIB_TEXT)
    ids = Tokenizer.from_dir(gptq).encode(EVAL_TEXT.read_text())[:1024]
    with torch.inference_mode():
        rtn_ppl = perplexity(load_model(smollm2_int4), ids, window=512).perplexity
        gptq_ppl = perplexity(load_model(gptq), ids, window=512).perplexity
    assert gptq_ppl < rtn_ppl
