"""Explanation maps: every method on every tower kind finds a planted object whose answer is
known (hand-set weights, ``support.planted``), maps have the right shape and range, and misuse
gets a one-line error."""

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.errors import ClipforgeError
from clipforge.explanations import METHODS, explain, methods_for
from clipforge.explanations.render import colourise, model_view, overlay, panel
from support import planted


@pytest.fixture(scope="module")
def base():
    return clipforge.create_model("nano").config


def _peak(m: torch.Tensor) -> tuple[int, int]:
    y, x = np.unravel_index(int(m.argmax()), tuple(m.shape))
    return int(y), int(x)


def _inside(point, box) -> bool:
    y, x = point
    left, top, right, bottom = box
    return left <= x < right and top <= y < bottom


# (builder, image size, red box, blue box): boxes on the towers' grids (8 px patches; 32 px cells for the ResNet)
CASES = {
    "vit": (planted.planted_vit, 32, (0, 0, 8, 8), (16, 24, 32, 32)),
    "siglip": (planted.planted_siglip, 32, (24, 0, 32, 16), (0, 16, 8, 24)),
    "resnet": (planted.planted_resnet, 64, (0, 0, 32, 32), (32, 32, 64, 64)),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_every_method_finds_the_planted_object(base, kind):
    build, size, red, blue = CASES[kind]
    model = build(base)
    image = planted.scene(size, red, blue)
    dim = model.config.embed_dim
    for method in methods_for(model):
        maps = explain(model, image, [planted.query(0, dim), planted.query(1, dim)], method=method)
        assert maps.shape == (2, size, size) and maps.dtype == torch.float32
        assert float(maps.min()) >= 0 and float(maps.max()) <= 1 and float(maps.max()) == 1
        assert _inside(_peak(maps[0]), red), (kind, method, "red")
        assert _inside(_peak(maps[1]), blue), (kind, method, "blue")
        # the named object holds more of the map than the other one does
        r = maps[0][red[1]:red[3], red[0]:red[2]].mean()
        b = maps[0][blue[1]:blue[3], blue[0]:blue[2]].mean()
        assert r > b, (kind, method)


def test_methods_offered_per_tower(base):
    assert methods_for(planted.planted_vit(base)) == ["relevance", "dense", "gradcam"]  # default first
    assert methods_for(planted.planted_siglip(base)) == ["relevance", "dense", "gradcam"]
    assert methods_for(planted.planted_resnet(base)) == ["dense", "gradcam"]
    with pytest.raises(ClipforgeError, match="not available for this resnet"):
        explain(planted.planted_resnet(base), planted.scene(64, (0, 0, 8, 8), (8, 8, 16, 16)), "x", method="relevance")


def test_text_and_image_queries_and_model_state_is_restored(base):
    model = clipforge.create_model("nano", seed=0).train()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    one = explain(model, img, "a red circle")
    assert one.shape == (64, 64) and model.training  # a single query gives one map; training mode kept
    one_rel = explain(model, img, "a red circle", method="relevance")
    both = explain(model, img, ["a red circle", img], method="relevance")
    shifted = explain(model, img, ["a red circle", img], method="dense", shifts=2)
    assert shifted.shape == (2, 64, 64) and not torch.allclose(shifted, explain(model, img, ["a red circle", img],
                                                                                  method="dense"))
    assert both.shape == (2, 64, 64)
    assert torch.allclose(explain(model, img, ["a red circle"], method="relevance")[0], both[0], atol=1e-5)
    # recording attention left the model's own forward in place: same features as before
    x = clipforge.get_preprocess(model)(img).unsqueeze(0)
    model.eval()
    ref = clipforge.create_model("nano", seed=0).eval()
    assert torch.allclose(model.encode_image(x), ref.encode_image(x), atol=1e-6)
    assert model.visual.transformer.pooled_last_block
    model.set_grad_checkpointing(True)  # a model set up for training explains the same
    assert torch.allclose(explain(model, img, "a red circle", method="relevance"), one_rel, atol=1e-5)
    assert model.visual.transformer.grad_checkpointing


def test_misuse_is_one_clear_error(base):
    model = planted.planted_vit(base)
    img = planted.scene(32, (0, 0, 8, 8), (8, 8, 16, 16))
    with pytest.raises(ClipforgeError, match="unknown explanation method"):
        explain(model, img, planted.query(0, 4), method="saliency")
    with pytest.raises(ClipforgeError, match="shifts must be >= 1"):
        explain(model, img, planted.query(0, 4), shifts=0)
    with pytest.raises(ClipforgeError, match="at least one query"):
        explain(model, img, [])
    with pytest.raises(ClipforgeError, match="shape"):
        explain(model, img, torch.zeros(7))
    with pytest.raises(ClipforgeError, match="one image"):
        explain(model, torch.zeros(2, 3, 32, 32), planted.query(0, 4))
    with pytest.raises(ClipforgeError, match="image tower"):
        explain(torch.nn.Linear(2, 2), img, "x")


@pytest.mark.parametrize("name, pool, proj, size", [
    ("convnext_atto", "avg", "linear", 64),
    ("vit_tiny_patch16_224", "token", "linear", 224),
    ("vit_tiny_patch16_224", "map", "none", 224),
])  # fmt: skip
def test_timm_towers(base, name, pool, proj, size):
    from dataclasses import replace

    from clipforge.config import VisionConfig
    from clipforge.model.clip import CLIP

    pytest.importorskip("timm")
    v = VisionConfig(arch="timm", timm_model_name=name, image_size=size, timm_pool=pool, timm_proj=proj)
    cfg = replace(base, vision=v, embed_dim=192 if proj == "none" else 64,
                  preprocess=replace(base.preprocess, image_size=size))
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8))
    expected = ["dense", "gradcam"] if name.startswith("convnext") else ["relevance", "dense", "gradcam"]
    assert methods_for(model) == expected
    for method in expected:
        maps = explain(model, img, [torch.randn(cfg.embed_dim), torch.randn(cfg.embed_dim)], method=method)
        assert maps.shape == (2, size, size) and 0 <= float(maps.min()) and float(maps.max()) <= 1
        assert float(maps.std()) > 0  # a real map, not a constant


