"""tower_adapter's glue: a re-materialization with new settings starts fresh, an identical one resumes."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

from nexus_assets.training.distill import train_tower_from_artifacts
from nexus_assets.core.feature_store import write_chunk


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _fsl(m: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1).astype(np.float32)), m.shape[1])


@pytest.fixture
def vision_artifacts(tmp_path):
    n = 12
    ids = [f"img/{i}/0" for i in range(n)]
    splits = ["train"] * 9 + ["val"] * 3
    rng = np.random.default_rng(0)
    entry = tmp_path / "features" / "efficientnet-lite0" / "k"
    entry.mkdir(parents=True)
    write_chunk(entry, 0, pa.table({
        "row_id": ids, "split": splits, "logits": _fsl(rng.normal(size=(n, 1000))),
        "hidden.blocks.5": _fsl(rng.normal(size=(n, 80))), "hidden.blocks.10": _fsl(rng.normal(size=(n, 112))),
        "hidden.features": _fsl(rng.normal(size=(n, 1280)))}), None)
    probe = tmp_path / "probe" / "image-probe"
    probe.mkdir(parents=True)
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"row_id": ids, "split": splits, "image": [_png(i) for i in range(n)]}),
                   probe / "rows.parquet")
    return {"feature_entries": {"efficientnet-lite0": entry}, "probe_dirs": {"image-probe": probe}}


def _train(art, out, steps):
    return train_tower_from_artifacts(
        "vision", architecture={"hidden_width": 64, "lora_rank": 4, "depth": 1}, subspace_dirs={},
        importance_dirs={}, snapshot_dirs={}, overrides={"phase_a_steps": steps, "phase_b_steps": 1, "batch_size": 4},
        anchor_variance=0.95, out_dir=out, log=lambda s: None, **art)


def test_new_settings_start_fresh_and_identical_settings_resume(vision_artifacts, tmp_path, monkeypatch):
    out = tmp_path / "tower_adapter" / "vision"
    first = _train(vision_artifacts, out, 2)
    second = _train(vision_artifacts, out, 3)  # used to fail: "written for another tower/train config"
    assert first["run_key"] != second["run_key"] and second["steps"] == 4
    assert [p.name for p in (out / "runs").iterdir()] == [second["run_key"]], "the superseded run is removed"
    again = _train(vision_artifacts, out, 3)
    assert again["run_key"] == second["run_key"] and again["resumed_from_step"] == 4
    assert again["param_sha256"] == second["param_sha256"]
    assert (out / "runs" / second["run_key"] / "tower" / "classes.json").exists()
    # a change of what training computes (TRAINING_CODE_VERSION) starts fresh instead of resuming the old run
    import nexus_assets.training.distill as distill

    monkeypatch.setattr(distill, "TRAINING_CODE_VERSION", distill.TRAINING_CODE_VERSION + "-next")
    newer = _train(vision_artifacts, out, 3)
    assert newer["run_key"] != second["run_key"] and newer["resumed_from_step"] is None
