"""What a careless or hostile client can make adapter loading do: names, sizes and ranks.

Names are matched in full and quoted bounded in messages. Size, rank and fit are refused from
the safetensors header: an adapter whose tensor data is poisoned (NaN bytes behind a valid
header) proves it, since reading any tensor would fail with "NaN or Inf" instead of the refusal.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from quadapt.runtime.checkpoints import open_checkpoint
from quadapt.runtime.checkpoints.peft import ADAPTER_WEIGHTS, read_peft_adapter, read_peft_header
from quadapt.runtime.checkpoints.peft_fit import BaseModules, load_adapter_for
from quadapt.runtime.errors import AdapterError, InvalidParameterError
from quadapt.runtime.engine.registry import AdapterNotFoundError, AdapterRegistry
from quadapt.runtime.engine.sampling import SamplingParams

from .test_adapters import VOCAB, make_base, make_peft_adapter
from .test_engine import GREEDY, make_engine, prompts, reference, run
from .test_model import save_hf_model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("limits-base"))


@pytest.fixture(scope="module")
def layout(base) -> BaseModules:
    return BaseModules.of_checkpoint(open_checkpoint(base))


@pytest.fixture(scope="module")
def rank4(base, tmp_path_factory) -> Path:
    return make_peft_adapter(base, tmp_path_factory.mktemp("rank4") / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


class Slots:
    """A stand-in for the executor: counts slot writes."""

    num_lora_slots = 2

    def __init__(self) -> None:
        self.writes = 0

    def write_adapter_slot(self, slot, modules) -> None:
        self.writes += 1


def registry(layout: BaseModules, **kwargs) -> AdapterRegistry:
    return AdapterRegistry(Slots(), layout, kwargs.pop("max_rank", 8), **kwargs)


def poison(adapter: Path) -> Path:
    """Overwrite every byte after the safetensors header with 0xFF (NaN in float), in place."""
    file = adapter / ADAPTER_WEIGHTS
    data = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len:] = b"\xff" * (len(data) - 8 - header_len)
    file.write_bytes(bytes(data))
    return adapter


@pytest.fixture
def poisoned(rank4, tmp_path) -> Path:
    """The rank-4 adapter with its tensor data poisoned; reading any tensor fails."""
    copy = tmp_path / "poisoned"
    copy.mkdir()
    for f in rank4.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    return poison(copy)


def test_a_name_with_a_trailing_newline_is_refused(layout, rank4):
    reg = registry(layout)
    for bad in ("evil\n", "evil\nINFO fake log line", "\nevil", "ev il", ""):
        with pytest.raises(InvalidParameterError, match="is not allowed"):
            reg.load(bad, rank4)
    assert reg.names() == []


def test_a_long_name_gives_a_short_message_with_its_length(layout, rank4):
    reg = registry(layout)
    reg.load("real", rank4)
    huge = "x" * 100_000
    for call, error in ((reg.load, InvalidParameterError), (reg.resolve, AdapterNotFoundError), (reg.unload, AdapterNotFoundError)):
        args = (huge, rank4) if call == reg.load else (huge,)
        with pytest.raises(error) as info:
            call(*args)
        message = str(info.value)
        assert len(message) < 300, (call.__name__, len(message))
        assert "100000 characters" in message


def test_unknown_adapter_lists_a_bounded_number_of_names(layout, rank4):
    reg = registry(layout)
    for i in range(20):
        reg.load(f"a{i:02d}", rank4)
    with pytest.raises(AdapterNotFoundError, match="loaded adapters: a00, a01, .*a07 and 12 more") as info:
        reg.resolve("nope")
    assert len(str(info.value)) < 300


def test_the_poisoned_adapter_is_really_poisoned(poisoned, layout):
    """Control for the tests below: reading its tensors fails, so a refusal proves none was read."""
    with pytest.raises(AdapterError, match="NaN or Inf"):
        read_peft_adapter(poisoned)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        load_adapter_for(poisoned, layout, max_rank=4)
    assert read_peft_header(poisoned).max_rank == 4


def test_a_file_above_max_bytes_is_refused_before_any_tensor_is_read(poisoned, layout):
    size = (poisoned / ADAPTER_WEIGHTS).stat().st_size
    expected = rf"is {size} bytes, above the limit of 1000 bytes.*raise the limit \(max_bytes\)"
    with pytest.raises(AdapterError, match=expected):
        read_peft_adapter(poisoned, max_bytes=1000)
    with pytest.raises(AdapterError, match=expected):
        load_adapter_for(poisoned, layout, max_bytes=1000)
    reg = registry(layout, max_bytes=1000)
    with pytest.raises(AdapterError, match=expected):
        reg.load("big", poisoned)
    assert reg.names() == []


def test_a_rank_above_max_rank_is_refused_from_the_header(poisoned, layout):
    expected = r"has rank 4, above the slots' max rank 2 \(module 'model\.layers\.\d\.self_attn\.[qv]_proj'\)"
    with pytest.raises(AdapterError, match=expected):
        load_adapter_for(poisoned, layout, max_rank=2)
    reg = registry(layout, max_rank=2)
    with pytest.raises(AdapterError, match=expected):
        reg.load("wide", poisoned)
    assert reg.names() == []


def test_a_rank_pattern_above_max_rank_is_refused_from_the_header(base, layout, tmp_path):
    adapter = make_peft_adapter(
        base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 6}
    )
    poison(adapter)
    with pytest.raises(AdapterError, match=r"has rank 6, above the slots' max rank 4 \(module 'model\.layers\.1\.mlp\.down_proj'\)"):
        registry(layout, max_rank=4).load("pattern", adapter)


def test_shapes_from_another_base_are_refused_from_the_header(base, layout, tmp_path):
    _, other = save_hf_model(tmp_path, "llama", vocab_size=VOCAB, intermediate_size=96)
    adapter = poison(make_peft_adapter(other, tmp_path / "adapter", r=2, target_modules=["q_proj", "down_proj"]))
    with pytest.raises(AdapterError, match=r"down_proj.*\[64, 96\].*\[64, 112\].*another base"):
        registry(layout).load("other", adapter)


def test_a_fitting_adapter_still_loads_and_serves(base, rank4):
    """Negative control: the limits refuse nothing that fits, and the adapter serves as before."""
    engine = make_engine(base, {"ok": rank4}, max_lora_rank=4)
    assert [v.name for v in engine.adapters.names()] == ["ok"]
    prompt, params = prompts(1)[0], SamplingParams(max_new_tokens=6, **GREEDY)
    rid = engine.add_request(prompt, params, adapter="ok")
    assert run(engine)[rid] == reference(base, rank4, prompt, params)
    assert reference(base, rank4, prompt, params) != reference(base, None, prompt, params)
    exact = (rank4 / ADAPTER_WEIGHTS).stat().st_size
    assert load_adapter_for(rank4, BaseModules.of_checkpoint(open_checkpoint(base)), max_rank=4, max_bytes=exact).max_rank == 4
