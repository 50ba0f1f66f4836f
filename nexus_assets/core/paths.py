"""Where artifacts live on disk. One root (NEXUS_HOME, default data/artifacts) so tests can redirect it."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The checked-in config folder (registry, contracts)."""
    return Path(os.environ.get("NEXUS_DATA_DIR", REPO_ROOT / "data"))


def artifacts_root() -> Path:
    """The git-ignored root under which every materialized artifact is written."""
    return Path(os.environ.get("NEXUS_HOME", data_dir() / "artifacts"))


def artifact_dir(family: str, partition: str) -> Path:
    """`<root>/<family>/<partition>`: one folder per asset partition, so lineage is readable on disk too."""
    return artifacts_root() / family / partition
