"""Stand-ins for the loader's tokenizer and transforms, so data tests read samples back exactly."""

from __future__ import annotations

import torch
from torchvision import transforms as T


def fake_tokenize(texts: list[str]) -> torch.Tensor:
    """Caption bytes as ids (0 = padding), 77 per row: reversible, so tests can read captions back."""
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, t in enumerate(texts):
        b = t.encode()[:77]
        out[i, : len(b)] = torch.tensor(list(b), dtype=torch.long)
    return out


def untokenize(tokens: torch.Tensor) -> list[str]:
    return [bytes(row[row > 0].tolist()).decode() for row in tokens]


def ids(batch_tokens: torch.Tensor) -> list[int]:
    """The sample numbers of a batch of numbered samples ("caption i")."""
    return [int(c.split()[1]) for c in untokenize(batch_tokens)]


def random_aug() -> T.Compose:
    """Uses torch's global RNG like real training transforms: exercises per-sample seeding."""
    return T.Compose([T.RandomResizedCrop(8, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def exact() -> T.Compose:
    """8x8 pixels, no randomness: a solid-colour image keeps its exact colour."""
    return T.Compose([T.Resize((8, 8)), T.ToTensor()])
