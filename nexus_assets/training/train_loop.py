"""Distillation training of one student tower from cached teacher features (Dagster-free).

`train_tower` runs two phases:

(a) joint: the backbone, every head and every anchor projection train together on every capability
    of the tower, the losses of all teachers combined with `weighted_sum` (text: SmolLM2 top-k KD +
    anchoring, MiniLM cosine + Gram + anchoring). One backbone pass serves every head.
(b) per capability, in config order: add the capability's LoRA adapter, freeze everything else, train
    adapter + head (+ its anchor projections) on its own losses plus `lwf_loss`, which keeps the
    *other* heads, run through the new adapter, where they were with adapters disabled. Those "old"
    outputs are computed on the fly under no_grad with adapters disabled: the backbone and the other
    heads are frozen in phase (b), so this equals recording them once before the phase, without
    holding (N, T, 49152) logits in memory.

Safety nets, all counted in the summary: gradient clipping (the pre-clip norm is logged), a NaN guard
(a non-finite loss or gradient skips the step; more than `max_nan_skips` raises naming the step), and
spike rollback (a loss above `spike_factor` x the running median restores the last in-memory good
snapshot, multiplies the anchoring weight by `anchor_escalation` and goes on with the next batch).

Resumability: every `checkpoint_every` steps (and at each phase end) rank 0 writes model, optimizer,
scheduler, RNG states, counters and history to `out_dir/checkpoints/` atomically. Batches are a pure
function of (seed, phase, step), so a run killed and restarted with the same `out_dir` resumes at
the checkpointed step and ends with bit-identical weights (tested).

DDP: under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1) the process group is initialised from the
environment (gloo on CPU, nccl on CUDA), each rank takes a disjoint slice of every global batch
(DistributedSampler-style; per-rank batch = `batch_size`), the loss module is wrapped in DDP, loss
values used for decisions (NaN guard, spikes) are all-reduced so every rank decides alike, and only
rank 0 writes files.

Imports no teacher code and no Dagster: tested with the teacher packages made unimportable.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nexus_assets.core.atomic import atomic_path, write_json
from .losses import (anchoring_loss, cosine_embedding_loss, gram_loss, lwf_loss, sequence_kd_loss,
                     topk_kd_loss, weighted_sum)
from .tower_data import INPUT_KEYS, TowerData
from nexus_assets.student.tower import StudentTower, save_tower
from nexus_assets.student.config import TowerConfig

__all__ = ["TrainConfig", "TrainHooks", "train_tower", "cpu_train_config", "TrainingDiverged"]

CHECKPOINT_DIR = "checkpoints"


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps or loss spikes; the message names the step."""


