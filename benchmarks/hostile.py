"""Health-check latency of a quadapt gRPC server while hostile load hits it.

Two scenes, each with a probe calling the standard health check every 20 ms from its own
channel: (1) N streams are opened, then all cancelled at once (a client process dying with its
streams open), and (2) oversize requests are refused: a 1 MiB prompt, a 3.9 MiB Tokenize and
30,000 chat messages. Prints, per scene, the probe's slowest and median answer and how long each
oversize request took to be refused. Health must never wait on the engine or on a large input.

    python benchmarks/hostile.py --model DIR [--streams 50]
    python benchmarks/hostile.py --address HOST:PORT

With --model it starts `quadapt serve` on a free loopback port (as benchmarks/load.py does) and
stops it at the end. Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import threading
import time

from load import start_server, wait_until_serving

MIB = 2**20


class Probe:
    """Health checks every 20 ms in a thread; `latencies` in seconds."""

    def __init__(self, address: str) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._channel = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(self._channel)
        self._check = lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
        self._check()
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self._check()
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.02)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._channel.close()

    def summary(self) -> str:
        return (f"health max {max(self.latencies) * 1000:.0f} ms, median "
                f"{statistics.median(self.latencies) * 1000:.1f} ms over {len(self.latencies)} checks")


def cancel_streams(address: str, n: int, settle_s: float) -> str:
    import grpc

    from quadapt.protos.quadapt.v1 import generation_pb2 as pb
    from quadapt.protos.quadapt.v1 import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        calls = [stub.GenerateStream(pb.GenerateRequest(prompt=f"Count slowly to one hundred, stream {i}.",
                                                        max_new_tokens=256, ignore_eos=True), timeout=600)
                 for i in range(n)]
        next(calls[0])  # the engine is stepping
        time.sleep(settle_s)
        with Probe(address) as probe:
            time.sleep(0.5)
            for call in calls:
                call.cancel()
            time.sleep(5.0)
    return f"{n} streams cancelled at once: {probe.summary()}"


def oversize(address: str) -> list[str]:
    import grpc

    from quadapt.protos.quadapt.v1 import generation_pb2 as pb

    requests = [
        ("Generate, 1 MiB prompt", "Generate", pb.GenerateRequest(prompt="x" * MIB, max_new_tokens=4)),
        ("Tokenize, 3.9 MiB prompt", "Tokenize", pb.TokenizeRequest(prompt="y" * (39 * MIB // 10))),
        ("Generate, 30,000 messages", "Generate",
         pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")] * 30_000, max_new_tokens=4)),
    ]
    lines = []
    options = [("grpc.max_send_message_length", 8 * MIB)]
    with grpc.insecure_channel(address, options=options) as channel:
        for label, method, request in requests:
            call = channel.unary_unary(f"/quadapt.v1.Generation/{method}", request_serializer=None,
                                       response_deserializer=None)
            with Probe(address) as probe:
                time.sleep(0.2)
                started = time.perf_counter()
                try:
                    call(request.SerializeToString(), timeout=120)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                took = time.perf_counter() - started
                time.sleep(0.2)
            lines.append(f"{label}: {code} after {took:.3f} s; {probe.summary()}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint to serve (starts `quadapt serve`)")
    parser.add_argument("--address", help="an already running server instead of --model")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds the streams run before the cancel")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if (args.model is None) == (args.address is None):
        parser.error("give --model (to start a server) or --address (to use one)")
    server, address = None, args.address
    if args.model is not None:
        args.adapter, args.clients = [], args.streams  # what load.start_server reads
        server, address = start_server(args)
    try:
        wait_until_serving(address)
        print(cancel_streams(address, args.streams, args.settle))
        for line in oversize(address):
            print(line)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


if __name__ == "__main__":
    main()
