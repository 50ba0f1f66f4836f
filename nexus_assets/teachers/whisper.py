"""Whisper (tiny.en) speech-recognition teacher, shipped as a CTranslate2 `model.bin`.

CTranslate2 runs the model but exposes no logits or hidden states, so `convert()` rebuilds it once per
snapshot as a `transformers.WhisperForConditionalGeneration` in `<snapshot>/hf/`, and `load()` runs that.
The `model.bin` layout is documented in /work/shared/teachers.md and in `read_ct2_model` below.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutput

from nexus_assets.core.atomic import atomic_dir
from nexus_assets.core.registry import TeacherSpec
from nexus_assets.teachers.audio_io import SAMPLE_RATE, rows_to_audio
from nexus_assets.teachers.base import ConvertResult, TeacherLoadError, TeacherOutputs, pool_mean

HF_DIR = "hf"
SAMPLES_PER_ENCODER_FRAME = 320  # hop 160 samples per mel frame, then conv2 has stride 2
PROMPT_TOKENS = ("<|startoftranscript|>", "<|notimestamps|>")
END_TOKEN = "<|endoftext|>"

# ---------------------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader
# ---------------------------------------------------------------------------------------------------------

CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


@dataclass
class Ct2Model:
    """The contents of a CTranslate2 `model.bin`: named arrays plus aliases (e.g. tied embeddings)."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables


class _Reader:
    """Little-endian cursor over the file bytes that names the file and offset when it runs out."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(
                f"{self.path}: truncated CTranslate2 model.bin: need {n} bytes for {what} at offset "
                f"{self.pos}, file has {len(self.data)}"
            )
        out = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", what)
        return bytes(self.take(n, what)).rstrip(b"\0").decode("utf-8")


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 `model.bin` (format version 6) into numpy arrays.

    Layout: u32 version; string spec name; u32 revision; u32 count; per variable: string name, u8 rank,
    rank x u32 dims, u8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), u32 nbytes, raw data; then
    u32 alias count and (alias, target) string pairs. A string is u16 length (incl. trailing NUL) + bytes.
    bf16 is widened to float32 (numpy has no bfloat16); other dtypes are kept. Raises ValueError naming
    the file on truncation, unknown dtypes or inconsistent sizes.
    """
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    version = r.unpack("I", "version")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 model.bin version {version} is not supported (reader knows 6)")
    spec = r.string("spec name")
    revision = r.unpack("I", "revision")
    variables: dict[str, np.ndarray] = {}
    for i in range(r.unpack("I", "variable count")):
        name = r.string(f"name of variable #{i}")
        dims = [r.unpack("I", f"{name} dims") for _ in range(r.unpack("B", f"{name} rank"))]
        code = r.unpack("B", f"{name} dtype")
        if code not in CT2_DTYPES:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype code {code}")
        nbytes = r.unpack("I", f"{name} size")
        raw = r.take(nbytes, f"{name} data")
        itemsize = 2 if CT2_DTYPES[code] == "bfloat16" else np.dtype(CT2_DTYPES[code]).itemsize
        if nbytes != math.prod(dims) * itemsize:
            raise ValueError(f"{path}: variable {name!r} holds {nbytes} bytes, shape {dims} needs "
                             f"{math.prod(dims) * itemsize}")
        if CT2_DTYPES[code] == "bfloat16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(CT2_DTYPES[code]).newbyteorder("<"))
        variables[name] = arr.reshape(dims)
    aliases = {}
    for _ in range(r.unpack("I", "alias count")):
        alias = r.string("alias name")
        aliases[alias] = r.string(f"target of alias {alias!r}")
    missing = sorted(t for t in aliases.values() if t not in variables)
    if missing:
        raise ValueError(f"{path}: aliases point at missing variables {missing}")
    if r.pos != len(r.data):
        raise ValueError(f"{path}: {len(r.data) - r.pos} unexpected trailing bytes after the aliases")
    return Ct2Model(version, spec, revision, variables, aliases)


# ---------------------------------------------------------------------------------------------------------
# CTranslate2 Whisper -> transformers
# ---------------------------------------------------------------------------------------------------------


def _num_layers(m: Ct2Model, side: str) -> int:
    return len({n.split("/")[1] for n in m.variables if n.startswith(f"{side}/layer_") and n.count("/") > 2})


