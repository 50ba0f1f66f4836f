"""The carved Whisper audio tower at run time, on a tiny random Whisper: exact reproduction with the whole
vocabulary, vocabulary remapping, decoding that stops, a LoRA step, save/load and the stock export."""
import json

import numpy as np
import pytest
import torch

from nexus_assets.student.carved import audio_input_features
from nexus_assets.student.carved_audio import VOCAB_FILE, export_stock_whisper, stock_whisper, teacher_ids
from nexus_assets.student.config import HeadSpec, TowerConfig
from nexus_assets.student.tower import StudentTower, load_tower, save_tower
from nexus_assets.training.carve_audio import carved_audio_state, plan_audio_carve
from nexus_assets.training.carve_whisper import carved_whisper_config

V, SOT, NOTS, EOT = 51864, 50257, 50362, 50256


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    """A snapshot folder whose hf/ holds a tiny random stock Whisper with tiny.en's vocabulary."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=64, pad_token_id=EOT, bos_token_id=EOT,
                        eos_token_id=EOT, decoder_start_token_id=SOT)
    model = WhisperForConditionalGeneration(cfg).eval()
    d = tmp_path_factory.mktemp("snap")
    model.save_pretrained(d / "hf")
    return model, d


def _tower(d, layers=None, seconds=2, prior=0, seen=(11, 12, 13, 300)):
    base = TowerConfig(name="audio", modality="audio", capabilities={
        "audio.speaker_embed": HeadSpec("embedding", 8, "spk"),
        "audio.transcribe": HeadSpec("asr", V, "whisper", {"encoder.1": 32, "decoder.3": 32})},
        lora_rank={"audio.speaker_embed": 4, "audio.transcribe": 4})
    plan = plan_audio_carve(d, transcripts_token_ids=np.array(seen), decoder_layers=layers, vocab_mass=1.0,
                            max_seconds=seconds, prior_ids=prior, anchor_layers=["encoder.1"], log=lambda s: None)
    cfg = carved_whisper_config(base, plan, 4)
    tower = StudentTower(cfg)
    missing, unexpected = tower.load_state_dict(carved_audio_state(cfg, d), strict=False)
    assert not unexpected and not [k for k in missing if k.startswith(("backbone.", "heads.audio_transcribe."))]
    return tower.eval()


def _inputs(b=2, f=150, dec=(SOT, NOTS, 11, 12), seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"mels": torch.randn(b, f, 80, generator=g), "mel_mask": torch.ones(b, f, dtype=torch.bool),
            "dec_ids": torch.tensor([list(dec)] * b)}


def test_whole_vocabulary_all_layers_30s_equals_the_teacher(snap):
    """prior_ids = V keeps every id: new id == teacher id, and the logits (and their teacher-vocabulary
    log-probabilities) are the teacher's to float precision."""
    model, d = snap
    tower = _tower(d, layers=[0, 1, 2], seconds=30, prior=V)
    assert tower.cfg.carve["vocab"] == list(range(V)) and tower.cfg.capabilities["audio.transcribe"].out_dim == V + 1
    x = _inputs(b=1, f=3000)
    with torch.no_grad():
        out = tower(x, "audio.transcribe")["out"]  # (1, 3, V + 1): positions predicting transcript tokens
        ref = model(input_features=x["mels"].transpose(1, 2), decoder_input_ids=x["dec_ids"]).logits[:, 1:]
        logp = tower.to_teacher_vocab("audio.transcribe", out)
    torch.testing.assert_close(out[..., :V], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logp, torch.log_softmax(ref, -1), atol=1e-4, rtol=1e-4)


