"""The adapter registry: adapters by name, loaded and unloaded while requests run, in a few device slots.

An adapter is loaded once into host memory (`load`: read, checked against the base, hashed) and
served from one of the executor's N slots while requests use it. A slot is filled when a
request needs an adapter that holds none; when all are taken, the least recently used adapter
that no running request uses and that is not pinned is evicted (it stays loaded on the host,
and comes back on the next request). Pinned adapters keep their slot.

Identity is a name plus a content hash: loading a name again with other weights makes a new
version; requests already admitted keep the version they named, and the old version goes once
the last of them ends. Nothing mixes versions. An adapter named by an unfinished request cannot
be unloaded (a clear error says so), and an unknown name is an error, never the base model.

A name or path from a client is untrusted: names must match `_NAME` in full, messages quote what
a client sent (bounded), and an adapter directory is checked for size, rank and fit from its
safetensors header before any tensor is read.

An engine always has a registry; one with no slots (`max_loras=0`) holds no adapter and refuses
to load one (`NoAdapterSlotsError`, naming the option to raise).

Thread safety: every public method takes one lock, so a server thread may load or unload while
the engine's thread steps. The registry never runs the model; it only fills slots, through the
executor or through `LoRASlots` (a model's LoRA stacks, found once).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..checkpoints.peft import MAX_ADAPTER_BYTES, PeftAdapter
from ..checkpoints.peft_fit import BaseModules, check_adapter_fits, load_adapter_for
from ..errors import AdapterError, InvalidParameterError, quote
from ..model.lora import LoRAWeights, SlotTarget

# Used with fullmatch: `$` alone would let a trailing newline through into logs.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}")
# How many loaded names an "unknown adapter" message lists.
_LISTED = 8


class AdapterNotFoundError(AdapterError):
    """A request or call named an adapter the registry does not hold."""


class AdapterInUseError(AdapterError):
    """An adapter cannot be unloaded while unfinished requests use it."""


class NoAdapterSlotsError(InvalidParameterError):
    """An adapter was loaded into an engine started with no adapter slots (`max_loras=0`)."""


class SlotWriter(Protocol):
    num_lora_slots: int

    def write_adapter_slot(self, slot: int, modules: Mapping[str, LoRAWeights] | None) -> None: ...


class LoRASlots:
    """The slots of a model's LoRA stacks, found once (`adapters.lora_modules`), not on every write.

    Args:
        stacks: HF module name -> where its factors load (a stack, or a section of a stacked one).
        num_lora_slots: the slots each stack holds.
    """

    def __init__(self, stacks: Mapping[str, SlotTarget], num_lora_slots: int) -> None:
        self.stacks = dict(stacks)
        self.num_lora_slots = num_lora_slots

    def write_adapter_slot(self, slot: int, modules: Mapping[str, LoRAWeights] | None) -> None:
        """Copy an adapter into `slot` of every stack, clearing the slot where it has no module
        (None: clear it everywhere).

        Raises:
            AdapterError: the adapter has a module without a LoRA stack.
        """
        modules = modules or {}
        missing = [name for name in modules if name not in self.stacks]
        if missing:
            raise AdapterError(
                f"the adapter has LoRA weights for {', '.join(missing[:4])}, but the model has no LoRA slots there; "
                "add slots for every module the served adapters target"
            )
        for name, stack in self.stacks.items():
            if name in modules:
                stack.set_slot(slot, modules[name])
            else:
                stack.clear_slot(slot)


@dataclass(eq=False)
class AdapterVersion:
    """One loaded adapter: its name, content hash and factors, and who uses it.

    Attributes:
        name: the name it was loaded under.
        digest: sha256 of its factors, ranks and alphas (hex).
        modules: HF module name -> factors, on the host.
        requests: unfinished requests that named this version.
        running: running requests using its slot.
        slot: the slot holding it, or None.
        current: False once the name was reloaded with other weights or unloaded.
    """

    name: str
    digest: str
    modules: dict[str, LoRAWeights]
    requests: int = 0
    running: int = 0
    slot: int | None = None
    current: bool = True
    pinned: bool = False
    source: str = ""

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.digest[:12]}"

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())


@dataclass
class RegistryStats:
    """Counters for metrics: slot fills and evictions since start."""

    slot_loads: int = 0
    evictions: int = 0
    loads: int = 0
    unloads: int = 0
    events: list[str] = field(default_factory=list)


class AdapterRegistry:
    """Adapters by name over an executor's slots; see the module docstring.

    Args:
        slots: what holds the slots (the executor, or a model's `LoRASlots`); none with
            `num_lora_slots` 0.
        base: the base model's module layout, to check adapters against (None only without slots).
        max_rank: the largest rank a slot holds.
        max_bytes: the largest adapter weights file `load` reads from a directory.
    """

    def __init__(
        self, slots: SlotWriter, base: BaseModules | None, max_rank: int, *, max_bytes: int = MAX_ADAPTER_BYTES
    ) -> None:
        if slots.num_lora_slots and base is None:
            raise InvalidParameterError("a registry with adapter slots needs the base model's layout (base=)")
        self._slots = slots
        self._base = base
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self._versions: dict[str, AdapterVersion] = {}
        self._occupant: list[AdapterVersion | None] = [None] * slots.num_lora_slots
        self._clock = 0
        self._last_used: dict[int, int] = {}  # slot -> when its occupant was last used
        self._lock = threading.RLock()
        self.stats = RegistryStats()

    def load(self, name: str, source: str | Path | PeftAdapter, *, pinned: bool = False) -> AdapterVersion:
        """Load (or reload) an adapter under `name`.

        Args:
            name: letters, digits and `._-/`, at most 128 characters.
            source: a PEFT adapter directory, or an adapter already read.
            pinned: keep it in a slot once it has one.

        Returns:
            The current version of `name` (the same one when the content is unchanged).

        Raises:
            InvalidParameterError: a bad name.
            NoAdapterSlotsError: the engine has no adapter slots (`max_loras=0`).
            AdapterError, UnsupportedError: the adapter is malformed, unsupported, made for
                another base, of a rank above the slots' `max_rank`, or a directory whose weights
                file is above `max_bytes`; a directory is refused for size, rank or fit before
                any tensor is read.
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidParameterError(
                f"adapter name {quote(name)} is not allowed; use 1-128 letters, digits, '.', '_', '-' or '/', "
                "starting with a letter or digit"
            )
        if not self._occupant:
            raise NoAdapterSlotsError(
                f"cannot load adapter {quote(name)}: this model was started with max_loras=0 (no adapter slots), so it "
                "serves the base model only; start it with max_loras >= 1 (--max-loras on the command line)"
            )
        assert self._base is not None
        if isinstance(source, PeftAdapter):
            check_adapter_fits(source, self._base, max_rank=self.max_rank)
            adapter = source
        else:
            adapter = load_adapter_for(source, self._base, max_rank=self.max_rank, max_bytes=self.max_bytes)
        digest = adapter_digest(adapter.modules)
        with self._lock:
            old = self._versions.get(name)
            if old is not None and old.digest == digest:
                old.pinned = old.pinned or pinned
                return old
            version = AdapterVersion(name, digest, dict(adapter.modules), pinned=pinned, source=adapter.name)
            self._versions[name] = version
            if old is not None:
                self._retire(old)
            self.stats.loads += 1
            return version

    def unload(self, name: str) -> None:
        """Forget `name`; its slot is freed.

        Raises:
            AdapterNotFoundError: no adapter of that name.
            AdapterInUseError: unfinished requests use it (wait for them or cancel them first).
        """
        with self._lock:
            version = self._get(name)
            if version.requests:
                raise AdapterInUseError(
                    f"adapter {quote(name)} is used by {version.requests} unfinished request(s); it can be unloaded "
                    "once they finish (or are cancelled)"
                )
            del self._versions[name]
            self._retire(version)
            self.stats.unloads += 1

    def pin(self, name: str, pinned: bool = True) -> None:
        """Keep `name` in its slot once it has one (or let it be evicted again)."""
        with self._lock:
            self._get(name).pinned = pinned

    def resolve(self, name: str) -> AdapterVersion:
        """The current version of `name`, counted as used by one more unfinished request.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        with self._lock:
            version = self._get(name)
            version.requests += 1
            return version

    def forget(self, version: AdapterVersion) -> None:
        """An unfinished request that resolved `version` has ended."""
        with self._lock:
            version.requests -= 1
            self._drop_if_unused(version)

    def acquire(self, version: AdapterVersion) -> int | None:
        """A slot holding `version` for one more running request, filling one if need be; None
        when every slot is held by an adapter that is running or pinned."""
        with self._lock:
            if version.slot is None:
                slot = self._free_slot()
                if slot is None:
                    return None
                self._slots.write_adapter_slot(slot, version.modules)
                self._occupant[slot] = version
                version.slot = slot
                self.stats.slot_loads += 1
            version.running += 1
            self._touch(version.slot)
            return version.slot

    def release(self, version: AdapterVersion) -> None:
        """One running request of `version` stopped running (finished or preempted)."""
        with self._lock:
            version.running -= 1
            self._touch(version.slot)
            self._drop_if_unused(version)

    @property
    def num_slots(self) -> int:
        """How many adapters can be in slots at once (0: the base model only)."""
        return len(self._occupant)

    def names(self) -> list[AdapterVersion]:
        """The current versions, by name."""
        with self._lock:
            return [self._versions[n] for n in sorted(self._versions)]

    def _get(self, name: str) -> AdapterVersion:
        version = self._versions.get(name)
        if version is None:
            names = sorted(self._versions)
            more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
            loaded = (", ".join(names[:_LISTED]) + more) or "none"
            raise AdapterNotFoundError(
                f"unknown adapter {quote(name)}; loaded adapters: {loaded}. Load it first, or leave the adapter "
                "unset for the base model"
            )
        return version

    def _free_slot(self) -> int | None:
        empty = [s for s, v in enumerate(self._occupant) if v is None]
        if empty:
            return empty[0]
        evictable = [s for s, v in enumerate(self._occupant) if v is not None and not v.running and not v.pinned]
        if not evictable:
            return None
        slot = min(evictable, key=lambda s: self._last_used.get(s, -1))
        self._evict(slot)
        self.stats.evictions += 1
        return slot

    def _evict(self, slot: int) -> None:
        version = self._occupant[slot]
        assert version is not None and not version.running
        version.slot = None
        self._occupant[slot] = None
        self._slots.write_adapter_slot(slot, None)

    def _retire(self, version: AdapterVersion) -> None:
        version.current = False
        self._drop_if_unused(version)

    def _drop_if_unused(self, version: AdapterVersion) -> None:
        # A replaced or unloaded version leaves its slot once nothing runs with it.
        if not version.current and not version.running and version.slot is not None:
            self._evict(version.slot)

    def _touch(self, slot: int | None) -> None:
        self._clock += 1
        if slot is not None:
            self._last_used[slot] = self._clock


def adapter_digest(modules: Mapping[str, LoRAWeights]) -> str:
    """sha256 over every module's name, rank, alpha, rsLoRA flag and factor bytes."""
    h = hashlib.sha256()
    for name in sorted(modules):
        w = modules[name]
        h.update(f"{name}|{w.rank}|{w.alpha!r}|{w.use_rslora}|{w.a.dtype}|".encode())
        h.update(w.a.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(w.b.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
