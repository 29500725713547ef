"""Where a step's time goes: named sections summed over the step's layers, and a bounded log of recent steps that
other threads may read.

On CPU a section is timed with host clocks. On CUDA it records a pair of CUDA events on the current stream and the
elapsed time is read later, once the device has passed the end event (`Event.query()`, which never waits): the
engine thread reads the previous steps' events when it asks the log for the last timed step, at the next step's
exchange. So timing adds no host sync to the hot path on either device.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from nanocp.steps import WORK


class StepTimer:
    """Off by default: a disabled timer's sections cost one attribute check."""

    def __init__(self, enabled: bool, device: str = "cpu") -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)  # host-clock sections of the current step
        self._cuda = torch.device(device).type == "cuda"
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start_step(self) -> None:
        self.seconds.clear()
        self._events = []

    @contextlib.contextmanager
    def section(self, name: str, host: bool = False) -> Iterator[None]:
        """Times the block as `name`; `host`: with host clocks even on CUDA (for work that blocks the host anyway,
        such as the step exchange)."""
        if not self.enabled:
            yield
            return
        if self._cuda and not host:
            if torch.cuda.is_current_stream_capturing():  # a graph replays as one: its parts are not timed
                yield
                return
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((name, start, end))
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - begin

    def take(self) -> tuple[dict[str, float], DeviceSections | None]:
        """The step's host-clock sections, and its device-timed ones still to be read (None on CPU)."""
        return dict(self.seconds), DeviceSections(tuple(self._events)) if self._events else None


@dataclass(frozen=True)
class DeviceSections:
    """Sections timed with CUDA events, read once the device has passed all of them (never waited for)."""

    events: tuple[tuple[str, torch.cuda.Event, torch.cuda.Event], ...]

    def ready(self) -> bool:
        return all(end.query() for _, _, end in self.events)

    def seconds(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for name, start, end in self.events:
            totals[name] += start.elapsed_time(end) / 1e3
        return totals


@dataclass(frozen=True)
class StepRecord:
    """One step of one instance; steps with the same number ran together across the group."""

    step: int
    home_tokens: int
    kv_tokens_read: int  # over its own rows and the rows it received
    rows_routed: int  # query rows sent to remote holders plus rows received from homes
    pages_in_use: int
    seconds: float  # from its planning to its tokens read (with overlap the next step's launch falls inside)
    sections: dict[str, float] = field(default_factory=dict)
    pending: DeviceSections | None = None  # device-timed sections not read yet (CUDA), added to `sections` later
    straggler: Straggler | None = None  # known one step later, from the group's exchange
    started: float = 0.0  # time.perf_counter() at its start: what it cost with all between it and the next one

    def work_us(self) -> list[int]:
        """Its step in whole microseconds, as WORK names the columns: attention (with merge), MoE compute, routing
        (CP and MoE routes, waits at them included), arrival lag (the "exchange" section: the wait at the step's first
        collective, the step exchange, for members still busy with the previous step) and host (the rest: host work,
        and on CUDA the untimed kernels)."""
        s = self.sections
        parts = [s.get("attention", 0.0) + s.get("merge", 0.0), s.get("moe_compute", 0.0)]
        parts += [s.get("cp_route", 0.0) + s.get("moe_route", 0.0), s.get("exchange", 0.0)]
        parts.append(max(0.0, self.seconds - sum(parts)))
        return [round(1e6 * p) for p in parts]

    def read_device(self) -> StepRecord:
        """This record with its device-timed sections read in; call once `pending.ready()`."""
        if self.pending is None:
            return self
        sections = dict(self.sections)
        for name, seconds in self.pending.seconds().items():
            sections[name] = sections.get(name, 0.0) + seconds
        return replace(self, sections=sections, pending=None)


def exchange_row(record: StepRecord | None) -> list[int]:
    """What a member tells its group of its last timed step: the step's number and its work_us(); zeros before it
    has one."""
    return [record.step, *record.work_us()] if record is not None else [0] * (1 + len(WORK))


@dataclass(frozen=True)
class Straggler:
    """The slowest instance of a group step, by its own work (attention, MoE, host: routing and arrival lag are
    waiting for others as much as work)."""

    rank: int
    ratio: float  # its own work over the group's median
    cause: str  # attention (KV-heavy), moe (batch-heavy), host (host delay) or routing

    @classmethod
    def of(cls, work_us: list[list[int]]) -> Straggler:
        """work_us: per rank, StepRecord.work_us() of one step."""
        own = [w[0] + w[1] + w[4] for w in work_us]
        slowest = max(range(len(own)), key=own.__getitem__)
        median = statistics.median(own)
        columns = {"attention": 0, "moe": 1, "host": 4}
        excess = {c: work_us[slowest][i] - statistics.median(w[i] for w in work_us) for c, i in columns.items()}
        cause = max(excess, key=excess.__getitem__)
        # The least-waiting rank's routing is transfer without waiting: when it outweighs the excess, routing paced
        # the step.
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

    def after(self, step: int, limit: int = 0) -> list[StepRecord]:
        """Steps numbered above `step`, oldest first; with `limit`, only the most recent `limit` of them."""
        with self._lock:
            records = [r for r in self._records if r.step > step]
        return records[-limit:] if limit > 0 else records

    def last(self) -> StepRecord | None:
        """The latest step whose timings are all known. Reads the device timings that are ready, so the engine
        thread (the one that records the events) is the one to call it, once a step."""
        with self._lock:
            latest = None
            for i in range(len(self._records) - 1, max(-1, len(self._records) - 4), -1):
                record = self._records[i]
                if record.pending is not None and record.pending.ready():
                    record = self._records[i] = record.read_device()
                if latest is None and record.pending is None:
                    latest = record
            return latest

    def mark(self, step: int, straggler: Straggler) -> None:
        """Adds the group's verdict to a recent step's record."""
        with self._lock:
            for i in range(len(self._records) - 1, max(-1, len(self._records) - 4), -1):
                if self._records[i].step == step:
                    self._records[i] = replace(self._records[i], straggler=straggler)
                    return