def whisper_config(m: Ct2Model, special: dict[str, int]) -> WhisperConfig:
    """Read the architecture off the tensor shapes, so any Whisper size converts, not only tiny.en."""
    vocab, d_model = m["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=m["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_num_layers(m, "encoder"),
        decoder_layers=_num_layers(m, "decoder"),
        encoder_attention_heads=int(m["encoder/num_heads"]),
        decoder_attention_heads=int(m["decoder/num_heads"]),
        encoder_ffn_dim=m["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=m["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=m["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=m["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=special[PROMPT_TOKENS[0]],
        bos_token_id=special[END_TOKEN],
        eos_token_id=special[END_TOKEN],
        pad_token_id=special[END_TOKEN],
        tie_word_embeddings=True,
    )


def whisper_state_dict(m: Ct2Model, cfg: WhisperConfig) -> dict[str, torch.Tensor]:
    """Map CTranslate2 names to transformers names, splitting the fused projections.

    Self-attention `linear_0` is fused q,k,v (3*d, d); decoder cross-attention `linear_0` is q and
    `linear_1` fused k,v (2*d, d). Whisper's k projections have no bias; CTranslate2 stores zeros there.
    Raises ValueError if a weight tensor is left unused (a mapping gap would otherwise load random weights).
    """
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        used.add(m.aliases.get(name, name))
        return torch.from_numpy(np.array(m[name], dtype=np.float32))

    sd: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/weight"), get(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/gamma"), get(f"{src}/beta")

    def fused(dst: str, src: str, names: list[str]) -> None:
        ws, bs = get(f"{src}/weight").chunk(len(names)), get(f"{src}/bias").chunk(len(names))
        for n, w, b in zip(names, ws, bs):
            sd[f"{dst}.{n}_proj.weight"] = w
            if n == "k":
                if b.abs().max() > 0:
                    raise ValueError(f"{src}: Whisper k projection has a non-zero bias; cannot convert")
            else:
                sd[f"{dst}.{n}_proj.bias"] = b

    for side, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        hf = f"model.{side}"
        sd[f"{hf}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"{hf}.layer_norm", f"{side}/layer_norm")
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            fused(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ["q", "k", "v"])
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                fused(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ["k", "v"])
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    proj = "decoder/projection/weight"
    if proj in m and not torch.equal(get(proj), sd["model.decoder.embed_tokens.weight"]):
        raise ValueError(f"{proj} differs from the token embeddings; untied Whisper heads are not supported")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    unused = sorted(n for n, a in m.variables.items() if a.ndim > 0 and n not in used)
    if unused:
        raise ValueError(f"model.bin variables not mapped to transformers: {unused}")
    return sd


def convert(spec: TeacherSpec, snapshot_dir: Path) -> ConvertResult:
    """`<snapshot>/model.bin` + `tokenizer.json` -> `<snapshot>/hf/` (safetensors, config, tokenizer,
    feature extractor), written atomically so a killed conversion leaves no half-built folder."""
    snapshot_dir = Path(snapshot_dir)
    model_bin, tok_json = snapshot_dir / "model.bin", snapshot_dir / "tokenizer.json"
    for f in (model_bin, tok_json):
        if not f.is_file():
            raise TeacherLoadError(f"teacher {spec.name!r}: missing snapshot file {f}")
    try:
        ct2 = read_ct2_model(model_bin)
        tokenizer = WhisperTokenizerFast(tokenizer_file=str(tok_json))
        special = {t: tokenizer.convert_tokens_to_ids(t) for t in (*PROMPT_TOKENS, END_TOKEN)}
        cfg = whisper_config(ct2, special)
        state = whisper_state_dict(ct2, cfg)
        model = WhisperForConditionalGeneration(cfg)
        model.load_state_dict(state, strict=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise TeacherLoadError(f"teacher {spec.name!r}: cannot convert {model_bin}: {e}") from e
    model.generation_config.forced_decoder_ids = None
    with atomic_dir(snapshot_dir / HF_DIR) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=SAMPLE_RATE).save_pretrained(tmp)
    files = sorted(str(p.relative_to(snapshot_dir)) for p in (snapshot_dir / HF_DIR).rglob("*") if p.is_file())
    info = {
        "converted": True,
        "source": "model.bin",
        "ct2_version": ct2.version,
        "ct2_spec": ct2.spec,
        "ct2_revision": ct2.revision,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "special_tokens": special,
        **{k: getattr(cfg, k) for k in ("d_model", "encoder_layers", "decoder_layers", "vocab_size", "num_mel_bins")},
    }
    return ConvertResult(files=files, info=info)


# ---------------------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------------------


class WhisperTeacher:
    """Greedy-decodes each clip, then re-runs the decoder teacher-forced on its own transcript for logits."""

    def __init__(self, spec: TeacherSpec, model: WhisperForConditionalGeneration, tokenizer, features, device: str,
                 dtype: str = "float32"):
        self.spec, self.model, self.tokenizer, self.features, self.device = spec, model, tokenizer, features, device
        self.dtype = dtype
        self.prompt = [tokenizer.convert_tokens_to_ids(t) for t in PROMPT_TOKENS]
        self.end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        bad = [n for n in spec.extraction.token_layers if not n.startswith("decoder.")]
        if bad:
            raise TeacherLoadError(f"teacher {spec.name!r}: token_layers {bad}: only decoder layers are per token")

    def layer_names(self) -> list[str]:
        c = self.model.config
        return [f"encoder.{i}" for i in range(c.encoder_layers + 1)] + [
            f"decoder.{i}" for i in range(c.decoder_layers + 1)
        ]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _greedy(self, enc: torch.Tensor) -> list[list[int]]:
        """enc (B, 1500, d) -> per item the generated ids, ending with the end token unless cut at max_length."""
        b = enc.shape[0]
        max_new = min(self.spec.extraction.max_length, self.model.config.max_target_positions - len(self.prompt))
        cur = torch.tensor([self.prompt] * b, device=self.device)  # (B, P)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        past, steps = None, []
        for _ in range(max_new):
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), decoder_input_ids=cur,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1).masked_fill(done, self.end_id)  # (B,)
            steps.append(nxt)
            done |= nxt == self.end_id
            if done.all():
                break
            cur = nxt[:, None]
        gen = torch.stack(steps, 1).tolist()  # (B, S)
        return [g[: g.index(self.end_id) + 1] if self.end_id in g else g for g in gen]

    @torch.inference_mode()
    def forward(self, rows: list[dict]) -> TeacherOutputs:
        """B probe rows -> items `transcript` [B], `hidden.<layer>` (B, d); tokens (N = all generated tokens).

        Encoder layers are mean-pooled over the frames that hold audio (one frame per 20 ms; Whisper pads
        every clip to 30 s and clips beyond it are cut). Decoder layers are mean-pooled over the states
        that predict the generated tokens, i.e. one state per row of `tokens`. Token rows: `position` is
        the index of `token_id` in the decoder input (prompt included, so the first is len(prompt)), and
        the logits are those at `position - 1`, which predict `token_id`.
        """
        ex = self.spec.extraction
        audio = rows_to_audio(rows)
        feats = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        enc = self.model.model.encoder(feats.to(self.device, self.model.model.encoder.dtype), output_hidden_states=True)
        enc.last_hidden_state = enc.last_hidden_state.float()  # the decoder always reads float32
        enc.hidden_states = tuple(h.float() for h in enc.hidden_states)
        n_frames = enc.last_hidden_state.shape[1]
        lengths = [min(n_frames, max(1, math.ceil(len(a) / SAMPLES_PER_ENCODER_FRAME))) for a in audio]
        enc_mask = np.arange(n_frames)[None] < np.array(lengths)[:, None]  # (B, 1500)

        gen = self._greedy(enc.last_hidden_state)
        p, width = len(self.prompt), max(len(g) for g in gen)
        seq = torch.tensor([self.prompt + g + [self.end_id] * (width - len(g)) for g in gen], device=self.device)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=enc.last_hidden_state),
                         decoder_input_ids=seq[:, :-1], output_hidden_states=True)
        # Right padding after the end token cannot reach earlier positions under the causal mask.
        pred_mask = torch.zeros(seq.shape[0], seq.shape[1] - 1, dtype=torch.bool)  # (B, L-1), states predicting
        for i, g in enumerate(gen):
            pred_mask[i, p - 1 : p - 1 + len(g)] = True

        items: dict = {"transcript": [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]}
        for name in ex.layers:
            side, idx = name.split(".")
            states = (enc.hidden_states if side == "encoder" else out.decoder_hidden_states)[int(idx)]
            mask = enc_mask if side == "encoder" else pred_mask.numpy()
            items[f"hidden.{name}"] = pool_mean(states.float().cpu().numpy(), mask).astype(np.float32)

        b_idx, t_idx = torch.nonzero(pred_mask, as_tuple=True)  # t_idx: predicting position
        logits = out.logits.float()[b_idx, t_idx]  # (N, V)
        top = torch.topk(logits, k=min(ex.top_k, logits.shape[-1]), dim=-1)
        tokens = {
            "item_index": b_idx.numpy().astype(np.int32),
            "position": (t_idx + 1).numpy().astype(np.int32),
            "token_id": seq[b_idx, t_idx + 1].cpu().numpy().astype(np.int32),
            "topk_ids": top.indices.cpu().numpy().astype(np.int32),
            "topk_logits": top.values.cpu().numpy().astype(np.float32),
            "logsumexp": torch.logsumexp(logits, dim=-1).cpu().numpy().astype(np.float32),
        }
        for name in ex.token_layers:
            h = out.decoder_hidden_states[int(name.split(".")[1])].float()[b_idx, t_idx]
            tokens[f"hidden.{name}"] = h.cpu().numpy().astype(np.float32)  # (N, d)
        return TeacherOutputs(items=items, tokens=tokens)


    def importance_spec(self, capability: str, rows: list[dict]):
        """Objective: summed log-probability of the teacher's own greedy transcript, teacher-forced."""
        from nexus_assets.teachers.base import ImportanceSpec

        batches = []
        for i in range(0, len(rows), 4):
            audio = rows_to_audio(rows[i:i + 4])
            feats = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features.to(self.device)
            with torch.inference_mode():
                gen = self._greedy(self.model.model.encoder(feats).last_hidden_state)
            width = max(len(g) for g in gen)
            seq = torch.tensor([self.prompt + g + [self.end_id] * (width - len(g)) for g in gen], device=self.device)
            mask = torch.zeros(seq.shape[0], seq.shape[1] - 1, dtype=torch.bool, device=self.device)
            for j, g in enumerate(gen):
                mask[j, len(self.prompt) - 1: len(self.prompt) - 1 + len(g)] = True
            batches.append({"input_features": feats, "decoder_input_ids": seq[:, :-1], "labels_": seq[:, 1:],
                            "mask_": mask})

        class _Forced(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_features, decoder_input_ids, labels_, mask_):
                logits = self.model(input_features=input_features, decoder_input_ids=decoder_input_ids).logits
                logp = torch.log_softmax(logits.float(), -1).gather(-1, labels_[..., None])[..., 0]
                return (logp * mask_).sum()

        def module(name):
            side, idx = name.split(".")
            stack = self.model.model.encoder if side == "encoder" else self.model.model.decoder
            i = int(idx)
            if i == 0:
                return stack.conv2 if side == "encoder" else stack.embed_tokens
            return stack.layer_norm if i == len(stack.layers) else stack.layers[i - 1]

        layers = {n: module(n) for n in self.spec.extraction.layers}
        return ImportanceSpec(_Forced(self.model), layers, batches, lambda total: total)


