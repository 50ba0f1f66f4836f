"""One adapter per teacher family. The ONLY place teacher packages are imported.

Each family module exposes:
  convert(spec, snapshot_dir: Path) -> dict      # optional: one-off format conversion at snapshot time
  load(spec, snapshot_dir: Path, device: str) -> Teacher
"""
