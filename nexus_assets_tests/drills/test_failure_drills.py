"""Failure drills: what an operator meets when a run dies or an input is broken, on a tiny real Llama.

Each drill breaks something on purpose (kill -9, garbage bytes, a NaN, a registry typo, two writers on
one cache) and checks three things: the failure is loud and names what broke, nothing half-written is
visible under a final name, and a rerun ends with exactly what an uninterrupted run gives.

Kills are real: the victim runs in a subprocess (`python -c` calling a worker below) and gets SIGKILL.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexus_assets.core.atomic import sha256_file
from nexus_assets.core.feature_store import (
    MANIFEST, FeatureCacheError, cache_features, chunk_is_complete, current_entry, read_features,
)
from nexus_assets.core.registry import RegistryError, TeacherSpec, load_registry
from nexus_assets.teachers.snapshot import SnapshotError, build_snapshot
from nexus_assets_tests.helpers import tiny_llama_dir

REPO = Path(__file__).resolve().parents[2]
N_ROWS = 24
CHUNK_ROWS = 2  # 12 chunks: enough room to kill between two of them


# ----------------------------------------------------------------------------------------------------
# Shared fixtures and workers (the workers also run in subprocesses, so they take plain strings)
# ----------------------------------------------------------------------------------------------------


def tiny_spec(model_dir: str | Path) -> TeacherSpec:
    return TeacherSpec.model_validate(dict(
        name="tiny-llama", modality="text", tower="text", family="causal_lm", capabilities=["text.generate"],
        dataset="text-probe", source={"kind": "path", "path": str(model_dir)},
        extraction={"layers": ["layers.1", "layers.3"], "token_layers": ["layers.1"], "top_k": 5,
                    "batch_size": 2, "chunk_rows": CHUNK_ROWS, "max_length": 16}))


def probe_rows(n: int = N_ROWS) -> pa.Table:
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 290, size=rng.integers(2, 12))) for _ in range(n)]
    return pa.table({"row_id": [f"t/{i}/0" for i in range(n)], "split": ["train"] * n, "text": texts})


def feature_worker(model_dir: str, snap_dir: str, teacher_dir: str, delay_s: float) -> None:
    """Cache the tiny Llama's features with a forward slowed by `delay_s` per batch (a kill target)."""
    import nexus_assets.teachers.features as F

    load = F.load_teacher

    def slow_load(*args, **kwargs):
        teacher = load(*args, **kwargs)
        fast = teacher.forward

        def forward(rows):
            time.sleep(delay_s)
            return fast(rows)

        teacher.forward = forward
        return teacher

    F.load_teacher = slow_load
    _, m = F.extract_teacher_features(tiny_spec(model_dir), Path(snap_dir), probe_rows(), "datahash",
                                      Path(teacher_dir), log=lambda s: print(s, flush=True))
    print(json.dumps({"rows_computed_this_run": m["rows_computed_this_run"]}), flush=True)


def _extract(snap: Path, teacher_dir: Path, model_dir: Path):
    from nexus_assets.teachers.features import extract_teacher_features

    return extract_teacher_features(tiny_spec(model_dir), snap, probe_rows(), "datahash", teacher_dir,
                                    log=lambda s: None)


