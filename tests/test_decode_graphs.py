"""The decode step's CUDA-graph machinery, as far as it runs on CPU, and the engine on Triton.

`DecodeGraphs` picks a (batch bucket, table width), pads the step into persistent buffers and,
on CPU, runs the forward eagerly on them: padding must change no row's tokens. The engine's
batch invariance must hold on the Triton kernels too (interpreter; an int4 checkpoint, repacked
at load, with adapters in the mixed batch), with decode steps through the padded buffers.
The capture and replay themselves are checked by the `cuda` test.
"""

from __future__ import annotations

import pytest
import torch

from quadapt.kernels import NO_SLOT
from quadapt.runtime.engine.decode_graphs import DecodeGraphs, batch_buckets
from quadapt.runtime.model.batch import RowSpec
from quadapt.runtime.model.lora import SlotMapping

from quadapt.runtime.engine.sampling import SamplingParams

from quadapt.runtime.checkpoints.loader import load_model
from quadapt.runtime.engine.engine import Engine, EngineConfig

from .test_engine import GREEDY, adapters, base, packed, prompts, run  # noqa: F401 (fixtures)

SETTINGS = dict(max_num_seqs=8, max_num_batched_tokens=24, max_loras=3, max_lora_rank=8)


def graphs(max_rows=12, max_blocks=16, mapping=None, capture=False) -> DecodeGraphs:
    return DecodeGraphs(lambda batch: batch, max_rows=max_rows, max_blocks=max_blocks, block_size=4, pad_slot=99 * 4,
                        device=torch.device("cpu"), mapping=mapping, capture=capture)


def decode_row(start: int, blocks: list[int], slot: int = NO_SLOT, token: int = 7) -> RowSpec:
    return RowSpec([token], start, blocks, needs_logits=True, lora_slot=slot)


def test_buckets_and_keys():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    g = graphs()
    assert g.key_for([decode_row(0, [3])]) == (1, 4)  # one block, the narrowest width
    assert g.key_for([decode_row(5, [3, 4])] * 3) == (4, 4)
    assert g.key_for([decode_row(20, list(range(6)))] * 9) == (12, 8)  # 6 blocks -> width 8
    assert g.key_for([decode_row(63, list(range(16)))]) == (1, 16)
    assert g.key_for([decode_row(64, list(range(17)))]) is None  # past the buffers' table
    assert g.key_for([decode_row(0, [1])] * 13) is None  # more rows than the largest bucket
    assert g.key_for([RowSpec([1, 2], 0, [1], True)]) is None  # a prefill row: eager
    assert g.key_for([]) is None


def test_buffers_are_reused_and_padded():
    mapping = SlotMapping(3, max_tokens=16)
    g = graphs(mapping=mapping)
    rows = [decode_row(5, [3, 4], slot=1, token=11), decode_row(2, [8], token=12), decode_row(0, [9], slot=2, token=13)]
    key = g.key_for(rows)
    batch = g.prepare(rows, key)
    assert key == (4, 4) and batch.num_tokens == 4
    assert batch.input_ids.data_ptr() == g.input_ids.data_ptr()  # views of the persistent buffers
    assert batch.input_ids.tolist() == [11, 12, 13, 0]
    assert batch.positions.tolist() == [5, 2, 0, 0]
    assert batch.slot_mapping.tolist() == [4 * 4 + 1, 8 * 4 + 2, 9 * 4, 99 * 4]  # the padded row writes to the spare block
    assert batch.lora_slots.tolist() == [1, NO_SLOT, 2, NO_SLOT]
    assert mapping.slots.tolist() == [1, NO_SLOT, 2, NO_SLOT] and mapping.slots.data_ptr() == mapping._buffer.data_ptr()
    assert batch.decode.block_tables.tolist() == [[3, 4, 0, 0], [8, 0, 0, 0], [9, 0, 0, 0], [0, 0, 0, 0]]
    assert batch.decode.mask[:, 0, 0].sum(1).tolist() == [6, 3, 1, 1]  # a padded row sees one position
    again = g.prepare([decode_row(1, [5], token=21)] * 3, key)
    assert again is batch and batch.input_ids.tolist() == [21, 21, 21, 0]  # same objects, new contents
    assert batch.decode.mask[:, 0, 0].sum(1).tolist() == [2, 2, 2, 1]


