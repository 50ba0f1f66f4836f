"""Carving a text student from a Llama teacher: known answers on a tiny Llama built from a config."""
import numpy as np
import pytest
import torch

from nexus_assets.student.config import HeadSpec, TowerConfig
from nexus_assets.student.tower import StudentTower, load_tower, save_tower
from nexus_assets.training.carve_text import (TextCarveTarget, block_influence, carved_text_state,
                                              frequent_dropped, heads_per_group, layer_budget, nearest_kept,
                                              plan_text_carve, select_heads, vocab_by_coverage, with_input_rows)

V = 96


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else None
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d)
    return model, d


def _rows(n=12, t=10, seed=0):
    g = np.random.default_rng(seed)
    return {f"r{i:02d}": g.integers(3, 60, size=t).tolist() for i in range(n)}


def _tower(plan, max_len=16):
    hf = plan["hf_config"]
    nv = len(plan["vocab"]) + 1
    return TowerConfig(name="text", modality="text", width=hf["hidden_size"], depth=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"], vocab_size=nv, max_len=max_len,
                       capabilities={"text.generate": HeadSpec("lm", nv, "t", {"layers.2": 32})},
                       lora_rank={"text.generate": 4}, init="carved", carve=plan)


def test_block_influence_known_answer():
    h0 = torch.tensor([[[1.0, 0.0]]])
    h1 = torch.tensor([[[1.0, 0.0]]])  # unchanged -> 0
    h2 = torch.tensor([[[0.0, 1.0]]])  # orthogonal -> 1
    bi = block_influence([h0, h1, h2], torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(bi, torch.tensor([0.0, 1.0]))


def test_contiguous_selection_drops_the_closest_run():
    from nexus_assets.training.carve_text import angular_distances, select_blocks

    e = torch.eye(4)
    # 4 blocks; the stream turns at blocks 0 and 3 only: dropping 2 consecutive blocks is free at 1..2
    hs = [e[0], e[1], e[1], e[1], e[2]]
    hs = [h.view(1, 1, 4) for h in hs]
    ang = angular_distances(hs, torch.ones(1, 1, dtype=torch.bool), n=2)
    torch.testing.assert_close(ang, torch.tensor([0.5, 0.0, 0.5]))
    assert select_blocks(torch.zeros(4), ang, keep=2, how="contiguous") == [0, 3]
    assert select_blocks(torch.tensor([0.1, 0.9, 0.2, 0.8]), None, keep=2, how="influence") == [1, 3]


def test_vocab_by_coverage_picks_fewest_ids():
    counts = np.array([0, 50, 30, 15, 5], dtype=float)
    assert vocab_by_coverage(counts, 0.8, always=[0]) == [0, 1, 2]
    assert vocab_by_coverage(counts, 0.95, always=[]) == [1, 2, 3]
    assert vocab_by_coverage(counts, 1.0, always=[]) == [1, 2, 3, 4]


def test_budget_refuses_too_small_a_target():
    cfg = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
           "num_hidden_layers": 4}
    with pytest.raises(ValueError, match="tower 'text': param_fraction"):
        layer_budget(cfg, 90, TextCarveTarget(param_fraction=0.01), teacher_params=20000)
    with pytest.raises(ValueError, match="mlp_keep"):
        TextCarveTarget(mlp_keep=0.0)


