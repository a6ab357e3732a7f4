"""Adapters by name for replicas that load them on first use (`runtime/serving/ray/resolver.py`):
a name resolves inside the adapter dirs only, as LoadAdapter's paths do, and a URI scheme
without a fetcher is refused when the resolver is made. No Ray, no weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quadapt.runtime.engine.registry import AdapterNotFoundError
from quadapt.runtime.errors import InvalidParameterError
from quadapt.runtime.serving.ray.resolver import AdapterResolver


def fake_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return path


def test_names_resolve_inside_the_adapter_dirs_only(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    fake_adapter(allowed / "fr")
    fake_adapter(outside / "evil")
    (allowed / "escape").symlink_to(outside / "evil")
    (allowed / "inner").symlink_to(allowed / "fr")
    (allowed / "empty").mkdir()
    startup = fake_adapter(tmp_path / "startup" / "sql")
    resolver = AdapterResolver({"sql": str(startup)}, [str(allowed)])
    assert resolver.resolve("fr") == Path(os.path.realpath(allowed / "fr"))
    assert resolver.resolve("inner") == Path(os.path.realpath(allowed / "fr"))  # a link that stays inside
    assert resolver.resolve("sql") == startup  # the operator's, not confined
    for name in ("escape", "../outside/evil", str(outside / "evil"), "empty", "missing", ""):
        with pytest.raises(AdapterNotFoundError, match="not served"):
            resolver.resolve(name)
    assert resolver.names() == ["fr", "inner", "sql"]


def test_a_uri_needs_a_fetcher(tmp_path, monkeypatch):
    with pytest.raises(InvalidParameterError, match="s3:// URI, and no fetcher"):
        AdapterResolver({}, ["s3://bucket/adapters"])
    fake_adapter(tmp_path / "cache" / "fr")
    monkeypatch.setitem(AdapterResolver.fetchers, "s3", lambda uri: tmp_path / "cache")
    assert AdapterResolver({}, ["s3://bucket/adapters"]).resolve("fr").name == "fr"
    with pytest.raises(InvalidParameterError, match="not a directory"):
        AdapterResolver({}, [str(tmp_path / "nowhere")])
