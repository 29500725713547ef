"""The synchronous core of admission that the service and the simulator share: place now, queue FIFO, pump on
release, refuse what never fits."""

from __future__ import annotations

import pytest

from nanocp.placement import Footprint
from nanocp.router.accounting import Ledger
from nanocp.router.admission import AdmissionQueue, QueueFull
from nanocp.router.placement import InstanceLoad
from nanocp.router.policies.static import StaticPolicy

PAGE = 16
TWO = [InstanceLoad("a", PAGE, 10, group="g"), InstanceLoad("b", PAGE, 10, group="g", rank=1)]
EIGHT_PAGES = Footprint(100, 29)  # 128 tokens
TWO_PAGES = Footprint(20, 13)  # 32 tokens


def queue(size: int = 4) -> AdmissionQueue:
    ledger = Ledger()
    return AdmissionQueue(StaticPolicy(), ledger, lambda: [ledger.count(i) for i in TWO], size)


def test_a_request_that_fits_is_placed_and_committed_at_once() -> None:
    q = queue()
    placement = q.admit("r1", EIGHT_PAGES)
    assert placement is not None and placement.home == "a"
    assert q.ledger.pages_committed("a") == 8 and q.queued == 0


def test_a_request_that_fits_nowhere_waits_and_is_placed_when_pages_are_released() -> None:
    q = queue()
    first, second = q.admit("r1", EIGHT_PAGES), q.admit("r2", EIGHT_PAGES)
    assert first is not None and second is not None
    assert q.admit("r3", EIGHT_PAGES) is None
    assert (q.queued, q.waited_total) == (1, 1)
    placed = q.release(first)
    assert [(key, p.home) for key, p in placed] == [("r3", "a")]
    assert q.queued == 0


def test_newcomers_queue_behind_a_waiting_request_even_when_they_would_fit() -> None:
    q = queue()
    assert q.admit("r1", EIGHT_PAGES) is not None and q.admit("r2", EIGHT_PAGES) is not None
    assert q.admit("big", EIGHT_PAGES) is None
    assert q.admit("small", TWO_PAGES) is None, "a small request must not overtake the waiting large one"
    assert q.pump() == [] and q.queued == 2


def test_a_full_queue_refuses() -> None:
    q = queue(size=1)
    q.admit("r1", EIGHT_PAGES)
    q.admit("r2", EIGHT_PAGES)
    q.admit("r3", EIGHT_PAGES)
    with pytest.raises(QueueFull, match="admission queue is full"):
        q.admit("r4", EIGHT_PAGES)


def test_a_withdrawn_request_leaves_the_queue_and_the_next_one_moves_up() -> None:
    q = queue()
    q.admit("r1", EIGHT_PAGES)
    q.admit("r2", EIGHT_PAGES)
    q.admit("r3", EIGHT_PAGES)
    q.admit("r4", TWO_PAGES)
    assert q.withdraw("r3") and not q.withdraw("r3")
    assert [key for key, _ in q.pump()] == ["r4"], "r4 fits in the two pages left once r3 is gone"


def test_never_fits_names_the_sizes_and_ignores_current_load() -> None:
    q = queue()
    loaded = [q.ledger.count(i) for i in TWO]
    assert q.never_fits(EIGHT_PAGES, loaded) is None
    message = q.never_fits(Footprint(200, 50), TWO)
    assert message is not None and "249 tokens" in message and "16 pages of 16 tokens" in message
