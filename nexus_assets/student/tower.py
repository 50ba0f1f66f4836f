"""Student towers: one small backbone per modality, one head and one LoRA adapter per capability.

Model code only (torch, peft, safetensors; PIL and the stdlib `wave` lazily for input decoding): the
teacher-free runtime imports this module, so it must never import training code, Dagster, pyarrow or
any teacher package. The input transforms (`preprocess_image`, `decode_wav`, `log_mel`) live here for
the same reason: training and the runtime must feed the tower exactly the same tensors.

Shape of a tower::

    inputs ── stem ── + positions ── Block x depth ──┬── head[cap] ── out
                                                     └── anchor_proj[cap, layer] ── (B, Ht) per teacher layer

* text:   token embedding (SmolLM2 ids, vocab 49152) + learned positions, causal pre-norm transformer.
* vision: 4 stride-2 convs (RGB, image_size/16 squared patches) + learned positions, bidirectional
          pre-norm transformer. Inputs are downsampled from the probe's 224 px to `image_size` (112 by
          default) because the CPU budget is a few minutes per tower.
* audio:  2 stride-2 conv1d over 80-bin log-mel frames (10 ms hop, so one token per 40 ms), learned
          positions, bidirectional transformer encoder; the "asr" head adds a small autoregressive
          decoder cross-attending to it.

Every backbone block names its Linear layers `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`; those are
the LoRA targets (`LORA_TARGET_REGEX`), so the stems, heads and the ASR decoder never get adapters.
Adapter names are the capability with dots replaced (`text.generate` -> `text_generate`), since peft
and `nn.ModuleDict` keys cannot hold dots.

Why one backbone + per-capability adapters: phase (a) of training fits the shared backbone to every
teacher of the tower at once; phase (b) freezes it and gives each capability a low-rank correction of
its own, so specialising one capability cannot move another (the adapters are disjoint parameters).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .config import FORMAT_VERSION, LORA_TARGET_REGEX, HeadSpec, TowerConfig, _anchor_key, adapter_name
from .modules import _BACKBONES, ASRDecoder, LMHead, PooledHead, _pool

__all__ = ["StudentTower", "save_tower", "load_tower", "weight_files", "HeadSpec", "TowerConfig", "adapter_name"]


class StudentTower(nn.Module):
    """One modality's student: backbone, a head per capability, LoRA adapters, anchor projections.

    `forward(inputs, capability)` returns dict(
        out: the head output — "lm" (B, T, V) logits, "embedding" (B, D) unit vectors,
             "classes" (B, C) logits, "asr" (B, U, V) logits at the transcript positions (see below),
        hidden: (B, W) masked mean of the last backbone block,
        anchors: {teacher layer: (B, Ht)} the projected pooled student states anchored to that layer).

    Inputs by modality: text {input_ids (B, T), attention_mask (B, T)}; vision {pixels (B, 3, S, S)};
    audio {mels (B, F, n_mels), mel_mask (B, F)} and, for "asr", {dec_ids (B, P + U - 1), dec_mask}:
    the prompt then the transcript tokens but the last; `out` holds the logits of the last U positions,
    whose j-th predicts transcript token j (teacher forcing).
    """

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.init == "carved":
            from .carved import build_carved_backbone

            self.backbone: nn.Module = build_carved_backbone(cfg)
        else:
            self.backbone = _BACKBONES[cfg.modality](cfg)
        make_head = getattr(self.backbone, "make_head", None)  # carved backbones may bring their own heads
        layer_widths = getattr(self.backbone, "layer_widths", {})  # teacher layers a carved backbone kept
        heads = {}
        anchor_proj = {}
        for cap, spec in cfg.capabilities.items():
            own = make_head(cap, spec) if make_head is not None else None
            if own is not None:
                heads[adapter_name(cap)] = own
            elif spec.kind == "lm":
                heads[adapter_name(cap)] = LMHead(cfg.width, spec.out_dim, cfg.tie_lm_head)
            elif spec.kind == "asr":
                heads[adapter_name(cap)] = ASRDecoder(cfg, spec.out_dim)
            else:
                heads[adapter_name(cap)] = PooledHead(cfg.width, spec.out_dim, spec.kind == "embedding")
            for layer, ht in spec.anchor_layers.items():
                # a teacher layer the carved student kept is anchored directly (no projection when
                # the widths agree); any other layer through a learned projection of a relative-depth block
                w = layer_widths.get(layer, cfg.width)
                anchor_proj[_anchor_key(cap, layer)] = nn.Identity() if layer in layer_widths and w == ht \
                    else nn.Linear(w, ht)
        self.heads = nn.ModuleDict(heads)
        self.anchor_proj = nn.ModuleDict(anchor_proj)
        self.adapters: list[str] = []  # capabilities that have a LoRA adapter, in the order added
        self.capability: str | None = None

    # -- adapters ------------------------------------------------------------------------------------

    def base_backbone(self) -> nn.Module:
        """The backbone module itself (inside the PeftModel once adapters exist)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    def lora_config(self, capability: str):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.lora_rank[capability], lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=getattr(self.base_backbone(), "lora_target_regex", LORA_TARGET_REGEX),
                          init_lora_weights=True)

    def add_adapter(self, capability: str) -> None:
        """Add a fresh LoRA adapter (B = 0, so the output is unchanged) for `capability` and activate it."""
        self._check_cap(capability)
        if capability in self.adapters:
            raise ValueError(f"capability {capability!r} already has an adapter")
        name = adapter_name(capability)
        if not self.adapters:
            from peft import get_peft_model

            self.backbone = get_peft_model(self.backbone, self.lora_config(capability), adapter_name=name)
        else:
            self.backbone.add_adapter(name, self.lora_config(capability))
        self.adapters.append(capability)
        self.set_capability(capability)

    def load_adapter(self, capability: str, path: str | os.PathLike) -> None:
        """Load a stock-peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
        self._check_cap(capability)
        name = adapter_name(capability)
        if not self.adapters:
            from peft import PeftModel

            self.backbone = PeftModel.from_pretrained(self.backbone, str(path), adapter_name=name)
        else:
            self.backbone.load_adapter(str(path), adapter_name=name)
        self.adapters.append(capability)

    def set_capability(self, capability: str) -> None:
        """Activate `capability`'s adapter, or run the bare backbone if it has none."""
        self._check_cap(capability)
        if self.adapters:
            lora = self.backbone.base_model
            if capability in self.adapters:
                lora.enable_adapter_layers()
                self.backbone.set_adapter(adapter_name(capability))
            else:
                lora.disable_adapter_layers()
        self.capability = capability

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run the bare backbone inside the block (used to record phase-(a) outputs for LwF)."""
        if not self.adapters:
            yield
            return
        lora = self.backbone.base_model
        active = self.capability in self.adapters
        lora.disable_adapter_layers()
        try:
            yield
        finally:
            if active:
                lora.enable_adapter_layers()

    def lora_parameters(self, capability: str) -> list[nn.Parameter]:
        key = f".{adapter_name(capability)}."
        return [p for n, p in self.backbone.named_parameters() if "lora_" in n and key in n + "."]

    def head_parameters(self, capability: str) -> list[nn.Parameter]:
        """Head + anchor projections of one capability (the LM head's tied embedding is backbone's)."""
        params = list(self.heads[adapter_name(capability)].parameters())
        for layer in self.cfg.capabilities[capability].anchor_layers:
            params += list(self.anchor_proj[_anchor_key(capability, layer)].parameters())
        return params

    def merge_lone_adapter(self) -> bool:
        """A one-capability tower with its adapter folded into the backbone weights (peft merge_and_unload):
        the same outputs with no LoRA matmuls per layer at inference. Towers with several capabilities
        keep their adapters (each must stay switchable). Returns whether it merged."""
        if len(self.cfg.capabilities) != 1 or len(self.adapters) != 1:
            return False
        self.backbone = self.backbone.merge_and_unload()
        self.adapters = []
        self.capability = None
        return True

    def drop_anchor_projections(self) -> int:
        """Remove the anchor projections (used only by the anchoring loss in training; no output reads
        them): a runtime tower does not carry or run them. Returns the parameters removed."""
        n = sum(p.numel() for p in self.anchor_proj.parameters())
        self.anchor_proj = nn.ModuleDict()
        return n

    def _check_cap(self, capability: str) -> None:
        if capability not in self.cfg.capabilities:
            raise ValueError(f"tower {self.cfg.name!r} has no capability {capability!r}; "
                             f"it has {sorted(self.cfg.capabilities)}")

    # -- forward -------------------------------------------------------------------------------------

    def encode(self, inputs: Mapping[str, torch.Tensor], capabilities: Sequence[str] = ()):
        """Backbone pass with the currently active adapter: (per-block hiddens [(B, L, W)], mask (B, L)).
        When every one of `capabilities` is an early-exit head reading the same k blocks (`HeadSpec.exit_block`)
        and the backbone can stop (`exit_after`), only k blocks run: the pass those heads get at inference."""
        base = self.base_backbone()
        ks = {self.cfg.capabilities[c].exit_block for c in capabilities}
        k = ks.pop() if len(ks) == 1 else 0
        if not k or not hasattr(base, "exit_after"):
            return self.backbone(inputs)
        base.exit_after = k
        try:
            return self.backbone(inputs)
        finally:
            base.exit_after = None

    def head_forward(self, capability: str, enc, inputs: Mapping[str, torch.Tensor]) -> dict:
        """Run one capability's head on an `encode` result (so several heads share one backbone pass)."""
        spec = self.cfg.capabilities[capability]
        hiddens, mask = enc
        last = self.head_input(capability, hiddens)  # (B, L, W)
        head = self.heads[adapter_name(capability)]
        dec_hidden = None
        if spec.kind == "lm":
            base = self.base_backbone()
            emb = base.lm_weight() if hasattr(base, "lm_weight") else base.tok_emb.weight
            out = head(last, emb)  # (B, T, V)
        elif spec.kind == "asr":
            p = len(self.cfg.asr_prompt_ids)
            logits, dec_hidden = head(inputs["dec_ids"], inputs.get("dec_mask"), last, mask)
            out = logits[:, p - 1:]  # (B, U, V): position j predicts transcript token j
        else:
            out = head(last, mask)
        anchors = {}
        layers = [l for l in spec.anchor_layers if _anchor_key(capability, l) in self.anchor_proj]  # none at runtime
        enc_layers = [l for l in layers if not (spec.kind == "asr" and l.startswith("decoder"))]
        depth = min(len(hiddens), spec.exit_block or len(hiddens))
        kept = getattr(self.base_backbone(), "layer_states", None) or {}  # carved: {teacher layer: (B, Ht)}
        if self.cfg.carve.get("teacher") not in (None, spec.teacher):
            kept = {}  # those are the carved teacher's layers, not this head's teacher's of the same name
        for k, layer in enumerate(enc_layers):
            if layer in kept:
                anchors[layer] = self.anchor_proj[_anchor_key(capability, layer)](kept[layer])
                continue
            block = max(round((k + 1) * depth / len(enc_layers)) - 1, 0)
            # the deepest block is read as the head reads it (an early exit's through the final norm), so
            # an early-exit head's anchors are the same from its own pass as from a full one
            states = last if block == depth - 1 else hiddens[block]
            anchors[layer] = self.anchor_proj[_anchor_key(capability, layer)](_pool(states, mask))
        for layer in layers:
            if layer not in anchors:
                dm = inputs.get("dec_mask")
                dm = torch.ones(dec_hidden.shape[:2], dtype=torch.bool) if dm is None else dm.bool()
                anchors[layer] = self.anchor_proj[_anchor_key(capability, layer)](_pool(dec_hidden, dm))
        return {"out": out, "hidden": _pool(last, mask), "anchors": anchors}

    def head_input(self, capability: str, hiddens: list[torch.Tensor]) -> torch.Tensor:
        """The (B, L, W) states `capability`'s head reads: the last block's, or for an early-exit head
        (`HeadSpec.exit_block` = k) block k's, through a carved backbone's final norm (`exit_norm`) unless
        the pass itself stopped there (then the backbone already applied it)."""
        k = self.cfg.capabilities[capability].exit_block
        if not k or k >= len(hiddens):
            return hiddens[-1]
        norm = getattr(self.base_backbone(), "exit_norm", None)
        return norm(hiddens[k - 1]) if norm is not None else hiddens[k - 1]

    def forward(self, inputs: Mapping[str, torch.Tensor], capability: str | None = None) -> dict:
        """One capability's outputs; an early-exit head's pass runs only the blocks it reads (a backbone
        with `exit_after`), every other pass the whole backbone."""
        capability = capability or self.capability
        if capability is None:
            raise ValueError("forward: no capability given and none set (call set_capability first)")
        if capability != self.capability:
            self.set_capability(capability)
        return self.head_forward(capability, self.encode(inputs, [capability]), inputs)

    def to_teacher_vocab(self, capability: str, out: torch.Tensor) -> torch.Tensor:
        """A sequence head's logits over the teacher's vocabulary (a carved, vocabulary-trimmed tower
        returns log-probabilities there; any other tower's logits are already in it)."""
        spec = self.cfg.capabilities[capability]
        base = self.base_backbone()
        if spec.kind == "lm" and hasattr(base, "to_teacher_vocab"):
            return base.to_teacher_vocab(out)
        head = self.heads[adapter_name(capability)]
        if spec.kind == "asr" and hasattr(head, "to_teacher_vocab"):
            return head.to_teacher_vocab(out)
        return out

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, torch.Tensor], capability: str, max_new_tokens: int = 64) -> list[list[int]]:
        """Greedy decoding. "asr": transcript ids (without prompt, up to but excluding EOT) per item from
        the audio inputs. "lm": continuation ids of `input_ids` (B, T) (all rows must have the same length).
        """
        spec = self.cfg.capabilities.get(capability)
        if spec is None or spec.kind not in ("asr", "lm"):
            raise ValueError(f"generate: {capability!r} is not an 'asr' or 'lm' capability of tower {self.cfg.name!r}")
        self.set_capability(capability)
        if spec.kind == "lm" and hasattr(self.base_backbone(), "generate_ids"):
            return self.base_backbone().generate_ids(inputs["input_ids"], max_new_tokens)
        if spec.kind == "asr" and hasattr(self.heads[adapter_name(capability)], "generate_ids"):
            hiddens, mask = self.encode(inputs)
            return self.heads[adapter_name(capability)].generate_ids(hiddens[-1], mask, max_new_tokens)
        if spec.kind == "lm":
            ids = inputs["input_ids"]
            for _ in range(max_new_tokens):
                ids = ids[:, -self.cfg.max_len:]
                logits = self.head_forward(capability, self.encode({"input_ids": ids}), {})["out"]
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return ids[:, -max_new_tokens:].tolist()
        hiddens, mask = self.encode(inputs)
        mem = hiddens[-1]
        b = mem.shape[0]
        ids = torch.tensor([self.cfg.asr_prompt_ids] * b, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        steps = min(max_new_tokens, self.cfg.asr_max_len - ids.shape[1])
        for _ in range(steps):
            logits, _ = self.heads[adapter_name(capability)](ids, None, mem, mask)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.cfg.asr_eot_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == self.cfg.asr_eot_id
            if bool(done.all()):
                break
        out = []
        for row in ids[:, len(self.cfg.asr_prompt_ids):].tolist():
            out.append(row[: row.index(self.cfg.asr_eot_id)] if self.cfg.asr_eot_id in row else row)
        return out


# ----------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------


# the weight files of a saved tower folder; a carved tower also keeps its backbone as a stock
# transformers model under hf/ (the file `AutoModelForCausalLM.from_pretrained` reads)
TOWER_WEIGHT_FILES = ("backbone.safetensors", "heads.safetensors")
STOCK_BACKBONE_FILE = "hf/model.safetensors"


def weight_files(directory: str | os.PathLike) -> tuple[str, ...]:
    """The weight files of a tower folder, relative to it: what a size figure counts and a bundle quantizes."""
    stock = (STOCK_BACKBONE_FILE,) if (Path(directory) / STOCK_BACKBONE_FILE).is_file() else ()
    return TOWER_WEIGHT_FILES + stock


def _clean_backbone_state(tower: StudentTower) -> dict[str, torch.Tensor]:
    """Backbone weights without LoRA tensors and with peft's `.base_layer.` wrapper removed."""
    out = {}
    for k, v in tower.base_backbone().state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().contiguous().clone()
    return out


def save_tower(tower: StudentTower, directory: str | os.PathLike) -> Path:
    """Write the tower atomically: backbone.safetensors, heads.safetensors, config.json and one stock
    peft adapter folder per capability (`<dir>/<adapter name>/adapter_model.safetensors`).

    Everything goes into a temporary sibling directory that replaces `directory` only when complete.
    """
    from safetensors.torch import save_file

    from nexus_assets.core.atomic import atomic_dir

    directory = Path(directory)
    heads = {k: v.detach().contiguous().clone() for k, v in tower.state_dict().items()
             if k.startswith(("heads.", "anchor_proj."))}
    meta = {"format_version": FORMAT_VERSION, "tower": tower.cfg.name}
    state = _clean_backbone_state(tower)
    base = tower.base_backbone()
    with atomic_dir(directory) as tmp:
        if hasattr(base, "export_stock"):  # carved: the backbone is also a stock transformers model in hf/
            (tmp / "hf").mkdir()
            stored = base.export_stock(state, tmp / "hf")  # the keys of `state` it wrote there
            state = {k: v for k, v in state.items() if k not in stored}
        save_file(state, str(tmp / "backbone.safetensors"), metadata=meta)
        save_file(heads, str(tmp / "heads.safetensors"), metadata=meta)
        if tower.adapters:
            tower.backbone.save_pretrained(str(tmp), selected_adapters=[adapter_name(c) for c in tower.adapters])
        (tmp / "config.json").write_text(json.dumps(
            {"format_version": FORMAT_VERSION, "tower": tower.cfg.to_dict(),
             "adapters": {c: adapter_name(c) for c in tower.adapters},
             "num_parameters": sum(p.numel() for p in tower.parameters())}, indent=2))
    return directory


def load_tower(directory: str | os.PathLike, read_state: Callable[[Path], dict] | None = None) -> StudentTower:
    """Rebuild a tower written by `save_tower` (torch + peft + safetensors only), in eval mode.

    read_state: how a weights file becomes a state dict (default: safetensors `load_file`); the runtime
    passes its dequantizing reader for int8 / nf4 bundles, so both paths share these steps."""
    from safetensors.torch import load_file

    directory = Path(directory)
    read_state = read_state or (lambda path: load_file(str(path)))
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}")
    tower = StudentTower(TowerConfig.from_dict(meta["tower"]))
    if meta.get("anchor_projections") == "dropped":  # a runtime copy (`strip_for_runtime`)
        tower.drop_anchor_projections()
    state = read_state(directory / "backbone.safetensors")
    if hasattr(tower.backbone, "import_stock"):
        state.update(tower.backbone.import_stock(directory / "hf", read_state))
    tower.backbone.load_state_dict(state, strict=True)
    missing, unexpected = tower.load_state_dict(read_state(directory / "heads.safetensors"), strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"{directory}/heads.safetensors: missing {missing}, unexpected {unexpected}")
    for cap, name in meta.get("adapters", {}).items():
        tower.load_adapter(cap, directory / name)
    tower.capability = None
    return tower.eval()


