"""The paper experiments' building blocks: predictive objectives, zero-shot scoring, the supervised
baseline, and the curve arithmetic behind the verdicts."""

from __future__ import annotations

import math

import pytest
import torch

from clipforge.errors import ClipforgeError
from clipforge.experiments.common import SplitData, LoopConfig, log_spaced_steps
from clipforge.experiments.config import get_scale, model_config
from clipforge.experiments.f1_objectives import efficiency, samples_to_reach
from clipforge.experiments.f3_fewshot import equivalent_shots
from clipforge.experiments.objectives import (
    BagOfWordsObjective, CaptionObjective, Vocab, build_objective, vit_tokens,
)
from clipforge.experiments.supervised import accuracies, train_supervised

PICO = model_config("pico")
CAPTIONS = ["a red square", "a blue circle", "two green stars", "a small red circle",
            "a big blue square", "a yellow heart", "three red crosses", "a tiny pink ring"]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_vocab_encodes_and_bags_words():
    vocab = Vocab.from_texts(CAPTIONS)
    tok = vocab.encode(["a red square", "a purple square"])
    assert tok[0, 0] == Vocab.SOT and tok[0, 4] == Vocab.EOT  # start, 3 words, end
    assert tok[1, 2] == Vocab.UNK  # "purple" never occurs in the captions
    bag = vocab.bag(["a red square", "red red", "purple"])
    assert torch.allclose(bag.sum(1), torch.tensor([1.0, 1.0, 0.0]))  # normalised; all-unknown stays zero
    assert bag[1].max() == 1.0 and (bag[0] > 0).sum() == 3


