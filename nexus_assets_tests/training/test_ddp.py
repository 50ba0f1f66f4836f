"""`train_tower` under `torchrun --nproc_per_node=2` (gloo on CPU): ranks end with identical weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from nexus_assets.training.tower_data import synthetic_tower_data
    from nexus_assets.training.train_loop import TrainConfig, train_tower
    from nexus_assets_tests.student.test_towers import tiny_config

    out = sys.argv[1]
    torch.set_num_threads(1)
    cfg = tiny_config("text")
    train, val = synthetic_tower_data(cfg, 32, 0), synthetic_tower_data(cfg, 8, 1)
    tc = TrainConfig(phase_a_steps=4, phase_b_steps=2, batch_size=4, eval_every=2, checkpoint_every=2)
    s = train_tower(cfg, train, val, tc, out + "/run", log=lambda m: None)
    rank = os.environ["RANK"]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"sha": s["param_sha256"], "world": s["world_size"]}, f)
""")


# ~10 s on 2 cores (two processes importing torch + peft), so not marked slow
def test_ddp_two_ranks_identical_params(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sha"] == ranks[1]["sha"]
    # only rank 0 writes artifacts, and it wrote them
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["param_sha256"] == ranks[0]["sha"]
    assert (tmp_path / "run" / "tower" / "config.json").exists()
