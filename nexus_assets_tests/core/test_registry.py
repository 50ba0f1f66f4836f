from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nexus_assets.core.registry import RegistryError, load_registry

DATASET = """
datasets:
  - name: text-probe
    modality: text
    sources: [pydoc_topics]
    sizes: {tiny: {items: 4}}
"""

TEACHER = """
teachers:
  - name: {name}
    modality: {modality}
    tower: text
    family: sentence_encoder
    capabilities: [text.embed]
    dataset: text-probe
    source: {source}
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


def teacher(name="t1", modality="text", source="{kind: path, path: /tmp}", extra=""):
    return TEACHER.format(name=name, modality=modality, source=source) + extra


def test_shipped_registry_has_the_five_default_teachers_and_disabled_real_targets():
    reg = load_registry()
    assert [t.name for t in reg.enabled_teachers()] == [
        "smollm2-135m", "minilm-l6", "efficientnet-lite0", "ge2e-speaker", "whisper-tiny-en"]
    disabled = {t.name: t for t in reg.teachers.values() if not t.enabled}
    assert {"kimi-k2.5", "glm-4-9b", "qwen3-tts", "step3-vl"} <= set(disabled)
    assert all(t.source.kind == "hf" for t in disabled.values())
    assert set(reg.towers()) == {"text", "vision", "audio"}


def test_valid_minimal_registry(tmp_path):
    write(tmp_path, "d.yaml", DATASET)
    write(tmp_path, "t.yaml", teacher())
    reg = load_registry(tmp_path)
    assert reg.teacher("t1").extraction.top_k == 32


@pytest.mark.parametrize(
    "body, expected",
    [
        (teacher(modality="smell"), ["t.yaml", "'t1'", "'modality'"]),
        (teacher(source="{kind: ftp, path: /x}"), ["t.yaml", "'t1'", "source"]),
        (teacher(extra="    extraction: {top_kk: 4}\n"), ["t.yaml", "'t1'", "extraction.top_kk", "misspelled"]),
        (teacher(extra="    extraction: {top_k: 0}\n"), ["t.yaml", "'t1'", "extraction.top_k"]),
        (teacher().replace("    tower: text\n", ""), ["t.yaml", "'t1'", "'tower'", "Field required"]),
        (teacher(extra="    extraction: {layers: [a], token_layers: [b]}\n"), ["'t1'", "token_layers"]),
        (teacher().replace("dataset: text-probe", "dataset: nope"), ["t.yaml", "'t1'", "'dataset'", "nope"]),
    ],
)
def test_bad_registry_names_file_entry_and_field(tmp_path, body, expected):
    write(tmp_path, "d.yaml", DATASET)
    write(tmp_path, "t.yaml", body)
    with pytest.raises(RegistryError) as err:
        load_registry(tmp_path)
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))


def test_duplicate_teacher_names_both_files(tmp_path):
    write(tmp_path, "d.yaml", DATASET)
    write(tmp_path, "a.yaml", teacher())
    write(tmp_path, "b.yaml", teacher())
    with pytest.raises(RegistryError, match=r"b\.yaml: teacher 't1': field 'name': duplicate, already defined in .*a\.yaml"):
        load_registry(tmp_path)


def test_modality_mismatch_between_teacher_and_dataset(tmp_path):
    write(tmp_path, "d.yaml", DATASET)
    write(tmp_path, "t.yaml", teacher(modality="vision"))
    with pytest.raises(RegistryError, match="dataset 'text-probe' is text, teacher is vision"):
        load_registry(tmp_path)


def test_bad_dataset_split_and_unknown_top_level_key(tmp_path):
    write(tmp_path, "d.yaml", DATASET.replace("sizes:", "split: {train: 0.9, val: 0.2, heldout: 0.1}\n    sizes:"))
    with pytest.raises(RegistryError, match=r"dataset 'text-probe': field 'split'.*sum to 1"):
        load_registry(tmp_path)
    write(tmp_path, "d.yaml", DATASET + "teachrs: []\n")
    with pytest.raises(RegistryError, match=r"d\.yaml: unknown top-level key\(s\) \['teachrs'\]"):
        load_registry(tmp_path)
