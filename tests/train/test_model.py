"""The Llama decoder: shapes, causality, RoPE, and 1:1 parity with transformers.LlamaForCausalLM."""

import pytest
import torch

from losskit.train.model import (
    LlamaLM,
    ModelConfig,
    apply_rope,
    hf_llama_config_dict,
    rope_cos_sin,
    swiglu_hidden_size,
)

TINY = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=swiglu_hidden_size(32), block_size=16)


def test_swiglu_width_matches_tiny_lm():
    assert swiglu_hidden_size(64) == 176  # spec/service.md §3: hidden 64 -> intermediate 176


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    m = LlamaLM(TINY).eval()
    x = torch.randint(0, 264, (2, 11))
    out = m(x)
    assert out.shape == (2, 11, 264)
    y = x.clone()
    y[:, 7:] = torch.randint(0, 264, (2, 4))
    # changing tokens at t >= 7 leaves the logits at t < 7 unchanged
    torch.testing.assert_close(m(y)[:, :7], out[:, :7], rtol=0, atol=0)


def test_rope_is_a_rotation_matching_the_complex_form():
    # plain-torch oracle: rotate pairs (x_i, x_{i+d/2}) by angle t * theta^(-2i/d) as complex numbers
    d, T = 8, 5
    x = torch.randn(1, 1, T, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(T, d, 10000.0, "cpu", torch.float64)
    got = apply_rope(x, cos, sin)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv.float().double()
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(ang), ang)
    want = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))


def test_bad_head_config_raises():
    with pytest.raises(ValueError, match="n_embd"):
        LlamaLM(ModelConfig(n_embd=30, n_head=4, n_kv_head=4))


def test_sequence_longer_than_block_size_raises():
    with pytest.raises(ValueError, match="block_size"):
        LlamaLM(TINY)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bias,kv", [(False, 4), (True, 2)])
def test_state_dict_and_logits_equal_hf_llama(bias, kv):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, intermediate_size=96, block_size=16, bias=bias)
    torch.manual_seed(0)
    ours = LlamaLM(cfg).eval()
    if bias:  # non-zero biases so that a dropped bias would show
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    hf = LlamaForCausalLM(LlamaConfig(**hf_llama_config_dict(cfg))).eval()
    assert set(hf.state_dict()) == set(ours.state_dict())
    hf.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randint(0, 264, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_generate_greedy_is_deterministic_and_stops():
    torch.manual_seed(0)
    m = LlamaLM(TINY).eval()
    idx = torch.tensor([[257, 65, 66]])
    a = m.generate(idx, 20, temperature=0)
    b = m.generate(idx, 20, temperature=0)
    assert torch.equal(a, b) and a.shape[1] == 23
    g = torch.Generator().manual_seed(1)
    c = m.generate(idx, 5, temperature=1.0, top_k=5, generator=g)
    assert c.shape == (1, 8)
