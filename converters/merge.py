"""Merging a LoRA adapter into its float base: W' = W + scale * B @ A, one tensor at a time.

`MergedCheckpoint` is a `CheckpointReader` over the base that yields merged tensors as they
stream, so anything that consumes a reader consumes a merged model unchanged: `write_checkpoint`
(a float HF directory) or the quantizing converter (`convert_checkpoint`, for `--scheme`). The
merge runs in fp32 and is cast back to each tensor's dtype.

Merging into already-quantized weights is refused (a checkpoint whose config.json carries a
`quantization_config`): rounding the merged weights again compounds two quantization errors;
merge into the float model and quantize after. A GGUF base is read dequantized and merged as
float; the output is float.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..runtime.errors import CheckpointError, InvalidParameterError, UnsupportedError
from ..runtime.checkpoints import CheckpointReader, TokenizerFiles, as_reader
from ..runtime.checkpoints.peft import PeftAdapter
from ..runtime.checkpoints.peft_fit import BaseModules, check_adapter_fits, load_adapter_for
from .writer import check_output_dir, write_checkpoint


class MergedCheckpoint:
    """The base checkpoint with `adapter` merged into its weights, read as a stream.

    Args:
        base: a reader on the float base.
        adapter: the adapter; checked against the base here.

    Raises:
        UnsupportedError: the base is quantized.
        AdapterError, UnsupportedError: the adapter does not fit the base.
    """

    def __init__(self, base: CheckpointReader, adapter: PeftAdapter) -> None:
        refuse_quantized_base(base)
        check_adapter_fits(adapter, BaseModules.of_checkpoint(base))
        self.path = base.path
        self.base = base
        self.adapter = adapter

    def config_dict(self) -> dict[str, Any]:
        return self.base.config_dict()

    def keys(self) -> list[str]:
        return self.base.keys()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        merged: set[str] = set()
        for name, tensor in self.base.tensors():
            module = name.removesuffix(".weight")
            lora = self.adapter.modules.get(module) if name.endswith(".weight") else None
            if lora is not None:
                tensor = (tensor.float() + lora.delta()).to(tensor.dtype)
                merged.add(module)
            yield name, tensor
        left = sorted(set(self.adapter.modules) - merged)
        if left:
            # The layout check passed, so this is a reader whose stream disagrees with its config.
            raise CheckpointError(f"{self.path}: the weights of {', '.join(left[:4])} never arrived; nothing merged there")

    def tokenizer_files(self) -> TokenizerFiles | None:
        return self.base.tokenizer_files()


def refuse_quantized_base(base: CheckpointReader) -> None:
    """Raise if the base's weights are quantized (its config.json carries a quantization_config).

    Raises:
        UnsupportedError: with what to do instead.
    """
    quant = base.config_dict().get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise UnsupportedError(
            f"{base.path} is quantized (quantization_config, quant_method {method!r}); merging a LoRA into "
            "quantized weights would round them twice. Merge into the float model instead and quantize after: "
            "quadapt merge-adapter --model FLOAT_DIR --adapter ADAPTER --out OUT --scheme SCHEME"
        )


def merge_adapter(
    model: str | Path | CheckpointReader,
    adapter: str | Path | PeftAdapter,
    out_dir: str | Path,
    *,
    scheme: str | None = None,
    overwrite: bool = False,
    **convert_options: Any,
) -> Path:
    """Merge a PEFT adapter into a float base and write the result: a float HF checkpoint
    directory with the base's tokenizer, or, with `scheme`, a quantized one.

    Args:
        model: the float base (directory or .gguf), or a reader on it.
        adapter: the PEFT adapter directory, or a `PeftAdapter` already read.
        out_dir: the directory to create.
        scheme: a quantization scheme for `converters.convert.convert_checkpoint`; None writes float.
        overwrite: replace an existing directory at `out_dir`.
        convert_options: further keyword arguments for `convert_checkpoint` (with `scheme` only).

    Returns:
        `out_dir`.

    Raises:
        UnsupportedError: the base is quantized.
        InvalidParameterError: quantization options without `scheme`, or ones `convert_checkpoint` refuses.
        QuadaptError: the output exists (without `overwrite`), or the adapter does not fit the base.
    """
    check_output_dir(out_dir, overwrite=overwrite)
    if convert_options and scheme is None:
        given = ", ".join(_option_names(name) for name in sorted(convert_options))
        raise InvalidParameterError(
            f"quantization options {given} apply only with a quantization scheme; add --scheme (scheme=... from "
            "Python) or drop them"
        )
    reader = as_reader(model)
    refuse_quantized_base(reader)  # before reading the adapter: the base is the likelier mistake
    if not isinstance(adapter, PeftAdapter):
        adapter = load_adapter_for(adapter, BaseModules.of_checkpoint(reader))
    merged = MergedCheckpoint(reader, adapter)
    if scheme is not None:
        from .convert import convert_checkpoint

        return convert_checkpoint(merged, out_dir, scheme, overwrite=overwrite, **convert_options)
    return write_checkpoint(out_dir, merged.config_dict(), merged.tensors(), merged.tokenizer_files(), overwrite=overwrite)


# The `convert_checkpoint` options that `quadapt merge-adapter` also takes, as the kebab-case flags of their names.
_FLAGS = ("group_size", "calibration", "calib_text", "calib_tokens", "keep", "actorder", "lm_head")


def _option_names(name: str) -> str:
    """An option as the CLI and Python name it (`--group-size / group_size`); a Python-only one by its keyword."""
    return f"--{name.replace('_', '-')} / {name}" if name in _FLAGS else name
