"""Where artifacts live on disk. One root (NEXUS_HOME, default data/artifacts) so tests can redirect it."""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Names that become one folder level on disk (teachers, datasets, towers, artifact families / partitions):
# lowercase, no separator, and not starting with a dot, so `..` and `../../tmp/x` can never match.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
_NAME = re.compile(NAME_PATTERN)


def data_dir() -> Path:
    """The checked-in config folder (registry, contracts)."""
    return Path(os.environ.get("NEXUS_DATA_DIR", REPO_ROOT / "data"))


def artifacts_root() -> Path:
    """The git-ignored root under which every materialized artifact is written."""
    return Path(os.environ.get("NEXUS_HOME", data_dir() / "artifacts"))


def check_name(name: object, what: str = "name") -> str:
    """`name` as one safe folder level (NAME_PATTERN), else ValueError naming it: a registry entry
    `tower: ../../../tmp/x` used to write artifacts outside NEXUS_HOME."""
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 200:
        raise ValueError(f"{what} {name!r} is not a valid name (lowercase letters, digits, '.', '_', '-'; "
                         "starting with a letter or digit)")
    return name


def artifact_dir(family: str, partition: str) -> Path:
    """`<root>/<family>/<partition>`: one folder per asset partition, so lineage is readable on disk too.
    Both parts are single safe names, so the folder is always inside the root."""
    root = artifacts_root()
    out = root / check_name(family, "artifact family") / check_name(partition, "artifact partition")
    if not out.resolve().is_relative_to(root.resolve()):  # a symlinked family folder pointing elsewhere
        raise ValueError(f"artifact folder {out} resolves outside {root}")
    return out
