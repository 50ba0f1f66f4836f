"""The training objective of one tower: per-capability task losses, anchoring inside the protected
subspaces, LwF in phase (b), combined per teacher (`TowerObjective`, the module DDP wraps)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nexus_assets.student.config import TowerConfig
from nexus_assets.student.tower import StudentTower

from .config import TrainConfig
from .losses import (anchoring_loss, cosine_embedding_loss, gram_loss, lwf_loss, neighbour_kd_loss, token_state_loss,
                     next_token_ce_loss, sequence_kd_loss, topk_kd_loss, weighted_sum)
from .tower_data import INPUT_KEYS, TowerData


@dataclass
class Anchor:
    mean: torch.Tensor  # (Ht,)
    components: torch.Tensor  # (r, Ht)
    importance: torch.Tensor | None  # (Ht,)
    scale: float  # 1 / mean squared teacher PCA score: a student predicting the mean scores ~1


def anchor_context(cfg: TowerConfig, data: TowerData, pca, importance) -> dict[tuple[str, str], Anchor]:
    """Per (capability, layer): the PCA subspace anchored (identity when no PCA is given, i.e. plain MSE
    around the training mean) and a scale that makes the loss O(1) whatever the teacher's units."""
    out = {}
    for cap, spec in cfg.capabilities.items():
        for layer, ht in spec.anchor_layers.items():
            h = data.tensors[f"{cap}:hidden.{layer}"].double()  # (N, Ht)
            rows = data.tensors.get(f"{cap}:rows")
            if rows is not None:  # rows the teacher has no features for are zeros: leave them out
                h = h[rows]
            key = (spec.teacher, layer)
            if pca and key in pca and pca[key] is not None:
                mean, comps = (torch.as_tensor(np.asarray(t), dtype=torch.float32) for t in pca[key])
                if mean.shape != (ht,) or comps.ndim != 2 or comps.shape[1] != ht:
                    raise ValueError(f"pca[{key}]: mean {tuple(mean.shape)} / components {tuple(comps.shape)} "
                                     f"do not match teacher width {ht}")
            else:
                mean, comps = h.mean(0).float(), torch.eye(ht)
            imp = None
            if importance and key in importance and importance[key] is not None:
                imp = torch.as_tensor(np.asarray(importance[key]), dtype=torch.float32)
            scores = (h - mean.double()) @ comps.double().T  # (N, r)
            ms = float((scores**2).mean())
            out[(cap, layer)] = Anchor(mean, comps, imp, 1.0 / max(ms, 1e-8))
    return out


def neighbour_banks(cfg: TowerConfig, data: TowerData, tc: TrainConfig) -> dict[str, torch.Tensor]:
    """Per embedding capability: the teacher embeddings of `tc.neighbour_bank_rows` training rows (a draw
    seeded by tc.seed; every row when 0 or fewer rows), the fixed anchors of `neighbour_kd_loss`. Empty
    when the loss is off (`tc.w_neighbour` 0)."""
    if tc.w_neighbour == 0:
        return {}
    banks = {}
    for cap, spec in cfg.capabilities.items():
        if spec.kind != "embedding":
            continue
        emb = data.tensors[f"{cap}:embedding"]  # (N, D)
        rows = data.tensors.get(f"{cap}:rows")
        if rows is not None:
            emb = emb[rows]
        if tc.neighbour_bank_rows and emb.shape[0] > tc.neighbour_bank_rows:
            gen = torch.Generator().manual_seed(tc.seed)
            emb = emb[torch.randperm(emb.shape[0], generator=gen)[: tc.neighbour_bank_rows]]
        if emb.shape[0] < 2:
            raise ValueError(f"w_neighbour: capability {cap!r} has {emb.shape[0]} training rows with teacher "
                             "embeddings; its neighbour bank needs at least 2")
        banks[cap] = emb.float().clone()
    return banks


@dataclass
class StateTarget:
    """One teacher layer's cached per-token states (`extraction.state_layers`) and the student block they
    teach: the carve's `anchor_map` index into the backbone's hidden states (block `index` - 1's output)."""

    layer: str
    index: int
    mean: torch.Tensor  # (H,)
    components: torch.Tensor  # (r, H)
    variances: torch.Tensor  # (r,)


