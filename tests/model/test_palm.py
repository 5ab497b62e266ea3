"""The PaLM module: parameter counts, parallel block, rotary embeddings, attention, KV cache, autocast, compile."""

import math

import pytest
import torch
import torch.nn.functional as F

from palmkit.model.loss import lm_loss
from palmkit.model.palm import KVCache, apply_rotary, build_model, causal_attention, preset
from tests.conftest import random_model


@pytest.mark.parametrize(("name", "billions"), [("palm-8b", 8.63), ("palm-62b", 62.50), ("palm-540b", 540.35)])
def test_paper_parameter_counts(name, billions):
    model = build_model(preset(name), device="meta")
    assert abs(model.num_params() / 1e9 - billions) / billions < 0.005
    assert model.num_params() == model.config.num_params()


def test_cpu_presets_sizes():
    assert build_model(preset("tiny"), "meta").num_params() < 2_000_000
    assert 18e6 < build_model(preset("small"), "meta").num_params() < 30e6
    assert 100e6 < build_model(preset("base"), "meta").num_params() < 150e6


def test_no_biases_and_tied_embeddings():
    model = random_model(300)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    assert model.layers[0].self_attn.k_proj.weight.shape[0] == model.config.head_dim  # one shared KV head
    assert sum("input_layernorm" in n for n in names) == model.config.n_layers  # one LayerNorm per block


def test_parallel_block_matches_formula():
    torch.manual_seed(0)
    model = random_model(300)
    block = model.layers[0]
    x = torch.randn(2, 7, model.config.d_model)
    positions = torch.arange(7).expand(2, 7)
    cos, sin = model.rope_cos[positions].unsqueeze(1), model.rope_sin[positions].unsqueeze(1)
    h = F.layer_norm(x, (model.config.d_model,), block.input_layernorm.weight, None, 1e-5)
    # Independent attention: explicit heads, explicit causal softmax.
    att = block.self_attn
    q = att.q_proj(h).view(2, 7, att.n_heads, -1).transpose(1, 2)
    k = att.k_proj(h).view(2, 7, 1, -1).transpose(1, 2)
    v = att.v_proj(h).view(2, 7, 1, -1).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    a = att.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, -1))
    m = block.mlp.down_proj(F.silu(block.mlp.gate_proj(h)) * block.mlp.up_proj(h))
    torch.testing.assert_close(block(x, cos, sin), x + a + m, atol=1e-5, rtol=1e-5)


def test_rotary_is_a_rotation_of_interleaved_pairs():
    x = torch.randn(1, 1, 3, 8)
    angle = torch.tensor([0.3, 0.3, 1.1, 1.1, -0.7, -0.7, 2.0, 2.0])
    y = apply_rotary(x, angle.cos(), angle.sin())
    for i in range(4):
        a = angle[2 * i]
        x0, x1 = x[..., 2 * i], x[..., 2 * i + 1]
        torch.testing.assert_close(y[..., 2 * i], x0 * a.cos() - x1 * a.sin())
        torch.testing.assert_close(y[..., 2 * i + 1], x1 * a.cos() + x0 * a.sin())
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_causal_attention_equals_sdpa(kv_heads):
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k, v = torch.randn(2, kv_heads, 9, 8, requires_grad=True), torch.randn(2, kv_heads, 9, 8, requires_grad=True)
    g = torch.randn(2, 4, 9, 8)
    got = causal_attention(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v), g)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_lowers_only_matmuls_and_attention():
    from torch.utils._python_dispatch import TorchDispatchMode

    class OutputDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: dict[str, set] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, tuple | list) else out
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                self.seen.setdefault(func.overloadpacket.__name__, set()).add(first.dtype)
            return out

    model = random_model(300).train()
    x = torch.randint(0, 300, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16), OutputDtypes() as mode:
        total, _, _ = model(x, targets=x)
        total.backward()
    seen = mode.seen
    assert seen["mm"] == seen["_scaled_dot_product_flash_attention_for_cpu"] == {torch.bfloat16}
    # LayerNorm, the embedding and the residual stream stay fp32 (CPU autocast lowers no elementwise op)
    assert seen["native_layer_norm"] == seen["embedding"] == {torch.float32}
    assert total.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_forward_with_targets_is_the_loss_of_the_logits():
    model = random_model(300).train()
    x, y = torch.randint(0, 300, (2, 9)), torch.randint(0, 300, (2, 9))
    total, ce, z = model(x, targets=y)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = lm_loss(model(x), y, model.config.z_loss)
    ref[0].backward()
    torch.testing.assert_close(torch.stack([total, ce, z]), torch.stack(ref).detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_training_forward_compiles_without_graph_breaks(dtype, tol):
    model = random_model(300).train()
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        total, _, _ = compiled(x, targets=y)
    total.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with autocast:
        eager = model(x, targets=y)[0]
    eager.backward()
    torch.testing.assert_close(total, eager, rtol=tol, atol=tol)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=10 * tol, atol=tol, msg=n)


def test_initialisation_follows_palm():
    model = build_model(preset("small", vocab_size=4000), seed=0)
    assert abs(model.embed_tokens.weight.std().item() - 1.0) < 0.02
    w = model.layers[0].mlp.down_proj.weight
    assert abs(w.std().item() - w.shape[1] ** -0.5) < 0.1 * w.shape[1] ** -0.5
    assert model.logit_scale == pytest.approx(384 ** -0.5)


def test_padding_mask_left_padded_rows_equal_unpadded():
    model = random_model(300)
    seq = torch.randint(3, 300, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    pad_mask = torch.tensor([[False] * 3 + [True] * 6])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        full = model(seq)
        left = model(padded, positions=positions, pad_mask=pad_mask)
    assert torch.isfinite(left).all()
    torch.testing.assert_close(left[:, 3:], full, atol=1e-5, rtol=1e-5)


def test_incremental_logits_equal_full_forward():
    model = random_model(300, n_kv_heads=2)
    seq = torch.randint(3, 300, (2, 12))
    cache = KVCache(model.config, 2, 16)
    with torch.no_grad():
        full = model(seq)
        parts = [model(seq[:, :5], torch.arange(5).expand(2, 5), cache=cache)]
        for t in range(5, 12):
            parts.append(model(seq[:, t:t + 1], torch.full((2, 1), t), cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_context_overflow_is_a_clear_error():
    model = random_model(300)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))


def test_bf16_keeps_rotary_tables_fp32():
    model = random_model(300).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32
    assert model(torch.randint(0, 300, (1, 4))).dtype == torch.bfloat16
