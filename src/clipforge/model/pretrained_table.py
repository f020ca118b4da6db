"""The named weights: per (architecture, tag), where the weights are and what the file does not say.

That is the activation (OpenAI, MetaCLIP and DFN trained with QuickGELU, most OpenCLIP runs with
GELU; running weights with the other one silently costs accuracy) and the preprocessing (mean, std,
resize and interpolation the weights were trained with). Tags, hub repos and values follow
OpenCLIP's ``list_pretrained()`` (open-clip-torch 3.3) so its users find theirs; the tokenizer and
context length are the architecture's (``registry``), read by ``Pretrained.tokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clipforge.config import OPENAI_MEAN, OPENAI_STD, TextConfig

INCEPTION = (0.5, 0.5, 0.5)  # mean and std of SigLIP, PE-Core, LAION's ViT-L-14 (timm's "inception" constants)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HUB_PREFIX = "hf-hub:"


@dataclass(frozen=True)
class Pretrained:
    """Named weights for a registered architecture."""

    arch: str  # a name in registry.list_models()
    tag: str
    quick_gelu: bool  # the activation the weights were trained with
    url: str = ""  # a plain download, verified by ``sha256``
    sha256: str = ""
    hf_hub: str = ""  # a hub repo holding OpenCLIP's weights file (the mirror where ``url`` is set)
    filename: str = ""  # the weights file in ``hf_hub`` when it is not OpenCLIP's usual name
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"

    def __post_init__(self) -> None:
        if not (self.url and self.sha256) and not self.hf_hub:
            raise ValueError(f"{self.name}: needs a url with its sha256, or a hub repo")

    @property
    def name(self) -> str:
        return f"{self.arch}/{self.tag}"

    @property
    def source(self) -> str:
        """Where the weights come from: a verified URL first, else the hub."""
        if self.url and self.sha256:
            return self.url
        return HUB_PREFIX + self.hf_hub + (f"/{self.filename}" if self.filename else "")

    @property
    def tokenizer(self) -> str:
        """What the text tower reads: CLIP's BPE, or the Hugging Face tokenizer the architecture names."""
        text = self._text()
        return text.hf_tokenizer_name or text.hf_model or "clip-bpe"

    @property
    def context_length(self) -> int:
        return self._text().context_length

    def _text(self) -> TextConfig:
        from clipforge.model.registry import get_config  # the registry's zoo imports the interop layer

        return get_config(self.arch).text


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
OPENAI = [Pretrained(arch, "openai", True, url=f"{_AZURE}/{sha}/{file}.pt", sha256=sha, hf_hub=f"timm/{timm}.openai")
          for arch, sha, file, timm in _OPENAI]


def _oc(arch: str, tag: str, repo: str, quick_gelu: bool = False, **pre) -> Pretrained:
    return Pretrained(arch, tag, quick_gelu, hf_hub=repo, **pre)


_SIGLIP = dict(mean=INCEPTION, std=INCEPTION, resize_mode="squash")
_PE = dict(mean=INCEPTION, std=INCEPTION, interpolation="bilinear", resize_mode="squash")
_CLIPA = dict(mean=IMAGENET[0], std=IMAGENET[1], interpolation="bilinear", resize_mode="squash")
_MOBILECLIP = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")  # [0, 1] pixels

