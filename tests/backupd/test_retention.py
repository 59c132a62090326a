"""Retention rules, and what a prune makes of the backups the policy drops."""

from __future__ import annotations

import pytest

from backupd.config import Retention
from backupd.errors import ChainError
from backupd.merge.plan import Direction, plan_merges
from backupd.retention import select

DAYS = [f"202611{d:02d}T0{h}0000Z" for d in range(1, 29) for h in (1, 5)]


def test_keep_last_and_daily() -> None:
    keep = select(DAYS, Retention(keep_last=3, keep_daily=5))
    assert sorted(keep)[-3:] == DAYS[-3:]
    daily = [b for b, why in keep.items() if why == "keep_daily"]
    # the newest of each of the last 5 days; days 27 and 28 are already kept by keep_last
    assert sorted(daily) == ["20261124T050000Z", "20261125T050000Z", "20261126T050000Z"]
    assert len(keep) == 6


def test_weekly_and_monthly_pick_the_newest_of_each_period() -> None:
    keep = select(DAYS, Retention(keep_weekly=2, keep_monthly=1))
    assert "20261128T050000Z" in keep  # newest overall: this week and this month
    assert "20261122T050000Z" in keep  # Sunday of the previous ISO week
    assert len(keep) == 2


# two chains: a full "a" with incrementals b..g, and a newer full "h" with i
PARENTS = {"a": None, "b": "a", "c": "b", "d": "c", "e": "d", "f": "e", "g": "f"}
PARENTS |= {"h": None, "i": "h"}


def test_keep_last_two_folds_the_rest_down_into_the_older() -> None:
    plan = plan_merges(PARENTS, {"h", "i"})
    assert plan.folds == ()
    assert plan.remove == ("a", "b", "c", "d", "e", "f", "g")  # a chain with nothing kept
    plan = plan_merges(PARENTS, {"f", "g", "h", "i"})
    (fold,) = plan.folds
    assert (fold.direction, fold.target, fold.folded, fold.parent) == (
        Direction.DOWN,
        "f",
        ("a", "b", "c", "d", "e"),
        None,
    )
    assert plan.remove == () and plan.dropped == ("a", "b", "c", "d", "e")
    assert plan.action("c") == "merge into f" and plan.action("f") == "keep (becomes a full)"
    assert plan.action("g") == "keep"


def test_gaps_between_kept_backups_fold_up_and_the_tail_goes() -> None:
    plan = plan_merges(PARENTS, {"a", "c", "f", "i"})
    assert [(f.direction, f.target, f.folded, f.parent) for f in plan.folds] == [
        (Direction.UP, "c", ("b",), "a"),
        (Direction.UP, "f", ("d", "e"), "c"),
        (Direction.DOWN, "i", ("h",), None),
    ]
    assert plan.remove == ("g",)  # above the newest kept one of its chain: nobody needs it
    assert plan.action("e") == "merge into f" and plan.action("f") == "keep (now on c)"
    assert plan.action("g") == "remove"


def test_a_parent_with_two_children_is_refused() -> None:
    with pytest.raises(ChainError, match="both build on a"):
        plan_merges({"a": None, "b": "a", "c": "a"}, {"c"})
