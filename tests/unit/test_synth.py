"""The synthetic world in memory: determinism, captions true to their scene, held-out pairs, labels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforge.data.synth import SPLITS, SynthConfig, World, make_sample
from clipforge.data.synth.captions import SHAPE_WORDS
from clipforge.data.synth.tasks import COUNT_CLASSES, RELATION_CLASSES
from clipforge.data.synth.world import COLOURS, POSITIONS, SIZE_EXTENT, SHIFTED_SPLITS, relations
from clipforge.errors import DataError
from support.synth_captions import check_caption


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**40), split=st.sampled_from(SPLITS), index=st.integers(0, 10**7),
       max_objects=st.integers(1, 3))
def test_captions_only_state_what_is_in_the_scene(seed, split, index, max_objects):
    s = make_sample(SynthConfig(seed=seed, max_objects=max_objects), split, index)
    check_caption(s.scene, s.caption)


def test_captions_sweep_and_variety():
    cfg = SynthConfig(seed=3)
    captions = set()
    for i in range(1500):
        s = make_sample(cfg, SPLITS[i % len(SPLITS)], i)
        check_caption(s.scene, s.caption)
        captions.add(s.caption)
    text = " ".join(captions).lower()
    assert len(captions) > 1200  # free-form: few exact repeats
    for phrase in ("two ", "2 ", "to the left of", "above", "big", "disc", "plus sign", "a photo of", "backdrop",
                   "corner"):
        assert phrase in text, phrase


def test_checker_catches_false_captions():
    s = make_sample(SynthConfig(seed=0), "train", 0)  # one small cyan square, bottom left, striped
    truth = [(o.colour, o.shape, o.size, o.position) for o in s.scene.objects]
    assert truth == [("cyan", "square", "small", "bottom left")]
    check_caption(s.scene, "a small cyan square at the bottom left")
    for lie in ("a red square", "a cyan circle", "a big cyan square", "two cyan squares", "a cyan square at the top",
                "a cyan square on a checkered background", "a cyan square on the right"):
        with pytest.raises(AssertionError):
            check_caption(s.scene, lie)


def test_sample_is_pure_function_of_seed_split_index():
    cfg = SynthConfig(seed=11)
    a, b = make_sample(cfg, "val", 42), make_sample(cfg, "val", 42)
    assert a.scene == b.scene and a.caption == b.caption
    assert _png(a.image(64)) == _png(b.image(64))
    other = make_sample(SynthConfig(seed=12), "val", 42)
    assert (other.scene, other.caption) != (a.scene, a.caption)
    assert make_sample(cfg, "test", 42).scene != a.scene  # splits draw different streams


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_render_size_and_mode():
    s = make_sample(SynthConfig(), "train", 5)
    for size in (32, 64, 224):
        im = s.image(size)
        assert im.size == (size, size) and im.mode == "RGB"
    arr = np.asarray(s.image(64), np.float32)
    assert arr.std() > 5  # not blank


def test_heldout_pairs_only_in_test_heldout():
    world = World(SynthConfig(seed=5, heldout_pairs=5))
    held = set(world.heldout)
    assert len(held) == 5
    assert len({c for c, _ in held}) == 5 and len({s for _, s in held}) == 5
    for split in SPLITS:
        for i in range(300):
            scene = world.scene(split, i)
            ids = {o.identity for o in scene.objects}
            if split == "test_heldout":
                assert scene.objects[0].identity in held
            else:
                assert not ids & held, (split, i)
    assert World(SynthConfig(seed=6)).heldout != world.heldout


def test_shifted_splits_keep_the_label_sets():
    world = World(SynthConfig(seed=1))
    seen = {}
    for split in ("test", *SHIFTED_SPLITS):
        objs = [o for i in range(400) for o in world.scene(split, i).objects]
        seen[split] = tuple({getattr(o, a) for o in objs} for a in ("colour", "shape", "size", "position"))
        assert seen[split] == (set(COLOURS), set(SHAPE_WORDS), set(SIZE_EXTENT), set(POSITIONS)), split
    styles = {split: {world.scene(split, i).style for i in range(50)} for split in SPLITS}
    assert styles["test_sketch"] == {"outline"} and styles["test"] == {"fill"}
    backgrounds = {split: {world.scene(split, i).background for i in range(200)} for split in ("train", "test_texture")}
    assert not backgrounds["train"] & backgrounds["test_texture"]


@pytest.mark.parametrize("split", ["train", "test_scale_rotation"])
def test_size_classes_stay_ordered_and_objects_do_not_touch(split):
    world = World(SynthConfig(seed=2))
    extents = {size: [] for size in SIZE_EXTENT}
    for i in range(500):
        objs = world.scene(split, i).objects
        for o in objs:
            extents[o.size].append(o.extent)
            assert o.extent / 2 <= o.x <= 1 - o.extent / 2 and o.extent / 2 <= o.y <= 1 - o.extent / 2
        for j, a in enumerate(objs):
            for b in objs[j + 1:]:
                assert np.hypot(a.x - b.x, a.y - b.y) > (a.extent + b.extent) / 2
    assert max(extents["small"]) < min(extents["medium"]) and max(extents["medium"]) < min(extents["large"])


def test_relation_labels_are_unambiguous():
    cfg = SynthConfig(seed=4)
    labelled = 0
    for i in range(600):
        s = make_sample(cfg, "test", i)
        if s.labels["relation"]:
            labelled += 1
            a, b = s.scene.objects
            assert [RELATION_CLASSES[r] for r in relations(a, b)] == [s.labels["relation"]]
            assert s.labels["rel_a"].endswith(f"{a.colour} {a.shape}")
            assert s.labels["rel_b"].endswith(f"{b.colour} {b.shape}")
        single = s.scene.count == 1
        assert all(bool(s.labels[c]) == single for c in ("colour", "shape", "size", "position"))
        assert s.labels["count"] == s.scene.count and s.labels["count_class"] == COUNT_CLASSES[s.scene.count - 1]
    assert labelled > 40


@pytest.mark.parametrize("bad", [dict(image_size=16), dict(image_size=512), dict(train=-1), dict(format="zip"),
                                 dict(heldout_pairs=11), dict(max_objects=4), dict(image_format="gif")])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(DataError, match="invalid synth config"):
        SynthConfig(**bad)
