"""A tower folder made into its runtime copy."""
import torch

from nexus_assets.student.config import HeadSpec, TowerConfig
from nexus_assets.student.tower import StudentTower, load_tower, save_tower


def test_runtime_copy_drops_anchor_projections_and_keeps_outputs(tmp_path):
    """strip_for_runtime: the training-only anchor projections leave the folder, the early-exit
    capability's LoRA on the block it never runs, and the deep capability's LoRA on the block only it
    runs, merged into the weights (parameters counted down); the reloaded tower gives the same outputs
    (every LoRA B non-zero, so a wrongly dropped or merged block would show) and runs no projection."""
    import json

    from nexus_assets.student.tower import strip_for_runtime

    cfg = TowerConfig(name="text", modality="text", width=32, depth=2, n_heads=2, vocab_size=50, max_len=8,
                      capabilities={"text.generate": HeadSpec("lm", 50, "t", {"layers.3": 48}),
                                    "text.embed": HeadSpec("embedding", 16, "e", {"layers.1": 24}, exit_block=1)},
                      lora_rank={"text.generate": 2, "text.embed": 2})
    torch.manual_seed(0)
    tower = StudentTower(cfg)
    tower.add_adapter("text.embed")
    tower.add_adapter("text.generate")
    lora_b = {n: p for n, p in tower.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for p in lora_b.values():
            p.normal_()
    per_block = sum(p.numel() for n, p in tower.named_parameters() if "text_embed" in n and "blocks.1." in n)
    # text.embed runs block 0 only, so text.generate's LoRA on block 1 is folded into the weights
    merged = sum(p.numel() for n, p in tower.named_parameters() if "text_generate" in n and "blocks.1." in n)
    assert per_block > 0 and merged > 0
    per_block += merged
    d = save_tower(tower, tmp_path / "t")
    before = json.loads((d / "config.json").read_text())["num_parameters"]
    n_proj = sum(p.numel() for p in tower.anchor_proj.parameters())
    assert n_proj == 32 * 48 + 48 + 32 * 24 + 24
    x = {"input_ids": torch.randint(0, 50, (2, 8))}
    with torch.no_grad():
        ref = {c: load_tower(d)(x, c)["out"] for c in cfg.capabilities}
    assert strip_for_runtime(d) == n_proj + per_block and strip_for_runtime(d) == 0  # idempotent
    assert json.loads((d / "config.json").read_text())["num_parameters"] == before - n_proj - per_block
    back = load_tower(d)
    assert len(back.anchor_proj) == 0
    assert not [n for n, _ in back.named_parameters() if "lora_" in n and "blocks.1." in n]
    assert sum(p.numel() for p in back.parameters()) == before - n_proj - per_block
    with torch.no_grad():
        for c in cfg.capabilities:
            res = back(x, c)
            torch.testing.assert_close(res["out"], ref[c])
            assert res["anchors"] == {}


def test_lone_adapter_is_merged_with_the_same_outputs():
    """A one-capability tower folds its adapter into the backbone (no LoRA modules left, same outputs);
    a tower with two capabilities keeps both adapters."""
    cfg = TowerConfig(name="vision", modality="vision", width=32, depth=2, n_heads=2, image_size=32,
                      capabilities={"vision.classify": HeadSpec("classes", 10, "v")}, lora_rank={"vision.classify": 4})
    torch.manual_seed(0)
    tower = StudentTower(cfg)
    tower.add_adapter("vision.classify")
    with torch.no_grad():
        for n, p in tower.named_parameters():
            if "lora_B" in n:
                p.normal_()
    tower.eval()
    x = {"pixels": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        ref = tower(x, "vision.classify")["out"]
        assert tower.merge_lone_adapter()
        assert not [n for n, _ in tower.named_parameters() if "lora_" in n]
        torch.testing.assert_close(tower(x, "vision.classify")["out"], ref, atol=1e-5, rtol=1e-5)
    two = TowerConfig(name="text", modality="text", width=32, depth=2, n_heads=2, vocab_size=50, max_len=8,
                      capabilities={"text.generate": HeadSpec("lm", 50, "t"), "text.embed": HeadSpec("embedding", 16, "e")},
                      lora_rank={"text.generate": 2, "text.embed": 2})
    t2 = StudentTower(two)
    t2.add_adapter("text.generate")
    t2.add_adapter("text.embed")
    assert not t2.merge_lone_adapter() and t2.adapters == ["text.generate", "text.embed"]


def test_runtime_loader_accepts_a_stripped_copy(tmp_path):
    """The runtime's size check counts what a stripped copy holds: anchor projections over its slack
    (1M parameters here) are not expected once dropped."""
    from nexus_assets.runtime.towerload import load_student
    from nexus_assets.student.tower import strip_for_runtime

    cfg = TowerConfig(name="text", modality="text", width=32, depth=2, n_heads=2, vocab_size=50, max_len=8,
                      capabilities={"text.embed": HeadSpec("embedding", 16, "e", {"layers.1": 40000})},
                      lora_rank={"text.embed": 2})
    tower = StudentTower(cfg)
    tower.add_adapter("text.embed")
    d = save_tower(tower, tmp_path / "t")
    assert strip_for_runtime(d) == 32 * 40000 + 40000
    back, scheme = load_student(d)
    assert scheme == "none" and len(back.anchor_proj) == 0
    import json

    import pytest

    from nexus_assets.runtime.files import BundleError

    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "anchor_projections": "kept"}))
    with pytest.raises(BundleError, match="config.json: field 'anchor_projections': 'kept'"):
        load_student(d)


def test_no_lora_is_merged_when_another_capability_runs_every_block(tmp_path):
    """Two capabilities that both run every block: neither adapter can be folded into the shared weights."""
    import json

    from nexus_assets.student.tower import strip_for_runtime

    cfg = TowerConfig(name="text", modality="text", width=32, depth=2, n_heads=2, vocab_size=50, max_len=8,
                      capabilities={"text.generate": HeadSpec("lm", 50, "t"), "text.embed": HeadSpec("embedding", 16, "e")},
                      lora_rank={"text.generate": 2, "text.embed": 2})
    torch.manual_seed(0)
    tower = StudentTower(cfg)
    tower.add_adapter("text.generate")
    tower.add_adapter("text.embed")
    with torch.no_grad():
        for n, p in tower.named_parameters():
            if "lora_B" in n:
                p.normal_()
    d = save_tower(tower, tmp_path / "t")
    lora = sum(p.numel() for n, p in tower.named_parameters() if "lora_" in n)
    x = {"input_ids": torch.randint(0, 50, (2, 8))}
    with torch.no_grad():
        ref = {c: load_tower(d)(x, c)["out"] for c in cfg.capabilities}
    assert strip_for_runtime(d) == 0  # no anchor projections, no exit, nothing merged
    back = load_tower(d)
    assert sum(p.numel() for n, p in back.named_parameters() if "lora_" in n) == lora
    assert json.loads((d / "config.json").read_text())["anchor_projections"] == "dropped"
    with torch.no_grad():
        for c in cfg.capabilities:
            torch.testing.assert_close(back(x, c)["out"], ref[c])
