"""Router: explicit routes, errors that name capability and modality, "auto" rules, persistence."""
from __future__ import annotations

import pytest

from nexus_assets.student.router import (_EMBED, _GENERATE, HashedNgramClassifier, Route, Router, RoutingError,
                                      default_auto_examples)
from nexus_assets.student.examples import example_tower_config


@pytest.fixture(scope="module")
def router() -> Router:
    r = Router.from_towers([example_tower_config(t) for t in ("text", "vision", "audio")])
    r.fit_text_auto()
    return r


@pytest.mark.parametrize("modality, cap, tower, adapter", [
    ("text", "text.generate", "text", "text_generate"),
    ("text", "text.embed", "text", "text_embed"),
    ("vision", "vision.classify", "vision", "vision_classify"),
    ("audio", "audio.speaker_embed", "audio", "audio_speaker_embed"),
    ("audio", "audio.transcribe", "audio", "audio_transcribe"),
])
def test_explicit_routes(router, modality, cap, tower, adapter):
    assert router.route(modality, cap) == Route(cap, tower, adapter, modality)


@pytest.mark.parametrize("modality, cap, words", [
    ("text", "vision.classify", ["vision.classify", "text"]),
    ("audio", "text.embed", ["text.embed", "audio"]),
    ("text", "text.summarise", ["text.summarise", "text"]),
    ("video", "auto", ["video"]),
])
def test_errors_name_capability_and_modality(router, modality, cap, words):
    with pytest.raises(RoutingError) as e:
        router.route(modality, cap, text="hello")
    assert all(w in str(e.value) for w in words)


def test_auto_rules(router):
    assert router.route("vision").capability == "vision.classify"  # the only vision capability
    assert router.route("audio").capability == "audio.transcribe"  # documented default
    with pytest.raises(RoutingError, match="needs the text"):
        router.route("text")
    no_default = Router(router.routes.values(), defaults={})
    with pytest.raises(RoutingError, match="ambiguous"):
        no_default.route("audio")


def test_auto_text_examples(router):
    for text in ["Write a haiku about autumn leaves.", "Can you explain how magnets work?", "Tell me a story"]:
        assert router.route("text", text=text).capability == "text.generate", text
    for text in ["kubernetes pod eviction policy", "annual report 2021 revenue figures", "The cat sat on the mat."]:
        assert router.route("text", text=text).capability == "text.embed", text


def test_auto_text_classifier_generalises_to_unseen_topics():
    """Train on templates x half the topics, test on the other half of the topics."""
    examples = default_auto_examples()
    from nexus_assets.student.router import _TOPICS

    held = set(_TOPICS[::2])
    train = [(t, c) for t, c in examples if not any(h in t.lower() for h in held)]
    test = [(tpl.format(t=h), "text.generate") for h in held for tpl in _GENERATE] + \
           [(tpl.format(t=h), "text.embed") for h in held for tpl in _EMBED]
    clf = HashedNgramClassifier(classes=["text.embed", "text.generate"])
    clf.fit([t for t, _ in train], [c for _, c in train])
    acc = sum(p == c for p, (_, c) in zip(clf.predict([t for t, _ in test]), test)) / len(test)
    assert acc >= 0.9, acc


def test_save_load_round_trip(router, tmp_path):
    router.save(tmp_path / "router")
    assert {p.name for p in (tmp_path / "router").iterdir()} == {"router.json", "router.safetensors"}
    loaded = Router.load(tmp_path / "router")
    assert loaded.routes == router.routes and loaded.defaults == router.defaults
    texts = [t for t, _ in default_auto_examples()[:40]] + ["random words here", "Why?"]
    assert loaded.text_classifier.predict(texts) == router.text_classifier.predict(texts)


def test_invalid_tables():
    routes = [Route("text.embed", "text", "text_embed", "text")]
    with pytest.raises(ValueError, match="two towers"):
        Router(routes * 2)
    with pytest.raises(ValueError, match="defaults"):
        Router(routes, defaults={"audio": "text.embed"})
    with pytest.raises(RoutingError, match="nothing to choose"):
        Router(routes).fit_text_auto()
    with pytest.raises(ValueError, match="not in classes"):
        HashedNgramClassifier(classes=["a"]).fit(["x"], ["b"])
