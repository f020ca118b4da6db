"""Data hygiene: near-duplicate edits, the perceptual check, train/test overlap on constructed
embeddings (planted copies flagged, clean items not), model mismatch refused, an empty overlap
reported, curation (MetaCLIP caps, CLIP-score filtering of mismatched captions, duplicates), shard
outputs a training loader reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipforge.data.neardup import KINDS, augment
from clipforge.errors import DataError
from clipforge.hygiene import calibrate as C
from clipforge.hygiene import metaclip
from clipforge.hygiene.accuracy import clopper_pearson, split_accuracy
from clipforge.hygiene import perceptual as P
from clipforge.search.layout import EMB_FORMAT, part_name


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(out: Path, vecs: np.ndarray, paths: list[str], fingerprint: str = "fp",
                     text: np.ndarray | None = None, captions: list[str] | None = None) -> Path:
    """An embeddings directory (one part) holding exactly ``vecs``: what clipforge embed writes."""
    for sub in ("img_emb", "metadata") + (("text_emb",) if text is not None else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    np.save(out / part_name("img_emb", 0, "npy"), vecs.astype(np.float16))
    if text is not None:
        np.save(out / part_name("text_emb", 0, "npy"), text.astype(np.float16))
    cols = {"path": paths, "position": pa.array(range(len(paths)), pa.int64())}
    if captions is not None:
        cols["caption"] = captions
    pq.write_table(pa.table(cols), out / part_name("metadata", 0, "parquet"))
    (out / "embeddings.json").write_text(json.dumps({
        "format": EMB_FORMAT, "kind": "image", "inputs": len(paths), "input_fingerprint": str(out), "part_size": len(paths),
        "parts": 1, "embed_dim": vecs.shape[1], "model": "nano", "model_fingerprint": fingerprint,
        "text_embeddings": text is not None}))
    return out


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)  # coarse structure, upsampled: photo-like
    return Image.fromarray(base).resize((64, 64), Image.BICUBIC)


def test_augment_every_kind_is_reproducible():
    img = _picture(0)
    for kind in KINDS:
        a, pa_ = augment(img, kind, np.random.default_rng(1))
        b, pb = augment(img, kind, np.random.default_rng(1))
        assert pa_ == pb and pa_["kind"] == kind and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError):
        augment(img, "blur", np.random.default_rng(0))


def test_perceptual_check_undoes_every_edit_and_tells_strangers_apart():
    img = _picture(3)
    views = P.views(img)
    strangers = np.stack([P.descriptor(_picture(s)) for s in range(10, 40)])
    worst_stranger = P.similarity(views, strangers).max()
    for kind in KINDS:
        for seed in range(3):
            copy, _ = augment(img, kind, np.random.default_rng(seed))
            assert P.similarity(views, P.descriptor(copy)) > max(0.97, worst_stranger), kind


def test_second_look_tells_apart_a_texture_the_thumbnail_blurs_away():
    """The same picture under a fine checkerboard: the thumbnail rates it above some edited copies, the
    sharper second look below every one."""
    img = _picture(3)
    yy, xx = np.mgrid[:64, :64]
    checker = 90 * ((((yy // 4) + (xx // 4)) % 2) - 0.5)[..., None]  # [64, 64, 1]
    alike = Image.fromarray((np.asarray(img, np.float32) + checker).clip(0, 255).astype(np.uint8))
    views = P.views(img)
    copies = [augment(img, kind, np.random.default_rng(seed))[0] for kind in KINDS for seed in range(3)]
    coarse = [float(P.similarity(views, P.descriptor(c))) for c in copies]
    fine = [P.fine_similarity(img, c, views) for c in copies]
    assert P.similarity(views, P.descriptor(alike)) > min(coarse)
    assert P.fine_similarity(img, alike, views) < min(fine) - 0.01


def test_second_look_threshold_scales_with_the_search():
    """Ten times the look-alikes per query in the search: the threshold passes ten times fewer test-pool pairs."""
    neg = np.linspace(0.5, 0.99, 50)
    assert C._scaled_threshold(neg, queries=100, ratio=1.0, max_fpr=0.1) == pytest.approx(neg[-11])
    assert C._scaled_threshold(neg, queries=100, ratio=10.0, max_fpr=0.1) == pytest.approx(neg[-2])
    assert C._scaled_threshold(neg, queries=100, ratio=100.0, max_fpr=0.1) == pytest.approx(neg[-1])
    assert C._scaled_threshold(neg[:5], queries=100, ratio=1.0, max_fpr=0.1) == -1.0  # too few to constrain


def _overlap_sides(tmp_path: Path, fingerprint_test: str = "fp"):
    rng = np.random.default_rng(0)
    train = _unit(rng.standard_normal((400, 32)))
    test = _unit(rng.standard_normal((60, 32)))
    planted = np.arange(0, 60, 4)  # 15 test items copied into train (slightly perturbed)
    train[planted * 5] = _unit(test[planted] + 0.05 * rng.standard_normal((len(planted), 32)))
    write_embeddings(tmp_path / "train_emb", train, [f"/t/{i}.png" for i in range(400)])
    write_embeddings(tmp_path / "test_emb", test, [f"/q/{i}.png" for i in range(60)], fingerprint_test)
    return planted


def test_overlap_flags_planted_copies_and_only_them(tmp_path):
    from clipforge.hygiene.analysis import OverlapJob, run_overlap

    planted = _overlap_sides(tmp_path)
    out = tmp_path / "r" / "overlap.json"
    report = run_overlap(OverlapJob(train=str(tmp_path / "train_emb"), test=str(tmp_path / "test_emb"), out=str(out),
                                    threshold=0.9, progress=False, drop=str(tmp_path / "clean.csv")))
    flagged = sorted(it["test_row"] for it in report["items"])
    assert flagged == planted.tolist()
    assert all(it["train"] == f"/t/{r * 5}.png" for it, r in zip(sorted(report["items"], key=lambda x: x["test_row"]),
                                                                  planted))
    assert report["overlap_fraction"] == pytest.approx(15 / 60)
    assert json.loads(out.read_text())["flagged"] == 15 and out.with_suffix(".png").is_file()
    with open(tmp_path / "clean.csv") as f:
        kept = [r["image"] for r in csv.DictReader(f)]
    assert len(kept) == 385 and not {f"/t/{r * 5}.png" for r in planted} & set(kept)


def test_overlap_refuses_embeddings_of_different_models(tmp_path):
    from clipforge.hygiene.analysis import OverlapJob, run_overlap

    _overlap_sides(tmp_path, fingerprint_test="other")
    with pytest.raises(DataError, match="different models"):
        run_overlap(OverlapJob(train=str(tmp_path / "train_emb"), test=str(tmp_path / "test_emb"),
                               out=str(tmp_path / "o.json"), threshold=0.9, progress=False))


def test_an_empty_overlap_is_a_result(tmp_path):
    from clipforge.hygiene.analysis import OverlapJob, run_overlap

    _overlap_sides(tmp_path)
    report = run_overlap(OverlapJob(train=str(tmp_path / "train_emb"), test=str(tmp_path / "test_emb"),
                                    out=str(tmp_path / "o.json"), threshold=0.999, progress=False))
    assert report["flagged"] == 0 and report["overlap_fraction"] == 0.0 and report["items"] == []


def test_calibration_separates_generated_pairs_with_a_pixel_model():
    """A model whose embedding is the image's coarse pixels: edits stay close, strangers do not."""
    import torch

    class Pixels(torch.nn.Module):
        class config:
            embed_dim = 192

        def encode_image(self, x):  # [B, 3, S, S] -> [B, 192]
            return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)

    from clipforge.model import factory

    pics = [_picture(s) for s in range(40)]
    pre = lambda im: torch.from_numpy(np.asarray(im.convert("RGB").resize((64, 64)), np.float32) / 255 - 0.5).permute(2, 0, 1)
    orig = factory.get_preprocess
    factory.get_preprocess = lambda model: pre
    try:
        vecs = C.embed_pil(Pixels(), pics)
        cal = C.calibrate(Pixels(), pics, vecs, np.arange(40), lambda r: pics[r], max_fpr=0.05, per_kind=20)
    finally:
        factory.get_preprocess = orig
    assert cal.negatives["emb_fpr"] <= 0.05 and cal.negatives["perceptual_fpr"] <= 0.05
    assert cal.kinds["jpeg"]["emb_recall"] >= 0.9 and cal.kinds["resize"]["emb_recall"] >= 0.9
    assert cal.kinds["flip"]["emb_recall"] == 1.0  # the mirrored query view
    assert all(k["perceptual_recall"] >= 0.9 for k in cal.kinds.values()), cal.kinds
    assert cal.negatives["pool"] == 39 and cal.negatives["search_size"] == 39  # no search size given: no scaling


