"""The train loop's small parts, each on a known answer."""
import math
import random

import numpy as np
import pytest
import torch

from nexus_assets.training.checkpoints import read_checkpoint, rng_state, set_rng_state, write_checkpoint
from nexus_assets.training.config import TrainConfig
from nexus_assets.training.loop_parts import TrainState, batch_indices, guard_step, lr_lambda_for, patience_evals


def test_guard_step_decides_ok_nan_and_spike():
    tc = TrainConfig(spike_factor=4.0, spike_min_history=3)
    assert guard_step(float("nan"), [], tc) == "nan_loss"
    assert guard_step(float("inf"), [1.0] * 5, tc) == "nan_loss"
    assert guard_step(100.0, [1.0, 1.0], tc) == "ok"  # too little history to call a spike
    assert guard_step(4.5, [1.0, 1.0, 1.0], tc) == "spike"
    assert guard_step(3.9, [1.0, 1.0, 1.0], tc) == "ok"


def test_patience_grows_with_the_phase():
    tc = TrainConfig(patience=5, patience_fraction=0.1, eval_every=20)
    assert patience_evals(tc, 100) == 5 and patience_evals(tc, 2160) == 11 and patience_evals(tc, 10800) == 54
    assert patience_evals(TrainConfig(patience=5, patience_fraction=0.0), 10800) == 5


def test_schedule_warms_up_then_decays_to_a_tenth():
    f = lr_lambda_for(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_linear_schedule_decays_straight_to_its_floor():
    f = lr_lambda_for(warmup=4, total=20, decay="linear", floor=0.0)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.5) and f(20) == 0.0 and f(30) == 0.0
    g = lr_lambda_for(warmup=0, total=10, decay="linear", floor=0.2)
    assert g(5) == pytest.approx(0.2 + 0.8 * 0.5) and g(10) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="lr_decay"):
        lr_lambda_for(4, 20, decay="step")


def test_batches_are_a_pure_function_of_seed_phase_step():
    a = batch_indices(10, 4, seed=1, phase=0, step=3)
    assert a == batch_indices(10, 4, seed=1, phase=0, step=3)
    epoch0 = sum((batch_indices(10, 5, 1, 0, s) for s in range(2)), [])
    assert sorted(epoch0) == list(range(10))  # one epoch = a permutation of the rows


def test_length_grouped_batches_keep_the_epoch_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 65, size=800).tolist()
    grouped = [batch_indices(800, 8, 1, 0, s, lengths) for s in range(100)]
    assert sorted(sum(grouped, [])) == list(range(800))  # still one permutation per epoch
    assert grouped[7] == batch_indices(800, 8, 1, 0, 7, lengths)  # stateless: resumable

    def padded(batches):  # tokens a batch pays for: its rows x its longest row
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = [batch_indices(800, 8, 1, 0, s) for s in range(100)]
    assert padded(grouped) < 0.8 * padded(plain)  # random batches of 5-64 tokens pay ~1.5x their tokens
    with pytest.raises(ValueError, match="lengths: 3 values for 800 rows"):
        batch_indices(800, 8, 1, 0, 0, [1, 2, 3])


def test_source_sampling_gives_each_source_its_share_of_an_epoch():
    """90 rows of a big source, 10 of a small one, 100-row epochs: shares follow n_s ** alpha."""
    from collections import Counter

    sources = ["big"] * 90 + ["small"] * 10
    lengths = list(range(5, 105))

    def epoch(alpha, lens=None, e=0):
        return sum((batch_indices(100, 10, 1, 0, s, lens, sources, alpha) for s in range(10 * e, 10 * e + 10)), [])

    # alpha 1: exactly the default batches (every row once per epoch), with or without length grouping
    assert epoch(1.0) == sum((batch_indices(100, 10, 1, 0, s) for s in range(10)), [])
    assert epoch(1.0, lengths) == sum((batch_indices(100, 10, 1, 0, s, lengths) for s in range(10)), [])
    # alpha 0: every source alike, 50 / 50; the small source's 10 rows each 5 times, the big one's 50 distinct
    e0 = epoch(0.0)
    assert Counter(sources[i] for i in e0) == {"big": 50, "small": 50}
    assert Counter(i for i in e0 if i >= 90) == {i: 5 for i in range(90, 100)}
    assert len({i for i in e0 if i < 90}) == 50
    # alpha 0.5: sqrt(90) : sqrt(10) = 3 : 1 -> 75 / 25, also when length-grouped
    for lens in (None, lengths):
        assert Counter(sources[i] for i in epoch(0.5, lens)) == {"big": 75, "small": 25}
    assert epoch(0.0, e=0) != epoch(0.0, e=1)  # each epoch draws afresh (the big source's 50 differ)
    assert epoch(0.5, lengths) == epoch(0.5, lengths)  # stateless: resumable
    with pytest.raises(ValueError, match="sources: 3 values for 100 rows"):
        batch_indices(100, 10, 1, 0, 0, None, ["a", "b", "c"], 0.5)


