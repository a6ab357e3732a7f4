"""Replicas under Ray Serve: 1 replica against 2, the same clients and adapters.

Starts a local Ray instance, deploys `quadapt serve --ray`'s application (`build_app`) with 1
engine replica, runs N streaming gRPC clients for T seconds (adapters round robin over the base
model and every adapter in --adapter-dir, the adapter as `multiplexed_model_id` metadata as
quadapt's client sends it), then redeploys with 2 replicas and runs the same load. Prints, per
replica count: requests, output tokens per second, time to first token (p50, p99), the adapter
hit rate (adapter requests that landed on a replica already holding their adapter, from each
answer's `x-quadapt-adapter-hit` trailing metadata) and errors. Not a test: it prints a table.

    python benchmarks/scale_out.py --model DIR --adapter-dir DIR [--clients 8] [--seconds 40] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from pathlib import Path

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "List three facts about the moon.", "Describe the smell of rain."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_loop(port: int, adapters: list[str | None], index: int, stop_at: float, new_tokens: int,
                out: list[tuple], lock: threading.Lock) -> None:
    import grpc

    from quadapt.protos.quadapt.v1 import generation_pb2 as pb
    from quadapt.protos.quadapt.v1 import generation_pb2_grpc as pb_grpc

    stub = pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    i = index
    while time.monotonic() < stop_at:
        adapter = adapters[i % len(adapters)]
        prompt = PROMPTS[i % len(PROMPTS)]
        i += 1
        metadata = (("multiplexed_model_id", adapter),) if adapter else ()
        start, first, tokens = time.perf_counter(), None, 0
        try:
            request = pb.GenerateRequest(prompt=prompt, adapter=adapter or "", max_new_tokens=new_tokens,
                                         ignore_eos=True)
            call = stub.GenerateStream(request, metadata=metadata, timeout=600)
            for message in call:
                if message.token_ids and first is None:
                    first = time.perf_counter() - start
                tokens += len(message.token_ids)
            hit = dict(call.trailing_metadata()).get("x-quadapt-adapter-hit")
            row = (adapter, first, tokens, hit, None)
        except grpc.RpcError as e:
            row = (adapter, None, 0, None, f"{e.code().name}: {e.details()[:120]}")
        with lock:
            out.append(row)


def run_load(port: int, adapters: list[str | None], clients: int, seconds: float, new_tokens: int) -> dict:
    rows: list[tuple] = []
    lock = threading.Lock()
    start = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(port, adapters, i, start + seconds, new_tokens, rows, lock))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    done = [r for r in rows if r[4] is None]
    ttft = sorted(r[1] for r in done if r[1] is not None)
    hits = [r[3] for r in done if r[0] is not None and r[3] is not None]
    return {
        "requests": len(done), "tok_s": sum(r[2] for r in done) / elapsed,
        "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
        "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan"),
        "hit_rate": hits.count("1") / len(hits) if hits else float("nan"), "adapter_requests": len(hits),
        "errors": [r[4] for r in rows if r[4] is not None],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter-dir", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare, in order")
    args = parser.parse_args()

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from quadapt.runtime.serving.ray.launch import APP_NAME, GRPC_SERVICERS, build_app
    from quadapt.runtime.serving.server import ServerConfig

    names = sorted(p.name for p in Path(args.adapter_dir).iterdir() if (p / "adapter_config.json").is_file())
    adapters: list[str | None] = [None, *names]
    config = ServerConfig(model=args.model, port=free_port(), http_port=free_port(), adapter_dirs=(args.adapter_dir,),
                          threads=1, max_loras=max(1, len(names)), max_queue=256)
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), object_store_memory=100 * 2**20,
             include_dashboard=False, log_to_driver=False)
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=config.http_port),
                grpc_options=gRPCOptions(port=config.port, grpc_servicer_functions=GRPC_SERVICERS))
    results = {}
    try:
        for count in (int(c) for c in args.replicas.split(",")):
            serve.delete(APP_NAME)
            serve.run(build_app(config, replicas=count, replica_cpus=1), name=APP_NAME, route_prefix="/")
            run_load(config.port, adapters, 2, 5, 4)  # warm up: every replica's first steps
            results[count] = run_load(config.port, adapters, args.clients, args.seconds, args.new_tokens)
            print(f"{count} replica(s): {results[count]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{args.clients} streaming gRPC clients, {args.seconds:g} s, {args.new_tokens} new tokens, adapters round "
          f"robin over the base and {len(names)} adapters\n")
    print("| replicas | requests | output tok/s | first token p50 / p99 s | adapter hit rate | errors |")
    print("|---|---|---|---|---|---|")
    for count, r in results.items():
        print(f"| {count} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | "
              f"{r['hit_rate']:.0%} of {r['adapter_requests']} | {len(r['errors'])} |")


if __name__ == "__main__":
    main()
