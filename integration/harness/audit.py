"""What processes opened, from an ``strace -f -y`` log: the process tree (fork, vfork,
clone, clone3), the program each process runs (execve), and every file it opened
successfully, by the path the kernel resolved (``-y``), symlinks followed."""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SYSCALLS = "open,openat,openat2,execve,fork,vfork,clone,clone3"

_LINE = re.compile(r"^(\d+) +(?:<\.\.\. )?(\w+)(?: resumed>|\()(.*)$")
_RESULT_FD = re.compile(r"= (\d+)<(.*)>$")
_RESULT_PID = re.compile(r"= (\d+)$")
_EXEC = re.compile(r'^"((?:[^"\\]|\\.)*)"')


def strace_command(log: Path) -> list[str]:
    return ["strace", "-f", "-y", "-qq", "--seccomp-bpf", "-e", f"trace={SYSCALLS}", "-o", str(log)]


@dataclass
class Trace:
    children: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    parents: dict[int, int] = field(default_factory=dict)
    programs: dict[int, str] = field(default_factory=dict)
    opened: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))

    def program(self, pid: int) -> str:
        """What ``pid`` runs: its own execve, else its parent's (threads, forks)."""
        while pid not in self.programs and pid in self.parents:
            pid = self.parents[pid]
        return self.programs.get(pid, "?")

    def tree(self, pid: int) -> list[int]:
        """``pid`` and all its descendants."""
        found, todo = [], [pid]
        while todo:
            current = todo.pop()
            found.append(current)
            todo.extend(self.children.get(current, []))
        return found

    def opens(self, pid: int) -> list[tuple[int, str, str]]:
        """(pid, program, path) of every file opened by ``pid`` or a descendant."""
        return [
            (p, self.program(p), path) for p in self.tree(pid) for path in self.opened.get(p, [])
        ]

    def programs_run(self, pid: int) -> list[str]:
        """The programs ``pid`` and its descendants executed."""
        return [self.programs[p] for p in self.tree(pid) if p in self.programs]


def _unescape(text: str) -> str:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def parse(log: Path) -> Trace:
    trace = Trace()
    for line in log.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        pid, call, rest = int(match[1]), match[2], match[3]
        if call in ("fork", "vfork", "clone", "clone3"):
            child = _RESULT_PID.search(rest)
            if child is not None:
                trace.children[pid].append(int(child[1]))
                trace.parents[int(child[1])] = pid
        elif call == "execve":
            program = _EXEC.match(rest)
            if program is not None and rest.endswith("= 0"):
                trace.programs[pid] = Path(_unescape(program[1])).name
        elif call.startswith("open"):
            opened = _RESULT_FD.search(rest)
            if opened is not None:
                trace.opened[pid].append(_unescape(opened[2]))
    return trace


def available() -> bool:
    try:
        subprocess.run(["strace", "-V"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True
