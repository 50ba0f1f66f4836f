"""Tower sizing on hand-made profiles: rank from the intrinsic dimension, capped by memory."""
from __future__ import annotations

import json

import pytest

from nexus_assets.core.sizing import choose_tower_architecture

PROFILES = [
    {"teacher": "smollm2", "layer": "blocks.10", "width": 576,
     "intrinsic_dims": {"0.9": 40, "0.95": 90, "0.99": 200}},
    {"teacher": "smollm2", "layer": "blocks.20", "width": 576,
     "intrinsic_dims": {"0.9": 30, "0.95": 60, "0.99": 300}},
]
# hidden = ceil(300 / 64) * 64 = 320; defaults depth 2, 4 matrices, fp32, Adam:
# bytes per rank = 2 * 4 * 2 * 320 * 4 * (2 + 2) = 81920, adapters get 1/4 of the budget.
BYTES_PER_RANK = 81920
LARGE = 1 << 34


def budget_for(raw_rank: int) -> int:
    return raw_rank * BYTES_PER_RANK * 4


def test_rank_equals_intrinsic_dim_when_memory_is_large():
    out = choose_tower_architecture("text", PROFILES, memory_budget_bytes=LARGE)
    assert out["lora_rank"] == 90
    assert out["rank_cap_applied"] == "none"
    assert out["rank_source"] == {"teacher": "smollm2", "layer": "blocks.10", "width": 576, "intrinsic_dim": 90}
    assert out["hidden_width"] == 320
    assert out["width_source"]["layer"] == "blocks.20"
    assert out["depth"] == 2
    assert out["adapter_params"] == 90 * BYTES_PER_RANK // 16
    assert any("'blocks.10'" in r and "95%" in r for r in out["reasoning"])
    assert any("no cap applied" in r for r in out["reasoning"])
    assert json.loads(json.dumps(out)) == out


@pytest.mark.parametrize(
    "raw, max_rank",
    [(32, 32), (37, 32), (6, 4), (4, 4)],  # multiple of 8 above 8, power of two below
)
def test_memory_cap_applies_when_memory_is_small(raw, max_rank):
    out = choose_tower_architecture("text", PROFILES, memory_budget_bytes=budget_for(raw))
    assert out["max_rank"] == max_rank
    assert out["lora_rank"] == max_rank
    assert out["rank_cap_applied"] == "max_rank"
    assert any(f"capped at MAX_RANK {max_rank} by the memory budget (wanted 90)" in r for r in out["reasoning"])


def test_budget_below_min_rank_is_an_error():
    with pytest.raises(ValueError, match=r"tower 'text': memory_budget_bytes=.* fits at most rank 2 < min_rank=4"):
        choose_tower_architecture("text", PROFILES, memory_budget_bytes=budget_for(3))


def test_min_rank_floor():
    tiny = [{"teacher": "t", "layer": "l", "width": 32, "intrinsic_dims": {0.9: 1, 0.95: 2, 0.99: 5}}]
    out = choose_tower_architecture("audio", tiny, memory_budget_bytes=LARGE, min_rank=4)
    assert out["lora_rank"] == 4 and out["rank_cap_applied"] == "min_rank"
    assert out["hidden_width"] == 64  # ceil(5 / 64) * 64


def test_hidden_width_is_clamped_and_caps_the_rank():
    out = choose_tower_architecture("text", PROFILES, memory_budget_bytes=LARGE, max_width=64, variance=0.99)
    assert out["hidden_width"] == 64
    assert out["lora_rank"] == 64 and out["rank_cap_applied"] == "hidden_width"
    assert any("clamped to max_width 64" in r for r in out["reasoning"])


def test_variance_selects_the_threshold():
    out = choose_tower_architecture("text", PROFILES, memory_budget_bytes=LARGE, variance=0.9)
    assert out["lora_rank"] == 40 and out["variance"] == 0.9


@pytest.mark.parametrize("variance", [0.97, 0.5])
def test_variance_not_profiled_is_a_clear_error(variance):
    with pytest.raises(
        ValueError,
        match=rf"tower 'text' profile 0 \(teacher 'smollm2' layer 'blocks.10'\): variance={variance} "
        r"is not among its intrinsic_dims keys \['0.9', '0.95', '0.99'\]",
    ):
        choose_tower_architecture("text", PROFILES, memory_budget_bytes=LARGE, variance=variance)


@pytest.mark.parametrize("variance", [0.0, 1.5, "0.95", True])
def test_variance_out_of_range_is_an_error(variance):
    with pytest.raises(ValueError, match="variance must be a number in"):
        choose_tower_architecture("text", PROFILES, memory_budget_bytes=LARGE, variance=variance)


@pytest.mark.parametrize(
    "profile, message",
    [
        ({"teacher": "t", "layer": "l", "width": 8}, r"profile 0: missing keys \['intrinsic_dims'\]"),
        ({"teacher": "t", "layer": "l", "width": 8, "intrinsic_dims": {"0.95": 9, "0.99": 8}},
         r"teacher 't' layer 'l'\): intrinsic_dims\[0.95\] must be an int in \[1, width=8\]"),
        ({"teacher": "t", "layer": "l", "width": 0, "intrinsic_dims": {}}, r"width must be a positive int"),
    ],
)
def test_malformed_profiles_name_the_layer(profile, message):
    with pytest.raises(ValueError, match=message):
        choose_tower_architecture("text", [profile], memory_budget_bytes=LARGE)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="no layer profiles"):
        choose_tower_architecture("text", [], memory_budget_bytes=LARGE)
    with pytest.raises(ValueError, match="memory_budget_bytes must be an int >= 1"):
        choose_tower_architecture("text", PROFILES, memory_budget_bytes=0)
    with pytest.raises(ValueError, match="max_width must be an int >= 128"):
        choose_tower_architecture("text", PROFILES, memory_budget_bytes=LARGE, min_width=128, max_width=64)
