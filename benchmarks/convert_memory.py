"""Peak memory of `quadapt convert` beside the model's largest tensor and the output's size.

Conversion streams: it should hold about one source tensor (the largest, when it passes) plus the
output shard being written, not the model. This converts SmolLM2-135M-Instruct (the default GGUF,
or a `quadapt fetch-default` directory) to int4 with round-to-nearest in a fresh subprocess and
measures two peaks of that process:

- peak RSS: `VmHWM` of /proc/self/status, read by the process itself at the end (the high-water
  mark of its own address space; `ru_maxrss` would also count the parent's RSS at fork, which
  Linux carries across exec). It includes file-backed pages: the shared libraries' code that
  torch touches as it works, and the memory-mapped source file.
- peak anonymous RSS: `RssAnon`, sampled by this script every few milliseconds: the memory the
  process allocated (tensors, buffers), which is what streaming bounds.

The same two figures for a process that imports torch and quadapt, opens the source and builds the
model on the meta device (no weights; torch initialises itself on its first module build) are the
baseline every quadapt command pays before it touches a weight. It prints the figures side by side and whether

    peak - baseline < 2 x largest tensor + output size

for each. The largest tensor is counted as the reader yields it: float32 (a GGUF reader
dequantizes), so for SmolLM2 it is the 49152 x 576 embedding, 113 MB.

    python benchmarks/convert_memory.py [--model PATH] [--scheme int4] [--calibration minmax]

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PEAK = "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')][0])"
_BASELINE = f"""
import sys, torch
import quadapt.converters.convert, quadapt.runtime.checkpoints.gguf, quadapt.runtime.checkpoints.hf
from quadapt.runtime.checkpoints import open_checkpoint
from quadapt.runtime.model.config import ModelConfig
from quadapt.runtime.model.model import CausalLM
with torch.device("meta"):  # torch initialises itself on first module build (~75 MB), weights or not
    CausalLM(ModelConfig.from_dict(open_checkpoint(sys.argv[1]).config_dict()))
{_PEAK}
"""
_CONVERT = f"""
import sys
from quadapt.converters.convert import convert_checkpoint
convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], calibration=sys.argv[4])
{_PEAK}
"""


def measure(code: str, *args: str, interval: float = 0.003) -> tuple[int, int]:
    """Run `code` in a fresh interpreter; return (its peak RSS, its sampled peak anonymous RSS) in bytes."""
    process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass  # the process is exiting
        time.sleep(interval)
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"subprocess failed ({process.returncode}):\n{err[-4000:]}")
    return int(out.strip().splitlines()[-1]) * 1024, peak_anon


def largest_tensor_bytes(model: str) -> tuple[str, int]:
    """The largest tensor as the reader yields it, from shapes alone (no tensor is read)."""
    import torch

    from quadapt.runtime.checkpoints import open_checkpoint
    from quadapt.runtime.model.config import ModelConfig
    from quadapt.runtime.model.model import checkpoint_shapes

    reader = open_checkpoint(model)
    config = reader.config_dict()
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    element = 4 if reader.path.suffix == ".gguf" else torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    shapes = checkpoint_shapes(ModelConfig.from_dict(config))
    name, shape = max(shapes.items(), key=lambda item: torch.Size(item[1]).numel())
    return name, torch.Size(shape).numel() * element


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir or .gguf (default: SmolLM2's GGUF, fetched once)")
    parser.add_argument("--scheme", default="int4")
    parser.add_argument("--calibration", default="minmax", choices=["minmax", "mse"])
    args = parser.parse_args()
    if args.model is None:
        from quadapt.converters.fetch import default_gguf

        args.model = str(default_gguf())

    name, largest = largest_tensor_bytes(args.model)
    base_rss, base_anon = measure(_BASELINE, args.model)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        peak_rss, peak_anon = measure(_CONVERT, args.model, str(out), args.scheme, args.calibration)
        output = directory_bytes(out)
        group_size = json.loads((out / "quadapt_manifest.json").read_text())["group_size"]

    def mb(n: int) -> str:
        return f"{n / 1e6:7.1f} MB"

    bound = 2 * largest + output
    print(f"source: {args.model}")
    print(f"scheme: {args.scheme} (group {group_size}), {args.calibration}")
    print(f"largest tensor ({name}, as read): {mb(largest).strip()}; output size: {mb(output).strip()}; "
          f"bound 2 x largest + output: {mb(bound).strip()}")
    print()
    print(f"{'':<22}{'baseline':>11}{'conversion':>13}{'difference':>13}{'bound':>11}  within")
    for label, base, peak in [("peak RSS", base_rss, peak_rss), ("peak anonymous RSS", base_anon, peak_anon)]:
        within = "yes" if peak - base < bound else "NO"
        print(f"{label:<22}{mb(base):>11}{mb(peak):>13}{mb(peak - base):>13}{mb(bound):>11}  {within}")


if __name__ == "__main__":
    main()
