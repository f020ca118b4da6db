"""Golden values: a seeded model's outputs must not drift between releases.

Regenerate (only for an intended numerical change) with:
    python tests/unit/test_golden.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import clipforge

GOLDEN = Path(__file__).parent.parent / "data" / "golden_outputs.json"
ARCHS = ("nano", "tiny-rn")


def outputs(name: str) -> dict[str, list[float]]:
    model = clipforge.create_model(name, seed=1234).eval()
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(99)
    images = torch.randn(2, 3, size, size, generator=g)
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[0, 1:4] = torch.tensor([320, 1125, 539])
    tokens[0, 4] = 49407
    tokens[1, 1:7] = torch.tensor([320, 1125, 539, 320, 2368, 269])
    tokens[1, 7] = 49407
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(tokens)
        logits, _ = model.logits(images, tokens)
    return {"image": img[:, :8].flatten().tolist(), "text": txt[:, :8].flatten().tolist(), "logits": logits.flatten().tolist()}


@pytest.mark.parametrize("name", ARCHS)
def test_seeded_outputs_match_golden_values(name):
    expected = json.loads(GOLDEN.read_text())[name]
    got = outputs(name)
    for key in expected:
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(expected[key]), rtol=1e-4, atol=1e-5)


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(json.dumps({name: outputs(name) for name in ARCHS}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
