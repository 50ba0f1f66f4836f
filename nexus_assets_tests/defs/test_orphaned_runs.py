"""A pipeline killed by SIGKILL must not leave the next one waiting on its concurrency slot forever."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

from nexus_assets.pipeline import PID_TAG, SOURCE_TAGS, release_orphaned_runs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _started_run(instance, run_id: str, pid: int, tags=SOURCE_TAGS) -> None:
    instance.add_run(DagsterRun(job_name="__ephemeral_asset_job__", run_id=run_id, status=DagsterRunStatus.STARTED,
                                tags={**tags, PID_TAG: str(pid)}))


def test_a_dead_pipelines_run_is_failed_and_its_slot_freed_a_live_ones_kept(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        dead, alive, other = "a" * 32, "b" * 32, "c" * 32
        _started_run(instance, dead, _dead_pid())
        _started_run(instance, alive, os.getpid())
        _started_run(instance, other, _dead_pid(), tags={"nexus/source": "ui"})  # not ours: left to Dagster's run monitoring
        assert storage.claim_concurrency_slot("gpu", dead, "teacher_features").is_claimed

        assert release_orphaned_runs(instance) == [dead]

        assert instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive).status == DagsterRunStatus.STARTED
        assert instance.get_run_by_id(other).status == DagsterRunStatus.STARTED
        assert storage.get_concurrency_info("gpu").claimed_slots == []
        assert release_orphaned_runs(instance) == []
