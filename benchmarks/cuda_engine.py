"""Decode throughput of the batching engine on a GPU: int4 weights beside the same engine on bf16 weights.

A random Llama with Llama-3-8B's layer shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV
heads, vocabulary 32000; `--layers` of them, 4 by default) is built in memory, since the device
machine reaches no network: once with bf16 weights, once quantized int4 (RTN, group 128, as
`quadapt convert --scheme int4` would) and loaded as a checkpoint loads on CUDA (the Triton
kernels, weights repacked into their layout). Each engine serves 1, 8 and 32 requests of 32
prompt tokens, greedy, eos ignored, with no adapter or with 4 random rank-16 adapters on every
projection (round robin over the requests), decode steps replayed as CUDA graphs. Decode
tokens/s counts the tokens of the steps after every request has its first token, over those
steps' time; each figure is the median of `--runs` runs, after one warm-up run that compiles the
kernels and captures the graphs. The last table gives int4 over bf16 and the targets (>= 1.5x at 1 request, >= 1.0x at 32).

    python benchmarks/cuda_engine.py [--layers 4] [--new-tokens 64] [--runs 3] [--tiny]

`--tiny` runs a 2-layer hidden-64 model on whatever device is here (a smoke test of the script).
Not a test: it prints tables.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

TARGETS = {1: 1.5, 32: 1.0}  # requests -> least int4 / bf16 decode throughput


def model_config(layers: int, tiny: bool) -> dict:
    if tiny:
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256, rms_norm_eps=1e-5, torch_dtype="float32")
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
                intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16")


def cpu_model(config: dict, weights: str, state: dict[str, torch.Tensor]):
    """The model of `config` on the CPU with the float weights `state`, int4-quantized (as
    `quadapt convert --scheme int4` would) when `weights` is int4."""
    from quadapt.converters.in_memory import quantize_model
    from quadapt.runtime.model.config import ModelConfig
    from quadapt.runtime.model.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_dict(config))
    model.load_state_dict(state, assign=True)
    if weights == "int4":
        quantize_model(model, scheme="int4", group_size=128 if config["hidden_size"] % 128 == 0 else 32)
    return model


def on_device(model, device: str):
    """A copy of a CPU model on `device`, with the kernel backend (and, on Triton, the weight layout)
    a checkpoint loaded there gets."""
    from quadapt import kernels
    from quadapt.runtime.checkpoints.loader import bind_kernel_backend

    model = copy.deepcopy(model).to(device=device)
    bind_kernel_backend(model, kernels.resolve_backend(device))
    return model.eval().requires_grad_(False)


def random_state(config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random float weights for `config` (norms at one), on the CPU."""
    from quadapt.runtime.model.config import ModelConfig
    from quadapt.runtime.model.model import CausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalLM(ModelConfig.from_dict(config)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    return {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}


def random_adapters(config: dict, count: int, dtype: torch.dtype):
    """`count` in-memory PEFT adapters of rank 16 on every projection of every layer."""
    from quadapt.runtime.checkpoints.peft import PeftAdapter
    from quadapt.runtime.model.lora import LoRAWeights

    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    adapters = []
    for n in range(count):
        g = torch.Generator().manual_seed(100 + n)
        modules = {
            f"model.layers.{layer}.{name}": LoRAWeights(
                (torch.randn(16, k, generator=g) * 0.01).to(dtype), (torch.randn(out, 16, generator=g) * 0.01).to(dtype),
                alpha=32.0)
            for layer in range(config["num_hidden_layers"]) for name, (out, k) in shapes.items()
        }
        targets = [name.rpartition(".")[2] for name in shapes]
        adapters.append(PeftAdapter(modules=modules, config={"r": 16, "lora_alpha": 32, "target_modules": targets}))
    return adapters


def decode_throughput(engine, requests: int, adapters: list[str], new_tokens: int, vocab: int) -> float:
    """Decode tokens/s of `requests` requests added at once (see the module docstring)."""
    from quadapt.runtime.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(requests)
    for r in range(requests):
        prompt = torch.randint(3, vocab, (32,), generator=g).tolist()
        engine.add_request(prompt, params, adapter=adapters[r % len(adapters)] if adapters else None)
    started: set[str] = set()
    tokens, t0 = 0, None
    while engine.has_unfinished():
        outputs = engine.step()
        if t0 is not None:
            tokens += sum(len(o.new_token_ids) for o in outputs)
        started.update(o.request_id for o in outputs if o.new_token_ids)
        if t0 is None and len(started) == requests:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model (smoke test)")
    args = parser.parse_args()
    from quadapt.runtime.engine.engine import Engine, EngineConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("benchmarks/cuda_engine.py needs a CUDA device (or --tiny for a smoke run)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = model_config(args.layers, args.tiny)
    state = random_state(config, dtype)
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"model: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {dtype}")
    results: dict[tuple[str, int, int], float] = {}
    print(f"{'weights':<8}{'adapters':>9}{'requests':>9}{'decode tok/s':>14}  runs")
    for weights in ("bf16", "int4"):
        model = cpu_model(config, weights, state)
        for n_adapters in (0, 4):
            engine = Engine.for_model(
                on_device(model, device), eos_token_ids=set(),
                config=EngineConfig(max_num_seqs=max(args.requests), max_num_batched_tokens=2048,
                                    max_loras=max(n_adapters, 1), max_lora_rank=16),
                kv_cache_bytes=2**30 if device == "cuda" else 2**24, block_size=16,
            )
            names = []
            for i, adapter in enumerate(random_adapters(config, n_adapters, dtype)):
                engine.adapters.load(f"a{i}", adapter)
                names.append(f"a{i}")
            for requests in args.requests:
                # Warm-up, as long as a run: compiles the kernels and captures every graph the runs replay.
                decode_throughput(engine, requests, names, args.new_tokens, config["vocab_size"])
                runs = [decode_throughput(engine, requests, names, args.new_tokens, config["vocab_size"])
                        for _ in range(args.runs)]
                results[weights, n_adapters, requests] = statistics.median(runs)
                print(f"{weights:<8}{n_adapters:>9}{requests:>9}{results[weights, n_adapters, requests]:>14.1f}  "
                      f"{' '.join(f'{r:.1f}' for r in runs)}", flush=True)
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{'adapters':>9}{'requests':>9}{'int4/bf16':>11}  target")
    for n_adapters in (0, 4):
        for requests in args.requests:
            ratio = results["int4", n_adapters, requests] / results["bf16", n_adapters, requests]
            target = TARGETS.get(requests)
            verdict = "" if target is None else f">= {target}: {'met' if ratio >= target else 'NOT met'}"
            print(f"{n_adapters:>9}{requests:>9}{ratio:>10.2f}x  {verdict}")


if __name__ == "__main__":
    main()
