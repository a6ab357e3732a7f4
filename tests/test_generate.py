"""The reference generator on a tiny random `CausalLM`, against transformers' `generate` on the same weights.

A random model's next-token distribution is nearly uniform (high entropy), so different seeds
give different samples, and its greedy output is some fixed token sequence that the stop
conditions can be tested against.
"""

from __future__ import annotations

import pytest
import torch

from quadapt.runtime.checkpoints import TokenizerFiles
from quadapt.runtime.model.config import ModelConfig
from quadapt.runtime.errors import ContextLengthError, InvalidParameterError, QuadaptError, UnsupportedError
from quadapt.runtime.api.generate import generate_ids, generate_text
from quadapt.runtime.model.model import CausalLM
from quadapt.runtime.engine.sampling import SamplingParams
from quadapt.runtime.text.tokenizer import Tokenizer

from .conftest import tiny_llama_config
from .test_tokenizer import build_chatml_dir

PROMPT = [5, 17, 99, 3, 250, 42]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def make_model(**overrides) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_dict(tiny_llama_config(**overrides))).eval()
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return make_model()


@pytest.fixture(scope="module")
def greedy(model) -> list[int]:
    """The model's greedy continuation of PROMPT, eos ignored."""
    return list(generate_ids(model, PROMPT, GREEDY, eos_token_ids=set()))


def first_new(tokens: list[int], start: int = 2) -> tuple[int, int]:
    """(index, token) of the first token at or after `start` that does not occur before it."""
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i, tokens[i]
    raise AssertionError(f"no fresh token in {tokens}")


def test_greedy_matches_a_no_cache_recompute(model, greedy):
    ids = list(PROMPT)
    for _ in range(len(greedy)):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(PROMPT) :]


def test_greedy_does_not_depend_on_the_seed(model, greedy):
    for seed in (None, 1, 2**40):
        params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, seed=seed)
        assert list(generate_ids(model, PROMPT, params, set())) == greedy


def test_seed_reproduces_and_different_seeds_differ(model):
    def run(seed):
        return list(generate_ids(model, PROMPT, SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed), set()))

    assert run(7) == run(7)
    outputs = {tuple(run(seed)) for seed in (1, 2, 3)}
    assert len(outputs) == 3, "high-entropy logits should give each seed its own sample"
    assert run(None) != run(None), "without a seed each call draws a fresh one"


def test_generation_leaves_the_global_rng_alone(model):
    state = torch.get_rng_state()
    list(generate_ids(model, PROMPT, SamplingParams(max_new_tokens=4, temperature=1.0, seed=3), set()))
    list(generate_ids(model, PROMPT, SamplingParams(max_new_tokens=4, temperature=1.0), set()))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.fixture(scope="module")
def hf_twin(model):
    """transformers' Llama with the same weights (quadapt's stacked q/k/v and gate/up under HF's names)."""
    from quadapt.runtime.model.fused import checkpoint_state_dict

    import transformers

    fields = tiny_llama_config()
    for key in ("architectures", "model_type", "torch_dtype"):
        fields.pop(key)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    hf.load_state_dict(checkpoint_state_dict(model), strict=True)
    hf.generation_config.eos_token_id = None  # compare fixed-length outputs
    return hf


def hf_generate(hf, params: SamplingParams, seed: int = 0) -> list[int]:
    torch.manual_seed(seed)  # transformers samples from the global generator
    out = hf.generate(
        torch.tensor([PROMPT]),
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        temperature=params.temperature if not params.greedy else None,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        pad_token_id=0,
    )
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=16, temperature=0.0),
        SamplingParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=16, temperature=1.0, seed=11),
        SamplingParams(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=5),
    ],
    ids=["greedy", "greedy-penalty", "sample", "sample-all"],
)
def test_equals_transformers_generate(model, hf_twin, params):
    """A seeded request draws the same tokens as transformers' `generate` seeded alike."""
    ours = list(generate_ids(model, PROMPT, params, set()))
    assert ours == hf_generate(hf_twin, params, seed=params.seed or 0)


def test_eos_stops_and_is_not_yielded(model, greedy):
    i, eos = first_new(greedy)
    gen = generate_ids(model, PROMPT, SamplingParams(max_new_tokens=24, temperature=0), {eos})
    assert list(gen) == greedy[:i]
    assert (gen.result.finish_reason, gen.result.stop_reason) == ("stop", eos)
    assert gen.result.completion_tokens == i + 1 and gen.result.prompt_tokens == len(PROMPT)


def test_ignore_eos_runs_on(model, greedy):
    _, eos = first_new(greedy)
    gen = generate_ids(model, PROMPT, GREEDY, {eos})
    assert list(gen) == greedy and gen.result.finish_reason == "length"


def test_stop_token_ids_stop_even_when_ignoring_eos(model, greedy):
    i, stop = first_new(greedy, start=4)
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    gen = generate_ids(model, PROMPT, params, set())
    assert list(gen) == greedy[:i] and (gen.result.finish_reason, gen.result.stop_reason) == ("stop", stop)


def test_max_new_tokens(model, greedy):
    gen = generate_ids(model, PROMPT, SamplingParams(max_new_tokens=5, temperature=0), set())
    assert list(gen) == greedy[:5]
    assert (gen.result.finish_reason, gen.result.completion_tokens) == ("length", 5)


def test_context_limit_ends_with_length():
    small = make_model(max_position_embeddings=10)
    gen = generate_ids(small, PROMPT, SamplingParams(max_new_tokens=50, temperature=0), set())
    assert len(list(gen)) == 10 - len(PROMPT) and gen.result.finish_reason == "length"
    one = generate_ids(small, list(range(9)), SamplingParams(max_new_tokens=50, temperature=0), set())
    assert len(list(one)) == 1 and one.result.finish_reason == "length"


