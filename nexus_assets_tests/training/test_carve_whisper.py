"""Carving the audio tower from Whisper: known answers on a tiny Whisper built from a config."""
import json

import numpy as np
import pytest
import torch

from nexus_assets.student.carved_whisper import pad_to_window, whisper_log_mel
from nexus_assets.student.config import HeadSpec, TowerConfig
from nexus_assets.student.tower import StudentTower, load_tower, save_tower
from nexus_assets.training.carve_whisper import carved_whisper_config, carved_whisper_state, plan_whisper_carve

V = 51864


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=64, pad_token_id=50256,
                        bos_token_id=50256, eos_token_id=50256, decoder_start_token_id=50257)
    model = WhisperForConditionalGeneration(cfg).eval()
    d = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(d)
    return model, d


def _base():
    return TowerConfig(name="audio", modality="audio", capabilities={
        "audio.speaker_embed": HeadSpec("embedding", 8, "spk"),
        "audio.transcribe": HeadSpec("asr", V, "whisper", {"encoder.1": 32})},
        lora_rank={"audio.speaker_embed": 4, "audio.transcribe": 4})


def _plan(d, layers, seconds=30, mass=1.0, seen=(11, 12, 13)):
    return plan_whisper_carve(d, transcript_ids=np.array(seen), topk_ids=np.array([[14, 15]]),
                              topk_probs=np.array([[0.5, 0.5]]), decoder_layers=layers, vocab_mass=mass,
                              max_seconds=seconds, anchor_layers=["encoder.1"], log=lambda s: None)


def test_full_carve_reproduces_the_teacher(tiny_whisper):
    """Every decoder layer, a 30 s window: the carved logits are the teacher's over the kept ids."""
    model, d = tiny_whisper
    plan = _plan(d, [0, 1, 2])
    cfg = carved_whisper_config(_base(), plan, 4)
    tower = StudentTower(cfg)
    missing, unexpected = tower.load_state_dict(carved_whisper_state(cfg.carve, d), strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("backbone.")]
    torch.manual_seed(1)
    mels = torch.randn(1, 3000, 80)
    dec = torch.tensor([[50257, 50362, 11, 12]])
    with torch.no_grad():
        out = tower({"mels": mels, "dec_ids": dec}, "audio.transcribe")["out"]  # (1, U, V'+1) from position p-1
        ref = model(input_features=mels.transpose(1, 2), decoder_input_ids=dec).logits[:, 1:]  # (1, 3, V)
    kept = torch.tensor(plan["vocab"])
    torch.testing.assert_close(out[..., :-1], ref[..., kept], atol=1e-4, rtol=1e-4)
    assert isinstance(tower.anchor_proj["audio_transcribe__encoder_1"], torch.nn.Identity)


def test_carve_keeps_chosen_layers_and_vocab_and_generation_stops(tiny_whisper, tmp_path):
    model, d = tiny_whisper
    plan = _plan(d, None, seconds=2)
    assert plan["decoder_layers"] == [0, 2]  # first and last
    assert {11, 12, 13, 14, 15, 50256, 50257, 50362} <= set(plan["vocab"])
    rep = plan["report"]
    assert rep["student_params"] < rep["teacher_params"] and rep["train_transcript_coverage"] == pytest.approx(1.0)
    cfg = carved_whisper_config(_base(), plan, 4)
    tower = StudentTower(cfg)
    tower.load_state_dict(carved_whisper_state(cfg.carve, d), strict=False)
    tower.eval()
    mels = torch.randn(2, 150, 80)
    ids = tower.generate({"mels": mels, "mel_mask": torch.ones(2, 150, dtype=torch.bool)}, "audio.transcribe", 7)
    assert len(ids) == 2 and all(len(r) <= 7 and all(t in set(plan["vocab"]) for t in r) for r in ids)
    tower.add_adapter("audio.transcribe")
    save_tower(tower, tmp_path / "t")
    back = load_tower(tmp_path / "t")
    x = {"mels": mels, "mel_mask": torch.ones(2, 150, dtype=torch.bool), "dec_ids": torch.tensor([[50257, 50362, 11]] * 2)}
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()(x, "audio.transcribe")["out"], back(x, "audio.transcribe")["out"])


def test_impossible_plans_are_named(tiny_whisper):
    _, d = tiny_whisper
    with pytest.raises(ValueError, match="decoder_layers: at least one"):
        _plan(d, [])
    with pytest.raises(ValueError, match="decoder_layers: distinct layers in 0..2"):
        _plan(d, [0, 5])
    with pytest.raises(ValueError, match="vocab_mass"):
        _plan(d, [0], mass=0.0)


def test_cut_clip_padded_back_equals_whisper_padding():
    """Frames of the audio, then the floor: what Whisper's extractor gives for the clip padded with silence."""
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(16000)).astype(np.float32)  # 1 s
    cut = whisper_log_mel(wave, max_seconds=3)
    assert cut.shape == (101, 80)
    full = WhisperFeatureExtractor(feature_size=80, chunk_length=3)(wave, sampling_rate=16000,
                                                                   return_tensors="np").input_features[0].T
    padded, mask = pad_to_window(cut[None], torch.ones(1, 101, dtype=torch.bool), 300)
    np.testing.assert_allclose(padded[0, :100].numpy(), full[:100], atol=1e-5)
    np.testing.assert_allclose(padded[0, 110:].numpy(), full[110:], atol=1e-5)  # the silence floor
    assert mask[0].sum() == 101
