"""A hostile repository against the real commands: crafted manifests, symlinks and
special files in the layout, crafted qcow2 headers and tables, each case in its own VM
folder, each run through ``list``, ``status``, ``verify``, ``restore``, ``serve`` and
``prune`` (the CLI's own ``main`` in a fresh process per command, qemu-img and
qemu-storage-daemon real, everything under ``strace -f``).

Every command either works (and then restores exactly the backed-up bytes) or refuses
with one error line and a documented exit code: no traceback, no hang.  Nothing outside
the test's repository is opened by backupd or any qemu it starts (a canary file and a
pristine copy of the chain wait outside), no qemu opens a crafted image (the gate
refuses it before qemu runs), and the canary is never written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.conftest import MiB, backupd
from integration.faults_table import record
from integration.harness import audit
from integration.harness.chain import read_image
from integration.harness.digest_runs import first_run
from integration.harness.hostile import (
    CANARY,
    COMMANDS,
    Case,
    canary,
    cases,
    copy_chain,
    make_outside,
)
from integration.harness.vm import QemuVM
from tests.backupd.crafted import FULL, INCREMENTAL, VM, base_chain

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not audit.available(), reason="strace is missing (scripts/setup.sh)"),
]

ROOT = Path(__file__).resolve().parent.parent
RUNNERS = 3
DOCUMENTED = {0, 1, 2, 3, 4}


@dataclass
class Run:
    case: Case
    command: str
    reply: dict[str, Any]
    out: Path
    err: Path
    log: Path
    problems: list[str] = field(default_factory=list)
    escapes: list[str] = field(default_factory=list)


def argv(config: Path, case: Case, command: str, work: Path, sockdir: Path, n: int) -> list[str]:
    vm = ["--vm", case.name]
    extra = {
        "list": ["--json"],
        "status": ["--json"],
        "verify": ["--all"],
        "restore": ["--disk", "vda", "--output", str(work / f"{case.name}.raw")],
        "serve": ["--socket", str(sockdir / f"{n}.sock")],
        "prune": [],
    }[command]
    return ["-c", str(config), command, *vm, *extra]


def drive(jobs: list[tuple[Case, str, list[str], Path]], log: Path) -> list[Run]:
    """Run ``jobs`` one after the other in one traced runner."""
    runner = subprocess.Popen(
        [*audit.strace_command(log), sys.executable, "-m", "integration.harness.forkcli"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert runner.stdin is not None and runner.stdout is not None
    runs = []
    try:
        for case, command, args, out in jobs:
            request = {
                "argv": args,
                "out": str(out.with_suffix(".out")),
                "err": str(out.with_suffix(".err")),
                "timeout": 30,
                "serve": command == "serve",
            }
            runner.stdin.write(json.dumps(request) + "\n")
            runner.stdin.flush()
            reply = json.loads(runner.stdout.readline())
            runs.append(
                Run(case, command, reply, out.with_suffix(".out"), out.with_suffix(".err"), log)
            )
    finally:
        runner.stdin.close()
        runner.wait(60)
    return runs


def judge(
    run: Run, trace: audit.Trace, outside: Path, vm_dir: Path, points: dict[str, bytes]
) -> None:
    """Fill ``run.problems`` (not 'works or one clean refusal') and ``run.escapes``."""
    reply, command, case = run.reply, run.command, run.case
    err = run.err.read_text(errors="replace") if run.err.exists() else ""
    code = reply["code"]
    worked = code == 0 and (command != "serve" or reply["served"])
    if reply["hung"]:
        run.problems.append("hung (killed after 30 s)")
    elif code not in DOCUMENTED:
        run.problems.append(f"exit code {code}")
    if "Traceback" in err or "internal error" in err:
        run.problems.append("traceback or internal error")
    if command in case.refuse and worked:
        run.problems.append("accepted what it must refuse")
    if command not in case.refuse and not worked and not reply["hung"]:
        run.problems.append(f"refused a sound request (exit {code})")
    if code not in (0, 4, None) and len([x for x in err.splitlines() if " ERROR " in x]) != 1:
        run.problems.append("a refusal that is not one error line")
    if command == "restore" and worked:
        restored = (run.out.parent / f"{case.name}.raw").read_bytes()
        if CANARY[:4096] in restored:
            run.escapes.append("restored the canary's bytes")
        elif case.point is None or restored != points[case.point]:
            run.problems.append("restored bytes differ from the backup")
    if command == "list" and worked:
        rows = json.loads(run.out.read_text())
        damaged = [r["id"] for r in rows if str(r["status"]).startswith("damaged")]
        if case.group == "crafted manifests" and damaged != list(case.damaged):
            run.problems.append(f"list shows damaged {damaged}, not {list(case.damaged)}")
    tainted = {os.path.realpath(vm_dir / t) for t in case.tainted}
    for pid, program, path in trace.opens(reply["pid"]):
        if Path(path).is_relative_to(outside):
            run.escapes.append(f"{program} (pid {pid}) opened {path}")
        elif program.startswith("qemu") and path in tainted:
            run.escapes.append(f"{program} (pid {pid}) opened the crafted {path}")


def build(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, bytes], list[Case]]:
    pristine = tmp_path / "pristine" / "guest"
    points = base_chain(pristine)
    outside = tmp_path / "outside"
    make_outside(outside, pristine)
    repo = tmp_path / "repo"
    found = cases()
    for case in found:
        copy_chain(pristine, repo / case.name)
        case.damage(repo / case.name, outside)
    config = tmp_path / "backupd.yaml"
    vms = {c.name: {"qmp": str(tmp_path / "no-qemu.qmp"), "keep_last": 1} for c in found}
    config.write_text(yaml.safe_dump({"repository": str(repo), "vms": vms}))
    return repo, outside, config, points, found


@pytest.mark.timeout(240)
def test_hostile_repository(tmp_path: Path, sockdir: Path) -> None:
    started = time.monotonic()
    repo, outside, config, points, found = build(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    jobs: list[list[tuple[Case, str, list[str], Path]]] = [[] for _ in range(RUNNERS)]
    for n, case in enumerate(found):
        for command in COMMANDS:
            args = argv(config, case, command, work, sockdir, n)
            jobs[n % RUNNERS].append((case, command, args, work / f"{case.name}-{command}"))
    with ThreadPoolExecutor(RUNNERS) as pool:
        batches = pool.map(drive, jobs, [tmp_path / f"strace-{i}.log" for i in range(RUNNERS)])
        runs = [run for batch in batches for run in batch]
    traces = {log: audit.parse(log) for log in {run.log for run in runs}}
    for run in runs:
        judge(run, traces[run.log], outside, repo / run.case.name, points)
    for run in runs:  # a refused prune leaves no merge half begun
        journal = repo / run.case.name / ".merge.json"
        if run.command == "prune" and journal.exists():
            run.problems.append("left a merge journal (every later command would wait on it)")
    for run in runs:  # a case's own canary (its symlinks point there)
        own = outside / f"{run.case.name}.canary"
        if own.exists() and own.read_bytes() != CANARY and run.command == "prune":
            run.escapes.append(f"{own.name} outside the repository was written")
    if canary(outside).read_bytes() != CANARY:
        runs[0].escapes.append("the canary outside the repository was written")
    report(runs, time.monotonic() - started)
    bad = [
        f"{r.case.name} {r.command}: {r.problems + r.escapes}"
        for r in runs
        if r.problems or r.escapes
    ]
    assert not bad, "\n".join(bad)


def report(runs: list[Run], seconds: float) -> None:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.case.group, []).append(run)
    for group, members in groups.items():
        for run in members:
            record(
                f"hostile repository: {group}",
                failed=bool(run.problems),
                escapes=len(run.escapes),
            )
    failures = sum(bool(r.problems) for r in runs)
    escapes = sum(len(r.escapes) for r in runs)
    took: Counter[str] = Counter()
    for r in runs:
        took[r.command] += r.reply["seconds"]
    print("seconds per command:", {k: round(v, 1) for k, v in took.items()})
    outcome = Counter(
        "hang" if r.reply["hung"] else "works" if r.reply["code"] == 0 else "refused" for r in runs
    )
    cases_seen = len({r.case.name for r in runs})
    print(
        f"hostile repository: {cases_seen} cases, {len(runs)} commands in {seconds:.1f}s: "
        f"{outcome['works']} worked, {outcome['refused']} refused, {outcome['hang']} hung, "
        f"{failures} failures, {escapes} escapes"
    )


def test_verify_says_ok_but_depends_on_damaged(tmp_path: Path) -> None:
    """A backup whose own files are sound but whose parent's stored data is damaged is
    not simply 'ok': verify says which damaged backup it depends on (exit 4)."""
    repo = tmp_path / "repo"
    base_chain(repo / VM)
    record = json.loads((repo / VM / FULL / "manifest.json").read_text())["disks"]["vda"]
    host = first_run(record).host_offset
    with open(repo / VM / FULL / "vda.qcow2", "r+b") as f:
        f.seek(host + 100)
        byte = f.read(1)
        f.seek(host + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    config = tmp_path / "backupd.yaml"
    config.write_text(yaml.safe_dump({"repository": str(repo), "vms": {VM: {"qmp": "/q"}}}))
    result = backupd(config, "verify", "--vm", VM, "--all")
    assert result.returncode == 4, result.stderr
    assert f"{VM}/{FULL}: DAMAGED" in result.stderr
    assert f"{VM}/{INCREMENTAL}: ok (" in result.stderr
    assert f"but depends on damaged {FULL}" in result.stderr
    result = backupd(config, "verify", "--vm", VM)  # the latest and what it needs
    assert result.returncode == 4 and f"but depends on damaged {FULL}" in result.stderr


async def test_run_continues_after_a_damaged_newest_manifest(
    vm: QemuVM, config_for: Callable[..., Path], tmp_path: Path
) -> None:
    """A corrupt newest manifest does not stop every later run: the run names the
    damaged backup, continues from the newest good one (here: a new full, since the
    damaged backup's bitmap replaced the good one's), and the new backup is exact."""
    config = config_for(vm)
    await vm.write("vda", 0, 2 * MiB, 0x31)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    await vm.write("vda", 4 * MiB, MiB, 0x32)
    assert backupd(config, "run", "--vm", "guest1").returncode == 0
    repo = tmp_path / "repo" / "guest1"
    first, newest = sorted(p.name for p in repo.iterdir() if p.name[0].isdigit())
    (repo / newest / "manifest.json").write_text('{"format": 1, "kind": [')
    await vm.write("vda", 8 * MiB, MiB, 0x33)
    result = backupd(config, "run", "--vm", "guest1")
    assert result.returncode == 0, result.stderr
    assert f"backup {newest} is damaged, not continued from" in result.stderr
    assert "corrupt manifest" in result.stderr
    latest = sorted(p.name for p in repo.iterdir() if p.name[0].isdigit())[-1]
    assert latest not in (first, newest)
    restored = read_image(repo / latest / "vda.qcow2", tmp_path)
    assert restored == vm.snapshot()["vda"]
    again = backupd(config, "run", "--vm", "guest1")  # and the next run is incremental
    assert again.returncode == 0 and "kind=incremental" in again.stderr