def test_the_eager_path_reads_every_row():
    """`run` keeps the logits of the rows that sample, in order, and drops the padding."""
    g = DecodeGraphs(lambda batch: batch.input_ids[:, None].float() * torch.ones(1, 3), max_rows=8, max_blocks=4,
                     block_size=4, pad_slot=0, device=torch.device("cpu"))
    rows = [decode_row(0, [1], token=5), RowSpec([6], 0, [2], needs_logits=False), decode_row(0, [3], token=7)]
    assert g.run(rows, g.key_for(rows))[:, 0].tolist() == [5.0, 7.0]
    assert not g.captured and not g.capture


def test_decode_through_padded_buffers_changes_no_token(base, adapters):
    """The float engine with decode steps through the padded buffers yields the eager engine's tokens."""
    params = SamplingParams(max_new_tokens=6, **GREEDY)
    outputs = []
    for cuda_graphs in (False, True):
        engine = Engine.for_model(load_model(base), eos_token_ids={2}, config=EngineConfig(**SETTINGS),
                                  kv_cache_bytes=4 * 2**20, block_size=4, cuda_graphs=cuda_graphs)
        for name, path in adapters.items():
            engine.adapters.load(name, path)
        for i, (prompt, name) in enumerate(zip(prompts(5), ["a", None, "b", "c", None])):
            engine.add_request(prompt, params, adapter=name, request_id=f"r{i}")
        outputs.append(run(engine))
    assert outputs[0] == outputs[1]


def test_triton_engine_batch_equals_each_request_alone(packed, monkeypatch):
    """On the Triton kernels (interpreter): an int4 model repacked at load, two adapters and the
    base in one batch, decode steps through the padded buffers; each request yields what it
    yields alone."""
    pytest.importorskip("triton")

    monkeypatch.setenv("QUADAPT_KERNELS", "triton")
    checkpoint, all_adapters = packed
    chosen = {name: all_adapters[name] for name in ("a", "b")}
    params = SamplingParams(max_new_tokens=3, **GREEDY)
    requests = list(zip([p[:6] for p in prompts(3, seed=1)], ["a", None, "b"]))

    def engine():
        model = load_model(checkpoint)
        assert model.kernel_backend == "triton" and model.model.layers[0].self_attn.qkv_proj.kernel_weight is not None
        e = Engine.for_model(model, eos_token_ids={2}, config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=24,
                                                                           max_loras=2, max_lora_rank=8),
                             kv_cache_bytes=2**20, block_size=4, cuda_graphs=True)
        for name, path in chosen.items():
            e.adapters.load(name, path)
        return e

    batched = engine()
    for i, (prompt, name) in enumerate(requests):
        batched.add_request(prompt, params, adapter=name, request_id=f"r{i}")
    together = run(batched)
    alone = engine()
    for i, (prompt, name) in enumerate(requests):
        alone.add_request(prompt, params, adapter=name, request_id=f"r{i}")
        assert run(alone)[f"r{i}"] == together[f"r{i}"], f"r{i} (adapter {name})"
    assert len(set(map(tuple, together.values()))) > 1


@pytest.mark.cuda
@pytest.mark.parametrize("weights", ["float", "int4"])
def test_cuda_graph_replays_equal_eager_steps(request, weights):
    """On a GPU, decode steps replayed as CUDA graphs yield the eager steps' tokens (the float base,
    and an int4 checkpoint on the Triton kernels), adapters and the base mixed in one batch."""
    if weights == "float":
        checkpoint, adapters = request.getfixturevalue("base"), request.getfixturevalue("adapters")
    else:
        checkpoint, adapters = request.getfixturevalue("packed")
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    outputs = []
    for cuda_graphs in (False, True):
        engine = Engine.for_model(load_model(checkpoint, device="cuda"), eos_token_ids={2},
                                  config=EngineConfig(**SETTINGS), kv_cache_bytes=4 * 2**20, block_size=4,
                                  cuda_graphs=cuda_graphs)
        for name, path in adapters.items():
            engine.adapters.load(name, path)
        for i, (prompt, name) in enumerate(zip(prompts(6), ["a", None, "b", "c", None, "a"])):
            engine.add_request(prompt, params, adapter=name, request_id=f"r{i}")
        outputs.append(run(engine))
        if cuda_graphs:
            assert engine.executor.graphs.captured
    assert outputs[0] == outputs[1]
