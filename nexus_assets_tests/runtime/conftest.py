"""One tiny world + bundle per test session (building them takes a few seconds)."""
from __future__ import annotations

import pytest

from nexus_assets_tests.runtime.tiny import build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def bundle_dir(world, tmp_path_factory):
    """An int8 bundle of the tiny towers, built with override (random towers fail every contract)."""
    from nexus_assets.release.bundle import build_bundle
    from nexus_assets.core.contracts import load_contracts
    from nexus_assets.release.validation import validate_tower

    c = load_contracts()
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    reports = {t: validate_tower(d, t, sorted(world["cfgs"][t].capabilities), world["teacher_entries"],
                                 world["probe_tables"], c, n_bootstrap=50)
               for t, d in world["tower_dirs"].items()}
    build_bundle(world["tower_dirs"], world["router_dir"], out, quantization="int8", reports=reports, contracts=c,
                 override=True, teacher_entries=world["teacher_entries"], probe_tables=world["probe_tables"],
                 n_bootstrap=50, log=lambda *_: None)
    return out
