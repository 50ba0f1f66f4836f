"""deploy/: every YAML parses; instance configs pass Dagster's own instance schema; the k8s executor config
puts a GPU on exactly the `gpu`-pool steps; the torchrun Pipes example builds a valid asset. No cluster.

dagster-k8s / dagster-postgres are not in the CPU dev environment: the checks that need them (the
K8sRunLauncher and k8s_job_executor config schemas, loading deploy/k8s/definitions.py) skip with that
reason, and the structure checks still run.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTANCE_CONFIGS = [DEPLOY / "dagster-postgres.yaml", DEPLOY / "k8s" / "dagster.yaml", REPO / "dagster.yaml"]
GPU_OPS = ["neuron_importance", "teacher_features", "tower_adapter"]


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_every_deploy_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "dagster-postgres.yaml", "k8s/dagster.yaml", "k8s/executor.yaml", "helm/values.yaml"}
    for f in files:
        assert isinstance(yaml.safe_load(f.read_text()), dict), f


@pytest.mark.parametrize("path", INSTANCE_CONFIGS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_instance_config_passes_dagsters_schema(tmp_path, path):
    from dagster._core.instance.config import dagster_instance_config

    shutil.copy(path, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))  # raises DagsterInvalidConfigError on a bad key
    assert config["telemetry"]["enabled"] is False


@pytest.mark.parametrize("path", INSTANCE_CONFIGS[:2], ids=lambda p: p.relative_to(REPO).as_posix())
def test_multi_user_instances_use_postgres_and_a_queue(path):
    cfg = yaml.safe_load(path.read_text())
    db = cfg["storage"]["postgres"]["postgres_db"]
    assert {"hostname", "db_name", "username", "password"} <= set(db)
    assert all(isinstance(db[k], dict) and "env" in db[k] for k in ("username", "password")), "secrets from env"
    assert cfg["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_bad_instance_key_is_refused(tmp_path):
    """The schema check above can fail: a misspelled top-level key is rejected."""
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config

    cfg = yaml.safe_load((DEPLOY / "dagster-postgres.yaml").read_text())
    cfg["run_coordinater"] = cfg.pop("run_coordinator")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(DagsterInvalidConfigError):
        dagster_instance_config(str(tmp_path))


def test_k8s_instance_launches_runs_as_jobs_with_a_shared_artifact_volume():
    cfg = yaml.safe_load((DEPLOY / "k8s" / "dagster.yaml").read_text())
    rl = cfg["run_launcher"]
    assert (rl["module"], rl["class"]) == ("dagster_k8s", "K8sRunLauncher")
    mounts = {m["name"]: m["mount_path"] for m in rl["config"]["volume_mounts"]}
    assert mounts == {"nexus-artifacts": "/data/artifacts"}
    assert {v["name"] for v in rl["config"]["volumes"]} == {"nexus-artifacts"}


def test_gpu_steps_are_exactly_the_gpu_pool():
    """executor.yaml, the code location and the assets agree on which steps get a GPU."""
    from nexus_assets.definitions import defs

    pool_gpu = sorted(a.node_def.name for a in defs.assets if getattr(a.node_def, "pool", None) == "gpu")
    assert set(GPU_OPS) <= set(pool_gpu)

    exe = yaml.safe_load((DEPLOY / "k8s" / "executor.yaml").read_text())["execution"]["config"]
    per_step = exe["per_step_k8s_config"]
    assert sorted(per_step) == pool_gpu, "executor.yaml must list every gpu-pool step and nothing else"
    for op, step in per_step.items():
        assert step["container_config"]["resources"]["limits"]["nvidia.com/gpu"] >= 1, op
    assert "nvidia.com/gpu" not in str(exe["step_k8s_config"]), "CPU steps must not hold a GPU"


def test_k8s_code_location_helpers_without_dagster_k8s(monkeypatch):
    monkeypatch.setenv("NEXUS_K8S_DEFS_LAZY", "1")
    mod = _load_module(DEPLOY / "k8s" / "definitions.py", "nexus_deploy_k8s_definitions")
    from nexus_assets.definitions import defs

    cfg = mod.executor_config(defs, gpus=2, namespace="ns")
    assert sorted(cfg["per_step_k8s_config"]) == mod.gpu_bound_ops(defs)
    assert set(GPU_OPS) <= set(mod.gpu_bound_ops(defs))
    gpu = cfg["per_step_k8s_config"]["teacher_features"]
    assert gpu["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": 2}
    # the executor.yaml run config and the code location request the same pod for a GPU step
    exe = yaml.safe_load((DEPLOY / "k8s" / "executor.yaml").read_text())["execution"]["config"]
    assert exe["per_step_k8s_config"]["teacher_features"] == mod.gpu_step_k8s_config(1)


@pytest.mark.skipif(not _has("dagster_k8s"), reason="dagster-k8s is not installed here: structure checked only")
def test_k8s_configs_pass_dagster_k8s_schemas(monkeypatch):
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher, k8s_job_executor

    rl = yaml.safe_load((DEPLOY / "k8s" / "dagster.yaml").read_text())["run_launcher"]["config"]
    res = process_config(K8sRunLauncher.config_type(), rl)
    assert res.success, res.errors
    exe = yaml.safe_load((DEPLOY / "k8s" / "executor.yaml").read_text())["execution"]["config"]
    res = process_config(k8s_job_executor.config_schema.config_type, exe)
    assert res.success, res.errors
    monkeypatch.delenv("NEXUS_K8S_DEFS_LAZY", raising=False)
    mod = _load_module(DEPLOY / "k8s" / "definitions.py", "nexus_deploy_k8s_definitions_full")
    assert mod.defs.resolve_asset_graph().get_all_asset_keys()


def test_helm_values_point_at_the_k8s_code_location():
    v = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    assert v["runLauncher"]["type"] == "K8sRunLauncher"
    dep = v["dagster-user-deployments"]["deployments"][0]
    script = dep["dagsterApiGrpcArgs"][dep["dagsterApiGrpcArgs"].index("--python-file") + 1]
    assert (REPO / script).is_file(), script
    assert v["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    launcher = v["runLauncher"]["config"]["k8sRunLauncher"]
    assert {m["mountPath"] for m in launcher["volumeMounts"]} == {"/data/artifacts"}


def test_torchrun_pipes_example_builds_a_gpu_asset():
    import json

    mod = _load_module(DEPLOY / "torchrun" / "pipes_asset.py", "nexus_deploy_torchrun")
    cmd = mod.torchrun_command(2)
    assert "--nproc_per_node=2" in cmd and cmd[-1].endswith("train_tower_ddp.py") and Path(cmd[-1]).is_file()
    asset = list(mod.defs.assets)[0]
    assert asset.op.pool == "gpu"
    tag = json.loads(asset.op.tags["dagster-k8s/config"])
    assert tag["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == 4
    mod.defs.resolve_asset_graph()  # resources and config resolve
    compile(mod.SCRIPT.read_text(), str(mod.SCRIPT), "exec")