def test_split_accuracy_and_interval():
    correct = np.array([1] * 9 + [0] + [1] * 45 + [0] * 45, bool)
    overlap = np.array([1] * 10 + [0] * 90, bool)
    acc = split_accuracy(correct, overlap, 0.95)
    assert acc["overlap"]["accuracy"] == 0.9 and acc["clean"]["accuracy"] == 0.5
    lo, hi = acc["difference_interval"]
    assert lo < 0.4 < hi and acc["p_value"] < 0.05
    assert clopper_pearson(0, 10)[0] == 0.0
    none = split_accuracy(correct, np.zeros(100, bool))
    assert none["overlap"]["n"] == 0 and none["difference"] is None


def test_metaclip_caps_head_entries_keeps_tail_drops_unmatched(tmp_path):
    caps = ["a photo of a cat"] * 400 + ["a dog on grass"] * 10 + ["a hot dog"] * 5 + ["nothing here"] * 30
    entries_file = tmp_path / "entries.txt"
    entries_file.write_text("# entries\ncat\ndog\nhot dog\n")
    entries = metaclip.load_entries(entries_file)
    matches = metaclip.match(caps, entries)
    assert matches[410] == sorted([entries.index("dog"), entries.index("hot dog")])
    kept, counts = metaclip.balance(matches, len(entries), t=20, seed=0)
    assert counts.tolist() == [400, 15, 5]
    assert 8 <= kept[:400].sum() <= 35  # binomial(400, 0.05): mean 20
    assert kept[400:415].all() and not kept[415:].any()


