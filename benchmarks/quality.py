"""Perplexity of SmolLM2-135M-Instruct under each quantization scheme, beside the float model.

Each row runs what a user runs, through the same library calls as the CLI:

    quadapt convert --model SmolLM2.gguf --out DIR --scheme S [--group-size G] [--calibration C]
                    [--calib-text benchmarks/data/coriolanus_calib.txt]
    quadapt eval-ppl --model DIR --text benchmarks/data/coriolanus_eval.txt

The "float" row is the GGUF's weights dequantized to fp32 (the only weights available offline);
every scheme starts from them. GPTQ calibrates on a text disjoint from the evaluation text.
`--texts` scores each converted model on several texts (one column each): the calibration text
as a second text is held out for every row but GPTQ's, which calibrated on it.

    python benchmarks/quality.py [--only int8 int4-g64-gptq ...] [--texts FILE ...] [--threads 2]

Prints a markdown table (the source of docs/quality.md). Not a test.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
EVAL_TEXT = DATA / "coriolanus_eval.txt"
CALIB_TEXT = DATA / "coriolanus_calib.txt"

# name: (scheme, convert options); None is the float model itself.
ROWS: dict[str, tuple[str, dict] | None] = {
    "float": None,
    "int8": ("int8", {}),
    "int4-g64-minmax": ("int4", {"group_size": 64}),
    "int4-g64-mse": ("int4", {"group_size": 64, "calibration": "mse"}),
    "int4-g64-gptq": ("int4", {"group_size": 64, "calibration": "gptq"}),
    "int4-g64-gptq-actorder": ("int4", {"group_size": 64, "calibration": "gptq", "actorder": True}),
    "int4-g32-minmax": ("int4", {"group_size": 32}),
    "int4-g32-mse": ("int4", {"group_size": 32, "calibration": "mse"}),
    "int4-g32-gptq": ("int4", {"group_size": 32, "calibration": "gptq"}),
    "int4-asym-g32-minmax": ("int4-asym", {"group_size": 32}),
    "int4-asym-g32-mse": ("int4-asym", {"group_size": 32, "calibration": "mse"}),
    "int4-asym-g32-gptq": ("int4-asym", {"group_size": 32, "calibration": "gptq"}),
    "nf4": ("nf4", {}),
}


def evaluate(model: Path | str, texts: list[Path]) -> list[float]:
    """Perplexity of the model on each text (window 1024, stride 512: eval-ppl's defaults)."""
    from quadapt.runtime.checkpoints import open_checkpoint
    from quadapt.runtime.loader import load_model
    from quadapt.runtime.perplexity import perplexity
    from quadapt.runtime.tokenizer import Tokenizer

    reader = open_checkpoint(model)
    tokenizer = Tokenizer.from_files(reader.tokenizer_files())
    loaded = load_model(reader)
    return [perplexity(loaded, tokenizer.encode(text.read_text(encoding="utf-8"))).perplexity for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--texts", nargs="+", type=Path, default=[EVAL_TEXT], metavar="FILE", help="texts to score")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from quadapt.converters.convert import convert_checkpoint
    from quadapt.converters.fetch import default_gguf

    gguf = default_gguf()
    results: dict[str, tuple[list[float], float]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="quadapt-quality-"))
    try:
        for name in args.only or ROWS:
            start = time.perf_counter()
            if ROWS[name] is None:
                ppl = evaluate(gguf, args.texts)
            else:
                scheme, options = ROWS[name]
                if options.get("calibration") == "gptq":
                    options = {**options, "calib_text": CALIB_TEXT}
                out = convert_checkpoint(gguf, scratch / name, scheme, **options)
                ppl = evaluate(out, args.texts)
                shutil.rmtree(out)
            results[name] = (ppl, time.perf_counter() - start)
            print(f"{name}: perplexity {' / '.join(f'{p:.2f}' for p in ppl)} ({results[name][1]:.0f} s)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = results.get("float", (None,))[0]
    print("\n| model | " + " | ".join(f"{text.name} | vs float" for text in args.texts) + " |")
    print("|---|" + "---|---|" * len(args.texts))
    for name, (ppl, _) in results.items():
        cells = [f"{p:.2f} | " + (f"{100 * (p / b - 1):+.1f}%" if base else "n/a") for p, b in zip(ppl, base or ppl)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
