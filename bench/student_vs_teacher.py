"""Student (fp32, int8) vs teacher, per capability, measured in one run on one machine.

For each default capability: parameters, bytes on disk, and latency at batch 1 and 32 of
  * the student tower, fp32 (from a bundle's towers, tower folders, or a default-config tower with
    random weights: latency and size do not depend on the weights),
  * the same tower int8 on disk, loaded two ways: dequantized to fp32 (the runtime default) and with
    torch dynamic int8 matmuls (`int8_compute="dynamic"`),
  * its teacher, loaded by its adapter in nexus_assets/teachers (a benchmark may load teachers; the
    runtime never does), from a snapshot under NEXUS_HOME/teacher_snapshot (built if missing).
Ratios are printed next to the retention recorded in a bundle manifest when --bundle is given.

Run:
    .venv/bin/python bench/student_vs_teacher.py                       # default towers, random weights
    .venv/bin/python bench/student_vs_teacher.py --bundle data/artifacts/quantized_bundle/default
    .venv/bin/python bench/student_vs_teacher.py --no-teachers --reps 3 # student side only (fast)
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CAPS = {"text.generate": "text", "text.embed": "text", "vision.classify": "vision",
        "audio.speaker_embed": "audio", "audio.transcribe": "audio"}


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def _inputs(cfg, cap: str, b: int) -> dict:
    """Full-length text, 3 s of audio, a 16-token transcript prefix."""
    from nexus_assets.student.quantize import calibration_inputs

    return calibration_inputs(cfg, cap, b, text_len=cfg.max_len, dec_tokens=16)


def _tower_dirs(args, tmp: Path) -> dict[str, Path]:
    if args.bundle:
        m = json.loads((Path(args.bundle) / "manifest.json").read_text())
        return {t: Path(args.bundle) / v["path"] for t, v in m["towers"].items()}
    from nexus_assets.student.tower import StudentTower, save_tower
    from nexus_assets.student.examples import example_tower_config

    out = {}
    for t in ("text", "vision", "audio"):
        cfg = example_tower_config(t)
        tower = StudentTower(cfg)
        for cap in cfg.capabilities:
            tower.add_adapter(cap)
        out[t] = save_tower(tower, tmp / "fp32" / t)
    return out


def _student_rows(dirs: dict[str, Path], tmp: Path, reps: int) -> dict:
    from nexus_assets.student.quantize import dynamic_int8, file_scheme, output_rel_error, quantize_file
    from nexus_assets.student.tower import weight_files
    from nexus_assets.runtime.bundle import _load_student

    rows = {}
    for t, d in dirs.items():
        fp32_dir, int8_dir = tmp / "s_fp32" / t, tmp / "s_int8" / t
        shutil.copytree(d, fp32_dir, ignore=shutil.ignore_patterns("tokenizer", "classes.json"))
        shutil.copytree(d, int8_dir, ignore=shutil.ignore_patterns("tokenizer", "classes.json"))
        # a carved tower keeps its backbone as a stock model under hf/: it is quantized in a bundle too
        for f in weight_files(d):
            if file_scheme(d / f) != "none":  # a bundle's tower: rebuild fp32 from the dequantized weights
                from safetensors.torch import save_file

                from nexus_assets.student.quantize import load_state
                save_file(load_state(d / f), str(fp32_dir / f))
            quantize_file(fp32_dir / f, int8_dir / f, "int8")
        size = lambda p: sum(x.stat().st_size for x in p.rglob("*") if x.is_file())  # noqa: E731
        fp32, deq = _load_student(fp32_dir), _load_student(int8_dir)
        dyn = dynamic_int8(deq)
        for cap in fp32.cfg.capabilities:
            r = {"params": sum(p.numel() for p in fp32.parameters()), "bytes_fp32": size(fp32_dir),
                 "bytes_int8": size(int8_dir)}
            for b in (1, 32):
                x = _inputs(fp32.cfg, cap, b)
                for name, m in (("fp32", fp32), ("int8_deq", deq), ("int8_dyn", dyn)):
                    with torch.no_grad():
                        r[f"ms_{name}_b{b}"] = _time(lambda: m(x, cap), reps)
            with torch.no_grad():
                x = _inputs(fp32.cfg, cap, 4)
                r["int8_deq_rel_err"] = output_rel_error(fp32, deq, cap, x)
                r["int8_dyn_rel_err"] = output_rel_error(fp32, dyn, cap, x)
            rows[cap] = r
    return rows


def wav_bytes(seconds: float = 0.4, freq: float = 220.0, seed: int = 0) -> bytes:
    """A 16 kHz mono PCM WAV of a noisy tone (latency does not depend on what is said)."""
    import io
    import wave

    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.normal(size=t.size)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def png_bytes(seed: int = 0, size: int = 40) -> bytes:
    """A random RGB PNG of size x size pixels."""
    import io

    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _teacher_rows(reps: int) -> dict:
    from nexus_assets.core.paths import artifacts_root
    from nexus_assets.core.registry import load_registry
    from nexus_assets.teachers.base import load_teacher
    from nexus_assets.teachers.snapshot import build_snapshot

    reg = load_registry()
    # long enough that every text teacher truncates it at its extraction.max_length (64 tokens), the
    # length the student is timed at (`_inputs`): both sides see the same number of tokens
    text = " ".join(["The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."] * 6)
    row = {"text": {"text": text}, "vision": {"image": png_bytes(0, 224)}, "audio": {"wav": wav_bytes(3.0)}}
    out = {}
    for spec in reg.enabled_teachers():
        snap = artifacts_root() / "teacher_snapshot" / spec.name
        try:
            if not (snap / "manifest.json").exists():
                build_snapshot(spec, snap, log=lambda *_: None)
            teacher = load_teacher(spec, snap, "cpu", dtype="float32")  # both sides float32, as the table says
        except Exception as e:  # a missing teacher package: say so, keep benchmarking the rest
            print(f"  teacher {spec.name}: not loaded ({type(e).__name__}: {e})")
            continue
        weight_bytes = sum(p.stat().st_size for p in snap.rglob("*") if p.is_file() and p.suffix in
                           {".safetensors", ".bin", ".pth", ".pt", ".gguf"})
        r = {"teacher": spec.name, "params": teacher.num_parameters(), "bytes": weight_bytes}
        for b in (1, 32):
            rows = [dict(row[spec.modality], row_id=f"r{i}") for i in range(b)]
            r[f"ms_b{b}"] = _time(lambda: teacher.forward(rows), max(1, reps // (4 if b == 32 else 1)))
        for cap in spec.capabilities:
            out[cap] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle folder: benchmark its towers and print its retention")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-teachers", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        students = _student_rows(_tower_dirs(args, tmp), tmp, args.reps)
    teachers = {} if args.no_teachers else _teacher_rows(args.reps)
    retention = {}
    if args.bundle:
        m = json.loads((Path(args.bundle) / "manifest.json").read_text())
        for cap, r in m.get("retention", {}).items():
            s = ((r.get("after_quantization") or {}).get("splits") or {}).get(r["gate_split"]) or {}
            retention[cap] = s.get("retention")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; latency = median ms of the forward pass "
          "(generate/transcribe: one teacher-forced pass, not a full decode)")
    hdr = (f"{'capability':<20} {'params':>11} {'MB fp32':>8} {'MB int8':>8} {'b1 fp32':>8} {'b1 deq':>7} "
           f"{'b1 dyn':>7} {'b32 fp32':>9} {'b32 dyn':>8} {'err deq':>8} {'err dyn':>8} | {'teacher':<18} "
           f"{'params':>11} {'MB':>7} {'b1':>8} {'b32':>9} | {'params x':>8} {'b32 x':>7} {'retention':>9}")
    print(hdr)
    for cap in CAPS:
        s, t = students.get(cap), teachers.get(cap, {})
        if s is None:
            continue
        ratio_p = t["params"] / s["params"] if t else None
        ratio_l = t["ms_b32"] / s["ms_int8_dyn_b32"] if t else None
        f = lambda v, w, nd=1: f"{v:>{w}.{nd}f}" if isinstance(v, float) else f"{'-':>{w}}"  # noqa: E731
        print(f"{cap:<20} {s['params']:>11,} {s['bytes_fp32'] / 1e6:>8.1f} {s['bytes_int8'] / 1e6:>8.1f} "
              f"{s['ms_fp32_b1']:>8.2f} {s['ms_int8_deq_b1']:>7.2f} {s['ms_int8_dyn_b1']:>7.2f} "
              f"{s['ms_fp32_b32']:>9.1f} {s['ms_int8_dyn_b32']:>8.1f} {s['int8_deq_rel_err']:>8.4f} "
              f"{s['int8_dyn_rel_err']:>8.4f} | {t.get('teacher', '-'):<18} {t.get('params', 0):>11,} "
              f"{t.get('bytes', 0) / 1e6:>7.1f} {f(t.get('ms_b1'), 8)} {f(t.get('ms_b32'), 9)} | "
              f"{f(ratio_p, 8)} {f(ratio_l, 7)} {f(retention.get(cap), 9, 3)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"students": students, "teachers": teachers, "retention": retention},
                                              indent=2))


if __name__ == "__main__":
    main()
