"""NEXUS: distil pretrained teachers into a small multi-tower student, as a Dagster asset graph."""
