"""The straggler hook: a step timer that sleeps inside named sections, to make an instance slow on purpose."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from nanocp.worker.timing import StepTimer


class DelayedTimer(StepTimer):
    """Sleeps `delays[name]` seconds inside each section so named. On CUDA the sleep falls between the section's
    events, so the stream idles meanwhile and the device clock sees the delay too."""

    def __init__(self, delays: dict[str, float], enabled: bool = True, device: str = "cpu") -> None:
        super().__init__(enabled, device)
        self.delays = delays

    @contextlib.contextmanager
    def section(self, name: str, host: bool = False) -> Iterator[None]:
        with super().section(name, host):
            if name in self.delays:
                time.sleep(self.delays[name])
            yield
