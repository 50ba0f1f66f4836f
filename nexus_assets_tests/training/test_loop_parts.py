"""The train loop's small parts, each on a known answer."""
import math
import random

import numpy as np
import pytest
import torch

from nexus_assets.training.checkpoints import read_checkpoint, rng_state, set_rng_state, write_checkpoint
from nexus_assets.training.config import TrainConfig
from nexus_assets.training.loop_parts import TrainState, batch_indices, guard_step, lr_lambda_for


def test_guard_step_decides_ok_nan_and_spike():
    tc = TrainConfig(spike_factor=4.0, spike_min_history=3)
    assert guard_step(float("nan"), [], tc) == "nan_loss"
    assert guard_step(float("inf"), [1.0] * 5, tc) == "nan_loss"
    assert guard_step(100.0, [1.0, 1.0], tc) == "ok"  # too little history to call a spike
    assert guard_step(4.5, [1.0, 1.0, 1.0], tc) == "spike"
    assert guard_step(3.9, [1.0, 1.0, 1.0], tc) == "ok"


def test_schedule_warms_up_then_decays_to_a_tenth():
    f = lr_lambda_for(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_batches_are_a_pure_function_of_seed_phase_step():
    a = batch_indices(10, 4, seed=1, phase=0, step=3)
    assert a == batch_indices(10, 4, seed=1, phase=0, step=3)
    epoch0 = sum((batch_indices(10, 5, 1, 0, s) for s in range(2)), [])
    assert sorted(epoch0) == list(range(10))  # one epoch = a permutation of the rows


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