@dataclass
class TrainConfig:
    """How one tower is trained. Validated on construction; errors name the field."""

    seed: int = 0
    """Seeds model init, adapter init and the batch order (batches are a function of seed, phase, step)."""
    phase_a_steps: int = 200
    """Optimizer steps of phase (a), joint backbone + heads training."""
    phase_b_steps: int = 40
    """Optimizer steps of phase (b) per capability (adapter + head)."""
    batch_size: int = 8
    """Rows per batch per rank (the global batch is batch_size x world size)."""
    lr: float = 1e-3
    """Peak AdamW learning rate of phase (a)."""
    adapter_lr: float = 2e-3
    """Peak AdamW learning rate of phase (b) (LoRA + head)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    warmup_steps: int = 10
    """Linear warmup steps of each phase, then cosine decay to 10% of the peak."""
    temperature: float = 2.0
    """Softmax temperature of top-k KD and of LwF on logits heads."""
    w_kd: float = 1.0
    """Weight of the top-k KD losses (lm, asr, classes heads)."""
    w_anchor: float = 0.5
    """Base weight of the anchoring losses (times the alpha curriculum and the rollback escalation)."""
    w_gram: float = 0.5
    """Weight of the Gram (batch-relational) loss of embedding heads."""
    w_cosine: float = 1.0
    """Weight of the cosine loss of embedding heads."""
    w_lwf: float = 0.5
    """Weight of the learning-without-forgetting loss in phase (b)."""
    teacher_weights: dict[str, float] = field(default_factory=dict)
    """Teacher name -> multiplier of all of that teacher's losses (multi-teacher towers); missing = 1."""
    alpha_start: float = 1.0
    """Anchoring multiplier at the first step of a phase ..."""
    alpha_end: float = 0.2
    """... ramped linearly to this at the last step: anchor early for structure, then let KD lead."""
    eval_every: int = 20
    """Steps between validation passes (early stopping)."""
    val_batches: int = 4
    """Batches per validation pass (and per final train/val loss estimate)."""
    patience: int = 5
    """Validation passes without improvement before a phase stops early."""
    min_delta: float = 0.0
    """Improvement below this does not count for early stopping."""
    grad_clip: float = 1.0
    """Max global gradient norm (the pre-clip norm is logged)."""
    spike_factor: float = 4.0
    """A step whose loss exceeds spike_factor x the running median is a spike (rolled back)."""
    spike_window: int = 20
    """Accepted steps the running median is taken over."""
    spike_min_history: int = 8
    """Accepted steps needed before spikes are detected."""
    anchor_escalation: float = 2.0
    """Factor applied to the anchoring weight after each rollback."""
    max_rollbacks: int = 5
    """More rollbacks than this raise TrainingDiverged."""
    max_nan_skips: int = 10
    """More skipped non-finite steps than this raise TrainingDiverged."""
    checkpoint_every: int = 25
    """Steps between checkpoints (also the in-memory rollback snapshots)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    log_every: int = 10
    """Steps between log lines (TensorBoard gets every step)."""
    device: str = "auto"
    """"cpu", "cuda" or "auto" (cuda:LOCAL_RANK when available)."""
    num_threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""

    def __post_init__(self):
        ints = {"phase_a_steps": 0, "phase_b_steps": 0, "batch_size": 1, "warmup_steps": 0, "eval_every": 1,
                "val_batches": 1, "patience": 1, "spike_window": 2, "spike_min_history": 2, "max_rollbacks": 0,
                "max_nan_skips": 0, "checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 1, "num_threads": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}: must be an int >= {lo}, got {v!r}")
        pos = ("lr", "adapter_lr", "temperature", "grad_clip", "spike_factor", "anchor_escalation")
        nonneg = ("weight_decay", "w_kd", "w_anchor", "w_gram", "w_cosine", "w_lwf", "alpha_start", "alpha_end",
                  "min_delta")
        for name in pos + nonneg:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if name in pos else v >= 0)):
                raise ValueError(f"{name}: must be a finite number {'> 0' if name in pos else '>= 0'}, got {v!r}")
        for t, w in self.teacher_weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"teacher_weights: weight of {t!r} must be a finite number >= 0, got {w!r}")
        if self.spike_factor <= 1:
            raise ValueError(f"spike_factor: must be > 1, got {self.spike_factor}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_train_config(tower: str, init: str = "random", **overrides) -> TrainConfig:
    """The 2-core CPU default per tower, sized so the three towers train in about 6 minutes together.

    bench/training.py measured (2 cores, idle machine) text 9 / vision 110 / audio 30 samples/s in
    phase (a): about 3 minutes of pure steps; validation passes, checkpoints and a busy machine bring
    it to about 6. Text gets the smallest batch because its LM head and KD are (B, T, 49152) per step.
    """
    steps = {"text": (100, 20, 4), "vision": (300, 60, 16), "audio": (150, 30, 8)}
    if tower not in steps:
        raise ValueError(f"tower: {tower!r} has no CPU default; known: {sorted(steps)}")
    a, b, bs = steps[tower]
    base = {"phase_a_steps": a, "phase_b_steps": b, "batch_size": bs}
    if init == "carved":
        # a carved tower starts from the teacher's weights: a small learning rate heals the cut without
        # washing out what the weights already know (1e-3 would); the embedded default's step counts
        carved = {"text": (160, 30, 8), "vision": (200, 40, 32), "audio": (120, 30, 8)}
        a, b, bs = carved[tower]
        base = {"phase_a_steps": a, "phase_b_steps": b, "batch_size": bs, "lr": 2e-4, "adapter_lr": 1e-3}
    return TrainConfig(**{**base, **overrides})


@dataclass
class TrainHooks:
    """Test/instrumentation hooks; None = not called.

    batch(phase, step, batch) -> batch: may alter a batch (e.g. inject NaN).
    loss(phase, step, loss) -> loss: may alter the total loss before the checks (e.g. inject a spike).
    after_step(global_step): called after each step (e.g. to simulate a kill by raising).
    """

    batch: Callable[[str, int, dict], dict] | None = None
    loss: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None
    after_step: Callable[[int], None] | None = None


# ----------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        import torch.distributed as dist

        y = x.detach().clone().to(self.device)
        dist.all_reduce(y)
        return y / self.world


def _setup_dist(tc: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if world <= 1:
        return _Dist(device=device)
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


def _batch_indices(n: int, global_batch: int, seed: int, phase: int, step: int) -> list[int]:
    """Rows of one global batch: the stream of per-epoch permutations (seeded by seed, phase, epoch),
    cut into consecutive global batches. Stateless, so a resumed run sees exactly the same batches."""
    out, perms = [], {}
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch = pos // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(hash_int(seed, phase, epoch))
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][pos % n])
    return out


def hash_int(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


# ----------------------------------------------------------------------------------------------------
# Losses of a capability
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Anchor:
    mean: torch.Tensor  # (Ht,)
    components: torch.Tensor  # (r, Ht)
    importance: torch.Tensor | None  # (Ht,)
    scale: float  # 1 / mean squared teacher PCA score: a student predicting the mean scores ~1


def _anchor_context(cfg: TowerConfig, data: TowerData, pca, importance) -> dict[tuple[str, str], _Anchor]:
    """Per (capability, layer): the PCA subspace anchored (identity when no PCA is given, i.e. plain MSE
    around the training mean) and a scale that makes the loss O(1) whatever the teacher's units."""
    out = {}
    for cap, spec in cfg.capabilities.items():
        for layer, ht in spec.anchor_layers.items():
            h = data.tensors[f"{cap}:hidden.{layer}"].double()  # (N, Ht)
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
            out[(cap, layer)] = _Anchor(mean, comps, imp, 1.0 / max(ms, 1e-8))
    return out


