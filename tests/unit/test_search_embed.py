"""Batch embedding: part layout, exact resume, ranks, skip file, decoding paths."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.errors import DataError
from clipforge.search import decode, embed, sources
from clipforge.search.embed import EmbedConfig, embed_images


@pytest.fixture(scope="module")
def model():
    # A tiny model on a shared 2-core machine: intra-op threads only add synchronisation stalls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield clipforge.create_model("nano", seed=0).eval()
    torch.set_num_threads(threads)


def _noise_image(path, seed, size=(96, 80), fmt=None):
    rng = np.random.default_rng(seed)
    small = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
    Image.fromarray(small).resize(size, Image.BILINEAR).save(path, fmt)
    return path


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(11):
        _noise_image(d / f"{i:02d}.{'jpg' if i % 2 else 'png'}", i)
    return d


def _cfg(**kw):
    return EmbedConfig(**{"batch_size": 2, "part_size": 3, "num_workers": 0, "progress": False, **kw})


def _read(out):
    parts = embed.finished_parts(out)
    vecs = np.concatenate([np.load(out / embed.part_name("img_emb", p, "npy")) for p in parts])
    meta = [r for p in parts for r in pq.read_table(out / embed.part_name("metadata", p, "parquet")).to_pylist()]
    return vecs, meta


def test_layout_and_normalised_float16(model, folder, tmp_path):
    table = sources.list_images(sources.InputSpec(str(folder)))
    s = embed_images(model, table, tmp_path / "emb", _cfg(num_workers=1), source=str(folder))  # a worker process
    assert (s.parts_total, s.parts_written, s.embedded, s.unreadable) == (4, 4, 11, 0)
    vecs, meta = _read(tmp_path / "emb")
    assert vecs.dtype == np.float16 and vecs.shape == (11, model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert [m["position"] for m in meta] == list(range(11))
    assert meta[0]["path"] == str(folder / "00.png") and meta[0]["width"] == 96 and meta[0]["nbytes"] > 0
    manifest = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    assert manifest["inputs"] == 11 and manifest["part_size"] == 3 and manifest["embed_dim"] == 64


def test_interrupted_run_resumes_without_loss_or_duplicates(model, folder, tmp_path, monkeypatch):
    table = sources.list_images(sources.InputSpec(str(folder)))
    embed_images(model, table, tmp_path / "clean", _cfg())
    clean_vecs, clean_meta = _read(tmp_path / "clean")

    out = tmp_path / "resumed"
    real_write = embed._write_part
    calls = []

    def crash_on_third(out_dir, part, *args):
        calls.append(part)
        if len(calls) == 3:
            # Killed mid-part: the vectors made it to disk, the metadata (the "done" mark) did not.
            np.save(out_dir / embed.part_name("img_emb", part, "npy"), np.zeros((1, 64), np.float16))
            raise KeyboardInterrupt
        real_write(out_dir, part, *args)

    monkeypatch.setattr(embed, "_write_part", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        embed_images(model, table, out, _cfg())
    assert embed.finished_parts(out) == [0, 1]
    monkeypatch.setattr(embed, "_write_part", real_write)

    s = embed_images(model, table, out, _cfg())
    assert (s.parts_skipped, s.parts_written, s.embedded) == (2, 2, 5)
    vecs, meta = _read(out)
    assert [m["position"] for m in meta] == list(range(11))  # none lost, none twice
    np.testing.assert_array_equal(vecs, clean_vecs)
    assert meta == clean_meta
    again = embed_images(model, table, out, _cfg())
    assert again.parts_written == 0 and again.parts_skipped == 4


def test_ranks_take_strided_parts_and_a_different_world_size_resumes(model, folder, tmp_path):
    table = sources.list_images(sources.InputSpec(str(folder)))
    embed_images(model, table, tmp_path / "clean", _cfg())
    out = tmp_path / "dist"
    s0 = embed_images(model, table, out, _cfg(rank=0, world_size=2))
    assert embed.finished_parts(out) == [0, 2] and s0.parts_written == 2
    assert not (out / "skipped.tsv").exists()  # written once every part is finished
    s = embed_images(model, table, out, _cfg())  # resumed by a single process
    assert (s.parts_skipped, s.parts_written) == (2, 2)
    assert (out / "skipped.tsv").read_text() == ""
    np.testing.assert_array_equal(_read(out)[0], _read(tmp_path / "clean")[0])


def test_unreadable_images_go_to_the_skip_file(model, folder, tmp_path):
    (folder / "03.jpg").write_bytes(b"not a jpeg at all")
    data = (folder / "05.jpg").read_bytes()
    (folder / "05.jpg").write_bytes(data[: len(data) // 3])  # truncated
    _noise_image(folder / "99.png", 99, size=(400, 400))
    table = sources.list_images(sources.InputSpec(str(folder)))
    s = embed_images(model, table, tmp_path / "emb", _cfg(max_image_pixels=300 * 300))
    lines = (tmp_path / "emb" / "skipped.tsv").read_text().splitlines()
    skipped = dict(line.split("\t") for line in lines)
    assert set(skipped) == {str(folder / "03.jpg"), str(folder / "05.jpg"), str(folder / "99.png")}
    assert "not an image" in skipped[str(folder / "03.jpg")] and "too many pixels" in skipped[str(folder / "99.png")]
    vecs, meta = _read(tmp_path / "emb")
    assert s.unreadable == 3 and s.embedded == 9 and len(vecs) == len(meta) == 9
    assert not {m["path"] for m in meta} & set(skipped)


def test_changed_inputs_or_part_size_are_refused(model, folder, tmp_path):
    table = sources.list_images(sources.InputSpec(str(folder)))
    embed_images(model, table, tmp_path / "emb", _cfg())
    with pytest.raises(DataError, match="part size"):
        embed_images(model, table, tmp_path / "emb", _cfg(part_size=4))
    _noise_image(folder / "new.png", 50)
    with pytest.raises(DataError, match="input"):
        embed_images(model, sources.list_images(sources.InputSpec(str(folder))), tmp_path / "emb", _cfg())


def test_decoding_paths_match_the_eval_transform(model, tmp_path):
    cfg = model.config.preprocess
    path = _noise_image(tmp_path / "big.jpg", 7, size=(512, 384))
    preprocess = clipforge.get_preprocess(model)
    ref = preprocess(Image.open(path))  # [3, 64, 64] normalised
    full = decode.ImageDataset([str(path)], None, None, cfg, "pil", draft=False)[0]
    drafted = decode.ImageDataset([str(path)], None, None, cfg, "pil", draft=True)[0]
    raw = decode.ImageDataset([str(path)], None, None, cfg, "torch")[0]
    assert full.pixels.dtype == torch.uint8 and raw.jpeg is not None and raw.pixels is None
    (on_device,) = decode.decode_jpeg_batch([raw.jpeg], cfg, torch.device("cpu"))
    torch.testing.assert_close(decode.normalize(full.pixels[None], cfg)[0], ref, atol=1e-5, rtol=0)
    for other in (drafted.pixels, on_device):  # draft / libjpeg-in-torchvision: same picture, resampled differently
        assert other.shape == (3, 64, 64)
        assert (other.float() - full.pixels.float()).abs().mean() < 6


def test_bad_jpeg_in_a_device_batch_is_isolated(model, tmp_path):
    cfg = model.config.preprocess
    good = _noise_image(tmp_path / "g.jpg", 1).read_bytes()
    out = decode.decode_jpeg_batch([good, good[:200], good], cfg, torch.device("cpu"))
    assert isinstance(out[0], torch.Tensor) and isinstance(out[1], str) and isinstance(out[2], torch.Tensor)


def test_captions_and_texts(model, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        _noise_image(d / f"{i}.png", i)
        (d / f"{i}.txt").write_text(f"picture number {i}")
    table = sources.list_images(sources.InputSpec(str(d)))
    embed_images(model, table, tmp_path / "emb", _cfg(embed_captions=True))
    text = np.concatenate([np.load(tmp_path / "emb" / embed.part_name("text_emb", p, "npy")) for p in range(2)])
    single = embed.embed_texts(model, [f"picture number {i}" for i in range(4)], tmp_path / "txt", _cfg())
    assert single.embedded == 4
    alone = np.concatenate([np.load(tmp_path / "txt" / embed.part_name("text_emb", p, "npy")) for p in range(2)])
    np.testing.assert_allclose(text.astype(np.float32), alone.astype(np.float32), atol=2e-3)
    meta = pq.read_table(tmp_path / "txt" / embed.part_name("metadata", 1, "parquet")).to_pylist()
    assert meta[0] == {"caption": "picture number 3", "position": 3}
