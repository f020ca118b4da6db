"""Image towers: Vision Transformer and OpenAI's ModifiedResNet with attention pooling."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import VisionConfig
from clipforge.model.cross_attn import AttentionalPooler
from clipforge.model.layers import LayerNorm, Transformer


class AbsActivation(nn.Module):
    """|x|: rectification that keeps the magnitude of a response of either sign, so an edge filter
    answers a dark-on-light edge as it does a light-on-dark one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


class ColourBlindSplit(nn.Module):
    """A stride-2 first convolution whose first ``gray`` filters see the sum of the input channels
    only (colour-blind: one weight shared by R, G and B) and the rest all three. One convolution
    with the shared weight repeated per channel: a split into two convolutions and a concatenation
    cost a fifth of the demo's step (research/bench_demo_step.py --compare gray)."""

    def __init__(self, out_channels: int, kernel: int, gray: int) -> None:
        super().__init__()
        if not 0 < gray < out_channels:
            raise ValueError(f"gray filters must be between 1 and {out_channels - 1}, got {gray}")
        init = nn.Conv2d(3, out_channels, kernel, bias=False).weight.detach()  # PyTorch's own initialisation
        self.gray_weight = nn.Parameter(init[:gray].mean(1, keepdim=True))  # a colour filter's mean over R, G, B
        self.colour_weight = nn.Parameter(init[gray:].clone())
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.gray_weight.expand(-1, 3, -1, -1), self.colour_weight])
        return F.conv2d(x, weight, stride=2, padding=self.padding)


