"""The contract every teacher adapter meets, so feature caching is the same code for every family."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nexus_assets.core.registry import TeacherSpec

FAMILIES = {
    "causal_lm_gguf": "nexus_assets.teachers.causal_lm",
    "causal_lm": "nexus_assets.teachers.causal_lm",
    "sentence_encoder": "nexus_assets.teachers.sentence_encoder",
    "efficientnet_lite": "nexus_assets.teachers.efficientnet",
    "ge2e_speaker": "nexus_assets.teachers.ge2e",
    "whisper_ct2": "nexus_assets.teachers.whisper",
}


@dataclass
class TeacherOutputs:
    """What one forward over a batch of B probe rows produces.

    items:  per-item columns, each an array whose first dim is B (or a list of B strings), e.g.
            `embedding` (B, D), `logits` (B, C), `hidden.<layer>` (B, H) mean-pooled, `transcript` [B].
    tokens: per-token columns for sequence outputs (LM, ASR decoder), each with first dim N (all tokens
            of the batch); must hold `item_index` (N,) int in [0, B) and `position` (N,) int, and may hold
            `token_id` (N,), `topk_ids` (N, k), `topk_logits` (N, k), `logsumexp` (N,), `hidden.<layer>` (N, H).
    """

    items: dict[str, Any]
    tokens: dict[str, np.ndarray] | None = None


class Teacher(Protocol):
    spec: TeacherSpec

    def layer_names(self) -> list[str]:
        """Every layer name this teacher can cache (the registry's `extraction.layers` must be a subset)."""

    def forward(self, rows: list[dict]) -> TeacherOutputs:
        """Run the frozen teacher on probe rows (dicts with `text`, `image` PNG bytes or `wav` bytes)."""

    def num_parameters(self) -> int: ...

    def importance_spec(self, capability: str, rows: list[dict]) -> "ImportanceSpec":
        """What NIWT needs to score this teacher's neurons for one capability (see core/importance.py)."""


@dataclass
class ImportanceSpec:
    """model: the frozen teacher module; layers: layer name -> submodule whose output holds the neurons
    (the same activations `hidden.<layer>` caches); batches: inputs passed to `model`; objective: model
    output of one batch -> scalar, summed over samples, measuring the capability."""

    model: Any
    layers: dict[str, Any]
    batches: list[Any]
    objective: Any


class TeacherLoadError(RuntimeError):
    """A teacher's weights are missing or unreadable; the message names the teacher and the file."""


@dataclass
class ConvertResult:
    files: list[str] = field(default_factory=list)  # files written into the snapshot dir
    info: dict[str, Any] = field(default_factory=dict)


def family_module(spec: TeacherSpec):
    if spec.family not in FAMILIES:
        raise TeacherLoadError(
            f"teacher {spec.name!r}: family {spec.family!r} has no adapter; known: {sorted(FAMILIES)}"
        )
    return importlib.import_module(FAMILIES[spec.family])


def load_teacher(spec: TeacherSpec, snapshot_dir: Path, device: str = "cpu",
                 memory_budget_bytes: int | None = None, dtype: str | None = None) -> Teacher:
    """Load a teacher from its snapshot; families that can layer-stream get the memory budget. `dtype`
    (default: the registry's `extraction.dtype`, resolved on `device`) is what its weights compute in; a
    family that runs only float32 refuses anything else by name."""
    import inspect

    from nexus_assets.core.precision import resolve_dtype

    load = family_module(spec).load
    params = inspect.signature(load).parameters
    kwargs = {"memory_budget_bytes": memory_budget_bytes} if "memory_budget_bytes" in params else {}
    resolved = resolve_dtype(spec.extraction.dtype if dtype is None else dtype, device)
    if "dtype" in params:
        kwargs["dtype"] = resolved
    elif resolved != "float32":
        raise TeacherLoadError(f"teacher {spec.name!r}: extraction.dtype {resolved!r} is not supported by family "
                               f"{spec.family!r} (it runs float32 only)")
    teacher = load(spec, Path(snapshot_dir), device, **kwargs)
    unknown = [layer for layer in spec.extraction.layers if layer not in teacher.layer_names()]
    if unknown:
        raise TeacherLoadError(
            f"teacher {spec.name!r}: extraction.layers {unknown} not in its layers {teacher.layer_names()}"
        )
    return teacher


def pool_mean(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over time. hidden (B, T, H), mask (B, T) -> (B, H)."""
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
