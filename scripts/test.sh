#!/usr/bin/env bash
# The whole test suite: unit tests, fake-peer tests and the integration tests
# with real qemu, qemu-nbd, nbdkit and nbd-server.  Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m ruff check nbdclient backupd tests integration
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