def load(spec: TeacherSpec, snapshot_dir: Path, device: str = "cpu", dtype: str = "float32") -> WhisperTeacher:
    """Load the converted model from `<snapshot>/hf/` only (eval); run `convert()` first. `dtype` "bfloat16"
    puts the encoder in bf16 (most of the cost: it reads 30 s windows) and keeps the decoder, which picks
    the transcript, in float32: measured on 24 flite clips, the same transcripts at 1.4x the clips/s, while an
    all-bf16 Whisper changed one (1.9x). Cached logits and states are float32 either way."""
    from nexus_assets.core.precision import DTYPES

    hf = Path(snapshot_dir) / HF_DIR
    weights = hf / "model.safetensors"
    for f in (hf / "config.json", weights, hf / "tokenizer.json", hf / "preprocessor_config.json"):
        if not f.is_file():
            raise TeacherLoadError(f"teacher {spec.name!r}: missing {f} (was convert() run on this snapshot?)")
    # Built from the config and loaded strictly: from_pretrained would fill missing weights with random ones.
    current = hf / "config.json"
    try:
        cfg = WhisperConfig.from_dict(json.loads(current.read_text()))
        model = WhisperForConditionalGeneration(cfg)
        current = weights
        state = load_file(weights)
        state.setdefault("proj_out.weight", state["model.decoder.embed_tokens.weight"])
        model.load_state_dict(state, strict=True)
        current = hf / "tokenizer.json"
        tokenizer = WhisperTokenizerFast.from_pretrained(hf)
        current = hf / "preprocessor_config.json"
        features = WhisperFeatureExtractor.from_pretrained(hf)
    except Exception as e:  # json, safetensors, torch and tokenizers each raise their own types
        raise TeacherLoadError(f"teacher {spec.name!r}: cannot load {current}: {type(e).__name__}: {e}") from e
    model.tie_weights()
    model = model.float().eval().requires_grad_(False).to(device)
    model.model.encoder.to(DTYPES[dtype])
    return WhisperTeacher(spec, model, tokenizer, features, device, dtype)
