"""Causal-LM teachers (SmolLM2 and any transformers decoder-only model).

GGUF weights de-quantize slowly (~26 s for SmolLM2), so `convert` does it once at snapshot time into
plain safetensors + config + tokenizer under `<snapshot>/hf`; every later load takes seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.base import ConvertResult, TeacherLoadError, TeacherOutputs, pool_mean

HF_SUBDIR = "hf"


def convert(spec: TeacherSpec, snapshot_dir: Path) -> ConvertResult:
    """GGUF -> safetensors once; hub/path snapshots already in safetensors need nothing."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ggufs = sorted(snapshot_dir.glob("*.gguf"))
    if not ggufs:
        return ConvertResult(info={"converted": False})
    gguf = ggufs[0]
    try:
        tok = AutoTokenizer.from_pretrained(snapshot_dir, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(snapshot_dir, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the message must name the teacher and file, the cause stays chained
        raise TeacherLoadError(f"teacher {spec.name!r}: cannot read GGUF file {gguf}: {e}") from e
    out = snapshot_dir / HF_SUBDIR
    out.mkdir(exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with embed_tokens; safetensors refuses aliases
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    files = sorted(str(p.relative_to(snapshot_dir)) for p in out.iterdir())
    return ConvertResult(files=files, info={"converted": True, "from": gguf.name, "tensors": len(state)})


def model_dir(snapshot_dir: Path) -> Path:
    hf = snapshot_dir / HF_SUBDIR
    return hf if (hf / "config.json").exists() else snapshot_dir


class CausalLMTeacher:
    def __init__(self, spec: TeacherSpec, folder: Path, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec, self.device = spec, device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        except Exception as e:
            raise TeacherLoadError(f"teacher {spec.name!r}: cannot load weights from {folder}: {e}") from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"

    def layer_names(self) -> list[str]:
        return [f"layers.{i}" for i in range(self.model.config.num_hidden_layers + 1)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=self.spec.extraction.max_length
        )

    @torch.inference_mode()
    def forward(self, rows: list[dict]) -> TeacherOutputs:
        enc = self.tokenize([r["text"] for r in rows])
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return lm_outputs(out.logits, out.hidden_states, ids, mask, self.spec)


    def layer_module(self, name: str):
        """hidden_states[i] is block i-1's output (i >= 1); the last index is after the final norm."""
        i = int(name.split(".")[1])
        if i == 0:
            return self.model.model.embed_tokens
        if i == self.model.config.num_hidden_layers:
            return self.model.model.norm
        return self.model.model.layers[i - 1]

    def importance_spec(self, capability: str, rows: list[dict]):
        """Objective: summed log-probability of the teacher's own greedy next tokens (its behaviour)."""
        from nexus_assets.teachers.base import ImportanceSpec

        bs = self.spec.extraction.batch_size
        batches = []
        for i in range(0, len(rows), bs):
            enc = self.tokenize([r["text"] for r in rows[i:i + bs]])
            batches.append({"input_ids": enc["input_ids"].to(self.device),
                            "attention_mask": enc["attention_mask"].to(self.device)})
        masks = iter([b["attention_mask"] for b in batches] * len(self.spec.extraction.layers))

        def objective(out):
            mask = next(masks).bool()
            logp = torch.log_softmax(out.logits.float(), -1)
            return (logp.max(-1).values * mask).sum()

        layers = {n: self.layer_module(n) for n in self.spec.extraction.layers}
        return ImportanceSpec(self.model, layers, batches, objective)


def lm_outputs(logits, hidden_states, ids, mask, spec: TeacherSpec) -> TeacherOutputs:
    """Pack one LM forward into feature columns.

    logits (B,T,V); hidden_states tuple of (B,T,H); ids, mask (B,T). Position t's logits predict token t+1.
    """
    ex = spec.extraction
    mask_np = mask.cpu().numpy().astype(bool)
    items = {}
    for name in ex.layers:
        h = hidden_states[int(name.split(".")[1])].float().cpu().numpy()
        items[f"hidden.{name}"] = pool_mean(h, mask_np).astype(np.float32)
    flat = mask.reshape(-1).bool()
    lg = logits.float().reshape(-1, logits.shape[-1])[flat]  # (N, V)
    top = torch.topk(lg, k=min(ex.top_k, lg.shape[-1]), dim=-1)
    b_idx, t_idx = torch.nonzero(mask.bool(), as_tuple=True)
    tokens = {
        "item_index": b_idx.cpu().numpy().astype(np.int32),
        "position": t_idx.cpu().numpy().astype(np.int32),
        "token_id": ids.reshape(-1)[flat].cpu().numpy().astype(np.int32),
        "topk_ids": top.indices.cpu().numpy().astype(np.int32),
        "topk_logits": top.values.cpu().numpy().astype(np.float32),
        "logsumexp": torch.logsumexp(lg, dim=-1).cpu().numpy().astype(np.float32),
    }
    for name in ex.token_layers:
        h = hidden_states[int(name.split(".")[1])].float().reshape(-1, hidden_states[0].shape[-1])[flat]
        tokens[f"hidden.{name}"] = h.cpu().numpy().astype(np.float32)
    return TeacherOutputs(items=items, tokens=tokens)


def load(spec: TeacherSpec, snapshot_dir: Path, device: str = "cpu") -> CausalLMTeacher:
    return CausalLMTeacher(spec, model_dir(snapshot_dir), device)
