"""Who may read what quadapt writes: a finished directory has the mode the umask gives a new one.

Directories are staged through `tempfile.mkdtemp` (0700, private while half-written) and opened
up to `0o777 & ~umask` just before the final rename, their files to `0o666 & ~umask` (safetensors'
`save_file` makes 0600 whatever the umask). Each test sets the umask itself and restores it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from quadapt.converters.convert import convert_checkpoint
from quadapt.converters.peft import write_peft_adapter
from quadapt.converters.writer import current_umask, staged_dir, write_checkpoint
from quadapt.runtime.checkpoints.peft import PeftAdapter
from quadapt.runtime.model.lora import LoRAWeights

from .conftest import tiny_llama_config
from .test_model import save_hf_model
from .test_tokenizer import build_chatml_dir

UMASKS = [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_modes(out: Path, dir_mode: int, file_mode: int) -> None:
    files = sorted(out.iterdir())
    assert files and all(f.is_file() for f in files)
    assert oct(mode(out)) == oct(dir_mode)
    assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(file_mode) for f in files}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    _, path = save_hf_model(tmp_path_factory.mktemp("writer"), "llama", vocab_size=512, intermediate_size=128)
    return build_chatml_dir(path)


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), UMASKS, ids=oct)
def test_a_converted_checkpoint_follows_the_umask(source, tmp_path, mask, dir_mode, file_mode):
    with umask(mask):
        out = convert_checkpoint(source, tmp_path / "out", "int4")
    assert_modes(out, dir_mode, file_mode)


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), UMASKS[:1], ids=oct)
def test_a_sharded_float_checkpoint_follows_the_umask(tmp_path, mask, dir_mode, file_mode):
    tensors = [(f"t{i}", torch.zeros(64)) for i in range(3)]
    with umask(mask):
        out = write_checkpoint(tmp_path / "ckpt", tiny_llama_config(), iter(tensors), None, max_shard_bytes=256)
    assert (out / "model.safetensors.index.json").is_file()
    assert_modes(out, dir_mode, file_mode)


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), UMASKS, ids=oct)
def test_an_adapter_follows_the_umask(tmp_path, mask, dir_mode, file_mode):
    adapter = PeftAdapter(
        modules={"model.layers.0.self_attn.q_proj": LoRAWeights(a=torch.randn(2, 64), b=torch.randn(64, 2), alpha=2.0)},
        config={"r": 2, "lora_alpha": 2},
    )
    with umask(mask):
        out = write_peft_adapter(adapter, tmp_path / "lora", extra_files={"report.json": "{}\n"})
    assert_modes(out, dir_mode, file_mode)


def test_replacing_a_directory_follows_the_umask(tmp_path):
    tensors = [("a", torch.zeros(4))]
    with umask(0o077):
        write_checkpoint(tmp_path / "ckpt", {}, iter(tensors), None)
    with umask(0o022):
        out = write_checkpoint(tmp_path / "ckpt", {}, iter(tensors), None, overwrite=True)
    assert_modes(out, 0o755, 0o644)


def test_a_directory_is_private_while_it_is_staged(tmp_path):
    with umask(0o022), staged_dir(tmp_path / "out", overwrite=False) as staging:
        assert mode(staging) == 0o700
        (staging / "x").write_text("x")
    assert mode(tmp_path / "out") == 0o755


def test_reading_the_umask_leaves_it_unchanged():
    with umask(0o027):
        assert current_umask() == 0o027
        assert current_umask() == 0o027
