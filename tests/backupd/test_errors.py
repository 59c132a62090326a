from backupd.errors import (
    BusyError,
    ConfigError,
    ExitCode,
    QemuCommandError,
    UsageError,
    VerifyError,
)


def test_exit_codes_are_distinct() -> None:
    codes = {ExitCode.OK, ExitCode.FAILED, ExitCode.USAGE, ExitCode.BUSY, ExitCode.DAMAGED}
    assert len(codes) == 5
    assert ConfigError.exit_code == UsageError.exit_code == ExitCode.USAGE
    assert BusyError.exit_code == ExitCode.BUSY
    assert VerifyError.exit_code == ExitCode.DAMAGED


def test_qemu_command_error_message() -> None:
    err = QemuCommandError("block-dirty-bitmap-add", "GenericError", "Bitmap already exists: x")
    assert str(err) == "qemu refused block-dirty-bitmap-add: Bitmap already exists: x"
