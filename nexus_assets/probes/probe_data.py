"""Probe datasets: the real, offline inputs every teacher is run over and every student is judged on.

How much a student keeps of its teacher depends on how many distinct inputs it saw: an image student
trained on views of 31 photos agreed with its teacher on 42% of held-out views of those photos and on
under 2% of unrelated ones. So a dataset here draws as many distinct source items as its size allows,
round-robin across every source, and splits by source item (never by view or by sentence of one
passage) so that val/heldout measure generalisation rather than memory. Whole sources or voices named in
`heldout_sources` become the `ood` split: the out-of-domain test no training step ever reads.

Run by hand (writes data/artifacts/probe/<name>/rows.parquet):

    python -m nexus_assets.probes.probe_data text-probe --profile tiny
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nexus_assets.core.atomic import atomic_path, write_json
from .probe_sources import (
    RECORDED_ENGINES,
    TARGET_SR,
    IMAGE_SOURCES,
    TEXT_SOURCES,
    VOICE_ENGINES,
    engine_missing,
    base_family,
    hash_order,
    seeded_rng,
    speakable_sentences,
    synthesize,
)
from nexus_assets.core.registry import DatasetSize, DatasetSpec

ROWS_FILE = "rows.parquet"
SUMMARY_FILE = "summary.json"
IMAGE_SIZE = 224
SPLIT_ORDER = ("train", "val", "heldout")

BASE_FIELDS = [
    pa.field("row_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("item", pa.string(), nullable=False),
    pa.field("view", pa.int32(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("content_sha", pa.string(), nullable=False),
]
SCHEMAS = {
    "text": pa.schema(BASE_FIELDS + [pa.field("text", pa.string(), nullable=False)]),
    "vision": pa.schema(BASE_FIELDS + [
        pa.field("image", pa.binary(), nullable=False),  # PNG, 224x224 RGB
        pa.field("width", pa.int32(), nullable=False),  # of the original picture
        pa.field("height", pa.int32(), nullable=False),
    ]),
    "audio": pa.schema(BASE_FIELDS + [
        pa.field("wav", pa.binary(), nullable=False),  # WAV PCM16 mono 16 kHz
        pa.field("transcript", pa.string(), nullable=False),  # lowercase plain words
        pa.field("speaker", pa.string(), nullable=False),  # voice + its pitch/rate variant
        pa.field("voice_family", pa.string(), nullable=False),  # the registry voice, e.g. flite:awb
        pa.field("text_row_id", pa.string(), nullable=False),  # passage in the text dataset
        pa.field("duration_s", pa.float32(), nullable=False),
    ]),
}
SOURCES_BY_MODALITY = {"text": TEXT_SOURCES, "vision": IMAGE_SOURCES, "audio": VOICE_ENGINES}


def split_of(key: str, fractions: dict[str, float]) -> str:
    """Split of one source item, from a hash of its key alone: stable across seeds, sizes and machines,
    so an item never moves between train and heldout when a dataset grows."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    acc = 0.0
    for name in SPLIT_ORDER:
        acc += fractions[name]
        if u < acc:
            return name
    return SPLIT_ORDER[-1]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def table_content_hash(table: pa.Table) -> str:
    """sha256 over (row_id, content_sha) in row order: the dataset's identity, independent of Parquet
    encoding details, so two builds can be compared byte for byte without comparing files."""
    h = hashlib.sha256()
    for rid, csha in zip(table.column("row_id").to_pylist(), table.column("content_sha").to_pylist()):
        h.update(f"{rid}\0{csha}\n".encode())
    return h.hexdigest()


def _size(spec: DatasetSpec, profile: str) -> DatasetSize:
    if profile not in spec.sizes:
        raise ValueError(
            f"dataset {spec.name!r}: field 'sizes': no profile {profile!r}; has {sorted(spec.sizes)}"
        )
    size = spec.sizes[profile]
    if spec.modality != "vision" and size.views != 1:
        raise ValueError(
            f"dataset {spec.name!r}: field 'sizes.{profile}.views': {spec.modality} items have one view, "
            f"got {size.views}"
        )
    return size


