"""The small parts the train loop is made of, each testable on its own: distributed setup, the stateless
batch order, the loop state, the step guard (ok / NaN / spike), phase setup (what trains, optimizer and
schedule), evaluation, the training curve and the parameter hash."""
from __future__ import annotations

import hashlib
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers.trainer_pt_utils import get_length_grouped_indices

from nexus_assets.core.precision import native_bf16, resolve_dtype
from nexus_assets.student.config import adapter_name
from nexus_assets.student.modules import PooledHead, _pool
from nexus_assets.student.tower import StudentTower

from .config import TrainConfig, check_lr_decay
from .objective import TowerObjective, capability_rows, task_loss_weight, task_losses
from .tower_data import INPUT_KEYS, TowerData


@dataclass
class Dist:
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


def setup_dist(tc: TrainConfig) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if world <= 1:
        return Dist(device=device)
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


def autocast_bf16(mixed_precision: str, device: torch.device, native=native_bf16) -> bool:
    """TrainConfig.mixed_precision resolved on the training device by the rule every "auto" dtype follows
    (core.precision.resolve_dtype): "bf16" always, "auto" where native."""
    setting = {"no": "float32", "bf16": "bfloat16"}.get(mixed_precision, mixed_precision)
    return resolve_dtype(setting, device, native) == "bfloat16"


def compile_backbone_on(setting: str, phase_a_steps: int, device: torch.device, works=None) -> bool:
    """TrainConfig.compile_backbone resolved: "yes" always, "auto" when phase (a) is long enough to pay for
    compiling (COMPILE_MIN_STEPS) and `works(device)` (default: `inductor_works`) says the toolchain runs."""
    from .config import COMPILE_MIN_STEPS

    if setting == "no" or (setting == "auto" and phase_a_steps < COMPILE_MIN_STEPS):
        return False
    return setting == "yes" or bool((works or inductor_works)(device))


_INDUCTOR_WORKS: dict[str, bool] = {}


def inductor_works(device: torch.device) -> bool:
    """Whether torch.compile's default backend compiles and runs a forward + backward on `device` (on a CPU
    it needs a C++ compiler and Python's headers): checked once per device type with a probe function."""
    kind = torch.device(device).type
    if kind not in _INDUCTOR_WORKS:
        try:
            x = torch.ones(4, device=device, requires_grad=True)
            torch.compile(lambda t: (t * 2).sin().sum(), dynamic=False)(x).backward()
            _INDUCTOR_WORKS[kind] = bool(torch.allclose(x.grad, 2 * torch.cos(torch.full_like(x, 2.0))))
        except Exception:  # noqa: BLE001 - any failure to build or run means: stay eager
            _INDUCTOR_WORKS[kind] = False
    return _INDUCTOR_WORKS[kind]


def set_backbone_compiled(tower: StudentTower, enabled: bool) -> bool:
    """Turn torch.compile of the tower's backbone on or off where the backbone supports it; True = now on."""
    backbone = tower.base_backbone()
    if not hasattr(backbone, "set_compiled"):
        return False
    backbone.set_compiled(enabled)
    return enabled


def batch_indices(n: int, global_batch: int, seed: int, phase: int, step: int,
                  lengths: Sequence[int] | None = None, sources: Sequence[str] | None = None,
                  source_alpha: float = 1.0) -> list[int]:
    """Rows of one global batch: the stream of per-epoch orders (seeded by seed, phase, epoch), cut into
    consecutive global batches. Stateless, so a resumed run sees exactly the same batches.

    With `lengths` (one per row), each epoch's order is transformers' length-grouped one (random
    mega-batches of 50 batches, sorted by length inside): a batch is cut to its longest row, so rows of
    like length waste less compute on padding. With `sources` (one per row) and `source_alpha` < 1, an
    epoch is n rows drawn per source (`source_epoch_rows`) instead of every row once."""
    for name, v in (("lengths", lengths), ("sources", sources)):
        if v is not None and len(v) != n:
            raise ValueError(f"{name}: {len(v)} values for {n} rows")
    out, perms = [], {}
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch = pos // n
        if epoch not in perms:
            g = torch.Generator().manual_seed(hash_int(seed, phase, epoch))
            rows = (source_epoch_rows(sources, source_alpha, g) if sources is not None and source_alpha != 1.0
                    else list(range(n)))
            order = (torch.randperm(n, generator=g).tolist() if lengths is None
                     else get_length_grouped_indices([lengths[r] for r in rows], global_batch, generator=g))
            perms[epoch] = [rows[i] for i in order]
        out.append(perms[epoch][pos % n])
    return out


