"""clipforge vs open_clip for OpenCLIP's architectures whose image tower comes from timm.

Each family at its smallest size is built by ``open_clip.create_model(name, pretrained=None)`` with
random weights (moved off their initial values, so LayerScale gains of 1e-6 and zero biases matter),
saved as OpenCLIP saves it (a hub directory: ``open_clip_config.json`` + ``open_clip_model.safetensors``;
and a bare state dict, loaded with ``arch=``), loaded by clipforge, and compared in fp32 on the CPU:
image and text features within 1e-4. The largest size of each family is built on the meta device by
both libraries, parameter counts compared; every registered name's config equals the one clipforge
reads from OpenCLIP's own model config.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")
from open_clip.factory import get_model_config  # noqa: E402
from open_clip.push_to_hf_hub import save_config_for_hf  # noqa: E402
from support.parity import nudge, parity_inputs

import clipforge  # noqa: E402
from clipforge.config import VisionConfig  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402
from clipforge.model.clip import CLIP  # noqa: E402
from clipforge.model.interop.openai import config_from_openclip  # noqa: E402
from clipforge.model.registry import get_config, list_models  # noqa: E402
from clipforge.model.timm_vision import TimmVisionTower  # noqa: E402

TOL = 1e-4
# family: (smallest size, largest size by parameter count)
FAMILIES = {
    "convnext": ("convnext_tiny", "convnext_xxlarge_320"),
    "eva": ("EVA02-B-16", "EVA02-E-14-plus"),
    "vitamin": ("ViTamin-S", "ViTamin-XL-384"),
    "mobileclip-fastvit": ("MobileCLIP2-S0", "MobileCLIP2-S4"),
    "mobileclip-vit": ("MobileCLIP-B", "MobileCLIP2-L-14"),
    "pe-core": ("PE-Core-T-16-384", "PE-Core-bigG-14-448"),
    "siglip": ("ViT-B-16-SigLIP", "ViT-SO400M-16-SigLIP-i18n-256"),
    "siglip2": ("ViT-B-32-SigLIP2-256", "ViT-gopt-16-SigLIP2-384"),
    "swin": ("swin_base_patch4_window7_224", "swin_base_patch4_window7_224"),
    "vit-gap": ("vit_medium_patch16_gap_256", "vit_medium_patch16_gap_256"),
    "vit-relpos": ("vit_relpos_medium_patch16_cls_224", "vit_relpos_medium_patch16_cls_224"),
}
# Parity runs over ~3 s each on 2 shared cores (3.5-10 s: three builds of 90-375M parameters, whose
# random initialisation dominates, and forwards at full resolution); the others take 1.5-3 s.
SLOW = {"convnext", "eva", "mobileclip-vit", "siglip", "siglip2", "swin", "vit-relpos", "pe-core", "vit-gap",
        "mobileclip-fastvit"}  # make test-fast keeps ViTamin, the quickest

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("quiet_logs")]


def openclip_timm_names() -> list[str]:
    return [n for n in open_clip.list_models()
            if "timm_model_name" in get_model_config(n)["vision_cfg"] and "hf_model_name" not in
            get_model_config(n)["text_cfg"]]


def make_openclip(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    return nudge(model)


inputs = parity_inputs


def write_hub_dir(ref: torch.nn.Module, name: str, out) -> None:
    """What open_clip's hub export writes: its config JSON (by open_clip's own writer) and weights."""
    out.mkdir()
    save_config_for_hf(ref, out / "open_clip_config.json", model_config=get_model_config(name))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(out / "open_clip_model.safetensors"))


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES])
def test_family_parity(family, tmp_path):
    name = FAMILIES[family][0]
    start = time.perf_counter()
    ref = make_openclip(name)
    write_hub_dir(ref, name, tmp_path / "hub")
    torch.save(ref.state_dict(), tmp_path / "bare.pt")

    ours, _ = clipforge.load(tmp_path / "hub")
    assert isinstance(ours.visual, TimmVisionTower)
    assert ours.config.name == name  # the hub config is recognised as the registered architecture
    images, tokens = inputs(ours.config)
    with torch.no_grad():
        diffs = {"image": (ref.encode_image(images) - ours.encode_image(images)).abs().max().item(),
                 "text": (ref.encode_text(tokens) - ours.encode_text(tokens)).abs().max().item()}
    print(f"{family} ({name}): max abs diff {diffs}, {time.perf_counter() - start:.1f} s")
    assert max(diffs.values()) <= TOL, diffs
    # The bare state dict, named with arch=, gives the same model: same config, same tensors.
    hub_state, hub_config = ours.state_dict(), ours.config
    del ours
    bare, _ = clipforge.load(tmp_path / "bare.pt", arch=name)
    assert bare.config == hub_config
    assert all(torch.equal(v, hub_state[k]) for k, v in bare.state_dict().items())


@pytest.mark.parametrize("trunk,pool,proj,bias", [
    ("convnext_atto", "", "linear", False),  # ConvNeXt's setting
    ("convnext_atto", "avg", "mlp", True),  # convnext_large_d's MLP head, with OpenCLIP's proj_bias
    ("convnext_atto", "abs_attn", "linear", False),  # attention pools over the feature map
    ("convnext_atto", "rot_attn", None, False),
    ("convnext_atto", "avg", None, False),  # the trunk's classifier projects (FastViT's setting)
    ("vit_tiny_patch16_224", "token", None, False),  # EVA's
    ("vit_tiny_patch16_224", "map", "none", False),  # SigLIP's: no head, the trunk's width is embed_dim
])
def test_head_variants_match_openclip_timm_adapter(trunk, pool, proj, bias):
    """Every pool/projection choice OpenCLIP's TimmModel offers, on tiny timm networks."""
    from open_clip.timm_model import TimmModel

    embed = 192 if proj == "none" else 64
    torch.manual_seed(0)
    ref = TimmModel(trunk, embed, image_size=224, pool=pool, proj=proj, proj_bias=bias).eval()
    cfg = VisionConfig(arch="timm", timm_model_name=trunk, timm_pool=pool, timm_proj=proj, timm_proj_bias=bias)
    ours = TimmVisionTower(cfg, embed).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ours(images)
        assert (ref(images) - out).abs().max().item() <= TOL
        assert out.shape == (2, embed) and ours(images, project=False).shape == (2, ours.width)


