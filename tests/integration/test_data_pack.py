"""``clipforge data pack`` round trip: table -> shards -> training batches, same captions."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipforge.cli import main
from clipforge.data.config import DataConfig
from clipforge.data.loader import build_train_loader
from clipforge.data.pack import pack_dataset
from clipforge.errors import DataError
from support.fakes import exact, fake_tokenize, untokenize


def _table(tmp_path, n=7):
    rng = np.random.default_rng(0)
    rows = ["image,caption,source"]
    for i in range(n):
        w, h = (90, 40) if i % 2 else (20, 30)  # some need shrinking, some not
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f'{i}.png,"caption {i}, with a comma",site{i}')
    rows.append("missing.png,gone,site9")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "t.csv"


def _read_shards(pattern_dir):
    samples = {}
    for shard in sorted(pattern_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_pack_cli_round_trip(tmp_path, capsys):
    src = _table(tmp_path)
    out = tmp_path / "shards"
    code = main(["data", "pack", "--input", str(src), "--out", str(out), "--max-side", "32", "--shard-size", "3",
                 "--workers", "2", "--jpeg-quality", "80", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    pattern = str(out / "{00000..00002}.tar")
    assert f"train with: --data '{pattern}'" in printed and "missing_file 1" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"] == 7 and stats["shards"] == 3 and stats["skipped"] == {"missing_file": 1}
    assert stats["pattern"] == pattern and stats["bytes"] == sum(p.stat().st_size for p in out.glob("*.tar"))
    samples = _read_shards(out)
    assert sorted(samples) == [f"{i:09d}" for i in range(7)]  # order kept, keys by output position
    for i, key in enumerate(sorted(samples)):
        s = samples[key]
        assert s["txt"].decode() == f"caption {i}, with a comma"
        assert json.loads(s["json"]) == {"source": f"site{i}"}
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and max(img.size) <= 32
        assert img.size == ((32, 14) if i % 2 else (20, 30))  # aspect kept; small ones untouched
    # the shards train: every caption comes back through the streaming loader
    loader = build_train_loader(DataConfig(pattern), exact(), fake_tokenize, batch_size=1, workers=0, seed=0,
                                drop_last=False)
    got = sorted(c for b in loader.epoch_iter(0) for c in untokenize(b.tokens))
    assert got == sorted(f"caption {i}, with a comma" for i in range(7))


def test_pack_folder_in_process_and_errors(tmp_path):
    (tmp_path / "f").mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "f" / "a.jpg")
    (tmp_path / "f" / "a.txt").write_text("a grey square")
    Image.new("RGB", (64, 64)).save(tmp_path / "f" / "b.jpg")  # no caption
    stats = pack_dataset(DataConfig(str(tmp_path / "f")), tmp_path / "o", max_side=16, workers=1, progress=False)
    assert stats["samples"] == 1 and stats["skipped"] == {"missing_caption": 1}
    assert stats["pattern"] == str(tmp_path / "o" / "00000.tar")
    (s,) = _read_shards(tmp_path / "o").values()
    assert s["txt"] == b"a grey square" and "json" not in s
    with pytest.raises(DataError, match="already holds shards"):
        pack_dataset(DataConfig(str(tmp_path / "f")), tmp_path / "o", progress=False)
    assert pack_dataset(DataConfig(str(tmp_path / "f")), tmp_path / "o", workers=1, progress=False,
                        overwrite=True)["samples"] == 1
    with pytest.raises(DataError, match="already WebDataset shards"):
        pack_dataset(DataConfig(stats["pattern"]), tmp_path / "o2", progress=False)
    (tmp_path / "bad.csv").write_text("image,caption\nnope.png,x\n")
    with pytest.raises(DataError, match="nothing to pack"):
        pack_dataset(DataConfig(str(tmp_path / "bad.csv")), tmp_path / "o3", workers=1, progress=False)
    assert not list((tmp_path / "o3").glob("*.tar*"))


def test_pack_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "pack", "--input", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
