"""CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models"): a CLIP
whose image tower also yields tokens (``VisionConfig.attentional_pool``), whose text tower appends
a class token (``TextConfig.embed_cls``), and a captioning decoder (``DecoderConfig``) that reads
both and scores the next text token.

``MultimodalDecoder`` keeps the parameter names of OpenCLIP's ``MultimodalTransformer``
(``resblocks``, ``cross_attn``, ``ln_final``, ``text_projection``), so OpenCLIP's CoCa state dicts
load one to one (under ``text_decoder.``). ``CLIP`` holds one when its config has a decoder and
exposes ``caption_logits``, ``caption_forward`` and ``generate``, implemented here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.config import DecoderConfig
from clipforge.model.cross_attn import CrossAttentionBlock
from clipforge.model.layers import LayerNorm, ResidualBlock

if TYPE_CHECKING:
    from clipforge.model.clip import CLIP

SOT_ID, EOT_ID = 49406, 49407  # CLIP BPE's start and end of text


class CaptionOutput(NamedTuple):
    """What a CoCa loss needs (OpenCLIP's CoCa forward): ``logits[:, i]`` scores ``labels[:, i]``."""

    image_features: torch.Tensor  # [B, E], L2-normalised
    text_features: torch.Tensor  # [B, E], L2-normalised
    logits: torch.Tensor  # [B, L-1, V]: from the text up to each position, the next token's scores
    labels: torch.Tensor  # [B, L-1]: the text shifted by one (padding included; the loss skips it)
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


class MultimodalDecoder(nn.Module):
    """Text token states [B, L, D] and image tokens [B, T, D] -> next-token logits [B, L, V]:
    per layer a causal self-attention block, then a block attending to the image tokens."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int, quick_gelu: bool) -> None:
        super().__init__()
        self.context_length = cfg.context_length
        # OpenCLIP builds the decoder's MLPs at 4x whatever multimodal_cfg says.
        self.resblocks = nn.ModuleList(
            ResidualBlock(cfg.width, cfg.heads, 4.0, quick_gelu, ls_init_value=cfg.ls_init_value)
            for _ in range(cfg.layers)
        )
        self.cross_attn = nn.ModuleList(
            CrossAttentionBlock(cfg.width, cfg.heads, 4.0, quick_gelu, cfg.ls_init_value) for _ in range(cfg.layers)
        )
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, vocab_size))
        self.grad_checkpointing = False
        self.init_weights(cfg.width, cfg.layers)

    def init_weights(self, width: int, layers: int) -> None:
        """The text tower's GPT-2-style scheme, for the self- and the cross-attention blocks."""
        proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
        for block in [*self.resblocks, *self.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        if text_tokens.shape[1] > self.context_length:
            raise ValueError(f"the decoder reads at most {self.context_length} tokens, got {text_tokens.shape[1]}")
        x = text_tokens
        for self_attn, cross_attn in zip(self.resblocks, self.cross_attn):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self_attn, x, True, use_reentrant=False)
                x = checkpoint(cross_attn, x, image_tokens, use_reentrant=False)
            else:
                x = cross_attn(self_attn(x, causal=True), image_tokens)
        return self.ln_final(x) @ self.text_projection


def _decoder(model: CLIP) -> MultimodalDecoder:
    dec = getattr(model, "text_decoder", None)
    if dec is None:
        raise ValueError(f"{model.config.name or 'this model'} has no captioning decoder (ClipConfig.decoder)")
    return dec


def caption_logits(model: CLIP, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, L, V]: ``logits[:, i]`` scores the token after ``text[:, : i + 1]`` given the image."""
    dec = _decoder(model)
    _, image_tokens = model.visual.forward_tokens(image.to(model.dtype))
    _, text_tokens = model.text.forward_tokens(text)
    return dec(image_tokens, text_tokens)


def caption_forward(model: CLIP, image: torch.Tensor, text: torch.Tensor) -> CaptionOutput:
    """OpenCLIP's CoCa forward (teacher forcing): features for the contrastive loss, and the
    logits of each next token of ``text`` with the labels they are scored against."""
    dec = _decoder(model)
    image_features, image_tokens = model.visual.forward_tokens(image.to(model.dtype))
    text_features, text_tokens = model.text.forward_tokens(text)
    logits = dec(image_tokens, text_tokens[:, :-1])  # the last token predicts nothing in the text
    return CaptionOutput(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), logits,
                         text[:, 1:], model.scale(), model.logit_bias)


@torch.no_grad()
def generate(model: CLIP, image: torch.Tensor, max_len: int = 30, min_len: int = 5, *,
             text: torch.Tensor | None = None, sot_id: int = SOT_ID, eot_id: int = EOT_ID,
             pad_id: int | None = None) -> torch.Tensor:
    """Greedy captions, LongTensor [B, <= max_len]: from ``text`` (default: the start token), the
    most likely next token until the end token, which is barred while a row is shorter than
    ``min_len`` and forced at ``max_len``. A finished row (ended by the end or the padding token)
    is padded. OpenCLIP's ``generate(generation_type='top_k', top_k=1)`` with these settings."""
    dec = _decoder(model)
    pad_id = model.config.text.pad_token_id if pad_id is None else pad_id
    limit = min(dec.context_length, model.text.context_length) + 1  # the longest text either tower reads, +1
    if not min_len < max_len <= limit:
        raise ValueError(f"need min_len < max_len <= {limit}, got min_len={min_len}, max_len={max_len}")
    was_training = model.training
    model.eval()
    _, image_tokens = model.visual.forward_tokens(image.to(model.dtype))
    out = text if text is not None else torch.full((image.shape[0], 1), sot_id, dtype=torch.long,
                                                   device=image.device)
    while out.shape[1] < max_len:
        done = (out[:, -1] == eot_id) | (out[:, -1] == pad_id)
        if done.all():
            break
        logits = dec(image_tokens, model.text.forward_tokens(out)[1])[:, -1]  # [B, V]
        if out.shape[1] < min_len:
            logits[:, eot_id] = float("-inf")
        nxt = logits.argmax(dim=-1)
        if out.shape[1] + 1 == max_len:
            nxt = torch.full_like(nxt, eot_id)
        out = torch.cat([out, torch.where(done, pad_id, nxt)[:, None]], dim=1)
    model.train(was_training)
    return out
