"""The Dagster layer: thin assets, one module per artifact family, calling the Dagster-free core."""
