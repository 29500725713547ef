"""Drives an engine from its own thread, the only thread that touches engine state.

Other threads (the gRPC server's) hand it commands through a queue and read the load snapshot the engine publishes
before it emits any output (so a caller that has seen a token sees the pages behind it), so they never wait for a
step, which in a group can last as long as the slowest peer. When there is no work
the thread sleeps (on the group's doorbell, which any member's new work rings), never spins.

A step that fails inside a group is fatal: the group's collectives are out of step, so the live requests fail with
an error and `on_fatal` tells the server to stop serving. So is a command (submit, abort, extend) that raises, alone
or in a group: it may have left the engine's state half changed. Either way every live request's stream ends,
including those whose submit had not reached the engine yet, and no new one is taken.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from nanocp.placement import Shard
from nanocp.worker.engine import Engine
from nanocp.worker.request import (
    EngineError,
    EngineLoad,
    FinishReason,
    OutputCallback,
    RequestOutput,
    SamplingParams,
)

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine, on_fatal: Callable[[Exception], None] | None = None) -> None:
        self.engine = engine
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        # Ids submitted and not yet finished (for refusing duplicates at once), with their callbacks and prompt
        # lengths, so a failure can end the streams of requests the engine has not seen yet.
        self._live: dict[str, tuple[OutputCallback, int]] = {}
        self._live_lock = threading.Lock()
        self._stopping = False
        self.failed: Exception | None = None
        self.group_idle = False  # the last step found no work on any member of the group
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Aborts every live request (their callbacks see FinishReason.ABORT) and ends the thread."""
        self._stopping = True
        self.engine.group.ring()
        self._thread.join()
        # A failed engine ended its requests already, and tearing down a broken group can hang: the process is about
        # to end anyway.
        if self.failed is None:
            self.engine.fail_all(None)
            self.engine.group.close()

    def submit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        on_output: OutputCallback,
        shards: list[Shard] | None = None,
    ) -> None:
        """Raises EngineError at once for a request the engine can never serve or an id that is already live."""
        admission = self.engine.admission
        shards = shards or admission.local_placement(prompt, params)
        admission.check(prompt, params, shards)

        def relay(output: RequestOutput) -> None:
            if output.finish_reason is not None:
                with self._live_lock:
                    self._live.pop(request_id, None)
            on_output(output)

        with self._live_lock:  # with the failure check, so a failure either sees this id or refuses it
            if self.failed is not None:
                raise EngineError("UNAVAILABLE", f"the engine failed ({self.failed}); the worker must restart")
            admission.check_new_id(request_id, self._live)
            self._live[request_id] = (relay, len(prompt))
        self._post(lambda: self.engine.add_request(request_id, prompt, params, relay, shards))

    def abort(self, request_id: str) -> bool:
        """False for an id that is not live; otherwise the request ends (and frees its pages) before the next step."""
        with self._live_lock:
            if request_id not in self._live:
                return False
        self._post(lambda: self.engine.abort(request_id))
        return True

    def extend(self, request_id: str, shards: list[Shard] | None) -> bool:
        """Grows a live request's placement (None: there is no room); False for an id that is not live."""
        with self._live_lock:
            if request_id not in self._live:
                return False
        self._post(lambda: self.engine.extend(request_id, shards))
        return True

    def load(self) -> EngineLoad:
        return self.engine.load_snapshot

    def _post(self, command: Callable[[], object]) -> None:
        self._commands.put(command)
        self.engine.group.ring()

    def _run(self) -> None:
        try:
            while not self._stopping and self.failed is None:
                while not self._commands.empty():
                    self._commands.get()()
                worked = self._step()
                self.group_idle = not worked
                if not worked and self.failed is None:
                    self.engine.group.sleep_until_rung()
        except Exception as exc:  # a command, or the group's doorbell: the engine's state may be half changed
            log.exception("the engine loop failed; failing every live request")
            self._fail(exc, f"the engine failed: {exc}")

    def _step(self) -> bool:
        try:
            return self.engine.step()
        except Exception as exc:  # a failed step must fail its requests loudly, never hang their streams
            log.exception("engine step failed; failing every live request")
            if self.engine.group.size > 1:  # the group's collectives are out of step: it must restart whole
                self._fail(exc, f"engine step failed: {exc}")
            else:  # a lone engine's step is all its own: it ends every request and steps on (_run fails if this raises)
                self.engine.fail_all(f"engine step failed: {exc}", "INTERNAL")
            return False

    def _fail(self, exc: Exception, error: str) -> None:
        """Ends every live request UNAVAILABLE (the instance's state, not the requests' fault), refuses new ones and
        tells the server, which stops serving so the process exits for its supervisor to restart it."""
        with self._live_lock:
            self.failed = exc  # first, so the failed requests' streams can tell an engine failure
        try:
            self.engine.fail_all(error, "UNAVAILABLE")
        except Exception:  # its state is broken: the streams below still end
            log.exception("failing the engine's requests failed too")
        with self._live_lock:
            unfinished, self._live = self._live, {}
        for request_id, (on_output, prompt_tokens) in unfinished.items():  # not yet in the engine, or stuck there
            on_output(RequestOutput(request_id, [], FinishReason.ABORT, prompt_tokens, 0, error, "UNAVAILABLE"))
        if self._on_fatal is not None:
            self._on_fatal(exc)
