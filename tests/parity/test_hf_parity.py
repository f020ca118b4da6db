"""clipforge vs transformers.CLIPModel with the same random weights, both directions.
Tiny towers, CPU, fp32, tolerance 1e-5."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel  # noqa: E402

import clipforge  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402
from clipforge.model import checkpoints  # noqa: E402

VOCAB, CTX, IMG = 1000, 16, 32
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on a shared 2-core machine


def make_hf(act: str = "quick_gelu", eos: int = VOCAB - 1, seed: int = 0) -> CLIPModel:
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=CTX, hidden_act=act, eos_token_id=eos, bos_token_id=VOCAB - 2, pad_token_id=0)
    vision = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMG, patch_size=8, hidden_act=act)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=48)).eval()
    with torch.no_grad():  # move every tensor off its init (zero biases, unit LayerNorm) so each one matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, IMG, IMG, generator=g)
    tokens = torch.zeros(4, CTX, dtype=torch.long)
    for row, n in enumerate((2, 5, 11, CTX)):  # varied lengths, so padding trimming is exercised
        tokens[row, : n - 1] = torch.randint(1, VOCAB - 1, (n - 1,), generator=g)
        tokens[row, n - 1] = VOCAB - 1
    tokens[1:, 0] = 2  # id 2 is HF's legacy "argmax" eos marker: pooling there would be a bug
    return images, tokens


def _features(out: object) -> torch.Tensor:
    # transformers 4.x returns the projected tensor; 5.x an output object whose pooler_output it is.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def assert_parity(ref: CLIPModel, ours: clipforge.CLIP) -> dict[str, float]:
    images, tokens = inputs()
    diffs = {"image": (_features(ref.get_image_features(pixel_values=images)) - ours.encode_image(images)).abs().max()}
    for name, batch in (("text", tokens), ("text_short", tokens[:3]), ("text_one", tokens[1:2])):
        diffs[name] = (_features(ref.get_text_features(input_ids=batch)) - ours.encode_text(batch)).abs().max()
    out = ref(input_ids=tokens, pixel_values=images)
    diffs["logits"] = (out.logits_per_image - ours.logits(images, tokens)[0]).abs().max()
    diffs = {k: float(v) for k, v in diffs.items()}
    assert max(diffs.values()) < TOL, diffs
    return diffs


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_directory_parity(tmp_path, act):
    ref = make_hf(act)
    ref.save_pretrained(tmp_path / "hf")
    ours, _ = clipforge.load(tmp_path / "hf")
    cfg = ours.config
    assert cfg.quick_gelu is (act == "quick_gelu")
    assert (cfg.embed_dim, cfg.vision.image_size, cfg.vision.num_heads, cfg.vision.mlp_ratio) == (48, IMG, 4, 3.0)
    assert (cfg.text.context_length, cfg.text.vocab_size, cfg.text.eot_token_id) == (CTX, VOCAB, VOCAB - 1)
    assert_parity(ref, ours)


def test_hf_pytorch_bin_legacy_eos_and_preprocessor(tmp_path):
    # eos_token_id == 2 is how configs written before transformers fixed it say "pool at argmax".
    ref = make_hf(eos=2)
    d = tmp_path / "hf"
    ref.save_pretrained(d)
    (d / "model.safetensors").unlink()
    torch.save(ref.state_dict(), d / "pytorch_model.bin")
    pre = {"crop_size": {"height": IMG, "width": IMG}, "do_center_crop": True, "image_mean": [0.5, 0.5, 0.5],
           "image_std": [0.25, 0.25, 0.25], "resample": 2, "size": {"shortest_edge": IMG}}
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    ours, preprocess = clipforge.load(d)
    p = ours.config.preprocess
    assert (p.image_size, p.mean, p.std, p.interpolation, p.resize_mode) == (
        IMG, (0.5,) * 3, (0.25,) * 3, "bilinear", "shortest")
    assert_parity(ref, ours)


def test_hf_leftover_tensor_is_an_error(tmp_path):
    ref = make_hf()
    ref.save_pretrained(tmp_path / "hf")
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["vision_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    del state["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="k_proj.bias"):
        clipforge.load(tmp_path / "hf")
    for name in ("q_proj", "v_proj"):
        del state[f"text_model.encoder.layers.1.self_attn.{name}.bias"]
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="self_attn.extra.weight"):
        clipforge.load(tmp_path / "hf")


def test_export_hf_loads_in_transformers_and_round_trips(tmp_path):
    ours = clipforge.create_model("nano", seed=0).eval()  # GELU, 64 px, OpenAI's vocabulary
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = checkpoints.save_hf(ours, tmp_path / "hf")
    theirs, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    theirs.eval()
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate((3, 9, 30)):
        tokens[row, 0], tokens[row, 1:n - 1], tokens[row, n - 1] = 49406, torch.arange(300, 298 + n), 49407
    with torch.no_grad():
        img = _features(theirs.get_image_features(pixel_values=images))
        txt = _features(theirs.get_text_features(input_ids=tokens))
        assert (img - ours.encode_image(images)).abs().max() < TOL
        assert (txt - ours.encode_text(tokens)).abs().max() < TOL
    back, _ = clipforge.load(out)
    assert back.config.replace(name="", preprocess=None) == ours.config.replace(name="", preprocess=None)
    assert back.config.preprocess == ours.config.preprocess
    a, b = back.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_hf_refuses_resnet(tmp_path):
    with pytest.raises(CheckpointError, match="ResNet"):
        checkpoints.save_hf(clipforge.create_model("tiny-rn"), tmp_path / "hf")
