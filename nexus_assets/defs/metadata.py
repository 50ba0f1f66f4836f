"""Small helpers shared by the asset modules."""
import dagster as dg


def png_markdown(path) -> dg.MetadataValue:
    """A PNG inlined as Markdown, so plots show in the asset's metadata in the UI."""
    import base64

    data = base64.b64encode(open(path, "rb").read()).decode()
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{data})")


def by_key(value: dict, key: str) -> dict:
    """An input mapped from several upstream partitions arrives as {partition: value}, from one as the
    value itself; normalise to {value[key]: value} / {partition: value}."""
    return {value[key]: value} if key in value else value
