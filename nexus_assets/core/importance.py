"""Neuron importance of a teacher layer toward a capability (NIWT-style), and the protected set.

Which variant, and why. NIWT (Selvaraju et al., ECCV 2018, "Choose your neuron: incorporating domain
knowledge through neuron importance") scores neuron j of a layer for a class by the gradient of the
class score w.r.t. the neuron's activation, averaged over spatial positions (the Grad-CAM weight
alpha_j). We keep its core idea, gradient of a scalar capability objective at a chosen layer, but
score each neuron by the mean magnitude of gradient x activation:

    importance_j = mean over probe samples s and positions p of | a_{s,p,j} * dO_s / da_{s,p,j} |

which is the first-order Taylor estimate of how much the objective changes if neuron j were zeroed
at that sample and position (Molchanov et al., ICLR 2017). Two reasons over raw averaged gradients:
(1) signed gradients cancel across samples, so a neuron used in opposite directions by different
probes would score ~0; the absolute value is taken per sample and position before averaging.
(2) a gradient alone ignores scale: a neuron that is always ~0 has a large gradient but zeroing it
changes nothing. The score is what distillation needs: neurons whose removal costs the capability.

Mechanics: a forward hook on `layer` replaces its output with a detached copy that requires grad,
then `torch.autograd.grad(objective, that_copy)` gives dO/da. This is the same gradient
`output.retain_grad()` would give, but it also works on frozen teachers (no parameter requires grad,
so the output would otherwise have no graph), builds no graph upstream of the layer and never writes
a parameter's `.grad`.

No Dagster here: the `neuron_importance` asset calls `neuron_importance` and `importance_table`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import torch

__all__ = ["neuron_importance", "protected_set", "importance_table"]


def _call(model: torch.nn.Module, batch: Any):
    """A tuple/list batch is unpacked positionally, a dict as keywords, anything else passed as is."""
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def neuron_importance(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    inputs_iter: Iterable[Any],
    objective: Callable[[Any], torch.Tensor],
) -> torch.Tensor:
    """Gradient x activation importance of each neuron (last dim) of `layer`'s output.

    Args:
        model: the teacher. Put it in eval mode first (dropout would make scores noisy); the mode is
            not changed here, the caller owns the model.
        layer: a submodule of `model`. Its output is a tensor (..., width), or a tuple/list whose
            first element is (HF decoder blocks return (hidden_states, ...)). Neurons are the last
            dim; all other dims (batch, sequence positions, and spatial positions for a
            channels-last layout) are averaged over. If the layer runs several times per forward
            (weight sharing), every call's activations count as further positions.
        inputs_iter: probe batches; each is passed to `model` as `_call` describes.
        objective: maps the model output of one batch to a scalar tensor. Use a SUM over samples of
            the per-sample objective (e.g. summed log-prob of the target tokens), so each sample's
            gradient is its own and batch size does not rescale the scores.

    Returns:
        (width,) float64 tensor on CPU, non-negative.

    Raises:
        ValueError: the layer did not run during a forward, its output is not a floating tensor
            (grad-free: e.g. token ids or argmax), the objective is not a scalar, the objective does
            not depend on the layer, the width changes between batches, or there were no batches.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        first = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(first, torch.Tensor) or not torch.is_floating_point(first):
            kind = first.dtype if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(
                f"layer {type(_module).__name__} has a grad-free output ({kind}); "
                "neuron importance needs a floating-point activation"
            )
        act = first.detach().requires_grad_(True)  # (..., width) leaf: dO/da lands here
        captured.append(act)
        if isinstance(output, (tuple, list)):
            return type(output)((act, *output[1:]))
        return act

    total: torch.Tensor | None = None  # (width,) float64 running sum of |a * g|
    positions = 0
    handle = layer.register_forward_hook(hook)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for b, batch in enumerate(inputs_iter):
                captured.clear()
                out = _call(model, batch)
                if not captured:
                    raise ValueError(f"batch {b}: layer {type(layer).__name__} did not run in model's forward")
                obj = objective(out)
                if not isinstance(obj, torch.Tensor) or obj.numel() != 1:
                    shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
                    raise ValueError(f"batch {b}: objective must return a scalar tensor, got {shape}")
                if not obj.requires_grad:
                    raise ValueError(
                        f"batch {b}: objective does not depend on layer {type(layer).__name__} "
                        "(its result has no gradient); was the output detached or computed under no_grad?"
                    )
                grads = torch.autograd.grad(obj.reshape(()), captured, allow_unused=True)
                if all(g is None for g in grads):
                    raise ValueError(f"batch {b}: objective does not depend on layer {type(layer).__name__}")
                for act, g in zip(captured, grads):
                    width = act.shape[-1]
                    if total is None:
                        total = torch.zeros(width, dtype=torch.float64)
                    elif width != total.shape[0]:
                        raise ValueError(f"batch {b}: layer width {width} differs from earlier {total.shape[0]}")
                    n_pos = act.numel() // width
                    if g is not None:  # an unused call still counts its positions, with score 0
                        taylor = (act.detach() * g).abs().reshape(n_pos, width)  # (positions, width)
                        total += taylor.sum(0).to("cpu", torch.float64)
                    positions += n_pos
                captured.clear()
    finally:
        handle.remove()
    if total is None:
        raise ValueError("no probe batches")
    return total / positions


