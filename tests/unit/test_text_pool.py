"""TextConfig.pool='mean': the causal text transformer averaged over the tokens up to and
including the end-of-text token, instead of read at that token (CLIP's rule)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import clipforge
from clipforge.config import ClipConfig, TextConfig
from clipforge.errors import CheckpointError
from clipforge.model.checkpoints import export
from clipforge.model.registry import get_config


def _mean_pool_config(layers: int = 2) -> ClipConfig:
    cfg = get_config("nano")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pool="mean", layers=layers))


def test_mean_pool_is_the_average_of_the_token_outputs_up_to_the_end_token():
    model = clipforge.create_model(_mean_pool_config(), seed=0).eval()
    text = model.text
    text.trim_padding = False  # the reference below runs the full context
    tokens = clipforge.tokenize(["a red circle", "two small blue stars in the top left corner"])
    with torch.no_grad():
        got = text(tokens)
        # Reference: every position's output from the plain transformer, averaged by hand.
        x = text.token_embedding(tokens) + text.positional_embedding
        x = text.transformer(x, causal=True)  # [B, N, W]
        eot = (tokens == text.cfg.eot_token_id).int().argmax(dim=1)
        want = torch.stack([x[i, : int(eot[i]) + 1].mean(dim=0) for i in range(len(tokens))])
        want = text.ln_final(want) @ text.text_projection
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mean_pool_ignores_padding_and_batch_companions():
    model = clipforge.create_model(_mean_pool_config(), seed=0).eval()
    short = clipforge.tokenize(["a red circle"])
    batch = clipforge.tokenize(["a red circle", "a very long caption " * 8])
    with torch.no_grad():
        alone = model.encode_text(short)
        together = model.encode_text(batch)[:1]  # encoded up to the long caption's length
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


def test_mean_and_eot_pooling_differ_on_the_same_weights():
    mean_model = clipforge.create_model(_mean_pool_config(), seed=0).eval()
    eot_cfg = dataclasses.replace(mean_model.config, text=dataclasses.replace(mean_model.config.text, pool="eot"))
    eot_model = clipforge.create_model(eot_cfg, seed=0).eval()
    eot_model.load_state_dict(mean_model.state_dict())
    tokens = clipforge.tokenize(["a red circle on a striped background"])
    with torch.no_grad():
        assert not torch.allclose(mean_model.encode_text(tokens), eot_model.encode_text(tokens))


def test_gradients_reach_every_layer():
    model = clipforge.create_model(_mean_pool_config(), seed=0).train()
    model.encode_text(clipforge.tokenize(["a red circle", "a blue star"])).sum().backward()
    for name, p in model.text.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pool"):
        TextConfig(pool="max")


def test_save_load_round_trip_keeps_the_pooling(tmp_path):
    model = clipforge.create_model(_mean_pool_config(), seed=0).eval()
    clipforge.save(model, tmp_path / "m")
    loaded, _ = clipforge.load(tmp_path / "m")
    assert loaded.config.text.pool == "mean"
    tokens = clipforge.tokenize(["three green hearts"])
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))


@pytest.mark.parametrize("fmt", ["hf", "openclip", "openai"])
def test_export_to_end_token_formats_is_refused(fmt, tmp_path):
    model = clipforge.create_model(_mean_pool_config(), seed=0)
    with pytest.raises(CheckpointError, match="end-of-text"):
        export(model, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zero_layers_is_a_bag_of_words():
    """layers=0 with the mean: the average token embedding (plus the average position), so two
    captions with the same words in another order encode identically (the known price)."""
    model = clipforge.create_model("tiny-bow", seed=0).eval()
    assert len(model.text.transformer.resblocks) == 0
    a, b = clipforge.tokenize(["a red circle left of a blue star", "a blue star left of a red circle"])
    with torch.no_grad():
        ea, eb = model.encode_text(torch.stack([a, b]))
        text = model.text
        n = int((a == text.cfg.eot_token_id).int().argmax()) + 1
        want = text.ln_final((text.token_embedding(a[:n]) + text.positional_embedding[:n]).mean(0)) @ text.text_projection
    torch.testing.assert_close(ea, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ea, eb, rtol=1e-5, atol=1e-6)


def test_zero_layers_needs_the_mean():
    with pytest.raises(ValueError, match="bag of words"):
        TextConfig(layers=0)
    with pytest.raises(ValueError, match="layers"):
        TextConfig(layers=-1, pool="mean")


@pytest.mark.parametrize("sparse", [False, True])
def test_zero_layers_gradients_match_the_padded_mean(sparse):
    """The bag-of-words tower gathers the batch's words and sums in one pass (embedding_bag): outputs
    and the token table's and positions' gradients equal those of the written-out mean over a padded batch."""
    model = clipforge.create_model("tiny-bow", seed=0).train()
    text = model.text
    text.token_embedding.sparse = sparse
    tokens = clipforge.tokenize(["a red circle", "two small blue stars near the top", "x"])
    weights = torch.randn(len(tokens), model.config.embed_dim)

    def written_out() -> torch.Tensor:
        rows = []
        for row in tokens:
            n = int((row == text.cfg.eot_token_id).int().argmax()) + 1
            rows.append((text.token_embedding.weight[row[:n]] + text.positional_embedding[:n]).mean(0))
        return text.ln_final(torch.stack(rows)) @ text.text_projection

    params = [text.token_embedding.weight, text.positional_embedding, text.text_projection]
    got, want = model.encode_text(tokens), written_out()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    want_grads = torch.autograd.grad((want * weights).sum(), params)
    assert got_grads[0].is_sparse == sparse
    if sparse:  # one gradient row per distinct word of the batch (padding included), not per occurrence
        assert got_grads[0]._nnz() == len(torch.unique(tokens[:, :int((tokens != 0).sum(1).max())]))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, w, rtol=1e-5, atol=1e-5)  # summation order
