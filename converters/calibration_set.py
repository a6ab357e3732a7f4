"""The default calibration set: broad text a calibrated conversion uses when the user gives none.

GPTQ and the activation-aware search fit each layer to the activations of a calibration text, and
a narrow text overfits: calibrated on one play, GPTQ made SmolLM2 worse than plain rounding on
every other kind of text. The default set is therefore wide rather than close to any one use:
every `.txt` file under `converters/calib/`, mixed sequence by sequence:

- `generated.txt`: answers SmolLM2-135M-Instruct samples itself (temperature 0.8, top-p 0.95,
  at most 320 tokens each) to `PROMPTS`: stories, explanations, dialogue, code, letters, lists,
  recipes, argument, poetry, across everyday, scientific, technical and historical subjects.
  Self-generated, sampled text is the data-free calibration of LLM-QAT (Liu et al., 2023): it
  follows the model's own distribution, so no domain is favoured by the choice of a corpus. It is
  made offline, not at conversion time, because sampling it takes many minutes on a CPU:
  `python -m quadapt.converters.calibration_set --model DIR` writes it (it needs transformers,
  from the `dev` extra);
- `shakespeare.txt`: Act I of Shakespeare's *Coriolanus* (public domain; the text
  `benchmarks/data/coriolanus_*.txt` also holds), verse dialogue.

How much: a layer's Hessian H = 2 X^T X / n is K x K (K its input width; SmolLM2's widest is
`down_proj`, 1,536), and its estimate is full rank only from K tokens on, and stable only from
many times K. `DEFAULT_CALIBRATION_TOKENS` (32,768, 21 x 1,536) is the budget; below
`MIN_TOKENS_PER_INPUT` x K fitting tokens a conversion warns, and below K it refuses. With
SmolLM2's tokenizer the shipped set is 28,887 tokens (21,722 generated, 7,165 Shakespeare), of
which 25,303 fit the layers (16 x 1,536) and 3,584 are held out for the checks.

This file names and reads the texts; it does not tokenize them (`calibrate.py`) or run a model
(except `generate_calibration_text`, an offline tool).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

CALIB_DIR = Path(__file__).parent / "calib"
DEFAULT_CALIBRATION_FILE = CALIB_DIR / "generated.txt"  # what `main` regenerates
DEFAULT_CALIBRATION_NAME = "default"  # what `--calib-text default` names
DEFAULT_CALIBRATION_TOKENS = 32768
MIN_TOKENS_PER_INPUT = 8  # fewer tokens than 8 x a layer's input width: a warning
SAMPLE_SEPARATOR = "\n\n"

# A spread of kinds of text (story, explanation, dialogue, code, letter, list, argument, poem) and
# of subjects; none names a text the quality benchmark scores.
PROMPTS: tuple[str, ...] = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Tell a story about two children who get lost in a city market.",
    "Write a fairy tale about a fox, a crow and a clever farmer.",
    "Describe a rainy afternoon in a small mountain village.",
    "Write a diary entry of a sailor on a long voyage.",
    "Tell a funny story about a robot learning to cook.",
    "Write the opening of a mystery novel set in a train station.",
    "Describe the life of a honeybee from the bee's point of view.",
    "Write a dialogue between a customer and a shopkeeper about a broken umbrella.",
    "Write a conversation between a teacher and a student who forgot their homework.",
    "Write a scene where two old friends meet after twenty years.",
    "Write an interview with a farmer about the harvest season.",
    "Write a phone call between a doctor and a worried parent.",
    "Write a debate between two people about whether cities should ban cars.",
    "Explain how photosynthesis works.",
    "Explain why the sky is blue.",
    "Explain how vaccines train the immune system.",
    "Explain the water cycle to a ten year old.",
    "What causes earthquakes, and how are they measured?",
    "Explain Newton's three laws of motion with examples.",
    "How do black holes form?",
    "Explain the difference between weather and climate.",
    "Explain how a bill becomes a law in a parliament.",
    "Describe the causes of the French Revolution.",
    "Summarize the history of the printing press.",
    "What was life like in ancient Rome for an ordinary family?",
    "Describe the Silk Road and why it mattered.",
    "Explain how the stock market works.",
    "What is inflation and why does it happen?",
    "Explain supply and demand with an everyday example.",
    "Give advice to someone starting their first job.",
    "How can I improve my sleep?",
    "What are good habits for studying a new language?",
    "Give tips for growing tomatoes on a balcony.",
    "Write a recipe for vegetable soup with step by step instructions.",
    "How do I bake bread at home?",
    "List ten ideas for a rainy weekend with kids, with a sentence on each.",
    "Plan a three day trip to a seaside town.",
    "Compare trains and planes for travelling across a country.",
    "Write a formal letter asking a landlord to repair the heating.",
    "Write an email to a colleague proposing a new meeting schedule.",
    "Write a thank-you note to a neighbour who helped you move.",
    "Write a product description for a reusable water bottle.",
    "Write a news report about a new public library opening.",
    "Write a review of a restaurant that serves only soup.",
    "Write a speech for a school graduation.",
    "Argue for and against homework in primary schools.",
    "Is it better to rent or to buy a house? Discuss.",
    "What are the benefits and risks of social media for teenagers?",
    "Write a poem about the ocean at night.",
    "Write a poem about autumn leaves.",
    "Write song lyrics about a long road trip.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Explain what a hash table is and how lookups work.",
    "Write a SQL query that finds the ten best-selling products, and explain each clause.",
    "Explain recursion with a factorial example in JavaScript.",
    "How does a computer store numbers in binary?",
    "Explain what an operating system does.",
    "Write a shell script that backs up a folder every night, with comments.",
    "Explain the difference between a list and a tuple in Python.",
    "How does the internet route a message from one computer to another?",
    "Explain how a neural network learns from examples.",
    "What is the difference between a virus and a bacterium?",
    "Describe how the human heart pumps blood.",
    "Explain what DNA is and how it is copied.",
    "How do plants know which way is up?",
    "Why do we have seasons?",
    "Describe the planets of the solar system one by one.",
    "Explain how electricity gets from a power station to a home.",
    "How does a bicycle stay upright?",
    "Explain the rules of chess to a beginner.",
    "Describe the history of the Olympic Games.",
    "Explain how to solve a quadratic equation, with a worked example.",
    "What is a prime number? Give examples and explain why there are infinitely many.",
    "Explain probability with dice and coins.",
    "Describe the main ideas of a famous philosopher in simple words.",
    "What makes a good friend?",
    "Write a short biography of an imaginary inventor.",
    "Write instructions for assembling a simple bookshelf.",
    "Explain the terms and conditions of a gym membership in plain language.",
    "Describe how a court trial proceeds from start to finish.",
    "Write a job advertisement for a museum guide.",
    "Summarize the plot of an adventure film you invent.",
)


def default_calibration_texts() -> list[tuple[str, str]]:
    """The shipped default calibration texts (every `.txt` under `converters/calib/`), as (label, text) pairs.

    Raises:
        FileNotFoundError: the package data is missing (a broken install).
    """
    paths = sorted(CALIB_DIR.glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no calibration text under {CALIB_DIR}; reinstall quadapt")
    return [(f"the default calibration set ({path.name})", path.read_text(encoding="utf-8")) for path in paths]


def generate_calibration_text(
    model_dir: str | Path, *, max_new_tokens: int = 320, batch_size: int = 28, seed: int = 0,
    prompts: tuple[str, ...] = PROMPTS,
) -> Iterator[str]:
    """Sample one answer per prompt of `PROMPTS` from a chat model (offline; needs transformers).

    Args:
        model_dir: a float Hugging Face checkpoint directory with a chat template.
        max_new_tokens: tokens sampled per answer at most.
        batch_size: prompts sampled together.
        seed: the sampling seed, so the shipped file can be reproduced.
        prompts: the prompts to answer (default: all of `PROMPTS`).

    Returns:
        The answers, batch by batch, as they are sampled.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # so every prompt ends where sampling starts
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for start in range(0, len(prompts), batch_size):
        rendered = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + batch_size]
        ]
        batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **batch, do_sample=True, temperature=0.8, top_p=0.95, repetition_penalty=1.1,
                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        yield from (text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True) if text.strip())
        logger.info("sampled %d/%d answers", min(start + batch_size, len(prompts)), len(prompts))


def main() -> None:
    """Regenerate the default calibration file (see the module docstring)."""
    parser = argparse.ArgumentParser(description="regenerate quadapt's default calibration text")
    parser.add_argument("--model", required=True, help="float HF checkpoint directory (SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=DEFAULT_CALIBRATION_FILE)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=28)
    parser.add_argument("--every", type=int, default=1, help="answer every N-th prompt only (a quicker, smaller set)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    answers: list[str] = []
    chosen = PROMPTS[:: args.every]
    for answer in generate_calibration_text(
        args.model, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, prompts=chosen
    ):
        answers.append(answer)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(SAMPLE_SEPARATOR.join(answers), encoding="utf-8")
        tmp.replace(args.out)  # atomic, after every answer: a reader never sees half a file


if __name__ == "__main__":
    main()
