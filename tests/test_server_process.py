"""The protocol and the process: the stubs are current, the `.proto` alone makes a working client,
and a server process drains on SIGTERM.

- `python -m quadapt.protos.generate` into a temporary folder gives the checked-in stubs (up to
  the generator's version stamps).
- A client generated from `generation.proto` by grpcio-tools inside the test, run in a separate
  Python process that never imports quadapt, uses the service: the proto is the contract.
- `serve()` in a subprocess loads the model itself; on SIGTERM an in-flight stream finishes,
  new requests get UNAVAILABLE, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from peft import LoraConfig

from quadapt.protos import generate as protos
from quadapt.runtime.serving.client import Client, ServerError
from quadapt.runtime.errors import CheckpointError
from quadapt.runtime.api.async_llm import AsyncLLM
from quadapt.runtime.serving.server import ServerConfig, serve
from quadapt.runtime.text.tokenizer import Tokenizer

from .test_adapters import make_base, make_peft_adapter
from .test_server import GREEDY, HELLO, ServerThread, make_engine, wait_until

PROTO_DIR = Path(protos.__file__).parent
PROTO = PROTO_DIR / "quadapt" / "v1" / "generation.proto"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("process-base"))


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return make_peft_adapter(base, tmp_path_factory.mktemp("process-adapter") / "a", seed=6, config=config)


def _without_version_stamps(text: str) -> str:
    """The generated code minus the generator's own versions, which say which grpcio-tools ran."""
    text = re.sub(r"# Protobuf Python Version: \S+", "# Protobuf Python Version: X", text)
    text = re.sub(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,",
                  r"\1 X,", text)
    return re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = 'X'", text)


def test_checked_in_stubs_are_current(tmp_path):
    written = protos.generate(out=tmp_path)
    assert [p.name for p in written] == ["generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"]
    for fresh in written:
        checked_in = PROTO_DIR / fresh.relative_to(tmp_path)
        assert checked_in.exists(), f"{checked_in} is missing: run python -m quadapt.protos.generate"
        assert _without_version_stamps(checked_in.read_text()) == _without_version_stamps(fresh.read_text()), (
            f"{checked_in.name} is stale: run python -m quadapt.protos.generate and commit the result"
        )
    assert "from . import generation_pb2" in (PROTO_DIR / "quadapt/v1/generation_pb2_grpc.py").read_text()


def test_the_proto_follows_the_house_rules():
    """Every message, field, enum value and rpc carries a comment; enums start at *_UNSPECIFIED = 0."""
    lines = PROTO.read_text().splitlines()
    declaration = re.compile(
        r"^\s*(message|enum|rpc|service|oneof)\s"  # a definition
        r"|^\s*(optional |repeated )?[\w.]+ \w+ = \d+;"  # a field
        r"|^\s*[A-Z][A-Z0-9_]* = \d+;"  # an enum value
    )
    declared = [(prev, line) for prev, line in zip(lines, lines[1:]) if declaration.match(line)]
    assert len(declared) > 80  # the pattern sees the file
    bare = [line.strip() for prev, line in declared if "//" not in prev]
    assert not bare, f"declarations without a comment above them: {bare}"
    for enum, first in re.findall(r"enum (\w+) \{[^=]*?\n\s*(\w+) = 0;", PROTO.read_text()):
        assert first.endswith("_UNSPECIFIED"), enum
    from quadapt.protos.quadapt.v1 import generation_pb2 as pb

    request = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    for name in ("prompt", "messages", "adapter", "max_new_tokens", "temperature", "top_p", "top_k",
                 "repetition_penalty", "stop", "seed", "ignore_eos"):
        assert name in request, name
    assert {"text", "finish_reason", "usage"} <= set(pb.GenerateResponse.DESCRIPTOR.fields_by_name)
    assert {"text", "token_ids", "finish_reason", "usage"} <= set(pb.GenerateStreamResponse.DESCRIPTOR.fields_by_name)
    assert {"name", "path"} <= set(pb.LoadAdapterRequest.DESCRIPTOR.fields_by_name)
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["Generation"].methods] == [
        "Generate", "GenerateStream", "Tokenize", "ListAdapters", "LoadAdapter", "UnloadAdapter", "ServerInfo"]


