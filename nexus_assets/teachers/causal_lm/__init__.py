"""Causal-LM teachers (SmolLM2 and any transformers decoder-only model).

GGUF weights de-quantize slowly (~26 s for SmolLM2), so `convert` does it once at snapshot time into
plain safetensors + config + tokenizer under `<snapshot>/hf`; every later load takes seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nexus_assets.core.quantized_scores import component_scale, quantize_scores
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


def _pad_right(tokenizer) -> None:
    """Right padding (lm_outputs and the streamed path assume it); EOS pads when no pad token exists."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def _tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


class CausalLMTeacher:
    def __init__(self, spec: TeacherSpec, folder: Path, device: str, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nexus_assets.core.precision import DTYPES

        self.spec, self.device, self.dtype = spec, device, dtype
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).to(device).eval()
        except Exception as e:
            raise TeacherLoadError(f"teacher {spec.name!r}: cannot load weights from {folder}: {e}") from e
        _pad_right(self.tokenizer)
        self.state_basis: dict | None = None  # set by the feature pass (fit_state_basis) when state_layers are cached

    def layer_names(self) -> list[str]:
        return [f"layers.{i}" for i in range(self.model.config.num_hidden_layers + 1)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return _tokenize(self.tokenizer, texts, self.spec.extraction.max_length)

    @torch.inference_mode()
    def forward(self, rows: list[dict]) -> TeacherOutputs:
        enc = self.tokenize([r["text"] for r in rows])
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return lm_outputs(out.logits, out.hidden_states, ids, mask, self.spec, self.state_basis)

    @torch.inference_mode()
    def token_states(self, texts: list[str], layers: list[str]) -> dict[str, torch.Tensor]:
        """{layer: (tokens, H) float32} hidden states of every token after the first (see fit_state_basis)."""
        enc = self.tokenize(texts)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        hs = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        keep = mask.bool().clone()
        keep[:, 0] = False
        return {name: hs[int(name.split(".")[1])][keep].float().cpu() for name in layers}


    def prompt_prefixes(self, texts: list[str], prompt_tokens: int) -> list[str]:
        """The first `prompt_tokens` tokens of each text, decoded back to text (whole texts if shorter)."""
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=prompt_tokens)["input_ids"]
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    @torch.inference_mode()
    def write_continuations(self, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
                            seed: int) -> list[str]:
        """Each prompt followed by the teacher's sampled continuation, decoded as one text (so word
        boundaries between prompt and continuation survive any tokenizer). One batch, left-padded for
        generation; deterministic for a given seed (re-seeded per call)."""
        torch.manual_seed(seed)
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = "right"
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                  top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

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


def lm_outputs(logits, hidden_states, ids, mask, spec: TeacherSpec, state_basis: dict | None = None) -> TeacherOutputs:
    """Pack one LM forward into feature columns.

    logits (B,T,V); hidden_states tuple of (B,T,H); ids, mask (B,T). Token row t holds ids[t] and the logits
    AT t, which predict token t+1 (so `next_logprob` is log p(ids[t+1])). Padding must be on the right.
    state_basis: {layer: {"mean" (H,), "components" (r, H), ...}} (fit_state_basis) -> a "state.<layer>" column of PCA
    scores per token (at `extraction.state_bits` < 16: uint8 codes and a "state_scale.<layer>" column); position 0 (the attention sink: states orders of magnitude larger than the rest, which
    float16 cannot hold and no loss scores) is stored as zeros.
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
    nxt = torch.full_like(ids, -1)  # the true next token of each position (or -1 past the end)
    nxt[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    nxt = nxt.reshape(-1)[flat]
    lse = torch.logsumexp(lg, dim=-1)
    target = lg.gather(1, nxt.clamp_min(0)[:, None])[:, 0]
    tokens = {
        "item_index": b_idx.cpu().numpy().astype(np.int32),
        "position": t_idx.cpu().numpy().astype(np.int32),
        "token_id": ids.reshape(-1)[flat].cpu().numpy().astype(np.int32),
        "topk_ids": top.indices.cpu().numpy().astype(np.int32),
        "topk_logits": top.values.cpu().numpy().astype(np.float32),
        "logsumexp": lse.cpu().numpy().astype(np.float32),
        # teacher log-prob of the TRUE next token: exact perplexity on held-out text without the teacher
        "next_logprob": torch.where(nxt >= 0, target - lse, 0.0).cpu().numpy().astype(np.float32),
        "has_next": (nxt >= 0).cpu().numpy(),
    }
    for name in ex.token_layers:
        h = hidden_states[int(name.split(".")[1])].float().reshape(-1, hidden_states[0].shape[-1])[flat]
        tokens[f"hidden.{name}"] = h.cpu().numpy().astype(np.float32)
    for name, b in (state_basis or {}).items():
        h = hidden_states[int(name.split(".")[1])].float().reshape(-1, hidden_states[0].shape[-1])[flat]
        scores = (h.cpu() - b["mean"]) @ b["components"].T
        scores[torch.from_numpy(tokens["position"] == 0)] = 0.0
        if ex.state_bits == 16:
            tokens[f"state.{name}"] = scores.numpy().astype(np.float32)
        else:  # codes + their block scales; the feature store's readers decode them with the same basis
            codes, scales = quantize_scores(scores.numpy(), component_scale(b["variances"]), ex.state_bits)
            tokens[f"state.{name}"], tokens[f"state_scale.{name}"] = codes, scales
    return TeacherOutputs(items=items, tokens=tokens)


def fit_state_basis(teacher, texts: list[str], layers: list[str], rank: int, batch_size: int = 16
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {"mean" (H,), "components" (rank, H) top principal directions as rows, "variances" (rank,),
    "total_variance" ()}} of the teacher's per-token states over `texts` (every token but each row's first),
    float64 covariance. The basis the cached state scores live in; fitted once per cache entry."""
    n, sums, outer = 0, {}, {}
    for i in range(0, len(texts), batch_size):
        for name, h in teacher.token_states(texts[i:i + batch_size], layers).items():
            h = h.double()
            sums[name] = sums.get(name, 0) + h.sum(0)
            outer[name] = outer.get(name, 0) + h.T @ h
            if name == layers[0]:
                n += h.shape[0]
    if n < 2:
        raise ValueError(f"fit_state_basis: {len(texts)} texts give {n} tokens after the first; need >= 2")
    basis = {}
    for name in layers:
        mean = sums[name] / n
        cov = (outer[name] - n * torch.outer(mean, mean)) / (n - 1)
        var, vec = torch.linalg.eigh(cov)  # ascending
        k = min(rank, var.numel())
        basis[name] = {"mean": mean.float(), "components": vec[:, -k:].flip(1).T.contiguous().float(),
                       "variances": var[-k:].flip(0).clamp_min(0).float(),
                       "total_variance": var.clamp_min(0).sum().float()}
    return basis


