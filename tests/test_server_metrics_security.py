"""Who can read the server's metrics, and token files that others can read.

The metrics name the adapters, so their endpoint listens on loopback whatever `host` is, and can
ask for the server's bearer token; a token file open to its group or others is reported without
its content. Same set-up as `test_server.py` (a real server on loopback over a tiny random Llama).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request

import pytest

from quadapt.cli import main
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.api.async_llm import AsyncLLM
from quadapt.runtime.serving.server import ServerConfig, read_secret

from .test_server import ServerThread, base, make_engine, tokenizer  # noqa: F401 - fixtures

USER, ADMIN = "user-token-123", "admin-token-456"


def serving(base, tokenizer, **settings) -> ServerThread:
    config = ServerConfig(model=str(base), port=0, metrics_port=0, **settings)
    return ServerThread(config, AsyncLLM.from_engine(make_engine(base, {}, tokenizer), tokenizer))


def scrape(server: ServerThread, path: str = "/metrics", authorization: str | None = None) -> tuple[int, str, dict]:
    """(status, body, headers) of a GET on the server's metrics port, errors included."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.metrics_port}{path}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode(), dict(reply.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_metrics_listen_on_loopback_whatever_the_host(base, tokenizer):
    server = serving(base, tokenizer, host="0.0.0.0")
    try:
        assert server.server.metrics._http.server_address[0] == "127.0.0.1"
        status, body, _ = scrape(server)  # no token asked for by default
        assert status == 200 and "quadapt_kv_cache_blocks_total" in body
        assert scrape(server, "/")[0] == 404 and scrape(server, "/metrics/../admin")[0] == 404
    finally:
        server.close()
    assert server.server.metrics._http is None  # closed with the server


def test_metrics_token_is_required_when_asked_for(base, tokenizer, caplog):
    server = serving(base, tokenizer, token=USER, admin_token=ADMIN, metrics_token=True)
    try:
        with caplog.at_level(logging.DEBUG):
            for authorization in (None, "Bearer wrong-token", f"Basic {USER}", "Bearer", f"Bearer {USER}x"):
                status, body, headers = scrape(server, authorization=authorization)
                assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), authorization
                assert "quadapt_" not in body
            for token in (USER, ADMIN):
                status, body, headers = scrape(server, authorization=f"Bearer {token}")
                assert status == 200 and "quadapt_kv_cache_blocks_total" in body
                assert headers["Content-Type"].startswith("text/plain")
        assert caplog.records and USER not in caplog.text and ADMIN not in caplog.text
        assert not [r for r in caplog.records if r.name.endswith("serving.metrics") and r.levelno >= logging.INFO
                    and "GET" in r.getMessage()]  # no log line per scrape above DEBUG
    finally:
        server.close()


def test_metrics_token_needs_a_token_and_an_endpoint():
    with pytest.raises(InvalidParameterError, match="no token"):
        ServerConfig(model="m", metrics_port=0, metrics_token=True)
    with pytest.raises(InvalidParameterError, match="metrics_port"):
        ServerConfig(model="m", token=USER, metrics_token=True)
    with pytest.raises(InvalidParameterError, match="metrics_host"):
        ServerConfig(model="m", metrics_host="")
    assert ServerConfig(model="m", admin_token=ADMIN, metrics_port=0, metrics_token=True).metrics_tokens == (ADMIN,)
    assert ServerConfig(model="m", token=USER, metrics_port=0).metrics_tokens == ()
    assert ServerConfig(model="m", host="0.0.0.0").metrics_host == "127.0.0.1"


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_a_token_file_open_to_others_is_reported_without_the_token(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text(USER + "\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="quadapt.runtime.serving.config"):
        assert read_secret(path) == USER
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert f"chmod 600 {path}" in caplog.text and "0644" in caplog.text and USER not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="quadapt.runtime.serving.config"):
        assert read_secret(path) == USER
    assert not caplog.records


def test_serve_flags_reach_the_config(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--metrics-host" in help_text and "--metrics-require-token" in help_text

    import quadapt.runtime.serving.server as server_module

    configs: list[ServerConfig] = []
    monkeypatch.setattr(server_module, "serve", configs.append)
    token = tmp_path / "token"
    token.write_text(USER)
    token.chmod(0o600)
    assert main(["serve", "--model", "m", "--host", "0.0.0.0", "--metrics-port", "9100"]) == 0
    assert main(["serve", "--model", "m", "--metrics-port", "0", "--metrics-host", "0.0.0.0",
                 "--token-file", str(token), "--metrics-require-token"]) == 0
    default, widened = configs
    assert (default.metrics_host, default.metrics_token, default.metrics_port) == ("127.0.0.1", False, 9100)
    assert (widened.metrics_host, widened.metrics_token, widened.metrics_tokens) == ("0.0.0.0", True, (USER,))
    capsys.readouterr()
    assert main(["serve", "--model", "m", "--metrics-port", "0", "--metrics-require-token"]) == 2
    assert "metrics_token" in capsys.readouterr().err and len(configs) == 2
