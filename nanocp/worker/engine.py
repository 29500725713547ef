"""One decode instance: admits requests, runs steps (chunked prefill mixed with decode), samples, emits tokens.

Single-threaded by design; nanocp.worker.loop drives it from a thread and serialises callers.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from nanocp.limits import GROW_AHEAD_PAGES, LimitError, check_request
from nanocp.model_config import ModelConfig, load_model_config
from nanocp.worker.comm import Route
from nanocp.worker.cuda_graphs import DecodeGraphs, unsupported
from nanocp.worker.group import Group
from nanocp.worker.group_spec import GroupSpec
from nanocp.worker.kv_cache import KVCache
from nanocp.worker.model import ExpertShard, Qwen3Moe
from nanocp.worker.request import (
    EngineError,
    EngineLoad,
    FinishReason,
    OutputCallback,
    Request,
    RequestOutput,
    SamplingParams,
    footprint_pages,
)
from nanocp.worker.sampler import sample
from nanocp.worker.scheduler import Chunk, Scheduler
from nanocp.worker.shards import ShardSpec, ShardStore, check_growth, check_shards, shard_ends
from nanocp.worker.step_plan import StepInputs, build, outgoing
from nanocp.worker.timing import StepLog, StepRecord, StepTimer, Straggler, exchange_row
from nanocp.worker.weights import build_model

log = logging.getLogger(__name__)


class StepObserver(Protocol):
    def step(self, record: StepRecord, chunks: Sequence[Chunk]) -> None: ...

    def verdict(self, record: StepRecord, straggler: Straggler) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 1024
    max_step_tokens: int = 512  # per-step token budget shared by decodes and prefill chunks
    max_running: int = 64
    device: str = "cpu"
    seed: int = 0  # random weights of presets, and samplers of requests that give no seed
    dtype: str | None = None  # overrides the model's dtype
    cuda_graphs: bool = True  # decode steps of a lone instance replay graphs captured at start-up, where supported
    graph_max_batch: int = 256  # the largest batch graphed (capped by max_running); larger batches run eagerly

    def __post_init__(self) -> None:
        for name in ("page_size", "num_pages", "max_step_tokens", "max_running", "graph_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_running > self.max_step_tokens:
            raise ValueError(f"max_running ({self.max_running}) exceeds max_step_tokens ({self.max_step_tokens})")


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
        self.model = model
        self.config = config
        self.group = group or Group(GroupSpec(), config.device, timeout_s=0)
        # Enable it to break steps down (benchmarks, tracing).
        self.timer = timer or StepTimer(enabled=False, device=config.device)
        self.steps = StepLog()
        self.observer: StepObserver | None = None  # told of each step and each group verdict (metrics)
        self._step = 0  # numbered alike on every member: all run every step the group runs
        self.cache = KVCache(model_config, config.num_pages, config.page_size, model.embed.weight.dtype, config.device)
        self.store = ShardStore(self.cache.pool, config.page_size)
        self.scheduler = Scheduler(self.store, self.group.rank, config.max_step_tokens, config.max_running)
        self.requests: dict[str, Request] = {}
        self._frees: dict[int, list[int]] = {}  # holder rank -> keys of ended requests whose shards it must free
        self._keys = itertools.count(self.group.rank << 40)  # unique in the group: the rank is in the high bits
        self._seeds = random.Random(config.seed)
        self.graphs = self._capture_graphs()
        self.eager_steps: Counter[str] = Counter()  # steps a graph could not take, by why

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

    def _capture_graphs(self) -> DecodeGraphs | None:
        if not self.config.cuda_graphs:
            return None
        why = unsupported(self.model_config, self.cache.k.dtype, self.config.device)
        if why is None and self.group.size > 1:
            why = "a group's routes vary in size from step to step"
        if why is not None:
            if self.config.device != "cpu":
                log.info("decode steps run eagerly: %s", why)
            return None
        graphs = DecodeGraphs(self.model, self.cache, min(self.config.max_running, self.config.graph_max_batch))

        def progress(done: int, total: int) -> None:
            log.info("captured decode graph %d of %d", done, total)

        graphs.capture(progress)
        return graphs

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        on_output: OutputCallback,
        shards: list[ShardSpec] | None = None,
    ) -> None:
        """`shards` places the request's KV over the group (the router's placement); by default all of it here."""
        self.check_new_id(request_id, self.requests)
        shards = shards or self.local_placement(prompt, params)
        self.check_request(prompt, params, shards)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.model_config.eos_token_ids)
        )
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        coverage = shard_ends(shards, self.config.page_size)[-1]
        request = Request(
            request_id,
            list(prompt),
            params,
            on_output,
            stop_ids,
            shards,
            coverage,
            key=next(self._keys),
            generator=generator,
        )
        self.requests[request_id] = request
        self.scheduler.add(request)

    @staticmethod
    def check_new_id(request_id: str, live: Collection[str]) -> None:
        if request_id in live:
            raise EngineError("ALREADY_EXISTS", f"request {request_id!r} is already running")

    def local_placement(self, prompt: list[int], params: SamplingParams) -> list[ShardSpec]:
        """One shard, here, for the request's whole footprint."""
        pages = footprint_pages(len(prompt), params.max_tokens, self.config.page_size)
        return [ShardSpec(self.group.rank, 0, pages)]

    def check_request(self, prompt: list[int], params: SamplingParams, shards: list[ShardSpec]) -> None:
        """Refuses what the group can never serve; reads only immutable settings, so any thread may call it."""
        c = self.config
        try:
            check_request(prompt, params, self.model_config)
        except LimitError as exc:
            raise EngineError("INVALID_ARGUMENT", str(exc)) from None
        problem = check_shards(shards, self.group.size, c.page_size)
        covered = shard_ends(shards, c.page_size)[-1] if problem is None else 0
        # It must hold the prompt and the first sampled token; beyond that the placement may grow as it decodes.
        needed = min(len(prompt) + params.max_tokens - 1, len(prompt) + 1)
        if problem is None and covered < needed:
            problem = f"its shards cover {covered} positions, the request needs at least {needed}"
        if problem is not None:
            raise EngineError("INVALID_ARGUMENT", f"placement: {problem}")
        pages = max(s.page_quota for s in shards)
        if pages > c.num_pages:
            raise EngineError(
                "RESOURCE_EXHAUSTED",
                f"the request needs {pages} KV pages ({len(prompt)} prompt + {params.max_tokens} new tokens); "
                f"this instance has {c.num_pages} pages of {c.page_size} tokens",
            )

    def abort(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, FinishReason.ABORT, [])
        return True

    def fail_all(self, error: str | None, code: str = "INTERNAL") -> None:
        for request in list(self.requests.values()):
            self._finish(request, FinishReason.ABORT, [], error, code)

    def extend(self, request_id: str, shards: list[ShardSpec] | None) -> None:
        """Grows a request's placement, or (None: no room anywhere) ends it with RESOURCE_EXHAUSTED."""
        request = self.requests.get(request_id)
        if request is None:
            return  # it ended meanwhile
        if shards is None:
            error = f"no KV memory left to grow its placement after {len(request.output)} tokens"
            self._finish(request, FinishReason.ABORT, [], error, "RESOURCE_EXHAUSTED")
            return
        problem = check_growth(request.shards, shards) or check_shards(shards, self.group.size, self.config.page_size)
        if problem is not None:
            self._finish(request, FinishReason.ABORT, [], f"placement: {problem}", "INVALID_ARGUMENT")
            return
        request.shards = shards
        request.coverage = shard_ends(shards, self.config.page_size)[-1]
        for index, shard in enumerate(shards):
            if shard.holder == self.group.rank and request in self.scheduler.running:
                self.store.open(request.key, index, shard.page_quota)

    def has_work(self) -> bool:
        return bool(self.requests or self._frees)

    def load(self) -> EngineLoad:
        pool = self.cache.pool
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
        return self.run_chunks(self.scheduler.schedule())

    def plan_step(self, chunks: list[Chunk]) -> tuple[StepInputs, bool] | None:
        """Agrees on the step with the group and plans it: None when the whole group is idle; otherwise the inputs
        and whether any instance has tokens (a step may carry only shard frees)."""
        out = outgoing(chunks, self.group.rank, self.group.size, self.config.page_size, self._frees)
        self._frees = {}
        # The exchange also carries each instance's work in its last recorded step: every member learns who was
        # slowest and why, at no extra collective.
        last = self.steps.last()
        previous = exchange_row(last)
        local = [sum(c.num_tokens for c in chunks), len(out.meta), out.remote_rows, *previous]
        with self.timer.section("exchange", host=True):  # a member that arrives early waits here: arrival lag
            counts = self.group.exchange_counts(local)
        tokens, meta, remote = (sum(column) for column in list(zip(*counts, strict=True))[:3])
        if self.group.size > 1 and last is not None and all(c[3] == last.step for c in counts):
            straggler = Straggler.of([c[4:] for c in counts])
            self.steps.mark(last.step, straggler)
            if self.observer is not None:
                self.observer.verdict(last, straggler)
        if tokens == 0 and meta == 0:
            return None
        incoming, incoming_counts = out.meta[:0], [0] * self.group.size
        if meta > 0:
            route = Route.plan(out.meta_counts.to(self.group.comm_device))  # built on the host, read there
            incoming, incoming_counts = route.forward(out.meta.to(self.group.comm_device)).cpu(), route.recv_rows
        inputs = build(
            chunks,
            out,
            incoming,
            incoming_counts,
            self.store,
            self.group.rank,
            remote > 0,
            self.cache.k,
            self.cache.v,
            self.config.device,
            self.timer,
        )
        return inputs, tokens > 0

    @torch.inference_mode()
    def run_chunks(self, chunks: list[Chunk]) -> bool:
        """Runs a step of the scheduled chunks and samples for those that reach their last token; False when the
        whole group was idle."""
        start = time.perf_counter()
        self.timer.start_step()
        planned = self.plan_step(chunks)
        if planned is None:
            return False
        self._step += 1
        inputs, any_tokens = planned
        if not any_tokens:
            return True
        hidden = self._forward(inputs)
        tokens: list[int] = []
        if inputs.sampling_chunks:
            logits = self.model.logits(hidden[inputs.sample_rows])
            requests = [c.request for c in inputs.sampling_chunks]
            tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        for chunk in chunks:
            chunk.request.num_computed += chunk.num_tokens
        for chunk, token in zip(inputs.sampling_chunks, tokens, strict=True):
            request = chunk.request
            request.output.append(token)
            reason = request.finish_reason_after(token)
            if reason is None:
                asks = request.should_ask_for_pages(GROW_AHEAD_PAGES * self.config.page_size)
                request.on_output(replace(self._output(request, [token], None), needs_pages=asks))
            else:
                self._finish(request, reason, [token])
        record = StepRecord(
            self._step,
            len(inputs.token_ids),
            inputs.kv_tokens_read,
            inputs.rows_routed,
            self.cache.pool.num_in_use,
            time.perf_counter() - start,
            *self.timer.take(),
            started=start,
        )
        self.steps.add(record)
        if self.observer is not None:
            self.observer.step(record, chunks)
        return True

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """The model over the step's rows: by a graph's replay when one fits, else eagerly."""
        if self.graphs is None:
            return self.model(inputs.token_ids, inputs.context)
        meta = inputs.plan.decode_metadata()
        if meta is None or len(inputs.token_ids) > self.graphs.max_batch:
            self.eager_steps["prefill or routes" if meta is None else "batch beyond the largest graph"] += 1
            return self.model(inputs.token_ids, inputs.context)
        return self.graphs.forward(inputs, meta)

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
            if shard.holder != self.group.rank:
                self._frees.setdefault(shard.holder, []).append(request.key)
        del self.requests[request.request_id]
        request.on_output(replace(self._output(request, new_tokens, reason, error), error_code=code))

    @staticmethod
    def _output(
        request: Request, new_tokens: list[int], reason: FinishReason | None, error: str | None = None
    ) -> RequestOutput:
        return RequestOutput(request.request_id, new_tokens, reason, len(request.prompt), len(request.output), error)
