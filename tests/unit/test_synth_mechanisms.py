"""The paper's mechanisms in the data world: sentence captions, a polysemous name, a spurious
background cue and 80-template ensembles; each off by default, with the plain world unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest

from clipforge.cli import build_parser, main
from clipforge.data.synth import SPLITS, SynthConfig, World, generate_world, load_manifest, make_sample
from clipforge.data.synth.ensembles import TEMPLATES_PER_TASK
from clipforge.data.synth.mechanisms import bare_label_fraction, cue_agreement, is_bare_label, mechanisms
from clipforge.data.synth.render import render
from clipforge.data.synth.tasks import build_tasks
from clipforge.data.synth.world import GEM, SEEN_BACKGROUNDS, SHIFTED_SPLITS
from clipforge.errors import DataError
from support.synth_captions import check_caption

ALL_ON = SynthConfig(seed=4, caption_style="sentence", polysemy=True, spurious=0.9, template_set="paper")


def test_plain_world_is_unchanged():
    # Scenes, captions and labels of the plain world as the generator made them before the
    # mechanisms existed: a default that changes the world fails here.
    h = hashlib.sha256()
    for cfg in (SynthConfig(), SynthConfig(seed=3, max_objects=2)):
        for split in SPLITS:
            for i in range(40):
                s = make_sample(cfg, split, i)
                h.update(json.dumps([repr(s.scene), s.caption, s.labels], sort_keys=True).encode())
    assert h.hexdigest() == "d33680029c6e0cf9e827ce96e1af94f8b5f435f7d689a094261bfa42d413c8d9"
    plain = SynthConfig()
    assert mechanisms(World(plain)) == {}
    assert set(plain.record()) == {f.name for f in dataclasses.fields(plain)} - {
        "caption_style", "polysemy", "spurious", "template_set"}
    assert set(ALL_ON.record()) == {f.name for f in dataclasses.fields(plain)}


def test_sentence_captions_rarely_are_a_bare_label():
    assert is_bare_label("circle, red") and is_bare_label("two big red discs") and is_bare_label("red circle icon")
    assert not is_bare_label("This is a photo of a red circle.")
    fractions = {}
    for style in ("alt", "sentence"):
        cfg = SynthConfig(seed=1, caption_style=style)
        captions = [make_sample(cfg, "train", i).caption for i in range(1500)]
        fractions[style] = bare_label_fraction(captions)
    assert fractions["alt"] > 0.15  # keyword-style alt text: a bare label is common (measured 0.23)
    assert fractions["sentence"] < 0.05  # sentences: rare (measured 0.02)
    cfg = SynthConfig(seed=2, caption_style="sentence")
    sentences = 0
    for i in range(800):
        s = make_sample(cfg, SPLITS[i % len(SPLITS)], i)
        check_caption(s.scene, s.caption)  # sentences state only what the scene holds
        sentences += s.caption.endswith(".") and s.caption[0].isupper()
    assert sentences > 0.9 * 800


def _sense_stats(n: int) -> dict[tuple[str, str], int]:
    """Counts of (sense, what the caption calls it) over one-object training images of a sense."""
    counts: dict[tuple[str, str], int] = {}
    for i in range(n):
        s = make_sample(ALL_ON, "train", i)
        if not s.labels["sense"]:
            continue
        text = s.caption.lower()
        if re.search(r"\bdiamond (gemstone|jewel|card symbol|card suit)\b", text):
            said = "diamond+context"
        else:
            said = "diamond" if re.search(r"\bdiamonds?\b", text) else "other"
        key = (s.labels["sense"], said)
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_polysemous_name_names_two_things_and_context_tells_them_apart():
    counts = _sense_stats(2500)
    gem, card = "diamond gemstone", "diamond card symbol"
    for sense in (gem, card):  # both senses appear under the same bare name
        assert counts.get((sense, "diamond"), 0) >= 20, counts
    bare_gem, bare_card = counts[(gem, "diamond")], counts[(card, "diamond")]
    assert 0.15 < bare_gem / (bare_gem + bare_card) < 0.85  # the bare word is ambiguous
    for sense in (gem, card):
        assert counts.get((sense, "diamond+context"), 0) >= 10  # context words appear ...
    for i in range(2500):  # ... and each belongs to one sense: never in a scene without it
        s = make_sample(ALL_ON, "train", i)
        text, shapes = s.caption.lower(), {o.shape for o in s.scene.objects}
        if re.search(r"\bdiamond (gemstone|jewel)\b", text):
            assert GEM in shapes, s.caption
        if re.search(r"\bdiamond card (symbol|suit)\b", text):
            assert "diamond" in shapes, s.caption


def test_polysemous_senses_render_differently():
    scene = make_sample(SynthConfig(seed=0, max_objects=1), "train", 0).scene
    obj = dataclasses.replace(scene.objects[0], x=0.5, y=0.5, extent=0.6, rotation=0.0)
    images = {}
    for shape in ("diamond", GEM):
        one = dataclasses.replace(scene, objects=(dataclasses.replace(obj, shape=shape),), background="plain", noise=0.0)
        images[shape] = np.asarray(render(one, 64), np.int32)
    background = np.asarray(scene.bg_colours[0], np.int32)
    drawn = {k: (np.abs(v - background).sum(-1) > 60) for k, v in images.items()}
    union, overlap = drawn["diamond"] | drawn[GEM], drawn["diamond"] & drawn[GEM]
    assert overlap.sum() / union.sum() < 0.75  # a third of the pixels differ (measured IoU 0.63)

    def aspect(mask: np.ndarray) -> float:  # width / height of the silhouette's bounding box
        rows, cols = np.nonzero(mask)
        return (np.ptp(cols) + 1) / (np.ptp(rows) + 1)

    assert aspect(drawn["diamond"]) < 0.8 and aspect(drawn[GEM]) > 1.0  # tall rhombus, wide gem


def test_sense_task_is_ambiguous_by_name_and_not_by_class():
    tasks = build_tasks(ALL_ON)
    sense = tasks["sense"]
    assert GEM in tasks["shape"]["classes"] and "names" not in tasks["shape"]
    assert len(set(sense["names"])) == 1 and len(sense["names"]) == len(sense["classes"]) == 2
    plain = [sense["plain_template"].replace("{}", n) for n in sense["names"]]
    assert plain[0] == plain[1]  # the bare name gives both classes one prompt: a coin toss
    for template in [sense["template"], *sense["templates"]]:
        prompts = [template.replace("{}", c) for c in sense["classes"]]
        assert prompts[0] != prompts[1]
    labels = {make_sample(ALL_ON, "test", i).labels["sense"] for i in range(400)} - {""}
    assert labels == set(sense["classes"])
    plain_world = build_tasks(SynthConfig())
    assert "sense" not in plain_world and GEM not in plain_world["shape"]["classes"]
    assert "sense" not in make_sample(SynthConfig(), "test", 0).labels


def _rows(cfg: SynthConfig, split: str, n: int) -> list[dict]:
    return [make_sample(cfg, split, i).labels for i in range(n)]


def test_spurious_cue_holds_in_training_and_is_broken_in_shifted_splits():
    cfg = SynthConfig(seed=6, max_objects=1, spurious=0.9)  # one object: every row has a shape label
    cue_map = mechanisms(World(cfg))["spurious"]["cue_map"]
    chance = 1 / len(SEEN_BACKGROUNDS)
    for split in ("train", "test"):
        assert cue_agreement(_rows(cfg, split, 600), cue_map) > 0.85  # expected 0.9 + 0.1 / 5
    for split in ("test_heldout", "test_noise", "test_scale_rotation"):
        assert abs(cue_agreement(_rows(cfg, split, 600), cue_map) - chance) < 0.07, split  # 4 std
    plain = dataclasses.replace(cfg, spurious=0.0)
    assert abs(cue_agreement(_rows(plain, "train", 600), cue_map) - chance) < 0.07
    # the cue has a random stream of its own: it changes the background and nothing else
    a, b = make_sample(cfg, "train", 3).scene, make_sample(plain, "train", 3).scene
    assert a.objects == b.objects and a.noise == b.noise and a.bg_params == b.bg_params


def test_paper_template_sets():
    tasks = build_tasks(ALL_ON)
    for name, task in tasks.items():
        templates = task["templates"]
        assert len(templates) == len(set(templates)) == TEMPLATES_PER_TASK, name
        fields = {k: "x" for k in task["fields"]}
        for t in templates:
            assert t.count("{}") == 1
            t.format("cls", **fields)  # no placeholder beyond the task's declared fields
    basic = build_tasks(dataclasses.replace(ALL_ON, template_set="basic"))
    assert all(4 <= len(t["templates"]) <= 6 for t in basic.values())


@pytest.mark.parametrize("bad, message", [
    (dict(caption_style="tweet"), "caption_style must be 'alt' or 'sentence'"),
    (dict(polysemy="yes"), "polysemy must be true or false"),
    (dict(spurious=1.5), "spurious must be a number within 0..1"),
    (dict(spurious=-0.1), "spurious must be a number within 0..1"),
    (dict(template_set="clip"), "template_set must be 'basic' or 'paper'"),
])
def test_bad_mechanism_options_are_clear_errors(bad, message):
    with pytest.raises(DataError, match=re.escape(message)) as info:
        SynthConfig(**bad)
    assert "\n" not in str(info.value)


def test_world_on_disk_records_the_mechanisms(tmp_path, capsys):
    out = tmp_path / "w"
    argv = ["data", "synth", "--out", str(out), "--train", "12", "--val", "0", "--test", "30", "--shifted", "4",
            "--workers", "1", "--no-progress", "--seed", "4", "--caption-style", "sentence", "--polysemy",
            "--spurious", "0.9", "--template-set", "paper"]
    assert main(argv) == 0
    assert "mechanisms: caption_style, polysemy, spurious, template_set" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest["config"] == dataclasses.replace(ALL_ON, train=12, val=0, test=30, shifted=4).record()
    record = manifest["mechanisms"]
    assert record["spurious"]["broken_in"] == list(SHIFTED_SPLITS) and record["spurious"]["strength"] == 0.9
    assert record["polysemy"]["word"] == "diamond" and set(record["polysemy"]["senses"]) == {"diamond", GEM}
    assert record["template_set"]["templates_per_task"] == 80 and record["caption_style"]["style"] == "sentence"
    assert "sense" in manifest["label_columns"] and GEM in manifest["attributes"]["shapes"]
    header = (out / "test.csv").read_text().splitlines()[0].split(",")
    assert header[-1] == "sense"
    assert len((out / "tasks" / "shape_templates.txt").read_text().splitlines()) == 80
    stamp = (out / "world.json").stat().st_mtime_ns
    cfg = dataclasses.replace(ALL_ON, train=12, val=0, test=30, shifted=4)
    assert generate_world(cfg, out, workers=1, progress=False) == manifest  # reused, not rewritten
    assert (out / "world.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):
        main(argv[:-4] + ["--spurious", "2"])
    assert "--spurious: must be within 0..1" in capsys.readouterr().err
    args = build_parser().parse_args(["data", "synth", "--out", "x"])
    assert (args.caption_style, args.polysemy, args.spurious, args.template_set) == ("alt", False, 0.0, "basic")
