"""Weight quantization of saved towers, so a bundle's files really shrink.

Schemes (the runtime imports this module: torch + safetensors only; bitsandbytes lazily, for nf4):

* "int8" (the CPU default): weight-only, symmetric, per output channel. Every 2-D `*.weight` of a Linear
  or Embedding with at least `MIN_NUMEL` elements is stored as int8 `q` (out, in) plus fp32 scales (out,)
  with w ~= q * scale[:, None], scale = max|w_row| / 127. The error per element is at most scale / 2.
  Embeddings count: the text tower's tied token embedding (also its LM output matrix) and the ASR
  decoder's are most of those towers' bytes. Biases, norms, convs, positions stay fp32.
* "nf4" (selected when CUDA is present): bitsandbytes 4-bit NormalFloat, blocks of 64, fp32 absmax per
  block. The packing and unpacking run on CPU too (stack-notes), so an nf4 file loads anywhere.
* "none": fp32 as trained.

At load, `load_state` dequantizes to fp32 and the tower runs its normal fp32 modules. Why dequantize
rather than keep int8 compute: the towers are small, so the bundle's size on disk (download, storage)
is what int8 is for; fp32 compute keeps quantized and fp32 towers numerically identical except for the
weights, so the retention re-measured on the bundle isolates the quantization error. `dynamic_int8`
(torch.ao quantize_dynamic over nn.Linear) is offered as a load option for CPU latency; bench/
student_vs_teacher.py measures both. On CUDA, `to_nf4_linear` swaps Linear layers for bnb Linear4bit.

Safetensors layout: a quantized weight `k` becomes `k.__q` (int8 or packed uint8) and `k.__scale`
(int8 scales, or nf4 block absmax); the file's metadata `nexus_quantization` names the scheme and
`nexus_shapes` (JSON) the original shapes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["SCHEMES", "MIN_NUMEL", "quantize_tensor_int8", "dequantize_tensor_int8", "quantize_state_dict",
           "dequantize_state_dict", "quantize_file", "load_state", "file_scheme", "default_scheme",
           "dynamic_int8", "dynamic_int8_error", "DYNAMIC_MAX_REL_ERR", "calibration_inputs", "output_rel_error",
           "to_nf4_linear"]

SCHEMES = ("none", "int8", "nf4")
MIN_NUMEL = 1024
NF4_BLOCK = 64
_META_SCHEME, _META_SHAPES = "nexus_quantization", "nexus_shapes"


def default_scheme(device: str | None = None) -> str:
    """nf4 where CUDA runs it natively, int8 on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "nf4" if str(device).startswith("cuda") else "int8"


