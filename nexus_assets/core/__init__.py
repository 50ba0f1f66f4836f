"""Dagster-free library: registry, storage, maths. Nothing here imports dagster."""
