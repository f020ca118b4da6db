"""Image towers whose answer is known: hand-set weights that make embedding channel 0 measure how
much red an image holds and channel 1 how much blue, through the towers' real code.

Patch embeddings (or the ResNet stem) detect red (R - (G+B)/2) and blue (B - (R+G)/2), and a
constant channel gives the grey background a direction of its own (cosine maps normalise each
position, so without it a faintly bluish grey would point exactly along "blue"); attention
is uniform (zero query and key weights) with identity values, so the pooled output is the mean of
every position's colour features; other residual branches are zero. An explanation of query e0
must then peak on the red object, and of e1 on the blue one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from clipforge.config import VisionConfig
from clipforge.model.clip import CLIP

RED, BLUE, GREY = (230, 20, 20), (20, 20, 230), (128, 128, 128)


def scene(size: int, red_box: tuple[int, int, int, int], blue_box: tuple[int, int, int, int]) -> Image.Image:
    """A grey square image with a red and a blue rectangle (boxes: left, top, right, bottom)."""
    a = np.full((size, size, 3), GREY, np.uint8)
    for box, colour in ((red_box, RED), (blue_box, BLUE)):
        left, top, right, bottom = box
        a[top:bottom, left:right] = colour
    return Image.fromarray(a)


def query(channel: int, dim: int) -> torch.Tensor:
    e = torch.zeros(dim)
    e[channel] = 1.0
    return e


def _colour_filter(weight: torch.Tensor, centre: bool) -> None:
    """Output channel 0 = red detector, 1 = blue detector, on a [C_out, 3, k, k] weight."""
    weight.zero_()
    k = weight.shape[-1]
    taps = (slice(k // 2, k // 2 + 1),) * 2 if centre else (slice(None),) * 2
    n = 1.0 if centre else float(k * k)
    for out, (main, others) in enumerate(((0, (1, 2)), (2, (0, 1)))):
        weight[(out, main, *taps)] = 1.0 / n
        for o in others:
            weight[(out, o, *taps)] = -0.5 / n


def _identity_3(linear_weight: torch.Tensor) -> None:
    linear_weight.zero_()
    linear_weight[0, 0] = linear_weight[1, 1] = linear_weight[2, 2] = 1.0


def _uniform_identity_block(block, width: int) -> None:
    """Uniform attention (zero q, k), identity values and output, no MLP branch."""
    attn = block.attn
    attn.in_proj_weight.zero_()
    attn.in_proj_bias.zero_()
    attn.in_proj_weight[2 * width:] = torch.eye(width)
    attn.out_proj.weight.copy_(torch.eye(width))
    attn.out_proj.bias.zero_()
    block.mlp.c_proj.weight.zero_()
    block.mlp.c_proj.bias.zero_()


@torch.no_grad()
def planted_vit(base) -> CLIP:
    """A one-block class-token ViT on 32 px images, 4 x 4 patches of 8 px."""
    width = 8
    v = VisionConfig(arch="vit", image_size=32, width=width, layers=1, patch_size=8, heads=1, ln_pre=False)
    m = CLIP(replace(base, vision=v, embed_dim=4, preprocess=replace(base.preprocess, image_size=32))).eval()
    vis = m.visual
    _colour_filter(vis.conv1.weight, centre=False)
    vis.class_embedding.zero_()
    vis.positional_embedding.zero_()
    vis.positional_embedding[:, 2], vis.positional_embedding[:, 3] = 4.0, -4.0  # keeps LayerNorm's scale steady
    block = vis.transformer.resblocks[0]
    _uniform_identity_block(block, width)
    # Queries see colour, keys nothing: the class token's attention stays uniform, while query-query
    # attention (the dense maps' last block) gathers tokens of like colour.
    block.attn.in_proj_weight[0, 0] = block.attn.in_proj_weight[1, 1] = 3.0
    vis.proj.zero_()
    vis.proj[0, 0] = vis.proj[1, 1] = vis.proj[2, 2] = 1.0  # channel 2 (constant): the background's direction
    return m


@torch.no_grad()
def planted_siglip(base) -> CLIP:
    """SigLIP's tower (no class token, attention-pool head) on 32 px images, 4 x 4 patches."""
    width = 8
    v = VisionConfig(arch="siglip", image_size=32, width=width, layers=1, patch_size=8, heads=1)
    m = CLIP(replace(base, vision=v, embed_dim=width, preprocess=replace(base.preprocess, image_size=32))).eval()
    vis = m.visual
    _colour_filter(vis.conv1.weight, centre=False)
    vis.conv1.bias.zero_()
    vis.positional_embedding.zero_()
    vis.positional_embedding[:, 2], vis.positional_embedding[:, 3] = 4.0, -4.0
    block = vis.transformer.resblocks[0]
    block.attn.out_proj.weight.zero_()  # the block leaves tokens as they are
    block.attn.out_proj.bias.zero_()
    block.mlp.c_proj.weight.zero_()
    block.mlp.c_proj.bias.zero_()
    head = vis.attn_pool
    head.attn.in_proj_weight.zero_()
    head.attn.in_proj_bias.zero_()
    head.attn.in_proj_weight[2 * width:] = torch.eye(width)
    head.attn.out_proj.weight.copy_(torch.eye(width))
    head.attn.out_proj.bias.zero_()
    head.mlp.c_proj.weight.zero_()
    head.mlp.c_proj.bias.zero_()
    return m


@torch.no_grad()
def planted_resnet(base) -> CLIP:
    """OpenAI's ModifiedResNet (one block per stage) on 64 px images: a 2 x 2 final map."""
    v = VisionConfig(arch="resnet", image_size=64, width=16, resnet_layers=(1, 1, 1, 1), heads=1)
    m = CLIP(replace(base, vision=v, embed_dim=4, preprocess=replace(base.preprocess, image_size=64))).eval()
    vis = m.visual
    _colour_filter(vis.conv1.weight, centre=True)
    vis.bn1.bias[2] = 1.0  # a constant channel: the background's direction, so grey is neither red nor blue
    for conv in (vis.conv2, vis.conv3):
        conv.weight.zero_()
        for c in range(3):
            conv.weight[c, c, 1, 1] = 1.0
    for stage in (vis.layer1, vis.layer2, vis.layer3, vis.layer4):
        for block in stage:  # residual branches are zero at init (bn3's weight): only shortcuts carry
            if block.downsample is not None:
                w = block.downsample[1].weight
                w.zero_()
                for c in range(3):
                    w[c, c, 0, 0] = 1.0
    pool = vis.attnpool
    pool.positional_embedding.zero_()
    for lin in (pool.q_proj, pool.k_proj):
        lin.weight.zero_()
        lin.bias.zero_()
    _identity_3(pool.v_proj.weight)
    pool.v_proj.bias.zero_()
    _identity_3(pool.c_proj.weight)
    pool.c_proj.bias.zero_()
    return m
