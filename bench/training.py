"""Training throughput of the default towers on synthetic tensors of the default sizes.

Run:  .venv/bin/python bench/training.py [--steps 12] [--towers text vision audio]

For each tower (default config, `cpu_train_config` batch size) it runs a short `train_tower` with the
hooks timing every step, and prints samples/s of phase (a) (backbone + all heads) and phase (b)
(one adapter + head, plus the LwF pass), then the wall time `cpu_train_config` would take per tower
and in total, from those rates. Numbers are from this run on this machine only.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nexus_assets.training.tower_data import synthetic_tower_data  # noqa: E402
from nexus_assets.student.examples import example_tower_config  # noqa: E402
from nexus_assets.training.train_loop import TrainHooks, cpu_train_config, train_tower  # noqa: E402


def bench_tower(name: str, steps: int) -> dict:
    cfg = example_tower_config(name)
    default = cpu_train_config(name)
    bs = default.batch_size
    data = synthetic_tower_data(cfg, 4 * bs, seed=0, frames=400, top_k=32)
    tc = cpu_train_config(name, phase_a_steps=steps, phase_b_steps=max(steps // 2, 3), eval_every=10_000,
                          checkpoint_every=10_000, log_every=10_000)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        stamps.append(t0)
        s = train_tower(cfg, data, None, tc, Path(d), log=lambda m: None,
                        hooks=TrainHooks(after_step=lambda g: stamps.append(time.perf_counter())))
        total = time.perf_counter() - t0
    a_steps, b_steps = tc.phase_a_steps, tc.phase_b_steps
    dt = [b - a for a, b in zip(stamps, stamps[1:])]
    warm = 2
    rate_a = bs * (a_steps - warm) / sum(dt[warm:a_steps])
    b_dt = []
    for i in range(len(cfg.capabilities)):
        start = a_steps + i * b_steps
        b_dt += dt[start + 1:start + b_steps]  # the first step of each phase pays for adapter setup
    rate_b = bs * len(b_dt) / sum(b_dt)
    n_caps = len(cfg.capabilities)
    est = default.phase_a_steps * bs / rate_a + n_caps * default.phase_b_steps * bs / rate_b
    return {"tower": name, "params": s["num_parameters"], "batch": bs, "a_samples_s": rate_a, "b_samples_s": rate_b,
            "default_steps": (default.phase_a_steps, default.phase_b_steps), "est_default_s": est, "bench_wall_s": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="phase (a) steps timed per tower (phase b: half)")
    ap.add_argument("--towers", nargs="+", default=["text", "vision", "audio"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'tower':8} {'params':>11} {'batch':>5} {'a samples/s':>12} {'b samples/s':>12} "
          f"{'default a/b steps':>18} {'est. default s':>15}")
    total = 0.0
    for name in args.towers:
        r = bench_tower(name, args.steps)
        total += r["est_default_s"]
        print(f"{r['tower']:8} {r['params']:>11,} {r['batch']:>5} {r['a_samples_s']:>12.1f} {r['b_samples_s']:>12.1f} "
              f"{str(r['default_steps']):>18} {r['est_default_s']:>15.0f}", flush=True)
    print(f"estimated cpu_train_config training time, all towers: {total:.0f} s ({total / 60:.1f} min), "
          "plus validation passes, checkpoints and saving")


if __name__ == "__main__":
    main()
