"""OpenCLIP's architectures with a Hugging Face text tower (RoBERTa, XLM-R, mT5, NLLB) against open_clip.

Nothing is downloaded: each family's text model is a tiny random config written to a temporary folder
(2 layers, width 32, 200 ids) with a tokenizer of that family's kind built there (XLM-R's
``<s> ... </s>``, mT5's ``... </s>``, NLLB's language code first). open_clip builds the real
architecture's config with that folder as ``hf_model_name`` (its image tower shrunk), weights moved off
their initial values; clipforge loads the hub layout (``open_clip_config.json`` + weights + tokenizer
files) and, for one full-size architecture, a bare state dict named by ``arch=`` with the text model
folder passed as ``text_model_dir``. Image and text features agree within 1e-4 in fp32; token ids
equal open_clip's HFTokenizer's; ``convert --to openclip`` output loads back in open_clip.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
from open_clip.factory import get_model_config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from support.fake_hub import LoopbackServer  # noqa: E402
from support.parity import nudge  # noqa: E402
from support.tokenizers import CORPUS, TEXTS  # noqa: E402

import clipforge  # noqa: E402
from clipforge.config import ClipConfig, TextConfig  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402
from clipforge.model import checkpoints  # noqa: E402
from clipforge.model.clip import CLIP  # noqa: E402
from clipforge.model.hf_source import fetch_text_model, with_text_model  # noqa: E402
from clipforge.model.hf_text import HFTextTower  # noqa: E402
from clipforge.model.interop.openai import config_from_openclip, config_to_openclip  # noqa: E402
from clipforge.model.interop.openclip_text import text_from_openclip, text_to_openclip  # noqa: E402
from clipforge.model.registry import get_config  # noqa: E402
from clipforge.model.zoo_hf_text import HF_TEXT_ARCHITECTURES  # noqa: E402

TOL = 1e-4
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("quiet_logs", "one_torch_thread")]

_XLMR_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)
_BERTLIKE = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=90, type_vocab_size=1, **_XLMR_IDS)
# model_type -> (tiny config, tokenizer kind)
TINY = {
    "roberta": (_BERTLIKE, "xlmr"),
    "xlm-roberta": (_BERTLIKE, "xlmr"),
    "mt5": (dict(vocab_size=200, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1), "mt5"),
    "m2m_100": (dict(vocab_size=200, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                     scale_embedding=True, **_XLMR_IDS), "nllb"),
}
# architecture -> its text model's type (the family's tiny config stands in for the hub model)
FAMILIES = {"roberta-ViT-B-32": "roberta", "xlm-roberta-base-ViT-B-32": "xlm-roberta", "mt5-base-ViT-B-32": "mt5",
            "nllb-clip-base": "m2m_100", "nllb-clip-base-siglip": "m2m_100"}
SMALL_VIT = {"image_size": 64, "layers": 2, "width": 64, "patch_size": 32}
# A SigLIP-style timm tower (attention pool, no head) small enough to run in a second; embed_dim = its width.
SMALL_SIGLIP = {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                "timm_pool": "map", "timm_proj": "none"}


def _unigram(specials: list[str], template: str, ends: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=150, special_tokens=specials,
                                                            unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=template,
                                                       special_tokens=[(t, tok.token_to_id(t)) for t in ends])
    return tok


def save_tokenizer(kind: str, out: Path) -> None:
    """A tokenizer of the family's kind, saved by transformers' own class for it."""
    xlmr_specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    if kind == "xlmr":
        tok = transformers.XLMRobertaTokenizerFast(tokenizer_object=_unigram(xlmr_specials, "<s> $A </s>",
                                                                             ["<s>", "</s>"]))
    elif kind == "mt5":
        tok = transformers.T5TokenizerFast(tokenizer_object=_unigram(["<pad>", "</s>", "<unk>"], "$A </s>", ["</s>"]),
                                           extra_ids=0)
    else:  # NLLB: the source language's code, the text, </s>
        tok = transformers.NllbTokenizer(tokenizer_object=_unigram(xlmr_specials, "$A </s>", ["</s>"]),
                                         extra_special_tokens=["eng_Latn", "fra_Latn"], src_lang="eng_Latn")
    tok.save_pretrained(out)


def write_text_model(out: Path, model_type: str, **sizes) -> Path:
    """A Hugging Face model folder without weights: config.json and tokenizer files."""
    base, kind = TINY[model_type]
    transformers.AutoConfig.for_model(model_type, **{**base, **sizes}).save_pretrained(out)
    save_tokenizer(kind, out)
    return out


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_models")
    return {t: write_text_model(root / t, t) for t in TINY}


def openclip_cfg(name: str, text_dir: Path, small: bool = True) -> dict:
    """OpenCLIP's model config of ``name`` reading the text model from ``text_dir`` (image tower shrunk)."""
    cfg = copy.deepcopy(get_model_config(name))
    cfg.pop("custom_text", None)
    cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir))
    if small and "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"], cfg["embed_dim"] = dict(SMALL_SIGLIP), 192
    elif small:
        cfg["vision_cfg"] = dict(SMALL_VIT)
    return cfg


