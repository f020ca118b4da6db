"""JPEG decoding on the device (``search.decode.decode_jpeg_batch``: torchvision's batched nvJPEG
decoding, resize and crop on CUDA) and batch embedding that uses it: the same pixels as Pillow's
path within a few levels, a bad file reported alone, embeddings equal to the CPU path's.
Skipped without CUDA."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import clipforge
from clipforge.config import PreprocessConfig
from clipforge.search import decode
from clipforge.search.embed import EmbedConfig, embed_images
from clipforge.search.sources import InputSpec, list_images

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
SIZES = [(320, 240), (240, 320), (500, 500), (97, 61), (1200, 800)]


def photo(seed: int, w: int, h: int, grey: bool = False) -> bytes:
    """A smooth picture (gradients and a disc) as a JPEG: resampling it is well defined, unlike noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.25 * min(w, h)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.float32)
    rgb = np.stack([255 * x / w, 255 * y / h, 200 * disc + 30], -1)
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    (im.convert("L") if grey else im).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_device_decoding_matches_pillow_within_a_few_levels():
    cfg = PreprocessConfig(image_size=64)
    blobs = [photo(i, w, h, grey=i == 3) for i, (w, h) in enumerate(SIZES)]
    out = decode.decode_jpeg_batch(blobs, cfg, CUDA)
    for blob, px in zip(blobs, out):
        assert isinstance(px, torch.Tensor), px
        assert px.device.type == "cuda" and px.dtype == torch.uint8 and px.shape == (3, 64, 64)
        ref = TF.pil_to_tensor(decode.pil_resize_crop(decode.open_image(blob, 2**27), cfg, draft=False))
        assert (px.cpu().int() - ref.int()).abs().float().mean() < 3.0


def test_a_corrupt_jpeg_in_a_batch_fails_alone():
    cfg = PreprocessConfig(image_size=32)
    bad = b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))
    out = decode.decode_jpeg_batch([photo(0, 64, 48), bad, photo(1, 80, 60)], cfg, CUDA)
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    assert isinstance(out[1], str) and out[1]


def test_embed_images_decodes_on_the_gpu_and_matches_the_cpu_path(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (w, h) in enumerate(SIZES):
        (folder / f"im{i}.jpg").write_bytes(photo(i, w, h))
    decoded = []
    real = decode.decode_jpeg_batch
    monkeypatch.setattr(decode, "decode_jpeg_batch", lambda blobs, cfg, dev: decoded.extend(blobs) or
                        real(blobs, cfg, dev))
    model = clipforge.create_model("nano", seed=0).eval()
    table = list_images(InputSpec(str(folder)))
    gpu = embed_images(model, table, tmp_path / "gpu", EmbedConfig(
        device="cuda", decode="torch", precision="fp32", num_workers=0, progress=False))
    assert gpu.embedded == len(SIZES) and gpu.unreadable == 0
    assert len(decoded) == len(SIZES)  # every JPEG went through the device decoder
    cpu = embed_images(model.cpu(), table, tmp_path / "cpu", EmbedConfig(
        device="cpu", decode="pil", draft=False, precision="fp32", num_workers=0, progress=False))
    a = np.load(tmp_path / "gpu" / "img_emb" / "img_emb_00000.npy").astype(np.float32)
    b = np.load(tmp_path / "cpu" / "img_emb" / "img_emb_00000.npy").astype(np.float32)
    assert cpu.embedded == len(SIZES) and a.shape == b.shape
    assert ((a * b).sum(1) > 0.99).all()  # both L2-normalised: the product is the cosine
