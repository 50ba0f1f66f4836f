"""DuckDB views over the feature cache: `SELECT * FROM "minilm-l6_items"` instead of walking Parquet."""
from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path
from .feature_store import FeatureCacheError, current_entry


def build_feature_views(features_root: Path, db_path: Path) -> tuple[Path, dict[str, str]]:
    import duckdb

    views: dict[str, str] = {}
    for teacher_dir in sorted(p for p in Path(features_root).iterdir() if p.is_dir()):
        try:
            entry = current_entry(teacher_dir)
        except FeatureCacheError:
            continue
        for kind in ("items", "tokens"):
            if any(entry.glob(f"{kind}-*.parquet")):
                views[f"{teacher_dir.name}_{kind}"] = str(entry / f"{kind}-*.parquet")
    with atomic_path(db_path) as tmp:
        tmp.unlink()  # duckdb must create the file itself
        con = duckdb.connect(str(tmp))
        for name, glob in views.items():
            con.execute(f"CREATE VIEW \"{name}\" AS SELECT * FROM read_parquet('{glob}')")
        con.close()
    return Path(db_path), views
