"""The fault-injection suite's summary table: scenario, trials, failures, changes lost,
escapes (a hostile repository made backupd or qemu open something outside it).

Rows come from the tests' outcomes, not only from what a test chose to record: every row
a test recorded counts a failure when that test fails (whatever the test had recorded),
and a test that fails before recording anything adds a row of its own.  So the table can
never show a clean row for a scenario whose test failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    scenario: str
    trials: int = 0
    failures: int = 0
    lost: int = 0
    escapes: int = 0
    tests: set[str] = field(default_factory=set)


ROWS: dict[str, Row] = {}
#: the test being run (set by integration/conftest.py)
current_test: str = ""


def record(scenario: str, *, failed: bool = False, lost: int = 0, escapes: int = 0) -> None:
    """One trial of ``scenario`` in the current test."""
    row = ROWS.setdefault(scenario, Row(scenario))
    row.trials += 1
    row.failures += int(failed)
    row.lost += lost
    row.escapes += escapes
    row.tests.add(current_test)


def mark_failed(test: str, name: str) -> None:
    """The outcome of a test that failed: its rows show at least one failure."""
    rows = [row for row in ROWS.values() if test in row.tests]
    if not rows:
        rows = [ROWS.setdefault(f"{name} (failed before its first trial)", Row(name))]
        rows[0].trials += 1
    for row in rows:
        row.failures = max(row.failures, 1)


def table() -> list[str]:
    if not ROWS:
        return []
    width = max(len(r.scenario) for r in ROWS.values())
    lines = [
        f"| {'scenario':<{width}} | trials | failures | changes lost | escapes |",
        f"|{'-' * (width + 2)}|--------|----------|--------------|---------|",
    ]
    for r in ROWS.values():
        lines.append(
            f"| {r.scenario:<{width}} | {r.trials:>6} | {r.failures:>8} | {r.lost:>12} "
            f"| {r.escapes:>7} |"
        )
    return lines
