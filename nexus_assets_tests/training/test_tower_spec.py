"""One registry: tower heads come from the registry entries and the cached features, not from code."""
import json

import numpy as np
import pytest

from nexus_assets.core.feature_store import FeatureCacheError
from nexus_assets.core.registry import TeacherSpec
from nexus_assets.training.tower_spec import tower_config_from_registry
from nexus_assets_tests.runtime.tiny import _write_entry


def _teacher(name, modality, tower, caps, layers, family="x"):
    return TeacherSpec.model_validate({
        "name": name, "modality": modality, "tower": tower, "family": family, "capabilities": caps,
        "dataset": "d", "source": {"kind": "path", "path": "/nonexistent"}, "extraction": {"layers": layers}})


def test_heads_follow_the_cache(tmp_path):
    n = 3
    lm = _write_entry(tmp_path / "lm", {"row_id": ["a", "b", "c"], "split": ["train"] * n,
                                         "hidden.layers.2": np.zeros((n, 12), np.float32)},
                      {"row_id": ["a", "a"], "position": [0, 1], "token_id": [1, 2],
                       "topk_ids": np.zeros((2, 4), np.int32)})
    enc = _write_entry(tmp_path / "enc", {"row_id": ["a", "b", "c"], "split": ["train"] * n,
                                          "embedding": np.zeros((n, 7), np.float32),
                                          "hidden.layers.1": np.zeros((n, 5), np.float32)})
    snap = tmp_path / "snap"
    (snap / "hf").mkdir(parents=True)
    (snap / "hf" / "config.json").write_text(json.dumps({"vocab_size": 321}))
    teachers = [_teacher("big-lm", "text", "text", ["text.generate"], ["layers.2"]),
                _teacher("enc", "text", "text", ["text.embed"], ["layers.1", "layers.9"]),
                _teacher("other", "vision", "vision", ["vision.classify"], [])]
    cfg = tower_config_from_registry("text", teachers, {"big-lm": lm, "enc": enc}, {"big-lm": snap}, width=32, depth=2)
    gen, emb = cfg.capabilities["text.generate"], cfg.capabilities["text.embed"]
    assert (gen.kind, gen.out_dim, gen.teacher, gen.anchor_layers) == ("lm", 321, "big-lm", {"layers.2": 12})
    # layers.9 is configured but not cached: no anchor invented for it
    assert (emb.kind, emb.out_dim, emb.anchor_layers) == ("embedding", 7, {"layers.1": 5})
    assert cfg.vocab_size == 321 and cfg.width == 32 and set(cfg.lora_rank) == {"text.generate", "text.embed"}


def test_missing_vocabulary_or_cache_is_named(tmp_path):
    lm = _write_entry(tmp_path / "lm", {"row_id": ["a"], "split": ["train"]},
                      {"row_id": ["a"], "position": [0], "token_id": [1], "topk_ids": np.zeros((1, 4), np.int32)})
    t = [_teacher("big-lm", "text", "text", ["text.generate"], [])]
    with pytest.raises(FeatureCacheError, match="big-lm.*vocab_size"):
        tower_config_from_registry("text", t, {"big-lm": lm}, {"big-lm": tmp_path})
    with pytest.raises(ValueError, match="teacher 'big-lm' has no cached features"):
        tower_config_from_registry("text", t, {}, {})
    with pytest.raises(ValueError, match="no enabled teacher"):
        tower_config_from_registry("audio", t, {"big-lm": lm}, {})
