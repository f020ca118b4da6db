"""Every command that takes ``--model`` accepts a pretrained name (issue 18): ``eval zeroshot``,
``embed`` and ``serve`` (and ``convert``, ``train``) read a model from a fake hub behind
HF_ENDPOINT on 127.0.0.1, and give what the same model from a local directory gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.cli import build_parser, main
from clipforge.model import checkpoints
from support.datasets import write_csv, write_folder
from support.fake_hub import LoopbackServer
from support.models import save_nano

REPO = "hf-hub:test/nano"
COMMON = ["--device", "cpu", "--no-progress"]


@pytest.fixture()
def hub(nano, tmp_path, monkeypatch):
    """nano in OpenCLIP's hub layout as test/nano; an isolated, online huggingface_hub cache."""
    from huggingface_hub import constants

    for var in ("CLIPFORGE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with LoopbackServer() as server:
        server.add_repo("test/nano", checkpoints.save_openclip(nano, tmp_path / "oc"))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _run(*argv) -> int:
    return main([str(a) for a in argv])


def test_eval_zeroshot_takes_a_hub_name(hub, tmp_path):
    data = write_folder(tmp_path / "data", n=8)
    table = tmp_path / "labels.csv"
    table.write_text("image,label\n" + "".join(f"data/{p.name},{p.with_suffix('.txt').read_text().split()[1]}\n"
                                                for p in sorted(data.glob("*.png"))))
    local = save_nano(tmp_path / "local")
    for model, out in ((REPO, tmp_path / "hub.json"), (local, tmp_path / "local.json")):
        assert _run("eval", "zeroshot", "--model", model, "--data", table, "--label-key", "label",
                    "--out", out, *COMMON) == 0
    hub_result, local_result = (json.loads((tmp_path / f).read_text()) for f in ("hub.json", "local.json"))
    assert hub_result["model"] == REPO
    assert hub_result["metrics"] == local_result["metrics"]
    assert any(path.endswith("open_clip_model.safetensors") for _, path, _ in hub.requests)


def test_embed_takes_a_hub_name(hub, tmp_path):
    data = write_folder(tmp_path / "data", n=6)
    local = save_nano(tmp_path / "local")
    for model, out in ((REPO, tmp_path / "emb-hub"), (local, tmp_path / "emb-local")):
        assert _run("embed", "--model", model, "--input", data, "--out", out, "--workers", "0", *COMMON) == 0
    a, b = (np.load(tmp_path / d / "img_emb" / "img_emb_00000.npy") for d in ("emb-hub", "emb-local"))
    assert a.shape == (6, 64)
    np.testing.assert_array_equal(a, b)
    manifest = json.loads((tmp_path / "emb-hub" / "embeddings.json").read_text())
    assert manifest["model_fingerprint"] == json.loads((tmp_path / "emb-local" / "embeddings.json").read_text())[
        "model_fingerprint"]


def test_serve_takes_a_hub_name(hub, tmp_path):
    from fastapi.testclient import TestClient

    from clipforge.cli.serve import build_app

    data = write_folder(tmp_path / "data", n=6)
    assert _run("embed", "--model", REPO, "--input", data, "--out", tmp_path / "emb", "--workers", "0", *COMMON) == 0
    assert _run("index", "--embeddings", tmp_path / "emb", "--out", tmp_path / "index") == 0
    args = build_parser().parse_args(["serve", "--index", str(tmp_path / "index"), "--model", REPO])
    app, _ = build_app(args)
    with TestClient(app) as client:
        health = client.get("/health").json()
        assert health["model_matches_index"] is True, health
        hits = client.post("/search", json={"text": "a red square", "k": 3}).json()
        assert len(hits["results"]) == 3


def test_train_fine_tunes_and_convert_exports_a_hub_name(hub, tmp_path, one_omp_thread):
    csv = write_csv(tmp_path / "pairs", n=16)
    assert _run("train", "--data", csv, "--model", REPO, "--out", tmp_path / "run", "--steps", "2",
                "--batch-size", "8", "--workers", "0", "--no-tensorboard") == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert _run("convert", "--model", REPO, "--to", "hf", "--out", tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "config.json").is_file()
