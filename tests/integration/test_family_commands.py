"""The families beyond OpenAI's shapes through the commands (issue 18): ``clipforge train`` on a SigLIP
architecture (sigmoid loss chosen and initialised as the SigLIP paper does), then eval, embed, index and
convert of what it wrote; on CoCa (its captioning loss added); and checkpoints of the timm-tower
families saved as OpenCLIP saves them, through eval zeroshot, embed and convert, with the same features
as the Python API gives."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.model import checkpoints
from clipforge.train.config import TrainConfig
from support.datasets import write_csv, write_folder

COMMON = ["--device", "cpu", "--no-progress"]
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]


def _run(*argv) -> int:
    return main([str(a) for a in argv])


def _labels(data, out):
    """A label table for write_folder's images (its captions are '<colour> <shape>')."""
    out.write_text("image,label\n" + "".join(f"{p.parent.name}/{p.name},{p.with_suffix('.txt').read_text().split()[1]}\n"
                                             for p in sorted(data.glob("*.png"))))
    return out


def test_train_a_siglip_architecture_then_every_command(tmp_path):
    data = write_csv(tmp_path / "data", n=24)
    run = tmp_path / "run"
    assert _run("train", "--data", data, "--model", "tiny-siglip", "--out", run, "--steps", "4", "--batch-size", "8",
                "--workers", "0", "--lr", "1e-3", "--save-every", "0", "--seed", "0", *COMMON[:2], "--no-progress") == 0
    assert TrainConfig.load(run / "config.yaml").loss == "siglip"  # auto: the model has a logit bias
    model, _ = clipforge.load(run / "final")
    cfg = model.config
    assert (cfg.vision.arch, cfg.init_logit_bias, cfg.init_logit_scale) == ("siglip", -10.0, math.log(10.0))
    # trained from the paper's start: temperature 10 and bias -10, both moved by 4 steps
    assert model.logit_bias.item() != -10.0 and abs(model.logit_bias.item() + 10.0) < 0.1
    assert model.logit_scale.item() != math.log(10.0)

    folder = write_folder(tmp_path / "imgs", n=8)
    table = _labels(folder, tmp_path / "labels.csv")
    assert _run("eval", "zeroshot", "--model", run / "final", "--data", table, "--label-key", "label",
                "--out", tmp_path / "zs.json", *COMMON) == 0
    assert 0.0 <= json.loads((tmp_path / "zs.json").read_text())["metrics"]["acc1"] <= 1.0
    assert _run("embed", "--model", run / "final", "--input", folder, "--out", tmp_path / "emb", "--workers", "0",
                *COMMON) == 0
    emb = np.load(tmp_path / "emb" / "img_emb" / "img_emb_00000.npy")
    assert emb.shape == (8, 128) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert _run("index", "--embeddings", tmp_path / "emb", "--out", tmp_path / "index") == 0
    assert _run("convert", "--model", run / "final", "--to", "hf", "--out", tmp_path / "hf") == 0
    back, _ = clipforge.load(tmp_path / "hf")  # a transformers SiglipModel directory
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(images), model.encode_image(images), rtol=0, atol=1e-5)
    assert _run("convert", "--model", run / "final", "--to", "openclip", "--out", tmp_path / "oc") == 2  # one line


def test_explicit_clip_loss_on_a_siglip_architecture_is_kept(tmp_path):
    data = write_csv(tmp_path / "data", n=8)
    assert _run("train", "--data", data, "--model", "tiny-siglip", "--loss", "clip", "--out", tmp_path / "run",
                "--steps", "1", "--batch-size", "8", "--workers", "0", "--save-every", "0", *COMMON) == 0
    assert TrainConfig.load(tmp_path / "run" / "config.yaml").loss == "clip"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["PE-Core-T-16-384", "ViT-B-16-SigLIP"])
