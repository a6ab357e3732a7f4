"""Adapters by name, for replicas that load them on first use: a name in, a local directory out.

A replica of a cluster is asked for adapters nobody loaded on it, by the name a request gives.
`AdapterResolver` finds that name among the start-up adapters (`--adapter NAME=PATH`, the
operator's) and then as a sub-directory of each `--adapter-dir`, confined as the single
server's LoadAdapter is (`security.resolve_adapter_path`: real paths, no `..` or symlink escape).
Every replica resolves the same name to the same files, so any replica can serve any allowed
adapter: on one machine a local directory, in a cluster a shared one (NFS, a mounted bucket).

The extension point is `AdapterResolver.fetchers`: a URI scheme (`s3`, `gs`, ...) -> a function
that materialises `scheme://...` into a local directory and returns it. An adapter dir given as
such a URI uses its scheme's fetcher; none ships, and a URI without a fetcher is refused when the
resolver is made, naming the scheme (docs/scale-out.md). This file reads no weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ...engine.registry import AdapterNotFoundError
from ...errors import InvalidParameterError, quote
from ..security import Refusal, resolve_adapter_path

_URI = re.compile(r"([a-z][a-z0-9+.-]*)://(.*)")
# A directory is an adapter when it holds PEFT's config (the weights are checked when it loads).
_MARKER = "adapter_config.json"


class AdapterResolver:
    """Adapter name -> local directory, from the start-up adapters and the adapter dirs.

    Args:
        adapters: start-up adapters, name -> directory (trusted, not confined).
        adapter_dirs: directories (or `scheme://` URIs with a fetcher) whose sub-directories are
            adapters by their relative name.

    Raises:
        InvalidParameterError: an adapter dir that is a URI of a scheme without a fetcher, or a
            local one that is not a directory.
    """

    # scheme -> fetch(uri) -> local directory; empty here, see the module docstring.
    fetchers: dict[str, Callable[[str], Path]] = {}

    def __init__(self, adapters: Mapping[str, str], adapter_dirs: Sequence[str]) -> None:
        self.adapters = {name: Path(path) for name, path in adapters.items()}
        dirs = []
        for d in adapter_dirs:
            uri = _URI.fullmatch(str(d))
            if uri is not None:
                fetch = self.fetchers.get(uri.group(1))
                if fetch is None:
                    raise InvalidParameterError(
                        f"adapter dir {quote(d)} is a {uri.group(1)}:// URI, and no fetcher is registered for it; "
                        "mount it as a directory (shared by every node), or register one in "
                        "AdapterResolver.fetchers (docs/scale-out.md)"
                    )
                d = str(fetch(str(d)))
            if not Path(d).is_dir():
                raise InvalidParameterError(f"adapter dir {quote(d)} is not a directory; create it or drop it")
            dirs.append(Path(os.path.realpath(d)))
        self.adapter_dirs = dirs

    def resolve(self, name: str) -> Path:
        """The directory of the adapter called `name`.

        Raises:
            AdapterNotFoundError: no start-up adapter and no adapter dir holds it (or the name
                leads outside the adapter dirs).
        """
        if name in self.adapters:
            return self.adapters[name]
        if self.adapter_dirs and name and not os.path.isabs(name):
            try:
                path = resolve_adapter_path(name, self.adapter_dirs)
            except Refusal:
                path = None
            if path is not None and (path / _MARKER).is_file():
                return path
        raise AdapterNotFoundError(
            f"adapter {quote(name)} is not served: it is no start-up adapter and no adapter dir holds it "
            f"(names: {', '.join(self.names()[:8]) or 'none'})"
        )

    def names(self) -> list[str]:
        """Every adapter name this resolver serves, sorted (sub-directories one level deep)."""
        found = set(self.adapters)
        for d in self.adapter_dirs:
            for child in d.iterdir():
                if (child / _MARKER).is_file() and (os.path.realpath(child) == str(child) or
                                                    Path(os.path.realpath(child)).is_relative_to(d)):
                    found.add(child.name)
        return sorted(found)
