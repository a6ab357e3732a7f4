"""Reading every checkpoint format the runtime serves: HF safetensors directories, GGUF files, the
quantized formats (compressed-tensors, bitsandbytes NF4) and PEFT LoRA adapters.

Readers stream tensors under Hugging Face names through one interface (`CheckpointReader`);
`open_checkpoint` picks the reader for a path. Nothing here writes: writing checkpoints and
adapters is `quadapt.converters`, which builds on these readers.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .reader import CheckpointReader, TokenizerFiles, is_derived_key

__all__ = ["CheckpointReader", "TokenizerFiles", "as_reader", "is_derived_key", "open_checkpoint"]


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a checkpoint directory (HF safetensors) or a `.gguf` file.

    Raises:
        CheckpointError: the path does not exist, or is neither a directory nor a GGUF file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"model path {str(path)!r} does not exist; pass a checkpoint directory or a .gguf file")
    if path.is_dir():
        from .hf import HFCheckpoint

        return HFCheckpoint(path)
    if path.suffix.lower() == ".gguf":
        from .gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    raise CheckpointError(
        f"model path {str(path)!r} is a file but not a .gguf; pass a checkpoint directory "
        "(config.json + *.safetensors) or a .gguf file"
    )


def as_reader(source: str | Path | CheckpointReader) -> CheckpointReader:
    """`source` itself when it is already a reader, else `open_checkpoint(source)`."""
    return open_checkpoint(source) if isinstance(source, (str, Path)) else source
