"""Reading a causal LM's safetensors checkpoint piecewise: headers, byte ranges, single rows and one
module's tensors at a time (per-expert MoE tensors fused into transformers' layout), for layer streaming."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Literal

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")

# Checkpoint layouts of MoE experts as written by transformers' save_pretrained / the hub (one tensor per
# expert) vs the fused (E, ...) parameters the 5.x modules hold: (gate, up) fused into gate_up_proj and
# down stacked into down_proj. Mixtral names them w1/w3/w2, Qwen-MoE gate_proj/up_proj/down_proj.
_GATE_NAMES = ("w1", "gate_proj")
_UP_NAMES = ("w3", "up_proj")
_DOWN_NAMES = ("w2", "down_proj")
_KEY_RENAMES = {"mixtral": ((".block_sparse_moe.", ".mlp."),)}

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ----------------------------------------------------------------------------------------------------
# checkpoint access


def _read_header(path: Path) -> dict:
    """The safetensors JSON header of one file (name -> dtype, shape, data_offsets), without mapping it."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class _Checkpoint:
    """Where each tensor of a (possibly sharded) safetensors checkpoint lives, and memory-mapped reads."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.model_dir / f for name, f in weight_map.items()}
        elif single.exists():
            self.files = {name: single for name in _read_header(single)}
        else:
            raise FileNotFoundError(f"{self.model_dir}: neither model.safetensors.index.json nor model.safetensors")
        self.meta: dict[str, dict] = {}
        for path in sorted(set(self.files.values())):
            for name, info in _read_header(path).items():
                self.meta[name] = info

    def nbytes(self, name: str) -> int:
        start, end = self.meta[name]["data_offsets"]
        return end - start

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name]["shape"])

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Zero-copy views on the shards' memory maps (pages load on first touch).

        The views keep their shard's mapping alive; dropping them releases it, which is what bounds RSS to
        the block in use. The safe_open handle itself can be closed straight away.
        """
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise KeyError(f"{self.model_dir}: tensor {n!r} not in the checkpoint")
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, ns in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        return out

    def _data_start(self, path: Path) -> int:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n

    def _pread(self, fd: int, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise IOError(f"{self.model_dir}: short read at offset {offset + done}")
            done += got
        return buf

    def rows(self, name: str, row_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Private copies of the given rows of a 2-D tensor, read with pread: (len(row_ids), D).

        Plain reads, not the memory map: the kernel maps page-cache pages around every fault (fault-around),
        so gathering a few thousand embedding rows through a map makes most of the (V, D) table resident.
        Contiguous runs of ids are read with one call.
        """
        info = self.meta[name]
        if len(info["shape"]) != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {info['shape']}")
        src_dtype = _ST_DTYPES[info["dtype"]]
        D = info["shape"][1]
        row_bytes = D * torch.empty((), dtype=src_dtype).element_size()
        path = self.files[name]
        base = self._data_start(path) + info["data_offsets"][0]
        ids = torch.as_tensor(row_ids, dtype=torch.long).reshape(-1)
        out = torch.empty((len(ids), D), dtype=dtype)
        if len(ids) == 0:
            return out
        fd = os.open(path, os.O_RDONLY)
        try:
            start = 0
            breaks = (torch.nonzero(ids[1:] != ids[:-1] + 1).reshape(-1) + 1).tolist() + [len(ids)]
            for stop in breaks:  # ids[start:stop] is a run r0, r0+1, ...
                r0 = int(ids[start])
                buf = self._pread(fd, base + r0 * row_bytes, (stop - start) * row_bytes)
                out[start:stop] = torch.frombuffer(buf, dtype=src_dtype).reshape(stop - start, D)
                start = stop
        finally:
            os.close(fd)
        return out


def weights_bytes(model_dir: Path) -> int:
    """Total bytes of all tensors in the checkpoint (from the safetensors headers; nothing is read)."""
    ckpt = _Checkpoint(model_dir)
    return sum(ckpt.nbytes(n) for n in ckpt.meta)


def should_stream(weight_bytes: int, memory_budget_bytes: int, mode: Literal["auto", "always", "never"]) -> bool:
    """Whether extraction should stream layers: `auto` streams when the weights alone exceed the budget.

    Mirrors `ExtractionSettings.stream_layers` in the registry.
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"mode must be 'auto', 'always' or 'never', got {mode!r}")
    if weight_bytes < 0:
        raise ValueError(f"weight_bytes must be >= 0, got {weight_bytes}")
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    if mode == "always":
        return True
    if mode == "never":
        return False
    return weight_bytes > memory_budget_bytes


# ----------------------------------------------------------------------------------------------------
# materialising one module from the checkpoint


def _module_state(module: torch.nn.Module, prefix: str, ckpt: _Checkpoint, model_type: str, dtype) -> dict:
    """The tensors for `module` (keys relative to it) read from checkpoint keys under `prefix`.

    Handles per-expert MoE checkpoints feeding fused expert parameters. Raises if any expected key is
    missing or any checkpoint key under the prefix is left unused, so a layout mismatch cannot pass quietly.
    """
    expected = module.state_dict()  # meta tensors: names and shapes only
    disk = {}  # relative (renamed) name -> checkpoint name
    for name in ckpt.names_with_prefix(prefix):
        rel = "." + name[len(prefix):]
        for old, new in _KEY_RENAMES.get(model_type, ()):
            rel = rel.replace(old, new)
        disk[rel[1:]] = name
    raw = ckpt.tensors(list(disk.values()))
    used: set[str] = set()
    state = {}

    def take(rel: str) -> torch.Tensor:
        used.add(rel)
        return raw[disk[rel]]

    def expert(stem: str, e: int, names: tuple[str, ...]) -> torch.Tensor:
        for n in names:
            rel = f"{stem}experts.{e}.{n}.weight"
            if rel in disk:
                return take(rel)
        raise KeyError(f"{prefix}: no expert tensor {stem}experts.{e}.{{{'|'.join(names)}}}.weight")

    for key, meta_t in expected.items():
        if key in disk:
            t = take(key)
        elif key.endswith("experts.gate_up_proj"):
            stem = key[: -len("experts.gate_up_proj")]
            # per expert: gate (I, H) and up (I, H) -> (2I, H); stacked -> (E, 2I, H)
            t = torch.stack(
                [torch.cat([expert(stem, e, _GATE_NAMES), expert(stem, e, _UP_NAMES)], 0) for e in range(meta_t.shape[0])]
            )
        elif key.endswith("experts.down_proj"):
            stem = key[: -len("experts.down_proj")]
            t = torch.stack([expert(stem, e, _DOWN_NAMES) for e in range(meta_t.shape[0])])  # (E, H, I)
        else:
            raise KeyError(f"{ckpt.model_dir}: tensor {prefix}{key} missing from the checkpoint")
        if tuple(t.shape) != tuple(meta_t.shape):
            raise ValueError(f"{prefix}{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(meta_t.shape)}")
        state[key] = t if t.dtype == dtype else t.to(dtype)
    unused = sorted(set(disk) - used)
    if unused:
        raise KeyError(f"{ckpt.model_dir}: checkpoint tensors under {prefix!r} the model does not use: {unused[:8]}")
    return state


def _materialise(module: torch.nn.Module, prefix: str, ckpt: _Checkpoint, model_type: str, dtype) -> torch.nn.Module:
    """Swap a meta-device module's parameters for checkpoint tensors (assign=True: no extra copy)."""
    state = _module_state(module, prefix, ckpt, model_type, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{prefix}: tensors not in the checkpoint and not computable here: {left}")
    return module.eval()
