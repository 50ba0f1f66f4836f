"""The vision tower carved from EfficientNet-Lite: the teacher's own network with BatchNorm folded into its
convolutions and, per MBConv block, only the most important inner (expanded / depthwise) channels kept,
plus the most important head channels; the teacher's classifier is reused on the kept head channels.

Pruning only the inner channels leaves every block's input and output width, so the residual stream and
the teacher layers NEXUS caches (`blocks.<i>` pooled outputs, `features`) keep their meaning and width:
anchoring reads them directly. The architecture is rebuilt from `cfg.carve["blocks"]` alone (in, out,
inner, kernel, stride per block), so the runtime needs no teacher package. Runtime-safe: torch only.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadSpec, TowerConfig


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (asymmetric when odd), as EfficientNet-Lite was trained."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual (no squeeze-excite in the Lite family), BN folded: expand 1x1 -> ReLU6 ->
    depthwise kxk -> ReLU6 -> project 1x1 (+ input when stride 1 and widths agree)."""

    def __init__(self, b: Mapping):
        super().__init__()
        inner = int(b["inner"])
        self.expand = nn.Conv2d(b["in"], inner, 1) if b["expand"] else None
        self.dw = SameConv(inner, inner, b["k"], stride=b["s"], groups=inner)
        self.project = nn.Conv2d(inner, b["out"], 1)
        self.skip = b["s"] == 1 and b["in"] == b["out"]

    def forward(self, x, tap=None):
        h = F.relu6(self.expand(x)) if self.expand is not None else x
        h = F.relu6(self.dw(h))  # (B, inner, H, W): the channels carving prunes
        if tap is not None:
            h = tap(h)
        h = self.project(h)
        return h + x if self.skip else h


class _Classifier(nn.Module):
    """Mean over the head map's positions, then the teacher's classifier (on the kept head channels)."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, h, mask):  # h (B, L, W) -> (B, classes)
        return self.fc(h.mean(1))


class CarvedEfficientNetBackbone(nn.Module):
    """forward({pixels (B, 3, S, S)}) -> ([head map as (B, h*w, W)], mask (B, h*w)); see `student.carved`."""

    lora_target_regex = r".*blocks\.\d+\.project"

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        plan = cfg.carve
        self.stem = SameConv(3, plan["stem"], 3, stride=2)
        self.blocks = nn.ModuleList(MBConv(b) for b in plan["blocks"])
        self.head_conv = nn.Conv2d(plan["blocks"][-1]["out"], plan["head"], 1)
        self.layer_widths = {f"blocks.{i}": b["out"] for i, b in enumerate(plan["blocks"])}
        self.layer_widths["features"] = plan["head"]
        self.anchor_layers = [l for l in plan.get("anchor_layers", []) if l in self.layer_widths]
        self.layer_widths = {l: self.layer_widths[l] for l in self.anchor_layers}
        self.layer_states: dict[str, torch.Tensor] = {}
        self.taps: dict[int, object] | None = None  # carving's importance hooks (None at run time)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, W, h, w) head map; records pooled `layer_states` on the way."""
        states = {}
        h = F.relu6(self.stem(pixels))
        for i, blk in enumerate(self.blocks):
            h = blk(h, None if self.taps is None else self.taps.get(i))
            if f"blocks.{i}" in self.anchor_layers:
                states[f"blocks.{i}"] = h.mean((2, 3))
        h = F.relu6(self.head_conv(h))
        if self.taps is not None and "head" in self.taps:
            h = self.taps["head"](h)
        if "features" in self.anchor_layers:
            states["features"] = h.mean((2, 3))
        self.layer_states = states
        return h

    def forward(self, inputs: Mapping[str, torch.Tensor]):
        h = self.features(inputs["pixels"])
        tokens = h.flatten(2).transpose(1, 2)  # (B, h*w, W)
        return [tokens], torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def make_head(self, capability: str, spec: HeadSpec):
        return _Classifier(self.head_conv.out_channels, spec.out_dim) if spec.kind == "classes" else None