def _trim_exit_adapter(folder: Path, blocks: int) -> int:
    """An early-exit capability's peft adapter cut to the blocks its pass runs (its LoRA on later blocks
    never runs): target_modules' block index `\\d+` narrowed to 0..blocks-1, those weights dropped.
    Returns the parameters removed (0 when the target is not a one-index regex)."""
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    from nexus_assets.core.atomic import atomic_path

    cfg = json.loads((folder / "adapter_config.json").read_text())
    regex = cfg.get("target_modules")
    if not isinstance(regex, str) or regex.count(r"\d+") != 1:
        return 0
    narrow = regex.replace(r"\d+", "(?:" + "|".join(str(i) for i in range(blocks)) + ")")
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        file_meta = dict(f.metadata() or {})
        module = {k: re.sub(r"^base_model\.model\.|\.lora_[AB](\.[^.]+)?\.weight$", "", k) for k in f.keys()}
        keep = {k: f.get_tensor(k) for k in f.keys() if re.fullmatch(narrow, module[k])}
        dropped = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k not in keep)
    if not keep:
        raise ValueError(f"{folder}: narrowing {regex!r} to {blocks} block(s) leaves no LoRA weight")
    with atomic_path(weights) as tmp:
        save_file(keep, str(tmp), metadata=file_meta)
    cfg["target_modules"] = narrow
    with atomic_path(folder / "adapter_config.json") as tmp:
        Path(tmp).write_text(json.dumps(cfg, indent=2))
    return int(dropped)