def test_render_overlay_and_panel(base):
    heat = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    colours = colourise(heat)
    assert colours.shape == (64, 64, 3) and colours.dtype == np.uint8
    assert tuple(colours[0, 0]) == (68, 1, 84) and tuple(colours[-1, -1]) == (253, 231, 37)
    wide = Image.new("RGB", (400, 200), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 100, 200))  # the left quarter: outside the centre crop
    view = model_view(wide, base.preprocess)
    assert view.size == (224, 224) and view.getpixel((5, 100)) == (255, 0, 0)
    over = overlay(view, heat)
    assert over.size == (224, 224) and over.getpixel((220, 220)) != view.getpixel((220, 220))
    pic = panel(view, [heat, heat[::-1]], ["a red circle", "x" * 80])
    assert pic.size == (224 * 3 + 8, 224 + 18)


def test_method_names_and_the_front_door():
    import clipforge.explanations  # noqa: F401 - importing the package must not shadow the function

    assert METHODS == ("dense", "relevance", "gradcam")
    assert clipforge.explain is explain


@pytest.mark.parametrize("patch, cells", [(8, (3, 5)), (16, (1, 2))])
def test_cells_are_drawn_where_their_receptive_field_is(patch, cells):
    """A conv stem (3x3 stride-2 convolutions padded by 1) centres each cell on its patch's first pixel,
    not the patch's middle: measured here from the stem itself (the input gradient of one cell, all
    weights one, is symmetric about that cell's centre; cells whose field the image's edge cuts are
    left out), and ``grid_centres`` must agree. tiny-bow's stem, with three stages (8x8) and four (4x4)."""
    from dataclasses import replace

    import torch.nn.functional as F

    from clipforge.explanations.core import _upsample, grid_centres
    from clipforge.model.registry import get_config

    cfg = get_config("tiny-bow")
    model = clipforge.create_model(replace(cfg, vision=replace(cfg.vision, patch_size=patch)), seed=0).eval()
    stem = model.visual.conv1
    for layer in stem:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.ones_(layer.weight)
    stem = torch.nn.Sequential(*[m for m in stem if isinstance(m, torch.nn.Conv2d)])
    x = torch.zeros(1, 3, 64, 64, requires_grad=True)
    out = stem(x)  # [1, C, 64 / patch, 64 / patch]
    (stride, offset), _ = grid_centres(model.visual, (64, 64), tuple(out.shape[-2:]))
    for i in cells:
        (grad,) = torch.autograd.grad(out[0, :, i, i].sum(), x, retain_graph=True)
        w = grad[0].abs().sum(0)
        centre = float((w.sum(1) * torch.arange(64.0)).sum() / w.sum())
        assert abs(centre - (stride * i + offset)) < 1e-3, (i, centre, stride, offset)
    assert (stride, offset) == (float(patch), 0.0)  # half a cell up and left of a patch's middle
    if patch != 8:
        return
    # a cell's value is drawn at its centre, and a patch-embedding tower keeps plain bilinear upsampling
    m = torch.rand(1, 8, 8)
    drawn = _upsample(m, (64, 64), grid_centres(model.visual, (64, 64), (8, 8)))
    assert torch.allclose(drawn[0, 8 * 3, 8 * 5], m[0, 3, 5])
    vit = clipforge.create_model("nano", seed=0).visual
    plain = _upsample(m, (64, 64), grid_centres(vit, (64, 64), (8, 8)))
    assert torch.allclose(plain, F.interpolate(m[:, None], size=(64, 64), mode="bilinear")[:, 0], atol=1e-5)


