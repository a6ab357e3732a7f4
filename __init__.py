"""quadapt: a deployment runtime for quantized, LoRA-adapted language models.

The parts are subpackages: `runtime` (model, loader, generation), `converters` (checkpoints in,
packed checkpoints and adapters out), `kernels`, `protos`, `train`. Importing this package loads
nothing heavy.
"""

__version__ = "0.1.0"
