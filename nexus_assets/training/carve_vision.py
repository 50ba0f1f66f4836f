"""Carve the vision tower from an EfficientNet-Lite0 snapshot: fold BatchNorm into the convolutions, score
every MBConv block's inner channels and the head channels by first-order Taylor importance |a * dL/da|
(L = the log-probability of the teacher's own top-1 class on train probe images; NIWT's objective for a
classifier), keep the same top share of each so that the carved network has `keep_fraction` of the
teacher's parameters, and slice the weights. Reads the snapshot's `.pth` state dict (plain tensors,
`weights_only`); imports no teacher package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

BN_EPS = 1e-3
# EfficientNet-Lite0 (width and depth 1.0, stem and head fixed): repeats, kernel, stride, expand, in, out
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def lite0_blocks() -> list[dict]:
    """The 16 MBConv blocks of EfficientNet-Lite0 at full width: in, out, inner, k, s, expand."""
    out = []
    for reps, k, s, e, i, o in LITE0_STAGES:
        for r in range(reps):
            cin = i if r == 0 else o
            out.append({"in": cin, "out": o, "inner": cin * e, "k": k, "s": s if r == 0 else 1, "expand": e != 1})
    return out


def fold_bn(w: torch.Tensor, sd: dict, bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight (O, ...) followed by BatchNorm `bn` (eval) -> (weight, bias) of one conv."""
    scale = sd[f"{bn}.weight"] / torch.sqrt(sd[f"{bn}.running_var"] + BN_EPS)  # (O,)
    return w * scale.view(-1, *([1] * (w.ndim - 1))), sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * scale


def folded_state(pth: Path) -> dict[str, torch.Tensor]:
    """The teacher's weights, BN folded, in CarvedEfficientNetBackbone's names (full width) + "fc.*"."""
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    out = {}
    out["stem.weight"], out["stem.bias"] = fold_bn(sd["_conv_stem.weight"], sd, "_bn0")
    for i, b in enumerate(lite0_blocks()):
        p = f"_blocks.{i}."
        if b["expand"]:
            out[f"blocks.{i}.expand.weight"], out[f"blocks.{i}.expand.bias"] = fold_bn(sd[p + "_expand_conv.weight"], sd, p + "_bn0")
        out[f"blocks.{i}.dw.weight"], out[f"blocks.{i}.dw.bias"] = fold_bn(sd[p + "_depthwise_conv.weight"], sd, p + "_bn1")
        out[f"blocks.{i}.project.weight"], out[f"blocks.{i}.project.bias"] = fold_bn(sd[p + "_project_conv.weight"], sd, p + "_bn2")
    out["head_conv.weight"], out["head_conv.bias"] = fold_bn(sd["_conv_head.weight"], sd, "_bn1")
    out["fc.weight"], out["fc.bias"] = sd["_fc.weight"], sd["_fc.bias"]
    return out


def _params(blocks: Sequence[dict], head: int, classes: int = 1000, stem: int = 32) -> int:
    n = 3 * stem * 9 + stem
    for b in blocks:
        n += (b["in"] * b["inner"] + b["inner"] if b["expand"] else 0) + b["inner"] * (b["k"] ** 2 + 1)
        n += b["inner"] * b["out"] + b["out"]
    return n + blocks[-1]["out"] * head + head + head * classes + classes


def _plan_dict(blocks, head, keep, anchor_layers):
    return {"family": "efficientnet_lite", "stem": 32, "blocks": blocks, "head": head, "keep": keep,
            "anchor_layers": list(anchor_layers)}


def taylor_scores(state: dict, pixels: torch.Tensor, batch: int = 16):
    """Per block (inner,) and head (1280,) importance: sum over images and positions of |a * dL/da|, L =
    log p(teacher's top-1 class); the network is the full-width teacher (BN folded). Returns (block scores,
    head scores, block means, head means): each channel's mean activation over images and positions is the
    constant a pruned channel is replaced by (`compensation_shifts`)."""
    from nexus_assets.student.carved_vision import CarvedEfficientNetBackbone
    from nexus_assets.student.config import HeadSpec, TowerConfig

    blocks = lite0_blocks()
    cfg = TowerConfig(name="vision", modality="vision", width=1280, n_heads=1, image_size=224,
                      capabilities={"vision.classify": HeadSpec("classes", 1000)}, lora_rank={"vision.classify": 1},
                      init="carved", carve=_plan_dict(blocks, 1280, {}, []))
    net = CarvedEfficientNetBackbone(cfg)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    acts: dict = {}

    def tap(key):
        def f(h):
            h.retain_grad()
            acts[key] = h
            return h
        return f

    net.taps = {i: tap(i) for i in range(len(blocks))} | {"head": tap("head")}
    sums = {k: torch.zeros(b["inner"]) for k, b in enumerate(blocks)} | {"head": torch.zeros(1280)}
    means = {k: torch.zeros_like(v) for k, v in sums.items()}
    positions = {k: 0 for k in sums}
    for s in range(0, len(pixels), batch):
        x = pixels[s:s + batch]
        logits = fc(net.features(x).mean((2, 3)))
        logp = torch.log_softmax(logits, -1)
        logp.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()
        for k, a in acts.items():
            sums[k] += (a.detach() * a.grad).abs().sum((0, 2, 3))
            means[k] += a.detach().sum((0, 2, 3))
            positions[k] += a.shape[0] * a.shape[2] * a.shape[3]
        net.zero_grad(set_to_none=True)
    mu = {k: v / max(positions[k], 1) for k, v in means.items()}
    return [sums[i] for i in range(len(blocks))], sums["head"], [mu[i] for i in range(len(blocks))], mu["head"]


