"""Every architecture open-clip-torch lists, against clipforge's registry.

1. Each name in ``open_clip.list_models()`` is registered with the config clipforge reads from
   OpenCLIP's own model config (OpenAI's nine names keep OpenAI's QuickGELU meaning in clipforge),
   or is listed in UNSUPPORTED with the reason.
2. The largest size of each native OpenCLIP ViT family builds on the meta device with open_clip's
   parameter count.
3. The smallest native sizes not compared elsewhere, built by open_clip with random weights and saved
   as a directory (open_clip_config.json + weights) and as a bare state dict, load in clipforge and
   compute the same features in fp32 (1e-4).

The timm-tower families are compared in test_openclip_families.py; the text variants, CLIPA and
MetaCLIP 2 worldwide on shrunk configs in test_openclip_text_variants.py; the Hugging Face text towers
(RoBERTa, XLM-R, mT5, NLLB) in test_openclip_hf_text.py.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")
from open_clip.factory import get_model_config  # noqa: E402
from support.parity import nudge, parity_inputs

import clipforge  # noqa: E402
from clipforge.errors import CheckpointError  # noqa: E402
from clipforge.model.clip import CLIP  # noqa: E402
from clipforge.model.interop.openai import config_from_openclip  # noqa: E402
from clipforge.model.registry import get_config, list_models  # noqa: E402

TOL = 1e-4
# OpenAI's released shapes: GELU under the bare name, QuickGELU (OpenAI's weights) under -quickgelu.
OPENAI_SHAPES = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
UNSUPPORTED: dict[str, str] = {}  # every name of open-clip-torch 3.3 loads
# The largest size of each native ViT family (by parameter count).
LARGEST = ("ViT-bigG-14", "ViT-e-14", "ViT-bigG-14-CLIPA", "ViT-bigG-14-worldwide")
# The smallest native sizes not compared elsewhere, and ViT-M-16-alt for the image tower's LayerScale.
# 1.4-2.8 s each on 2 shared cores: three builds (ViT-B-32-256: 150M parameters) and forwards.
PARITY = ("ViT-S-32", "ViT-M-32-alt", "ViT-B-32-256", "ViT-M-16-alt")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("quiet_logs")]


def test_every_openclip_name_is_registered_or_unsupported():
    names = open_clip.list_models()
    registered = set(list_models())
    assert set(UNSUPPORTED) <= set(names), "stale UNSUPPORTED entries"
    for name in names:
        if name in UNSUPPORTED:
            assert name not in registered, name
            with pytest.raises(CheckpointError, match="not supported"):
                config_from_openclip(get_model_config(name), name)
            continue
        assert name in registered, f"{name} is neither registered nor in UNSUPPORTED"
        expected = config_from_openclip(get_model_config(name), name)
        assert get_config(name).replace(name="") == expected, name
    assert len(names) - len(UNSUPPORTED) == 144  # open-clip-torch 3.3: 144 names, all supported


def test_quickgelu_names_of_openai_models_are_the_openai_configs():
    for name in OPENAI_SHAPES:
        ours, gelu = get_config(f"{name}-quickgelu"), get_config(name)
        assert ours.quick_gelu and not gelu.quick_gelu
        assert ours.replace(name="", quick_gelu=False) == gelu.replace(name="")


@pytest.mark.parametrize("name", LARGEST)
def test_largest_native_sizes_have_openclips_parameter_count(name):
    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, device="meta")
        ours = CLIP(get_config(name))
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items() if k.startswith("visual.")} == \
        {k: v.shape for k, v in ref.state_dict().items() if k.startswith("visual.")}


_inputs = parity_inputs


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ViT-B-32-256" else n
                                  for n in PARITY])
def test_native_sizes_match_openclip(name, tmp_path):
    start = time.perf_counter()
    torch.manual_seed(0)
    ref = nudge(open_clip.create_model(name, pretrained=None).eval())  # off zero biases and unit gains
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": get_model_config(name), "preprocess_cfg": {}}))
    save_file(state, str(hub / "open_clip_model.safetensors"))
    torch.save(state, tmp_path / "bare.pt")

    ours, _ = clipforge.load(hub)
    assert ours.config.name == name  # the directory's config is recognised as the registered architecture
    images, tokens = _inputs(ours.config)
    with torch.no_grad():
        ref_image, ref_text = ref.encode_image(images), ref.encode_text(tokens)
        diffs = {"image": (ref_image - ours.encode_image(images)).abs().max().item(),
                 "text": (ref_text - ours.encode_text(tokens)).abs().max().item()}
        del ours
        bare, _ = clipforge.load(tmp_path / "bare.pt", arch=name)
        assert bare.config.name == name
        diffs["bare image"] = (ref_image - bare.encode_image(images)).abs().max().item()
        diffs["bare text"] = (ref_text - bare.encode_text(tokens)).abs().max().item()
    print(f"{name}: max abs diff {diffs}, {time.perf_counter() - start:.1f} s")
    assert max(diffs.values()) <= TOL, diffs
