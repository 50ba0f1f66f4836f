"""PNG figures attached to profiling and distillation artifacts.

matplotlib is imported inside each function and drawn on a bare `Figure` with the Agg canvas, so
importing this module costs nothing, no global pyplot state or GUI backend is touched, and plots can
be made from worker threads. Files are written atomically like every other artifact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .atomic import atomic_path

THRESHOLDS = (0.90, 0.95, 0.99)


def _figure(figsize=(7.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def explained_variance_png(curves: Mapping[str, np.ndarray], path: str | Path, title: str) -> Path:
    """Cumulative explained variance per layer against component count (log x), with 90/95/99% lines.

    Args:
        curves: {label: (dim,) explained-variance ratios, decreasing}; each is plotted cumulatively.
        path: PNG file to write.
        title: figure title.

    Returns the path written.
    """
    if not curves:
        raise ValueError("explained_variance_png: no curves to plot")
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, ratio in curves.items():
        r = np.asarray(ratio, dtype=np.float64)
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"explained_variance_png: curve {label!r} must be a non-empty 1-D array")
        ax.plot(np.arange(1, r.size + 1), np.cumsum(r), label=str(label), lw=1.5)
    for t in THRESHOLDS:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
        ax.annotate(f"{t:.0%}", xy=(1.0, t), xycoords=("axes fraction", "data"), fontsize=8,
                    color="grey", ha="left", va="center")
    ax.set_xscale("log")
    ax.set_xlabel("components k")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0.0, 1.01)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def training_curve_png(history: Mapping[str, Sequence[float]], path: str | Path, title: str) -> Path:
    """One line per series (loss, val_loss, ...) against step; log y when every value is positive
    and the range spans more than 100x, so late progress of a loss stays visible.

    Args:
        history: {series name: values, one per logged step}. Series may differ in length.
        path: PNG file to write.
        title: figure title.

    Returns the path written.
    """
    if not history or all(len(v) == 0 for v in history.values()):
        raise ValueError("training_curve_png: empty history")
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    finite = []
    for name, values in history.items():
        v = np.asarray(values, dtype=np.float64)
        ax.plot(np.arange(v.size), v, label=str(name), lw=1.2)
        finite.append(v[np.isfinite(v)])
    allv = np.concatenate(finite) if finite else np.array([])
    if allv.size and allv.min() > 0 and allv.max() / allv.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(True, alpha=0.2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
