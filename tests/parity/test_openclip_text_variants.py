"""OpenCLIP's text-tower variants (its model configs' text_cfg options) against open_clip itself.

1. Every architecture open-clip-torch lists whose text tower is its standard TextTransformer builds
   in clipforge with the same parameter names and shapes at full size (meta device, no memory).
2. Every distinct combination of text options in those configs (CLIP; SigLIP; SigLIP 2; CLIPA;
   MetaCLIP 2 worldwide's eos pooling; MobileCLIP's bidirectional argmax; no projection) computes
   the same features on random weights, at a small width.
3. Whole models with OpenCLIP's native ViT and a text variant (MetaCLIP 2 worldwide, CLIPA: their
   configs shrunk, options kept), saved as open_clip saves them for the hub (open_clip_config.json,
   weights, tokenizer files), load with clipforge.load and give open_clip's features and token ids;
   and OpenCLIP's own GELU ViTs load from open_clip_config.json without quick_gelu.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")
from open_clip.model import _build_text_tower  # noqa: E402
from open_clip.push_to_hf_hub import save_config_for_hf, save_for_hf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from support.tokenizers import TEXTS, unigram_dir, wordpiece_dir  # noqa: E402

import clipforge  # noqa: E402
from clipforge.model.interop.openclip_text import text_from_openclip  # noqa: E402
from clipforge.model.text import TextTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4
SIZE_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "hf_tokenizer_name", "tokenizer_kwargs"}


def _standard_text(name: str) -> tuple[dict, int, bool] | None:
    cfg = open_clip.get_model_config(name)
    t = cfg.get("text_cfg", {})
    if t.get("hf_model_name") or t.get("embed_cls"):  # an HF encoder, or CoCa's text decoder stack
        return None
    return t, cfg["embed_dim"], bool(cfg.get("quick_gelu", False))


STANDARD = [n for n in open_clip.list_models() if _standard_text(n)]
# One architecture per distinct set of text options (sizes and tokenizer aside), named by its options.
VARIANTS: dict[str, str] = {}
for _name in STANDARD:
    _t, _, _quick = _standard_text(_name)
    _key = json.dumps({k: v for k, v in _t.items() if k not in SIZE_KEYS} | {"quick_gelu": _quick}, sort_keys=True)
    VARIANTS.setdefault(_key, _name)


def test_the_sweep_covers_the_families():
    assert len(STANDARD) > 100
    options = " ".join(VARIANTS)
    for option in ("no_causal_mask", "proj_bias", "eos", "last", "approximate", "eps", "proj_type"):
        assert option in options


@pytest.mark.parametrize("name", STANDARD)
def test_full_size_text_tower_has_openclips_names_and_shapes(name):
    t, embed, quick = _standard_text(name)
    cfg, bad = text_from_openclip(t)
    assert bad == []
    with torch.device("meta"):
        ref = _build_text_tower(embed, t, quick)
        ours = TextTransformer(cfg, embed, quick)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want


def _shrunk_text(t: dict) -> dict:
    heads = 4
    return {**t, "context_length": 16, "vocab_size": 300, "width": 16 * heads, "heads": heads, "layers": 2}


def _tokens(vocab: int, end_id: int, ctx: int = 16) -> torch.Tensor:
    """Rows of several lengths, each closed by ``end_id`` and zero-padded; one row without it."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(5, ctx, dtype=torch.long)
    for row, n in enumerate((2, 5, 11, ctx, 7)):
        tokens[row, : n - 1] = torch.randint(3, vocab - 1, (n - 1,), generator=g)
        if row < 4:
            tokens[row, n - 1] = end_id
    return tokens


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():  # off the init (zero biases, unit norms, LayerScale) so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("name", sorted(set(VARIANTS.values())))
def test_text_variant_features_equal_openclip(name):
    t, embed, quick = _standard_text(name)
    t = _shrunk_text(t)
    embed = t["width"] if t.get("proj_type") == "none" else 32
    ref = _build_text_tower(embed, t, quick).eval()
    _perturb(ref)
    cfg, _ = text_from_openclip(t)
    ours = TextTransformer(cfg, embed, quick).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    end = t.get("eos_id", 2) if t.get("pool_type") == "eos" else t["vocab_size"] - 1
    tokens = _tokens(t["vocab_size"], end)
    with torch.no_grad():
        want = ref(tokens)
        assert (ours(tokens) - want).abs().max().item() <= TOL
        ours.trim_padding = False
        assert (ours(tokens) - want).abs().max().item() <= TOL


def test_layer_scale_text_tower_equals_openclip():
    t = _shrunk_text({"ls_init_value": 0.1})  # an option of CLIPTextCfg that no shipped config sets
    ref = _build_text_tower(32, t).eval()
    _perturb(ref)
    ours = TextTransformer(text_from_openclip(t)[0], 32, False).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    tokens = _tokens(300, 299)
    with torch.no_grad():
        assert (ours(tokens) - ref(tokens)).abs().max().item() <= TOL


# -- whole models, saved as open_clip saves them ------------------------------------------------------

