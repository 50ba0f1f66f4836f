"""teacher_config: each teacher's registry entry as an asset, so a registry edit is a data change that
Dagster can see. Its data version is the entry's hash: re-reading an unchanged registry changes nothing
downstream, editing one teacher's revision or extraction settings makes exactly its partitions stale."""
import dagster as dg

from .partitions import REGISTRY, teacher_partitions


@dg.asset(partitions_def=teacher_partitions, code_version="1", group_name="teachers", kinds={"yaml"})
def teacher_config(context: dg.AssetExecutionContext) -> dg.Output[dict]:
    from nexus_assets.core.atomic import sha256_json
    from nexus_assets.core.registry import load_registry

    spec = load_registry().teacher(context.partition_key)  # re-read: the registry may have changed since load
    entry = spec.model_dump(mode="json")
    digest = sha256_json(entry)[:16]
    return dg.Output(entry, data_version=dg.DataVersion(digest),
                     metadata={"entry": dg.MetadataValue.json(entry), "hash": digest,
                               "file": REGISTRY.files.get(spec.name, "?")})
