"""One tower trained data-parallel under torchrun, reporting back to Dagster through Pipes.

Launched by the asset in deploy/torchrun/pipes_asset.py (never by hand on a cluster):

    torchrun --nproc_per_node=4 deploy/torchrun/train_tower_ddp.py      # + DAGSTER_PIPES_* env from Dagster

Every rank runs `train_tower` (it initialises the process group from torchrun's env: nccl on GPUs, gloo on
CPU); only rank 0 writes the tower and reports the materialization. The Pipes extras (tower config JSON, feature
cache entries, probe folders, output folder, TrainConfig overrides) come from the launching asset as Pipes `extras`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def main() -> None:
    from dagster_pipes import PipesContext, open_dagster_pipes

    rank = int(os.environ.get("RANK", "0"))
    with open_dagster_pipes() as pipes:
        ctx = PipesContext.get()
        extras = ctx.extras
        from nexus_assets.probes.probe_data import read_probe_rows
        from nexus_assets.training.tower_data import load_tower_data
        from nexus_assets.student.config import TowerConfig
        from nexus_assets.training.train_loop import TrainConfig, train_tower

        cfg = TowerConfig.from_dict(json.loads(Path(extras["tower_config"]).read_text()))
        feats = {t: Path(p) for t, p in extras["teacher_features"].items()}  # teacher -> cache entry
        probes = {d: read_probe_rows(Path(p)) for d, p in extras["probe_datasets"].items()}  # dataset -> folder
        train = load_tower_data(cfg, feats, probes, splits=("train",))
        val = load_tower_data(cfg, feats, probes, splits=("val",))
        tc = TrainConfig(**extras.get("train", {}))
        summary = train_tower(cfg, train, val, tc, extras["out_dir"],
                              log=(lambda m: ctx.log.info(m)) if rank == 0 else (lambda m: None))
        if rank == 0:
            pipes.report_asset_materialization(
                metadata={"param_sha256": summary["param_sha256"], "world_size": int(os.environ.get("WORLD_SIZE", 1)),
                          "out_dir": {"raw_value": extras["out_dir"], "type": "path"}},
                data_version=summary["param_sha256"][:16],
            )


if __name__ == "__main__":
    main()
