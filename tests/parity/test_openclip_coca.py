"""CoCa (coca_ViT-B-32, coca_ViT-L-14, coca_base) against open_clip's own CoCa.

1. The registered configs are the ones clipforge reads from OpenCLIP's model configs, their
   tokenizer is open_clip's (context 76), and at full size both libraries build the same tensor
   names and shapes (meta device).
2. coca_ViT-B-32 with every tower cut to 2 layers (widths, 256 pooler queries, vocabulary kept),
   random weights moved off their init, saved as open_clip saves it (open_clip_config.json +
   safetensors) and as a bare state dict: clipforge's image and text features, teacher-forced
   caption logits and token outputs equal open_clip's within 1e-4 in fp32; greedy captions are
   open_clip's ``generate(generation_type='top_k', top_k=1)`` token for token; clipforge's format
   and the OpenCLIP export (``clipforge convert --to openclip``) round-trip, the export loading
   back into open_clip.
3. ``coca_loss`` equals ``open_clip.loss.CoCaLoss``, and gives every parameter of a tiny CoCa a
   gradient (the same with gradient checkpointing).
The full-size coca_ViT-B-32 state dict loaded with ``arch=`` is marked slow (a 1 GB file).
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")
from open_clip import coca_model  # noqa: E402
from open_clip.factory import get_model_config  # noqa: E402
from support.parity import nudge, parity_inputs  # noqa: E402
from support.tokenizers import TEXTS  # noqa: E402

import clipforge  # noqa: E402
from clipforge.cli import main as cli_main  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402
from clipforge.model import checkpoints  # noqa: E402
from clipforge.model.clip import CLIP  # noqa: E402
from clipforge.model.interop.openai import config_from_openclip, config_to_openclip  # noqa: E402
from clipforge.model.registry import get_config  # noqa: E402
from clipforge.train.coca_loss import coca_loss  # noqa: E402

TOL = 1e-4
NAMES = ("coca_ViT-B-32", "coca_ViT-L-14", "coca_base")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("quiet_logs")]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", NAMES)
def test_registered_config_and_tokenizer_are_openclips(name):
    cfg = get_config(name)
    assert cfg.replace(name="") == config_from_openclip(get_model_config(name), name)
    assert config_from_openclip(config_to_openclip(cfg), "export") == cfg.replace(name="")
    assert cfg.decoder is not None and cfg.text.embed_cls and cfg.text.context_length == 76
    tokens = clipforge.tokenizer_for(cfg)(TEXTS)
    assert torch.equal(tokens, open_clip.get_tokenizer(name)(TEXTS))


@pytest.mark.parametrize("name", NAMES)
def test_full_size_has_openclips_tensors(name):
    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, device="meta")
        ours = CLIP(get_config(name))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())


def _shrunk() -> dict:
    """coca_ViT-B-32's OpenCLIP config with 2 layers per tower; everything else as shipped."""
    m = copy.deepcopy(get_model_config("coca_ViT-B-32"))
    for key in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        m[key]["layers"] = 2
    return m