def test_state_round_trips_and_a_phase_end_resets_early_stopping():
    st = TrainState(global_step=7, best_val=0.5, bad_evals=2, loss_window=[1.0])
    assert TrainState.from_dict(st.to_dict()) == st
    st.end_phase(0)
    assert (st.phase_idx, st.phase_step, st.bad_evals, st.loss_window, st.best_val) == (1, 0, 0, [], math.inf)


def test_checkpoints_round_trip_without_pickle(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = {"global_step": 5, "phase_idx": 1, "rng": rng_state(), "state": TrainState(global_step=5).to_dict(),
             "model": {"w": torch.arange(3.0)}}
    path = write_checkpoint(tmp_path, state, keep=2)
    expect = (torch.rand(2), np.random.rand(2), random.random())
    back = read_checkpoint(path, "cpu")
    set_rng_state(back["rng"])
    assert torch.equal(torch.rand(2), expect[0]) and np.array_equal(np.random.rand(2), expect[1])
    assert random.random() == expect[2]
    assert TrainState.from_dict(back["state"]).global_step == 5


def test_a_checkpoint_that_needs_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "ckpt-0000001-p0.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ValueError, match="ckpt-0000001-p0.pt: not a loadable checkpoint"):
        read_checkpoint(bad, "cpu")


def _probe_case(seed: int = 0):
    """A tiny text tower and rows whose teacher embedding the head can reach exactly: a fixed random
    linear map of the (LayerNorm-ed) pooled last-block states, normalised."""
    import torch.nn.functional as F

    from nexus_assets.student.modules import _pool
    from nexus_assets.student.tower import StudentTower
    from nexus_assets.training.tower_data import INPUT_KEYS, synthetic_tower_data
    from nexus_assets_tests.student.test_towers import tiny_config

    torch.manual_seed(seed)
    cfg = tiny_config("text")
    tower = StudentTower(cfg)
    data = synthetic_tower_data(cfg, 96, seed)
    batch = data.batch(list(range(len(data))))
    with torch.no_grad():
        tower.eval()
        hiddens, mask = tower.encode({k: v for k, v in batch.items() if k in INPUT_KEYS})
        pooled = F.layer_norm(_pool(hiddens[-1], mask), (cfg.width,))
        w = torch.randn(cfg.width, 16, generator=torch.Generator().manual_seed(7))
        data.tensors["text.embed:embedding"] = F.normalize(pooled @ w, dim=-1)
        tower.train()
    return tower, data


def test_linear_probe_reaches_a_head_target_that_is_a_linear_map_and_leaves_the_backbone():
    from nexus_assets.training.loop_parts import params_sha256, probe_pooled_head

    tower, data = _probe_case()
    backbone = params_sha256(tower.backbone)
    tc = TrainConfig(head_probe_epochs=150, head_probe_lr=1e-2, w_gram=0.0)
    rep = probe_pooled_head(tower, "text.embed", data, tc, torch.device("cpu"))
    assert rep["rows"] == 96 and rep["epochs"] == 150
    assert rep["loss_before"] > 0.3  # a random head is far from the map
    assert rep["loss_after"] < 0.05 * rep["loss_before"]  # the probe finds it (cosine loss near 0)
    assert params_sha256(tower.backbone) == backbone  # only the head moved
    assert tower.training  # the mode it was called in


def test_linear_probe_fits_the_neighbour_ranking_when_given_a_bank():
    """With a bank of the rows' teacher embeddings the probe's loss holds the neighbour term (it starts
    higher than without) and fits it too: the head's outputs rank the bank as the teacher's do."""
    from nexus_assets.training.losses import neighbour_kd_loss
    from nexus_assets.training.loop_parts import probe_pooled_head
    from nexus_assets.training.objective import neighbour_banks
    from nexus_assets.training.tower_data import INPUT_KEYS

    tc = TrainConfig(head_probe_epochs=150, head_probe_lr=1e-2, w_gram=0.0, w_neighbour=1.0, neighbour_temperature=0.1)
    reps = []
    for bank_on in (False, True):
        tower, data = _probe_case()
        bank = neighbour_banks(tower.cfg, data, tc)["text.embed"] if bank_on else None
        reps.append(probe_pooled_head(tower, "text.embed", data, tc, torch.device("cpu"), bank=bank))
    assert reps[1]["loss_before"] > reps[0]["loss_before"] + 0.1
    assert reps[1]["loss_after"] < 0.1 * reps[1]["loss_before"]
    tower.eval()
    with torch.no_grad():
        batch = data.batch(list(range(len(data))))
        out = tower({k: v for k, v in batch.items() if k in INPUT_KEYS}, "text.embed")["out"]
    assert float(neighbour_kd_loss(out, batch["text.embed:embedding"], bank, 0.1)) < 0.1


def test_linear_probe_is_deterministic_and_skips_heads_it_cannot_probe():
    from nexus_assets.training.loop_parts import probe_pooled_head

    tc = TrainConfig(head_probe_epochs=5)
    heads = []
    for _ in range(2):
        tower, data = _probe_case()
        probe_pooled_head(tower, "text.embed", data, tc, torch.device("cpu"))
        heads.append({k: v.clone() for k, v in tower.heads["text_embed"].state_dict().items()})
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    tower, data = _probe_case()
    assert probe_pooled_head(tower, "text.generate", data, tc, torch.device("cpu")) is None  # an LM head
    assert probe_pooled_head(tower, "text.embed", data, TrainConfig(head_probe_epochs=0), torch.device("cpu")) is None


def test_linear_probe_fits_only_rows_the_head_teacher_has():
    """Rows without the embedding teacher's features (teacher-written text) hold zero targets: the
    probe must leave them out, or it would fit a head that maps to zero."""
    from nexus_assets.training.loop_parts import probe_pooled_head

    tc = TrainConfig(head_probe_epochs=150, head_probe_lr=1e-2, w_gram=0.0)
    tower, data = _probe_case()
    rows = torch.arange(len(data)) % 3 != 0
    data.tensors["text.embed:embedding"][~rows] = 0.0
    data.tensors["text.embed:rows"] = rows
    rep = probe_pooled_head(tower, "text.embed", data, tc, torch.device("cpu"))
    assert rep["rows"] == int(rows.sum())
    assert rep["loss_after"] < 0.05 * rep["loss_before"]


def test_carved_parameters_train_at_the_scaled_rate_and_new_ones_at_the_full_rate():
    from nexus_assets.student.tower import StudentTower
    from nexus_assets.training.loop_parts import setup_phase
    from nexus_assets.training.objective import TowerObjective
    from nexus_assets_tests.student.test_towers import tiny_config

    torch.manual_seed(0)
    tower = StudentTower(tiny_config("vision"))
    carved = {n for n in dict(tower.named_parameters()) if n.startswith("backbone.")}
    tower.carved_param_ids = frozenset(id(p) for n, p in tower.named_parameters() if n in carved)
    tc = TrainConfig(lr=1e-2, carved_lr_scale=0.01, warmup_steps=0)
    ph = setup_phase("a", tower, TowerObjective(tower, tc, {}), list(tower.cfg.capabilities), tc)
    ids = {id(p): n for n, p in tower.named_parameters()}
    by_lr = {round(g["lr"], 9): {ids[id(p)] for p in g["params"]} for g in ph.opt.param_groups}
    assert by_lr == {1e-2: set(ids.values()) - carved, 1e-4: carved}
    before = {n: p.detach().clone() for n, p in tower.named_parameters()}
    for p in ph.params:
        p.grad = torch.ones_like(p)
    ph.opt.step()  # Adam's first step moves every weight by ~lr (before weight decay)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in tower.named_parameters()}
    assert max(moved[n] for n in carved) < 2e-4 and min(moved[n] for n in set(moved) - carved) > 5e-3
    with pytest.raises(ValueError, match="carved_lr_scale"):
        TrainConfig(carved_lr_scale=0.0)


def test_phase_optimizer_is_fused_on_cpu_and_updates_as_the_looped_adamw():
    from nexus_assets.student.tower import StudentTower
    from nexus_assets.training.loop_parts import fused_adam_supported, setup_phase
    from nexus_assets.training.objective import TowerObjective
    from nexus_assets_tests.student.test_towers import tiny_config

    torch.manual_seed(0)
    tower = StudentTower(tiny_config("vision"))
    tc = TrainConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    ph = setup_phase("a", tower, TowerObjective(tower, tc, {}), list(tower.cfg.capabilities), tc)
    assert ph.opt.defaults["fused"] is True
    start = [p.detach().clone() for p in ph.params]
    twins = [torch.nn.Parameter(p.clone()) for p in start]
    looped = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=False)
    for i in range(5):
        for p, q in zip(ph.params, twins):
            p.grad = torch.sin(p.detach() * (i + 1)) + 0.1
            q.grad = p.grad.clone()
        ph.opt.step()
        looped.step()
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(ph.params, start))
    gap = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(ph.params, twins))
    assert moved > 1e-2 and gap < 1e-6
    assert not fused_adam_supported([]) and not fused_adam_supported([torch.zeros(2, dtype=torch.int64)])


