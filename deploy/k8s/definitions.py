"""The NEXUS code location for Kubernetes: the same assets, each step run as its own Kubernetes Job, with a
GPU requested only for the steps in the `gpu` pool (teacher_features, neuron_importance, tower_adapter).

    dagster api grpc --python-file deploy/k8s/definitions.py --working-directory /app   # in the image

Needs dagster-k8s==0.29.27 in the image (it is not in the CPU dev environment). The GPU request goes
through the k8s_job_executor's `per_step_k8s_config`, keyed by op name and derived from each asset's pool,
so nexus_assets/defs stays free of cluster details. An asset may still carry its own
`op_tags={"dagster-k8s/config": ...}`; dagster-k8s merges the op tag over this per-step config.
"""
from __future__ import annotations

import os

import dagster as dg

GPU_POOL = "gpu"


def gpu_step_k8s_config(gpus: int = 1) -> dict:
    """A GPU-bound step's k8s config (the same shape as the `dagster-k8s/config` op tag)."""
    return {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": gpus},
                                           "requests": {"cpu": "4", "memory": "32Gi"}}},
        "pod_spec_config": {"node_selector": {"nexus/gpu": "true"},
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                             "effect": "NoSchedule"}]},
    }


def gpu_bound_ops(defs: dg.Definitions) -> list[str]:
    """Op names of the assets in the `gpu` concurrency pool."""
    return sorted(a.node_def.name for a in defs.assets if getattr(a.node_def, "pool", None) == GPU_POOL)


def executor_config(defs: dg.Definitions, gpus: int = 1, namespace: str = "nexus") -> dict:
    """k8s_job_executor config: CPU steps get a modest pod, GPU-bound steps a GPU node."""
    return {
        "job_namespace": namespace,
        "max_concurrent": 4,
        "step_k8s_config": {"container_config": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}},
        "per_step_k8s_config": {op: gpu_step_k8s_config(gpus) for op in gpu_bound_ops(defs)},
    }


def k8s_definitions() -> dg.Definitions:
    from dagster_k8s import k8s_job_executor

    from nexus_assets.definitions import defs

    cfg = executor_config(defs, gpus=int(os.environ.get("NEXUS_GPUS_PER_STEP", "1")),
                          namespace=os.environ.get("NEXUS_K8S_NAMESPACE", "nexus"))
    return dg.Definitions.merge(defs, dg.Definitions(executor=k8s_job_executor.configured(cfg)))


if __name__ != "__main__" and os.environ.get("NEXUS_K8S_DEFS_LAZY") != "1":
    defs = k8s_definitions()
