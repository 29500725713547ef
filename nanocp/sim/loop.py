"""The discrete-event loop: a decode group stepping in lockstep, placed by the router's own code.

Admission, placement, growth and release go through the router's objects: the AdmissionQueue (bounded FIFO, the
never-fits refusal) over a Ledger and the policy, the shared growth rule (nanocp.placement) for when and how much a
placement grows, and nanocp.router.growth to grow it.
The router sees what the service sees: prompt length and max_tokens (or the reservation); requests end at their true
output length, which it never reads.

Speed: nothing loops over requests per step. Each instance keeps aggregates of its decoding requests (home batch,
KV tokens held, tails receiving a token each step, routed rows), updated only when a request starts, crosses into
its next shard, grows or ends; those moments are known in advance (one token a step), so they wait in a heap keyed
by step number. Idle gaps are jumped over. Chunked prefill (when the group prefills) walks only the prefilling
requests of instances that have some.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nanocp.placement import Footprint, Placement, asks_to_grow, covered_tokens
from nanocp.router.accounting import Ledger
from nanocp.router.admission import AdmissionQueue, QueueFull
from nanocp.router.growth import grow
from nanocp.sim.cluster import Cluster, PolicySpec
from nanocp.sim.live import LiveRequest
from nanocp.sim.metrics import RequestOutcome, SimResult, StepStats
from nanocp.sim.steptime import straggler_ratio
from nanocp.workload import TraceRequest

_FINISH, _CROSS, _ASK = 0, 1, 2


@dataclass(frozen=True)
class GiveUp:
    """Stop once more than `misses` requests with arrival indices in `window` missed whatever the SLO: refused, ended
    for lack of memory, or waiting longer than `max_wait_s` for a placement. Such a rate is overload for every TPOT
    SLO; simulating on would only cost time."""

    max_wait_s: float
    misses: int
    window: tuple[int, int]


class Simulation:
    def __init__(
        self,
        cluster: Cluster,
        policy: PolicySpec,
        *,
        max_tokens: int | None,
        reserve_output_tokens: int | None = None,
        queue_size: int = 256,
    ) -> None:
        self.cluster = cluster
        self.model = cluster.step_model()
        self.policy = policy.build(cluster)
        self.capacities = cluster.capacities()
        self.index = {c.id: r for r, c in enumerate(self.capacities)}
        self.ledger = Ledger()
        self.queue = AdmissionQueue(
            self.policy, self.ledger, lambda: [self.ledger.count(c) for c in self.capacities], queue_size
        )
        self.max_tokens = max_tokens
        self.reserve = reserve_output_tokens
        self.page = cluster.page_size
        n = cluster.instances
        self.capacity_tokens = self.capacities[0].pages_total * self.page
        # Per instance, over its decoding requests: home batch, KV tokens held, tails, routed rows.
        self.home = [0] * n
        self.kv = [0] * n
        self.tails = [0] * n
        self.rows = [0] * n
        self.decoding = 0
        # Chunked prefill: per instance, requests placed but not started, and those prefilling.
        self.waiting: list[deque[LiveRequest]] = [deque() for _ in range(n)]
        self.prefilling: list[list[LiveRequest]] = [[] for _ in range(n)]
        self.running = [0] * n
        self.now = 0.0
        self.next_step = 0
        self.events: list[tuple[int, int, int, LiveRequest, int]] = []
        self._seq = itertools.count()
        self.queued: dict[str, LiveRequest] = {}
        self.never_fits: dict[Footprint, bool] = {}
        self.stats = StepStats()
        self.finished = 0
        self.give_up: GiveUp | None = None
        self.misses = 0  # requests in the give-up window that missed whatever the SLO

    def run(
        self,
        requests: list[TraceRequest],
        progress: Callable[[int, int], None] | None = None,
        give_up: GiveUp | None = None,
    ) -> SimResult:
        self.give_up = give_up
        arrivals = sorted(requests, key=lambda r: r.arrival_s)
        outcomes: list[RequestOutcome] = []
        pending = deque(arrivals)
        while True:
            while pending and pending[0].arrival_s <= self.now:
                outcomes.append(self._arrive(pending.popleft(), len(outcomes)))
            if not self.decoding and not any(self.prefilling) and not any(self.waiting):
                if not pending:
                    break
                self.now = pending[0].arrival_s  # the group sleeps until the next arrival
                continue
            self._step()
            if progress is not None:
                progress(self.finished, len(arrivals))
            if give_up is not None and self.misses + self._overdue() > give_up.misses:
                return SimResult(outcomes, self.stats, self.now, stopped=True)
        assert not self.queued, "requests left waiting with the group idle"
        return SimResult(outcomes, self.stats, self.now)

    def _counted(self, live: LiveRequest) -> bool:
        return self.give_up is not None and self.give_up.window[0] <= live.index < self.give_up.window[1]

    def _overdue(self) -> int:
        """Queued requests of the give-up window already waiting longer than its bound."""
        assert self.give_up is not None
        overdue = 0
        for live in self.queued.values():  # in arrival order
            if self.now - live.outcome.arrival_s <= self.give_up.max_wait_s:
                break
            overdue += self._counted(live)
        return overdue

    # Admission and release, through the router's AdmissionQueue.

    def _arrive(self, request: TraceRequest, index: int) -> RequestOutcome:
        max_tokens = self.max_tokens or request.output_tokens
        output = max(1, min(request.output_tokens, max_tokens))
        outcome = RequestOutcome(request.arrival_s, request.input_tokens, output)
        footprint = Footprint(request.input_tokens, max_tokens)
        live = LiveRequest(outcome, footprint, index)
        first = footprint.reserved(self.reserve)
        if self._never_fits(first):
            return self._refuse(live)
        key = str(id(live))
        self.queued[key] = live  # until placed: the queue answers placements by key
        try:
            placement = self.queue.admit(key, first)
        except QueueFull:
            del self.queued[key]
            return self._refuse(live)
        if placement is not None:
            self._placed([(key, placement)])
        return outcome

    def _refuse(self, live: LiveRequest) -> RequestOutcome:
        live.outcome.status = "refused"
        self.finished += 1
        self.misses += self._counted(live)
        return live.outcome

    def _never_fits(self, footprint: Footprint) -> bool:
        known = self.never_fits.get(footprint)
        if known is None:
            known = self.never_fits[footprint] = self.queue.never_fits(footprint, self.capacities) is not None
        return known

    def _release(self, live: LiveRequest) -> None:
        assert live.placement is not None
        self._placed(self.queue.release(live.placement))

    def _placed(self, placed: list[tuple[str, Placement]]) -> None:
        work = deque(placed)
        while work:
            key, placement = work.popleft()
            live = self.queued.pop(key)
            live.outcome.placed_s = self.now
            if self.give_up is not None and live.outcome.wait_s > self.give_up.max_wait_s:
                self.misses += self._counted(live)
            live.place(placement, self.index, self.page)
            if self.cluster.prefill == "chunked":
                self.waiting[live.home].append(live)
                continue
            live.computed = live.prompt  # its KV arrives with its first token
            live.outcome.first_token_s = self.now
            if live.output == 1:
                self._finish(live, "ok")
                work.extend(self.queue.release(placement))
            else:
                self._start_decode(live)

    # Decode aggregates.

    def _start_decode(self, live: LiveRequest) -> None:
        live.s0 = self.next_step
        p, h = live.prompt, live.home
        live.shard = live.shard_at(p)
        self.home[h] += 1
        self.decoding += 1
        for j in range(live.shard + 1):
            holder = live.holders[j]
            self.kv[holder] += min(live.ends[j], p) - live.starts[j]
            if holder != h:
                self.rows[h] += 1
                self.rows[holder] += 1
        self.tails[live.holders[live.shard]] += 1
        if self.reserve is not None and asks_to_grow(live.shards, live.footprint, p + 1, self.page):
            self._grow(live, first_decode=True)
            if live.outcome.status:
                return
        self._schedule(live)

    def _stop_decode(self, live: LiveRequest, written: int) -> None:
        """Takes a decoding request out of the aggregates; `written` positions of its KV exist."""
        h = live.home
        self.home[h] -= 1
        self.decoding -= 1
        for j in range(live.shard + 1):
            holder = live.holders[j]
            self.kv[holder] -= min(live.ends[j], written) - live.starts[j]
            if holder != h:
                self.rows[h] -= 1
                self.rows[holder] -= 1
        self.tails[live.holders[live.shard]] -= 1

    def _schedule(self, live: LiveRequest) -> None:
        live.version += 1
        last = live.last_step()
        self._push(last, _FINISH, live)
        cross = live.s0 + live.ends[live.shard] - live.prompt - 1
        if cross < last:
            self._push(cross, _CROSS, live)
        if self.reserve is not None:
            covered = covered_tokens(live.shards, self.page)
            if covered < live.footprint.tokens:
                ask = max(live.s0, live.s0 + covered - 2 * self.page - live.prompt - 1, self.next_step)
                if ask < last:
                    self._push(ask, _ASK, live)

    def _push(self, step: int, kind: int, live: LiveRequest) -> None:
        heapq.heappush(self.events, (step, next(self._seq), kind, live, live.version))

    def _cross(self, live: LiveRequest) -> None:
        h = live.home
        self.tails[live.holders[live.shard]] -= 1
        live.shard += 1
        holder = live.holders[live.shard]
        self.tails[holder] += 1
        if holder != h:
            self.rows[h] += 1
            self.rows[holder] += 1
        cross = live.s0 + live.ends[live.shard] - live.prompt - 1
        if cross < live.last_step():
            self._push(cross, _CROSS, live)

    def _grow(self, live: LiveRequest, first_decode: bool = False) -> None:
        """The home asked for pages: the router grows the placement, or the request ends for lack of room."""
        assert live.placement is not None
        loads = [self.ledger.count(c) for c in self.capacities]
        grown = grow(self.policy, live.placement, live.footprint, self.reserve, loads, self.page)
        if grown is None:
            written = live.prompt + (0 if first_decode else self.next_step - live.s0)
            self._stop_decode(live, written)
            self._finish(live, "exhausted")
            self._release(live)
            return
        self.ledger.swap(live.placement, grown)
        live.place(grown, self.index, self.page)
        if not first_decode:
            self._schedule(live)

    def _finish(self, live: LiveRequest, status: str) -> None:
        if status == "exhausted" and self.give_up is not None and live.outcome.wait_s <= self.give_up.max_wait_s:
            self.misses += self._counted(live)
        live.outcome.status = status
        live.outcome.finished_s = self.now
        live.version += 1  # its pending events are void
        self.finished += 1
        if self.cluster.prefill == "chunked":
            self.running[live.home] -= 1

    # One lockstep step.

    def _step(self) -> None:
        step = self.next_step
        n = self.cluster.instances
        kv_read = [k + t for k, t in zip(self.kv, self.tails, strict=True)]
        home, rows, segments, pairs = self.home, self.rows, None, None
        chunks: list[tuple[LiveRequest, int]] = []
        if self.cluster.prefill == "chunked" and (any(self.prefilling) or any(self.waiting)):
            home, rows, segments, pairs = list(home), list(rows), list(rows), [0] * n
            chunks = self._prefill_chunks(home, kv_read, rows, segments, pairs)
        times = self.model.step(home, kv_read, rows, segments, pairs)
        self.now += times.step_s
        self.kv = [k + t for k, t in zip(self.kv, self.tails, strict=True)]
        self.next_step = step + 1
        kv, capacity = self.kv, self.capacity_tokens
        self.stats.add(
            times.step_s, straggler_ratio(times.own_s), (max(kv) - min(kv)) / capacity, sum(kv) / n / capacity
        )
        for live, tokens in chunks:
            live.computed += tokens
            if live.computed == live.prompt:
                self._prefilled(live)
        events = self.events
        while events and events[0][0] <= step:
            _, _, kind, live, version = heapq.heappop(events)
            if version != live.version:
                continue
            if kind == _FINISH:
                self._stop_decode(live, live.prompt + live.output - 1)
                self._finish(live, "ok")
                self._release(live)
            elif kind == _CROSS:
                self._cross(live)
            elif asks_to_grow(live.shards, live.footprint, live.prompt + 2 + step - live.s0, self.page):
                self._grow(live)

    def _prefill_chunks(
        self, home: list[int], kv_read: list[int], rows: list[int], segments: list[int], pairs: list[int]
    ) -> list[tuple[LiveRequest, int]]:
        """This step's prefill chunks, as nanocp.worker.scheduler picks them: after the decodes, within the token
        budget, never across a shard boundary; new requests start in placement order while the budget lasts."""
        chunks = []
        for i in range(self.cluster.instances):
            budget = self.cluster.max_step_tokens - self.home[i]
            prefilling, waiting = self.prefilling[i], self.waiting[i]
            for live in prefilling:
                if budget <= 0:
                    break
                chunks.append((live, self._chunk(live, budget, home, kv_read, rows, segments, pairs)))
                budget -= chunks[-1][1]
            while budget > 0 and waiting and self.running[i] < self.cluster.max_running:
                live = waiting.popleft()
                prefilling.append(live)
                self.running[i] += 1
                chunks.append((live, self._chunk(live, budget, home, kv_read, rows, segments, pairs)))
                budget -= chunks[-1][1]
        return chunks

    def _chunk(
        self,
        live: LiveRequest,
        budget: int,
        home: list[int],
        kv_read: list[int],
        rows: list[int],
        segments: list[int],
        pairs: list[int],
    ) -> int:
        start = live.computed
        shard = live.shard_at(start)
        tokens = min(live.prompt - start, budget, live.ends[shard] - start)
        end, h = start + tokens, live.home
        home[h] += tokens
        for j in range(shard + 1):  # every shard before the chunk's, and its own up to the chunk's end
            holder = live.holders[j]
            kv = min(live.ends[j], end) - live.starts[j]
            kv_read[holder] += kv
            pairs[holder] += tokens * kv
            if holder != h:
                rows[h] += tokens
                rows[holder] += tokens
                segments[h] += 1
                segments[holder] += 1
        return tokens

    def _prefilled(self, live: LiveRequest) -> None:
        """The chunk that ends a prompt samples the first token; decoding starts with the next step."""
        self.prefilling[live.home].remove(live)
        live.outcome.first_token_s = self.now
        if live.output == 1:
            self._finish(live, "ok")
            self._release(live)
            return
        self._start_decode(live)


def simulate(
    cluster: Cluster,
    policy: PolicySpec,
    requests: list[TraceRequest],
    *,
    max_tokens: int | None,
    reserve_output_tokens: int | None = None,
    queue_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    give_up: GiveUp | None = None,
) -> SimResult:
    """Replays `requests` (arrival, prompt and true output lengths) on the cluster under the policy; every request
    asks for `max_tokens`, the router's only view of its output (None: each asks for exactly its output, as a client
    that sets max_tokens and ignore_eos does)."""
    simulation = Simulation(
        cluster, policy, max_tokens=max_tokens, reserve_output_tokens=reserve_output_tokens, queue_size=queue_size
    )
    return simulation.run(requests, progress, give_up)
