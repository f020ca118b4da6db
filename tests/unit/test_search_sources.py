"""Inputs of ``clipforge embed``: folders, tables, WebDataset shards, text files."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipforge.errors import DataError
from clipforge.search import sources
from clipforge.search.decode import read_bytes
from support.datasets import add_member


def _png(path, color=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jpeg_bytes(color, size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def test_folder_is_recursive_sorted_with_sidecar_captions(tmp_path):
    _png(tmp_path / "b" / "z.png")
    _png(tmp_path / "a.png")
    _png(tmp_path / "b" / "c" / "d.PNG")
    (tmp_path / "a.txt").write_text("a red square\n")
    (tmp_path / "notes.md").write_text("not an image")
    t = sources.list_images(sources.InputSpec(str(tmp_path)))
    paths = t.column("path").to_pylist()
    assert paths == sorted(paths) and len(paths) == 3
    assert all(p.startswith(str(tmp_path)) for p in paths)
    caps = dict(zip(paths, t.column("caption").to_pylist()))
    assert caps[str(tmp_path / "a.png")] == "a red square"
    assert caps[str(tmp_path / "b" / "z.png")] is None
    # The fingerprint pins the order: a resumed run must see the same inputs.
    assert sources.input_fingerprint(t) == sources.input_fingerprint(sources.list_images(sources.InputSpec(str(tmp_path))))


def test_table_relative_paths_captions_and_extra_columns(tmp_path):
    _png(tmp_path / "imgs" / "x.png")
    (tmp_path / "list.csv").write_text("filepath,caption,label,score\nimgs/x.png,a thing,cat,0.5\n")
    t = sources.list_images(sources.InputSpec(str(tmp_path / "list.csv")))
    row = t.to_pylist()[0]
    assert row == {"path": str(tmp_path / "imgs" / "x.png"), "caption": "a thing", "label": "cat", "score": 0.5}
    pq.write_table(pa.table({"image": ["imgs/x.png"], "title": ["t"]}), tmp_path / "list.parquet")
    t = sources.list_images(sources.InputSpec(str(tmp_path / "list.parquet")))
    assert t.column("caption").to_pylist() == ["t"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,caption\nx.png,a\n", "no image path column"),
        ("path\nhttps://example.com/a.jpg\n", "URLs"),
    ],
)
def test_table_errors_name_the_problem(tmp_path, content, message):
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        sources.list_images(sources.InputSpec(str(tmp_path / "t.csv")))


def test_missing_input_and_named_column(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sources.list_images(sources.InputSpec(str(tmp_path / "nope")))
    (tmp_path / "t.csv").write_text("path\nx.png\n")
    with pytest.raises(DataError, match="caption column 'cap'"):
        sources.list_images(sources.InputSpec(str(tmp_path / "t.csv"), caption_column="cap"))


def test_brace_expansion():
    assert sources.expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert sources.expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert sources.expand_braces("plain.tar") == ["plain.tar"]


def test_webdataset_members_are_grouped_and_readable_by_offset(tmp_path):
    blobs = {}
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tar:
            for i in range(3):
                key = f"{s:02d}{i:03d}"
                blobs[key] = _jpeg_bytes((40 * i, 80 * s, 100))
                add_member(tar, f"{key}.jpg", blobs[key])
                add_member(tar, f"{key}.txt", f"caption {key}".encode())
                add_member(tar, f"{key}.json", json.dumps({"label": i, "src": "synthetic"}).encode())
            add_member(tar, "orphan.txt", b"no image here")
    t = sources.list_images(sources.InputSpec(str(tmp_path / "shard-{0..1}.tar")))
    assert t.num_rows == 6
    rows = t.to_pylist()
    assert rows[4]["caption"] == "caption 01001" and rows[4]["label"] == 1 and rows[4]["src"] == "synthetic"
    for r in rows:
        key = r["path"].rsplit("/", 1)[1].split(".")[0]
        assert read_bytes(r["path"], r["tar_offset"], r["nbytes"]) == blobs[key]
    # A folder holding only shards reads as WebDataset too.
    assert sources.list_images(sources.InputSpec(str(tmp_path))).num_rows == 6


def test_read_texts(tmp_path):
    (tmp_path / "q.txt").write_text("a cat\n\n a dog \n")
    assert sources.read_texts(tmp_path / "q.txt") == ["a cat", "a dog"]
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "q.parquet")
    assert sources.read_texts(tmp_path / "q.parquet") == ["x", ""]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no texts"):
        sources.read_texts(tmp_path / "empty.txt")


def test_mixed_type_json_metadata_becomes_strings(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, v in enumerate([1, "two"]):
            add_member(tar, f"{i}.jpg", _jpeg_bytes((i * 90, 0, 0)))
            add_member(tar, f"{i}.json", json.dumps({"v": v}).encode())
    t = sources.list_images(sources.InputSpec(str(tmp_path / "s.tar")))
    assert t.column("v").to_pylist() == ["1", "two"]
    assert np.array(t.column("nbytes").to_pylist()).min() > 0
