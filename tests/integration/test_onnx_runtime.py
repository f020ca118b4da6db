"""The ONNX runtime through the commands: ``clipforge convert --to onnx`` (and ``--quantize int8`` or
``int8-static --calibration``),
``embed --runtime onnx`` giving torch's embeddings with the runtime in the manifest, ``serve --runtime onnx``
saying so in /health and answering as the torch service does, ``eval`` on an export, and one-line errors
(exit 2) where a model is not an export or cannot be one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from clipforge.cli import build_parser, main  # noqa: E402
from clipforge.cli.serve import build_app  # noqa: E402
from support.datasets import write_csv, write_folder  # noqa: E402
from support.models import save_nano  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]


def _run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-cli")
    torch_dir = save_nano(root / "nano")
    assert _run("convert", "--model", torch_dir, "--to", "onnx", "--out", root / "nano-onnx") == 0
    assert _run("convert", "--model", root / "nano-onnx", "--to", "onnx", "--quantize", "int8",
                "--out", root / "nano-int8") == 0
    folder = write_folder(root / "images", n=12)
    emb = {}
    for runtime, model in (("torch", torch_dir), ("onnx", root / "nano-onnx"), ("int8", root / "nano-int8")):
        out = root / f"emb-{runtime}"
        assert _run("embed", "--model", model, "--runtime", "torch" if runtime == "torch" else "onnx", "--input",
                    folder, "--out", out, "--workers", "0", "--embed-captions", "--no-progress") == 0
        emb[runtime] = out
    assert _run("index", "--embeddings", emb["torch"], "--out", root / "index") == 0
    return root, torch_dir, emb


def _vectors(out, kind="img_emb") -> np.ndarray:
    return np.load(out / kind / f"{kind}_00000.npy").astype(np.float32)


def test_embed_with_onnx_equals_torch_and_records_the_runtime(world):
    _, _, emb = world
    for kind in ("img_emb", "text_emb"):
        ref = _vectors(emb["torch"], kind)
        assert (ref * _vectors(emb["onnx"], kind)).sum(1).min() >= 0.9999  # float16 storage rounds
        assert (ref * _vectors(emb["int8"], kind)).sum(1).min() >= 0.99
    manifests = {k: json.loads((v / "embeddings.json").read_text()) for k, v in emb.items()}
    assert {k: (m["runtime"], m["precision"]) for k, m in manifests.items()} == {
        "torch": ("torch", "fp32"), "onnx": ("onnx", "fp32"), "int8": ("onnx", "int8")}
    assert len({m["model_fingerprint"] for m in manifests.values()}) == 1  # the same weights, every runtime


def test_texts_embed_with_onnx(world, tmp_path):
    root, torch_dir, _ = world
    texts = tmp_path / "texts.txt"
    texts.write_text("a red square\na photo of a dog on the grass by the river\nx\n")
    for runtime, model in (("torch", torch_dir), ("onnx", root / "nano-onnx")):
        assert _run("embed", "--model", model, "--runtime", runtime, "--texts", texts, "--out", tmp_path / runtime,
                    "--no-progress") == 0
    a, b = _vectors(tmp_path / "torch", "text_emb"), _vectors(tmp_path / "onnx", "text_emb")
    assert a.shape == (3, 64) and (a * b).sum(1).min() >= 0.9999


def test_a_run_does_not_resume_with_another_runtime(world, capsys):
    root, torch_dir, emb = world
    assert _run("embed", "--model", root / "nano-onnx", "--input", root / "images", "--out", emb["torch"],
                "--workers", "0", "--no-progress", "--embed-captions") == 2
    assert "different runtime" in capsys.readouterr().err


def _app(*argv):
    return build_app(build_parser().parse_args(["serve", *[str(a) for a in argv]]))[0]


def test_serve_with_onnx_shows_the_runtime_and_answers_as_torch(world):
    root, torch_dir, _ = world
    clients = {name: TestClient(_app("--index", root / "index", "--model", model, "--runtime", runtime, "--threads", 1))
               for name, model, runtime in (("torch", torch_dir, "torch"), ("onnx", root / "nano-onnx", "onnx"),
                                            ("int8", root / "nano-int8", "auto"))}
    health = {k: c.get("/health").json() for k, c in clients.items()}
    assert {k: (h["runtime"], h["precision"], h["model_matches_index"]) for k, h in health.items()} == {
        "torch": ("torch", "fp32", True), "onnx": ("onnx", "fp32", True), "int8": ("onnx", "int8", True)}
    query = {"text": "a red square", "k": 5}
    hits = {k: c.post("/search", json=query).json()["results"] for k, c in clients.items()}
    assert [h["id"] for h in hits["onnx"]] == [h["id"] for h in hits["torch"]]
    assert np.allclose([h["score"] for h in hits["onnx"]], [h["score"] for h in hits["torch"]], atol=1e-4)
    vecs = {k: np.array(c.post("/embed/text", json={"texts": ["a cat", "a blue square"]}).json()["embeddings"])
            for k, c in clients.items()}
    assert (vecs["torch"] * vecs["onnx"]).sum(1).min() >= 0.99999
    assert (vecs["torch"] * vecs["int8"]).sum(1).min() >= 0.99
    image = (root / "images" / "000.png").read_bytes()
    probs = {k: c.post("/classify", files={"image": ("q.png", image, "image/png")},
                       data={"labels": "red,green,blue"}).json()["results"] for k, c in clients.items()}
    assert [r["label"] for r in probs["onnx"]] == [r["label"] for r in probs["torch"]]


def test_convert_with_calibration_embeds_as_torch(world, tmp_path):
    root, torch_dir, emb = world
    data = write_csv(tmp_path / "data", n=16)
    assert _run("convert", "--model", torch_dir, "--to", "onnx", "--quantize", "int8-static", "--calibration", data,
                "--out", tmp_path / "static") == 0
    manifest = json.loads((tmp_path / "static" / "onnx.json").read_text())
    assert (manifest["precision"], manifest["quantization"]["method"]) == ("int8", "static")
    assert _run("embed", "--model", tmp_path / "static", "--input", root / "images", "--out", tmp_path / "e",
                "--workers", "0", "--no-progress") == 0
    assert (_vectors(emb["torch"]) * _vectors(tmp_path / "e")).sum(1).min() >= 0.99


def test_eval_runs_on_an_export(world, tmp_path):
    root, torch_dir, _ = world
    data = write_csv(tmp_path / "data", n=12)
    metrics = {}
    for name, model in (("torch", torch_dir), ("onnx", root / "nano-onnx")):
        assert _run("eval", "retrieval", "--model", model, "--data", data, "--out", tmp_path / f"{name}.json",
                    "--device", "cpu", "--no-progress") == 0
        metrics[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
    assert metrics["onnx"] == pytest.approx(metrics["torch"], abs=1e-6)


EMBED = ["--input", "{images}", "--out", "{tmp}/e"]


@pytest.mark.parametrize("argv, message", [
    (["embed", "--model", "{torch}", "--runtime", "onnx", *EMBED], "needs an ONNX export"),
    (["embed", "--model", "{onnx}", "--runtime", "torch", *EMBED], "only in the onnx runtime"),
    (["embed", "--model", "{onnx}", "--device", "cuda", *EMBED], "drop --device cuda"),
    (["serve", "--model", "{torch}", "--runtime", "onnx", "--index", "{index}"], "needs an ONNX export"),
    (["convert", "--model", "{torch}", "--to", "hf", "--quantize", "int8", "--out", "{tmp}/c"], "--to onnx only"),
    (["convert", "--model", "{torch}", "--to", "onnx", "--dtype", "fp16", "--out", "{tmp}/c"], "fp32 graphs"),
    (["convert", "--model", "{onnx}", "--to", "onnx", "--out", "{tmp}/c"], "already an ONNX export"),
    (["convert", "--model", "{onnx}", "--to", "hf", "--out", "{tmp}/c"], "cannot be read back"),
    (["convert", "--model", "{onnx}", "--to", "onnx", "--quantize", "int8-static", "--out", "{tmp}/c"],
     "needs --calibration"),
    (["convert", "--model", "{onnx}", "--to", "onnx", "--quantize", "int8", "--calibration", "{images}",
      "--out", "{tmp}/c"], "needs --calibration"),
    (["convert", "--model", "{onnx}", "--to", "onnx", "--quantize", "int8-static", "--calibration", "{tmp}/none",
      "--out", "{tmp}/c"], "not a folder of images"),
])
def test_what_cannot_run_is_one_line_and_exit_2(world, tmp_path, capsys, argv, message):
    root, torch_dir, _ = world
    paths = {"torch": torch_dir, "onnx": root / "nano-onnx", "images": root / "images", "index": root / "index",
             "tmp": tmp_path}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_model_that_cannot_export_is_one_line_and_exit_2(world, tmp_path, capsys, monkeypatch):
    _, torch_dir, _ = world

    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent branching\nin a tower")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert _run("convert", "--model", torch_dir, "--to", "onnx", "--out", tmp_path / "c") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot export the image tower of nano to ONNX" in err and "\n" not in err
