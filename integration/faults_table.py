"""The fault-injection suite's summary table: scenario, trials, failures, changes lost,
escapes (a hostile repository made backupd or qemu open something outside it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    scenario: str
    trials: int = 0
    failures: int = 0
    lost: int = 0
    escapes: int = 0


ROWS: dict[str, Row] = {}


def record(scenario: str, *, failed: bool = False, lost: int = 0, escapes: int = 0) -> None:
    row = ROWS.setdefault(scenario, Row(scenario))
    row.trials += 1
    row.failures += int(failed)
    row.lost += lost
    row.escapes += escapes


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