def _shrunk_model(name: str, tokenizer_dir, vocab: int) -> dict:
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    t = cfg["text_cfg"]
    t.update(context_length=16, vocab_size=vocab, width=64, heads=4, layers=2, hf_tokenizer_name=str(tokenizer_dir))
    return cfg


def _save_and_load(model_cfg: dict, tmp_path, tokenizer=None):
    """open_clip's model with random weights, saved as its push_to_hf_hub saves it, then loaded by both."""
    torch.manual_seed(0)
    cls = open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP
    ref = cls(**{k: v for k, v in model_cfg.items() if k != "custom_text"}).eval()
    _perturb(ref)
    # What open_clip.create_model sets and save_for_hf writes out as the preprocessing
    ref.visual.image_mean, ref.visual.image_std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    out = tmp_path / "saved"
    if tokenizer is not None:
        save_for_hf(ref, tokenizer, model_cfg, out)  # weights (.safetensors and .bin), tokenizer, config
    else:  # CLIP's BPE has no files to save
        out.mkdir()
        save_file(ref.state_dict(), str(out / "open_clip_model.safetensors"))
        save_config_for_hf(ref, out / "open_clip_config.json", model_cfg)
    ours, _ = clipforge.load(out)
    return ref, ours, out


def _assert_features_equal(ref, ours, tokens, image_size: int) -> None:
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        di = (ref.encode_image(images) - ours.encode_image(images)).abs().max().item()
        dt = (ref.encode_text(tokens) - ours.encode_text(tokens)).abs().max().item()
    assert di <= TOL and dt <= TOL, (di, dt)


@pytest.mark.parametrize("name,eos", [("ViT-H-14-worldwide", 2), ("ViT-L-14-worldwide", 1)])
def test_worldwide_loads_from_its_openclip_directory(name, eos, tmp_path):
    tok_dir = unigram_dir(tmp_path, eos_id=eos)  # XLM-V's ids (</s> = 2) / mT5's (</s> = 1)
    kwargs = open_clip.get_model_config(name)["text_cfg"].get("tokenizer_kwargs", {})
    tokenizer = open_clip.tokenizer.HFTokenizer(str(tok_dir), context_length=16, **kwargs)
    ref, ours, out = _save_and_load(_shrunk_model(name, tok_dir, 160), tmp_path, tokenizer)
    assert ours.config.text.pool == "eot" and ours.config.text.eot_token_id == eos
    tokens = clipforge.tokenizer_for(ours)(TEXTS)
    assert torch.equal(tokens, open_clip.get_tokenizer(f"local-dir:{out}")(TEXTS))
    _assert_features_equal(ref, ours, tokens, 32)
    _assert_features_equal(ref, ours, _tokens(160, eos), 32)  # rows without an end token too


def test_clipa_loads_from_its_openclip_directory(tmp_path):
    tok_dir = wordpiece_dir(tmp_path)
    tokenizer = open_clip.tokenizer.HFTokenizer(str(tok_dir), context_length=16, strip_sep_token=True)
    cfg = _shrunk_model("ViT-L-14-CLIPA", tok_dir, 200)
    ref, ours, out = _save_and_load(cfg, tmp_path, tokenizer)
    v = ours.config.vision
    assert (v.pool, v.final_ln_after_pool, v.ln_pre) == ("avg", True, False)
    tokens = clipforge.tokenizer_for(ours)(TEXTS)
    assert torch.equal(tokens, open_clip.get_tokenizer(f"local-dir:{out}")(TEXTS))
    _assert_features_equal(ref, ours, tokens, 32)


@pytest.mark.parametrize("name", ["ViT-S-32-alt", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_openclip_gelu_vit_loads_equal_without_quick_gelu(name, tmp_path, recwarn):
    cfg = open_clip.get_model_config(name)
    assert not cfg.get("quick_gelu")
    ref, ours, _ = _save_and_load(cfg, tmp_path)
    assert not ours.config.quick_gelu
    assert not [w for w in recwarn.list if "activation" in str(w.message)]
    _assert_features_equal(ref, ours, open_clip.tokenize(TEXTS), cfg["vision_cfg"]["image_size"])


@pytest.mark.parametrize("arch", ["ViT-B-32", pytest.param("RN50-quickgelu", marks=pytest.mark.slow)])
def test_bare_state_dict_with_openclip_name_settles_the_activation(arch, tmp_path, recwarn):
    """OpenCLIP's names mean its activations: ``ViT-B-32`` GELU, ``-quickgelu`` OpenAI's QuickGELU."""
    torch.manual_seed(0)
    ref = open_clip.create_model(arch, pretrained=None).eval()
    _perturb(ref)
    path = tmp_path / "weights.safetensors"
    save_file(ref.state_dict(), str(path))
    ours = clipforge.load(path, arch=arch)[0]
    assert ours.config.quick_gelu is arch.endswith("-quickgelu")
    assert not [w for w in recwarn.list if "activation" in str(w.message)]
    _assert_features_equal(ref, ours, open_clip.tokenize(TEXTS), 224)
