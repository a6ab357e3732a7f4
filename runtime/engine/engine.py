"""The batching engine: many requests, each with its own adapter (or none), served in one batch.

A step reads as three verbs: `schedule` (the scheduler picks the rows and their tokens, and
allocates their cache blocks; see `scheduler.py` for the policy), `execute` (the executor runs
one forward pass over them), `update` (each row that reached its last token samples the next,
with its own settings and generator, and stops on eos, a stop token, `max_new_tokens` or the
model's context). Requests join and leave between steps; `abort` frees a request's blocks at
once.

Faults stay as small as they can: a request whose sampling fails (NaN logits, say) ends alone
with finish reason "error"; a step whose forward pass fails ends every running request that
way, since their cache may be half written, and the engine checks that it is back to a clean
state (no block held, no adapter slot in use) and goes on with the waiting ones. Only when that
check fails does `step` raise `EngineDeadError`: the engine cannot go on.

The engine sees token ids only: prompts come in as ids and tokens go out as ids, with no text,
no stop strings and no chat templates (`llm.py` and `async_llm.py` put text around it). It is
not thread-safe; `async_llm.AsyncLLM` drives it from one thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...kernels import NO_SLOT
from ..checkpoints.adapters import lora_modules
from ..model.batch import RowSpec
from ..checkpoints.peft_fit import BaseModules
from .config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from ..errors import ContextLengthError, EngineDeadError, InvalidParameterError, RequestFailedError
from .executor import Executor, TorchExecutor
from .metrics import EngineStats, MetricsSnapshot
from ..model.model import CausalLM
from .paged_cache import BlockAllocator, blocks_for_budget
from .registry import AdapterRegistry, LoRASlots, SlotWriter
from .sampling import SamplingParams, TokenLogprobs, batch_logprobs, sample_batch
from .scheduler import Admission, Request, ScheduledRow, Scheduler, Status

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request.

    Attributes:
        request_id: the request.
        new_token_ids: tokens produced this step (a stop token is never one).
        finished: whether the request ended this step.
        finish_reason: "stop", "length", "abort" or "error" once finished, else None.
        stop_reason: the eos or stop token id that ended it, else None.
        context_full: finished with "length" because the model's context was full.
        prompt_tokens, completion_tokens: usage so far (a final stop token counts).
        error: why the request failed, with finish reason "error" (`RequestFailedError`, or the
            `QuadaptError` its parameters caused), else None.
        logprobs: one `TokenLogprobs` per new token when the request asked
            (`SamplingParams.logprobs`), else None.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: int | None
    context_full: bool
    prompt_tokens: int
    completion_tokens: int
    error: Exception | None = None
    logprobs: list[TokenLogprobs] | None = None


class Engine:
    """Continuous batching over one executor; see the module docstring.

    Args:
        executor: runs the model (see `executor.py`); its slot count bounds `config.max_loras`.
        eos_token_ids: the model's end-of-sequence ids; they stop a request unless it ignores eos.
        config: batching limits.
        base: the base model's layout, to check adapters against (needed to serve adapters).
        slots: what writes adapters into the slots; None: the executor.
    """

    def __init__(
        self,
        executor: Executor,
        *,
        eos_token_ids: set[int],
        config: EngineConfig | None = None,
        base: BaseModules | None = None,
        slots: SlotWriter | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.executor = executor
        self.eos_token_ids = set(eos_token_ids)
        self.allocator = BlockAllocator(executor.num_blocks, on_free=getattr(executor, "release_blocks", None))
        # Always a registry: with no slots it holds nothing and refuses to load (naming max_loras).
        self.adapters = AdapterRegistry(slots if slots is not None else executor, base, self.config.max_lora_rank)
        admission = None
        if self.adapters.num_slots:
            admission = Admission(acquire=self._acquire_slot, release=self._release_slot)
        self.scheduler = Scheduler(
            self.allocator,
            executor.block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            admission=admission,
        )
        self.stats = EngineStats()
        self._requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()

    @classmethod
    def for_model(
        cls,
        model: CausalLM,
        *,
        eos_token_ids: set[int],
        config: EngineConfig | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        block_size: int = 16,
        cuda_graphs: bool | None = None,
    ) -> Engine:
        """An engine over a loaded model with the torch executor (the model is taken over).

        Args:
            model: a loaded model, float or quantized, without LoRA slots; the engine changes
                none of its modules (it only puts LoRA slots on them). On CPU load it with
                `dequantize=True`, as `build_engine` does, or packed weights unpack on every step.
            eos_token_ids: the model's end-of-sequence ids.
            config: batching limits (`max_loras` adapter slots are added to the model).
            kv_cache_bytes: memory for the paged KV cache; it sets how many blocks there are.
            block_size: positions per cache block.
            cuda_graphs: replay decode steps as CUDA graphs (default: on a CUDA device); True on
                CPU runs them eagerly from the same padded buffers (`TorchExecutor`).

        Raises:
            InvalidParameterError: a budget that holds no block, or a model that already carries LoRA slots.
        """
        config = config or EngineConfig()
        if lora_modules(model):
            raise InvalidParameterError("the model already carries LoRA slots; give the engine a freshly loaded model")
        base = BaseModules.of_model(model)  # before the executor wraps the projections
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        executor = TorchExecutor(
            model,
            num_blocks=blocks_for_budget(model.config, kv_cache_bytes, block_size, dtype),
            block_size=block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            num_lora_slots=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            max_num_seqs=config.max_num_seqs,
            cuda_graphs=cuda_graphs,
        )
        # The stacks the executor put on the model, found once for every slot write to come.
        slots = LoRASlots(lora_modules(model), config.max_loras) if config.max_loras else None
        return cls(executor, eos_token_ids=eos_token_ids, config=config, base=base, slots=slots)

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; it runs from the next step on.

        Args:
            prompt_ids: the prompt's token ids (special tokens included), at least one.
            params: sampling settings and stop conditions (stop strings are the text layer's).
            adapter: the name of a loaded adapter, or None for the base model.
            request_id: a unique id; None makes one.

        Returns:
            The request id.

        Raises:
            InvalidParameterError: an empty prompt, ids outside the vocabulary, a duplicate id,
                or a request that could not fit the KV cache even alone.
            ContextLengthError: the prompt leaves no room for a new token in the context.
            AdapterNotFoundError: `adapter` is not loaded (never a fall back to the base model).
        """
        config = self.executor.config
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidParameterError("the prompt is empty; a request needs at least one token (e.g. the BOS token)")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise InvalidParameterError(
                f"prompt ids {bad[:5]} are outside the model's vocabulary [0, {config.vocab_size}); "
                "encode the prompt with this model's tokenizer"
            )
        context = config.max_position_embeddings
        if len(prompt) >= context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens but the model's context is {context}, which leaves no room "
                f"for output; shorten the prompt to at most {context - 1} tokens"
            )
        longest = min(len(prompt) + params.max_new_tokens - 1, context)
        if self.scheduler.blocks_for(longest) > self.allocator.num_blocks:
            raise InvalidParameterError(
                f"the request may grow to {longest} tokens, more than the whole KV cache holds "
                f"({self.allocator.num_blocks * self.executor.block_size} positions); lower max_new_tokens or give the "
                "engine a larger KV cache budget (kv_cache_bytes; --kv-cache-memory on the command line)"
            )
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        if request_id in self._requests:
            raise InvalidParameterError(f"request id {request_id!r} is already in use; give each request its own")
        version = None
        if adapter is not None:
            if not self.adapters.num_slots:
                raise InvalidParameterError(
                    f"request names adapter {adapter!r}, but this engine serves no adapters (max_loras=0); start it "
                    "with max_loras >= 1 (--max-loras on the command line)"
                )
            version = self.adapters.resolve(adapter)  # raises AdapterNotFoundError
        generator = torch.Generator(device=self.executor.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        request = Request(
            request_id, prompt, params, next(self._arrivals), generator, adapter=version,
            arrival_time=time.perf_counter(),
        )
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its cache blocks and adapter slot are freed at once. False if unknown
        or already finished."""
        request = self._requests.get(request_id)
        if request is None or request.status is Status.FINISHED:
            return False
        request.finish_reason = "abort"
        self._finish(request)
        self.stats.requests_aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def request_ids(self) -> list[str]:
        """The ids of the unfinished requests, in the order they came."""
        return list(self._requests)

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step: schedule, execute, update. Returns one output per request that produced a
        token or finished (a failed request finishes with reason "error").

        Raises:
            EngineDeadError: a step failed and the engine could not be brought back to a clean
                state; nothing more can run on it.
        """
        rows = self.scheduler.schedule()
        if not rows:
            return []
        try:
            logits = self.execute(rows)
        except Exception as e:  # noqa: BLE001 - the step's failure becomes its requests' failure
            return self._fail_running(e)
        return self.update(rows, logits)

    def execute(self, rows: list[ScheduledRow]) -> torch.Tensor:
        """Run the forward pass of the scheduled rows; logits [L, V] of the rows that sample."""
        specs = []
        for row in rows:
            r = row.request
            tokens = [r.token(i) for i in range(r.num_computed, r.num_computed + row.num_tokens)]
            specs.append(RowSpec(tokens, r.num_computed, r.blocks, row.needs_logits, r.lora_slot))
        return self.executor.execute(specs)

    def update(self, rows: list[ScheduledRow], logits: torch.Tensor) -> list[RequestOutput]:
        """Advance each row; sample for the rows that reached their last token; finish those that stop."""
        sampling = [row.request for row in rows if row.needs_logits]
        for row in rows:
            row.request.num_computed += row.num_tokens
        if not sampling:
            return []
        tokens = sample_batch(
            logits,
            [r.params for r in sampling],
            [r.generator for r in sampling],
            # What a repetition penalty looks at: prompt and output (copied only when it is on).
            [r.prompt_ids + r.output_ids if r.params.repetition_penalty != 1.0 else () for r in sampling],
        )
        # Only the rows that asked pay for logprobs: of the raw logits, before any processor.
        asked = [j for j, r in enumerate(sampling) if r.params.logprobs is not None and isinstance(tokens[j], int)]
        found = dict(zip(
            [sampling[j].request_id for j in asked],
            batch_logprobs(logits[asked], [tokens[j] for j in asked], [sampling[j].params.logprobs for j in asked]),
        )) if asked else {}
        now = time.perf_counter()
        outputs = []
        failed = [(r, t) for r, t in zip(sampling, tokens) if isinstance(t, Exception)]
        for request, error in failed:
            outputs.append(self._fail(request, error))
        if failed:
            kept = [(r, t) for r, t in zip(sampling, tokens) if not isinstance(t, Exception)]
            sampling, tokens = [r for r, _ in kept], [t for _, t in kept]
        self.stats.record_tokens(len(tokens), now)
        context = self.executor.config.max_position_embeddings
        for request, token in zip(sampling, tokens):
            if request.first_token_time is None:
                request.first_token_time = now
                self.stats.ttft.append(now - request.arrival_time)
                self.stats.prompt_tokens += len(request.prompt_ids)
            else:
                self.stats.itl.append(now - request.last_token_time)
            request.last_token_time = now
            request.completion_tokens += 1
            new: list[int] = []
            stop_ids = set(request.params.stop_token_ids) | (set() if request.params.ignore_eos else self.eos_token_ids)
            if token in stop_ids:
                request.finish_reason, request.stop_reason = "stop", token
            else:
                request.output_ids.append(token)
                new.append(token)
                if request.completion_tokens >= request.params.max_new_tokens:
                    request.finish_reason = "length"
                elif request.num_tokens >= context:
                    request.finish_reason, request.context_full = "length", True
            if request.finish_reason is not None:
                self._finish(request)
            logprobs = found.get(request.request_id)  # a stop token's goes with it: it is not output
            outputs.append(self._output(request, new, logprobs=None if logprobs is None else [logprobs][: len(new)]))
        return outputs

    # -- adapters and metrics -----------------------------------------------------------------

    def metrics(self) -> MetricsSnapshot:
        """The engine's gauges and counters now."""
        waiting: dict[str, int] = {}
        running: dict[str, int] = {}
        for queue, counts in ((self.scheduler.waiting, waiting), (self.scheduler.running, running)):
            for r in queue:
                name = r.adapter.name if r.adapter is not None else ""
                counts[name] = counts.get(name, 0) + 1
        adapter_stats = self.adapters.stats
        return MetricsSnapshot(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            waiting_per_adapter=waiting,
            running_per_adapter=running,
            kv_blocks_used=self.allocator.num_used,
            kv_blocks_total=self.allocator.num_blocks,
            requests_finished=self.stats.requests_finished,
            requests_aborted=self.stats.requests_aborted,
            preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.stats.prompt_tokens,
            generation_tokens=self.stats.generation_tokens,
            adapter_slot_loads=adapter_stats.slot_loads,
            adapter_evictions=adapter_stats.evictions,
            time_to_first_token_s=list(self.stats.ttft),
            inter_token_latency_s=list(self.stats.itl),
            decode_tokens_per_s=self.stats.decode_rate(),
            requests_failed=self.stats.requests_failed,
        )

    def _acquire_slot(self, request: Request) -> int | None:
        if request.adapter is None:
            return NO_SLOT
        return self.adapters.acquire(request.adapter)

    def _release_slot(self, request: Request) -> None:
        if request.adapter is not None:
            self.adapters.release(request.adapter)

    def _fail(self, request: Request, error: Exception) -> RequestOutput:
        """End one request with reason "error"; the engine goes on."""
        if not isinstance(error, (RequestFailedError, InvalidParameterError)):
            logger.error("request %s failed: %r", request.request_id, error, exc_info=error)
            error = RequestFailedError(f"request {request.request_id} failed in the engine ({type(error).__name__}); "
                                       "the server log has the details")
        request.finish_reason = "error"
        self._finish(request)
        self.stats.requests_failed += 1
        return self._output(request, [], error)

    def _fail_running(self, error: Exception) -> list[RequestOutput]:
        """A step's forward pass failed: end every running request (their cache may be half
        written) and check that the engine is clean again, with the waiting requests kept."""
        logger.error("an engine step failed; its %d running request(s) end with an error", len(self.scheduler.running),
                     exc_info=error)
        failure = RequestFailedError(f"the engine step running this request failed ({type(error).__name__}); "
                                     "the server log has the details")
        outputs = [self._fail(request, failure) for request in list(self.scheduler.running)]
        slots_in_use = any(v.running for v in self.adapters.names())
        if self.allocator.num_used or slots_in_use:
            raise EngineDeadError(
                f"after a failed step the engine still holds {self.allocator.num_used} cache block(s) with no request "
                "running; it cannot go on"
            ) from error
        return outputs

    def _finish(self, request: Request) -> None:
        self.scheduler.finish(request)
        del self._requests[request.request_id]
        if request.adapter is not None:
            self.adapters.forget(request.adapter)
        if request.finish_reason not in ("abort", "error"):
            self.stats.requests_finished += 1

    @staticmethod
    def _output(request: Request, new: list[int], error: Exception | None = None,
                logprobs: list[TokenLogprobs] | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new,
            finished=request.status is Status.FINISHED,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason if isinstance(request.stop_reason, int) else None,
            context_full=request.context_full,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=request.completion_tokens,
            error=error,
            logprobs=logprobs,
        )

