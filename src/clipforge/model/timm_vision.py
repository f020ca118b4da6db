"""An image tower taken from timm, laid out as OpenCLIP's timm adapter lays it out.

OpenCLIP builds ConvNeXt, EVA, FastViT (MobileCLIP), ViTamin, Swin, PE-Core and the SigLIP ViTs
with ``timm.create_model`` and puts a small head behind them. Rebuilding them the same way, with
the same module names (``trunk.*`` for timm's network, ``head.*`` for the head), makes an OpenCLIP
state dict load one to one and compute the same features, without re-implementing a network timm
already maintains. timm is an optional dependency, imported only when such a tower is built.

The head, as ``VisionConfig.timm_pool`` / ``timm_proj`` choose it:

- ``timm_proj`` None: the trunk's own classifier (after its ``timm_pool`` pooling) is the
  projection to ``embed_dim``; the head is empty.
- ``timm_proj`` 'none': the trunk's pooled features are the embedding (SigLIP).
- 'linear' / 'mlp': the trunk's classifier is removed and ``head.proj`` (a linear map) or
  ``head.mlp`` (two layers, hidden width 2 x embed_dim) projects its pooled features.
- ``timm_pool`` 'abs_attn' / 'rot_attn': the trunk's pooling is removed too and an attention pool
  over the feature map (``head.pool``, timm's own layer) pools and projects.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from clipforge.config import VisionConfig
from clipforge.errors import ClipforgeError

_ATTN_POOLS = ("abs_attn", "rot_attn")


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ClipforgeError("this image tower comes from timm, which is not installed (pip install timm)") from None
    return timm


def create_trunk(cfg: VisionConfig, **kwargs: Any) -> nn.Module:
    """``timm.create_model(cfg.timm_model_name)`` with random weights and the config's
    stochastic-depth and patch-dropout rates (passed only when set: not every timm model takes them)."""
    timm = _timm()
    if not timm.is_model(cfg.timm_model_name):
        raise ClipforgeError(f"timm {timm.__version__} has no model named {cfg.timm_model_name!r} "
                             "(a newer timm may have it)")
    if cfg.timm_drop_path is not None:
        kwargs["drop_path_rate"] = cfg.timm_drop_path
    if cfg.patch_dropout > 0:
        kwargs["patch_drop_rate"] = cfg.patch_dropout
    return timm.create_model(cfg.timm_model_name, pretrained=False, **kwargs)


class TimmVisionTower(nn.Module):
    """timm network (``trunk``) + head (``head``); ``forward(images) -> [B, embed_dim]``."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image_size
        attn_pool = cfg.timm_pool in _ATTN_POOLS
        if cfg.timm_proj in (None, "none") and not attn_pool:
            # The trunk pools, and its classifier (None) or nothing ('none') projects.
            self.trunk = create_trunk(cfg, num_classes=0 if cfg.timm_proj == "none" else output_dim,
                                      global_pool=cfg.timm_pool)
            # Pre-classifier width; some trunks (FastViT) widen their features inside the head.
            width = getattr(self.trunk, "head_hidden_size", None) or self.trunk.num_features
        else:
            self.trunk = create_trunk(cfg)
            # An attention pool needs the unpooled map; otherwise the trunk keeps its pooling
            # (its default when timm_pool is '') and only loses its classifier.
            if attn_pool:
                self.trunk.reset_classifier(0, global_pool="")
            elif cfg.timm_pool:
                self.trunk.reset_classifier(0, global_pool=cfg.timm_pool)
            else:
                self.trunk.reset_classifier(0)
            width = self.trunk.num_features  # what OpenCLIP's head takes
        self.width = width  # features before the projection (encode_image(project=False))
        self.head = nn.Sequential(self._head(cfg, width, output_dim))

    def _head(self, cfg: VisionConfig, width: int, output_dim: int) -> OrderedDict[str, nn.Module]:
        from timm.layers import AttentionPool2d, Mlp, RotAttentionPool2d

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if cfg.timm_pool == "abs_attn":
            # Learned absolute positions need the map's size, which the trunk's default config records.
            feat_size = self.trunk.default_cfg.get("pool_size")
            if not feat_size:
                raise ClipforgeError(f"timm model {cfg.timm_model_name} records no feature-map size, "
                                     "which timm_pool='abs_attn' needs")
            layers["pool"] = AttentionPool2d(width, feat_size=feat_size, out_features=output_dim)
            width = output_dim
        elif cfg.timm_pool == "rot_attn":
            layers["pool"] = RotAttentionPool2d(width, out_features=output_dim)
            width = output_dim
        if cfg.timm_proj == "linear":
            layers["drop"] = nn.Dropout(cfg.timm_drop)
            layers["proj"] = nn.Linear(width, output_dim, bias=cfg.timm_proj_bias)
        elif cfg.timm_proj == "mlp":
            layers["mlp"] = Mlp(width, 2 * output_dim, output_dim, drop=(cfg.timm_drop, 0.0),
                                bias=(True, cfg.timm_proj_bias))
        return layers

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        if project:
            return self.head(self.trunk(x))
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before any projection: the trunk's pre-classifier output, or an
        attention pool's output before its last linear map."""
        x = self.trunk.forward_features(x)
        pool = getattr(self.head, "pool", None)
        return pool(x, pre_logits=True) if pool is not None else self.trunk.forward_head(x, pre_logits=True)

    # -- what training needs --------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        try:
            self.trunk.set_grad_checkpointing(enable)
        except (AttributeError, NotImplementedError, AssertionError) as e:
            if enable:  # asking for it and silently training without it would hide the memory cost
                raise ClipforgeError(f"timm model {self.cfg.timm_model_name} does not support gradient "
                                     f"checkpointing ({type(e).__name__}: {e})") from None

    def blocks(self) -> list[nn.Module]:
        """The trunk's layer groups, input to output, as timm's ``group_matcher`` draws them (stem,
        then each block or stage, the final norm last): what locking keeps the last N of, as
        OpenCLIP's ``lock(unlocked_groups=N)`` does. Each group is a ModuleList of the modules that
        own its parameters (parameters on the trunk itself, such as a class token, in a holder)."""
        from timm.models import group_parameters

        out = []
        for _, names in sorted(group_parameters(self.trunk, self.trunk.group_matcher()).items()):
            owners: dict[str, nn.Module] = {}
            root: dict[str, nn.Parameter] = {}
            for name in names:
                owner, _, leaf = name.rpartition(".")
                if owner:
                    owners.setdefault(owner, self.trunk.get_submodule(owner))
                else:
                    root[leaf] = self.trunk.get_parameter(leaf)
            out.append(nn.ModuleList([*owners.values(), *([_Held(root)] if root else [])]))
        return out

    @property
    def patch_dropout(self) -> float:
        """Fraction of patch tokens dropped while training; only timm ViTs have it (others raise
        AttributeError, so ``hasattr`` tells whether patch dropout applies)."""
        if not hasattr(self.trunk, "patch_drop"):
            raise AttributeError(f"timm model {self.cfg.timm_model_name} has no patch dropout")
        return float(getattr(self.trunk.patch_drop, "prob", 0.0))

    @patch_dropout.setter
    def patch_dropout(self, p: float) -> None:
        from timm.layers import PatchDropout, PatchDropoutWithIndices

        if not hasattr(self.trunk, "patch_drop"):
            raise AttributeError(f"timm model {self.cfg.timm_model_name} has no patch dropout")
        current = self.trunk.patch_drop
        if hasattr(current, "prob"):
            current.prob = float(p)
        elif p:
            # Switched off, timm's ViT keeps an Identity and EVA keeps None; EVA's layer also returns
            # the kept indices (for its rotary embeddings). The layers hold no weights.
            layer = PatchDropout if isinstance(current, nn.Identity) else PatchDropoutWithIndices
            self.trunk.patch_drop = layer(float(p), num_prefix_tokens=self.trunk.num_prefix_tokens)


class _Held(nn.Module):
    """Parameters that sit on the trunk itself (class token, position table), shared by reference,
    so that a layer group is a module like the others."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)
