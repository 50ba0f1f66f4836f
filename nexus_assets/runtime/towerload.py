"""Load one tower folder after checking it can be trusted to describe itself.

Why: `load_tower` builds the model from config.json and only then reads the weights, so a config with
width 65536 allocated 48 GiB before any shape check, and an adapter name `../../x` was looked up outside
the folder. Here config.json is parsed first, adapter names must be single folder names, every
safetensors header is checked, and the config's parameter shapes (built on torch's `meta` device, which
allocates nothing) are compared with the headers before a real tensor exists.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nexus_assets.student.config import TowerConfig
from nexus_assets.student.quantize import load_state
from nexus_assets.student.tower import (FORMAT_VERSION, STOCK_BACKBONE_FILE, StudentTower, load_tower,
                                        weight_files)

from .files import ADAPTER_NAME, BundleError, check_no_symlinks, header_shapes, read_checked, read_header

__all__ = ["read_config", "check_sizes", "load_student", "MAX_DEPTH", "MAX_WIDTH"]

MAX_DEPTH, MAX_WIDTH = 256, 16384  # far above any tower here; keeps even the `meta` build instant
PARAM_SLACK = 1_000_000  # buffers and rounding: parameters the headers need not hold exactly


def _json(directory: Path, rel: str) -> object:
    data = read_checked(directory, rel, None, limit=64 << 20)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{directory / rel}: not valid UTF-8 JSON ({e})") from None


def read_config(directory: Path) -> tuple[TowerConfig, dict, bool]:
    """(TowerConfig, adapters {capability: folder}, whether it is a runtime copy without anchor
    projections) from config.json, every field checked."""
    f = directory / "config.json"
    meta = _json(directory, "config.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("tower"), dict):
        raise BundleError(f"{f}: must be an object with a 'tower' object (not a tower folder written by save_tower)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{f}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}")
    try:
        cfg = TowerConfig.from_dict(meta["tower"])
    except (TypeError, ValueError) as e:
        raise BundleError(f"{f}: field 'tower': {e}") from None
    for field, hi in (("width", MAX_WIDTH), ("depth", MAX_DEPTH), ("decoder_depth", MAX_DEPTH)):
        if getattr(cfg, field) > hi:
            raise BundleError(f"{f}: field 'tower.{field}': {getattr(cfg, field)} is over {hi}")
    adapters = meta.get("adapters", {})
    if not isinstance(adapters, dict):
        raise BundleError(f"{f}: field 'adapters' must be an object")
    for cap, name in adapters.items():
        if not isinstance(name, str) or not ADAPTER_NAME.match(name) or ".." in name:
            raise BundleError(f"{f}: field 'adapters.{cap}': {name!r} is not a folder name inside the tower")
        check_no_symlinks(directory, name)
        if not (directory / name).is_dir():
            raise BundleError(f"{directory / name}: missing adapter folder (config.json 'adapters.{cap}')")
    anchors = meta.get("anchor_projections")
    if anchors not in (None, "dropped"):
        raise BundleError(f"{f}: field 'anchor_projections': {anchors!r}, expected 'dropped' or no field")
    return cfg, adapters, anchors == "dropped"


def check_sizes(directory: Path, cfg: TowerConfig, anchors_dropped: bool = False) -> str:
    """Compare the config's parameter shapes with the safetensors headers before building; return the
    quantization scheme. Per key where the names match (backbone / heads), and in total for every tower
    (carved ones store their backbone under hf/ with other names). anchors_dropped: a runtime copy
    (`strip_for_runtime`) holds no anchor projections."""
    headers = {rel: read_header(directory, rel) for rel in weight_files(directory)}
    with torch.device("meta"):
        try:
            model = StudentTower(cfg)
            if anchors_dropped:
                model.drop_anchor_projections()
            expected = {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
            model_params = sum(p.numel() for p in model.parameters())
        except Exception as e:  # noqa: BLE001 - a config the model cannot be built from
            raise BundleError(f"{directory / 'config.json'}: field 'tower': cannot build ({type(e).__name__}: {e})")
    declared = 0
    for rel, header in headers.items():
        shapes = header_shapes(header)
        for k, shape in shapes.items():
            n = 1
            for d in shape:
                n *= int(d)
            declared += n
            want = expected.get(("backbone." + k) if rel == "backbone.safetensors" else k)
            if rel != STOCK_BACKBONE_FILE and want is not None and want != list(shape):
                raise BundleError(f"{directory / rel}: tensor {k!r} has shape {list(shape)}, config.json "
                                  f"implies {want}")
    if model_params > declared + PARAM_SLACK:
        raise BundleError(f"{directory / 'config.json'}: the config implies {model_params:,} parameters but the "
                          f"weight files hold {declared:,}")
    meta = headers["backbone.safetensors"].get("__metadata__") or {}
    return meta.get("nexus_quantization", "none")


def load_student(directory: Path) -> tuple[StudentTower, str]:
    """(tower, quantization scheme) from a checked folder; any loader failure is a BundleError."""
    cfg, _, dropped = read_config(directory)
    scheme = check_sizes(directory, cfg, anchors_dropped=dropped)
    try:
        tower = load_tower(directory, read_state=load_state)  # int8 / nf4 dequantized on read
        tower.merge_lone_adapter()  # a one-capability tower runs with its adapter folded in
        if any(p.dim() == 4 for p in tower.parameters()):
            # a convolutional tower runs channels-last: oneDNN's fast layout (vision, batch 32: ~2x)
            tower = tower.to(memory_format=torch.channels_last)
        return tower, scheme
    except Exception as e:  # noqa: BLE001 - safetensors / peft / torch errors on a bad folder
        raise BundleError(f"{directory}: cannot load the tower ({type(e).__name__}: {e})") from None
