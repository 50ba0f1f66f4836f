"""Shared fixtures: every test writes artifacts under a temp NEXUS_HOME, never under data/."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_artifacts(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path_factory.mktemp("nexus_home")))
