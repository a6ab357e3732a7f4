"""PEFT adapters in quadapt against peft itself: logits, convert-adapter, extraction, merging, and errors.

Adapters are made by the `peft` library on a tiny transformers Llama with random non-zero B (peft
initializes B to zero, which would make every comparison vacuous). The reference is always
`PeftModel.from_pretrained` on transformers in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from quadapt.cli import main
from quadapt.converters.adapters import convert_adapter
from quadapt.converters.convert import convert_checkpoint
from quadapt.converters.extract import REPORT_FILE, extract_adapter
from quadapt.converters.merge import merge_adapter
from quadapt.runtime.checkpoints.peft import read_peft_adapter
from quadapt.runtime.checkpoints.adapters import apply_adapter
from quadapt.runtime.errors import AdapterError, QuadaptError
from quadapt.runtime.checkpoints.loader import load_model

from .conftest import assert_close
from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

VOCAB = 512


def make_base(parent: Path, **overrides) -> Path:
    """A tiny random Llama checkpoint with a tokenizer beside it (`overrides`: config fields)."""
    _, path = save_hf_model(parent, "llama", vocab_size=VOCAB, **overrides)
    return build_chatml_dir(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))


def hf_model(path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def make_peft_adapter(base_dir, out, *, seed: int = 0, config=None, **lora_kwargs):
    """Save an adapter made by peft on the base, with B drawn at random."""
    model = get_peft_model(hf_model(base_dir), config or LoraConfig(**lora_kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


def peft_logits(base_dir, adapter_dir, ids) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(hf_model(base_dir), adapter_dir).eval()(ids).logits


def quadapt_logits(base_dir, adapter_dir, ids) -> torch.Tensor:
    model = load_model(base_dir)
    if adapter_dir is not None:
        apply_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(ids)


CONFIGS = {
    "qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "mlp": {"r": 8, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "all-linear": {"r": 6, "lora_alpha": 3, "target_modules": "all-linear"},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"]},
    "patterns": {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj", "gate_proj", "down_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        "alpha_pattern": {"o_proj": 3, "^model.layers.0.mlp.gate_proj": 5},
    },
    "rslora-regex-patterns": {
        "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": r".*\.(v|o|up)_proj",
        "rank_pattern": {"up_proj": 8}, "alpha_pattern": {"layers.0.self_attn.o_proj": 20},
    },
    "layers-exclude": {
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"], "layers_to_transform": [1],
        "exclude_modules": ["k_proj"],
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_adapter_matches_peft_directly_and_after_convert(base, ids, tmp_path, name):
    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS[name])
    reference = peft_logits(base, adapter, ids)
    assert (reference - quadapt_logits(base, None, ids)).abs().max() > 1e-3  # the adapter does something
    assert_close(quadapt_logits(base, adapter, ids), reference, msg="from the peft dir")

    out = tmp_path / "normalized"
    convert_adapter(base, adapter, out)
    assert_close(quadapt_logits(base, out, ids), reference, msg="quadapt after convert-adapter")
    assert_close(peft_logits(base, out, ids), reference, msg="peft on convert-adapter output")
    # The weights are copied, not recomputed.
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_normalized_config_is_explicit(base, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS["patterns"])
    convert_adapter(base, adapter, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "o_proj", "q_proj"]
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {
        r"model\.layers\.0\.mlp\.down_proj": 6, r"model\.layers\.1\.mlp\.down_proj": 6,
        r"model\.layers\.1\.self_attn\.q_proj": 2,
    }
    assert config["alpha_pattern"] == {
        r"model\.layers\.0\.mlp\.gate_proj": 5, r"model\.layers\.0\.self_attn\.o_proj": 3,
        r"model\.layers\.1\.self_attn\.o_proj": 3,
    }
    with pytest.raises(QuadaptError, match="already exists"):
        convert_adapter(base, adapter, tmp_path / "out")
    convert_adapter(base, adapter, tmp_path / "out", overwrite=True)


def test_partial_layers_get_full_module_names(base, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS["layers-exclude"])
    convert_adapter(base, adapter, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]


# --- extraction ----------------------------------------------------------------------------------

DELTAS = {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.down_proj": 2, "model.layers.1.self_attn.v_proj": 4}


@pytest.fixture(scope="module")
def fine_tune(base, tmp_path_factory):
    """The base plus known low-rank deltas on three projections and a changed norm; returns (dir, deltas)."""
    model = hf_model(base)
    torch.manual_seed(7)
    deltas = {}
    with torch.no_grad():
        for name, rank in DELTAS.items():
            w = model.get_submodule(name).weight
            deltas[name] = torch.randn(w.shape[0], rank) @ torch.randn(rank, w.shape[1]) * 0.05
            w += deltas[name]
        model.model.norm.weight += 0.1
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    model.save_pretrained(out)
    return out, deltas


def test_extraction_recovers_a_low_rank_delta(base, fine_tune, ids, tmp_path):
    tuned, deltas = fine_tune
    report = extract_adapter(base, tuned, tmp_path / "lora", rank=4)
    assert sorted(report.modules) == sorted(DELTAS)
    for name, extraction in report.modules.items():
        assert extraction.retained_energy == pytest.approx(1.0, abs=1e-6), name
    assert len(report.unchanged) == 2 * 7 - 3 and "model.layers.1.mlp.up_proj" in report.unchanged
    assert list(report.not_captured) == ["model.norm.weight"]  # a LoRA cannot carry it: reported
    saved = json.loads((tmp_path / "lora" / REPORT_FILE).read_text())
    assert saved["modules"].keys() == report.modules.keys() and saved["not_captured"] == report.not_captured

    adapter = read_peft_adapter(tmp_path / "lora")
    for name, delta in deltas.items():
        assert adapter.modules[name].scale == 1.0
        assert_close(adapter.modules[name].delta(), delta, msg=name)
    reference = peft_logits(base, tmp_path / "lora", ids)
    assert_close(quadapt_logits(base, tmp_path / "lora", ids), reference)


def test_extraction_below_the_delta_rank_reports_lost_energy(base, fine_tune, tmp_path):
    tuned, _ = fine_tune
    report = extract_adapter(base, tuned, tmp_path / "lora", rank=2, target_modules=["q_proj", "v_proj"])
    energy = {n: e.retained_energy for n, e in report.modules.items()}
    assert sorted(energy) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert all(0.3 < e < 0.99 for e in energy.values()), energy
    assert "model.layers.0.mlp.down_proj.weight" in report.not_captured  # changed, but not a chosen target


def test_extraction_errors(base, fine_tune, tmp_path):
    tuned, _ = fine_tune
    with pytest.raises(AdapterError, match="'c_attn'.*choose from"):
        extract_adapter(base, tuned, tmp_path / "x", rank=2, target_modules=["c_attn"])
    with pytest.raises(AdapterError, match="rank 100 exceeds"):
        extract_adapter(base, tuned, tmp_path / "x", rank=100)
    with pytest.raises(AdapterError, match="nothing to extract"):
        extract_adapter(base, base, tmp_path / "x", rank=2)
    _, other = save_hf_model(tmp_path, "llama", vocab_size=VOCAB, intermediate_size=96)
    with pytest.raises(QuadaptError, match="intermediate_size"):
        extract_adapter(base, other, tmp_path / "x", rank=2)
    assert not (tmp_path / "x").exists()


# --- merging -------------------------------------------------------------------------------------


def test_merge_equals_peft_merge_and_unload(base, ids, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS["patterns"])
    merge_adapter(base, adapter, tmp_path / "merged")
    ours = hf_model(tmp_path / "merged")
    theirs = PeftModel.from_pretrained(hf_model(base), adapter).merge_and_unload().eval()
    expected = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert_close(tensor, expected[name], msg=name)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits)
    # merged equals unmerged in quadapt, and the tokenizer came along
    assert_close(quadapt_logits(tmp_path / "merged", None, ids), quadapt_logits(base, adapter, ids))
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()


# int4 groups must divide every input size; down_proj's 112 does not, so it stays float.
@pytest.mark.parametrize("scheme, options", [("int8", {}), ("int4", {"keep": ["down_proj"], "group_size": 32})])
def test_merge_then_quantize_equals_quantizing_the_merged_float(base, ids, tmp_path, scheme, options):
    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS["mlp"])
    merge_adapter(base, adapter, tmp_path / "float")
    convert_checkpoint(tmp_path / "float", tmp_path / "two-step", scheme, **options)
    merge_adapter(base, adapter, tmp_path / "one-step", scheme=scheme, **options)
    one, two = load_file(tmp_path / "one-step" / "model.safetensors"), load_file(tmp_path / "two-step" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # The adapter survives quantization: transformers on the quantized merge is nearer peft's adapted
    # logits than the base is (random tiny weights quantize poorly, so no tighter bound holds).
    with torch.no_grad():
        quantized = hf_model(tmp_path / "one-step")(ids).logits
        plain = hf_model(base)(ids).logits
    expected = peft_logits(base, adapter, ids)
    assert (quantized - expected).norm() < 0.5 * (plain - expected).norm()


def test_merge_options_need_a_scheme(base, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS["qv"])
    with pytest.raises(QuadaptError, match="group_size apply only with a quantization scheme"):
        merge_adapter(base, adapter, tmp_path / "q", group_size=32)
    with pytest.raises(QuadaptError, match="unknown scheme 'int3'"):
        merge_adapter(base, adapter, tmp_path / "q", scheme="int3")
    assert not (tmp_path / "q").exists()


# --- any linear-like base ------------------------------------------------------------------------


def test_adapter_on_a_quantized_like_base(base, ids, tmp_path):
    """LoRA wraps any module with in/out features and a forward, as the quantized modules will be."""
    from quadapt.runtime.model.fused import FusedLinear

    from .test_lora import Int8Linear

    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS["all-linear"])
    quantized, twin = load_model(base), load_model(base)
    for name, module in list(quantized.named_modules()):
        if isinstance(module, (torch.nn.Linear, FusedLinear)) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            stand_in = Int8Linear(module)
            if isinstance(module, FusedLinear):  # stacked q/k/v or gate/up: the stand-in keeps the sections
                stand_in.section_names, stand_in.section_sizes = module.section_names, module.section_sizes
            setattr(quantized.get_submodule(parent), child, stand_in)
            twin.get_submodule(name).weight.copy_(quantized.get_submodule(name).qweight * quantized.get_submodule(name).scale)
    apply_adapter(quantized, adapter)
    apply_adapter(twin, adapter)  # the same dequantized weights as float nn.Linear
    with torch.no_grad():
        assert_close(quantized(ids), twin(ids))


# --- command line --------------------------------------------------------------------------------


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what set-up printed (transformers' progress bars)
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_subcommands(base, fine_tune, ids, capsys, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS["rslora"])
    status, out, err = run(capsys, "convert-adapter", "--base", base, "--adapter", adapter, "--out", tmp_path / "conv")
    assert (status, out) == (0, "") and "8 LoRA modules" in err
    status, _, err = run(capsys, "merge-adapter", "--model", base, "--adapter", tmp_path / "conv", "--out", tmp_path / "merged")
    assert status == 0, err
    assert_close(quadapt_logits(tmp_path / "merged", None, ids), peft_logits(base, adapter, ids))
    status, _, err = run(capsys, "merge-adapter", "--model", base, "--adapter", adapter, "--out", tmp_path / "q8",
                         "--scheme", "int8", "--calibration", "mse")
    assert status == 0, err
    assert "quantization_config" in json.loads((tmp_path / "q8" / "config.json").read_text())
    status, _, err = run(capsys, "extract-adapter", "--base", base, "--tuned", fine_tune[0], "--rank", 4,
                         "--target-modules", "q_proj", "down_proj", "--out", tmp_path / "ext")
    assert status == 0, err
    assert "model.layers.0.self_attn.q_proj: rank 4, retained energy 1.000000" in err
    assert "model.layers.1.self_attn.q_proj: unchanged, skipped" in err
    assert "model.norm.weight: changed" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert-adapter", "--base", "{base}", "--adapter", "{dora}", "--out", "{tmp}/o"], "DoRA"),
        (["merge-adapter", "--model", "{base}", "--adapter", "{tmp}/none", "--out", "{tmp}/o"], "not a directory"),
        (["generate", "--model", "{base}", "--prompt", "x", "--adapter", "{dora}"], "DoRA"),
        (["merge-adapter", "--model", "{base}", "--adapter", "{dora}", "--out", "{tmp}/o", "--group-size", "32"],
         "apply only with a quantization scheme"),
    ],
)
def test_cli_errors_are_one_line(base, tmp_path, capsys, argv, message):
    dora = make_peft_adapter(base, tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    argv = [a.format(base=base, dora=dora, tmp=tmp_path) for a in argv]
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err.startswith("quadapt: error: ") and message in err and "Traceback" not in err


def test_cli_generate_with_adapter(base, capsys, tmp_path):
    from quadapt.runtime.text.tokenizer import Tokenizer

    adapter = make_peft_adapter(base, tmp_path / "peft", **CONFIGS["mlp"])
    status, out, err = run(capsys, "generate", "--model", base, "--prompt", "the sea", "--max-new-tokens", 8,
                           "--ignore-eos", "--adapter", adapter)
    assert status == 0, err
    tokenizer = Tokenizer.from_dir(base)
    ids = torch.tensor([tokenizer.encode("the sea")])
    model = load_model(base)
    apply_adapter(model, adapter)
    with torch.no_grad():
        for _ in range(8):  # greedy by hand, full recomputation each step
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out == tokenizer.decode(ids[0, -8:].tolist()) + "\n"
