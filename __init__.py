"""quadapt: a deployment runtime for quantized, LoRA-adapted language models.

The parts are subpackages: `runtime` (model, loader, generation), `converters` (checkpoints in,
packed checkpoints and adapters out), `kernels`, `protos`, `train`. Importing this package loads
nothing heavy.
"""

from importlib.metadata import version as _version

__version__ = _version("quadapt")  # one source: pyproject.toml