def test_full_carve_reproduces_the_teacher(tiny_llama):
    """Every block, every neuron, every token kept: the carved tower's logits are the teacher's."""
    model, d = tiny_llama
    rows = _rows()
    plan = plan_text_carve(d, token_rows=rows, topk_ids=np.arange(V), target=TextCarveTarget(1.0, 1.0, 1.0),
                           max_len=16, log=lambda s: None)
    assert plan["blocks"] == [0, 1, 2, 3] and len(plan["vocab"]) == V
    # a plan from before head carving (no "attention_heads") slices the same weights: every head kept
    old = {k: v for k, v in plan.items() if k != "attention_heads"}
    assert all(torch.equal(a, b) for a, b in zip(carved_text_state(old, d).values(), carved_text_state(plan, d).values()))
    tower = StudentTower(_tower(plan))
    missing, unexpected = tower.load_state_dict(carved_text_state(plan, d), strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("backbone.")]
    ids = torch.tensor([rows["r00"]])
    with torch.no_grad():
        out = tower({"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}, "text.generate")
        ref = torch.log_softmax(model(input_ids=ids).logits, -1)
        got = tower.base_backbone().to_teacher_vocab(out["out"])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the kept teacher layer is anchored directly (no projection)
    assert isinstance(tower.anchor_proj["text_generate__layers_2"], torch.nn.Identity)


def test_carve_to_budget_drops_low_influence_blocks_and_trims_vocab(tiny_llama, tmp_path):
    model, d = tiny_llama
    rows = _rows()
    seen = sorted({t for r in rows.values() for t in r})
    plan = plan_text_carve(d, token_rows=rows, topk_ids=np.array([[3, 70]]), topk_probs=np.array([[0.5, 0.25]]),
                           target=TextCarveTarget(0.6, 0.5, 1.0, block_selection="influence"), max_len=16, log=lambda s: None)
    rep = plan["report"]
    assert rep["student_params"] <= 0.6 * rep["teacher_params"]
    bi = np.array(rep["block_influence"])
    dropped = rep["blocks_dropped"]
    assert dropped and all(bi[d_] <= bi[k] + 1e-6 for d_ in dropped for k in plan["blocks"])
    assert set(seen) | {70} <= set(plan["vocab"]) and len(plan["vocab"]) < V  # 70: only the teacher predicts it
    assert rep["train_token_coverage"] == pytest.approx(1.0)
    tower = StudentTower(_tower(plan))
    tower.load_state_dict(carved_text_state(plan, d), strict=False)
    # a dropped teacher id reads as its nearest kept token: the same outputs as that token itself
    dropped_id = next(i for i in range(3, V) if i not in set(plan["vocab"]))
    stand_in = plan["vocab"][plan["input_map"][dropped_id]]
    with torch.no_grad():
        via_map = tower.eval()({"input_ids": torch.tensor([[5, dropped_id, 7]])}, "text.generate")["out"]
        direct = tower({"input_ids": torch.tensor([[5, stand_in, 7]])}, "text.generate")["out"]
    torch.testing.assert_close(via_map, direct)
    assert stand_in != dropped_id and stand_in in set(plan["vocab"])
    # generation returns teacher ids only
    gen = tower.generate({"input_ids": torch.tensor([[5, 6, 7]])}, "text.generate", max_new_tokens=6)[0]
    assert len(gen) <= 6 and all(t in set(plan["vocab"]) for t in gen)
    # save as a stock Llama folder + reload: identical outputs
    tower.add_adapter("text.generate")
    save_tower(tower, tmp_path / "t")
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "hf")
    assert stock.config.num_hidden_layers == len(plan["blocks"])
    # the live tower attends through the float32 SDPA wrapper; the folder knows nothing of it (plain sdpa)
    from nexus_assets.student.carved_text import SDPA_FLOAT32

    assert tower.backbone.lm.config._attn_implementation == SDPA_FLOAT32
    assert SDPA_FLOAT32 not in (tmp_path / "t" / "hf" / "config.json").read_text()
    assert stock.config._attn_implementation == "sdpa"
    back = load_tower(tmp_path / "t")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a = tower.eval()({"input_ids": ids}, "text.generate")["out"]
        b = back({"input_ids": ids}, "text.generate")["out"]
    torch.testing.assert_close(a, b)
    # the runtime's checked loader (sizes compared on the meta device first) reads the same tower
    from nexus_assets.runtime.towerload import load_student

    checked, _ = load_student(tmp_path / "t")
    with torch.no_grad():
        torch.testing.assert_close(a, checked({"input_ids": ids}, "text.generate")["out"])
    # in a bundle the stock backbone is int8 like the rest: fewer bytes, outputs within int8 error
    from nexus_assets.release.bundle import _copy_tower
    from nexus_assets.student.tower import weight_files
    from nexus_assets.student.quantize import file_scheme

    assert "hf/model.safetensors" in weight_files(tmp_path / "t")  # what bench counts and a bundle quantizes
    stats = _copy_tower(tmp_path / "t", tmp_path / "q", "int8")
    assert set(stats) == set(weight_files(tmp_path / "t"))
    assert stats["hf/model.safetensors"]["quantized_tensors"] > 0
    assert file_scheme(tmp_path / "q" / "hf" / "model.safetensors") == "int8"
    assert (tmp_path / "q" / "hf" / "model.safetensors").stat().st_size < \
        0.5 * (tmp_path / "t" / "hf" / "model.safetensors").stat().st_size
    q, scheme = load_student(tmp_path / "q")
    with torch.no_grad():
        qa = q({"input_ids": ids}, "text.generate")["out"]
    assert scheme == "int8" and not torch.equal(qa, a)
    torch.testing.assert_close(qa, a, atol=0.1, rtol=0.05)


def test_remap_topk_merges_dropped_ids_into_the_fallback():
    from nexus_assets.training.tower_data import remap_topk

    old_to_new = np.array([0, 3, 1, 3, 2, 3])  # kept teacher ids 0, 2, 4 -> 0, 1, 2; fallback 3
    ids = np.array([[1, 0, 3, 4], [0, 2, 4, 1]])
    lg = np.array([[2.0, 1.0, 0.5, 0.0], [3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    new, out = remap_topk(ids, lg, old_to_new, fallback=3)
    # row 0: teacher ids 1 and 3 were dropped: one fallback slot holding logaddexp(2, 0.5), one filler
    assert new[0, 0] == 3 and out[0, 0] == pytest.approx(np.logaddexp(2.0, 0.5))
    assert len(set(new[0].tolist())) == 4 and out[0, 2] == -1e4
    np.testing.assert_array_equal(new[1], [0, 1, 2, 3])  # one dropped id: renumbered only
    np.testing.assert_array_equal(out[1], lg[1])
    # the probability mass of the row is unchanged
    assert np.logaddexp.reduce(out[0].astype(np.float64)) == pytest.approx(np.logaddexp.reduce(lg[0].astype(np.float64)))


def _remap_topk_one_row_at_a_time(ids, logits, old_to_new, fallback):
    """The definition, row by row: the reference the vectorised remap_topk must reproduce."""
    new, lg = old_to_new[ids].copy(), logits.astype(np.float32).copy()
    k = new.shape[-1]
    pool = list(range(fallback - 1, max(fallback - 1 - 4 * k, -1), -1))
    for r in range(new.shape[0]):
        slots = np.nonzero(new[r] == fallback)[0]
        if len(slots) < 2:
            continue
        lg[r, slots[0]] = np.logaddexp.reduce(lg[r, slots].astype(np.float64))
        free = (c for c in pool if c not in set(new[r].tolist()))
        for s_ in slots[1:]:
            new[r, s_], lg[r, s_] = next(free), -1e4
    return new, lg


def test_remap_topk_matches_the_row_by_row_definition_on_random_top_k():
    """Many rows, several dropped ids each, kept ids drawn from the rare end the fillers come from."""
    from nexus_assets.training.tower_data import remap_topk

    rng = np.random.default_rng(0)
    teacher_vocab, kept, k = 400, 150, 8
    vocab = np.sort(rng.choice(teacher_vocab, kept, replace=False))
    old_to_new = np.full(teacher_vocab, kept)
    old_to_new[vocab] = np.arange(kept)
    ids = np.stack([rng.choice(teacher_vocab, k, replace=False) for _ in range(3000)])
    ids[::7, :3] = vocab[-3:]  # rows that already use the rarest kept ids, which fillers must skip
    lg = rng.normal(size=ids.shape).astype(np.float32)
    want_new, want_lg = _remap_topk_one_row_at_a_time(ids, lg, old_to_new, kept)
    got_new, got_lg = remap_topk(ids.reshape(30, 100, k), lg.reshape(30, 100, k), old_to_new, kept)
    assert (want_lg == -1e4).any(-1).sum() > 1000  # rows with merged fallbacks are many
    np.testing.assert_array_equal(got_new.reshape(-1, k), want_new)
    np.testing.assert_array_equal(got_lg.reshape(-1, k), want_lg)


def test_carve_statistics_read_the_train_split_only(tmp_path):
    """The vocabulary and block scores must never see held-out or never-seen rows."""
    from nexus_assets.core.feature_store import read_features
    from nexus_assets.training.carve_text import token_rows_from_cache
    from nexus_assets_tests.runtime.tiny import _write_entry

    entry = _write_entry(tmp_path / "lm", {"row_id": ["a", "b", "c"], "split": ["train", "heldout", "ood"]},
                         {"row_id": ["a", "a", "b", "c"], "position": [0, 1, 0, 0], "token_id": [5, 6, 7, 8],
                          "topk_ids": np.array([[5], [6], [7], [8]], np.int32),
                          "topk_logits": np.zeros((4, 1), np.float32), "logsumexp": np.zeros(4, np.float32)})
    rows, topk, probs = token_rows_from_cache(entry)
    assert rows == {"a": [5, 6]} and topk.reshape(-1).tolist() == [5, 6] and probs.shape == (2, 1)
    t = read_features(entry, "items", columns=["row_id"], filter_splits=["heldout"])
    assert t.column_names == ["row_id"] and t.column("row_id").to_pylist() == ["b"]


def test_nearest_kept_maps_a_dropped_row_to_the_closest_kept_row_in_cosine():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.9, 0.1], [-0.2, 5.0], [-3.0, -0.1]])
    vocab = [0, 1, 2]
    assert nearest_kept(emb, vocab, chunk=2) == [0, 1, 2, 0, 1, 2]  # kept ids read as themselves
    with pytest.raises(ValueError, match="kept vocabulary is empty"):
        nearest_kept(emb, [])


def test_reading_map_falls_back_without_a_plan_map_and_checks_a_given_one():
    from nexus_assets.student.carved_text import reading_map, vocab_maps

    old_to_new, _ = vocab_maps([0, 2], 4)  # ids 1, 3 dropped; fallback = 2
    assert reading_map({}, old_to_new, 2).tolist() == [0, 2, 1, 2]
    assert reading_map({"input_map": [0, 1, 1, 0]}, old_to_new, 2).tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="kept teacher id must read as itself"):
        reading_map({"input_map": [1, 1, 1, 0]}, old_to_new, 2)
    with pytest.raises(ValueError, match="carve.input_map: expected one id"):
        reading_map({"input_map": [0, 1, 1]}, old_to_new, 2)


