"""Hugging Face SiglipModel / Siglip2Model directories (tiny, random, saved with save_pretrained and
their own tokenizer files) load with clipforge.load and give transformers' features and token ids.
SigLIP 2 is compared at its native fixed resolution and with NaFlex inputs (any aspect ratio)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from support.tokenizers import TEXTS, gemma_dir, sentencepiece_dir  # noqa: E402

import clipforge  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4
CTX, PATCH, GRID = 16, 8, 4
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=CTX, projection_size=64)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH)


def build(kind: str, tmp_path, vocab: int, shard: bool = False):
    """A random SiglipModel / Siglip2Model saved to a directory with its tokenizer files."""
    if kind == "siglip":
        cfg = transformers.SiglipConfig(text_config=dict(TEXT, vocab_size=vocab, pad_token_id=1, eos_token_id=1),
                                        vision_config=dict(VISION, image_size=GRID * PATCH))
        model = transformers.SiglipModel(cfg)
    else:
        cfg = transformers.Siglip2Config(text_config=dict(TEXT, vocab_size=vocab, pad_token_id=0, eos_token_id=1),
                                         vision_config=dict(VISION, num_patches=GRID * GRID))
        model = transformers.Siglip2Model(cfg)
    model.eval()
    with torch.no_grad():  # every tensor off its init (HF zeroes some), so each one is checked
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    out = tmp_path / kind
    model.save_pretrained(out, max_shard_size="100KB" if shard else "5GB")
    return model, out


def patches(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> Siglip2's [B, N, p*p*C] patches (row, column, channel), as its processor cuts them."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


@torch.no_grad()
def reference_features(kind, model, images, tokens):
    if kind == "siglip":
        image = model.get_image_features(pixel_values=images).pooler_output
    else:
        b = images.shape[0]
        image = model.get_image_features(pixel_values=patches(images),
                                         pixel_attention_mask=torch.ones(b, GRID * GRID, dtype=torch.long),
                                         spatial_shapes=torch.tensor([[GRID, GRID]] * b)).pooler_output
    return image, model.get_text_features(input_ids=tokens).pooler_output


def assert_equal_features(kind, ref, ours, tokens) -> dict[str, float]:
    images = torch.randn(3, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))
    ri, rt = reference_features(kind, ref, images, tokens)
    with torch.no_grad():
        diffs = {"image": (ours.encode_image(images) - ri).abs().max().item(),
                 "text": (ours.encode_text(tokens) - rt).abs().max().item()}
    assert max(diffs.values()) <= TOL, diffs
    return diffs


def test_siglip_directory_loads_with_its_tokenizer(tmp_path):
    pytest.importorskip("sentencepiece")
    tok_dir = sentencepiece_dir(tmp_path)
    hf_tok = transformers.SiglipTokenizer.from_pretrained(tok_dir)
    ref, out = build("siglip", tmp_path, vocab=len(hf_tok))
    hf_tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({  # as google/siglip-* repos carry it
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    ours, _ = clipforge.load(out)
    cfg = ours.config
    assert cfg.vision.arch == "siglip" and cfg.embed_dim == 64 and cfg.text.pool == "last" and not cfg.text.causal_mask
    assert cfg.preprocess.resize_mode == "squash" and cfg.preprocess.mean == (0.5, 0.5, 0.5)
    assert cfg.preprocess.interpolation == "bicubic" and cfg.preprocess.image_size == 32
    assert ours.logit_scale.item() == ref.logit_scale.item() and ours.logit_bias.item() == ref.logit_bias.item()
    tokens = clipforge.tokenizer_for(ours)(TEXTS)
    want = hf_tok(TEXTS, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tokens, want)
    assert_equal_features("siglip", ref, ours, tokens)
    # clipforge's own format keeps all of it
    again, _ = clipforge.load(clipforge.save(ours, tmp_path / "own"))
    assert_equal_features("siglip", ref, again, tokens)
    assert torch.equal(clipforge.tokenizer_for(again)(TEXTS), want)


def test_siglip2_directory_loads_at_its_native_resolution(tmp_path):
    tok_dir = gemma_dir(tmp_path)  # Gemma's tokenizer, as SigLIP 2's repos name it
    hf_tok = transformers.GemmaTokenizerFast.from_pretrained(tok_dir)
    ref, out = build("siglip2", tmp_path, vocab=len(hf_tok))
    hf_tok.save_pretrained(out)
    ours, _ = clipforge.load(out)
    assert ours.config.vision.image_size == GRID * PATCH
    texts = [t for t in TEXTS if " ".join(t.split()) == t and "&" not in t]  # no spacing or entities to clean
    tokens = clipforge.tokenizer_for(ours)(texts)
    # SigLIP 2 reads lower-cased text; transformers' Siglip2Tokenizer lower-cases the same way
    lowered = hf_tok([t.lower() for t in texts], padding="max_length", max_length=CTX, truncation=True,
                     return_tensors="pt").input_ids
    assert torch.equal(tokens, lowered)
    assert_equal_features("siglip2", ref, ours, tokens)


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_sharded_directory_without_tokenizer_loads(kind, tmp_path):
    ref, out = build(kind, tmp_path, vocab=100, shard=True)
    assert (out / "model.safetensors.index.json").is_file()
    ours, _ = clipforge.load(out)
    with pytest.raises(CheckpointError, match="tokenizer"):  # never CLIP's BPE in its place: other ids
        clipforge.tokenizer_for(ours)
    tokens = torch.randint(0, 100, (4, CTX), generator=torch.Generator().manual_seed(3))
    assert_equal_features(kind, ref, ours, tokens)


def test_unsupported_siglip_settings_are_one_line_errors(tmp_path):
    _, out = build("siglip", tmp_path, vocab=100)
    cfg = json.loads((out / "config.json").read_text())
    for change in ({"vision_use_head": False}, {"hidden_act": "relu"}):
        bad = tmp_path / f"bad_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, bad)
        (bad / "config.json").write_text(json.dumps({**cfg, "vision_config": {**cfg["vision_config"], **change}}))
        with pytest.raises(CheckpointError) as e:
            clipforge.load(bad)
        assert "\n" not in str(e.value) and str(next(iter(change))) in str(e.value)
    from safetensors.torch import load_file, save_file

    extra = load_file(str(out / "model.safetensors"))
    extra["vision_model.head.extra.weight"] = torch.zeros(2)
    save_file(extra, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no counterpart"):
        clipforge.load(out)


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
@pytest.mark.parametrize("to", ["siglip", "siglip2"])
def test_exported_back_to_hugging_face_layout_loads_in_transformers(kind, to, tmp_path):
    from safetensors.torch import save_file

    from clipforge.model.interop import hf_siglip

    ref, out = build(kind, tmp_path, vocab=100)
    ours, _ = clipforge.load(out)
    config, pre = hf_siglip.config_to_hf_siglip(ours.config, siglip2=to == "siglip2")
    back = tmp_path / f"export_{to}"
    back.mkdir()
    (back / "config.json").write_text(json.dumps(config))
    (back / "preprocessor_config.json").write_text(json.dumps(pre))
    save_file(hf_siglip.to_hf_siglip(ours.state_dict(), siglip2=to == "siglip2"), str(back / "model.safetensors"),
              metadata={"format": "pt"})
    cls = transformers.Siglip2Model if to == "siglip2" else transformers.SiglipModel
    exported = cls.from_pretrained(back).eval()
    images = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    tokens = torch.randint(0, 100, (2, CTX))
    for a, b in zip(reference_features(kind, ref, images, tokens), reference_features(to, exported, images, tokens)):
        assert (a - b).abs().max().item() <= TOL
    assert exported.logit_bias.item() == ref.logit_bias.item()


def test_convert_to_hf_writes_a_siglip_model_directory(tmp_path):
    """``clipforge convert --to hf`` of a SigLIP model writes what transformers' SiglipModel loads."""
    from clipforge.cli import main

    ref, out = build("siglip", tmp_path, vocab=100)
    assert main(["convert", "--model", str(out), "--to", "hf", "--out", str(tmp_path / "back")]) == 0
    exported = transformers.SiglipModel.from_pretrained(tmp_path / "back").eval()
    images = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    tokens = torch.randint(0, 100, (2, CTX))
    for a, b in zip(reference_features("siglip", ref, images, tokens),
                    reference_features("siglip", exported, images, tokens), strict=True):
        assert (a - b).abs().max().item() <= TOL


