"""Pretrained weights by name (issue 18, items 3-4): the table, name resolution, verified and
resumable URL downloads into the cache, offline hits and misses, and hub repos through a fake hub
behind HF_ENDPOINT. Loopback only: every server runs in this process on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.errors import CheckpointError
from clipforge.model import checkpoints, download, pretrained
from clipforge.model.pretrained import Pretrained
from clipforge.model.registry import list_models
from support.fake_hub import LoopbackServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WEIGHTS = "open_clip_model.safetensors"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No real network, no user cache, no leftover offline switch; retries without waiting."""
    for var in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(download, "_BACKOFF_S", 0.0)


@pytest.fixture()
def server():
    with LoopbackServer() as s:
        yield s


def features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    tokens = clipforge.tokenize(["a red square", "two blue circles"], context_length=model.context_length)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def assert_same_model(a, b) -> None:
    for x, y in zip(features(a), features(b), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.fixture()
def served_nano(nano, server, tmp_path, monkeypatch):
    """nano as an OpenAI-layout state dict at a URL, named ``nano/test`` in the table."""
    data = checkpoints.save_openclip(nano, tmp_path / "nano.pt").read_bytes()  # OpenAI-layout tensors
    server.files["nano.pt"] = data
    entry = Pretrained("nano", "test", quick_gelu=False, url=server.url("nano.pt"),
                       sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(pretrained._TABLE, ("nano", "test"), entry)
    return entry, data


def cached(entry: Pretrained, tmp_path):
    return tmp_path / "cache" / entry.sha256[:16] / "nano.pt"


# -- the table ------------------------------------------------------------------------------------

def test_table_covers_openai_and_openclip_tags_of_buildable_architectures():
    names = pretrained.list_pretrained()
    assert {a for a, t in names if t == "openai"} == {
        "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"}
    assert ("ViT-B-32", "laion2b_s34b_b79k") in names and ("ViT-L-14", "datacomp_xl_s13b_b90k") in names
    for e in pretrained.list_entries():
        assert e.arch in list_models(), e.name
        if e.tag == "openai":  # openai/CLIP's rule: the URL's directory is the file's sha256
            assert e.quick_gelu and e.url.split("/")[-2] == e.sha256 and len(e.sha256) == 64
    assert not pretrained.get_pretrained("ViT-B-32", "laion2b_s34b_b79k").quick_gelu
    assert pretrained.get_pretrained("ViT-B-16", "DFN2B").quick_gelu  # tags are case-insensitive
    assert pretrained.get_pretrained("ViT-L-14", "laion2b_s32b_b82k").mean == (0.5, 0.5, 0.5)


def test_table_names_the_families_weights_with_their_preprocessing_and_tokenizer():
    archs = {e.arch for e in pretrained.list_entries()}
    for family in ("SigLIP", "SigLIP2", "MobileCLIP", "MobileCLIP2", "EVA02", "convnext", "ViTamin", "PE-Core",
                   "CLIPA", "worldwide", "DFN"):
        assert any(family in a for a in archs) or any(family.lower() in e.hf_hub.lower()
                                                      for e in pretrained.list_entries()), family
    siglip = pretrained.get_pretrained("ViT-B-16-SigLIP", "webli")
    assert (siglip.mean, siglip.resize_mode, siglip.tokenizer, siglip.context_length) == (
        (0.5, 0.5, 0.5), "squash", "timm/ViT-B-16-SigLIP", 64)
    mobile = pretrained.get_pretrained("MobileCLIP-S1", "datacompdr")
    assert (mobile.mean, mobile.std, mobile.interpolation) == ((0, 0, 0), (1, 1, 1), "bilinear")
    assert pretrained.get_pretrained("ViT-L-14-CLIPA", "datacomp1b").tokenizer == "bert-base-uncased"
    assert pretrained.get_pretrained("ViT-H-14-worldwide", "metaclip2_worldwide").quick_gelu
    assert pretrained.get_pretrained("ViTamin-S", "datacomp1b").source.endswith("ViTamin-S/pytorch_model.bin")


def test_unknown_names_are_one_line_errors_that_list_what_exists():
    with pytest.raises(CheckpointError, match="its tags: .*openai"):
        clipforge.load("ViT-B-32/nope")
    with pytest.raises(CheckpointError, match="is an architecture, not weights: .*ViT-B-32/openai"):
        clipforge.load("ViT-B-32")
    with pytest.raises(CheckpointError, match="no such file or directory, and not a pretrained name"):
        clipforge.load("missing/model.pt")


def test_cli_lists_the_table(capsys):
    assert main(["pretrained"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "QuickGELU" in rows["ViT-B-32/openai"] and "openaipublic" in rows["ViT-B-32/openai"]
    assert "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in rows["ViT-B-32/laion2b_s34b_b79k"]
    assert main(["pretrained", "RN50", "--json"]) == 0
    assert {r["tag"] for r in json.loads(capsys.readouterr().out)} == {"openai", "yfcc15m", "cc12m"}
    assert main(["pretrained", "nano"]) == 2
    assert "no named weights" in capsys.readouterr().err


# -- plain URLs -----------------------------------------------------------------------------------

def test_download_is_verified_cached_and_reused(nano, server, served_nano, tmp_path):
    entry, data = served_nano
    model, _ = clipforge.load("nano/test")
    assert_same_model(model, nano)
    assert cached(entry, tmp_path).read_bytes() == data and not model.config.quick_gelu
    assert [r[0] for r in server.requests] == ["GET"]
    model, _ = clipforge.load("nano", pretrained="test")  # open_clip's spelling; a cache hit
    assert_same_model(model, nano)
    assert len(server.requests) == 1
    assert clipforge.load("nano-quickgelu/test")[0].config.quick_gelu  # OpenCLIP's suffix sets the activation


def test_interrupted_transfer_is_resumed_with_a_range_request(nano, server, served_nano, tmp_path):
    entry, data = served_nano
    server.drop_once["nano.pt"] = len(data) // 3
    model, _ = clipforge.load("nano/test")
    assert_same_model(model, nano)
    assert server.requests[1][2] == f"bytes={len(data) // 3}-"
    assert not list(cached(entry, tmp_path).parent.glob("*.part"))


def test_a_failed_run_leaves_a_part_file_that_the_next_run_resumes(nano, server, served_nano, tmp_path,
                                                                    monkeypatch):
    entry, _ = served_nano
    monkeypatch.setattr(download, "_ATTEMPTS", 1)
    server.drop_once["nano.pt"] = 1000
    with pytest.raises(CheckpointError, match="interrupted .* run again to resume"):
        clipforge.load("nano/test")
    part = cached(entry, tmp_path).with_name("nano.pt.part")
    assert part.stat().st_size == 1000 and not cached(entry, tmp_path).exists()
    model, _ = clipforge.load("nano/test")
    assert_same_model(model, nano)
    assert server.requests[-1][2] == "bytes=1000-" and not part.exists()


def test_wrong_checksum_is_refused_and_nothing_is_left(server, served_nano, tmp_path, monkeypatch):
    entry, _ = served_nano
    bad = Pretrained("nano", "test", False, url=entry.url, sha256="ab" * 32)
    monkeypatch.setitem(pretrained._TABLE, ("nano", "test"), bad)
    with pytest.raises(CheckpointError, match="checksum mismatch .* deleted") as err:
        clipforge.load("nano/test")
    assert "\n" not in str(err.value)
    left = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not [n for n in left if not n.endswith(".lock")], left


@pytest.mark.parametrize("switch", ["CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_hit_loads_and_miss_says_where_to_put_the_file(nano, server, served_nano, tmp_path, monkeypatch,
                                                               switch):
    entry, _ = served_nano
    clipforge.load("nano/test")
    monkeypatch.setenv(switch, "1")
    model, _ = clipforge.load("nano/test")
    assert_same_model(model, nano)
    assert len(server.requests) == 1
    with pytest.raises(CheckpointError) as err:
        clipforge.load("nano/test", cache_dir=tmp_path / "empty")
    msg = str(err.value)
    assert "\n" not in msg and f"{switch}=1" in msg and entry.url in msg
    assert str(tmp_path / "empty" / entry.sha256[:16] / "nano.pt") in msg
    assert len(server.requests) == 1


def test_a_file_put_in_the_cache_by_hand_is_checked_once(nano, server, served_nano, tmp_path, monkeypatch):
    entry, data = served_nano
    monkeypatch.setenv("CLIPFORGE_OFFLINE", "1")
    dest = cached(entry, tmp_path)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit off
    with pytest.raises(CheckpointError, match="does not match its sha256 .* put it at"):
        clipforge.load("nano/test")
    dest.write_bytes(data)
    model, _ = clipforge.load("nano/test")
    assert_same_model(model, nano)
    assert dest.with_name("nano.pt.sha256").read_text().split() == [entry.sha256, str(len(data))]
    assert not server.requests


# -- hub repos ------------------------------------------------------------------------------------

@pytest.fixture()
def hub(nano, server, tmp_path, monkeypatch):
    """A fake hub at HF_ENDPOINT holding nano in OpenCLIP's layout (test/nano, with a pickle beside
    the safetensors), as a Hugging Face CLIPModel directory (test/nano-hf), and a repo without weights."""
    checkpoints.save_openclip(nano, tmp_path / "oc")
    checkpoints.save_openclip(nano, tmp_path / "oc" / "open_clip_pytorch_model.bin")
    server.add_repo("test/nano", tmp_path / "oc")
    server.add_repo("test/nano-hf", checkpoints.save_hf(nano, tmp_path / "hf"))
    server.repos["test/empty"] = {"README.md": b"nothing here\n"}
    # timm's mirrors: OpenCLIP weights beside timm's own config.json + model.safetensors (not CLIP)
    server.repos["test/mirror"] = {"open_clip_model.safetensors": server.repos["test/nano"][WEIGHTS],
                                   "config.json": b'{"architecture": "vit_base_patch32_clip_224"}',
                                   "model.safetensors": b"timm weights"}
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    return server


def test_hf_hub_name_loads_openclip_layout_preferring_safetensors(nano, hub, tmp_path):
    model, _ = clipforge.load("hf-hub:test/nano", cache_dir=tmp_path / "c")
    assert_same_model(model, nano)
    assert not model.config.quick_gelu  # read from open_clip_config.json
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET"}
    assert "open_clip_model.safetensors" in fetched and "open_clip_pytorch_model.bin" not in fetched
    assert (tmp_path / "c" / "hub" / "models--test--nano").is_dir()  # huggingface_hub's cache layout


def test_bare_repo_id_loads_a_hugging_face_clipmodel_dir_or_clipforges_own(nano, hub, tmp_path):
    model, _ = clipforge.load("test/nano-hf", cache_dir=tmp_path / "c")
    assert_same_model(model, nano)
    hub.add_repo("test/nano-own", clipforge.save(nano, tmp_path / "own"))
    model, _ = clipforge.load("test/nano-own", cache_dir=tmp_path / "c")
    assert_same_model(model, nano)


def test_openclip_weights_win_over_a_non_clip_config_json(nano, hub, tmp_path):
    model, _ = clipforge.load("hf-hub:test/mirror", arch="nano", cache_dir=tmp_path / "c")
    assert_same_model(model, nano)
    assert not [p for m, p, _ in hub.requests if p.endswith(("config.json", "/model.safetensors"))]


def test_table_entry_on_the_hub_fetches_only_the_weights(nano, hub, tmp_path, monkeypatch):
    entry = Pretrained("nano", "hubtest", False, hf_hub="test/nano")
    monkeypatch.setitem(pretrained._TABLE, ("nano", "hubtest"), entry)
    model, _ = clipforge.load("nano", pretrained="hubtest", cache_dir=tmp_path / "c")
    assert_same_model(model, nano)
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET"}
    assert fetched == {"main", "open_clip_model.safetensors"}  # the file list (revision main), the weights


def test_family_entry_brings_its_tokenizer_and_preprocessing(nano, hub, tmp_path, monkeypatch):
    """A SigLIP-style entry: the repo's tokenizer files come with the weights (read from the cache,
    not by hub name) and the model is fed as the weights were trained (squash, mean/std 0.5)."""
    from support.tokenizers import sentencepiece_dir

    from clipforge.model import registry

    siglip_nano = registry.get_config("nano").replace(
        text=dataclasses.replace(nano.config.text, hf_tokenizer_name="test/absent-tokenizer-repo"))
    monkeypatch.setitem(registry._ARCHITECTURES, "nano-sp", siglip_nano)
    repo = checkpoints.save_openclip(nano, tmp_path / "sp")
    for f in sentencepiece_dir(tmp_path / "tok").iterdir():
        (repo / f.name).write_bytes(f.read_bytes())
    hub.add_repo("test/nano-sp", repo)
    entry = Pretrained("nano-sp", "webli", False, hf_hub="test/nano-sp", mean=(0.5,) * 3, std=(0.5,) * 3,
                       resize_mode="squash", interpolation="bilinear")
    monkeypatch.setitem(pretrained._TABLE, ("nano-sp", "webli"), entry)
    model, preprocess = clipforge.load("nano-sp/webli", cache_dir=tmp_path / "c")
    assert_same_model(model, nano)
    pre = model.config.preprocess
    assert (pre.mean, pre.resize_mode, pre.interpolation) == ((0.5,) * 3, "squash", "bilinear")
    assert model.config.text.hf_tokenizer_name.startswith(str(tmp_path / "c"))  # the cached copy
    ids = clipforge.tokenizer_for(model)(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids[0, 0] != 0
    # the same repo by hub name: its open_clip_config.json names a tokenizer repo, the files beside win
    cfg_file = repo / checkpoints.OPENCLIP_CONFIG
    oc_cfg = json.loads(cfg_file.read_text())
    oc_cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "test/absent-tokenizer-repo"
    cfg_file.write_text(json.dumps(oc_cfg))
    hub.add_repo("test/nano-sp2", repo)
    by_hub, _ = clipforge.load("hf-hub:test/nano-sp2", cache_dir=tmp_path / "c")
    assert torch.equal(clipforge.tokenizer_for(by_hub)(["a photo of a cat"]), ids)


def test_hub_offline_hit_and_miss(nano, hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    clipforge.load("hf-hub:test/nano", cache_dir=tmp_path / "c")
    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as if HF_HUB_OFFLINE=1 at import
    model, _ = clipforge.load("hf-hub:test/nano", cache_dir=tmp_path / "c")
    assert_same_model(model, nano)
    with pytest.raises(CheckpointError, match=r"hf-hub:test/nano-hf is not in the Hugging Face cache .* "
                                              r"\(HF_HUB_OFFLINE=1\)") as err:
        clipforge.load("hf-hub:test/nano-hf", cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value) and len(hub.requests) == seen


def test_hub_repo_without_weights_or_missing_is_a_one_line_error(hub, tmp_path):
    with pytest.raises(CheckpointError, match="holds no CLIP weights .* it has README.md"):
        clipforge.load("hf-hub:test/empty", cache_dir=tmp_path / "c")
    with pytest.raises(CheckpointError, match="RepositoryNotFound") as err:
        clipforge.load("hf-hub:test/absent", cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)
