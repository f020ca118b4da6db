"""The ViT conv stem (VisionConfig.stem='conv', stem_act): grid, polarity, config validation,
save/load, export refusal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import clipforge
from clipforge.config import ClipConfig, VisionConfig
from clipforge.errors import CheckpointError
from clipforge.model.checkpoints import export
from clipforge.model.registry import get_config
from clipforge.model.vision import ColourBlindSplit, conv_stem


@pytest.mark.parametrize("patch,width", [(2, 32), (4, 64), (8, 128), (16, 96)])
def test_stem_gives_the_patch_grid(patch, width):
    stem = conv_stem(width, patch)
    out = stem(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, width, 64 // patch, 64 // patch)
    strided = [m for m in stem if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == patch.bit_length() - 1


def test_config_rejects_impossible_stems():
    with pytest.raises(ValueError, match="stem"):
        VisionConfig(arch="vit", image_size=60, patch_size=6, stem="conv")
    with pytest.raises(ValueError, match="stem"):
        VisionConfig(arch="resnet", image_size=64, stem="conv")
    with pytest.raises(ValueError, match="stem"):
        VisionConfig(stem="convolutional")
    with pytest.raises(ValueError, match="stem_act"):
        VisionConfig(arch="vit", image_size=64, patch_size=8, stem="conv", stem_act="gelu")
    with pytest.raises(ValueError, match="conv stem only"):
        VisionConfig(arch="vit", image_size=64, patch_size=8, stem="patch", stem_act="abs")


def test_abs_first_stage_answers_an_image_and_its_negative_alike():
    """With |x| after the first conv (no bias) and BatchNorm at its initial statistics, an edge of
    either polarity gives the same first-stage response: a dark object's outline excites the same
    features as a light one's. ReLU keeps only one sign, so it does not."""
    x = torch.randn(2, 3, 32, 32)
    abs_stem, relu_stem = conv_stem(64, 8, "abs").eval(), conv_stem(64, 8).eval()
    assert [type(m).__name__ for m in abs_stem if "Act" in type(m).__name__ or "ReLU" in type(m).__name__] == \
        ["AbsActivation", "ReLU", "ReLU"]  # only the first stage changes
    with torch.no_grad():
        torch.testing.assert_close(abs_stem[:3](x), abs_stem[:3](-x))
        assert not torch.allclose(relu_stem[:3](x), relu_stem[:3](-x))
        assert abs_stem(x).shape == relu_stem(x).shape == (2, 64, 4, 4)
    with pytest.raises(ValueError, match="first_act"):
        conv_stem(64, 8, "gelu")


def _conv_stem_config(act: str = "relu") -> ClipConfig:
    cfg = get_config("nano")
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stem="conv", stem_act=act))


@pytest.mark.parametrize("act", ["relu", "abs"])
def test_save_load_round_trip_is_exact(tmp_path, act):
    model = clipforge.create_model(_conv_stem_config(act), seed=0)
    model.train()
    model(torch.randn(8, 3, 64, 64), torch.randint(1, 400, (8, 10)))  # move the BatchNorm running stats
    model.eval()
    clipforge.save(model, tmp_path / "m")
    loaded, _ = clipforge.load(tmp_path / "m")
    assert loaded.config.vision.stem == "conv" and loaded.config.vision.stem_act == act
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))


@pytest.mark.parametrize("fmt", ["hf", "openclip", "openai"])
def test_export_to_formats_without_a_conv_stem_is_refused(fmt, tmp_path):
    model = clipforge.create_model(_conv_stem_config(), seed=0)
    with pytest.raises(CheckpointError, match="stem"):
        export(model, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_channels_last_stem_on_the_cpu_computes_the_same_and_keeps_weights_contiguous():
    """On a CPU the stem runs channels-last (faster in oneDNN); the result is the NCHW one up to
    float rounding, gradients reach every stem weight, and the weights keep their layout, so
    saving (safetensors needs contiguous tensors) is unaffected."""
    model = clipforge.create_model("tiny-bow", seed=0)
    images = torch.randn(3, 3, 64, 64)
    model.visual.train()
    fast = model.encode_image(images)
    fast.sum().backward()
    assert all(p.grad is not None and p.is_contiguous() for p in model.visual.conv1.parameters())
    model.visual.eval()
    with torch.no_grad():
        a = model.encode_image(images)
        model.visual.stem_is_conv = False  # the plain NCHW path
        b = model.encode_image(images)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_first_kernel_sizes_only_the_first_convolution_and_keeps_the_grid():
    stem = conv_stem(128, 8, "abs", first_kernel=5)
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (3, 3), (3, 3), (1, 1)]
    assert stem(torch.randn(2, 3, 64, 64)).shape == (2, 128, 8, 8)
    with pytest.raises(ValueError, match="stem_kernel"):
        VisionConfig(arch="vit", image_size=64, patch_size=8, stem="conv", stem_kernel=4)
    with pytest.raises(ValueError, match="conv stem only"):
        VisionConfig(arch="vit", image_size=64, patch_size=8, stem_kernel=5)
    assert get_config("tiny-bow").vision.stem_kernel == 5


def test_a_checkpoint_without_the_kernel_field_loads_as_three(tmp_path):
    """Models saved before stem_kernel existed had 3x3 first convolutions: their config, lacking
    the field, must rebuild that and not the registry's current 5x5."""
    import json

    cfg = _conv_stem_config("abs")
    model = clipforge.create_model(cfg, seed=0).eval()
    clipforge.save(model, tmp_path / "m")
    meta = tmp_path / "m" / "config.json"
    data = json.loads(meta.read_text())
    assert data["vision"].pop("stem_kernel") == 3
    meta.write_text(json.dumps(data))
    loaded, _ = clipforge.load(tmp_path / "m")
    assert loaded.config.vision.stem_kernel == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))


def test_colour_blind_filters_answer_the_channel_sum_only():
    """stem_gray: the first N filters see R + G + B; two images with the same channel sum give
    them the same response (and the colour filters a different one)."""
    split = ColourBlindSplit(32, 5, 16)
    x = torch.randn(2, 3, 32, 32)
    y = x[:, [2, 0, 1]]  # colours permuted: every pixel's channel sum kept
    with torch.no_grad():
        fx, fy = split(x), split(y)
    assert fx.shape == (2, 32, 16, 16)
    torch.testing.assert_close(fx[:, :16], fy[:, :16])
    assert not torch.allclose(fx[:, 16:], fy[:, 16:])
    split(x).sum().backward()
    assert split.gray_weight.grad is not None and split.colour_weight.grad is not None
    for bad in (0, 32):
        with pytest.raises(ValueError, match="gray filters"):
            ColourBlindSplit(32, 5, bad)
    with pytest.raises(ValueError, match="stem_gray"):
        VisionConfig(arch="vit", image_size=64, patch_size=8, stem_gray=4)
    with pytest.raises(ValueError, match="stem_gray"):
        VisionConfig(arch="vit", image_size=64, patch_size=8, stem="conv", stem_gray=-1)
    cfg = _conv_stem_config("abs")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stem_gray=8))
    assert isinstance(clipforge.create_model(cfg).visual.conv1[0], ColourBlindSplit)


def test_colour_blind_stem_saves_and_loads_exactly(tmp_path):
    cfg = _conv_stem_config("abs")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stem_kernel=5, stem_gray=8))
    model = clipforge.create_model(cfg, seed=0).eval()
    clipforge.save(model, tmp_path / "m")
    loaded, _ = clipforge.load(tmp_path / "m")
    assert loaded.config.vision.stem_gray == 8
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), loaded.encode_image(x))
