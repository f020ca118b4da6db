"""``explain(model, image, query, method=...)``: where in an image a model finds a text, or another
image: a map over the image the model sees (its centre crop), values in [0, 1].

Methods (``methods_for`` lists a tower's):

- ``dense``: each position's embedding (``explanations.dense``) against the query's, cosine. One forward
  pass, no gradient. Every tower.
- ``relevance``: gradient-weighted attention relevance (``explanations.relevance``). Transformer towers.
- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) on the last feature map (ResNets, timm CNNs) or on
  the patch tokens entering a ViT's last block: the feature channels, weighted by their mean gradient
  of the score, summed, rectified.

A map is computed on the tower's grid, resampled bilinearly to the input size with each cell at
the centre of its receptive field (``grid_centres``), and scaled to [0, 1] (a constant map is all
zeros). ``method="auto"`` picks ``DEFAULT_METHOD`` where the tower has it, else the first it has; the
figures behind the defaults come from benchmarks/explain, and a method that fails the
randomised-weights sanity check is never one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ClipforgeError
from clipforge.explanations import dense as dense_mod
from clipforge.explanations.refine import REFINES, guided_filter
from clipforge.explanations.relevance import relevance_maps, supports_relevance
from clipforge.model.siglip_vision import SiglipVisionTower
from clipforge.model.timm_vision import TimmVisionTower
from clipforge.model.vision import ModifiedResNet, VisionTransformer

METHODS = ("dense", "relevance", "gradcam")
# Each tower family's default where it has the method: for transformers the pointing game's best
# (README: Explanation maps); for ResNets MaskCLIP's dense maps (no trained ResNet measured yet).
DEFAULT_METHOD = {"vit": "relevance", "resnet": "dense", "siglip": "relevance", "timm": "relevance"}

Query = str | Any  # a text, a PIL image, or an embedding tensor [E]


def _family(visual: nn.Module) -> str:
    for cls, name in ((VisionTransformer, "vit"), (ModifiedResNet, "resnet"), (SiglipVisionTower, "siglip"),
                      (TimmVisionTower, "timm")):
        if isinstance(visual, cls):
            return name
    raise ClipforgeError(f"explanations are not implemented for {type(visual).__name__} image towers")


def methods_for(model: nn.Module) -> list[str]:
    """The methods ``explain`` can run on this model's image tower, default first."""
    visual = _visual(model)
    family = _family(visual)
    have = ["dense"]
    if isinstance(visual, TimmVisionTower) and getattr(visual.head, "pool", None) is not None:
        have = []
    if supports_relevance(visual):
        have.append("relevance")
    have.append("gradcam")
    default = DEFAULT_METHOD[family]
    return sorted(have, key=lambda m: m != default)


