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


def test_speaker_head_exits_early_on_the_clip_frames_only(tiny_whisper):
    """An exit pass runs k encoder layers over the clip's own frames: where the clip fills the window, its
    states are exactly the full pass's layer k through the final norm; a short clip costs fewer positions."""
    _, d = tiny_whisper
    plan = {**_plan(d, [0], seconds=2), "exit_blocks": {"audio.speaker_embed": 1}}
    cfg = carved_whisper_config(_base(), plan, 4)
    assert cfg.capabilities["audio.speaker_embed"].exit_block == 1 and cfg.capabilities["audio.transcribe"].exit_block == 0
    tower = StudentTower(cfg)
    tower.load_state_dict(carved_whisper_state(cfg.carve, d), strict=False)
    tower.eval()
    base = tower.base_backbone()
    calls = []
    hooks = [l.register_forward_hook(lambda m, i, o, j=j: calls.append((j, i[0].shape[1])))
             for j, l in enumerate(base.encoder.layers)]
    torch.manual_seed(2)
    full_clip = torch.randn(1, 200, 80)  # fills the 2 s window
    with torch.no_grad():
        hs_exit, _ = tower.encode({"mels": full_clip}, ["audio.speaker_embed"])
        assert calls == [(0, 100)] and len(hs_exit) == 1  # one layer ran
        calls.clear()
        hs_full, _ = tower.encode({"mels": full_clip})
        assert [c[0] for c in calls] == [0, 1]
        torch.testing.assert_close(hs_exit[0], base.exit_norm(hs_full[0]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tower.head_input("audio.speaker_embed", hs_full), hs_exit[0], atol=1e-5, rtol=1e-5)
        calls.clear()
        short = torch.randn(2, 60, 80)
        mask = torch.zeros(2, 60, dtype=torch.bool)
        mask[0, :41], mask[1, :23] = True, True
        out = tower({"mels": short, "mel_mask": mask}, "audio.speaker_embed")["out"]
    assert calls == [(0, 21)]  # the longest clip's 41 frames, made even, halved by conv2's stride
    assert out.shape == (2, 8) and torch.isfinite(out).all()
    for h in hooks:
        h.remove()
    # its exit pass sees fewer padded frames than the full pass: training gives it its own pass even when
    # the step runs the full pass for transcription
    from nexus_assets.training.objective import pass_exit_block
    assert pass_exit_block(tower, "audio.speaker_embed", ["audio.transcribe", "audio.speaker_embed"]) == 1


def test_encoder_exit_block_finds_the_layer_a_linear_target_reads(tiny_whisper):
    """Targets that are a linear map of layer 1's pooled states (through the final norm): layer 1 is chosen."""
    from nexus_assets.student.carved_whisper import CarvedWhisperBackbone
    from nexus_assets.student.modules import _pool
    from nexus_assets.training.carve_whisper import encoder_exit_block

    _, d = tiny_whisper
    plan = _plan(d, [0], seconds=2)
    rng = np.random.default_rng(3)
    mels = [torch.as_tensor(rng.standard_normal((int(n), 80)), dtype=torch.float32) for n in rng.integers(40, 200, 64)]
    cfg = carved_whisper_config(_base(), plan, 4)
    net = CarvedWhisperBackbone(cfg).eval()
    net.load_state_dict({k[len("backbone."):]: v for k, v in carved_whisper_state(cfg.carve, d).items()
                         if k.startswith("backbone.")})
    net.exit_after = 1
    with torch.no_grad():
        pooled = torch.cat([_pool(*[(hs[0], m) for hs, m in [net({"mels": x[None]})]][0]) for x in mels])
    targets = (pooled @ torch.as_tensor(rng.standard_normal((32, 6)), dtype=torch.float32)).numpy()
    res = encoder_exit_block(plan, d, mels, targets)
    assert res["blocks"] == 1 and res["rows"] == 64
    assert res["fold_cosine"][0] > 0.99
    noise = encoder_exit_block(plan, d, mels, rng.standard_normal((64, 6)))  # nothing to read: every layer scores low
    assert max(noise["fold_cosine"]) < 0.5
    with pytest.raises(ValueError, match="clips and"):
        encoder_exit_block(plan, d, mels[:8], targets[:8])