def test_openclip_family_checkpoint_in_eval_embed_and_convert(arch, tmp_path):
    """A family checkpoint in OpenCLIP's hub layout (with its tokenizer files where it has some)
    gives the Python API's features through embed, and converts back to the same model."""
    pytest.importorskip("timm")
    from support.tokenizers import sentencepiece_dir

    torch.manual_seed(0)
    model = clipforge.create_model(arch).eval()
    saved = checkpoints.save_openclip(model, tmp_path / "oc")
    if model.config.text.hf_tokenizer_name:  # SigLIP's SentencePiece files beside the weights
        for f in sentencepiece_dir(tmp_path / "tok").iterdir():
            (saved / f.name).write_bytes(f.read_bytes())
    loaded, preprocess = clipforge.load(saved)
    folder = write_folder(tmp_path / "imgs", n=4)
    table = _labels(folder, tmp_path / "labels.csv")
    assert _run("eval", "zeroshot", "--model", saved, "--data", table, "--label-key", "label",
                "--out", tmp_path / "zs.json", *COMMON) == 0
    assert _run("embed", "--model", saved, "--input", folder, "--out", tmp_path / "emb", "--workers", "0",
                *COMMON) == 0
    emb = np.load(tmp_path / "emb" / "img_emb" / "img_emb_00000.npy")
    from PIL import Image

    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
    with torch.no_grad():
        ref = loaded.encode_image(images, normalize=True).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-4)
    assert _run("convert", "--model", saved, "--to", "openclip", "--out", tmp_path / "back") == 0
    again, _ = clipforge.load(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), loaded.encode_image(images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("weight", [2.0, 0.0])
def test_train_a_coca_architecture_with_its_captioning_loss(weight, tmp_path):
    """``clipforge train`` on CoCa adds the captioning loss (its decoder learns); weight 0 trains
    the contrastive towers only (the decoder keeps its initial weights)."""
    data = write_csv(tmp_path / "data", n=16)
    run = tmp_path / "run"
    assert _run("train", "--data", data, "--model", "tiny-coca", "--out", run, "--steps", "3", "--batch-size", "8",
                "--workers", "0", "--lr", "1e-3", "--save-every", "0", "--caption-loss-weight", weight,
                *COMMON) == 0
    start = clipforge.create_model("tiny-coca", seed=0).state_dict()
    model, _ = clipforge.load(run / "final")
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    decoder = {k for k in start if k.startswith("text_decoder.")}
    assert decoder
    assert (decoder <= moved) if weight else not (decoder & moved)
    assert any(k.startswith("visual.") for k in moved) and any(k.startswith("text.") for k in moved)
    assert model.generate(torch.randn(2, 3, 64, 64), max_len=6).shape[0] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])


def test_coca_with_gradient_accumulation_is_a_one_line_error(tmp_path, capsys):
    data = write_csv(tmp_path / "data", n=16)
    assert _run("train", "--data", data, "--model", "tiny-coca", "--out", tmp_path / "run", "--steps", "1",
                "--batch-size", "4", "--grad-accum", "2", "--workers", "0", *COMMON) == 2
    assert "grad_accum 1" in capsys.readouterr().err


@pytest.mark.slow
def test_train_an_openclip_hugging_face_text_architecture_from_a_local_encoder(tmp_path):
    """``--model xlm-roberta-base-ViT-B-32 --text-model DIR``: OpenCLIP's tower (mean pooling, MLP
    head) over the encoder in DIR, starting from its weights; with the text tower locked they stay."""
    transformers = pytest.importorskip("transformers")
    from support.tokenizers import unigram_dir

    enc = tmp_path / "xlmr"
    cfg = transformers.AutoConfig.for_model("xlm-roberta", vocab_size=160, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=90,
                                           type_vocab_size=1, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(cfg).save_pretrained(enc)
    for f in unigram_dir(tmp_path / "tok", eos_id=2).iterdir():
        (enc / f.name).write_bytes(f.read_bytes())
    data = write_csv(tmp_path / "data", n=8)
    run = tmp_path / "run"
    assert _run("train", "--data", data, "--model", "xlm-roberta-base-ViT-B-32", "--text-model", enc, "--out", run,
                "--steps", "2", "--batch-size", "4", "--workers", "0", "--save-every", "0", "--lock-text",
                *COMMON) == 0
    model, _ = clipforge.load(run / "final")
    t = model.config.text
    assert (t.hf_pooling, t.hf_proj) == ("mean", "mlp")
    pretrained = transformers.AutoModel.from_pretrained(enc).state_dict()
    ours = model.text.model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in pretrained.items() if k in ours and not k.startswith("pooler"))