def test_phase_b_steps_by_capability_overrides_one_capability_only():
    from nexus_assets.student.tower import StudentTower
    from nexus_assets.training.config import cpu_train_config
    from nexus_assets.training.loop_parts import setup_phase
    from nexus_assets.training.objective import TowerObjective
    from nexus_assets_tests.student.test_towers import tiny_config

    torch.manual_seed(0)
    tower = StudentTower(tiny_config("audio"))
    caps = list(tower.cfg.capabilities)
    tc = TrainConfig(phase_b_steps=7, phase_b_steps_by_capability={caps[0]: 0})
    obj = TowerObjective(tower, tc, {})
    assert setup_phase(f"b:{caps[0]}", tower, obj, caps, tc).steps == 0
    assert tower.adapters == [] and tower.capability == caps[0]  # no steps: no adapter
    assert [setup_phase(f"b:{c}", tower, obj, caps, tc).steps for c in caps[1:]] == [7] * (len(caps) - 1)
    assert tower.adapters == caps[1:]
    with pytest.raises(ValueError, match="phase_b_steps_by_capability: steps of 'x'"):
        TrainConfig(phase_b_steps_by_capability={"x": -1})
    carved_audio = cpu_train_config("audio", init="carved", profile="default")
    assert carved_audio.phase_b_steps_by_capability == {"audio.transcribe": 0} and carved_audio.phase_b_steps > 0


