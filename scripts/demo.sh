#!/usr/bin/env bash
# Quick start, part one: install what is missing, then back up a demo VM (full and
# incremental) and restore both points through the served backup image.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m integration.demo