def test_guided_refinement_moves_a_peak_onto_a_ring_and_only_smooths_flat_colour():
    """A ring's coarse map peaks in its hole (bilinear upsampling of one blob over the whole ring);
    fitted to the image's colours, the peak lands on the ring's own pixels. Over a flat image the
    filter is two box means of the map and nothing else."""
    import torch.nn.functional as F

    from clipforge.explanations.refine import guided_filter

    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((yy - 30) ** 2 + (xx - 34) ** 2).sqrt()
    ring = (r >= 2) & (r <= 6)  # a small ring: its hole fits inside one window of the filter
    image = torch.full((3, 64, 64), -1.0)
    image[0][ring], image[1][ring], image[2][ring] = 1.5, -0.5, -0.5  # red ring on grey, normalised units
    coarse = torch.zeros(1, 1, 8, 8)
    coarse[0, 0, 3:5, 3:5] = 1.0  # the blob over the ring's cells
    blurred = F.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert not ring[_peak(blurred[0])]  # the bilinear map peaks in the hole
    refined = guided_filter(blurred, image, radius=4)
    assert refined.shape == (1, 64, 64) and ring[_peak(refined[0])]
    assert refined[0][ring].mean() > refined[0][~ring & (r < 2)].mean()  # the hole is below the ring
    flat = torch.zeros(3, 64, 64)
    box = lambda m: F.avg_pool2d(m[:, None], 9, stride=1, padding=4, count_include_pad=False)[:, 0]
    assert torch.allclose(guided_filter(blurred, flat, radius=4), box(box(blurred)), atol=1e-6)


def test_refine_choice_reaches_the_map():
    model = clipforge.create_model("nano", seed=0).eval()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    guided = explain(model, img, "a red circle", method="dense")  # the default
    plain = explain(model, img, "a red circle", method="dense", refine="none")
    assert torch.equal(guided, explain(model, img, "a red circle", method="dense", refine="guided"))
    assert not torch.allclose(guided, plain) and float(guided.min()) == 0 and float(guided.max()) == 1
    with pytest.raises(ClipforgeError, match="unknown refinement 'sharp'"):
        explain(model, img, "a red circle", refine="sharp")


def test_guided_filter_equals_the_textbook_fit():
    """The running-sum windows and the cofactor solve give what pooling windows and a per-pixel
    ``linalg.solve`` of the ridge fit give (He et al.'s colour guided filter, written out)."""
    import torch.nn.functional as F

    from clipforge.explanations.refine import guided_filter

    torch.manual_seed(0)
    maps, guide, r, eps = torch.rand(2, 40, 36), torch.randn(3, 40, 36), 5, 1e-2
    box = lambda x: F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)
    g = guide[None]
    mean_g, mean_p = box(g), box(maps[:, None])
    cov = box(g * maps[:, None]) - mean_g * mean_p  # [T, 3, H, W]
    var = box((g[:, :, None] * g[:, None]).flatten(1, 2)) - (mean_g[:, :, None] * mean_g[:, None]).flatten(1, 2)
    sigma = var[0].permute(1, 2, 0).reshape(40, 36, 3, 3) + eps * torch.eye(3)
    a = torch.linalg.solve(sigma[None], cov.permute(0, 2, 3, 1)[..., None])[..., 0].permute(0, 3, 1, 2)
    b = mean_p[:, 0] - (a * mean_g).sum(1)
    expected = (box(a) * g).sum(1) + box(b[:, None])[:, 0]
    assert torch.allclose(guided_filter(maps, guide, r, eps), expected, atol=1e-4)
