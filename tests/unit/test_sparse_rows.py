"""A token table with a sparse gradient, updated by AdamW on its used rows (OptimConfig.sparse_embeddings)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipforge.train.config import ConfigError, OptimConfig
from clipforge.train.optim import build_optimizer
from clipforge.train.sparse_rows import RowAdamW
from clipforge.train.step import clip_gradients


class Bag(nn.Module):
    """A bag-of-words text tower in miniature: mean token embedding, then a projection."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.text = nn.Module()
        self.text.token_embedding = nn.Embedding(10, 4, sparse=sparse)
        self.proj = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.text.token_embedding(tokens).mean(1))


def _train(opt_cls, sparse: bool, batches: list[torch.Tensor], clip: float = 0.0,
           wd: float = 0.0) -> tuple[Bag, list[float]]:
    model = Bag(sparse)
    opt = opt_cls(model.parameters(), lr=0.05, betas=(0.9, 0.98), eps=1e-6, weight_decay=wd)
    norms = []
    for tokens in batches:
        opt.zero_grad(set_to_none=True)
        (model(tokens) ** 2).sum().backward()
        norms.append(float(clip_gradients(opt, clip, torch.device("cpu"))))
        opt.step()
    return model, norms


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_same_weights_as_adamw_with_clipping(wd):
    """Batches that use a few rows each, some rows never: the table and the rest end where AdamW
    (dense gradients) puts them, with the same clipped gradient norms."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 7, (2, 3), generator=gen) for _ in range(8)]  # rows 7-9 never used
    dense, dense_norms = _train(torch.optim.AdamW, False, batches, clip=0.5, wd=wd)
    rows, row_norms = _train(RowAdamW, True, batches, clip=0.5, wd=wd)
    assert row_norms == pytest.approx(dense_norms, rel=1e-5)
    for (name, a), b in zip(dense.state_dict().items(), rows.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_rows_never_used_stay_where_they_are():
    model, _ = _train(RowAdamW, True, [torch.tensor([[1, 2, 2]]), torch.tensor([[3, 1]])])
    start = Bag(True).text.token_embedding.weight
    table = model.text.token_embedding.weight
    untouched = [0, 4, 5, 6, 7, 8, 9]
    assert torch.equal(table[untouched], start[untouched]) and not torch.equal(table[[1, 2, 3]], start[[1, 2, 3]])


def test_state_dict_resumes_exactly():
    batches = [torch.randint(0, 10, (3, 4), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    straight, _ = _train(RowAdamW, True, batches)
    model = Bag(True)
    opt = RowAdamW(model.parameters(), lr=0.05, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    for i, tokens in enumerate(batches):
        if i == 3:  # save and restore both halves, as a checkpoint does
            state = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
            model = Bag(True)
            model.load_state_dict(state[0])
            opt = RowAdamW(model.parameters(), lr=0.05, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
            opt.load_state_dict(state[1])
        opt.zero_grad(set_to_none=True)
        (model(tokens) ** 2).sum().backward()
        opt.step()
    for a, b in zip(straight.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_build_optimizer_switches_the_table_to_sparse_gradients():
    import clipforge

    model = clipforge.create_model("tiny-bow", seed=0)
    opt = build_optimizer(model, OptimConfig(sparse_embeddings=True))
    assert isinstance(opt, RowAdamW) and model.text.token_embedding.sparse
    assert type(build_optimizer(clipforge.create_model("nano"), OptimConfig())) is torch.optim.AdamW
    hf_text = nn.Module()  # no token table to make sparse: a one-line configuration error
    hf_text.text = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="token table"):
        build_optimizer(hf_text, OptimConfig(sparse_embeddings=True))
