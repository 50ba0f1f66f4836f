"""Build a deployable bundle: quantized towers + adapters + router + tokenizers/classes + manifest.json.

The gate is here, not only in Dagster: `build_bundle` refuses (ContractError listing every failing
contract) when a tier-1 contract failed on the fp32 towers, or fails again on the quantized bundle,
unless `override=True`, in which case the manifest says `verified: false` and lists the failures.
Retention after quantization is re-measured by `validate_tower` on the bundle itself, loaded through
the runtime, so the numbers in the manifest are those of the files users download.

Everything is written into a temporary sibling folder and swapped in at the end (atomic_dir): a failed
gate or a crash leaves the previous bundle untouched.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from nexus_assets.core.atomic import atomic_dir, sha256_file
from nexus_assets.core.contracts import ContractError, RetentionContracts, evaluate
from nexus_assets.student.quantize import SCHEMES, default_scheme, quantize_file
from nexus_assets.student.tower import weight_files

__all__ = ["build_bundle", "gate_reports", "failures_message", "BUNDLE_FORMAT", "package_versions"]

BUNDLE_FORMAT = "1"
# a carved text tower keeps its backbone as a stock transformers folder (student.tower.weight_files): in the
# bundle it is quantized like the rest (the runtime reads it through the same dequantizing reader); the fp32
# stock folder that `AutoModelForCausalLM.from_pretrained` loads stays in the tower_adapter artifact


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in ("nexus-assets", "torch", "numpy", "safetensors", "tokenizers", "peft", "bitsandbytes"):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def gate_reports(reports: Mapping[str, dict], contracts: RetentionContracts,
                 capabilities: Mapping[str, list[str]] | None = None) -> list[dict]:
    """Blocking failures of validation reports {tower: report}; a capability with no report fails."""
    failures = []
    for tower, r in reports.items():
        failures += [dict(f, tower=tower) for f in evaluate(r, contracts) if not f["passed"] and f["blocking"]]
    for tower, caps in (capabilities or {}).items():
        measured = set(reports.get(tower, {}).get("capabilities", {}))
        failures += [{"tower": tower, "capability": c, "passed": False, "blocking": True, "retention": None,
                      "min_retention": contracts.contract(c).min_retention, "reason": "not validated"}
                     for c in caps if c not in measured]
    return failures


def failures_message(failures: list[dict], stage: str) -> str:
    lines = [f"{len(failures)} retention contract(s) failed {stage}:"]
    for f in failures:
        lines.append(f"  - {f['capability']} ({f.get('tower', '?')} tower): {f['reason']}")
    lines.append("Fix the student, or set override_failed_contracts: true to ship it marked verified=false.")
    return "\n".join(lines)


def _copy_tower(src: Path, dst: Path, scheme: str) -> dict:
    from nexus_assets.student.tower import strip_for_runtime

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
    strip_for_runtime(dst)  # the anchor projections only ever fed a training loss
    out = {}
    for name in weight_files(src):
        out[name] = quantize_file(dst / name, dst / name, scheme)  # the runtime copy, in place
    return out


def _file_table(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _retention_table(reports: Mapping[str, dict]) -> dict[str, dict]:
    out = {}
    for r in reports.values():
        for cap, c in r["capabilities"].items():
            out[cap] = {"passed": c.get("passed"),
                        "splits": {s: {"retention": v.get("retention"), "ci95": v.get("ci95"), "n": v.get("n")}
                                   for s, v in c["splits"].items()}}
    return out


def _write_towers(tower_dirs: Mapping[str, Any], tmp: Path, scheme: str, caps: Mapping[str, list]) -> dict:
    """Each tower copied (quantized per `scheme`) under tmp/towers/, with its manifest entry."""
    towers = {}
    for tower, d in tower_dirs.items():
        d = Path(d)
        stats = _copy_tower(d, tmp / "towers" / tower, scheme)
        cfg = json.loads((tmp / "towers" / tower / "config.json").read_text())
        towers[tower] = {"path": f"towers/{tower}", "modality": cfg["tower"]["modality"],
                         "capabilities": caps[tower], "parameters": cfg.get("num_parameters"),
                         "bytes_fp32": sum(p.stat().st_size for p in d.rglob("*") if p.is_file()),
                         "bytes": sum(p.stat().st_size for p in (tmp / "towers" / tower).rglob("*") if p.is_file()),
                         "quantization": scheme, "files_quantized": stats}
    return towers


def _remeasure(tmp: Path, scheme: str, caps: Mapping[str, list], contracts: RetentionContracts, teacher_entries,
               probe_tables, validate_kw: dict, log) -> tuple[dict, list]:
    """Retention re-measured on the (quantized) bundle itself through the runtime, and the contracts it fails;
    unmeasured (every capability failing) without teacher features and probe rows."""
    from .validation import validate_tower

    if teacher_entries is None or probe_tables is None:
        return {}, [{"tower": t, "capability": c, "reason": "quantized retention not measured (no teacher features "
                     "or probe rows given)", "blocking": True, "passed": False} for t in caps for c in caps[t]]
    from nexus_assets.runtime.bundle import Bundle

    bundle = Bundle.load(tmp)
    reports = {}
    for tower in caps:
        log(f"re-measuring retention of the {scheme} {tower} tower on the bundle")
        reports[tower] = validate_tower(bundle, tower, caps[tower], teacher_entries, probe_tables, contracts,
                                        out_dir=tmp / "reports" / tower, **validate_kw)
    return reports, gate_reports(reports, contracts, caps)


def _retention_summary(caps, contracts: RetentionContracts, before_reports, after_reports) -> dict:
    """capability -> its contract and retention before / after quantization, for the manifest."""
    b, a = _retention_table(before_reports), _retention_table(after_reports)
    out = {}
    for tower in caps:
        for cap in caps[tower]:
            c = contracts.contract(cap)
            out[cap] = {"tower": tower, "metric": c.metric, "min_retention": c.min_retention, "tier": c.tier,
                        "gate_split": c.gate_split, "before_quantization": b.get(cap), "after_quantization": a.get(cap)}
    return out


def build_bundle(
    tower_dirs: Mapping[str, str | os.PathLike],
    router_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quantization: str = "auto",
    reports: Mapping[str, dict],
    contracts: RetentionContracts,
    override: bool = False,
    teacher_entries: Mapping[str, str | os.PathLike] | None = None,
    probe_tables: Mapping[str, Any] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    max_rows: int | None = None,
    log=print,
) -> dict:
    """Write the bundle and return its manifest.

    Args:
        tower_dirs: tower name -> fp32 tower folder (tower_adapter "path").
        router_dir: the saved Router.
        out_dir: bundle folder (replaced atomically).
        quantization: "auto" (nf4 with CUDA, int8 on CPU), "int8", "nf4" or "none".
        reports: tower -> validate_tower report of the fp32 tower (validation_report).
        contracts: the retention contracts (copied into the manifest).
        override: ship even if blocking contracts fail; the manifest then says verified=false.
        teacher_entries, probe_tables: what validate_tower needs to re-measure retention on the bundle.
            Without them the quantized retention is unmeasured and the bundle cannot be verified.
        n_bootstrap, seed, max_rows: passed to validate_tower for the re-measure.

    Raises:
        ContractError: a blocking contract failed (before or after quantization) and override is False.
    """
    scheme = default_scheme() if quantization == "auto" else quantization
    if scheme not in SCHEMES:
        raise ValueError(f"quantization: {quantization!r} is not 'auto' or one of {SCHEMES}")
    t0 = time.perf_counter()
    caps = {}
    for tower, d in tower_dirs.items():
        cfg = json.loads((Path(d) / "config.json").read_text())["tower"]
        caps[tower] = sorted(cfg["capabilities"])
    before = gate_reports(reports, contracts, caps)
    if before and not override:
        raise ContractError(failures_message(before, "on the fp32 towers (validation_report)"))
    if before:
        log(failures_message(before, "on the fp32 towers") + "\n(override_failed_contracts: shipping unverified)")

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(router_dir, tmp / "router", ignore=shutil.ignore_patterns(".*"))
        manifest: dict[str, Any] = {
            "format_version": BUNDLE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": package_versions(),
            "quantization": {"scheme": scheme, "load": "dequantize to fp32 (int8_compute='dynamic' optional, per tower where it keeps the outputs)",
                             "requested": quantization},
            "router": {"path": "router"}, "towers": _write_towers(tower_dirs, tmp, scheme, caps),
            "contracts": contracts.to_json(), "verified": False, "files": _file_table(tmp)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))  # provisional: lets Bundle.load verify
        after_reports, after = _remeasure(tmp, scheme, caps, contracts, teacher_entries, probe_tables,
                                          dict(n_bootstrap=n_bootstrap, seed=seed, max_rows=max_rows), log)
        if after and not override:
            raise ContractError(failures_message(after, f"after {scheme} quantization (re-measured on the bundle)"))
        manifest.update({
            "retention": _retention_summary(caps, contracts, reports, after_reports),
            "failed_contracts": {"before_quantization": before, "after_quantization": after},
            "override_failed_contracts": bool(override and (before or after)),
            "verified": not before and not after,
            "build_seconds": round(time.perf_counter() - t0, 2),
        })
        manifest["files"] = _file_table(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
    return manifest
