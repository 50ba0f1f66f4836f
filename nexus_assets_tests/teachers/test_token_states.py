"""Per-token teacher states (`extraction.state_layers`): a PCA basis fitted once per cache entry on train rows,
every token's scores cached in it, and read back as the carved student's intermediate-state targets."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from nexus_assets.core.feature_store import STATE_BASIS, FeatureCacheError, load_state_basis, read_features
from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.causal_lm import fit_state_basis
from nexus_assets.teachers.features import extract_teacher_features, feature_cache_key, state_basis_for_entry
from nexus_assets.teachers.snapshot import build_snapshot
from nexus_assets_tests.helpers import tiny_llama_dir
from nexus_assets_tests.teachers.test_teacher_written import probe_rows
from nexus_assets_tests.teachers.test_teacher_written import spec_for as written_spec_for


def spec_for(path, **extraction) -> TeacherSpec:
    """test_teacher_written's tiny-Llama spec without its written text or per-token hidden layer."""
    return written_spec_for(path, teacher_written=None, token_layers=[], **extraction)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


class KnownStates:
    """Per-token states drawn from a known Gaussian: h = mean + z * sqrt(var) @ Q.T (one text = 200 tokens)."""

    def __init__(self, h=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=torch.float64))[0]
        self.var = torch.tensor([9.0, 4.0, 1.0, 0.25, 0.01], dtype=torch.float64)[:h]
        self.mean = torch.arange(h, dtype=torch.float64)
        self.g = g
        self.seen: list[str] = []

    def token_states(self, texts, layers):
        self.seen += texts
        z = torch.randn(200 * len(texts), len(self.var), generator=self.g, dtype=torch.float64)
        return {name: (self.mean + (z * self.var.sqrt()) @ self.q.T).float() for name in layers}


def test_fit_state_basis_recovers_a_known_covariance():
    t = KnownStates()
    b = fit_state_basis(t, ["x"] * 100, ["layers.2"], rank=3, batch_size=10)["layers.2"]  # 20,000 tokens
    torch.testing.assert_close(b["mean"].double(), t.mean, atol=0.06, rtol=0)
    torch.testing.assert_close(b["variances"].double(), t.var[:3], rtol=0.05, atol=0)
    assert float(b["total_variance"]) == pytest.approx(float(t.var.sum()), rel=0.05)
    # each component is the known direction up to sign, and the rows are orthonormal
    cos = (b["components"].double() @ t.q[:, :3]).abs().diagonal()
    assert bool((cos > 0.99).all())
    torch.testing.assert_close(b["components"] @ b["components"].T, torch.eye(3), atol=1e-5, rtol=0)


def test_the_basis_is_fitted_on_train_rows_only_written_once_and_read_back(llama_dir, tmp_path):
    spec = spec_for(llama_dir, state_layers=["layers.2"], state_rank=4, state_fit_rows=16)
    rows, t, logs = probe_rows(), KnownStates(), []
    t.layer_names = lambda: [f"layers.{i}" for i in range(4)]
    basis = state_basis_for_entry(t, spec, rows, tmp_path, log=logs.append)
    train = {x for x, s in zip(rows["text"].to_pylist(), rows["split"].to_pylist()) if s == "train"}
    assert t.seen and set(t.seen) <= train and len(set(t.seen)) == len(train)  # 9 train rows < 16: all of them
    assert (tmp_path / STATE_BASIS).exists() and "variance kept" in logs[-1]
    again = KnownStates(seed=5)
    again.layer_names = t.layer_names
    back = state_basis_for_entry(again, spec, rows, tmp_path, log=logs.append)
    assert again.seen == []  # a resume reads the entry's basis, never refits it
    for k in ("mean", "components", "variances"):
        torch.testing.assert_close(back["layers.2"][k], basis["layers.2"][k])


