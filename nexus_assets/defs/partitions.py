"""Partitions come from the registry, so adding a teacher to data/registry adds a partition."""

import dagster as dg

from nexus_assets.core.registry import load_registry

REGISTRY = load_registry()

teacher_partitions = dg.StaticPartitionsDefinition([t.name for t in REGISTRY.enabled_teachers()])
dataset_partitions = dg.StaticPartitionsDefinition(REGISTRY.used_datasets())
tower_partitions = dg.StaticPartitionsDefinition(list(REGISTRY.towers()))

# which teachers read which dataset / feed which tower (upstream partition -> downstream partitions)
dataset_to_teachers = dg.StaticPartitionMapping(
    {d: [t.name for t in REGISTRY.enabled_teachers() if t.dataset == d] for d in REGISTRY.used_datasets()}
)
teacher_to_tower = dg.StaticPartitionMapping({t.name: t.tower for t in REGISTRY.enabled_teachers()})
dataset_to_towers = dg.StaticPartitionMapping(
    {d: sorted({t.tower for t in REGISTRY.enabled_teachers() if t.dataset == d}) for d in REGISTRY.used_datasets()
     if any(t.dataset == d for t in REGISTRY.enabled_teachers())}
)
