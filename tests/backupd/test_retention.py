"""Retention rules and chain closure."""

from __future__ import annotations

from backupd.config import Retention
from backupd.retention import close_over_chains, select

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


def test_chain_closure() -> None:
    parents = {"a": None, "b": "a", "c": "b", "d": None, "e": "d"}
    keep = close_over_chains({"c": "keep_last"}, parents)
    assert keep == {"c": "keep_last", "b": "needed by c", "a": "needed by c"}