def test_vocabulary_remap_round_trips(snap):
    _, d = snap
    tower = _tower(d)
    head = tower.heads["audio_transcribe"]
    vocab = tower.cfg.carve["vocab"]
    assert {11, 12, 13, 300, SOT, NOTS, EOT} == set(vocab)
    kept = torch.tensor(vocab)
    assert torch.equal(head.old_to_new[kept], torch.arange(len(vocab)))  # kept: old -> new -> old
    assert torch.equal(head.new_to_old[head.old_to_new[kept]], kept)
    dropped = torch.tensor([0, 14, 50000])
    assert (head.old_to_new[dropped] == len(vocab)).all()  # every dropped id -> the fallback
    assert teacher_ids([[0, 1, len(vocab), 2]], vocab) == [[vocab[0], vocab[1], vocab[2]]]
    with torch.no_grad():
        out = tower(_inputs(), "audio.transcribe")["out"]
        logp = tower.to_teacher_vocab("audio.transcribe", out)  # (B, U, V) over teacher ids, normalised
    torch.testing.assert_close(torch.logsumexp(logp, -1), torch.zeros(logp.shape[:2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(logp[..., kept], torch.log_softmax(out, -1)[..., :-1])
    # dropped ids share the fallback's probability
    torch.testing.assert_close(logp[..., 0].exp() * (V - len(vocab)), torch.softmax(out, -1)[..., -1])


def _bias_towards(tower, new_id: int, sign: float):
    """Make the decoder's output a constant direction aligned (sign +1) or opposed (-1) to one id's row."""
    dec = tower.heads["audio_transcribe"].decoder
    with torch.no_grad():
        v = torch.randn(dec.embed_tokens.weight.shape[1], generator=torch.Generator().manual_seed(3))
        dec.layer_norm.weight.zero_()
        dec.layer_norm.bias.copy_(v)
        dec.embed_tokens.weight[new_id] = sign * 50 * v / v.norm()


def test_generate_stops_at_eot_and_never_exceeds_the_budget(snap):
    _, d = snap
    x = _inputs()
    x.pop("dec_ids")
    tower = _tower(d)
    eot_new = tower.cfg.carve["vocab"].index(EOT)
    _bias_towards(tower, eot_new, +1.0)  # EOT is every step's argmax: empty transcripts
    assert tower.generate(x, "audio.transcribe", 7) == [[], []]
    # EOT never wins: decoding must stop at the budget (64 text ids: enough for 40 steps without a repeated
    # 3-gram; with 4 text ids greedy decoding runs out of legal tokens and EOT is all that is left)
    tower = _tower(d, prior=64)
    eot_new = tower.cfg.carve["vocab"].index(EOT)
    _bias_towards(tower, eot_new, -1.0)
    kept = set(tower.cfg.carve["vocab"]) - {EOT}
    for budget in (1, 5, 40):
        ids = tower.generate(x, "audio.transcribe", budget)
        assert len(ids) == 2 and all(len(r) == budget for r in ids), (budget, ids)
        assert all(t in kept for r in ids for t in r), ids  # teacher ids, never EOT or the fallback
    # repetition guard: no 3-gram occurs twice in a row's output
    for r in tower.generate(x, "audio.transcribe", 40):
        grams = [tuple(r[i:i + 3]) for i in range(len(r) - 2)]
        assert len(grams) == len(set(grams))



def test_generate_never_emits_prompt_tokens(snap):
    _, d = snap
    x = _inputs()
    x.pop("dec_ids")
    tower = _tower(d)
    _bias_towards(tower, tower.cfg.carve["vocab"].index(EOT), -1.0)
    ids = tower.generate(x, "audio.transcribe", 40)
    assert not {SOT, NOTS} & {t for r in ids for t in r}, ids

def _lora_step(tower):
    tower.add_adapter("audio.transcribe")
    tower.train()
    x = _inputs()
    params = tower.lora_parameters("audio.transcribe") + tower.head_parameters("audio.transcribe")
    opt = torch.optim.SGD(params, lr=0.5)
    before = {n: p.detach().clone() for n, p in tower.named_parameters()}
    out = tower(x, "audio.transcribe")["out"]
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), torch.ones(out.shape[0] * out.shape[1], dtype=torch.long))
    loss.backward()
    opt.step()
    tower.eval()
    return before, float(loss)


def test_one_lora_step_trains_the_adapter_only_on_the_encoder(snap):
    _, d = snap
    tower = _tower(d)
    with torch.no_grad():
        plain = tower(_inputs(), "audio.transcribe")["out"]
    before, loss = _lora_step(tower)
    assert np.isfinite(loss)
    changed = {n for n, p in tower.named_parameters() if not torch.equal(p, before[n])}
    lora_b = {n for n in changed if "lora_B" in n}
    assert lora_b and all(".encoder.layers." in n for n in lora_b)  # adapters sit on the encoder Linear layers
    assert not {n for n in changed if n.startswith("backbone.") and "lora_" not in n}  # base weights frozen
    with torch.no_grad():
        assert not torch.allclose(tower(_inputs(), "audio.transcribe")["out"], plain)
        tower.set_capability("audio.speaker_embed")  # no adapter: the bare encoder
        with tower.adapters_disabled():
            assert tower(_inputs(), "audio.speaker_embed")["out"].shape == (2, 8)


def test_save_load_round_trip_with_a_trained_adapter(snap, tmp_path):
    _, d = snap
    tower = _tower(d)
    _lora_step(tower)
    save_tower(tower, tmp_path / "t")
    back = load_tower(tmp_path / "t")
    assert back.cfg.to_dict() == tower.cfg.to_dict()
    x = _inputs()
    with torch.no_grad():
        for cap in ("audio.transcribe", "audio.speaker_embed"):
            a, b = tower(x, cap), back(x, cap)
            torch.testing.assert_close(a["out"], b["out"])
            for layer in a["anchors"]:
                torch.testing.assert_close(a["anchors"][layer], b["anchors"][layer])
        x.pop("dec_ids")
        assert tower.generate(x, "audio.transcribe", 6) == back.generate(x, "audio.transcribe", 6)
    # the runtime's checked loader (sizes compared on the meta device first: the vocabulary maps must stay
    # real tensors there) reads the same tower
    from nexus_assets.runtime.towerload import load_student

    checked, _ = load_student(tmp_path / "t")
    assert checked.generate(x, "audio.transcribe", 6) == tower.generate(x, "audio.transcribe", 6)


def test_stock_export_loads_in_transformers_and_matches_the_tower(snap, tmp_path):
    """The ASR path (encoder + the transcribe adapter merged + decoder) as a stock Whisper folder: same
    logits on the features Whisper's own extractor gives, same transcripts."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    _, d = snap
    tower = _tower(d, layers=[0, 2])
    _lora_step(tower)
    folder = export_stock_whisper(tower, tmp_path / "hf")
    stock = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    meta = json.loads((folder / VOCAB_FILE).read_text())
    assert stock.config.decoder_layers == 2 and stock.config.vocab_size == len(meta["vocab"]) + 1
    assert meta["vocab"] == tower.cfg.carve["vocab"] and meta["fallback"] == len(meta["vocab"])

    wave = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)  # 1 s
    mels = audio_input_features(tower.cfg, wave)[None]  # what training and the runtime feed the tower
    feats = WhisperFeatureExtractor.from_pretrained(folder)(wave, sampling_rate=16000,
                                                            return_tensors="pt").input_features
    assert feats.shape == (1, 80, 200)
    dec = torch.tensor([[SOT, NOTS, 11, 300]])
    x = {"mels": mels, "mel_mask": torch.ones(mels.shape[:2], dtype=torch.bool), "dec_ids": dec}
    with torch.no_grad():
        ours = tower(x, "audio.transcribe")["out"]
        new_dec = tower.heads["audio_transcribe"].old_to_new[dec]
        theirs = stock(input_features=feats, decoder_input_ids=new_dec).logits[:, 1:]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # the un-merged model would differ: the export really carries the adapter
    with torch.no_grad(), tower.adapters_disabled():
        assert not torch.allclose(tower(x, "audio.transcribe")["out"], theirs, atol=1e-4)

    x.pop("dec_ids")
    with torch.no_grad():
        gen = stock.generate(input_features=feats, decoder_input_ids=torch.tensor([meta["prompt_ids"]]),
                             max_new_tokens=6)
    p = meta["prompt_ids"]
    rows = [r[len(p):] if r[:len(p)] == p else r for r in gen.tolist()]  # Whisper's generate may drop the prompt
    rows = [r[: r.index(meta["eot_id"])] if meta["eot_id"] in r else r for r in rows]
    assert teacher_ids(rows, folder) == tower.generate(x, "audio.transcribe", 6)


def test_stock_export_refuses_a_random_tower():
    cfg = TowerConfig(name="audio", modality="audio", capabilities={"audio.transcribe": HeadSpec("asr", V, "w")},
                      lora_rank={"audio.transcribe": 4}, width=32, n_heads=2, depth=1)
    with pytest.raises(ValueError, match="not a carved Whisper tower"):
        stock_whisper(StudentTower(cfg))
