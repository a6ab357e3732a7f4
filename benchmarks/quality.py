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

    python benchmarks/quality.py [--only int8 int4-g64-gptq ...] [--peers] [--texts FILE ...] [--threads 2]
                                 [--cache DIR] [--max-tokens N] [--calib-tokens N] [--calib-text FILE ...]

`--peers` adds the peers' own quantizers (`benchmarks/peers.py`, the `bench` extra): llama.cpp's
Q8_0, Q5_K_M, Q4_K_M and Q4_0 from an F32 GGUF of the same weights, and onnxruntime-genai's int4
model built from the same float checkpoint, scored through their own logits on the same token ids
and windows. Every row gives its bits per weight: the stored bytes of the linear layers and the
output head (the embedding, when tied to it) times 8, over their weights.

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

from quadapt.benchmarks.peers import GENAI_ROW, PEER_ROWS, GenaiLogits, LlamaCppLogits, bits_per_weight, genai_model, llama_cpp_model

DATA = Path(__file__).parent / "data"
HELDOUT_TEXTS = [DATA / "ml_prose.txt", DATA / "licence.txt", DATA / "python_reference.txt"]
# two more kinds, scored beside the peers' quantizers (`benchmarks/peers.py`)
OTHER_TEXTS = [DATA / "python_source.txt", DATA / "markdown_readme.txt"]

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


def evaluate(model: Path | str, texts: list[Path], max_tokens: int | None = None, run=None) -> list[float]:
    """Perplexity of the model on each text (window 1024, stride 512: eval-ppl's defaults), on
    its first `max_tokens` tokens when given. `run` scores a peer's model (`peers.py`) on the token
    ids of quadapt's checkpoint `model` instead of that checkpoint."""
    from quadapt.runtime.checkpoints import open_checkpoint
    from quadapt.runtime.checkpoints.loader import load_model
    from quadapt.runtime.api.perplexity import perplexity
    from quadapt.runtime.text.tokenizer import Tokenizer

    reader = open_checkpoint(model)
    tokenizer = Tokenizer.from_files(reader.tokenizer_files())
    loaded = run if run is not None else load_model(reader)
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
    if not stamp.exists():  # the float row's and the peers'; a converted row's is written by `convert`
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"row": None, "seconds": None, "scores": {}}))
    record = json.loads(stamp.read_text())
    if key not in record["scores"]:
        record["scores"][key] = compute()
        stamp.write_text(json.dumps(record))
    return record["scores"][key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[*ROWS, *PEER_ROWS], help="rows to run (default: quadapt's)")
    parser.add_argument("--peers", action="store_true", help="add the peers' rows (`benchmarks/peers.py`)")
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
    results: dict[str, tuple[list[float], float]] = {}
    directory = args.cache or Path(tempfile.mkdtemp(prefix="quadapt-quality-"))
    directory.mkdir(parents=True, exist_ok=True)
    key = json.dumps([[str(t) for t in args.texts], args.max_tokens])
    try:
        for name in args.only or [*ROWS, *(PEER_ROWS if args.peers else ())]:
            seconds = None
            if name in PEER_ROWS:
                ppl, bits = peer_row(name, gguf, directory, args.texts, args.max_tokens, args.threads, key)
            elif ROWS[name] is None:
                ppl = cached_scores(directory, name, key, lambda: evaluate(gguf, args.texts, args.max_tokens))
                bits = 32.0  # the GGUF's weights dequantized to float32
            else:
                out, seconds = convert(gguf, name, directory, args.cache is not None, args.calib_tokens, args.calib_text)
                ppl = cached_scores(directory, name, key, lambda out=out: evaluate(out, args.texts, args.max_tokens))
                bits = bits_per_weight(out)
                if args.cache is None:
                    shutil.rmtree(out)
            results[name] = (ppl, bits)
            took = "" if name in PEER_ROWS or ROWS[name] is None else (
                ", cached" if seconds is None else f", converted in {seconds:.0f} s"
            )
            print(f"{name}: perplexity {' / '.join(f'{p:.2f}' for p in ppl)} ({bits:.2f} bits per weight{took})", flush=True)
    finally:
        if args.cache is None:
            shutil.rmtree(directory, ignore_errors=True)

    base = results.get("float", (None,))[0]
    header = " | ".join(text.stem for text in args.texts)
    print(f"\n| model | bits per weight | {header} | geometric mean vs float |")
    print("|---|---|" + "---|" * len(args.texts) + "---|")
    for name, (ppl, bits) in results.items():
        if base:
            ratios = [p / b for p, b in zip(ppl, base)]
            cells = [f"{p:.2f} ({r:.3f}x)" for p, r in zip(ppl, ratios)]
            mean = f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}x"
        else:
            cells, mean = [f"{p:.2f}" for p in ppl], "n/a"
        print(f"| {name} | {bits:.2f} | " + " | ".join(cells) + f" | {mean} |")


def peer_row(
    name: str, gguf: Path, directory: Path, texts: list[Path], max_tokens: int | None, threads: int, key: str
) -> tuple[list[float], float]:
    """A peer's quantized model (built under DIR/peers on first use): its perplexities and bits per weight."""
    from quadapt.converters.fetch import fetch_default

    work = directory / "peers"
    if name == GENAI_ROW:
        float_dir = directory / "float-hf"
        if not (float_dir / "config.json").exists():
            fetch_default(float_dir, overwrite=True)
        model = genai_model(float_dir, work)

        def run():
            return GenaiLogits(model, threads)
    else:
        model = llama_cpp_model(gguf, name, work)

        def run():
            return LlamaCppLogits(model, threads)
    ppl = cached_scores(directory, name, key, lambda: evaluate(gguf, texts, max_tokens, run=run()))
    return ppl, bits_per_weight(model)


if __name__ == "__main__":
    main()
