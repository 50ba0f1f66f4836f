"""Nightly re-distillation: re-read the registry and the probe sources (cheap, content-hashed); the
automation sensor then recomputes only what those new data versions made stale."""
import dagster as dg

from .partitions import dataset_partitions, teacher_partitions

REFRESHED_ROOTS = dg.AssetSelection.assets("teacher_config", "probe_dataset")


@dg.schedule(
    cron_schedule="0 2 * * *",
    target=REFRESHED_ROOTS,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="02:00 daily: refresh teacher_config and probe_dataset partitions; stale pieces follow.",
)
def nightly_redistillation(context: dg.ScheduleEvaluationContext):
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    for teacher in teacher_partitions.get_partition_keys():
        yield dg.RunRequest(run_key=f"{day}/teacher_config/{teacher}", partition_key=teacher,
                            asset_selection=[dg.AssetKey("teacher_config")])
    for dataset in dataset_partitions.get_partition_keys():
        yield dg.RunRequest(run_key=f"{day}/probe_dataset/{dataset}", partition_key=dataset,
                            asset_selection=[dg.AssetKey("probe_dataset")])


automation_sensor = dg.AutomationConditionSensorDefinition(
    "nexus_recompute_stale",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Evaluates each asset's recompute_when_stale condition and launches only the stale partitions.",
)
