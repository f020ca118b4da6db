"""Pretrained weights by name: ``clipforge.load("ViT-B-32", pretrained="openai")``, ``"ViT-B-32/openai"``,
``"hf-hub:org/repo"`` or a bare Hugging Face repo id.

The table records, per (architecture, tag), where the weights are and what the file does not say:
the activation (OpenAI and MetaCLIP trained with QuickGELU, most OpenCLIP runs with GELU; running
weights with the other one silently costs accuracy) and preprocessing that differs from the
architecture's default. Tags follow OpenCLIP's ``list_pretrained()`` so its users find theirs.

A family added later registers its architectures in ``registry`` and its weights here with
``register``; a field it needs (tokenizer, context length) gets a default that means "CLIP's".
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from clipforge.config import PreprocessConfig
from clipforge.errors import CheckpointError
from clipforge.model import checkpoints, download
from clipforge.model.clip import CLIP

INCEPTION = (0.5, 0.5, 0.5)  # mean and std of LAION's ViT-L-14 laion2b run (timm's "inception" constants)
_HUB_PREFIX = "hf-hub:"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt")  # a missing file, not a repo


@dataclass(frozen=True)
class Pretrained:
    """Named weights for a registered architecture."""

    arch: str  # a name in registry.list_models()
    tag: str
    quick_gelu: bool  # the activation the weights were trained with
    url: str = ""  # a plain download, verified by ``sha256``
    sha256: str = ""
    hf_hub: str = ""  # a hub repo holding OpenCLIP's weights file (the mirror where ``url`` is set)
    mean: tuple[float, float, float] | None = None  # preprocessing, where it differs from the default
    std: tuple[float, float, float] | None = None
    tokenizer: str = "clip-bpe"  # what the text tower reads; families add their own
    context_length: int = 77

    def __post_init__(self) -> None:
        if not (self.url and self.sha256) and not self.hf_hub:
            raise ValueError(f"{self.name}: needs a url with its sha256, or a hub repo")

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.tag}"

    @property
    def source(self) -> str:
        """Where ``fetch`` takes the weights from: a verified URL first, else the hub."""
        return self.url if self.url and self.sha256 else _HUB_PREFIX + self.hf_hub


_AZURE = "https://openaipublic.azureedge.net/clip/models"
# OpenAI's releases as openai/CLIP's clip.py lists them: the sha256 is the URL's directory.
_OPENAI = [("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50", "resnet50_clip"),
           ("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101", "resnet101_clip"),
           ("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4",
            "resnet50x4_clip"),
           ("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16",
            "resnet50x16_clip"),
           ("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64",
            "resnet50x64_clip"),
           ("ViT-B-32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32",
            "vit_base_patch32_clip_224"),
           ("ViT-B-16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16",
            "vit_base_patch16_clip_224"),
           ("ViT-L-14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14",
            "vit_large_patch14_clip_224"),
           ("ViT-L-14-336", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px",
            "vit_large_patch14_clip_336")]


def _oc(arch: str, tag: str, repo: str, quick_gelu: bool = False, **pre) -> Pretrained:
    return Pretrained(arch, tag, quick_gelu, hf_hub=repo, **pre)


# The most used OpenCLIP tags of the architectures above, with the hub repos and activations that
# open_clip 3.x's pretrained.py records (QuickGELU where it says quick_gelu=True).
_OPENCLIP = [
    _oc("RN50", "yfcc15m", "timm/resnet50_clip.yfcc15m", True),
    _oc("RN50", "cc12m", "timm/resnet50_clip.cc12m", True),
    _oc("RN101", "yfcc15m", "timm/resnet101_clip.yfcc15m", True),
    _oc("ViT-B-32", "laion400m_e32", "timm/vit_base_patch32_clip_224.laion400m_e32", True),
    _oc("ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    _oc("ViT-B-32", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    _oc("ViT-B-32", "metaclip_400m", "timm/vit_base_patch32_clip_224.metaclip_400m", True),
    _oc("ViT-B-32", "metaclip_fullcc", "timm/vit_base_patch32_clip_224.metaclip_2pt5b", True),
    _oc("ViT-B-16", "laion400m_e32", "timm/vit_base_patch16_clip_224.laion400m_e32"),
    _oc("ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    _oc("ViT-B-16", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    _oc("ViT-B-16", "dfn2b", "apple/DFN2B-CLIP-ViT-B-16", True),
    _oc("ViT-B-16", "metaclip_400m", "timm/vit_base_patch16_clip_224.metaclip_400m", True),
    _oc("ViT-B-16", "metaclip_fullcc", "timm/vit_base_patch16_clip_224.metaclip_2pt5b", True),
    _oc("ViT-L-14", "laion400m_e32", "timm/vit_large_patch14_clip_224.laion400m_e32"),
    _oc("ViT-L-14", "laion2b_s32b_b82k", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", mean=INCEPTION, std=INCEPTION),
    _oc("ViT-L-14", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
    _oc("ViT-L-14", "metaclip_400m", "timm/vit_large_patch14_clip_224.metaclip_400m", True),
    _oc("ViT-L-14", "metaclip_fullcc", "timm/vit_large_patch14_clip_224.metaclip_2pt5b", True),
    _oc("ViT-L-14", "dfn2b", "apple/DFN2B-CLIP-ViT-L-14", True),
    _oc("ViT-L-14", "dfn2b_s39b", "apple/DFN2B-CLIP-ViT-L-14-39B"),
]

_TABLE: dict[tuple[str, str], Pretrained] = {}


def register(*entries: Pretrained) -> None:
    for e in entries:
        _TABLE[(e.arch, e.tag.lower())] = e


register(*(Pretrained(arch, "openai", True, url=f"{_AZURE}/{sha}/{file}.pt", sha256=sha,
                      hf_hub=f"timm/{timm}.openai") for arch, sha, file, timm in _OPENAI), *_OPENCLIP)


def list_pretrained() -> list[tuple[str, str]]:
    """(architecture, tag) of every named weight, as ``open_clip.list_pretrained()``."""
    return list(_TABLE)


def list_entries() -> list[Pretrained]:
    return list(_TABLE.values())


def split_quickgelu(arch: str | None, quick_gelu: bool | None) -> tuple[str | None, bool | None]:
    """OpenCLIP's ``-quickgelu`` names: ``ViT-B-32-quickgelu`` is ViT-B-32 with QuickGELU."""
    if arch is not None and arch.lower().endswith("-quickgelu"):
        return arch[: -len("-quickgelu")], True if quick_gelu is None else quick_gelu
    return arch, quick_gelu