def test_frequent_dropped_ids_get_input_rows_after_the_fallback():
    counts = np.array([9, 0, 5, 7, 5, 1], dtype=float)
    assert frequent_dropped(counts, [0, 3], 2) == [2, 4]  # most frequent dropped first, ties by id
    assert frequent_dropped(counts, [0, 3], 10) == [2, 4, 5]  # never an id the train tokens never spell (1)
    assert frequent_dropped(counts, [0, 3], 0) == []
    assert with_input_rows([0, 0, 1, 1, 0, 1], [2, 4], fallback=2) == [0, 0, 3, 1, 4, 1]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="input_rows"):
            TextCarveTarget(input_rows=bad)
    cfg = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
           "num_hidden_layers": 8}
    target = TextCarveTarget(param_fraction=0.5, mlp_keep=1.0)
    # input rows are parameters: a block of this config is 9,280 = 290 rows of 32; the budget fits 5.07 blocks
    assert layer_budget(cfg, 90, target, 100_000) == (5, 64)
    assert layer_budget(cfg, 90, target, 100_000, input_rows=290) == (4, 64)


def test_reading_map_checks_input_rows():
    from nexus_assets.student.carved_text import reading_map, vocab_maps

    old_to_new, _ = vocab_maps([0, 2], 5)  # ids 1, 3, 4 dropped; fallback = 2, input rows from 3
    plan = {"input_map": [0, 3, 1, 0, 4], "input_rows": [1, 4]}
    assert reading_map(plan, old_to_new, 2).tolist() == [0, 3, 1, 0, 4]
    with pytest.raises(ValueError, match="expected one id in"):
        reading_map({"input_map": [0, 3, 1, 0, 4]}, old_to_new, 2)  # row 3 with no input rows declared
    with pytest.raises(ValueError, match="input_rows: must be dropped"):
        reading_map({"input_map": [0, 3, 1, 0, 4], "input_rows": [0, 4]}, old_to_new, 2)
    with pytest.raises(ValueError, match="must read its own row"):
        reading_map({"input_map": [0, 4, 1, 0, 3], "input_rows": [1, 4]}, old_to_new, 2)