def source_epoch_rows(sources: Sequence[str], alpha: float, generator: torch.Generator) -> list[int]:
    """One epoch of len(sources) rows in which source s gets a share proportional to n_s ** alpha (the
    temperature sampling multilingual pretraining uses across languages): alpha 1 keeps the rows' own mix,
    0 gives every source the same share. Rows of one source are drawn without replacement, cycling through
    fresh permutations when its share exceeds its rows. So a small source keeps its steps when big ones
    grow: at fixed steps the student spends them in proportion to what it is shown. `alpha`'s range is
    TrainConfig.source_alpha's to check (the one place a user sets it)."""
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_source.setdefault(s, []).append(i)
    names = sorted(by_source)
    weight = [len(by_source[s]) ** alpha for s in names]
    exact = [len(sources) * w / sum(weight) for w in weight]
    quota = [math.floor(x) for x in exact]
    for j in sorted(range(len(names)), key=lambda j: (quota[j] - exact[j], j))[: len(sources) - sum(quota)]:
        quota[j] += 1  # largest remainders first, so the quotas sum to the epoch
    rows: list[int] = []
    for s, q in zip(names, quota):
        members = by_source[s]
        while q > 0:
            take = torch.randperm(len(members), generator=generator)[:q].tolist()
            rows += [members[i] for i in take]
            q -= len(take)
    return rows


