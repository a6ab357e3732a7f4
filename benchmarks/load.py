"""Load on a quadapt server: N concurrent streaming clients for T seconds over a mix of adapters,
through gRPC, the OpenAI-compatible HTTP API, or each in turn on the same server.

Each client streams one request after another (greedy, eos ignored, a fixed number of new
tokens, the same chat messages on both doors), its adapter taken round robin from the base
model and the given adapters. Prints, per protocol, the requests completed, output tokens per
second, time to first token and inter-token latency (p50, p99), and every error; a response is
complete when it ends with a finish reason and the promised number of tokens (gRPC: its last
message; HTTP: the `include_usage` chunk before `data: [DONE]`). The HTTP clients speak plain
HTTP/1.1 with keep-alive (http.client, Server-Sent Events read line by line), so that the client
side costs about what the gRPC stub does; TTFT and inter-token gaps are timed on text chunks.

    python benchmarks/load.py --model DIR [--adapter NAME=PATH ...] [--protocol both] [--clients 16] [--seconds 60] \
        [--executor torch|onnx]
    python benchmarks/load.py --address HOST:PORT --adapter-names a b c   # a gRPC server already running

With --model it starts `quadapt serve` (with --http-port for HTTP) on free loopback ports and
stops it at the end; with `--protocol both` gRPC runs first, then HTTP, on the one server. Not a
test: it prints a table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List three facts about the moon.",
    "Describe the smell of rain.",
]


@dataclass
class Tally:
    """What the clients saw, merged under a lock."""

    completed: int = 0
    tokens: int = 0
    incomplete: int = 0
    errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(address: str, adapters: list[str | None], index: int, stop_at: float, new_tokens: int, tally: Tally) -> None:
    from quadapt.runtime.serving.client import Client

    turn = index
    with Client(address, timeout=300) as client:
        while time.monotonic() < stop_at:
            adapter = adapters[turn % len(adapters)]
            prompt = PROMPTS[turn % len(PROMPTS)]
            turn += 1
            start = last = time.perf_counter()
            first: float | None = None
            gaps: list[float] = []
            produced, finished = 0, None
            try:
                for chunk in client.generate_stream(
                    messages=[{"role": "user", "content": prompt}], adapter=adapter, max_new_tokens=new_tokens,
                    temperature=0.0, ignore_eos=True,
                ):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if first is None:
                            first = now - start
                        else:
                            gaps.append((now - last) / len(chunk.token_ids))
                        last = now
                        produced += len(chunk.token_ids)
                    if chunk.finished:
                        finished = chunk.finish_reason
            except Exception as e:  # noqa: BLE001 - every failure is counted and printed, none is fatal
                with tally.lock:
                    tally.errors.append(f"{type(e).__name__}: {e}")
                continue
            with tally.lock:
                if finished is None or produced != new_tokens:
                    tally.incomplete += 1
                    continue
                tally.completed += 1
                tally.tokens += produced
                tally.ttft.append(first or 0.0)
                tally.itl.extend(gaps)


def http_client_loop(address: str, adapters: list[str | None], index: int, stop_at: float, new_tokens: int,
                     tally: Tally) -> None:
    """As `client_loop`, through POST /v1/chat/completions with `stream` and `include_usage`."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    turn = index
    while time.monotonic() < stop_at:
        adapter = adapters[turn % len(adapters)]
        prompt = PROMPTS[turn % len(PROMPTS)]
        turn += 1
        body = json.dumps({
            "model": adapter or "", "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        })
        start = last = time.perf_counter()
        first: float | None = None
        gaps: list[float] = []
        produced, finished, done = 0, None, False
        try:
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    produced = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        if first is None:
                            first = now - start
                        else:
                            gaps.append(now - last)
                        last = now
                    finished = choice["finish_reason"] or finished
        except Exception as e:  # noqa: BLE001 - every failure is counted and printed, none is fatal
            with tally.lock:
                tally.errors.append(f"{type(e).__name__}: {e}")
            connection.close()
            connection = http.client.HTTPConnection(host, int(port), timeout=300)
            continue
        with tally.lock:
            if not done or finished is None or produced != new_tokens:
                tally.incomplete += 1
                continue
            tally.completed += 1
            tally.tokens += produced
            tally.ttft.append(first or 0.0)
            tally.itl.extend(gaps)
    connection.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str | None]:
    """`quadapt serve` on free loopback ports; returns it, its gRPC address and its HTTP address."""
    command = [sys.executable, "-m", "quadapt.cli", "serve", "--model", str(args.model), "--port", "0",
               "--max-queue", str(max(64, 2 * args.clients)), "--threads", str(args.threads),
               "--executor", args.executor]
    if args.protocol != "grpc":
        command += ["--http-port", "0"]
    for spec in args.adapter:
        command += ["--adapter", spec]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    grpc_address, http_address = None, None
    for line in server.stderr:
        if found := re.search(r"listening on (\S+:\d+)", line):
            grpc_address = found[1]
        if found := re.search(r"HTTP API on https?://(\S+:\d+)/v1", line):
            http_address = found[1]
        if grpc_address and (http_address or args.protocol == "grpc"):
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # keep draining
            return server, grpc_address, http_address
    raise SystemExit(f"the server did not start (exit {server.wait()})")


def wait_until_serving(address: str, seconds: float = 300.0) -> None:
    """The server listens before its model is loaded: wait for its health to say SERVING."""
    from quadapt.runtime.serving.client import Client, ServerError

    deadline = time.monotonic() + seconds
    with Client(address, timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                if client.health() == "SERVING":
                    return
            except ServerError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"the server at {address} did not become ready in {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to serve (starts `quadapt serve`)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="adapter to serve and use")
    parser.add_argument("--address", help="an already running server instead of --model")
    parser.add_argument("--adapter-names", nargs="*", default=[], help="with --address: the adapters to use")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--executor", choices=["auto", "torch", "onnx"], default="auto",
                        help="with --model: the server's executor (quadapt serve --executor)")
    parser.add_argument("--protocol", choices=["grpc", "http", "both"], default="grpc",
                        help="which door the clients use; both: gRPC, then HTTP, on the same server")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --protocol both: rounds, each running both doors, the order alternating")
    args = parser.parse_args()
    if (args.model is None) == (args.address is None):
        parser.error("give --model (to start a server) or --address (to use one)")

    server = None
    address, http_address = args.address, None
    names = args.adapter_names
    if args.model is not None:
        server, address, http_address = start_server(args)
        names = [spec.partition("=")[0] for spec in args.adapter]
    elif args.protocol != "grpc":
        parser.error("--protocol http/both needs --model (the benchmark starts the server with --http-port)")
    adapters: list[str | None] = [None, *names]
    wait_until_serving(address)
    protocols = ["grpc", "http"] if args.protocol == "both" else [args.protocol]
    # Rounds alternate the order (gRPC, HTTP, HTTP, gRPC, ...), so that a machine slowing down or
    # speeding up during the run weighs on both alike.
    order = [p for r in range(args.rounds) for p in (protocols if r % 2 == 0 else protocols[::-1])]
    results: dict[str, list[tuple[Tally, float]]] = {p: [] for p in protocols}
    try:
        for protocol in order:
            loop, target = (client_loop, address) if protocol == "grpc" else (http_client_loop, http_address)
            results[protocol].append(run_clients(loop, target, adapters, args))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)

    print(f"{args.clients} streaming clients for {args.seconds:.0f} s per protocol and round ({args.rounds} round(s)), "
          f"adapters round robin over "
          f"base + {names}, {args.new_tokens} new tokens each")
    for protocol, runs in results.items():
        for round_, (tally, elapsed) in enumerate(runs, 1):
            tag = f"[{protocol} {round_}]" if len(runs) > 1 else f"[{protocol}]"
            print(f"{tag} ran {elapsed:.0f} s (the last requests finishing)")
            print(f"{tag} requests completed: {tally.completed}; incomplete: {tally.incomplete}; "
                  f"errors: {len(tally.errors)}")
            print(f"{tag} output tokens/s: {tally.tokens / elapsed:.1f}")
            print(f"{tag} time to first token s: p50 {percentile(tally.ttft, 50):.3f}, "
                  f"p99 {percentile(tally.ttft, 99):.3f}")
            print(f"{tag} inter-token latency s: p50 {percentile(tally.itl, 50):.3f}, "
                  f"p99 {percentile(tally.itl, 99):.3f}")
            if tally.ttft:
                print(f"{tag} mean time to first token s: {statistics.mean(tally.ttft):.3f}")
            for error in tally.errors[:10]:
                print(f"{tag} error: {error}")
    if len(results) == 2:
        grpc_tokens = sum(t.tokens for t, _ in results["grpc"]) / sum(s for _, s in results["grpc"])
        http_tokens = sum(t.tokens for t, _ in results["http"]) / sum(s for _, s in results["http"])
        print(f"HTTP / gRPC output tokens/s (all rounds): {http_tokens / grpc_tokens:.2f}" if grpc_tokens
              else "no gRPC tokens")


def run_clients(loop, target: str, adapters: list[str | None], args: argparse.Namespace) -> tuple[Tally, float]:
    """`args.clients` threads running `loop` for `args.seconds`; their tally and the seconds it took."""
    tally = Tally()
    started = time.monotonic()
    stop_at = started + args.seconds
    threads = [threading.Thread(target=loop, args=(target, adapters, i, stop_at, args.new_tokens, tally))
               for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, time.monotonic() - started


if __name__ == "__main__":
    main()
