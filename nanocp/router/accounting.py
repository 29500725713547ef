"""What the router has granted each instance, counted by the router itself.

The router is the only allocator of page quotas, so its own counts are exact and current, where the workers' load
reports are a heartbeat old; decisions use the counts, and the reports only check them (a worker using more pages
than the router granted there means someone else is placing on it, or a leak).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from nanocp.placement import Placement
from nanocp.router.placement import InstanceLoad

if TYPE_CHECKING:  # the simulator counts with a ledger too, without the gRPC registry
    from nanocp.router.registry import Instance

log = logging.getLogger(__name__)


class Ledger:
    def __init__(self) -> None:
        self._home_batch: Counter[str] = Counter()
        self._pages_committed: Counter[str] = Counter()
        self._routed_rows: Counter[str] = Counter()
        self._drifting: set[str] = set()

    def commit(self, placement: Placement) -> None:
        self._home_batch[placement.home] += 1
        self._pages_committed.update({s.instance: s.page_quota for s in placement.shards})
        self._routed_rows.update(placement.routed_rows)

    def release(self, placement: Placement) -> None:
        self._home_batch[placement.home] -= 1
        self._pages_committed.subtract({s.instance: s.page_quota for s in placement.shards})
        self._routed_rows.subtract(placement.routed_rows)

    def swap(self, old: Placement, new: Placement) -> None:
        """A request's placement grew: its grants become the new placement's."""
        self.release(old)
        self.commit(new)

    def home_batch(self, instance_id: str) -> int:
        return self._home_batch[instance_id]

    def pages_committed(self, instance_id: str) -> int:
        return self._pages_committed[instance_id]

    def load(self, instance: Instance) -> InstanceLoad:
        """The instance as a policy sees it; it must have answered GetInfo."""
        assert instance.info is not None, f"instance at {instance.address} has not answered GetInfo"
        info = instance.info
        return self.count(
            InstanceLoad(
                instance.id, info.page_size, info.kv_pages_total, group=info.group, rank=info.rank, domain=info.domain
            )
        )

    def count(self, instance: InstanceLoad) -> InstanceLoad:
        """An instance described by its capacity (id, pages, group, ...) with the ledger's counts filled in."""
        id = instance.id
        return InstanceLoad(
            id,
            instance.page_size,
            instance.pages_total,
            self._pages_committed[id],
            self._home_batch[id],
            self._routed_rows[id],
            instance.group,
            instance.rank,
            instance.domain,
        )

    def reconcile(self, instance: Instance) -> None:
        """Warns once when a worker's pages in use exceed what the router committed there, and when it recovers."""
        committed = self.pages_committed(instance.id)
        if instance.pages_in_use > committed and instance.id not in self._drifting:
            self._drifting.add(instance.id)
            log.warning(
                "instance %s reports %d KV pages in use but the router committed only %d there",
                instance.id,
                instance.pages_in_use,
                committed,
            )
        elif instance.pages_in_use <= committed and instance.id in self._drifting:
            self._drifting.discard(instance.id)
            log.info("instance %s is back within the pages the router committed", instance.id)
