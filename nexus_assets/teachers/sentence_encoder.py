"""Sentence-embedding teachers (all-MiniLM-L6-v2 and other BERT-style encoders).

The sentence embedding is the attention-masked mean of the last hidden state, L2-normalised, exactly as
sentence-transformers computes it for this model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.base import ConvertResult, TeacherLoadError, TeacherOutputs, pool_mean


def convert(spec: TeacherSpec, snapshot_dir: Path) -> ConvertResult:
    return ConvertResult(info={"converted": False})


class SentenceEncoderTeacher:
    def __init__(self, spec: TeacherSpec, folder: Path, device: str):
        from transformers import AutoModel, AutoTokenizer

        self.spec, self.device = spec, device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        except Exception as e:
            raise TeacherLoadError(f"teacher {spec.name!r}: cannot load weights from {folder}: {e}") from e

    def layer_names(self) -> list[str]:
        return [f"layers.{i}" for i in range(self.model.config.num_hidden_layers + 1)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.inference_mode()
    def forward(self, rows: list[dict]) -> TeacherOutputs:
        enc = self.tokenizer(
            [r["text"] for r in rows], return_tensors="pt", padding=True, truncation=True,
            max_length=self.spec.extraction.max_length,
        ).to(self.device)
        out = self.model(**enc, output_hidden_states=True)
        mask = enc["attention_mask"].cpu().numpy()
        emb = pool_mean(out.last_hidden_state.float().cpu().numpy(), mask)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
        items = {"embedding": emb.astype(np.float32)}
        for name in self.spec.extraction.layers:
            h = out.hidden_states[int(name.split(".")[1])].float().cpu().numpy()
            items[f"hidden.{name}"] = pool_mean(h, mask).astype(np.float32)
        return TeacherOutputs(items=items)


    def importance_spec(self, capability: str, rows: list[dict]):
        """Objective: each sentence embedding's projection on its own (detached) direction, i.e. how much
        a neuron carries of the embedding the student must reproduce."""
        from nexus_assets.teachers.base import ImportanceSpec

        bs = self.spec.extraction.batch_size
        batches = [dict(self.tokenizer([r["text"] for r in rows[i:i + bs]], return_tensors="pt", padding=True,
                                       truncation=True, max_length=self.spec.extraction.max_length).to(self.device))
                   for i in range(0, len(rows), bs)]
        masks = iter([b["attention_mask"] for b in batches] * len(self.spec.extraction.layers))

        def objective(out):
            m = next(masks)[..., None].float()
            emb = (out.last_hidden_state * m).sum(1) / m.sum(1)
            return (emb * torch.nn.functional.normalize(emb.detach(), dim=-1)).sum()

        def layer_module(name):
            i = int(name.split(".")[1])
            return self.model.embeddings if i == 0 else self.model.encoder.layer[i - 1]

        layers = {n: layer_module(n) for n in self.spec.extraction.layers}
        return ImportanceSpec(self.model, layers, batches, objective)


def load(spec: TeacherSpec, snapshot_dir: Path, device: str = "cpu") -> SentenceEncoderTeacher:
    return SentenceEncoderTeacher(spec, snapshot_dir, device)
