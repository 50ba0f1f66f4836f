"""Example: a tower asset that trains on N GPUs of one node by launching torchrun through Dagster Pipes.

Use this shape instead of an in-process training step when one tower needs several GPUs. Dagster starts
`torchrun`, which starts one process per GPU; rank 0 streams logs and the materialization back over Pipes.
On Kubernetes, put the asset's pod on a multi-GPU node with the `dagster-k8s/config` op tag below.

The nexus_assets tower asset owns the real inputs (student_architecture, teacher_features); this example
takes their paths as config so it stays independent of how that asset is written.
"""

import shutil
import sys
from pathlib import Path

import dagster as dg

SCRIPT = Path(__file__).with_name("train_tower_ddp.py")


class DDPTrainConfig(dg.Config):
    tower_config: str = ""
    """TowerConfig JSON (to_dict) of the tower to train."""
    teacher_features: dict[str, str] = {}
    """teacher name -> feature cache entry folder (teacher_features' `path`)."""
    probe_datasets: dict[str, str] = {}
    """dataset name -> probe_dataset folder."""
    out_dir: str = ""
    """where rank 0 writes the tower, checkpoints and summary (resumes if it holds a checkpoint)."""
    train: dict = {}
    """TrainConfig overrides, e.g. {"phase_a_steps": 2000, "device": "cuda"}."""
    nproc_per_node: int = 4
    """ranks on this node: one per GPU."""


def torchrun_command(nproc_per_node: int, script: Path = SCRIPT) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N script`: one node, N ranks (one per GPU)."""
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    return [*torchrun.split(), "--standalone", f"--nproc_per_node={nproc_per_node}", str(script)]


@dg.asset(
    pool="gpu",
    op_tags={"dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": 4}, "requests": {"cpu": "16", "memory": "128Gi"}}},
        "pod_spec_config": {"node_selector": {"nexus/gpu": "true"},
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }},
    kinds={"pytorch"},
)
def tower_ddp_example(context: dg.AssetExecutionContext, config: DDPTrainConfig,
                      pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """Distil one tower data-parallel over `nproc_per_node` GPUs with torchrun."""
    return pipes_subprocess_client.run(
        command=torchrun_command(config.nproc_per_node),
        context=context,
        extras={"tower_config": config.tower_config, "teacher_features": config.teacher_features,
                "probe_datasets": config.probe_datasets, "out_dir": config.out_dir, "train": config.train},
        env={"OMP_NUM_THREADS": "4"},
    ).get_materialize_result()


defs = dg.Definitions(assets=[tower_ddp_example],
                      resources={"pipes_subprocess_client": dg.PipesSubprocessClient()})