def _check_sources(spec: DatasetSpec) -> None:
    known = SOURCES_BY_MODALITY[spec.modality]
    unknown = [s for s in spec.sources if s not in known]
    if unknown:
        raise ValueError(
            f"dataset {spec.name!r}: field 'sources': unknown {spec.modality} source(s) {unknown}; "
            f"known: {sorted(known)}"
        )
    names = set(spec.sources)
    if spec.modality == "audio":
        if not spec.voices:
            raise ValueError(f"dataset {spec.name!r}: field 'voices': audio needs at least one voice")
        for v in spec.voices:
            engine, _, voice = v.partition(":")
            if engine not in spec.sources or not voice:
                raise ValueError(
                    f"dataset {spec.name!r}: field 'voices': {v!r} must be '<engine>:<voice>' with the "
                    f"engine one of sources {spec.sources}"
                )
            try:
                base_family(v)
            except ValueError as e:
                raise ValueError(f"dataset {spec.name!r}: field 'voices': {e}") from e
        names |= set(spec.voices) | {base_family(v) for v in spec.voices}  # holding out a voice holds out its variants
    stray = [h for h in spec.heldout_sources if h not in names]
    if stray:
        raise ValueError(
            f"dataset {spec.name!r}: field 'heldout_sources': {stray} name no source"
            + (" or voice" if spec.modality == "audio" else "")
            + f"; known: {sorted(names)}"
        )


def _round_robin(iters: dict[str, Iterator], total: int) -> list[tuple[str, object]]:
    """One item from each source in turn until `total`; an exhausted source drops out and the others
    fill its share, so every source is represented and none is over-drawn while others have items."""
    active = list(iters)
    out: list[tuple[str, object]] = []
    while len(out) < total and active:
        for source in list(active):
            if len(out) >= total:
                break
            try:
                out.append((source, next(iters[source])))
            except StopIteration:
                active.remove(source)
    return out


def _split_for(spec: DatasetSpec, split_key: str, *families: str) -> str:
    if any(f in spec.heldout_sources for f in families):
        return "ood"
    return split_of(split_key, spec.split)


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------

def _build_text(spec: DatasetSpec, size: DatasetSize, seed: int, notes: dict) -> pa.Table:
    iters = {}
    for s in spec.sources:
        notes[s] = []
        iters[s] = TEXT_SOURCES[s](seed, notes[s])
    picked = _round_robin(iters, size.items)
    cols: dict[str, list] = {f.name: [] for f in SCHEMAS["text"]}
    for source, it in picked:
        cols["row_id"].append(f"{source}/{it.item}/0")
        cols["source"].append(source)
        cols["item"].append(it.item)
        cols["view"].append(0)
        cols["split"].append(_split_for(spec, f"{source}/{it.item}", source))
        cols["content_sha"].append(sha256_bytes(it.text.encode()))
        cols["text"].append(it.text)
    return pa.table(cols, schema=SCHEMAS["text"])


# --------------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------------

def _jitter_colour(im, rng: np.random.Generator):
    from PIL import Image

    x = np.asarray(im, dtype=np.float32)  # (H, W, 3)
    brightness, contrast, saturation = rng.uniform(0.75, 1.25), rng.uniform(0.75, 1.25), rng.uniform(0.6, 1.4)
    x = x * brightness
    x = (x - x.mean()) * contrast + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
    x = grey[..., None] + (x - grey[..., None]) * saturation
    return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8), "RGB")


def make_view(im, view: int, rng: np.random.Generator):
    """View 0 is the whole picture (centre square); others are random crops over many positions and
    scales, with flips, small rotations and colour jitter, so one source item yields inputs the teacher
    answers differently while their provenance stays one item for splitting."""
    from PIL import Image

    w, h = im.size
    short = min(w, h)
    if view == 0:
        x0, y0 = (w - short) / 2, (h - short) / 2
        return im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC, box=(x0, y0, x0 + short, y0 + short),
                         reducing_gap=2.0)
    # Small pictures (25 px faces) only tolerate mild crops before they are all blur.
    min_scale = float(np.clip(56.0 / short, 0.3, 0.85))
    side = rng.uniform(min_scale, 1.0) * short
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, side * np.sqrt(aspect)), min(h, side / np.sqrt(aspect))
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    angle = rng.uniform(-12, 12) if rng.random() < 0.5 else 0.0
    # Rotating then cropping the inscribed square hides the blank corners a rotation leaves.
    grow = abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle)))
    out_side = int(np.ceil(IMAGE_SIZE * grow))
    out = im.resize((out_side, out_side), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=2.0)
    if angle:
        out = out.rotate(angle, Image.BICUBIC)
        off = (out_side - IMAGE_SIZE) // 2
        out = out.crop((off, off, off + IMAGE_SIZE, off + IMAGE_SIZE))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        out = _jitter_colour(out, rng)
    return out


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


# Function matching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
# consistent"): every MIX_EVERY-th view (2, 4, ...) blends a crop of the item with a partner picture of the
# same split, by mixup or cutmix, so the student learns the teacher's function between pictures too.
MIX_EVERY = 2
MIX_BLOCK = 256  # partners come from the same block of items: memory stays bounded at any dataset size