def _initialised(ref):
    """open_clip's CoCa with every weight drawn: its constructor never initialises the decoder's
    ``text_projection`` (``torch.empty``: whatever the allocator hands back, garbage once a
    process has reused freed memory; the decoder's own ``init_parameters`` is never called and
    fails), so it is drawn here with the std that method names."""
    proj = ref.text_decoder.text_projection
    torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
    return nudge(ref.eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(open_clip's model, its config dict, hub directory, bare state dict file)."""
    torch.manual_seed(0)
    m = _shrunk()
    ref = _initialised(open_clip.CoCa(m["embed_dim"], m["multimodal_cfg"], m["text_cfg"], m["vision_cfg"]))
    root = tmp_path_factory.mktemp("coca")
    hub = root / "hub"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": m, "preprocess_cfg": {}}))
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(hub / "open_clip_model.safetensors"))
    torch.save(state, root / "bare.pt")
    return ref, m, hub, root / "bare.pt"


def _inputs(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Three images (one repeated: a batch as wide as the texts) and token rows of 3, 38 and 76
    tokens (the last fills the context, so its class token sees itself), zero-padded."""
    images, tokens = parity_inputs(cfg)
    tokens[:, 0] = 49406  # the start token, as the tokenizer writes it
    return torch.cat([images, images[:1]]), tokens


def _compare(ref, ours, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        want = ref(images, tokens)
        got = ours.caption_forward(images, tokens)
        short = tokens[:, :20]  # shorter than the context: the class token's position moves
        return {
            "image": _diff(ref.encode_image(images, normalize=False), ours.encode_image(images)),
            "text": _diff(ref.encode_text(tokens, normalize=False), ours.encode_text(tokens)),
            "short text": _diff(ref.encode_text(short, normalize=False), ours.encode_text(short)),
            "image features": _diff(want["image_features"], got.image_features),
            "text features": _diff(want["text_features"], got.text_features),
            "logits": _diff(want["logits"], got.logits),
            "untrimmed logits": _diff(ref(images, tokens, output_labels=False)["logits"],
                                      ours.caption_logits(images, tokens)),
            "text tokens": _diff(ref.text(tokens)[1], ours.text.forward_tokens(tokens)[1]),
            "image tokens": _diff(ref.visual(images)[1], ours.visual.forward_tokens(images)[1]),
            "labels": float(not torch.equal(want["labels"], got.labels)),
        }


def test_hub_layout_features_and_caption_logits_equal_openclip(saved):
    start = time.perf_counter()
    ref, _, hub, _ = saved
    ours, _ = clipforge.load(hub)
    assert ours.config.decoder is not None and ours.config.decoder.layers == 2
    diffs = _compare(ref, ours, *_inputs(ours.config))
    print(f"max abs diff {diffs}, {time.perf_counter() - start:.1f} s")
    assert max(diffs.values()) <= TOL, diffs


def test_bare_state_dict_needs_the_architecture(saved):
    ref, m, _, bare = saved
    with pytest.raises(CheckpointError, match="CoCa.*arch="):
        clipforge.load(bare)  # head counts are not in the shapes
    # The shrunk architecture is not registered; its config loads the same file strictly.
    model = checkpoints.build_with_state(config_from_openclip(m, "shrunk"), torch.load(bare), str(bare)).eval()
    diffs = _compare(ref, model, *_inputs(model.config))
    assert max(diffs.values()) <= TOL, diffs


def test_clipforge_format_and_openclip_export_round_trip(saved, tmp_path):
    ref, _, hub, _ = saved
    ours, _ = clipforge.load(hub)
    again, _ = clipforge.load(clipforge.save(ours, tmp_path / "own"))
    assert again.config == ours.config
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())
    out = tmp_path / "oc"
    assert cli_main(["convert", "--model", str(hub), "--to", "openclip", "--out", str(out)]) == 0
    back = open_clip.create_model(f"local-dir:{out}").eval()
    assert isinstance(back, coca_model.CoCa)
    images, tokens = _inputs(ours.config)
    with torch.no_grad():
        assert _diff(ref(images, tokens)["logits"], back(images, tokens)["logits"]) == 0.0
    # A bare file is the state dict open_clip's CoCa takes as it is (its text tower under text.).
    state = checkpoints.export(ours, "openclip", tmp_path / "coca.safetensors")
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(str(state)), strict=True)
    for fmt in ("hf", "openai"):
        with pytest.raises(CheckpointError, match="CoCa"):
            checkpoints.export(ours, fmt, tmp_path / fmt)


def test_class_token_and_pooler_without_decoder_export_as_custom_text_clip(tmp_path):
    ours = _tiny_coca().eval()
    ours = checkpoints.build_with_state(ours.config.replace(decoder=None), {
        k: v for k, v in ours.state_dict().items() if not k.startswith("text_decoder.")}, "tiny").eval()
    checkpoints.export(ours, "openclip", tmp_path / "oc")
    ref = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    assert type(ref).__name__ == "CustomTextCLIP"  # open_clip's CLIP would drop text.cls_emb
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(1, 99, (2, 12))
    tokens[0, 4:] = 0
    with torch.no_grad():
        assert _diff(ref.encode_image(images), ours.encode_image(images)) <= TOL
        assert _diff(ref.encode_text(tokens), ours.encode_text(tokens)) <= TOL


def _openclip_greedy(ref, images: torch.Tensor, monkeypatch, max_len: int) -> torch.Tensor:
    """open_clip's top-k sampling with k=1. Its module disables generation when transformers lacks
    BeamSearchScorer (transformers 5 dropped it); top-k needs only the warpers it did import."""
    from transformers import TopKLogitsWarper

    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", TopKLogitsWarper)
    return ref.generate(images, generation_type="top_k", top_k=1, seq_len=max_len)


def test_greedy_captions_equal_openclip_top_k_1(saved, monkeypatch):
    ref, _, hub, _ = saved
    ours, _ = clipforge.load(hub)
    more = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    images = torch.cat([_inputs(ours.config)[0], more])
    first = ours.generate(images, max_len=12)
    assert torch.equal(first, _openclip_greedy(ref, images, monkeypatch, 12))
    # Make the end token win where row 0 next picked a token, so rows end at different lengths
    # (padded after) and the min-length bar and early stop are exercised.
    with torch.no_grad():
        for model in (ref.text_decoder, ours.text_decoder):
            model.text_projection[:, 49407] = 1.05 * model.text_projection[:, first[0, 6]]
    want = _openclip_greedy(ref, images, monkeypatch, 12)
    got = ours.generate(images, max_len=12)
    assert torch.equal(got, want), (got, want)
    assert (got == 0).any() and (got[:, 1:5] != 49407).all()


def test_coca_loss_equals_openclip():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)
    logits = torch.randn(4, 7, 50, generator=g)
    labels = torch.randint(1, 50, (4, 7), generator=g)
    labels[1, 3:] = 0  # padding, skipped
    scale = torch.tensor(20.0)
    for weights in ((2.0, 1.0), (1.0, 0.0)):
        want = open_clip.loss.CoCaLoss(caption_loss_weight=weights[0], clip_loss_weight=weights[1])(
            img, txt, logits, labels, scale)
        got = coca_loss(img, txt, logits, labels, scale, caption_weight=weights[0], contrastive_weight=weights[1])
        assert torch.allclose(got.contrastive, want[0].float(), atol=1e-6)
        assert torch.allclose(got.caption, want[1], atol=1e-6)
        assert torch.allclose(got.total, want[0] + want[1], atol=1e-6)


def _tiny_coca() -> CLIP:
    torch.manual_seed(0)
    cfg = config_from_openclip({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "attentional_pool": True,
                       "attn_pooler_queries": 4, "attn_pooler_heads": 2},
        "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1,
                     "embed_cls": True},
        "multimodal_cfg": {"context_length": 12, "width": 32, "heads": 2, "layers": 1, "ls_init_value": 0.5},
    }, "tiny")
    return nudge(CLIP(cfg))


def test_coca_loss_trains_every_parameter_with_and_without_checkpointing():
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 99, (3, 12), generator=torch.Generator().manual_seed(1))
    tokens[0, 5:] = 0
    grads = []
    for checkpointing in (False, True):
        model = _tiny_coca().train()
        model.set_grad_checkpointing(checkpointing)
        out = model.caption_forward(images, tokens)
        coca_loss(out.image_features, out.text_features, out.logits, out.labels, out.logit_scale).total.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        missing = [n for n, g in grads[-1].items() if g is None or not torch.isfinite(g).all() or not g.abs().sum()]
        assert not missing, missing
    assert all(torch.allclose(g, grads[1][n], atol=1e-6) for n, g in grads[0].items())


@pytest.mark.slow
def test_full_size_state_dict_loads_with_arch(tmp_path):
    start = time.perf_counter()
    torch.manual_seed(0)
    ref = _initialised(open_clip.create_model("coca_ViT-B-32", pretrained=None))
    torch.save(ref.state_dict(), tmp_path / "coca.pt")
    ours, _ = clipforge.load(tmp_path / "coca.pt", arch="coca_ViT-B-32")
    assert ours.config.name == "coca_ViT-B-32"
    images, tokens = _inputs(ours.config)
    with torch.no_grad():
        diffs = {"image": _diff(ref.encode_image(images, normalize=False), ours.encode_image(images)),
                 "text": _diff(ref.encode_text(tokens, normalize=False), ours.encode_text(tokens)),
                 "logits": _diff(ref(images, tokens)["logits"], ours.caption_forward(images, tokens).logits)}
    print(f"coca_ViT-B-32: max abs diff {diffs}, {time.perf_counter() - start:.1f} s")
    assert max(diffs.values()) <= TOL, diffs
