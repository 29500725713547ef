"""Where a step's time goes: named sections timed with host clocks, summed over the step's layers, and a bounded
log of recent steps that other threads may read."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace


class StepTimer:
    """Off by default: a disabled timer's sections cost one attribute check."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        # A test hook: seconds to sleep inside a section, to make this instance a straggler on purpose.
        self.delays: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        if name in self.delays:
            time.sleep(self.delays[name])
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


@dataclass(frozen=True)
class StepRecord:
    """One step of one instance; steps with the same number ran together across the group."""

    step: int
    home_tokens: int
    kv_tokens_read: int  # over its own rows and the rows it received
    rows_routed: int  # query rows sent to remote holders plus rows received from homes
    pages_in_use: int
    seconds: float
    sections: dict[str, float] = field(default_factory=dict)
    straggler: Straggler | None = None  # known one step later, from the group's exchange

    def work_us(self) -> list[int]:
        """Its own work in whole microseconds: attention (with merge), MoE compute, routing (with the waits at the
        routes and at the step exchange), host."""
        s = self.sections
        parts = [s.get("attention", 0.0) + s.get("merge", 0.0), s.get("moe_compute", 0.0)]
        parts.append(s.get("cp_route", 0.0) + s.get("moe_route", 0.0) + s.get("exchange", 0.0))
        parts.append(max(0.0, self.seconds - sum(parts)))
        return [round(1e6 * p) for p in parts]


@dataclass(frozen=True)
class Straggler:
    """The slowest instance of a group step, by its own work (attention, MoE, host: routing includes waiting)."""

    rank: int
    ratio: float  # its own work over the group's median
    cause: str  # attention (KV-heavy), moe (batch-heavy), host (host delay) or routing

    @classmethod
    def of(cls, work_us: list[list[int]]) -> Straggler:
        """work_us: per rank, StepRecord.work_us() of one step."""
        own = [attention + moe + host for attention, moe, _, host in work_us]
        slowest = max(range(len(own)), key=own.__getitem__)
        median = statistics.median(own)
        columns = {"attention": 0, "moe": 1, "host": 3}
        excess = {c: work_us[slowest][i] - statistics.median(w[i] for w in work_us) for c, i in columns.items()}
        cause = max(excess, key=excess.__getitem__)
        # The fastest rank's routing is transfer without waiting: when it outweighs the excess, routing paced the step.
        if min(w[2] for w in work_us) > excess[cause]:
            cause = "routing"
        return cls(slowest, own[slowest] / median if median > 0 else float("inf"), cause)


class StepLog:
    """The last `size` steps; the engine thread adds, any thread reads."""

    def __init__(self, size: int = 20_000) -> None:
        self._records: deque[StepRecord] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, record: StepRecord) -> None:
        with self._lock:
            self._records.append(record)

    def after(self, step: int) -> list[StepRecord]:
        with self._lock:
            return [r for r in self._records if r.step > step]

    def last(self) -> StepRecord | None:
        with self._lock:
            return self._records[-1] if self._records else None

    def mark(self, step: int, straggler: Straggler) -> None:
        """Adds the group's verdict to a recent step's record."""
        with self._lock:
            for i in range(len(self._records) - 1, max(-1, len(self._records) - 4), -1):
                if self._records[i].step == step:
                    self._records[i] = replace(self._records[i], straggler=straggler)
                    return
