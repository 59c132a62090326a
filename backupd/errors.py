"""The errors backupd reports to its user, grouped by what the user can do about them.

Every error carries the process exit code the CLI uses for it, so a cron job or a
systemd unit can tell "fix the config" from "try again later" from "the backup failed".

::

    BackupdError                 exit 1 unless said otherwise
     ├── UsageError              exit 2  bad command line
     ├── ConfigError             exit 2  bad YAML, unknown key, wrong type
     ├── BusyError               exit 3  another run holds the VM's lock
     ├── VerifyError             exit 4  verify found damage in the repository
     ├── QemuError                       QMP unreachable, qemu refused a command, too old
     │    ├── QemuConnectError
     │    ├── QemuCommandError
     │    └── QemuTooOldError
     ├── RepositoryError                 repository unreadable/unwritable, bad manifest
     │    └── ChainError                 a backing chain is broken or unsafe
     ├── NotFoundError                   unknown VM, backup id or disk
     └── BackupFailed                    a run failed; nothing was committed
"""

from __future__ import annotations


class ExitCode:
    """Process exit codes of the ``backupd`` command (documented in the README)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    BUSY = 3
    DAMAGED = 4
    INTERRUPTED = 130  # 128 + SIGINT
    TERMINATED = 143  # 128 + SIGTERM


class BackupdError(Exception):
    """Base of every error backupd shows to its user as one line."""

    exit_code: int = ExitCode.FAILED


class UsageError(BackupdError):
    exit_code = ExitCode.USAGE


class ConfigError(BackupdError):
    exit_code = ExitCode.USAGE


class BusyError(BackupdError):
    exit_code = ExitCode.BUSY


class VerifyError(BackupdError):
    exit_code = ExitCode.DAMAGED


class QemuError(BackupdError):
    """Talking to qemu failed; the message names the VM and what qemu said."""


class QemuConnectError(QemuError):
    """The QMP socket is missing, not a socket, not permitted, or not qemu."""


class QemuCommandError(QemuError):
    """qemu answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"qemu refused {command}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class QemuTooOldError(QemuError):
    """qemu lacks a feature backupd needs; the message names it and the version that has it."""


class RepositoryError(BackupdError):
    """The repository cannot be read or written, or holds something malformed."""


class ChainError(RepositoryError):
    """A backup's backing chain is broken, missing, or points outside the repository."""


class NotFoundError(BackupdError):
    """An unknown VM, backup id or disk was named."""


class BackupFailed(BackupdError):
    """A backup run failed before commit; nothing was committed and no change is lost."""