def test_vit_tokens_class_token_is_the_pooled_feature():
    obj = build_objective("bow", PICO, CAPTIONS)
    visual = obj.model.visual.eval()
    x = _images(3)
    with torch.no_grad():
        assert torch.allclose(vit_tokens(visual, x)[:, 0] @ visual.proj, visual(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["caption", "bow", "contrastive"])
def test_objective_loss_decreases_on_a_tiny_batch(kind):
    torch.manual_seed(0)
    obj = build_objective(kind, PICO, CAPTIONS)
    images, idx = _images(len(CAPTIONS)), torch.arange(len(CAPTIONS))
    opt = torch.optim.Adam(obj.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = obj.loss(images, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_bow_zero_shot_scores_the_prompt_words_under_the_predicted_distribution():
    vocab = Vocab.from_texts(CAPTIONS)
    obj = BagOfWordsObjective(PICO, vocab, CAPTIONS)
    red, blue = vocab.bag(["red"]).argmax(), vocab.bag(["blue"]).argmax()

    class Fixed(torch.nn.Module):  # predicts "red" for image 0, "blue" for image 1
        def forward(self, images):
            logits = torch.zeros(images.shape[0], len(vocab))
            logits[0, red] = logits[1, blue] = 5.0
            return logits

    obj.model = Fixed()
    scores = obj.scores(_images(2), ["a photo of a red shape.", "a photo of a blue shape."])
    assert scores.shape == (2, 2)
    assert scores.argmax(1).tolist() == [0, 1]


def test_caption_log_likelihood_matches_the_training_loss():
    torch.manual_seed(0)
    obj = CaptionObjective(PICO, Vocab.from_texts(CAPTIONS), CAPTIONS)
    model = obj.model.eval()
    image = _images(1)
    tokens = obj.vocab.encode(["a small red circle"])  # [1, L], no padding
    with torch.no_grad():
        ll = model.log_likelihood(model.memory(image), tokens)  # [1, 1]
        mean_ce = model.loss(image, tokens)
    assert ll.shape == (1, 1)
    assert torch.allclose(ll[0, 0], -mean_ce * (tokens.shape[1] - 1), atol=1e-4)


@pytest.mark.slow
def test_caption_zero_shot_picks_the_caption_its_image_was_trained_on():
    torch.manual_seed(0)
    captions = ["a red square", "a blue circle"]
    obj = CaptionObjective(PICO, Vocab.from_texts(captions), captions)
    images = torch.stack([torch.full((3, 64, 64), 2.0), torch.full((3, 64, 64), -2.0)])  # two distinct images
    opt = torch.optim.Adam(obj.model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = obj.loss(images, torch.arange(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    obj.model.eval()
    with torch.no_grad():
        scores = obj.scores(images, captions)  # [2 images, 2 prompts]
    assert scores.argmax(1).tolist() == [0, 1]


@pytest.mark.slow
def test_supervised_baseline_trains_and_reports_accuracy_per_task():
    tasks = {"colour": {"label_column": "colour", "classes": ["red", "blue"]},
             "count": {"label_column": "count_class", "classes": ["one shape", "two shapes"]}}
    rows = [{"colour": ["red", "blue", ""][i % 3], "count_class": ["one shape", "two shapes"][i % 2]}
            for i in range(32)]
    images = (torch.arange(32) % 3 * 100).view(32, 1, 1, 1).expand(32, 3, 64, 64).to(torch.uint8).contiguous()
    split = SplitData(images, rows, [])
    assert split.labels(tasks["colour"]).tolist()[:3] == [0, 1, -1]
    loop = LoopConfig(steps=40, batch_size=16, lr=1e-2, weight_decay=0.0, warmup=1, seed=0)
    model, history = train_supervised(PICO.vision, split, tasks, loop, {"test": split}, [20, 40])
    assert [h["step"] for h in history["history"]] == [20, 40]
    assert history["train"]["final_loss"] < history["train"]["first_loss"]
    acc = accuracies(model, split, tasks, "cpu")
    assert set(acc) == {"colour", "count"} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert acc["colour"] == 1.0  # colour is a function of the pixel value here
    assert model.features(torch.zeros(2, 3, 64, 64)).shape == (2, PICO.vision.width)


def test_efficiency_ratio_reads_samples_off_the_curves():
    samples = [100, 200, 400, 800]
    fast = [0.2, 0.4, 0.6, 0.8]
    slow = [0.1, 0.2, 0.3, 0.4]
    assert samples_to_reach(samples, fast, 0.4) == pytest.approx(200)
    assert samples_to_reach(samples, slow, 0.9) is None
    assert efficiency(samples, fast, slow)["ratio"] == pytest.approx(4.0)  # fast reaches 0.4 at 200 vs 800
    assert efficiency(samples, slow, fast)["ratio"] == pytest.approx(0.25)
    assert efficiency(samples, fast, [0.05] * 4)["lower_bound"]


def test_equivalent_shots_interpolates_in_log_k():
    shots = [1, 2, 4, 8, 16]
    probe = [0.2, 0.3, 0.4, 0.5, 0.6]
    assert equivalent_shots(shots, probe, 0.4) == pytest.approx(4.0)
    assert equivalent_shots(shots, probe, 0.35) == pytest.approx(2 ** 1.5)
    assert equivalent_shots(shots, probe, 0.1) == 0.0
    assert equivalent_shots(shots, probe, 0.9) == math.inf


def test_scales_and_steps():
    assert get_scale("small", seeds=5).seeds == 5
    with pytest.raises(ClipforgeError):
        get_scale("huge")
    with pytest.raises(ClipforgeError):
        get_scale("small", no_such_field=1)
    steps = log_spaced_steps(300, 5)
    assert steps[-1] == 300 and steps == sorted(set(steps)) and len(steps) == 5
    assert log_spaced_steps(10, 1) == [10]


def test_finding_one_leaves_a_run_another_stream_holds_and_trains_the_rest(tmp_path):
    from clipforge.experiments import ExperimentConfig
    from clipforge.experiments import f1_objectives as f1
    from clipforge.experiments.common import locked

    cfg = ExperimentConfig(scale=get_scale("smoke"), out=tmp_path / "out", work=tmp_path / "work", device="cpu",
                           progress=False)
    runs = cfg.scale_dir / "objectives"
    with locked(runs / "caption-s0.lock") as held:  # as the other stream holds a run it is training
        assert held
        with locked(runs / "caption-s0.lock", wait=False) as again:
            assert again is False
        f1.help_train(cfg)  # what the stream that finished first does: everything not taken
        assert sorted(p.name for p in runs.glob("*.json")) == ["bow-s0.json", "contrastive-s0.json"]
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    rec = f1.run(cfg)  # trains the one left, reads the others
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (runs / "caption-s0.json").is_file()
    assert [r["kind"] for rs in rec["results"]["runs"].values() for r in rs] == ["caption", "bow", "contrastive"]