def _merge_past_other_exits(directory: Path, meta: dict) -> int:
    """Fold the deep capability's LoRA on the blocks no other capability runs into the base weights.

    When every other capability of the tower exits early (reads blocks 0..k-1 only, `exit_block` k >= 1),
    blocks >= K = the deepest of those exits run for one capability alone, so its adapter there can be
    merged (W += scale * B @ A) without changing any output: that pass then runs LoRA matmuls on K blocks
    instead of all, and the bundle carries the delta inside weights it ships anyway. The text tower's
    text.embed exits after block 1 of 12, so text.generate keeps its LoRA on block 0 only. Returns the
    LoRA parameters removed (0 when the tower has no such capability)."""
    import re
    import shutil
    import tempfile

    from nexus_assets.core.atomic import atomic_path

    caps = meta["tower"]["capabilities"]
    adapters = meta.get("adapters", {})
    deep = [c for c in adapters if not int(caps[c].get("exit_block", 0))]
    others = [c for c in caps if c not in deep]
    if len(deep) != 1 or not others or any(not int(caps[c].get("exit_block", 0)) for c in others):
        return 0
    cap, k = deep[0], max(int(caps[c]["exit_block"]) for c in others)
    tower = load_tower(directory)
    name = adapter_name(cap)
    regex = tower.backbone.peft_config[name].target_modules
    if not isinstance(regex, str) or regex.count(r"\d+") != 1:
        return 0
    block_of = re.compile(regex.replace(r"\d+", r"(\d+)"))  # the block index `_trim_exit_adapter` narrows
    merged = 0
    with torch.no_grad():
        for mod_name, mod in tower.backbone.named_modules():
            lora_a, m = getattr(mod, "lora_A", None), block_of.fullmatch(mod_name)
            if lora_a is None or name not in lora_a or m is None or int(m.group(1)) < k:
                continue
            mod.base_layer.weight += mod.get_delta_weight(name).to(mod.base_layer.weight.dtype)
            mod.lora_B[name].weight.zero_()
            merged += 1
    if not merged:
        return 0
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        fresh = save_tower(tower, Path(tmp) / "tower")
        # the weight files only: the folder's tokenizer, card and the rest stay as they are
        for src in [fresh / "backbone.safetensors", *sorted((fresh / "hf").glob("*.safetensors")),
                    fresh / adapters[cap] / "adapter_model.safetensors"]:
            if src.exists():
                with atomic_path(directory / src.relative_to(fresh)) as dst:
                    shutil.copyfile(src, dst)
    return _trim_exit_adapter(directory / adapters[cap], k)


