"""The ``backupd`` command line: global options, verb dispatch, exit codes, one-line errors.

Exit codes (also in ``backupd --help`` and the README):
0 success, 1 the backup or operation failed, 2 usage or configuration error,
3 busy (another run holds the VM's lock), 4 verify found damage, 130 interrupted
(SIGINT), 143 stopped (SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from backupd import __version__
from backupd.commands import VERBS, CommandContext
from backupd.errors import BackupdError, ExitCode, one_line

DEFAULT_CONFIG = Path("/etc/backupd/backupd.yaml")

EPILOG = """\
exit codes:
  0  success
  1  the backup or operation failed (nothing half-written is left looking complete)
  2  usage or configuration error
  3  busy: another backupd run holds the VM's lock
  4  verify found damage in the repository
  130 interrupted (SIGINT): a run cleans up first, nothing is committed
  143 stopped (SIGTERM): the same

examples:
  backupd -c /etc/backupd/backupd.yaml run --vm guest1
  backupd run --all
  backupd list --vm guest1
  backupd restore --vm guest1 --disk vda --output /var/tmp/vda.raw
"""

log = logging.getLogger("backupd")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``verb``'s module is imported and given its arguments (the
    others are listed with their help)."""
    parser = argparse.ArgumentParser(
        prog="backupd",
        description="Incremental, point-in-time-consistent backups of running qemu VMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"backupd {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"configuration file (default: $BACKUPD_CONFIG, then {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe messages to log (default: info)",
    )
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress output, warnings and errors only"
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name, text in VERBS.items():
        if name != verb:
            sub.add_parser(name, help=text, add_help=False)
            continue
        module: ModuleType = importlib.import_module(f"backupd.commands.{name}")
        verb_parser = sub.add_parser(
            name,
            help=text,
            description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(command=module)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Which verb first (without importing any), then its own arguments."""
    which, _ = build_parser().parse_known_args(argv)
    return build_parser(which.verb).parse_args(argv)


def config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return Path(args.config)
    env = os.environ.get("BACKUPD_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def _setup_logging(args: argparse.Namespace) -> None:
    from backupd import logs

    logs.setup(level=args.log_level, json=args.log_json, quiet=args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args)
    context = CommandContext(config_path=config_path(args), quiet=args.quiet)
    try:
        if not getattr(args.command, "HANDLES_SIGNALS", False):
            # blocked since start-up (backupd.__main__): from here they may interrupt
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        code: int = args.command.execute(args, context)
        return code
    except KeyboardInterrupt:
        print("backupd: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as err:
        code, text = one_line(err)
        if isinstance(err, (BackupdError, OSError)):
            log.error("%s", text)
        else:  # a bug: still one line for the user, details in the debug log
            log.debug("unexpected error", exc_info=True)
            print(f"backupd: {text} (run with --log-level debug for details)", file=sys.stderr)
        return code
    finally:
        from backupd.storage.repositories import close_repositories

        close_repositories()


if __name__ == "__main__":
    sys.exit(main())
