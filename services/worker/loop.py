"""Drives an engine from its own thread: steps while there is work, sleeps (without spinning) when there is none.

Other threads (the gRPC server's) submit and abort through this object; a lock keeps them out of a running step.
"""

from __future__ import annotations

import logging
import threading
import time

from nanocp.worker.engine import Engine
from nanocp.worker.request import EngineLoad, OutputCallback, SamplingParams

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Aborts every live request (their callbacks see FinishReason.ABORT) and ends the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        with self._lock:
            self.engine.fail_all(None)

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, on_output: OutputCallback) -> None:
        """Raises EngineError at once for a request the engine can never serve."""
        with self._lock:
            self.engine.add_request(request_id, prompt, params, on_output)
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        with self._lock:
            return self.engine.abort(request_id)

    def load(self) -> EngineLoad:
        with self._lock:
            return self.engine.load()

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                worked = self.engine.has_work() and self._step()
            if not worked:
                self._wake.wait()
                self._wake.clear()
            else:
                time.sleep(0)  # threading.Lock is not fair: let a waiting submit, abort or load in between steps

    def _step(self) -> bool:
        try:
            return self.engine.step()
        except Exception as exc:  # a bug in a step must fail its requests loudly, not hang their streams
            log.exception("engine step failed; failing every live request")
            self.engine.fail_all(f"engine step failed: {exc}")
            return False