def is_mix_view(view: int) -> bool:
    return view >= MIX_EVERY and view % MIX_EVERY == 0


def mix_images(a, b, rng: np.random.Generator):
    """(mixed picture, 'mixup'|'cutmix', weight of `a`): mixup blends the two pictures with a weight in
    [0.3, 0.7]; cutmix pastes a box of `b` covering 20-50% of `a`."""
    from PIL import Image

    x, y = np.asarray(a, dtype=np.float32), np.asarray(b.resize(a.size), dtype=np.float32)
    if rng.random() < 0.5:
        lam = float(rng.uniform(0.3, 0.7))
        out = lam * x + (1.0 - lam) * y
        kind = "mixup"
    else:
        h, w = x.shape[:2]
        area = rng.uniform(0.2, 0.5)
        bh, bw = int(round(h * np.sqrt(area))), int(round(w * np.sqrt(area)))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out = x.copy()
        out[y0:y0 + bh, x0:x0 + bw] = y[y0:y0 + bh, x0:x0 + bw]
        lam, kind = 1.0 - bh * bw / (h * w), "cutmix"
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB"), kind, lam


def _build_vision(spec: DatasetSpec, size: DatasetSize, seed: int, notes: dict) -> pa.Table:
    iters = {}
    for s in spec.sources:
        notes[s] = []
        iters[s] = IMAGE_SOURCES[s](seed, notes[s])
    picked = _round_robin(iters, size.items)
    splits = [_split_for(spec, f"{source}/{it.group or it.item}", source) for source, it in picked]
    mix_views = [v for v in range(size.views) if is_mix_view(v)]

    def render(pair):
        """Plain views as PNG; for each mix view the item's own crop (mixed once partners are known)."""
        source, it = pair
        try:
            im, width, height = it.load()
        except Exception as e:  # noqa: BLE001 - name the item whatever the decoder raised
            raise RuntimeError(f"dataset {spec.name!r}: source {source!r}: item {it.item!r} failed to load: "
                               f"{type(e).__name__}: {e}") from e
        rows, own, whole = {}, {}, None
        for view in range(size.views):
            row_id = f"{source}/{it.item}/{view}"
            picture = make_view(im, view, seeded_rng(seed, row_id))
            if view == 0:
                whole = picture  # the partner side of other items' mix views
            if view in mix_views:
                own[view] = picture
            else:
                rows[view] = (row_id, _png(picture))
        return rows, own, whole if mix_views else None, width, height

    cols: dict[str, list] = {f.name: [] for f in SCHEMAS["vision"]}
    from tqdm import tqdm

    mixed = Counter()
    progress = tqdm(total=len(picked), desc=f"{spec.name} images", unit="item", mininterval=2.0)
    with ThreadPoolExecutor(_workers()) as pool:
        for b0 in range(0, len(picked), MIX_BLOCK):
            block = list(range(b0, min(b0 + MIX_BLOCK, len(picked))))
            rendered = list(pool.map(render, [picked[i] for i in block]))

            def finish(k, block=block, rendered=rendered):
                i = block[k]
                source, it = picked[i]
                rows, own, _, width, height = rendered[k]
                group = it.group or it.item
                for view, picture in own.items():
                    row_id = f"{source}/{it.item}/{view}"
                    rng = seeded_rng(seed, row_id, "mix")
                    partners = [j for j in range(len(block)) if splits[block[j]] == splits[i]
                                and (picked[block[j]][1].group or picked[block[j]][1].item) != group]
                    if not partners:  # alone in its split within this block: a plain crop instead
                        rows[view] = (row_id, _png(picture))
                        continue
                    other = rendered[partners[int(rng.integers(len(partners)))]][2]
                    if rng.random() < 0.5:
                        other = other.transpose(0)  # Image.FLIP_LEFT_RIGHT
                    out, kind, _ = mix_images(picture, other, rng)
                    rows[view] = (row_id, _png(out))
                    mixed[kind] += 1
                return [rows[v] for v in range(size.views)], width, height

            for k, (rows, width, height) in enumerate(pool.map(finish, range(len(block)))):
                i = block[k]
                source, it = picked[i]
                for view, (row_id, png) in enumerate(rows):
                    cols["row_id"].append(row_id)
                    cols["source"].append(source)
                    cols["item"].append(it.item)
                    cols["view"].append(view)
                    cols["split"].append(splits[i])
                    cols["content_sha"].append(sha256_bytes(png))
                    cols["image"].append(png)
                    cols["width"].append(int(width))
                    cols["height"].append(int(height))
                progress.update(1)
    progress.close()
    if mix_views:
        planned = len(picked) * len(mix_views)
        notes["_views"] = [f"function-matching views: {mixed['mixup']} mixup + {mixed['cutmix']} cutmix of "
                           f"{planned} planned ({planned - sum(mixed.values())} plain crops: no partner in split)"]
    return pa.table(cols, schema=SCHEMAS["vision"])


# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------

def sentences_from_text(text_table: pa.Table, seed: int) -> list[dict]:
    """Speakable sentences of the text dataset, in a seeded order; each remembers its passage, whose
    key decides its split, so no passage's words are heard in two splits."""
    out = {}
    for source, item, text in zip(text_table.column("source").to_pylist(), text_table.column("item").to_pylist(),
                                  text_table.column("text").to_pylist()):
        for k, sentence in enumerate(speakable_sentences(text)):
            sid = f"{source}.{item}.s{k}"
            out[sid] = {"sid": sid, "split_key": f"{source}/{item}", "text_row_id": f"{source}/{item}/0",
                        "transcript": sentence}
    return [out[k] for k in hash_order(out, seed)]


VOICE_CHECK_TEXT = "The quick brown fox jumps over the lazy dog."


def _check_voices_distinct(spec: DatasetSpec, voices: list[str]) -> None:
    """Every registry voice must sound different: espeak-ng silently falls back to its default voice
    for an unknown variant ('en-gb+m5' is plain 'en-gb'; 'en+m5' is the variant), which would count one
    speaker twice. One short phrase per voice, same seed for all (~30 ms each)."""
    if len(voices) < 2:
        return

    def render(v):
        engine, _, voice = v.partition(":")
        return v, sha256_bytes(synthesize(engine, voice, VOICE_CHECK_TEXT, "voice-check")[1])

    by_sound: dict[str, list[str]] = {}
    with ThreadPoolExecutor(_workers()) as pool:
        for v, digest in pool.map(render, voices):
            by_sound.setdefault(digest, []).append(v)
    same = [vs for vs in by_sound.values() if len(vs) > 1]
    if same:
        raise ValueError(
            f"dataset {spec.name!r}: field 'voices': these voices render identical audio, so they are one "
            f"speaker (an unknown espeak variant falls back to the default voice; write 'en+m5', not "
            f"'en-gb+m5'): {same}"
        )


def _build_audio(spec: DatasetSpec, size: DatasetSize, seed: int, notes: dict,
                 text_table: pa.Table | None) -> pa.Table:
    if text_table is None:
        raise ValueError(
            f"dataset {spec.name!r}: field 'text_dataset': audio needs the rows of its text dataset "
            f"({spec.text_dataset!r}) passed as text_table"
        )
    missing = {"source", "item", "text"} - set(text_table.column_names)
    if missing:
        raise ValueError(f"dataset {spec.name!r}: text_table lacks columns {sorted(missing)}")
    sentences = sentences_from_text(text_table, seed)

    def cycle_voices(engine: str) -> Iterator[str]:
        return itertools.cycle([v.partition(":")[2] for v in spec.voices if v.partition(":")[0] == engine])

    iters = {}
    for engine in spec.sources:
        notes[engine] = []
        missing = engine_missing(engine)
        if missing:
            notes[engine].append(missing)
            continue
        iters[engine] = cycle_voices(engine)
    _check_voices_distinct(spec, [v for v in spec.voices if v.partition(":")[0] in iters])
    plan = _round_robin(iters, min(size.items, len(sentences)))
    if size.items > len(sentences):
        notes["_dataset"] = [f"only {len(sentences)} speakable sentences in text_table for {size.items} items"]
    jobs = []
    for (engine, voice), sent in zip(plan, sentences):
        item = f"{sent['sid']}@{voice}"
        jobs.append((engine, voice, sent, item))

    def run(job):
        engine, voice, sent, item = job
        spoken = sent["transcript"][0].upper() + sent["transcript"][1:] + "."
        return synthesize(engine, voice, spoken, f"{seed}:{engine}/{item}")

    cols: dict[str, list] = {f.name: [] for f in SCHEMAS["audio"]}
    from tqdm import tqdm

    with ThreadPoolExecutor(_workers()) as pool:
        results = pool.map(run, jobs)
        for (engine, voice, sent, item), (speaker, wav, samples) in tqdm(zip(jobs, results), total=len(jobs),
                                                                desc=f"{spec.name} speech", unit="utt",
                                                                mininterval=2.0):
            family = f"{engine}:{voice}"
            cols["row_id"].append(f"{engine}/{item}/0")
            cols["source"].append(engine)
            cols["item"].append(item)
            cols["view"].append(0)
            # a sox variant of a held-out voice is that voice too: never-seen as well
            cols["split"].append(_split_for(spec, sent["split_key"], engine, family, base_family(family)))
            cols["content_sha"].append(sha256_bytes(wav))
            cols["wav"].append(wav)
            # a recording (or a sox variant of one), not the sentence: nothing known was said
            recorded = base_family(family).partition(":")[0] in RECORDED_ENGINES
            cols["transcript"].append("" if recorded else sent["transcript"])
            cols["speaker"].append(speaker)
            cols["voice_family"].append(family)
            cols["text_row_id"].append("" if recorded else sent["text_row_id"])
            cols["duration_s"].append(samples / TARGET_SR)
    return pa.table(cols, schema=SCHEMAS["audio"])


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------

