"""Probe data: the real offline sources and the probe datasets built from them (above core/)."""
from . import probe_sources as probe_sources  # noqa: F401  (loads first: the corpus modules build on it)
