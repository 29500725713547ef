"""Runs a body's choices through the router's one request path and merges their streams into events.

Each choice is a request of its own (RouterServicer.generate), pumped by a task into one queue, so n choices decode
side by side. Stop strings are matched here on the text (the engine stops on token ids): text that could still be
the start of a stop string is held back, and a choice that hits one is ended at once (StopRequested), which aborts
it on its home worker and frees its KV pages, its span ending as finished. Cancelling the Choices (a client that
went away) aborts every choice the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import grpc
from opentelemetry.context import Context

from nanocp.auth import Caller
from nanocp.router.errors import RequestError, StopRequested
from nanocp.router.service import RouterServicer
from nanocp.v1 import common_pb2, router_pb2
from nanocp.wire import finish_reason_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """Text a choice produced since its previous Delta; the last one carries its finish reason and usage."""

    index: int
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    index: int
    error: RequestError


Event = Delta | Failed


class NoDeadline:
    """HTTP requests carry no deadline of their own: they end when they finish or their client goes away."""

    def time_remaining(self) -> None:
        return None


class StopStrings:
    """Cuts a choice's text at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = stop
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text safe to emit, and whether a stop string ended the choice."""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = max((n for s in self._stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Choices:
    """The running choices of one body: `next` to follow them, `cancel` to abort those still running."""

    def __init__(
        self,
        servicer: RouterServicer,
        requests: Sequence[router_pb2.GenerateRequest],
        stop: Sequence[str],
        parent: Context,
        operation: str,
        prompt_tokens: Callable[[router_pb2.GenerateRequest], int],
        caller: Caller,
    ) -> None:
        """`prompt_tokens` counts a request's prompt, for a choice a stop string ended before its usage came;
        `caller` whose token the body came with (nanocp.auth)."""
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._prompt_tokens = prompt_tokens
        self._running = len(requests)
        self._tasks = [
            asyncio.create_task(self._pump(i, servicer.generate(r, NoDeadline(), parent, operation, caller), r, stop))
            for i, r in enumerate(requests)
        ]

    async def _pump(
        self,
        index: int,
        responses: AsyncGenerator[router_pb2.GenerateResponse],
        request: router_pb2.GenerateRequest,
        stop: Sequence[str],
    ) -> None:
        strings = StopStrings(stop)
        tokens = 0
        try:
            async with aclosing(responses) as stream:
                async for response in stream:
                    tokens += len(response.token_ids)
                    text, stopped = strings.push(response.text)
                    if stopped:  # ending the stream aborts the request and frees its pages
                        with contextlib.suppress(StopAsyncIteration):
                            await stream.athrow(StopRequested())
                        await self._queue.put(Delta(index, text, "stop", self._prompt_tokens(request), tokens))
                        return
                    if response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                        reason = finish_reason_name(response.finish_reason)
                        usage = response.usage
                        text += strings.flush()
                        await self._queue.put(Delta(index, text, reason, usage.prompt_tokens, tokens))
                        return
                    await self._queue.put(Delta(index, text))
            failure = RequestError(grpc.StatusCode.INTERNAL, "the request's stream ended without a finish")
        except RequestError as exc:
            failure = exc
        except Exception as exc:  # a bug, not the request's fault: answer it rather than leave the client waiting
            log.exception("choice %d of an HTTP request failed", index)
            failure = RequestError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        await self._queue.put(Failed(index, failure))

    async def next(self) -> Event | None:
        """The next event of any choice, in the order they come; None once every choice has finished or failed."""
        if self._running == 0:
            return None
        event = await self._queue.get()
        if isinstance(event, Failed) or event.finish_reason is not None:
            self._running -= 1
        return event

    def cancel(self) -> None:
        """Aborts the choices still running: each one's task ends its request, and its workers free the pages.

        Synchronous, so it also runs where the caller is being cancelled itself (a streaming response whose client
        went away)."""
        for task in self._tasks:
            task.cancel()