def compensation_shifts(state: dict, keep: dict, block_means: Sequence[torch.Tensor],
                        head_means: torch.Tensor) -> dict[str, list[float]]:
    """Bias shifts that replace each pruned channel by its mean activation instead of by zero ("mean
    replacement"): a pruned inner channel c of block i feeds `project` through W[:, c] (1x1 conv, linear),
    so its average contribution W[:, c] * mean_c moves into project's bias; a pruned head channel's, through
    the classifier (after mean pooling, linear too), into the classifier's bias. Exact for a channel that
    is constant over inputs; what is left is only its variation, which is what importance ranks."""
    def shift(weight: torch.Tensor, mu: torch.Tensor, kept) -> list[float]:  # weight (out, in) -> (out,)
        drop = torch.ones(len(mu), dtype=torch.bool)
        drop[torch.as_tensor(kept, dtype=torch.long)] = False
        return (weight.flatten(1)[:, drop] @ mu[drop]).tolist()

    shifts = {f"blocks.{i}": shift(state[f"blocks.{i}.project.weight"], mu, keep[str(i)])
              for i, mu in enumerate(block_means)}
    shifts["fc"] = shift(state["fc.weight"], head_means, keep["head"])
    return shifts


def plan_vision_carve(pth: Path, sample_pixels: torch.Tensor, *, keep_fraction: float = 0.75,
                      min_channels: int = 8, mean_replacement: bool = True, anchor_layers: Sequence[str] = ("blocks.5", "blocks.10", "features"),
                      log: Callable[[str], None] = print) -> dict:
    """The carve plan (JSON-able) of the vision tower: kept inner / head channel indices and the report."""
    if not (isinstance(keep_fraction, (int, float)) and 0 < keep_fraction <= 1):
        raise ValueError(f"tower 'vision' carve keep_fraction: must be in (0, 1], got {keep_fraction!r}")
    if len(sample_pixels) == 0:
        raise ValueError("tower 'vision' carve: no train image to score channels on")
    state = folded_state(pth)
    full = lite0_blocks()
    teacher_params = _params(full, 1280)
    block_scores, head_scores, block_means, head_means = taylor_scores(state, sample_pixels)

    def shape(r: float):
        # a block without an expansion conv reads its input channels directly: nothing to prune there
        blocks = [{**b, "inner": max(min_channels, min(b["inner"], round(b["inner"] * r))) if b["expand"]
                   else b["inner"]} for b in full]
        return blocks, max(min_channels, round(1280 * r))

    lo, hi = 0.0, 1.0  # the largest common keep ratio whose network fits the budget
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _params(*shape(mid)) <= keep_fraction * teacher_params else (lo, mid)
    blocks, head = shape(hi if keep_fraction >= 1 else lo)
    if _params(blocks, head) > keep_fraction * teacher_params and keep_fraction < 1:
        raise ValueError(f"tower 'vision' carve keep_fraction {keep_fraction}: even {min_channels} channels per "
                         f"block exceed it; raise keep_fraction or lower min_channels")
    keep = {}
    mass = {}
    for i, (b, sc) in enumerate(zip(blocks, block_scores)):
        idx = torch.argsort(sc, descending=True)[: b["inner"]]
        keep[str(i)] = sorted(idx.tolist())
        mass[f"blocks.{i}"] = round(float(sc[idx].sum() / sc.sum().clamp_min(1e-30)), 4)
    hidx = torch.argsort(head_scores, descending=True)[:head]
    keep["head"] = sorted(hidx.tolist())
    mass["head"] = round(float(head_scores[hidx].sum() / head_scores.sum().clamp_min(1e-30)), 4)
    plan = _plan_dict(blocks, head, keep, anchor_layers)
    if mean_replacement:
        plan["bias_shift"] = compensation_shifts(state, keep, block_means, head_means)
    student_params = _params(blocks, head)
    plan["report"] = {"teacher_params": teacher_params, "student_params": student_params,
                      "param_fraction": student_params / teacher_params,
                      "inner_channels_kept": {f"blocks.{i}": f"{b['inner']}/{f['inner']}" for i, (b, f) in
                                              enumerate(zip(blocks, full))},
                      "head_channels_kept": f"{head}/1280", "importance_mass_kept": mass,
                      "classifier": "the teacher's, on the kept head channels", "batchnorm": "folded into the convs",
                      "pruned_channels": "replaced by their mean activation (bias shift)" if mean_replacement
                      else "replaced by zero"}
    log(f"[vision carve] {student_params / 1e6:.2f}M of {teacher_params / 1e6:.2f}M params; head {head}/1280; "
        f"importance mass kept min {min(mass.values()):.3f}")
    return plan