def _curate_input(tmp_path: Path, n: int = 200, mismatched: float = 0.3):
    rng = np.random.default_rng(0)
    img = _unit(rng.standard_normal((n, 32)))
    txt = _unit(img + 0.2 * rng.standard_normal((n, 32)))
    bad = rng.choice(n, int(mismatched * n), replace=False)
    txt[bad] = _unit(rng.standard_normal((len(bad), 32)))  # a caption of something else
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        _picture(i % 150).save(tmp_path / "img" / f"{i}.png")  # rows 150.. repeat earlier images byte for byte
        rows.append({"image": f"img/{i}.png", "caption": f"caption {i % 180}"})
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    write_embeddings(tmp_path / "emb", img, [str(tmp_path / r["image"]) for r in rows], text=txt,
                     captions=[r["caption"] for r in rows])
    return set(bad.tolist())


def test_curate_clip_score_drops_mismatched_captions_and_counts_reasons(tmp_path):
    from clipforge.hygiene.curate import CurateJob, curate

    bad = _curate_input(tmp_path)
    report = curate(CurateJob(input=str(tmp_path / "pairs.csv"), out=str(tmp_path / "out" / "cur.csv"),
                              embeddings=str(tmp_path / "emb"), top_fraction=0.7, progress=False))
    with open(tmp_path / "out" / "cur.csv.dropped.csv") as f:
        dropped = {int(r["row"]) for r in csv.DictReader(f) if r["reason"] == "low_clip_score"}
    assert report["dropped"] == {"low_clip_score": len(dropped)} and report["rows_out"] == 200 - len(dropped)
    assert len(dropped & bad) / len(dropped) > 0.8  # chance: 0.3
    with open(tmp_path / "out" / "cur.csv") as f:
        first = next(csv.DictReader(f))
    assert (tmp_path / "out" / first["image"]).is_file()  # paths rewritten relative to the output


