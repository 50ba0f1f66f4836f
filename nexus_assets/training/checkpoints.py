"""Training checkpoints: model, optimizer, scheduler, RNG states and the loop state, written atomically
and read back WITHOUT pickle (`torch.load(weights_only=True)`: tensors, numbers, strings, lists and
dicts only), so a checkpoint file can never run code when it is loaded."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from nexus_assets.core.atomic import atomic_path

CHECKPOINT_DIR = "checkpoints"


def rng_state() -> dict:
    """torch, numpy and python RNG states as plain tensors / lists (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": int(version), "internal": list(internal),
                       "gauss": None if gauss is None else float(gauss)}}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    files = sorted((Path(out_dir) / CHECKPOINT_DIR).glob("ckpt-*.pt"))
    return files[-1] if files else None


def write_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """state: {"global_step", "phase_idx", ...} of plain types and tensors; the newest `keep` are kept."""
    path = Path(out_dir) / CHECKPOINT_DIR / f"ckpt-{state['global_step']:07d}-p{state['phase_idx']}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted((Path(out_dir) / CHECKPOINT_DIR).glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def read_checkpoint(path: Path, device) -> dict:
    """Load without pickle; a file that needs pickle (or is not a checkpoint) is refused, named."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
