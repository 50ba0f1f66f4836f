"""When assets recompute: only where an upstream data version or the asset's code version changed.

Data versions are content hashes (weights, probe data, registry entries, features), so re-materializing an
unchanged upstream leaves everything below it fresh, and touching one teacher recomputes exactly that
teacher's partitions, the tower it feeds and the bundle.
"""
import dagster as dg

AC = dg.AutomationCondition

RECOMPUTE_WHEN_STALE = (
    (AC.any_deps_match(AC.data_version_changed()) | AC.code_version_changed() | AC.newly_missing())
    .since_last_handled()
    & ~AC.any_deps_missing()
    & ~AC.any_deps_in_progress()
    & ~AC.in_progress()
    & AC.all_deps_blocking_checks_passed()
).with_label("recompute_when_stale")
