"""Shared pieces of the demo-adapter scripts: the question generator, the two answer styles and
their checks, and a batched greedy generator over quadapt's engine.

This is example code for `examples/demo_adapters/make_data.py` and `evaluate.py`; it is not part
of the quadapt package.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence

STYLES = ("capitals", "json")
MAX_ANSWER_TOKENS = 48
HELD_OUT = 50  # the first questions of the seeded order, never trained on

_TOPICS = [
    "photosynthesis", "gravity", "a volcano", "the moon", "a rainbow", "electricity", "a glacier", "the ocean tide",
    "a black hole", "democracy", "inflation", "a vaccine", "the internet", "a computer virus", "an earthquake",
    "a hurricane", "the water cycle", "a solar eclipse", "evolution", "a desert", "the immune system", "a star",
    "the stock market", "a bicycle", "a telescope", "recycling", "a thunderstorm", "a battery", "the heart",
    "a library", "a bridge", "a compass", "a microscope", "the brain", "a rainforest", "climate change", "a fossil",
    "a magnet", "a piano", "the alphabet", "a calendar", "an airplane", "a satellite", "a museum", "a dictionary",
]
_ANIMALS = [
    "cats", "dogs", "elephants", "dolphins", "owls", "penguins", "bees", "sharks", "horses", "tigers", "frogs",
    "eagles", "whales", "ants", "camels", "octopuses", "bats", "wolves", "turtles", "parrots", "kangaroos", "snakes",
]
_FOODS = ["bread", "pancakes", "a salad", "rice", "tea", "soup", "an omelette", "lemonade", "pasta", "popcorn", "toast",
          "cookies", "pizza", "yogurt", "coffee", "hummus", "chili", "a smoothie", "fried eggs", "oatmeal"]
_SKILLS = [
    "learn a new language", "sleep better", "save money", "stay focused", "make friends", "write a good essay",
    "prepare for an exam", "start running", "keep a plant alive", "organize a desk", "remember names", "cook rice",
]
_PLACES = ["France", "Japan", "Brazil", "Egypt", "Canada", "India", "Italy", "Kenya", "Mexico", "Norway", "Spain", "Germany", "Peru",
           "Australia", "China", "Greece", "Turkey", "Ireland", "Vietnam", "Morocco"]

TEMPLATES = [
    ("What is {}?", _TOPICS), ("Explain {} in simple words.", _TOPICS), ("Why is {} important?", _TOPICS),
    ("Tell me one fact about {}.", _ANIMALS), ("What do {} eat?", _ANIMALS), ("Where do {} live?", _ANIMALS),
    ("How do I make {}?", _FOODS), ("Is {} healthy?", _FOODS), ("How can I {}?", _SKILLS),
    ("Give me a tip to {}.", _SKILLS), ("What is the capital of {}?", _PLACES),
    ("What is {} famous for?", _PLACES), ("Describe {} in one sentence.", _TOPICS),
    ("How long do {} live?", _ANIMALS), ("Are {} dangerous?", _ANIMALS), ("What does {} taste like?", _FOODS),
    ("What language is spoken in {}?", _PLACES), ("What is the weather like in {}?", _PLACES),
    ("What is the first step to {}?", _SKILLS),
]


def questions(seed: int = 0) -> list[str]:
    """Every distinct question the templates make, in a seeded random order."""
    out = sorted({t.format(w) for t, words in TEMPLATES for w in words})
    random.Random(seed).shuffle(out)
    return out


def first_sentences(text: str) -> str:
    """`text` cut after its last complete sentence (kept whole when it has none), stripped."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
    return text[: ends[-1]].strip() if ends else text


def first_sentence_only(text: str) -> str:
    """`text` cut after its first complete sentence (kept whole when it has none), stripped."""
    text = text.strip()
    end = re.search(r"[.!?](\s|$)", text)
    return text[: end.end()].strip() if end else text


def transform(style: str, answer: str) -> str:
    """The base model's answer in the adapter's style: all of it in capitals, or its first
    sentence only as `{"answer": ...}` (a short object closes before a repetition loop starts)."""
    if style == "capitals":
        return answer.upper()
    return json.dumps({"answer": first_sentence_only(answer)})


def follows(style: str, text: str) -> bool:
    """Whether a generated answer follows the style: all letters capital (and at least one
    letter), or a JSON object with an "answer" key."""
    text = text.strip()
    if style == "capitals":
        return any(c.isalpha() for c in text) and text == text.upper()
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and "answer" in value


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def greedy_answers(model_dir: str, prompts: Sequence[str], *, adapter: str | None = None,
                   max_new_tokens: int = MAX_ANSWER_TOKENS, batch: int = 32, threads: int | None = None) -> list[str]:
    """Greedy answers of the model at `model_dir` (with `adapter`, a PEFT directory, if given) to
    each question, as one chat turn, through the batching engine."""
    from quadapt.runtime.api.llm import LLM, GenerateRequest
    from quadapt.runtime.engine.sampling import SamplingParams

    llm = LLM(
        model_dir, adapters={"demo": str(adapter)} if adapter else {}, threads=threads, max_num_seqs=batch,
        max_num_batched_tokens=1024, max_loras=1 if adapter else 0,
    )
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    answers: list[str] = []
    for start in range(0, len(prompts), 2 * batch):
        chunk = prompts[start : start + 2 * batch]
        requests = [GenerateRequest(messages(q), params, adapter="demo" if adapter else None) for q in chunk]
        answers += [c.text for c in llm.generate(requests)]
        logging.getLogger("demo").info("%d of %d answers", len(answers), len(prompts))
    return answers
