"""Hidden-size carving (SliceGPT-style rotation): known answers on a tiny Llama built from a config."""
import pytest
import torch

from nexus_assets.training.carve_hidden import direction_second_moment, hidden_basis, slice_llama_state


def _llama(uniform_final_gain: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=32, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
            elif "norm" in n:
                p.uniform_(0.5, 1.5)
        if uniform_final_gain:
            m.model.norm.weight.fill_(1.3)
    return m, cfg


def _logits(cfg, sd, k, ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "hidden_size": k})).eval()
    m.load_state_dict(sd, strict=False)
    m.tie_weights()
    with torch.no_grad():
        return m(input_ids=ids).logits


def _reference(uniform_final_gain: bool):
    """(config, state dict without the tied head, input ids, the unrotated model's logits)."""
    m, cfg = _llama(uniform_final_gain)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = m(input_ids=ids).logits
    return cfg, {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}, ids, want


def test_rotation_without_slicing_keeps_the_function():
    cfg, sd, ids, want = _reference(uniform_final_gain=True)
    # the identity folds the norm gains into the linears; a random rotation is exact only because this
    # final gain is uniform (a per-channel one cannot ride on the tied embedding: the module docstring)
    for q in (torch.eye(32), torch.linalg.qr(torch.randn(32, 32))[0]):
        torch.testing.assert_close(_logits(cfg, slice_llama_state(sd, q), 32, ids), want, atol=1e-4, rtol=1e-4)


def test_a_per_channel_final_gain_is_only_approximated_after_a_rotation():
    cfg, sd, ids, want = _reference(uniform_final_gain=False)
    torch.testing.assert_close(_logits(cfg, slice_llama_state(sd, torch.eye(32)), 32, ids), want, atol=1e-4, rtol=1e-4)
    q = torch.linalg.qr(torch.randn(32, 32))[0]
    assert (_logits(cfg, slice_llama_state(sd, q), 32, ids) - want).abs().max() > 1e-2


def test_hidden_basis_finds_a_planted_subspace_and_ignores_token_norms():
    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(16, 3))[0]  # (16, 3)
    x = torch.randn(2, 50, 3) @ basis.T + 1e-3 * torch.randn(2, 50, 16)
    x[0, 0] *= 1e4  # an attention sink: its norm must not set the basis
    m, n = direction_second_moment(x, torch.ones(2, 50, dtype=torch.bool))
    assert n == 100
    q, kept = hidden_basis(m, 3)
    assert kept > 0.999
    torch.testing.assert_close(q @ q.T, basis @ basis.T, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="k must be in 1..16"):
        hidden_basis(m, 17)
