"""Retention contracts (`data/retention_contracts.yaml`): the share of its teacher each capability must keep.

The YAML is edited by hand, so every error names the file, the capability and the field. The metric
definitions live in the YAML's header and in `nexus_assets.core.metrics`; this module only validates
the contracts and judges a validation report against them (`evaluate`), which is what the blocking
asset checks and the bundle gate call.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .paths import data_dir

__all__ = ["ContractError", "CapabilityContract", "RetentionContracts", "load_contracts", "evaluate",
           "METRICS", "CONTRACTS_FILE"]

CONTRACTS_FILE = "retention_contracts.yaml"
Split = Literal["train", "val", "heldout", "ood"]
METRICS = {
    # metric -> what defines the right answer
    "next_token_accuracy": "ground_truth",
    "retrieval_recall_at_1": "ground_truth",
    "top1_agreement": "teacher",
    "one_minus_eer": "ground_truth",
    "one_minus_wer": "ground_truth",
}


class ContractError(ValueError):
    """A contracts file is malformed, or a report fails a blocking contract; the message says which."""


class CapabilityContract(BaseModel):
    """One capability's contract.

    Attributes:
        metric: the score retention is computed from (see the YAML header for definitions).
        reference: "ground_truth" (retention = student / teacher score against real labels) or "teacher"
            (the teacher defines the answer; retention = agreement with it).
        min_retention: the gate: retention on `gate_split` must be >= this.
        tier: 1 must keep (blocks the bundle), 2 should keep (warns), 3 informational.
        gate_split: split the gate reads.
        report_splits: splits measured and reported but never gated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Literal["next_token_accuracy", "retrieval_recall_at_1", "top1_agreement", "one_minus_eer",
                    "one_minus_wer"]
    reference: Literal["ground_truth", "teacher"]
    min_retention: float = Field(0.97, gt=0.0, le=1.5)
    tier: Literal[1, 2, 3]
    gate_split: Split = "heldout"
    report_splits: list[Split] = Field(default_factory=lambda: ["ood"])

    @property
    def blocking(self) -> bool:
        return self.tier == 1

    def splits(self) -> list[str]:
        return [self.gate_split] + [s for s in self.report_splits if s != self.gate_split]


class RetentionContracts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = ""
    default_min_retention: float = Field(0.97, gt=0.0, le=1.5)
    capabilities: dict[str, CapabilityContract]

    def contract(self, capability: str) -> CapabilityContract:
        if capability not in self.capabilities:
            raise ContractError(f"{self.file}: no contract for capability {capability!r}; "
                                f"contracts exist for {sorted(self.capabilities)}")
        return self.capabilities[capability]

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def _fmt(file: Path, cap: str, err: ValidationError) -> str:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = "unknown field (misspelled?)" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(f"{file}: capability {cap!r}: field {loc!r}: {msg}")
    return "\n".join(out)


def load_contracts(path: str | os.PathLike | None = None) -> RetentionContracts:
    """Read and validate the contracts file (default `data/retention_contracts.yaml`)."""
    file = Path(path) if path else data_dir() / CONTRACTS_FILE
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ContractError(f"{file}: contracts file not found") from None
    except yaml.YAMLError as e:
        raise ContractError(f"{file}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ContractError(f"{file}: top level must be a mapping with 'capabilities'")
    unknown = set(raw) - {"default_min_retention", "capabilities"}
    if unknown:
        raise ContractError(f"{file}: unknown top-level key(s) {sorted(unknown)}; "
                            "expected default_min_retention, capabilities")
    default = raw.get("default_min_retention", 0.97)
    if not isinstance(default, (int, float)) or not 0 < default <= 1.5:
        raise ContractError(f"{file}: field 'default_min_retention': must be a number in (0, 1.5], got {default!r}")
    caps = raw.get("capabilities")
    if not isinstance(caps, dict) or not caps:
        raise ContractError(f"{file}: 'capabilities' must be a non-empty mapping capability -> contract")
    out = {}
    for cap, entry in caps.items():
        tower, _, verb = str(cap).partition(".")
        if not tower or not verb:
            raise ContractError(f"{file}: capability {cap!r}: name must be '<tower>.<verb>'")
        if not isinstance(entry, dict):
            raise ContractError(f"{file}: capability {cap!r}: contract must be a mapping")
        try:
            c = CapabilityContract.model_validate({"min_retention": default, **entry})
        except ValidationError as e:
            raise ContractError(_fmt(file, cap, e)) from None
        if METRICS[c.metric] != c.reference:
            raise ContractError(f"{file}: capability {cap!r}: field 'reference': metric {c.metric!r} is judged "
                                f"against {METRICS[c.metric]!r}, not {c.reference!r}")
        out[cap] = c
    return RetentionContracts(file=str(file), default_min_retention=default, capabilities=out)


def evaluate(report: Mapping[str, Any], contracts: RetentionContracts) -> list[dict]:
    """Judge a `validate_tower` report: one entry per capability with passed, tier, retention, the
    shortfall (min_retention - retention) and a reason. A missing or undefined retention (no rows, a
    teacher score of 0) fails: an unmeasured capability is never a passing one.
    """
    out = []
    for cap, r in report["capabilities"].items():
        c = contracts.contract(cap)
        split = r.get("splits", {}).get(c.gate_split)
        retention = None if split is None else split.get("retention")
        if split is None:
            reason = f"split {c.gate_split!r} was not measured"
        elif retention is None:
            reason = f"retention undefined on {c.gate_split!r}: {split.get('note', 'no rows')}"
        elif retention < c.min_retention:
            reason = (f"retention {retention:.4f} < {c.min_retention} on {c.gate_split!r} "
                      f"(short by {c.min_retention - retention:.4f})")
        else:
            reason = f"retention {retention:.4f} >= {c.min_retention} on {c.gate_split!r}"
        passed = retention is not None and retention >= c.min_retention
        out.append({"capability": cap, "passed": passed, "tier": c.tier, "blocking": c.blocking,
                    "metric": c.metric, "split": c.gate_split, "retention": retention,
                    "min_retention": c.min_retention,
                    "shortfall": None if retention is None else max(0.0, c.min_retention - retention),
                    "reason": reason})
    return out
