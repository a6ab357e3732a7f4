"""Rate the demo adapters on their 50 held-out questions, beside the base model.

For each question (never trained on: `make_data.py` holds them out), the greedy answer of the
base model and of each adapter on that base is checked against the adapter's style
(`common.follows`): all capital letters for `capitals`, a JSON object with an "answer" key for
`json`. Answers stop at 48 new tokens, as the training answers did, except the json adapter's
(96: its object must close to parse). Prints one table of rates, and with --show the answers to
the first questions.

    python examples/demo_adapters/evaluate.py --model SMOLLM2_NF4_DIR \
        --adapters examples/adapters/capitals examples/adapters/json

Not a test and not part of the quadapt package.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from common import HELD_OUT, MAX_ANSWER_TOKENS, follows, greedy_answers
from common import questions as all_questions

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base checkpoint the adapters were trained on")
    parser.add_argument("--adapters", nargs="*", default=[], help="adapter directories named capitals and/or json")
    parser.add_argument("--base-answers", default=None,
                        help="a JSON file of the base model's answers: read if it exists, else written")
    parser.add_argument("--max-new-tokens", type=int, default=96,
                        help="for JSON answers, which must close to parse; others stop at 48 (default 96)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--show", type=int, default=0, help="print the answers to the first N questions")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    questions = all_questions()[:HELD_OUT]  # as make_data.py held them out (data/heldout.jsonl)
    cache = Path(args.base_answers) if args.base_answers else None
    if cache is not None and cache.is_file():
        base = json.loads(cache.read_text())
    else:
        base = greedy_answers(args.model, questions, max_new_tokens=MAX_ANSWER_TOKENS, threads=args.threads)
        if cache is not None:
            cache.write_text(json.dumps(base, indent=1))
    rows = []
    for adapter in args.adapters:
        style = Path(adapter).name
        limit = args.max_new_tokens if style == "json" else MAX_ANSWER_TOKENS
        answers = greedy_answers(args.model, questions, adapter=adapter, max_new_tokens=limit, threads=args.threads)
        base_rate = sum(follows(style, a) for a in base) / len(questions)
        rate = sum(follows(style, a) for a in answers) / len(questions)
        rows.append((style, adapter, rate, base_rate))
        for q, a, b in list(zip(questions, answers, base))[: args.show]:
            print(f"[{style}] {q}\n  base:    {b!r}\n  adapter: {a!r}")
    print(f"\n{len(questions)} held-out questions, greedy; at most {MAX_ANSWER_TOKENS} new tokens "
          f"({args.max_new_tokens} for the json adapter, whose object must close to parse)")
    print("| adapter | style check | adapter | base model |")
    print("|---|---|---|---|")
    checks = {"capitals": "all letters capital", "json": 'parses as a JSON object with "answer"'}
    for style, adapter, rate, base_rate in rows:
        print(f"| {adapter} | {checks.get(style, style)} | {rate:.0%} | {base_rate:.0%} |")


if __name__ == "__main__":
    main()
