"""The NEXUS code location: assembles the asset families in defs/."""
import dagster as dg

from nexus_assets.defs import bundle, data, distillation, profiling, registry_entries, schedules, teachers, validation
from nexus_assets.defs.resources import default_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([registry_entries, data, teachers, profiling, distillation, validation, bundle]),
    asset_checks=[validation.retention_contracts, bundle.quantized_retention],
    schedules=schedules.nightly_schedules,
    sensors=[schedules.automation_sensor],
    resources=default_resources(),
)