def state_targets(tower: StudentTower, data: TowerData, tc: TrainConfig) -> tuple[dict[str, list[StateTarget]], list[str]]:
    """Per "lm" capability, the cached state layers whose depth the carve kept (a block ends there), and a
    line per capability saying what is used and what not (empty when `tc.w_state` is 0). A backbone without
    an `anchor_map` (random init) has no teacher depth to match: none."""
    if tc.w_state == 0:
        return {}, []
    index = getattr(tower.base_backbone(), "anchor_map", None) or {}
    out, lines = {}, []
    for cap, basis in sorted(data.state_basis.items()):
        used = [StateTarget(layer, int(index[layer]), b["mean"].float(), b["components"].float(), b["variances"].float())
                for layer, b in sorted(basis.items(), key=lambda kv: int(kv[0].split(".")[1])) if layer in index]
        skipped = sorted(set(basis) - {t.layer for t in used})
        if used:
            out[cap] = used
        lines.append(f"{cap}: per-token state loss on teacher {[t.layer for t in used]} -> student hidden states "
                     f"{[t.index for t in used]}" + (f"; {skipped} skipped (no kept block ends there)" if skipped else ""))
    return out, lines


def capability_rows(cap: str, res: dict, batch: dict) -> tuple[dict, dict] | None:
    """The head output and batch restricted to the rows `cap`'s teacher has features for ("<cap>:rows",
    see tower_data); unchanged when there is no mask, None when the batch holds none of its rows."""
    rows = batch.get(f"{cap}:rows")
    if rows is None:
        return res, batch
    if not bool(rows.any()):
        return None
    sub = {k: (v[rows] if k.startswith(f"{cap}:") else v) for k, v in batch.items()}
    out = {k: v[rows] for k, v in res.items() if k in ("out", "hidden")}
    out["anchors"] = {layer: a[rows] for layer, a in res.get("anchors", {}).items()}
    return out, sub