# OpenCLIP's OpenAI-shaped runs: LAION-2B, DataComp, MetaCLIP, DFN (QuickGELU where it says quick_gelu=True).
_OPENAI_SHAPED = [
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
    _oc("ViT-H-14", "laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    _oc("ViT-H-14", "metaclip_fullcc", "timm/vit_huge_patch14_clip_224.metaclip_2pt5b", True),
    _oc("ViT-H-14", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14", True, resize_mode="squash"),
    _oc("ViT-H-14-378", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14-378", True, resize_mode="squash"),
    _oc("ViT-bigG-14", "laion2b_s39b_b160k", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
]

# The families beyond OpenAI's shapes, each by its most used runs.
_FAMILIES = [
    # SigLIP and SigLIP 2 (sigmoid loss; SentencePiece / Gemma tokenizers in the repos).
    *(_oc(a, "webli", f"timm/{a}", **_SIGLIP) for a in (
        "ViT-B-16-SigLIP", "ViT-B-16-SigLIP-256", "ViT-B-16-SigLIP-384", "ViT-B-16-SigLIP-512",
        "ViT-B-16-SigLIP-i18n-256", "ViT-L-16-SigLIP-256", "ViT-L-16-SigLIP-384", "ViT-SO400M-14-SigLIP",
        "ViT-SO400M-14-SigLIP-384", "ViT-SO400M-16-SigLIP-i18n-256",
        "ViT-B-32-SigLIP2-256", "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-256", "ViT-B-16-SigLIP2-384",
        "ViT-B-16-SigLIP2-512", "ViT-L-16-SigLIP2-256", "ViT-L-16-SigLIP2-384", "ViT-L-16-SigLIP2-512",
        "ViT-SO400M-14-SigLIP2", "ViT-SO400M-14-SigLIP2-378", "ViT-SO400M-16-SigLIP2-256",
        "ViT-SO400M-16-SigLIP2-384", "ViT-SO400M-16-SigLIP2-512", "ViT-gopt-16-SigLIP2-256",
        "ViT-gopt-16-SigLIP2-384")),
    # MobileCLIP and MobileCLIP2 (the first three see [0, 1] pixels).
    _oc("MobileCLIP-S1", "datacompdr", "apple/MobileCLIP-S1-OpenCLIP", **_MOBILECLIP),
    _oc("MobileCLIP-S2", "datacompdr", "apple/MobileCLIP-S2-OpenCLIP", **_MOBILECLIP),
    _oc("MobileCLIP-B", "datacompdr", "apple/MobileCLIP-B-OpenCLIP", **_MOBILECLIP),
    _oc("MobileCLIP-B", "datacompdr_lt", "apple/MobileCLIP-B-LT-OpenCLIP", **_MOBILECLIP),
    *(_oc(f"MobileCLIP2-{s}", "dfndr2b", f"timm/MobileCLIP2-{s}-OpenCLIP", **_MOBILECLIP) for s in ("S0", "S2", "B")),
    *(_oc(f"MobileCLIP2-{s}", "dfndr2b", f"timm/MobileCLIP2-{s}-OpenCLIP", interpolation="bilinear")
      for s in ("S3", "S4")),
    _oc("MobileCLIP2-L-14", "dfndr2b", "timm/MobileCLIP2-L-14-OpenCLIP"),
    # CoCa (contrastive features and captions).
    *(_oc(f"coca_ViT-{s}", tag, f"laion/{pre}CoCa-ViT-{s}-laion2B-s13B-b90k") for s in ("B-32", "L-14")
      for tag, pre in (("laion2b_s13b_b90k", ""), ("mscoco_finetuned_laion2b_s13b_b90k", "mscoco_finetuned_"))),
    # EVA-CLIP.
    _oc("EVA01-g-14", "laion400m_s11b_b41k", "timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k"),
    _oc("EVA02-B-16", "merged2b_s8b_b131k", "timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k"),
    _oc("EVA02-L-14", "merged2b_s4b_b131k", "timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k"),
    _oc("EVA02-L-14-336", "merged2b_s6b_b61k", "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k"),
    _oc("EVA02-E-14-plus", "laion2b_s9b_b144k", "timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k"),
    # ConvNeXt (LAION).
    _oc("convnext_base_w", "laion2b_s13b_b82k", "laion/CLIP-convnext_base_w-laion2B-s13B-b82K"),
    _oc("convnext_base_w", "laion2b_s13b_b82k_augreg", "laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg"),
    _oc("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup", "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"),
    _oc("convnext_xxlarge", "laion2b_s34b_b82k_augreg_soup", "laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup"),
    # ViTamin (weights under a transformers-style file name).
    *(_oc(a, "datacomp1b", f"jienengchen/{repo}", filename="pytorch_model.bin") for a, repo in (
        ("ViTamin-S", "ViTamin-S"), ("ViTamin-B", "ViTamin-B"), ("ViTamin-L", "ViTamin-L-224px"),
        ("ViTamin-L-384", "ViTamin-L-384px"), ("ViTamin-XL-384", "ViTamin-XL-384px"))),
    # Perception Encoder (PE-Core).
    *(_oc(a, "meta", f"timm/{a}", **_PE) for a in (
        "PE-Core-T-16-384", "PE-Core-S-16-384", "PE-Core-B-16", "PE-Core-L-14-336", "PE-Core-bigG-14-448")),
    # CLIPA.
    *(_oc(a, "datacomp1b", f"UCSC-VLAA/{a}-datacomp1B", **_CLIPA) for a in (
        "ViT-L-14-CLIPA", "ViT-L-14-CLIPA-336", "ViT-H-14-CLIPA", "ViT-H-14-CLIPA-336", "ViT-bigG-14-CLIPA",
        "ViT-bigG-14-CLIPA-336")),
    # MetaCLIP 2 worldwide (H-14 at 224 px trained with QuickGELU).
    _oc("ViT-H-14-worldwide", "metaclip2_worldwide", "timm/vit_huge_patch14_clip_224.metaclip2_worldwide", True),
    _oc("ViT-H-14-worldwide-378", "metaclip2_worldwide", "timm/vit_huge_patch14_clip_378.metaclip2_worldwide",
        resize_mode="squash"),
    _oc("ViT-bigG-14-worldwide", "metaclip2_worldwide", "timm/vit_gigantic_patch14_clip_224.metaclip2_worldwide"),
    _oc("ViT-bigG-14-worldwide-378", "metaclip2_worldwide",
        "timm/vit_gigantic_patch14_clip_378.metaclip2_worldwide", resize_mode="squash"),
]

# OpenCLIP's Hugging Face text towers (the text model's config and tokenizer come from its hub id,
# or from text_model_dir=): multilingual XLM-R, RoBERTa and NLLB-CLIP.
_HF_TEXT = [
    _oc("roberta-ViT-B-32", "laion2b_s12b_b32k", "laion/CLIP-ViT-B-32-roberta-base-laion2B-s12B-b32k"),
    _oc("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k", "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k"),
    _oc("xlm-roberta-large-ViT-H-14", "frozen_laion5b_s13b_b90k",
        "laion/CLIP-ViT-H-14-frozen-xlm-roberta-large-laion5B-s13B-b90k"),
    _oc("nllb-clip-base", "v1", "visheratin/nllb-clip-base-oc"),
    _oc("nllb-clip-large", "v1", "visheratin/nllb-clip-large-oc"),
    _oc("nllb-clip-base-siglip", "v1", "visheratin/nllb-clip-base-siglip", **_SIGLIP),
    _oc("nllb-clip-base-siglip", "mrl", "visheratin/nllb-siglip-mrl-base", **_SIGLIP),
    _oc("nllb-clip-large-siglip", "v1", "visheratin/nllb-clip-large-siglip", **_SIGLIP),
    _oc("nllb-clip-large-siglip", "mrl", "visheratin/nllb-siglip-mrl-large", **_SIGLIP),
]

OPENCLIP = _OPENAI_SHAPED + _FAMILIES + _HF_TEXT
