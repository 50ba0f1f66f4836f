"""The router: (input modality, capability or "auto") -> (tower, adapter). Runtime-safe (torch, safetensors).

Explicit capabilities ("<tower>.<verb>", e.g. "text.embed") are looked up, never guessed: an unknown
capability, or one whose tower's modality differs from the input's, raises `RoutingError` naming both,
and nothing is ever routed to another tower silently.

"auto" picks the capability:
* a modality with one capability -> that one (vision -> vision.classify);
* text -> a learned classifier: multinomial logistic regression over hashed character 2-4-grams and
  word unigrams (`HashedNgramClassifier`), trained on examples of generate-style prompts
  (instructions, questions, story openings) vs embed-style inputs (search queries, titles, plain
  passages to index). Character n-grams need no tokenizer and no tower pass, so routing costs
  microseconds and cannot fail on any string;
* any other modality with several capabilities -> its documented default (`defaults`, e.g. audio ->
  audio.transcribe), else RoutingError asking for an explicit capability.

State: `save(dir)` writes router.json (table, defaults, classifier settings) + router.safetensors
(classifier weights) atomically; `Router.load(dir)` reads them back.
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .config import TowerConfig, adapter_name

__all__ = ["Router", "Route", "RoutingError", "HashedNgramClassifier", "default_auto_examples"]

FORMAT_VERSION = "1"


class RoutingError(ValueError):
    """A request cannot be routed; the message names the capability and the modality."""


@dataclass(frozen=True)
class Route:
    capability: str
    tower: str
    adapter: str
    modality: str


@dataclass
class HashedNgramClassifier:
    """Softmax regression over hashed features: char n-grams (n in `ngrams`) of the lowercased text with
    boundary spaces, plus word unigrams; counts -> log1p -> L2 normalised, (n_buckets,) per text.

    weight (C, n_buckets), bias (C,) over `classes`.
    """

    classes: list[str]
    n_buckets: int = 4096
    ngrams: tuple[int, ...] = (2, 3, 4)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, n_buckets) float32."""
        x = torch.zeros(len(texts), self.n_buckets)
        for i, text in enumerate(texts):
            s = " " + re.sub(r"\s+", " ", text.lower().strip()) + " "
            keys = [s[j:j + n] for n in self.ngrams for j in range(max(len(s) - n + 1, 0))]
            keys += ["w:" + w for w in re.findall(r"[a-z0-9']+", s)]
            keys += ["end:" + s.strip()[-1:]] if s.strip() else []
            for k in keys:
                x[i, zlib.crc32(k.encode()) % self.n_buckets] += 1.0
        return F.normalize(torch.log1p(x), dim=-1)

    def fit(self, texts: Sequence[str], labels: Sequence[str], steps: int = 300, lr: float = 0.5,
            l2: float = 1e-4, seed: int = 0) -> dict:
        """Full-batch Adam on cross-entropy + L2; deterministic for a given seed. Returns train accuracy."""
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise ValueError(f"labels {unknown} are not in classes {self.classes}")
        if len(texts) != len(labels) or not texts:
            raise ValueError(f"texts ({len(texts)}) and labels ({len(labels)}) must be non-empty and equal in length")
        g = torch.Generator().manual_seed(seed)
        x = self.features(texts)
        y = torch.tensor([self.classes.index(l) for l in labels])
        w = (torch.randn(len(self.classes), self.n_buckets, generator=g) * 0.01).requires_grad_()
        b = torch.zeros(len(self.classes), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w**2).sum()
            loss.backward()
            opt.step()
        self.weight, self.bias = w.detach(), b.detach()
        acc = float((self.logits(texts).argmax(-1) == y).float().mean())
        return {"train_accuracy": acc, "n_examples": len(texts), "final_loss": float(loss.detach())}

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        if self.weight is None:
            raise RoutingError("the text 'auto' classifier is not trained (call Router.fit_text_auto)")
        return self.features(texts) @ self.weight.T + self.bias  # (B, C)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.classes[i] for i in self.logits(texts).argmax(-1).tolist()]