def _eligible(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.ndim == 2 and t.is_floating_point() and t.numel() >= MIN_NUMEL


def quantize_tensor_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (q (out, in) int8, scale (out,) fp32), symmetric per output row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_tensor_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def _nf4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import bitsandbytes.functional as bf

    packed, qs = bf.quantize_4bit(w.detach().float().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
    return packed.contiguous(), qs.absmax.float().contiguous()


def _nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: list[int]) -> torch.Tensor:
    import bitsandbytes.functional as bf

    qs = bf.QuantState(absmax=absmax, shape=torch.Size(shape), code=bf.get_4bit_type("nf4", device=absmax.device),
                       blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32)
    return bf.dequantize_4bit(packed, qs).float()


def quantize_state_dict(sd: dict[str, torch.Tensor], scheme: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """fp32 state dict -> (tensors to save, safetensors metadata)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization: {scheme!r} is not one of {SCHEMES}")
    if scheme == "none":
        return {k: v.contiguous() for k, v in sd.items()}, {_META_SCHEME: "none"}
    out, shapes = {}, {}
    for k, v in sd.items():
        if not _eligible(k, v):
            out[k] = v.contiguous()
            continue
        q, s = quantize_tensor_int8(v) if scheme == "int8" else _nf4_quantize(v)
        out[f"{k}.__q"], out[f"{k}.__scale"] = q, s
        shapes[k] = list(v.shape)
    return out, {_META_SCHEME: scheme, _META_SHAPES: json.dumps(shapes)}


def dequantize_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Inverse of `quantize_state_dict` (fp32 out); a file without our metadata is returned as is."""
    meta = metadata or {}
    scheme = meta.get(_META_SCHEME, "none")
    if scheme == "none":
        return dict(tensors)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} in file metadata")
    shapes = json.loads(meta.get(_META_SHAPES, "{}"))
    out = {k: v for k, v in tensors.items() if not k.endswith((".__q", ".__scale"))}
    for k, shape in shapes.items():
        q, s = tensors[f"{k}.__q"], tensors[f"{k}.__scale"]
        out[k] = dequantize_tensor_int8(q, s) if scheme == "int8" else _nf4_dequantize(q, s, shape)
        if list(out[k].shape) != shape:
            raise ValueError(f"dequantized {k!r} has shape {list(out[k].shape)}, expected {shape}")
    return out


def file_scheme(path: str | os.PathLike) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(_META_SCHEME, "none")


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by `quantize_file` (or any plain one) as fp32 tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return dequantize_state_dict(tensors, meta)


def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, scheme: str) -> dict:
    """Quantize one safetensors file into `dst` (written atomically); keeps the source metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nexus_assets.core.atomic import atomic_path

    before = Path(src).stat().st_size  # src may be dst: quantized in place
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    tensors, qmeta = quantize_state_dict(sd, scheme)
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata={**meta, **qmeta})
    n_q = len(json.loads(qmeta.get(_META_SHAPES, "{}")))
    return {"scheme": scheme, "tensors": len(sd), "quantized_tensors": n_q,
            "bytes_before": before, "bytes_after": Path(dst).stat().st_size}


def dynamic_int8(module: nn.Module) -> nn.Module:
    """int8 compute for the plain nn.Linear layers on CPU (torch.ao quantize_dynamic, weights quantized
    per tensor at load). LoRA's lora_A / lora_B stay fp32: peft reads their `.weight.dtype`, which a
    dynamic quantized Linear does not have. Returns a new module; the input is left unchanged."""
    import warnings

    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    names = {n: default_dynamic_qconfig for n, m in module.named_modules()
             if type(m) is nn.Linear and "lora_" not in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao prints a deprecation notice on 2.13
        return quantize_dynamic(module, names, dtype=torch.qint8)


DYNAMIC_MAX_REL_ERR = 0.1
"""Largest relative output change dynamic int8 may make on a calibration batch before the runtime keeps
the dequantized fp32 tower instead. Measured on the embedded default's bundle (random inputs, batch 4):
vision 0.02, speaker 0.04, transcribe 0.08, text.generate 0.21, text.embed 0.77: the carved SmolLM2's
activation outliers do not survive per-tensor int8 activations (its embeddings keep cosine 0.5 with fp32)."""


def calibration_inputs(cfg, capability: str, b: int = 4, *, text_len: int = 64, dec_tokens: int = 8) -> dict:
    """A fixed, seeded batch of model inputs of the right shapes (token ids / pixels / log-mels), for
    measuring what quantization changes and how fast a tower runs (bench/student_vs_teacher.py)."""
    g = torch.Generator().manual_seed(0)
    if cfg.modality == "text":
        return {"input_ids": torch.randint(0, cfg.vocab_size, (b, min(cfg.max_len, text_len)), generator=g)}
    if cfg.modality == "vision":
        return {"pixels": torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)}
    f = min(300, cfg.max_frames)  # 3 s of audio
    x = {"mels": torch.randn(b, f, cfg.n_mels, generator=g), "mel_mask": torch.ones(b, f, dtype=torch.bool)}
    if cfg.capabilities[capability].kind == "asr":
        dec = torch.tensor(list(cfg.asr_prompt_ids) + [100] * dec_tokens).expand(b, -1)
        x.update(dec_ids=dec, dec_mask=torch.ones_like(dec, dtype=torch.bool))
    return x


@torch.no_grad()
def output_rel_error(reference: nn.Module, other: nn.Module, capability: str, inputs: dict) -> float:
    """|other - reference| / |reference| of one capability's head output (two StudentTowers, same inputs)."""
    ref = reference(inputs, capability)["out"].float()
    return float((other(inputs, capability)["out"].float() - ref).norm() / ref.norm().clamp_min(1e-12))


def dynamic_int8_error(reference: nn.Module, dynamic: nn.Module) -> dict[str, float]:
    """Per capability, `output_rel_error` on a calibration batch: whether int8 compute keeps what the
    tower says (`reference` and `dynamic` are StudentTowers)."""
    return {cap: output_rel_error(reference, dynamic, cap, calibration_inputs(reference.cfg, cap))
            for cap in reference.cfg.capabilities}


def to_nf4_linear(module: nn.Module, device: str = "cuda") -> nn.Module:
    """Replace every plain nn.Linear (in_features >= 64) by a bitsandbytes Linear4bit (nf4) on `device`.

    The CUDA path of an nf4 bundle; on CPU bnb runs it but slower than fp32 (stack-notes), so the
    runtime dequantizes there instead.
    """
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and child.in_features >= 64:
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=torch.float16 if device.startswith("cuda") else torch.float32,
                                    quant_type="nf4")
            new.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, name, new.to(device))
        else:
            to_nf4_linear(child, device)
    return module.to(device)
