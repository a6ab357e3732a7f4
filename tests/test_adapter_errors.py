"""Bad adapters and bad requests: each is refused with a specific error whose message says why.

Adapters are written by hand (small, exact mistakes) or made by `peft` with a feature the runtime
does not serve (DoRA, modules_to_save, biases, embedding LoRA, a non-LoRA type).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config
from safetensors.torch import save_file

from quadapt.converters.adapters import convert_adapter
from quadapt.converters.merge import merge_adapter
from quadapt.runtime.checkpoints.peft import read_peft_adapter
from quadapt.runtime.checkpoints.adapters import apply_adapter
from quadapt.runtime.errors import AdapterError, UnsupportedError
from quadapt.runtime.checkpoints.loader import load_model

from .test_adapters import CONFIGS, VOCAB, make_base, make_peft_adapter
from .test_model import save_hf_model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"))


def hand_adapter(path, *, config=None, tensors=None):
    """A minimal adapter written by hand: rank 2 on both layers' q_proj, then `config`/`tensors` overrides."""
    path.mkdir(parents=True, exist_ok=True)
    full = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    full.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(full))
    weights = {}
    for layer in (0, 1):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        weights[f"{prefix}.lora_A.weight"] = torch.randn(2, 64)
        weights[f"{prefix}.lora_B.weight"] = torch.randn(64, 2)
    weights.update(tensors or {})
    save_file({k: v for k, v in weights.items() if v is not None}, path / "adapter_model.safetensors")
    return path


V_PROJ = "base_model.model.model.layers.0.self_attn.v_proj"
BAD = {
    "module the base lacks": (
        {"tensors": {"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.randn(2, 64),
                      "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": torch.randn(64, 2)}},
        AdapterError, "layers.5.self_attn.q_proj.*lacks",
    ),
    "untargeted weights": (
        {"tensors": {f"{V_PROJ}.lora_A.weight": torch.randn(2, 64), f"{V_PROJ}.lora_B.weight": torch.randn(32, 2)}},
        AdapterError, "does not select.*PEFT would ignore",
    ),
    "targeted without weights": ({"config": {"target_modules": ["q_proj", "v_proj"]}}, AdapterError, "holds no LoRA weights"),
    "target typo": ({"config": {"target_modules": ["q_proj", "qproj"]}}, AdapterError, "'qproj' matches no module"),
    "rank mismatch": ({"config": {"r": 3}}, AdapterError, "rank 3"),
    "half a pair": ({"tensors": {"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": None}}, AdapterError, "no lora_B"),
    "NaN": ({"tensors": {"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.full((64, 2), float("nan"))}}, AdapterError, "NaN or Inf"),
    "Inf": ({"tensors": {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((2, 64), float("inf"))}}, AdapterError, "NaN or Inf"),
    "unexpected tensor": ({"tensors": {"base_model.model.lm_head.weight": torch.randn(VOCAB, 64)}}, AdapterError, "unexpected tensor"),
    "non-LoRA type": ({"config": {"peft_type": "LOHA"}}, UnsupportedError, "peft_type 'LOHA'"),
    "fan_in_fan_out": ({"config": {"fan_in_fan_out": True}}, UnsupportedError, "fan_in_fan_out"),
    "pissa": ({"config": {"init_lora_weights": "pissa"}}, UnsupportedError, "rewrites the base"),
    "unknown option": ({"config": {"fancy_variant": {"x": 1}}}, UnsupportedError, "fancy_variant"),
    "bad r": ({"config": {"r": 0}}, AdapterError, "r must be a positive integer"),
    "bad regex": ({"config": {"target_modules": ".*(q_proj"}}, AdapterError, "not a valid regular expression"),
    "lm_head factors": (
        {"config": {"target_modules": ["q_proj", "lm_head"]},
         "tensors": {"base_model.model.lm_head.lora_A.weight": torch.randn(2, 64),
                     "base_model.model.lm_head.lora_B.weight": torch.randn(VOCAB, 2)}},
        UnsupportedError, "'lm_head': LoRA on the embedding or lm_head is not supported",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_hand_made_adapters(base, tmp_path, case):
    kwargs, error, message = BAD[case]
    adapter = hand_adapter(tmp_path / "adapter", **kwargs)
    with pytest.raises(error, match=message):
        convert_adapter(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


PEFT_BAD = {
    "DoRA": ({"r": 2, "target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
    "modules_to_save": ({"r": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
    "bias": ({"r": 2, "target_modules": ["q_proj"], "bias": "all"}, "bias='all'"),
    "embedding LoRA": ({"r": 2, "target_modules": ["embed_tokens"]}, "embedding LoRA"),
    "lm_head LoRA": ({"r": 2, "target_modules": ["lm_head", "q_proj"]}, "embedding or lm_head"),
}


@pytest.mark.parametrize("case", sorted(PEFT_BAD))
def test_unsupported_peft_features(base, tmp_path, case):
    kwargs, message = PEFT_BAD[case]
    adapter = make_peft_adapter(base, tmp_path / "adapter", **kwargs)
    with pytest.raises(UnsupportedError, match=message):
        convert_adapter(base, adapter, tmp_path / "out")
    model = load_model(base)
    with pytest.raises(UnsupportedError, match=message):
        apply_adapter(model, adapter)


def test_non_lora_peft_type(base, tmp_path):
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    adapter = make_peft_adapter(base, tmp_path / "ia3", config=config)
    with pytest.raises(UnsupportedError, match="peft_type 'IA3'.*LORA adapters only"):
        read_peft_adapter(adapter)


def test_adapter_for_another_base(base, tmp_path):
    _, other = save_hf_model(tmp_path, "llama", vocab_size=VOCAB, intermediate_size=96)
    adapter = make_peft_adapter(other, tmp_path / "adapter", r=2, target_modules=["q_proj", "down_proj"])
    with pytest.raises(AdapterError, match=r"down_proj.*\[64, 96\].*\[64, 112\].*another base"):
        apply_adapter(load_model(base), adapter)
    with pytest.raises(AdapterError, match="another base"):
        convert_adapter(base, adapter, tmp_path / "out")


def test_missing_files(base, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "a", **CONFIGS["qv"])
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        read_peft_adapter(adapter)
    adapter = make_peft_adapter(base, tmp_path / "b", **CONFIGS["qv"])
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.bin: pickle files, which quadapt never loads"):
        read_peft_adapter(adapter)
    with pytest.raises(AdapterError, match="not a directory"):
        read_peft_adapter(tmp_path / "nowhere")


def test_merge_into_a_quantized_base_is_refused(base, tmp_path):
    adapter = make_peft_adapter(base, tmp_path / "adapter", **CONFIGS["qv"])
    quantized = tmp_path / "quantized"
    shutil.copytree(base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="is quantized.*Merge into the float model"):
        merge_adapter(quantized, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
