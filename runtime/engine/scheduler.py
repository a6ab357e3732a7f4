"""The engine's scheduler: which requests run in the next forward pass, and with how many tokens.

Policy, one step at a time:

1. Running requests first, oldest arrival first. Each gets the tokens it has not yet computed:
   one (its last sampled token) when decoding, or the next chunk of its prompt, cut to the
   tokens the step has left (`max_num_batched_tokens`): a long prompt is prefilled in chunks,
   across steps, while other requests keep decoding.
2. A request needs cache blocks for the tokens it is given. When the free blocks run short, the
   newest running request (by arrival) is preempted: its blocks are freed, its progress is
   dropped, and it goes back to the head of the waiting queue, to be recomputed later from its
   prompt and the tokens it already produced (which it keeps, so its output is unchanged). If
   the request being scheduled is itself the newest, it is the one preempted.
3. Then waiting requests are admitted in arrival order while the step has tokens left, the free
   blocks cover their first chunk, fewer than `max_num_seqs` run, and their adapter can take a
   slot (`Admission.acquire`). A request whose adapter has no slot now is passed over, not
   dropped, and later ones may go ahead of it; a request short of blocks stops admission
   (first come, first served). Nothing is admitted in a step that preempted.

The scheduler sees token ids, block ids and adapter handles; it does not run the model, sample,
or look at text. `Request` is one request's state, shared with the engine.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ...kernels import NO_SLOT
from .paged_cache import BlockAllocator
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .registry import AdapterVersion


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request's state, from arrival to its end.

    Attributes:
        request_id: the caller's name for it.
        prompt_ids: the prompt's token ids.
        params: sampling settings and stop conditions.
        arrival: a counter giving the order of arrival (FCFS and preemption order).
        generator: the request's own random generator (seeded from `params.seed`).
        adapter: the adapter version the request named (held until it ends), or None for the base model.
        lora_slot: the slot its adapter occupies while it runs, `NO_SLOT` for none.
        output_ids: the tokens produced, stop tokens excluded.
        completion_tokens: tokens sampled, counting a final stop token.
        num_computed: how many of `prompt_ids + output_ids` the cache holds.
        blocks: the cache blocks holding them, in position order.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    generator: torch.Generator
    adapter: AdapterVersion | None = None
    lora_slot: int = NO_SLOT
    output_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    context_full: bool = False
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, index: int) -> int:
        """Token `index` of prompt + output."""
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]


@dataclass(frozen=True)
class ScheduledRow:
    """A request and how many of its uncomputed tokens run this step."""

    request: Request
    num_tokens: int

    @property
    def needs_logits(self) -> bool:
        """Whether this step reaches the request's last token, so it samples the next."""
        return self.request.num_computed + self.num_tokens == self.request.num_tokens


@dataclass
class Admission:
    """How the scheduler takes and gives back an adapter slot for a request.

    `acquire(request)` returns the slot the request's adapter now holds, or None when no slot
    is free for it this step; `release(request)` gives it back when the request stops running.
    """

    acquire: Callable[[Request], int | None]
    release: Callable[[Request], None]


def _no_adapters() -> Admission:
    return Admission(acquire=lambda request: NO_SLOT, release=lambda request: None)


class Scheduler:
    """Waiting and running queues over one block allocator; see the module docstring for the policy."""

    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        admission: Admission | None = None,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admission = admission or _no_adapters()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> list[ScheduledRow]:
        """Pick this step's rows (see the policy); allocates their blocks."""
        budget = self.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        preempted = False
        self.running.sort(key=lambda r: r.arrival)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed, budget)
            need = self.blocks_for(request.num_computed + n) - len(request.blocks)
            while need > self.allocator.num_free:
                victim = self.running[-1]  # sorted by arrival: the newest
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status is not Status.RUNNING:
                break  # it was the newest, and is preempted; so is nothing after it
            request.blocks += self.allocator.allocate(need)
            rows.append(ScheduledRow(request, n))
            budget -= n
            i += 1

        passed_over: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            n = min(request.num_tokens - request.num_computed, budget)
            if self.blocks_for(n) > self.allocator.num_free:
                break
            slot = self.admission.acquire(request)
            if slot is None:  # its adapter has no slot this step: let later requests go ahead
                passed_over.append(self.waiting.popleft())
                continue
            self.waiting.popleft()
            request.lora_slot = slot
            request.blocks = self.allocator.allocate(self.blocks_for(n))
            request.status = Status.RUNNING
            self.running.append(request)
            rows.append(ScheduledRow(request, n))
            budget -= n
        self.waiting.extendleft(reversed(passed_over))
        return rows

    def finish(self, request: Request) -> None:
        """Take a request out of the queues for good, freeing its blocks and its adapter slot at once."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
            self._release(request)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        request.status = Status.FINISHED

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.allocator.free(request.blocks)
        request.blocks = []
        self.admission.release(request)
        request.lora_slot = NO_SLOT
