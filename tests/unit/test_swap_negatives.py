"""Swapped-word negatives (TrainConfig.swap_negatives): the copies they make, their loss and their refusals."""

import json
import math

import pytest
import torch

import clipforge
from clipforge.data.synth.captions import attribute_word_groups
from clipforge.model.tokenizer import decode
from clipforge.train.config import ConfigError, TrainConfig
from clipforge.train.loss import clip_loss, clip_loss_with_negatives
from clipforge.train.setup import build_model
from clipforge.train.swap_negatives import (
    attested_pairs,
    build_swap_table,
    read_swap_words,
    swap_negatives,
    swap_negatives_for,
)

EOT = 49407
TABLE = build_swap_table(attribute_word_groups(), clipforge.tokenize, EOT, 0)
SHAPES = attribute_word_groups()["shape"]


def _text(row: torch.Tensor) -> str:
    return decode([t for t in row.tolist() if t not in (0, 49406, EOT)]).replace(" - ", "-").strip()


def _value(word: str, groups: list[list[str]]) -> int:
    return next(i for i, g in enumerate(groups) if word in g)


def test_one_word_swapped_for_each_other_value_multi_token_words_whole():
    captions = ["a picture of a hexagon", "a plus sign", "a picture of a disc"]
    torch.manual_seed(0)
    neg, mask = swap_negatives(clipforge.tokenize(captions), TABLE, 9, EOT, 0)
    assert neg.shape == (3, 9, 77) and mask.all()  # nine other shapes each
    for caption, rows in zip(captions, neg):
        texts = [_text(r) for r in rows]
        prefix = caption.rsplit(" a ", 1)[0] + " a " if " of " in caption else "a "
        swapped = [t[len(prefix):] for t in texts]
        assert all(t.startswith(prefix) for t in texts)
        own = _value(caption[len(prefix):], SHAPES)
        assert sorted(_value(w, SHAPES) for w in swapped) == [v for v in range(10) if v != own]


def test_at_most_k_copies_none_without_attribute_words_and_padding():
    tokens = clipforge.tokenize(["a small red square", "nothing to see here", "two blue stars"])
    torch.manual_seed(1)
    neg, mask = swap_negatives(tokens, TABLE, 2, EOT, 0)  # every attribute has at least two other values
    assert mask.sum(1).tolist() == [2, 0, 2] and (neg[1] == 0).all()
    groups = attribute_word_groups()
    attribute = {w: name for name, values in groups.items() for g in values for w in g}
    for row in (0, 2):
        for j in range(2):
            words, own = _text(neg[row, j]).split(), _text(tokens[row]).split()
            changed = [(a, b) for a, b in zip(words, own) if a != b]
            assert len(words) == len(own) and len(changed) == 1
            assert attribute[changed[0][0]] == attribute[changed[0][1]]  # "stars" -> another plural shape
            assert (neg[row, j, (neg[row, j] == EOT).nonzero()[0, 0] + 1:] == 0).all()


def test_every_word_swapped_in_turn_each_copy_differs_in_one_word():
    groups = attribute_word_groups()
    attribute = {w: name for name, values in groups.items() for g in values for w in g}
    caption = "a small red square"
    tokens = clipforge.tokenize([caption, "nothing to see here"])
    torch.manual_seed(2)
    neg, mask = swap_negatives(tokens, TABLE, 64, EOT, 0, every_word=True)
    expected = {"small": len(groups["size"]) - 1, "red": len(groups["colour"]) - 1, "square": len(SHAPES) - 1}
    assert mask.sum(1).tolist() == [sum(expected.values()), 0]
    changed = []
    for row in neg[0, mask[0]]:
        diff = [(a, b) for a, b in zip(_text(row).split(), caption.split()) if a != b]
        assert len(diff) == 1 and attribute[diff[0][0]] == attribute[diff[0][1]]
        changed.append(diff[0][1])
    assert {w: changed.count(w) for w in expected} == expected  # each word against each other value once
    torch.manual_seed(2)
    few, few_mask = swap_negatives(tokens, TABLE, 5, EOT, 0, every_word=True)
    assert few_mask.sum(1).tolist() == [5, 0]  # a random five of them
    assert {_text(r) for r in few[0]} <= {_text(r) for r in neg[0, mask[0]]}