def strip_for_runtime(directory: str | os.PathLike) -> int:
    """Drop what inference never runs from a `save_tower` folder, in place (each file replaced
    atomically): the training-only anchor projections, an early-exit capability's LoRA weights on
    blocks past its exit, and the deep capability's LoRA on the blocks only it runs, merged into the
    weights (`_merge_past_other_exits`). What a bundle ships is what inference runs. Returns the parameters removed (0
    if already stripped)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nexus_assets.core.atomic import atomic_path

    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("anchor_projections") == "dropped":
        return 0
    merged = _merge_past_other_exits(directory, meta)  # first: it loads the tower as saved
    with safe_open(str(directory / "heads.safetensors"), "pt") as f:
        file_meta = dict(f.metadata() or {})
        keep = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("anchor_proj.")}
        dropped = merged + sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("anchor_proj."))
    with atomic_path(directory / "heads.safetensors") as tmp:
        save_file(keep, str(tmp), metadata=file_meta)
    for cap, name in meta.get("adapters", {}).items():
        k = int(meta["tower"]["capabilities"][cap].get("exit_block", 0))
        if k:
            dropped += _trim_exit_adapter(directory / name, k)
    meta["anchor_projections"] = "dropped"
    if meta.get("num_parameters") is not None:
        meta["num_parameters"] = int(meta["num_parameters"]) - int(dropped)
    with atomic_path(directory / "config.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2))
    return int(dropped)
