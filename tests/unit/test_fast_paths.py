"""Speed/memory paths of the model layers compute what the plain expressions compute:

- the last transformer block computed only at the pooled position (class token / end token)
  gives the outputs and gradients of computing every position and selecting afterwards;
- QuickGELU's memory-saving autograd function gives the plain expression's values and gradients.
"""

from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.model.layers import QuickGELU


def tokens_of_lengths(lengths: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    tok = torch.zeros(len(lengths), 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        tok[i, 0] = 49406
        tok[i, 1 : n + 1] = torch.randint(1, 49405, (n,), generator=g)
        tok[i, n + 1] = 49407
    return tok


def both_ways(model, fn):
    outs = []
    for pooled in (True, False):
        model.visual.transformer.pooled_last_block = pooled
        model.text.transformer.pooled_last_block = pooled
        outs.append(fn())
    return outs


@pytest.mark.parametrize("name", ["nano", "tiny"])
def test_pooled_last_block_outputs_equal_full_computation(name):
    model = clipforge.create_model(name, seed=0).eval().double()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = tokens_of_lengths([3, 20, 0, 9])
    with torch.no_grad():
        (i1, t1), (i2, t2) = both_ways(model, lambda: (model.encode_image(images), model.encode_text(tokens)))
    torch.testing.assert_close(i1, i2, rtol=0, atol=1e-12)
    torch.testing.assert_close(t1, t2, rtol=0, atol=1e-12)
    # fp32: equal to rounding
    model.float()
    with torch.no_grad():
        (i1, t1), (i2, t2) = both_ways(model, lambda: (model.encode_image(images.float()), model.encode_text(tokens)))
    torch.testing.assert_close(i1, i2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t1, t2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pooled_last_block_gradients_equal(checkpointing):
    model = clipforge.create_model("nano", seed=0).double()
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokens = tokens_of_lengths([5, 12])

    def grads():
        model.zero_grad()
        out = model(images, tokens)
        (out.image_features @ out.text_features.T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    a, b = both_ways(model, grads)
    assert a.keys() == b.keys() and len(a) == len(list(model.parameters())) - 1  # all but logit_scale
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=k)


def test_full_transformer_output_is_unchanged_without_rows():
    # Callers that need every position's features (e.g. dense objectives) still get them.
    model = clipforge.create_model("nano", seed=0).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        full = model.visual.transformer(x)  # [B, N, D]
        pooled = model.visual.transformer(x, rows=torch.tensor([4, 1]))  # [B, D]
    assert full.shape == (2, 5, 64) and pooled.shape == (2, 64)
    torch.testing.assert_close(pooled, full[[0, 1], [4, 1]], rtol=1e-4, atol=1e-5)


def test_quick_gelu_function_matches_the_plain_expression():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    fast = QuickGELU()(x)
    fast.backward(g)
    fast_grad, x.grad = x.grad.clone(), None
    plain = x * torch.sigmoid(1.702 * x)
    plain.backward(g)
    assert torch.equal(fast, plain)  # the same forward ops: bitwise
    torch.testing.assert_close(fast_grad, x.grad, rtol=1e-5, atol=1e-6)
    x64 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(QuickGELU(), (x64,))
    with torch.no_grad():  # inference takes the plain path
        assert torch.equal(QuickGELU()(x), plain)


def test_quick_gelu_saves_only_its_input():
    x = torch.randn(8, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        QuickGELU()(x)
    assert len(saved) == 1 and saved[0] is x