def get_pretrained(arch: str, tag: str) -> Pretrained:
    base, _ = split_quickgelu(arch, None)
    entry = _TABLE.get((base or arch, tag.lower()))
    if entry is None:
        tags = sorted(t for a, t in _TABLE if a == base)
        known = f"its tags: {', '.join(tags)}" if tags else "`clipforge pretrained` lists the named weights"
        raise CheckpointError(f"no pretrained weights {arch!r}/{tag!r}; {known}")
    return entry


def fetch(entry: Pretrained, cache_dir: str | Path | None = None) -> Path:
    """The local weights file of ``entry``, downloaded and verified on first use."""
    if entry.url and entry.sha256:
        return download.fetch_url(entry.url, entry.sha256, cache_dir)
    # The architecture comes from the table, so only the weights file is needed.
    return download.fetch_hub(entry.hf_hub, [[w] for w in checkpoints.OPENCLIP_WEIGHTS], cache_dir=cache_dir)[0]


def load_weights(name: str | Path, pretrained: str | None = None, arch: str | None = None,
                 quick_gelu: bool | None = None, cache_dir: str | Path | None = None) -> CLIP:
    """The model ``name`` means, in this order: ``name`` + ``pretrained`` (a tag, or OpenCLIP's
    weights file); an ``hf-hub:`` repo; an existing local path, as before names existed; ``arch/tag``
    in the table; a Hugging Face repo id ``org/name``."""
    arch, quick_gelu = split_quickgelu(arch, quick_gelu)
    text = str(name)
    if pretrained is not None:
        if Path(pretrained).expanduser().is_file():  # OpenCLIP's pretrained=<file>: name is the architecture
            base, quick_gelu = split_quickgelu(text, quick_gelu)
            return checkpoints.load_any(Path(pretrained).expanduser(), arch=base, quick_gelu=quick_gelu)
        return _load_entry(text, pretrained, quick_gelu, cache_dir)
    if text.startswith(_HUB_PREFIX):
        return load_hub(text[len(_HUB_PREFIX):], arch, quick_gelu, cache_dir)
    path = Path(text).expanduser()
    if path.exists():
        return checkpoints.load_any(path, arch=arch, quick_gelu=quick_gelu)
    head, _, tag = text.partition("/")
    if tag and ((split_quickgelu(head, None)[0], tag.lower()) in _TABLE or _is_arch(head)):
        return _load_entry(head, tag, quick_gelu, cache_dir)
    if _REPO_ID.fullmatch(text) and not text.endswith(_FILE_SUFFIXES):
        try:
            return load_hub(text, arch, quick_gelu, cache_dir)
        except CheckpointError as e:  # it may have been meant as a path: say both
            raise CheckpointError(f"{text}: no such file or directory; as a hub repo: {e}") from None
    if _is_arch(text):
        tags = sorted(t for a, t in _TABLE if a == split_quickgelu(text, None)[0])
        hint = f"name its weights ({', '.join(f'{text}/{t}' for t in tags)})" if tags else "no weights are named for it"
        raise CheckpointError(f"{text!r} is an architecture, not weights: {hint}, or build it untrained "
                              "with create_model")
    raise CheckpointError(f"{text}: no such file or directory, and not a pretrained name "
                          "(`clipforge pretrained` lists them), hf-hub:org/repo or a hub repo id")