@pytest.mark.parametrize(
    ("max_new_tokens", "produced", "context_full"),
    [(50, 4, True), (3, 3, False), (4, 4, False)],
    ids=["context-cuts", "max-new-tokens-cuts", "both-on-the-same-token"],
)
def test_context_full_tells_the_context_from_max_new_tokens(max_new_tokens, produced, context_full):
    """A 10-position context leaves 4 tokens after the 6-token prompt; asking for exactly 4 gets
    all that was asked, so the context cut nothing."""
    small = make_model(max_position_embeddings=10)
    gen = generate_ids(small, PROMPT, SamplingParams(max_new_tokens=max_new_tokens, temperature=0), set())
    assert len(list(gen)) == produced
    assert (gen.result.finish_reason, gen.result.context_full) == ("length", context_full)


def test_prompt_errors(model):
    small = make_model(max_position_embeddings=10)
    with pytest.raises(ContextLengthError, match=r"prompt has 10 tokens .* context is 10.* at most 9 tokens"):
        generate_ids(small, list(range(10)), GREEDY, set())
    with pytest.raises(ContextLengthError, match="12 tokens"):
        generate_ids(small, list(range(12)), GREEDY, set())
    with pytest.raises(InvalidParameterError, match="empty"):
        generate_ids(model, [], GREEDY, set())
    with pytest.raises(InvalidParameterError, match=r"\[256\] are outside the model's vocabulary \[0, 256\)"):
        generate_ids(model, [1, 256], GREEDY, set())
    assert issubclass(ContextLengthError, QuadaptError)


def test_modes_do_not_leak_between_steps(model, greedy):
    gen = generate_ids(model, PROMPT, GREEDY, set())
    with torch.inference_mode():
        first = next(gen)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert [first, *gen] == greedy


def test_close_early(model, greedy):
    gen = generate_ids(model, PROMPT, GREEDY, set())
    assert next(gen) == greedy[0]
    gen.close()
    assert gen.result.finish_reason is None and list(gen) == []


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A real tokenizer and a tiny model over its whole vocabulary, and that pair's greedy output."""
    path = build_chatml_dir(tmp_path_factory.mktemp("chatml"))
    tokenizer = Tokenizer.from_dir(path)
    lm = make_model(vocab_size=tokenizer.vocab_size)
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    ids = list(generate_ids(lm, prompt, SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True), set()))
    return tokenizer, lm, prompt, ids, path


def run_text(chat, **kwargs):
    tokenizer, lm, prompt, _, _ = chat
    params = SamplingParams(max_new_tokens=40, temperature=0, **kwargs)
    gen = generate_text(lm, tokenizer, prompt, params)
    deltas = list(gen)
    # A random model emits stray UTF-8 bytes, so U+FFFD can be real output here; the tokenizer
    # tests check that valid text never streams half a character.
    assert all(deltas), "no empty deltas"
    return "".join(deltas), gen.result


def spanning_stop(tokenizer: Tokenizer, ids: list[int]) -> str:
    """A stop string made of the end of one token's text and the start of the next one's."""
    for a, b in zip(ids[3:], ids[4:]):
        left, right = tokenizer.decode([a]), tokenizer.decode([b])
        if left and right and "\ufffd" not in left + right and tokenizer.decode([a, b]) == left + right:
            return left[-1] + right[:2]
    raise AssertionError("no two neighbouring tokens decode cleanly")


def test_text_equals_decode_of_ids(chat):
    tokenizer, _, _, ids, _ = chat
    text, result = run_text(chat, ignore_eos=True)
    assert text == tokenizer.decode(ids) and result.finish_reason == "length" and not result.context_full


def test_stop_string_spanning_tokens(chat):
    tokenizer, _, _, ids, _ = chat
    full = tokenizer.decode(ids)
    stop = spanning_stop(tokenizer, ids)
    text, result = run_text(chat, ignore_eos=True, stop=["NEVER-THERE", stop])
    assert text == full[: full.index(stop)]
    assert (result.finish_reason, result.stop_reason) == ("stop", stop)
    assert result.completion_tokens < len(ids), "generation ends once the stop string is complete"


def test_held_back_text_is_released_when_no_stop_completes(chat):
    tokenizer, _, _, ids, _ = chat
    full = tokenizer.decode(ids)
    teaser = full[-2:] + "\x00"  # the output ends with this stop string's first two characters
    text, result = run_text(chat, ignore_eos=True, stop=[teaser])
    assert text == full and result.finish_reason == "length"


def test_eos_in_text_generation(chat):
    tokenizer, lm, prompt, ids, path = chat
    i, eos = first_new(ids)
    # The same tokenizer, with one of the greedy tokens as its only eos.
    files = TokenizerFiles((path / "tokenizer.json").read_text(), generation_config={"eos_token_id": eos})
    gen = generate_text(lm, Tokenizer.from_files(files), prompt, SamplingParams(max_new_tokens=40, temperature=0))
    assert "".join(gen) == tokenizer.decode(ids[:i])
    assert (gen.result.finish_reason, gen.result.stop_reason) == ("stop", eos)


def test_logprobs_are_refused_not_dropped(model):
    """Only the engine reports logprobs; the reference loop says so instead of ignoring the field."""
    with pytest.raises(UnsupportedError, match="reference generator does not report logprobs"):
        generate_ids(model, [1, 2], SamplingParams(max_new_tokens=2, logprobs=0), set())
