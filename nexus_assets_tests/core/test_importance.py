"""Neuron importance on toy networks whose important neurons are known by construction."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from nexus_assets.core.importance import importance_table, neuron_importance, protected_set

IMPORTANT = (2, 5, 11)


class Toy(nn.Module):
    """(B, T, 8) -> Linear -> ReLU (B, T, 16) -> readout (B, T); the readout weights are 3.0 on
    neurons {2, 5, 11} and 0.01 elsewhere, so those three carry the objective."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.readout = nn.Linear(16, 1, bias=False)
        with torch.no_grad():
            self.inp.bias.fill_(0.5)  # keep most ReLUs alive
            w = torch.full((16,), 0.01)
            w[list(IMPORTANT)] = 3.0
            self.readout.weight.copy_(w[None])

    def forward(self, x):
        return self.readout(self.act(self.inp(x))).squeeze(-1)


def probes(n_batches=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 7, 8, generator=g) for _ in range(n_batches)]


def total(out):
    return out.sum()


def test_top3_are_the_wired_neurons_and_protected_set_is_inside():
    model = Toy().eval()
    scores = neuron_importance(model, model.act, probes(), total)
    assert scores.shape == (16,) and scores.dtype == torch.float64
    assert set(torch.topk(scores, 3).indices.tolist()) == set(IMPORTANT)
    assert set(protected_set(scores, 0.9).tolist()) <= set(IMPORTANT)


def test_scores_equal_hand_computed_gradient_times_activation():
    """For a linear readout dO/da_j = w_j, so the score is mean |a_j * w_j| over all (B, T)."""
    model = Toy().eval()
    batches = probes()
    scores = neuron_importance(model, model.act, batches, total)
    with torch.no_grad():
        a = torch.cat([model.act(model.inp(x)).reshape(-1, 16) for x in batches])  # (4*5*7, 16)
        expected = (a * model.readout.weight[0]).abs().mean(0).double()
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9)


def test_frozen_teacher_works_and_parameter_grads_stay_untouched():
    model = Toy().eval().requires_grad_(False)
    with torch.no_grad():  # callers may hold a no_grad context; importance must still work
        scores = neuron_importance(model, model.act, probes(), total)
    assert set(torch.topk(scores, 3).indices.tolist()) == set(IMPORTANT)
    assert all(p.grad is None for p in model.parameters())


def test_tuple_output_layer_uses_first_element():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 16)

        def forward(self, x):
            return self.lin(x), "cache"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = Toy().readout

        def forward(self, x):
            h, _ = self.block(x)
            return self.head(h).squeeze(-1)

    net = Net().eval()
    scores = neuron_importance(net, net.block, probes(), total)
    assert set(torch.topk(scores, 3).indices.tolist()) == set(IMPORTANT)


def test_grad_free_layer_is_an_error():
    class ArgmaxNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pick = ArgmaxLayer()
            self.emb = nn.Embedding(16, 4)

        def forward(self, x):
            return self.emb(self.pick(x)).sum(-1)

    class ArgmaxLayer(nn.Module):
        def forward(self, x):
            return x.argmax(-1)  # (B, T) int64: no gradient can flow through

    net = ArgmaxNet()
    with pytest.raises(ValueError, match="grad-free output .*int64"):
        neuron_importance(net, net.pick, [torch.randn(2, 3, 16)], total)


def test_layer_not_feeding_the_objective_is_an_error():
    model = Toy().eval().requires_grad_(False)
    with pytest.raises(ValueError, match="does not depend on layer ReLU"):
        neuron_importance(model, model.act, probes(1), lambda out: out.detach().sum())
    unused = nn.Linear(8, 16)
    with pytest.raises(ValueError, match="did not run"):
        neuron_importance(model, unused, probes(1), total)
    with pytest.raises(ValueError, match="scalar"):
        neuron_importance(model, model.act, probes(1), lambda out: out)


def test_hook_is_removed_after_use_and_after_errors():
    model = Toy().eval()
    neuron_importance(model, model.act, probes(1), total)
    with pytest.raises(ValueError):
        neuron_importance(model, model.act, probes(1), lambda out: out)
    assert not model.act._forward_hooks


@pytest.mark.parametrize(
    "scores, mass, expected",
    [
        ([1.0, 5.0, 3.0, 1.0], 0.5, [1]),  # 5/10 covers exactly half
        ([1.0, 5.0, 3.0, 1.0], 0.8, [1, 2]),  # 8/10
        ([1.0, 5.0, 3.0, 1.0], 0.85, [1, 2, 0]),  # tie 1.0 vs 1.0: lower index first
        ([1.0, 5.0, 3.0, 1.0], 1.0, [1, 2, 0, 3]),
        ([2.0, 2.0, 2.0, 2.0], 0.5, [0, 1]),  # all tied
        ([0.0, 0.0], 0.9, []),  # nothing matters
    ],
)
def test_protected_set_on_hand_made_scores(scores, mass, expected):
    got = protected_set(np.array(scores), mass)
    assert got.dtype == np.int64
    assert got.tolist() == expected
    assert protected_set(torch.tensor(scores), mass).tolist() == expected


def test_protected_set_rejects_bad_input():
    with pytest.raises(ValueError, match="mass"):
        protected_set(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        protected_set(np.array([1.0, -1.0]), 0.5)
    with pytest.raises(ValueError, match="finite"):
        protected_set(np.array([1.0, np.nan]), 0.5)


def test_importance_table_columns_and_values():
    t = importance_table(np.array([1.0, 5.0, 3.0, 1.0]), 0.8)
    assert isinstance(t, pa.Table)
    assert t.column_names == ["neuron", "score", "rank", "share", "cumulative_share", "protected"]
    d = t.to_pydict()
    assert d["neuron"] == [1, 2, 0, 3]
    assert d["score"] == [5.0, 3.0, 1.0, 1.0]
    assert d["rank"] == [1, 2, 3, 4]
    np.testing.assert_allclose(d["share"], [0.5, 0.3, 0.1, 0.1])
    np.testing.assert_allclose(d["cumulative_share"], [0.5, 0.8, 0.9, 1.0])
    assert d["protected"] == [True, True, False, False]
    assert t.schema.field("neuron").type == pa.int64() and t.schema.field("protected").type == pa.bool_()
