"""The group's rendezvous store listens on the rendezvous address only, not on every interface."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest

from nanocp.harness.offline_group import free_port
from nanocp.worker.group import rendezvous_store
from nanocp.worker.group_spec import GroupSpec

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")


def listening_addresses(port: int) -> list[str]:
    """The local addresses of the IPv4 and IPv6 sockets listening on `port` (state 0A is LISTEN)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state == "0A" and int(local_port, 16) == port:
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(socket.inet_ntop(family, words))
    return found


def test_the_store_listens_on_the_rendezvous_address_only() -> None:
    port = free_port()
    store = rendezvous_store(GroupSpec(0, 1, "127.0.0.1", port), datetime.timedelta(seconds=30))
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert listening_addresses(port) == ["127.0.0.1"]
