"""Snapshots and the feature cache on a tiny Llama built from a config (the real teachers have their own tests)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from nexus_assets.core.feature_store import FeatureCacheError, current_entry, read_features
from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.base import TeacherLoadError, load_teacher
from nexus_assets.teachers.features import extract_teacher_features
from nexus_assets.teachers.snapshot import SnapshotError, build_snapshot, verify_snapshot
from nexus_assets_tests.helpers import tiny_llama_dir


def spec_for(source: dict, **extraction) -> TeacherSpec:
    ex = {"layers": ["layers.1", "layers.3"], "token_layers": ["layers.1"], "top_k": 5, "batch_size": 3,
          "chunk_rows": 4, "max_length": 16, **extraction}
    return TeacherSpec.model_validate(dict(
        name="tiny-llama", modality="text", tower="text", family="causal_lm", capabilities=["text.generate"],
        dataset="text-probe", source=source, extraction=ex))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


def probe_rows(n=10) -> pa.Table:
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 290, size=rng.integers(2, 12))) for _ in range(n)]
    return pa.table({"row_id": [f"t/{i}/0" for i in range(n)], "split": ["train"] * n, "text": texts})


def test_path_snapshot_hashes_and_catalogs_every_tensor(llama_dir, tmp_path):
    m = build_snapshot(spec_for({"kind": "path", "path": str(llama_dir)}), tmp_path / "snap", log=lambda s: None)
    names = {e["file"] for e in m["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    import pyarrow.parquet as pq
    cat = pq.read_table(tmp_path / "snap" / "catalog.parquet").to_pylist()
    emb = [r for r in cat if r["name"] == "model.embed_tokens.weight"][0]
    assert emb["shape"] == [300, 32] and emb["dtype"] == "F32" and emb["bytes"] == 300 * 32 * 4
    assert verify_snapshot(tmp_path / "snap")["content_hash"] == m["content_hash"]


def test_corrupted_or_deleted_weight_file_is_named(llama_dir, tmp_path):
    build_snapshot(spec_for({"kind": "path", "path": str(llama_dir)}), tmp_path / "snap", log=lambda s: None)
    weights = tmp_path / "snap" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"weight file .*model\.safetensors is corrupted"):
        verify_snapshot(tmp_path / "snap")
    weights.unlink()
    with pytest.raises(SnapshotError, match=r"weight file .*model\.safetensors is missing"):
        verify_snapshot(tmp_path / "snap")
    assert (llama_dir / "model.safetensors").exists(), "the source folder must never be touched"


def test_hf_source_reads_a_local_hub_cache_offline(llama_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nexus--tiny-llama"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in llama_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = spec_for({"kind": "hf", "repo_id": "nexus/tiny-llama", "revision": "main"})
    m = build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    assert "model.safetensors" in {e["file"] for e in m["files"]}
    missing = spec_for({"kind": "hf", "repo_id": "nexus/absent", "revision": "main"})
    with pytest.raises(Exception, match="not in the local hub cache and HF_HUB_OFFLINE is set"):
        build_snapshot(missing, tmp_path / "snap2", log=lambda s: None)
    assert not (tmp_path / "snap2").exists(), "a failed snapshot leaves nothing behind"


def _extract(spec, snap, rows, out, **kw):
    return extract_teacher_features(spec, snap, rows, "datahash", out, log=lambda s: None, **kw)


def test_cached_features_equal_a_direct_forward(llama_dir, tmp_path):
    spec = spec_for({"kind": "path", "path": str(llama_dir)})
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows(10)
    entry, m = _extract(spec, tmp_path / "snap", rows, tmp_path / "feat")
    assert m["rows"] == 10 and m["chunks"] == 3 and current_entry(tmp_path / "feat") == entry

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    items = read_features(entry).to_pydict()
    tokens = read_features(entry, "tokens").to_pydict()
    for i, text in enumerate(rows["text"].to_pylist()):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        np.testing.assert_allclose(items["hidden.layers.3"][i], out.hidden_states[3][0].mean(0).numpy(), atol=1e-4)
        mine = [j for j, r in enumerate(tokens["row_id"]) if r == rows["row_id"][i].as_py()]
        assert len(mine) == ids.shape[1]
        logits = out.logits[0]
        top = torch.topk(logits, 5, dim=-1)
        np.testing.assert_allclose(np.array([tokens["topk_logits"][j] for j in mine]), top.values.numpy(), atol=1e-4)
        np.testing.assert_allclose(np.array([tokens["logsumexp"][j] for j in mine]),
                                   torch.logsumexp(logits, -1).numpy(), atol=1e-4)
        np.testing.assert_allclose(np.array([tokens["hidden.layers.1"][j] for j in mine]),
                                   out.hidden_states[1][0].numpy(), atol=1e-4)
        assert [tokens["token_id"][j] for j in mine] == ids[0].tolist()


def test_truncated_chunk_is_detected_and_redone_and_killed_run_resumes(llama_dir, tmp_path):
    spec = spec_for({"kind": "path", "path": str(llama_dir)})
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows(10)
    entry, full = _extract(spec, tmp_path / "snap", rows, tmp_path / "feat")
    reference = read_features(entry).to_pydict()

    chunk = entry / "items-00001.parquet"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # a truncated chunk
    _, again = _extract(spec, tmp_path / "snap", rows, tmp_path / "feat")
    assert again["rows_computed_this_run"] == 4 and again["cache_key"] == full["cache_key"]
    np.testing.assert_allclose(np.array(read_features(entry).to_pydict()["hidden.layers.3"]),
                               np.array(reference["hidden.layers.3"]), atol=1e-6)

    # a run killed after its first chunk: only the marker-complete chunks count, the rest is redone
    for p in entry.glob("chunk-0000[12].json"):
        p.unlink()
    (entry / "manifest.json").unlink()
    _, resumed = _extract(spec, tmp_path / "snap", rows, tmp_path / "feat")
    assert resumed["rows_computed_this_run"] == 6


def test_changing_extraction_config_changes_the_cache_key(llama_dir, tmp_path):
    spec = spec_for({"kind": "path", "path": str(llama_dir)})
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows(4)
    e1, _ = _extract(spec, tmp_path / "snap", rows, tmp_path / "feat")
    e2, m2 = _extract(spec_for({"kind": "path", "path": str(llama_dir)}, top_k=7), tmp_path / "snap", rows,
                      tmp_path / "feat")
    assert e1 != e2 and m2["rows_computed_this_run"] == 4
    e3, m3 = extract_teacher_features(spec, tmp_path / "snap", rows, "otherdata", tmp_path / "feat",
                                      log=lambda s: None)
    assert e3 not in (e1, e2)


def test_non_finite_teacher_output_is_refused(llama_dir, tmp_path):
    spec = spec_for({"kind": "path", "path": str(llama_dir)})
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    teacher = load_teacher(spec, tmp_path / "snap")
    with torch.no_grad():
        teacher.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    from nexus_assets.core.feature_store import cache_features
    with pytest.raises(FeatureCacheError, match="teacher 'tiny-llama': non-finite values in output 'hidden.layers.1'"):
        cache_features(teacher.forward, probe_rows(4), tmp_path / "feat" / "k", teacher="tiny-llama",
                       batch_size=2, chunk_rows=2, input_columns=["text"], log=lambda s: None)
    assert not list((tmp_path / "feat" / "k").glob("chunk-*.json")), "no chunk of a failed batch is marked done"


def test_unknown_layer_is_named(llama_dir, tmp_path):
    spec = spec_for({"kind": "path", "path": str(llama_dir)}, layers=["layers.9"], token_layers=[])
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    with pytest.raises(Exception, match=r"teacher 'tiny-llama': extraction.layers \['layers.9'\]"):
        load_teacher(spec, tmp_path / "snap")


def test_a_teacher_over_the_memory_budget_is_layer_streamed_with_identical_features(llama_dir, tmp_path):
    spec = spec_for({"kind": "path", "path": str(llama_dir)})
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows(6)
    e_mem, m_mem = _extract(spec, tmp_path / "snap", rows, tmp_path / "mem")
    e_str, m_str = _extract(spec, tmp_path / "snap", rows, tmp_path / "str", memory_budget_bytes=10_000)
    assert not m_mem["layer_streamed"] and m_str["layer_streamed"]
    assert m_mem["cache_key"] == m_str["cache_key"], "streaming must not change the cache key"
    for kind in ("items", "tokens"):
        a, b = read_features(e_mem, kind).to_pydict(), read_features(e_str, kind).to_pydict()
        assert a.keys() == b.keys()
        for col in a:
            if col in ("row_id", "split"):
                assert a[col] == b[col]
            elif col == "topk_ids":
                assert np.array_equal(np.array(a[col])[:, 0], np.array(b[col])[:, 0])
            else:
                np.testing.assert_allclose(np.array(a[col], dtype=float), np.array(b[col], dtype=float), atol=1e-4,
                                           err_msg=f"{kind}.{col}")


def test_next_token_logprob_is_exact(llama_dir, tmp_path):
    spec = spec_for({"kind": "path", "path": str(llama_dir)})
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    entry, _ = _extract(spec, tmp_path / "snap", probe_rows(3), tmp_path / "feat")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tok = read_features(entry, "tokens").to_pydict()
    first = [j for j, r in enumerate(tok["row_id"]) if r == "t/0/0"]
    ids = torch.tensor([[tok["token_id"][j] for j in first]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0], -1)
    expect = logp[torch.arange(len(first) - 1), ids[0, 1:]].numpy()
    np.testing.assert_allclose(np.array([tok["next_logprob"][j] for j in first[:-1]]), expect, atol=1e-4)
    assert [tok["has_next"][j] for j in first] == [True] * (len(first) - 1) + [False]


def test_unchanged_source_reuses_the_snapshot_and_a_changed_one_rebuilds_it(llama_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    spec = spec_for({"kind": "path", "path": str(src)})
    m1 = build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    stamp = (tmp_path / "snap" / "manifest.json").stat().st_mtime_ns
    m2 = build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    assert m2["content_hash"] == m1["content_hash"]
    assert (tmp_path / "snap" / "manifest.json").stat().st_mtime_ns == stamp, "reused, not rewritten"
    cfg = src / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    m3 = build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    assert m3["content_hash"] != m1["content_hash"]


def test_bfloat16_feature_pass_is_close_to_float32_and_keyed_apart(llama_dir, tmp_path):
    """extraction.dtype bfloat16: the weights compute in bf16 (twice float32's speed where bf16 is native),
    the cached features stay float32 columns close to the float32 pass, in their own cache entry; the
    layer-streamed pass computes in bf16 too. "auto" resolves per device and a float32 pass keeps its key."""
    from nexus_assets.core.precision import resolve_dtype
    from nexus_assets.teachers.features import feature_cache_key

    src = {"kind": "path", "path": str(llama_dir)}
    spec32, spec16 = spec_for(src), spec_for(src, dtype="bfloat16")
    build_snapshot(spec32, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows(8)
    e32, m32 = _extract(spec32, tmp_path / "snap", rows, tmp_path / "f32")
    e16, m16 = _extract(spec16, tmp_path / "snap", rows, tmp_path / "f16")
    es, ms = _extract(spec16, tmp_path / "snap", rows, tmp_path / "fs", memory_budget_bytes=10_000)
    assert (m32["dtype"], m16["dtype"], ms["dtype"]) == ("float32", "bfloat16", "bfloat16") and ms["layer_streamed"]
    assert e32.name != e16.name and e16.name == es.name
    assert load_teacher(spec16, tmp_path / "snap").model.dtype == torch.bfloat16
    assert load_teacher(spec16, tmp_path / "snap", dtype="float32").model.dtype == torch.float32
    a, b = read_features(e32, "tokens").to_pydict(), read_features(e16, "tokens").to_pydict()
    lse32, lse16 = np.array(a["logsumexp"]), np.array(b["logsumexp"])
    assert read_features(e16, "tokens").schema.field("logsumexp").type == pa.float32()
    assert not np.array_equal(lse32, lse16), "bf16 must actually run in bf16"
    np.testing.assert_allclose(lse16, lse32, atol=0.1)
    top1 = np.array(a["topk_ids"])[:, 0] == np.array(b["topk_ids"])[:, 0]
    assert top1.mean() >= 0.9
    np.testing.assert_allclose(np.array(read_features(es, "tokens").to_pydict()["logsumexp"]), lse32, atol=0.1)

    assert feature_cache_key(spec_for(src, dtype="float32"), "s", "d") == feature_cache_key(spec32, "s", "d")
    assert resolve_dtype("auto", "cpu", native=lambda d: False) == "float32"
    assert resolve_dtype("auto", "cpu", native=lambda d: True) == "bfloat16"
    with pytest.raises(ValueError, match="dtype 'half'"):
        resolve_dtype("half", "cpu")


def test_a_float32_only_family_refuses_bfloat16_by_name(tmp_path):
    spec = TeacherSpec.model_validate(dict(
        name="tiny-vit", modality="vision", tower="vision", family="efficientnet_lite", capabilities=["vision.classify"],
        dataset="image-probe", source={"kind": "path", "path": str(tmp_path)}, extraction={"dtype": "bfloat16"}))
    with pytest.raises(TeacherLoadError, match="teacher 'tiny-vit': extraction.dtype 'bfloat16' is not supported "
                                               "by family 'efficientnet_lite'"):
        load_teacher(spec, tmp_path)
