"""One decode instance: the step loop over the scheduler, the group's exchange, the planner and the model runner.

Per step: the scheduler picks the chunks (decodes first, then prefill chunks); the exchange agrees on the step with
the group (and tells remote holders what to open and free); the planner lays out the inputs, attention and routes;
the model runner runs the forward and samples; the engine appends the tokens, finishes requests and emits outputs.

Single-threaded by design; nanocp.worker.loop drives it from a thread and serialises callers.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from nanocp.model_config import ModelConfig, load_model_config
from nanocp.placement import Shard, check_growth, check_shards, covered_tokens
from nanocp.worker.config import EngineConfig
from nanocp.worker.cuda_graphs import unsupported
from nanocp.worker.group import Group, StepExchange
from nanocp.worker.group_spec import GroupSpec
from nanocp.worker.kv_cache import KVCache, ShardStore
from nanocp.worker.model import ExpertShard, Qwen3Moe
from nanocp.worker.model_runner import NON_FINITE, ModelRunner, SampledTokens, pending_token
from nanocp.worker.planner import StepInputs, StepPlanner
from nanocp.worker.request import (
    Admission,
    EngineLoad,
    FinishReason,
    OutputCallback,
    Request,
    RequestOutput,
    SamplingParams,
)
from nanocp.worker.scheduler import Chunk, Scheduler
from nanocp.worker.step_meta import Meta, MetaRow
from nanocp.worker.timing import DeviceSections, StepLog, StepRecord, StepTimer, Straggler
from nanocp.worker.weights import build_model

__all__ = ["Engine", "EngineConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InFlight:
    """A launched step, until the host reads its tokens."""

    step: int
    chunks: list[Chunk]
    inputs: StepInputs
    sampled: SampledTokens | None  # None: no row sampled
    places: list[tuple[Request, int]]  # per sampling row, its request and the index of its placeholder in output
    started: float  # time.perf_counter() when its planning began
    timings: tuple[dict[str, float], DeviceSections | None]  # the step timer's sections (StepTimer.take)


class StepObserver(Protocol):
    def step(self, record: StepRecord, chunks: Sequence[Chunk]) -> None: ...

    def verdict(self, record: StepRecord, straggler: Straggler) -> None: ...


class Engine:
    def __init__(
        self,
        model_config: ModelConfig,
        model: Qwen3Moe,
        config: EngineConfig,
        group: Group | None = None,
        timer: StepTimer | None = None,
    ) -> None:
        self.model_config = model_config
        self.config = config
        self.group = group or Group(GroupSpec(), config.device, timeout_s=0)
        rank, size = self.group.rank, self.group.size
        # Enable it to break steps down (benchmarks, tracing).
        self.timer = timer or StepTimer(enabled=False, device=config.device)
        self.steps = StepLog()
        self.observer: StepObserver | None = None  # told of each step and each group verdict (metrics)
        self.admission = Admission(model_config, config, rank, size)
        cache = KVCache(model_config, config.num_pages, config.page_size, model.embed.weight.dtype, config.device)
        capture = self._can_capture(cache)
        static_batch = min(config.max_running, config.graph_max_batch) if capture or config.static_decode else None
        self.runner = ModelRunner(model_config, model, cache, self.timer, static_batch, capture)
        self.store = ShardStore(cache.pool, config.page_size)
        self.scheduler = Scheduler(self.store, rank, config.max_step_tokens, config.max_running)
        self.exchange = StepExchange(self.group, self.steps, self.timer, self._verdict)
        self.planner = StepPlanner(self.store, rank, size, config.device)
        self.requests: dict[str, Request] = {}
        self._outbox: list[tuple[Request, RequestOutput]] = []  # emitted once the step's state is all settled
        self.load_snapshot = self.load()  # what other threads read: published before any output is emitted
        self._step = 0  # numbered alike on every member: all run every step the group runs
        self._keys = itertools.count(rank << 40)  # unique in the group: the rank is in the high bits
        self._seeds = random.Random(config.seed)
        # The launched step whose tokens the host has not read (overlap: read after the next step is launched).
        self._inflight: InFlight | None = None
        self.overlap = config.overlap if config.overlap is not None else torch.device(config.device).type == "cuda"

    @classmethod
    def from_spec(
        cls, model: str, config: EngineConfig, group: Group | None = None, timer: StepTimer | None = None
    ) -> Engine:
        """Builds the model for `model` (a preset or a directory); in a group, only this instance's experts."""
        model_config = load_model_config(model, dtype=config.dtype)
        shard = ExpertShard(group.rank, group.size) if group else ExpertShard()
        experts = shard.local_experts(model_config.num_experts)
        log.info(
            "building %s on %s (%s) with experts %d-%d of %d",
            model_config.name,
            config.device,
            model_config.dtype,
            experts.start,
            experts.stop - 1,
            model_config.num_experts,
        )
        return cls(model_config, build_model(model_config, config.device, config.seed, shard), config, group, timer)

    def _can_capture(self, cache: KVCache) -> bool:
        """Whether decode steps replay CUDA graphs here (asked for, and supported)."""
        if not self.config.cuda_graphs:
            return False
        why = unsupported(self.model_config, cache.k.dtype, self.config.device)
        if why is not None and cache.k.is_cuda:
            log.info("decode steps run eagerly: %s", why)
        return why is None

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        on_output: OutputCallback,
        shards: list[Shard] | None = None,
    ) -> None:
        """`shards` places the request's KV over the group (the router's placement); by default all of it here."""
        self.admission.check_new_id(request_id, self.requests)
        shards = shards or self.admission.local_placement(prompt, params)
        self.admission.check(prompt, params, shards)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.model_config.eos_token_ids)
        )
        request = Request(
            request_id,
            list(prompt),
            params,
            on_output,
            stop_ids,
            shards,
            coverage=covered_tokens(shards, self.config.page_size),
            key=next(self._keys),
            seed=params.seed if params.seed is not None else self._seeds.getrandbits(63),
        )
        self.requests[request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, FinishReason.ABORT, [])
        self._emit()
        return True

    def fail_all(self, error: str | None, code: str = "INTERNAL") -> None:
        self._inflight = None  # its tokens belong to the requests that end here
        for request in list(self.requests.values()):
            self._finish(request, FinishReason.ABORT, [], error, code)
        self._emit()

    def extend(self, request_id: str, shards: list[Shard] | None) -> None:
        """Grows a request's placement, or (None: no room anywhere) ends it with RESOURCE_EXHAUSTED."""
        request = self.requests.get(request_id)
        if request is None:
            return  # it ended meanwhile
        if shards is None:
            error = f"no KV memory left to grow its placement after {request.completed} tokens"
            self._finish(request, FinishReason.ABORT, [], error, "RESOURCE_EXHAUSTED")
        elif problem := check_growth(request.shards, shards) or check_shards(
            shards, self.group.size, self.config.page_size
        ):
            self._finish(request, FinishReason.ABORT, [], f"placement: {problem}", "INVALID_ARGUMENT")
        elif over := self._local_overcommit(request, shards):
            self._finish(request, FinishReason.ABORT, [], f"placement: {over}", "RESOURCE_EXHAUSTED")
        else:
            request.shards = shards
            request.coverage = covered_tokens(shards, self.config.page_size)
            for index, shard in enumerate(shards):
                if shard.rank == self.group.rank and request in self.scheduler.running:
                    self.store.open(request.key, index, shard.page_quota)
        self._emit()

    def _local_overcommit(self, request: Request, shards: list[Shard]) -> str | None:
        """Why the grown quotas held here cannot be committed in the pool (None: they can, or it is not running
        yet: then the scheduler commits them when it admits it)."""
        if request not in self.scheduler.running:
            return None
        grown = sum(
            max(0, shard.page_quota - self.store.quota(request.key, index))
            for index, shard in enumerate(shards)
            if shard.rank == self.group.rank
        )
        pool = self.store.pool
        if pool.can_commit(grown):
            return None
        left = pool.num_pages - pool.committed
        return f"{grown} more pages asked of rank {self.group.rank}, which has {left} uncommitted"

    def has_work(self) -> bool:
        return bool(self.requests or self.exchange.has_frees or self.planner.has_refusals or self._inflight)

    def load(self) -> EngineLoad:
        pool = self.store.pool
        return EngineLoad(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            pages_total=pool.num_pages,
            pages_in_use=pool.num_in_use,
            pages_committed=pool.committed,
        )

    def step(self) -> bool:
        """Runs one step; False when the whole group had nothing to do.

        In a group every instance steps together: one with no work of its own still runs the step with an empty
        batch, because its experts serve the others' tokens.
        """
        chunks = self.scheduler.schedule()
        if not chunks and self._readable():  # what runs next may wait on the tokens in flight
            self.flush()
            chunks = self.scheduler.schedule()
        return self.run_chunks(chunks)

    def _readable(self) -> bool:
        """Whether a step is in flight whose tokens may be read before the next exchange: not one that asked a
        holder for a new quota, whose refusal would come with that exchange."""
        return self._inflight is not None and not self._inflight.inputs.awaits_holders

    def plan_step(self, chunks: list[Chunk]) -> tuple[StepInputs, bool] | None:
        """Agrees on the step with the group and plans it: None when the whole group is idle; otherwise the inputs
        and whether any instance has tokens (a step may carry only shard frees)."""
        out = self.planner.outgoing(chunks, self.exchange.take_frees())
        decode_only = all(c.num_tokens == 1 for c in chunks)
        agreed = self.exchange.agree(sum(c.num_tokens for c in chunks), decode_only, out)
        if agreed is None:
            return None
        rows = self.runner.static_rows(agreed.decode_only, agreed.max_tokens) if agreed.tokens else None
        inputs = self.planner.build(chunks, out, agreed.incoming, agreed.cp_routes, agreed.max_tokens, rows)
        return inputs, agreed.tokens > 0

    @torch.inference_mode()
    def run_chunks(self, chunks: list[Chunk]) -> bool:
        """Runs a step of the scheduled chunks; False when the whole group was idle.

        The step is launched, then the step before it (still in flight) is read: its tokens appended, its requests
        finished, its outputs emitted, while the device runs this one. Its decodes fed their requests' pending
        tokens as placeholders, resolved on the device. Without overlap the step is read at once, unless it asked a
        holder for a new quota: then after the next exchange, which brings the holder's refusal if there is one.
        """
        if not chunks and self._readable():
            self.flush()
        start = time.perf_counter()
        self.timer.start_step()
        planned = self.plan_step(chunks)
        if planned is None:
            self.flush()  # nothing travelled, so no holder refused what the step in flight asked of it
            return False
        self._step += 1
        inputs, any_tokens = planned
        if not any_tokens:  # only frees and refusals travelled: the load changed all the same
            self._end_refused(inputs.refused)
            self.flush()
            self._emit()
            return True
        previous = self._inflight
        sampled = self.runner.launch(inputs, previous.sampled.device if previous and previous.sampled else None)
        for chunk in chunks:
            chunk.request.num_computed += chunk.num_tokens
        places = []
        for row, chunk in enumerate(inputs.sampling_chunks):
            request = chunk.request
            request.output.append(pending_token(row))
            request.pending += 1
            places.append((request, len(request.output) - 1))
        self._inflight = InFlight(self._step, chunks, inputs, sampled, places, start, self.timer.take())
        self._end_refused(inputs.refused)  # before their tokens are read: none reaches the client
        if previous is not None:
            self._read(previous)
        if not self.overlap and not inputs.awaits_holders:
            self.flush()
        return True

    def _end_refused(self, refused: list[tuple[int, MetaRow]]) -> None:
        """Ends each request a holder could not commit a shard for (one that ended meanwhile is gone already)."""
        if not refused:
            return
        by_key = {r.key: r for r in self.requests.values()}
        for holder, row in refused:
            request = by_key.pop(row[Meta.KEY], None)
            if request is not None:
                error = (
                    f"rank {holder} of the group cannot commit the {row[Meta.QUOTA]} KV pages its placement gives "
                    f"shard {row[Meta.SHARD]}: fewer are uncommitted there (retry later)"
                )
                self._finish(request, FinishReason.ABORT, [], error, "RESOURCE_EXHAUSTED")

    def flush(self) -> None:
        """Reads the step in flight, if any: afterwards every request's output holds real tokens only."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self._read(inflight)

    def _read(self, step: InFlight) -> None:
        """Reads a launched step's tokens (waiting for the device if it must), appends them, finishes the requests
        they end and emits the outputs. A request that ended meanwhile drops its token."""
        tokens = step.sampled.read() if step.sampled is not None else []
        for (request, index), token in zip(step.places, tokens, strict=True):
            request.pending -= 1
            if self.requests.get(request.request_id) is not request:
                continue
            if token == NON_FINITE:  # this request's row alone went bad: it ends, the batch goes on
                error = "the model produced non-finite logits (NaN or inf) for this request"
                self._finish(request, FinishReason.ABORT, [], error, "INTERNAL")
            else:
                request.output[index] = token
                self._append(request, token, index)
        inputs = step.inputs
        host_sections, device_sections = step.timings
        record = StepRecord(
            step.step,
            len(inputs.token_ids),
            inputs.kv_tokens_read,
            inputs.rows_routed,
            self.store.pool.num_in_use,
            time.perf_counter() - step.started,
            host_sections,
            device_sections,
            started=step.started,
        )
        self.steps.add(record)
        if self.observer is not None:
            self.observer.step(record, step.chunks)
        self._emit()

    def _append(self, request: Request, token: int, index: int) -> None:
        reason = request.finish_reason_after(token, index)
        if reason is not None:
            self._finish(request, reason, [token])
            return
        asks = request.should_ask_for_pages(self.config.page_size)
        self._outbox.append((request, replace(_output(request, [token], None), needs_pages=asks)))

    def _finish(
        self,
        request: Request,
        reason: FinishReason,
        new_tokens: list[int],
        error: str | None = None,
        code: str = "INTERNAL",
    ) -> None:
        self.scheduler.remove(request)
        for shard in request.shards:
            if shard.rank != self.group.rank:
                self.exchange.free_later(shard.rank, request.key)
        del self.requests[request.request_id]
        self._outbox.append((request, replace(_output(request, new_tokens, reason, error), error_code=code)))

    def _emit(self) -> None:
        """Publishes the load, then hands out the outputs: a caller that sees a token sees the pages behind it."""
        self.load_snapshot = self.load()
        outbox, self._outbox = self._outbox, []
        for request, output in outbox:
            request.on_output(output)

    def _verdict(self, record: StepRecord, straggler: Straggler) -> None:
        if self.observer is not None:
            self.observer.verdict(record, straggler)


def _output(
    request: Request, new_tokens: list[int], reason: FinishReason | None, error: str | None = None
) -> RequestOutput:
    return RequestOutput(request.request_id, new_tokens, reason, len(request.prompt), request.completed, error)