def _task_losses(cap: str, kind: str, res: dict, batch: dict, tc: TrainConfig) -> dict[str, torch.Tensor]:
    """Unweighted distillation losses of one capability's head output (no anchoring)."""
    out = res["out"]
    if kind in ("lm", "asr"):
        mask = batch[f"{cap}:mask"]  # (B, T|U)
        return {"kd": sequence_kd_loss(out, batch[f"{cap}:topk_ids"], batch[f"{cap}:topk_logits"],
                                       batch[f"{cap}:logsumexp"], tc.temperature, mask)}
    if kind == "classes":
        t = batch[f"{cap}:logits"]  # (B, C): the full teacher distribution, so k = C, no tail bucket
        ids = torch.arange(t.shape[1], device=t.device).expand(t.shape[0], -1)
        return {"kd": topk_kd_loss(out, ids, t, torch.logsumexp(t, -1), tc.temperature)}
    t = batch[f"{cap}:embedding"]  # (B, D)
    losses = {"cosine": cosine_embedding_loss(out, t)}
    if out.shape[0] >= 2:
        losses["gram"] = gram_loss(out, t)
    return losses


_KIND_WEIGHT = {"kd": "w_kd", "cosine": "w_cosine", "gram": "w_gram"}


def _lwf_view(kind: str, cap: str, out: torch.Tensor, batch: dict) -> torch.Tensor:
    """Head output as rows for lwf_loss: sequence logits keep only counted positions -> (N, V)."""
    if kind in ("lm", "asr"):
        return out[batch[f"{cap}:mask"]]
    return out


