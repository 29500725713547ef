"""Where a step's time goes: named sections timed with host clocks, summed over the step's layers, and a bounded
log of recent steps that other threads may read."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field


class StepTimer:
    """Off by default: a disabled timer's sections cost one attribute check."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
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