def test_attested_copies_only_pair_words_the_training_captions_pair():
    """With ``attested``, a swap is kept only where the new word and each attribute word beside it
    form a pair some training caption has: "black" is never followed by "hexagon" below, so no copy
    says "black hexagon", and the swaps it keeps are ones the unfiltered copies make too."""
    groups = attribute_word_groups()
    training = [f"a {c} {s}" for c in ("black", "white", "red") for s in ("circle", "hexagon", "square")
                if (c, s) != ("black", "hexagon")] + ["two black circles", "two white hexagons"]
    attested = attested_pairs(clipforge.tokenize(training), TABLE, EOT)
    colour, shape = (list(groups).index(n) for n in ("colour", "shape"))
    black, white = (_value(c, groups["colour"]) for c in ("black", "white"))
    hexagon = _value("hexagon", SHAPES)
    assert ((colour, white), (shape, hexagon)) in attested and ((colour, black), (shape, hexagon)) not in attested
    assert len(attested) == 8 + 2 + 2  # one pair per "a <colour> <shape>", two per "two <colour> <shapes>"
    captions = ["a black circle", "a white hexagon", "a small black circle in the top left corner"]
    tokens = clipforge.tokenize(captions)
    torch.manual_seed(4)
    every, every_mask = swap_negatives(tokens, TABLE, 64, EOT, 0, every_word=True)
    torch.manual_seed(4)
    kept, kept_mask = swap_negatives(tokens, TABLE, 64, EOT, 0, every_word=True, attested=attested)
    got = [{_text(x) for x in kept[r, kept_mask[r]]} for r in range(3)]
    every_text = [{_text(x) for x in every[r, every_mask[r]]} for r in range(3)]
    assert got[0] == {"a white circle", "a red circle", "a black square"} < every_text[0]
    assert got[1] == {"a red hexagon", "a white circle", "a white square"} < every_text[1]
    assert got[2] == set() and len(every_text[2]) == 28  # no training caption pairs a size or a place with anything
    assert "a black hexagon" in {_text(x) for x in every[0, every_mask[0]]}


