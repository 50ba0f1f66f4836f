"""The teacher-free runtime: `Bundle.load(path)` + one method per capability, and the `nexus` CLI.

Imports no Dagster, no teachers/, no training code and no teacher package (guarantee 1 of design.md).
"""
from .bundle import CAPABILITY_METHODS, Bundle, BundleError, RoutingError, TowerRuntime, load_tower_dir
from .inputs import InputError, InputWarning

__all__ = ["Bundle", "BundleError", "RoutingError", "InputError", "InputWarning", "TowerRuntime", "load_tower_dir",
           "CAPABILITY_METHODS"]