class StreamedCausalLMTeacher:
    """Same features as CausalLMTeacher, computed one decoder block at a time from the safetensors shards,
    for teachers whose weights exceed the memory budget (core/layer_streaming.py). Each forward call runs a
    whole feature chunk, so every block is read once per chunk rather than once per batch."""

    streamed = True

    def __init__(self, spec: TeacherSpec, folder: Path, memory_budget_bytes: int, dtype: str = "float32"):
        from transformers import AutoConfig, AutoTokenizer

        self.spec, self.folder, self.budget, self.dtype = spec, folder, memory_budget_bytes, dtype
        try:
            self.config = AutoConfig.from_pretrained(folder)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise TeacherLoadError(f"teacher {spec.name!r}: cannot read config/tokenizer in {folder}: {e}") from e
        _pad_right(self.tokenizer)

    def layer_names(self) -> list[str]:
        return [f"layers.{i}" for i in range(self.config.num_hidden_layers + 1)]

    def num_parameters(self) -> int:
        from nexus_assets.teachers.causal_lm.layer_streaming import weights_bytes

        return weights_bytes(self.folder) // 4  # fp32 checkpoints; an estimate for other dtypes

    def forward(self, rows: list[dict]) -> TeacherOutputs:
        from nexus_assets.core.precision import DTYPES
        from nexus_assets.teachers.causal_lm.layer_streaming import stream_causal_lm

        ex = self.spec.extraction
        enc = _tokenize(self.tokenizer, [r["text"] for r in rows], ex.max_length)
        out = stream_causal_lm(
            self.folder, enc["input_ids"], enc["attention_mask"],
            layers=[int(n.split(".")[1]) for n in ex.layers], token_layers=[int(n.split(".")[1]) for n in ex.token_layers],
            top_k=ex.top_k, memory_cap_bytes=self.budget // 4, dtype=DTYPES[self.dtype],
        )
        rename = lambda d: {(f"hidden.layers.{k.split('.')[1]}" if k.startswith("hidden.") else k): v for k, v in d.items()}
        return TeacherOutputs(items=rename(out["items"]), tokens=rename(out["tokens"]))


def load(spec: TeacherSpec, snapshot_dir: Path, device: str = "cpu", memory_budget_bytes: int | None = None,
         dtype: str = "float32"):
    """The in-memory teacher, or the layer-streamed one when the weights exceed the budget (or the registry
    says `stream_layers: always`), computing in `dtype` ("float32" | "bfloat16"; logits and cached features
    are upcast to float32 either way)."""
    from nexus_assets.teachers.causal_lm.layer_streaming import should_stream, weights_bytes

    folder = model_dir(snapshot_dir)
    mode = spec.extraction.stream_layers
    if mode != "never" and device == "cpu":
        budget = memory_budget_bytes or 2**62
        if should_stream(weights_bytes(folder), budget, mode):
            return StreamedCausalLMTeacher(spec, folder, budget, dtype)
    return CausalLMTeacher(spec, folder, device, dtype)