def test_bad_state_layers_are_named(llama_dir, tmp_path):
    with pytest.raises(Exception, match="state_layers"):
        spec_for(llama_dir, state_layers=["blocks.2"])
    spec = spec_for(llama_dir, state_layers=["layers.9"])
    t = KnownStates()
    t.layer_names = lambda: [f"layers.{i}" for i in range(4)]
    with pytest.raises(ValueError, match="tiny-llama.*state_layers.*layers.9"):
        state_basis_for_entry(t, spec, probe_rows(), tmp_path, log=lambda s: None)
    logs = []
    assert state_basis_for_entry(object(), spec, probe_rows(), tmp_path, log=logs.append) is None
    assert "not cached" in logs[0]
    (tmp_path / STATE_BASIS).write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="state_basis.safetensors"):
        load_state_basis(tmp_path / STATE_BASIS)


def test_a_teacher_without_state_layers_keeps_its_cache_key(llama_dir):
    plain, states = spec_for(llama_dir), spec_for(llama_dir, state_layers=["layers.2"])
    explicit = spec_for(llama_dir, state_rank=64, state_fit_rows=100)  # settings that do nothing without layers
    assert feature_cache_key(plain, "s", "d", "default") == feature_cache_key(explicit, "s", "d", "default")
    assert feature_cache_key(plain, "s", "d", "default") != feature_cache_key(states, "s", "d", "default")