def build_probe_dataset(spec: DatasetSpec, profile: str, out_dir: Path, text_table: pa.Table | None = None,
                        seed: int = 0) -> dict:
    """Build `out_dir/rows.parquet` (and `summary.json` beside it) for one dataset and size profile.

    Same spec, profile, seed, installed corpora and text_table give the same `content_sha256`."""
    t0 = time.perf_counter()
    size = _size(spec, profile)
    _check_sources(spec)
    notes: dict[str, list[str]] = {}
    if spec.modality == "text":
        table = _build_text(spec, size, seed, notes)
    elif spec.modality == "vision":
        table = _build_vision(spec, size, seed, notes)
    else:
        table = _build_audio(spec, size, seed, notes, text_table)
    if table.num_rows == 0:
        raise RuntimeError(f"dataset {spec.name!r}: every source was empty: {notes}")
    ids = table.column("row_id").to_pylist()
    if len(set(ids)) != len(ids):
        dupes = [k for k, n in Counter(ids).items() if n > 1][:5]
        raise RuntimeError(f"dataset {spec.name!r}: duplicate row_ids {dupes}")

    out_dir = Path(out_dir)
    path = out_dir / ROWS_FILE
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=256)

    items = {(s, i) for s, i in zip(table.column("source").to_pylist(), table.column("item").to_pylist())}
    sources = table.column("source").to_pylist()
    summary = {
        "dataset": spec.name,
        "modality": spec.modality,
        "profile": profile,
        "seed": seed,
        "requested_items": size.items,
        "views": size.views,
        "items": len(items),
        "rows": table.num_rows,
        "rows_per_split": dict(sorted(Counter(table.column("split").to_pylist()).items())),
        "rows_per_source": {s: sources.count(s) for s in spec.sources},
        "items_per_source": {s: sum(1 for src, _ in items if src == s) for s in spec.sources},
        "empty_sources": [s for s in spec.sources if s not in sources],
        "heldout_sources": list(spec.heldout_sources),
        "notes": {k: v for k, v in notes.items() if v},
        "bytes": path.stat().st_size,
        "content_sha256": table_content_hash(table),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "file": ROWS_FILE,
    }
    if spec.modality == "audio":
        summary["rows_per_voice_family"] = dict(sorted(Counter(table.column("voice_family").to_pylist()).items()))
        summary["voice_families"] = len(summary["rows_per_voice_family"])  # speaker identities
        summary["speakers"] = len(set(table.column("speaker").to_pylist()))  # + espeak pitch/rate variants
        summary["audio_seconds"] = round(float(sum(table.column("duration_s").to_pylist())), 1)
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def read_probe_rows(out_dir: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The probe's rows (only `columns` of those the table has, when given)."""
    path = Path(out_dir) / ROWS_FILE
    if columns is not None:
        columns = [c for c in columns if c in pq.read_schema(path).names]
    return pq.read_table(path, columns=columns)


def main(argv: list[str] | None = None) -> None:
    import json

    from nexus_assets.core.paths import artifact_dir
    from nexus_assets.core.registry import active_profile, load_registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--profile", default=active_profile())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    reg = load_registry()
    spec = reg.dataset(args.dataset)
    text_table = None
    if spec.text_dataset:
        text_dir = artifact_dir("probe", spec.text_dataset)
        if not (text_dir / ROWS_FILE).exists():
            build_probe_dataset(reg.dataset(spec.text_dataset), args.profile, text_dir, seed=args.seed)
        text_table = read_probe_rows(text_dir)
    summary = build_probe_dataset(spec, args.profile, artifact_dir("probe", spec.name), text_table, args.seed)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
