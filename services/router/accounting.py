"""What the router has granted each instance, counted by the router itself.

The router is the only allocator of page quotas, so its own counts are exact and current, where the workers' load
reports are a heartbeat old; decisions use the counts, and the reports only check them (a worker using more pages
than the router granted there means someone else is placing on it, or a leak).
"""

from __future__ import annotations

import logging
from collections import Counter

from nanocp.router.placement import InstanceLoad, Placement
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

    def home_batch(self, instance_id: str) -> int:
        return self._home_batch[instance_id]

    def pages_committed(self, instance_id: str) -> int:
        return self._pages_committed[instance_id]

    def load(self, instance: Instance) -> InstanceLoad:
        """The instance as a policy sees it; it must have answered GetInfo."""
        assert instance.info is not None, f"instance at {instance.address} has not answered GetInfo"
        return InstanceLoad(
            id=instance.id,
            page_size=instance.info.page_size,
            pages_total=instance.info.kv_pages_total,
            pages_committed=self.pages_committed(instance.id),
            home_batch=self.home_batch(instance.id),
            routed_rows=self._routed_rows[instance.id],
            group=instance.info.group,
            rank=instance.info.rank,
            domain=instance.info.domain,
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