def test_logits_match_transformers_with_a_scale_past_100(tmp_path):
    """SigLIP's learned scale exceeds CLIP's clamp at 100 (about 118 in released weights): the
    logits, bias included, equal SiglipModel's."""
    ref, out = build("siglip", tmp_path, vocab=100)
    with torch.no_grad():
        ref.logit_scale.fill_(math.log(118.0))
    ref.save_pretrained(out)
    ours, _ = clipforge.load(out)
    images = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    tokens = torch.randint(0, 100, (3, CTX))
    with torch.no_grad():
        expected = ref(pixel_values=images, input_ids=tokens).logits_per_image
        got, _ = ours.logits(images, tokens)
    assert (got - expected).abs().max().item() <= 1e-3


def test_siglip2_naflex_inputs_equal_transformers_processor_and_model(tmp_path):
    """Non-square images at their own aspect ratio (SigLIP 2's NaFlex): clipforge's patches equal
    Siglip2ImageProcessor's, and its features Siglip2Model's, padding included."""
    from PIL import Image

    from clipforge.model.naflex import naflex_inputs, naflex_size

    ref, out = build("siglip2", tmp_path, vocab=300)
    ours, _ = clipforge.load(out)
    proc = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=GRID * GRID)
    gen = torch.Generator().manual_seed(3)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
              for h, w in ((20, 70), (90, 33), (32, 32), (7, 200))]
    theirs = proc(images=images, return_tensors="pt")
    batch = naflex_inputs(images, PATCH, max_patches=GRID * GRID)
    assert torch.equal(batch.spatial_shapes, theirs["spatial_shapes"])
    assert torch.equal(batch.mask, theirs["pixel_attention_mask"].bool())
    assert (batch.patches - theirs["pixel_values"]).abs().max().item() <= 1e-6
    assert len({tuple(s) for s in batch.spatial_shapes.tolist()}) == 4 and not batch.mask.all()  # shapes differ, padded
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=theirs["pixel_values"], spatial_shapes=theirs["spatial_shapes"],
                                      pixel_attention_mask=theirs["pixel_attention_mask"]).pooler_output
        got = ours.encode_image(batch)
    assert (got - want).abs().max().item() <= TOL
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    for h in range(1, 400, 7):  # the resized size at many aspect ratios and patch budgets
        for w, budget in ((3, 16), (50, 64), (333, 256), (1000, 196)):
            assert naflex_size(h, w, 16, budget) == get_image_size_for_max_num_patches(h, w, 16, budget), (h, w)