def hash_int(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint (as a dict of plain types), restored on resume."""

    phase_idx: int = 0
    phase_step: int = 0
    global_step: int = 0
    rollbacks: int = 0
    nan_skips: int = 0
    anchor_boost: float = 1.0
    loss_window: list = field(default_factory=list)
    best_val: float = math.inf
    bad_evals: int = 0
    phase_log: dict = field(default_factory=dict)
    history: dict = field(default_factory=lambda: {"train_loss": [], "grad_norm": [], "val_loss": [], "val_step": []})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**d)

    def end_phase(self, phase_idx: int) -> None:
        """The next phase starts fresh: new optimizer, fresh early-stopping state and loss window."""
        self.phase_idx, self.phase_step = phase_idx + 1, 0
        self.best_val, self.bad_evals, self.loss_window = math.inf, 0, []


def guard_step(loss_val: float, window: list, tc: TrainConfig) -> str:
    """Decide a step before its backward: "nan_loss" (non-finite), "spike" (above spike_factor x the
    running median of accepted losses, once spike_min_history are known) or "ok"."""
    if not math.isfinite(loss_val):
        return "nan_loss"
    if len(window) >= tc.spike_min_history and loss_val > tc.spike_factor * statistics.median(window):
        return "spike"
    return "ok"


def patience_evals(tc: TrainConfig, phase_steps: int) -> int:
    """Validation passes without improvement that stop a phase of `phase_steps`: `patience`, or
    `patience_fraction` of the phase, whichever is longer."""
    return max(tc.patience, math.ceil(tc.patience_fraction * phase_steps / tc.eval_every))


def lr_lambda_for(warmup: int, total: int, decay: str = "cosine", floor: float = 0.1):
    """Linear warmup over `warmup` steps, then a cosine or linear decay to `floor` x the peak at `total`."""
    check_lr_decay(decay)

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        t = min(1.0, (s - warmup) / max(total - warmup, 1))
        left = 0.5 * (1 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t
        return floor + (1.0 - floor) * left
    return f


@dataclass
class Phase:
    """One phase's setup: its name, step budget, trainable parameters, optimizer and schedule."""

    name: str
    steps: int
    params: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR


def setup_phase(phase: str, tower: StudentTower, objective: TowerObjective, caps: list[str], tc: TrainConfig) -> Phase:
    """Phase "a": everything trains on every capability. Phase "b:<cap>": only cap's (new) LoRA adapter,
    head and anchor projections train, LwF keeps the other heads in place; a phase (b) of 0 steps adds
    no adapter (the capability runs the bare backbone)."""
    if phase == "a":
        steps, lr = tc.phase_a_steps, tc.lr
        objective.phase_caps, objective.lwf_caps = caps, []
        objective.use_banks = tc.neighbour_in_phase_a
        objective.use_states = True  # the per-token state loss teaches the blocks, which only phase (a) trains
        for p in tower.parameters():
            p.requires_grad_(True)
    else:
        cap = phase[2:]
        steps, lr = tc.phase_b_steps_by_capability.get(cap, tc.phase_b_steps), tc.adapter_lr
        if steps and cap not in tower.adapters:
            # a phase of no steps adds no adapter: an untrained LoRA (B = 0) changes no output, yet the
            # tower would carry it and the runtime run its matmuls on every targeted layer
            tower.add_adapter(cap)
        tower.set_capability(cap)
        objective.phase_caps, objective.lwf_caps = [cap], [c for c in caps if c != cap]
        objective.use_banks = True
        objective.use_states = False
        for p in tower.parameters():
            p.requires_grad_(False)
        for p in tower.lora_parameters(cap) + tower.head_parameters(cap):
            p.requires_grad_(True)
    params = [p for p in tower.parameters() if p.requires_grad]
    carved = getattr(tower, "carved_param_ids", frozenset())
    groups = [{"params": [p for p in params if id(p) not in carved], "lr": lr},
              {"params": [p for p in params if id(p) in carved], "lr": lr * tc.carved_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=tc.weight_decay,
                            fused=fused_adam_supported(params))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_for(tc.warmup_steps, max(steps, 1), tc.lr_decay, tc.lr_floor))
    return Phase(phase, steps, params, opt, sched)


def fused_adam_supported(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel over every tensor) where it runs: float parameters on CPU or CUDA.
    On CPU the default is a Python loop per tensor; for the carved text tower's 34M parameters in ~110
    tensors, one step took 96 ms looped and 27 ms fused (same update to 4e-9), ~7% of a training step."""
    floats = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in floats for p in params)


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """The batch on `device`; image batches (4-D) in channels-last layout when the tower trains in it."""
    out = {k: v.to(device) for k, v in batch.items()} if device.type != "cpu" else batch
    if channels_last:
        out = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in out.items()}
    return out


def params_sha256(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name + bytes), in state_dict order."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_PROBE_TARGET = {"embedding": "embedding", "classes": "logits"}


def probe_pooled_head(tower: StudentTower, cap: str, data: TowerData, tc: TrainConfig, device,
                      chunk: int = 32, minibatch: int = 64, bank: torch.Tensor | None = None) -> dict | None:
    """Linear-probe warm start of `cap`'s pooled head (LP-FT): pool the last block of the (frozen) backbone
    over every training row once, then fit the head alone on those cached states with its own weighted
    losses for `tc.head_probe_epochs` epochs. Deterministic (seeded shuffles, row-order features), so a run
    resumed at the phase start repeats it bit for bit.

    Returns {rows, epochs, loss_before, loss_after, seconds}, or None when the head is not a PooledHead
    (a carved backbone's own head, an LM or ASR head) or probing is off.
    """
    import time

    spec = tower.cfg.capabilities[cap]
    head = tower.heads[adapter_name(cap)]
    if tc.head_probe_epochs == 0 or not isinstance(head, PooledHead) or spec.kind not in _PROBE_TARGET:
        return None
    t0 = time.time()
    key = f"{cap}:{_PROBE_TARGET[spec.kind]}"
    was_training = tower.training
    tower.eval()
    pooled, targets = [], []
    with torch.no_grad():
        for start in range(0, len(data), chunk):
            batch = to_device(data.batch(list(range(start, min(start + chunk, len(data))))), device)
            hiddens, mask = tower.encode({k: v for k, v in batch.items() if k in INPUT_KEYS}, [cap])
            rows = batch.get(f"{cap}:rows", torch.ones(len(mask), dtype=torch.bool, device=mask.device))
            pooled.append(_pool(tower.head_input(cap, hiddens), mask).float()[rows])  # (B', W): rows with the teacher's targets
            targets.append(batch[key][rows])
    feats, target = torch.cat(pooled), torch.cat(targets)  # (N, W), (N, D | C)

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        parts = task_losses(cap, spec.kind, {"out": head.from_pooled(feats[rows])}, {key: target[rows]}, tc, bank)
        return sum(task_loss_weight(n, tc) * v for n, v in parts.items())

    every = torch.arange(len(feats), device=feats.device)
    with torch.no_grad():
        before = float(loss_of(every))
    params = list(head.parameters())
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=tc.head_probe_lr, weight_decay=tc.weight_decay,
                            fused=fused_adam_supported(params))
    gen = torch.Generator().manual_seed(tc.seed)
    with torch.enable_grad():
        for _ in range(tc.head_probe_epochs):
            order = torch.randperm(len(feats), generator=gen).to(feats.device)
            for i in range(0, len(order), minibatch):
                loss = loss_of(order[i:i + minibatch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    for p, g in zip(params, grads):
        p.requires_grad_(g)
    with torch.no_grad():
        after = float(loss_of(every))
    tower.train(was_training)
    return {"rows": len(feats), "epochs": tc.head_probe_epochs, "loss_before": before, "loss_after": after,
            "seconds": round(time.time() - t0, 2)}


@torch.no_grad()
def evaluate(tower: StudentTower, caps: list[str], data: TowerData, tc: TrainConfig, device,
              per_part: bool = False):
    """Mean task loss (KD / cosine / Gram, no anchoring or LwF: comparable across the alpha curriculum)
    over the first `val_batches` batches of `data` in row order, each capability with its adapter."""
    was_training = tower.training
    tower.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for b in range(min(tc.val_batches, math.ceil(len(data) / tc.batch_size))):
        idx = list(range(b * tc.batch_size, min((b + 1) * tc.batch_size, len(data))))
        batch = to_device(data.batch(idx), device)
        inputs = {k: v for k, v in batch.items() if k in INPUT_KEYS}
        for cap in caps:
            if tower.adapters:
                tower.set_capability(cap)
            kept = capability_rows(cap, tower.head_forward(cap, tower.encode(inputs), inputs), batch)
            if kept is None:
                continue
            res, cb = kept
            for name, loss in task_losses(cap, tower.cfg.capabilities[cap].kind, res, cb, tc).items():
                sums[f"{cap}.{name}"] = sums.get(f"{cap}.{name}", 0.0) + float(loss)
                counts[f"{cap}.{name}"] = counts.get(f"{cap}.{name}", 0) + 1
    tower.train(was_training)
    means = {k: v / counts[k] for k, v in sums.items()}
    return means if per_part else float(sum(means.values()))


def training_curve(history: dict, path: Path, title: str) -> None:
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
