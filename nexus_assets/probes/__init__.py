"""Probe data: the real offline sources and the probe datasets built from them (above core/)."""