class _LossModule(nn.Module):
    """forward(batch) -> (total loss, {name: detached loss}). Wrapped in DDP under torchrun.

    phase_caps: capabilities trained now; lwf_caps: heads kept in place by LwF (phase b only).
    """

    def __init__(self, tower: StudentTower, tc: TrainConfig, anchors: dict):
        super().__init__()
        self.tower = tower
        self.tc = tc
        self.anchors = anchors
        self.phase_caps: list[str] = []
        self.lwf_caps: list[str] = []
        self.anchor_mult = 1.0

    def forward(self, batch: dict):
        tower, tc = self.tower, self.tc
        inputs = {k: v for k, v in batch.items() if k in INPUT_KEYS}
        enc = tower.encode(inputs)
        losses, weights = {}, {}
        for cap in self.phase_caps:
            spec = tower.cfg.capabilities[cap]
            tw = tc.teacher_weights.get(spec.teacher, 1.0)
            res = tower.head_forward(cap, enc, inputs)
            for name, loss in _task_losses(cap, spec.kind, res, batch, tc).items():
                losses[f"{cap}.{name}"] = loss
                weights[f"{cap}.{name}"] = getattr(tc, _KIND_WEIGHT[name]) * tw
            if spec.anchor_layers:
                per_layer = []
                for layer in spec.anchor_layers:
                    a = self.anchors[(cap, layer)]
                    per_layer.append(a.scale * anchoring_loss(res["anchors"][layer], nn.Identity(),
                                                              batch[f"{cap}:hidden.{layer}"], a.mean, a.components,
                                                              a.importance))
                losses[f"{cap}.anchor"] = torch.stack(per_layer).mean()
                weights[f"{cap}.anchor"] = tc.w_anchor * self.anchor_mult * tw
        if self.lwf_caps:
            new, kinds = {}, {}
            for cap in self.lwf_caps:
                kind = tower.cfg.capabilities[cap].kind
                new[cap] = _lwf_view(kind, cap, tower.head_forward(cap, enc, inputs)["out"], batch)
                kinds[cap] = "embedding" if kind == "embedding" else "logits"
            with torch.no_grad(), tower.adapters_disabled():
                enc0 = tower.encode(inputs)
                old = {cap: _lwf_view(tower.cfg.capabilities[cap].kind, cap,
                                      tower.head_forward(cap, enc0, inputs)["out"], batch) for cap in self.lwf_caps}
            losses["lwf"] = lwf_loss(new, old, kinds, tc.temperature)
            weights["lwf"] = tc.w_lwf
        total, values = weighted_sum(losses, weights)
        return total, values


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def _latest_checkpoint(out_dir: Path) -> Path | None:
    files = sorted((out_dir / CHECKPOINT_DIR).glob("ckpt-*.pt"))
    return files[-1] if files else None


def _write_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    path = out_dir / CHECKPOINT_DIR / f"ckpt-{state['global_step']:07d}-p{state['phase_idx']}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted((out_dir / CHECKPOINT_DIR).glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()} if device.type != "cpu" else batch