def carved_vision_config(base, plan: dict, lora_rank: int):
    """`base` (the vision tower's heads from the registry) turned into the carved EfficientNet tower."""
    import dataclasses

    from nexus_assets.student.config import adapter_name

    classes = [c for c, h in base.capabilities.items() if h.kind == "classes"]
    if not classes:
        raise ValueError(f"tower {base.name!r}: carved from an image classifier but has no 'classes' capability")
    plan = {**plan, "classes_head": adapter_name(classes[0])}
    return dataclasses.replace(base, width=plan["head"], depth=len(plan["blocks"]), n_heads=1, image_size=224,
                               lora_rank={c: lora_rank for c in base.capabilities}, init="carved", carve=plan)


def _shift(plan: dict, key: str):
    """The plan's mean-replacement bias shift of `key` (0 for a plan without one)."""
    v = plan.get("bias_shift", {}).get(key)
    return 0.0 if v is None else torch.tensor(v, dtype=torch.float32)


def carved_vision_state(plan: dict, snapshot_dir: Path) -> dict[str, torch.Tensor]:
    """StudentTower state-dict entries ("backbone.*", "heads.<classes head>.fc.*") sliced by the plan."""
    pths = sorted(Path(snapshot_dir).glob("*.pth"))
    if not pths:
        raise FileNotFoundError(f"vision carve: no *.pth weights in {snapshot_dir}")
    st = folded_state(pths[0])
    out = {"backbone.stem.weight": st["stem.weight"], "backbone.stem.bias": st["stem.bias"]}
    for i, b in enumerate(plan["blocks"]):
        k = torch.as_tensor(plan["keep"][str(i)], dtype=torch.long)
        p = f"blocks.{i}."
        if b["expand"]:
            out["backbone." + p + "expand.weight"] = st[p + "expand.weight"][k]
            out["backbone." + p + "expand.bias"] = st[p + "expand.bias"][k]
        out["backbone." + p + "dw.weight"] = st[p + "dw.weight"][k]
        out["backbone." + p + "dw.bias"] = st[p + "dw.bias"][k]
        out["backbone." + p + "project.weight"] = st[p + "project.weight"][:, k]
        out["backbone." + p + "project.bias"] = st[p + "project.bias"] + _shift(plan, f"blocks.{i}")
    h = torch.as_tensor(plan["keep"]["head"], dtype=torch.long)
    out["backbone.head_conv.weight"], out["backbone.head_conv.bias"] = st["head_conv.weight"][h], st["head_conv.bias"][h]
    head = plan.get("classes_head", "vision_classify")
    out[f"heads.{head}.fc.weight"], out[f"heads.{head}.fc.bias"] = st["fc.weight"][:, h], st["fc.bias"] + _shift(plan, "fc")
    return {k: v.contiguous() for k, v in out.items()}


def plan_vision_carve_from_artifacts(snapshot_dir: Path, entry: Path, *, probe_dirs=None, sample_rows: int = 64,
                                     log=print, **settings) -> dict:
    """`plan_vision_carve` on the snapshot's weights and `sample_rows` train images of the probe data."""
    from nexus_assets.core.feature_store import read_features
    from nexus_assets.probes.probe_data import read_probe_rows
    from nexus_assets.student.transforms import preprocess_image

    from .carve_text import seeded_subset

    pths = sorted(Path(snapshot_dir).glob("*.pth"))
    if not pths:
        raise FileNotFoundError(f"vision carve: no *.pth weights in {snapshot_dir}")
    train = seeded_subset(sorted(read_features(Path(entry), "items", columns=["row_id"], filter_splits=["train"])
                                 .column("row_id").to_pylist()), sample_rows)
    want, images = set(train), {}
    for d in (probe_dirs or {}).values():
        t = read_probe_rows(Path(d))
        if "image" in t.column_names:
            for rid, img in zip(t.column("row_id").to_pylist(), t.column("image").to_pylist()):
                if rid in want:
                    images[rid] = img
    pixels = torch.stack([preprocess_image(images[r], 224, r) for r in train if r in images]) if images else torch.zeros(0)
    return plan_vision_carve(pths[0], pixels, log=log, **settings)