def _spawn(code: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # same thread count as the in-process reference
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _feature_code(model_dir: Path, snap: Path, teacher_dir: Path, delay_s: float) -> str:
    return ("from nexus_assets_tests.drills.test_failure_drills import feature_worker; "
            f"feature_worker({str(model_dir)!r}, {str(snap)!r}, {str(teacher_dir)!r}, {delay_s})")


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"worker exited (rc {proc.returncode}) before the kill point:\n{log.read_text()}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"kill point not reached in {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


def _kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _all_columns(entry: Path) -> dict[str, dict]:
    return {kind: read_features(entry, kind).to_pydict() for kind in ("items", "tokens")}


def _assert_same_features(a: Path, b: Path) -> None:
    fa, fb = _all_columns(a), _all_columns(b)
    for kind in fa:
        assert fa[kind].keys() == fb[kind].keys(), kind
        for col in fa[kind]:
            x, y = fa[kind][col], fb[kind][col]
            if col in ("row_id", "split"):
                assert x == y, f"{kind}.{col}"
            elif col in ("token_id", "topk_ids", "position", "has_next"):
                np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=f"{kind}.{col}")
            else:  # torch on CPU is not bitwise reproducible run to run here (~1e-9 differences seen)
                np.testing.assert_allclose(np.array(x, dtype=float), np.array(y, dtype=float), rtol=1e-5,
                                           atol=1e-7, err_msg=f"{kind}.{col}")


def _assert_nothing_half_written(entry: Path) -> None:
    """Every file under a final name is whole: parquet files parse, markers vouch for their chunk."""
    for p in entry.iterdir():
        if p.name.startswith("."):
            continue  # a temp file of the killed writer: never read, overwritten on resume
        if p.suffix == ".parquet":
            pq.read_table(p)  # raises on a torn file
        elif p.name.startswith("chunk-"):
            assert chunk_is_complete(entry, int(p.stem.split("-")[1])), f"{p.name} marks an incomplete chunk"
        else:
            assert p.name != MANIFEST, "a killed run must not write the manifest"


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(model folder, snapshot folder, reference entry from one uninterrupted in-process run)."""
    root = tmp_path_factory.mktemp("drills")
    model = tiny_llama_dir(root / "model")
    build_snapshot(tiny_spec(model), root / "snap", log=lambda s: None)
    ref, m = _extract(root / "snap", root / "reference", model)
    assert m["rows"] == N_ROWS and m["chunks"] == N_ROWS // CHUNK_ROWS
    return model, root / "snap", ref


# ----------------------------------------------------------------------------------------------------
# Drills
# ----------------------------------------------------------------------------------------------------


def test_kill9_mid_feature_caching_then_resume(llama, tmp_path):
    model, snap, ref = llama
    teacher_dir = tmp_path / "feat"
    entry = teacher_dir / ref.name
    log = tmp_path / "worker.log"
    proc = _spawn(_feature_code(model, snap, teacher_dir, delay_s=0.4), log)
    _wait_for(lambda: len(list(entry.glob("chunk-*.json"))) >= 2, proc, log)
    _kill9(proc)

    markers = sorted(entry.glob("chunk-*.json"))
    assert 2 <= len(markers) < N_ROWS // CHUNK_ROWS, "the kill must land mid-run"
    _assert_nothing_half_written(entry)
    with pytest.raises(FeatureCacheError):
        current_entry(teacher_dir)  # readers see no cache until a run completes
    done_rows = sum(json.loads(p.read_text())["rows"] for p in markers if chunk_is_complete(entry, int(p.stem[6:])))

    again, m = _extract(snap, teacher_dir, model)
    assert again == entry and current_entry(teacher_dir) == entry
    assert m["rows_computed_this_run"] == N_ROWS - done_rows, "resume must compute only the missing rows"
    _assert_same_features(entry, ref)


def _train_setup():
    from nexus_assets.training.tower_data import synthetic_tower_data
    from nexus_assets.training.train_loop import TrainConfig
    from nexus_assets_tests.student.test_towers import tiny_config

    cfg = tiny_config("text")
    tc = TrainConfig(phase_a_steps=12, phase_b_steps=4, batch_size=8, eval_every=4, checkpoint_every=4,
                     log_every=100, lr=3e-3, warmup_steps=2, spike_min_history=4, num_threads=1)
    return cfg, synthetic_tower_data(cfg, 32, 0, frames=40), synthetic_tower_data(cfg, 16, 1, frames=40), tc


def train_worker(out_dir: str, delay_s: float) -> None:
    """train_tower on the tiny text tower, each step slowed by `delay_s` (a kill target)."""
    from nexus_assets.training.train_loop import TrainHooks, train_tower

    cfg, train, val, tc = _train_setup()
    s = train_tower(cfg, train, val, tc, out_dir, log=lambda m: print(m, flush=True),
                    hooks=TrainHooks(after_step=lambda step: time.sleep(delay_s)))
    print(json.dumps({"param_sha256": s["param_sha256"]}), flush=True)


def test_kill9_mid_training_then_resume_is_bit_for_bit(tmp_path):
    import torch

    from nexus_assets.training.train_loop import CHECKPOINT_DIR, train_tower

    cfg, train, val, tc = _train_setup()
    ref = train_tower(cfg, train, val, tc, tmp_path / "ref", log=lambda m: None)

    run, log = tmp_path / "run", tmp_path / "train.log"
    proc = _spawn("from nexus_assets_tests.drills.test_failure_drills import train_worker; "
                  f"train_worker({str(run)!r}, 0.3)", log)
    _wait_for(lambda: any((run / CHECKPOINT_DIR).glob("ckpt-*.pt")), proc, log, timeout=180)
    time.sleep(0.5)  # a step or two past the checkpoint: those steps are lost and redone
    _kill9(proc)

    ckpts = sorted((run / CHECKPOINT_DIR).glob("ckpt-*.pt"))
    assert ckpts, "a checkpoint existed before the kill"
    for c in ckpts:  # checkpoints under final names load; only dot-temp files may be torn
        torch.load(c, map_location="cpu", weights_only=False)
    assert not (run / "summary.json").exists(), "the kill must land before the end of training"

    resumed = train_tower(cfg, train, val, tc, run, log=lambda m: None)
    assert resumed["resumed_from_step"] is not None and resumed["resumed_from_step"] >= 4
    assert resumed["param_sha256"] == ref["param_sha256"]
    assert resumed["history"]["train_loss"] == ref["history"]["train_loss"]


@pytest.mark.parametrize("victim", ["items-00003.parquet", "tokens-00005.parquet", "chunk-00007.json"])
def test_garbage_chunk_file_is_detected_and_redone(llama, tmp_path, victim):
    model, snap, ref = llama
    teacher_dir = tmp_path / "feat"
    shutil.copytree(ref.parent, teacher_dir)
    entry = teacher_dir / ref.name
    target = entry / victim
    target.write_bytes(np.random.default_rng(1).bytes(target.stat().st_size))  # same size: only the hash sees it
    index = int(victim.split("-")[1].split(".")[0])
    assert not chunk_is_complete(entry, index)

    _, m = _extract(snap, teacher_dir, model)
    assert m["rows_computed_this_run"] == CHUNK_ROWS, "only the damaged chunk is recomputed"
    assert chunk_is_complete(entry, index)
    _assert_same_features(entry, ref)


@pytest.mark.parametrize("damage, word", [("deleted", "missing"), ("corrupted", "corrupted")])
def test_broken_snapshot_weight_file_is_named_and_nothing_materialized_is_lost(llama, tmp_path, damage, word):
    model, snap_src, ref = llama
    snap = tmp_path / "snap"
    shutil.copytree(snap_src, snap)
    teacher_dir = tmp_path / "feat"
    shutil.copytree(ref.parent, teacher_dir)
    before = _tree_hashes(teacher_dir)

    weights = snap / "model.safetensors"
    if damage == "deleted":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=rf"teacher 'tiny-llama': weight file {snap}/model\.safetensors is {word}"):
        _extract(snap, teacher_dir, model)

    assert _tree_hashes(teacher_dir) == before, "a failed run must not touch the features already cached"
    assert current_entry(teacher_dir) == teacher_dir / ref.name
    assert (model / "model.safetensors").exists(), "the teacher's source folder is never touched"


@pytest.mark.parametrize("kind, column", [("items", "hidden.layers.3"), ("tokens", "topk_logits")])
def test_nan_in_a_teacher_batch_names_teacher_and_column_and_marks_nothing(llama, tmp_path, kind, column):
    from nexus_assets.teachers.base import load_teacher

    model, snap, _ = llama
    teacher = load_teacher(tiny_spec(model), snap)
    calls = {"n": 0}

    def forward(rows):
        out = teacher.forward(rows)
        calls["n"] += 1
        if calls["n"] == 3:  # the first batch of chunk 1 (batch 2 = chunk 1 with batch_size == chunk_rows)
            table = out.items if kind == "items" else out.tokens
            table[column] = np.array(table[column], dtype=np.float32, copy=True)
            table[column][0, 0] = np.nan
        return out

    folder = tmp_path / "feat" / "k"
    with pytest.raises(FeatureCacheError, match=rf"teacher 'tiny-llama': non-finite values in output '{column}'"):
        cache_features(forward, probe_rows(), folder, teacher="tiny-llama", batch_size=2, chunk_rows=CHUNK_ROWS,
                       input_columns=["text"], log=lambda s: None)
    assert [p.name for p in sorted(folder.glob("chunk-*.json"))] == ["chunk-00000.json", "chunk-00001.json"]
    assert not (folder / "chunk-00002.json").exists() and not (folder / MANIFEST).exists()
    assert not (folder / "items-00002.parquet").exists(), "nothing of the poisoned chunk is written"


def _typo_registry(tmp_path: Path, old: str, new: str, *, after: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "registry", data / "registry")
    f = data / "registry" / "teachers.yaml"
    text = f.read_text()
    anchor = text.index(after)
    pos = text.index(old, anchor)
    f.write_text(text[:pos] + new + text[pos + len(old):])
    return data


@pytest.mark.parametrize("old, new, field", [
    ("chunk_rows:", "chunk_rowz:", "extraction.chunk_rowz"),  # misspelled key
    ("capabilities:", "capabilites:", "capabilites"),
    ("kind: package", "kind: pakage", "source"),  # misspelled value of the discriminator
])
def test_registry_typo_names_file_entry_and_field(tmp_path, old, new, field):
    data = _typo_registry(tmp_path, old, new, after="name: minilm-l6")
    teachers_yaml = data / "registry" / "teachers.yaml"
    with pytest.raises(RegistryError) as err:
        load_registry(data / "registry")
    msg = str(err.value)
    assert str(teachers_yaml) in msg and "teacher 'minilm-l6'" in msg and f"field '{field}" in msg, msg
    assert load_registry().teacher("minilm-l6").extraction.chunk_rows == 256, "the real registry is untouched"


def test_code_location_fails_loudly_on_a_typo_and_loads_from_the_real_registry(tmp_path):
    data = _typo_registry(tmp_path, "chunk_rows:", "chunk_rowz:", after="name: minilm-l6")
    code = ("from nexus_assets.definitions import defs; "
            "print(len(list(defs.resolve_asset_graph().get_all_asset_keys())))")
    env = {k: v for k, v in os.environ.items() if k != "NEXUS_DATA_DIR"}
    bad = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**env, "NEXUS_DATA_DIR": str(data)})
    assert bad.returncode != 0
    assert "RegistryError" in bad.stderr and "teacher 'minilm-l6': field 'extraction.chunk_rowz'" in bad.stderr
    good = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stderr
    assert int(good.stdout.strip()) >= 7


def test_two_concurrent_runs_of_one_partition_end_with_one_complete_cache(llama, tmp_path):
    model, snap, ref = llama
    teacher_dir = tmp_path / "feat"
    entry = teacher_dir / ref.name
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = _spawn(_feature_code(model, snap, teacher_dir, delay_s=0.15), logs[0])
    # b starts once a has finished a chunk: b resumes from it while a is still writing the rest,
    # so both write the same chunk files at the same time from then on
    _wait_for(lambda: any(entry.glob("chunk-*.json")), a, logs[0])
    b = _spawn(_feature_code(model, snap, teacher_dir, delay_s=0.15), logs[1])
    rcs = [p.wait(timeout=240) for p in (a, b)]
    outputs = [log.read_text() for log in logs]
    for rc, out in zip(rcs, outputs):  # either success, or a failure that says what happened
        assert rc == 0 or ("Error" in out and "Traceback" in out), out
    assert 0 in rcs, f"at least one run must finish:\n{outputs}"

    assert current_entry(teacher_dir) == entry
    n_chunks = N_ROWS // CHUNK_ROWS
    assert all(chunk_is_complete(entry, i) for i in range(n_chunks))
    assert not [p.name for p in entry.iterdir() if p.name.startswith(".")], "no temp files left behind"
    _assert_same_features(entry, ref)
    m = json.loads((entry / MANIFEST).read_text())
    assert m["rows"] == N_ROWS and m["chunks"] == n_chunks
