"""The synchronous core of admission that the service and the simulator share: place now, queue, let small requests
that fit go ahead of a large one (a bounded number anywhere, then only outside the pages it waits for), pump on
release, refuse what never fits, and admit what is larger than any instance only from memory its group has to
spare."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nanocp.placement import Footprint
from nanocp.router.accounting import Ledger
from nanocp.router.admission import DEFAULT_MAX_BYPASS, AdmissionQueue, QueueFull
from nanocp.router.cost import CostModel
from nanocp.router.placement import InstanceLoad, PlacementPolicy
from nanocp.router.policies.balanced import BalancedPolicy
from nanocp.router.policies.dcp import DCPPolicy
from nanocp.router.policies.static import StaticPolicy
from nanocp.router.policies.uniform import UniformPolicy

PAGE = 16
TWO = [InstanceLoad("a", PAGE, 10, group="g"), InstanceLoad("b", PAGE, 10, group="g", rank=1)]
EIGHT_PAGES = Footprint(100, 29)  # 128 tokens
TWO_PAGES = Footprint(20, 13)  # 32 tokens
TEN_PAGES = Footprint(150, 11)  # 160 tokens


def queue(size: int = 4, max_bypass: int = DEFAULT_MAX_BYPASS, policy: PlacementPolicy | None = None) -> AdmissionQueue:
    ledger = Ledger()
    return AdmissionQueue(policy or StaticPolicy(), ledger, lambda: [ledger.count(i) for i in TWO], size, max_bypass)


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


def test_a_small_request_that_fits_goes_ahead_of_a_waiting_large_one() -> None:
    q = queue()
    assert q.admit("r1", EIGHT_PAGES) is not None and q.admit("r2", EIGHT_PAGES) is not None
    assert q.admit("big", EIGHT_PAGES) is None
    small = q.admit("small", TWO_PAGES)
    assert small is not None, "a request with room is not held up by a large one at the head"
    assert q.queued == 1 and q.ledger.pages_committed(small.home) == 10


def test_a_release_places_waiting_small_requests_behind_a_large_one_that_still_does_not_fit() -> None:
    q = queue()
    full = [q.admit(key, footprint) for key, footprint in [("r1", EIGHT_PAGES), ("r2", EIGHT_PAGES)]]
    little = [q.admit(key, TWO_PAGES) for key in ("s1", "s2")]  # both instances full now
    assert all(p is not None for p in full + little)
    assert q.admit("big", EIGHT_PAGES) is None and q.admit("small", TWO_PAGES) is None
    assert little[0] is not None
    assert [key for key, _ in q.release(little[0])] == ["small"], "two pages free: the small one fits, big not"
    assert q.queued == 1


def test_the_oldest_request_gets_precedence_after_max_bypass_others_went_ahead() -> None:
    q = queue(8, max_bypass=1)
    first = q.admit("r1", EIGHT_PAGES)
    assert first is not None and q.admit("r2", EIGHT_PAGES) is not None
    assert q.admit("big", EIGHT_PAGES) is None
    assert q.admit("s1", TWO_PAGES) is not None, "within the bypass budget"
    assert q.admit("s2", TWO_PAGES) is None, "budget spent: the two pages free are those big waits for"
    assert q.pump() == [], "nothing overtakes the oldest any more"
    placed = q.release(first)
    assert [key for key, _ in placed] == ["big", "s2"], "the oldest first, then a fresh budget for the next"


def test_once_the_oldest_has_precedence_others_are_placed_only_outside_the_pages_it_waits_for() -> None:
    q = queue(8, max_bypass=1)
    assert q.admit("r1", EIGHT_PAGES) is not None  # on a: 2 pages free
    second = q.admit("r2", TWO_PAGES)  # on b: 8 free
    assert second is not None and second.home == "b"
    assert q.admit("big", TEN_PAGES) is None
    first_small = q.admit("s1", TWO_PAGES)
    assert first_small is not None and first_small.home == "b", "within the budget: the most free pages, on b"
    # Budget spent: big waits for ten pages on b, so b takes nothing more; a's two free pages are anyone's.
    placed = q.admit("s2", TWO_PAGES)
    assert placed is not None and placed.home == "a"
    assert q.admit("s3", TWO_PAGES) is None
    assert q.release(second) == [], "b has 8 pages free, big needs 10, and nothing else may take them"
    assert [key for key, _ in q.release(first_small)] == ["big"]


def test_a_request_larger_than_any_instance_is_split_when_there_is_room_now_else_refused() -> None:
    q = queue(8, policy=DCPPolicy(shard_tokens=PAGE))
    huge = Footprint(200, 57)  # 256 tokens: 16 pages, more than an instance's 10
    placement = q.admit("h1", huge)
    assert placement is not None and placement.cp_degree == 2, "split over both instances of the idle group"
    with pytest.raises(QueueFull, match=r"larger than any instance holds .* retry later"):
        q.admit("h2", huge)
    assert q.queued == 0, "it does not wait: waiting, it would hold back the requests behind it"
    q.release(placement)
    assert q.admit("h3", huge) is not None


FOUR = [InstanceLoad(f"i{r}", PAGE, 10, group="g", rank=r) for r in range(4)]
GIANT = Footprint(200, 57)  # 16 pages: more than an instance's 10


def dcp_queue_of_four() -> AdmissionQueue:
    """dcp on four instances of 10 pages, with a CP route so slow that only a giant is ever split."""
    ledger = Ledger()
    dcp = DCPPolicy(shard_tokens=PAGE, cost=CostModel(cp_step_ms=1e3))
    return AdmissionQueue(dcp, ledger, lambda: [ledger.count(i) for i in FOUR], 8)


def test_a_request_larger_than_any_instance_is_refused_while_another_waits_for_memory() -> None:
    q = dcp_queue_of_four()
    for n in range(4):
        assert q.admit(f"s{n}", TWO_PAGES) is not None
    assert q.admit("big", TEN_PAGES) is None, "no instance has 10 pages free: it waits"
    with pytest.raises(QueueFull, match="nobody waits for memory"):
        q.admit("g1", GIANT)  # 24 pages are free, but the pages that free up are the waiting request's
    assert q.withdraw("big")
    placement = q.admit("g2", GIANT)
    assert placement is not None and placement.cp_degree >= 2


@pytest.mark.parametrize("small_requests, admitted", [(6, True), (7, False)])
def test_a_request_larger_than_any_instance_is_admitted_only_while_its_group_keeps_what_the_others_hold_free(
    small_requests: int, admitted: bool
) -> None:
    q = dcp_queue_of_four()
    for n in range(small_requests):
        assert q.admit(f"s{n}", TWO_PAGES) is not None
    # 12 pages held: 40 - 12 - 16 = 12 stay free; 14 held: only 10 would, though the giant fits in the 26 free.
    if admitted:
        assert q.admit("giant", GIANT) is not None
    else:
        with pytest.raises(QueueFull, match="as many pages free as the others hold"):
            q.admit("giant", GIANT)
    assert q.queued == 0


@pytest.mark.parametrize("max_bypass", [0, 1, 3])
@pytest.mark.parametrize("policy", [StaticPolicy, BalancedPolicy, DCPPolicy, lambda: UniformPolicy(2)])
def test_a_stream_of_small_requests_cannot_starve_a_large_one(
    max_bypass: int, policy: Callable[[], PlacementPolicy]
) -> None:
    q = queue(64, max_bypass, policy())
    running = [q.admit("r1", EIGHT_PAGES), q.admit("r2", EIGHT_PAGES)]
    assert q.admit("big", EIGHT_PAGES) is None
    for n in range(20):  # small requests keep coming and finishing; the large one needs 8 free pages on one
        placement = q.admit(f"s{n}", TWO_PAGES)
        placed = dict(q.release(placement)) if placement is not None else {}
        if n == 5:
            first = running.pop(0)
            assert first is not None
            placed |= dict(q.release(first))
        if "big" in placed:
            break
    assert "big" in placed, "placed as soon as enough pages are free, whatever arrives meanwhile"


def test_a_full_queue_refuses() -> None:
    q = queue(size=1)
    q.admit("r1", EIGHT_PAGES)
    q.admit("r2", EIGHT_PAGES)
    q.admit("r3", EIGHT_PAGES)
    with pytest.raises(QueueFull, match="admission queue is full"):
        q.admit("r4", EIGHT_PAGES)


def test_a_withdrawn_request_leaves_the_queue_and_the_next_one_moves_up() -> None:
    q = queue(max_bypass=0)  # strict arrival order: r4 waits behind r3
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