def _visual(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    if visual is None:
        raise ClipforgeError(f"explanations need a PyTorch CLIP model with an image tower, got {type(model).__name__}"
                             " (an ONNX export has no gradients or inner layers: load the checkpoint instead)")
    return visual


def explain(model: nn.Module, image: Any, query: Query | Sequence[Query], method: str = "auto", *,
            shifts: int = 1, refine: str = "guided", preprocess: Callable[[Any], torch.Tensor] | None = None,
            tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """Map(s) over ``image`` of where the model finds ``query``.

    ``image``: a PIL image (preprocessed with ``preprocess``, default the model's evaluation
    transform) or a preprocessed tensor [3, S, S]. ``query``: a text, a PIL image (image-to-image),
    an embedding [E], or a list of them. Returns [S, S] for one query, [T, S, S] for a list, float32
    on the CPU, values in [0, 1]; the map covers the model's input (the centre crop it sees).

    ``shifts`` > 1 averages ``shifts`` x ``shifts`` passes over the image shifted by fractions of a
    grid cell (each map shifted back), which places a peak within a cell rather than at its centre:
    finer maps for ``shifts**2`` times the work. ``refine="guided"`` (default) fits the upsampled
    map to the image's colour edges (a guided filter over half a grid cell), so a peak moves onto
    the object's pixels rather than beside them; ``"none"`` keeps the bilinear map."""
    visual = _visual(model)
    queries = list(query) if isinstance(query, (list, tuple)) else [query]
    if not queries:
        raise ClipforgeError("explain needs at least one query")
    options = methods_for(model)
    method = options[0] if method == "auto" else method
    if method not in METHODS:
        raise ClipforgeError(f"unknown explanation method {method!r}; choose from {', '.join(METHODS)} or auto")
    if refine not in REFINES:
        raise ClipforgeError(f"unknown refinement {refine!r}; choose from {', '.join(REFINES)}")
    if method not in options:
        raise ClipforgeError(f"method {method!r} is not available for this {_family(visual)} image tower; "
                             f"it has: {', '.join(options)}")
    x = _image_tensor(model, image, preprocess)
    was_training = model.training
    model.eval()
    try:
        q = query_embeddings(model, queries, preprocess, tokenizer)  # [T, E], unit norm
        maps = _shifted_maps(visual, x, q, method, shifts, refine)  # [T, S, S]
    finally:
        model.train(was_training)
    out = scale_maps(maps, x.shape[-2:])
    return out if isinstance(query, (list, tuple)) else out[0]


def _image_tensor(model: nn.Module, image: Any, preprocess) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image.unsqueeze(0)
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise ClipforgeError(f"explain takes one image [3, S, S], got a tensor of shape {tuple(image.shape)}")
    else:
        if preprocess is None:
            from clipforge.model.factory import get_preprocess

            preprocess = get_preprocess(model)
        x = preprocess(image).unsqueeze(0)
    param = next(model.parameters())
    return x.to(param.device, param.dtype)


@torch.no_grad()
def query_embeddings(model: nn.Module, queries: list, preprocess=None, tokenizer=None) -> torch.Tensor:
    """Unit-norm embeddings [T, E] of texts, PIL images and embedding tensors, in order."""
    out: list[torch.Tensor] = []
    param = next(model.parameters())
    texts = [q for q in queries if isinstance(q, str)]
    text_emb: dict[str, torch.Tensor] = {}
    if texts:
        if tokenizer is None:
            from clipforge.model.factory import tokenizer_for

            tokenizer = tokenizer_for(model)
        emb = model.encode_text(tokenizer(texts).to(param.device), normalize=True)
        text_emb = dict(zip(texts, emb))
    for q in queries:
        if isinstance(q, str):
            out.append(text_emb[q])
        elif isinstance(q, torch.Tensor):
            if q.ndim != 1 or q.shape[0] != model.config.embed_dim:
                raise ClipforgeError(f"an embedding query must have shape [{model.config.embed_dim}], "
                                     f"got {tuple(q.shape)}")
            out.append(F.normalize(q.to(param.device, torch.float32), dim=-1))
        else:
            out.append(model.encode_image(_image_tensor(model, q, preprocess), normalize=True)[0])
    return torch.stack([o.float() for o in out])


def _shifted_maps(visual: nn.Module, x: torch.Tensor, q: torch.Tensor, method: str, shifts: int,
                  refine: str) -> torch.Tensor:
    """Raw maps resampled to the input [T, S, S], averaged over ``shifts`` x ``shifts`` cyclic shifts
    of the image by fractions of a grid cell, then refined under the image if asked."""
    if shifts < 1:
        raise ClipforgeError(f"shifts must be >= 1, got {shifts}")
    size = tuple(x.shape[-2:])
    first = _maps(visual, x, q, method)  # [T, h, w]
    grid = _sampling_grid(size, first.shape[-2:], grid_centres(visual, size, tuple(first.shape[-2:])))
    total = _resample(first, grid)
    cell = size[0] / first.shape[-2], size[1] / first.shape[-1]
    if shifts > 1:
        offsets = [(round(i * cell[0] / shifts), round(j * cell[1] / shifts)) for i in range(shifts) for j in range(shifts)]
        for dy, dx in offsets[1:]:
            m = _resample(_maps(visual, torch.roll(x, (dy, dx), dims=(-2, -1)), q, method), grid)
            total = total + torch.roll(m, (-dy, -dx), dims=(-2, -1))
        total = total / len(offsets)
    if refine == "guided":
        total = guided_filter(total, x[0], radius=round(min(cell) / 2))
    return total


Centres = tuple[tuple[float, float], tuple[float, float]]  # per axis (y, x): (stride, offset) in pixels


def grid_centres(visual: nn.Module, size: Sequence[int], grid: Sequence[int]) -> Centres:
    """Where each grid cell's receptive field is centred: cell ``i`` at pixel ``stride * i + offset``
    (pixel centres at integers). A patch embedding centres a cell in its patch; clipforge's conv
    stem (3x3 stride-2 convolutions padded by 1) centres it on the patch's first pixel, half a cell
    up and left, and a map drawn at patch centres would sit that far down and right of the evidence."""
    stem = getattr(visual, "conv1", None) if isinstance(visual, VisionTransformer) else None
    if isinstance(stem, nn.Sequential):
        stride, offset = 1.0, 0.0
        for layer in stem:
            if isinstance(layer, nn.Conv2d):  # output j reads input s*j - p .. s*j - p + k - 1
                s, k, p = layer.stride[0], layer.kernel_size[0], layer.padding[0]
                offset += stride * ((k - 1) / 2 - p)
                stride *= s
        return (stride, offset), (stride, offset)
    out = []
    for n, g in zip(size, grid):
        s = n / g
        out.append((s, (s - 1) / 2))
    return out[0], out[1]


def _sampling_grid(size: Sequence[int], cells: Sequence[int], where: Centres | None = None) -> torch.Tensor:
    """Where each output pixel reads a [h, w] grid map, in ``grid_sample``'s [-1, 1] units: [1, H, W, 2].
    ``where``: each cell's centre (default: centred in equal cells, as bilinear ``interpolate``)."""
    if where is None:
        where = tuple((n / g, (n / g - 1) / 2) for n, g in zip(size, cells))  # type: ignore[assignment]
    axes = []
    for (stride, offset), n, g in zip(where, size, cells):
        cell = (torch.arange(n, dtype=torch.float32) - offset) / stride  # each pixel in cell units
        axes.append(cell * 2 / (g - 1) - 1 if g > 1 else torch.zeros(n))
    gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None]


def _resample(maps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Grid maps [T, h, w] -> [T, H, W] through ``_sampling_grid``'s grid: bilinear between cell centres,
    constant beyond the outermost ones."""
    maps = maps.detach().float().cpu()
    return F.grid_sample(maps[:, None], grid.expand(maps.shape[0], -1, -1, -1), mode="bilinear",
                         padding_mode="border", align_corners=True)[:, 0]


def _upsample(maps: torch.Tensor, size: Sequence[int], where: Centres | None = None) -> torch.Tensor:
    """``_resample`` through a grid built for this one call."""
    return _resample(maps, _sampling_grid(size, maps.shape[-2:], where))


def _maps(visual: nn.Module, x: torch.Tensor, q: torch.Tensor, method: str) -> torch.Tensor:
    """Raw maps [T, h, w] on the tower's grid."""
    if method == "dense":
        with torch.no_grad():
            emb = F.normalize(dense_mod.dense_embeddings(visual, x)[0].float(), dim=-1)  # [h, w, E]
        return torch.einsum("hwe,te->thw", emb, q)

    def score(e: torch.Tensor) -> torch.Tensor:
        return F.normalize(e.float(), dim=-1)[0] @ q.t()  # [T]

    with torch.enable_grad():
        x = x.detach().requires_grad_(True)  # every intermediate joins the graph, frozen weights or not
        if method == "relevance":
            return relevance_maps(visual, x, score, q.shape[0])
        return _gradcam(visual, x, score, q.shape[0])


def _gradcam(visual: nn.Module, x: torch.Tensor, score, n: int) -> torch.Tensor:
    feats, grid, emb = _features_and_embedding(visual, x)
    scores = score(emb)
    maps = []
    for t in range(n):
        (grad,) = torch.autograd.grad(scores[t], feats, retain_graph=t < n - 1)
        a, g = grid(feats.detach())[0].float(), grid(grad)[0].float()  # [h, w, C]
        weights = g.mean(dim=(0, 1))  # [C]
        maps.append((a * weights).sum(dim=-1).clamp(min=0))
    return torch.stack(maps)


def _features_and_embedding(visual: nn.Module, x: torch.Tensor):
    """(the feature tensor the embedding is computed from, as the graph holds it; a function laying
    it, or its gradient, out as [1, h, w, C]; the embedding [1, E])."""
    if isinstance(visual, ModifiedResNet):
        fmap = dense_mod.resnet_features(visual, x)
        return fmap, lambda t: t.permute(0, 2, 3, 1), visual.attnpool(fmap)
    if isinstance(visual, TimmVisionTower) and not _reads_class_token(visual):
        feats = visual.trunk.forward_features(x)
        return feats, lambda t: dense_mod.timm_grid(visual, t), visual.head(visual.trunk.forward_head(feats))
    if isinstance(visual, SiglipVisionTower):
        tokens = dense_mod.siglip_tokens(visual, x)
        return tokens, dense_mod.token_grid, visual.attn_pool(tokens)
    # A class-token ViT: the tokens entering the last block (after it, patch tokens no longer reach
    # the class token).
    if isinstance(visual, TimmVisionTower):
        last, prefix = visual.trunk.blocks[-1], visual.trunk.num_prefix_tokens
    else:
        last, prefix = visual.transformer.resblocks[-1], 1
    captured: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        emb = visual(x)
    finally:
        handle.remove()
    return captured[0], lambda t: dense_mod.token_grid(t[:, prefix:]), emb


def _reads_class_token(t: TimmVisionTower) -> bool:
    return getattr(t.trunk, "global_pool", None) == "token" and hasattr(t.trunk, "blocks")


def scale_maps(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[T, h, w] -> [T, H, W] on the CPU: bilinear upsampling (none when already that size), then
    each map to [0, 1]."""
    up = maps.detach().float().cpu() if tuple(maps.shape[-2:]) == tuple(size) else _upsample(maps, size)
    lo = up.flatten(1).min(dim=1).values[:, None, None]
    hi = up.flatten(1).max(dim=1).values[:, None, None]
    span = hi - lo
    return torch.where(span > 0, (up - lo) / span.clamp(min=1e-12), torch.zeros_like(up))
