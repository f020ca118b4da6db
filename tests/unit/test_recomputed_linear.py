"""linear_of: a linear layer that keeps its input's producer for backward (the MLP keeps c_fc's
output, not gelu's) gives the plain path's outputs and gradients, and saves less."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.model.layers import Attention, Mlp, QuickGELU, ResidualBlock


def _plain_mlp(m: Mlp, x: torch.Tensor) -> torch.Tensor:
    return m.c_proj(m.gelu(m.c_fc(x)))


def _plain_attention(a: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    qkv = F.linear(x, a.in_proj_weight, a.in_proj_bias).view(b, n, 3, a.heads, d // a.heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return a.out_proj(out.transpose(1, 2).reshape(b, n, d))


def _grads(module: torch.nn.Module, fn, x: torch.Tensor, g: torch.Tensor):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(g)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("quick", [False, True])
def test_mlp_matches_the_plain_ops(quick):
    torch.manual_seed(0)
    m = Mlp(32, 128, quick)
    x, g = torch.randn(4, 9, 32), torch.randn(4, 9, 32)
    out, gx, gp = _grads(m, m, x, g)
    ref, rgx, rgp = _grads(m, lambda t: _plain_mlp(m, t), x, g)
    assert torch.equal(out, ref)  # the same forward ops: bitwise
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-6)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], rtol=1e-5, atol=1e-6)


def test_attention_matches_the_plain_ops():
    torch.manual_seed(0)
    a = Attention(32, 4)
    x, g = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    out, gx, gp = _grads(a, a, x, g)
    ref, rgx, rgp = _grads(a, lambda t: _plain_attention(a, t), x, g)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-6)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quick", [False, True])
def test_float64_gradients_equal_the_plain_ops_and_gradcheck(quick):
    torch.manual_seed(0)
    block = ResidualBlock(16, 2, 2.0, quick).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block(t), (x,))
    g = torch.randn(2, 5, 16, dtype=torch.float64)
    for module, plain in ((block.mlp, _plain_mlp), (block.attn, _plain_attention)):
        out, gx, gp = _grads(module, module, x, g)
        ref, rgx, rgp = _grads(module, lambda t, m=module, f=plain: f(m, t), x, g)
        torch.testing.assert_close(gx, rgx, rtol=1e-12, atol=1e-12)
        for name in gp:
            torch.testing.assert_close(gp[name], rgp[name], rtol=1e-12, atol=1e-12)


def test_bf16_autocast_matches_the_plain_path():
    torch.manual_seed(0)
    m = Mlp(64, 256, True)
    x, g = torch.randn(8, 64), torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, gx, gp = _grads(m, m, x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, rgx, rgp = _grads(m, lambda t: _plain_mlp(m, t), x, g)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, rgx, rtol=2e-2, atol=2e-2)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], rtol=3e-2, atol=3e-2)


def _saved_bytes(fn, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


def test_saves_less_than_the_plain_ops():
    torch.manual_seed(0)
    x = torch.randn(4, 50, 64, requires_grad=True)
    m = Mlp(64, 256, True)
    hidden = 4 * 50 * 256 * 4  # bytes of one [4, 50, 256] fp32 tensor: gelu's output
    assert _saved_bytes(lambda t: _plain_mlp(m, t), x) - _saved_bytes(m, x) == hidden


def test_inference_takes_the_plain_path():
    m = Mlp(16, 32, False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(m(x), _plain_mlp(m, x))
    assert isinstance(QuickGELU()(x), torch.Tensor)
