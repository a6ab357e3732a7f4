"""Extract the held-out quality texts from files that ship with Python and the installed packages.

Three texts of different kinds, none of which any calibration uses (see README.md here):

- `ml_prose.txt`: technical prose about machine learning, the class docstrings of `torch.nn`'s
  layers and `torch.optim`'s optimizers (BSD-3-Clause, PyTorch);
- `licence.txt`: a software licence, grpcio's LICENSE file (the Apache License 2.0 and the
  licences it bundles; licence texts may be copied verbatim);
- `python_reference.txt`: the Python language reference, from `pydoc_data.topics` (PSF licence).

And two of other kinds, which the comparison with the peers' quantizers adds (docs/quality.md):

- `python_source.txt`: source code, the start of the standard library's `fractions.py` (PSF licence);
- `markdown_readme.txt`: a project README in Markdown (prose, code blocks, tables), rich's (MIT).

    python benchmarks/data/extract_texts.py

Rewrites the five files (about 16 KB each); the figures in docs/quality.md were measured on the
files as committed, which came from Python 3.11.7, torch 2.13.0, grpcio 1.85.3 and rich 15.0.0.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

HERE = Path(__file__).parent
TARGET_CHARS = 16_000

ML_CLASSES = (
    "torch.nn.Linear", "torch.nn.Conv2d", "torch.nn.BatchNorm2d", "torch.nn.LayerNorm", "torch.nn.GroupNorm",
    "torch.nn.Dropout", "torch.nn.Embedding", "torch.nn.LSTM", "torch.nn.GRU", "torch.nn.MultiheadAttention",
    "torch.nn.Transformer", "torch.nn.TransformerEncoderLayer", "torch.nn.CrossEntropyLoss", "torch.nn.CTCLoss",
    "torch.nn.KLDivLoss", "torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW", "torch.optim.RMSprop",
    "torch.optim.lr_scheduler.OneCycleLR", "torch.optim.lr_scheduler.ReduceLROnPlateau",
)
PYTHON_TOPICS = (
    "assignment", "augassign", "binary", "booleans", "calls", "class", "comparisons", "compound", "context-managers",
    "exceptions", "execmodel", "for", "function", "if", "import", "lambda", "naming", "numbers", "operator-summary",
    "return", "scoping", "slicings", "try", "types", "while", "with", "yield",
)


def _clip(parts: list[str]) -> str:
    text = ""
    for part in parts:
        if len(text) >= TARGET_CHARS:
            break
        text += part.strip() + "\n\n"
    return text


def ml_prose() -> str:
    import importlib

    parts = []
    for dotted in ML_CLASSES:
        module, name = dotted.rsplit(".", 1)
        parts.append(f"{name}\n\n" + inspect.getdoc(getattr(importlib.import_module(module), name)))
    return _clip(parts)


def licence() -> str:
    dist = importlib.metadata.distribution("grpcio")
    path = next(f for f in dist.files if f.name == "LICENSE")
    return _clip(dist.locate_file(path).read_text(encoding="utf-8").split("\n\n"))


def python_reference() -> str:
    from pydoc_data.topics import topics

    return _clip([topics[name] for name in PYTHON_TOPICS if name in topics])


def python_source() -> str:
    import fractions

    return _clip(Path(fractions.__file__).read_text(encoding="utf-8").split("\n\n\n"))


def markdown_readme() -> str:
    return _clip(importlib.metadata.distribution("rich").metadata.get_payload().split("\n\n"))


TEXTS = {
    "ml_prose.txt": ml_prose, "licence.txt": licence, "python_reference.txt": python_reference,
    "python_source.txt": python_source, "markdown_readme.txt": markdown_readme,
}


def main() -> None:
    for name, make in TEXTS.items():
        path = HERE / name
        tmp = path.with_name(name + ".tmp")
        tmp.write_text(make(), encoding="utf-8")
        tmp.replace(path)
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
