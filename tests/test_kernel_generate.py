"""`quadapt generate` through the Triton kernels prints what the torch references print.

A tiny Llama is quantized to each scheme; greedy text from `QUADAPT_KERNELS=triton` (Triton's
interpreter on CPU, set in conftest) must equal `QUADAPT_KERNELS=reference`, with and without a
LoRA adapter, so the runtime's quantized and LoRA modules really run through the kernels.
"""

from __future__ import annotations

import pytest
from peft import LoraConfig

from quadapt.cli import main
from quadapt.converters.convert import convert_checkpoint

from .test_adapters import make_peft_adapter
from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

pytest.importorskip("triton")

SCHEMES = {"int4": {"group_size": 32}, "int4-asym": {"group_size": 32}, "nf4": {}, "int8": {}}


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    # Every input size a multiple of 32, so int4 with group 32 quantizes every linear.
    _, path = save_hf_model(tmp_path_factory.mktemp("kernel-generate"), "llama", vocab_size=512, intermediate_size=128)
    return build_chatml_dir(path)


@pytest.fixture(scope="module")
def adapter(float_model, tmp_path_factory):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return make_peft_adapter(float_model, tmp_path_factory.mktemp("adapter") / "a", config=config, seed=3)


def greedy_text(capsys, monkeypatch, backend: str, model, adapter=None) -> str:
    monkeypatch.setenv("QUADAPT_KERNELS", backend)
    argv = ["generate", "--model", str(model), "--prompt", "hello world", "--max-new-tokens", "8", "--ignore-eos"]
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_triton_and_reference_print_the_same_text(capsys, monkeypatch, tmp_path, float_model, adapter, scheme, with_adapter):
    quantized = convert_checkpoint(float_model, tmp_path / scheme, scheme, **SCHEMES[scheme])
    lora = adapter if with_adapter else None
    reference = greedy_text(capsys, monkeypatch, "reference", quantized, lora)
    assert len(reference.strip()) > 0
    assert greedy_text(capsys, monkeypatch, "triton", quantized, lora) == reference


def test_the_adapter_changes_the_text(capsys, monkeypatch, tmp_path, float_model, adapter):
    """Negative control: the comparison above would pass vacuously if --adapter did nothing."""
    quantized = convert_checkpoint(float_model, tmp_path / "int8", "int8")
    assert greedy_text(capsys, monkeypatch, "triton", quantized, adapter) != greedy_text(
        capsys, monkeypatch, "triton", quantized
    )


def test_the_triton_path_is_taken(capsys, monkeypatch, tmp_path, float_model):
    """With the interpreter off, the triton backend must refuse CPU tensors: proof it is dispatched to."""
    quantized = convert_checkpoint(float_model, tmp_path / "nf4", "nf4")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QUADAPT_KERNELS", "triton")
    assert main(["generate", "--model", str(quantized), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err

