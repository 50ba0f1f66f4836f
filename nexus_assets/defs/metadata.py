"""Small helpers shared by the asset modules."""
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import dagster as dg


def png_markdown(path) -> dg.MetadataValue:
    """A PNG inlined as Markdown, so plots show in the asset's metadata in the UI."""
    import base64

    data = base64.b64encode(open(path, "rb").read()).decode()
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{data})")


@dataclass(frozen=True)
class Artifact:
    """A typed reference to one upstream asset partition's artifact (where it is, which partition, what it
    hashes to) with the asset's whole output in `value` for its other fields."""

    path: Path
    partition: str
    content_hash: str | None
    value: Mapping


def upstream(value: Mapping, key: str, asset: str) -> dict[str, Artifact]:
    """The one helper for partition-mapped inputs: Dagster passes one upstream partition's output, or
    {partition: output} when several map in; both become {output[key]: Artifact}. Every artifact output
    holds a "path", which is how the two shapes are told apart; anything else is an error naming the input."""
    values = [value] if isinstance(value, Mapping) and "path" in value else list(dict(value).values())
    out = {}
    for v in values:
        if not isinstance(v, Mapping) or "path" not in v or key not in v:
            have = sorted(v) if isinstance(v, Mapping) else type(v).__name__
            raise ValueError(f"input {asset!r}: an upstream output lacks 'path' or {key!r} (has {have})")
        out[str(v[key])] = Artifact(Path(v["path"]), str(v[key]), v.get("content_hash") or v.get("cache_key"), v)
    return out
