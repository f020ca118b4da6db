"""Text transformer: CLIP's causal model pooled at the end-of-text token, averaged up to it, or
OpenCLIP's other variants (``TextConfig``): bidirectional attention, pooling at the first or last
position, a projection with a bias or none, LayerNorm eps, tanh GELU and LayerScale.

Parameter names are OpenCLIP's ``TextTransformer``'s for every variant (``text_projection`` is a
matrix, or an ``nn.Linear`` with ``proj_bias``; ``ls_1.gamma``/``ls_2.gamma`` with LayerScale;
``cls_emb`` for CoCa's class token), so its state dicts load one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import TextConfig
from clipforge.model.layers import LayerNorm, Transformer, take_rows


def eot_positions(tokens: torch.Tensor, eot_token_id: int, fallback_argmax: bool = True) -> torch.Tensor:
    """Index of the first end-of-text token in each row. A row without one falls back to its
    highest id (OpenAI's argmax rule, the same thing for its tokenizer, where the end token is the
    top id) or, with ``fallback_argmax=False``, to position 0 (OpenCLIP's and transformers' rule
    for an end token that is not the top id)."""
    is_eot = tokens == eot_token_id
    first = is_eot.int().argmax(dim=1)  # 0 where the row has none
    if not fallback_argmax:
        return first
    return torch.where(is_eot.any(dim=1), first, tokens.argmax(dim=1))


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, output_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        # CoCa's class token takes one position after the longest text.
        self.cls_emb = nn.Parameter(torch.empty(cfg.width)) if cfg.embed_cls else None
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length + cfg.embed_cls, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu,
                                       ls_init_value=cfg.ls_init_value, norm_eps=cfg.norm_eps,
                                       gelu_approximate=cfg.gelu_approximate)
        self.ln_final = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.text_projection: nn.Module | nn.Parameter | None
        if cfg.proj_type == "none":
            if output_dim != cfg.width:
                raise ValueError(f"a text tower without projection outputs its width {cfg.width}, "
                                 f"but the embedding size is {output_dim}")
            self.text_projection = None
        elif cfg.proj_bias:
            self.text_projection = nn.Linear(cfg.width, output_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim))
        # A causal model's pooled output cannot see positions after the pooled one, so the batch
        # is encoded only up to the furthest of them. Off under torch.compile/CUDA graphs, which
        # prefer static shapes (the .item() below is a host sync). A bidirectional model, or one
        # pooled at the last position, always runs the full context: padding is attended to.
        self.trim_padding = True
        # A tower without blocks averages in one gather-and-sum (``_bag_mean``); off, it takes the
        # padded [B, N, W] path as towers with blocks do (research/bench_demo_step.py compares the two).
        self.bag_mean = cfg.layers == 0 and cfg.pool == "mean"
        self.init_weights()

    def init_weights(self) -> None:
        width, layers = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        self.transformer.init_weights(
            proj_std=width**-0.5 * (2 * max(layers, 1)) ** -0.5, attn_std=width**-0.5, fc_std=(2 * width) ** -0.5
        )
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=width**-0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width**-0.5)

    def pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position each row is pooled at (for "mean": the last one averaged), LongTensor [B]."""
        b, n = tokens.shape
        pool = self.cfg.pool
        if pool == "first":
            return torch.zeros(b, dtype=torch.long, device=tokens.device)
        if pool == "last":
            return torch.full((b,), n - 1, dtype=torch.long, device=tokens.device)
        cfg = self.cfg
        return eot_positions(tokens, cfg.eot_token_id, fallback_argmax=cfg.eot_token_id == cfg.vocab_size - 1)

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"expected token ids of shape [batch, <= {self.context_length}], got {tuple(tokens.shape)}"
            )

    def _project(self, pooled: torch.Tensor, project: bool) -> torch.Tensor:
        if not project or self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def _with_cls(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCa's input: token embeddings, the class token appended, positions added, [B, N+1, W];
        and which keys may be attended, [B, 1, 1, N+1]. OpenCLIP's mask (which its CoCa weights were
        trained with) lets every query see key 0 and key j > 0 where token j-1 is not padding: one
        place off the tokens, so the class position sees the first padding slot and (unless the
        text fills the context) not itself."""
        b, n = tokens.shape
        x = self.token_embedding(tokens)
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(b, 1, -1)], dim=1)  # type: ignore[union-attr]
        x = x + self.positional_embedding[: n + 1].to(x.dtype)
        valid = torch.cat([torch.ones_like(tokens[:, :1], dtype=torch.bool), tokens != self.cfg.pad_token_id], dim=1)
        return x, valid[:, None, None, :]

    def forward_tokens(self, tokens: torch.Tensor, project: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, E] as ``forward`` returns it, token outputs [B, N, W]): what a captioning
        decoder reads, as OpenCLIP's ``output_tokens`` gives them (before ln_final with a class
        token, after it otherwise)."""
        self._check(tokens)
        causal = self.cfg.causal_mask
        if self.cls_emb is not None:
            x, mask = self._with_cls(tokens)
            x = self.transformer(x, causal=causal, mask=mask)  # [B, N+1, W]
            return self._project(self.ln_final(x[:, -1]), project), x[:, :-1]
        if self.cfg.pool == "mean":
            raise ValueError("token outputs of a mean-pooled text tower are not defined (no OpenCLIP counterpart)")
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x, causal=causal))  # [B, N, W]
        return self._project(take_rows(x, self.pooled_positions(tokens)).squeeze(1), project), x

    def forward(self, tokens: torch.Tensor, project: bool = True) -> torch.Tensor:
        self._check(tokens)
        causal = self.cfg.causal_mask
        if self.cls_emb is not None:  # pooled at the class token, the last position: only its row of the last block
            x, mask = self._with_cls(tokens)
            x = self.transformer(x, causal=causal, rows=tokens.shape[1], mask=mask)  # [B, W]
            return self._project(self.ln_final(x), project)
        pos = self.pooled_positions(tokens)  # [B]
        if self.bag_mean and not torch.onnx.is_in_onnx_export():
            return self._project(self.ln_final(self._bag_mean(tokens, pos)), project)
        if self.trim_padding and causal:
            tokens = tokens[:, : int(pos.max()) + 1]
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n].to(self.token_embedding.weight.dtype)
        if self.cfg.pool == "mean":
            x = self.transformer(x, causal=True)  # [B, N, W]
            upto_eot = (torch.arange(n, device=x.device)[None, :] <= pos[:, None]).to(x.dtype).unsqueeze(-1)
            x = (x * upto_eot).sum(dim=1) / upto_eot.sum(dim=1)  # [B, W]; padding after the end token ignored
        else:
            # The output at each pooled position only (the last block computes just that row).
            # OpenCLIP normalises every position and then pools; LayerNorm acts per position,
            # so pooling first is the same.
            x = self.transformer(x, causal=causal, rows=pos)  # [B, W]
        return self._project(self.ln_final(x), project)  # [B, E]

    def _bag_mean(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """A tower without blocks: the mean of token and position embeddings up to the end token,
        gathered and summed in one pass (``embedding_bag``) rather than through a [B, N, W] tensor;
        the same figures, less time (research/bench_demo_step.py --compare bag)."""
        n = int(pos.max()) + 1
        tokens, length = tokens[:, :n], (pos + 1).unsqueeze(1)
        weights = (torch.arange(n, device=tokens.device)[None, :] < length) / length
        table = self.token_embedding
        # Summed over the batch's distinct words, whose gradient is then one row per word: a sparse
        # gradient per token occurrence cost more to coalesce than the rest of the tower.
        words, inverse = torch.unique(tokens, return_inverse=True)
        rows = F.embedding(words, table.weight, sparse=table.sparse)
        x = F.embedding_bag(inverse, rows, per_sample_weights=weights.to(rows.dtype), mode="sum")
        return x + self.positional_embedding[:n].cumsum(0)[pos] / length  # the positions' mean, from their running sum

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
