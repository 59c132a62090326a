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
     │    ├── ImageLockedError       an image is open in a running qemu (offline run)
     │    └── QemuTooOldError
     ├── RepositoryError                 repository unreadable/unwritable, bad manifest
     │    ├── ChainError                 a backing chain is broken or unsafe
     │    └── StorageError               object storage (S3) failed a request
     │         ├── StorageUnreachable    endpoint down, network cut, TLS failed (after retries)
     │         ├── StorageAuthError      no credentials, or the server refused them
     │         ├── StorageAccessDenied   the credentials lack a permission
     │         ├── BucketNotFound
     │         ├── ObjectNotFound        no such key (or no such multipart upload)
     │         ├── StorageQuotaError     entity too large, quota exceeded, storage full
     │         ├── PreconditionFailed    a conditional write lost (the object exists)
     │         └── StorageUnsupported    the server does not implement the request
     ├── NotFoundError                   unknown VM, backup id or disk
     └── BackupFailed                    a run failed; nothing was committed
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
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


class EncryptionKeyError(BackupdError):
    """The encryption key cannot be used: its file is missing, unsafe (mode, owner) or
    not a passphrase qemu takes, or it opens no key slot of a backup.  Nothing was
    written."""

    exit_code = ExitCode.USAGE


class BusyError(BackupdError):
    exit_code = ExitCode.BUSY


class VerifyError(BackupdError):
    exit_code = ExitCode.DAMAGED


class QemuError(BackupdError):
    """Talking to qemu failed; the message names the VM and what qemu said."""


class QemuConnectError(QemuError):
    """The QMP socket is missing, not a socket, not permitted, or not qemu.

    ``unreachable`` says why nothing listens there ("does not exist", "refuses
    connections"), which is what a VM whose qemu is not running looks like; "" when
    something does but the connection failed otherwise."""

    def __init__(self, message: str, *, unreachable: str = "") -> None:
        super().__init__(message)
        self.unreachable = unreachable


class QemuCommandError(QemuError):
    """qemu answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"qemu refused {command}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class ImageLockedError(QemuError):
    """Another process (a running qemu) has an image open that backupd wanted to open."""


class QemuTooOldError(QemuError):
    """qemu lacks a feature backupd needs; the message names it and the version that has it."""


class RepositoryError(BackupdError):
    """The repository cannot be read or written, or holds something malformed."""


class ChainError(RepositoryError):
    """A backup's backing chain is broken, missing, or points outside the repository."""


class StorageError(RepositoryError):
    """An object storage request failed; the message names the endpoint or object, the
    server's error code and what to check.  ``code`` is the S3 error code (or the HTTP
    status, or the client's error name), ``status`` the HTTP status when there was one.
    No message ever carries a secret."""

    def __init__(self, message: str, *, code: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class StorageUnreachable(StorageError):
    """No answer from the endpoint (refused, reset, timed out, TLS failed), retries spent."""


class StorageAuthError(StorageError):
    """No credentials were found, or the server does not accept them."""


class StorageAccessDenied(StorageError):
    """The server knows the credentials but they lack a permission."""


class BucketNotFound(StorageError):
    pass


class ObjectNotFound(StorageError):
    pass


class StorageQuotaError(StorageError):
    """The object is too large, a quota is exceeded or the storage is full."""


class PreconditionFailed(StorageError):
    """A conditional write did not happen: its condition (e.g. "absent") was false."""


class StorageUnsupported(StorageError):
    """The server does not implement the request (HTTP 501)."""


class NotFoundError(BackupdError):
    """An unknown VM, backup id or disk was named."""


class BackupFailed(BackupdError):
    """A backup run failed before commit; nothing was committed and no change is lost."""


def os_error_text(exc: OSError) -> str:
    """``No space left on device: /path`` (the path when the error names one)."""
    return f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"


def one_line(exc: Exception) -> tuple[int, str]:
    """The exit code and the one line a user sees for an error that ended a command:
    the one place where errors become what the CLI reports (a bug is an "internal
    error", with its details left to the debug log)."""
    if isinstance(exc, BackupdError):
        return exc.exit_code, str(exc)
    if isinstance(exc, OSError):
        return ExitCode.FAILED, os_error_text(exc)
    return ExitCode.FAILED, f"internal error: {type(exc).__name__}: {exc}"
