"""Issue 13: registry names become folders under NEXUS_HOME and `locate` names code to call, so both are
held to patterns: no tower `../../../tmp/x`, no `locate: os:system`."""
from __future__ import annotations

import pytest

from nexus_assets.core.paths import artifact_dir, check_name
from nexus_assets.core.registry import RegistryError, load_registry
from nexus_assets_tests.core.test_registry import DATASET, teacher, write


@pytest.mark.parametrize("tower", ["../../../tmp/x", "/abs", "..", "Text", "a/b", ".hidden", ""])
def test_tower_name_pattern(tmp_path, tower):
    write(tmp_path, "a.yaml", DATASET + teacher().replace("tower: text", f"tower: '{tower}'"))
    with pytest.raises(RegistryError, match="field 'tower'"):
        load_registry(tmp_path)


@pytest.mark.parametrize("locate", ["os:system", "subprocess:run", "builtins:eval", "pkg:_private",
                                    "pkg:__init__", "pkgx:f", "pkg.sub:f; rm -rf /", "pkg:"])
def test_locate_restricted_to_its_package(tmp_path, locate):
    src = f"{{kind: package, package: pkg, locate: '{locate}'}}"
    write(tmp_path, "a.yaml", DATASET + teacher(source=src))
    with pytest.raises(RegistryError, match="source.package.locate|locate"):
        load_registry(tmp_path)


@pytest.mark.parametrize("locate", ["pkg:get_model_path", "pkg.sub:Cls.get_path", "nexus_assets.teachers.x:f"])
def test_locate_allowed(tmp_path, locate):
    src = f"{{kind: package, package: pkg, locate: '{locate}'}}"
    write(tmp_path, "a.yaml", DATASET + teacher(source=src))
    assert load_registry(tmp_path).teacher("t1").source.locate == locate


def test_shipped_registry_still_loads():
    reg = load_registry()
    assert set(reg.towers()) == {"text", "vision", "audio"}


def test_artifact_dir_stays_under_root(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path / "home"))
    assert artifact_dir("tower_adapter", "text") == tmp_path / "home" / "tower_adapter" / "text"
    for fam, part in (("tower_adapter", "../../x"), ("..", "text"), ("tower_adapter", "/etc"), ("a/b", "c")):
        with pytest.raises(ValueError, match="not a valid name"):
            artifact_dir(fam, part)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "evil").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        artifact_dir("evil", "x")
    assert check_name("smollm2-135m") == "smollm2-135m"
