"""Causal text transformer, pooled at the end-of-text token (CLIP) or averaged up to it."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import TextConfig
from clipforge.model.layers import LayerNorm, Transformer


def eot_positions(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """Index of the first end-of-text token in each row; rows without one fall back to the
    highest id (OpenAI's argmax rule, which is the same thing for its tokenizer)."""
    is_eot = tokens == eot_token_id
    return torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), tokens.argmax(dim=1))


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, output_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim))
        # A causal model's pooled output cannot see positions after the end token, so the
        # batch is encoded only up to its longest sequence. Off under torch.compile/CUDA
        # graphs, which prefer static shapes (the .item() below is a host sync).
        self.trim_padding = True
        self.init_weights()

    def init_weights(self) -> None:
        width, layers = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights(
            proj_std=width**-0.5 * (2 * max(layers, 1)) ** -0.5, attn_std=width**-0.5, fc_std=(2 * width) ** -0.5
        )
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, tokens: torch.Tensor, project: bool = True) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"expected token ids of shape [batch, <= {self.context_length}], got {tuple(tokens.shape)}"
            )
        pos = eot_positions(tokens, self.cfg.eot_token_id)  # [B]
        if self.trim_padding:
            tokens = tokens[:, : int(pos.max()) + 1]
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        if self.cfg.pool == "mean":
            x = self.transformer(x, causal=True)  # [B, N, W]
            upto_eot = (torch.arange(n, device=x.device)[None, :] <= pos[:, None]).to(x.dtype).unsqueeze(-1)
            x = (x * upto_eot).sum(dim=1) / upto_eot.sum(dim=1)  # [B, W]; padding after the end token ignored
        else:
            x = self.transformer(x, causal=True, rows=pos)  # [B, W]: output at each end token (only it is used)
        pooled = self.ln_final(x)  # [B, W]
        return pooled @ self.text_projection if project else pooled

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
