"""Perplexity of SmolLM2-135M-Instruct under each quantization scheme, on held-out texts of several kinds.

Each row runs what a user runs, through the same library calls as the CLI:

    quadapt convert --model SmolLM2.gguf --out DIR --scheme S [--group-size G] [--calibration C]
    quadapt eval-ppl --model DIR --text T          (for each held-out text T)

The calibrated rows (gptq, awq) use the default calibration set (`converters/calib/`: text the
model wrote itself, and Shakespeare). The texts scored (`benchmarks/data/README.md`) are of three kinds,
and no calibration saw any of them: technical prose about machine learning, a software licence,
the Python language reference. The table gives each text's perplexity, its ratio to the float
model's, and the geometric mean of the ratios.

The "float" row is the GGUF's weights dequantized to fp32 (the only weights available offline);
every scheme starts from them.

    python benchmarks/quality.py [--only int8 int4-g64-gptq ...] [--texts FILE ...] [--threads 2]
                                 [--cache DIR] [--max-tokens N] [--calib-tokens N] [--calib-text FILE ...]

`--cache DIR` keeps each converted model under DIR with its scores (and reuses both when the
row's options, texts and token limit match), so a rerun converts and scores only what changed. Prints one line per row as it finishes (with the conversion's time) and
then the markdown table (the source of docs/quality.md). Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
HELDOUT_TEXTS = [DATA / "ml_prose.txt", DATA / "licence.txt", DATA / "python_reference.txt"]

# name: (scheme, convert options); None is the float model itself.
ROWS: dict[str, tuple[str, dict] | None] = {
    "float": None,
    "int8": ("int8", {}),
    "int8-mse": ("int8", {"calibration": "mse"}),
    "int8-gptq": ("int8", {"calibration": "gptq"}),
    "nf4": ("nf4", {}),
    "int4-g64-minmax": ("int4", {"group_size": 64}),
    "int4-g64-mse": ("int4", {"group_size": 64, "calibration": "mse"}),
    "int4-g64-gptq": ("int4", {"group_size": 64, "calibration": "gptq"}),
    "int4-g64-awq": ("int4", {"group_size": 64, "calibration": "awq"}),
    "int4-g32-minmax": ("int4", {"group_size": 32}),
    "int4-g32-mse": ("int4", {"group_size": 32, "calibration": "mse"}),
    "int4-g32-gptq": ("int4", {"group_size": 32, "calibration": "gptq"}),
    "int4-g32-awq": ("int4", {"group_size": 32, "calibration": "awq"}),
    "int4-asym-g32-minmax": ("int4-asym", {"group_size": 32}),
    "int4-asym-g32-mse": ("int4-asym", {"group_size": 32, "calibration": "mse"}),
    "int4-asym-g32-gptq": ("int4-asym", {"group_size": 32, "calibration": "gptq"}),
    "int4-asym-g32-awq": ("int4-asym", {"group_size": 32, "calibration": "awq"}),
}


def evaluate(model: Path | str, texts: list[Path], max_tokens: int | None = None) -> list[float]:
    """Perplexity of the model on each text (window 1024, stride 512: eval-ppl's defaults), on
    its first `max_tokens` tokens when given."""
    from quadapt.runtime.checkpoints import open_checkpoint
    from quadapt.runtime.checkpoints.loader import load_model
    from quadapt.runtime.api.perplexity import perplexity
    from quadapt.runtime.text.tokenizer import Tokenizer

    reader = open_checkpoint(model)
    tokenizer = Tokenizer.from_files(reader.tokenizer_files())
    loaded = load_model(reader)
    ids = [tokenizer.encode(text.read_text(encoding="utf-8"))[:max_tokens] for text in texts]
    return [perplexity(loaded, text_ids).perplexity for text_ids in ids]


def convert(
    gguf: Path, name: str, directory: Path, cached: bool, calib_tokens: int | None, calib_text: list[Path] | None
) -> tuple[Path, float | None]:
    """Convert one row (or reuse its cached output); returns the model and the conversion's seconds."""
    from quadapt.converters.convert import convert_checkpoint

    scheme, options = ROWS[name]
    if calib_tokens and options.get("calibration") in ("gptq", "awq"):
        options = {**options, "calib_tokens": calib_tokens}
    if calib_text and options.get("calibration") in ("gptq", "awq"):
        options = {**options, "calib_text": calib_text}
    out = directory / name
    stamp = out / "benchmark_row.json"
    wanted = {"scheme": scheme, **{k: str(v) for k, v in options.items()}}
    if cached and stamp.exists() and json.loads(stamp.read_text())["row"] == wanted:
        return out, None
    start = time.perf_counter()
    convert_checkpoint(gguf, out, scheme, overwrite=True, **options)
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps({"row": wanted, "seconds": seconds, "scores": {}}))
    return out, seconds


def cached_scores(directory: Path, name: str, key: str, compute) -> list[float]:
    """The row's perplexities for `key` (texts and token limit), from its stamp or computed and stored."""
    stamp = directory / name / "benchmark_row.json"
    if name == "float" and not stamp.exists():
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"row": None, "seconds": None, "scores": {}}))
    record = json.loads(stamp.read_text())
    if key not in record["scores"]:
        record["scores"][key] = compute()
        stamp.write_text(json.dumps(record))
    return record["scores"][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--texts", nargs="+", type=Path, default=HELDOUT_TEXTS, metavar="FILE", help="texts to score")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR", help="keep converted models here")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only each text's first N tokens")
    parser.add_argument("--calib-tokens", type=int, default=None, help="calibration budget (default: the library's)")
    parser.add_argument(
        "--calib-text", nargs="+", type=Path, default=None, metavar="FILE",
        help="calibrate gptq/awq rows on these texts instead of the default set",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from quadapt.converters.fetch import default_gguf

    gguf = default_gguf()
    results: dict[str, tuple[list[float], float | None]] = {}
    directory = args.cache or Path(tempfile.mkdtemp(prefix="quadapt-quality-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.only or ROWS:
            seconds = None
            key = json.dumps([[str(t) for t in args.texts], args.max_tokens])
            if ROWS[name] is None:
                ppl = cached_scores(directory, name, key, lambda: evaluate(gguf, args.texts, args.max_tokens))
            else:
                out, seconds = convert(gguf, name, directory, args.cache is not None, args.calib_tokens, args.calib_text)
                ppl = cached_scores(directory, name, key, lambda out=out: evaluate(out, args.texts, args.max_tokens))
                if args.cache is None:
                    shutil.rmtree(out)
            results[name] = (ppl, seconds)
            took = "cached" if seconds is None and ROWS[name] else f"converted in {seconds or 0:.0f} s"
            print(f"{name}: perplexity {' / '.join(f'{p:.2f}' for p in ppl)} ({took})", flush=True)
    finally:
        if args.cache is None:
            shutil.rmtree(directory, ignore_errors=True)

    base = results.get("float", (None,))[0]
    header = " | ".join(text.stem for text in args.texts)
    print(f"\n| model | {header} | geometric mean vs float |")
    print("|---|" + "---|" * len(args.texts) + "---|")
    for name, (ppl, _) in results.items():
        if base:
            ratios = [p / b for p, b in zip(ppl, base)]
            cells = [f"{p:.2f} ({r:.3f}x)" for p, r in zip(ppl, ratios)]
            mean = f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}x"
        else:
            cells, mean = [f"{p:.2f}" for p in ppl], "n/a"
        print(f"| {name} | " + " | ".join(cells) + f" | {mean} |")


if __name__ == "__main__":
    main()