def task_losses(cap: str, kind: str, res: dict, batch: dict, tc: TrainConfig,
                bank: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Unweighted distillation losses of one capability's head output (no anchoring); `bank`: the
    capability's neighbour bank (`neighbour_banks`), None = no neighbour-ranking loss."""
    out = res["out"]
    if kind in ("lm", "asr"):
        mask = batch[f"{cap}:mask"]  # (B, T|U)
        losses = {"kd": sequence_kd_loss(out, batch[f"{cap}:topk_ids"], batch[f"{cap}:topk_logits"],
                                         batch[f"{cap}:logsumexp"], tc.temperature, mask,
                                         reverse=tc.kd_divergence == "reverse", skew=tc.kd_skew)}
        if kind == "lm" and tc.w_ce > 0:
            losses["ce"] = next_token_ce_loss(out, batch[f"{cap}:next_ids"], batch[f"{cap}:next_valid"])
        return losses
    if kind == "classes":
        t = batch[f"{cap}:logits"]  # (B, C): the full teacher distribution, so k = C, no tail bucket
        ids = torch.arange(t.shape[1], device=t.device).expand(t.shape[0], -1)
        return {"kd": topk_kd_loss(out, ids, t, torch.logsumexp(t, -1), tc.temperature,
                                   reverse=tc.kd_divergence == "reverse", skew=tc.kd_skew)}
    t = batch[f"{cap}:embedding"]  # (B, D)
    losses = {"cosine": cosine_embedding_loss(out, t)}
    if out.shape[0] >= 2:
        losses["gram"] = gram_loss(out, t)
    if bank is not None:
        losses["neighbour"] = neighbour_kd_loss(out, t, bank, tc.neighbour_temperature)
    return losses


_KIND_WEIGHT = {"kd": "w_kd", "ce": "w_ce", "cosine": "w_cosine", "gram": "w_gram", "neighbour": "w_neighbour"}


def task_loss_weight(name: str, tc: TrainConfig, teacher_weight: float = 1.0) -> float:
    """The TrainConfig weight of one `task_losses` entry ("kd", "ce", "cosine", "gram", "neighbour") times the
    teacher's."""
    return getattr(tc, _KIND_WEIGHT[name]) * teacher_weight


def lwf_view(kind: str, cap: str, out: torch.Tensor, batch: dict) -> torch.Tensor:
    """Head output as rows for lwf_loss: sequence logits keep only counted positions -> (N, V)."""
    if kind in ("lm", "asr"):
        return out[batch[f"{cap}:mask"]]
    return out


def pass_exit_block(tower: StudentTower, capability: str, step_caps: Sequence[str]) -> int:
    """The exit block of the backbone pass `capability`'s head reads in a step that trains `step_caps`
    (0 = the full pass). An early-exit head gets its own k-block pass, as at inference, unless the
    backbone's exit pass is a prefix of its full pass (`exit_is_prefix`: a causal LM, whose first k
    blocks see the same inputs either way) and the step runs the full pass anyway: then block k of that
    pass is the same states, with no second pass."""
    k = tower.cfg.capabilities[capability].exit_block
    if k and getattr(tower.base_backbone(), "exit_is_prefix", False) and any(
            not tower.cfg.capabilities[c].exit_block for c in step_caps):
        return 0
    return k


class TowerObjective(nn.Module):
    """forward(batch) -> (total loss, {name: detached loss}). Wrapped in DDP under torchrun.

    phase_caps: capabilities trained now; lwf_caps: heads kept in place by LwF (phase b only).
    """

    def __init__(self, tower: StudentTower, tc: TrainConfig, anchors: dict, banks: dict | None = None,
                 states: dict | None = None):
        super().__init__()
        self.tower = tower
        self.tc = tc
        self.anchors = anchors
        self.banks = banks or {}  # capability -> (M, D) teacher embeddings (neighbour_banks)
        self.states = states or {}  # "lm" capability -> [StateTarget] (state_targets)
        self.use_banks = True  # off in phase (a) unless tc.neighbour_in_phase_a (set by setup_phase)
        self.use_states = True  # phase (a) only (set by setup_phase)
        self.phase_caps: list[str] = []
        self.lwf_caps: list[str] = []
        self.anchor_mult = 1.0

    def forward(self, batch: dict):
        tower, tc = self.tower, self.tc
        inputs = {k: v for k, v in batch.items() if k in INPUT_KEYS}
        passes: dict[int, tuple] = {}  # exit block -> backbone pass: each head trains on the pass it gets at inference
        step_caps = (*self.phase_caps, *self.lwf_caps)

        def enc(cap: str, cache: dict = passes):
            k = pass_exit_block(tower, cap, step_caps)
            if k not in cache:
                cache[k] = tower.encode(inputs, [cap] if k else [])
            return cache[k]

        losses, weights = {}, {}
        for cap in self.phase_caps:
            spec = tower.cfg.capabilities[cap]
            tw = tc.teacher_weights.get(spec.teacher, 1.0)
            kept = capability_rows(cap, tower.head_forward(cap, enc(cap), inputs), batch)
            if kept is None:  # no row of this batch has the capability's teacher features
                continue
            res, cb = kept
            bank = self.banks.get(cap) if self.use_banks else None
            for name, loss in task_losses(cap, spec.kind, res, cb, tc, bank).items():
                losses[f"{cap}.{name}"] = loss
                weights[f"{cap}.{name}"] = task_loss_weight(name, tc, tw)
            if self.use_states and cap in self.states and tc.w_state > 0:
                state = self._state_loss(cap, enc(cap), batch)
                if state is not None:
                    losses[f"{cap}.state"] = state
                    weights[f"{cap}.state"] = tc.w_state * tw
            if spec.anchor_layers and tc.w_anchor > 0:  # off: no anchoring loss (the heads' anchor projections still run)
                per_layer = []
                for layer in spec.anchor_layers:
                    a = self.anchors[(cap, layer)]
                    per_layer.append(a.scale * anchoring_loss(res["anchors"][layer], nn.Identity(),
                                                              cb[f"{cap}:hidden.{layer}"], a.mean, a.components,
                                                              a.importance))
                losses[f"{cap}.anchor"] = torch.stack(per_layer).mean()
                weights[f"{cap}.anchor"] = tc.w_anchor * self.anchor_mult * tw
        if self.lwf_caps:
            new, kinds = {}, {}
            for cap in self.lwf_caps:
                kind = tower.cfg.capabilities[cap].kind
                new[cap] = lwf_view(kind, cap, tower.head_forward(cap, enc(cap), inputs)["out"], batch)
                kinds[cap] = "embedding" if kind == "embedding" else "logits"
            with torch.no_grad(), tower.adapters_disabled():
                frozen: dict[int, tuple] = {}
                old = {cap: lwf_view(tower.cfg.capabilities[cap].kind, cap,
                                      tower.head_forward(cap, enc(cap, frozen), inputs)["out"], batch)
                       for cap in self.lwf_caps}
            losses["lwf"] = lwf_loss(new, old, kinds, tc.temperature)
            weights["lwf"] = tc.w_lwf
        if not losses:  # every phase capability skipped this batch: a zero step that still backpropagates
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad), {}
        total, values = weighted_sum(losses, weights)
        return total, values

    def _state_loss(self, cap: str, enc, batch: dict) -> torch.Tensor | None:
        """Mean over the capability's state layers of `token_state_loss` on the tokens its KD scores, each row's
        first left out (the teacher's attention sink, cached as zeros), like any other sink token (the loss's
        `sink_factor`). None: a pass that stopped early."""
        hiddens, _ = enc
        mask = batch[f"{cap}:mask"].bool().clone()
        mask[:, 0] = False
        rows = batch.get(f"{cap}:rows")
        per = []
        for t in self.states[cap]:
            if t.index > len(hiddens) or t.index < 1:
                return None
            h, target, m = hiddens[t.index - 1], batch[f"{cap}:state.{t.layer}"], mask
            if rows is not None:
                h, target, m = h[rows], target[rows], m[rows]
            per.append(token_state_loss(h, target, t.mean, t.components, t.variances, m))
        return torch.stack(per).mean()