def _as_numpy_scores(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    s = s.astype(np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("scores must be finite and non-negative")
    return s


def _rank_order(s: np.ndarray) -> np.ndarray:
    """Indices by decreasing score; ties go to the lower neuron index (stable sort)."""
    return np.argsort(-s, kind="stable")


def _check_mass(mass: float) -> float:
    mass = float(mass)
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    return mass


def _protected_count(sorted_scores: np.ndarray, mass: float) -> int:
    total = sorted_scores.sum()
    if total == 0:
        return 0  # no neuron matters: an empty set covers all of nothing
    cum = np.cumsum(sorted_scores) / total
    k = int(np.searchsorted(cum, mass - 1e-12, side="left")) + 1
    return min(k, sorted_scores.size)


def protected_set(scores: torch.Tensor | np.ndarray, mass: float) -> np.ndarray:
    """The fewest neurons whose scores cover `mass` of the total score.

    Args:
        scores: (width,) non-negative importances.
        mass: fraction in (0, 1].

    Returns:
        int64 indices in rank order (most important first). Ties are broken by lower neuron index,
        so the set is deterministic. All-zero scores give an empty set.
    """
    s = _as_numpy_scores(scores)
    mass = _check_mass(mass)
    order = _rank_order(s)
    return order[: _protected_count(s[order], mass)].astype(np.int64)


def importance_table(scores: torch.Tensor | np.ndarray, mass: float) -> pa.Table:
    """Per-neuron table, rows in rank order.

    Columns: neuron (int64 index), score (float64), rank (int64, 1 = most important),
    share (score / total), cumulative_share (running share in rank order), protected (bool, in
    `protected_set(scores, mass)`).
    """
    s = _as_numpy_scores(scores)
    mass = _check_mass(mass)
    order = _rank_order(s)
    sorted_s = s[order]
    total = sorted_s.sum()
    share = sorted_s / total if total > 0 else np.zeros_like(sorted_s)
    protected = np.zeros(s.size, dtype=bool)
    protected[: _protected_count(sorted_s, mass)] = True
    return pa.table(
        {
            "neuron": pa.array(order.astype(np.int64)),
            "score": pa.array(sorted_s),
            "rank": pa.array(np.arange(1, s.size + 1, dtype=np.int64)),
            "share": pa.array(share),
            "cumulative_share": pa.array(np.cumsum(share)),
            "protected": pa.array(protected),
        }
    )
