"""Nightly re-distillation: re-read the registry and the probe sources (cheap, content-hashed); the
automation sensor then recomputes only what those new data versions made stale. One schedule per root
asset, because a Dagster job cannot mix the teacher and dataset partition sets."""
import dagster as dg

from .partitions import dataset_partitions, teacher_partitions


def _nightly(asset: str, partitions: dg.StaticPartitionsDefinition, cron: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"nightly_{asset}_refresh",
        cron_schedule=cron,
        target=dg.AssetSelection.assets(asset),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Re-materialize every {asset} partition; only partitions whose content hash changed "
                    "make anything downstream stale (recomputed by the automation sensor).",
    )
    def _schedule(context: dg.ScheduleEvaluationContext):
        day = context.scheduled_execution_time.strftime("%Y-%m-%d")
        for key in partitions.get_partition_keys():
            yield dg.RunRequest(run_key=f"{day}/{asset}/{key}", partition_key=key)

    return _schedule


nightly_schedules = [
    _nightly("teacher_config", teacher_partitions, "0 2 * * *"),
    _nightly("probe_dataset", dataset_partitions, "5 2 * * *"),
]

automation_sensor = dg.AutomationConditionSensorDefinition(
    "nexus_recompute_stale",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Evaluates each asset's recompute_when_stale condition and launches only the stale partitions.",
)
