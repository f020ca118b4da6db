"""clipforge vs open_clip with the same random weights: state dicts, OpenAI-style TorchScript
archives, and exports back to OpenCLIP / OpenAI layouts. Tiny towers, CPU, fp32, tolerance 1e-5."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP as OpenClipCLIP  # noqa: E402
from support.parity import nudge

import clipforge  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402
from clipforge.model import checkpoints  # noqa: E402

VOCAB, CTX, IMG, EMBED = 1000, 16, 64, 64
TEXT_CFG = dict(context_length=CTX, vocab_size=VOCAB, width=128, heads=2, layers=2)
VISION = {
    "vit": dict(layers=2, width=128, patch_size=16, image_size=IMG),
    "resnet": dict(layers=(1, 1, 1, 1), width=16, image_size=IMG),
}
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on a shared 2-core machine


def make_openclip(arch: str, quick_gelu: bool = True, seed: int = 0) -> OpenClipCLIP:
    torch.manual_seed(seed)
    model = OpenClipCLIP(embed_dim=EMBED, vision_cfg=VISION[arch], text_cfg=TEXT_CFG, quick_gelu=quick_gelu).eval()
    return nudge(model)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, IMG, IMG, generator=g)
    tokens = torch.zeros(4, CTX, dtype=torch.long)
    for row, n in enumerate((2, 5, 11, CTX)):  # varied lengths, so padding trimming is exercised
        tokens[row, : n - 1] = torch.randint(1, VOCAB - 1, (n - 1,), generator=g)
        tokens[row, n - 1] = VOCAB - 1  # end-of-text is the highest id, as in OpenAI's vocabulary
    return images, tokens


@torch.no_grad()
def assert_parity(ref: torch.nn.Module, ours: clipforge.CLIP) -> dict[str, float]:
    images, tokens = inputs()
    ri, oi = ref.encode_image(images), ours.encode_image(images)
    diffs = {"image": (ri - oi).abs().max().item()}
    for name, batch in (("text", tokens), ("text_short", tokens[:3]), ("text_one", tokens[1:2])):
        diffs[name] = (ref.encode_text(batch) - ours.encode_text(batch)).abs().max().item()
    ref_logits = ref.logit_scale.exp() * F.normalize(ri, dim=-1) @ F.normalize(ref.encode_text(tokens), dim=-1).T
    diffs["logits"] = (ref_logits - ours.logits(images, tokens)[0]).abs().max().item()
    assert max(diffs.values()) < TOL, diffs
    return diffs


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch,fmt,quick_gelu", [
    ("vit", "pt", True), ("vit", "safetensors", True), ("vit", "training", False), ("resnet", "pt", True),
])
def test_state_dict_parity(tmp_path, arch, fmt, quick_gelu):
    ref = make_openclip(arch, quick_gelu=quick_gelu)
    state = ref.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "training":  # what OpenCLIP's trainer writes: wrapped, DDP prefixes
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "model.pt"
        torch.save(state, path)
    # A bare state dict does not record its activation: the default (QuickGELU for OpenAI
    # state dicts, GELU for OpenCLIP training checkpoints) is announced.
    with pytest.warns(UserWarning, match="QuickGELU" if quick_gelu else "GELU"):
        ours, preprocess = clipforge.load(path)
    cfg = ours.config
    assert (cfg.vision.arch, cfg.vision.image_size, cfg.quick_gelu, cfg.embed_dim) == (arch, IMG, quick_gelu, EMBED)
    assert (cfg.text.context_length, cfg.text.vocab_size, cfg.text.layers, cfg.text.heads) == (CTX, VOCAB, 2, 2)
    assert cfg.preprocess.image_size == IMG and preprocess is not None
    assert_parity(ref, ours)


def test_activation_override_changes_outputs(tmp_path):
    ref = make_openclip("vit", quick_gelu=True)
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    ours, _ = clipforge.load(tmp_path / "m.pt", quick_gelu=False)
    assert ours.config.quick_gelu is False
    with pytest.raises(AssertionError):
        assert_parity(ref, ours)


def _trace(ref: OpenClipCLIP) -> torch.jit.ScriptModule:
    """An archive shaped like OpenAI's: OpenAI names plus their metadata scalars."""
    for name, value in (("input_resolution", IMG), ("context_length", CTX), ("vocab_size", VOCAB)):
        if hasattr(ref, name):
            delattr(ref, name)
        ref.register_buffer(name, torch.tensor(value))
    images, tokens = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(ref, (images[:1], tokens[:1]), check_trace=False)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_torchscript_archive_parity(tmp_path, quick_gelu):
    ref = make_openclip("vit", quick_gelu=quick_gelu)
    _trace(ref).save(str(tmp_path / "ViT-tiny.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the archive names its activation: nothing is guessed
        ours, _ = clipforge.load(tmp_path / "ViT-tiny.pt")
    assert ours.config.quick_gelu is quick_gelu
    assert_parity(ref, ours)


def test_fp16_torchscript_archive(tmp_path):
    ref = make_openclip("resnet")
    traced = _trace(ref).half()  # OpenAI's archives hold fp16 weights
    traced.save(str(tmp_path / "RN-tiny.pt"))
    half, _ = clipforge.load(tmp_path / "RN-tiny.pt", dtype=torch.float16)
    assert half.visual.conv1.weight.dtype == torch.float16
    assert torch.equal(half.visual.conv1.weight, ref.visual.conv1.weight.half())
    ours, _ = clipforge.load(tmp_path / "RN-tiny.pt")  # fp32 by default: compare to fp16-rounded weights
    assert ours.visual.conv1.weight.dtype == torch.float32
    rounded = make_openclip("resnet")
    rounded.load_state_dict({k: v.half().to(v.dtype) if v.is_floating_point() else v
                             for k, v in ref.state_dict().items() if k not in ("input_resolution", "context_length",
                                                                                "vocab_size")})
    assert_parity(rounded, ours)


def test_torchscript_metadata_is_checked(tmp_path):
    ref = make_openclip("vit")
    traced = _trace(ref)
    traced.input_resolution.fill_(999)
    traced.save(str(tmp_path / "bad.pt"))
    with pytest.raises(CheckpointError, match="input_resolution=999"):
        clipforge.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_export_openclip_directory(tmp_path, arch):
    ref = make_openclip(arch)
    torch.save(ref.state_dict(), tmp_path / "src.pt")
    ours, _ = clipforge.load(tmp_path / "src.pt", quick_gelu=True)
    out = checkpoints.save_openclip(ours, tmp_path / "oc")
    # open_clip builds the model from our open_clip_config.json and loads our weights strictly.
    theirs = open_clip.create_model(f"local-dir:{out}").eval()
    assert_parity(theirs, ours)
    back, _ = clipforge.load(out)
    assert back.config.replace(name="") == ours.config.replace(name="")
    assert_same_tensors(back.state_dict(), ours.state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_openclip_state_dict_round_trip(tmp_path, suffix):
    ours = clipforge.create_model("tiny", seed=0).eval()  # GELU, 4 text heads of 32: not inferable
    path = checkpoints.save_openclip(ours, tmp_path / f"tiny{suffix}")
    state = load_file(str(path)) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    theirs = OpenClipCLIP(embed_dim=128, quick_gelu=False,
                          vision_cfg=dict(layers=4, width=128, patch_size=8, image_size=64),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=4)).eval()
    theirs.load_state_dict(state, strict=True)
    images, _ = inputs()
    tokens = clipforge_tokens()
    with torch.no_grad():
        assert (theirs.encode_image(images) - ours.encode_image(images)).abs().max() < TOL
        assert (theirs.encode_text(tokens) - ours.encode_text(tokens)).abs().max() < TOL
    back, _ = clipforge.load(path, arch="tiny")
    assert back.config.name == "tiny" and back.config.text.heads == 4
    assert_same_tensors(back.state_dict(), ours.state_dict())


def clipforge_tokens() -> torch.Tensor:
    """Token ids with OpenAI's vocabulary layout (start 49406, end 49407), varied lengths."""
    tokens = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate((3, 8, 20)):
        tokens[row, 0], tokens[row, 1:n - 1], tokens[row, n - 1] = 49406, torch.arange(100, 100 + n - 2), 49407
    return tokens


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_export_openai_layout(tmp_path, arch):
    from open_clip.model import (
        build_model_from_openai_state_dict,  # a port of openai/CLIP's build_model
    )

    ref = make_openclip(arch)
    torch.save(ref.state_dict(), tmp_path / "src.pt")
    ours, _ = clipforge.load(tmp_path / "src.pt", quick_gelu=True)
    path = checkpoints.save_openai(ours, tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    assert "token_embedding.weight" in state and ("visual.proj" in state) == (arch == "vit")
    # OpenAI's loader rebuilds the architecture from shapes alone (it casts to fp16; undo that).
    rebuilt = build_model_from_openai_state_dict(dict(state), cast_dtype=None).float()
    rebuilt.load_state_dict(state, strict=True)
    assert_parity(rebuilt, ours)
    back, _ = clipforge.load(path, quick_gelu=True)
    assert_same_tensors(back.state_dict(), ours.state_dict())


def test_export_openai_refuses_what_openai_code_would_misread(tmp_path):
    gelu = clipforge.create_model("nano")
    with pytest.raises(CheckpointError, match="GELU"):
        checkpoints.save_openai(gelu, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