def _is_arch(name: str) -> bool:
    from clipforge.model.registry import list_models

    return split_quickgelu(name, None)[0] in list_models()


def _load_entry(arch: str, tag: str, quick_gelu: bool | None, cache_dir: str | Path | None) -> CLIP:
    _, suffix_quick = split_quickgelu(arch, None)
    entry = get_pretrained(arch, tag)
    quick = quick_gelu if quick_gelu is not None else suffix_quick if suffix_quick is not None else entry.quick_gelu
    model = checkpoints.load_any(fetch(entry, cache_dir), arch=entry.arch, quick_gelu=quick)
    cfg = model.config
    over = {k: v for k, v in (("mean", entry.mean), ("std", entry.std)) if v is not None}
    pre = dataclasses.replace(cfg.preprocess or PreprocessConfig(image_size=cfg.vision.image_size), **over)
    model.config = cfg.replace(preprocess=pre, name=entry.arch)
    return model


# Hub repos: OpenCLIP's layout (config + weights); OpenCLIP weights alone (timm's mirrors, whose
# config.json + model.safetensors are timm's image tower, not CLIP); a Hugging Face CLIPModel
# directory or clipforge's own (both config.json + model.safetensors).
# Safetensors first; a pickle is only read by checkpoints' tensors-only reader.
_HUB_LAYOUTS = ([[checkpoints.OPENCLIP_CONFIG, w] for w in checkpoints.OPENCLIP_WEIGHTS]
                + [[w] for w in checkpoints.OPENCLIP_WEIGHTS]
                + [[checkpoints.CONFIG_NAME, w] for w in checkpoints.HF_WEIGHTS])


def load_hub(repo: str, arch: str | None = None, quick_gelu: bool | None = None,
             cache_dir: str | Path | None = None) -> CLIP:
    """A hub repo's model: ``repo`` is ``org/name``, optionally ``@revision``."""
    repo, _, revision = repo.partition("@")
    paths = download.fetch_hub(repo, _HUB_LAYOUTS, revision=revision or None, cache_dir=cache_dir,
                               extras=["preprocessor_config.json"])
    weights = next(p for p in paths if p.name in checkpoints.OPENCLIP_WEIGHTS + checkpoints.HF_WEIGHTS)
    if weights.name in checkpoints.OPENCLIP_WEIGHTS:  # reads open_clip_config.json beside it when fetched
        return checkpoints.load_state_file(weights, arch=arch, quick_gelu=quick_gelu)
    # config.json + model.safetensors: a Hugging Face CLIPModel or clipforge's own format (told apart by content)
    return checkpoints.load_any(weights.parent, arch=arch, quick_gelu=quick_gelu)