class Router:
    """Capability table + "auto" rules. Build with `Router.from_towers([TowerConfig, ...])`."""

    def __init__(self, routes: Iterable[Route], defaults: dict[str, str] | None = None,
                 text_classifier: HashedNgramClassifier | None = None):
        self.routes: dict[str, Route] = {}
        for r in routes:
            if r.capability in self.routes:
                raise ValueError(f"capability {r.capability!r} is served by two towers")
            self.routes[r.capability] = r
        self.defaults = dict(defaults or {})
        for modality, cap in self.defaults.items():
            if cap not in self.routes or self.routes[cap].modality != modality:
                raise ValueError(f"defaults: {modality!r} -> {cap!r} is not a {modality} capability of this router")
        self.text_classifier = text_classifier

    @classmethod
    def from_towers(cls, towers: Iterable[TowerConfig], defaults: dict[str, str] | None = None) -> "Router":
        routes = [Route(cap, cfg.name, adapter_name(cap), cfg.modality)
                  for cfg in towers for cap in cfg.capabilities]
        if defaults is None:
            caps = {r.capability for r in routes}
            defaults = {"audio": "audio.transcribe"} if "audio.transcribe" in caps else {}
        return cls(routes, defaults)

    def capabilities(self, modality: str | None = None) -> list[str]:
        return sorted(c for c, r in self.routes.items() if modality is None or r.modality == modality)

    def fit_text_auto(self, examples: Sequence[tuple[str, str]] | None = None, **fit_kwargs) -> dict:
        """Train the text "auto" classifier on (text, capability) pairs (default: `default_auto_examples`)."""
        text_caps = self.capabilities("text")
        if len(text_caps) < 2:
            raise RoutingError(f"fit_text_auto: the router has {len(text_caps)} text capability; nothing to choose")
        examples = list(examples) if examples is not None else default_auto_examples()
        examples = [(t, c) for t, c in examples if c in text_caps]
        self.text_classifier = HashedNgramClassifier(classes=text_caps)
        return self.text_classifier.fit([t for t, _ in examples], [c for _, c in examples], **fit_kwargs)

    def route(self, modality: str, capability: str = "auto", text: str | None = None) -> Route:
        """Where a request goes. `text` is needed for capability="auto" on text inputs."""
        modalities = sorted({r.modality for r in self.routes.values()})
        if modality not in modalities:
            raise RoutingError(f"capability {capability!r}: no tower takes {modality!r} inputs; "
                               f"modalities served: {modalities}")
        if capability != "auto":
            r = self.routes.get(capability)
            if r is None:
                raise RoutingError(f"unknown capability {capability!r} for a {modality} input; "
                                   f"{modality} capabilities: {self.capabilities(modality)}")
            if r.modality != modality:
                raise RoutingError(f"capability {capability!r} runs on the {r.modality} tower {r.tower!r} but the "
                                   f"input is {modality}; {modality} capabilities: {self.capabilities(modality)}")
            return r
        caps = self.capabilities(modality)
        if len(caps) == 1:
            return self.routes[caps[0]]
        if modality == "text" and self.text_classifier is not None:
            if text is None:
                raise RoutingError("capability 'auto' for a text input needs the text to classify")
            return self.routes[self.text_classifier.predict([text])[0]]
        if modality in self.defaults:
            return self.routes[self.defaults[modality]]
        raise RoutingError(f"capability 'auto' is ambiguous for a {modality} input: pass one of {caps}")

    # -- persistence ---------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from nexus_assets.core.atomic import atomic_dir

        meta = {"format_version": FORMAT_VERSION,
                "routes": [r.__dict__ for r in self.routes.values()],
                "defaults": self.defaults,
                "text_classifier": None}
        tensors = {}
        c = self.text_classifier
        if c is not None and c.weight is not None:
            meta["text_classifier"] = {"kind": "hashed_char_ngram_logreg", "classes": c.classes,
                                       "n_buckets": c.n_buckets, "ngrams": list(c.ngrams)}
            tensors = {"text_classifier.weight": c.weight.contiguous(), "text_classifier.bias": c.bias.contiguous()}
        with atomic_dir(directory) as tmp:
            (tmp / "router.json").write_text(json.dumps(meta, indent=2))
            if tensors:
                save_file(tensors, str(tmp / "router.safetensors"))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Router":
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / "router.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}/router.json: format_version {meta.get('format_version')!r}, "
                             f"expected {FORMAT_VERSION!r}")
        clf = None
        if meta["text_classifier"]:
            m = meta["text_classifier"]
            t = load_file(str(directory / "router.safetensors"))
            clf = HashedNgramClassifier(m["classes"], m["n_buckets"], tuple(m["ngrams"]),
                                        t["text_classifier.weight"], t["text_classifier.bias"])
        return cls([Route(**r) for r in meta["routes"]], meta["defaults"], clf)


