"""The teacher-free runtime: load a bundle (or one tower folder) and run capabilities on plain inputs.

Imports torch, numpy, tokenizers, safetensors, peft (through towers) and nexus_assets.student /
router / quantize / atomic only: never Dagster, teachers/, training code or a teacher package
(nexus_assets_tests/runtime/test_teacher_free.py makes those unimportable and runs every capability).

Bundle layout (written by nexus_assets.release.bundle.build_bundle):

    manifest.json          versions, sha256 + size of every file, towers, quantization, contracts,
                           retention before / after quantization, verified
    router/                router.json (+ router.safetensors)
    towers/<tower>/        config.json, backbone.safetensors, heads.safetensors, <adapter>/ per capability,
                           tokenizer/tokenizer.json (text: SmolLM2's, audio: Whisper's), classes.json (vision)

`Bundle.load` reads the manifest and router only. A tower is loaded the first time one of its
capabilities is called, after the sha256 of each of its files is checked against the manifest, so a
text call never reads (or pays for) the vision tower, and a corrupted file is named before it is used.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nexus_assets.student.quantize import DYNAMIC_MAX_REL_ERR, dynamic_int8, dynamic_int8_error, to_nf4_linear
from nexus_assets.student.router import Router, RoutingError
from nexus_assets.student.config import TowerConfig
from nexus_assets.student.tower import StudentTower
from nexus_assets.student.carved import audio_input_features
from .files import MANIFEST, BundleError, hash_checked, read_checked, read_manifest, snapshot, tree_files
from .inputs import (MAX_NEW_TOKENS, MAX_TOP_K, InputError, check_count, check_text, check_texts,
                     image_tensor, max_audio_samples, waveform)

__all__ = ["Bundle", "TowerRuntime", "BundleError", "RoutingError", "load_tower_dir", "MANIFEST",
           "CAPABILITY_METHODS", "input_modality"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".wave"}
CAPABILITY_METHODS = {
    "text.generate": "text_generate", "text.embed": "text_embed", "vision.classify": "vision_classify",
    "audio.speaker_embed": "audio_speaker_embed", "audio.transcribe": "audio_transcribe",
}


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def input_modality(x: Any) -> str:
    """Modality of a plain input: a path with an image / WAV suffix, an HxWx3 uint8 array (image), a 1-D
    float array (16 kHz waveform), encoded PNG/JPEG or WAV bytes, else text."""
    if isinstance(x, np.ndarray):
        if x.ndim == 3 and x.shape[-1] == 3:
            return "vision"
        if x.ndim == 1:
            return "audio"
        raise RoutingError(f"cannot tell the modality of an array of shape {x.shape}: pass HxWx3 uint8 (image) "
                           "or (N,) float32 at 16 kHz (audio)")
    if isinstance(x, (os.PathLike, str)):
        suffix = Path(str(x)).suffix.lower() if len(str(x)) < 4096 else ""
        if suffix in IMAGE_SUFFIXES:
            return "vision"
        if suffix in AUDIO_SUFFIXES:
            return "audio"
        return "text"
    if isinstance(x, (list, tuple)) and all(isinstance(t, str) for t in x):
        return "text"
    if isinstance(x, bytes):  # encoded file contents: sniff the magic number
        if x[:4] == b"RIFF":
            return "audio"
        if x[:8] == b"\x89PNG\r\n\x1a\n" or x[:3] == b"\xff\xd8\xff" or x[:2] == b"BM" or x[:4] == b"GIF8":
            return "vision"
        raise RoutingError("cannot tell the modality of these bytes: pass WAV (RIFF) or PNG/JPEG contents")
    raise RoutingError(f"unsupported input type {type(x).__name__}")


# ----------------------------------------------------------------------------------------------------
# One tower
# ----------------------------------------------------------------------------------------------------


def _load_student(directory: str | os.PathLike) -> StudentTower:
    """The checked tower of a folder (fp32 or int8 / nf4, dequantized), without tokenizer or classes:
    kept for bench/ and tests that compare towers directly."""
    from .towerload import load_student

    return load_student(Path(directory))[0]


class Int8FallbackWarning(UserWarning):
    """`int8_compute="dynamic"` was asked for a tower it would change too much; it runs dequantized."""


class TowerRuntime:
    """One loaded tower plus what its inputs and outputs need (tokenizer, class names).

    Every method takes plain Python / numpy inputs and returns numpy arrays or strings.
    """

    def __init__(self, directory: str | os.PathLike, *, int8_compute: str = "dequantize", device: str = "cpu",
                 source: str | os.PathLike | None = None):
        """directory: the folder read now; source: where it came from, if a verified copy (the bundle's)."""
        if int8_compute not in ("dequantize", "dynamic"):
            raise ValueError(f"int8_compute: {int8_compute!r} is not 'dequantize' or 'dynamic'")
        from .towerload import load_student

        folder = Path(directory)
        self.directory = Path(source) if source is not None else folder
        tower, self.scheme = load_student(folder)
        if device.startswith("cuda") and self.scheme == "nf4":
            tower = to_nf4_linear(tower, device)
        self.int8_compute = "dequantize"  # what runs: "dynamic" only where it keeps the outputs
        if int8_compute == "dynamic" and device == "cpu":
            dynamic = dynamic_int8(tower)
            err = dynamic_int8_error(tower.eval(), dynamic.eval())
            worst = max(err, key=err.get)
            if err[worst] > DYNAMIC_MAX_REL_ERR:  # int8 activations would change the answers: say so, keep fp32
                warnings.warn(f"tower {tower.cfg.name!r}: dynamic int8 changes {worst}'s outputs by "
                              f"{err[worst]:.2f} (relative, > {DYNAMIC_MAX_REL_ERR}) on a calibration batch; "
                              f"running it dequantized to fp32 instead", Int8FallbackWarning, stacklevel=2)
            else:
                tower, self.int8_compute = dynamic, "dynamic"
        self.tower = tower.to(device).eval()
        self.device = device
        self.cfg: TowerConfig = tower.cfg
        self.name = self.cfg.name
        self.tokenizer = self._tokenizer(folder) if self.cfg.modality in ("text", "audio") else None
        self.classes: list[str] | None = self._classes(folder) if self.cfg.modality == "vision" else None

    def _tokenizer(self, folder: Path):
        """tokenizer/tokenizer.json, read through the same no-symlink, size-capped reader as the weights."""
        from tokenizers import Tokenizer

        rel = "tokenizer/tokenizer.json"
        if not (folder / rel).is_file():
            raise BundleError(f"{self.directory / rel}: missing (the {self.name} tower needs its tokenizer)")
        try:
            return Tokenizer.from_str(read_checked(folder, rel, None, limit=256 << 20).decode("utf-8"))
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad JSON
            raise BundleError(f"{self.directory / rel}: not a readable tokenizer ({type(e).__name__}: {e})") from None

    def _classes(self, folder: Path) -> list[str]:
        """classes.json: one name per class of the tower's classify head."""
        f = self.directory / "classes.json"
        if not (folder / "classes.json").is_file():
            raise BundleError(f"{f}: missing (the vision tower needs its class names)")
        try:
            classes = json.loads(read_checked(folder, "classes.json", None, limit=64 << 20).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{f}: not valid UTF-8 JSON ({e})") from None
        n = max((h.out_dim for h in self.cfg.capabilities.values() if h.kind == "classes"), default=None)
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or \
                (n is not None and len(classes) != n):
            raise BundleError(f"{f}: must be a list of {n} class names")
        return classes

    @property
    def capabilities(self) -> list[str]:
        return sorted(self.cfg.capabilities)

    def _need(self, capability: str) -> None:
        if capability not in self.cfg.capabilities:
            raise RoutingError(f"capability {capability!r} is not served by the {self.cfg.modality} tower "
                               f"{self.name!r}; it serves {self.capabilities}")

    def _to(self, inputs: dict) -> dict:
        return {k: v.to(self.device) for k, v in inputs.items()}

    # -- text ------------------------------------------------------------------------------------------

    def text_token_ids(self, text: str, keep: str = "first") -> list[int]:
        """SmolLM2 ids of `text` (the tokenizer's own special-token rules), cut to the tower's max_len:
        the first tokens (embed), or the last (generate: the context next to the continuation)."""
        ids = self.tokenizer.encode(check_text(text)).ids
        ids = ids[-self.cfg.max_len:] if keep == "last" else ids[: self.cfg.max_len]
        if not ids:
            raise InputError("text input is empty after tokenization")
        return ids

    @torch.no_grad()
    def text_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position: (T,) ids -> (T, V) float32; row t predicts token t+1."""
        self._need(f"{self.name}.generate")
        ids = torch.as_tensor(list(token_ids)[: self.cfg.max_len], dtype=torch.long)[None]  # (1, T)
        return self._lm_out(ids)[0].float().cpu().numpy()

    def _lm_out(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) next-token logits over the teacher's ids (a carved tower's kept
        vocabulary mapped back)."""
        cap = f"{self.name}.generate"
        return self.tower.to_teacher_vocab(cap, self.tower(self._to({"input_ids": ids}), cap)["out"])

    @torch.no_grad()
    def text_log_probs(self, rows: Sequence[Sequence[int]], batch_size: int = 16) -> list[torch.Tensor]:
        """Next-token log-probabilities over the teacher's ids for many rows: row i (T_i,) -> (T_i', V)
        float32 CPU, T_i' = min(T_i, max_len). Rows of one length share a forward pass (no padding, so
        the figures are those of `text_logits` one row at a time); validation measures thousands of rows."""
        self._need(f"{self.name}.generate")
        batch_size = check_count(batch_size, "batch_size", 4096)
        cut = [list(r)[: self.cfg.max_len] for r in rows]
        if any(not r for r in cut):
            raise InputError("text_log_probs: every row needs at least one token id")
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(cut):
            by_len.setdefault(len(r), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(cut)
        for idx in by_len.values():
            for b in range(0, len(idx), batch_size):
                part = idx[b:b + batch_size]
                ids = torch.as_tensor([cut[i] for i in part], dtype=torch.long)  # (B, T)
                lp = torch.log_softmax(self._lm_out(ids).float(), dim=-1).cpu()  # (B, T, V)
                for j, i in enumerate(part):
                    out[i] = lp[j]
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def text_generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy continuation of `prompt` (its last max_len tokens are the context); 1 <= max_new_tokens
        <= MAX_NEW_TOKENS, because 0 or less used to echo the prompt as if it were an answer."""
        max_new_tokens = check_count(max_new_tokens, "max_new_tokens", MAX_NEW_TOKENS)
        self._need(f"{self.name}.generate")
        ids = torch.as_tensor(self.text_token_ids(prompt, keep="last"), dtype=torch.long)[None]
        new = self.tower.generate(self._to({"input_ids": ids}), f"{self.name}.generate", max_new_tokens)[0]
        return self.tokenizer.decode(new, skip_special_tokens=True)

    @torch.no_grad()
    def text_embed(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Unit-norm sentence embeddings: str -> (1, D), list of n -> (n, D) float32."""
        self._need(f"{self.name}.embed")
        texts = check_texts(texts)
        batch_size = check_count(batch_size, "batch_size", 4096)
        out = []
        for i in range(0, len(texts), batch_size):
            rows = [self.text_token_ids(t) for t in texts[i:i + batch_size]]
            t = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), t, dtype=torch.long)  # (B, T) right padded
            mask = torch.zeros(len(rows), t, dtype=torch.bool)
            for j, r in enumerate(rows):
                ids[j, : len(r)], mask[j, : len(r)] = torch.as_tensor(r), True
            emb = self.tower(self._to({"input_ids": ids, "attention_mask": mask}), f"{self.name}.embed")["out"]
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out, 0)

    # -- vision ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def vision_logits(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """Class logits: n images (paths, HxWx3 uint8 arrays or encoded bytes) -> (n, C) float32."""
        cap = f"{self.name}.classify"
        self._need(cap)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise InputError("images: the list is empty")
        batch_size = check_count(batch_size, "batch_size", 4096)
        out = []
        for i in range(0, len(images), batch_size):
            px = torch.stack([image_tensor(im, self.cfg.image_size) for im in images[i:i + batch_size]])
            out.append(self.tower(self._to({"pixels": px}), cap)["out"].float().cpu().numpy())  # (B, C)
        return np.concatenate(out, 0)

    def vision_classify(self, image: Any, top_k: int = 5) -> list[tuple[str, float]]:
        """The top_k (class name, probability) of one image, most likely first (1 <= top_k <= MAX_TOP_K)."""
        top_k = check_count(top_k, "top_k", MAX_TOP_K)
        logits = torch.from_numpy(self.vision_logits([image])[0])
        p = torch.softmax(logits, -1)
        top = torch.topk(p, k=min(top_k, p.numel()))
        return [(self.classes[i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]

    # -- audio -----------------------------------------------------------------------------------------

    def _mels(self, wav: Any) -> dict:
        # the same features as training (a carved Whisper tower reads Whisper's own log-mel)
        mels = audio_input_features(self.cfg, waveform(wav, max_audio_samples(self.cfg)))[: self.cfg.max_frames][None]  # (1, F, n_mels)
        return {"mels": mels, "mel_mask": torch.ones(mels.shape[:2], dtype=torch.bool)}

    @torch.no_grad()
    def audio_speaker_embed(self, wav: Any) -> np.ndarray:
        """Unit-norm voice embedding of one utterance: (D,) float32 (first max_frames / 100 seconds)."""
        cap = f"{self.name}.speaker_embed"
        self._need(cap)
        return self.tower(self._to(self._mels(wav)), cap)["out"][0].float().cpu().numpy()

    @torch.no_grad()
    def audio_transcribe(self, wav: Any) -> str:
        """Greedy transcript of one utterance (Whisper ids decoded by the bundled tokenizer)."""
        cap = f"{self.name}.transcribe"
        self._need(cap)
        ids = self.tower.generate(self._to(self._mels(wav)), cap, max_new_tokens=self.cfg.asr_max_len)[0]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def load_tower_dir(directory: str | os.PathLike, **kwargs) -> TowerRuntime:
    """One tower folder (save_tower output + tokenizer/classes), before any bundle exists: what
    validation runs on the fp32 tower. No manifest, so no hash check."""
    return TowerRuntime(directory, **kwargs)


# ----------------------------------------------------------------------------------------------------
# The bundle
# ----------------------------------------------------------------------------------------------------


class Bundle:
    """A verified, lazily loaded set of towers + router. Build with `Bundle.load(path)`."""

    def __init__(self, path: Path, manifest: dict, router: Router, *, int8_compute: str = "dequantize",
                 device: str = "cpu"):
        self.path, self.manifest, self.router = path, manifest, router
        self._kw = {"int8_compute": int8_compute, "device": device}
        self._towers: dict[str, TowerRuntime] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, *, int8_compute: str = "dequantize", device: str = "cpu") -> "Bundle":
        """Read and check the manifest, then load the router from its verified bytes (towers load lazily)."""
        path = Path(path)
        manifest = read_manifest(path)
        b = cls(path, manifest, None, int8_compute=int8_compute, device=device)  # type: ignore[arg-type]
        rel = manifest["router"]["path"]
        with snapshot(b._read_verified(rel)) as snap:
            try:
                b.router = Router.load(snap / rel)
            except Exception as e:  # noqa: BLE001 - a hashed but malformed router is still a bad bundle
                raise BundleError(f"{path / rel}: cannot load the router ({type(e).__name__}: {e})") from None
        return b

    # -- integrity -------------------------------------------------------------------------------------

    def _listed(self, prefix: str) -> dict[str, dict]:
        """The manifest entries under `prefix/`; unlisted files and symlinks there are refused."""
        prefix = prefix.rstrip("/") + "/"
        listed = {rel: f for rel, f in self.manifest["files"].items() if rel.startswith(prefix)}
        if not listed:
            raise BundleError(f"{self.path / MANIFEST}: lists no file under {prefix}")
        if not (self.path / prefix).is_dir():
            raise BundleError(f"{self.path / prefix}: missing folder (listed in {MANIFEST})")
        extra = sorted(tree_files(self.path, prefix.rstrip("/")) - set(listed))
        if extra:
            raise BundleError(f"{self.path / prefix}: files not listed in {MANIFEST}: {extra}")
        return listed

    def _read_verified(self, prefix: str) -> dict[str, bytes]:
        """Every file under `prefix/`, read once and checked against its sha256: the bytes then loaded
        are the bytes hashed (they used to be hashed, then reopened: a window to swap them)."""
        return {rel: read_checked(self.path, rel, f) for rel, f in sorted(self._listed(prefix).items())}

    def _verify(self, prefix: str) -> list[str]:
        """Stream-check the sha256 of every manifest file under `prefix/` (nothing kept in memory)."""
        listed = self._listed(prefix)
        for rel, f in sorted(listed.items()):
            hash_checked(self.path, rel, f)
        return sorted(listed)

    def verify_all(self) -> dict[str, str]:
        """Check every file now (the CLI's `info --verify`): {prefix: 'ok'} or raises BundleError. Files
        listed outside the router and towers are checked too."""
        prefixes = [self.manifest["router"]["path"]] + [t["path"] for t in self.manifest["towers"].values()]
        out = {}
        for prefix in prefixes:
            self._verify(prefix)
            out[prefix] = "ok"
        covered = {p.rstrip("/") + "/" for p in prefixes}
        for rel, f in sorted(self.manifest["files"].items()):
            if not any(rel.startswith(c) for c in covered):
                hash_checked(self.path, rel, f)
                out[rel] = "ok"
        return out

    # -- towers ----------------------------------------------------------------------------------------

    @property
    def loaded_towers(self) -> list[str]:
        return sorted(self._towers)

    def capabilities(self) -> list[str]:
        return self.router.capabilities()

    def tower(self, name: str) -> TowerRuntime:
        """The tower `name`, verified and loaded on first use."""
        if name not in self._towers:
            entry = self.manifest["towers"].get(name)
            if entry is None:
                raise RoutingError(f"the bundle has no tower {name!r}; it has {sorted(self.manifest['towers'])}")
            rel = entry["path"]
            with snapshot(self._read_verified(rel)) as snap:
                try:
                    self._towers[name] = TowerRuntime(snap / rel, source=self.path / rel, **self._kw)
                except BundleError as e:  # name the bundle's file, not the private copy
                    raise BundleError(str(e).replace(str(snap), str(self.path))) from None
        return self._towers[name]

    def route(self, capability: str, x: Any):
        """The Route of (capability or "auto", input). Text is checked first (empty, length cap): the
        router's 'auto' classifier is linear in the text, and a 10 MB text used to hang it."""
        modality = input_modality(x)
        if modality == "text":
            check_text(x) if isinstance(x, str) else check_texts(x)
        return self.router.route(modality, capability, text=x if isinstance(x, str) else None)

    def _for(self, capability: str, x: Any) -> TowerRuntime:
        return self.tower(self.route(capability, x).tower)

    # -- capabilities ----------------------------------------------------------------------------------

    def text_generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        return self._for("text.generate", prompt).text_generate(prompt, max_new_tokens)

    def text_embed(self, texts: str | list[str]) -> np.ndarray:
        """(n, 384) for the default tower: one row per text."""
        return self._for("text.embed", texts).text_embed(texts)

    def vision_classify(self, image: Any, top_k: int = 5) -> list[tuple[str, float]]:
        return self._for("vision.classify", image).vision_classify(image, top_k)

    def audio_speaker_embed(self, wav: Any) -> np.ndarray:
        """(256,) for the default tower."""
        return self._for("audio.speaker_embed", wav).audio_speaker_embed(wav)

    def audio_transcribe(self, wav: Any) -> str:
        return self._for("audio.transcribe", wav).audio_transcribe(wav)

    def run(self, capability: str, x: Any, **kwargs):
        """Route (capability or "auto", input modality) through the Router, then call the capability.
        Unknown capability or an input of another modality -> RoutingError."""
        route = self.route(capability, x)
        method = CAPABILITY_METHODS.get(route.capability)
        if method is None:
            raise RoutingError(f"capability {route.capability!r} has no runtime method; "
                               f"known: {sorted(CAPABILITY_METHODS)}")
        return getattr(self.tower(route.tower), method)(x, **kwargs)

    def info(self) -> dict:
        m = self.manifest
        return {"path": str(self.path), "verified": m.get("verified"), "quantization": m.get("quantization"),
                "towers": m["towers"], "retention": m.get("retention", {}), "created": m.get("created"),
                "versions": m.get("versions", {})}
