"""`quadapt serve` and `quadapt client` as a user runs them: two processes on loopback.

The served text equals what `quadapt generate` prints for the same model, prompt and adapter;
SIGTERM ends the server with status 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from peft import LoraConfig

from quadapt.cli import main

from .test_adapters import make_base, make_peft_adapter

QUADAPT = [sys.executable, "-m", "quadapt.cli"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("serve-base"))


@pytest.fixture(scope="module")
def adapter(model, tmp_path_factory):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return make_peft_adapter(model, tmp_path_factory.mktemp("serve-adapter") / "fr", config=config, seed=2)


def generate_stdout(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out


def test_serve_and_client_from_the_shell(capsys, model, adapter, tmp_path):
    server = subprocess.Popen(
        [*QUADAPT, "serve", "--model", str(model), "--adapter", f"fr={adapter}", "--port", "0",
         "--adapter-dir", str(adapter.parent)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = None
        deadline = time.monotonic() + 120
        lines = []
        while address is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"listening on (\S+:\d+)", line)
            address = found[1] if found else None
        assert address is not None, "".join(lines)

        def client(*argv: str) -> str:
            # The server listens before its model is loaded: --wait until it says SERVING.
            done = subprocess.run([*QUADAPT, "client", "--address", address, "--wait", "120", *argv],
                                  capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stderr
            return done.stdout

        settings = ["--max-new-tokens", "8", "--ignore-eos"]
        assert client("generate", "--prompt", "hello world", *settings) == generate_stdout(
            capsys, "--model", str(model), "--prompt", "hello world", *settings)
        assert client("generate", "--prompt", "hi", "--chat", "--adapter", "fr", *settings) == generate_stdout(
            capsys, "--model", str(model), "--prompt", "hi", "--chat", "--adapter", str(adapter), *settings)
        assert [json.loads(line)["name"] for line in client("adapters").splitlines()] == ["fr"]
        unknown = subprocess.run([*QUADAPT, "client", "--address", address, "generate", "--prompt", "x",
                                  "--adapter", "nope"], capture_output=True, text=True, timeout=120)
        assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr and "nope" in unknown.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0


def test_client_takes_the_port_as_serve_names_it(capsys, model):
    from quadapt.runtime.api.async_llm import AsyncLLM
    from quadapt.runtime.serving.server import ServerConfig
    from quadapt.runtime.text.tokenizer import Tokenizer

    from .test_server import ServerThread, make_engine

    tokenizer = Tokenizer.from_dir(model)
    llm = AsyncLLM.from_engine(make_engine(model, {}, tokenizer), tokenizer)
    served = ServerThread(ServerConfig(model=str(model), port=0), llm)
    try:
        capsys.readouterr()
        assert main(["client", "--port", str(served.server.port), "info"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "SERVING"
        assert main(["client", "--address", f"127.0.0.1:{served.server.port}", "--host", "x", "info"]) == 2
        assert "--address names the host already" in capsys.readouterr().err
    finally:
        served.close()


def test_a_bad_start_up_adapter_is_one_error_before_listening(model, tmp_path):
    done = subprocess.run([*QUADAPT, "serve", "--model", str(model), "--adapter", f"x={tmp_path / 'missing'}",
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "listening on" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "is not a directory" in line] == [
        f"quadapt: error: adapter x={tmp_path / 'missing'}: adapter path {str(tmp_path / 'missing')!r} is not a "
        "directory; pass a PEFT adapter directory"
    ]


def test_verbose_prints_debug_lines(capsys, model):
    capsys.readouterr()
    assert main(["-v", "generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^quadapt: loaded .* in \d+\.\d+ s$", err, re.MULTILINE), err
    assert re.search(r"^quadapt: [12] tokens in \d+\.\d+ s, finished by (stop|length)$", err, re.MULTILINE), err
    assert main(["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert "quadapt: loaded" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--port", "0"], "must be a port number in 1-65535, got '0'"),
    (["--port", "65536"], "must be a port number in 1-65535, got '65536'"),
    (["--port", "-1"], "must be a port number in 1-65535, got '-1'"),
    (["--host", "", "--port", "1"], "--host is empty"),
])
def test_client_refuses_a_port_or_host_that_names_no_server(capsys, argv, message):
    try:
        status = main(["client", *argv, "info"])
    except SystemExit as refused:  # argparse refuses a flag's value itself
        status = refused.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_serve_passes_the_http_flags_to_the_server(model, monkeypatch):
    from quadapt.runtime.serving import server as server_module

    configs = []
    monkeypatch.setattr(server_module, "serve", configs.append)
    assert main(["serve", "--model", str(model), "--port", "0"]) == 0
    assert main(["serve", "--model", str(model), "--port", "0", "--http-port", "8080", "--http-host", "0.0.0.0"]) == 0
    assert [(c.http_port, c.http_host) for c in configs] == [(None, None), (8080, "0.0.0.0")]
    assert configs[1].host == "127.0.0.1"  # --http-host does not widen the gRPC door


@pytest.mark.parametrize("value", ["65536", "-1", "http"])
def test_serve_refuses_an_http_port_outside_the_range(capsys, value):
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--model", "m", "--http-port", value])
    assert refused.value.code == 2
    assert f"argument --http-port: must be a port number in 0-65535 (0: any free port), got {value!r}" in (
        capsys.readouterr().err
    )


def test_serve_ray_without_the_extra_names_it(capsys, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    capsys.readouterr()
    assert main(["serve", "--model", str(model), "--ray", "--replicas", "2"]) == 2
    assert "pip install 'quadapt[ray]'" in capsys.readouterr().err


def test_serve_ray_flags_are_checked_before_anything_starts(capsys, model):
    capsys.readouterr()
    assert main(["serve", "--model", str(model), "--replicas", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(model), "--ray", "--replicas", "2", "--autoscale", "1:2"])
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(model), "--ray", "--autoscale", "3:1"])
    assert "MIN:MAX" in capsys.readouterr().err
    for flags in (["--autoscale", "1:99999999999999999999"], ["--replicas", "99999999999999999999"], ["--replicas", "x"]):
        with pytest.raises(SystemExit):  # refused by the flag, not by Ray deep inside
            main(["serve", "--model", str(model), "--ray", *flags])
        assert "10000" in capsys.readouterr().err
    pytest.importorskip("ray.serve", reason="checks the cluster's settings, which need the ray extra")
    assert main(["serve", "--model", str(model), "--ray", "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err
