"""Load on a quadapt gRPC server: N concurrent streaming clients for T seconds over a mix of adapters.

Each client streams one request after another (greedy, eos ignored, a fixed number of new
tokens), its adapter taken round robin from the base model and the given adapters. Prints the
requests completed, output tokens per second, time to first token and inter-token latency
(p50, p99), and every error; a response is complete when its last message carries a finish
reason and the promised number of tokens.

    python benchmarks/load.py --model DIR [--adapter NAME=PATH ...] [--clients 16] [--seconds 60]
    python benchmarks/load.py --address HOST:PORT --adapter-names a b c   # a server already running

With --model it starts `quadapt serve` on a free loopback port and stops it at the end. Not a
test: it prints a table.
"""

from __future__ import annotations

import argparse
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
    from quadapt.runtime.client import Client

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


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "quadapt.cli", "serve", "--model", str(args.model), "--port", "0",
               "--max-queue", str(max(64, 2 * args.clients)), "--threads", str(args.threads)]
    for spec in args.adapter:
        command += ["--adapter", spec]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in server.stderr:
        found = re.search(r"listening on (\S+:\d+)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # keep draining
            return server, found[1]
    raise SystemExit(f"the server did not start (exit {server.wait()})")


def wait_until_serving(address: str, seconds: float = 300.0) -> None:
    """The server listens before its model is loaded: wait for its health to say SERVING."""
    from quadapt.runtime.client import Client, ServerError

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
    args = parser.parse_args()
    if (args.model is None) == (args.address is None):
        parser.error("give --model (to start a server) or --address (to use one)")

    server = None
    address = args.address
    names = args.adapter_names
    if args.model is not None:
        server, address = start_server(args)
        names = [spec.partition("=")[0] for spec in args.adapter]
    adapters: list[str | None] = [None, *names]
    wait_until_serving(address)
    tally = Tally()
    try:
        started = time.monotonic()
        stop_at = started + args.seconds
        threads = [
            threading.Thread(target=client_loop, args=(address, adapters, i, stop_at, args.new_tokens, tally))
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)

    print(f"{args.clients} streaming clients for {args.seconds:.0f} s (ran {elapsed:.0f} s, the last requests "
          f"finishing), adapters round robin over base + {names}, {args.new_tokens} new tokens each")
    print(f"requests completed: {tally.completed}; incomplete: {tally.incomplete}; errors: {len(tally.errors)}")
    print(f"output tokens/s: {tally.tokens / elapsed:.1f}")
    print(f"time to first token s: p50 {percentile(tally.ttft, 50):.3f}, p99 {percentile(tally.ttft, 99):.3f}")
    print(f"inter-token latency s: p50 {percentile(tally.itl, 50):.3f}, p99 {percentile(tally.itl, 99):.3f}")
    if tally.ttft:
        print(f"mean time to first token s: {statistics.mean(tally.ttft):.3f}")
    for error in tally.errors[:10]:
        print(f"error: {error}")


if __name__ == "__main__":
    main()
