"""The built-in data world: procedurally generated, captioned images of coloured shapes.

    from clipforge.data.synth import SynthConfig, generate_world, make_sample
    manifest = generate_world(SynthConfig(seed=0, train=20000), "data/synth", workers=2)
    s = make_sample(SynthConfig(), "train", 7)   # s.scene (structured truth), s.caption, s.labels, s.image()

Modules: ``world`` (attributes, config, scene sampling), ``render`` (Pillow drawing),
``captions`` (free-form captions), ``tasks`` (label columns, zero-shot tasks), ``writer``
(parallel generation, CSV / WebDataset output, manifest); the paper's mechanisms, off by default:
``styles`` (sentence captions), ``ensembles`` (80-template ensembles), ``mechanisms`` (their
record in world.json and their measures).
"""

from clipforge.data.synth.world import SHIFTED_SPLITS, SPLITS, Scene, SynthConfig, World
from clipforge.data.synth.writer import Sample, generate_world, load_manifest, make_sample

__all__ = [
    "SynthConfig", "World", "Scene", "Sample", "SPLITS", "SHIFTED_SPLITS",
    "generate_world", "load_manifest", "make_sample",
]
