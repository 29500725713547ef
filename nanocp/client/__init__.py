"""The nanocp client SDK: sync and asyncio clients of the router, with deadlines, retries and trace propagation."""

from nanocp.client._call import Credentials
from nanocp.client.aio import AsyncClient, AsyncStream
from nanocp.client.chunk import Chunk, Usage
from nanocp.client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NanocpError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from nanocp.client.sync import Client, Stream

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncStream",
    "Cancelled",
    "Chunk",
    "Client",
    "Credentials",
    "DeadlineExceeded",
    "Internal",
    "InvalidArgument",
    "NanocpError",
    "NotFound",
    "ResourceExhausted",
    "Stream",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
