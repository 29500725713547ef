"""uvicorn serving the HTTP API in the router's own event loop, beside grpc.aio: one process, one loop, one set of
live requests, whichever face they came through."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leaves SIGINT and SIGTERM to the process (`nanocp router` stops both faces together)."""
        yield


def _bind(host: str, port: int) -> socket.socket:
    """Bound here rather than by uvicorn, which exits the process when the port is taken; port 0 picks one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not REUSEPORT: a taken port must fail
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror}") from exc
    return sock


class HttpServer:
    def __init__(self, app: FastAPI, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self.app = app
        self._server = server
        self._task = task
        self.port = port

    @classmethod
    async def start(cls, app: FastAPI, host: str, port: int) -> HttpServer:
        sock = _bind(host, port)
        bound = int(sock.getsockname()[1])
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
        server = _InLoopServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # raises why it stopped
                raise OSError(f"the HTTP server on {host}:{bound} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", host, bound)
        return cls(app, server, task, bound)

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking connections; requests still streaming get `grace` seconds (at least 1, uvicorn counts whole
        seconds) to finish, then are cancelled, which aborts them on their workers."""
        self._server.config.timeout_graceful_shutdown = max(1, round(grace or 0))
        self._server.should_exit = True
        await self._task
