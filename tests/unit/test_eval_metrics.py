"""Metrics against hand-computed cases: ties, classes without samples, multi-caption retrieval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.eval.metrics import (
    classification_metrics,
    confusion_matrix,
    mean_per_class_recall,
    retrieval_metrics,
    target_rank,
    topk_accuracy,
)


def test_target_rank_breaks_ties_towards_lower_index():
    scores = torch.tensor([
        [0.5, 0.5, 0.1],  # target 0 ties with 1: 0 comes first -> rank 0
        [0.5, 0.5, 0.1],  # target 1 ties with 0: 0 comes first -> rank 1
        [0.2, 0.2, 0.2],  # all equal, target 2 -> rank 2
        [0.1, 0.9, 0.3],  # no tie, target 2 -> rank 1
    ])
    assert target_rank(scores, torch.tensor([0, 1, 2, 2])).tolist() == [0, 1, 2, 1]


def test_topk_accuracy_hand_computed():
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # target 0: rank 0
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # target 0: rank 5 (last)
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # target 2: ties with 0 and 3..5; 1 above, 0 before -> rank 2
        [0.3, 0.2, 0.1, 0.0, 0.5, 0.4],  # target 3: rank 5
    ])
    targets = torch.tensor([0, 0, 2, 3])
    assert target_rank(scores, targets).tolist() == [0, 5, 2, 5]
    assert topk_accuracy(scores, targets, 1) == pytest.approx(0.25)
    assert topk_accuracy(scores, targets, 3) == pytest.approx(0.5)
    assert topk_accuracy(scores, targets, 5) == pytest.approx(0.5)
    assert topk_accuracy(scores, targets, 6) == pytest.approx(1.0)


def test_top1_equals_confusion_diagonal_even_with_ties():
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (200, 7)).float()  # many ties
    targets = torch.randint(0, 7, (200,))
    m = classification_metrics(scores, targets)
    conf = torch.tensor(m["confusion_matrix"])
    assert m["acc1"] == pytest.approx(conf.diagonal().sum().item() / 200)


def test_confusion_and_per_class_recall_with_an_empty_class():
    # 4 classes, class 2 has no samples. Rows: true class, columns: predicted class.
    preds = torch.tensor([0, 0, 1, 1, 1, 3, 2])
    targets = torch.tensor([0, 1, 1, 1, 0, 3, 3])
    conf = confusion_matrix(preds, targets, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]
    # recalls: class0 1/2, class1 2/3, class2 undefined (skipped), class3 1/2
    assert mean_per_class_recall(conf) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)


def test_classification_metrics_matches_sklearn_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.normal(size=(300, 6)))
    targets = torch.from_numpy(rng.integers(0, 5, 300))  # class 5 never occurs
    m = classification_metrics(scores, targets, 6)
    preds = scores.argmax(1).numpy()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that a predicted class has no samples
        assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets.numpy(), preds))
    assert m["per_class_recall"][5] is None
    assert m["acc1"] == pytest.approx((preds == targets.numpy()).mean())
    assert "acc5" in m and m["acc5"] >= m["acc1"]


def test_acc5_only_with_at_least_five_classes():
    m = classification_metrics(torch.eye(4), torch.arange(4))
    assert "acc5" not in m and m["acc1"] == 1.0 and m["mean_per_class_recall"] == 1.0


def test_empty_input_gives_nan_not_a_crash():
    m = classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert math.isnan(m["acc1"]) and m["num_samples"] == 0


# -- retrieval ---------------------------------------------------------------------------

def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_retrieval_multi_caption_hand_computed():
    # 3 images on the axes; image 0 has captions 0,1, image 1 caption 2, image 2 captions 3,4.
    images = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    texts = _unit(
        [0.9, 0.1, 0.0],  # caption 0 of image 0: image 0 first -> t2i rank 0
        [0.0, 1.0, 0.2],  # caption 1 of image 0: image 0 last -> rank 2
        [0.1, 0.0, 1.0],  # caption 2 of image 1: image 1 last -> rank 2
        [0.0, 0.3, 1.0],  # caption 3 of image 2: rank 0
        [0.0, 1.0, 0.5],  # caption 4 of image 2: image 1 first -> rank 1
    )
    t2i = [0, 0, 1, 2, 2]
    m = retrieval_metrics(images, texts, t2i, ks=(1, 2))
    # text -> image ranks [0, 2, 2, 0, 1]
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 5)
    assert m["image_retrieval_mean_rank"] == pytest.approx((1 + 3 + 3 + 1 + 2) / 5)
    assert m["image_retrieval_median_rank"] == pytest.approx(2)
    # image -> text: image 0 sims to captions: c0 .99 highest -> best positive rank 0.
    # image 1: sims col 1 = [.11, .98, 0, .29, .89]: its only caption (2) has sim 0 -> rank 4.
    # image 2: col 2 = [0, .2, .99, .96, .45]: caption 3 (.96) ranks second, after caption 2 -> rank 1.
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["text_retrieval_mean_rank"] == pytest.approx((1 + 5 + 2) / 3)
    assert m["text_retrieval_median_rank"] == pytest.approx(2)


def test_retrieval_any_positive_counts_and_ties_break_by_index():
    images = _unit([1, 0], [1, 0])  # identical images: every similarity ties
    texts = _unit([1, 0], [1, 0], [1, 0])
    m = retrieval_metrics(images, texts, [1, 1, 0], ks=(1, 2))
    # text -> image: all tie; image 1 is behind image 0 -> captions 0,1 rank 1, caption 2 rank 0.
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    # image -> text: image 0's only caption is index 2, behind 0 and 1 -> rank 2;
    # image 1's best positive is caption 0 -> rank 0.
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 2)
    assert m["text_retrieval_recall@2"] == pytest.approx(1 / 2)
    assert m["text_retrieval_mean_rank"] == pytest.approx((3 + 1) / 2)


def test_retrieval_images_without_captions_are_left_out_of_image_to_text():
    images = _unit([1, 0], [0, 1], [1, 1])
    texts = _unit([1, 0.1], [0.1, 1])
    m = retrieval_metrics(images, texts, [0, 1])
    assert m["num_images"] == 3 and m["text_retrieval_recall@1"] == 1.0


def _naive(images: torch.Tensor, texts: torch.Tensor, t2i: list[int], k: int) -> tuple[float, float]:
    sims = F.normalize(texts, dim=-1) @ F.normalize(images, dim=-1).T  # [T, I]
    t2i_t = torch.tensor(t2i)
    i_hits = [t2i[j] in sims[j].argsort(descending=True, stable=True)[:k].tolist() for j in range(len(t2i))]
    t_hits = []
    for i in range(images.shape[0]):
        pos = set((t2i_t == i).nonzero().flatten().tolist())
        if pos:
            t_hits.append(bool(pos & set(sims[:, i].argsort(descending=True, stable=True)[:k].tolist())))
    return float(np.mean(i_hits)), float(np.mean(t_hits))


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_retrieval_chunked_matches_naive_full_matrix(chunk):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 8, generator=g)
    t2i = torch.randint(0, 40, (90,), generator=g).tolist()
    texts = images[t2i] + 1.5 * torch.randn(90, 8, generator=g)
    m = retrieval_metrics(images, texts, t2i, ks=(1, 5), chunk_size=chunk)
    for k in (1, 5):
        i_rec, t_rec = _naive(images, texts, t2i, k)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(i_rec)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(t_rec)


def test_retrieval_rejects_bad_indices():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 2])