def test_auto_mixed_precision_follows_native_bf16():
    from nexus_assets.training.loop_parts import autocast_bf16

    cpu = torch.device("cpu")
    assert autocast_bf16("bf16", cpu, native=lambda d: False) is True
    assert autocast_bf16("no", cpu, native=lambda d: True) is False
    assert autocast_bf16("auto", cpu, native=lambda d: True) is True
    assert autocast_bf16("auto", cpu, native=lambda d: False) is False


def test_compile_backbone_resolves_by_setting_phase_length_and_toolchain():
    from nexus_assets.training.config import COMPILE_MIN_STEPS, cpu_train_config
    from nexus_assets.training.loop_parts import compile_backbone_on

    cpu, ok, broken = torch.device("cpu"), (lambda d: True), (lambda d: False)
    assert compile_backbone_on("no", 10_000, cpu, works=ok) is False
    assert compile_backbone_on("yes", 1, cpu, works=broken) is True  # asked for: a broken toolchain fails loudly
    assert compile_backbone_on("auto", COMPILE_MIN_STEPS - 1, cpu, works=ok) is False  # too short to pay
    assert compile_backbone_on("auto", COMPILE_MIN_STEPS, cpu, works=ok) is True
    assert compile_backbone_on("auto", COMPILE_MIN_STEPS, cpu, works=broken) is False
    assert cpu_train_config("text", init="carved", profile="default").compile_backbone == "auto"
    assert cpu_train_config("audio", init="carved", profile="default").compile_backbone == "no"
    assert cpu_train_config("text").compile_backbone == "no"  # the random-init ablation stays as measured
