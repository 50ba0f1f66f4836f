"""Retention contracts: the shipped file validates, errors name file / capability / field, the gate judges."""
from __future__ import annotations

import textwrap

import pytest

from nexus_assets.core.contracts import ContractError, evaluate, load_contracts

GOOD = """
default_min_retention: 0.97
capabilities:
  text.embed:
    metric: retrieval_recall_at_1
    reference: ground_truth
    tier: 1
"""


def write(tmp_path, text):
    p = tmp_path / "retention_contracts.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_contracts_cover_every_default_capability():
    c = load_contracts()
    assert set(c.capabilities) == {"text.generate", "text.embed", "vision.classify", "audio.speaker_embed",
                                   "audio.transcribe"}
    for cap in c.capabilities.values():
        assert cap.min_retention >= 0.97  # never lowered to make a run pass
        assert cap.gate_split == "heldout" and "ood" in cap.report_splits


def test_default_min_retention_applies(tmp_path):
    c = load_contracts(write(tmp_path, GOOD))
    assert c.contract("text.embed").min_retention == 0.97
    with pytest.raises(ContractError, match="no contract for capability 'text.generate'"):
        c.contract("text.generate")


@pytest.mark.parametrize("patch,needle", [
    ("    tier: 4\n", r"capability 'text.embed': field 'tier'"),
    ("    min_retetion: 0.9\n", r"capability 'text.embed': field 'min_retetion': unknown field"),
    ("    min_retention: -1\n", r"capability 'text.embed': field 'min_retention'"),
    ("    gate_split: test\n", r"capability 'text.embed': field 'gate_split'"),
])
def test_errors_name_file_capability_field(tmp_path, patch, needle):
    text = GOOD.replace("    tier: 1\n", "") + patch if "tier" in patch else GOOD + patch
    p = write(tmp_path, text)
    with pytest.raises(ContractError, match=needle) as e:
        load_contracts(p)
    assert str(p) in str(e.value)


def test_metric_reference_mismatch(tmp_path):
    p = write(tmp_path, GOOD.replace("ground_truth", "teacher"))
    with pytest.raises(ContractError, match="field 'reference'"):
        load_contracts(p)


def test_bad_top_level(tmp_path):
    with pytest.raises(ContractError, match="unknown top-level"):
        load_contracts(write(tmp_path, GOOD + "extra: 1\n"))
    with pytest.raises(ContractError, match="'<tower>.<verb>'"):
        load_contracts(write(tmp_path, GOOD.replace("text.embed", "textembed")))


def test_evaluate_pass_fail_and_unmeasured(tmp_path):
    c = load_contracts(write(tmp_path, GOOD))
    ok = evaluate({"capabilities": {"text.embed": {"splits": {"heldout": {"retention": 0.98}}}}}, c)[0]
    assert ok["passed"] and ok["shortfall"] == 0.0
    bad = evaluate({"capabilities": {"text.embed": {"splits": {"heldout": {"retention": 0.90}}}}}, c)[0]
    assert not bad["passed"] and bad["shortfall"] == pytest.approx(0.07) and "short by 0.0700" in bad["reason"]
    none = evaluate({"capabilities": {"text.embed": {"splits": {"heldout": {"retention": None, "note": "no pairs"}}}}}, c)[0]
    assert not none["passed"] and "no pairs" in none["reason"]