def test_input_rows_read_the_teachers_row_and_are_never_an_output(tiny_llama, tmp_path):
    """A frequent dropped token read through its own row gives the teacher's own outputs at that position
    (every block kept), while the output stays the kept vocabulary + fallback and generation never names it."""
    model, d = tiny_llama
    rows = _rows()
    counts = np.bincount(np.concatenate([np.asarray(r) for r in rows.values()]), minlength=V).astype(float)
    kept_probe = TextCarveTarget(1.0, 1.0, 0.8)
    base = plan_text_carve(d, token_rows=rows, topk_ids=np.array([[3]]), target=kept_probe, max_len=16,
                           log=lambda s: None)
    plan = plan_text_carve(d, token_rows=rows, topk_ids=np.array([[3]]), max_len=16, log=lambda s: None,
                           target=TextCarveTarget(1.0, 1.0, 0.8, input_rows=3))
    assert plan["vocab"] == base["vocab"] and len(plan["input_rows"]) == 3
    assert plan["input_rows"] == frequent_dropped(counts, plan["vocab"], 3)
    rep = plan["report"]
    assert rep["student_params"] == base["report"]["student_params"] + 3 * 32
    assert rep["train_input_token_coverage"] > rep["train_token_coverage"]
    tower = StudentTower(_tower(plan)).eval()
    tower.load_state_dict(carved_text_state(plan, d), strict=False)
    own = plan["input_rows"][0]
    ids = torch.tensor([[5, own, 7]])
    with torch.no_grad():
        out = tower({"input_ids": ids}, "text.generate")["out"]
        ref = torch.log_softmax(model(input_ids=ids).logits, -1)
    assert out.shape[-1] == len(plan["vocab"]) + 1  # the input rows are not scored
    got = tower.base_backbone().to_teacher_vocab(out)
    kept = torch.as_tensor(plan["vocab"])
    # kept ids' log-probs differ from the teacher's only by the dropped mass the fallback pools
    torch.testing.assert_close(got[..., kept] - got[..., kept].logsumexp(-1, keepdim=True),
                               ref[..., kept] - ref[..., kept].logsumexp(-1, keepdim=True), atol=1e-4, rtol=1e-4)
    # the same tower without the row (nearest kept token) reads that position differently
    tower0 = StudentTower(_tower(base)).eval()
    tower0.load_state_dict(carved_text_state(base, d), strict=False)
    with torch.no_grad():
        out0 = tower0({"input_ids": ids}, "text.generate")["out"]
    assert not torch.allclose(out0[0, 1:], out[0, 1:], atol=1e-3)
    gen = tower.generate({"input_ids": torch.tensor([[5, own, 7]])}, "text.generate", max_new_tokens=8)[0]
    assert all(t in set(plan["vocab"]) for t in gen)
    # saved, reloaded and quantized like any carved tower
    tower.add_adapter("text.generate")
    save_tower(tower, tmp_path / "t")
    from nexus_assets.runtime.towerload import load_student

    back, _ = load_student(tmp_path / "t")
    with torch.no_grad():
        torch.testing.assert_close(back({"input_ids": ids}, "text.generate")["out"],
                                   tower({"input_ids": ids}, "text.generate")["out"])


