"""The house rules: packages import only downward, teachers only from teachers/ and defs/, a teacher-free
runtime. The contracts live in pyproject.toml ([tool.importlinter]); this test runs them."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        exe = shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency (pip install -e '.[dev]')"
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_a_broken_rule_is_caught(tmp_path):
    """The contract is not vacuous: an upward import from core/ to runtime/ breaks it."""
    pkg = tmp_path / "nexus_assets"
    shutil.copytree(ROOT / "nexus_assets", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "core" / "upward.py").write_text("from nexus_assets.runtime import Bundle\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "nexus_assets.core.upward -> nexus_assets.runtime" in r.stdout