def test_cached_state_scores_are_the_teachers_states_in_the_entrys_basis(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec_for(llama_dir, state_layers=["layers.2"], state_rank=6, state_fit_rows=16)
    build_snapshot(spec, tmp_path / "snap", log=lambda s: None)
    rows = probe_rows()
    entry, m = extract_teacher_features(spec, tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    basis = load_state_basis(entry / STATE_BASIS)["layers.2"]
    tokens = read_features(entry, "tokens")
    assert tokens.schema.field("state.layers.2").type.list_size == 6
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    text = rows["text"][3].as_py()
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        h = model(**enc, output_hidden_states=True).hidden_states[2][0]  # (T, H)
    want = (h - basis["mean"]) @ basis["components"].T
    mine = tokens.filter(pa.compute.equal(tokens["row_id"], rows["row_id"][3]))
    got = torch.tensor(np.stack(mine["state.layers.2"].to_numpy(zero_copy_only=False)))
    pos = mine["position"].to_numpy()
    assert bool((got[pos == 0] == 0).all())  # the attention sink is stored as zeros
    torch.testing.assert_close(got[pos > 0], want[torch.as_tensor(pos[pos > 0])], atol=2e-3, rtol=2e-3)  # float16


def test_state_bits_key_a_new_entry_only_when_quantized(llama_dir):
    plain = spec_for(llama_dir, state_layers=["layers.2"])
    assert feature_cache_key(plain, "s", "d", "default") == feature_cache_key(
        spec_for(llama_dir, state_layers=["layers.2"], state_bits=16), "s", "d", "default")
    assert feature_cache_key(plain, "s", "d", "default") != feature_cache_key(
        spec_for(llama_dir, state_layers=["layers.2"], state_bits=4), "s", "d", "default")
    with pytest.raises(Exception, match="state_bits"):
        spec_for(llama_dir, state_layers=["layers.2"], state_bits=2)


def test_four_bit_state_scores_read_back_as_the_float16_entrys_within_their_step(llama_dir, tmp_path):
    """The same teacher and rows cached twice: 4-bit codes decode to the float16 entry's scores (same basis:
    fitted on the same rows) within rounding, in a quarter of the bytes, and the readers hide the codes."""
    rows, got = probe_rows(), {}
    for bits in (16, 4):
        spec = spec_for(llama_dir, state_layers=["layers.2"], state_rank=32, state_fit_rows=16, state_bits=bits)
        build_snapshot(spec, tmp_path / f"snap{bits}", log=lambda s: None)
        entry, _ = extract_teacher_features(spec, tmp_path / f"snap{bits}", rows, "d", tmp_path / f"feat{bits}",
                                            log=lambda s: None)
        got[bits] = (entry, read_features(entry, "tokens", columns=["position", "state.layers.2"]))
    (e16, t16), (e4, t4) = got[16], got[4]
    assert t4.column_names == ["position", "state.layers.2"]  # decoded: no scale column, float values
    a = np.stack(t16["state.layers.2"].to_numpy(zero_copy_only=False)).astype(np.float32)
    b = np.stack(t4["state.layers.2"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert a.shape == b.shape == (t16.num_rows, 32) and b.dtype == np.float32
    keep = t16["position"].to_numpy() > 0
    rel = float(((a - b)[keep] ** 2).mean() / (a[keep] ** 2).mean())
    assert 0 < rel < 0.05  # rounded, not copied, and close (a random tiny model's states are heavy-tailed)
    assert not b[~keep].any()  # the attention sink's zeros stay zeros
    import pyarrow.parquet as pq

    raw = pq.read_table(sorted(e4.glob("tokens-*.parquet"))[0])
    assert raw.schema.field("state.layers.2").type == pa.binary(16)  # 32 components at 4 bits, fixed-width bytes
    with pytest.raises(FeatureCacheError, match="state_basis"):  # codes without their basis cannot decode
        (e4 / STATE_BASIS).rename(e4 / "moved")
        read_features(e4, "tokens")


def test_fewer_state_bits_re_encode_a_finished_entry_instead_of_running_the_teacher(llama_dir, tmp_path):
    """16 -> 4 bits: the new entry is filled from the float16 one (no teacher pass), and reads back as the
    direct 4-bit pass does, up to one rounding step; its other columns are the sibling's."""
    rows = probe_rows()
    spec = {b: spec_for(llama_dir, state_layers=["layers.2"], state_rank=32, state_fit_rows=16, state_bits=b)
            for b in (16, 4)}
    build_snapshot(spec[16], tmp_path / "snap", log=lambda s: None)
    e16, _ = extract_teacher_features(spec[16], tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    logs = []
    e4, m4 = extract_teacher_features(spec[4], tmp_path / "snap", rows, "d", tmp_path / "feat", log=logs.append)
    assert e4 != e16 and e4.parent == e16.parent
    assert m4["rows_computed_this_run"] == 0 and m4["seeded_from"]["entry"] == e16.name
    assert any("re-encoded the state scores" in line for line in logs)
    direct, _ = extract_teacher_features(spec[4], tmp_path / "snap", rows, "d", tmp_path / "direct",
                                         log=lambda s: None)
    assert direct.name == e4.name  # the same settings, the same key
    cols = ["row_id", "position", "token_id", "topk_ids", "topk_logits", "state.layers.2"]
    a, b, c = (read_features(e, "tokens", columns=cols) for e in (e16, e4, direct))
    assert b.drop_columns(["state.layers.2"]).equals(a.drop_columns(["state.layers.2"]))
    x16, x4, xd = (np.stack(t["state.layers.2"].to_numpy(zero_copy_only=False)).astype(np.float32) for t in (a, b, c))
    keep = a["position"].to_numpy() > 0
    rel = lambda u, v: float(((u - v)[keep] ** 2).mean() / (v[keep] ** 2).mean())  # noqa: E731
    assert 0 < rel(x4, x16) < 0.05
    # direct and re-encoded 4-bit differ only by float16's rounding of the scores and block scales: far less
    # than the 4-bit rounding itself
    assert rel(x4, xd) < 0.2 * rel(x4, x16)
    assert read_features(e4, "items").equals(read_features(e16, "items"))


def test_re_encoding_needs_a_finished_higher_precision_sibling(llama_dir, tmp_path):
    from nexus_assets.core.feature_store import MANIFEST
    from nexus_assets.teachers.features import recode_from_sibling_entry

    rows = probe_rows()
    spec = {b: spec_for(llama_dir, state_layers=["layers.2"], state_rank=32, state_fit_rows=16, state_bits=b)
            for b in (16, 8, 4)}
    build_snapshot(spec[16], tmp_path / "snap", log=lambda s: None)
    e16, m16 = extract_teacher_features(spec[16], tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    snap_hash = m16["snapshot_hash"]
    key = lambda b: feature_cache_key(spec[b], snap_hash, "d", "default")  # noqa: E731
    assert e16.name == key(16)
    assert recode_from_sibling_entry(spec[16], e16.parent / "x", snap_hash, "d", "default", "cpu") is None
    (e16 / MANIFEST).rename(e16 / "unfinished")  # an unfinished sibling is never read from
    assert recode_from_sibling_entry(spec[4], e16.parent / key(4), snap_hash, "d", "default", "cpu") is None
    (e16 / "unfinished").rename(e16 / MANIFEST)
    got = recode_from_sibling_entry(spec[8], e16.parent / key(8), snap_hash, "d", "default", "cpu",
                                    log=lambda s: None)
    assert got["entry"] == e16.name and got["from_bits"] == 16


def test_a_smaller_hidden_sample_re_encodes_a_finished_entry_and_profiles_alike(llama_dir, tmp_path):
    """hidden_sample_bits 8 (with state bits 4): filled from the 16-bit entry without a teacher pass, both the
    sample and the state scores re-encoded; the sample reads back as floats within rounding, and the subspaces
    profiling fits on it are the float16 sample's."""
    from nexus_assets.core.subspace import profile_subspaces

    rows = probe_rows()
    spec = {b: written_spec_for(llama_dir, teacher_written=None, token_hidden_fraction=0.5, state_layers=["layers.2"],
                                state_rank=32, state_fit_rows=16, state_bits=16 if b == 16 else 4,
                                hidden_sample_bits=b) for b in (16, 8)}
    build_snapshot(spec[16], tmp_path / "snap", log=lambda s: None)
    e16, m16 = extract_teacher_features(spec[16], tmp_path / "snap", rows, "d", tmp_path / "feat", log=lambda s: None)
    logs = []
    e8, m8 = extract_teacher_features(spec[8], tmp_path / "snap", rows, "d", tmp_path / "feat", log=logs.append)
    assert e8 != e16 and m8["rows_computed_this_run"] == 0 and m8["seeded_from"]["from_hidden_bits"] == 16
    assert any("state scores (16 -> 4 bits) and hidden sample (16 -> 8 bits)" in line for line in logs)
    import pyarrow.parquet as pq

    raw = pq.read_table(sorted(e8.glob("token_hidden-*.parquet"))[0])
    assert pa.types.is_fixed_size_binary(raw.schema.field("hidden.layers.1").type)
    a, b = (read_features(e, "token_hidden", columns=["row_id", "position", "hidden.layers.1"]) for e in (e16, e8))
    assert a.num_rows == b.num_rows > 0 and a["row_id"].equals(b["row_id"])
    x16, x8 = (np.stack(t["hidden.layers.1"].to_numpy(zero_copy_only=False)) for t in (a, b))
    keep = a["position"].to_numpy() > 0
    err = float(((x8 - x16)[keep] ** 2).mean() / x16[keep].var(axis=0).sum() * x16.shape[1])
    assert 0 < err < 1e-3  # 8 bits: rounding noise ~1e-4 of the variance, not zero (the codes are real)
    direct, dm = extract_teacher_features(spec[8], tmp_path / "snap", rows, "d", tmp_path / "direct",
                                          log=lambda s: None)
    assert direct.name == e8.name and dm["rows_computed_this_run"] == rows.num_rows  # a teacher pass at 8 bits
    xd = np.stack(read_features(direct, "token_hidden", columns=["hidden.layers.1"])["hidden.layers.1"]
                  .to_numpy(zero_copy_only=False))
    assert xd.shape == x8.shape and float(((xd - x16)[keep] ** 2).mean()) < 2 * float(((x8 - x16)[keep] ** 2).mean()) + 1e-6
    s16, s8 = (profile_subspaces(e, "tiny-llama", ["layers.1"], ["layers.1"], tmp_path / f"sub{n}", log=lambda s: None)
               for n, e in ((16, e16), (8, e8)))
    assert s8["layers"]["layers.1"]["rows"] == s16["layers"]["layers.1"]["rows"]
    assert s8["layers"]["layers.1"]["intrinsic_dims"] == s16["layers"]["layers.1"]["intrinsic_dims"]