def test_curate_exact_duplicates_first_reason_wins(tmp_path):
    from clipforge.hygiene.curate import CurateJob, curate

    _curate_input(tmp_path)
    report = curate(CurateJob(input=str(tmp_path / "pairs.csv"), out=str(tmp_path / "cur.csv"), exact_images=True,
                              exact_captions=True, progress=False))
    # rows 150..199 repeat images 0..49; captions repeat from row 180 (already counted as image copies)
    assert report["dropped"] == {"exact_image_duplicate": 50} and report["rows_out"] == 150



def _shards(root: Path, n: int = 6, per_shard: int = 3, same: tuple[int, int] = (1, 4)) -> Path:
    """Shards of ``n`` pictures with captions; sample ``same[1]`` repeats sample ``same[0]`` byte for byte."""
    import io
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                _picture(same[0] if i == same[1] else i).save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", f"picture {i}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def _read_back(folder: Path) -> list[str]:
    from collections import Counter

    from clipforge.data.config import DataConfig
    from clipforge.data.wds import iter_tar, list_shards

    shards = list_shards(DataConfig(path=str(folder)))
    return [key for s in shards for key, sample in iter_tar(s, Counter()) if {"png", "txt"} <= set(sample)]


def test_drop_from_shards_writes_shards_the_loader_reads(tmp_path):
    from clipforge.hygiene.analysis import decontaminate

    src = _shards(tmp_path / "shards")
    dup = [{"path": str(src / "00000.tar" / "000001.png")}, {"path": str(src / "00001.tar" / "000005.png")}]
    got = decontaminate(str(src), None, dup, str(tmp_path / "clean"))
    assert got["rows_before"] == 6 and got["rows_after"] == 4 and got["dropped"] == 2
    assert _read_back(tmp_path / "clean") == ["000000", "000002", "000003", "000004"]
    assert (tmp_path / "clean.dropped.json").is_file()


def test_curate_shards_in_shards_out(tmp_path):
    from clipforge.hygiene.curate import CurateJob, curate

    src = _shards(tmp_path / "shards")
    report = curate(CurateJob(input=str(src), out=str(tmp_path / "curated"), exact_images=True, progress=False))
    assert report["rows_in"] == 6 and report["dropped"] == {"exact_image_duplicate": 1}
    assert _read_back(tmp_path / "curated") == ["000000", "000001", "000002", "000003", "000005"]


def test_overlap_pixel_check_reads_shard_members(tmp_path):
    """Training side as WebDataset shards: the perceptual check reads each candidate member at its
    offset, so pixels decide (a true copy flagged as "both"; look-alike embeddings of other pictures
    vetoed) instead of the embedding deciding alone."""
    import clipforge
    from clipforge.hygiene.analysis import OverlapJob, run_overlap

    shards = _shards(tmp_path / "shards", n=6, per_shard=3, same=(0, 0))
    (tmp_path / "test").mkdir()
    _picture(4).save(tmp_path / "test" / "copy_of_4.png")  # member 000004 of the second shard
    _picture(99).save(tmp_path / "test" / "stranger.png")
    report = run_overlap(OverlapJob(train=str(shards), test=str(tmp_path / "test"), out=str(tmp_path / "o.json"),
                                    model=clipforge.create_model("nano", seed=0).eval(), threshold=-1.0,
                                    perceptual_threshold=0.98, progress=False))
    assert [(Path(it["test"]).name, Path(it["train"]).name, it["signal"]) for it in report["items"]] == [
        ("copy_of_4.png", "000004.png", "both")]
    assert report["items"][0]["perceptual"] > 0.98
