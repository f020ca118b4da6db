"""``layers.attend``: the explicit low-precision CPU attention agrees with SDPA (forward and
gradients, causal or not) and is only taken where it was measured to be faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.model import layers


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_attention_matches_fp32_sdpa(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 65, 32, generator=g) for _ in range(3))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    low_in = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=causal)
    got = layers.attend(*low_in, causal=causal)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    assert (got.float() - ref).abs().max() < 3e-2  # bf16 rounding of inputs and products
    # no more error than PyTorch's own bf16 kernel
    sdpa_low = F.scaled_dot_product_attention(*[t.detach() for t in low_in], is_causal=causal).float()
    assert (got.float() - ref).abs().mean() <= 2 * (sdpa_low - ref).abs().mean() + 1e-4
    upstream = torch.randn(ref.shape, generator=g)
    ref.backward(upstream)
    got.backward(upstream.to(torch.bfloat16))
    for a, b in zip(ref_in, low_in):
        scale = a.grad.abs().max()
        assert (b.grad.float() - a.grad).abs().max() < 5e-2 * scale


def test_causal_rows_see_only_the_past():
    q = k = torch.randn(1, 1, 6, 8, dtype=torch.bfloat16)
    v = torch.zeros(1, 1, 6, 8, dtype=torch.bfloat16)
    v[..., 5, :] = 1  # only the last position carries a signal
    out = layers.attend(q, k, v, causal=True)
    assert torch.all(out[..., :5, :] == 0) and torch.all(out[..., 5, :] > 0)


def test_fp32_and_long_sequences_go_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layers.attend(*(torch.randn(1, 1, 8, 4) for _ in range(3)))
    n = layers._PLAIN_ATTENTION_MAX_LEN + 1
    layers.attend(*(torch.randn(1, 1, n, 4, dtype=torch.bfloat16) for _ in range(3)))
    assert len(calls) == 2
    layers.attend(*(torch.randn(1, 1, 8, 4, dtype=torch.bfloat16) for _ in range(3)))
    assert len(calls) == 2  # short bf16 on the CPU: the explicit path


@pytest.mark.parametrize("tower", ["image", "text"])
def test_model_encoders_under_cpu_autocast_are_close_to_fp32(tower):
    """Image tower (full sequences, then the class-token query) and text tower (end-token rows)."""
    import clipforge

    model = clipforge.create_model("nano", seed=0).eval()
    if tower == "image":
        inputs = torch.randn(2, 3, model.visual.image_size, model.visual.image_size)
        encode = model.encode_image
    else:
        inputs = clipforge.tokenizer_for(model)(["a red circle", "two blue stars in the top left corner"])
        encode = model.encode_text
    with torch.no_grad():
        ref = encode(inputs, normalize=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = encode(inputs, normalize=True).float()
    assert torch.nn.functional.cosine_similarity(ref, low).min() > 0.99


def test_one_query_with_a_mask_matches_sdpa():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 2, 1, 16, generator=g)
    k, v = (torch.randn(3, 2, 9, 16, generator=g) for _ in range(2))
    mask = (torch.arange(9) <= torch.tensor([2, 8, 5]).view(3, 1)).view(3, 1, 1, 9)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = layers.attend(*(t.to(torch.bfloat16) for t in (q, k, v)), mask=mask)
    assert (got.float() - ref).abs().max() < 3e-2