def test_draws_follow_torchs_generator():
    tokens = clipforge.tokenize(["a small red square in the top left corner"] * 4)
    torch.manual_seed(5)
    a = swap_negatives(tokens, TABLE, 4, EOT, 0)
    torch.manual_seed(5)
    b = swap_negatives(tokens, TABLE, 4, EOT, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_step_encodes_only_the_real_copies_and_scores_as_the_padded_batch():
    """TrainStep sends only the copies the mask marks through the text tower; the loss equals
    clip_loss_with_negatives on every row encoded, padding included."""
    from clipforge.train.step import TrainStep

    model = clipforge.create_model("tiny-bow", seed=0).train()
    images = torch.randn(3, 3, 64, 64)
    tokens = clipforge.tokenize(["a small red square", "nothing to see here", "two blue stars"])
    torch.manual_seed(3)
    neg, mask = swap_negatives(tokens, TABLE, 12, EOT, 0, every_word=True)
    assert 0 < mask.sum() < mask.numel()
    seen = []
    model.text.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), precision="fp32", device="cpu")
    got = step._loss_with_negatives(images, tokens, neg, mask)
    assert seen == [3 + int(mask.sum())]
    out = model(images, torch.cat([tokens, neg.view(-1, neg.shape[-1])]))
    want = clip_loss_with_negatives(out.image_features, out.text_features[:3], out.text_features[3:].view(3, 12, -1),
                                    mask, out.logit_scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_word_files_are_checked(tmp_path):
    for body in ("not json", "[1, 2]", json.dumps({"colour": [["red"]]}), json.dumps({"c": [["red"], []]})):
        (tmp_path / "w.json").write_text(body)
        with pytest.raises(ConfigError, match="swap_words"):
            read_swap_words(tmp_path / "w.json")
    with pytest.raises(ConfigError, match="two values"):
        build_swap_table({"c": [["red"], ["red", "blue"]]}, clipforge.tokenize, EOT, 0)


def test_loss_with_negatives():
    g = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(2))
    neg = torch.nn.functional.normalize(torch.randn(6, 3, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    none = torch.zeros(6, 3, dtype=torch.bool)
    assert torch.allclose(clip_loss_with_negatives(img, txt, neg, none, scale), clip_loss(img, txt, scale))
    mask = torch.tensor([[1, 1, 0]] * 6, dtype=torch.bool)
    logits = torch.cat([scale * img @ txt.T, scale * torch.einsum("nd,nkd->nk", img, neg[:, :2])], 1)
    want = (torch.nn.functional.cross_entropy(logits, torch.arange(6))
            + torch.nn.functional.cross_entropy(scale * txt @ img.T, torch.arange(6))) / 2
    assert torch.allclose(clip_loss_with_negatives(img, txt, neg, mask, scale), want)


def test_config_and_refusals(tmp_path):
    words = tmp_path / "w.json"
    words.write_text(json.dumps({"colour": [["red"], ["blue"]]}))
    with pytest.raises(ConfigError, match="go together"):
        TrainConfig(swap_negatives=4)
    with pytest.raises(ConfigError, match="go together"):
        TrainConfig(swap_words=str(words))
    with pytest.raises(ConfigError, match="swap_every_word"):
        TrainConfig(swap_every_word=True)
    for bad in (0.0, 101.0):
        with pytest.raises(ConfigError, match="init_logit_scale"):
            TrainConfig(init_logit_scale=bad)
    model = clipforge.create_model("nano")
    assert swap_negatives_for(TrainConfig(loss="clip"), model, 1) is None
    cfg = TrainConfig(swap_negatives=2, swap_words=str(words), loss="clip")
    assert swap_negatives_for(cfg, model, 1) is not None
    for over, world, why in ((dict(loss="siglip"), 1, "CLIP's loss"), (dict(loss_tile=4), 1, "CLIP's loss"),
                             (dict(grad_accum=2), 1, "grad_accum"), ({}, 2, "one process")):
        with pytest.raises(ConfigError, match=why):
            swap_negatives_for(TrainConfig(**{**dict(swap_negatives=2, swap_words=str(words), loss="clip"), **over}),
                               model, world)


def test_attested_pairs_come_from_the_training_table(tmp_path):
    from clipforge.data.config import DataConfig
    from clipforge.data.sources import table_captions

    words = tmp_path / "w.json"
    words.write_text(json.dumps({"colour": [["red"], ["blue"], ["green"]], "shape": [["circle"], ["star"]]}))
    table = tmp_path / "train.csv"
    table.write_text('image,caption\na.png,a red circle\nb.png,a blue star\nc.png,\nd.png,"a green circle, big"\n')
    data = DataConfig(path=str(table))
    assert table_captions(data) == ["a red circle", "a blue star", "a green circle, big"]  # the empty one skipped
    with pytest.raises(ConfigError, match="swap_attested needs swap_negatives"):
        TrainConfig(swap_attested=True, data=data)
    model = clipforge.create_model("nano")
    make = swap_negatives_for(TrainConfig(data=data, swap_negatives=4, swap_words=str(words), swap_every_word=True,
                                          swap_attested=True, loss="clip"), model, 1)
    neg, mask = make(clipforge.tokenize(["a red circle", "a blue circle"]))
    assert sorted(_text(r) for r in neg[0, mask[0]]) == ["a green circle"]  # no blue circle, no red star
    assert sorted(_text(r) for r in neg[1, mask[1]]) == ["a blue star", "a green circle", "a red circle"]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="swap_attested: .*not WebDataset"):
        swap_negatives_for(TrainConfig(data=DataConfig(path=str(shards / "000.tar")), swap_negatives=4,
                                       swap_words=str(words), swap_attested=True, loss="clip"), model, 1)


def test_init_logit_scale_sets_a_fresh_models_temperature():
    model = build_model(TrainConfig(model="nano", init_logit_scale=100.0), None, None)
    assert math.isclose(model.logit_scale.item(), math.log(100.0), rel_tol=1e-6)
