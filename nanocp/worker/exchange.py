"""The group's agreement at the start of every step, over the control group (host memory, no device read).

One all-gather carries every member's row: its home tokens, the query rows it routes, whether its step is all
decodes, how many metadata rows it has for each peer, and the work breakdown of its last timed step. From it every
member learns whether the group steps at all, whether any CP route runs, whether the step may take a graph bucket
(and which: the largest home batch decides), how many metadata rows to expect from whom, and (at no extra
collective) which member was slowest last step and why. Then one route over the control group carries the metadata
rows: per (request, shard) a home's rows attend on a remote holder, and the frees of ended requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nanocp.worker.group import Group
from nanocp.worker.planner import Outgoing
from nanocp.worker.step_meta import Meta, MetaRow
from nanocp.worker.timing import StepLog, StepRecord, StepTimer, Straggler, exchange_row

Verdict = Callable[[StepRecord, Straggler], None]


@dataclass(frozen=True)
class Agreement:
    tokens: int  # home tokens over the whole group this step (0: only frees travel)
    max_tokens: int  # the most home tokens any member has: what sizes the step's fixed-capacity routes
    decode_only: bool  # every member's chunks are decodes: the step may take a graph bucket's static layout
    cp_routes: bool  # some member routes query rows, so every member runs the CP routes
    incoming: list[list[MetaRow]]  # the metadata rows from each peer


class StepExchange:
    def __init__(self, group: Group, steps: StepLog, timer: StepTimer, on_verdict: Verdict) -> None:
        self.group = group
        self.steps = steps
        self.timer = timer
        self.on_verdict = on_verdict
        self._frees: dict[int, list[int]] = {}  # holder rank -> keys of ended requests whose shards it must free

    def free_later(self, holder: int, key: int) -> None:
        """Tells `holder`, at the next step, to free the shards it holds of request `key`."""
        self._frees.setdefault(holder, []).append(key)

    def take_frees(self) -> dict[int, list[int]]:
        frees, self._frees = self._frees, {}
        return frees

    @property
    def has_frees(self) -> bool:
        return bool(self._frees)

    def agree(self, tokens: int, decode_only: bool, out: Outgoing) -> Agreement | None:
        """The step as the whole group will run it; None when no member has anything to do."""
        size, rank = self.group.size, self.group.rank
        last = self.steps.last()
        remote_rows = sum(a.rows for a in out.remote)
        local = [tokens, remote_rows, int(decode_only), *(len(rows) for rows in out.meta), *exchange_row(last)]
        with self.timer.section("exchange", host=True):  # a member that arrives early waits here: arrival lag
            rows = self.group.exchange_counts(local)
        previous = [row[3 + size :] for row in rows]
        if size > 1 and last is not None and all(p[0] == last.step for p in previous):
            straggler = Straggler.of([p[1:] for p in previous])
            self.steps.mark(last.step, straggler)
            self.on_verdict(last, straggler)
        group_tokens = sum(row[0] for row in rows)
        meta_from = [row[3 + rank] for row in rows]  # metadata rows each peer sends here
        any_meta = any(any(row[3 : 3 + size]) for row in rows)
        if group_tokens == 0 and not any_meta:
            return None
        incoming = self.group.route_rows(out.meta, meta_from, len(Meta)) if any_meta else [[] for _ in range(size)]
        return Agreement(
            group_tokens,
            max(row[0] for row in rows),
            all(row[2] for row in rows),
            any(row[1] for row in rows),
            incoming,
        )
