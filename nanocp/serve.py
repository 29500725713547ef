"""How `nanocp router` and `nanocp worker` serve: until the server stops itself, or until a signal shuts it down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar


class Server(Protocol):
    async def stop(self, grace: float | None = None) -> None: ...

    async def shut_down(self, grace: float) -> None: ...

    async def wait_for_termination(self) -> None: ...


S = TypeVar("S", bound=Server)


def serve_until_signalled(start: Callable[[], Awaitable[S]], grace: float) -> S:
    """Serves until the server stops itself, or until SIGINT or SIGTERM: then it shuts down gracefully (no new
    calls, health NOT_SERVING, the live streams get `grace` seconds to finish); a second signal stops at once."""

    async def main() -> S:
        server = await start()
        signals = asyncio.Queue[int]()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signals.put_nowait, sig)
        # Never cancelled: cancelling grpc's wait_for_termination cancels its shutdown, and the grace with it.
        terminated = asyncio.ensure_future(server.wait_for_termination())
        signalled = asyncio.ensure_future(signals.get())
        await asyncio.wait([signalled, terminated], return_when=asyncio.FIRST_COMPLETED)
        if signalled.done():
            log = logging.getLogger("nanocp")
            log.info(
                "%s: shutting down; live streams get %g s to finish", signal.Signals(signalled.result()).name, grace
            )
            shutting = asyncio.ensure_future(server.shut_down(grace))
            again = asyncio.ensure_future(signals.get())
            await asyncio.wait([shutting, again], return_when=asyncio.FIRST_COMPLETED)
            if again.done():
                log.info("a second signal: stopping at once")
                shutting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await shutting
                await server.stop()
            else:
                again.cancel()
        else:
            signalled.cancel()
        await terminated
        return server

    return asyncio.run(main())
