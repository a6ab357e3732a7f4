"""Make the demo adapters' training data by self-distillation, and their held-out questions.

The questions come from templates and word lists (`common.questions`); the answers are the base
model's own greedy answers (at most 48 new tokens, cut after the last complete sentence),
transformed (`common.transform`): all capital letters for `capitals`, only the first sentence as
`{"answer": ...}` in JSON for `json`. The first 50 questions of the seeded order are held out for
`evaluate.py` and never trained on.

    python examples/demo_adapters/make_data.py --model SMOLLM2_NF4_DIR --out examples/demo_adapters/data

Writes `OUT/capitals.jsonl` and `OUT/json.jsonl` (chat messages, for `quadapt train`) and
`OUT/heldout.jsonl` (questions only). Not a test and not part of the quadapt package.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from common import HELD_OUT, MAX_ANSWER_TOKENS, STYLES, first_sentences, greedy_answers, messages, questions, transform


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base checkpoint (the NF4 conversion of SmolLM2)")
    parser.add_argument("--out", required=True, help="directory for the JSONL files")
    parser.add_argument("--train-size", type=int, default=200, help="training questions (default 200)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    qs = questions()
    held_out, train = qs[:HELD_OUT], qs[HELD_OUT : HELD_OUT + args.train_size]
    start = time.perf_counter()
    answers = greedy_answers(args.model, train, max_new_tokens=MAX_ANSWER_TOKENS, threads=args.threads)
    logging.info("%d answers in %.0f s", len(answers), time.perf_counter() - start)
    pairs = [(q, first_sentences(a)) for q, a in zip(train, answers) if first_sentences(a)]
    for style in STYLES:
        rows = [{"messages": messages(q) + [{"role": "assistant", "content": transform(style, a)}]} for q, a in pairs]
        _write_jsonl(out / f"{style}.jsonl", rows)
    _write_jsonl(out / "heldout.jsonl", [{"question": q} for q in held_out])
    logging.info("wrote %d training rows per style and %d held-out questions to %s", len(pairs), len(held_out), out)


if __name__ == "__main__":
    main()