def test_ridge_fold_cosine_and_exit_choice_known_answers():
    from nexus_assets.training.carve_text import choose_exit_block, ridge_fold_cosine

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    assert ridge_fold_cosine(x, x @ torch.randn(8, 5, generator=g), alpha=1e-6) > 0.999  # linear in x
    assert abs(ridge_fold_cosine(x, torch.randn(200, 5, generator=g))) < 0.2  # unrelated to x
    assert choose_exit_block([0.30, 0.528, 0.50, 0.53]) == 2  # the fewest blocks within 0.005 of the best
    assert choose_exit_block([0.30, 0.52, 0.50, 0.53], tolerance=0.0) == 4
    with pytest.raises(ValueError, match="no fit"):
        ridge_fold_cosine(x[:2], x[:2])


def test_embedding_head_exits_early_at_the_measured_block(tiny_llama):
    """Targets that are a linear map of block 1's pooled (normed) states: the probe picks 1 block; the
    embedding head then reads block 1 and its own pass runs 1 block, with the same output as reading
    block 1 of a full pass."""
    from nexus_assets.training.carve_text import carved_text_config, embedding_exit_block

    model, d = tiny_llama
    rows = _rows(n=80, t=10, seed=1)
    plan = plan_text_carve(d, token_rows=rows, topk_ids=np.arange(V), target=TextCarveTarget(1.0, 1.0, 1.0),
                           max_len=16, log=lambda s: None)
    with torch.no_grad():
        proj = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
        targets = {}
        for r, ids in rows.items():
            hs = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            targets[r] = (model.model.norm(hs[1]).mean(1)[0] @ proj).numpy()
    res = embedding_exit_block(plan, d, rows, targets, max_len=16)
    assert res["blocks"] == 1 and res["fold_cosine"][0] > 0.9 and res["fold_cosine"][0] > max(res["fold_cosine"][1:]) + 0.02
    plan["exit_blocks"] = {"text.embed": res["blocks"]}
    base = _tower(plan)
    base.capabilities["text.embed"] = HeadSpec("embedding", 6, "e", {"enc.1": 8})
    cfg = carved_text_config(base, plan, lora_rank=4)
    assert cfg.capabilities["text.embed"].exit_block == 1 and cfg.capabilities["text.generate"].exit_block == 0
    tower = StudentTower(cfg)
    tower.load_state_dict(carved_text_state(plan, d), strict=False)
    tower.eval()
    ids = torch.tensor([rows["r00"], rows["r01"]])
    seen = []
    layers = tower.base_backbone().lm.model.layers
    hook = [layer.register_forward_hook(lambda m, a, o, i=i: seen.append(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        early_res = tower({"input_ids": ids}, "text.embed")
        early = early_res["out"]
        assert seen == [0]  # the early-exit pass ran one block
        full_pass = tower.encode({"input_ids": ids})
        via_full_res = tower.head_forward("text.embed", full_pass, {"input_ids": ids})
        via_full = via_full_res["out"]
    for h in hook:
        h.remove()
    torch.testing.assert_close(early, via_full)
    torch.testing.assert_close(early_res["anchors"]["enc.1"], via_full_res["anchors"]["enc.1"])  # training maths too
    # in training, a step that runs the full pass anyway reads block 1 from it (the same states, see above);
    # a step that trains text.embed alone runs its 1-block pass
    from nexus_assets.training.objective import pass_exit_block
    assert pass_exit_block(tower, "text.embed", ["text.generate", "text.embed"]) == 0
    assert pass_exit_block(tower, "text.embed", ["text.embed"]) == 1
    assert pass_exit_block(tower, "text.generate", ["text.embed"]) == 0
    last = tower.heads["text_embed"](full_pass[0][-1], full_pass[1])
    assert not torch.allclose(early, last, atol=1e-3)  # block 1, not the last block
    with pytest.raises(ValueError, match="only a pooled head"):
        HeadSpec("lm", V, "t", {}, exit_block=1)


def test_next_token_targets_shift_mask_and_drop_tokens_outside_the_kept_vocabulary():
    from nexus_assets.training.tower_data import next_token_targets

    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    nxt, valid = next_token_targets(ids, mask, None)
    assert nxt.tolist() == [[6, 7, 0, 0], [9, 0, 0, 0]]
    assert valid.tolist() == [[True, True, False, False], [True, False, False, False]]
    old_to_new = np.full(10, 3)  # carved: teacher ids 6 and 9 kept as 0 and 1, the rest -> fallback 3
    old_to_new[6], old_to_new[9] = 0, 1
    nxt, valid = next_token_targets(ids, mask, (old_to_new, 3))
    assert valid.tolist() == [[True, False, False, False], [True, False, False, False]]  # 7 was dropped
    assert nxt[valid].tolist() == [0, 1]


def test_float32_sdpa_attention_matches_float32_and_keeps_the_callers_dtype():
    """Under bfloat16 autocast the carved backbone's attention runs in float32 (PyTorch's CPU bfloat16
    flash-attention backward is the slow path): the same result as transformers' SDPA on float32 inputs,
    returned in the caller's dtype, with gradients flowing back to the bfloat16 inputs."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from nexus_assets.student.carved_text import sdpa_float32_attention

    torch.manual_seed(0)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.zeros(2, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    ref, _ = sdpa_attention_forward(module, q, k, v, mask)
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training: autocast must not cast it back down
        out, _ = sdpa_float32_attention(module, qb, kb, vb, mask.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    exact, _ = sdpa_attention_forward(module, qb.float(), kb.float(), vb.float(), mask)
    torch.testing.assert_close(out.float(), exact.to(torch.bfloat16).float())  # float32 maths, one rounding
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    out.float().sum().backward()
    assert qb.grad is not None and qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()
    f32, _ = sdpa_float32_attention(module, q, k, v, mask)  # float32 in: exactly transformers' own
    torch.testing.assert_close(f32, ref, atol=0, rtol=0)


def test_compiled_training_pass_matches_eager_and_evaluation_stays_eager(tiny_llama):
    """set_compiled routes gradient passes through torch.compile: same outputs and gradients as eager, the
    state dict unchanged; a no-grad pass (validation) and an early exit stay eager."""
    from torch._dynamo.utils import counters

    from nexus_assets.training.loop_parts import inductor_works, set_backbone_compiled

    if not inductor_works(torch.device("cpu")):
        pytest.skip("torch.compile cannot build kernels here (no C++ compiler or Python headers)")
    model, d = tiny_llama
    plan = plan_text_carve(d, token_rows=_rows(), topk_ids=np.arange(V), target=TextCarveTarget(1.0, 1.0, 1.0),
                           max_len=16, log=lambda s: None)
    tower = StudentTower(_tower(plan))
    tower.load_state_dict(carved_text_state(plan, d), strict=False)
    ids = torch.tensor([_rows()["r00"], _rows()["r01"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool).index_fill(1, torch.tensor([9]), False)}
    keys = list(tower.state_dict())

    def pass_and_grads():
        tower.zero_grad(set_to_none=True)
        out = tower(inputs, "text.generate")["out"]
        out.float().logsumexp(-1).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}

    eager_out, eager_grads = pass_and_grads()
    assert set_backbone_compiled(tower, True) is True and list(tower.state_dict()) == keys
    frames = counters["frames"]["ok"]
    out, grads = pass_and_grads()
    assert counters["frames"]["ok"] > frames  # dynamo really traced the pass
    torch.testing.assert_close(out, eager_out, atol=1e-4, rtol=1e-4)
    assert grads.keys() == eager_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], eager_grads[n], atol=1e-4, rtol=1e-3)
    frames = counters["frames"]["ok"]
    with torch.no_grad():
        torch.testing.assert_close(tower(inputs, "text.generate")["out"], eager_out, atol=1e-4, rtol=1e-4)
    assert counters["frames"]["ok"] == frames  # the evaluation pass ran eager
    assert set_backbone_compiled(tower, False) is False and tower.base_backbone()._compiled_forward is None


def test_state_loss_is_zero_for_the_full_carve_and_teaches_a_cut_one_the_teachers_states(tiny_llama):
    """The per-token state loss compares a kept block's output with the teacher's at the same depth
    (`anchor_map`): zero when the carve is the teacher; on a carve that drops a block, depths no kept block
    ends at are skipped and said so, and steps on the loss alone pull the states towards the teacher's."""
    from nexus_assets.training.config import TrainConfig
    from nexus_assets.training.objective import TowerObjective, state_targets
    from nexus_assets.training.tower_data import TowerData

    model, d = tiny_llama
    rows = _rows()
    ids = torch.tensor([rows[r] for r in sorted(rows)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:3, 7:] = False
    with torch.no_grad():
        teacher = model.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    layers = ["layers.1", "layers.2", "layers.3"]
    basis, tensors = {}, {"input_ids": ids, "attention_mask": mask, "text.generate:mask": mask}
    for name in layers:
        h = teacher[int(name.split(".")[1])][mask]
        mean = h.mean(0)
        var, vec = torch.linalg.eigh(torch.cov((h - mean).T))
        comps, v = vec[:, -8:].flip(1).T.contiguous(), var[-8:].flip(0)
        basis[name] = {"mean": mean, "components": comps, "variances": v}
        tensors[f"text.generate:state.{name}"] = ((teacher[int(name.split(".")[1])] - mean) @ comps.T).half()
    data = TowerData(sorted(rows), tensors, state_basis={"text.generate": basis})
    tc = TrainConfig(w_state=1.0)
    assert state_targets(StudentTower(_tower(plan_text_carve(
        d, token_rows=rows, topk_ids=np.arange(V), target=TextCarveTarget(1.0, 1.0, 1.0), max_len=16,
        log=lambda s: None))), data, TrainConfig()) == ({}, [])  # w_state 0: off

    full = plan_text_carve(d, token_rows=rows, topk_ids=np.arange(V), target=TextCarveTarget(1.0, 1.0, 1.0),
                           max_len=16, log=lambda s: None)
    tower = StudentTower(_tower(full))
    tower.load_state_dict(carved_text_state(full, d), strict=False)
    states, lines = state_targets(tower, data, tc)
    assert [t.layer for t in states["text.generate"]] == layers and "skipped" not in lines[0]
    obj = TowerObjective(tower, tc, {}, {}, states)
    batch = data.batch(range(len(data)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert float(obj._state_loss("text.generate", tower.encode(inputs), batch)) < 1e-3  # float16 targets

    cut = plan_text_carve(d, token_rows=rows, topk_ids=np.arange(V), target=TextCarveTarget(0.6, 1.0, 1.0),
                          max_len=16, log=lambda s: None)
    tower = StudentTower(_tower(cut))
    tower.load_state_dict(carved_text_state(cut, d), strict=False)
    states, lines = state_targets(tower, data, tc)
    ends = {f"layers.{b + 1}" for b in cut["blocks"]}  # teacher depths a kept block ends at
    assert {t.layer for t in states["text.generate"]} == ends & set(layers) and set(layers) - ends
    assert "skipped" in lines[0]
    obj = TowerObjective(tower, tc, {}, {}, states)
    opt = torch.optim.Adam(tower.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = obj._state_loss("text.generate", tower.encode(inputs), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 1e-2 and losses[-1] < 0.5 * losses[0]


def test_greedy_block_removal_rescores_after_each_removal():
    from nexus_assets.training.carve_text import greedy_block_removal

    # blocks 1 and 2 are each redundant while the other stays (dropping either alone costs 0.1) but
    # dropping both costs 5; block 0 costs 0.3 alone. A one-shot score would drop 1 and 2; SLEB drops
    # one of them, re-scores, and then drops block 0.
    def loss(blocks):
        s = set(blocks)
        return (0.0 if 0 in s else 0.3) + (5.0 if not ({1, 2} & s) else 0.0 if {1, 2} <= s else 0.1) \
            + (0.0 if 3 in s else 9.0)

    def losses_without(kept):
        return [loss([b for b in kept if b != k]) for k in kept]

    kept, trace = greedy_block_removal(losses_without, 4, 2, log=lambda m: None)
    assert kept == [2, 3]
    assert [t["dropped"] for t in trace] == [1, 0]  # ties broken by the lower block id
    assert trace[0]["loss"] == pytest.approx(0.1) and trace[1]["loss"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="keep must be in 1..4"):
        greedy_block_removal(losses_without, 4, 0)


def test_nll_without_each_equals_a_forward_with_that_block_removed(tiny_llama):
    from nexus_assets.training.carve_text import _sample_batches, nll_without_each

    model, _ = tiny_llama
    rows = _rows(n=6, t=9)
    rows["short"] = [5, 7, 9]  # right padding in a batch
    batches = list(_sample_batches(rows, 7, 16, bs=4))
    kept = [0, 1, 3]
    vocab = torch.arange(3, 70)

    def direct(blocks, restrict):
        layers = model.model.layers
        tot, n = 0.0, 0
        try:
            model.model.layers = torch.nn.ModuleList([layers[b] for b in blocks])
            for ids, mask in batches:
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits[:, :-1]
                tgt, valid = ids[:, 1:], mask[:, 1:] & mask[:, :-1]
                if restrict:
                    logits = logits[..., vocab]
                    valid = valid & (tgt >= 3) & (tgt < 70)
                    tgt = (tgt - 3).clamp(0, len(vocab) - 1)
                lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
                tot -= float((lp * valid).sum())
                n += int(valid.sum())
        finally:
            model.model.layers = layers
        return tot / n

    got = nll_without_each(model, batches, kept)
    want = [direct([b for b in kept if b != k], False) for k in kept]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got_v = nll_without_each(model, batches, kept, vocab)
    np.testing.assert_allclose(got_v, [direct([b for b in kept if b != k], True) for k in kept], rtol=1e-5)
    assert got_v != got


def test_probe_rows_for_carve_scores_are_spread_over_the_sorted_ids():
    from nexus_assets.training.carve_text import _sample_batches

    # 100 rows of source "a" sort before 100 of "b": the first 20 sorted ids are all "a"
    rows = {f"{s}/{i:03d}": [s == "b" and 9 or 8, i % 50 + 3] for s in "ab" for i in range(100)}
    got = torch.cat([ids[:, 0] for ids, _ in _sample_batches(rows, 20, 8)])
    assert len(got) == 20 and 5 <= int((got == 9).sum()) <= 15
    again = torch.cat([ids[:, 0] for ids, _ in _sample_batches(rows, 20, 8)])
    assert torch.equal(got, again)  # seeded


def test_nll_block_selection_in_the_plan_names_its_removal_order(tiny_llama):
    model, d = tiny_llama
    from nexus_assets.training.carve_text import TextCarveTarget, plan_text_carve

    rows = _rows(n=12, t=10)
    topk = np.array([[5, 6]] * 10)
    plan = plan_text_carve(d, token_rows=rows, topk_ids=topk, max_len=16, log=lambda s: None,
                           target=TextCarveTarget(0.6, 0.5, 1.0, block_selection="nll"))
    rep = plan["report"]
    assert len(rep["block_removal_order"]) == 4 - len(plan["blocks"]) > 0
    assert sorted(plan["blocks"] + [t["dropped"] for t in rep["block_removal_order"]]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="'contiguous', 'influence' or 'nll'"):
        TextCarveTarget(block_selection="sleb")


def test_heads_are_chosen_within_their_kv_group_and_free_parameters_for_blocks():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4])  # 9 query heads, 3 kv groups of 3
    assert select_heads(scores, 3, 2) == [1, 2, 3, 5, 6, 7]  # each group's best two, grouped by kv head
    assert select_heads(scores, 3, 1) == [1, 5, 6]
    assert select_heads(scores, 3, 3) == list(range(9))
    assert heads_per_group(9, 3, 0.67) == 2 and heads_per_group(9, 3, 0.01) == 1 and heads_per_group(9, 3, 1.0) == 3
    with pytest.raises(ValueError, match="do not split into 3 kv groups"):
        heads_per_group(10, 3, 0.5)
    with pytest.raises(ValueError, match="heads_keep"):
        TextCarveTarget(heads_keep=0.0)
    # a carve keeps the teacher's head_dim, so its head count need not divide the width (a random tower's must)
    plan_like = {"family": "llama", "hf_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 6},
                 "vocab": list(range(9))}
    assert _tower(plan_like).n_heads == 6
    with pytest.raises(ValueError, match="not divisible by n_heads=6"):
        TowerConfig(name="text", modality="text", width=32, depth=2, n_heads=6, vocab_size=10, max_len=16,
                    capabilities={"text.generate": HeadSpec("lm", 10)})
    cfg = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
           "num_hidden_layers": 8}
    # a block: q and o 2 x 32 x 32, k and v 2 x 32 x 16, MLP 3 x 32 x 64, norms 64 = 9,280; half the query
    # heads: q and o 2 x 32 x 16 -> 8,256; the 50,056 parameters past the vocabulary fit 5.4 and 6.06 blocks
    assert layer_budget(cfg, 90, TextCarveTarget(param_fraction=0.53, mlp_keep=1.0), 100_000) == (5, 64)
    assert layer_budget(cfg, 90, TextCarveTarget(param_fraction=0.53, mlp_keep=1.0, heads_keep=0.5), 100_000) == (6, 64)


def test_pruning_dead_heads_reproduces_the_teacher_and_saves_as_a_stock_llama(tiny_llama, tmp_path):
    """Query heads 1 and 2 (one of each kv group) write nothing (their o_proj columns are zero) in every block:
    their Taylor score is 0, `heads_keep` 0.5 keeps heads 0 and 3, and the carved tower's outputs are the
    teacher's exactly; the same carve of the intact teacher is not."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, d = tiny_llama
    dead = LlamaForCausalLM(model.config).eval()
    dead.load_state_dict(model.state_dict())
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in dead.model.layers:
            layer.self_attn.o_proj.weight[:, 1 * hd:3 * hd] = 0.0
    dead.save_pretrained(tmp_path / "dead")
    rows = _rows()
    target = TextCarveTarget(1.0, 1.0, 1.0, heads_keep=0.5)
    ids = torch.tensor([rows["r00"]])
    for teacher, folder, same in ((dead, tmp_path / "dead", True), (model, d, False)):
        plan = plan_text_carve(folder, token_rows=rows, topk_ids=np.arange(V), target=target, max_len=16,
                               log=lambda s: None)
        assert plan["hf_config"]["num_attention_heads"] == 2 and plan["hf_config"]["head_dim"] == hd
        assert plan["report"]["heads"].startswith("2/4 query heads per block")
        if same:
            assert all(h == [0, 3] for h in plan["attention_heads"].values())
            assert all(m == pytest.approx(1.0) for m in plan["report"]["head_importance_mass_kept"].values())
        tower = StudentTower(_tower(plan))
        missing, unexpected = tower.load_state_dict(carved_text_state(plan, folder), strict=False)
        assert not unexpected and not [k for k in missing if k.startswith("backbone.")]
        with torch.no_grad():
            got = tower.base_backbone().to_teacher_vocab(tower.eval()({"input_ids": ids}, "text.generate")["out"])
            ref = torch.log_softmax(teacher(input_ids=ids).logits, -1)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4) is same
    save_tower(tower, tmp_path / "t")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "hf")
    assert stock.config.num_attention_heads == 2 and stock.model.layers[0].self_attn.q_proj.out_features == 2 * hd
    with torch.no_grad():
        a = tower({"input_ids": ids}, "text.generate")["out"]
        b = load_tower(tmp_path / "t")({"input_ids": ids}, "text.generate")["out"]
    torch.testing.assert_close(a, b)
