"""Encoding only up to the longest sequence gives the outputs of encoding all 77 positions."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import clipforge


def batch_of_lengths(lengths: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tok = torch.zeros(len(lengths), 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        tok[i, 0] = 49406
        tok[i, 1 : n + 1] = torch.randint(1, 49405, (n,), generator=g)
        tok[i, n + 1] = 49407
    return tok


@pytest.mark.parametrize("backend", [SDPBackend.MATH, None])
@pytest.mark.parametrize("lengths", [[3, 10, 20, 5], [75], [0, 1], [12] * 8])
def test_trimmed_text_encoding_equals_full_context(lengths, backend):
    # Positions after the end token are masked out of every kept position, so the results are
    # equal in exact arithmetic. Kernels pick their blocking by sequence length, so float sums
    # may be taken in another order: equal to rounding (about 1e-7 relative), not always bitwise.
    model = clipforge.create_model("tiny", seed=0).eval()
    tokens = batch_of_lengths(lengths)
    ctx = sdpa_kernel(backend) if backend is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        trimmed = model.encode_text(tokens)
        model.text.trim_padding = False
        full = model.encode_text(tokens)
    torch.testing.assert_close(trimmed, full, rtol=1e-4, atol=1e-5)


def test_trimmed_text_encoding_equals_full_context_in_float64():
    # In float64 the rounding differences shrink to ~1e-16: the two paths compute the same function.
    model = clipforge.create_model("tiny", seed=0).eval().double()
    tokens = batch_of_lengths([3, 10, 20, 5, 0, 75])
    with torch.no_grad():
        trimmed = model.encode_text(tokens)
        model.text.trim_padding = False
        full = model.encode_text(tokens)
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-12)


def test_trimming_keeps_gradients_equal():
    model = clipforge.create_model("nano", seed=0).double()
    tokens = batch_of_lengths([4, 9])
    grads = []
    for trim in (True, False):
        model.zero_grad()
        model.text.trim_padding = trim
        model.encode_text(tokens).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.text.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-10, msg=name)


def test_rejects_overlong_token_rows():
    model = clipforge.create_model("nano")
    with pytest.raises(ValueError, match="token ids of shape"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))