def openclip_model(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    text = {**cfg["text_cfg"], "hf_model_pretrained": False}
    return nudge(open_clip.CustomTextCLIP(**{**cfg, "text_cfg": text}).eval())


def write_hub_dir(ref: torch.nn.Module, cfg: dict, text_dir: Path, out: Path) -> Path:
    """What open_clip's hub export holds: its config JSON, the weights and the tokenizer's files."""
    out.mkdir()
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    transformers.AutoTokenizer.from_pretrained(text_dir).save_pretrained(out)
    return out


def token_sets(tokenize, pad: int, vocab: int = 200) -> list[torch.Tensor]:
    """The test texts through ``tokenize``, and random ids in rows of 3, 38 and 77 tokens padded with ``pad``."""
    g = torch.Generator().manual_seed(1)
    rows = torch.full((3, 77), pad, dtype=torch.long)
    for row, n in enumerate((3, 38, 77)):
        rows[row, :n] = torch.randint(4, vocab, (n,), generator=g)
    return [tokenize(TEXTS), rows]


def inputs(model: CLIP, pad: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Two images at the model's size, and ``token_sets`` from the model's tokenizer."""
    size = model.config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    return images, token_sets(clipforge.tokenizer_for(model), pad)


def max_diffs(ref: torch.nn.Module, ours: CLIP, images: torch.Tensor, token_sets: list[torch.Tensor]) -> dict:
    with torch.no_grad():
        diffs = {"image": (ref.encode_image(images) - ours.encode_image(images)).abs().max().item()}
        for i, tokens in enumerate(token_sets):
            diffs[f"text{i}"] = (ref.encode_text(tokens) - ours.encode_text(tokens)).abs().max().item()
    return diffs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_openclip_and_round_trips(name, text_dirs, tmp_path):
    start = time.perf_counter()
    text_dir = text_dirs[FAMILIES[name]]
    cfg = openclip_cfg(name, text_dir)
    ref = openclip_model(cfg)
    ours, _ = clipforge.load(write_hub_dir(ref, cfg, text_dir, tmp_path / "hub"))
    assert isinstance(ours.text, HFTextTower)
    images, token_sets = inputs(ours, pad=ref.text.config.pad_token_id)
    assert torch.equal(token_sets[0], open_clip.get_tokenizer(f"local-dir:{tmp_path / 'hub'}")(TEXTS))
    diffs = max_diffs(ref, ours, images, token_sets)
    assert torch.equal(ours.logit_scale, ref.logit_scale)
    if cfg.get("init_logit_bias") is not None:  # the SigLIP pair's logit bias comes along
        assert ours.config.init_logit_bias == -10 and torch.equal(ours.logit_bias, ref.logit_bias)
    # clipforge -> OpenCLIP's directory -> open_clip: the same model, the same token ids
    out = checkpoints.export(ours, "openclip", tmp_path / "export")
    back = open_clip.create_model(f"local-dir:{out}").eval()
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{out}")(TEXTS), token_sets[0])
    diffs.update({f"back {k}": v for k, v in max_diffs(ref, back, images, token_sets).items()})
    again, _ = clipforge.load(out)  # and clipforge reads its own export
    diffs.update({f"again {k}": v for k, v in max_diffs(ref, again, images, token_sets).items()})
    print(f"{name}: max abs diff {max(diffs.values()):.2e}, {time.perf_counter() - start:.1f} s")
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.slow  # 3-4 s each on 2 shared cores: ViT-B/32 at 224 px, built four times
@pytest.mark.parametrize("name", ["roberta-ViT-B-32", "xlm-roberta-base-ViT-B-32", "mt5-base-ViT-B-32", "nllb-clip-base"])
def test_full_size_bare_state_dict_with_arch_and_text_model_dir(name, text_dirs, tmp_path):
    """The architecture at full image size, saved as a bare state dict: arch= names it, the text model
    comes from text_model_dir, and exports keep naming the hub model OpenCLIP's config names."""
    text_dir, hub_id = text_dirs[FAMILIES[name]], get_model_config(name)["text_cfg"]["hf_model_name"]
    ref = openclip_model(openclip_cfg(name, text_dir, small=False))
    torch.save(ref.state_dict(), tmp_path / "bare.pt")
    ours, _ = clipforge.load(tmp_path / "bare.pt", arch=name, text_model_dir=text_dir)
    assert ours.config.name == name and ours.config.text.hf_hub_id == hub_id
    images, token_sets = inputs(ours, pad=ref.text.config.pad_token_id)
    diffs = max_diffs(ref, ours, images, token_sets)
    out = checkpoints.export(ours, "openclip", tmp_path / "export")
    exported = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert exported["text_cfg"]["hf_model_name"] == hub_id
    assert text_from_openclip(exported["text_cfg"])[0] == get_config(name).text
    # open_clip reads it with the hub id swapped for the local folder, as it would fetch it
    text = {**exported["text_cfg"], "hf_model_name": str(text_dir), "hf_model_pretrained": False}
    back = open_clip.create_model(f"local-dir:{out}", text_cfg=text).eval()
    diffs.update({f"back {k}": v for k, v in max_diffs(ref, back, images, token_sets).items()})
    saved, _ = clipforge.load(clipforge.save(ours, tmp_path / "own"))  # clipforge's format keeps the hub id
    assert saved.config.text.hf_hub_id == hub_id
    diffs.update({f"saved {k}": v for k, v in max_diffs(ref, saved, images, token_sets).items()})
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("model_type,pooler,proj,embed", [
    ("roberta", "cls_pooler", None, 32),  # RoBERTa's own pooling layer (tanh on <s>), no projection
    ("roberta", "cls_last_hidden_state_pooler", "linear", 48),
    ("xlm-roberta", "mean_pooler", "mlp", 48),
    ("mt5", "cls_pooler", "linear", 48),  # mT5's encoder has no pooling layer: its first token
    ("m2m_100", "mean_pooler", "mlp", 48),
])
def test_pooler_and_projection_variants_match_hftextencoder(model_type, pooler, proj, embed, text_dirs):
    from open_clip.hf_model import HFTextEncoder

    text_dir = text_dirs[model_type]
    torch.manual_seed(0)
    ref = nudge(HFTextEncoder(str(text_dir), embed, pooler_type=pooler, proj_type=proj, pretrained=False).eval())
    text, bad = text_from_openclip({"hf_model_name": str(text_dir), "hf_pooler_type": pooler, "hf_proj_type": proj})
    assert not bad
    ours = HFTextTower(text, embed).eval()
    state = {k.replace("transformer.", "model.", 1): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        for t in token_sets(clipforge.tokenizer_for(ClipConfig(text=text)), ref.config.pad_token_id):
            torch.testing.assert_close(ours(t), ref(t), atol=TOL, rtol=0)


def test_openclip_text_options_map_both_ways():
    for name in HF_TEXT_ARCHITECTURES:
        t = get_model_config(name)["text_cfg"]
        ours, bad = text_from_openclip(t)
        assert not bad and ours.hf_model == t["hf_model_name"]
        assert text_from_openclip(json.loads(json.dumps(text_to_openclip(ours))))[0] == ours
        whole = config_to_openclip(get_config(name))  # and the whole model, SigLIP's logit bias included
        assert config_from_openclip(json.loads(json.dumps(whole)), name) == get_config(name).replace(name="")
    _, bad = text_from_openclip({"hf_model_name": "roberta-base", "hf_pooler_type": "max_pooler"})
    assert bad == ["text hf_pooler_type='max_pooler'"]  # OpenCLIP's max pooler keeps the padding, not the text
    _, bad = text_from_openclip({"hf_model_name": "roberta-base", "hf_tokenizer_name": "bert-base-uncased"})
    assert len(bad) == 1 and "hf_tokenizer_name" in bad[0]
    assert TextConfig().hf_proj == "matrix"  # clipforge's own towers are unchanged by default


# The real sizes of the largest hub models (their config.json values that differ from transformers' defaults).
REAL = {
    "xlm-roberta-large-ViT-H-14": ("xlm-roberta", dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                                                       num_attention_heads=16, intermediate_size=4096,
                                                       max_position_embeddings=514)),
    "mt5-xl-ViT-H-14": ("mt5", dict(vocab_size=250112, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                                    num_decoder_layers=24, num_heads=32)),
    "nllb-clip-large": ("m2m_100", dict(vocab_size=256206, d_model=1024, encoder_layers=24, decoder_layers=24,
                                        encoder_attention_heads=16, decoder_attention_heads=16,
                                        encoder_ffn_dim=8192, decoder_ffn_dim=8192, max_position_embeddings=1024)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_largest_have_openclips_parameter_count(name, tmp_path):
    model_type, sizes = REAL[name]
    text_dir = write_text_model(tmp_path / "text", model_type, **sizes)
    text = {**get_model_config(name)["text_cfg"], "hf_model_name": str(text_dir), "hf_model_pretrained": False}
    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, device="meta", text_cfg=text)
        ours = CLIP(with_text_model(get_config(name), text_dir))
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    renamed = {k.replace("text.transformer.", "text.model.", 1): v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == renamed


def test_text_model_missing_offline_is_one_line(text_dirs, tmp_path, monkeypatch):
    """The hub id is neither a folder nor cached, and downloads are off: the error says what to pass."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    name, text_dir = "xlm-roberta-base-ViT-B-32", text_dirs["xlm-roberta"]
    cfg = openclip_cfg(name, text_dir)
    ref = openclip_model(cfg)
    cfg["text_cfg"].update(hf_model_name="xlm-roberta-base", hf_tokenizer_name="xlm-roberta-base")
    hub = write_hub_dir(ref, cfg, text_dir, tmp_path / "hub")
    torch.save(ref.state_dict(), tmp_path / "bare.pt")
    for load in (lambda: clipforge.load(hub), lambda: clipforge.load(tmp_path / "bare.pt", arch=name)):
        with pytest.raises(CheckpointError) as e:
            load()
        assert "\n" not in str(e.value)
        assert "'xlm-roberta-base'" in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value)
        assert "--text-model-dir" in str(e.value) and "text_model_dir=" in str(e.value)
    ours, _ = clipforge.load(hub, text_model_dir=text_dir)  # the folder stands in for the hub id
    images, token_sets = inputs(ours)
    assert max(max_diffs(ref, ours, images, token_sets).values()) <= TOL
    from clipforge.cli import main  # and on the command line

    assert main(["convert", "--model", str(hub), "--text-model-dir", str(text_dir), "--to", "clipforge",
                 "--out", str(tmp_path / "own")]) == 0
    assert json.loads((tmp_path / "own" / "config.json").read_text())["text"]["hf_hub_id"] == "xlm-roberta-base"
    with pytest.raises(CheckpointError, match="not a Hugging Face model directory"):
        clipforge.load(hub, text_model_dir=tmp_path)
    with pytest.raises(CheckpointError, match="no Hugging Face text tower"):
        clipforge.load(hub, arch="nano", text_model_dir=text_dir)


def test_hub_id_fetches_config_and_tokenizer_never_weights(text_dirs, tmp_path, monkeypatch):
    import huggingface_hub

    text_dir = text_dirs["xlm-roberta"]
    cfg = openclip_cfg("xlm-roberta-base-ViT-B-32", text_dir)
    ref = openclip_model(cfg)
    cfg["text_cfg"].update(hf_model_name="test-org/tiny-xlmr", hf_tokenizer_name="test-org/tiny-xlmr")
    hub = write_hub_dir(ref, cfg, text_dir, tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    fetch_text_model.cache_clear()
    try:
        with LoopbackServer() as server:
            server.add_repo("test-org/tiny-xlmr", text_dir)
            server.repos["test-org/tiny-xlmr"]["model.safetensors"] = b"the encoder's weights: never needed"
            monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
            ours, _ = clipforge.load(hub)
            fetched = {p.rsplit("/", 1)[-1] for method, p, _ in server.requests if method == "GET"}
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= fetched
        assert "model.safetensors" not in fetched
        images, token_sets = inputs(ours)
        assert max(max_diffs(ref, ours, images, token_sets).values()) <= TOL
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # then offline, from huggingface_hub's cache
        fetch_text_model.cache_clear()
        again, _ = clipforge.load(hub)
        assert max(max_diffs(ref, again, images, token_sets).values()) <= TOL
    finally:
        fetch_text_model.cache_clear()


@pytest.mark.parametrize("model_type", ["xlm-roberta", "mt5", "m2m_100"])
def test_locking_keeps_openclips_head_trainable(model_type, text_dirs):
    """LiT on an OpenCLIP tower: the encoder's layers are found (mT5's block, NLLB's layers), the
    last one and OpenCLIP's head stay trainable, and gradient checkpointing gives the same gradients."""
    from clipforge.train.freeze import lock_tower

    text, _ = text_from_openclip({"hf_model_name": str(text_dirs[model_type]), "hf_proj_type": "mlp"})
    model = CLIP(get_config("nano").replace(text=text))
    frozen = lock_tower(model, "text", unlocked_layers=1)
    assert frozen == model.text.blocks()[:1] and len(model.text.blocks()) == 2
    assert all(p.requires_grad for p in model.text.proj.parameters())
    assert all(p.requires_grad for p in model.text.blocks()[1].parameters())
    tokens = token_sets(clipforge.tokenizer_for(model), model.text.pad_token_id)[0]
    grads = []
    for enable in (False, True):
        model.text.set_grad_checkpointing(enable)
        model.text.zero_grad()
        model.text.eval()(tokens).square().sum().backward()
        grads.append(model.text.proj[0].weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_coca_over_a_hugging_face_text_tower_matches_openclip(text_dirs, tmp_path):
    """coca_roberta-ViT-B-32 (shrunk): a CoCa decoder reading RoBERTa's token states and the ViT's
    patch tokens; features and caption logits equal open_clip's, and the export round-trips."""
    text_dir = text_dirs["roberta"]
    cfg = copy.deepcopy(get_model_config("coca_roberta-ViT-B-32"))
    width = json.loads((text_dir / "config.json").read_text())["hidden_size"]
    cfg["text_cfg"].update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir), width=width)
    cfg["vision_cfg"].update(image_size=64, layers=2, width=width, patch_size=32, head_width=16)
    cfg["multimodal_cfg"].update(width=width, heads=4, layers=2)
    torch.manual_seed(0)
    ref = open_clip.CoCa(cfg["embed_dim"], cfg["multimodal_cfg"], {**cfg["text_cfg"], "hf_model_pretrained": False},
                         cfg["vision_cfg"])
    proj = ref.text_decoder.text_projection  # open_clip leaves it uninitialised (torch.empty)
    torch.nn.init.normal_(proj, std=width**-0.5)
    ref = nudge(ref.eval())
    ours, _ = clipforge.load(write_hub_dir(ref, cfg, text_dir, tmp_path / "hub"))
    assert isinstance(ours.text, HFTextTower) and ours.text_decoder is not None
    images, (texts, rows) = inputs(ours, pad=ref.text.config.pad_token_id)
    out = checkpoints.export(ours, "openclip", tmp_path / "export")
    back = open_clip.create_model(f"local-dir:{out}").eval()
    with torch.no_grad():  # open_clip's CoCa normalises unless told not to
        diffs = {"image": (ref.encode_image(images, normalize=False) - ours.encode_image(images)).abs().max().item()}
        for tokens in (texts, rows):
            want = ref.encode_text(tokens, normalize=False)
            diffs[f"text {tokens.shape[1]}"] = (want - ours.encode_text(tokens)).abs().max().item()
        for tokens in (texts, rows):
            batch = images[:1].expand(len(tokens), -1, -1, -1)
            want = ref(batch, tokens)["logits"]
            diffs[f"logits {tokens.shape[1]}"] = (want - ours.caption_forward(batch, tokens).logits).abs().max().item()
            diffs[f"export logits {tokens.shape[1]}"] = (want - back(batch, tokens)["logits"]).abs().max().item()
    assert max(diffs.values()) <= TOL, diffs
