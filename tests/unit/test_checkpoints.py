"""Checkpoint reading is safe and strict: nothing but tensors is unpickled, damaged files and
leftover/missing tensors are named errors, and the convert command round-trips."""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge.cli import main as cli_main
from clipforge.errors import CheckpointError
from clipforge.model.interop import openai


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on a shared 2-core machine


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _RunsCode:
    """Unpickling this calls os.system: exactly what a loader must never do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_own_format_round_trip(tmp_path, nano):
    clipforge.save(nano, tmp_path / "m")
    back, _ = clipforge.load(tmp_path / "m")
    assert back.config == nano.config and same_tensors(back, nano)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_runs_code_is_refused(tmp_path, zip_format):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(1), "x": _RunsCode(str(marker))}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        clipforge.load(path)
    assert not marker.exists()


def test_torchscript_archive_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:  # shaped like a TorchScript archive, pickle calls os.system
        z.writestr("evil/data.pkl", pickle.dumps(_RunsCode(str(marker)), protocol=2))
        z.writestr("evil/code/__torch__/model.py", "")
        z.writestr("evil/version", "4\n")
    with pytest.raises(CheckpointError, match="refusing"):
        clipforge.load(path)
    assert not marker.exists()


def test_damaged_files_are_named(tmp_path, nano):
    clipforge.save(nano, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        clipforge.load(tmp_path / "m")

    torch.save(nano.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        clipforge.load(tmp_path / "cut.pt")

    (tmp_path / "junk.bin").write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="unrecognised content"):
        clipforge.load(tmp_path / "junk.bin")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        clipforge.load(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        clipforge.load(tmp_path / "missing.pt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="no recognised checkpoint"):
        clipforge.load(tmp_path / "emptydir")


def test_leftover_missing_and_misshaped_tensors_fail(tmp_path, nano):
    state = openai.to_openai(nano.state_dict())
    torch.save({**state, "visual.extra": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e.g. visual.extra\)"):
        clipforge.load(tmp_path / "extra.pt", quick_gelu=False)
    torch.save({**state, "bogus.weight": torch.zeros(2)}, tmp_path / "bogus.pt")
    with pytest.raises(CheckpointError, match="no counterpart.*bogus.weight"):
        clipforge.load(tmp_path / "bogus.pt", quick_gelu=False)
    torch.save({k: v for k, v in state.items() if k != "visual.ln_post.bias"}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. visual.ln_post.bias\)"):
        clipforge.load(tmp_path / "missing.pt", quick_gelu=False)
    torch.save(state, tmp_path / "nano.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        clipforge.load(tmp_path / "nano.pt", arch="tiny")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        clipforge.load(tmp_path / "nano.pt", arch="no-such-arch")
    torch.save({**state, "input_resolution": torch.tensor(224)}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="input_resolution=224 but the weights say 64"):
        clipforge.load(tmp_path / "meta.pt", quick_gelu=False)


def test_inferred_architecture_and_wrappers(tmp_path, nano):
    # 64-dim heads in both towers: the one head size shapes cannot reveal, so inference assumes it
    cfg = nano.config.replace(text=dataclasses.replace(nano.config.text, heads=1), name="")
    model = clipforge.create_model(cfg, seed=0).eval()
    state = openai.to_openai(model.state_dict())
    # OpenCLIP training checkpoint: wrapped, DDP prefix, plus non-tensor bookkeeping
    torch.save({"epoch": 2, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()}},
               tmp_path / "epoch_2.pt")
    with pytest.warns(UserWarning, match="GELU"):
        back, _ = clipforge.load(tmp_path / "epoch_2.pt")
    assert back.config == model.config  # shapes and activation recovered
    assert same_tensors(back, model)
    # clipforge-layout state dict in safetensors, named explicitly
    save_file({k: v.contiguous() for k, v in nano.state_dict().items()}, str(tmp_path / "own.safetensors"))
    named, _ = clipforge.load(tmp_path / "own.safetensors", arch="nano")
    assert named.config.name == "nano" and same_tensors(named, nano)


def test_explicit_arch_needed_for_uninferable_heads(tmp_path):
    tiny = clipforge.create_model("tiny", seed=0)  # text: width 128 with 4 heads (32-dim)
    torch.save(tiny.state_dict(), tmp_path / "tiny.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guessed, _ = clipforge.load(tmp_path / "tiny.pt")
    assert guessed.config.text.heads == 2  # 64-dim heads assumed, as openai/CLIP does
    named, _ = clipforge.load(tmp_path / "tiny.pt", arch="tiny")
    assert named.config.text.heads == 4 and named.config.quick_gelu is False
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    with torch.no_grad():
        assert torch.allclose(named.encode_text(tokens), tiny.encode_text(tokens), atol=1e-6)


def test_bn_counter_is_the_only_filled_tensor(tmp_path):
    rn = clipforge.create_model("tiny-rn", seed=0)
    state = {k: v for k, v in openai.to_openai(rn.state_dict()).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "rn.pt")
    back, _ = clipforge.load(tmp_path / "rn.pt", arch="tiny-rn")
    assert same_tensors(back, rn)


def test_convert_cli(tmp_path, nano, capsys):
    clipforge.save(nano, tmp_path / "src")
    assert cli_main(["convert", "--model", str(tmp_path / "src"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert cli_main(["convert", "--model", str(tmp_path / "hf"), "--to", "openclip",
                     "--out", str(tmp_path / "oc.safetensors")]) == 0
    assert cli_main(["convert", "--model", str(tmp_path / "oc.safetensors"), "--to", "clipforge",
                     "--out", str(tmp_path / "back"), "--arch", "nano"]) == 0
    back, _ = clipforge.load(tmp_path / "back")
    assert same_tensors(back, nano)
    capsys.readouterr()

    out = str(tmp_path / "o.pt")
    assert cli_main(["convert", "--model", str(tmp_path / "src"), "--to", "openai", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GELU" in err and "'openclip' format" in err
    assert cli_main(["convert", "--model", str(tmp_path / "nope"), "--to", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", "--model", "a", "--to", "tflite", "--out", "b"])  # not a format (onnx is one)
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", "--help"])
    assert e.value.code == 0 and "--to" in capsys.readouterr().out


def test_convert_cli_dtype(tmp_path, nano):
    clipforge.save(nano, tmp_path / "src")
    assert cli_main(["convert", "--model", str(tmp_path / "src"), "--to", "clipforge",
                     "--out", str(tmp_path / "half"), "--dtype", "fp16"]) == 0
    half, _ = clipforge.load(tmp_path / "half", dtype=torch.float16)
    assert half.text.token_embedding.weight.dtype == torch.float16
    assert torch.equal(half.text.token_embedding.weight, nano.text.token_embedding.weight.half())


def test_open_clip_config_round_trip_and_refusals():
    from clipforge.model.registry import get_config

    cfg = get_config("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, eot_token_id=3), init_logit_bias=-10.0, name="")
    d = openai.config_to_openclip(cfg)
    assert d["model_cfg"]["text_cfg"]["pool_type"] == "eos"  # argmax would not find id 3
    assert openai.config_from_openclip(d, "x") == cfg
    d["model_cfg"]["vision_cfg"]["attentional_pool"] = "parallel"  # OpenCLIP's unfinished two-pooler CoCa form
    with pytest.raises(CheckpointError, match="attentional_pool='parallel'"):
        openai.config_from_openclip(d, "x")