def params_sha256(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name + bytes), in state_dict order."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def train_tower(
    cfg: TowerConfig,
    data_train: TowerData,
    data_val: TowerData | None,
    train_cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    pca: Mapping[tuple[str, str], tuple[Any, Any]] | None = None,
    importance: Mapping[tuple[str, str], Any] | None = None,
    log: Callable[[str], None] = print,
    hooks: TrainHooks | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Distil one tower (phases a and b, see the module docstring) and write it to `out_dir`.

    Args:
        cfg: the tower architecture.
        data_train: training rows (`load_tower_data(..., splits=("train",))`).
        data_val: validation rows for early stopping and the final val losses; None disables both.
        train_cfg: the TrainConfig.
        out_dir: gets tower/ (save_tower), summary.json, training_curve.png, tb/, checkpoints/.
            Called again with the same out_dir, training resumes from the newest checkpoint.
        pca: (teacher, layer) -> (mean (Ht,), components (r, Ht)) of the anchored subspace; layers
            missing here are anchored in the full space around the training mean.
        importance: (teacher, layer) -> (Ht,) non-negative per-dimension weights for anchoring.
        log: receives one-line progress messages (rank 0 only).
        hooks: test hooks (TrainHooks).
        init_state: StudentTower state-dict entries to start from (a carved tower's teacher weights);
            every backbone parameter must be covered. A resumed run starts from its checkpoint instead.

    Returns:
        The summary dict (also written to summary.json by rank 0).
    """
    tc, hooks = train_cfg, hooks or TrainHooks()
    out_dir = Path(out_dir)
    t_start = time.time()
    dd = _setup_dist(tc)
    say = log if dd.is_main else (lambda msg: None)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if len(data_train) == 0:
        raise ValueError("data_train: no rows")

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    random.seed(tc.seed)
    tower = StudentTower(cfg)
    if init_state is not None:
        missing, unexpected = tower.load_state_dict(dict(init_state), strict=False)
        missing = [k for k in missing if k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"init_state for tower {cfg.name!r}: missing backbone keys {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    tower = tower.to(dd.device)
    anchors = _anchor_context(cfg, data_train, pca, importance)
    for a in anchors.values():
        a.mean, a.components = a.mean.to(dd.device), a.components.to(dd.device)
        a.importance = None if a.importance is None else a.importance.to(dd.device)
    lossmod = _LossModule(tower, tc, anchors)
    caps = list(cfg.capabilities)
    phases = ["a"] + [f"b:{c}" for c in caps]

    st: dict[str, Any] = {"phase_idx": 0, "phase_step": 0, "global_step": 0, "rollbacks": 0, "nan_skips": 0,
                          "anchor_boost": 1.0, "loss_window": [], "best_val": math.inf, "bad_evals": 0,
                          "phase_log": {}, "history": {"train_loss": [], "grad_norm": [], "val_loss": [], "val_step": []}}
    resumed_from = None
    ckpt = _latest_checkpoint(out_dir)
    opt_state = sched_state = None
    if ckpt is not None:
        saved = torch.load(ckpt, map_location=dd.device, weights_only=False)
        if saved["tower"] != cfg.to_dict() or saved["train"] != tc.to_dict():
            raise ValueError(f"{ckpt}: written for another tower/train config; use a fresh out_dir")
        for cap in saved["adapters"]:
            tower.add_adapter(cap)
        tower.load_state_dict(saved["model"])
        st = saved["state"]
        opt_state, sched_state = saved.get("optimizer"), saved.get("scheduler")
        _set_rng_state(saved["rng"])
        resumed_from = st["global_step"]
        where = (f"phase {phases[st['phase_idx']]} step {st['phase_step']}" if st["phase_idx"] < len(phases)
                 else "every phase already complete")  # a finished run materialized again
        say(f"[{cfg.name}] resuming from {ckpt.name}: {where}")

    writer = None
    if dd.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"), purge_step=st["global_step"])

    def checkpoint_state(opt, sched) -> dict:
        return {"tower": cfg.to_dict(), "train": tc.to_dict(), "adapters": list(tower.adapters),
                "model": tower.state_dict(), "optimizer": None if opt is None else opt.state_dict(),
                "scheduler": None if sched is None else sched.state_dict(), "rng": _rng_state(),
                "state": copy.deepcopy(st), "global_step": st["global_step"], "phase_idx": st["phase_idx"]}

    n_train = len(data_train)
    gb = tc.batch_size * dd.world

    for phase_idx in range(st["phase_idx"], len(phases)):
        phase = phases[phase_idx]
        if phase == "a":
            steps, lr = tc.phase_a_steps, tc.lr
            lossmod.phase_caps, lossmod.lwf_caps = caps, []
            for p in tower.parameters():
                p.requires_grad_(True)
        else:
            cap = phase[2:]
            steps, lr = tc.phase_b_steps, tc.adapter_lr
            if cap not in tower.adapters:
                tower.add_adapter(cap)
            tower.set_capability(cap)
            lossmod.phase_caps, lossmod.lwf_caps = [cap], [c for c in caps if c != cap]
            for p in tower.parameters():
                p.requires_grad_(False)
            for p in tower.lora_parameters(cap) + tower.head_parameters(cap):
                p.requires_grad_(True)
        params = [p for p in tower.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay)
        total_steps = max(steps, 1)

        def lr_lambda(s, _w=tc.warmup_steps, _n=total_steps):
            if s < _w:
                return (s + 1) / _w
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - _w) / max(_n - _w, 1))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
            sched.load_state_dict(sched_state)
            opt_state = sched_state = None
        model = lossmod
        if dd.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(lossmod, device_ids=[dd.device.index] if dd.device.type == "cuda" else None,
                        find_unused_parameters=True)
        good = {"model": copy.deepcopy(tower.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                "sched": copy.deepcopy(sched.state_dict())}
        plog = st["phase_log"].setdefault(phase, {"steps_run": 0, "stopped_early": False, "start_step": st["global_step"]})
        tower.train()
        say(f"[{cfg.name}] phase {phase}: {steps} steps, {sum(p.numel() for p in params):,} trainable params")

        step = st["phase_step"]
        while step < steps:
            alpha = tc.alpha_start + (tc.alpha_end - tc.alpha_start) * step / max(steps - 1, 1)
            lossmod.anchor_mult = alpha * st["anchor_boost"]
            idx = _batch_indices(n_train, gb, tc.seed, phase_idx, step)[dd.rank::dd.world]
            batch = data_train.batch(idx)
            if hooks.batch:
                batch = hooks.batch(phase, step, batch)
            batch = _to_device(batch, dd.device)
            total, parts = model(batch)
            if hooks.loss:
                total = hooks.loss(phase, step, total)
            loss_val = float(dd.mean(total.detach()))
            action = "ok"
            grad_norm = float("nan")
            window = st["loss_window"]
            if not math.isfinite(loss_val):
                action = "nan_loss"
            elif (len(window) >= tc.spike_min_history
                  and loss_val > tc.spike_factor * statistics.median(window)):
                action = "spike"
            if action == "ok":
                opt.zero_grad(set_to_none=True)
                total.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
                if not math.isfinite(grad_norm):
                    action = "nan_grad"
                    opt.zero_grad(set_to_none=True)
                else:
                    opt.step()
                    sched.step()
            elif dd.world > 1:
                # DDP expects a backward after every training forward: run a zero one, drop its grads.
                (total * 0.0).backward()
                opt.zero_grad(set_to_none=True)
            if action.startswith("nan"):
                st["nan_skips"] += 1
                say(f"[{cfg.name}] step {st['global_step']} ({phase} {step}): non-finite "
                    f"{'loss' if action == 'nan_loss' else 'gradient'}, skipped ({st['nan_skips']} so far)")
                if st["nan_skips"] > tc.max_nan_skips:
                    raise TrainingDiverged(f"tower {cfg.name!r}: {st['nan_skips']} non-finite steps > max_nan_skips="
                                           f"{tc.max_nan_skips}, last at global step {st['global_step']} "
                                           f"(phase {phase} step {step})")
            elif action == "spike":
                st["rollbacks"] += 1
                med = statistics.median(window)
                tower.load_state_dict(good["model"])
                opt.load_state_dict(good["opt"])
                sched.load_state_dict(good["sched"])
                st["anchor_boost"] *= tc.anchor_escalation
                # the window keeps the pre-spike losses: a loss level that stays 4x up keeps rolling
                # back until max_rollbacks says the run diverged, instead of becoming the new normal
                say(f"[{cfg.name}] step {st['global_step']} ({phase} {step}): loss {loss_val:.4g} > "
                    f"{tc.spike_factor} x median {med:.4g}: rolled back to the last snapshot, anchoring weight "
                    f"x{st['anchor_boost']:g} (rollback {st['rollbacks']})")
                if st["rollbacks"] > tc.max_rollbacks:
                    raise TrainingDiverged(f"tower {cfg.name!r}: {st['rollbacks']} rollbacks > max_rollbacks="
                                           f"{tc.max_rollbacks} at global step {st['global_step']}")
            else:
                window.append(loss_val)
                del window[:-tc.spike_window]
                st["history"]["train_loss"].append(loss_val)
                st["history"]["grad_norm"].append(grad_norm)
            if writer is not None:
                g = st["global_step"]
                writer.add_scalar(f"loss/{phase}", loss_val, g)
                writer.add_scalar("grad_norm", grad_norm, g)
                writer.add_scalar("lr", sched.get_last_lr()[0], g)
                writer.add_scalar("anchor_weight", tc.w_anchor * lossmod.anchor_mult, g)
                for k, v in parts.items():
                    writer.add_scalar(f"parts/{k}", v, g)
            if dd.is_main and step % tc.log_every == 0:
                say(f"[{cfg.name}] {phase} step {step}/{steps} loss {loss_val:.4f} grad {grad_norm:.3g} "
                    + " ".join(f"{k}={v:.3f}" for k, v in parts.items()))
            step += 1
            st["phase_step"] = step
            st["global_step"] += 1
            plog["steps_run"] += 1

            stop = False
            if data_val is not None and len(data_val) and (step % tc.eval_every == 0 or step == steps):
                val = _evaluate(tower, lossmod.phase_caps, data_val, tc, dd.device)
                st["history"]["val_loss"].append(val)
                st["history"]["val_step"].append(st["global_step"])
                if writer is not None:
                    writer.add_scalar(f"val/{phase}", val, st["global_step"])
                if val < st["best_val"] - tc.min_delta:
                    st["best_val"], st["bad_evals"] = val, 0
                else:
                    st["bad_evals"] += 1
                    if st["bad_evals"] >= tc.patience and step < steps:
                        say(f"[{cfg.name}] phase {phase}: early stop at step {step} (val {val:.4f}, best "
                            f"{st['best_val']:.4f})")
                        plog["stopped_early"] = True
                        stop = True
                tower.train()
            if stop:
                break
            if step % tc.checkpoint_every == 0 and step < steps:
                good = {"model": copy.deepcopy(tower.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                        "sched": copy.deepcopy(sched.state_dict())}
                if dd.is_main:
                    _write_checkpoint(out_dir, checkpoint_state(opt, sched), tc.keep_checkpoints)
            if hooks.after_step:
                hooks.after_step(st["global_step"])

        # phase end: next phase starts fresh (new optimizer, fresh early-stopping state)
        st["phase_idx"], st["phase_step"] = phase_idx + 1, 0
        st["best_val"], st["bad_evals"], st["loss_window"] = math.inf, 0, []
        if dd.is_main:
            _write_checkpoint(out_dir, checkpoint_state(None, None), tc.keep_checkpoints)

    # -- final losses, artifacts ---------------------------------------------------------------------
    tower.eval()
    final = {}
    for cap in caps:
        tower.set_capability(cap)
        final[cap] = {"train": _evaluate(tower, [cap], data_train, tc, dd.device, per_part=True)}
        if data_val is not None and len(data_val):
            final[cap]["val"] = _evaluate(tower, [cap], data_val, tc, dd.device, per_part=True)
    summary = {
        "tower": cfg.name,
        "capabilities": caps,
        "final_losses": final,
        "steps": st["global_step"],
        "phases": st["phase_log"],
        "rollbacks": st["rollbacks"],
        "nan_skips": st["nan_skips"],
        "anchor_boost": st["anchor_boost"],
        "resumed_from_step": resumed_from,
        "seconds": round(time.time() - t_start, 2),
        "world_size": dd.world,
        "num_parameters": sum(p.numel() for p in tower.parameters()),
        "param_sha256": params_sha256(tower),
        "history": st["history"],
        "train_rows": len(data_train),
        "val_rows": 0 if data_val is None else len(data_val),
        "train_config": tc.to_dict(),
        "tower_config": cfg.to_dict(),
    }
    if dd.is_main:
        save_tower(tower, out_dir / "tower")
        _curve(st["history"], out_dir / "training_curve.png", f"tower {cfg.name}")
        write_json(out_dir / "summary.json", summary)
        writer.close()
        say(f"[{cfg.name}] done: {st['global_step']} steps in {summary['seconds']} s, "
            f"{st['rollbacks']} rollbacks, {st['nan_skips']} NaN skips")
    if dd.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if dd.owns_group:
            dist.destroy_process_group()
    return summary


@torch.no_grad()
def _evaluate(tower: StudentTower, caps: list[str], data: TowerData, tc: TrainConfig, device,
              per_part: bool = False):
    """Mean task loss (KD / cosine / Gram, no anchoring or LwF: comparable across the alpha curriculum)
    over the first `val_batches` batches of `data` in row order, each capability with its adapter."""
    was_training = tower.training
    tower.eval()
    sums: dict[str, float] = {}
    count = 0
    for b in range(min(tc.val_batches, math.ceil(len(data) / tc.batch_size))):
        idx = list(range(b * tc.batch_size, min((b + 1) * tc.batch_size, len(data))))
        batch = _to_device(data.batch(idx), device)
        inputs = {k: v for k, v in batch.items() if k in INPUT_KEYS}
        for cap in caps:
            if tower.adapters:
                tower.set_capability(cap)
            res = tower.head_forward(cap, tower.encode(inputs), inputs)
            for name, loss in _task_losses(cap, tower.cfg.capabilities[cap].kind, res, batch, tc).items():
                sums[f"{cap}.{name}"] = sums.get(f"{cap}.{name}", 0.0) + float(loss)
        count += 1
    tower.train(was_training)
    means = {k: v / max(count, 1) for k, v in sums.items()}
    return means if per_part else float(sum(means.values()))


def _curve(history: dict, path: Path, title: str) -> None:
    """Train loss per accepted step and validation loss held between evaluations, one PNG."""
    from nexus_assets.core.plots import training_curve_png

    train = history["train_loss"]
    series = {"train_loss": train}
    if history["val_loss"]:
        val = [float("nan")] * len(train)
        j = 0
        steps = history["val_step"]
        for i in range(len(train)):
            while j < len(steps) and steps[j] <= i + 1:
                j += 1
            if j:
                val[i] = history["val_loss"][j - 1]
        series["val_loss"] = val
    if train:
        training_curve_png(series, path, title)
