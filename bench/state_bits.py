"""Does rounding the cached state scores to 4 or 8 bits change what the carved text tower learns from them?

The state loss (`losses.token_state_loss`) is a regression onto the teacher's cached PCA scores, so what
matters is its gradient. For each batch of the default's SmolLM2 probe rows this computes the loss and its
gradient with respect to every parameter of a 12-block carve of SmolLM2 (the teacher's blocks 0-2, 10, 11,
20, 22-24, 27-29, the default carve's depths at full width, before any training: where the state loss
starts) twice: against the exact scores, and against the scores encoded and decoded at `--bits`
(`core/quantized_scores.py`), and prints the gradients' cosine, the relative size of their difference and the
loss values, per batch and overall, next to the cosine between consecutive batches' exact gradients (the noise
SGD lives with anyway). A cosine near 1 means the student is pushed the same way. The rounding noise is
unbiased and independent across tokens, so it averages out in a batch's gradient; late in training, when the
student's own error is smaller, the same noise is a larger share of it (roughly as the square root of the
loss ratio), which this measures only at the start.

Run (no pipeline needed; the probe data and snapshot are built in a temporary folder):
    .venv/bin/python bench/state_bits.py --rows 64 --bits 4 8
    .venv/bin/python bench/state_bits.py --rows 64 --bits 4 --near-teacher 0.05   # a small-loss student
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

KEPT_BLOCKS = [0, 1, 2, 10, 11, 20, 22, 23, 24, 27, 28, 29]  # the default carve (registry comment)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64, help="probe rows the gradients are measured on")
    ap.add_argument("--fit-rows", type=int, default=128, help="train rows the state basis is fitted on first")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--near-teacher", type=float, default=0.0, help="instead of the carve: the whole teacher with "
                    "Gaussian noise of this size (relative to each tensor's std) on its weights, a student whose state "
                    "loss is small, as late in training")
    ap.add_argument("--probe", default="", help="a built text probe folder (e.g. the pipeline's); default: build one")
    args = ap.parse_args()

    import numpy as np
    import torch

    from nexus_assets.core.quantized_scores import component_scale, dequantize_scores, quantize_scores
    from nexus_assets.core.registry import load_registry
    from nexus_assets.probes.probe_data import build_probe_dataset, read_probe_rows
    from nexus_assets.teachers.base import load_teacher
    from nexus_assets.teachers.causal_lm import fit_state_basis
    from nexus_assets.teachers.snapshot import build_snapshot
    from nexus_assets.training.losses import token_state_loss

    torch.manual_seed(0)
    reg = load_registry()
    spec = reg.teacher("smollm2-135m")
    layers = spec.extraction.state_layers
    tmp = Path(tempfile.mkdtemp(prefix="nexus-state-bits-"))
    if not args.probe:
        build_probe_dataset(reg.dataset(spec.dataset), args.profile, tmp / "probe")
    probe = read_probe_rows(Path(args.probe) if args.probe else tmp / "probe")
    splits, texts = probe.column("split").to_pylist(), probe.column("text").to_pylist()
    train = [t for s, t in zip(splits, texts) if s == "train"]
    fit, rows = train[:args.fit_rows], train[args.fit_rows:args.fit_rows + args.rows]
    build_snapshot(spec, tmp / "snap", log=lambda s: None)
    teacher = load_teacher(spec, tmp / "snap")
    basis = fit_state_basis(teacher, fit, layers, spec.extraction.state_rank, spec.extraction.batch_size)

    student = copy.deepcopy(teacher.model)
    for p in student.parameters():  # a GGUF-loaded model refuses .float(); its tensors do not
        p.data = p.data.float()
        p.requires_grad_(True)
    if args.near_teacher > 0:
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * args.near_teacher * p.std())
        depth = {name: int(name.split(".")[1]) for name in layers}
    else:
        student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in KEPT_BLOCKS])
        student.config.num_hidden_layers = len(KEPT_BLOCKS)
        for i, layer in enumerate(student.model.layers):
            layer.self_attn.layer_idx = i
        # teacher hidden_states[i] is block i-1's output; the student's index of that block's output
        depth = {name: KEPT_BLOCKS.index(int(name.split(".")[1]) - 1) + 1 for name in layers}
    params = [p for p in student.parameters() if p.requires_grad]

    def grads(h_student, targets, mask):
        loss = sum(token_state_loss(h_student[depth[n]], targets[n], basis[n]["mean"], basis[n]["components"],
                                    basis[n]["variances"], mask) for n in layers)
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(loss), torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                       for x, p in zip(g, params)]).double()  # float64: 100M-long dot products

    totals = {b: [] for b in args.bits}
    bs = spec.extraction.batch_size
    print(f"{'batch':>5s} {'bits':>4s} {'loss exact':>10s} {'loss coded':>10s} {'grad cosine':>11s} {'|dg|/|g|':>9s}")
    for start in range(0, len(rows), bs):
        enc = teacher.tokenize(rows[start:start + bs])
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        with torch.no_grad():
            hs = teacher.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        exact = {n: ((hs[int(n.split(".")[1])].float() - basis[n]["mean"]) @ basis[n]["components"].T) for n in layers}
        keep = mask.clone()
        keep[:, 0] = False  # each row's first token: the attention sink, as the pipeline leaves it out
        h_student = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        loss_e, g_e = grads(h_student, exact, keep)
        for bits in args.bits:
            coded = {}
            for n in layers:
                flat = exact[n].reshape(-1, exact[n].shape[-1]).numpy()
                c = component_scale(basis[n]["variances"])
                back = dequantize_scores(*quantize_scores(flat, c, bits), c, bits)
                coded[n] = torch.from_numpy(back).reshape(exact[n].shape)
            loss_c, g_c = grads(h_student, coded, keep)
            cos = float(torch.nn.functional.cosine_similarity(g_e, g_c, dim=0))
            rel = float((g_c - g_e).norm() / g_e.norm())
            totals[bits].append((loss_e, loss_c, cos, rel, g_e, g_c))
            print(f"{start // bs:5d} {bits:4d} {loss_e:10.4f} {loss_c:10.4f} {cos:11.6f} {rel:9.5f}", flush=True)
    exact_grads = [x[4] for x in next(iter(totals.values()))]
    between = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(exact_grads, exact_grads[1:])]
    print(f"for scale, SGD's own noise: exact-target gradients of consecutive batches, cosine mean "
          f"{np.mean(between):.4f}" if between else "one batch: no batch-to-batch comparison")
    for bits, t in totals.items():
        g_e, g_c = sum(x[4] for x in t), sum(x[5] for x in t)  # the gradient of all batches together
        cos = float(torch.nn.functional.cosine_similarity(g_e, g_c, dim=0))
        print(f"{bits}-bit, {len(t)} batches of {bs}: loss {np.mean([x[0] for x in t]):.4f} exact vs "
              f"{np.mean([x[1] for x in t]):.4f} coded; per-batch gradient cosine min {min(x[2] for x in t):.6f}, "
              f"mean {np.mean([x[2] for x in t]):.6f}; summed gradient cosine {cos:.6f}, "
              f"|dg|/|g| {float((g_c - g_e).norm() / g_e.norm()):.5f}")


if __name__ == "__main__":
    main()