@pytest.mark.slow
def test_export_to_openclip_directory_round_trips(tmp_path):
    """clipforge's OpenCLIP export of a timm-tower model: open_clip builds and loads it from the
    directory alone and computes the same features; clipforge reads it back unchanged."""
    from clipforge.model import checkpoints

    model = clipforge.create_model("PE-Core-T-16-384", seed=0).eval()
    checkpoints.export(model, "openclip", tmp_path / "oc")
    ref = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    back, _ = clipforge.load(tmp_path / "oc")
    assert back.config.vision == model.config.vision and back.config.name == "PE-Core-T-16-384"
    images, tokens = inputs(model.config)
    with torch.no_grad():
        assert (ref.encode_image(images) - model.encode_image(images)).abs().max().item() <= TOL
        assert (ref.encode_text(tokens) - model.encode_text(tokens)).abs().max().item() <= TOL
        assert torch.equal(back.encode_image(images), model.encode_image(images))


def test_layer_groups_are_timms_parameter_groups():
    """``blocks()`` (what locking keeps the last N of) holds exactly timm's layer groups."""
    from timm.models import group_parameters

    for small, _ in FAMILIES.values():
        with torch.device("meta"):
            tower = CLIP(get_config(small)).visual
        groups = group_parameters(tower.trunk, tower.trunk.group_matcher())
        blocks = tower.blocks()
        assert len(blocks) == len(groups) > 1
        for block, gid in zip(blocks, sorted(groups)):
            assert {id(p) for p in block.parameters()} == {id(tower.trunk.get_parameter(n)) for n in groups[gid]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_largest_size_builds_with_openclip_parameter_count(family):
    name = FAMILIES[family][1]
    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, device="meta")
        ours = CLIP(get_config(name))
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())


def test_registry_equals_openclip_model_configs():
    names = openclip_timm_names()
    assert len(names) >= 70 and set(names) <= set(list_models())
    for name in names:
        assert get_config(name).replace(name="") == config_from_openclip(get_model_config(name), name), name


@pytest.mark.slow  # about 20 s: the command builds all ~100 architectures on the meta device to count parameters
def test_models_command_lists_the_families(capsys):
    from clipforge.cli import main

    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for small, large in FAMILIES.values():
        assert small in rows and large in rows
    assert rows["convnext_tiny"]["params_m"] is None  # timm towers are counted on request only
    assert main(["models", "convnext_tiny", "--params", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "convnext_tiny" and row["params_m"] == pytest.approx(92.30, abs=0.01)


@pytest.mark.slow
def test_forward_backward_and_grad_checkpointing():
    """Training through clipforge's CLIP: every parameter of a timm tower gets a finite gradient,
    the same with gradient checkpointing on."""
    torch.manual_seed(0)
    model = clipforge.create_model("ViTamin-S")
    images, tokens = inputs(model.config)
    tokens = tokens[:2]  # one caption per image

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(images, tokens)
        logits = out.logit_scale * out.image_features @ out.text_features.t()
        torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.eval()  # no stochastic depth: the two passes must agree
    plain = grads()
    missing = [n for n, p in model.named_parameters() if n not in plain or not torch.isfinite(plain[n]).all()]
    assert not missing, missing[:5]
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
    assert model.encode_image(images, project=False).shape == (2, model.visual.width)


def test_patch_dropout_only_where_the_trunk_has_it():
    with torch.device("meta"):
        vit = CLIP(get_config("PE-Core-T-16-384")).visual
        convnext = CLIP(get_config("convnext_tiny")).visual
    assert hasattr(vit, "patch_dropout") and not hasattr(convnext, "patch_dropout")
    vit.patch_dropout = 0.5
    assert vit.patch_dropout == 0.5


def test_timm_state_dict_without_config_names_what_is_needed(tmp_path):
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = open_clip.create_model("ViTamin-S", pretrained=None, device="meta")
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in ref.state_dict().items()}
    save_file(state, str(tmp_path / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="timm model.*open_clip_config.json.*arch="):
        clipforge.load(tmp_path / "weights.safetensors")