# ----------------------------------------------------------------------------------------------------
# Training examples for the text "auto" classifier
# ----------------------------------------------------------------------------------------------------

_TOPICS = [
    "the ocean", "black holes", "a lost cat", "machine learning", "the french revolution", "coffee",
    "climate change", "a haunted house", "quantum computers", "the roman empire", "photosynthesis",
    "a dragon", "tax returns", "the stock market", "volcanoes", "a robot chef", "friendship", "jazz music",
    "the moon landing", "python decorators", "sourdough bread", "the immune system", "chess openings",
    "a time traveller", "electric cars", "honey bees", "medieval castles", "the internet", "winter",
    "unix pipes", "a rainy afternoon", "dinosaurs", "solar panels", "a pirate ship", "gardening",
]
_GENERATE = [
    "Write a short story about {t}.", "Write a poem about {t}", "Explain how {t} works.",
    "Can you tell me about {t}?", "What is {t}?", "Why does {t} matter?", "Continue the story: {t} was",
    "Once upon a time, {t}", "Tell me a joke about {t}.", "Describe {t} to a child.",
    "Give me three facts about {t}.", "Write an essay on {t}.", "How do I learn about {t}?",
    "Summarize the history of {t} in a paragraph.", "Please write a letter about {t}.",
    "Complete this sentence: {t} is", "Imagine {t} and describe what happens next.",
    "Generate a dialogue about {t}.", "What would happen if {t} disappeared?", "Draft a tweet about {t}",
]
_EMBED = [
    "{t}", "{t} overview", "{t} documentation", "introduction to {t}", "{t} pdf", "{t} wiki",
    "best books on {t}", "{t} definition", "{t} history timeline", "notes on {t}",
    "Chapter 3: {t} and its consequences", "{t}, a survey (2019)", "{t} - reference manual",
    "The article discusses {t} in detail.", "Research on {t} has grown steadily over the last decade.",
    "{t} facts figures statistics", "similar documents to {t}", "{t} faq", "{t} tutorial beginner",
    "Report: the committee reviewed {t} and found no issues.",
]


def default_auto_examples() -> list[tuple[str, str]]:
    """(text, capability) pairs from templates x topics: instructions / questions / story openings ->
    text.generate; queries, titles and declarative passages -> text.embed."""
    out = []
    for i, topic in enumerate(_TOPICS):
        for j, tpl in enumerate(_GENERATE):
            if (i + j) % 3 == 0:
                out.append((tpl.format(t=topic), "text.generate"))
        for j, tpl in enumerate(_EMBED):
            if (i + j) % 3 == 0:
                text = tpl.format(t=topic)
                out.append((text[0].upper() + text[1:] if j % 2 else text, "text.embed"))
    return out