PROTO_ONLY_CLIENT = textwrap.dedent('''
    import json, sys
    import grpc
    from quadapt.v1 import generation_pb2 as pb, generation_pb2_grpc as pb_grpc
    import quadapt
    assert quadapt.__file__.startswith(sys.argv[2]), quadapt.__file__  # the generated package, not quadapt's
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(sys.argv[1]))
    out = {}
    info = stub.ServerInfo(pb.ServerInfoRequest(), timeout=10)
    out["context"] = info.max_context_tokens
    r = stub.Generate(pb.GenerateRequest(prompt="the quick brown", max_new_tokens=8, ignore_eos=True), timeout=30)
    out["unary"] = [r.text, list(r.token_ids), pb.FinishReason.Name(r.finish_reason), r.usage.completion_tokens]
    request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hello there")], adapter="a",
                                 max_new_tokens=8, ignore_eos=True)
    pieces = list(stub.GenerateStream(request, timeout=30))
    out["stream"] = ["".join(p.text for p in pieces), [t for p in pieces for t in p.token_ids],
                     pb.FinishReason.Name(pieces[-1].finish_reason)]
    out["tokens"] = list(stub.Tokenize(pb.TokenizeRequest(prompt="hello world"), timeout=10).token_ids)
    out["adapters"] = [a.name for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=10).adapters]
    try:
        stub.Generate(pb.GenerateRequest(prompt="x", adapter="nope"), timeout=10)
    except grpc.RpcError as e:
        out["unknown"] = e.code().name
    print(json.dumps(out))
''')


def test_a_client_generated_from_the_proto_alone(tmp_path, base, adapter):
    from grpc_tools import protoc

    out = tmp_path / "generated"
    out.mkdir()
    assert protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}",
                        "quadapt/v1/generation.proto"]) == 0
    for package in (out / "quadapt", out / "quadapt" / "v1"):
        (package / "__init__.py").write_text("")
    tokenizer = Tokenizer.from_dir(base)
    served = ServerThread(ServerConfig(model=str(base), port=0),
                          AsyncLLM.from_engine(make_engine(base, {"a": adapter}, tokenizer), tokenizer))
    try:
        env = {**os.environ, "PYTHONPATH": str(out)}
        run = subprocess.run([sys.executable, "-c", PROTO_ONLY_CLIENT, served.target, str(out)], env=env,
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        got = json.loads(run.stdout)
        with served.client() as client:
            unary = client.generate("the quick brown", **GREEDY)
            chat = client.generate(messages=HELLO, adapter="a", **GREEDY)
        assert got["unary"] == [unary.text, unary.token_ids, "FINISH_REASON_LENGTH", 8]
        assert got["stream"] == [chat.text, chat.token_ids, "FINISH_REASON_LENGTH"]
        assert got["tokens"] == tokenizer.encode("hello world")
        assert (got["context"], got["adapters"], got["unknown"]) == (256, ["a"], "NOT_FOUND")
    finally:
        served.close()


SERVE = textwrap.dedent('''
    import logging, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    from quadapt.runtime.engine.engine import Engine
    step = Engine.step
    def slow_step(self):  # so that a stream is still running when SIGTERM comes
        time.sleep(0.03)
        return step(self)
    Engine.step = slow_step
    from quadapt.runtime.serving.server import ServerConfig, serve
    serve(ServerConfig(model=sys.argv[1], port=0, adapters={"a": sys.argv[2]}, max_loras=2, drain_timeout_s=30,
                       kv_cache_bytes=2 * 2**20))
''')


def test_sigterm_drains_a_server_process(base, adapter):
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(base), str(adapter)], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("listening on" in line for line in lines) or process.poll() is not None, 60,
                   "the server to listen")
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(lines))[1])
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            wait_until(lambda: client.health() == "SERVING", 60, "the model to load")
            stream = client.generate_stream("drain me", adapter="a", max_new_tokens=60, ignore_eos=True, timeout=60)
            first = next(stream)
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: client.health() == "NOT_SERVING", 10, "health NOT_SERVING")
            with pytest.raises(ServerError) as refused:
                client.generate("too late", **GREEDY)
            assert refused.value.code == "UNAVAILABLE"
            rest = list(stream)
        assert rest[-1].finish_reason == "length" and sum(len(c.token_ids) for c in [first, *rest]) == 60
        assert process.wait(30) == 0
        reader.join(5)
        log = "".join(lines)
        assert "SIGTERM: draining" in log and "req-0: length (adapter 'a'" in log and "stopped" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_serve_raises_the_load_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        serve(ServerConfig(model=str(tmp_path / "missing"), port=0))