def conv_stem(width: int, patch_size: int, first_act: str = "relu", first_kernel: int = 3,
              first_gray: int = 0) -> nn.Sequential:
    """3x3 stride-2 convs (BatchNorm + ReLU) from 3 channels to ``width``, log2(patch) of them,
    then a 1x1 conv: the same [B, width, H/p, W/p] grid as a patch embedding, with a CNN's
    locality prior. Channels double per stage and end at ``width``. ``first_act='abs'`` rectifies
    the first stage with |x| instead (VisionConfig.stem_act explains why); ``first_kernel`` sizes
    the first convolution (VisionConfig.stem_kernel) and ``first_gray`` of its filters are
    colour-blind (VisionConfig.stem_gray, ``ColourBlindSplit``)."""
    if first_act not in ("relu", "abs"):
        raise ValueError(f"first_act must be 'relu' or 'abs', got {first_act!r}")
    stages = patch_size.bit_length() - 1
    chans = [max(16, width >> (stages - 1 - i)) for i in range(stages)]
    layers: list[nn.Module] = []
    c_in = 3
    for i, c in enumerate(chans):
        act = AbsActivation() if i == 0 and first_act == "abs" else nn.ReLU(inplace=True)
        k = first_kernel if i == 0 else 3
        conv = ColourBlindSplit(c, k, first_gray) if i == 0 and first_gray else \
            nn.Conv2d(c_in, c, k, stride=2, padding=k // 2, bias=False)
        layers += [conv, nn.BatchNorm2d(c), act]
        c_in = c
    layers.append(nn.Conv2d(c_in, width, 1))
    return nn.Sequential(*layers)


class VisionTransformer(nn.Module):
    """Patch embedding (one strided conv, or a conv stem), class token, learned positions,
    pre-LN transformer, ln_post, proj; with ``attentional_pool`` (CoCa) an attentional pooler
    between the transformer and ln_post, whose first query is the pooled one."""

    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        width, p = cfg.width, cfg.patch_size
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // p
        self.stem_is_conv = cfg.stem == "conv"
        if self.stem_is_conv:
            self.conv1: nn.Module = conv_stem(width, p, cfg.stem_act, cfg.stem_kernel, cfg.stem_gray)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=p, stride=p, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = LayerNorm(width) if cfg.ln_pre else nn.Identity()
        self.pool, self.final_ln_after_pool = cfg.pool, cfg.final_ln_after_pool
        self.transformer = Transformer(width, cfg.layers, cfg.num_heads, cfg.mlp_ratio, quick_gelu,
                                       ls_init_value=cfg.ls_init_value)
        self.attn_pool = None
        pool_width = width
        if cfg.attentional_pool:
            self.attn_pool = AttentionalPooler(output_dim, width, cfg.attn_pooler_heads, cfg.attn_pooler_queries)
            pool_width = output_dim
        self.ln_post = LayerNorm(pool_width)
        self.proj = nn.Parameter(scale * torch.randn(pool_width, output_dim))
        # FLIP-style patch dropout: fraction of patch tokens dropped while training.
        self.patch_dropout = 0.0

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the class token and a random subset of patch tokens (training only)."""
        b, n, d = x.shape
        keep = max(1, int((n - 1) * (1.0 - self.patch_dropout)))
        scores = torch.rand(b, n - 1, device=x.device)
        idx = scores.topk(keep, dim=-1).indices  # [B, keep]
        patches = torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, d))
        return torch.cat([x[:, :1], patches], dim=1)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> the transformer's input [B, 1+g*g, W] (fewer with patch dropout)."""
        if self.stem_is_conv and x.device.type == "cpu":
            # oneDNN runs the stem's 3x3 convolutions faster channels-last; the weights keep their
            # layout, and the flatten/transpose below is then a view of the output rather than a copy.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv1(x)  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+g*g, W]
        if self.training and self.patch_dropout > 0:
            x = self._drop_patches(x)
        return self.ln_pre(x)

    def forward_tokens(self, x: torch.Tensor, project: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, E] as ``forward`` returns it, tokens [B, T, D]): the tokens a captioning
        decoder reads, as OpenCLIP's ``output_tokens`` gives them: the pooler's other queries after
        ln_post, else the patch tokens (after ln_post unless it follows the pooling)."""
        x = self.transformer(self._embed(x))  # [B, N, W]
        if self.attn_pool is not None:
            x = self.ln_post(self.attn_pool(x))  # [B, Q, E]
            pooled, tokens = (x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)), x[:, 1:]
        elif self.final_ln_after_pool:
            tokens = x[:, 1:]
            pooled = self.ln_post(x[:, 0] if self.pool == "cls" else tokens.mean(dim=1))
        else:
            x = self.ln_post(x)
            pooled, tokens = (x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)), x[:, 1:]
        return (pooled @ self.proj if project else pooled), tokens

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        if self.attn_pool is not None:  # the queries need every position of the last block
            return self.forward_tokens(x, project)[0]
        x = self._embed(x)
        if self.pool == "cls":  # LayerNorm is per token: before or after pooling is the same here
            x = self.transformer(x, rows=0)  # [B, W]: the class token's output (the last block computes only it)
            pooled = self.ln_post(x)  # [B, W]
        elif self.final_ln_after_pool:
            pooled = self.ln_post(self.transformer(x)[:, 1:].mean(dim=1))  # [B, W]
        else:
            pooled = self.ln_post(self.transformer(x))[:, 1:].mean(dim=1)  # [B, W]
        return pooled @ self.proj if project else pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased downsampling: an avgpool after the 3x3 conv
    replaces the strided conv, and the shortcut pools before its 1x1 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # Keys "-1", "0", "1" keep OpenAI's state-dict names (downsample.0.weight ...).
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """One query (the mean of the feature map) attends over all positions: the pooled output."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+HW, C]
        x = x + self.positional_embedding.to(x.dtype)
        dh = c // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, H, L, Dh]
            return t.view(b, -1, self.heads, dh).transpose(1, 2)

        q = heads(self.q_proj(x[:, :1]))
        out = F.scaled_dot_product_attention(q, heads(self.k_proj(x)), heads(self.v_proj(x)))  # [B, H, 1, Dh]
        out = out.transpose(1, 2).reshape(b, c)  # [B, C]
        return self.c_proj(out) if project else out


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with avgpool, anti-aliased stages, attention pooling."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        width = cfg.width
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        layers = cfg.resnet_layers
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(cfg.image_size // 32, embed_dim, cfg.num_heads, output_dim)
        self.init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        # Zero-init the last BN of each block so every residual branch starts as identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)  # [B, W, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 32W, H/32, W/32]
        return self.attnpool(x, project=project)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Stages are short and BN statistics make recomputation subtle; not supported.
        if enable:
            raise NotImplementedError("gradient checkpointing is implemented for ViT towers only")
