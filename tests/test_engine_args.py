"""One way to build an engine: every front door goes through `build_engine`, with one set of defaults."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

import quadapt
from quadapt import cli
from quadapt.runtime.engine.engine import Engine
from quadapt.runtime.engine.args import MIN_LORA_RANK, MIN_LORA_SLOTS, EngineArgs, build_engine
from quadapt.runtime.errors import AdapterError, InvalidParameterError
from quadapt.runtime.serving.config import ServerConfig, load_llm

from .test_adapters import make_base, make_peft_adapter

KV = 2 * 2**20


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("engine-args-base"))


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return make_peft_adapter(base, tmp_path_factory.mktemp("engine-args-adapter") / "qv", config=config, seed=3)


def test_every_front_door_builds_its_engine_through_build_engine(base, adapter, tmp_path, monkeypatch, capsys):
    built: list[Engine] = []
    init = Engine.__init__

    def guarded(self, *args, **kwargs):
        callers = {(frame.function, Path(frame.filename).name) for frame in inspect.stack()}
        assert ("build_engine", "args.py") in callers, "an Engine was built outside build_engine"
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(Engine, "__init__", guarded)

    model = quadapt.LLM(base, adapters={"qv": str(adapter)}, kv_cache_bytes=KV)
    assert model.generate(["hi"], max_new_tokens=2)[0].completion_tokens == 2
    assert quadapt.AsyncLLM(base, adapters={"qv": str(adapter)}, kv_cache_bytes=KV).list_adapters() == ["qv"]
    load_llm(ServerConfig(model=str(base), adapters={"qv": str(adapter)}, kv_cache_bytes=KV))
    requests, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text(json.dumps({"id": "q", "prompt": "hi", "adapter": "qv", "max_new_tokens": 2}) + "\n")
    assert cli.main(["batch", "--model", str(base), "--adapter", f"qv={adapter}", "--kv-cache-memory", "2MiB",
                     "--input", str(requests), "--output", str(results)]) == 0
    assert json.loads(results.read_text())["usage"]["completion_tokens"] == 2
    assert len(built) == 4
    # One set of defaults: each front door sized its slots the same way for one rank-8 adapter.
    assert {(e.config.max_loras, e.config.max_lora_rank) for e in built} == {(MIN_LORA_SLOTS, MIN_LORA_RANK)}
    # quadapt.load runs its one adapter through the engine too, in the one slot it needs.
    assert quadapt.load(base, adapter=adapter).generate("hi", max_new_tokens=2) is not None
    assert len(built) == 5 and built[-1].config.max_loras == 1 and len(built[-1].adapters.names()) == 1
    assert cli.main(["generate", "--model", str(base), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert len(built) == 6 and built[-1].config.max_loras == 0  # quadapt generate, through quadapt.load


def test_defaults_follow_the_adapters_and_explicit_limits_win(base, adapter):
    engine, tokenizer, path = build_engine(EngineArgs(model=str(base), kv_cache_bytes=KV))
    assert (engine.config.max_loras, engine.config.max_lora_rank) == (MIN_LORA_SLOTS, MIN_LORA_RANK)
    assert path == base and tokenizer.eos_token_ids
    engine, _, _ = build_engine(EngineArgs(model=str(base), adapters={"qv": str(adapter)}, max_loras=1,
                                           max_lora_rank=8, kv_cache_bytes=KV))
    assert (engine.config.max_loras, engine.config.max_lora_rank) == (1, 8)
    assert [v.name for v in engine.adapters.names()] == ["qv"]


def test_mistakes_are_named(base, adapter, tmp_path):
    with pytest.raises(AdapterError, match=r"^adapter qv=.*: adapter .* has rank 8, above the slots' max rank 4"):
        build_engine(EngineArgs(model=str(base), adapters={"qv": str(adapter)}, max_lora_rank=4))
    with pytest.raises(AdapterError, match=r"^adapter x=.*missing.*not a directory"):
        build_engine(EngineArgs(model=str(base), adapters={"x": str(tmp_path / "missing")}))
    with pytest.raises(InvalidParameterError, match=r"max_loras=0 serves the base model only, but adapters \['qv'\]"):
        EngineArgs(model=str(base), adapters={"qv": str(adapter)}, max_loras=0)
    with pytest.raises(InvalidParameterError, match="dtype must be one of float32, bfloat16, float16"):
        EngineArgs(model=str(base), dtype="float64")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="threads must be a positive integer"):
        EngineArgs(model=str(base), threads=0)
    with pytest.raises(InvalidParameterError, match=r"KV cache of \d+ bytes \(kv_cache_bytes\) cannot be allocated"):
        build_engine(EngineArgs(model=str(base), kv_cache_bytes=2**62))


def test_engine_args_imports_without_torch():
    # The CLI derives its engine flags' defaults from EngineArgs; `quadapt --help` must not load torch.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from dataclasses import fields\n"
        "from quadapt.runtime.engine.args import EngineArgs, EngineConfig, build_engine\n"
        "assert {f.name for f in fields(EngineArgs)} >= {'model', 'threads', 'max_loras'}\n"
        "assert EngineConfig().max_num_seqs == EngineArgs('m').max_num_seqs\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr


def test_threads_default_to_half_the_cores(base, monkeypatch):
    import os

    import torch

    from quadapt.runtime.engine.args import default_threads

    assert default_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_threads() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_threads() == 1
    before = torch.get_num_threads()
    try:
        build_engine(EngineArgs(model=str(base), kv_cache_bytes=KV))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device_is_checked(base):
    with pytest.raises(InvalidParameterError, match="device must be cpu, cuda or cuda:N, got 'gpu'"):
        EngineArgs(model=str(base), device="gpu")
    assert EngineArgs(model=str(base), device="cuda:1").device == "cuda:1"
    assert ServerConfig(model=str(base), device="cuda").engine_args().device == "cuda"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(InvalidParameterError, match="sees no CUDA device; serve on device 'cpu'"):
            build_engine(EngineArgs(model=str(base), device="cuda"))
