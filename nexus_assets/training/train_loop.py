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
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from nexus_assets.core.atomic import write_json
from nexus_assets.student.config import TowerConfig
from nexus_assets.student.tower import StudentTower, save_tower

from .checkpoints import CHECKPOINT_DIR, latest_checkpoint, read_checkpoint, rng_state, set_rng_state, write_checkpoint
from .config import TrainConfig, TrainHooks, TrainingDiverged, cpu_train_config
from .loop_parts import (Dist, Phase, TrainState, autocast_bf16, batch_indices, compile_backbone_on, evaluate,
                         guard_step, params_sha256, patience_evals, probe_pooled_head, set_backbone_compiled,
                         setup_dist, setup_phase, to_device, training_curve)
from .objective import TowerObjective, anchor_context, neighbour_banks, state_targets
from .tower_data import TowerData

__all__ = ["TrainConfig", "TrainHooks", "train_tower", "cpu_train_config", "TrainingDiverged", "CHECKPOINT_DIR"]


@dataclass
class _Run:
    """Everything one train_tower call works on (built by `_start`)."""

    cfg: TowerConfig
    tc: TrainConfig
    tower: StudentTower
    objective: TowerObjective
    dd: Dist
    st: TrainState
    out_dir: Path
    say: Callable[[str], None]
    hooks: TrainHooks
    phases: list[str]
    caps: list[str]
    writer: Any = None
    resumed_from: int | None = None
    bf16: bool = False
    compiled: bool = False  # phase (a)'s training passes through torch.compile (TrainConfig.compile_backbone)
    opt_state: dict | None = None
    sched_state: dict | None = None
    good: dict = field(default_factory=dict)
    ema: Any = None  # torch.optim.swa_utils.AveragedModel of the tower while phase (a) runs with ema_decay
    ema_state: dict | None = None  # a resumed checkpoint's average, loaded when its phase starts

    def checkpoint(self, ph: Phase | None) -> None:
        if not self.dd.is_main:
            return
        write_checkpoint(self.out_dir, {
            "tower": self.cfg.to_dict(), "train": self.tc.to_dict(), "adapters": list(self.tower.adapters),
            "model": self.tower.state_dict(), "optimizer": None if ph is None else ph.opt.state_dict(),
            "scheduler": None if ph is None else ph.sched.state_dict(), "rng": rng_state(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "state": copy.deepcopy(self.st.to_dict()), "global_step": self.st.global_step,
            "phase_idx": self.st.phase_idx}, self.tc.keep_checkpoints)

    def snapshot(self, ph: Phase) -> None:
        """The in-memory last good state a loss spike rolls back to."""
        self.good = {"model": copy.deepcopy(self.tower.state_dict()), "opt": copy.deepcopy(ph.opt.state_dict()),
                     "sched": copy.deepcopy(ph.sched.state_dict()),
                     "ema": None if self.ema is None else copy.deepcopy(self.ema.state_dict())}

    def start_average(self, ph: Phase) -> None:
        """The weight average of phase (a) when tc.ema_decay > 0 (resumed from the checkpoint's)."""
        if self.tc.ema_decay <= 0 or ph.name != "a":
            return
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(self.tower, multi_avg_fn=get_ema_multi_avg_fn(self.tc.ema_decay))
        if self.ema_state is not None:
            self.ema.load_state_dict(self.ema_state)
        self.ema_state = None

    def end_average(self, ph: Phase) -> None:
        """Load the average into the tower at the end of its phase."""
        if self.ema is None:
            return
        with torch.no_grad():
            for avg, p in zip(self.ema.module.parameters(), self.tower.parameters()):
                p.copy_(avg)
        self.say(f"[{self.cfg.name}] phase {ph.name}: the tower now holds the average of its weights "
                 f"(ema_decay {self.tc.ema_decay}, {int(self.ema.n_averaged)} steps averaged)")
        self.ema = None


def train_tower(
    cfg: TowerConfig,
    data_train: TowerData,
    data_val: TowerData | None,
    train_cfg: TrainConfig,
    out_dir: str | Path,
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
    t_start = time.time()
    if len(data_train) == 0:
        raise ValueError("data_train: no rows")
    run = _start(cfg, data_train, train_cfg, Path(out_dir), pca, importance, log, hooks or TrainHooks(), init_state)
    for phase_idx in range(run.st.phase_idx, len(run.phases)):
        _run_phase(run, phase_idx, data_train, data_val)
        set_backbone_compiled(run.tower, False)  # the next phase's head probe and the returned tower: eager
        run.st.end_phase(phase_idx)
        run.checkpoint(None)
    return _finish(run, data_train, data_val, t_start)


def _start(cfg, data_train, tc, out_dir, pca, importance, log, hooks, init_state) -> _Run:
    """Seeded tower (from `init_state` when carved), anchors, objective; resumes from a checkpoint."""
    dd = setup_dist(tc)
    say = log if dd.is_main else (lambda msg: None)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
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
        # tc.carved_lr_scale applies to these; by identity, since peft renames the backbone's weights
        tower.carved_param_ids = frozenset(id(p) for n, p in tower.named_parameters() if n in init_state)
    tower = tower.to(dd.device)
    if tc.channels_last:  # moves only 4-D (convolution) weights; the tower is saved back in the default layout
        tower = tower.to(memory_format=torch.channels_last)
    anchors = anchor_context(cfg, data_train, pca, importance)
    for a in anchors.values():
        a.mean, a.components = a.mean.to(dd.device), a.components.to(dd.device)
        a.importance = None if a.importance is None else a.importance.to(dd.device)
    banks = {cap: b.to(dd.device) for cap, b in neighbour_banks(cfg, data_train, tc).items()}
    states, state_lines = state_targets(tower, data_train, tc)
    for t in (t for ts in states.values() for t in ts):
        t.mean, t.components, t.variances = t.mean.to(dd.device), t.components.to(dd.device), t.variances.to(dd.device)
    for line in state_lines:
        say(f"[{cfg.name}] {line}")
    caps = list(cfg.capabilities)
    run = _Run(cfg, tc, tower, TowerObjective(tower, tc, anchors, banks, states), dd, TrainState(), out_dir, say, hooks,
               ["a"] + [f"b:{c}" for c in caps], caps)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        saved = read_checkpoint(ckpt, dd.device)
        if saved["tower"] != cfg.to_dict() or saved["train"] != tc.to_dict():
            raise ValueError(f"{ckpt}: written for another tower/train config; use a fresh out_dir")
        for cap in saved["adapters"]:
            tower.add_adapter(cap)
        tower.load_state_dict(saved["model"])
        run.st = TrainState.from_dict(saved["state"])
        run.opt_state, run.sched_state = saved.get("optimizer"), saved.get("scheduler")
        run.ema_state = saved.get("ema")
        set_rng_state(saved["rng"])
        run.resumed_from = run.st.global_step
        where = (f"phase {run.phases[run.st.phase_idx]} step {run.st.phase_step}"
                 if run.st.phase_idx < len(run.phases) else "every phase already complete")  # finished run again
        say(f"[{cfg.name}] resuming from {ckpt.name}: {where}")
    run.bf16 = autocast_bf16(tc.mixed_precision, dd.device)
    if tc.mixed_precision != "no":
        say(f"[{cfg.name}] mixed precision {tc.mixed_precision!r} on {dd.device}: forward in "
            f"{'bfloat16' if run.bf16 else 'float32 (no native bfloat16 here)'}")
    if tc.compile_backbone != "no":
        supported = hasattr(run.tower.base_backbone(), "set_compiled")
        run.compiled = supported and compile_backbone_on(tc.compile_backbone, tc.phase_a_steps, dd.device)
        why = ("compiled (torch.compile)" if run.compiled else "eager: this backbone has no compiled path"
               if not supported else "eager (short phase or no working compiler here)")
        say(f"[{cfg.name}] compile_backbone {tc.compile_backbone!r}: phase (a) {why}")
    if dd.is_main:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(out_dir / "tb"), purge_step=run.st.global_step)
    return run


def _run_phase(run: _Run, phase_idx: int, data_train: TowerData, data_val: TowerData | None) -> None:
    """One phase's steps, resuming at st.phase_step; stops early on the validation loss."""
    st, tc, dd = run.st, run.tc, run.dd
    ph = setup_phase(run.phases[phase_idx], run.tower, run.objective, run.caps, tc)
    probe = None
    if ph.name.startswith("b:") and st.phase_step == 0 and run.opt_state is None:
        probe = probe_pooled_head(run.tower, ph.name[2:], data_train, tc, dd.device,
                                  bank=run.objective.banks.get(ph.name[2:]))
        if probe is not None:
            run.say(f"[{run.cfg.name}] phase {ph.name}: linear-probe warm start of the head on {probe['rows']} rows, "
                    f"{probe['epochs']} epochs, loss {probe['loss_before']:.4f} -> {probe['loss_after']:.4f} "
                    f"({probe['seconds']:.1f} s)")
    if run.opt_state is not None:
        ph.opt.load_state_dict(run.opt_state)
        ph.sched.load_state_dict(run.sched_state)
        run.opt_state = run.sched_state = None
    run.start_average(ph)
    # after the average's deep copy (which must not carry a compiled function of this tower's weights)
    set_backbone_compiled(run.tower, run.compiled and ph.name == "a")
    model = run.objective
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(run.objective, device_ids=[dd.device.index] if dd.device.type == "cuda" else None,
                    find_unused_parameters=True)
    run.snapshot(ph)
    plog = st.phase_log.setdefault(ph.name, {"steps_run": 0, "stopped_early": False, "start_step": st.global_step})
    if probe is not None:
        plog["head_probe"] = probe
    run.tower.train()
    run.say(f"[{run.cfg.name}] phase {ph.name}: {ph.steps} steps, {sum(p.numel() for p in ph.params):,} trainable params")
    gb = tc.batch_size * dd.world
    lengths = data_train.lengths() if tc.group_by_length else None
    sources = [r.split("/", 1)[0] for r in data_train.row_ids] if tc.source_alpha != 1.0 else None
    step = st.phase_step
    while step < ph.steps:
        alpha = tc.alpha_start + (tc.alpha_end - tc.alpha_start) * step / max(ph.steps - 1, 1)
        run.objective.anchor_mult = alpha * st.anchor_boost
        batch = data_train.batch(batch_indices(len(data_train), gb, tc.seed, phase_idx, step, lengths, sources,
                                                 tc.source_alpha)[dd.rank::dd.world])
        if run.hooks.batch:
            batch = run.hooks.batch(ph.name, step, batch)
        _step(run, ph, model, to_device(batch, dd.device, tc.channels_last), step)
        step += 1
        st.phase_step = step
        st.global_step += 1
        plog["steps_run"] += 1
        if _validate(run, ph, data_val, step):
            plog["stopped_early"] = True
            break
        if step % tc.checkpoint_every == 0 and step < ph.steps:
            run.snapshot(ph)
            run.checkpoint(ph)
        if run.hooks.after_step:
            run.hooks.after_step(st.global_step)
    run.end_average(ph)


def _step(run: _Run, ph: Phase, model, batch: dict, step: int) -> None:
    """Forward, guard, then backward + update, a skipped NaN step, or a rollback to the last snapshot."""
    st, tc, dd = run.st, run.tc, run.dd
    with torch.autocast(dd.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        total, parts = model(batch)
    if run.hooks.loss:
        total = run.hooks.loss(ph.name, step, total)
    loss_val = float(dd.mean(total.detach()))
    action, grad_norm = guard_step(loss_val, st.loss_window, tc), float("nan")
    if action == "ok":
        ph.opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(ph.params, tc.grad_clip))
        if not math.isfinite(grad_norm):
            action = "nan_grad"
            ph.opt.zero_grad(set_to_none=True)
        else:
            ph.opt.step()
            ph.sched.step()
            if run.ema is not None:
                run.ema.update_parameters(run.tower)
    elif dd.world > 1:
        (total * 0.0).backward()  # DDP expects a backward after every training forward; drop its grads
        ph.opt.zero_grad(set_to_none=True)
    where = f"step {st.global_step} ({ph.name} {step})"
    if action.startswith("nan"):
        st.nan_skips += 1
        run.say(f"[{run.cfg.name}] {where}: non-finite {'loss' if action == 'nan_loss' else 'gradient'}, "
                f"skipped ({st.nan_skips} so far)")
        if st.nan_skips > tc.max_nan_skips:
            raise TrainingDiverged(f"tower {run.cfg.name!r}: {st.nan_skips} non-finite steps > max_nan_skips="
                                   f"{tc.max_nan_skips}, last at global step {st.global_step} (phase {ph.name} step {step})")
    elif action == "spike":
        st.rollbacks += 1
        med = statistics.median(st.loss_window)
        run.tower.load_state_dict(run.good["model"])
        ph.opt.load_state_dict(run.good["opt"])
        ph.sched.load_state_dict(run.good["sched"])
        if run.ema is not None:
            run.ema.load_state_dict(run.good["ema"])
        st.anchor_boost *= tc.anchor_escalation
        # the window keeps the pre-spike losses: a loss level that stays 4x up keeps rolling back until
        # max_rollbacks says the run diverged, instead of becoming the new normal
        run.say(f"[{run.cfg.name}] {where}: loss {loss_val:.4g} > {tc.spike_factor} x median {med:.4g}: rolled "
                f"back to the last snapshot, anchoring weight x{st.anchor_boost:g} (rollback {st.rollbacks})")
        if st.rollbacks > tc.max_rollbacks:
            raise TrainingDiverged(f"tower {run.cfg.name!r}: {st.rollbacks} rollbacks > max_rollbacks="
                                   f"{tc.max_rollbacks} at global step {st.global_step}")
    else:
        st.loss_window.append(loss_val)
        del st.loss_window[:-tc.spike_window]
        st.history["train_loss"].append(loss_val)
        st.history["grad_norm"].append(grad_norm)
    _log_step(run, ph, step, loss_val, grad_norm, parts)


def _log_step(run: _Run, ph: Phase, step: int, loss_val: float, grad_norm: float, parts: dict) -> None:
    if run.writer is not None:
        g = run.st.global_step
        run.writer.add_scalar(f"loss/{ph.name}", loss_val, g)
        run.writer.add_scalar("grad_norm", grad_norm, g)
        run.writer.add_scalar("lr", ph.sched.get_last_lr()[0], g)
        run.writer.add_scalar("anchor_weight", run.tc.w_anchor * run.objective.anchor_mult, g)
        for k, v in parts.items():
            run.writer.add_scalar(f"parts/{k}", v, g)
    if run.dd.is_main and step % run.tc.log_every == 0:
        run.say(f"[{run.cfg.name}] {ph.name} step {step}/{ph.steps} loss {loss_val:.4f} grad {grad_norm:.3g} "
                + " ".join(f"{k}={v:.3f}" for k, v in parts.items()))


def _validate(run: _Run, ph: Phase, data_val: TowerData | None, step: int) -> bool:
    """Validation every eval_every steps and at the phase end; True = stop the phase early."""
    st, tc = run.st, run.tc
    if data_val is None or not len(data_val) or not (step % tc.eval_every == 0 or step == ph.steps):
        return False
    val = evaluate(run.tower, run.objective.phase_caps, data_val, tc, run.dd.device)
    st.history["val_loss"].append(val)
    st.history["val_step"].append(st.global_step)
    if run.writer is not None:
        run.writer.add_scalar(f"val/{ph.name}", val, st.global_step)
    stop = False
    if val < st.best_val - tc.min_delta:
        st.best_val, st.bad_evals = val, 0
    else:
        st.bad_evals += 1
        if st.bad_evals >= patience_evals(tc, ph.steps) and step < ph.steps:
            run.say(f"[{run.cfg.name}] phase {ph.name}: early stop at step {step} (val {val:.4f}, best {st.best_val:.4f})")
            stop = True
    run.tower.train()
    return stop


def _finish(run: _Run, data_train: TowerData, data_val: TowerData | None, t_start: float) -> dict:
    """Final per-capability losses, the saved tower, summary, curve; DDP teardown."""
    tower, tc, dd, st, cfg = run.tower, run.tc, run.dd, run.st, run.cfg
    tower.to(memory_format=torch.contiguous_format).eval()  # safetensors saves contiguous tensors only
    final = {}
    for cap in run.caps:
        tower.set_capability(cap)
        final[cap] = {"train": evaluate(tower, [cap], data_train, tc, dd.device, per_part=True)}
        if data_val is not None and len(data_val):
            final[cap]["val"] = evaluate(tower, [cap], data_val, tc, dd.device, per_part=True)
    summary = {
        "tower": cfg.name, "capabilities": run.caps, "final_losses": final, "steps": st.global_step,
        "phases": st.phase_log, "rollbacks": st.rollbacks, "nan_skips": st.nan_skips,
        "anchor_boost": st.anchor_boost, "resumed_from_step": run.resumed_from,
        "seconds": round(time.time() - t_start, 2), "world_size": dd.world,
        "num_parameters": sum(p.numel() for p in tower.parameters()), "param_sha256": params_sha256(tower),
        "history": st.history, "train_rows": len(data_train), "val_rows": 0 if data_val is None else len(data_val),
        "train_config": tc.to_dict(), "tower_config": cfg.to_dict(),
    }
    if dd.is_main:
        save_tower(tower, run.out_dir / "tower")
        training_curve(st.history, run.out_dir / "training_curve.png", f"tower {cfg.name}")
        write_json(run.out_dir / "summary.json", summary)
        run.writer.close()
        run.say(f"[{cfg.name}] done: {st.global_step} steps in {summary['seconds']} s, "
                f"{st.rollbacks} rollbacks, {st.nan_skips} NaN skips")
    if dd.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if dd.owns_group:
            dist.destroy_process_group()
    return summary
