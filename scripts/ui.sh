#!/usr/bin/env bash
# Opens the Dagster UI on http://127.0.0.1:3000 over the same instance the pipeline records into.
set -euo pipefail
cd "$(dirname "$0")/.."
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/data/dagster_home}" HF_HUB_OFFLINE=1
mkdir -p "$DAGSTER_HOME"; [ -f "$DAGSTER_HOME/dagster.yaml" ] || cp dagster.yaml "$DAGSTER_HOME/"
exec .venv/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p "${PORT:-3000}"
